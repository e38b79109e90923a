"""Step rules on the 1-D functions phi(a) = f(x + a d) and derphi(a) = g(x + a d) . d.

A search is a generator: it yields a trial step `a` and is sent back `(phi(a), derphi(a))`
(derphi is None where the rule asked for f only); it returns a LineSearchResult. The
conditions and interpolation follow Nocedal & Wright, Numerical Optimization (2nd ed.),
Algorithms 3.5 and 3.6, and scipy's scalar_search_wolfe2 / scalar_search_armijo.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass

Trial = Generator[float, tuple[float, float | None], "LineSearchResult"]


@dataclass(frozen=True)
class LineSearchResult:
    alpha: float
    phi: float
    derphi: float | None
    success: bool
    saw_nonfinite: bool


@dataclass(frozen=True)
class BacktrackingArmijo:
    """f(x + a d) <= f(x) + c1 a g.d, shrinking a by safeguarded quadratic/cubic interpolation."""

    c1: float = 1e-4
    shrink_min: float = 0.1
    shrink_max: float = 0.5
    max_trials: int = 40
    needs_gradient: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.c1 < 1.0:
            raise ValueError(f"BacktrackingArmijo(c1={self.c1}): c1 must be between 0 and 1")
        if not 0.0 < self.shrink_min <= self.shrink_max < 1.0:
            raise ValueError("BacktrackingArmijo: need 0 < shrink_min <= shrink_max < 1")

    def search(self, phi0: float, derphi0: float, alpha0: float, decrease=None) -> Trial:
        """`decrease(a)`, when given, replaces the linear model a * derphi0 (projected paths)."""
        alpha, prev = alpha0, None
        saw_nonfinite = False
        for _ in range(self.max_trials):
            phi, _unused = yield alpha
            model = decrease(alpha) if decrease is not None else alpha * derphi0
            if math.isfinite(phi) and phi <= phi0 + self.c1 * model:
                return LineSearchResult(alpha, phi, None, True, saw_nonfinite)
            if not math.isfinite(phi):
                saw_nonfinite = True
                new_alpha = alpha * self.shrink_min
            elif prev is None:
                new_alpha = _quadmin_from_origin(phi0, derphi0, alpha, phi)
            else:
                new_alpha = _cubicmin_from_origin(phi0, derphi0, alpha, phi, *prev)
            lo, hi = self.shrink_min * alpha, self.shrink_max * alpha
            if new_alpha is None or not (lo <= new_alpha <= hi):
                new_alpha = min(max(new_alpha if new_alpha is not None else hi, lo), hi)
            prev = (alpha, phi) if math.isfinite(phi) else None
            alpha = new_alpha
        return LineSearchResult(alpha, math.nan, None, False, saw_nonfinite)


@dataclass(frozen=True)
class StrongWolfe:
    """Strong Wolfe conditions by More & Thuente's safeguarded search (MINPACK-2 dcsrch).

    Sufficient decrease phi(a) <= phi0 + c1 a derphi0, curvature |derphi(a)| <= c2 |derphi0|.
    The interval of uncertainty is updated by `_dcstep` (cubic and quadratic interpolation
    with safeguards); before a bracket exists, trials extrapolate within
    [a + 1.1 (a - a_x), a + 4 (a - a_x)] -- the search scipy's BFGS and L-BFGS-B use.
    A non-finite value at a trial shrinks toward the best finite point and caps later trials
    below it. `alpha_max` bounds every trial (a feasible segment's end, say).
    """

    c1: float = 1e-4
    c2: float = 0.9
    max_trials: int = 30
    alpha_max: float = 1e10
    xtol: float = 1e-14
    max_stale: int = 5
    needs_gradient: bool = True
    # dcsrch's warnings (rounding errors, xtol, stp = stpmax) end the search; with this set
    # the current trial is returned as a success when it has sufficient decrease, as
    # L-BFGS-B's lnsrlb takes it (a step that reaches alpha_max is the common case there).
    accept_at_warning: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.c1 < self.c2 < 1.0:
            raise ValueError(f"StrongWolfe(c1={self.c1}, c2={self.c2}): need 0 < c1 < c2 < 1")

    def search(self, phi0: float, derphi0: float, alpha0: float, decrease=None,
               alpha_max: float | None = None) -> Trial:
        c1, c2 = self.c1, self.c2
        stpmax = self.alpha_max if alpha_max is None else min(alpha_max, self.alpha_max)
        gtest = c1 * derphi0
        saw_nonfinite = False
        brackt, stage = False, 1
        width = stpmax
        width1 = 2.0 * width
        # stx: the best step so far; sty: the other end of the interval.
        stx, fx, gx = 0.0, phi0, derphi0
        sty, fy, gy = 0.0, phi0, derphi0
        stp = min(max(alpha0, 0.0), stpmax)
        if not stp > 0:
            stp = min(1.0, stpmax)
        stmin, stmax = 0.0, 5.0 * stp
        cap = math.inf  # trials stay below a step where f or g was not finite
        f_best, stale = phi0, 0  # bracketed trials since f last went below f_best
        for _ in range(self.max_trials):
            f, g = yield stp
            if not (math.isfinite(f) and g is not None and math.isfinite(g)):
                saw_nonfinite = True
                if stp > stx:
                    cap = min(cap, stp)
                    if brackt and sty > stx:
                        brackt = False
                stp = stx + 0.25 * (stp - stx)
                if abs(stp - stx) <= 1e-16 * max(1.0, stx):
                    break
                continue
            ftest = phi0 + stp * gtest
            if f <= ftest and abs(g) <= c2 * -derphi0:
                return LineSearchResult(stp, f, g, True, saw_nonfinite)
            if stage == 1 and f <= ftest and g >= 0:
                stage = 2
            warn = brackt and (stp <= stmin or stp >= stmax or stmax - stmin <= self.xtol * stmax)
            stale = 0 if f < f_best else stale + int(brackt)
            f_best = min(f, f_best)
            # rounding errors prevent progress; a bracket that f cannot resolve (noise or
            # rounding, not curvature); or the search would go past alpha_max
            warn = warn or stale >= self.max_stale or (stp == stpmax and f <= ftest and g <= gtest)
            if warn:
                if self.accept_at_warning and f <= ftest:
                    return LineSearchResult(stp, f, g, True, saw_nonfinite)
                break
            if stage == 1 and fx >= f > ftest:
                # The modified function psi(a) = phi(a) - phi0 - c1 a derphi0 drives the step.
                stx, fxm, gxm, sty, fym, gym, stp, brackt = _dcstep(
                    stx, fx - stx * gtest, gx - gtest, sty, fy - sty * gtest, gy - gtest,
                    stp, f - stp * gtest, g - gtest, brackt, stmin, stmax,
                )
                fx, fy = fxm + stx * gtest, fym + sty * gtest
                gx, gy = gxm + gtest, gym + gtest
            else:
                stx, fx, gx, sty, fy, gy, stp, brackt = _dcstep(
                    stx, fx, gx, sty, fy, gy, stp, f, g, brackt, stmin, stmax
                )
            if brackt:
                if abs(sty - stx) >= 0.66 * width1:
                    stp = stx + 0.5 * (sty - stx)
                width1, width = width, abs(sty - stx)
                stmin, stmax = min(stx, sty), max(stx, sty)
            else:
                stmin, stmax = stp + 1.1 * (stp - stx), stp + 4.0 * (stp - stx)
            stp = min(max(stp, 0.0), stpmax)
            if brackt and (stp <= stmin or stp >= stmax or stmax - stmin <= self.xtol * stmax):
                stp = stx
            if stp >= cap:
                stp = stx + 0.5 * (cap - stx)
            if not math.isfinite(stp):
                break
        # No Wolfe point: hand back the best sufficient-decrease point, marked unsuccessful.
        return LineSearchResult(stx, fx, gx, False, saw_nonfinite)


def _quadmin_from_origin(phi0: float, derphi0: float, a: float, phi_a: float) -> float | None:
    denom = 2.0 * (phi_a - phi0 - derphi0 * a)
    if denom <= 0 or not math.isfinite(denom):
        return None
    return -derphi0 * a * a / denom


def _cubicmin_from_origin(
    phi0: float, derphi0: float, a1: float, phi1: float, a0: float, phi_a0: float
) -> float | None:
    """Minimizer of the cubic through phi(0), phi'(0), phi(a0), phi(a1) (scipy's _cubicmin)."""
    d0 = phi_a0 - phi0 - derphi0 * a0
    d1 = phi1 - phi0 - derphi0 * a1
    denom = a0 * a0 * a1 * a1 * (a1 - a0)
    if denom == 0:
        return None
    a = (a0 * a0 * d1 - a1 * a1 * d0) / denom
    b = (-(a0**3) * d1 + a1**3 * d0) / denom
    if a == 0:
        return None if b == 0 else -derphi0 / (2 * b)
    radical = b * b - 3 * a * derphi0
    if radical < 0:
        return None
    result = (-b + math.sqrt(radical)) / (3 * a)
    return result if math.isfinite(result) else None


def _dcstep(stx, fx, dx, sty, fy, dy, stp, fp, dp, brackt, stpmin, stpmax):
    """One safeguarded step of More & Thuente's search (MINPACK-2 dcstep).

    (stx, fx, dx) is the best step so far, (sty, fy, dy) the other end of the interval,
    (stp, fp, dp) the new trial. Returns the updated ends, the next trial and `brackt`.
    """
    sgnd = math.copysign(1.0, dp) * math.copysign(1.0, dx) if dp and dx else 0.0
    if fp > fx:
        # Higher value: the minimum is bracketed. Cubic, or halfway to the quadratic step.
        theta = 3.0 * (fx - fp) / (stp - stx) + dx + dp
        s = max(abs(theta), abs(dx), abs(dp))
        gamma = s * math.sqrt(max(0.0, (theta / s) ** 2 - (dx / s) * (dp / s)))
        if stp < stx:
            gamma = -gamma
        p = (gamma - dx) + theta
        q = ((gamma - dx) + gamma) + dp
        stpc = stx + (p / q) * (stp - stx)
        stpq = stx + ((dx / ((fx - fp) / (stp - stx) + dx)) / 2.0) * (stp - stx)
        stpf = stpc if abs(stpc - stx) <= abs(stpq - stx) else stpc + (stpq - stpc) / 2.0
        brackt = True
    elif sgnd < 0.0:
        # Derivatives of opposite sign: bracketed. The step farther from stp.
        theta = 3.0 * (fx - fp) / (stp - stx) + dx + dp
        s = max(abs(theta), abs(dx), abs(dp))
        gamma = s * math.sqrt(max(0.0, (theta / s) ** 2 - (dx / s) * (dp / s)))
        if stp > stx:
            gamma = -gamma
        p = (gamma - dp) + theta
        q = ((gamma - dp) + gamma) + dx
        stpc = stp + (p / q) * (stx - stp)
        stpq = stp + (dp / (dp - dx)) * (stx - stp)
        stpf = stpc if abs(stpc - stp) > abs(stpq - stp) else stpq
        brackt = True
    elif abs(dp) < abs(dx):
        # Same sign, derivative shrinking: cubic if it points the right way, else the secant.
        theta = 3.0 * (fx - fp) / (stp - stx) + dx + dp
        s = max(abs(theta), abs(dx), abs(dp))
        gamma = s * math.sqrt(max(0.0, (theta / s) ** 2 - (dx / s) * (dp / s)))
        if stp > stx:
            gamma = -gamma
        p = (gamma - dp) + theta
        q = (gamma + (dx - dp)) + gamma
        r = p / q if q != 0 else 0.0
        if r < 0 and gamma != 0:
            stpc = stp + r * (stx - stp)
        elif stp > stx:
            stpc = stpmax
        else:
            stpc = stpmin
        stpq = stp + (dp / (dp - dx)) * (stx - stp)
        if brackt:
            stpf = stpc if abs(stpc - stp) < abs(stpq - stp) else stpq
            if stp > stx:
                stpf = min(stp + 0.66 * (sty - stp), stpf)
            else:
                stpf = max(stp + 0.66 * (sty - stp), stpf)
        else:
            stpf = stpc if abs(stpc - stp) > abs(stpq - stp) else stpq
            stpf = min(max(stpf, stpmin), stpmax)
    elif brackt:
        # Same sign, derivative not shrinking, bracketed: cubic with the far end.
        theta = 3.0 * (fp - fy) / (sty - stp) + dy + dp
        s = max(abs(theta), abs(dy), abs(dp))
        gamma = s * math.sqrt(max(0.0, (theta / s) ** 2 - (dy / s) * (dp / s)))
        if stp > sty:
            gamma = -gamma
        p = (gamma - dp) + theta
        q = ((gamma - dp) + gamma) + dy
        stpf = stp + (p / q) * (sty - stp)
    else:
        stpf = stpmax if stp > stx else stpmin
    if fp > fx:
        sty, fy, dy = stp, fp, dp
    else:
        if sgnd < 0.0:
            sty, fy, dy = stx, fx, dx
        stx, fx, dx = stp, fp, dp
    return stx, fx, dx, sty, fy, dy, stpf, brackt
