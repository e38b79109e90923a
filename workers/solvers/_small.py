"""The small-problem path: the same solvers on numpy arrays, for tiny CPU float64 problems.

Why: a torch call on a 2-vector costs 2-4 us of dispatch, and an L-BFGS iteration on the torch
path makes about sixty of them (bench/service.py: 9-15 ms for Rosenbrock n = 2, against scipy's
1.2-1.7 ms); the same numpy calls cost about 1 us each. So `Solve(..., small=True)` (what
`minimize`, `least_squares` and the workers ask for) runs problems of at most `SMALL_N_MAX`
variables, in float64 on the CPU, with one of `SMALL_METHODS`, on numpy.

One implementation, not two: the driver (`Solve`: termination tests, statuses, evaluation
counts, cancellation, time and evaluation limits), the step rules (plain Python floats), the
line-search control flow (`LineSearchSolver.step`, `_search`, `_accept`) and the dense
quasi-Newton updates (gradient descent, BFGS, DFP, SR1) are the torch path's own code, run
with `ops = NUMPY` (workers.solvers._ops). Only L-BFGS's compact-form direction and memory
update are written again here: the torch one is built around in-place kernels and reused
buffers for n in the millions. This one keeps its formulas (Byrd, Nocedal & Schnabel's
compact form: two triangular solves with the chronological S^T Y) and its state layout
(`LbfgsState`: the (2m x n) ring W, SY and YY in chronological order, gamma = s.y / y.y), so
a checkpoint written on one path resumes on the other. Both paths take the same steps and
report the same statuses and counts; iterates agree to rounding
(tests/unit/test_small_solvers.py runs the standard problems both ways).

Evaluations: requests carry numpy x. `TorchBridge` answers them from a torch evaluator (a
user's torch function under autograd: zero-copy views both ways); an objective that can
evaluate itself on numpy (an expression, workers.objectives) is asked directly. Results,
iterate reports and checkpoints leave as torch tensors, as on the torch path.
"""

from __future__ import annotations

import math
from dataclasses import fields, replace

import numpy as np
import torch
from torch import Tensor

from ._evaluation import EvalRequest, Evaluation
from ._methods import Bfgs, Dfp, GradientDescent, LbfgsState, LineSearchSolver, SolveState, Sr1
from ._ops import NUMPY

try:  # scikit-learn (a dependency) brings scipy; without it, a general solve
    from scipy.linalg.lapack import dtrtrs as _dtrtrs
except ImportError:  # pragma: no cover
    _dtrtrs = None

# Measured (one thread, 60 iterations of extended Rosenbrock, the expression on numpy too):
# l-bfgs on numpy took 3.2 / 5.0 / 5.9 / 13.7 / 15.5 / 28.7 ms at n = 2 / 16 / 256 / 1024 /
# 4096 / 8192 against torch's 16.9 / 29.2 / 28.2 / 36.3 / 34.8 / 49.4, and lost from n = 32768
# (258 against 110 ms: numpy's temporaries, torch's in-place kernels); bfgs on numpy 9.8 /
# 17.9 / 327 ms at n = 64 / 256 / 1024 against 30.2 / 42.7 / 1369. The cut sits well below
# the crossover.
SMALL_N_MAX = 1024
SMALL_METHODS = frozenset({"gd", "bfgs", "dfp", "sr1", "l-bfgs"})


def small_path_applies(method: str, x0: Tensor, bounds) -> bool:
    """Whether `Solve(small=True)` runs this problem on numpy."""
    return (
        method in SMALL_METHODS
        and bounds is None
        and isinstance(x0, Tensor)
        and x0.dtype == torch.float64
        and x0.device.type == "cpu"
        and x0.numel() <= SMALL_N_MAX
        and not x0.requires_grad
    )


def _solve_upper(R: np.ndarray, b: np.ndarray, transpose: bool = False) -> np.ndarray:
    """R^-1 b (or R^-T b) reading only the upper triangle of R, as torch's solve_triangular."""
    if _dtrtrs is not None:
        x, info = _dtrtrs(R, b, lower=0, trans=1 if transpose else 0)
        if info == 0:
            return x
        return np.full_like(b, math.nan)
    upper = np.triu(R)
    return np.linalg.solve(upper.T if transpose else upper, b)  # pragma: no cover


class SmallGradientDescent(GradientDescent):
    ops = NUMPY


class SmallBfgs(Bfgs):
    ops = NUMPY


class SmallDfp(Dfp):
    ops = NUMPY


class SmallSr1(Sr1):
    ops = NUMPY


class SmallLbfgs(LineSearchSolver):
    """L-BFGS (as workers.solvers._methods.Lbfgs) on numpy: the direction
    d = -(gamma g + S^T c_s + Y^T c_y) with c from two triangular solves with R = triu(S Y^T)
    and the small Y Y^T; pairs without positive curvature (s.y <= 2.2e-16 y.y) skipped; s.y
    from the line search's derivatives when it has them."""

    name = "l-bfgs"
    state_class = LbfgsState
    ops = NUMPY

    def __init__(self, *, history_size: int = 10, **kw) -> None:
        super().__init__(**kw)
        self.m = history_size
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def init_state(self, x0, ev):
        m = self.m
        return LbfgsState(x=x0, f=ev.f, g=ev.g, W=None, SY=np.zeros((m, m)),
                          YY=np.zeros((m, m)), gamma=np.ones(()), layout=1)

    def reset_memory(self, state):
        state.count, state.newest = 0, -1
        state.coef = None

    def _rows(self, state: LbfgsState, count: int | None = None) -> np.ndarray:
        """Rows of W holding the last `count` pairs (all by default), oldest first: the
        indices of s_1..s_k, then of y_1..y_k."""
        k = state.count if count is None else count
        oldest = (state.newest - k + 1) % self.m
        key = (oldest, k)
        rows = self._orders.get(key)
        if rows is None:
            order = (oldest + np.arange(k)) % self.m
            rows = self._orders[key] = np.concatenate((order, self.m + order))
        return rows

    def direction(self, state):
        k = state.count
        if k == 0:
            return -state.g
        g = state.g
        SYk = state.W[self._rows(state)]  # S (k rows) over Y (k rows), chronological
        R = state.SY[:k, :k]
        gamma = float(state.gamma)
        p = SYk @ g  # S g, Y g
        q = _solve_upper(R, p[:k])
        inner = R.diagonal() * q - gamma * p[k:] + gamma * (state.YY[:k, :k] @ q)
        coef = np.concatenate((_solve_upper(R, inner, transpose=True), -gamma * q))
        return -gamma * g - coef @ SYk
        yield  # pragma: no cover

    def absorb(self, state, x_new, g_new, alpha, d, sy=None):
        m, k = self.m, state.count
        if state.W is None:
            state.W = np.empty((2 * m, x_new.size))
        W = state.W
        state.coef = state.P = None  # the torch path's caches: not kept here
        s = alpha * d
        y = g_new - state.g
        if sy is None or not math.isfinite(sy):
            sy = float(s @ y)
        yy = float(y @ y)
        slot = (state.newest + 1) % m
        if not sy > 2.2e-16 * yy:
            # Skipped. The torch path has already written the pair into the next slot, which
            # was free or the oldest pair's; that pair is then dropped: the same here.
            if k == m:
                state.count -= 1
                _shift(state.SY)
                _shift(state.YY)
            return
        keep = k - 1 if k == m else k  # pairs that stay, before the new one
        SY, YY = state.SY, state.YY
        if k == m:
            _shift(SY)
            _shift(YY)
        j = keep  # the new pair's chronological index
        if keep:
            old = W[self._rows(state, keep)]  # S_old over Y_old
            Y_old = old[keep:]
            SY[j, :j] = Y_old @ s
            SY[:j, j] = old[:keep] @ y
            YY[j, :j] = YY[:j, j] = Y_old @ y
        SY[j, j] = sy
        YY[j, j] = yy
        W[slot], W[m + slot] = s, y
        state.newest = slot
        state.count = keep + 1
        state.gamma = np.array(sy / yy)


def _shift(M: np.ndarray) -> None:
    """Moves the chronological block up-left by one pair, in place (the torch path's
    roll((-1, -1)); the last row and column are written next, or lie outside the block)."""
    M[:-1, :-1] = M[1:, 1:]


def build_small_solver(name: str, options):
    kw = {"line_search": options.line_search, "c1": options.c1, "c2": options.c2}
    if name == "l-bfgs":
        return SmallLbfgs(history_size=options.history_size, **kw)
    cls = {"gd": SmallGradientDescent, "bfgs": SmallBfgs, "dfp": SmallDfp, "sr1": SmallSr1}[name]
    return cls(**kw)


# -- the boundary: numpy inside, torch outside -----------------------------------------------


def _np(value):
    if value is None or not isinstance(value, Tensor):
        return value
    array = value.detach().numpy()
    return array if array.ndim else array[()]  # 0-d: a numpy scalar, as the path keeps f


def _torch(value):
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, np.generic):
        return torch.tensor(value.item(), dtype=torch.float64)
    return value


def state_to_numpy(state: SolveState, history_size: int | None = None) -> SolveState:
    """A torch state (from a checkpoint, or the torch path) as the small path keeps it: its
    tensors as numpy arrays (copies of CPU tensors, so the caller's stay untouched). An
    L-BFGS state from before the chronological layout is reordered first."""
    if isinstance(state, LbfgsState) and state.layout != 1 and history_size is not None:
        from ._methods import Lbfgs

        state = replace(state)
        Lbfgs(history_size=history_size)._upgrade(state)
    values = {}
    for f in fields(state):
        value = getattr(state, f.name)
        if isinstance(value, Tensor):
            value = value.detach().cpu().numpy().copy()
            if value.ndim == 0 and f.name == "f":
                value = value[()]
        values[f.name] = value
    out = type(state)(**values)
    if isinstance(out, LbfgsState):
        out.P = out.coef = out.dir_gamma = None
    return out


def state_to_torch(state: SolveState) -> SolveState:
    """A small-path state with torch tensors in place of its arrays (views, no copies)."""
    return type(state)(**{f.name: _torch(getattr(state, f.name)) for f in fields(state)})


def has_numpy_fields(state: SolveState) -> bool:
    return isinstance(state.x, np.ndarray)


class TorchBridge:
    """Answers the small path's numpy requests from a torch evaluator (LocalEvaluator): x goes
    in as a zero-copy tensor view, f and the derivatives come back as numpy views."""

    def __init__(self, evaluator) -> None:
        self._evaluate = evaluator

    def __call__(self, request: EvalRequest) -> Evaluation:
        v = request.hvp_vector
        ev = self._evaluate(EvalRequest(
            torch.from_numpy(request.x), request.need_f, request.need_g,
            None if v is None else torch.from_numpy(v), request.need_hess, request.need_jac,
        ))
        if ev.hvp is None and ev.hess is None and ev.r is None and ev.jac is None:
            return Evaluation(f=_np(ev.f), g=_np(ev.g))  # what the small methods ask for
        return Evaluation(f=_np(ev.f), g=_np(ev.g), hvp=_np(ev.hvp), hess=_np(ev.hess),
                          r=_np(ev.r), jac=_np(ev.jac))


class NumpyEvaluator:
    """Answers the small path's requests (f, or f and g) from numpy functions of x."""

    def __init__(self, value, value_and_grad) -> None:
        self._value, self._value_and_grad = value, value_and_grad

    def __call__(self, request: EvalRequest) -> Evaluation:
        if request.hvp_vector is not None or request.need_hess or request.need_jac:
            raise ValueError("a numpy objective answers f and g only")
        if request.need_g:
            f, g = self._value_and_grad(request.x)
            return Evaluation(f=f, g=g)
        return Evaluation(f=self._value(request.x))
