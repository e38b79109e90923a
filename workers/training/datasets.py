"""Datasets by name: scikit-learn's bundled sets, which load offline."""

from __future__ import annotations

import torch
from torch import Tensor

DATASETS = ("digits", "breast_cancer")


def load_dataset(name: str) -> tuple[Tensor, Tensor]:
    """(X float32, y) for a bundled dataset.

    digits: 1797 x 64 pixel intensities scaled to [0, 1], y int64 classes 0..9.
    breast_cancer: 569 x 30 features standardized (whole-set mean and std: the set is a
    fixed benchmark, not a deployment), y float32 0/1 for `bce`.
    """
    try:
        from sklearn import datasets
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise RuntimeError("bundled datasets need scikit-learn installed") from exc
    if name == "digits":
        bunch = datasets.load_digits()
        features = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
        return features, torch.tensor(bunch.target, dtype=torch.int64)
    if name == "breast_cancer":
        bunch = datasets.load_breast_cancer()
        features = torch.tensor(bunch.data, dtype=torch.float32)
        features = (features - features.mean(0)) / features.std(0)
        return features, torch.tensor(bunch.target, dtype=torch.float32)
    raise ValueError(f"dataset must be one of {list(DATASETS)}, got {name!r}")


__all__ = ["DATASETS", "load_dataset"]
