"""Training checkpoints as safetensors: tensors only, no pickle; scalars in the metadata.

A `TrainingState` is what a minibatch run needs to continue exactly where it stopped: the
step counter, the model's state_dict, the wrapped torch optimizer's state_dict and the K-FAC
preconditioner's state (factors, inverses or eigenbases, its step counter). The batch order
is a function of (seed, step) in loop.py, so it needs no saving.

    save_checkpoint(state, "ckpt/step-00000040.safetensors", fingerprint=spec_fingerprint(spec))
    state = load_checkpoint(path, fingerprint=...)

File layout (one .safetensors file):
    tensors   model/<name>, optimizer/<param index>/<key>, kfac/<key>
    metadata  format, step, fingerprint, optimizer_groups (JSON: the optimizer's param_groups),
              optimizer_scalars (JSON: non-tensor per-parameter state, e.g. a None momentum)
Writes go to a temporary file renamed into place, so a reader never sees half a checkpoint.
Cost: one copy of every tensor to host memory, then the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

FORMAT = "secant-training-checkpoint/1"
_NAME = re.compile(r"^step-(\d{8,})\.safetensors$")


@dataclass
class TrainingState:
    step: int
    model: dict[str, Tensor]
    optimizer: dict[str, Any]  # a torch optimizer state_dict
    preconditioner: dict[str, Tensor] | None = None


def spec_fingerprint(spec: dict) -> str:
    """A short hash of a training spec, stored in its checkpoints so that a checkpoint is never
    resumed into a different job."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"step-{step:08d}.safetensors"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints in a directory, oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), root / name) for name in os.listdir(root) if (m := _NAME.match(name))
    ]
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def save_checkpoint(
    state: TrainingState, path: str | os.PathLike, *, fingerprint: str = "", keep: int | None = None
) -> Path:
    """Writes `state` atomically; with `keep`, deletes all but the newest `keep` checkpoints of
    the directory afterwards."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    for name, tensor in state.model.items():
        tensors[f"model/{name}"] = tensor
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state.optimizer.get("state", {}).items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer/{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    for key, tensor in (state.preconditioner or {}).items():
        tensors[f"kfac/{key}"] = tensor
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    metadata = {
        "format": FORMAT,
        "step": str(state.step),
        "fingerprint": fingerprint,
        "optimizer_groups": json.dumps(state.optimizer.get("param_groups", [])),
        "optimizer_scalars": json.dumps(scalars),
        "preconditioner": "1" if state.preconditioner is not None else "0",
    }
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(temporary), metadata=metadata)
    os.replace(temporary, path)
    if keep is not None:
        for _, old in list_checkpoints(path.parent)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(
    path: str | os.PathLike, *, fingerprint: str | None = None, device: str | torch.device = "cpu"
) -> TrainingState:
    """Reads a checkpoint written by save_checkpoint; ValueError if it is not one, or if
    `fingerprint` is given and the checkpoint belongs to another spec."""
    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a secant training checkpoint")
        if fingerprint is not None and metadata.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{path} was written for another training spec "
                f"({metadata.get('fingerprint')!r}, expected {fingerprint!r})"
            )
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    model: dict[str, Tensor] = {}
    per_param: dict[int, dict[str, Any]] = {}
    kfac: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        kind, _, rest = key.partition("/")
        if kind == "model":
            model[rest] = tensor
        elif kind == "optimizer":
            index, _, entry = rest.partition("/")
            per_param.setdefault(int(index), {})[entry] = tensor
        elif kind == "kfac":
            kfac[rest] = tensor
        else:
            raise ValueError(f"{path}: unknown entry {key!r}")
    for index, entries in json.loads(metadata["optimizer_scalars"]).items():
        per_param.setdefault(int(index), {}).update(entries)
    optimizer = {"state": per_param, "param_groups": json.loads(metadata["optimizer_groups"])}
    return TrainingState(
        step=int(metadata["step"]),
        model=model,
        optimizer=optimizer,
        preconditioner=kfac if metadata.get("preconditioner") == "1" else None,
    )


__all__ = [
    "TrainingState",
    "checkpoint_path",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
    "spec_fingerprint",
]
