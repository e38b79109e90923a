"""Checkpoints of a solve state as safetensors (tensors + JSON metadata; never pickle)."""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load, save

from ._methods import DenseQuasiNewtonState, LbfgsState, LeastSquaresState, SolveState

_STATE_CLASSES = {
    cls.__name__: cls
    for cls in (SolveState, DenseQuasiNewtonState, LbfgsState, LeastSquaresState)
}


def state_to_bytes(state: SolveState) -> bytes:
    """Serializes tensors as safetensors and numbers in its metadata (exact float repr)."""
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
    from safetensors import safe_open  # noqa: F401  (validates the format on load)

    tensors = load(blob)
    header_len = int.from_bytes(blob[:8], "little")
    meta = json.loads(blob[8 : 8 + header_len]).get("__metadata__", {})
    cls = _STATE_CLASSES.get(meta.get("class", ""))
    if cls is None:
        raise ValueError(f"checkpoint names an unknown state class {meta.get('class')!r}")
    scalars = json.loads(meta["scalars"])
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
