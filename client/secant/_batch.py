"""Vectorized batch solves in the SDK: B same-shape problems as one job, (B, n) in and out.
The wire Problem from numpy inputs, the per-member result, and a members-finished progress bar."""

from __future__ import annotations

import math
import operator
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from secant._errors import SecantError
from secant._problem import (
    Bounds,
    DataLike,
    Expression,
    Residual,
    build_objective,
    normalize_bounds,
    to_struct,
)
from secant._result import IterateRecord, OptimizeResult, Status, plot_history
from secant._tensors import from_tensor, is_empty, to_tensor, wire_dtype
from secant.v1 import optimizer_pb2 as pb

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "BatchInputError",
    "BatchProgressBar",
    "BatchSolveResult",
    "build_batch_problem",
]

BatchObjective = str | Expression | Residual

# Wire SolveStatus -> scipy-like Status code, as an array lookup (unknown values -> UNKNOWN).
_STATUS_LOOKUP = np.array(
    [
        Status.UNKNOWN,  # SOLVE_STATUS_UNSPECIFIED
        Status.CONVERGED,
        Status.MAX_ITERATIONS,
        Status.MAX_EVALUATIONS,
        Status.LINE_SEARCH_FAILED,
        Status.NON_FINITE,
        Status.CANCELLED,
        Status.TIME_LIMIT,
    ],
    dtype=np.int64,
)
# The solver's own words for each status (workers.solvers.Status.message), per member.
STATUS_MESSAGES: Mapping[int, str] = {
    Status.CONVERGED: "Optimization terminated successfully.",
    Status.MAX_ITERATIONS: "Maximum number of iterations has been exceeded.",
    Status.MAX_EVALUATIONS: "Maximum number of function evaluations has been exceeded.",
    Status.LINE_SEARCH_FAILED: "Desired error not necessarily achieved due to precision loss "
    "(the line search found no acceptable step).",
    Status.NON_FINITE: "NaN or Inf encountered in the objective or its derivatives.",
    Status.CANCELLED: "The solve was cancelled.",
    Status.TIME_LIMIT: "The time limit was reached.",
    Status.UNKNOWN: "The server reported no status for this member.",
}


class BatchInputError(SecantError, ValueError):
    """A batch argument the SDK refuses before sending (INVALID_ARGUMENT; also a ValueError)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, grpc.StatusCode.INVALID_ARGUMENT)


def statuses_from_wire(wire: np.ndarray) -> np.ndarray:
    """scipy-like int64 status codes for an array of wire SolveStatus values."""
    wire = np.asarray(wire, dtype=np.int64)
    known = (wire >= 0) & (wire < len(_STATUS_LOOKUP))
    return np.where(known, _STATUS_LOOKUP[np.where(known, wire, 0)], int(Status.UNKNOWN))


# -- the request -----------------------------------------------------------------------------


def build_batch_problem(
    objective: BatchObjective,
    X0: Any,
    *,
    data: DataLike | None = None,
    member_data: DataLike | None = None,
    method: str = "bfgs",
    bounds: Any = None,
    options: Mapping[str, Any] | None = None,
    dtype: str | None = None,
    device: str | None = None,
    chunk_size: int = 0,
    labels: Mapping[str, str] | None = None,
) -> pb.Problem:
    """The wire Problem of a vectorized batch: X0 is (B, n), one row per member.

    ``objective`` is written for one member, as for ``minimize`` (a DSL string,
    ``secant.Expression`` or ``secant.Residual``). ``data`` (and the objective's own) is
    shared by every member; each ``member_data`` array has a leading dimension B and member
    i sees ``array[i]``. ``bounds`` take ``minimize``'s spellings with (n,) bounds for every
    member, or ``(lower, upper)`` / ``secant.Bounds`` with (B, n) arrays for bounds per
    member. ``dtype`` None solves in float32 when X0 is a float32 array, else float64;
    ``device`` None lets the server choose. Rows of X0 may hold NaN: those members end
    NON_FINITE without failing the others.

    Cost: one copy of X0, the bounds and every array into the message. Raises
    BatchInputError (a SecantError with INVALID_ARGUMENT, and a ValueError) naming the
    argument that is wrong.
    """
    try:
        return _build_batch_problem(
            objective, X0, data, member_data, method, bounds, options, dtype, device,
            chunk_size, labels,
        )  # fmt: skip
    except BatchInputError:
        raise
    except (ValueError, TypeError) as exc:
        raise BatchInputError(str(exc)) from exc


def _build_batch_problem(
    objective: BatchObjective,
    X0: Any,
    data: DataLike | None,
    member_data: DataLike | None,
    method: str,
    bounds: Any,
    options: Mapping[str, Any] | None,
    dtype: str | None,
    device: str | None,
    chunk_size: int,
    labels: Mapping[str, str] | None,
) -> pb.Problem:
    if callable(objective):
        raise BatchInputError(
            "a batch needs an objective the server evaluates (a DSL string, secant.Expression "
            "or secant.Residual); Python callables are only for minimize()"
        )
    if not isinstance(objective, str | Expression | Residual):
        raise BatchInputError(
            "batch solves take expression or residual objectives (a DSL string, "
            f"secant.Expression or secant.Residual), got {type(objective).__name__}"
        )
    x0 = _as_array(X0, "X0")
    if x0.ndim != 2:
        raise BatchInputError(
            f"X0 must be a 2-D array (B members x n), got shape {x0.shape}; for one problem "
            "use minimize(), for one member pass [x0]"
        )
    size, n = x0.shape
    if size == 0 or n == 0:
        raise BatchInputError(f"X0 must have at least one member and one column, got {x0.shape}")
    if x0.dtype.kind not in "fiub":
        raise BatchInputError(f"X0 must hold numbers, got dtype {x0.dtype}")
    if dtype is None:
        dtype = "float32" if x0.dtype == np.float32 else "float64"
    solve_dtype = wire_dtype(dtype)
    if solve_dtype not in (pb.FLOAT64, pb.FLOAT32):
        raise BatchInputError(f"dtype must be float64 or float32, got {dtype!r}")
    if not isinstance(method, str) or not method:
        raise BatchInputError(f"method must be a non-empty string, got {method!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer):
        raise BatchInputError(f"chunk_size must be an int, got {chunk_size!r}")
    if chunk_size < 0:
        raise BatchInputError(
            f"chunk_size must be >= 0 (0: the server's default), got {chunk_size}"
        )
    if device is not None and not isinstance(device, str):
        raise BatchInputError(f"device must be a string like 'cpu' or 'cuda', got {device!r}")

    wire_objective = build_objective(objective, data)
    shared = {named.name for named in wire_objective.data}
    problem = pb.Problem(
        objective=wire_objective,
        x0=to_tensor(x0, dtype=solve_dtype),
        method=method,
        device=device or "",
        dtype=solve_dtype,
        labels={str(k): str(v) for k, v in (labels or {}).items()},
    )
    problem.batch.size = size
    problem.batch.chunk_size = int(chunk_size)
    for name, value in (member_data or {}).items():
        if not isinstance(name, str) or not name.isidentifier():
            raise BatchInputError(f"member_data names must be identifiers, got {name!r}")
        if name in shared:
            raise BatchInputError(
                f"{name!r} is given both as shared data and in member_data; give it once "
                "(in member_data if each member has its own)"
            )
        array = _as_array(value, f"member_data[{name!r}]")
        if array.ndim == 0 or array.shape[0] != size:
            got = "is a scalar" if array.ndim == 0 else f"has shape {array.shape}"
            raise BatchInputError(
                f"member_data[{name!r}] {got}, but X0 has {size} rows (members): per-member "
                f"arrays need a leading dimension of {size} (member i uses {name}[i])"
            )
        problem.batch.member_data.append(pb.NamedTensor(name=name, tensor=to_tensor(array)))
    if bounds is not None:
        lower, upper = batch_bounds(bounds, size, n)
        problem.bounds.lower.CopyFrom(to_tensor(lower, dtype=solve_dtype))
        problem.bounds.upper.CopyFrom(to_tensor(upper, dtype=solve_dtype))
    if options:
        problem.options.CopyFrom(to_struct(options))
    return problem


def _as_array(value: Any, what: str) -> np.ndarray:
    """An ndarray of numbers from an array-like, a CPU torch tensor, or nested lists."""
    if type(value).__module__.startswith("torch"):
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except ValueError as exc:  # numpy refuses inhomogeneous nested sequences
        raise BatchInputError(
            f"{what} is ragged: its rows have different lengths or shapes ({exc})"
        ) from None
    if array.dtype == object:
        raise BatchInputError(
            f"{what} must be a rectangular array of numbers; got an object array (ragged rows, "
            "or entries that are not numbers)"
        )
    return array


def batch_bounds(bounds: Any, size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) float64 arrays, both (n,) or both (B, n), +/-inf where unbounded.

    Every spelling ``minimize`` accepts gives (n,) bounds shared by all members; a
    ``(lower, upper)`` pair or ``secant.Bounds`` in which either side is a (B, n) array gives
    bounds per member (the other side, a scalar or (n,), is repeated for every member).
    """
    if isinstance(bounds, Bounds):
        lower, upper = bounds.lower, bounds.upper
    elif hasattr(bounds, "lb") and hasattr(bounds, "ub"):
        lower, upper = bounds.lb, bounds.ub
    elif (
        isinstance(bounds, Sequence | np.ndarray)
        and len(bounds) == 2
        and not (_looks_like_pairs(bounds, n))
    ):
        lower, upper = bounds[0], bounds[1]
    else:
        return normalize_bounds(bounds, n)
    if np.ndim(_nones_to(lower, 0.0)) < 2 and np.ndim(_nones_to(upper, 0.0)) < 2:
        return normalize_bounds(Bounds(lower, upper), n)
    low = _member_bound(lower, size, n, -math.inf, "lower")
    high = _member_bound(upper, size, n, math.inf, "upper")
    bad = low > high
    if np.any(bad):
        member, column = (int(i) for i in np.argwhere(bad)[0])
        raise BatchInputError(
            f"bounds: for member {member}, lower[{column}] = {low[member, column]} exceeds "
            f"upper[{column}] = {high[member, column]}"
        )
    return low, high


def _looks_like_pairs(bounds: Sequence[Any], n: int) -> bool:
    # scipy's list of n (lo, hi) pairs; as in minimize, n == 2 reads two pairs as pairs.
    if len(bounds) != n or isinstance(bounds, np.ndarray) and bounds.ndim != 2:
        return False
    return all(
        not isinstance(item, str) and isinstance(item, Sequence | np.ndarray) and len(item) == 2
        and all(v is None or np.ndim(v) == 0 for v in item)
        for item in bounds
    )  # fmt: skip


def _nones_to(value: Any, fill: float) -> Any:
    if value is None:
        return fill
    if isinstance(value, list | tuple):
        return [_nones_to(v, fill) for v in value]
    return value


def _member_bound(value: Any, size: int, n: int, unbounded: float, side: str) -> np.ndarray:
    if value is None:
        return np.full((size, n), unbounded)
    array = _as_array(_nones_to(value, unbounded), f"bounds {side}")
    try:
        array = array.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise BatchInputError(f"bounds: {side} must hold numbers: {exc}") from None
    if array.ndim == 2 and array.shape != (size, n):
        raise BatchInputError(
            f"bounds: {side} has shape {array.shape}; per-member bounds must be ({size}, {n}) "
            f"like X0, or ({n},) for every member"
        )
    if array.ndim < 2:
        if array.ndim == 1 and array.shape != (n,):
            raise BatchInputError(f"bounds: {side} has shape {array.shape}; X0 has {n} columns")
        array = np.broadcast_to(array, (size, n))
    if array.ndim > 2:
        raise BatchInputError(f"bounds: {side} has shape {array.shape}; expected ({size}, {n})")
    if np.any(np.isnan(array)):
        raise BatchInputError(f"bounds: {side} contains NaN")
    return np.array(array, dtype=np.float64)  # a writable copy, not a broadcast view


# -- the result ------------------------------------------------------------------------------


@dataclass(eq=False)
class BatchSolveResult:
    """Every member's outcome of a batch job, as numpy arrays in member order.

    ``x`` and ``jac`` are (B, n); ``fun``, ``success``, ``status`` (scipy-like codes, see
    ``secant.Status``), ``nit``, ``nfev``, ``njev`` and ``nhev`` are (B,). ``converged`` is
    the number of members that converged; ``message`` the job's; ``history`` the iterate
    events the client saw (f and grad_norm there are the members' medians).
    ``result[i]`` (or ``result.member(i)``) is member i as a ``secant.OptimizeResult``.
    """

    x: np.ndarray
    fun: np.ndarray
    success: np.ndarray
    status: np.ndarray
    nit: np.ndarray
    nfev: np.ndarray
    njev: np.ndarray
    nhev: np.ndarray
    jac: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))
    message: str = ""
    job_id: str = ""
    wall_time_s: float = 0.0
    solve_time_s: float = 0.0
    converged: int = 0
    history: list[IterateRecord] = field(default_factory=list, repr=False)
    method_chosen: str = ""  # method="auto": the batch engine's method, and why
    method_reason: str = ""

    def __len__(self) -> int:
        return int(self.fun.shape[0])

    def __getitem__(self, index: int) -> OptimizeResult:
        return self.member(index)

    def __iter__(self) -> Iterator[OptimizeResult]:
        return (self.member(i) for i in range(len(self)))

    @property
    def size(self) -> int:
        """B, the number of members."""
        return len(self)

    @property
    def all_converged(self) -> bool:
        return bool(self.success.all())

    def member(self, index: int) -> OptimizeResult:
        """Member ``index`` (negative counts from the end) as minimize() would return it."""
        i = operator.index(index)
        size = len(self)
        if not -size <= i < size:
            raise IndexError(f"member {index} out of range for a batch of {size}")
        i %= size
        status = int(self.status[i])
        return OptimizeResult(
            x=self.x[i].copy(),
            fun=float(self.fun[i]),
            jac=self.jac[i].copy() if self.jac.size else np.empty(0),
            nit=int(self.nit[i]),
            nfev=int(self.nfev[i]),
            njev=int(self.njev[i]),
            nhev=int(self.nhev[i]),
            status=status,
            success=bool(self.success[i]),
            message=STATUS_MESSAGES.get(status, STATUS_MESSAGES[Status.UNKNOWN]),
            job_id=self.job_id,
            solve_time_s=self.solve_time_s,
            wall_time_s=self.wall_time_s,
            history=[],
            member=i,
        )

    def status_counts(self) -> dict[str, int]:
        """Members per status name, e.g. {"CONVERGED": 98, "MAX_ITERATIONS": 2}."""
        codes, counts = np.unique(self.status, return_counts=True)
        return {Status(int(c)).name: int(k) for c, k in zip(codes, counts, strict=True)}

    def summary(self) -> str:
        """A few lines for a person: members, converged, median nit, timings."""
        size = len(self)
        finite = self.fun[np.isfinite(self.fun)]
        best = f"{finite.min():.10g}" if finite.size else "nan"
        median_nit = float(np.median(self.nit)) if size else 0.0
        counts = ", ".join(f"{k.lower()} {v}" for k, v in self.status_counts().items())
        return "\n".join(
            [
                f"job {self.job_id}: {size} members, {self.converged} converged"
                f" ({100.0 * self.converged / max(size, 1):.1f}%)",
                f"  status: {counts}",
                f"  median nit {median_nit:g}, max nit {int(self.nit.max()) if size else 0}, "
                f"best fun {best}",
                f"  wall time {self.wall_time_s:.3f} s, solve time {self.solve_time_s:.3f} s",
            ]
        )

    def __repr__(self) -> str:
        return (
            f"BatchSolveResult(job_id={self.job_id!r}, members={len(self)}, "
            f"converged={self.converged}, n={self.x.shape[1] if self.x.ndim == 2 else 0}, "
            f"wall_time_s={self.wall_time_s:.3f})"
        )

    def plot(self, path: str | None = None, title: str | None = None) -> Figure:
        """The members' median f and gradient norm against iteration (needs matplotlib)."""
        return plot_history(self.history, path=path, title=title or self.job_id)

    @classmethod
    def from_proto(
        cls, result: pb.Result, job_id: str = "", history: list[IterateRecord] | None = None
    ) -> BatchSolveResult:
        """Decodes a batch job's wire Result (copies the arrays out of the message).

        A Result without per-member fields (a job that ended before solving, say) gives
        every member the job's status and counts, and NaN values.
        """
        x = from_tensor(result.x, copy=True) if not is_empty(result.x) else np.empty((0, 0))
        jac = from_tensor(result.jac, copy=True) if not is_empty(result.jac) else np.empty((0, 0))
        if result.HasField("batch"):
            wire = result.batch
            fun = _member_array(wire.fun, "fun", np.float64)
            size = fun.shape[0]
            status = statuses_from_wire(_member_array(wire.status, "status", np.int64, size))
            counts = [
                _member_array(getattr(wire, name), name, np.int64, size)
                for name in ("nit", "nfev", "njev", "nhev")
            ]
            # the server's count; a server that left it unset: the members with CONVERGED
            converged = int(wire.converged) or int((status == int(Status.CONVERGED)).sum())
        else:
            size = x.shape[0] if x.ndim == 2 else 0
            fun = np.full(size, math.nan)
            status = np.full(size, int(statuses_from_wire(np.array([result.status]))[0]))
            counts = [
                np.full(size, int(getattr(result, name)), dtype=np.int64)
                for name in ("nit", "nfev", "njev", "nhev")
            ]
            converged = 0
        if x.size == 0:
            x = np.full((size, 0), math.nan)
        if x.ndim == 1 and size == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[0] != size:
            raise ValueError(f"batch result: x has shape {x.shape}, expected {size} rows")
        if jac.size and jac.shape != x.shape:
            raise ValueError(f"batch result: jac has shape {jac.shape}, x has {x.shape}")
        success = (status == int(Status.CONVERGED)) & np.isfinite(fun)
        if not result.HasField("batch"):
            converged = int(success.sum())
        return cls(
            x=x,
            fun=fun,
            success=success,
            status=status,
            nit=counts[0],
            nfev=counts[1],
            njev=counts[2],
            nhev=counts[3],
            jac=jac if jac.size else np.empty((0, 0)),
            message=result.message,
            job_id=job_id,
            wall_time_s=float(result.wall_time_s),
            solve_time_s=float(result.solve_time_s),
            converged=converged,
            history=list(history or []),
            method_chosen=result.method_chosen,
            method_reason=result.method_reason,
        )


def _member_array(tensor: pb.Tensor, name: str, dtype: type, size: int | None = None) -> np.ndarray:
    array = from_tensor(tensor).astype(dtype)  # astype copies out of the message
    if array.ndim != 1 or (size is not None and array.shape[0] != size):
        expected = "(B,)" if size is None else f"({size},)"
        raise ValueError(f"batch result: {name} has shape {array.shape}, expected {expected}")
    return array


# -- progress --------------------------------------------------------------------------------


class BatchProgressBar:
    """Members finished out of B, fed by a batch job's iterate events.

    A tqdm bar when tqdm is installed, else one stderr line redrawn at most twice a second.
    """

    def __init__(self, total: int | None = None, description: str = "secant batch",
                 stream: Any = None, min_interval_s: float = 0.5) -> None:  # fmt: skip
        self._description = description
        self._stream = stream if stream is not None else sys.stderr
        self._min_interval = min_interval_s
        self._last_draw = 0.0
        self._drawn = False
        self._line = ""
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self._bar = None
        else:
            self._bar = tqdm(total=total, desc=description, unit="member", dynamic_ncols=True)

    def update(self, iterate: pb.Iterate) -> None:
        if not iterate.HasField("batch"):
            return
        progress = iterate.batch
        finished = int(progress.converged + progress.failed)
        total = int(progress.size) or None
        if self._bar is not None:
            if total is not None and self._bar.total != total:
                self._bar.total = total
            self._bar.set_postfix(
                it=int(iterate.iteration), conv=int(progress.converged),
                failed=int(progress.failed), median_f=f"{progress.median_f:.4g}", refresh=False,
            )  # fmt: skip
            advance = finished - self._bar.n
            if advance > 0:
                self._bar.update(advance)
            return
        self._line = (
            f"{self._description}: {finished}/{total or '?'} members done "
            f"({progress.converged} converged, {progress.failed} failed), "
            f"iteration {iterate.iteration}, median f {progress.median_f:.6g}"
        )
        now = time.monotonic()
        if now - self._last_draw >= self._min_interval:
            self._last_draw = now
            self._draw()

    def _draw(self) -> None:
        self._stream.write("\r" + self._line)
        self._stream.flush()
        self._drawn = True

    def set_description(self, text: str) -> None:
        self._description = text
        if self._bar is not None:
            self._bar.set_description(text, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            return
        if self._line:
            self._draw()  # the last state, even if it came within the redraw interval
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False
