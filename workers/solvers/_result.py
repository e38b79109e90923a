"""Outcomes and results of a solve: one table of statuses with scipy-like messages."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
from torch import Tensor


class Status(enum.IntEnum):
    """How a solve ended. Only CONVERGED is a success."""

    CONVERGED = 0
    MAX_ITERATIONS = 1
    MAX_EVALUATIONS = 2
    LINE_SEARCH_FAILED = 3
    NON_FINITE = 4
    CANCELLED = 5
    TIME_LIMIT = 6

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    Status.CONVERGED: "Optimization terminated successfully.",
    Status.MAX_ITERATIONS: "Maximum number of iterations has been exceeded.",
    Status.MAX_EVALUATIONS: "Maximum number of function evaluations has been exceeded.",
    Status.LINE_SEARCH_FAILED: "Desired error not necessarily achieved due to precision loss "
    "(the line search found no acceptable step).",
    Status.NON_FINITE: "NaN or Inf encountered in the objective or its derivatives.",
    Status.CANCELLED: "The solve was cancelled.",
    Status.TIME_LIMIT: "The time limit was reached.",
}


@dataclass(frozen=True)
class IterateInfo:
    """What a callback sees after each accepted iteration."""

    nit: int
    x: Tensor
    f: float
    grad_norm: float  # inf-norm of the (projected) gradient
    step_size: float
    nfev: int
    njev: int
    nhev: int
    elapsed_s: float


@dataclass
class SolverResult:
    """scipy.optimize.OptimizeResult's fields, as torch tensors and Python numbers."""

    x: Tensor
    fun: float
    jac: Tensor
    nit: int
    nfev: int
    njev: int
    nhev: int
    status: Status
    message: str
    solve_time_s: float = 0.0
    hess_inv: Tensor | None = None
    history: list[IterateInfo] | None = field(default=None, repr=False)
    # method="auto" (workers.solvers._auto): the method that ran, and why, in one line.
    method_chosen: str = ""
    method_reason: str = ""

    @property
    def success(self) -> bool:
        return self.status is Status.CONVERGED and bool(torch.isfinite(torch.tensor(self.fun)))
