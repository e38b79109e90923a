"""Batched search directions and curvature memories: BFGS, L-BFGS, Newton, Gauss-Newton and
the projected L-BFGS used for box bounds. Each works on (k, n) rows with a leading batch dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


def _mask(m: Tensor, like: Tensor) -> Tensor:
    return m.reshape(m.shape + (1,) * (like.dim() - m.dim()))


class BatchedMethod:
    """A direction + memory update. `memory` tensors have a leading dimension k (rows)."""

    name = ""
    default_line_search = "strong-wolfe"
    needs_hessian = False
    least_squares = False

    def init_memory(self, x: Tensor) -> dict[str, Tensor]:
        return {}

    def direction(self, x: Tensor, g: Tensor, memory: dict[str, Tensor], extra) -> Tensor:
        return -g

    def reset(self, memory: dict[str, Tensor], rows: Tensor) -> None:
        """Forgets curvature information on the rows where `rows` (a mask) is set."""

    def absorb(self, memory, accepted: Tensor, s: Tensor, y: Tensor, sy_search: Tensor) -> None:
        """Updates the memory of the `accepted` rows with step s and gradient change y;
        `sy_search` is s . y from the line search's derivatives (NaN where not known)."""

    def initial_step(self, nit: Tensor, f: Tensor, f_prev: Tensor, g: Tensor,
                     derphi0: Tensor) -> Tensor:
        first = torch.clamp(1.01 / torch.clamp(torch.linalg.vector_norm(g, dim=1), min=1e-300),
                            max=1.0)
        return torch.where(nit == 0, first, torch.ones_like(first))


class BatchedBfgs(BatchedMethod):
    """BFGS on a dense inverse Hessian per member, from H0 = I (scipy's and the single
    solver's choice), with scipy's first-trial guess from the last decrease."""

    name = "bfgs"

    def init_memory(self, x):
        k, n = x.shape
        eye = torch.eye(n, dtype=x.dtype, device=x.device)
        return {"H": eye.expand(k, n, n).clone()}

    def direction(self, x, g, memory, extra):
        return -torch.bmm(memory["H"], g.unsqueeze(2)).squeeze(2)

    def reset(self, memory, rows):
        H = memory["H"]
        eye = torch.eye(H.shape[1], dtype=H.dtype, device=H.device)
        memory["H"] = torch.where(_mask(rows, H), eye, H)

    def absorb(self, memory, accepted, s, y, sy_search):
        H = memory["H"]
        sy = _dot(s, y)
        ok = accepted & torch.isfinite(sy) & (
            sy > 1e-10 * torch.linalg.vector_norm(s, dim=1) * torch.linalg.vector_norm(y, dim=1))
        rho = torch.where(ok, 1.0 / torch.where(ok, sy, torch.ones_like(sy)), torch.zeros_like(sy))
        Hy = torch.bmm(H, y.unsqueeze(2)).squeeze(2)
        yHy = _dot(y, Hy)
        r = rho.unsqueeze(1).unsqueeze(2)
        outer_sHy = s.unsqueeze(2) * Hy.unsqueeze(1)
        ss = s.unsqueeze(2) * s.unsqueeze(1)
        coef = (rho * rho * yHy + rho).unsqueeze(1).unsqueeze(2)
        updated = H - r * (outer_sHy + outer_sHy.transpose(1, 2)) + coef * ss
        memory["H"] = torch.where(_mask(ok, H), updated, H)

    def initial_step(self, nit, f, f_prev, g, derphi0):
        base = super().initial_step(nit, f, f_prev, g, derphi0)
        guess = 2.02 * (f - f_prev) / derphi0
        later = torch.where(torch.isfinite(guess) & (guess > 0), torch.clamp(guess, max=1.0),
                            torch.ones_like(guess))
        use_base = (nit == 0) | ~torch.isfinite(f_prev)
        return torch.where(use_base, base, later)


class BatchedLbfgs(BatchedMethod):
    """L-BFGS by the two-loop recursion over per-member histories kept in chronological order
    (slot j is the j-th oldest pair, valid for j < count), H0 = gamma I from the newest pair.
    Same pair rules as the single solver: a pair without s.y > eps y.y is skipped, and when the
    memory is full the oldest pair is dropped all the same."""

    name = "l-bfgs"

    def __init__(self, history_size: int = 10) -> None:
        self.m = history_size

    def init_memory(self, x):
        k, n = x.shape
        kw = {"dtype": x.dtype, "device": x.device}
        return {
            "S": torch.zeros(k, self.m, n, **kw),
            "Y": torch.zeros(k, self.m, n, **kw),
            "rho": torch.zeros(k, self.m, **kw),
            "count": torch.zeros(k, dtype=torch.int64, device=x.device),
            "gamma": torch.ones(k, **kw),
        }

    def apply_inverse(self, memory, v: Tensor) -> Tensor:
        S, Y, rho, count = memory["S"], memory["Y"], memory["rho"], memory["count"]
        q = v.clone()
        alphas = []
        for j in range(self.m - 1, -1, -1):
            valid = (count > j).to(v.dtype)
            a = valid * rho[:, j] * _dot(S[:, j], q)
            q = q - a.unsqueeze(1) * Y[:, j]
            alphas.append(a)
        alphas.reverse()
        r = memory["gamma"].unsqueeze(1) * q
        for j in range(self.m):
            valid = (count > j).to(v.dtype)
            b = valid * rho[:, j] * _dot(Y[:, j], r)
            r = r + (alphas[j] - b).unsqueeze(1) * S[:, j]
        return r

    def direction(self, x, g, memory, extra):
        return -self.apply_inverse(memory, g)

    def reset(self, memory, rows):
        memory["count"] = torch.where(rows, torch.zeros_like(memory["count"]), memory["count"])

    def absorb(self, memory, accepted, s, y, sy_search):
        S, Y, rho, count = memory["S"], memory["Y"], memory["rho"], memory["count"]
        m = self.m
        sy = torch.where(torch.isfinite(sy_search), sy_search, _dot(s, y))
        yy = _dot(y, y)
        keep = accepted & (sy > 2.2e-16 * yy)
        full = count >= m
        # Rows that drop their oldest pair shift left by one (the newest slot frees up).
        shift = accepted & full
        if m > 1:
            S = torch.where(_mask(shift, S), torch.roll(S, -1, 1), S)
            Y = torch.where(_mask(shift, Y), torch.roll(Y, -1, 1), Y)
            rho = torch.where(shift.unsqueeze(1), torch.roll(rho, -1, 1), rho)
        count = torch.where(shift, count - 1, count)
        slot = torch.clamp(count, max=m - 1)
        onehot = torch.nn.functional.one_hot(slot, m).to(torch.bool) & keep.unsqueeze(1)
        S = torch.where(onehot.unsqueeze(2), s.unsqueeze(1), S)
        Y = torch.where(onehot.unsqueeze(2), y.unsqueeze(1), Y)
        safe_sy = torch.where(keep, sy, torch.ones_like(sy))
        rho = torch.where(onehot, (1.0 / safe_sy).unsqueeze(1), rho)
        memory["S"], memory["Y"], memory["rho"] = S, Y, rho
        memory["count"] = torch.where(keep, count + 1, count)
        safe_yy = torch.where(keep, yy, torch.ones_like(yy))
        memory["gamma"] = torch.where(keep, sy / safe_yy, memory["gamma"])


class BatchedProjectedLbfgs(BatchedLbfgs):
    """Box bounds: L-BFGS on the free variables (those not held at a bound by the gradient),
    searched along the feasible segment up to the nearest bound (the single solver's lnsrlb
    cap). It reaches the same constrained minimizer as the single L-BFGS-B on problems that
    have one, by a different path (no generalized Cauchy point)."""

    name = "l-bfgs-b"

    def __init__(self, history_size: int, lower: Tensor, upper: Tensor) -> None:
        super().__init__(history_size)
        self.lower, self.upper = lower, upper  # (B, n), rows follow the state's index

    def held(self, x: Tensor, g: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
        return ((x <= lower) & (g > 0)) | ((x >= upper) & (g < 0))

    def direction(self, x, g, memory, extra):
        lower, upper = extra
        held = self.held(x, g, lower, upper)
        g_free = torch.where(held, torch.zeros_like(g), g)
        d = -self.apply_inverse(memory, g_free)
        d = torch.where(held, torch.zeros_like(d), d)
        # A quasi-Newton step that points out of the box at a bound is cut there too.
        blocked = ((x <= lower) & (d < 0)) | ((x >= upper) & (d > 0))
        return torch.where(blocked, torch.zeros_like(d), d)

    @staticmethod
    def max_step(x: Tensor, d: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
        inf = torch.full_like(d, math.inf)
        pos = torch.where(d > 0, (upper - x) / torch.where(d > 0, d, torch.ones_like(d)), inf)
        neg = torch.where(d < 0, (lower - x) / torch.where(d < 0, d, -torch.ones_like(d)), inf)
        return torch.clamp(torch.minimum(pos, neg).amin(1), min=0.0, max=1e10)


class BatchedNewton(BatchedMethod):
    """Exact Hessians, Cholesky with tau I added until positive definite (N&W Alg. 3.3),
    member by member in the masks; full first trial."""

    name = "newton"
    needs_hessian = True

    def direction(self, x, g, memory, extra):
        H = extra
        H = 0.5 * (H + H.transpose(1, 2))
        n = H.shape[1]
        eye = torch.eye(n, dtype=H.dtype, device=H.device)
        min_diag = H.diagonal(dim1=1, dim2=2).amin(1)
        tau = torch.where(min_diag > 0, torch.zeros_like(min_diag), -min_diag + 1e-3)
        grow = 1e-3 * torch.clamp(H.abs().amax((1, 2)), min=1.0)
        d = -g
        pending = torch.ones_like(min_diag, dtype=torch.bool)
        for _ in range(60):
            L, info = torch.linalg.cholesky_ex(H + tau.reshape(-1, 1, 1) * eye)
            ok = info == 0
            sol = -torch.cholesky_solve(g.unsqueeze(2), L).squeeze(2)
            d = torch.where((pending & ok).unsqueeze(1), sol, d)
            pending = pending & ~ok
            if not bool(pending.any()):
                break
            tau = torch.where(pending, torch.maximum(2.0 * tau, grow), tau)
        return d

    def initial_step(self, nit, f, f_prev, g, derphi0):
        return torch.ones_like(f)


class BatchedGaussNewton(BatchedMethod):
    """Gauss-Newton: p solves min |J p + r| per member (batched least squares), Armijo."""

    name = "gauss-newton"
    default_line_search = "armijo"
    least_squares = True

    def direction(self, x, g, memory, extra):
        r, J = extra
        driver = "gelsd" if J.device.type == "cpu" else "gels"
        return torch.linalg.lstsq(J, -r.unsqueeze(2), driver=driver).solution.squeeze(2)

    def initial_step(self, nit, f, f_prev, g, derphi0):
        return torch.ones_like(f)
