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
    """Strong Wolfe conditions by bracketing and zoom with cubic interpolation.

    Sufficient decrease phi(a) <= phi0 + c1 a derphi0, curvature |derphi(a)| <= c2 |derphi0|.
    """

    c1: float = 1e-4
    c2: float = 0.9
    max_trials: int = 30
    alpha_max: float = 1e10
    needs_gradient: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.c1 < self.c2 < 1.0:
            raise ValueError(f"StrongWolfe(c1={self.c1}, c2={self.c2}): need 0 < c1 < c2 < 1")

    def search(self, phi0: float, derphi0: float, alpha0: float, decrease=None) -> Trial:
        c1, c2 = self.c1, self.c2
        saw_nonfinite = False
        a_prev, phi_prev, der_prev = 0.0, phi0, derphi0
        alpha = min(alpha0, self.alpha_max)
        trials = 0
        bracket = None
        while trials < self.max_trials:
            phi, der = yield alpha
            trials += 1
            if not (math.isfinite(phi) and der is not None and math.isfinite(der)):
                # Too far: something in (a_prev, alpha) is finite; shrink toward the last good step.
                saw_nonfinite = True
                alpha = a_prev + 0.25 * (alpha - a_prev)
                if alpha - a_prev <= 1e-16 * max(1.0, alpha):
                    break
                continue
            if phi > phi0 + c1 * alpha * derphi0 or (trials > 1 and phi >= phi_prev):
                bracket = (a_prev, phi_prev, der_prev, alpha, phi, der)
                break
            if abs(der) <= -c2 * derphi0:
                return LineSearchResult(alpha, phi, der, True, saw_nonfinite)
            if der >= 0:
                bracket = (alpha, phi, der, a_prev, phi_prev, der_prev)
                break
            a_prev, phi_prev, der_prev = alpha, phi, der
            if alpha >= self.alpha_max:
                return LineSearchResult(alpha, phi, der, False, saw_nonfinite)
            alpha = min(2.0 * alpha if trials > 1 else 2.0 * alpha, self.alpha_max)
        if bracket is None:
            return LineSearchResult(a_prev, phi_prev, der_prev, False, saw_nonfinite)

        a_lo, phi_lo, der_lo, a_hi, phi_hi, der_hi = bracket
        while trials < self.max_trials:
            width = abs(a_hi - a_lo)
            if width <= 1e-14 * max(1.0, abs(a_lo), abs(a_hi)):
                break
            alpha = _cubicmin(a_lo, phi_lo, der_lo, a_hi, phi_hi, der_hi)
            lo, hi = min(a_lo, a_hi), max(a_lo, a_hi)
            margin = 0.1 * width
            if alpha is None or not (lo + margin <= alpha <= hi - margin):
                alpha = 0.5 * (a_lo + a_hi)
            phi, der = yield alpha
            trials += 1
            if not (math.isfinite(phi) and der is not None and math.isfinite(der)):
                saw_nonfinite = True
                a_hi, phi_hi, der_hi = alpha, math.inf, math.inf
                continue
            if phi > phi0 + c1 * alpha * derphi0 or phi >= phi_lo:
                a_hi, phi_hi, der_hi = alpha, phi, der
                continue
            if abs(der) <= -c2 * derphi0:
                return LineSearchResult(alpha, phi, der, True, saw_nonfinite)
            if der * (a_hi - a_lo) >= 0:
                a_hi, phi_hi, der_hi = a_lo, phi_lo, der_lo
            a_lo, phi_lo, der_lo = alpha, phi, der
        # No Wolfe point: hand back the best sufficient-decrease point, marked unsuccessful.
        return LineSearchResult(a_lo, phi_lo, der_lo, False, saw_nonfinite)


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


def _cubicmin(
    a1: float, f1: float, g1: float, a2: float, f2: float, g2: float
) -> float | None:
    """Minimizer of the cubic matching values and slopes at a1 and a2 (N&W eq. 3.59)."""
    if not all(math.isfinite(v) for v in (f1, g1, f2, g2)) or a1 == a2:
        return None
    d1 = g1 + g2 - 3 * (f1 - f2) / (a1 - a2)
    radical = d1 * d1 - g1 * g2
    if radical < 0:
        return None
    d2 = math.copysign(math.sqrt(radical), a2 - a1)
    denom = g2 - g1 + 2 * d2
    if denom == 0:
        return None
    result = a2 - (a2 - a1) * (g2 + d2 - d1) / denom
    return result if math.isfinite(result) else None
