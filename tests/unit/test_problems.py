"""Checks for workers.solvers.problems (the test-problem library).

* f(x0) against values printed in the MGH literature (6 significant digits),
  and against a second, independent, loop-by-loop numpy transcription of every
  residual written straight from the MGH paper's formulas;
* stored f* against the published six-digit minimum, and fun(x_star) == f_star;
* autograd gradient vs. central finite differences; torch.func.grad / vmap /
  float32 work (no .item(), no in-place, dtype-agnostic);
* as an independent check, scipy BFGS (jac = autograd) from x0 reaches f* or
  one of the accepted local minima; bounded problems get a scipy L-BFGS-B
  reference.
"""

from __future__ import annotations

import math
import os
import sys
import warnings

import numpy as np
import pytest
import torch

try:
    from workers.solvers.problems import (
        TestProblem,
        bounded_problems,
        default_f_atol,
        extended_powell,
        extended_rosenbrock,
        quadratic,
        standard_problems,
    )
except ImportError:  # running from a checkout without the repo root on sys.path
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
    from workers.solvers.problems import (  # noqa: E402
        TestProblem,
        bounded_problems,
        default_f_atol,
        extended_powell,
        extended_rosenbrock,
        quadratic,
        standard_problems,
    )

scipy_optimize = pytest.importorskip("scipy.optimize")

STANDARD = standard_problems()
BOUNDED = bounded_problems()
ALL = STANDARD + BOUNDED
BY_NAME = {p.name: p for p in ALL}


def _ids(ps):
    return [p.name for p in ps]


# ---------------------------------------------------------------------------
# Published values
# ---------------------------------------------------------------------------

# f(x0) as printed (6 significant digits) in the MGH-based literature.
PUBLISHED_F0 = {
    "rosenbrock": 24.2,
    "freudenstein_roth": 400.5,
    "powell_badly_scaled": 1.13526,
    "brown_badly_scaled": 9.99998e11,
    "beale": 14.2031,
    "jennrich_sampson": 4171.31,
    "helical_valley": 2500.0,
    "bard": 41.6817,
    "gaussian": 3.88811e-6,
    "meyer": 1.69361e9,
    "box3d": 1031.15,
    "powell_singular": 215.0,
    "wood": 19192.0,
    "brown_dennis": 7.92669e6,
    "osborne1": 0.879026,
    "biggs_exp6": 0.779070,
    "watson_6": 30.0,
    "watson_9": 30.0,
    "extended_rosenbrock_10": 121.0,
    "extended_powell_8": 430.0,
    "penalty1_4": 885.063,
    "penalty2_4": 2.34001,
    "variably_dimensioned_10": 2.19855e6,
    "linear_full_rank_5_10": 25.0,
}

# Minimum values as printed by MGH (1981).  The library stores refined values
# which must round to these.
PUBLISHED_F_STAR = {
    "jennrich_sampson": 124.362,
    "bard": 8.21487e-3,
    "gaussian": 1.12793e-8,
    "meyer": 87.9458,
    "kowalik_osborne": 3.07505e-4,
    "brown_dennis": 85822.2,
    "osborne1": 5.46489e-5,
    "osborne2": 4.01377e-2,
    "watson_6": 2.28767e-3,
    "watson_9": 1.39976e-6,
    "penalty1_4": 2.24998e-5,
    "penalty1_10": 7.08765e-5,
    "penalty2_4": 9.37629e-6,
    "penalty2_10": 2.93660e-4,
    "chebyquad_8": 3.51687e-3,
    "linear_full_rank_5_10": 5.0,
    "linear_rank1_5_10": 2.14286,  # m(m-1)/(2(2m+1)), m = 10
    "linear_rank1_zero_5_10": 3.64706,  # (m^2+3m-6)/(2(2m-3)), m = 10
}
PUBLISHED_ALT = {
    "freudenstein_roth": 48.9842,
    "biggs_exp6": 5.65565e-3,
    "trigonometric_10": 2.79506e-5,
}

# ---------------------------------------------------------------------------
# Independent numpy transcription (explicit loops, 1-based like the paper)
# ---------------------------------------------------------------------------


def _np_residual(name: str, x: np.ndarray) -> np.ndarray:  # noqa: C901 - a big table
    x = [None] + [float(v) for v in x]  # 1-based
    n = len(x) - 1
    r = []
    if name in ("rosenbrock", "extended_rosenbrock_10"):
        for i in range(1, n // 2 + 1):
            r += [10 * (x[2 * i] - x[2 * i - 1] ** 2), 1 - x[2 * i - 1]]
    elif name == "freudenstein_roth":
        r = [
            -13 + x[1] + ((5 - x[2]) * x[2] - 2) * x[2],
            -29 + x[1] + ((x[2] + 1) * x[2] - 14) * x[2],
        ]
    elif name == "powell_badly_scaled":
        r = [1e4 * x[1] * x[2] - 1, math.exp(-x[1]) + math.exp(-x[2]) - 1.0001]
    elif name == "brown_badly_scaled":
        r = [x[1] - 1e6, x[2] - 2e-6, x[1] * x[2] - 2]
    elif name == "beale":
        y = [None, 1.5, 2.25, 2.625]
        r = [y[i] - x[1] * (1 - x[2] ** i) for i in (1, 2, 3)]
    elif name == "jennrich_sampson":
        r = [2 + 2 * i - (math.exp(i * x[1]) + math.exp(i * x[2])) for i in range(1, 11)]
    elif name == "helical_valley":
        if x[1] > 0:
            th = math.atan(x[2] / x[1]) / (2 * math.pi)
        elif x[1] < 0:
            th = math.atan(x[2] / x[1]) / (2 * math.pi) + 0.5
        else:
            th = 0.25 if x[2] >= 0 else -0.25
        r = [10 * (x[3] - 10 * th), 10 * (math.sqrt(x[1] ** 2 + x[2] ** 2) - 1), x[3]]
    elif name == "bard":
        y = [
            0.14,
            0.18,
            0.22,
            0.25,
            0.29,
            0.32,
            0.35,
            0.39,
            0.37,
            0.58,
            0.73,
            0.96,
            1.34,
            2.10,
            4.39,
        ]
        for i in range(1, 16):
            u, v = i, 16 - i
            w = min(u, v)
            r.append(y[i - 1] - (x[1] + u / (v * x[2] + w * x[3])))
    elif name == "gaussian":
        y = [
            0.0009,
            0.0044,
            0.0175,
            0.0540,
            0.1295,
            0.2420,
            0.3521,
            0.3989,
            0.3521,
            0.2420,
            0.1295,
            0.0540,
            0.0175,
            0.0044,
            0.0009,
        ]
        for i in range(1, 16):
            t = (8 - i) / 2
            r.append(x[1] * math.exp(-x[2] * (t - x[3]) ** 2 / 2) - y[i - 1])
    elif name == "meyer":
        y = [
            34780,
            28610,
            23650,
            19630,
            16370,
            13720,
            11540,
            9744,
            8261,
            7030,
            6005,
            5147,
            4427,
            3820,
            3307,
            2872,
        ]
        for i in range(1, 17):
            t = 45 + 5 * i
            r.append(x[1] * math.exp(x[2] / (t + x[3])) - y[i - 1])
    elif name == "gulf":
        for i in range(1, 100):
            t = i / 100
            y = 25 + (-50 * math.log(t)) ** (2 / 3)
            r.append(math.exp(-(abs(y - x[2]) ** x[3]) / x[1]) - t)
    elif name == "box3d":
        for i in range(1, 11):
            t = 0.1 * i
            r.append(
                math.exp(-t * x[1])
                - math.exp(-t * x[2])
                - x[3] * (math.exp(-t) - math.exp(-10 * t))
            )
    elif name in ("powell_singular", "extended_powell_8"):
        for i in range(1, n // 4 + 1):
            a, b, c, d = x[4 * i - 3], x[4 * i - 2], x[4 * i - 1], x[4 * i]
            r += [a + 10 * b, 5**0.5 * (c - d), (b - 2 * c) ** 2, 10**0.5 * (a - d) ** 2]
    elif name == "wood":
        r = [
            10 * (x[2] - x[1] ** 2),
            1 - x[1],
            90**0.5 * (x[4] - x[3] ** 2),
            1 - x[3],
            10**0.5 * (x[2] + x[4] - 2),
            10**-0.5 * (x[2] - x[4]),
        ]
    elif name == "kowalik_osborne":
        y = [0.1957, 0.1947, 0.1735, 0.1600, 0.0844, 0.0627, 0.0456, 0.0342, 0.0323, 0.0235, 0.0246]
        u = [4, 2, 1, 0.5, 0.25, 0.167, 0.125, 0.1, 0.0833, 0.0714, 0.0625]
        for i in range(11):
            r.append(y[i] - x[1] * (u[i] ** 2 + u[i] * x[2]) / (u[i] ** 2 + u[i] * x[3] + x[4]))
    elif name == "brown_dennis":
        for i in range(1, 21):
            t = i / 5
            r.append(
                (x[1] + t * x[2] - math.exp(t)) ** 2
                + (x[3] + x[4] * math.sin(t) - math.cos(t)) ** 2
            )
    elif name == "osborne1":
        y = [
            0.844,
            0.908,
            0.932,
            0.936,
            0.925,
            0.908,
            0.881,
            0.850,
            0.818,
            0.784,
            0.751,
            0.718,
            0.685,
            0.658,
            0.628,
            0.603,
            0.580,
            0.558,
            0.538,
            0.522,
            0.506,
            0.490,
            0.478,
            0.467,
            0.457,
            0.448,
            0.438,
            0.431,
            0.424,
            0.420,
            0.414,
            0.411,
            0.406,
        ]
        for i in range(1, 34):
            t = 10 * (i - 1)
            r.append(y[i - 1] - (x[1] + x[2] * math.exp(-t * x[4]) + x[3] * math.exp(-t * x[5])))
    elif name == "biggs_exp6":
        for i in range(1, 14):
            t = 0.1 * i
            y = math.exp(-t) - 5 * math.exp(-10 * t) + 3 * math.exp(-4 * t)
            r.append(
                x[3] * math.exp(-t * x[1])
                - x[4] * math.exp(-t * x[2])
                + x[6] * math.exp(-t * x[5])
                - y
            )
    elif name == "osborne2":
        y = [
            1.366,
            1.191,
            1.112,
            1.013,
            0.991,
            0.885,
            0.831,
            0.847,
            0.786,
            0.725,
            0.746,
            0.679,
            0.608,
            0.655,
            0.616,
            0.606,
            0.602,
            0.626,
            0.651,
            0.724,
            0.649,
            0.649,
            0.694,
            0.644,
            0.624,
            0.661,
            0.612,
            0.558,
            0.533,
            0.495,
            0.500,
            0.423,
            0.395,
            0.375,
            0.372,
            0.391,
            0.396,
            0.405,
            0.428,
            0.429,
            0.523,
            0.562,
            0.607,
            0.653,
            0.672,
            0.708,
            0.633,
            0.668,
            0.645,
            0.632,
            0.591,
            0.559,
            0.597,
            0.625,
            0.739,
            0.710,
            0.729,
            0.720,
            0.636,
            0.581,
            0.428,
            0.292,
            0.162,
            0.098,
            0.054,
        ]
        assert len(y) == 65
        for i in range(1, 66):
            t = (i - 1) / 10
            r.append(
                y[i - 1]
                - (
                    x[1] * math.exp(-t * x[5])
                    + x[2] * math.exp(-((t - x[9]) ** 2) * x[6])
                    + x[3] * math.exp(-((t - x[10]) ** 2) * x[7])
                    + x[4] * math.exp(-((t - x[11]) ** 2) * x[8])
                )
            )
    elif name.startswith("watson"):
        for i in range(1, 30):
            t = i / 29
            s1 = sum((j - 1) * x[j] * t ** (j - 2) for j in range(2, n + 1))
            s2 = sum(x[j] * t ** (j - 1) for j in range(1, n + 1))
            r.append(s1 - s2**2 - 1)
        r += [x[1], x[2] - x[1] ** 2 - 1]
    elif name.startswith("penalty1"):
        r = [1e-5**0.5 * (x[i] - 1) for i in range(1, n + 1)]
        r.append(sum(x[j] ** 2 for j in range(1, n + 1)) - 0.25)
    elif name.startswith("penalty2"):
        a = 1e-5
        r = [x[1] - 0.2]
        for i in range(2, n + 1):
            y = math.exp(i / 10) + math.exp((i - 1) / 10)
            r.append(a**0.5 * (math.exp(x[i] / 10) + math.exp(x[i - 1] / 10) - y))
        for i in range(n + 1, 2 * n):
            r.append(a**0.5 * (math.exp(x[i - n + 1] / 10) - math.exp(-1 / 10)))
        r.append(sum((n - j + 1) * x[j] ** 2 for j in range(1, n + 1)) - 1)
    elif name.startswith("variably_dimensioned"):
        r = [x[i] - 1 for i in range(1, n + 1)]
        s = sum(j * (x[j] - 1) for j in range(1, n + 1))
        r += [s, s**2]
    elif name.startswith("trigonometric"):
        sc = sum(math.cos(x[j]) for j in range(1, n + 1))
        r = [n - sc + i * (1 - math.cos(x[i])) - math.sin(x[i]) for i in range(1, n + 1)]
    elif name.startswith("brown_almost_linear"):
        s = sum(x[1:])
        r = [x[i] + s - (n + 1) for i in range(1, n)]
        r.append(math.prod(x[1:]) - 1)
    elif name.startswith("discrete_boundary_value"):
        h = 1 / (n + 1)
        xx = x + [0.0]
        xx[0] = 0.0
        for i in range(1, n + 1):
            t = i * h
            r.append(2 * xx[i] - xx[i - 1] - xx[i + 1] + h**2 * (xx[i] + t + 1) ** 3 / 2)
    elif name.startswith("discrete_integral_equation"):
        h = 1 / (n + 1)
        t = [j * h for j in range(n + 1)]
        for i in range(1, n + 1):
            s1 = sum(t[j] * (x[j] + t[j] + 1) ** 3 for j in range(1, i + 1))
            s2 = sum((1 - t[j]) * (x[j] + t[j] + 1) ** 3 for j in range(i + 1, n + 1))
            r.append(x[i] + h * ((1 - t[i]) * s1 + t[i] * s2) / 2)
    elif name.startswith("broyden_tridiagonal"):
        xx = x + [0.0]
        xx[0] = 0.0
        r = [(3 - 2 * xx[i]) * xx[i] - xx[i - 1] - 2 * xx[i + 1] + 1 for i in range(1, n + 1)]
    elif name.startswith("broyden_banded"):
        for i in range(1, n + 1):
            s = sum(x[j] * (1 + x[j]) for j in range(max(1, i - 5), min(n, i + 1) + 1) if j != i)
            r.append(x[i] * (2 + 5 * x[i] ** 2) + 1 - s)
    elif name.startswith("linear_full_rank"):
        m = 10
        s = sum(x[1:])
        r = [x[i] - 2 * s / m - 1 for i in range(1, n + 1)] + [
            -2 * s / m - 1 for _ in range(n + 1, m + 1)
        ]
    elif name.startswith("linear_rank1_zero"):
        m = 10
        s = sum(j * x[j] for j in range(2, n))
        r = [-1.0] + [(i - 1) * s - 1 for i in range(2, m)] + [-1.0]
    elif name.startswith("linear_rank1"):
        m = 10
        s = sum(j * x[j] for j in range(1, n + 1))
        r = [i * s - 1 for i in range(1, m + 1)]
    elif name.startswith("chebyquad"):
        for i in range(1, n + 1):
            # shifted Chebyshev T_i on [0, 1] through the cosine form on the
            # interior and the recurrence otherwise (independent of the library)
            vals = []
            for j in range(1, n + 1):
                z = 2 * x[j] - 1
                if abs(z) <= 1:
                    vals.append(math.cos(i * math.acos(z)))
                else:
                    vals.append(
                        math.cosh(i * math.acosh(abs(z))) * (1 if z > 0 or i % 2 == 0 else -1)
                    )
            integral = -1 / (i * i - 1) if i % 2 == 0 else 0.0
            r.append(sum(vals) / n - integral)
    else:
        raise KeyError(name)
    return np.array(r, dtype=float)


# ---------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------


def test_suite_shape():
    names = [p.name for p in ALL]
    assert len(names) == len(set(names)), "duplicate problem names"
    assert sum("mgh" in p.tags for p in STANDARD) >= 30
    for p in ALL:
        assert isinstance(p, TestProblem)
        assert len(p.x0) == p.n
        assert p.f_atol is not None and p.f_atol > 0
        if p.residual is not None:
            r = p.residual(p.x0_tensor())
            assert r.ndim == 1 and r.shape[0] == p.m, p.name
            assert p.m >= p.n, p.name  # MGH require m >= n


def test_testproblem_not_collected_by_pytest():
    assert TestProblem.__test__ is False


@pytest.mark.parametrize("p", ALL, ids=_ids(ALL))
def test_fun_is_sum_of_squares(p):
    if p.residual is None:
        pytest.skip("not a least-squares problem")
    x = p.x0_tensor() + 0.01
    r = p.residual(x)
    assert torch.allclose(p.fun(x), torch.sum(r * r), rtol=1e-14, atol=0.0)


# ---------------------------------------------------------------------------
# Values at x0
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PUBLISHED_F0), ids=sorted(PUBLISHED_F0))
def test_f_x0_published(name):
    p = BY_NAME[name]
    f0 = float(p.fun(p.x0_tensor()))
    ref = PUBLISHED_F0[name]
    assert abs(f0 - ref) <= 5e-6 * abs(ref) + 1e-300, (f0, ref)


@pytest.mark.parametrize("p", STANDARD, ids=_ids(STANDARD))
def test_residual_matches_independent_numpy(p):
    if p.residual is None:
        pytest.skip("no residual")
    rng = np.random.default_rng(0)
    x0 = np.array(p.x0)
    pts = [x0, x0 + 0.05 * rng.standard_normal(p.n) * np.maximum(1.0, np.abs(x0))]
    if p.name == "helical_valley":  # exercise every branch of theta
        pts += [np.array([-0.7, -0.4, 0.3]), np.array([-0.7, 0.4, 0.3]), np.array([0.7, -0.4, 0.3])]
    for x in pts:
        got = p.residual(torch.tensor(x)).numpy()
        ref = _np_residual(p.name, x)
        np.testing.assert_allclose(
            got, ref, rtol=1e-11, atol=1e-11 * (1 + np.max(np.abs(ref))), err_msg=p.name
        )


# ---------------------------------------------------------------------------
# Minima
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PUBLISHED_F_STAR), ids=sorted(PUBLISHED_F_STAR))
def test_f_star_matches_published(name):
    p = BY_NAME[name]
    ref = PUBLISHED_F_STAR[name]
    assert abs(p.f_star - ref) <= 5e-6 * abs(ref), (p.f_star, ref)


@pytest.mark.parametrize("name", sorted(PUBLISHED_ALT), ids=sorted(PUBLISHED_ALT))
def test_alt_minima_match_published(name):
    p = BY_NAME[name]
    ref = PUBLISHED_ALT[name]
    assert any(abs(a - ref) <= 5e-6 * abs(ref) for a in p.alt_f_stars), (p.alt_f_stars, ref)
    assert p.is_solved(ref) and not p.is_solved(ref * 1.01 + 1e-3)


@pytest.mark.parametrize(
    "p",
    [p for p in ALL if p.x_star is not None and p.f_star_known],
    ids=_ids([p for p in ALL if p.x_star is not None and p.f_star_known]),
)
def test_fun_at_x_star(p):
    xs = p.x_star_tensor()
    f = float(p.fun(xs))
    assert abs(f - p.f_star) <= max(p.f_atol * 1e-2, 1e-12 * abs(p.f_star)), (f, p.f_star)
    if p.bounds is not None:
        lo, hi = p.lower_upper()
        assert torch.all(xs >= lo) and torch.all(xs <= hi)
    else:  # x_star is stationary
        g = torch.func.grad(p.fun)(xs)
        scale = 1.0 + float(torch.linalg.vector_norm(torch.func.grad(p.fun)(p.x0_tensor())))
        assert float(g.norm()) <= 1e-6 * scale, p.name


def test_is_solved():
    p = BY_NAME["rosenbrock"]
    assert p.is_solved(0.0) and p.is_solved(5e-9) and not p.is_solved(2e-8)
    assert not p.is_solved(float("nan"))
    fr = BY_NAME["freudenstein_roth"]
    assert fr.is_solved(48.98425) and not fr.is_solved(49.0)
    assert default_f_atol(0.0) == 1e-8
    assert default_f_atol(1.12793e-8) == pytest.approx(1.12793e-11)
    assert default_f_atol(87.9458) == pytest.approx(87.9458e-6)


# ---------------------------------------------------------------------------
# Derivatives, dtype, torch.func
# ---------------------------------------------------------------------------


def _fd_grad(f, x: torch.Tensor) -> torch.Tensor:
    g = torch.empty_like(x)
    for i in range(x.shape[0]):
        h = 1e-6 * max(1.0, abs(float(x[i])))
        e = torch.zeros_like(x)
        e[i] = h
        g[i] = (f(x + e) - f(x - e)) / (2 * h)
    return g


@pytest.mark.parametrize("p", ALL, ids=_ids(ALL))
def test_gradient_matches_finite_differences(p):
    x = p.x0_tensor().requires_grad_(True)
    (g,) = torch.autograd.grad(p.fun(x), x)
    with torch.no_grad():
        gfd = _fd_grad(p.fun, x.detach())
    # FD truncation/rounding error scales like eps*|f|/h: compare against that floor too
    f0 = abs(float(p.fun(x.detach())))
    tol = 1e-6 * float(g.abs().max()) + 1e-8 * (1 + f0)
    assert float((g - gfd).abs().max()) <= tol, (p.name, g, gfd)


@pytest.mark.parametrize("p", ALL, ids=_ids(ALL))
def test_torch_func_and_dtypes(p):
    x0 = p.x0_tensor()
    g_auto = torch.autograd.functional.jacobian(p.fun, x0)
    g_func = torch.func.grad(p.fun)(x0)
    torch.testing.assert_close(g_func, g_auto, rtol=1e-12, atol=1e-12)
    # vmap over a small batch of points
    X = torch.stack([x0, x0 + 0.01, x0 - 0.02])
    fv = torch.func.vmap(p.fun)(X)
    torch.testing.assert_close(fv, torch.stack([p.fun(x) for x in X]), rtol=1e-12, atol=1e-300)
    if p.residual is not None:
        Jr = torch.func.jacrev(p.residual)(x0)
        assert Jr.shape == (p.m, p.n)
    # float32 in -> float32 out, close to the float64 value
    f32 = p.fun(p.x0_tensor(dtype=torch.float32))
    assert f32.dtype == torch.float32 and f32.ndim == 0
    f64 = p.fun(x0)
    assert math.isclose(float(f32), float(f64), rel_tol=1e-3, abs_tol=1e-6), (
        float(f32),
        float(f64),
    )


def test_variable_size_constructors():
    for n in (2, 4, 6, 20):
        p = extended_rosenbrock(n)
        assert p.n == n and float(p.fun(p.x0_tensor())) == pytest.approx(24.2 * n / 2)
        assert float(p.fun(p.x_star_tensor())) == 0.0
    for n in (4, 12):
        p = extended_powell(n)
        assert float(p.fun(p.x0_tensor())) == pytest.approx(215.0 * n / 4)
    with pytest.raises(ValueError):
        extended_rosenbrock(3)
    with pytest.raises(ValueError):
        extended_powell(6)


@pytest.mark.parametrize("n,cond", [(20, 10.0), (20, 1e4), (5, 1e6)])
def test_quadratic(n, cond):
    p = quadratic(n, cond, seed=3)
    xs = p.x_star_tensor()
    H = torch.func.hessian(p.fun)(xs)
    ev = torch.linalg.eigvalsh(H)
    assert float(ev.min()) == pytest.approx(1.0, rel=1e-8)
    assert float(ev.max() / ev.min()) == pytest.approx(cond, rel=1e-6)
    g = torch.func.grad(p.fun)(xs)
    assert float(g.abs().max()) <= 1e-9 * cond
    assert float(p.fun(xs)) == pytest.approx(p.f_star, rel=1e-12)
    # reproducible for a given seed, different across seeds
    assert quadratic(n, cond, seed=3).x_star == p.x_star
    assert quadratic(n, cond, seed=4).x_star != p.x_star


# ---------------------------------------------------------------------------
# Independent check with scipy
# ---------------------------------------------------------------------------

# Problems scipy BFGS (jac = autograd, gtol 1e-10) does NOT solve from x0.
# With scipy 1.17 every standard problem is solved -- three of them only to a
# published *local* value accepted through alt_f_stars:
#   freudenstein_roth -> 48.9842 (local min), biggs_exp6 -> 5.65565e-3
#   (a saddle point, see the problem's note), trigonometric_10 -> 2.79506e-5.
# L-BFGS-B (ftol 1e-15) instead fails on powell_badly_scaled (2.4e-7),
# jennrich_sampson (214.3: a different basin) and meyer (88.62); that is a
# fact about L-BFGS-B, not about the problems, and is not asserted here.
SCIPY_BFGS_FAILURES: dict[str, str] = {}


def _fg(p):
    def f(x):
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        v = p.fun(xt)
        (g,) = torch.autograd.grad(v, xt)
        return float(v), g.numpy()

    return f


@pytest.mark.parametrize("p", STANDARD, ids=_ids(STANDARD))
def test_scipy_bfgs_reaches_f_star(p):
    if p.name in SCIPY_BFGS_FAILURES:
        pytest.xfail(SCIPY_BFGS_FAILURES[p.name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = scipy_optimize.minimize(
            _fg(p),
            np.array(p.x0),
            jac=True,
            method="BFGS",
            options={"gtol": 1e-10, "maxiter": 20000},
        )
    assert p.is_solved(res.fun), (p.name, res.fun, p.f_star, p.alt_f_stars)


def _lbfgsb_reference(p, n_starts: int = 4):
    lo, hi = (np.array(v) for v in zip(*p.bounds, strict=True))
    rng = np.random.default_rng(1)
    starts = [np.array(p.x0)] + [
        lo + (hi - lo) * rng.uniform(0.2, 0.8, p.n) for _ in range(n_starts - 1)
    ]
    best = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in starts:
            r = scipy_optimize.minimize(
                _fg(p),
                s,
                jac=True,
                method="L-BFGS-B",
                bounds=list(p.bounds),
                options={"ftol": 1e-15, "gtol": 1e-11, "maxiter": 20000, "maxfun": 50000},
            )
            if best is None or r.fun < best.fun:
                best = r
    return best


@pytest.mark.parametrize("p", BOUNDED, ids=_ids(BOUNDED))
def test_bounded_reference_with_lbfgsb(p):
    assert p.bounds is not None and len(p.bounds) == p.n
    lo, hi = p.lower_upper()
    x0 = p.x0_tensor()
    assert torch.all(lo <= x0) and torch.all(x0 <= hi), "x0 must be feasible"
    ref = _lbfgsb_reference(p)
    x = ref.x
    assert np.all(x >= lo.numpy() - 1e-12) and np.all(x <= hi.numpy() + 1e-12)
    at_bound = np.isclose(x, lo.numpy(), atol=1e-8) | np.isclose(x, hi.numpy(), atol=1e-8)
    assert at_bound.any(), f"{p.name}: no bound active at the reference solution"
    if p.f_star_known:
        assert abs(ref.fun - p.f_star) <= p.f_atol, (ref.fun, p.f_star)
    assert p.is_solved(ref.fun, f_ref=ref.fun)
    # the bounds cut off the unconstrained minimum: the bounded optimum is strictly worse
    base = BY_NAME.get(p.name.removesuffix("_bounded"))
    if p.name == "quadratic_10_cond100_box":
        base = quadratic(10, 100.0, seed=1)
    assert base is not None and base.bounds is None
    assert ref.fun > base.f_star + 10 * base.f_atol, (ref.fun, base.f_star)
