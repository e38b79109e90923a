"""The batched driver: evaluations of the working set, per-member line searches, termination
masks, compaction of finished members, checkpoints. One solver semantics with the single
solvers (workers/solvers/_driver.py): the same tests in the same order, member by member.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor

from .._methods import canonical_method
from .._options import parse_options
from .._result import Status
from ._linesearch import BatchedArmijo, BatchedStrongWolfe
from ._methods import (
    BatchedBfgs,
    BatchedGaussNewton,
    BatchedLbfgs,
    BatchedMethod,
    BatchedNewton,
    BatchedProjectedLbfgs,
)
from ._result import BatchProgress, BatchResult
from ._state import RUNNING, BatchState
from ._stepping import LineSearchStepper, stop_searches

BatchFun = Callable[[Tensor, Tensor], Tensor]  # (X (k, n), member ids (k,)) -> (k,) or (k, m)

BATCH_METHODS = ("bfgs", "l-bfgs", "l-bfgs-b", "newton", "gauss-newton", "lm")
# Compact when fewer than this fraction of the working rows still run: a gather of every
# working tensor costs about one iteration, so halving the rows pays for itself at once.
COMPACT_BELOW = 0.5


class _Stopped(Exception):
    def __init__(self, status: Status) -> None:
        self.status = status


def check_batch_problem(method: str, X0: Tensor, bounds=None, options: dict | None = None):
    """Validates a batched problem without solving it; ValueError naming what is wrong."""
    info = canonical_method(method)
    if info.name not in BATCH_METHODS:
        raise ValueError(
            f"method {info.name!r} has no batched version; batch methods: "
            + ", ".join(BATCH_METHODS))
    parsed = parse_options(options)
    if parsed.return_history:
        raise ValueError("option return_history is not available for batch solves")
    if not isinstance(X0, Tensor):
        raise ValueError(f"X0 must be a torch tensor, got {type(X0).__name__}")
    if X0.ndim != 2 or X0.shape[0] == 0 or X0.shape[1] == 0:
        raise ValueError(f"X0 must be a non-empty (B, n) matrix, got shape {tuple(X0.shape)}")
    if X0.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"X0 must be float32 or float64, got {X0.dtype}")
    lower = upper = None
    if bounds is not None:
        if info.name != "l-bfgs-b":
            raise ValueError(f"method {info.name!r} does not take bounds; use l-bfgs-b")
        lower, upper = (torch.as_tensor(b, dtype=X0.dtype, device=X0.device) for b in bounds)
        B, n = X0.shape
        for name, b in (("lower", lower), ("upper", upper)):
            if b.shape not in ((n,), (B, n)):
                raise ValueError(f"bounds.{name}: expected shape ({n},) or ({B}, {n}), got "
                                 f"{tuple(b.shape)}")
            if bool(torch.isnan(b).any()):
                raise ValueError(f"bounds.{name}: NaN")
        lower, upper = lower.expand(B, n), upper.expand(B, n)
        if bool((lower > upper).any()):
            member, i = (lower > upper).nonzero()[0].tolist()
            raise ValueError(f"bounds: lower > upper for member {member} at index {i}")
    return info, parsed, (lower, upper) if lower is not None else None


class BatchSolve:
    """A batched solve. `run()` advances every member to its end and returns a BatchResult.

    `fun(X, ids)` evaluates the rows X of members `ids` (members are independent); for GN/LM it
    is the residual, (k, m). Gradients, Hessians and Jacobians come from autograd over the
    batch sum, which gives every member its own derivative because members do not interact.
    """

    def __init__(self, fun: BatchFun, X0: Tensor, *, method: str = "bfgs", bounds=None,
                 options: dict | None = None, residual: bool = False,
                 should_stop: Callable[[], bool] | None = None,
                 callback: Callable[[BatchProgress], bool | None] | None = None,
                 initial_state: BatchState | None = None,
                 on_checkpoint: Callable[[BatchState], None] | None = None,
                 checkpoint_interval_s: float = 0.0, progress_interval_s: float = 0.0,
                 sync_free: bool | None = None) -> None:
        info, self.options, box = check_batch_problem(method, X0, bounds, options)
        self.method_name = info.name
        self.fun = fun
        self.residual = residual
        self.uses_jacobian = info.least_squares  # GN / LM work on r and J themselves
        if info.least_squares and not residual:
            raise ValueError(f"method {info.name!r} works on residuals: use least_squares_batch")
        self.X0 = X0
        self.box = box
        opts = self.options
        if info.name == "bfgs":
            self.method: BatchedMethod | None = BatchedBfgs()
        elif info.name == "l-bfgs":
            self.method = BatchedLbfgs(opts.history_size)
        elif info.name == "l-bfgs-b":
            if box is None:
                inf = torch.full_like(X0, math.inf)
                box = self.box = (-inf, inf)
            self.method = BatchedProjectedLbfgs(opts.history_size, *box)
        elif info.name == "newton":
            self.method = BatchedNewton()
        elif info.name == "gauss-newton":
            self.method = BatchedGaussNewton()
        else:
            self.method = None  # lm: its own step
        kind = opts.line_search or (self.method.default_line_search if self.method else "")
        c1 = opts.c1 if opts.c1 is not None else (1e-3 if info.name == "l-bfgs-b" else 1e-4)
        if kind == "armijo":
            self.rule = BatchedArmijo(c1=c1)
        elif info.name == "l-bfgs-b":
            self.rule = BatchedStrongWolfe(c1=c1, c2=opts.c2 if opts.c2 is not None else 0.9,
                                           xtol=0.1, accept_at_warning=True)
        else:
            self.rule = BatchedStrongWolfe(c1=c1, c2=opts.c2 if opts.c2 is not None else 0.9)
        term = opts.termination
        self.max_iter = term.max_iter if term.max_iter is not None else max(
            1000, 200 * X0.shape[1])
        self.should_stop = should_stop or (lambda: False)
        self.callback = callback
        self.initial_state = initial_state
        self.on_checkpoint = on_checkpoint
        self.checkpoint_interval_s = checkpoint_interval_s
        # A progress report costs a host sync: at most one per progress_interval_s.
        self.progress_interval_s = progress_interval_s
        # sync_free: no host syncs beyond the one stopping check per engine step (the GPU
        # default); on the CPU syncs are free and gathering the few rows still searching wins.
        self.sync_free = X0.device.type != "cpu" if sync_free is None else sync_free
        self.evaluations = 0  # batched objective calls (not member evaluations)
        self.stepper = LineSearchStepper(self) if self.method is not None else None

    # -- evaluations ---------------------------------------------------------------------
    def value(self, X: Tensor, ids: Tensor) -> Tensor:
        with torch.no_grad():
            out = self.fun(X, ids)
            return 0.5 * (out * out).sum(1) if self.residual else out

    def value_grad(self, X: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            Xg = X.detach().requires_grad_(True)
            out = self.fun(Xg, ids)
            F = 0.5 * (out * out).sum(1) if self.residual else out
            (G,) = torch.autograd.grad(F.sum(), Xg, allow_unused=True)
        return F.detach(), torch.zeros_like(X) if G is None else G

    def hessian(self, X: Tensor, ids: Tensor) -> Tensor:
        k, n = X.shape
        with torch.enable_grad():
            Xg = X.detach().requires_grad_(True)
            (G,) = torch.autograd.grad(self.fun(Xg, ids).sum(), Xg, create_graph=True)
            basis = torch.eye(n, dtype=X.dtype, device=X.device).unsqueeze(1).expand(n, k, n)
            (H,) = torch.autograd.grad(G, Xg, grad_outputs=basis, is_grads_batched=True,
                                       allow_unused=True)
        if H is None:
            return torch.zeros(k, n, n, dtype=X.dtype, device=X.device)
        return H.permute(1, 0, 2).detach()

    def residual_jacobian(self, X: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        k, n = X.shape
        with torch.no_grad():
            r = self.fun(X, ids)
        basis = torch.eye(n, dtype=X.dtype, device=X.device).unsqueeze(1).expand(n, k, n)

        def column(tangent: Tensor) -> Tensor:
            return torch.func.jvp(lambda Z: self.fun(Z, ids), (X,), (tangent,))[1]

        J = torch.func.vmap(column)(basis)  # (n, k, m): forward mode, one pass per coordinate
        return r, J.permute(1, 2, 0).contiguous()

    # -- setup ---------------------------------------------------------------------------
    def _initial_state(self) -> BatchState:
        X0 = self.X0
        B, n = X0.shape
        dev = X0.device
        ids = torch.arange(B, device=dev)
        zeros_i = torch.zeros(B, dtype=torch.int64, device=dev)
        X = X0
        if self.method_name == "l-bfgs-b":
            X = torch.minimum(torch.maximum(X0, self.box[0]), self.box[1])
        extra = {}
        if self.uses_jacobian:
            r, J = self.residual_jacobian(X, ids)
            f = 0.5 * (r * r).sum(1)
            g = torch.bmm(J.transpose(1, 2), r.unsqueeze(2)).squeeze(2)
            extra = {"r": r, "J": J}
            finite = torch.isfinite(r).all(1) & torch.isfinite(J).flatten(1).all(1)
        else:
            f, g = self.value_grad(X, ids)
            finite = torch.isfinite(f) & torch.isfinite(g).all(1)
        self.evaluations += 1
        memory = self.method.init_memory(X) if self.method is not None else {}
        memory.update(extra)
        if self.method_name == "newton":
            memory["H"] = self.hessian(X, ids)
        if self.method_name == "lm":
            memory["scale"] = torch.clamp((memory["J"] ** 2).sum(1), min=1e-12)
            memory["damping"] = torch.full((B,), self.options.initial_damping, dtype=X.dtype,
                                           device=dev)
            memory["damping_growth"] = torch.full((B,), 2.0, dtype=X.dtype, device=dev)
            memory["noise_steps"] = torch.zeros(B, dtype=torch.int64, device=dev)
        nan = torch.full((B,), math.nan, dtype=X.dtype, device=dev)
        state = BatchState(
            index=ids, x=X.clone(), f=f, g=g,
            status=torch.where(finite, RUNNING, int(Status.NON_FINITE)),
            nit=zeros_i.clone(), nfev=torch.ones_like(zeros_i), njev=torch.ones_like(zeros_i),
            nhev=zeros_i.clone(), f_prev=nan.clone(), step_size=torch.zeros_like(nan),
            step_norm=torch.full_like(nan, math.inf), grad_norm=nan.clone(), memory=memory,
            out_x=X.clone(), out_f=f.clone(), out_g=g.clone(),
            out_status=torch.full((B,), RUNNING, dtype=torch.int64, device=dev),
            out_counts=torch.zeros(B, 4, dtype=torch.int64, device=dev),
            method=self.method_name,
        )
        state.grad_norm = self._grad_norm(state)
        return state

    def bounds_rows(self, state: BatchState) -> tuple[Tensor, Tensor]:
        lower, upper = self.box
        return lower.index_select(0, state.index), upper.index_select(0, state.index)

    def _grad_norm(self, state: BatchState) -> Tensor:
        if self.method_name == "l-bfgs-b":
            lower, upper = self.bounds_rows(state)
            projected = torch.minimum(torch.maximum(state.x - state.g, lower), upper) - state.x
            return projected.abs().amax(1)
        return state.g.abs().amax(1)

    # -- termination ---------------------------------------------------------------------
    def _converged(self, state: BatchState) -> Tensor:
        term = self.options.termination
        done = state.grad_norm <= term.gtol
        later = state.nit > 0
        if term.ftol > 0:
            scale = torch.clamp(torch.maximum(state.f_prev.abs(), state.f.abs()), min=1.0)
            done = done | (later & ((state.f_prev - state.f) <= term.ftol * scale))
        if term.xtol > 0:
            x_scale = torch.clamp(state.x.abs().amax(1), min=1.0)
            done = done | (later & (state.step_norm <= term.xtol * x_scale))
        return done

    def check_termination(self, state: BatchState, rows: Tensor) -> None:
        """The single driver's loop-top tests, for `rows`: converged, then the iteration cap."""
        rows = rows & (state.status == RUNNING)
        conv = rows & self._converged(state)
        capped = rows & ~conv & (state.nit >= self.max_iter)
        state.status = torch.where(conv, int(Status.CONVERGED), state.status)
        state.status = torch.where(capped, int(Status.MAX_ITERATIONS), state.status)

    def _within_evaluations(self, state: BatchState, running: Tensor) -> Tensor:
        """Running members whose next trial is within max_evals (the others stop there)."""
        max_evals = self.options.termination.max_evals
        if max_evals is None:
            return running
        over = running & (state.nfev >= max_evals)
        state.status = torch.where(over, int(Status.MAX_EVALUATIONS), state.status)
        return running & ~over

    def _before_evaluation(self, started: float, elapsed_before: float) -> None:
        if self.should_stop():
            raise _Stopped(Status.CANCELLED)
        limit = self.options.termination.time_limit
        if limit is not None and elapsed_before + time.perf_counter() - started >= limit:
            raise _Stopped(Status.TIME_LIMIT)

    # -- the run -------------------------------------------------------------------------
    def run(self) -> BatchResult:
        started = time.perf_counter()
        state = self.initial_state
        fresh = state is None
        if fresh:
            self._check = (started, 0.0)
            try:
                self._before_evaluation(started, 0.0)
            except _Stopped as stop:
                return self._stopped_before_start(stop.status, started)
            state = self._initial_state()
        elapsed_before = state.elapsed_s
        self._check = (started, elapsed_before)
        last_checkpoint = time.monotonic()
        last_progress = -math.inf
        while True:
            if self.stepper is not None:
                self.stepper.resolve_and_start(state)
            else:
                self.check_termination(state, state.status == RUNNING)
            running = state.status == RUNNING
            # The one host sync of an engine step: how many members still run.
            active = int(running.sum())
            if active < state.rows:
                finished = ~running & (state.out_status.index_select(0, state.index) == RUNNING)
                state.write_finished(finished)
                if active < COMPACT_BELOW * state.rows or active == 0:
                    state.keep_rows(running.nonzero().squeeze(1))
                    running = state.status == RUNNING
            state.elapsed_s = elapsed_before + time.perf_counter() - started
            if active == 0:
                break
            if self.callback is not None and (not fresh or state.iteration > 0) and (
                    time.monotonic() - last_progress >= self.progress_interval_s):
                last_progress = time.monotonic()
                if self.callback(self.progress(state, active)):
                    self.should_stop = lambda: True
            fresh = False
            if (self.on_checkpoint is not None and self.checkpoint_interval_s > 0
                    and time.monotonic() - last_checkpoint >= self.checkpoint_interval_s):
                last_checkpoint = time.monotonic()
                self.on_checkpoint(state)
            try:
                if self.stepper is not None:
                    self._before_evaluation(*self._check)
                    self.stepper.evaluate_trials(state, self._within_evaluations(state, running))
                else:
                    self._lm_step(state, running)
            except _Stopped as stop:
                stop_searches(state, stop.status)
            state.iteration += 1
        state.elapsed_s = elapsed_before + time.perf_counter() - started
        if self.callback is not None:
            self.callback(self.progress(state, 0))
        counts = state.out_counts
        return BatchResult(
            x=state.out_x, fun=state.out_f, jac=state.out_g, status=state.out_status,
            nit=counts[:, 0].clone(), nfev=counts[:, 1].clone(), njev=counts[:, 2].clone(),
            nhev=counts[:, 3].clone(), method=self.method_name, solve_time_s=state.elapsed_s,
        )

    def _stopped_before_start(self, status: Status, started: float) -> BatchResult:
        B, n = self.X0.shape
        zeros = torch.zeros(B, dtype=torch.int64, device=self.X0.device)
        nan = torch.full((B,), math.nan, dtype=self.X0.dtype, device=self.X0.device)
        return BatchResult(
            x=self.X0.clone(), fun=nan, jac=torch.full_like(self.X0, math.nan),
            status=torch.full_like(zeros, int(status)), nit=zeros, nfev=zeros.clone(),
            njev=zeros.clone(), nhev=zeros.clone(), method=self.method_name,
            solve_time_s=time.perf_counter() - started,
        )

    def progress(self, state: BatchState, active: int) -> BatchProgress:
        """Counts and quantiles; one small device-to-host copy."""
        out = state.out_status
        converged = int((out == int(Status.CONVERGED)).sum())
        finished = int((out != RUNNING).sum())
        if active:
            running = state.status == RUNNING
            gn, f = state.grad_norm[running], state.f[running]
        else:
            gn, f = state.out_g.abs().amax(1), state.out_f
        finite = torch.isfinite(gn) & torch.isfinite(f)
        gn, f = gn[finite], f[finite]
        if gn.numel():
            stats = torch.stack((gn.min(), gn.median(), f.min(), f.median())).tolist()
        else:
            stats = [math.nan] * 4
        return BatchProgress(
            iteration=state.iteration, size=state.size, active=active, converged=converged,
            failed=finished - converged, best_grad_norm=stats[0], median_grad_norm=stats[1],
            best_f=stats[2], median_f=stats[3], elapsed_s=state.elapsed_s,
        )

    def after_step(self, state: BatchState, moved: Tensor) -> None:
        """The single driver's after-step test: a moved member with NaN/Inf ends NON_FINITE."""
        state.grad_norm = torch.where(moved, self._grad_norm(state), state.grad_norm)
        bad = moved & ~(torch.isfinite(state.f) & torch.isfinite(state.grad_norm))
        state.status = torch.where(bad, int(Status.NON_FINITE), state.status)

    # -- Levenberg-Marquardt -------------------------------------------------------------
    def _lm_step(self, state: BatchState, running: Tensor, max_rejections: int = 40) -> None:
        """Nielsen's damping update and More's scaling, as the single solver's LM; each
        member retries with more damping until its step reduces f (its own rejections)."""
        mem = state.memory
        J, g = mem["J"], state.g
        JtJ = torch.bmm(J.transpose(1, 2), J)
        mem["scale"] = torch.maximum(mem["scale"], JtJ.diagonal(dim1=1, dim2=2))
        eps = torch.finfo(state.x.dtype).eps
        pending = running.clone()
        rejections = torch.zeros_like(state.nit)
        saw_nonfinite = torch.zeros_like(running)
        moved = torch.zeros_like(running)
        while True:
            pending = pending & (rejections < max_rejections)
            rows = pending.nonzero().squeeze(1)
            if rows.numel() == 0:
                break
            damping = mem["damping"]
            A = JtJ + damping.reshape(-1, 1, 1) * torch.diag_embed(mem["scale"])
            L, info = torch.linalg.cholesky_ex(A)
            chol_ok = info == 0
            grow = pending & ~chol_ok
            p = -torch.cholesky_solve(g.unsqueeze(2), L).squeeze(2)
            p = torch.where(chol_ok.unsqueeze(1), p, torch.zeros_like(p))
            Jp = torch.bmm(JtJ, p.unsqueeze(2)).squeeze(2)
            predicted = -((g * p).sum(1) + 0.5 * (p * Jp).sum(1))
            trying = pending & chol_ok
            rows = trying.nonzero().squeeze(1)
            f_new = torch.full_like(state.f, math.nan)
            finite = torch.zeros_like(trying)
            if rows.numel():
                self._before_evaluation(*self._check)
                x_rows = (state.x + p).index_select(0, rows)
                r_rows, J_rows = self.residual_jacobian(x_rows, state.index.index_select(0, rows))
                self.evaluations += 1
                one = torch.zeros_like(state.nfev).index_fill(0, rows, 1)
                state.nfev, state.njev = state.nfev + one, state.njev + one
                f_rows = 0.5 * (r_rows * r_rows).sum(1)
                fin_rows = torch.isfinite(r_rows).all(1) & torch.isfinite(J_rows).flatten(1).all(1)
                f_new = f_new.index_copy(0, rows, f_rows)
                finite = finite.index_copy(0, rows, fin_rows)
            f_old = state.f
            noise = 8.0 * eps * torch.clamp(f_old.abs(), min=1e-300)
            at_floor = (predicted <= noise) & (f_new <= f_old + noise) & (mem["noise_steps"] < 5)
            safe_pred = torch.where(predicted > 0, predicted, torch.ones_like(predicted))
            ratio = torch.where(predicted > 0, (f_old - f_new) / safe_pred,
                                torch.zeros_like(predicted))
            accept = trying & finite & ((predicted > 0) | at_floor) & ((ratio > 0) | at_floor)
            stationary = trying & finite & ~(predicted > 0) & ~at_floor
            saw_nonfinite = saw_nonfinite | (trying & ~finite)
            state.status = torch.where(stationary, int(Status.LINE_SEARCH_FAILED), state.status)
            if bool(accept.any()):
                rows_a = accept.nonzero().squeeze(1)
                pos = torch.zeros_like(state.nfev).index_copy(
                    0, rows, torch.arange(rows.numel(), device=rows.device))
                take = pos.index_select(0, rows_a)
                r_acc, J_acc = r_rows.index_select(0, take), J_rows.index_select(0, take)
                noise_step = (ratio <= 0) | (predicted <= noise)
                mem["noise_steps"] = torch.where(
                    accept, torch.where(noise_step, mem["noise_steps"] + 1, 0), mem["noise_steps"])
                factor = torch.clamp(1.0 - (2.0 * ratio - 1.0) ** 3, min=1.0 / 3.0)
                mem["damping"] = torch.where(accept, damping * factor, mem["damping"])
                mem["damping_growth"] = torch.where(accept, 2.0, mem["damping_growth"])
                state.f_prev = torch.where(accept, state.f, state.f_prev)
                state.step_norm = torch.where(accept, p.abs().amax(1), state.step_norm)
                state.x = torch.where(accept.unsqueeze(1), state.x + p, state.x)
                state.f = torch.where(accept, f_new, state.f)
                mem["r"] = mem["r"].index_copy(0, rows_a, r_acc)
                mem["J"] = mem["J"].index_copy(0, rows_a, J_acc)
                g_acc = torch.bmm(J_acc.transpose(1, 2), r_acc.unsqueeze(2)).squeeze(2)
                state.g = state.g.index_copy(0, rows_a, g_acc)
                state.step_size = torch.where(accept, 1.0, state.step_size)
                state.nit = state.nit + accept.long()
                moved = moved | accept
            rejected = (trying & ~accept & ~stationary) | grow
            mem["damping"] = torch.where(rejected, mem["damping"] * mem["damping_growth"],
                                         mem["damping"])
            mem["damping_growth"] = torch.where(rejected, mem["damping_growth"] * 2.0,
                                                mem["damping_growth"])
            rejections = rejections + rejected.long()
            pending = rejected
        gave_up = running & (state.status == RUNNING) & (rejections >= max_rejections)
        state.status = torch.where(
            gave_up, torch.where(saw_nonfinite, int(Status.NON_FINITE),
                                 int(Status.LINE_SEARCH_FAILED)), state.status)
        self.after_step(state, moved & (state.status == RUNNING))


def minimize_batch(fun: BatchFun, X0: Tensor, *, method: str = "bfgs", bounds=None,
                   options: dict | None = None, **kw) -> BatchResult:
    """Minimizes B independent problems at once: fun(X (k, n), ids (k,)) -> (k,).

    Keywords: should_stop, callback(BatchProgress) -> True cancels, initial_state,
    on_checkpoint(BatchState), checkpoint_interval_s.
    """
    return BatchSolve(fun, X0, method=method, bounds=bounds, options=options, **kw).run()


def least_squares_batch(residual: BatchFun, X0: Tensor, *, method: str = "lm",
                        options: dict | None = None, **kw) -> BatchResult:
    """Minimizes 0.5 |r_i(x_i)|^2 for every member; residual(X, ids) -> (k, m)."""
    return BatchSolve(residual, X0, method=method, options=options, residual=True, **kw).run()
