"""The few array operations the line-search solvers' shared code needs, for two array kinds.

The solvers are written once against these: `TORCH` (the default: any device, any n) and
`NUMPY` (the small-problem path, see _small.py: CPU float64 vectors of a few dozen entries,
where one torch call's dispatch costs more than the arithmetic). Each does what the torch
spelling beside it does, so both paths take the same steps; they may differ in the last bit.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def _norm_inf(t: Tensor) -> float:
    # One pass and no temporary (abs().max() writes an n-vector first).
    if not t.numel():
        return 0.0
    low, high = torch.aminmax(t)
    return max(-float(low), float(high))


class TorchOps:
    name = "torch"

    @staticmethod
    def dot(a: Tensor, b: Tensor) -> float:
        return float(torch.dot(a, b))

    @staticmethod
    def step(x: Tensor, d: Tensor, alpha: float) -> Tensor:
        """x + alpha d, a new vector."""
        return torch.add(x, d, alpha=alpha)

    @staticmethod
    def norm(v: Tensor) -> float:
        return float(torch.linalg.vector_norm(v))

    norm_inf = staticmethod(_norm_inf)
    outer = staticmethod(torch.outer)

    @staticmethod
    def eye(v: Tensor) -> Tensor:
        """The n x n identity for an n-vector v, in its dtype and on its device."""
        return torch.eye(v.numel(), dtype=v.dtype, device=v.device)


class NumpyOps:
    name = "numpy"

    @staticmethod
    def dot(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b)

    @staticmethod
    def step(x: np.ndarray, d: np.ndarray, alpha: float) -> np.ndarray:
        return x + alpha * d

    @staticmethod
    def norm(v: np.ndarray) -> float:
        return math.sqrt(float(v @ v))

    @staticmethod
    def norm_inf(v: np.ndarray) -> float:
        return float(np.abs(v).max()) if v.size else 0.0

    outer = staticmethod(np.outer)

    @staticmethod
    def eye(v: np.ndarray) -> np.ndarray:
        return np.eye(v.size, dtype=v.dtype)


TORCH = TorchOps()
NUMPY = NumpyOps()
