"""What a batched solve hands back: per-member results as tensors, and progress as counts.

A batch's progress is never B numbers per step: counts of members active / converged /
failed and a few quantiles of f and the gradient norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._result import SolverResult, Status


@dataclass
class BatchResult:
    """scipy's OptimizeResult fields with a leading batch dimension (members in input order)."""

    x: Tensor  # (B, n)
    fun: Tensor  # (B,)
    jac: Tensor  # (B, n)
    status: Tensor  # (B,) int64: workers.solvers.Status values
    nit: Tensor  # (B,) int64
    nfev: Tensor  # (B,) int64
    njev: Tensor  # (B,) int64
    nhev: Tensor  # (B,) int64
    method: str = ""
    solve_time_s: float = 0.0

    @property
    def success(self) -> Tensor:
        return (self.status == int(Status.CONVERGED)) & torch.isfinite(self.fun)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def member(self, i: int) -> SolverResult:
        """Member i as the single solver's result type."""
        status = Status(int(self.status[i]))
        return SolverResult(
            x=self.x[i], fun=float(self.fun[i]), jac=self.jac[i], nit=int(self.nit[i]),
            nfev=int(self.nfev[i]), njev=int(self.njev[i]), nhev=int(self.nhev[i]),
            status=status, message=status.message, solve_time_s=self.solve_time_s,
        )


@dataclass(frozen=True)
class BatchProgress:
    """One engine iteration of a batch: what a progress bar or a dashboard needs."""

    iteration: int
    size: int
    active: int
    converged: int
    failed: int
    best_grad_norm: float
    median_grad_norm: float  # over the active members (all members once none is active)
    best_f: float
    median_f: float
    elapsed_s: float

    @staticmethod
    def empty(size: int) -> BatchProgress:
        return BatchProgress(0, size, size, 0, 0, math.nan, math.nan, math.nan, math.nan, 0.0)
