"""Running a solve: the termination tests, the evaluation loop, and the local driver.

`Solve` is the whole run as a generator of EvalRequests; `minimize` / `least_squares`
answer them from a local torch objective. A remote driver (callback jobs) answers the same
requests from a client, so the mathematics exists once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch
from torch import Tensor

from ._evaluation import EvalRequest, Evaluation, LocalEvaluator
from ._methods import (
    SolveState,
    SolveStopped,
    build_solver,
    canonical_method,
)
from ._options import parse_options
from ._result import IterateInfo, SolverResult, Status
from ._small import (
    TorchBridge,
    build_small_solver,
    has_numpy_fields,
    small_path_applies,
    state_to_numpy,
    state_to_torch,
)

MAX_DENSE_DIMENSION = 20_000


@dataclass(frozen=True)
class IterationDone:
    """Yielded by a Solve between iterations: a consistent point to report or checkpoint."""

    state: SolveState


Driven = Generator[EvalRequest | IterationDone, Evaluation | None, SolverResult]


def is_auto(method) -> bool:
    """method="auto": the solve picks its method at x0 (workers.solvers._auto)."""
    return isinstance(method, str) and method.strip().lower() == "auto"


def _as_bounds(bounds, x0: Tensor) -> tuple[Tensor, Tensor] | None:
    if bounds is None:
        return None
    if isinstance(bounds, tuple | list) and len(bounds) == 2 and all(
        isinstance(b, Tensor) for b in bounds
    ):
        lower, upper = bounds
    else:
        pairs = list(bounds)
        if len(pairs) != x0.numel():
            raise ValueError(
                f"bounds: expected {x0.numel()} (low, high) pairs or a (lower, upper) pair of "
                f"tensors, got {len(pairs)} entries"
            )
        lo = [(-math.inf if p[0] is None else float(p[0])) for p in pairs]
        hi = [(math.inf if p[1] is None else float(p[1])) for p in pairs]
        lower = torch.tensor(lo, dtype=x0.dtype)
        upper = torch.tensor(hi, dtype=x0.dtype)
    lower = torch.as_tensor(lower).to(dtype=x0.dtype, device=x0.device).reshape(-1)
    upper = torch.as_tensor(upper).to(dtype=x0.dtype, device=x0.device).reshape(-1)
    if lower.shape != x0.shape or upper.shape != x0.shape:
        raise ValueError(
            f"bounds: lower and upper must have the shape of x0 {tuple(x0.shape)}, got "
            f"{tuple(lower.shape)} and {tuple(upper.shape)}"
        )
    if torch.isnan(lower).any() or torch.isnan(upper).any():
        raise ValueError("bounds: NaN in lower or upper")
    bad = (lower > upper).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(
            f"bounds: lower > upper at index {i} ({float(lower[i])} > {float(upper[i])})"
        )
    return lower, upper


def check_problem(method: str, x0: Tensor, bounds=None, options: dict | None = None):
    """Validates a problem without solving it; raises ValueError naming what is wrong.

    Returns (method info, parsed options, bounds as tensors or None).
    """
    info = canonical_method(method)
    parsed = parse_options(options)
    if not isinstance(x0, Tensor):
        raise ValueError(f"x0 must be a torch tensor, got {type(x0).__name__}")
    if x0.ndim != 1 or x0.numel() == 0:
        raise ValueError(f"x0 must be a non-empty 1-D vector, got shape {tuple(x0.shape)}")
    if not x0.is_floating_point() or x0.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x0 must be float32 or float64, got {x0.dtype}")
    if not bool(torch.isfinite(x0).all()):
        raise ValueError("x0 contains NaN or Inf")
    if info.dense and x0.numel() > MAX_DENSE_DIMENSION:
        raise ValueError(
            f"method {info.name!r} keeps an n x n matrix; n={x0.numel()} exceeds "
            f"{MAX_DENSE_DIMENSION}: use l-bfgs or newton-cg"
        )
    bound_tensors = _as_bounds(bounds, x0)
    if bound_tensors is not None and not info.bounds:
        raise ValueError(f"method {info.name!r} does not take bounds; use l-bfgs-b")
    return info, parsed, bound_tensors


class Solve:
    """One solve as a generator: yields EvalRequests (send back an Evaluation) and
    IterationDone markers (send back None), and returns the SolverResult.

    `should_stop()` is asked before every evaluation, so a cancel lands within one
    evaluation even inside a long line search.

    `small=True` runs a tiny CPU float64 problem (workers.solvers._small.small_path_applies)
    on numpy: the same solver code and outcomes, without torch's per-call dispatch. Its
    requests then carry numpy x (`self.evaluator(...)` adapts a torch evaluator) and the
    states it yields hold numpy arrays (`self.torch_state(...)` gives a torch view); results
    and iterate reports are torch tensors either way.
    """

    def __init__(self, method: str, x0: Tensor, *, bounds=None, options: dict | None = None,
                 initial_state: SolveState | None = None,
                 should_stop: Callable[[], bool] | None = None, small: bool = False) -> None:
        info, self.options, bound_tensors = check_problem(method, x0, bounds, options)
        self.method = info.name
        self.least_squares = info.least_squares
        self.small = small and small_path_applies(info.name, x0, bound_tensors)
        if info.name == "l-bfgs-b" and bound_tensors is None:
            inf = torch.full_like(x0, math.inf)
            bound_tensors = (-inf, inf)
        lower, upper = bound_tensors if bound_tensors is not None else (None, None)
        if self.small:
            self.solver = build_small_solver(info.name, self.options)
            self._start = x0.detach().numpy().copy()
            if initial_state is not None and not has_numpy_fields(initial_state):
                initial_state = state_to_numpy(initial_state, self.options.history_size)
        else:
            self.solver = build_solver(info, self.options, lower, upper)
            self._start = x0
        self.solver.track_step_norm = self.options.termination.xtol > 0
        self.x0 = x0
        self.initial_state = initial_state
        self.should_stop = should_stop or (lambda: False)
        term = self.options.termination
        self.max_iter = term.max_iter if term.max_iter is not None else max(1000, 200 * x0.numel())
        self.history: list[IterateInfo] | None = [] if self.options.return_history else None

    # -- termination ---------------------------------------------------------------------
    def _converged(self, state: SolveState) -> bool:
        term = self.options.termination
        if state.grad_norm <= term.gtol:
            return True
        if state.nit == 0:
            return False
        f, f_prev = float(state.f), state.f_prev
        if term.ftol > 0 and (f_prev - f) <= term.ftol * max(abs(f_prev), abs(f), 1.0):
            return True
        if term.xtol <= 0:
            return False
        x_scale = max(1.0, self.solver.ops.norm_inf(state.x))
        return state.step_norm <= term.xtol * x_scale

    def run(self) -> Driven:
        started = time.perf_counter()
        state = self.initial_state
        elapsed_before = state.elapsed_s if state is not None else 0.0
        term = self.options.termination

        def elapsed() -> float:
            return elapsed_before + time.perf_counter() - started

        def evaluate(request: EvalRequest, counted: SolveState | None):
            if self.should_stop():
                raise SolveStopped(Status.CANCELLED)
            if term.time_limit is not None and elapsed() >= term.time_limit:
                raise SolveStopped(Status.TIME_LIMIT)
            nfev = counted.nfev if counted is not None else 0
            if term.max_evals is not None and request.need_f and nfev >= term.max_evals:
                raise SolveStopped(Status.MAX_EVALUATIONS)
            ev = yield request
            if counted is not None:
                counted.nfev += int(request.need_f or request.need_jac)
                counted.njev += int(request.need_g or request.need_jac)
                counted.nhev += int(request.hvp_vector is not None or request.need_hess)
            return ev

        if state is None:
            try:
                ev = yield from evaluate(self.solver.first_request(self._start), None)
            except SolveStopped as stop:
                return self._result_without_state(stop.status, elapsed())
            state = self.solver.init_state(self._start, ev)
            state.nfev, state.njev = 1, int(ev.g is not None)
            if not ev.is_finite():
                return self._result(state, Status.NON_FINITE, elapsed())
            state.grad_norm = self.solver.grad_norm(state)
        status = None
        while status is None:
            state.elapsed_s = elapsed()
            if self._converged(state):
                status = Status.CONVERGED
                break
            if state.nit >= self.max_iter:
                status = Status.MAX_ITERATIONS
                break
            steps = self.solver.step(state)
            try:
                request = next(steps)
                while True:
                    ev = yield from evaluate(request, state)
                    request = steps.send(ev)
            except StopIteration:
                pass
            except SolveStopped as stop:
                status = stop.status
                break
            state.elapsed_s = elapsed()
            state.grad_norm = self.solver.grad_norm(state)  # NaN anywhere in g shows here
            if not (math.isfinite(float(state.f)) and math.isfinite(state.grad_norm)):
                status = Status.NON_FINITE
                break
            if self.history is not None:
                self.history.append(self.iterate_info(state))
            yield IterationDone(state)
        state.elapsed_s = elapsed()
        return self._result(state, status, state.elapsed_s)

    def iterate_info(self, state: SolveState) -> IterateInfo:
        x = torch.from_numpy(state.x) if self.small else state.x
        return IterateInfo(
            nit=state.nit, x=x, f=float(state.f), grad_norm=state.grad_norm,
            step_size=state.step_size, nfev=state.nfev, njev=state.njev, nhev=state.nhev,
            elapsed_s=state.elapsed_s,
        )

    def evaluator(self, evaluator: Callable[[EvalRequest], Evaluation],
                  numpy_evaluator: Callable[[EvalRequest], Evaluation] | None = None):
        """`evaluator` (answering torch requests), made to answer this solve's requests: on
        the small path `numpy_evaluator` when given (an objective evaluated on numpy), else
        `evaluator` through a zero-copy bridge."""
        if not self.small:
            return evaluator
        return numpy_evaluator if numpy_evaluator is not None else TorchBridge(evaluator)

    def torch_state(self, state: SolveState) -> SolveState:
        """A state this solve yielded, with torch tensors (views) on the small path too."""
        return state_to_torch(state) if self.small else state

    def _result(self, state: SolveState, status: Status, seconds: float) -> SolverResult:
        hess_inv = self.solver.hess_inv(state)
        x, jac = state.x, state.g
        if self.small:
            x, jac = torch.from_numpy(x), torch.from_numpy(jac)
            hess_inv = None if hess_inv is None else torch.from_numpy(hess_inv)
        return SolverResult(
            x=x, fun=float(state.f), jac=jac, nit=state.nit, nfev=state.nfev,
            njev=state.njev, nhev=state.nhev, status=status, message=status.message,
            solve_time_s=seconds, hess_inv=hess_inv, history=self.history,
        )

    def _result_without_state(self, status: Status, seconds: float) -> SolverResult:
        return SolverResult(
            x=self.x0, fun=math.nan, jac=torch.full_like(self.x0, math.nan), nit=0, nfev=0,
            njev=0, nhev=0, status=status, message=status.message, solve_time_s=seconds,
            history=self.history,
        )


def drive_locally(solve: Solve, evaluator: Callable[[EvalRequest], Evaluation],
                  callback: Callable[[IterateInfo], bool | None] | None = None,
                  on_iteration: Callable[[SolveState], None] | None = None) -> SolverResult:
    """Answers a Solve's requests with `evaluator`; calls `callback` after each iteration
    (returning True cancels the solve) and `on_iteration(state)` (e.g. to checkpoint)."""
    run = solve.run()
    cancelled = False
    try:
        item = next(run)
        while True:
            if isinstance(item, IterationDone):
                if on_iteration is not None:
                    on_iteration(solve.torch_state(item.state))
                if callback is not None and callback(solve.iterate_info(item.state)):
                    cancelled = True
                    solve.should_stop = lambda: True
                item = run.send(None)
            else:
                item = run.send(evaluator(item))
    except StopIteration as done:
        result: SolverResult = done.value
    if cancelled and result.status is not Status.CANCELLED and not result.success:
        result.status, result.message = Status.CANCELLED, Status.CANCELLED.message
    return result


def minimize(fun, x0: Tensor, *, method: str = "l-bfgs", jac=None, hessp=None, hess=None,
             bounds=None, options: dict | None = None,
             callback: Callable[[IterateInfo], bool | None] | None = None,
             should_stop: Callable[[], bool] | None = None,
             initial_state: SolveState | None = None,
             on_iteration: Callable[[SolveState], None] | None = None) -> SolverResult:
    """Minimizes a scalar torch function, scipy.optimize.minimize style.

    fun(x) -> 0-d tensor; jac/hessp/hess default to autograd; `jac=True` means fun(x)
    returns (f, g) in one call, as scipy's. `callback(info)` runs after
    every iteration; returning True stops the solve with Status.CANCELLED.
    """
    if is_auto(method):  # chosen at x0: workers.solvers._auto
        from ._auto import auto_minimize

        return auto_minimize(fun, x0, jac=jac, hessp=hessp, hess=hess, bounds=bounds,
                             options=options, callback=callback, should_stop=should_stop,
                             initial_state=initial_state, on_iteration=on_iteration)
    info = canonical_method(method)
    if info.least_squares:
        raise ValueError(f"method {info.name!r} works on residuals: use least_squares(r, x0)")
    solve = Solve(info.name, x0, bounds=bounds, options=options, initial_state=initial_state,
                  should_stop=should_stop, small=True)
    evaluator = solve.evaluator(LocalEvaluator(fun, jac=jac, hessp=hessp, hess=hess))
    return drive_locally(solve, evaluator, callback, on_iteration)


def least_squares(residual, x0: Tensor, *, method: str = "lm", jac=None,
                  options: dict | None = None,
                  callback: Callable[[IterateInfo], bool | None] | None = None,
                  should_stop: Callable[[], bool] | None = None,
                  initial_state: SolveState | None = None,
                  on_iteration: Callable[[SolveState], None] | None = None) -> SolverResult:
    """Minimizes 0.5 * |r(x)|^2. Gauss-Newton and LM use the Jacobian of r (autograd by
    default, or `jac(x)`); any other method minimizes the sum of squares directly."""
    if is_auto(method):  # chosen at x0: workers.solvers._auto
        from ._auto import auto_least_squares

        return auto_least_squares(residual, x0, jac=jac, options=options, callback=callback,
                                  should_stop=should_stop, initial_state=initial_state,
                                  on_iteration=on_iteration)
    info = canonical_method(method)
    solve = Solve(info.name, x0, options=options, initial_state=initial_state,
                  should_stop=should_stop, small=True)
    if info.least_squares:
        evaluator = LocalEvaluator(residual=residual, residual_jac=jac)
    else:
        evaluator = solve.evaluator(LocalEvaluator(residual=residual))
    return drive_locally(solve, evaluator, callback, on_iteration)
