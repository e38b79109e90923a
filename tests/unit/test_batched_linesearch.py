"""Batched step rules against the scalar generators: per member, the same trial steps in the
same order and the same result, with many different 1-D functions searched in one batch."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch

from workers.solvers import BacktrackingArmijo, StrongWolfe
from workers.solvers._linesearch import _cubicmin_from_origin as cubicmin_scalar
from workers.solvers._linesearch import _dcstep as dcstep_scalar
from workers.solvers._linesearch import _quadmin_from_origin as quadmin_scalar
from workers.solvers.batched._linesearch import (
    BatchedArmijo,
    BatchedStrongWolfe,
    _cubicmin_from_origin,
    _dcstep,
    _quadmin_from_origin,
)

RTOL = 1e-12

# 1-D families phi(a), derphi(a) from + - * / and floor only, so that a member's values are
# bitwise the same inside a float64 batch and in Python floats for the scalar rule.


def _quad(a, p):
    return 0.5 * p["c"] * (a - p["m"]) * (a - p["m"]) + p["off"], p["c"] * (a - p["m"])


def _rosen(a, p):
    y0, y1 = p["x0"] + a * p["d0"], p["x1"] + a * p["d1"]
    r = y1 - y0 * y0
    f = 100.0 * r * r + (1.0 - y0) * (1.0 - y0)
    return f, (-400.0 * y0 * r - 2.0 * (1.0 - y0)) * p["d0"] + 200.0 * r * p["d1"]


def _more_thuente_1(a, p):
    den = a * a + p["beta"]
    return -a / den, (a * a - p["beta"]) / (den * den)


def _more_thuente_2(a, p):
    b = a + 0.004
    b3 = b * b * b
    return b3 * b * b - 2.0 * b3 * b, 5.0 * b3 * b - 8.0 * b3


def _frac(t):
    if isinstance(t, torch.Tensor):
        return t - torch.floor(t)
    return t - (math.floor(t) if math.isfinite(t) else t)


def _noisy(a, p):
    f, g = _quad(a, p)
    return f + p["eps"] * (_frac(a * 7919.3) - 0.5), g + p["eps"] * (_frac(a * 104.729) - 0.5)


def _linear(a, p):
    return p["off"] - p["c"] * a, -p["c"] + 0.0 * a


def _cubic(a, p):
    return a * a * a - 3.0 * a, 3.0 * a * a - 3.0


FAMILIES = [_quad, _rosen, _more_thuente_1, _more_thuente_2, _noisy, _linear, _cubic]
KEYS = ["kind", "c", "m", "off", "x0", "x1", "d0", "d1", "beta", "eps", "lim", "mode",
        "alpha0", "amax", "active"]


def _nonfinite(a, p, f, g):
    beyond = a >= p["lim"]
    mode = p["mode"]
    f = torch.where(beyond & (mode == 0), math.nan, f)
    f = torch.where(beyond & (mode == 1), math.inf, f)
    g = torch.where(beyond & (mode == 2), math.nan, g)
    f = torch.where(beyond & (mode == 3), -math.inf, f)
    f = torch.where(beyond & (a < p["lim"] + 0.3) & (mode == 4), math.nan, f)
    return f, g


def evaluate(alpha, p):
    f = torch.full_like(alpha, math.nan)
    g = torch.full_like(alpha, math.nan)
    for k, family in enumerate(FAMILIES):
        fk, gk = family(alpha, p)
        f = torch.where(p["kind"] == k, fk, f)
        g = torch.where(p["kind"] == k, gk, g)
    return _nonfinite(alpha, p, f, g)


def evaluate_one(a: float, p) -> tuple[float, float]:
    """One member: p holds Python floats (float64) or (1,) tensors (other dtypes)."""
    if isinstance(p["c"], torch.Tensor):
        alpha = torch.tensor([a], dtype=p["c"].dtype)
        f, g = FAMILIES[p["kind"]](alpha, p)
        f, g = _nonfinite(alpha, p, f, g)
        return float(f), float(g)
    f, g = FAMILIES[p["kind"]](a, p)
    if a >= p["lim"]:
        mode = p["mode"]
        if mode == 0 or (mode == 4 and a < p["lim"] + 0.3):
            f = math.nan
        f = math.inf if mode == 1 else -math.inf if mode == 3 else f
        g = math.nan if mode == 2 else g
    return f, g


def _member(kind, **kw):
    row = dict.fromkeys(KEYS, 0.0)
    row.update(kind=kind, c=1.0, m=1.0, beta=2.0, lim=math.inf, mode=-1, alpha0=1.0,
               amax=math.inf, active=1.0)
    row.update(kw)
    return row


def _rosen_member(gen, steepest: bool, **kw):
    x0, x1 = (torch.rand(2, generator=gen, dtype=torch.float64) * 4 - 2).tolist()
    g0 = -400 * x0 * (x1 - x0 * x0) - 2 * (1 - x0)
    g1 = 200 * (x1 - x0 * x0)
    if steepest:
        n = math.hypot(g0, g1)
        d0, d1 = -g0 / n, -g1 / n
    else:
        d0, d1 = torch.randn(2, generator=gen, dtype=torch.float64).tolist()
        if d0 * g0 + d1 * g1 > 0:
            d0, d1 = -d0, -d1
    return _member(1, x0=x0, x1=x1, d0=d0, d1=d1, **kw)


def build_members():
    gen = torch.Generator().manual_seed(1234)
    rows = []
    for c in [0.01, 1.0, 100.0, 1e4]:
        for m in [1e-3, 0.3, 1.0, 5.0, 40.0, 1e4]:
            rows.append(_member(0, c=c, m=m, off=c - 3.0))
    for alpha0 in [0.0, -1.0, math.nan, 1e3, 1e-6, 1e12]:
        rows.append(_member(0, c=2.0, m=0.7, alpha0=alpha0))
    for i in range(14):
        rows.append(_rosen_member(gen, steepest=i % 2 == 0, alpha0=[1.0, 1e-3, 0.1][i % 3]))
    for beta in [2.0, 0.004, 0.1]:
        for alpha0 in [1e-3, 0.1, 1.0, 10.0, 1e3]:
            rows.append(_member(2, beta=beta, alpha0=alpha0))
    for alpha0 in [1e-3, 0.1, 1.0, 10.0]:
        rows.append(_member(3, alpha0=alpha0))
    # f resolved only to its noise, the slope barely informative: stale brackets, xtol, rounding
    for c, eps in [(1e-6, 1e-9), (1.0, 1e-6), (1e-3, 1e-3), (1e-12, 1e-13), (1.0, 0.3)]:
        for m in [1.0, 30.0]:
            rows.append(_member(4, c=c, m=m, eps=eps, off=1.0))
    for c in [1e-17, 1e-30]:  # rounding plateaus in f around 1
        rows.append(_member(0, c=c, m=1.0, off=1.0))
    rows.append(_member(0, c=1e-300, m=1e-10, off=0.0))
    for amax in [math.inf, 50.0, 1e-3]:
        rows.append(_member(5, c=1.0, amax=amax))
    rows.append(_member(6, alpha0=0.5))
    rows.append(_member(6, alpha0=3.0))
    # alpha_max below the minimizer: dcsrch's "stp = stpmax" warning
    for amax in [0.5, 2.0, 1e-3, 9.999]:
        rows.append(_member(0, c=2.0, m=10.0, amax=amax))
    # non-finite beyond a step: f NaN, f +inf, derphi NaN, f -inf
    for mode in range(4):
        for lim, alpha0 in [(0.8, 4.0), (1e-3, 1.0), (0.5, 0.4), (10.0, 1.0), (1e-12, 1.0)]:
            rows.append(_member(0, c=2.0, m=0.5, lim=lim, mode=mode, alpha0=alpha0))
        rows.append(_rosen_member(gen, steepest=True, lim=0.05, mode=mode))
        rows.append(_member(5, c=1.0, lim=30.0, mode=mode))
    for lim in [0.3, 0.45, 1.0, 2.0]:  # NaN inside a bracket: the bracket is dropped
        rows.append(_member(0, c=2.0, m=0.5, lim=lim, mode=4, alpha0=4.0))
    rows.append(_member(0, c=2.0, m=0.5, lim=0.0, mode=0))  # nothing finite at all
    rows.append(_member(0, c=-1.0, m=-1.0))  # concave
    rows.append(_member(0, c=-1.0, m=1.0))  # an ascent direction: derphi0 > 0
    # (for StrongWolfe.search this one raises ZeroDivisionError in _dcstep)
    # f near -1e308 and +1e308: differences overflow and dcstep's next step is NaN
    rows.append(_member(0, c=1.9e307, m=1e-3, off=-1e308, alpha0=4.0))
    # inactive members, one with garbage for its phi0
    rows.append(_member(0, c=1.0, m=1.0, active=0.0))
    rows.append(_member(0, c=math.nan, m=1.0, active=0.0))
    rows.append(_rosen_member(gen, steepest=True, active=0.0))
    return rows


MEMBERS = build_members()
ASCENT = next(i for i, r in enumerate(MEMBERS) if r["c"] == -1.0 and r["m"] == 1.0)


def params(dtype, rows=MEMBERS):
    p = {k: torch.tensor([r[k] for r in rows], dtype=torch.float64) for k in KEYS}
    return {k: v.to(dtype) if k not in ("kind", "mode") else v for k, v in p.items()}


def _same(a: float, b: float, rtol=RTOL, atol=0.0) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or abs(a - b) <= rtol * max(abs(a), abs(b)) + atol


def scalar_runs(rule, p, with_amax: bool):
    """(trial steps, result) per member by the scalar generator; None for inactive members,
    "raised" where the scalar dcstep divides by zero."""
    runs = []
    for i in range(len(p["c"])):
        if p["c"].dtype == torch.float64:
            pi = {k: float(v[i]) for k, v in p.items()}
        else:
            pi = {k: v[i:i + 1] for k, v in p.items()}
        pi["kind"] = int(pi["kind"])
        if not bool(pi["active"]):
            runs.append(None)
            continue
        phi0, derphi0 = evaluate_one(0.0, pi)
        alpha0 = float(pi["alpha0"])
        if isinstance(rule, StrongWolfe):
            amax = float(pi["amax"]) if with_amax else None
            search = rule.search(phi0, derphi0, alpha0, alpha_max=amax)
        else:
            search = rule.search(phi0, derphi0, alpha0)
        trials = []
        try:
            a = next(search)
            while True:
                trials.append(a)
                f, g = evaluate_one(a, pi)
                a = search.send((f, g if rule.needs_gradient else None))
        except StopIteration as done:
            runs.append((trials, done.value))
        except ZeroDivisionError:
            runs.append("raised")
    return runs


def _state(s):
    return {f.name: getattr(s, f.name).clone() for f in fields(s)}


def _assert_unchanged(before, s, idle):
    for name, old in before.items():
        new = getattr(s, name)
        same = old == new
        if old.is_floating_point():
            same = same | (torch.isnan(old) & torch.isnan(new))
        assert bool((same | ~idle).all()), f"{name} changed for a member not searching"


def batched_runs(rule, p, with_amax: bool):
    """(trial steps, search) by the batched rule; non-searching lanes are fed garbage."""
    zero = torch.zeros_like(p["c"])
    phi0, derphi0 = evaluate(zero, p)
    active = p["active"] > 0
    if isinstance(rule, BatchedStrongWolfe):
        s = rule.start(phi0, derphi0, p["alpha0"], active, p["amax"] if with_amax else None)
    else:
        s = rule.start(phi0, derphi0, p["alpha0"], active)
    trials = [[] for _ in range(len(zero))]
    junk = torch.where(torch.arange(len(zero)) % 2 == 0, math.nan, -1e30).to(zero.dtype)
    for _ in range(200):
        if not bool(s.searching.any()):
            break
        for i, (a, on) in enumerate(zip(s.alpha.tolist(), s.searching.tolist(), strict=True)):
            if on:
                trials[i].append(a)
        f, g = evaluate(s.alpha, p)
        idle = ~s.searching
        before = _state(s)
        f = torch.where(idle, junk, f)
        if rule.needs_gradient:
            s = rule.advance(s, f, torch.where(idle, -junk, g))
        else:
            s = rule.advance(s, f)
        _assert_unchanged(before, s, idle)
    else:
        raise AssertionError("the batched search did not finish")
    return trials, s


def compare(scalar, trials, s, rtol=RTOL, atol=0.0):
    """atol applies to phi and derphi, which float32 knows only to its rounding of phi0."""
    raised = []
    for i, run in enumerate(scalar):
        if run is None:
            assert not bool(s.searching[i]) and not bool(s.success[i]) and not trials[i]
            assert float(s.result_alpha[i]) == 0.0 and not bool(s.saw_nonfinite[i])
            continue
        if run == "raised":
            # the batched step is NaN there, which ends the search at its best point
            assert not bool(s.searching[i]) and not bool(s.success[i])
            assert float(s.result_alpha[i]) == 0.0
            raised.append(i)
            continue
        want_trials, want = run
        assert len(trials[i]) == len(want_trials), (i, want_trials, trials[i])
        for a, b in zip(want_trials, trials[i], strict=True):
            assert _same(a, b, rtol), (i, want_trials, trials[i])
        assert bool(s.success[i]) == want.success, i
        assert bool(s.saw_nonfinite[i]) == want.saw_nonfinite, i
        assert _same(want.alpha, float(s.result_alpha[i]), rtol), (i, want, s.result_alpha[i])
        assert _same(want.phi, float(s.result_phi[i]), rtol, atol), (i, want, s.result_phi[i])
        want_der = math.nan if want.derphi is None else want.derphi
        assert _same(want_der, float(s.result_derphi[i]), rtol, atol), (
            i, want, s.result_derphi[i]
        )
        assert _same(float(s.alpha[i]), float(s.result_alpha[i]), 0.0)
    return raised


WOLFE_CONFIGS = [
    ({}, True),
    ({}, False),
    ({"accept_at_warning": True}, True),
    ({"c1": 0.1, "c2": 0.5}, True),
    ({"c2": 0.1}, True),
    ({"c1": 0.3, "c2": 0.35, "accept_at_warning": True}, True),
    ({"c2": 0.1, "xtol": 0.1, "accept_at_warning": True}, True),
    ({"c2": 0.1, "xtol": 0.1}, True),
    ({"max_stale": 2, "c2": 0.01}, True),
    ({"max_trials": 4}, True),
    ({"max_trials": 1}, True),
    ({"max_trials": 0}, True),
    ({"alpha_max": 20.0}, True),
    ({"alpha_max": 20.0}, False),
]


@pytest.mark.parametrize("settings,with_amax", WOLFE_CONFIGS)
def test_strong_wolfe_matches_the_scalar_search_member_by_member(settings, with_amax):
    p = params(torch.float64)
    scalar = scalar_runs(StrongWolfe(**settings), p, with_amax)
    trials, s = batched_runs(BatchedStrongWolfe(**settings), p, with_amax)
    raised = compare(scalar, trials, s)
    # only the concave ascent member, whose first cubic step has q == 0
    assert raised == ([ASCENT] if settings.get("max_trials", 30) > 0 else [])


def test_the_batch_covers_every_way_a_wolfe_search_ends():
    p = params(torch.float64)
    outcomes = set()
    for settings, with_amax in WOLFE_CONFIGS[:3]:
        for run in scalar_runs(StrongWolfe(**settings), p, with_amax):
            if run not in (None, "raised"):
                trials, r = run
                outcomes.add((r.success, r.saw_nonfinite, len(trials) == 1,
                              len(trials) == StrongWolfe().max_trials))
    assert {(True, False, True, False), (True, False, False, False), (False, False, False, False),
            (True, True, False, False), (False, True, False, False)} <= outcomes
    assert any(o[3] for o in outcomes)


ARMIJO_CONFIGS = [
    {},
    {"c1": 0.5},
    {"c1": 0.1, "shrink_min": 0.5, "shrink_max": 0.5},
    {"shrink_min": 0.01, "shrink_max": 0.9},
    {"max_trials": 3},
    {"max_trials": 1},
    {"max_trials": 0},
]


@pytest.mark.parametrize("settings", ARMIJO_CONFIGS)
def test_armijo_matches_the_scalar_search_member_by_member(settings):
    p = params(torch.float64)
    scalar = scalar_runs(BacktrackingArmijo(**settings), p, False)
    trials, s = batched_runs(BatchedArmijo(**settings), p, False)
    compare(scalar, trials, s)
    assert torch.isnan(s.result_derphi).all()


# float32: the scalar rule works in Python floats, so only well-conditioned members follow the
# same path; for those the steps agree to float32 rounding.
FLOAT32_MEMBERS = [r for r in MEMBERS if r["kind"] in (0, 1, 2) and r["mode"] < 0
                   and r["active"] > 0 and 0 < r["alpha0"] <= 1e3
                   and (r["kind"] != 0 or (1e-2 <= r["c"] <= 100 and 1e-3 < r["m"] < 100))]


@pytest.mark.parametrize("rule,batched", [(StrongWolfe(), BatchedStrongWolfe()),
                                           (BacktrackingArmijo(), BatchedArmijo())],
                         ids=["wolfe", "armijo"])
def test_float32_batches_stay_float32_and_follow_the_scalar_path(rule, batched):
    assert len(FLOAT32_MEMBERS) >= 40
    p = params(torch.float32, FLOAT32_MEMBERS)
    scalar = scalar_runs(rule, p, True)
    trials, s = batched_runs(batched, p, True)
    for f in fields(s):
        t = getattr(s, f.name)
        assert t.dtype in (torch.float32, torch.bool, torch.int64), f.name
        assert t.shape == (len(FLOAT32_MEMBERS),)
    compare(scalar, trials, s, rtol=1e-5, atol=1e-4)


def test_no_member_is_evaluated_when_none_is_active():
    p = params(torch.float64)
    phi0, derphi0 = evaluate(torch.zeros_like(p["c"]), p)
    none = torch.zeros_like(phi0, dtype=torch.bool)
    for rule in (BatchedStrongWolfe(), BatchedArmijo()):
        s = rule.start(phi0, derphi0, p["alpha0"], none)
        assert not s.searching.any() and not s.success.any()
        assert (s.alpha == 0).all()


def test_start_and_advance_never_read_values_back(monkeypatch):
    # one host sync per iteration is the engine's; the rules themselves must not add any
    p = params(torch.float64)
    phi0, derphi0 = evaluate(torch.zeros_like(p["c"]), p)

    def sync(*_args, **_kwargs):
        raise AssertionError("host sync inside a step rule")

    for rule in (BatchedStrongWolfe(accept_at_warning=True), BatchedArmijo()):
        with monkeypatch.context() as m:
            for name in ("__bool__", "__float__", "__int__", "item", "tolist", "any", "all",
                         "cpu", "numpy", "nonzero"):
                m.setattr(torch.Tensor, name, sync)
            if isinstance(rule, BatchedStrongWolfe):
                s = rule.start(phi0, derphi0, p["alpha0"], p["active"] > 0, p["amax"])
            else:
                s = rule.start(phi0, derphi0, p["alpha0"], p["active"] > 0)
            for _ in range(3):
                s = rule.advance(s, *evaluate(s.alpha, p))
        assert s.searching.any()


def test_settings_carry_over_and_are_checked():
    wolfe = StrongWolfe(c1=0.2, c2=0.3, max_trials=7, accept_at_warning=True, max_stale=3)
    assert BatchedStrongWolfe.of(wolfe) == BatchedStrongWolfe(
        c1=0.2, c2=0.3, max_trials=7, accept_at_warning=True, max_stale=3
    )
    assert BatchedArmijo.of(BacktrackingArmijo(c1=0.3, shrink_min=0.2)) == BatchedArmijo(
        c1=0.3, shrink_min=0.2
    )
    assert BatchedStrongWolfe().needs_gradient and not BatchedArmijo().needs_gradient
    with pytest.raises(ValueError, match="c1"):
        BatchedStrongWolfe(c1=0.5, c2=0.4)
    with pytest.raises(ValueError, match="shrink"):
        BatchedArmijo(shrink_min=0.6, shrink_max=0.5)


# The interpolation helpers on inputs drawn to reach every case of the scalar if/elif chains.


def _draws(gen, n):
    u = torch.rand(n, 12, generator=gen, dtype=torch.float64) * 4 - 2
    zeros = torch.rand(n, 3, generator=gen) < 0.15
    signed = torch.rand(n, 3, generator=gen) < 0.5
    for j, col in enumerate((2, 5, 8)):  # dx, dy, dp: some zeros of either sign
        z = torch.where(signed[:, j], -0.0, 0.0).to(torch.float64)
        u[:, col] = torch.where(zeros[:, j], z, u[:, col])
    return u


def test_dcstep_picks_the_scalar_case_and_step():
    gen = torch.Generator().manual_seed(7)
    u = _draws(gen, 4000)
    brackt = torch.rand(4000, generator=gen) < 0.5
    u[:, 9] = torch.minimum(u[:, 0], u[:, 6]) - u[:, 9].abs()  # stpmin
    u[:, 10] = torch.maximum(u[:, 0], u[:, 6]) + u[:, 10].abs()  # stpmax
    rows, want = [], []
    for k in range(len(u)):
        args = u[k, :11].tolist()
        try:
            out = dcstep_scalar(*args[:9], bool(brackt[k]), args[9], args[10])
        except ZeroDivisionError:
            continue
        rows.append(k)
        want.append(out)
    assert len(rows) > 3500
    idx = torch.tensor(rows)
    cols = [u[idx, j] for j in range(11)]
    got = _dcstep(*cols[:9], brackt[idx], cols[9], cols[10])
    for j in range(8):
        for w, g in zip((o[j] for o in want), got[j].tolist(), strict=True):
            assert (w == g) if j == 7 else _same(float(w), g), (j, w, g)
    # every case of the chain was drawn
    fx, fp, dx, dp = cols[1], cols[7], cols[2], cols[8]
    higher = fp > fx
    opposite = ~higher & (dx * dp < 0)
    shrinking = ~higher & ~opposite & (dp.abs() < dx.abs())
    rest = ~higher & ~opposite & ~shrinking
    for case in (higher, opposite, shrinking & brackt[idx], shrinking & ~brackt[idx],
                 rest & brackt[idx], rest & ~brackt[idx]):
        assert case.sum() > 50


def test_interpolation_helpers_match_the_scalar_ones():
    gen = torch.Generator().manual_seed(11)
    u = _draws(gen, 3000)
    u[:100, 3] = u[:100, 4]  # a1 == a0: no cubic
    u[100:200, 4] = 2 * u[100:200, 3]
    phi0, derphi0, a1, phi1, a0, phi_a0 = (u[:, j] for j in (0, 1, 3, 6, 4, 7))
    qv, qok = _quadmin_from_origin(phi0, derphi0, a1, phi1)
    cv, cok = _cubicmin_from_origin(phi0, derphi0, a1, phi1, a0, phi_a0)
    for k in range(len(u)):
        args = [float(t[k]) for t in (phi0, derphi0, a1, phi1, a0, phi_a0)]
        q = quadmin_scalar(*args[:4])
        assert bool(qok[k]) == (q is not None)
        assert q is None or _same(q, float(qv[k]))
        c = cubicmin_scalar(*args)
        assert bool(cok[k]) == (c is not None), (k, args)
        assert c is None or _same(c, float(cv[k]), 1e-10), (k, c, float(cv[k]))
    assert qok.float().mean() > 0.2 and cok.float().mean() > 0.2
