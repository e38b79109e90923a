"""What a worker runs for a vectorized batch (or one chunk of one): build the batched
objective, run the batch engine, stream counts and quantiles, checkpoints and one result.

`iter_batch_solve` is the plain function (no Ray); `workers.runner.SolverWorker.run` streams it
for a `BatchRunSpec` exactly as it streams single solves. The engine
(workers.solvers.batched) calls back once per iteration from inside one blocking call, so it
runs on a thread of its own and its events cross to the generator through a queue; the
generator's thread only waits on that queue, so the two never compete for the GIL.

A chunk is members [member_offset, member_offset + B) of the job's batch; the spec carries
only those members' rows (x0, per-member bounds and member data), so the engine's member ids
are 0..B-1 within the chunk and the gateway places them back at member_offset.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from workers.objectives import (
    ObjectiveError,
    TensorSpec,
    UntrustedCodeError,
    build_batch_objective,
)
from workers.runner import CheckpointEvent, FailureEvent
from workers.solvers.batched import (
    BatchProgress,
    BatchResult,
    batch_state_from_bytes,
    batch_state_to_bytes,
    check_batch_problem,
    least_squares_batch,
    minimize_batch,
)

log = logging.getLogger("secant.worker")

LEAST_SQUARES_METHODS = frozenset({"gauss-newton", "lm"})
# The engine reports every iteration; watchers need a few updates a second, not thousands.
PROGRESS_INTERVAL_S = 0.02
_TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class BatchRunSpec:
    """One batch (or one chunk of it) as a worker needs it. Built by service.validation."""

    job_id: str
    kind: str  # expression | residual
    source: str
    data: tuple[TensorSpec, ...]  # shared by every member
    member_data: tuple[TensorSpec, ...]  # this chunk's rows only
    x0: np.ndarray  # (B, n) for this chunk's B members
    lower: np.ndarray | None  # (n,) or (B, n)
    upper: np.ndarray | None
    method: str
    options: dict = field(default_factory=dict)
    dtype: str = "float64"
    device: str = "cpu"
    member_offset: int = 0  # this chunk's first member in the job's batch
    # Durability: a BatchState of this chunk to resume from (safetensors bytes), and how
    # often to send one (seconds of solving; 0: never).
    checkpoint: bytes | None = None
    checkpoint_interval_s: float = 0.0

    def __repr__(self) -> str:  # never megabytes of x0 in a log line
        return (
            f"BatchRunSpec(job_id={self.job_id!r}, method={self.method!r},"
            f" members={self.x0.shape[0]}, n={self.x0.shape[1]},"
            f" member_offset={self.member_offset}, device={self.device!r})"
        )


@dataclass(frozen=True)
class BatchProgressEvent:
    """One engine iteration of a chunk (workers.solvers.batched.BatchProgress's fields)."""

    iteration: int
    size: int
    active: int
    converged: int
    failed: int
    best_grad_norm: float
    median_grad_norm: float
    best_f: float
    median_f: float
    elapsed_s: float


@dataclass(frozen=True)
class BatchResultEvent:
    """Every member's outcome, rows in member order; status holds workers.solvers.Status
    values."""

    x: np.ndarray  # (B, n)
    fun: np.ndarray  # (B,)
    jac: np.ndarray  # (B, n)
    status: np.ndarray  # (B,) int64
    nit: np.ndarray  # (B,) int64
    nfev: np.ndarray
    njev: np.ndarray
    nhev: np.ndarray
    solve_time_s: float

    def __repr__(self) -> str:
        return f"BatchResultEvent(members={self.x.shape[0]}, solve_time_s={self.solve_time_s})"


BatchEvent = BatchProgressEvent | BatchResultEvent | CheckpointEvent | FailureEvent


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu").numpy().copy()


def _progress_event(p: BatchProgress) -> BatchProgressEvent:
    return BatchProgressEvent(
        iteration=int(p.iteration), size=int(p.size), active=int(p.active),
        converged=int(p.converged), failed=int(p.failed),
        best_grad_norm=float(p.best_grad_norm), median_grad_norm=float(p.median_grad_norm),
        best_f=float(p.best_f), median_f=float(p.median_f), elapsed_s=float(p.elapsed_s),
    )


def _result_event(result: BatchResult) -> BatchResultEvent:
    return BatchResultEvent(
        x=_numpy(result.x), fun=_numpy(result.fun), jac=_numpy(result.jac),
        status=_numpy(result.status).astype(np.int64), nit=_numpy(result.nit).astype(np.int64),
        nfev=_numpy(result.nfev).astype(np.int64), njev=_numpy(result.njev).astype(np.int64),
        nhev=_numpy(result.nhev).astype(np.int64), solve_time_s=float(result.solve_time_s),
    )


_DONE = object()


def iter_batch_solve(
    spec: BatchRunSpec, should_stop: Callable[[], bool] = lambda: False
) -> Iterator[BatchEvent]:
    """One batch as a generator of events: progress (at most one per PROGRESS_INTERVAL_S, and
    always the last), checkpoints, then one BatchResultEvent or FailureEvent.

    Never raises for a bad problem or an engine error: those become a FailureEvent whose
    message names no internals (the traceback goes to the worker's log). `should_stop` true
    ends the solve at the next iteration: members still running end CANCELLED with their last
    accepted iterate. Closing the generator early stops the engine the same way.
    """
    try:
        dtype = _TORCH_DTYPES[spec.dtype]
        device = torch.device(spec.device)
        x0 = torch.from_numpy(np.ascontiguousarray(spec.x0)).to(device=device, dtype=dtype)
        objective = build_batch_objective(
            kind=spec.kind, source=spec.source, data=spec.data, member_data=spec.member_data,
            x0=x0,
        )
        bounds = None
        if spec.lower is not None and spec.upper is not None:
            bounds = tuple(
                torch.from_numpy(np.ascontiguousarray(b)).to(device=device, dtype=dtype)
                for b in (spec.lower, spec.upper)
            )
        initial_state = None
        if spec.checkpoint:
            initial_state = batch_state_from_bytes(spec.checkpoint, device=device)
    except ObjectiveError as exc:
        yield FailureEvent("INVALID_ARGUMENT", f"problem.{exc}")
        return
    except UntrustedCodeError as exc:
        yield FailureEvent("PERMISSION_DENIED", str(exc))
        return
    except Exception:
        log.exception("job %s: preparing the batch failed", spec.job_id)
        yield FailureEvent("INTERNAL", "preparing the batch failed (logged on the worker)")
        return
    try:
        # The gateway ran the same check. Its messages name the caller's fields and nothing
        # of ours, so a refusal may say what it is; any later error is ours and says nothing.
        check_batch_problem(spec.method, x0, bounds, spec.options)
    except ValueError as exc:
        yield FailureEvent("INVALID_ARGUMENT", f"problem: {exc}")
        return

    events: queue.SimpleQueue = queue.SimpleQueue()
    closed = threading.Event()  # the consumer went away: stop the engine too
    throttle = _Throttle(events.put)

    def stop() -> bool:
        return closed.is_set() or should_stop()

    def on_checkpoint(state) -> None:
        # The progress of the iteration a checkpoint follows goes out first: a worker that
        # dies between the two resumes from an older checkpoint, never a newer one.
        throttle.flush()
        events.put(CheckpointEvent(int(state.iteration), batch_state_to_bytes(state)))

    def solve() -> None:
        try:
            kwargs = dict(
                options=spec.options, should_stop=stop, callback=throttle.offer,
                progress_interval_s=PROGRESS_INTERVAL_S,
                initial_state=initial_state, on_checkpoint=on_checkpoint,
                checkpoint_interval_s=spec.checkpoint_interval_s,
            )
            if spec.method in LEAST_SQUARES_METHODS:
                result = least_squares_batch(objective.residual, x0, method=spec.method, **kwargs)
            else:
                result = minimize_batch(objective.fun, x0, method=spec.method, bounds=bounds,
                                        **kwargs)
            throttle.flush()
            events.put(_result_event(result))
        except Exception as exc:
            log.exception("job %s: the batch engine raised", spec.job_id)
            events.put(FailureEvent(
                "INTERNAL", f"the batch solver failed ({type(exc).__name__}; logged on the worker)"
            ))
        finally:
            events.put(_DONE)

    thread = threading.Thread(target=solve, name=f"batch-{spec.job_id}", daemon=True)
    thread.start()
    try:
        while True:
            event = events.get()
            if event is _DONE:
                return
            yield event
    finally:
        closed.set()
        thread.join()


class _Throttle:
    """Passes on at most one progress per PROGRESS_INTERVAL_S; `flush` sends the newest one
    held back (before a checkpoint and at the end, so the last iteration is always seen)."""

    def __init__(self, put: Callable[[BatchProgressEvent], None]) -> None:
        self._put = put
        self._held: BatchProgress | None = None
        self._last = -float("inf")

    def offer(self, progress: BatchProgress) -> None:
        now = time.monotonic()
        if now - self._last >= PROGRESS_INTERVAL_S:
            self._last = now
            self._held = None
            self._put(_progress_event(progress))
        else:
            self._held = progress

    def flush(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self._last = time.monotonic()
            self._put(_progress_event(held))


WARM_UP_BATCH = BatchRunSpec(
    job_id="warm-up-batch",
    kind="expression",
    source="sum(100 * (x[1:] - x[:-1]**2)**2 + (1 - x[:-1])**2)",
    data=(),
    member_data=(),
    x0=np.array([[-1.2, 1.0], [0.5, 0.5]]),
    lower=None,
    upper=None,
    method="bfgs",
)


def warm_up_batch() -> None:
    """Solves a two-member batch so a worker's first batch job pays no first-call costs."""
    events = list(iter_batch_solve(WARM_UP_BATCH))
    if not events or not isinstance(events[-1], BatchResultEvent):
        raise RuntimeError(f"batch warm-up did not produce a result: {events[-1:]}")
