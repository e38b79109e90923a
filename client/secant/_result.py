"""The client-side result: scipy.optimize.OptimizeResult's fields plus job id, timings, history."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from secant._tensors import from_tensor, is_empty
from secant.v1 import optimizer_pb2 as pb

if TYPE_CHECKING:  # matplotlib is an optional extra, imported only by plot()
    from matplotlib.figure import Figure


class JobState(enum.IntEnum):
    """Where a job is in its life; values equal the wire enum ``secant.v1.JobState``."""

    UNSPECIFIED = pb.JOB_STATE_UNSPECIFIED
    QUEUED = pb.QUEUED
    RUNNING = pb.RUNNING
    SUCCEEDED = pb.SUCCEEDED
    FAILED = pb.FAILED
    CANCELLED = pb.CANCELLED
    WAITING_FOR_CLIENT = pb.WAITING_FOR_CLIENT

    def __str__(self) -> str:
        return self.name.lower()

    @property
    def is_terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

    @classmethod
    def parse(cls, value: JobState | int | str) -> JobState:
        """Accepts the enum, its wire integer, or a name in any case ("running")."""
        if isinstance(value, str):
            try:
                return cls[value.strip().upper()]
            except KeyError:
                names = ", ".join(s.name.lower() for s in cls if s is not cls.UNSPECIFIED)
                raise ValueError(f"unknown job state {value!r}; expected one of {names}") from None
        return cls(int(value))


class Status(enum.IntEnum):
    """How a solve ended, as scipy-like integer codes (only CONVERGED is a success)."""

    CONVERGED = 0
    MAX_ITERATIONS = 1
    MAX_EVALUATIONS = 2
    LINE_SEARCH_FAILED = 3
    NON_FINITE = 4
    CANCELLED = 5
    TIME_LIMIT = 6
    UNKNOWN = -1


_STATUS_BY_WIRE = {
    pb.CONVERGED: Status.CONVERGED,
    pb.MAX_ITERATIONS: Status.MAX_ITERATIONS,
    pb.MAX_EVALUATIONS: Status.MAX_EVALUATIONS,
    pb.LINE_SEARCH_FAILED: Status.LINE_SEARCH_FAILED,
    pb.NON_FINITE: Status.NON_FINITE,
    pb.CANCELLED_BY_USER: Status.CANCELLED,
    pb.TIME_LIMIT: Status.TIME_LIMIT,
}


def status_from_wire(status: int) -> Status:
    """scipy-like integer status for a wire SolveStatus (UNSPECIFIED -> UNKNOWN, -1)."""
    return _STATUS_BY_WIRE.get(status, Status.UNKNOWN)


@dataclass(frozen=True)
class IterateRecord:
    """One accepted iteration as the stream reported it; ``x`` only every report_x_every."""

    nit: int
    f: float
    grad_norm: float
    step_size: float
    nfev: int
    njev: int
    elapsed: float
    x: np.ndarray | None = None

    @classmethod
    def from_proto(cls, iterate: pb.Iterate) -> IterateRecord:
        return cls(
            nit=int(iterate.iteration),
            f=float(iterate.f),
            grad_norm=float(iterate.grad_norm),
            step_size=float(iterate.step_size),
            nfev=int(iterate.nfev),
            njev=int(iterate.njev),
            elapsed=float(iterate.elapsed_s),
            x=from_tensor(iterate.x, copy=True)
            if iterate.HasField("x") and not is_empty(iterate.x) else None,
        )


class OptimizeResult(dict):
    """scipy-compatible result: a dict whose keys are also attributes (``res.x``, ``res["x"]``).

    Fields: x, fun, jac, nit, nfev, njev, nhev, status (scipy-like int, see ``Status``),
    success, message, job_id, solve_time_s (inside the solver loop on the worker),
    wall_time_s (submit to result, as the gateway saw it), method_chosen and method_reason
    (method="auto": the method the server picked and why, in one line; empty otherwise) and
    history (IterateRecords the client saw on the stream; empty if it saw none).
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc

    __setattr__ = dict.__setitem__  # type: ignore[assignment]
    __delattr__ = dict.__delitem__  # type: ignore[assignment]

    def __dir__(self) -> list[str]:
        return list(self.keys()) + list(super().__dir__())

    def __repr__(self) -> str:
        if not self:
            return f"{type(self).__name__}()"
        shown = {k: v for k, v in self.items() if k != "history"}
        width = max(len(k) for k in shown) + 1
        lines = [f"{k.rjust(width)}: {_short(v)}" for k, v in shown.items()]
        lines.append(f"{'history'.rjust(width)}: <{len(self.get('history', []))} iterates>")
        return "\n".join(lines)

    @classmethod
    def from_proto(
        cls, result: pb.Result, job_id: str = "", history: list[IterateRecord] | None = None
    ) -> OptimizeResult:
        """Decodes a wire Result (copies x and jac out of the message)."""
        return cls(
            x=from_tensor(result.x, copy=True) if not is_empty(result.x) else np.empty(0),
            fun=float(result.fun),
            jac=from_tensor(result.jac, copy=True) if not is_empty(result.jac) else np.empty(0),
            nit=int(result.nit),
            nfev=int(result.nfev),
            njev=int(result.njev),
            nhev=int(result.nhev),
            status=int(status_from_wire(result.status)),
            success=bool(result.success),
            message=result.message,
            job_id=job_id,
            solve_time_s=float(result.solve_time_s),
            wall_time_s=float(result.wall_time_s),
            method_chosen=result.method_chosen,
            method_reason=result.method_reason,
            history=list(history or []),
        )

    def plot(self, path: str | None = None, title: str | None = None) -> Figure:
        """Draws f and the gradient norm against iteration; saves to ``path`` if given.

        Needs matplotlib (``pip install 'secant[plot]'``); imported only here.
        """
        return plot_history(self.get("history", []), path=path, title=title or self.job_id)


def plot_history(
    history: list[IterateRecord], path: str | None = None, title: str | None = None
) -> Figure:
    """Two stacked log-scale panels (f, then gradient inf-norm) against iteration.

    With ``path``, writes the file. Builds a bare Figure (no pyplot, so no GUI backend and
    no global state is touched); it renders with Agg wherever it is saved.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'secant[plot]'") from exc

    iterations = [r.nit for r in history]
    values = [r.f for r in history]
    grad_norms = [r.grad_norm for r in history]
    figure = Figure(figsize=(6.4, 5.6), layout="constrained")
    ax_f, ax_g = figure.subplots(2, 1, sharex=True)
    ax_f.plot(iterations, values, marker=".", linewidth=1)
    ax_f.set_ylabel("f(x)")
    ax_g.plot(iterations, grad_norms, marker=".", linewidth=1, color="tab:orange")
    ax_g.set_ylabel("||grad f||_inf")
    ax_g.set_xlabel("iteration")
    # log scale shows linear/superlinear convergence, but only positive values can be drawn
    if values and min(values) > 0:
        ax_f.set_yscale("log")
    if grad_norms and min(grad_norms) > 0:
        ax_g.set_yscale("log")
    for ax in (ax_f, ax_g):
        ax.grid(True, which="both", alpha=0.3)
    if title:
        ax_f.set_title(title)
    if path is not None:
        figure.savefig(path, dpi=100)
    return figure


def _short(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return np.array2string(value, threshold=8, precision=6)
    return repr(value)
