"""What runs on a Ray worker: build the objective, run the solver, stream events back.

`run_solve` is the whole job as a plain function (no Ray): it builds the objective from a
`RunSpec`, runs `workers.solvers.minimize` / `least_squares`, and hands every event to `emit`.
`SolverWorker` is the class the scheduler makes remote (``ray.remote(**resources)(SolverWorker)``):
a warm process (torch imported, one tiny solve done) whose `run` is a Ray streaming generator
yielding batches of events, and whose `cancel` stops a running solve at its next iteration.

Everything here is plain picklable data: the gateway converts to and from the wire types.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from workers.objectives import (
    Objective,
    ObjectiveError,
    TensorSpec,
    UntrustedCodeError,
    build_objective,
)
from workers.solvers import (
    IterationDone,
    LocalEvaluator,
    NumpyEvaluator,
    Solve,
    state_from_bytes,
    state_to_bytes,
)

log = logging.getLogger("secant.worker")

LEAST_SQUARES_METHODS = frozenset({"gauss-newton", "lm"})


@dataclass(frozen=True)
class RunSpec:
    """A checked problem, as the worker needs it. Built by service.validation."""

    job_id: str
    objective_kind: str  # expression | residual | torch_export | cloudpickle
    source: str
    blob: bytes
    data: tuple[TensorSpec, ...]
    x0: np.ndarray  # 1-D, float64 or float32 (the solve dtype)
    lower: np.ndarray | None
    upper: np.ndarray | None
    method: str
    options: dict = field(default_factory=dict)
    dtype: str = "float64"  # float64 | float32
    device: str = "cpu"
    report_x_every: int = 0
    trusted: bool = False
    # Durability: the solver state to resume from (safetensors bytes of a SolveState), and
    # how often to send one back (seconds of solving between checkpoints; 0: never).
    checkpoint: bytes | None = None
    checkpoint_interval_s: float = 0.0


@dataclass(frozen=True)
class IterateEvent:
    iteration: int
    f: float
    grad_norm: float
    step_size: float
    nfev: int
    njev: int
    elapsed_s: float
    x: np.ndarray | None = None  # every report_x_every iterations


@dataclass(frozen=True)
class ResultEvent:
    x: np.ndarray
    fun: float
    jac: np.ndarray
    nit: int
    nfev: int
    njev: int
    nhev: int
    status: str  # a workers.solvers.Status name, e.g. "CONVERGED"
    success: bool
    message: str
    solve_time_s: float
    method_chosen: str = ""  # method "auto": the method that ran, and why (one line)
    method_reason: str = ""


@dataclass(frozen=True)
class FailureEvent:
    code: str  # a grpc status code name
    message: str


@dataclass(frozen=True)
class CheckpointEvent:
    """The solver state at the end of iteration `nit` (safetensors bytes, no pickle)."""

    nit: int
    state: bytes


WorkerEvent = IterateEvent | ResultEvent | FailureEvent | CheckpointEvent

_TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu").numpy().copy()


_CACHE_MAX_ENTRIES = 32
_CACHE_MAX_DATA_BYTES = 1 << 20
_objective_cache: OrderedDict[tuple, Objective] = OrderedDict()
_objective_cache_lock = threading.Lock()


def _objective_for(spec: RunSpec, x0: torch.Tensor) -> Objective:
    """Builds the objective, reusing one built for the same expression, data, n, dtype and
    device (a batch of starting points, a client re-solving). Building costs a compile and a
    probe evaluation, 1-2 ms for a small expression: a tenth of a small solve. Only
    expressions with small data are kept: trusted code may hold state, and big data would pin
    memory."""
    cacheable = (
        spec.objective_kind in ("expression", "residual")
        and sum(len(t.raw) for t in spec.data) <= _CACHE_MAX_DATA_BYTES
    )
    if not cacheable:
        return build_objective(
            kind=spec.objective_kind, source=spec.source, blob=spec.blob, data=spec.data,
            x0=x0, trusted=spec.trusted,
        )
    # The raw bytes themselves are in the key: a hit compares them in full, never a digest.
    key = (
        spec.objective_kind, spec.source, x0.numel(), str(x0.dtype), str(x0.device),
        tuple((t.name, tuple(t.shape), t.dtype, bytes(t.raw)) for t in spec.data),
    )
    with _objective_cache_lock:
        objective = _objective_cache.get(key)
        if objective is not None:
            _objective_cache.move_to_end(key)
            return objective
    objective = build_objective(
        kind=spec.objective_kind, source=spec.source, data=spec.data, x0=x0,
        trusted=spec.trusted,
    )
    with _objective_cache_lock:
        _objective_cache[key] = objective
        while len(_objective_cache) > _CACHE_MAX_ENTRIES:
            _objective_cache.popitem(last=False)
    return objective


def _auto_solve(spec: RunSpec, objective: Objective, x0: torch.Tensor, bounds, initial_state,
                should_stop):
    """method "auto": the method is picked here, on the worker, by probes at x0 on the
    job's own device (workers.solvers._auto); the result says which and why."""
    from workers.solvers._auto import make_solve
    from workers.solvers._small import SMALL_N_MAX

    residual = objective.residual if spec.objective_kind == "residual" else None
    m = None
    if residual is not None:
        with torch.no_grad():
            m = int(residual(x0).numel())
    # Second derivatives by autograd are certain for expressions only; trusted code may
    # hide a numpy gradient or an op without a double backward.
    solve = make_solve("auto", x0, bounds=bounds, options=spec.options,
                       initial_state=initial_state, should_stop=should_stop, small=True,
                       residuals=m, second_order=spec.objective_kind in ("expression",
                                                                         "residual"))
    torch_evaluator = (LocalEvaluator(residual=residual) if residual is not None
                       else LocalEvaluator(objective.fun))
    numpy_evaluator = None
    if x0.numel() <= SMALL_N_MAX and bounds is None:
        program = objective.numpy_program(x0)
        if program is not None:
            numpy_evaluator = NumpyEvaluator(program.value, program.value_and_grad)
    return solve, solve.evaluator(torch_evaluator, numpy_evaluator)


def run_solve(
    spec: RunSpec,
    emit: Callable[[WorkerEvent], None],
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Runs one solve to its end, handing every event to `emit` (see `iter_solve`)."""
    for event in iter_solve(spec, should_stop):
        emit(event)


def iter_solve(
    spec: RunSpec,
    should_stop: Callable[[], bool] = lambda: False,
    suspend_after_s: float | None = None,
) -> Iterator[WorkerEvent]:
    """One solve as a generator of events: iterates (and checkpoints), then one result or
    failure. The solver is driven here, on the caller's thread: no second thread competes for
    the GIL with it.

    With `suspend_after_s`, a solve still running after that many seconds of this thread's CPU
    time ends with a CheckpointEvent of where it stands instead (no result): resumed from it
    (RunSpec.checkpoint) it goes on with the same iterates. CPU time, not wall time: on a
    loaded machine the same small solve must not be cut short and sent elsewhere.

    Never raises for a bad problem or a solver error: those become a FailureEvent (the gateway
    decides what the client sees; tracebacks stay in the worker log).
    """
    try:
        dtype = _TORCH_DTYPES[spec.dtype]
        device = torch.device(spec.device)
        x0 = torch.from_numpy(np.ascontiguousarray(spec.x0)).to(device=device, dtype=dtype)
        objective = _objective_for(spec, x0)
        bounds = None
        if spec.lower is not None and spec.upper is not None:
            bounds = tuple(
                torch.from_numpy(np.ascontiguousarray(b)).to(device=device, dtype=dtype)
                for b in (spec.lower, spec.upper)
            )
        initial_state = None
        if spec.checkpoint:
            initial_state = state_from_bytes(spec.checkpoint, device=device)
    except ObjectiveError as exc:
        yield FailureEvent("INVALID_ARGUMENT", f"problem.{exc}")
        return
    except UntrustedCodeError as exc:
        yield FailureEvent("PERMISSION_DENIED", str(exc))
        return
    except Exception as exc:
        log.exception("job %s: building the objective failed", spec.job_id)
        yield FailureEvent("INTERNAL", f"building the objective failed: {type(exc).__name__}")
        return

    every = spec.report_x_every
    interval = spec.checkpoint_interval_s
    last_checkpoint = time.monotonic()
    started_cpu = time.thread_time()
    try:
        # should_stop is asked before every evaluation, so a cancel lands mid line search.
        if spec.method == "auto":
            solve, evaluator = _auto_solve(spec, objective, x0, bounds, initial_state,
                                           should_stop)
        elif spec.method in LEAST_SQUARES_METHODS:
            solve = Solve(spec.method, x0, options=spec.options, initial_state=initial_state,
                          should_stop=should_stop)
            evaluator = LocalEvaluator(residual=objective.residual)
        else:
            # A tiny CPU float64 problem runs on numpy (workers.solvers._small), its
            # expression too when the numpy reading of it covers it.
            solve = Solve(spec.method, x0, bounds=bounds, options=spec.options,
                          initial_state=initial_state, should_stop=should_stop, small=True)
            program = objective.numpy_program(x0) if solve.small else None
            evaluator = solve.evaluator(
                LocalEvaluator(objective.fun),
                NumpyEvaluator(program.value, program.value_and_grad) if program else None,
            )
        run = solve.run()
        item = next(run)
        while True:
            if not isinstance(item, IterationDone):
                item = run.send(evaluator(item))
                continue
            state = item.state
            info = solve.iterate_info(state)
            # The iterate goes out before its checkpoint: a worker that dies between the two
            # resumes from an older checkpoint (and repeats iterates the gateway drops), never
            # from one whose iterate was lost.
            yield IterateEvent(
                iteration=info.nit,
                f=float(info.f),
                grad_norm=float(info.grad_norm),
                step_size=float(info.step_size),
                nfev=info.nfev,
                njev=info.njev,
                elapsed_s=info.elapsed_s,
                x=_to_numpy(info.x) if every > 0 and info.nit % every == 0 else None,
            )
            now = time.monotonic()
            if suspend_after_s is not None and time.thread_time() - started_cpu >= suspend_after_s:
                yield CheckpointEvent(state.nit, state_to_bytes(state))
                return
            if interval > 0 and now - last_checkpoint >= interval:
                # Time-based: a checkpoint costs a copy of the state (2mn numbers for L-BFGS).
                last_checkpoint = now
                yield CheckpointEvent(state.nit, state_to_bytes(state))
            item = run.send(None)
    except StopIteration as done:
        result = done.value
    except ValueError as exc:  # options the solver refused (check_problem ran at the gateway)
        yield FailureEvent("INVALID_ARGUMENT", str(exc))
        return
    except Exception as exc:
        log.exception("job %s: the solver raised", spec.job_id)
        yield FailureEvent("INTERNAL", f"the solver raised {type(exc).__name__}: {exc}")
        return
    yield ResultEvent(
        x=_to_numpy(result.x),
        fun=float(result.fun),
        jac=_to_numpy(result.jac) if result.jac is not None else np.zeros(0),
        nit=int(result.nit),
        nfev=int(result.nfev),
        njev=int(result.njev),
        nhev=int(result.nhev),
        status=result.status.name,
        success=bool(result.success),
        message=result.message,
        solve_time_s=float(result.solve_time_s),
        method_chosen=result.method_chosen,
        method_reason=result.method_reason,
    )


WARM_UP_SPEC = RunSpec(
    job_id="warm-up",
    objective_kind="expression",
    source="100 * (x[1] - x[0]**2)**2 + (1 - x[0])**2",
    blob=b"",
    data=(),
    x0=np.array([-1.2, 1.0]),
    lower=None,
    upper=None,
    method="l-bfgs",
)

BATCH_INTERVAL_S = 0.02
MAX_BATCH_EVENTS = 1000


class SolverWorker:
    """A warm solver process. Plain class; the scheduler makes it a threaded Ray actor so that
    `cancel` is served while `run` streams (the solve itself runs on its own thread)."""

    def __init__(self, torch_threads: int = 1) -> None:
        torch.set_num_threads(max(1, torch_threads))
        self._stops: dict[str, threading.Event] = {}
        self._stops_lock = threading.Lock()

    def warm_up(self) -> float:
        """Runs one tiny solve so the first real job pays no import or first-call costs."""
        started = time.perf_counter()
        events: list[WorkerEvent] = []
        run_solve(WARM_UP_SPEC, events.append)
        if not events or not isinstance(events[-1], ResultEvent):
            raise RuntimeError(f"warm-up solve did not produce a result: {events[-1:]}")
        # A batch objective's first build imports torch's compile machinery (vmap's meta run,
        # seconds); the first batch job must not pay it.
        from workers.batch_runner import warm_up_batch

        warm_up_batch()
        return time.perf_counter() - started

    def ping(self) -> bool:
        return True

    def pid(self) -> int:
        import os

        return os.getpid()

    def cancel(self, job_id: str) -> None:
        with self._stops_lock:
            self._stops.setdefault(job_id, threading.Event()).set()

    def run_quick(self, spec: RunSpec, budget_s: float) -> list[WorkerEvent]:
        """The job in one plain call, for at most `budget_s` seconds of solving: all its events,
        ending with its result or failure; or, when the time is up, with a CheckpointEvent of
        where it stands, from which `run` continues it (iter_solve's suspend_after_s). A
        small solve so costs one actor call, not a streaming generator's start and end
        (about 1 ms here); its events come at the end, as `run`'s first batch would."""
        with self._stops_lock:
            stop = self._stops.setdefault(spec.job_id, threading.Event())
        events = list(iter_solve(spec, stop.is_set, suspend_after_s=budget_s))
        if events and not isinstance(events[-1], CheckpointEvent):
            with self._stops_lock:  # ended; a suspended job keeps its stop event for `run`
                self._stops.pop(spec.job_id, None)
        return events

    def run(self, spec) -> Iterator[list[WorkerEvent]]:
        """Streams the job's events in batches, at most one batch per `BATCH_INTERVAL_S`.

        Why batch: every yield is a Ray object whose bookkeeping costs about as much as a
        small solve's iteration; watchers see progress at most 20 ms late instead. The solve
        runs on this (the actor call's) thread; `cancel` arrives on another. `spec` is a
        RunSpec, or a workers.batch_runner.BatchRunSpec for a vectorized batch (or a chunk).
        """
        # Imported here: workers.batch_runner imports this module's event types.
        from workers.batch_runner import BatchRunSpec, iter_batch_solve

        with self._stops_lock:
            stop = self._stops.setdefault(spec.job_id, threading.Event())
        solve = iter_batch_solve if isinstance(spec, BatchRunSpec) else iter_solve
        try:
            batch: list = []
            deadline = time.monotonic() + BATCH_INTERVAL_S
            for event in solve(spec, stop.is_set):
                batch.append(event)
                if len(batch) >= MAX_BATCH_EVENTS or time.monotonic() >= deadline:
                    yield batch
                    batch = []
                    deadline = time.monotonic() + BATCH_INTERVAL_S
            if batch:
                yield batch
        finally:
            with self._stops_lock:
                self._stops.pop(spec.job_id, None)
