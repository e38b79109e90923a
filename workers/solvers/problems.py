"""Standard optimization test problems in torch, with known minima.

Mostly the Moré–Garbow–Hillstrom (MGH) collection:

    J. J. Moré, B. S. Garbow, K. E. Hillstrom, "Testing Unconstrained
    Optimization Software", ACM TOMS 7(1):17-41, 1981.

MGH problems are nonlinear least squares: ``f(x) = sum_i r_i(x)**2`` (no 1/2
factor, exactly as MGH define it).  ``residual`` gives ``r(x)``; ``fun`` gives
``f(x)``.  The problem numbers below ("MGH #k") are the numbers in the paper.

Conventions
-----------
* Every function is plain torch: vectorized over coordinates, differentiable by
  autograd and ``torch.func`` (no ``.item()``, no in-place ops on inputs, no
  Python branching on tensor values), and dtype/device agnostic (constants are
  created with the dtype/device of ``x``).  The only Python loops are over a
  small fixed degree (Chebyquad's Chebyshev recurrence).
* ``f_star`` is the published minimum value.  Where MGH print it only to six
  digits we store a value refined to ~double precision by a tight
  Levenberg–Marquardt solve started from ``x0`` (the test suite checks that
  every refined value rounds to the published one).  ``x_star`` is a point with
  ``fun(x_star) == f_star`` up to rounding when one is known.
* Some MGH problems have published *local* minima that a correct local solver
  may legitimately converge to from ``x0``; they are listed in ``alt_f_stars``
  and accepted by :meth:`TestProblem.is_solved`.
* ``f_atol``: absolute tolerance on ``f - f_star`` to call a run solved.
  Default: ``1e-8`` when ``f_star == 0``, otherwise ``max(1e-6*|f*|,
  min(1e-8, 1e-3*|f*|))`` (so tiny nonzero optima such as Gaussian's 1.1e-8
  need three correct digits rather than being "solved" by anything below 1e-8).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "TestProblem",
    "standard_problems",
    "bounded_problems",
    "all_problems",
    "get_problem",
    "extended_rosenbrock",
    "extended_powell",
    "quadratic",
    "default_f_atol",
]


def default_f_atol(f_star: float) -> float:
    if f_star == 0.0:
        return 1e-8
    a = abs(f_star)
    return max(1e-6 * a, min(1e-8, 1e-3 * a))


@dataclass(frozen=True)
class TestProblem:
    """One test problem.  ``fun(x)`` takes a 1-D tensor of length ``n``."""

    __test__ = False  # keep pytest from trying to collect this class

    name: str
    n: int
    x0: tuple[float, ...]
    residual: Callable[[Tensor], Tensor] | None
    fun: Callable[[Tensor], Tensor]
    f_star: float
    x_star: tuple[float, ...] | None
    bounds: tuple[tuple[float, float], ...] | None = None
    f_atol: float | None = None  # None -> default_f_atol(f_star), filled in __post_init__
    alt_f_stars: tuple[float, ...] = ()  # published local minima a local solver may find
    f_star_known: bool = True  # False: f_star is a placeholder (0.0); compute a reference
    m: int | None = None  # number of residuals for least-squares problems
    source: str = ""
    note: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if len(self.x0) != self.n:
            raise ValueError(f"{self.name}: len(x0)={len(self.x0)} != n={self.n}")
        if self.x_star is not None and len(self.x_star) != self.n:
            raise ValueError(f"{self.name}: len(x_star) != n")
        if self.bounds is not None and len(self.bounds) != self.n:
            raise ValueError(f"{self.name}: len(bounds) != n")
        if self.f_atol is None:
            object.__setattr__(self, "f_atol", default_f_atol(self.f_star))

    def x0_tensor(
        self, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu"
    ) -> Tensor:
        return torch.tensor(self.x0, dtype=dtype, device=device)

    def x_star_tensor(
        self, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu"
    ) -> Tensor | None:
        if self.x_star is None:
            return None
        return torch.tensor(self.x_star, dtype=dtype, device=device)

    def lower_upper(
        self, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu"
    ) -> tuple[Tensor, Tensor] | None:
        if self.bounds is None:
            return None
        lo = torch.tensor([b[0] for b in self.bounds], dtype=dtype, device=device)
        hi = torch.tensor([b[1] for b in self.bounds], dtype=dtype, device=device)
        return lo, hi

    @property
    def accepted_f_stars(self) -> tuple[float, ...]:
        return (self.f_star,) + tuple(self.alt_f_stars)

    def is_solved(self, f_value: float, f_ref: float | None = None) -> bool:
        """True if ``f_value`` is within tolerance of f_star (or ``f_ref``) or
        of one of the accepted local minima.  Values *below* f_star count as
        solved (f_star is an approximation)."""
        f_value = float(f_value)
        if not math.isfinite(f_value):
            return False
        target = self.f_star if f_ref is None else float(f_ref)
        tol = self.f_atol if f_ref is None else max(self.f_atol, default_f_atol(target))
        if f_value - target <= tol:
            return True
        # alternative minima may be six-digit published values: allow 1e-5 relative
        return any(
            abs(f_value - a) <= max(default_f_atol(a), 1e-5 * abs(a)) for a in self.alt_f_stars
        )


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _c(x: Tensor, values) -> Tensor:
    """Constant tensor with x's dtype and device."""
    return torch.as_tensor(values, dtype=x.dtype, device=x.device)


def _ar(x: Tensor, start: float, stop: float) -> Tensor:
    """arange(start, stop) with x's dtype/device (1-based indices etc.)."""
    return torch.arange(start, stop, dtype=x.dtype, device=x.device)


def _sumsq(res: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def f(x: Tensor) -> Tensor:
        r = res(x)
        return torch.sum(r * r)

    f.__name__ = getattr(res, "__name__", "f") + "_sumsq"
    return f


def _ls(
    name,
    n,
    x0,
    res,
    f_star,
    x_star=None,
    *,
    m,
    alt=(),
    note="",
    source="MGH",
    f_atol=None,
    tags=("mgh",),
):
    return TestProblem(
        name=name,
        n=n,
        x0=tuple(float(v) for v in x0),
        residual=res,
        fun=_sumsq(res),
        f_star=float(f_star),
        x_star=None if x_star is None else tuple(float(v) for v in x_star),
        f_atol=f_atol,
        alt_f_stars=tuple(float(a) for a in alt),
        m=m,
        source=source,
        note=note,
        tags=tuple(tags),
    )


# --------------------------------------------------------------------------
# MGH residuals (fixed size)
# --------------------------------------------------------------------------


def _freudenstein_roth(x):  # MGH #2
    x1, x2 = x[0], x[1]
    return torch.stack(
        [
            -13.0 + x1 + ((5.0 - x2) * x2 - 2.0) * x2,
            -29.0 + x1 + ((x2 + 1.0) * x2 - 14.0) * x2,
        ]
    )


def _powell_badly_scaled(x):  # MGH #3
    return torch.stack([1e4 * x[0] * x[1] - 1.0, torch.exp(-x[0]) + torch.exp(-x[1]) - 1.0001])


def _brown_badly_scaled(x):  # MGH #4
    return torch.stack([x[0] - 1e6, x[1] - 2e-6, x[0] * x[1] - 2.0])


_BEALE_Y = (1.5, 2.25, 2.625)


def _beale(x):  # MGH #5
    i = _ar(x, 1, 4)
    return _c(x, _BEALE_Y) - x[0] * (1.0 - x[1] ** i)


def _jennrich_sampson(x):  # MGH #6, m = 10
    i = _ar(x, 1, 11)
    return 2.0 + 2.0 * i - (torch.exp(i * x[0]) + torch.exp(i * x[1]))


def _helical_valley(x):  # MGH #7
    x1, x2, x3 = x[0], x[1], x[2]
    # MGH: theta = atan(x2/x1)/(2 pi) for x1 > 0, + 0.5 for x1 < 0.
    # atan2 agrees except for x1 < 0, x2 < 0 where it is lower by exactly 1.
    th = torch.atan2(x2, x1) / (2.0 * math.pi)
    th = torch.where((x1 < 0) & (x2 < 0), th + 1.0, th)
    return torch.stack(
        [
            10.0 * (x3 - 10.0 * th),
            10.0 * (torch.sqrt(x1 * x1 + x2 * x2) - 1.0),
            x3,
        ]
    )


_BARD_Y = (0.14, 0.18, 0.22, 0.25, 0.29, 0.32, 0.35, 0.39, 0.37, 0.58, 0.73, 0.96, 1.34, 2.10, 4.39)


def _bard(x):  # MGH #8, m = 15
    u = _ar(x, 1, 16)
    v = 16.0 - u
    w = torch.minimum(u, v)
    return _c(x, _BARD_Y) - (x[0] + u / (v * x[1] + w * x[2]))


# fmt: off
_GAUSSIAN_Y = (
    0.0009, 0.0044, 0.0175, 0.0540, 0.1295, 0.2420, 0.3521, 0.3989, 0.3521, 0.2420, 0.1295,
    0.0540, 0.0175, 0.0044, 0.0009
)
# fmt: on


def _gaussian(x):  # MGH #9, m = 15
    t = (8.0 - _ar(x, 1, 16)) / 2.0
    return x[0] * torch.exp(-x[1] * (t - x[2]) ** 2 / 2.0) - _c(x, _GAUSSIAN_Y)


# fmt: off
_MEYER_Y = (
    34780.0, 28610.0, 23650.0, 19630.0, 16370.0, 13720.0, 11540.0, 9744.0, 8261.0, 7030.0,
    6005.0, 5147.0, 4427.0, 3820.0, 3307.0, 2872.0
)
# fmt: on


def _meyer(x):  # MGH #10, m = 16
    t = 45.0 + 5.0 * _ar(x, 1, 17)
    return x[0] * torch.exp(x[1] / (t + x[2])) - _c(x, _MEYER_Y)


_GULF_M = 99


def _gulf(x):  # MGH #11, m = 99 (MGH allow n <= m <= 100)
    t = _ar(x, 1, _GULF_M + 1) / 100.0
    y = 25.0 + (-50.0 * torch.log(t)) ** (2.0 / 3.0)
    return torch.exp(-(torch.abs(y - x[1]) ** x[2]) / x[0]) - t


def _box3d(x):  # MGH #12, m = 10
    t = 0.1 * _ar(x, 1, 11)
    return (
        torch.exp(-t * x[0]) - torch.exp(-t * x[1]) - x[2] * (torch.exp(-t) - torch.exp(-10.0 * t))
    )


def _powell_singular(x):  # MGH #13
    return torch.stack(
        [
            x[0] + 10.0 * x[1],
            math.sqrt(5.0) * (x[2] - x[3]),
            (x[1] - 2.0 * x[2]) ** 2,
            math.sqrt(10.0) * (x[0] - x[3]) ** 2,
        ]
    )


def _wood(x):  # MGH #14
    return torch.stack(
        [
            10.0 * (x[1] - x[0] ** 2),
            1.0 - x[0],
            math.sqrt(90.0) * (x[3] - x[2] ** 2),
            1.0 - x[2],
            math.sqrt(10.0) * (x[1] + x[3] - 2.0),
            (x[1] - x[3]) / math.sqrt(10.0),
        ]
    )


_KO_Y = (0.1957, 0.1947, 0.1735, 0.1600, 0.0844, 0.0627, 0.0456, 0.0342, 0.0323, 0.0235, 0.0246)
_KO_U = (4.0, 2.0, 1.0, 0.5, 0.25, 0.167, 0.125, 0.1, 0.0833, 0.0714, 0.0625)


def _kowalik_osborne(x):  # MGH #15, m = 11
    u = _c(x, _KO_U)
    return _c(x, _KO_Y) - x[0] * (u * u + u * x[1]) / (u * u + u * x[2] + x[3])


def _brown_dennis(x):  # MGH #16, m = 20
    t = _ar(x, 1, 21) / 5.0
    a = x[0] + t * x[1] - torch.exp(t)
    b = x[2] + x[3] * torch.sin(t) - torch.cos(t)
    return a * a + b * b


# fmt: off
_OSB1_Y = (
    0.844, 0.908, 0.932, 0.936, 0.925, 0.908, 0.881, 0.850, 0.818, 0.784, 0.751, 0.718,
    0.685, 0.658, 0.628, 0.603, 0.580, 0.558, 0.538, 0.522, 0.506, 0.490, 0.478, 0.467,
    0.457, 0.448, 0.438, 0.431, 0.424, 0.420, 0.414, 0.411, 0.406
)
# fmt: on


def _osborne1(x):  # MGH #17, m = 33
    t = 10.0 * _ar(x, 0, 33)
    return _c(x, _OSB1_Y) - (x[0] + x[1] * torch.exp(-t * x[3]) + x[2] * torch.exp(-t * x[4]))


def _biggs_exp6(x):  # MGH #18, m = 13
    t = 0.1 * _ar(x, 1, 14)
    y = torch.exp(-t) - 5.0 * torch.exp(-10.0 * t) + 3.0 * torch.exp(-4.0 * t)
    return (
        x[2] * torch.exp(-t * x[0]) - x[3] * torch.exp(-t * x[1]) + x[5] * torch.exp(-t * x[4]) - y
    )


# fmt: off
_OSB2_Y = (
    1.366, 1.191, 1.112, 1.013, 0.991, 0.885, 0.831, 0.847, 0.786, 0.725, 0.746, 0.679,
    0.608, 0.655, 0.616, 0.606, 0.602, 0.626, 0.651, 0.724, 0.649, 0.649, 0.694, 0.644,
    0.624, 0.661, 0.612, 0.558, 0.533, 0.495, 0.500, 0.423, 0.395, 0.375, 0.372, 0.391,
    0.396, 0.405, 0.428, 0.429, 0.523, 0.562, 0.607, 0.653, 0.672, 0.708, 0.633, 0.668,
    0.645, 0.632, 0.591, 0.559, 0.597, 0.625, 0.739, 0.710, 0.729, 0.720, 0.636, 0.581,
    0.428, 0.292, 0.162, 0.098, 0.054
)
# fmt: on


def _osborne2(x):  # MGH #19, m = 65
    t = _ar(x, 0, 65) / 10.0
    model = (
        x[0] * torch.exp(-t * x[4])
        + x[1] * torch.exp(-((t - x[8]) ** 2) * x[5])
        + x[2] * torch.exp(-((t - x[9]) ** 2) * x[6])
        + x[3] * torch.exp(-((t - x[10]) ** 2) * x[7])
    )
    return _c(x, _OSB2_Y) - model


# --------------------------------------------------------------------------
# MGH residuals (variable size n)
# --------------------------------------------------------------------------


def _watson(x):  # MGH #20, m = 31
    n = x.shape[0]
    t = _ar(x, 1, 30) / 29.0  # (29,)
    P = t[:, None] ** _ar(x, 0, n)[None, :]  # t_i^(j-1), j = 1..n
    s1 = P[:, : n - 1] @ (_ar(x, 1, n) * x[1:])  # sum_{j>=2} (j-1) x_j t^(j-2)
    s2 = P @ x  # sum_j x_j t^(j-1)
    r = s1 - s2 * s2 - 1.0
    return torch.cat([r, torch.stack([x[0], x[1] - x[0] ** 2 - 1.0])])


def _penalty1(x):  # MGH #23, m = n + 1
    return torch.cat([math.sqrt(1e-5) * (x - 1.0), (torch.sum(x * x) - 0.25).reshape(1)])


def _penalty2(x):  # MGH #24, m = 2n
    n = x.shape[0]
    sa = math.sqrt(1e-5)
    i = _ar(x, 2, n + 1)
    y = torch.exp(i / 10.0) + torch.exp((i - 1.0) / 10.0)
    e = torch.exp(x / 10.0)
    r_mid = sa * (e[1:] + e[:-1] - y)
    r_tail = sa * (e[1:] - math.exp(-0.1))
    r_last = torch.sum((n - _ar(x, 0, n)) * x * x) - 1.0
    return torch.cat([(x[0] - 0.2).reshape(1), r_mid, r_tail, r_last.reshape(1)])


def _variably_dimensioned(x):  # MGH #25, m = n + 2
    n = x.shape[0]
    s = torch.sum(_ar(x, 1, n + 1) * (x - 1.0))
    return torch.cat([x - 1.0, s.reshape(1), (s * s).reshape(1)])


def _trigonometric(x):  # MGH #26, m = n
    n = x.shape[0]
    i = _ar(x, 1, n + 1)
    c = torch.cos(x)
    return n - torch.sum(c) + i * (1.0 - c) - torch.sin(x)


def _brown_almost_linear(x):  # MGH #27, m = n
    n = x.shape[0]
    s = torch.sum(x)
    return torch.cat([x[:-1] + s - (n + 1.0), (torch.prod(x) - 1.0).reshape(1)])


def _discrete_bv(x):  # MGH #28, m = n
    n = x.shape[0]
    h = 1.0 / (n + 1)
    t = _ar(x, 1, n + 1) * h
    z = x.new_zeros(1)
    xp = torch.cat([z, x, z])
    return 2.0 * x - xp[:-2] - xp[2:] + h * h * (x + t + 1.0) ** 3 / 2.0


def _discrete_ie(x):  # MGH #29, m = n
    n = x.shape[0]
    h = 1.0 / (n + 1)
    t = _ar(x, 1, n + 1) * h
    c = (x + t + 1.0) ** 3
    s1 = torch.cumsum(t * c, 0)  # sum_{j<=i} t_j c_j
    w = (1.0 - t) * c
    s2 = torch.sum(w) - torch.cumsum(w, 0)  # sum_{j>i} (1-t_j) c_j
    return x + h * ((1.0 - t) * s1 + t * s2) / 2.0


def _broyden_tridiagonal(x):  # MGH #30, m = n
    z = x.new_zeros(1)
    xp = torch.cat([z, x, z])
    return (3.0 - 2.0 * x) * x - xp[:-2] - 2.0 * xp[2:] + 1.0


def _broyden_banded(x):  # MGH #31, m = n, ml = 5, mu = 1
    n = x.shape[0]
    i = torch.arange(n, device=x.device)
    d = i[None, :] - i[:, None]  # j - i
    band = ((d >= -5) & (d <= 1) & (d != 0)).to(x.dtype)
    return x * (2.0 + 5.0 * x * x) + 1.0 - band @ (x * (1.0 + x))


def _make_linear_full_rank(m: int):  # MGH #32
    def r(x):
        n = x.shape[0]
        s = torch.sum(x) * (2.0 / m)
        return torch.cat([x - s - 1.0, (-s - 1.0).expand(m - n)])

    r.__name__ = f"linear_full_rank_m{m}"
    return r


def _make_linear_rank1(m: int):  # MGH #33
    def r(x):
        n = x.shape[0]
        s = torch.sum(_ar(x, 1, n + 1) * x)
        return _ar(x, 1, m + 1) * s - 1.0

    r.__name__ = f"linear_rank1_m{m}"
    return r


def _make_linear_rank1_zero(m: int):  # MGH #34
    def r(x):
        n = x.shape[0]
        s = torch.sum(_ar(x, 2, n) * x[1 : n - 1])  # sum_{j=2}^{n-1} j x_j
        i = _ar(x, 1, m + 1)
        coef = torch.where((i == 1) | (i == m), torch.zeros_like(i), i - 1.0)
        return coef * s - 1.0

    r.__name__ = f"linear_rank1_zero_m{m}"
    return r


def _chebyquad(x):  # MGH #35, m = n
    n = x.shape[0]
    y = 2.0 * x - 1.0
    # shifted Chebyshev polynomials T_i(2x-1), i = 1..m by the three-term recurrence
    t_prev, t_cur = torch.ones_like(y), y
    rows = [t_cur]
    for _ in range(2, n + 1):
        t_prev, t_cur = t_cur, 2.0 * y * t_cur - t_prev
        rows.append(t_cur)
    T = torch.stack(rows)  # (m, n)
    i = _ar(x, 1, n + 1)
    integ = torch.where(torch.remainder(i, 2.0) == 0, -1.0 / (i * i - 1.0), torch.zeros_like(i))
    return torch.mean(T, dim=1) - integ


def _extended_rosenbrock(x):  # MGH #21
    xo, xe = x[0::2], x[1::2]
    return torch.stack([10.0 * (xe - xo * xo), 1.0 - xo], dim=1).reshape(-1)


def _extended_powell(x):  # MGH #22
    a, b, c, d = x[0::4], x[1::4], x[2::4], x[3::4]
    return torch.stack(
        [
            a + 10.0 * b,
            math.sqrt(5.0) * (c - d),
            (b - 2.0 * c) ** 2,
            math.sqrt(10.0) * (a - d) ** 2,
        ],
        dim=1,
    ).reshape(-1)


# --------------------------------------------------------------------------
# Problem constructors
# --------------------------------------------------------------------------


def extended_rosenbrock(n: int) -> TestProblem:
    """MGH #21 (n even): r_{2i-1} = 10(x_{2i} - x_{2i-1}^2), r_{2i} = 1 - x_{2i-1}."""
    if n < 2 or n % 2:
        raise ValueError("extended_rosenbrock needs an even n >= 2")
    name = "rosenbrock" if n == 2 else f"extended_rosenbrock_{n}"
    return _ls(
        name,
        n,
        (-1.2, 1.0) * (n // 2),
        _extended_rosenbrock,
        0.0,
        (1.0,) * n,
        m=n,
        source="MGH #1" if n == 2 else "MGH #21",
    )


def extended_powell(n: int) -> TestProblem:
    """MGH #22 (n multiple of 4); n = 4 is Powell singular (MGH #13)."""
    if n < 4 or n % 4:
        raise ValueError("extended_powell needs n a positive multiple of 4")
    name = "powell_singular" if n == 4 else f"extended_powell_{n}"
    return _ls(
        name,
        n,
        (3.0, -1.0, 0.0, 1.0) * (n // 4),
        _extended_powell,
        0.0,
        (0.0,) * n,
        m=n,
        source="MGH #13" if n == 4 else "MGH #22",
        note="singular Hessian at the minimizer: Newton-type methods converge only linearly",
    )


def quadratic(n: int, condition: float, seed: int = 0) -> TestProblem:
    """f(x) = 0.5 x^T A x - b^T x, A = Q diag(lam) Q^T SPD with eigenvalues
    log-spaced in [1, condition]; x* is drawn first and b = A x*, so the
    minimizer is known exactly; f* = -0.5 b^T x*.  x0 = 0."""
    g = torch.Generator().manual_seed(int(seed))
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = (
        torch.logspace(0.0, math.log10(condition), n, dtype=torch.float64)
        if n > 1
        else torch.ones(1, dtype=torch.float64)
    )
    A = (q * lam) @ q.T
    A = 0.5 * (A + A.T)
    xs = torch.randn(n, generator=g, dtype=torch.float64)
    b = A @ xs
    f_star = float(-0.5 * (b @ xs))

    def fun(x: Tensor) -> Tensor:
        Ax = A.to(dtype=x.dtype, device=x.device)
        bx = b.to(dtype=x.dtype, device=x.device)
        return 0.5 * (x @ (Ax @ x)) - bx @ x

    fun.__name__ = f"quadratic_{n}_{condition:g}_{seed}"
    cond = f"{condition:g}".replace("+", "")
    return TestProblem(
        name=f"quadratic_{n}_cond{cond}" + (f"_seed{seed}" if seed else ""),
        n=n,
        x0=(0.0,) * n,
        residual=None,
        fun=fun,
        f_star=f_star,
        x_star=tuple(xs.tolist()),
        f_atol=max(1e-10, 1e-8 * abs(f_star)),
        source="synthetic",
        note=f"SPD quadratic, eigenvalues log-spaced in [1, {condition:g}]",
        tags=("quadratic",),
    )


# Refined minima.  Each value was obtained by a Levenberg-Marquardt solve with
# tolerances 1e-15 from x0 (or from the published x*) and rounds to the value
# printed by MGH (which is kept in the comment and checked in the tests).


def _mgh_fixed() -> list[TestProblem]:
    P = []
    P.append(extended_rosenbrock(2))
    P.append(
        _ls(
            "freudenstein_roth",
            2,
            (0.5, -2.0),
            _freudenstein_roth,
            0.0,
            (5.0, 4.0),
            m=2,
            alt=(48.984253679240005,),  # MGH: 48.9842... at (11.41..., -0.8968...)
            source="MGH #2",
            note="local minimum f=48.9842 at (11.41, -0.8968) is reached by many descent "
            "methods from x0",
        )
    )
    P.append(
        _ls(
            "powell_badly_scaled",
            2,
            (0.0, 1.0),
            _powell_badly_scaled,
            0.0,
            (1.0981593296998185e-05, 9.1061467398665155),
            m=2,
            source="MGH #3",
        )
    )
    P.append(
        _ls(
            "brown_badly_scaled",
            2,
            (1.0, 1.0),
            _brown_badly_scaled,
            0.0,
            (1e6, 2e-6),
            m=3,
            source="MGH #4",
            note="f(x0) ~ 1e12; the 1e-8 tolerance is relative 1e-20",
        )
    )
    P.append(_ls("beale", 2, (1.0, 1.0), _beale, 0.0, (3.0, 0.5), m=3, source="MGH #5"))
    P.append(
        _ls(
            "jennrich_sampson",
            2,
            (0.3, 0.4),
            _jennrich_sampson,
            124.362182355615,  # MGH 124.362
            (0.25782521377301715, 0.25782521356772137),
            m=10,
            source="MGH #6",
        )
    )
    P.append(
        _ls(
            "helical_valley",
            3,
            (-1.0, 0.0, 0.0),
            _helical_valley,
            0.0,
            (1.0, 0.0, 0.0),
            m=3,
            source="MGH #7",
        )
    )
    P.append(
        _ls(
            "bard",
            3,
            (1.0, 1.0, 1.0),
            _bard,
            8.21487730657896e-03,  # MGH 8.21487e-3
            (0.08241055993978326, 1.1330360984113617, 2.343695172502699),
            m=15,
            alt=(17.4286,),  # MGH: 17.4286... at (0.8406..., -inf, -inf)
            source="MGH #8",
            note="second 'minimum' 17.4286 is at infinity (x2, x3 -> -inf)",
        )
    )
    P.append(
        _ls(
            "gaussian",
            3,
            (0.4, 1.0, 0.0),
            _gaussian,
            1.12793276961854e-08,  # MGH 1.12793e-8
            (0.39895613783922829, 1.0000190844925336, 0.0),
            m=15,
            source="MGH #9",
        )
    )
    P.append(
        _ls(
            "meyer",
            3,
            (0.02, 4000.0, 250.0),
            _meyer,
            87.9458551703187,  # MGH 87.9458
            (5.6096364754557940e-03, 6.1813463456283052e03, 3.4522363460198375e02),
            m=16,
            source="MGH #10",
            note="very badly scaled; first-order methods usually fail",
        )
    )
    P.append(
        _ls(
            "gulf",
            3,
            (5.0, 2.5, 0.15),
            _gulf,
            0.0,
            (50.0, 25.0, 1.5),
            m=_GULF_M,
            source="MGH #11",
            note="m = 99",
        )
    )
    P.append(
        _ls(
            "box3d",
            3,
            (0.0, 10.0, 20.0),
            _box3d,
            0.0,
            (1.0, 10.0, 1.0),
            m=10,
            source="MGH #12",
            note="also f=0 at (10, 1, -1) and on the line x1 = x2, x3 = 0",
        )
    )
    P.append(extended_powell(4))
    P.append(
        _ls(
            "wood",
            4,
            (-3.0, -1.0, -3.0, -1.0),
            _wood,
            0.0,
            (1.0, 1.0, 1.0, 1.0),
            m=6,
            source="MGH #14",
        )
    )
    P.append(
        _ls(
            "kowalik_osborne",
            4,
            (0.25, 0.39, 0.415, 0.39),
            _kowalik_osborne,
            3.07505603849237e-04,  # MGH 3.07505e-4
            (0.19280693471324126, 0.19128232569410925, 0.12305650626619188, 0.13606232931307108),
            m=11,
            alt=(1.02734e-03,),  # MGH: 1.02734... at (+inf, -14.07..., -inf, -inf)
            source="MGH #15",
            note="second 'minimum' 1.02734e-3 is at infinity",
        )
    )
    P.append(
        _ls(
            "brown_dennis",
            4,
            (25.0, 5.0, -5.0, -1.0),
            _brown_dennis,
            85822.2016263563,  # MGH 85822.2
            (-11.594439904762172, 13.203630051207206, -0.4034394881768595, 0.23677877445573633),
            m=20,
            source="MGH #16",
        )
    )
    P.append(
        _ls(
            "osborne1",
            5,
            (0.5, 1.5, -1.0, 0.01, 0.02),
            _osborne1,
            5.4648946974825e-05,  # MGH 5.46489e-5
            (
                0.37541005210455136,
                1.9358469124043485,
                -1.4646871363038585,
                0.01286753463944583,
                0.0221226996629476,
            ),
            m=33,
            source="MGH #17",
        )
    )
    P.append(
        _ls(
            "biggs_exp6",
            6,
            (1.0, 2.0, 1.0, 1.0, 1.0, 1.0),
            _biggs_exp6,
            0.0,
            (1.0, 10.0, 1.0, 5.0, 4.0, 3.0),
            m=13,
            alt=(5.655649925499913e-03,),  # MGH 5.65565e-3 (m=13)
            source="MGH #18",
            note="global f=0 at (1,10,1,5,4,3).  MGH also list f=5.65565e-3; BFGS/L-BFGS reach "
            "it from x0 at about (1.7114, 17.683, 1.1627, 5.1866, 1.7114, 1.1636) -- x1 == x5, "
            "and the Hessian "
            "there has a negative eigenvalue (-9.8e-3 along x1 - x5): it is a saddle point, not a "
            "local minimum, but it is accepted as the published value",
        )
    )
    P.append(
        _ls(
            "osborne2",
            11,
            (1.3, 0.65, 0.65, 0.7, 0.6, 3.0, 5.0, 7.0, 2.0, 4.5, 5.5),
            _osborne2,
            4.01377362935477e-02,  # MGH 4.01377e-2
            (
                1.3099771545847887,
                0.4315537945034089,
                0.6336616989242795,
                0.5994305347159402,
                0.754183226054429,
                0.9042885806651565,
                1.365811834867342,
                4.82369881754151,
                2.3986848661819877,
                4.568874597643337,
                5.675341470591143,
            ),
            m=65,
            source="MGH #19",
        )
    )
    return P


# n = 10: the discrete boundary value and discrete integral equation problems
# share the same solution (the integral equation is the discretized BVP).
# fmt: off
_DBV_XSTAR = (
    -0.04316498251876487, -0.08157715653538688, -0.11448571438052927, -0.14097357686259668,
    -0.1599086961819831, -0.16987720231277491, -0.16908998378120833, -0.15524953522183182,
    -0.12535589167893497, -0.07541653368589207
)
# fmt: on


def _mgh_variable() -> list[TestProblem]:
    P = []
    P.append(
        _ls(
            "watson_6",
            6,
            (0.0,) * 6,
            _watson,
            2.28767005355234e-03,  # MGH 2.28767e-3
            (
                -0.01572508665466319,
                1.0124348693428276,
                -0.23299162576122137,
                1.2604300859278905,
                -1.5137289199018116,
                0.99299643072718,
            ),
            m=31,  # MGH 2.28767e-3
            source="MGH #20",
        )
    )
    P.append(
        _ls(
            "watson_9",
            9,
            (0.0,) * 9,
            _watson,
            1.39976013809053e-06,  # MGH 1.39976e-6
            (
                -1.5307036876939596e-05,
                9.9978970393625211e-01,
                1.4763963493967712e-02,
                1.4634233027108370e-01,
                1.0008210945503369e00,
                -2.6177311217993937e00,
                4.1044031420826217e00,
                -3.1436122647979352e00,
                1.0526264046050215e00,
            ),
            m=31,  # MGH 1.39976e-6
            source="MGH #20",
            note="ill-conditioned",
        )
    )
    P.append(extended_rosenbrock(10))
    P.append(extended_powell(8))
    P.append(
        _ls(
            "penalty1_4",
            4,
            (1.0, 2.0, 3.0, 4.0),
            _penalty1,
            2.24997750089994e-05,
            (0.2500074995875379,) * 4,
            m=5,  # MGH 2.24998e-5
            source="MGH #23",
        )
    )
    P.append(
        _ls(
            "penalty1_10",
            10,
            tuple(float(j) for j in range(1, 11)),
            _penalty1,
            7.08765146709037e-05,
            (0.15812230111311636,) * 10,
            m=11,
            source="MGH #23",
        )
    )  # MGH 7.08765e-5
    P.append(
        _ls(
            "penalty2_4",
            4,
            (0.5,) * 4,
            _penalty2,
            9.37629300735544e-06,
            (0.1999993333503804, 0.1913167009927725, 0.48010148533262326, 0.5188454043902003),
            m=8,  # MGH 9.37629e-6
            source="MGH #24",
        )
    )
    P.append(
        _ls(
            "penalty2_10",
            10,
            (0.5,) * 10,
            _penalty2,
            2.93660537456746e-04,
            (
                0.19998360519782363,
                0.01035064847129231,
                0.01960493448043841,
                0.03208906722068566,
                0.04993267739964132,
                0.07651399515399361,
                0.1186240728695042,
                0.19214487233557673,
                0.34732058694184365,
                0.36916437415935094,
            ),
            m=20,  # MGH 2.93660e-4
            source="MGH #24",
        )
    )
    n = 10
    P.append(
        _ls(
            "variably_dimensioned_10",
            n,
            tuple(1.0 - j / n for j in range(1, n + 1)),
            _variably_dimensioned,
            0.0,
            (1.0,) * n,
            m=n + 2,
            source="MGH #25",
        )
    )
    P.append(
        _ls(
            "trigonometric_10",
            n,
            (1.0 / n,) * n,
            _trigonometric,
            0.0,
            None,
            m=n,
            alt=(2.795056121877398e-05,),
            source="MGH #26",
            note="MGH: f=0; local minimum 2.79506e-5 for n=10 is commonly reached",
        )
    )
    P.append(
        _ls(
            "brown_almost_linear_10",
            n,
            (0.5,) * n,
            _brown_almost_linear,
            0.0,
            (1.0,) * n,
            m=n,
            alt=(1.0,),
            source="MGH #27",
            note="f=0 at (a,...,a,a^(1-n)) with n a^n - (n+1) a^(n-1) + 1 = 0 (e.g. a=1); "
            "f=1 at (0,...,0,n+1)",
        )
    )
    h = 1.0 / (n + 1)
    xs0 = tuple((j * h) * (j * h - 1.0) for j in range(1, n + 1))
    P.append(
        _ls(
            "discrete_boundary_value_10",
            n,
            xs0,
            _discrete_bv,
            0.0,
            _DBV_XSTAR,
            m=n,
            source="MGH #28",
        )
    )
    P.append(
        _ls(
            "discrete_integral_equation_10",
            n,
            xs0,
            _discrete_ie,
            0.0,
            _DBV_XSTAR,
            m=n,
            source="MGH #29",
        )
    )
    P.append(
        _ls(
            "broyden_tridiagonal_10",
            n,
            (-1.0,) * n,
            _broyden_tridiagonal,
            0.0,
            (
                -0.5707221320112248,
                -0.6818069499842752,
                -0.7022100760176601,
                -0.7055106298950804,
                -0.7049061557287437,
                -0.7014966070298512,
                -0.6918893223547983,
                -0.6657965144058536,
                -0.5960351090263657,
                -0.4164122575286934,
            ),
            m=n,
            source="MGH #30",
        )
    )
    P.append(
        _ls(
            "broyden_banded_10",
            n,
            (-1.0,) * n,
            _broyden_banded,
            0.0,
            (
                -0.4283028635872503,
                -0.47659642435629024,
                -0.5196524636468617,
                -0.5580993248321809,
                -0.5925061568294574,
                -0.624503682199468,
                -0.6232394714405911,
                -0.6213938417965735,
                -0.6204535966590874,
                -0.5864692707204351,
            ),
            m=n,
            source="MGH #31",
        )
    )
    m = 10
    P.append(
        _ls(
            "linear_full_rank_5_10",
            5,
            (1.0,) * 5,
            _make_linear_full_rank(m),
            float(m - 5),
            (-1.0,) * 5,
            m=m,
            source="MGH #32",
            note="f* = m - n at x = -1",
        )
    )
    P.append(
        _ls(
            "linear_rank1_5_10",
            5,
            (1.0,) * 5,
            _make_linear_rank1(m),
            m * (m - 1) / (2.0 * (2 * m + 1)),
            (3.0 / (2 * m + 1), 0.0, 0.0, 0.0, 0.0),
            m=m,
            source="MGH #33",
            note="f* = m(m-1)/(2(2m+1)) on the hyperplane sum_j j x_j = 3/(2m+1)",
        )
    )
    P.append(
        _ls(
            "linear_rank1_zero_5_10",
            5,
            (1.0,) * 5,
            _make_linear_rank1_zero(m),
            (m * m + 3 * m - 6) / (2.0 * (2 * m - 3)),
            (0.0, 3.0 / (2.0 * (2 * m - 3)), 0.0, 0.0, 0.0),
            m=m,
            source="MGH #34",
            note="f* = (m^2+3m-6)/(2(2m-3)) on the hyperplane sum_{j=2}^{n-1} j x_j = 3/(2m-3)",
        )
    )
    P.append(
        _ls(
            "chebyquad_8",
            8,
            tuple(j / 9.0 for j in range(1, 9)),
            _chebyquad,
            3.51687372567792e-03,  # MGH 3.51687e-3
            (
                0.04315276032794305,
                0.19309084054333664,
                0.26632870686626087,
                0.4999999999280661,
                0.5000000000719338,
                0.733671293133739,
                0.8069091594566634,
                0.956847239672057,
            ),
            m=8,
            source="MGH #35",
        )
    )
    return P


_QUADRATIC_SPECS = ((20, 10.0), (20, 1e4))


def standard_problems() -> list[TestProblem]:
    """The suite every unconstrained method runs on."""
    P = _mgh_fixed() + _mgh_variable()
    P += [quadratic(n, c) for n, c in _QUADRATIC_SPECS]
    return P


# --------------------------------------------------------------------------
# Bound-constrained problems
# --------------------------------------------------------------------------


def _bounded(
    base: TestProblem,
    name: str,
    bounds,
    *,
    x0=None,
    f_star=0.0,
    x_star=None,
    f_star_known=False,
    note="",
) -> TestProblem:
    x0 = base.x0 if x0 is None else tuple(float(v) for v in x0)
    for v, (lo, hi) in zip(x0, bounds, strict=True):
        if not lo <= v <= hi:
            raise ValueError(f"{name}: x0 not feasible")
    return TestProblem(
        name=name,
        n=base.n,
        x0=x0,
        residual=base.residual,
        fun=base.fun,
        f_star=float(f_star),
        x_star=None if x_star is None else tuple(float(v) for v in x_star),
        bounds=tuple((float(lo), float(hi)) for lo, hi in bounds),
        f_star_known=f_star_known,
        m=base.m,
        source=base.source + " (bounded)",
        note=note,
        tags=base.tags + ("bounded",),
    )


def bounded_problems() -> list[TestProblem]:
    """Bound-constrained problems.  Bounds here were chosen for this suite
    (to make bounds active at the solution), not taken from a publication.
    Where ``f_star_known`` is False, ``f_star`` is 0.0 and a reference must be
    computed (the tests use scipy L-BFGS-B)."""
    base = {p.name: p for p in _mgh_fixed()}
    P = []
    rb = base["rosenbrock"]
    # x1 <= 0.5 cuts off (1,1); on the bound the best is x2 = x1^2 -> f = (1-0.5)^2.
    P.append(
        _bounded(
            rb,
            "rosenbrock_bounded",
            ((-2.0, 0.5), (-1.0, 2.0)),
            f_star=0.25,
            x_star=(0.5, 0.25),
            f_star_known=True,
            note="x1 <= 0.5 active; f* = 0.25 exactly",
        )
    )
    erb = extended_rosenbrock(10)
    P.append(
        _bounded(
            erb,
            "extended_rosenbrock_10_bounded",
            ((-2.0, 0.5), (-1.0, 2.0)) * 5,
            f_star=1.25,
            x_star=(0.5, 0.25) * 5,
            f_star_known=True,
            note="every odd coordinate at its 0.5 bound",
        )
    )
    q = quadratic(10, 100.0, seed=1)
    P.append(
        _bounded(
            q,
            "quadratic_10_cond100_box",
            ((-0.5, 0.5),) * 10,
            x0=(0.0,) * 10,
            note="strictly convex QP on a box; several bounds active",
        )
    )
    P.append(
        _bounded(
            base["beale"],
            "beale_bounded",
            ((0.0, 2.5), (-1.0, 1.0)),
            note="global minimizer (3, 0.5) cut off",
        )
    )
    P.append(
        _bounded(base["wood"], "wood_bounded", ((-3.0, 0.8),) * 4, note="all of (1,1,1,1) cut off")
    )
    P.append(
        _bounded(
            base["powell_singular"],
            "powell_singular_bounded",
            ((0.1, 100.0), (-20.0, 20.0), (-1.0, 1.0), (-1.0, 50.0)),
            note="x1 >= 0.1 cuts off the origin",
        )
    )
    P.append(
        _bounded(
            base["brown_dennis"],
            "brown_dennis_bounded",
            ((-10.0, 100.0), (0.0, 15.0), (-100.0, 0.0), (-20.0, 0.2)),
            note="bounds on x3 (<= 0) and x4 (<= 0.2)",
        )
    )
    P.append(
        _bounded(
            base["osborne1"],
            "osborne1_bounded",
            ((0.0, 10.0), (0.0, 10.0), (-10.0, 0.0), (0.0, 0.012), (0.0, 10.0)),
            note="x4 <= 0.012 active (unconstrained optimum has x4 = 0.01287)",
        )
    )
    return P


def all_problems() -> list[TestProblem]:
    return standard_problems() + bounded_problems()


def get_problem(name: str) -> TestProblem:
    for p in all_problems():
        if p.name == name:
            return p
    raise KeyError(f"unknown test problem {name!r}")
