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
    """History in one (2m x n) buffer: rows [0, m) hold s, rows [m, 2m) hold y."""

    W: Tensor | None = None
    SY: Tensor | None = None  # SY[i, j] = s_i . y_j, slot order
    YY: Tensor | None = None
    gamma: Tensor | None = None
    count: int = 0  # pairs stored (<= m)
    newest: int = -1  # slot of the newest pair
    P: Tensor | None = None  # W @ g for the current W and g, when known
    coef: Tensor | None = None  # the last direction was d = -(dir_gamma g + W^T coef)
    dir_gamma: Tensor | None = None


@dataclass
class LeastSquaresState(SolveState):
    r: Tensor | None = None
    J: Tensor | None = None
    scale: Tensor | None = None  # LM: running max of diag(J^T J) (MINPACK's scaling)
    damping: float = 0.0
    damping_growth: float = 2.0


def _norm_inf(t: Tensor) -> float:
    # One pass and no temporary (abs().max() writes an n-vector first).
    if not t.numel():
        return 0.0
    low, high = torch.aminmax(t)
    return max(-float(low), float(high))


class LineSearchSolver:
    """Direction + step rule. Subclasses give the direction and the memory update."""

    name = ""
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
               d: Tensor) -> None:
        """Update curvature memory with the accepted step (before state moves to x_new)."""

    def initial_step(self, state: SolveState, d: Tensor, derphi0: float) -> float:
        if state.nit == 0:
            return min(1.0, 1.01 / max(float(torch.linalg.vector_norm(state.g)), 1e-300))
        return 1.0

    def hess_inv(self, state: SolveState) -> Tensor | None:
        return None

    def grad_norm(self, state: SolveState) -> float:
        return _norm_inf(state.g)

    # -- one iteration -------------------------------------------------------------------
    def step(self, state: SolveState) -> Steps:
        d = yield from self.direction(state)
        derphi0 = float(torch.dot(state.g, d))
        steepest = False
        if not (math.isfinite(derphi0) and derphi0 < 0):
            self.reset_memory(state)
            d, derphi0, steepest = -state.g, -float(torch.dot(state.g, state.g)), True
        result, ev, x_new = yield from self._search(state, d, derphi0)
        if not self._acceptable(result, state, derphi0) and not steepest:
            self.reset_memory(state)
            d, derphi0 = -state.g, -float(torch.dot(state.g, state.g))
            result, ev, x_new = yield from self._search(state, d, derphi0, fresh=True)
        if not self._acceptable(result, state, derphi0):
            status = Status.NON_FINITE if result.saw_nonfinite else Status.LINE_SEARCH_FAILED
            raise SolveStopped(status)
        if ev.g is None:
            ev_g = yield EvalRequest(x_new, need_f=False, need_g=True)
            ev.g = ev_g.g
            if not ev_g.is_finite():
                raise SolveStopped(Status.NON_FINITE)
        self._accept(state, x_new, ev.f, ev.g, result.alpha, d, derphi0)

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

    def _accept(self, state, x_new, f_new, g_new, alpha, d, derphi0) -> None:
        self.absorb(state, x_new, g_new, alpha, d)
        state.f_prev = float(state.f)
        if self.track_step_norm:
            state.step_norm = _norm_inf(x_new - state.x)
        state.x, state.f, state.g = x_new, f_new, g_new
        state.step_size = alpha
        state.derphi_prev = derphi0
        state.nit += 1

    def _search(self, state: SolveState, d: Tensor, derphi0: float, fresh: bool = False):
        """Runs the step rule along d; returns (result, evaluation at its step, the point)."""
        alpha0 = self.initial_step(state, d, derphi0) if not fresh else min(
            1.0, 1.0 / max(_norm_inf(d), 1e-300)
        )
        rule = self.step_rule
        phi0 = float(state.f)
        search = rule.search(phi0, derphi0, alpha0)
        alpha = next(search)
        # The search returns its last trial, the lowest f, or the lowest f - c1 a derphi0
        # (More-Thuente's best step): keep those three evaluations, not every trial.
        kept: dict[str, tuple[float, float, Evaluation, Tensor]] = {}
        c1 = rule.c1
        while True:
            x_trial = torch.add(state.x, d, alpha=alpha)
            ev = yield EvalRequest(x_trial, need_f=True, need_g=rule.needs_gradient)
            phi = float(ev.f)
            der = float(torch.dot(ev.g, d)) if ev.g is not None else None
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
            x_trial = torch.add(state.x, d, alpha=result.alpha)
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
        return torch.eye(state.x.numel(), dtype=state.x.dtype, device=state.x.device)

    def absorb(self, state, x_new, g_new, alpha, d):
        self.update_memory(state, x_new - state.x, g_new - state.g)

    # H0 = I, as scipy's BFGS. Nocedal & Wright's (6.20) scaling of H0 before the first
    # update measured worse on the standard set for BFGS (more evaluations) and for DFP
    # (16 solved against 28).
    scale_initial = False

    def update_memory(self, state, s, y):
        sy = float(torch.dot(s, y))
        if not (math.isfinite(sy) and sy > 1e-10 * float(torch.linalg.vector_norm(s))
                * float(torch.linalg.vector_norm(y))):
            return
        if state.H is None:
            # Nocedal & Wright (6.20): scale the first approximation before updating it.
            scale = sy / float(torch.dot(y, y)) if self.scale_initial else 1.0
            state.H = scale * torch.eye(s.numel(), dtype=s.dtype, device=s.device)
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
        yHy = float(torch.dot(y, Hy))
        # (I - rho s y^T) H (I - rho y s^T) + rho s s^T, expanded to rank-2 terms.
        return (H - rho * (torch.outer(s, Hy) + torch.outer(Hy, s))
                + (rho * rho * yHy + rho) * torch.outer(s, s))


class Dfp(DenseQuasiNewton):
    name = "dfp"
    accept_failed_decrease = True

    def _update(self, H, s, y, sy):
        Hy = H @ y
        yHy = float(torch.dot(y, Hy))
        if yHy <= 0:
            return H
        return H - torch.outer(Hy, Hy) / yHy + torch.outer(s, s) / sy


class Sr1(DenseQuasiNewton):
    """Symmetric rank-one; skipped when the denominator is tiny (Nocedal & Wright 6.26)."""

    name = "sr1"
    accept_failed_decrease = True

    def update_memory(self, state, s, y):
        if state.H is None:
            sy = float(torch.dot(s, y))
            yy = float(torch.dot(y, y))
            scale = sy / yy if sy > 0 and yy > 0 else 1.0
            state.H = scale * torch.eye(s.numel(), dtype=s.dtype, device=s.device)
        u = s - state.H @ y
        denom = float(torch.dot(u, y))
        if abs(denom) > 1e-8 * float(torch.linalg.vector_norm(y)) * float(
            torch.linalg.vector_norm(u)
        ) and math.isfinite(denom):
            state.H = state.H + torch.outer(u, u) / denom


class Lbfgs(LineSearchSolver):
    """Limited-memory BFGS in compact form (Byrd, Nocedal & Schnabel 1994).

    H g = gamma g + [S gamma Y] M [S^T g; gamma Y^T g] with M built from the small m x m
    matrices S^T Y and Y^T Y, kept up to date as pairs arrive. The (2m x n) history is read
    twice per iteration (W g for the next direction, W^T c for the direction itself) where
    the two-loop recursion reads it four times, and nothing leaves the device.
    Memory: 2 m n numbers plus a few vectors.
    """

    name = "l-bfgs"
    state_class = LbfgsState

    def __init__(self, *, history_size: int = 10, **kw) -> None:
        super().__init__(**kw)
        self.m = history_size

    def init_state(self, x0, ev):
        n, m = x0.numel(), self.m
        kw = {"dtype": x0.dtype, "device": x0.device}
        return LbfgsState(x=x0, f=ev.f, g=ev.g, W=torch.zeros(2 * m, n, **kw),
                          SY=torch.zeros(m, m, **kw), YY=torch.zeros(m, m, **kw),
                          gamma=torch.ones((), **kw))

    def reset_memory(self, state):
        state.count, state.newest = 0, -1
        state.coef = None

    def _order(self, state: LbfgsState) -> Tensor:
        oldest = (state.newest - state.count + 1) % self.m
        idx = [(oldest + i) % self.m for i in range(state.count)]
        return torch.tensor(idx, device=state.x.device)

    def _coefficients(self, state: LbfgsState, P: Tensor) -> Tensor:
        """c with H v = gamma v + W^T c, from P = W v (small m x m work only)."""
        m = self.m
        coef = torch.zeros(2 * m, dtype=P.dtype, device=P.device)
        if state.count == 0:
            return coef
        order = self._order(state)
        p_s, p_y = P[:m][order], P[m:][order]
        SY = state.SY[order][:, order]
        YY = state.YY[order][:, order]
        # A mask, not torch.triu: triu always enters a parallel region, costly on tiny inputs.
        k = torch.arange(state.count, device=P.device)
        R = SY * (k.unsqueeze(1) <= k.unsqueeze(0))
        gamma = state.gamma
        q = torch.linalg.solve_triangular(R, p_s.unsqueeze(1), upper=True).squeeze(1)
        inner = torch.diagonal(SY) * q + gamma * (YY @ q) - gamma * p_y
        top = torch.linalg.solve_triangular(R.T, inner.unsqueeze(1), upper=False).squeeze(1)
        coef[order] = top
        coef[m + order] = -gamma * q
        return coef

    def _rows(self, state: LbfgsState) -> Tensor:
        """The rows of W that hold pairs. While the memory fills after a reset the pairs sit
        in slots 0..count-1: a (2, count, n) view skips the rows not yet written."""
        m, k = self.m, state.count
        if k < m and state.newest == k - 1:
            return state.W.view(2, m, -1)[:, :k]
        return state.W

    def _times(self, state: LbfgsState, v: Tensor) -> Tensor:
        """W v (2m numbers, zero on empty slots), reading only the filled rows."""
        rows = self._rows(state)
        if rows is state.W:
            return state.W @ v
        P = torch.zeros(2 * self.m, dtype=v.dtype, device=v.device)
        P.view(2, self.m)[:, : state.count] = rows @ v
        return P

    def _combine(self, state: LbfgsState, v: Tensor, coef: Tensor, beta, alpha: float) -> Tensor:
        """beta v + alpha W^T coef in one pass over the filled rows of W."""
        rows = self._rows(state)
        if rows is state.W:
            return torch.addmv(v, state.W.T, coef, beta=beta, alpha=alpha)
        k, m = state.count, self.m
        flat = rows.reshape(2 * k, -1) if rows.is_contiguous() else None
        c = coef.view(2, m)[:, :k]
        if flat is not None:
            return torch.addmv(v, flat.T, c.reshape(-1), beta=beta, alpha=alpha)
        out = torch.addmv(v, rows[0].T, c[0], beta=beta, alpha=alpha)
        return torch.addmv(out, rows[1].T, c[1], alpha=alpha)

    def apply_inverse(self, state: LbfgsState, v: Tensor) -> Tensor:
        """H v for the compact L-BFGS matrix."""
        if state.count == 0:
            return v.clone()
        coef = self._coefficients(state, self._times(state, v))
        return self._combine(state, v, coef, state.gamma, 1.0)

    def direction(self, state):
        if state.P is None:
            state.P = self._times(state, state.g)
        if state.count == 0:
            state.coef = torch.zeros_like(state.P)
            state.dir_gamma = torch.ones_like(state.gamma)
            return -state.g
        state.coef = self._coefficients(state, state.P)
        state.dir_gamma = state.gamma
        # d = -(gamma g + W^T coef), negated inside the one pass.
        return self._combine(state, state.g, state.coef, -state.gamma, -1.0)
        yield  # pragma: no cover

    def absorb(self, state, x_new, g_new, alpha, d):
        m = self.m
        W, P_old = state.W, state.P
        known_direction = state.coef is not None and P_old is not None
        if known_direction:
            # Y s from the small matrices: d = -(dir_gamma g + W^T coef), so
            # Y d = -(dir_gamma Y g + (Y S^T) coef_S + (Y Y^T) coef_Y); no pass over W.
            y_dot_s = -alpha * (state.dir_gamma * P_old[m:] + state.SY.T @ state.coef[:m]
                                + state.YY @ state.coef[m:])
        else:
            y_dot_s = self._times(state, x_new - state.x)[m:]
            P_old = self._times(state, state.g)
        state.coef = None
        slot = (state.newest + 1) % m
        s_row, y_row = W[slot], W[m + slot]
        torch.sub(x_new, state.x, out=s_row)
        torch.sub(g_new, state.g, out=y_row)
        sy, yy = torch.dot(s_row, y_row), torch.dot(y_row, y_row)
        state.newest, newest_before = slot, state.newest
        state.count, count_before = min(state.count + 1, m), state.count
        P_new = self._times(state, g_new)  # the new pair's row included
        state.newest, state.count = newest_before, count_before
        state.P = P_new
        # Skip pairs without enough positive curvature (keeps H positive definite); the slot
        # written was free or the oldest pair's, which is then dropped.
        if not float(sy) > 2.2e-16 * float(yy):
            if state.count == m:
                state.count -= 1
            P_new[slot] = 0.0
            P_new[m + slot] = 0.0
            return
        # Products with the new y: (W_old g_new) - (W_old g_old) on the rows that stay.
        w_dot_y = P_new - P_old
        state.SY[slot, :] = y_dot_s
        state.SY[:, slot] = w_dot_y[:m]
        state.YY[slot, :] = w_dot_y[m:]
        state.YY[:, slot] = w_dot_y[m:]
        state.SY[slot, slot] = sy
        state.YY[slot, slot] = yy
        state.gamma = sy / yy
        state.newest = slot
        state.count = min(state.count + 1, m)


class LbfgsB(Lbfgs):
    """Box bounds by a two-metric projection (Bertsekas 1982) on the compact L-BFGS matrix.

    Variables at a bound whose gradient pushes outward are held; the rest move along the
    L-BFGS direction restricted to them, and a backtracking Armijo search runs along the
    projection arc P(x + a d). All tensor operations: it runs on GPU unchanged.
    """

    name = "l-bfgs-b"
    default_line_search = "armijo"

    def __init__(self, *, lower: Tensor, upper: Tensor, **kw) -> None:
        kw["line_search"] = "armijo"
        super().__init__(**kw)
        self.lower, self.upper = lower, upper

    def project(self, x: Tensor) -> Tensor:
        return torch.minimum(torch.maximum(x, self.lower), self.upper)

    def first_request(self, x0):
        return EvalRequest(self.project(x0), need_f=True, need_g=True)

    def init_state(self, x0, ev):
        return super().init_state(self.project(x0), ev)

    def grad_norm(self, state):
        return _norm_inf(self.project(state.x - state.g) - state.x)

    def _free_mask(self, state: LbfgsState) -> Tensor:
        x, g = state.x, state.g
        width = self.project(x - g) - x
        eps = min(1e-3, _norm_inf(width))
        at_lower = (x <= self.lower + eps) & (g > 0)
        at_upper = (x >= self.upper - eps) & (g < 0)
        return ~(at_lower | at_upper)

    def step(self, state):
        free = self._free_mask(state)
        g_free = torch.where(free, state.g, torch.zeros_like(state.g))
        d = -self.apply_inverse(state, g_free)
        d = torch.where(free, d, torch.zeros_like(d))
        state.coef = None  # the mask breaks the compact identities absorb() relies on
        if not float(torch.dot(g_free, d)) < 0:
            self.reset_memory(state)
            d = -g_free
        result, ev, x_new = yield from self._projected_search(state, d, state.nit == 0)
        if result is None and state.count > 0:
            self.reset_memory(state)
            result, ev, x_new = yield from self._projected_search(state, -g_free, True)
        if result is None or ev is None:
            status = Status.NON_FINITE if self._saw_nonfinite else Status.LINE_SEARCH_FAILED
            raise SolveStopped(status)
        if ev.g is None:
            ev_g = yield EvalRequest(x_new, need_f=False, need_g=True)
            ev.g = ev_g.g
            if not ev_g.is_finite():
                raise SolveStopped(Status.NON_FINITE)
        self._accept(state, x_new, ev.f, ev.g, result.alpha, d, float(torch.dot(state.g, d)))

    def _projected_search(self, state, d, first: bool):
        rule = self.step_rule
        x, g = state.x, state.g
        alpha0 = min(1.0, 1.0 / max(_norm_inf(d), 1e-300)) if first else 1.0
        points: dict[float, Tensor] = {}

        def decrease(alpha: float) -> float:
            return float(torch.dot(g, points[alpha] - x))

        search = rule.search(float(state.f), float(torch.dot(g, d)), alpha0, decrease=decrease)
        alpha = next(search)
        self._saw_nonfinite = False
        last = None
        while True:
            x_trial = self.project(x + alpha * d)
            points.clear()
            points[alpha] = x_trial
            ev = yield EvalRequest(x_trial, need_f=True, need_g=False)
            phi = float(ev.f)
            last = (alpha, ev, x_trial)
            try:
                alpha = search.send((phi if math.isfinite(phi) else math.nan, None))
            except StopIteration as stop:
                result = stop.value
                break
        self._saw_nonfinite = result.saw_nonfinite
        if not result.success or last is None or last[0] != result.alpha:
            return None, None, x
        if _norm_inf(last[2] - x) == 0:
            return None, None, x
        return result, last[1], last[2]


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
            if ev.is_finite() and predicted > 0:
                ratio = (float(state.f) - f_new) / predicted
                if ratio > 0:
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
