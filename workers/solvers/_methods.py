"""The solvers: a descent direction + a step rule, advancing an explicit state.

Each solver's `step(state)` is a generator that yields EvalRequests and is sent back
Evaluations; it replaces x, f, g (and its memory) only when the step is accepted, so a
state between steps is always a consistent point to checkpoint, report or resume from.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._evaluation import EvalRequest, Evaluation
from ._linesearch import BacktrackingArmijo, LineSearchResult, StrongWolfe
from ._ops import TORCH, _norm_inf
from ._result import Status

Steps = Generator[EvalRequest, Evaluation, None]


class SolveStopped(Exception):
    """Raised inside a step when the solve must end with `status` at the last accepted state."""

    def __init__(self, status: Status, detail: str = "") -> None:
        super().__init__(detail or status.message)
        self.status = status
        self.detail = detail


@dataclass
class SolveState:
    """Where a solve stands between iterations. Tensors and plain numbers only."""

    x: Tensor
    f: Tensor
    g: Tensor
    nit: int = 0
    nfev: int = 0
    njev: int = 0
    nhev: int = 0
    step_size: float = 0.0
    f_prev: float = math.nan
    step_norm: float = math.inf
    grad_norm: float = math.nan
    derphi_prev: float = math.nan
    elapsed_s: float = 0.0


@dataclass
class DenseQuasiNewtonState(SolveState):
    H: Tensor | None = None  # inverse Hessian approximation, n x n


@dataclass
class LbfgsState(SolveState):
    """History in one (2m x n) ring buffer W: rows [0, m) hold s, rows [m, 2m) hold y; pair
    i (oldest first, i < count) sits in slot (newest - count + 1 + i) mod m. SY[i, j] =
    s_i . y_j and YY[i, j] = y_i . y_j in chronological order (oldest first) in their
    leading count x count block, so no per-iteration reordering is needed. W is allocated
    on the first accepted step (None before)."""

    W: Tensor | None = None
    SY: Tensor | None = None
    YY: Tensor | None = None
    gamma: Tensor | None = None
    count: int = 0  # pairs stored (<= m)
    newest: int = -1  # slot of the newest pair
    P: Tensor | None = None  # W @ g (slot order, zero on empty slots), when known
    coef: Tensor | None = None  # last direction d = -(dir_gamma g + S^T coef[0] + Y^T coef[1]),
    #                             coef (2, count) in chronological order
    dir_gamma: Tensor | None = None
    layout: int = 0  # 1: SY/YY chronological; 0: slot order (checkpoints before this layout)
    SS: Tensor | None = None  # SS[i, j] = s_i . s_j, chronological (l-bfgs-b only)


@dataclass
class LeastSquaresState(SolveState):
    r: Tensor | None = None
    J: Tensor | None = None
    scale: Tensor | None = None  # LM: running max of diag(J^T J) (MINPACK's scaling)
    noise_steps: int = 0  # LM: steps taken at f's rounding level in a row
    damping: float = 0.0
    damping_growth: float = 2.0


class LineSearchSolver:
    """Direction + step rule. Subclasses give the direction and the memory update.

    The shared steps below, and the dense quasi-Newton methods, do their vector work through
    `ops` (workers.solvers._ops): torch tensors by default; numpy arrays on the small-problem
    path (workers.solvers._small), which runs this same code."""

    name = ""
    ops = TORCH
    state_class: type[SolveState] = SolveState
    default_line_search = "strong-wolfe"
    needs_hessian = False
    track_step_norm = False  # the driver turns it on when xtol is used
    accept_failed_decrease = False  # see _acceptable

    def __init__(self, *, line_search: str | None = None, c1=None, c2=None) -> None:
        kind = line_search or self.default_line_search
        if kind == "armijo":
            self.step_rule = BacktrackingArmijo(c1=c1 if c1 is not None else 1e-4)
        else:
            self.step_rule = StrongWolfe(
                c1=c1 if c1 is not None else 1e-4, c2=c2 if c2 is not None else 0.9
            )

    # -- the parts a method chooses ------------------------------------------------------
    def first_request(self, x0: Tensor) -> EvalRequest:
        return EvalRequest(x0, need_f=True, need_g=True)

    def init_state(self, x0: Tensor, ev: Evaluation) -> SolveState:
        return self.state_class(x=x0, f=ev.f, g=ev.g)

    def direction(self, state: SolveState) -> Generator[EvalRequest, Evaluation, Tensor]:
        raise NotImplementedError
        yield  # pragma: no cover

    def reset_memory(self, state: SolveState) -> None:
        """Forget curvature information (after a failed search along a quasi-Newton step)."""

    def absorb(self, state: SolveState, x_new: Tensor, g_new: Tensor, alpha: float,
               d: Tensor, sy: float | None = None) -> None:
        """Update curvature memory with the accepted step (before state moves to x_new).

        `sy`, when given, is s . y from the line search's derivatives: alpha (g_new . d -
        g . d), which saves a pass over two n-vectors."""

    def initial_step(self, state: SolveState, d: Tensor, derphi0: float) -> float:
        if state.nit == 0:
            return min(1.0, 1.01 / max(self.ops.norm(state.g), 1e-300))
        return 1.0

    def hess_inv(self, state: SolveState) -> Tensor | None:
        return None

    def grad_norm(self, state: SolveState) -> float:
        return self.ops.norm_inf(state.g)

    # -- one iteration -------------------------------------------------------------------
    def step(self, state: SolveState) -> Steps:
        dot = self.ops.dot
        d = yield from self.direction(state)
        derphi0 = dot(state.g, d)
        steepest = False
        if not (math.isfinite(derphi0) and derphi0 < 0):
            self.reset_memory(state)
            d, derphi0, steepest = -state.g, -dot(state.g, state.g), True
        result, ev, x_new = yield from self._search(state, d, derphi0)
        if not self._acceptable(result, state, derphi0) and not steepest:
            self.reset_memory(state)
            d, derphi0 = -state.g, -dot(state.g, state.g)
            result, ev, x_new = yield from self._search(state, d, derphi0, fresh=True)
        yield from self._finish_search(result, state, derphi0, ev, x_new)
        sy = None
        if result.derphi is not None and ev is not None and ev.g is not None:
            sy = result.alpha * (result.derphi - derphi0)
        self._accept(state, x_new, ev.f, ev.g, result.alpha, d, derphi0, sy)

    def _finish_search(self, result, state, derphi0: float, ev: Evaluation, x_new: Tensor):
        """Stops the solve when the search found no acceptable step; makes sure the accepted
        point's gradient is known (Armijo trials ask for f only)."""
        if not self._acceptable(result, state, derphi0):
            status = Status.NON_FINITE if result.saw_nonfinite else Status.LINE_SEARCH_FAILED
            raise SolveStopped(status)
        if ev.g is None:
            ev_g = yield EvalRequest(x_new, need_f=False, need_g=True)
            ev.g = ev_g.g
            if not ev_g.is_finite():
                raise SolveStopped(Status.NON_FINITE)

    def _acceptable(self, result: LineSearchResult, state: SolveState, derphi0: float) -> bool:
        """Only a step the rule accepts (a Wolfe point; an Armijo point for Armijo rules).

        A failed Wolfe search's best point is refused even when it decreases f: near the
        limit of f's precision such points are tiny and noise-driven, and taking them turns
        the solve into thousands of evaluations instead of a prompt precision-loss stop
        (scipy's BFGS refuses them too). Methods whose updates lean on such steps (DFP, SR1)
        set `accept_failed_decrease`: a sufficient-decrease point is then taken anyway.
        """
        if result.alpha <= 0 or not math.isfinite(result.phi):
            return False
        if result.success:
            return True
        return self.accept_failed_decrease and (
            result.phi <= float(state.f) + self.step_rule.c1 * result.alpha * derphi0
        )

    def _accept(self, state, x_new, f_new, g_new, alpha, d, derphi0, sy=None) -> None:
        self.absorb(state, x_new, g_new, alpha, d, sy)
        state.f_prev = float(state.f)
        if self.track_step_norm:
            state.step_norm = self.ops.norm_inf(x_new - state.x)
        state.x, state.f, state.g = x_new, f_new, g_new
        state.step_size = alpha
        state.derphi_prev = derphi0
        state.nit += 1

    def _search(self, state: SolveState, d: Tensor, derphi0: float, fresh: bool = False):
        """Runs the step rule along d; returns (result, evaluation at its step, the point)."""
        alpha0 = self.initial_step(state, d, derphi0) if not fresh else min(
            1.0, 1.0 / max(self.ops.norm_inf(d), 1e-300)
        )
        rule = self.step_rule
        step, dot = self.ops.step, self.ops.dot
        phi0 = float(state.f)
        search = rule.search(phi0, derphi0, alpha0)
        alpha = next(search)
        # The search returns its last trial, the lowest f, or the lowest f - c1 a derphi0
        # (More-Thuente's best step): keep those three evaluations, not every trial.
        kept: dict[str, tuple[float, float, Evaluation, Tensor]] = {}
        c1 = rule.c1
        while True:
            x_trial = step(state.x, d, alpha)
            ev = yield EvalRequest(x_trial, need_f=True, need_g=rule.needs_gradient)
            phi = float(ev.f)
            der = dot(ev.g, d) if ev.g is not None else None
            if not math.isfinite(phi):
                phi = math.nan
            entry = (alpha, phi, ev, x_trial)
            kept["last"] = entry
            if math.isfinite(phi):
                if "f" not in kept or phi < kept["f"][1]:
                    kept["f"] = entry
                psi = phi - c1 * alpha * derphi0
                if "psi" not in kept or psi < kept["psi"][1] - c1 * kept["psi"][0] * derphi0:
                    kept["psi"] = entry
            try:
                alpha = search.send((phi, der))
            except StopIteration as stop:
                result: LineSearchResult = stop.value
                break
        for a, value, ev, x_trial in kept.values():
            if a == result.alpha and math.isfinite(value):
                return result, ev, x_trial
        if result.alpha > 0 and math.isfinite(result.phi):
            x_trial = step(state.x, d, result.alpha)
            ev = yield EvalRequest(x_trial, need_f=True, need_g=rule.needs_gradient)
            if ev.is_finite():
                return result, ev, x_trial
        return result, Evaluation(), state.x


class GradientDescent(LineSearchSolver):
    name = "gd"

    def direction(self, state):
        return -state.g
        yield  # pragma: no cover

    def initial_step(self, state, d, derphi0):
        if state.nit == 0 or not math.isfinite(state.derphi_prev):
            return super().initial_step(state, d, derphi0)
        # Nocedal & Wright (3.60): expect the same first-order change as last time.
        return max(state.step_size * state.derphi_prev / derphi0, 1e-12)


class Newton(LineSearchSolver):
    """Exact Hessian and Cholesky; adds tau*I when not positive definite (N&W Alg. 3.3)."""

    name = "newton"
    needs_hessian = True

    def direction(self, state):
        ev = yield EvalRequest(state.x, need_f=False, need_g=False, need_hess=True)
        H = ev.hess
        if H is None or not ev.is_finite():
            raise SolveStopped(Status.NON_FINITE)
        H = 0.5 * (H + H.T)
        eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        min_diag = float(H.diagonal().min())
        tau = 0.0 if min_diag > 0 else -min_diag + 1e-3
        for _ in range(60):
            L, info = torch.linalg.cholesky_ex(H + tau * eye)
            if int(info) == 0:
                return -torch.cholesky_solve(state.g.unsqueeze(1), L).squeeze(1)
            tau = max(2.0 * tau, 1e-3 * max(1.0, float(H.abs().max())))
        return -state.g

    def initial_step(self, state, d, derphi0):
        return 1.0


class NewtonCG(LineSearchSolver):
    """Hessian-free Newton: truncated CG on Hessian-vector products, exits on negative curvature.

    Forcing term as scipy's: stop CG when |r|_1 <= min(0.5, sqrt(|g|_1)) |g|_1.
    """

    name = "newton-cg"

    def __init__(self, *, cg_max_iter: int | None = None, **kw) -> None:
        super().__init__(**kw)
        self.cg_max_iter = cg_max_iter

    def direction(self, state):
        g = state.g
        mag = float(g.abs().sum())
        tol = min(0.5, math.sqrt(mag)) * mag
        p = torch.zeros_like(g)
        r = g.clone()
        v = -r
        rr = float(torch.dot(r, r))
        max_iter = self.cg_max_iter or 20 * g.numel()
        for i in range(max_iter):
            if float(r.abs().sum()) <= tol:
                break
            ev = yield EvalRequest(state.x, need_f=False, need_g=False, hvp_vector=v)
            Hv = ev.hvp
            if Hv is None or not ev.is_finite():
                raise SolveStopped(Status.NON_FINITE)
            curv = float(torch.dot(v, Hv))
            if curv <= 0:
                # Negative curvature: steepest descent scaled as scipy does on the first pass,
                # else the CG iterate so far.
                return (rr / max(-curv, 1e-300)) * v if i == 0 and curv < 0 else (
                    -g if i == 0 else p)
            alpha = rr / curv
            p = p + alpha * v
            r = r + alpha * Hv
            rr_new = float(torch.dot(r, r))
            v = -r + (rr_new / rr) * v
            rr = rr_new
        return p

    def initial_step(self, state, d, derphi0):
        return 1.0


class DenseQuasiNewton(LineSearchSolver):
    """BFGS, DFP and SR1 on a dense inverse Hessian approximation (n^2 memory)."""

    state_class = DenseQuasiNewtonState

    def direction(self, state):
        if state.H is None:
            return -state.g
        return -(state.H @ state.g)
        yield  # pragma: no cover

    def reset_memory(self, state):
        state.H = None

    def hess_inv(self, state):
        if state.H is not None:
            return state.H
        return self.ops.eye(state.x)

    def absorb(self, state, x_new, g_new, alpha, d, sy=None):
        self.update_memory(state, x_new - state.x, g_new - state.g)

    # H0 = I, as scipy's BFGS. Nocedal & Wright's (6.20) scaling of H0 before the first
    # update measured worse on the standard set for BFGS (more evaluations) and for DFP
    # (16 solved against 28).
    scale_initial = False

    def update_memory(self, state, s, y):
        ops = self.ops
        sy = ops.dot(s, y)
        if not (math.isfinite(sy) and sy > 1e-10 * ops.norm(s) * ops.norm(y)):
            return
        if state.H is None:
            # Nocedal & Wright (6.20): scale the first approximation before updating it.
            scale = sy / ops.dot(y, y) if self.scale_initial else 1.0
            state.H = scale * ops.eye(s)
        state.H = self._update(state.H, s, y, sy)

    def _update(self, H: Tensor, s: Tensor, y: Tensor, sy: float) -> Tensor:
        raise NotImplementedError


class Bfgs(DenseQuasiNewton):
    """BFGS from H0 = I with scipy's first-trial heuristic (the first step's length comes
    from the steepest-descent guess, later ones from the last decrease)."""

    name = "bfgs"

    def initial_step(self, state, d, derphi0):
        if state.nit == 0 or not math.isfinite(state.f_prev):
            return super().initial_step(state, d, derphi0)
        # scipy's line_search_wolfe1 guess: the quadratic through the last decrease.
        guess = 2.02 * (float(state.f) - state.f_prev) / derphi0
        return min(1.0, guess) if math.isfinite(guess) and guess > 0 else 1.0

    def _update(self, H, s, y, sy):
        rho = 1.0 / sy
        Hy = H @ y
        outer = self.ops.outer
        yHy = self.ops.dot(y, Hy)
        # (I - rho s y^T) H (I - rho y s^T) + rho s s^T, expanded to rank-2 terms.
        return (H - rho * (outer(s, Hy) + outer(Hy, s))
                + (rho * rho * yHy + rho) * outer(s, s))


class Dfp(DenseQuasiNewton):
    name = "dfp"
    accept_failed_decrease = True

    def _update(self, H, s, y, sy):
        Hy = H @ y
        yHy = self.ops.dot(y, Hy)
        if yHy <= 0:
            return H
        outer = self.ops.outer
        return H - outer(Hy, Hy) / yHy + outer(s, s) / sy


class Sr1(DenseQuasiNewton):
    """Symmetric rank-one; skipped when the denominator is tiny (Nocedal & Wright 6.26)."""

    name = "sr1"
    accept_failed_decrease = True

    def update_memory(self, state, s, y):
        ops = self.ops
        if state.H is None:
            sy = ops.dot(s, y)
            yy = ops.dot(y, y)
            scale = sy / yy if sy > 0 and yy > 0 else 1.0
            state.H = scale * ops.eye(s)
        u = s - state.H @ y
        denom = ops.dot(u, y)
        if abs(denom) > 1e-8 * ops.norm(y) * ops.norm(u) and math.isfinite(denom):
            state.H = state.H + ops.outer(u, u) / denom


class Lbfgs(LineSearchSolver):
    """Limited-memory BFGS in compact form (Byrd, Nocedal & Schnabel 1994).

    H g = gamma g + [S gamma Y] M [S^T g; gamma Y^T g] with M built from the small m x m
    matrices S^T Y and Y^T Y, kept up to date (in chronological order) as pairs arrive. The
    (2m x n) history is read twice per iteration (W g for the next direction, W^T c for the
    direction itself) where the two-loop recursion reads it four times, and nothing leaves
    the device. s . y comes from the line search's derivatives and s = alpha d, so an
    accepted step costs one pass over W plus writing s and y and one dot (y . y).
    Memory: 2 m n numbers (allocated on the first accepted step) plus a few vectors.
    """

    name = "l-bfgs"
    state_class = LbfgsState
    s_is_step = True  # s = alpha d exactly (False where the step is projected)
    keeps_ss = False  # also keep SS = S S^T (the B form L-BFGS-B needs)

    def __init__(self, *, history_size: int = 10, **kw) -> None:
        super().__init__(**kw)
        self.m = history_size
        self._last_chrono: tuple[Tensor, Tensor] | None = None
        self._d_buf: Tensor | None = None  # the search direction's storage, reused

    def init_state(self, x0, ev):
        m = self.m
        kw = {"dtype": x0.dtype, "device": x0.device}
        return LbfgsState(x=x0, f=ev.f, g=ev.g, W=None, SY=torch.zeros(m, m, **kw),
                          YY=torch.zeros(m, m, **kw), gamma=torch.ones((), **kw), layout=1)

    def reset_memory(self, state):
        state.count, state.newest = 0, -1
        state.coef = None

    def _upgrade(self, state: LbfgsState) -> None:
        """A checkpoint written with SY/YY in slot order: reorder them once."""
        if state.count:
            oldest = (state.newest - state.count + 1) % self.m
            idx = torch.tensor([(oldest + i) % self.m for i in range(state.count)],
                               device=state.SY.device)
            for name in ("SY", "YY"):
                old = getattr(state, name)
                new = torch.zeros_like(old)
                new[: state.count, : state.count] = old[idx][:, idx]
                setattr(state, name, new)
        if self.keeps_ss:
            state.SS = torch.zeros_like(state.SY)
            if state.count:
                S = state.W[:self.m][idx]
                state.SS[: state.count, : state.count] = S @ S.T
        state.coef = None
        state.layout = 1

    # -- slot order <-> chronological order of the 2m-vectors W v --------------------------
    def _oldest(self, state: LbfgsState) -> int:
        return (state.newest - state.count + 1) % self.m

    def _chrono(self, state: LbfgsState, P: Tensor) -> Tensor:
        """(2, count) view/copy of a slot-ordered 2m-vector, oldest pair first."""
        m, k, o = self.m, state.count, self._oldest(state)
        Pv = P.view(2, m)
        if o + k <= m:
            return Pv[:, o : o + k]
        return Pv.roll(-o, 1)[:, :k]

    def _slots(self, state: LbfgsState, C: Tensor) -> Tensor:
        """The 2m-vector (slot order, zero on empty slots) of chronological (2, count) C."""
        m, k, o = self.m, state.count, self._oldest(state)
        if k == m:
            return (C if o == 0 else C.roll(o, 1)).reshape(-1)
        out = C.new_zeros(2, m)
        if o + k <= m:
            out[:, o : o + k] = C
            return out.view(-1)
        out[:, :k] = C
        return out.roll(o, 1).view(-1)

    def _coefficients(self, state: LbfgsState, P: Tensor) -> Tensor:
        """C (2, count), chronological, with H v = gamma v + S^T C[0] + Y^T C[1], from
        P = W v (small k x k work only; solve_triangular reads one triangle of SY)."""
        k = state.count
        pk = self._chrono(state, P)
        self._last_chrono = (P, pk)  # absorb() reuses it for the same P
        SY, YY = (state.SY, state.YY) if k == self.m else (state.SY[:k, :k], state.YY[:k, :k])
        gamma = float(state.gamma)
        cols = pk.mT  # (k, 2): p_s, p_y
        q = torch.linalg.solve_triangular(SY, cols[:, :1], upper=True)
        inner = torch.addmm(SY.diagonal().unsqueeze(1) * q - gamma * cols[:, 1:], YY, q,
                            alpha=gamma)
        top = torch.linalg.solve_triangular(SY.mT, inner, upper=False)
        return torch.cat((top, q * -gamma), 1).mT

    def _rows(self, state: LbfgsState) -> Tensor:
        """The rows of W that hold pairs. While the memory fills after a reset the pairs sit
        in slots 0..count-1: a (2, count, n) view skips the rows not yet written (with W
        allocated uninitialized, they are never read)."""
        m, k = self.m, state.count
        if k < m and state.newest == k - 1:
            return state.W.view(2, m, -1)[:, :k]
        return state.W

    def _times(self, state: LbfgsState, v: Tensor) -> Tensor:
        """W v (2m numbers, slot order, zero on empty slots), reading only the filled rows."""
        rows = self._rows(state)
        if rows is state.W:
            return state.W @ v
        P = v.new_zeros(2 * self.m)
        Pv = P.view(2, self.m)
        # Two matrix-vector products: a batched (2, k, n) @ v would copy the strided view.
        torch.mv(rows[0], v, out=Pv[0, : state.count])
        torch.mv(rows[1], v, out=Pv[1, : state.count])
        return P

    def _combine(self, state: LbfgsState, v: Tensor, C: Tensor, beta, alpha: float,
                 out: Tensor | None = None) -> Tensor:
        """beta v + alpha (S^T C[0] + Y^T C[1]) in one pass over the filled rows of W."""
        rows = self._rows(state)
        # beta v first, then in-place accumulation (beta = 1 inside gemv): addmv with
        # beta != 1 measured ~30% slower at n = 1e6.
        if beta != 0:
            out = torch.mul(v, beta, out=out)
        else:
            out = torch.zeros_like(v) if out is None else out.zero_()
        if rows is state.W:
            return out.addmv_(state.W.T, self._slots(state, C), alpha=alpha)
        return out.addmv_(rows[0].T, C[0], alpha=alpha).addmv_(rows[1].T, C[1], alpha=alpha)

    def apply_inverse(self, state: LbfgsState, v: Tensor) -> Tensor:
        """H v for the compact L-BFGS matrix."""
        if state.layout != 1:
            self._upgrade(state)
        if state.count == 0:
            return v.clone()
        C = self._coefficients(state, self._times(state, v))
        return self._combine(state, v, C, float(state.gamma), 1.0)

    def direction(self, state):
        if state.layout != 1:
            self._upgrade(state)
        if state.count == 0:
            state.coef = None
            return -state.g
        if state.P is None:
            state.P = self._times(state, state.g)
        state.coef = self._coefficients(state, state.P)
        state.dir_gamma = state.gamma
        # d = -(gamma g + W^T coef), negated inside the one pass, written into a buffer the
        # solver reuses: d lives only until absorb() (a fresh n-vector costs page faults,
        # ~0.6 ms at n = 1e6).
        g = state.g
        buf = self._d_buf
        if buf is None or buf.shape != g.shape or buf.dtype != g.dtype or buf.device != g.device:
            buf = self._d_buf = torch.empty_like(g)
        return self._combine(state, g, state.coef, -float(state.gamma), -1.0, out=buf)
        yield  # pragma: no cover

    def absorb(self, state, x_new, g_new, alpha, d, sy=None):
        m, k = self.m, state.count
        if state.layout != 1:
            self._upgrade(state)
        if state.W is None:
            state.W = torch.empty(2 * m, x_new.numel(), dtype=x_new.dtype, device=x_new.device)
        W, P_old, C = state.W, state.P, state.coef
        state.coef = None
        if k and P_old is None:
            P_old = self._times(state, state.g)
        slot = (state.newest + 1) % m
        s_row, y_row = W[slot], W[m + slot]
        if k and (C is None or self.keeps_ss):
            # W s over the old pairs before s_row is overwritten (the oldest pair's slot).
            w_dot_s = self._chrono(state, self._times(state, x_new - state.x))
            y_dot_s = w_dot_s[1]
        if self.s_is_step:
            torch.mul(d, alpha, out=s_row)
        else:
            torch.sub(x_new, state.x, out=s_row)
        torch.sub(g_new, state.g, out=y_row)
        if sy is None or not math.isfinite(sy):
            sy = float(torch.dot(s_row, y_row))
        yy = float(torch.dot(y_row, y_row))
        ss = float(torch.dot(s_row, s_row)) if self.keeps_ss else 0.0
        # Skip pairs without enough positive curvature (keeps H positive definite); the slot
        # written was free or the oldest pair's, which is then dropped.
        if not sy > 2.2e-16 * yy:
            if k == m:
                state.count -= 1
                state.SY = state.SY.roll((-1, -1), (0, 1))
                state.YY = state.YY.roll((-1, -1), (0, 1))
                if self.keeps_ss:
                    state.SS = state.SS.roll((-1, -1), (0, 1))
            state.P = self._times(state, g_new) if state.count else None
            if state.count and k == m:
                state.P[slot] = 0.0
                state.P[m + slot] = 0.0
            return
        last = self._last_chrono
        self._last_chrono = None
        if not k:
            pc_old = None
        elif last is not None and last[0] is P_old:
            pc_old = last[1]
        else:
            pc_old = self._chrono(state, P_old)
        if k and C is not None and not self.keeps_ss:
            # Y s from the small matrices: d = -(dir_gamma g + S^T C[0] + Y^T C[1]), so
            # Y d = -(dir_gamma Y g + (Y S^T) C[0] + (Y Y^T) C[1]); no pass over W.
            SY, YY = (state.SY, state.YY) if k == m else (state.SY[:k, :k], state.YY[:k, :k])
            y_dot_s = torch.addmv(torch.addmv(pc_old[1], SY.mT, C[0], beta=float(state.dir_gamma)),
                                  YY, C[1], alpha=-alpha, beta=-alpha)
        state.newest = slot
        state.count = min(k + 1, m)
        P_new = self._times(state, g_new)  # the new pair's row included
        state.P = P_new
        j = state.count - 1  # chronological index of the new pair
        if k == m:
            # The oldest pair leaves: shift both matrices up-left (the last row and column
            # wrap around and are overwritten below).
            state.SY = state.SY.roll((-1, -1), (0, 1))
            state.YY = state.YY.roll((-1, -1), (0, 1))
            if self.keeps_ss:
                state.SS = state.SS.roll((-1, -1), (0, 1))
        SY, YY = state.SY, state.YY
        if k:
            # Products with the new y: (W_old g_new) - (W_old g_old) on the pairs that stay.
            w_dot_y = self._chrono(state, P_new)[:, :j] - (pc_old[:, 1:] if k == m else pc_old)
            SY[j, :j] = y_dot_s[1:] if k == m else y_dot_s
            SY[:j, j] = w_dot_y[0]
            YY[j, :j] = w_dot_y[1]
            YY[:j, j] = w_dot_y[1]
        SY[j, j] = sy
        YY[j, j] = yy
        if self.keeps_ss:
            SS = state.SS
            if k:
                s_old = w_dot_s[0, 1:] if k == m else w_dot_s[0]
                SS[j, :j] = s_old
                SS[:j, j] = s_old
            SS[j, j] = ss
        state.gamma = torch.tensor(sy / yy, dtype=SY.dtype, device=SY.device)


class LbfgsB(Lbfgs):
    """Box bounds as L-BFGS-B (Byrd, Lu, Nocedal & Zhu 1995; Morales & Nocedal 2011).

    Each iteration: the generalized Cauchy point along the projected gradient path on the
    compact model B = theta I - W M W^T (W = [Y, theta S]), vectorized (breakpoints by one
    sort, the segment derivatives by cumulative sums over chunks of breakpoints); then the
    direct primal subspace minimization over the variables still free there (Sherman-
    Morrison-Woodbury on the 2k x 2k matrices), projected onto the box; then a More-Thuente
    search (or Armijo backtracking) along the feasible segment, capped at the step to the
    boundary (scipy's lnsrlb / dcsrch with stpmax). Pure tensor operations; the host sees one
    number per chunk of breakpoints. Memory as l-bfgs plus the m x m matrix S^T S.
    """

    name = "l-bfgs-b"
    default_line_search = "strong-wolfe"
    s_is_step = False
    keeps_ss = True
    chunk = 256  # breakpoints examined per vectorized pass of the Cauchy search

    def __init__(self, *, lower: Tensor, upper: Tensor, **kw) -> None:
        if kw.get("c1") is None:
            kw["c1"] = 1e-3  # lnsrlb's ftol
        super().__init__(**kw)
        if isinstance(self.step_rule, StrongWolfe):
            # lnsrlb's dcsrch settings: ftol 1e-3, gtol 0.9, xtol 0.1, warnings accepted
            self.step_rule = StrongWolfe(c1=self.step_rule.c1, c2=self.step_rule.c2, xtol=0.1,
                                         accept_at_warning=True)
        self.lower, self.upper = lower, upper
        self.boxed = bool(torch.isfinite(lower).all() and torch.isfinite(upper).all())
        self.constrained = bool(torch.isfinite(lower).any() or torch.isfinite(upper).any())

    def project(self, x: Tensor) -> Tensor:
        return torch.minimum(torch.maximum(x, self.lower), self.upper)

    def first_request(self, x0):
        return EvalRequest(self.project(x0), need_f=True, need_g=True)

    def init_state(self, x0, ev):
        state = super().init_state(self.project(x0), ev)
        state.SS = torch.zeros_like(state.SY)
        return state

    def grad_norm(self, state):
        return _norm_inf(self.project(state.x - state.g) - state.x)

    # -- the compact model ---------------------------------------------------------------
    def _wt(self, state: LbfgsState, v: Tensor, theta: float) -> Tensor:
        """W^T v = [Y v; theta S v] (2k, chronological)."""
        a = self._chrono(state, self._times(state, v))
        return torch.cat((a[1], a[0] * theta))

    def _w(self, state: LbfgsState, c: Tensor, theta: float) -> Tensor:
        """W c = Y^T c_y + theta S^T c_s (an n-vector)."""
        k = state.count
        C = torch.stack((c[k:] * theta, c[:k]))
        return self._combine(state, state.x, C, 0.0, 1.0)

    def _middle(self, state: LbfgsState, theta: float):
        """M = [[-D, L^T], [L, theta S^T S]]^{-1} (2k x 2k) in factored form, as lbfgsb.f's
        formt: (D^-1, L, J) with J J^T = theta S^T S + L D^-1 L^T (Cholesky). None when
        that matrix is not positive definite (the memory is then dropped)."""
        k = state.count
        SY = state.SY[:k, :k]
        L = torch.tril(SY, -1)
        d_inv = 1.0 / SY.diagonal()
        T = theta * state.SS[:k, :k] + (L * d_inv) @ L.T
        J, info = torch.linalg.cholesky_ex(T)
        if int(info) != 0:
            return None
        return d_inv, L, J

    @staticmethod
    def _apply_m(fac, V: Tensor) -> Tensor:
        """M V for a (2k,) vector or (2k, c) matrix V, by two triangular solves (bmv)."""
        d_inv, L, J = fac
        k = d_inv.numel()
        vec = V.ndim == 1
        if vec:
            V = V.unsqueeze(1)
        v1, v2 = V[:k], V[k:]
        rhs = v2 + L @ (d_inv.unsqueeze(1) * v1)
        w2 = torch.cholesky_solve(rhs, J)
        w1 = d_inv.unsqueeze(1) * (L.T @ w2 - v1)
        out = torch.cat((w1, w2), 0)
        return out.squeeze(1) if vec else out

    def _gram(self, state: LbfgsState, cols: Tensor, theta: float) -> Tensor:
        """(W^T W) restricted to the coordinates `cols` (2k x 2k), in [Y, theta S] order."""
        a = self._chrono_rows(state, cols)  # (2, k, |cols|): S and Y columns
        blocks = torch.cat((a[1], a[0] * theta), 0)
        return blocks @ blocks.T

    def _chrono_rows(self, state: LbfgsState, cols: Tensor) -> Tensor:
        m, k = self.m, state.count
        o = self._oldest(state)
        slots = torch.tensor([(o + i) % m for i in range(k)], device=cols.device)
        sub = state.W.index_select(1, cols).view(2, m, -1)
        return sub.index_select(1, slots)

    def _cauchy(self, state: LbfgsState, theta: float, M: Tensor | None):
        """The generalized Cauchy point: (x_cp, c = W^T (x_cp - x), t of every coordinate's
        breakpoint, the path parameter t_cp)."""
        x, g, lo, hi = state.x, state.g, self.lower, self.upper
        inf = torch.full_like(x, math.inf)
        t = torch.where(g < 0, (x - hi) / g, torch.where(g > 0, (x - lo) / g, inf))
        t = torch.nan_to_num(t, nan=math.inf).clamp_(min=0.0)  # inf bounds: never hit
        d = torch.where(t > 0, -g, torch.zeros_like(g))
        k = state.count
        p = self._wt(state, d, theta) if k else d.new_zeros(0)
        c = torch.zeros_like(p)
        dd = float(torch.dot(d, d))
        if dd == 0.0:
            return x, c, t, 0.0
        idx = torch.nonzero((t > 0) & torch.isfinite(t)).squeeze(1)
        ts, order = torch.sort(t[idx])
        b = idx[order]
        f2_org = None
        start = 0.0
        for lo_i in range(0, b.numel() + 1, self.chunk):
            bc, tc = b[lo_i : lo_i + self.chunk], ts[lo_i : lo_i + self.chunk]
            gb = g[bc]
            # Carry (segment before this chunk's first breakpoint) + after each breakpoint.
            if k:
                wb = self._chrono_rows(state, bc)
                v = torch.cat((wb[1], wb[0] * theta), 0) * gb  # (2k, c): g_b w_b
                P = torch.cat((p.unsqueeze(1), p.unsqueeze(1) + v.cumsum(1)), 1)
                C = torch.cat((c.unsqueeze(1), c.unsqueeze(1) - (v * tc).cumsum(1)), 1)
            D2 = torch.cat((d.new_full((1,), dd), dd - (gb * gb).cumsum(0)))
            if k:
                MP = self._apply_m(M, P)
                f2 = theta * D2 - (P * MP).sum(0)
                f1 = -D2 - (C * MP).sum(0)  # derivative at t = 0 of each segment's model
            else:
                f2 = theta * D2
                f1 = -D2
            if f2_org is None:
                f2_org = max(float(f2[0]), 1e-300)
            f2 = torch.clamp(f2, min=2.2e-16 * f2_org)
            tstar = -f1 / f2
            # Segment i runs from breakpoint i-1 (or `start`) to breakpoint i; the chunk's
            # last segment belongs to the next chunk unless this is the last one.
            starts = torch.cat((tc.new_full((1,), start), tc))
            ends = torch.cat((tc, tc.new_full((1,), math.inf)))
            D2s = D2
            if lo_i + self.chunk < b.numel():
                starts, ends, tstar, D2s = starts[:-1], ends[:-1], tstar[:-1], D2[:-1]
            stop = (tstar < ends) | (D2s <= 0)
            hit = torch.nonzero(stop)
            if hit.numel():
                j = int(hit[0])
                t_cp = max(float(starts[j]), float(tstar[j])) if float(D2s[j]) > 0 else float(
                    starts[j])
                if k:
                    c = C[:, j] + t_cp * P[:, j]
                break
            # carry on from after this chunk's last breakpoint
            start = float(tc[-1])
            if k:
                p, c = P[:, -1], C[:, -1]
            dd = float(D2[-1])
        else:  # pragma: no cover - the last chunk always stops
            t_cp = start
        hit_bound = torch.where(g < 0, hi, lo)
        x_cp = torch.where(t <= t_cp, hit_bound, x - t_cp * g)
        x_cp = torch.where(t == 0, x, x_cp)
        return x_cp, c, t, t_cp

    def _subspace(self, state: LbfgsState, theta: float, M, x_cp, c, t, t_cp) -> Tensor:
        """Minimizes the model over the variables free at the Cauchy point; returns x_bar."""
        x, g = state.x, state.g
        free = t > t_cp
        n_free = int(free.sum())
        if n_free == 0:
            return x_cp
        k = state.count
        grad_cp = g + theta * (x_cp - x)
        if k:
            grad_cp = grad_cp - self._w(state, self._apply_m(M, c), theta)
        r = torch.where(free, -grad_cp, torch.zeros_like(g))
        du = r / theta
        if k:
            n = x.numel()
            if n_free == n:
                G = self._full_gram(state, theta)
            elif n_free <= n - n_free:
                G = self._gram(state, torch.nonzero(free).squeeze(1), theta)
            else:
                G = self._full_gram(state, theta) - self._gram(
                    state, torch.nonzero(~free).squeeze(1), theta)
            K = torch.eye(2 * k, dtype=g.dtype, device=g.device) - self._apply_m(M, G) / theta
            v = torch.linalg.solve(K, self._apply_m(M, self._wt(state, r, theta)))
            du = du + torch.where(free, self._w(state, v, theta), torch.zeros_like(g)) / (
                theta * theta)
        x_bar = self.project(x_cp + du)
        if float(torch.dot(x_bar - x, g)) > 0:
            # Not a descent direction after projection (Morales & Nocedal 2011): go back to
            # the longest feasible fraction of the unprojected step.
            lo, hi = self.lower - x_cp, self.upper - x_cp
            ratio = torch.where(du > 0, hi / du, torch.where(du < 0, lo / du,
                                                            torch.full_like(du, math.inf)))
            alpha = min(1.0, float(ratio.min())) if ratio.numel() else 1.0
            x_bar = self.project(x_cp + max(alpha, 0.0) * du)
        return x_bar

    def _full_gram(self, state: LbfgsState, theta: float) -> Tensor:
        k = state.count
        YS = state.SY[:k, :k].T
        return torch.cat((
            torch.cat((state.YY[:k, :k], theta * YS), 1),
            torch.cat((theta * YS.T, theta * theta * state.SS[:k, :k]), 1),
        ), 0)

    def _max_step(self, state: LbfgsState, d: Tensor) -> float:
        if not self.constrained:
            return 1e10
        if state.nit == 0:
            return 1.0
        x = state.x
        ratio = torch.where(d > 0, (self.upper - x) / d, torch.where(
            d < 0, (self.lower - x) / d, torch.full_like(d, math.inf)))
        return max(0.0, min(1e10, float(ratio.min())))

    def direction(self, state):
        if state.layout != 1:
            self._upgrade(state)
        if state.SS is None:
            state.SS = torch.zeros_like(state.SY)
        if not self.constrained:
            # No finite bound: the Cauchy point and the subspace step compose to x - H g
            # exactly (in exact arithmetic), so take l-bfgs's two-product direction.
            d = yield from super().direction(state)
            return d
        state.coef = None
        theta = 1.0 / float(state.gamma) if state.count else 1.0
        M = self._middle(state, theta) if state.count else None
        if M is None and state.count:
            self.reset_memory(state)
            theta = 1.0
        x_cp, c, t, t_cp = self._cauchy(state, theta, M)
        x_bar = self._subspace(state, theta, M, x_cp, c, t, t_cp)
        return x_bar - state.x
        yield  # pragma: no cover

    def step(self, state):
        d = yield from self.direction(state)
        derphi0 = float(torch.dot(state.g, d))
        if not (math.isfinite(derphi0) and derphi0 < 0) and state.count:
            self.reset_memory(state)
            d = yield from self.direction(state)
            derphi0 = float(torch.dot(state.g, d))
        if not (math.isfinite(derphi0) and derphi0 < 0):
            raise SolveStopped(Status.LINE_SEARCH_FAILED)
        result, ev, x_new = yield from self._search(state, d, derphi0)
        if not self._acceptable(result, state, derphi0) and state.count:
            self.reset_memory(state)  # scipy: forget the memory and restart the iteration
            d = yield from self.direction(state)
            derphi0 = float(torch.dot(state.g, d))
            if math.isfinite(derphi0) and derphi0 < 0:
                result, ev, x_new = yield from self._search(state, d, derphi0)
        yield from self._finish_search(result, state, derphi0, ev, x_new)
        self._accept(state, x_new, ev.f, ev.g, result.alpha, d, derphi0)

    def _search(self, state, d, derphi0, fresh=False):
        """lnsrlb: a search along x + a d, a <= the step to the boundary."""
        stpmx = self._max_step(state, d)
        if stpmx <= 0:
            return LineSearchResult(0.0, math.nan, None, False, False), Evaluation(), state.x
        if state.nit == 0 and not self.boxed:
            alpha0 = min(1.0 / max(float(torch.linalg.vector_norm(d)), 1e-300), stpmx)
        else:
            alpha0 = min(1.0, stpmx)
        rule = self.step_rule
        if isinstance(rule, StrongWolfe):
            search = rule.search(float(state.f), derphi0, alpha0, alpha_max=stpmx)
        else:
            search = rule.search(float(state.f), derphi0, alpha0)
        alpha = next(search)
        trials: dict[float, tuple[Evaluation, Tensor]] = {}
        while True:
            x_trial = self.project(torch.add(state.x, d, alpha=alpha))
            ev = yield EvalRequest(x_trial, need_f=True, need_g=rule.needs_gradient)
            phi = float(ev.f)
            der = float(torch.dot(ev.g, d)) if ev.g is not None else None
            trials[alpha] = (ev, x_trial)
            try:
                alpha = search.send((phi if math.isfinite(phi) else math.nan, der))
            except StopIteration as stop:
                result: LineSearchResult = stop.value
                break
        if result.alpha in trials and math.isfinite(result.phi):
            ev, x_trial = trials[result.alpha]
            if _norm_inf(x_trial - state.x) > 0:
                return result, ev, x_trial
        return LineSearchResult(0.0, math.nan, None, False, result.saw_nonfinite), \
            Evaluation(), state.x


class GaussNewton(LineSearchSolver):
    """Gauss-Newton on r(x): the step solves min |J p + r| (least squares), then Armijo."""

    name = "gauss-newton"
    state_class = LeastSquaresState
    default_line_search = "armijo"

    def first_request(self, x0):
        return EvalRequest(x0, need_jac=True)

    def init_state(self, x0, ev):
        return LeastSquaresState(x=x0, f=ev.f, g=ev.g, r=ev.r, J=ev.jac)

    def direction(self, state):
        # gelsd (SVD) is deterministic and handles rank deficiency; CUDA offers only gels.
        driver = "gelsd" if state.J.device.type == "cpu" else "gels"
        return torch.linalg.lstsq(state.J, -state.r.unsqueeze(1), driver=driver).solution.squeeze(1)
        yield  # pragma: no cover

    def initial_step(self, state, d, derphi0):
        return 1.0

    def step(self, state):
        yield from super().step(state)
        ev = yield EvalRequest(state.x, need_jac=True)
        if not ev.is_finite():
            raise SolveStopped(Status.NON_FINITE)
        state.r, state.J, state.g = ev.r, ev.jac, ev.g


class LevenbergMarquardt:
    """Levenberg-Marquardt with Nielsen's damping update and More's diagonal scaling.

    Solves (J^T J + lambda D) p = -J^T r; accepts when the actual reduction is positive.
    """

    name = "lm"
    state_class = LeastSquaresState
    needs_hessian = False
    ops = TORCH

    def __init__(self, *, initial_damping: float = 1e-3, max_rejections: int = 40) -> None:
        self.initial_damping = initial_damping
        self.max_rejections = max_rejections

    def first_request(self, x0):
        return EvalRequest(x0, need_jac=True)

    def init_state(self, x0, ev):
        scale = torch.clamp((ev.jac * ev.jac).sum(0), min=1e-12)
        return LeastSquaresState(x=x0, f=ev.f, g=ev.g, r=ev.r, J=ev.jac, scale=scale,
                                 damping=self.initial_damping)

    def grad_norm(self, state):
        return _norm_inf(state.g)

    def hess_inv(self, state):
        return None

    def step(self, state):
        J, g = state.J, state.g
        JtJ = J.T @ J
        # The scaling only grows: a column whose Jacobian fades keeps its old weight, so
        # the damping still restrains it (More 1978; MINPACK's mode 1).
        state.scale = torch.maximum(state.scale, JtJ.diagonal())
        scale = state.scale
        rejections = 0
        saw_nonfinite = False
        while rejections < self.max_rejections:
            A = JtJ + state.damping * torch.diag(scale)
            L, info = torch.linalg.cholesky_ex(A)
            if int(info) != 0:
                state.damping *= state.damping_growth
                state.damping_growth *= 2.0
                rejections += 1
                continue
            p = -torch.cholesky_solve(g.unsqueeze(1), L).squeeze(1)
            predicted = -(float(torch.dot(g, p)) + 0.5 * float(torch.dot(p, JtJ @ p)))
            x_new = state.x + p
            ev = yield EvalRequest(x_new, need_jac=True)
            f_new = float(ev.f)
            f_old = float(state.f)
            # Below f's rounding the actual reduction is noise: accept a step the model says
            # changes f by less than that and that does not raise f beyond it, so the
            # gradient test can still be met (a few times only; then it is precision loss).
            noise = 8.0 * torch.finfo(state.x.dtype).eps * max(abs(f_old), 1e-300)
            at_noise_floor = (predicted <= noise and f_new <= f_old + noise
                              and state.noise_steps < 5)
            if ev.is_finite() and (predicted > 0 or at_noise_floor):
                ratio = (f_old - f_new) / predicted if predicted > 0 else 0.0
                if ratio > 0 or at_noise_floor:
                    state.noise_steps = state.noise_steps + 1 if ratio <= 0 or (
                        predicted <= noise) else 0
                    state.damping *= max(1.0 / 3.0, 1.0 - (2.0 * ratio - 1.0) ** 3)
                    state.damping_growth = 2.0
                    state.f_prev = float(state.f)
                    state.step_norm = _norm_inf(p)
                    state.x, state.f, state.g, state.r, state.J = x_new, ev.f, ev.g, ev.r, ev.jac
                    state.step_size = 1.0
                    state.nit += 1
                    return
            elif not ev.is_finite():
                saw_nonfinite = True
            elif predicted <= 0:
                # The model predicts no decrease: we are at a stationary point of the model.
                raise SolveStopped(Status.LINE_SEARCH_FAILED)
            state.damping *= state.damping_growth
            state.damping_growth *= 2.0
            rejections += 1
        raise SolveStopped(Status.NON_FINITE if saw_nonfinite else Status.LINE_SEARCH_FAILED)


@dataclass(frozen=True)
class MethodInfo:
    name: str
    least_squares: bool = False
    dense: bool = False  # keeps an n x n matrix
    bounds: bool = False
    aliases: tuple[str, ...] = field(default=())


METHODS: dict[str, MethodInfo] = {
    info.name: info
    for info in (
        MethodInfo("gd", aliases=("gradient-descent", "steepest-descent", "sd")),
        MethodInfo("newton", dense=True, aliases=("newton-exact",)),
        MethodInfo("newton-cg", aliases=("ncg", "newtoncg", "truncated-newton")),
        MethodInfo("bfgs", dense=True),
        MethodInfo("sr1", dense=True),
        MethodInfo("dfp", dense=True),
        MethodInfo("l-bfgs", aliases=("lbfgs",)),
        MethodInfo("l-bfgs-b", bounds=True, aliases=("lbfgsb", "lbfgs-b")),
        MethodInfo("gauss-newton", least_squares=True, aliases=("gn", "gaussnewton")),
        MethodInfo("lm", least_squares=True, aliases=("levenberg-marquardt",)),
    )
}
_ALIAS_TO_NAME = {alias: info.name for info in METHODS.values() for alias in info.aliases}


def canonical_method(method: str) -> MethodInfo:
    """Case-insensitive lookup accepting scipy spellings; ValueError for unknown names."""
    if not isinstance(method, str) or not method.strip():
        raise ValueError("method is required, one of: " + ", ".join(METHODS))
    key = method.strip().lower().replace("_", "-")
    key = _ALIAS_TO_NAME.get(key, key)
    if key not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    return METHODS[key]


_CLASSES = {
    "gd": GradientDescent,
    "newton": Newton,
    "newton-cg": NewtonCG,
    "bfgs": Bfgs,
    "sr1": Sr1,
    "dfp": Dfp,
    "l-bfgs": Lbfgs,
    "l-bfgs-b": LbfgsB,
    "gauss-newton": GaussNewton,
    "lm": LevenbergMarquardt,
}


def build_solver(info: MethodInfo, options, lower: Tensor | None, upper: Tensor | None):
    cls = _CLASSES[info.name]
    if cls is LevenbergMarquardt:
        return LevenbergMarquardt(initial_damping=options.initial_damping)
    kw = {"line_search": options.line_search, "c1": options.c1, "c2": options.c2}
    if cls is NewtonCG:
        kw["cg_max_iter"] = options.cg_max_iter
    if cls in (Lbfgs, LbfgsB):
        kw["history_size"] = options.history_size
    if cls is LbfgsB:
        kw["lower"], kw["upper"] = lower, upper
    return cls(**kw)
