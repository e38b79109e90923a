"""The explicit state of a batched solve: a working set of still-running members (rows) and
the full-size tensors where finished members' results are written; checkpoints as safetensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from safetensors.torch import load, save
from torch import Tensor

RUNNING = -1  # status of a member still iterating (Status values are >= 0)


@dataclass
class BatchState:
    """Where a batched solve stands between iterations. Tensors and plain numbers only.

    Rows of the working tensors are members `index` (original ids); a row whose `status` is no
    longer RUNNING is frozen until the next compaction drops it. `out_*` hold every member's
    result (B rows), written when the member finishes.
    """

    index: Tensor  # (k,) int64
    x: Tensor  # (k, n)
    f: Tensor  # (k,)
    g: Tensor  # (k, n)
    status: Tensor  # (k,) int64, RUNNING or a Status value
    nit: Tensor  # (k,) int64
    nfev: Tensor
    njev: Tensor
    nhev: Tensor
    f_prev: Tensor  # (k,) NaN before the first step
    step_size: Tensor
    step_norm: Tensor
    grad_norm: Tensor
    memory: dict[str, Tensor]  # per-method, leading dimension k
    out_x: Tensor  # (B, n)
    out_f: Tensor  # (B,)
    out_g: Tensor  # (B, n)
    out_status: Tensor  # (B,) int64
    out_counts: Tensor  # (B, 4) int64: nit, nfev, njev, nhev
    method: str = ""
    iteration: int = 0
    elapsed_s: float = 0.0
    started: bool = field(default=True)

    _ROW_FIELDS = ("index", "x", "f", "g", "status", "nit", "nfev", "njev", "nhev", "f_prev",
                   "step_size", "step_norm", "grad_norm")
    _OUT_FIELDS = ("out_x", "out_f", "out_g", "out_status", "out_counts")

    @property
    def size(self) -> int:
        return int(self.out_x.shape[0])

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])

    def keep_rows(self, rows: Tensor) -> None:
        """Compacts the working set to `rows` (indices into the current rows)."""
        for name in self._ROW_FIELDS:
            setattr(self, name, getattr(self, name).index_select(0, rows))
        self.memory = {k: v.index_select(0, rows) for k, v in self.memory.items()}

    def write_finished(self, done: Tensor) -> None:
        """Copies the rows `done` (a mask) to the full-size results; masked over every row,
        so it needs no host sync."""
        ids = self.index
        col = done.unsqueeze(1)
        for out, rows in ((self.out_x, self.x), (self.out_g, self.g)):
            out.index_copy_(0, ids, torch.where(col, rows, out.index_select(0, ids)))
        for out, rows in ((self.out_f, self.f), (self.out_status, self.status)):
            out.index_copy_(0, ids, torch.where(done, rows, out.index_select(0, ids)))
        counts = torch.stack((self.nit, self.nfev, self.njev, self.nhev), 1)
        self.out_counts.index_copy_(
            0, ids, torch.where(col, counts, self.out_counts.index_select(0, ids)))

    def to(self, device: torch.device | str) -> BatchState:
        for name in (*self._ROW_FIELDS, *self._OUT_FIELDS):
            setattr(self, name, getattr(self, name).to(device))
        self.memory = {k: v.to(device) for k, v in self.memory.items()}
        return self


def batch_state_to_bytes(state: BatchState) -> bytes:
    """safetensors bytes: every tensor of the state, numbers in the metadata (no pickle)."""
    # Copies, not views: rows of the state may alias each other (the last trial is the start
    # before the first evaluation), and safetensors refuses tensors that share storage.
    tensors = {name: getattr(state, name).detach().cpu().clone()
               for name in (*BatchState._ROW_FIELDS, *BatchState._OUT_FIELDS)}
    for key, value in state.memory.items():
        tensors[f"memory.{key}"] = value.detach().cpu().clone()
    meta = {"class": "BatchState", "method": state.method, "iteration": str(state.iteration),
            "elapsed_s": repr(float(state.elapsed_s))}
    return save(tensors, metadata=meta)


def batch_state_from_bytes(blob: bytes, device: str | torch.device | None = None) -> BatchState:
    """Rebuilds a state; ValueError for anything that is not a batch checkpoint of ours."""
    try:
        tensors = load(bytes(blob))
        header_len = int.from_bytes(blob[:8], "little")
        meta = json.loads(blob[8 : 8 + header_len]).get("__metadata__") or {}
        if meta.get("class") != "BatchState":
            raise ValueError(f"checkpoint holds {meta.get('class')!r}, not a BatchState")
        target = torch.device(device or "cpu")
        kwargs = {name: tensors[name].to(target)
                  for name in (*BatchState._ROW_FIELDS, *BatchState._OUT_FIELDS)}
        memory = {k.removeprefix("memory."): v.to(target) for k, v in tensors.items()
                  if k.startswith("memory.")}
        return BatchState(**kwargs, memory=memory, method=meta.get("method", ""),
                          iteration=int(meta.get("iteration", "0")),
                          elapsed_s=float(meta.get("elapsed_s", "0.0")))
    except ValueError:
        raise
    except Exception as exc:  # safetensors' own errors, JSON, missing keys
        raise ValueError(f"not a readable batch checkpoint: {exc}") from exc
