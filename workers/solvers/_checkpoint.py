"""Checkpoints of a solve state as safetensors (tensors + JSON metadata; never pickle)."""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load, save

from ._methods import DenseQuasiNewtonState, LbfgsState, LeastSquaresState, SolveState
from ._small import has_numpy_fields, state_to_torch

_STATE_CLASSES = {
    cls.__name__: cls
    for cls in (SolveState, DenseQuasiNewtonState, LbfgsState, LeastSquaresState)
}


def state_to_bytes(state: SolveState) -> bytes:
    """Serializes tensors as safetensors and numbers in its metadata (exact float repr). A
    small-path state (numpy arrays, workers.solvers._small) is written as its torch twin."""
    if has_numpy_fields(state):
        state = state_to_torch(state)
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, object] = {}
    for f in fields(state):
        value = getattr(state, f.name)
        if isinstance(value, torch.Tensor):
            tensors[f.name] = value.detach().contiguous().cpu()
        elif value is None:
            scalars[f.name] = None
        elif isinstance(value, float) and not math.isfinite(value):
            scalars[f.name] = {"float": repr(value)}
        else:
            scalars[f.name] = value
    device = str(state.x.device)
    meta = {"class": type(state).__name__, "scalars": json.dumps(scalars), "device": device}
    return save(tensors, metadata=meta)


def state_from_bytes(blob: bytes, device: str | torch.device | None = None) -> SolveState:
    """Rebuilds a state; ValueError for anything that is not a checkpoint of ours."""
    try:
        return _state_from_bytes(blob, device)
    except ValueError:
        raise
    except Exception as exc:  # safetensors' own error type, JSON, missing keys, bad fields
        raise ValueError(f"not a readable solver checkpoint: {exc}") from exc


def _state_from_bytes(blob: bytes, device) -> SolveState:
    tensors = load(bytes(blob))
    header_len = int.from_bytes(blob[:8], "little")
    meta = json.loads(blob[8 : 8 + header_len]).get("__metadata__") or {}
    cls = _STATE_CLASSES.get(meta.get("class", ""))
    if cls is None:
        raise ValueError(f"checkpoint names an unknown state class {meta.get('class')!r}")
    scalars = json.loads(meta["scalars"])
    if not isinstance(scalars, dict):
        raise ValueError("checkpoint metadata 'scalars' is not an object")
    target = torch.device(device or meta.get("device", "cpu"))
    kwargs = {}
    for f in fields(cls):
        if f.name in tensors:
            kwargs[f.name] = tensors[f.name].to(target)
        elif f.name in scalars:
            value = scalars[f.name]
            kwargs[f.name] = float(value["float"]) if isinstance(value, dict) else value
    return cls(**kwargs)


def save_state(state: SolveState, path: str | Path) -> None:
    Path(path).write_bytes(state_to_bytes(state))


def load_state(path: str | Path, device: str | torch.device | None = None) -> SolveState:
    return state_from_bytes(Path(path).read_bytes(), device)
