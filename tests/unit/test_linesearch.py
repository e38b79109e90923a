"""Line searches on 1-D functions phi(a), derphi(a): the conditions themselves are asserted at
the returned step (scipy's assert_wolfe / assert_armijo), never stored numbers."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.solvers import BacktrackingArmijo, LineSearchResult, StrongWolfe

Phi = Callable[[float], float]


def drive(search, phi: Phi, derphi: Phi, *, with_gradient: bool):
    """Answers the search's trial steps; returns (result, trial steps in order)."""
    trials = []
    try:
        alpha = next(search)
        while True:
            trials.append(alpha)
            value = phi(alpha)
            slope = derphi(alpha) if with_gradient else None
            alpha = search.send((value, slope))
    except StopIteration as done:
        result: LineSearchResult = done.value
    return result, trials


def assert_armijo(phi: Phi, derphi0: float, result: LineSearchResult, c1: float) -> None:
    a = result.alpha
    assert a > 0
    assert math.isfinite(phi(a))
    assert phi(a) <= phi(0.0) + c1 * a * derphi0, f"no sufficient decrease at a={a}"
    assert result.phi == pytest.approx(phi(a), rel=1e-12, abs=1e-300)


def assert_strong_wolfe(phi: Phi, derphi: Phi, result: LineSearchResult, c1, c2) -> None:
    derphi0 = derphi(0.0)
    assert_armijo(phi, derphi0, result, c1)
    a = result.alpha
    assert abs(derphi(a)) <= c2 * abs(derphi0), f"strong curvature fails at a={a}"
    assert result.derphi == pytest.approx(derphi(a), rel=1e-12, abs=1e-300)


def _nan_beyond(limit: float, f: Phi) -> Phi:
    return lambda a: f(a) if a < limit else math.nan


# (name, phi, derphi, alpha0). Each phi has phi'(0) < 0 and a minimizer along a > 0.
CASES = [
    ("quadratic_min_at_1", lambda a: (a - 1.0) ** 2, lambda a: 2 * (a - 1.0), 1.0),
    ("quadratic_min_at_0.3", lambda a: 5 * (a - 0.3) ** 2, lambda a: 10 * (a - 0.3), 1.0),
    ("quadratic_far_min_alpha0_short", lambda a: (a - 40.0) ** 2, lambda a: 2 * (a - 40.0), 1.0),
    ("cubic", lambda a: a**3 - 3 * a, lambda a: 3 * a**2 - 3, 0.5),
    ("alpha0_overshoots", lambda a: (a - 0.01) ** 2 + 1, lambda a: 2 * (a - 0.01), 1.0),
    (
        "alpha0_overshoots_far",
        lambda a: math.exp(50 * a) - 60 * a,
        lambda a: 50 * math.exp(50 * a) - 60,
        1.0,
    ),
    ("exp", lambda a: math.exp(-a) + a * a, lambda a: -math.exp(-a) + 2 * a, 1.0),
    # More & Thuente's test functions (1994), as in scipy's line search tests
    (
        "more_thuente_1",
        lambda a: -a / (a * a + 2.0),
        lambda a: (a * a - 2.0) / (a * a + 2.0) ** 2,
        1.0,
    ),
    (
        "more_thuente_2",
        lambda a: (a + 0.004) ** 5 - 2 * (a + 0.004) ** 4,
        lambda a: 5 * (a + 0.004) ** 4 - 8 * (a + 0.004) ** 3,
        0.1,
    ),
    (
        "nan_beyond_0.8",
        _nan_beyond(0.8, lambda a: (a - 0.5) ** 2),
        _nan_beyond(0.8, lambda a: 2 * (a - 0.5)),
        4.0,
    ),
]
CASE_IDS = [c[0] for c in CASES]
# Finite only on [0, 1e-3): an Armijo point exists there, a Wolfe point (curvature) does not.
NAN_EARLY = (
    "nan_beyond_1e-3",
    _nan_beyond(1e-3, lambda a: (a - 0.5) ** 2),
    _nan_beyond(1e-3, lambda a: 2 * (a - 0.5)),
    1.0,
)


@pytest.mark.parametrize("c1,c2", [(1e-4, 0.9), (1e-4, 0.1), (0.3, 0.5)])
@pytest.mark.parametrize("name,phi,derphi,alpha0", CASES, ids=CASE_IDS)
def test_strong_wolfe_step_satisfies_both_conditions(name, phi, derphi, alpha0, c1, c2):
    rule = StrongWolfe(c1=c1, c2=c2)

    result, trials = drive(
        rule.search(phi(0.0), derphi(0.0), alpha0), phi, derphi, with_gradient=True
    )

    assert result.success, f"{name}: no Wolfe point after {len(trials)} trials"
    assert_strong_wolfe(phi, derphi, result, c1, c2)
    assert len(trials) <= rule.max_trials
    assert result.saw_nonfinite == any(not math.isfinite(phi(a)) for a in trials)


@pytest.mark.parametrize("c1", [1e-4, 0.1, 0.5])
@pytest.mark.parametrize(
    "name,phi,derphi,alpha0", CASES + [NAN_EARLY], ids=CASE_IDS + [NAN_EARLY[0]]
)
def test_armijo_step_has_sufficient_decrease_and_is_not_needlessly_short(
    name, phi, derphi, alpha0, c1
):
    rule = BacktrackingArmijo(c1=c1)

    result, trials = drive(
        rule.search(phi(0.0), derphi(0.0), alpha0), phi, derphi, with_gradient=False
    )

    assert result.success, f"{name}: no Armijo point after {len(trials)} trials"
    assert_armijo(phi, derphi(0.0), result, c1)
    assert result.alpha <= alpha0
    assert trials[-1] == result.alpha
    if len(trials) > 1:  # backtracking: every shrink stays within [shrink_min, shrink_max]
        for before, after in zip(trials, trials[1:], strict=False):
            assert rule.shrink_min * before * (1 - 1e-12) <= after
            assert after <= rule.shrink_max * before * (1 + 1e-12)
    else:
        assert result.alpha == alpha0  # a good first step is taken as is
    assert result.saw_nonfinite == any(not math.isfinite(phi(a)) for a in trials)


def test_strong_wolfe_without_a_wolfe_point_before_nan_fails_with_a_decrease():
    _, phi, derphi, alpha0 = NAN_EARLY
    rule = StrongWolfe()

    result, trials = drive(
        rule.search(phi(0.0), derphi(0.0), alpha0), phi, derphi, with_gradient=True
    )

    assert not result.success
    assert result.saw_nonfinite
    assert len(trials) <= rule.max_trials
    assert_armijo(phi, derphi(0.0), result, rule.c1)  # the best point found is still usable


def test_armijo_asks_for_values_only():
    assert BacktrackingArmijo().needs_gradient is False
    assert StrongWolfe().needs_gradient is True


def test_armijo_with_a_projected_decrease_model_uses_it():
    # decrease(a) replaces a * derphi0 (projection arcs); here a model capped at -0.1
    phi = lambda a: (a - 1.0) ** 2  # noqa: E731
    rule = BacktrackingArmijo(c1=0.5)

    result, _ = drive(
        rule.search(phi(0.0), -2.0, 1.0, decrease=lambda a: max(-2.0 * a, -0.1)),
        phi,
        phi,
        with_gradient=False,
    )

    assert result.success
    assert phi(result.alpha) <= phi(0.0) + 0.5 * max(-2.0 * result.alpha, -0.1)


def test_strong_wolfe_on_unbounded_phi_gives_up_in_bounded_trials():
    rule = StrongWolfe()
    phi, derphi = (lambda a: -a), (lambda a: -1.0)

    result, trials = drive(rule.search(0.0, -1.0, 1.0), phi, derphi, with_gradient=True)

    assert not result.success
    assert len(trials) <= rule.max_trials
    assert math.isfinite(result.alpha) and result.alpha > 0


@pytest.mark.parametrize("rule", [StrongWolfe(), BacktrackingArmijo()], ids=["wolfe", "armijo"])
def test_everything_nonfinite_fails_and_says_so(rule):
    phi = lambda a: math.nan  # noqa: E731

    result, trials = drive(rule.search(1.0, -1.0, 1.0), phi, phi, with_gradient=rule.needs_gradient)

    assert not result.success
    assert result.saw_nonfinite
    assert len(trials) <= rule.max_trials


@pytest.mark.parametrize(
    "make",
    [
        lambda: BacktrackingArmijo(c1=0.0),
        lambda: BacktrackingArmijo(c1=1.0),
        lambda: BacktrackingArmijo(c1=-0.1),
        lambda: BacktrackingArmijo(c1=1.5),
        lambda: BacktrackingArmijo(shrink_min=0.6, shrink_max=0.5),
        lambda: BacktrackingArmijo(shrink_max=1.0),
        lambda: StrongWolfe(c1=0.0),
        lambda: StrongWolfe(c1=1.0, c2=0.9),
        lambda: StrongWolfe(c1=0.5, c2=0.4),
        lambda: StrongWolfe(c1=0.5, c2=0.5),
        lambda: StrongWolfe(c1=1e-4, c2=1.0),
        lambda: StrongWolfe(c1=-1e-4, c2=0.9),
    ],
)
def test_settings_are_checked_when_built(make):
    with pytest.raises(ValueError, match="c1|c2|shrink"):
        make()


# Random smooth 1-D functions: a convex quadratic plus a bounded wiggle, phi'(0) < 0.
@settings(max_examples=150, deadline=None)
@given(
    curvature=st.floats(0.01, 100.0),
    minimizer=st.floats(1e-3, 100.0),
    wiggle=st.floats(0.0, 0.5),
    freq=st.floats(0.1, 10.0),
    alpha0=st.floats(1e-3, 1e3),
    c2=st.sampled_from([0.1, 0.5, 0.9]),
)
def test_strong_wolfe_property(curvature, minimizer, wiggle, freq, alpha0, c2):
    # wiggle * curvature * minimizer / freq * sin(freq a) keeps phi'(0) = -c*m*(1 - wiggle) < 0
    amp = wiggle * curvature * minimizer / freq

    def phi(a):
        return 0.5 * curvature * (a - minimizer) ** 2 + amp * math.sin(freq * a)

    def derphi(a):
        return curvature * (a - minimizer) + amp * freq * math.cos(freq * a)

    assert derphi(0.0) < 0
    rule = StrongWolfe(c1=1e-4, c2=c2)

    result, _ = drive(rule.search(phi(0.0), derphi(0.0), alpha0), phi, derphi, with_gradient=True)

    if result.success:
        assert_strong_wolfe(phi, derphi, result, 1e-4, c2)
    else:  # allowed only as a reported failure that still decreases phi
        assert result.phi <= phi(0.0)


@settings(max_examples=150, deadline=None)
@given(
    curvature=st.floats(0.01, 100.0),
    minimizer=st.floats(1e-3, 100.0),
    alpha0=st.floats(1e-3, 1e3),
    c1=st.sampled_from([1e-4, 0.1, 0.4]),
)
def test_armijo_property(curvature, minimizer, alpha0, c1):
    def phi(a):
        return 0.5 * curvature * (a - minimizer) ** 2

    derphi0 = -curvature * minimizer

    result, _ = drive(
        BacktrackingArmijo(c1=c1).search(phi(0.0), derphi0, alpha0), phi, phi, with_gradient=False
    )

    assert result.success
    assert_armijo(phi, derphi0, result, c1)
    # a quadratic: interpolation lands on or past the exact minimizer's Armijo region
    assert result.alpha >= min(alpha0, 0.1 * 2 * (1 - c1) * minimizer) * (1 - 1e-9)


def test_strong_wolfe_stops_at_alpha_max_and_accepts_it_only_when_asked():
    # phi(a) = (a - 10)^2: the strong Wolfe points are [1, 19], beyond alpha_max = 0.5; a = 0.5 has
    # sufficient decrease and a negative slope (dcsrch's "STP = STPMAX" warning).
    def phi(a: float) -> float:
        return (a - 10.0) ** 2

    def derphi(a: float) -> float:
        return 2.0 * (a - 10.0)

    plain, _ = drive(StrongWolfe().search(phi(0), derphi(0), 1.0, alpha_max=0.5), phi, derphi,
                     with_gradient=True)
    lnsrlb = StrongWolfe(xtol=0.1, accept_at_warning=True)
    taken, _ = drive(lnsrlb.search(phi(0), derphi(0), 1.0, alpha_max=0.5), phi, derphi,
                     with_gradient=True)

    assert not plain.success and plain.alpha <= 0.5
    assert taken.success and taken.alpha == 0.5
    assert taken.phi <= phi(0) + 1e-4 * taken.alpha * derphi(0)
