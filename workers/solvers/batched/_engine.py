"""The batched driver: evaluations of the working set, per-member line searches, termination
masks, compaction of finished members, checkpoints. One solver semantics with the single
solvers (workers/solvers/_driver.py): the same tests in the same order, member by member.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass
class _Trial:
    """The line search outcome per row: success and the accepted (last) trial."""

    ok: Tensor
    saw_nonfinite: Tensor
    alpha: Tensor
    x: Tensor
    f: Tensor
    g: Tensor
    derphi: Tensor


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
                 checkpoint_interval_s: float = 0.0) -> None:
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
        self.evaluations = 0  # batched objective calls (not member evaluations)

    # -- evaluations ---------------------------------------------------------------------
    def _value(self, X: Tensor, ids: Tensor) -> Tensor:
        with torch.no_grad():
            out = self.fun(X, ids)
            return 0.5 * (out * out).sum(1) if self.residual else out

    def _value_grad(self, X: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            Xg = X.detach().requires_grad_(True)
            out = self.fun(Xg, ids)
            F = 0.5 * (out * out).sum(1) if self.residual else out
            (G,) = torch.autograd.grad(F.sum(), Xg, allow_unused=True)
        return F.detach(), torch.zeros_like(X) if G is None else G

    def _hessian(self, X: Tensor, ids: Tensor) -> Tensor:
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

    def _residual_jacobian(self, X: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
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
            r, J = self._residual_jacobian(X, ids)
            f = 0.5 * (r * r).sum(1)
            g = torch.bmm(J.transpose(1, 2), r.unsqueeze(2)).squeeze(2)
            extra = {"r": r, "J": J}
            finite = torch.isfinite(r).all(1) & torch.isfinite(J).flatten(1).all(1)
        else:
            f, g = self._value_grad(X, ids)
            finite = torch.isfinite(f) & torch.isfinite(g).all(1)
        self.evaluations += 1
        memory = self.method.init_memory(X) if self.method is not None else {}
        memory.update(extra)
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

    def _bounds_rows(self, state: BatchState) -> tuple[Tensor, Tensor]:
        lower, upper = self.box
        return lower.index_select(0, state.index), upper.index_select(0, state.index)

    def _grad_norm(self, state: BatchState) -> Tensor:
        if self.method_name == "l-bfgs-b":
            lower, upper = self._bounds_rows(state)
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
        while True:
            running = state.status == RUNNING
            conv = running & self._converged(state)
            capped = running & ~conv & (state.nit >= self.max_iter)
            state.status = torch.where(conv, int(Status.CONVERGED), state.status)
            state.status = torch.where(capped, int(Status.MAX_ITERATIONS), state.status)
            running = state.status == RUNNING
            # The one host sync of an iteration: how many members still run.
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
            if self.callback is not None and (not fresh or state.iteration > 0):
                if self.callback(self.progress(state, active)):
                    self.should_stop = lambda: True
            fresh = False
            if (self.on_checkpoint is not None and self.checkpoint_interval_s > 0
                    and time.monotonic() - last_checkpoint >= self.checkpoint_interval_s):
                last_checkpoint = time.monotonic()
                self.on_checkpoint(state)
            try:
                if self.method_name == "lm":
                    self._lm_step(state, running)
                else:
                    self._step(state, running)
            except _Stopped as stop:
                state.status = torch.where(state.status == RUNNING, int(stop.status),
                                           state.status)
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

    # -- one iteration of a line-search method -------------------------------------------
    def _extra(self, state: BatchState, running: Tensor):
        name = self.method_name
        if name == "newton":
            self._before_evaluation(*self._check)
            H = self._hessian(state.x, state.index)
            self.evaluations += 1
            state.nhev = state.nhev + running.long()
            bad = running & ~torch.isfinite(H).flatten(1).all(1)
            state.status = torch.where(bad, int(Status.NON_FINITE), state.status)
            return torch.where(bad.reshape(-1, 1, 1), torch.zeros_like(H), H)
        if name == "gauss-newton":
            return state.memory["r"], state.memory["J"]
        if name == "l-bfgs-b":
            return self._bounds_rows(state)
        return None

    def _step(self, state: BatchState, running: Tensor) -> None:
        method = self.method
        extra = self._extra(state, running)
        running = state.status == RUNNING
        g = state.g
        d = method.direction(state.x, g, state.memory, extra)
        derphi0 = (g * d).sum(1)
        descent = torch.isfinite(derphi0) & (derphi0 < 0)
        if self.method_name == "l-bfgs-b":
            self._projected_step(state, running, d, derphi0, descent, extra)
            return
        steepest = running & ~descent
        method.reset(state.memory, steepest)
        gg = (g * g).sum(1)
        d = torch.where(steepest.unsqueeze(1), -g, d)
        derphi0 = torch.where(steepest, -gg, derphi0)
        alpha0 = method.initial_step(state.nit, state.f, state.f_prev, g, derphi0)
        trial = self._search(state, running, d, derphi0, alpha0)
        retry = running & ~trial.ok & ~steepest & (state.status == RUNNING)
        if bool(retry.any()):
            method.reset(state.memory, retry)
            d = torch.where(retry.unsqueeze(1), -g, d)
            derphi0 = torch.where(retry, -gg, derphi0)
            alpha_fresh = torch.clamp(1.0 / torch.clamp(g.abs().amax(1), min=1e-300), max=1.0)
            again = self._search(state, retry, d, derphi0, alpha_fresh)
            trial = _merge(retry, again, trial)
        self._finish_step(state, running, trial, d, derphi0)

    def _projected_step(self, state, running, d, derphi0, descent, bounds) -> None:
        """l-bfgs-b: a feasible direction, searched up to the nearest bound."""
        method = self.method
        lower, upper = bounds
        no_descent = running & ~descent & (state.memory["count"] > 0)
        if bool(no_descent.any()):
            method.reset(state.memory, no_descent)
            d2 = method.direction(state.x, state.g, state.memory, bounds)
            d = torch.where(no_descent.unsqueeze(1), d2, d)
            derphi0 = (state.g * d).sum(1)
            descent = torch.isfinite(derphi0) & (derphi0 < 0)
        stuck = running & ~descent
        state.status = torch.where(stuck, int(Status.LINE_SEARCH_FAILED), state.status)
        running = state.status == RUNNING
        alpha_max = method.max_step(state.x, d, lower, upper)
        boxed = torch.isfinite(lower).all(1) & torch.isfinite(upper).all(1)
        first = (state.nit == 0) & ~boxed
        dnorm = torch.clamp(torch.linalg.vector_norm(d, dim=1), min=1e-300)
        alpha0 = torch.where(first, torch.minimum(1.0 / dnorm, alpha_max),
                             torch.clamp(alpha_max, max=1.0))
        zero_step = running & (alpha_max <= 0)
        state.status = torch.where(zero_step, int(Status.LINE_SEARCH_FAILED), state.status)
        running = state.status == RUNNING
        trial = self._search(state, running, d, derphi0, alpha0, alpha_max=alpha_max,
                             project=bounds)
        retry = running & ~trial.ok & (state.memory["count"] > 0) & (state.status == RUNNING)
        if bool(retry.any()):
            method.reset(state.memory, retry)
            d2 = method.direction(state.x, state.g, state.memory, bounds)
            d = torch.where(retry.unsqueeze(1), d2, d)
            derphi0 = (state.g * d).sum(1)
            ok_dir = retry & torch.isfinite(derphi0) & (derphi0 < 0)
            alpha_max = method.max_step(state.x, d, lower, upper)
            again = self._search(state, ok_dir, d, derphi0,
                                 torch.clamp(alpha_max, max=1.0), alpha_max=alpha_max,
                                 project=bounds)
            trial = _merge(ok_dir, again, trial)
        moved = (trial.x - state.x).abs().amax(1) > 0
        trial.ok = trial.ok & moved
        self._finish_step(state, running, trial, d, derphi0)

    def _search(self, state: BatchState, searching: Tensor, d: Tensor, derphi0: Tensor,
                alpha0: Tensor, alpha_max: Tensor | None = None, project=None) -> _Trial:
        """Runs every searching row's line search to its end; one batched evaluation per
        round. After the first round (where most members finish) the search state shrinks to
        the rows still searching, so later rounds cost what those few rows cost."""
        rule = self.rule
        if isinstance(rule, BatchedStrongWolfe):
            search = rule.start(state.f, derphi0, alpha0, searching, alpha_max)
        else:
            search = rule.start(state.f, derphi0, alpha0, searching)
        needs_g = rule.needs_gradient
        k = state.rows
        last_x = state.x.clone()
        last_f = torch.full_like(state.f, math.nan)
        last_g = torch.full_like(state.g, math.nan)
        last_der = torch.full_like(state.f, math.nan)
        max_evals = self.options.termination.max_evals
        covered: Tensor | None = None  # rows (of k) the shrunk search state holds; None: all
        full_search = search

        def to_rows(mask: Tensor) -> Tensor:
            if covered is None:
                return mask
            return torch.zeros(k, dtype=torch.bool, device=mask.device).index_copy(
                0, covered, mask)

        while True:
            local = search.searching.nonzero().squeeze(1)  # host sync: who still searches
            if local.numel() == 0:
                break
            try:
                self._before_evaluation(*self._check)
            except _Stopped as stop:
                state.status = torch.where(to_rows(search.searching), int(stop.status),
                                           state.status)
                raise
            if max_evals is not None:
                nfev = state.nfev if covered is None else state.nfev.index_select(0, covered)
                over = search.searching & (nfev >= max_evals)
                state.status = torch.where(to_rows(over), int(Status.MAX_EVALUATIONS),
                                           state.status)
                search.searching = search.searching & ~over
                local = search.searching.nonzero().squeeze(1)
                if local.numel() == 0:
                    break
            if covered is None and local.numel() < COMPACT_BELOW * k:
                search = _select_rows(search, local)
                covered = local
                local = torch.arange(local.numel(), device=local.device)
            rows = local if covered is None else covered.index_select(0, local)
            whole = rows.numel() == k
            n_cov = search.alpha.shape[0]
            x_rows = state.x if whole else state.x.index_select(0, rows)
            d_rows = d if whole else d.index_select(0, rows)
            a_rows = search.alpha if local.numel() == n_cov else search.alpha.index_select(
                0, local)
            xt = torch.addcmul(x_rows, a_rows.unsqueeze(1), d_rows)
            if project is not None:
                lo, hi = project
                if not whole:
                    lo, hi = lo.index_select(0, rows), hi.index_select(0, rows)
                xt = torch.minimum(torch.maximum(xt, lo), hi)
            ids = state.index if whole else state.index.index_select(0, rows)
            if needs_g:
                ft, gt = self._value_grad(xt, ids)
                dt = (gt * d_rows).sum(1)
            else:
                ft = self._value(xt, ids)
                gt = None
                dt = torch.full_like(ft, math.nan)
            self.evaluations += 1
            ft = torch.where(torch.isfinite(ft), ft, torch.full_like(ft, math.nan))
            if whole:
                last_x, last_f, last_der = xt, ft, dt
                if gt is not None:
                    last_g = gt
                counted = torch.ones_like(state.nfev)
            else:
                last_x = last_x.index_copy(0, rows, xt)
                last_f = last_f.index_copy(0, rows, ft)
                last_der = last_der.index_copy(0, rows, dt)
                if gt is not None:
                    last_g = last_g.index_copy(0, rows, gt)
                counted = torch.zeros_like(state.nfev).index_fill(0, rows, 1)
            if local.numel() == n_cov:
                phi, der = ft, dt
            else:
                phi = torch.full_like(search.alpha, math.nan).index_copy(0, local, ft)
                der = torch.full_like(search.alpha, math.nan).index_copy(0, local, dt)
            state.nfev = state.nfev + counted
            if needs_g:
                state.njev = state.njev + counted
            # Most trials are accepted at once: settle those cheaply, then run the full update
            # only on the rest (shrunk to them when they are few).
            rule.settle(search, phi, der)
            if covered is None:
                rest = search.searching.nonzero().squeeze(1)
                if rest.numel() == 0:
                    break
                if rest.numel() < COMPACT_BELOW * k:
                    search = _select_rows(search, rest)
                    phi, der = phi.index_select(0, rest), der.index_select(0, rest)
                    covered = rest
            search = rule.advance(search, phi, der)
        if covered is not None:
            search = _scatter_rows(full_search, covered, search)
        ok = searching & search.success & (search.result_alpha > 0) & torch.isfinite(
            search.result_phi)
        return _Trial(ok=ok, saw_nonfinite=search.saw_nonfinite, alpha=search.result_alpha,
                      x=last_x, f=last_f, g=last_g, derphi=last_der)

    def _finish_step(self, state, running, trial: _Trial, d, derphi0) -> None:
        failed = running & ~trial.ok & (state.status == RUNNING)
        state.status = torch.where(
            failed & trial.saw_nonfinite, int(Status.NON_FINITE),
            torch.where(failed, int(Status.LINE_SEARCH_FAILED), state.status))
        ok = running & trial.ok & (state.status == RUNNING)
        g_new = trial.g
        if self.method_name == "gauss-newton":
            g_new = state.g  # replaced with J^T r at the new point below
        elif not self.rule.needs_gradient:
            rows = ok.nonzero().squeeze(1)
            if rows.numel():
                self._before_evaluation(*self._check)
                _, g_rows = self._value_grad(trial.x.index_select(0, rows),
                                             state.index.index_select(0, rows))
                self.evaluations += 1
                g_new = torch.full_like(state.g, math.nan).index_copy(0, rows, g_rows)
                state.njev = state.njev + torch.zeros_like(state.njev).index_fill(0, rows, 1)
                bad = ok & ~torch.isfinite(g_new).all(1)
                state.status = torch.where(bad, int(Status.NON_FINITE), state.status)
                ok = ok & ~bad
        wolfe = isinstance(self.rule, BatchedStrongWolfe)
        s = trial.x - state.x
        y = g_new - state.g
        sy = trial.alpha * (trial.derphi - derphi0) if wolfe and self.method_name != "l-bfgs-b" \
            else torch.full_like(state.f, math.nan)
        okm = ok.unsqueeze(1)
        self.method.absorb(state.memory, ok, torch.where(okm, s, 0.0), torch.where(okm, y, 0.0),
                           torch.where(ok, sy, math.nan))
        state.step_norm = torch.where(ok, s.abs().amax(1), state.step_norm)
        state.f_prev = torch.where(ok, state.f, state.f_prev)
        state.x = torch.where(okm, trial.x, state.x)
        state.f = torch.where(ok, trial.f, state.f)
        state.g = torch.where(okm, g_new, state.g)
        state.step_size = torch.where(ok, trial.alpha, state.step_size)
        state.nit = state.nit + ok.long()
        if self.method_name == "gauss-newton":
            self._refresh_jacobian(state, ok)
        self._after_step(state, ok)

    def _after_step(self, state: BatchState, moved: Tensor) -> None:
        state.grad_norm = torch.where(moved, self._grad_norm(state), state.grad_norm)
        bad = moved & ~(torch.isfinite(state.f) & torch.isfinite(state.grad_norm))
        state.status = torch.where(bad, int(Status.NON_FINITE), state.status)

    def _refresh_jacobian(self, state: BatchState, moved: Tensor) -> None:
        rows = moved.nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        self._before_evaluation(*self._check)
        r, J = self._residual_jacobian(state.x.index_select(0, rows),
                                       state.index.index_select(0, rows))
        self.evaluations += 1
        mem = state.memory
        mem["r"] = mem["r"].index_copy(0, rows, r)
        mem["J"] = mem["J"].index_copy(0, rows, J)
        g = torch.bmm(J.transpose(1, 2), r.unsqueeze(2)).squeeze(2)
        state.g = state.g.index_copy(0, rows, g)
        state.f = state.f.index_copy(0, rows, 0.5 * (r * r).sum(1))
        state.nfev = state.nfev + torch.zeros_like(state.nfev).index_fill(0, rows, 1)
        state.njev = state.njev + torch.zeros_like(state.njev).index_fill(0, rows, 1)
        bad = torch.zeros_like(moved).index_copy(
            0, rows, ~(torch.isfinite(r).all(1) & torch.isfinite(J).flatten(1).all(1)))
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
                r_rows, J_rows = self._residual_jacobian(x_rows, state.index.index_select(0, rows))
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
        self._after_step(state, moved & (state.status == RUNNING))


def _select_rows(search, rows: Tensor):
    return dataclasses.replace(search, **{
        f.name: getattr(search, f.name).index_select(0, rows) for f in dataclasses.fields(search)})


def _scatter_rows(full, rows: Tensor, part):
    """`full` with the rows `rows` replaced by the shrunk search `part` (result fields)."""
    names = ("searching", "success", "saw_nonfinite", "result_alpha", "result_phi",
             "result_derphi")
    return dataclasses.replace(full, **{
        name: getattr(full, name).index_copy(0, rows, getattr(part, name)) for name in names})


def _merge(rows: Tensor, new: _Trial, old: _Trial) -> _Trial:
    r1 = rows.unsqueeze(1)
    return _Trial(
        ok=torch.where(rows, new.ok, old.ok),
        saw_nonfinite=torch.where(rows, new.saw_nonfinite, old.saw_nonfinite),
        alpha=torch.where(rows, new.alpha, old.alpha),
        x=torch.where(r1, new.x, old.x), f=torch.where(rows, new.f, old.f),
        g=torch.where(r1, new.g, old.g), derphi=torch.where(rows, new.derphi, old.derphi),
    )


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
