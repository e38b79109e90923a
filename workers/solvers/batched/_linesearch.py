"""Batched step rules: B independent line searches at once, one per member, as (B,) tensors.

Masked, loop-free twins of workers.solvers._linesearch's StrongWolfe and BacktrackingArmijo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

# Per member, every trial and result equals the scalar generator's: the same operations in the
# same order, each `if` a torch.where. Python's min/max are mimicked exactly (the first argument
# unless the second is strictly better) so that NaN and signed zeros land where the scalar's do.
# One difference is left: the scalar's x ** 2 and x ** 3 are libm's pow, here products, which
# now and then differ in the last bit.


def _max(a, b):
    return torch.where(b > a, b, a)


def _min(a, b):
    return torch.where(b < a, b, a)


def _like(x, ref: Tensor) -> Tensor:
    return torch.as_tensor(x, dtype=ref.dtype, device=ref.device).expand(ref.shape).clone()


def _mask(x, ref: Tensor) -> Tensor:
    return torch.as_tensor(x, dtype=torch.bool, device=ref.device).expand(ref.shape).clone()


@dataclass
class WolfeSearch:
    """The state of B strong Wolfe searches; every field has shape (B,)."""

    alpha: Tensor  # the next trial while searching; result_alpha once done (0 for inactive)
    searching: Tensor
    success: Tensor
    saw_nonfinite: Tensor
    result_alpha: Tensor
    result_phi: Tensor
    result_derphi: Tensor
    # dcsrch's variables, as in StrongWolfe.search
    phi0: Tensor
    derphi0: Tensor
    gtest: Tensor
    stpmax: Tensor
    stx: Tensor
    fx: Tensor
    gx: Tensor
    sty: Tensor
    fy: Tensor
    gy: Tensor
    brackt: Tensor  # bool
    stage: Tensor  # int64, 1 or 2
    width: Tensor
    width1: Tensor
    stmin: Tensor
    stmax: Tensor
    cap: Tensor
    f_best: Tensor
    stale: Tensor  # int64
    trials: Tensor  # int64: trials answered so far


@dataclass
class ArmijoSearch:
    """The state of B backtracking Armijo searches; every field has shape (B,)."""

    alpha: Tensor
    searching: Tensor
    success: Tensor
    saw_nonfinite: Tensor
    result_alpha: Tensor
    result_phi: Tensor
    result_derphi: Tensor  # always NaN: the rule asks for values only
    phi0: Tensor
    derphi0: Tensor
    prev_alpha: Tensor
    prev_phi: Tensor
    has_prev: Tensor  # bool: the scalar rule's `prev is not None`
    trials: Tensor  # int64


def _settings_of(cls, rule):
    names = {f.name for f in fields(cls)}
    return cls(**{f.name: getattr(rule, f.name) for f in fields(rule) if f.name in names})


@dataclass(frozen=True)
class BatchedStrongWolfe:
    """StrongWolfe (More & Thuente's dcsrch with the same safeguards) for B members at once."""

    c1: float = 1e-4
    c2: float = 0.9
    max_trials: int = 30
    alpha_max: float = 1e10
    xtol: float = 1e-14
    max_stale: int = 5
    needs_gradient: bool = True
    accept_at_warning: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.c1 < self.c2 < 1.0:
            raise ValueError(
                f"BatchedStrongWolfe(c1={self.c1}, c2={self.c2}): need 0 < c1 < c2 < 1"
            )

    @classmethod
    def of(cls, rule) -> BatchedStrongWolfe:
        """The batched rule with a StrongWolfe's settings."""
        return _settings_of(cls, rule)

    def start(self, phi0: Tensor, derphi0: Tensor, alpha0: Tensor, active: Tensor,
              alpha_max: Tensor | None = None) -> WolfeSearch:
        phi0 = phi0.clone()
        derphi0 = _like(derphi0, phi0)
        alpha0 = _like(alpha0, phi0)
        active = _mask(active, phi0)
        if alpha_max is None:
            stpmax = _like(self.alpha_max, phi0)
        else:
            stpmax = _min(_like(alpha_max, phi0), self.alpha_max)
        gtest = self.c1 * derphi0
        stp = _min(_max(alpha0, 0.0), stpmax)
        stp = torch.where(stp > 0, stp, _min(1.0, stpmax))
        zero = torch.zeros_like(phi0)
        never = torch.zeros_like(phi0, dtype=torch.bool)
        searching = active.clone() if self.max_trials > 0 else never.clone()
        # Inactive members report "no step"; with max_trials <= 0 the scalar rule returns its
        # best point (0, phi0, derphi0) before any trial.
        return WolfeSearch(
            alpha=torch.where(searching, stp, zero),
            searching=searching,
            success=never.clone(),
            saw_nonfinite=never.clone(),
            result_alpha=zero.clone(),
            result_phi=phi0.clone(),
            result_derphi=derphi0.clone(),
            phi0=phi0,
            derphi0=derphi0,
            gtest=gtest,
            stpmax=stpmax,
            stx=zero.clone(),
            fx=phi0.clone(),
            gx=derphi0.clone(),
            sty=zero.clone(),
            fy=phi0.clone(),
            gy=derphi0.clone(),
            brackt=never.clone(),
            stage=torch.ones_like(phi0, dtype=torch.int64),
            width=stpmax.clone(),
            width1=2.0 * stpmax,
            stmin=zero.clone(),
            stmax=5.0 * stp,
            cap=torch.full_like(phi0, math.inf),
            f_best=phi0.clone(),
            stale=torch.zeros_like(phi0, dtype=torch.int64),
            trials=torch.zeros_like(phi0, dtype=torch.int64),
        )

    def settle(self, s: WolfeSearch, phi: Tensor, derphi: Tensor) -> Tensor:
        """Ends the searches whose trial already is a strong Wolfe point, exactly as `advance`
        would end them, without the interval update; returns that mask. The engine calls it
        before `advance` so that the full update runs only on the rows still searching."""
        f = phi.to(dtype=s.phi0.dtype)
        g = derphi.to(dtype=s.phi0.dtype)
        done = s.searching & torch.isfinite(f) & torch.isfinite(g) & (
            f <= s.phi0 + s.alpha * s.gtest) & (g.abs() <= self.c2 * -s.derphi0)
        _settle(s, done, f, g)
        return done

    def advance(self, s: WolfeSearch, phi: Tensor, derphi: Tensor) -> WolfeSearch:
        """One trial's answer for every member; members not searching are left as they are."""
        where = torch.where
        on = s.searching
        f = phi.to(dtype=s.phi0.dtype)
        g = derphi.to(dtype=s.phi0.dtype)
        stp, stx, sty = s.alpha, s.stx, s.sty
        finite = torch.isfinite(f) & torch.isfinite(g)
        bad = on & ~finite
        good = on & finite

        # A non-finite trial: shrink toward the best point; later trials stay below it.
        past = stp > stx
        cap_bad = where(past, _min(s.cap, stp), s.cap)
        brackt_bad = s.brackt & ~(past & (sty > stx))
        stp_bad = stx + 0.25 * (stp - stx)
        stuck = (stp_bad - stx).abs() <= 1e-16 * _max(1.0, stx)

        gt = s.gtest
        ftest = s.phi0 + stp * gt
        decrease = f <= ftest
        wolfe = decrease & (g.abs() <= self.c2 * -s.derphi0)
        stage = where((s.stage == 1) & decrease & (g >= 0), 2, s.stage)
        warn = s.brackt & (
            (stp <= s.stmin) | (stp >= s.stmax) | (s.stmax - s.stmin <= self.xtol * s.stmax)
        )
        stale = where(f < s.f_best, 0, s.stale + s.brackt.to(torch.int64))
        f_best = _min(f, s.f_best)
        warn = warn | (stale >= self.max_stale) | ((stp == s.stpmax) & decrease & (g <= gt))
        accept = warn & decrease if self.accept_at_warning else torch.zeros_like(warn)

        m = (stage == 1) & (s.fx >= f) & (f > ftest)
        nstx, nfx, ngx, nsty, nfy, ngy, nstp, nbrackt = _dcstep(
            stx, where(m, s.fx - stx * gt, s.fx), where(m, s.gx - gt, s.gx),
            sty, where(m, s.fy - sty * gt, s.fy), where(m, s.gy - gt, s.gy),
            stp, where(m, f - stp * gt, f), where(m, g - gt, g),
            s.brackt, s.stmin, s.stmax,
        )
        nfx = where(m, nfx + nstx * gt, nfx)
        nfy = where(m, nfy + nsty * gt, nfy)
        ngx = where(m, ngx + gt, ngx)
        ngy = where(m, ngy + gt, ngy)
        span = (nsty - nstx).abs()
        nstp = where(nbrackt & (span >= 0.66 * s.width1), nstx + 0.5 * (nsty - nstx), nstp)
        nwidth1 = where(nbrackt, s.width, s.width1)
        nwidth = where(nbrackt, span, s.width)
        nstmin = where(nbrackt, _min(nstx, nsty), nstp + 1.1 * (nstp - nstx))
        nstmax = where(nbrackt, _max(nstx, nsty), nstp + 4.0 * (nstp - nstx))
        nstp = _min(_max(nstp, 0.0), s.stpmax)
        rounding = (nstp <= nstmin) | (nstp >= nstmax) | (nstmax - nstmin <= self.xtol * nstmax)
        nstp = where(nbrackt & rounding, nstx, nstp)
        nstp = where(nstp >= s.cap, nstx + 0.5 * (s.cap - nstx), nstp)

        done_ok = good & (wolfe | accept)
        step = good & ~wolfe & ~warn
        stop = (bad & stuck) | (good & ~wolfe & warn & ~accept) | (step & ~torch.isfinite(nstp))
        trials = s.trials + on.to(torch.int64)
        stop = stop | (on & ~done_ok & ~stop & (trials >= self.max_trials))

        s.saw_nonfinite = s.saw_nonfinite | bad
        s.cap = where(bad, cap_bad, s.cap)
        s.brackt = where(bad, brackt_bad, where(step, nbrackt, s.brackt))
        new_stp = where(bad, stp_bad, where(step, nstp, stp))
        s.stage = where(good, stage, s.stage)
        s.stale = where(good, stale, s.stale)
        s.f_best = where(good, f_best, s.f_best)
        s.stx, s.fx, s.gx = where(step, nstx, stx), where(step, nfx, s.fx), where(step, ngx, s.gx)
        s.sty, s.fy, s.gy = where(step, nsty, sty), where(step, nfy, s.fy), where(step, ngy, s.gy)
        s.width, s.width1 = where(step, nwidth, s.width), where(step, nwidth1, s.width1)
        s.stmin, s.stmax = where(step, nstmin, s.stmin), where(step, nstmax, s.stmax)
        s.trials = trials

        # No Wolfe point: the best sufficient-decrease point, marked unsuccessful.
        s.result_alpha = where(done_ok, stp, where(stop, s.stx, s.result_alpha))
        s.result_phi = where(done_ok, f, where(stop, s.fx, s.result_phi))
        s.result_derphi = where(done_ok, g, where(stop, s.gx, s.result_derphi))
        s.success = s.success | done_ok
        s.searching = on & ~done_ok & ~stop
        s.alpha = where(s.searching, new_stp, where(on, s.result_alpha, stp))
        return s


@dataclass(frozen=True)
class BatchedArmijo:
    """BacktrackingArmijo (safeguarded quadratic/cubic backtracking) for B members at once."""

    c1: float = 1e-4
    shrink_min: float = 0.1
    shrink_max: float = 0.5
    max_trials: int = 40
    needs_gradient: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.c1 < 1.0:
            raise ValueError(f"BatchedArmijo(c1={self.c1}): c1 must be between 0 and 1")
        if not 0.0 < self.shrink_min <= self.shrink_max < 1.0:
            raise ValueError("BatchedArmijo: need 0 < shrink_min <= shrink_max < 1")

    @classmethod
    def of(cls, rule) -> BatchedArmijo:
        """The batched rule with a BacktrackingArmijo's settings."""
        return _settings_of(cls, rule)

    def start(self, phi0: Tensor, derphi0: Tensor, alpha0: Tensor,
              active: Tensor) -> ArmijoSearch:
        phi0 = phi0.clone()
        derphi0 = _like(derphi0, phi0)
        alpha0 = _like(alpha0, phi0)
        active = _mask(active, phi0)
        zero = torch.zeros_like(phi0)
        nan = torch.full_like(phi0, math.nan)
        never = torch.zeros_like(phi0, dtype=torch.bool)
        searching = active.clone() if self.max_trials > 0 else never.clone()
        # Inactive members report "no step"; with max_trials <= 0 the scalar rule returns
        # (alpha0, nan) before any trial.
        result_alpha = torch.where(active, alpha0, zero)
        return ArmijoSearch(
            alpha=torch.where(searching, alpha0, result_alpha),
            searching=searching,
            success=never.clone(),
            saw_nonfinite=never.clone(),
            result_alpha=result_alpha,
            result_phi=torch.where(active, nan, phi0),
            result_derphi=nan.clone(),
            phi0=phi0,
            derphi0=derphi0,
            prev_alpha=nan.clone(),
            prev_phi=nan.clone(),
            has_prev=never.clone(),
            trials=torch.zeros_like(phi0, dtype=torch.int64),
        )

    def settle(self, s: ArmijoSearch, phi: Tensor, derphi: Tensor | None = None) -> Tensor:
        """Ends the searches whose trial already has sufficient decrease (see
        BatchedStrongWolfe.settle); returns that mask."""
        f = phi.to(dtype=s.phi0.dtype)
        done = s.searching & torch.isfinite(f) & (f <= s.phi0 + self.c1 * (s.alpha * s.derphi0))
        _settle(s, done, f, None)
        return done

    def advance(self, s: ArmijoSearch, phi: Tensor, derphi: Tensor | None = None) -> ArmijoSearch:
        """One trial's value for every member; members not searching are left as they are."""
        where = torch.where
        on = s.searching
        a = s.alpha
        f = phi.to(dtype=s.phi0.dtype)
        finite = torch.isfinite(f)
        ok = on & finite & (f <= s.phi0 + self.c1 * (a * s.derphi0))

        quad, quad_ok = _quadmin_from_origin(s.phi0, s.derphi0, a, f)
        cubic, cubic_ok = _cubicmin_from_origin(s.phi0, s.derphi0, a, f, s.prev_alpha, s.prev_phi)
        new = where(finite, where(s.has_prev, cubic, quad), a * self.shrink_min)
        none = finite & ~where(s.has_prev, cubic_ok, quad_ok)
        lo, hi = self.shrink_min * a, self.shrink_max * a
        outside = none | ~((lo <= new) & (new <= hi))
        new = where(outside, _min(_max(where(none, hi, new), lo), hi), new)

        step = on & ~ok
        trials = s.trials + on.to(torch.int64)
        exhausted = step & (trials >= self.max_trials)
        s.saw_nonfinite = s.saw_nonfinite | (on & ~finite)
        s.prev_alpha = where(step, a, s.prev_alpha)
        s.prev_phi = where(step, f, s.prev_phi)
        s.has_prev = where(step, finite, s.has_prev)
        s.trials = trials
        s.result_alpha = where(ok, a, where(exhausted, new, s.result_alpha))
        s.result_phi = where(ok, f, s.result_phi)  # NaN already for the exhausted
        s.success = s.success | ok
        s.searching = on & ~ok & ~exhausted
        s.alpha = where(step, new, a)
        return s


def _settle(s, done: Tensor, f: Tensor, g: Tensor | None) -> None:
    where = torch.where
    s.result_alpha = where(done, s.alpha, s.result_alpha)
    s.result_phi = where(done, f, s.result_phi)
    if g is not None:
        s.result_derphi = where(done, g, s.result_derphi)
    s.success = s.success | done
    s.searching = s.searching & ~done
    s.trials = s.trials + done.to(torch.int64)


def _quadmin_from_origin(phi0, derphi0, a, phi_a):
    """(minimizer, valid) of the quadratic through phi(0), phi'(0), phi(a)."""
    denom = 2.0 * (phi_a - phi0 - derphi0 * a)
    valid = (denom > 0) & torch.isfinite(denom)
    return -derphi0 * a * a / denom, valid


def _cubicmin_from_origin(phi0, derphi0, a1, phi1, a0, phi_a0):
    """(minimizer, valid) of the cubic through phi(0), phi'(0), phi(a0), phi(a1)."""
    d0 = phi_a0 - phi0 - derphi0 * a0
    d1 = phi1 - phi0 - derphi0 * a1
    denom = a0 * a0 * a1 * a1 * (a1 - a0)
    a = (a0 * a0 * d1 - a1 * a1 * d0) / denom
    b = (-(a0**3) * d1 + a1**3 * d0) / denom
    flat = a == 0
    radical = b * b - 3 * a * derphi0
    cubic = (-b + torch.sqrt(radical)) / (3 * a)
    value = torch.where(flat, -derphi0 / (2 * b), cubic)
    valid = (denom != 0) & torch.where(flat, b != 0, ~(radical < 0) & torch.isfinite(cubic))
    return value, valid


def _dcstep(stx, fx, dx, sty, fy, dy, stp, fp, dp, brackt, stpmin, stpmax):
    """MINPACK-2 dcstep on (B,) tensors: every case's step computed, the scalar's case chosen.

    Cases not chosen for a member may divide by zero there; torch.where drops those lanes.
    """
    where = torch.where
    one = torch.ones_like(dp)
    # the scalar's `if dp and dx`: NaN is truthy, zeros of either sign are not
    sgnd = where((dp != 0) & (dx != 0), torch.copysign(one, dp) * torch.copysign(one, dx), 0.0)
    higher = fp > fx
    opposite = ~higher & (sgnd < 0.0)
    shrinking = ~higher & ~opposite & (dp.abs() < dx.abs())

    theta = 3.0 * (fx - fp) / (stp - stx) + dx + dp
    s = _max(_max(theta.abs(), dx.abs()), dp.abs())
    gamma = s * torch.sqrt(_max(0.0, (theta / s) ** 2 - (dx / s) * (dp / s)))

    # fp > fx: the cubic, or halfway to the quadratic step
    g1 = where(stp < stx, -gamma, gamma)
    p = (g1 - dx) + theta
    q = ((g1 - dx) + g1) + dp
    stpc = stx + (p / q) * (stp - stx)
    stpq = stx + ((dx / ((fx - fp) / (stp - stx) + dx)) / 2.0) * (stp - stx)
    stpf1 = where((stpc - stx).abs() <= (stpq - stx).abs(), stpc, stpc + (stpq - stpc) / 2.0)

    # derivatives of opposite sign: the step farther from stp
    g2 = where(stp > stx, -gamma, gamma)
    p = (g2 - dp) + theta
    q = ((g2 - dp) + g2) + dx
    stpc = stp + (p / q) * (stx - stp)
    secant = stp + (dp / (dp - dx)) * (stx - stp)
    stpf2 = where((stpc - stp).abs() > (secant - stp).abs(), stpc, secant)

    # same sign, |derivative| shrinking
    q = (g2 + (dx - dp)) + g2
    r = where(q != 0, p / q, 0.0)
    stpc = where((r < 0) & (g2 != 0), stp + r * (stx - stp), where(stp > stx, stpmax, stpmin))
    near = where((stpc - stp).abs() < (secant - stp).abs(), stpc, secant)
    lim = stp + 0.66 * (sty - stp)
    stpf3b = where(stp > stx, _min(lim, near), _max(lim, near))
    farther = where((stpc - stp).abs() > (secant - stp).abs(), stpc, secant)
    stpf3 = where(brackt, stpf3b, _min(_max(farther, stpmin), stpmax))

    # same sign, not shrinking, bracketed: the cubic with the far end
    theta = 3.0 * (fp - fy) / (sty - stp) + dy + dp
    s = _max(_max(theta.abs(), dy.abs()), dp.abs())
    gamma = s * torch.sqrt(_max(0.0, (theta / s) ** 2 - (dy / s) * (dp / s)))
    gamma = where(stp > sty, -gamma, gamma)
    p = (gamma - dp) + theta
    q = ((gamma - dp) + gamma) + dy
    stpf4 = stp + (p / q) * (sty - stp)

    stpf5 = where(stp > stx, stpmax, stpmin)
    stpf = where(higher, stpf1, where(opposite, stpf2, where(
        shrinking, stpf3, where(brackt, stpf4, stpf5))))

    to_x = ~higher & (sgnd < 0.0)
    sty_n = where(higher, stp, where(to_x, stx, sty))
    fy_n = where(higher, fp, where(to_x, fx, fy))
    dy_n = where(higher, dp, where(to_x, dx, dy))
    stx_n = where(higher, stx, stp)
    fx_n = where(higher, fx, fp)
    dx_n = where(higher, dx, dp)
    return stx_n, fx_n, dx_n, sty_n, fy_n, dy_n, stpf, brackt | higher | opposite
