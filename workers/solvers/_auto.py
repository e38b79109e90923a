"""method="auto": pick the solver for a problem from what the request says and cheap probes.

The textbook rules (Nocedal & Wright ch. 6-7, 10) decide what they can on their own: bounds
-> L-BFGS-B, a callback objective -> BFGS (each evaluation is a round trip), batches -> the
batch engine's rule. Otherwise the solve first times a few evaluations at x0 (f, f+g, a
Hessian-vector product, a Hessian or a residual Jacobian, whichever the candidates need) and
compares each candidate's estimated cost: expected iterations x the measured cost of one.
A quadratic (detected by where the Newton step lands, or by the gradient being affine along
a probe step) goes to Newton (small n) or Newton-CG (large n). Least squares start on
Levenberg-Marquardt and switch to BFGS / L-BFGS when LM stalls (a large-residual problem:
Fletcher & Xu's hybrid rule). The probes' evaluations are reused by the chosen method where
it asks for the same point, so a right guess costs no extra evaluation.

`AutoSolve` has `Solve`'s interface (run(), iterate_info, evaluator, torch_state,
should_stop), so every driver (local, Ray worker, callback stream) runs it unchanged; its
result carries `method_chosen` and a one-line `method_reason`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ._driver import IterationDone, Solve, check_problem, drive_locally, is_auto
from ._evaluation import EvalRequest, Evaluation, LocalEvaluator
from ._methods import (
    DenseQuasiNewtonState,
    LbfgsState,
    LeastSquaresState,
    Newton,
    SolveState,
)
from ._result import IterateInfo, SolverResult

AUTO = "auto"

# BFGS keeps an n x n inverse Hessian (n^2 work per iteration): "BFGS to a few thousand".
DENSE_MAX = 2_000
# Newton needs the whole Hessian (n Hessian-vector products by autograd, n^3/3 Cholesky).
NEWTON_MAX = 500
# LM / Gauss-Newton form the m x n Jacobian every iteration (m * n numbers).
JACOBIAN_MAX = 1 << 22
# Iteration counts the cost model expects (medians over the standard problems; they only
# have to rank the candidates, the measured per-evaluation costs do the rest).
ITERS_NEWTON = 15
ITERS_LM = 15
ITERS_NEWTON_CG = 25
CG_PER_ITER = 10  # truncated CG's inner iterations at the forcing term min(0.5, sqrt|g|)
EVALS_PER_ITER = 1.25  # f+g evaluations per line-search iteration (accepted + trials)


def iters_bfgs(n: int) -> float:
    # Superlinear convergence sets in once BFGS has seen about n independent steps.
    return 30.0 + n


def iters_lbfgs(n: int) -> float:
    # m = 10 pairs: a little behind BFGS while n is small; its count stops growing with n
    # (it never learns more than m directions of curvature).
    return 1.3 * iters_bfgs(min(n, ITERS_LBFGS_CAP_N))


ITERS_LBFGS_CAP_N = 100


# Per-iteration bookkeeping outside the objective (measured on the standard problems at
# n <= 64): the torch path's dispatch, and the numpy small path's (workers.solvers._small).
OVERHEAD_TORCH_S = 1.5e-4
OVERHEAD_SMALL_S = 2.5e-5
FLOPS_PER_S = 2e9  # one core's dense linear algebra, conservatively
# Vector work per iteration beyond the evaluations, in flops per variable: L-BFGS's compact
# form reads its 2m x n history about twice; a CG step is two dots and three axpys. Both
# are memory-bound at large n (bench/auto.py: ~1-2 ms per iteration at n = 1e6).
LBFGS_FLOPS = 4.0
CG_FLOPS = 4.0
# LM stalls on a large-residual problem: f falls by under 10% and |g| by under 20% per
# iteration, STALL_ITERS times in a row (Fletcher & Xu 1987 switch on a 20% decrease of f).
STALL_F_RATIO = 0.9
STALL_G_RATIO = 0.8
STALL_ITERS = 5
# A probe this many times f+g's cost is timed once more (one-off set-up in the first call).
SETTLE_FACTOR = 20.0
# Least squares go to LM (the textbook choice) unless BFGS's estimate is this much lower:
# at small n both estimates are a few ms and single probe timings are noisy.
LM_PREFERENCE = 1.5
# ... and only while f is still above this fraction of its first value: a zero-residual
# problem in LM's slow last stretch (f already tiny) is finished better by LM itself.
STALL_MIN_FRACTION = 1e-4


def validation_method(method: str, bounded: bool) -> str:
    """The method to check an "auto" problem's x0, bounds and options against: every method
    auto may pick accepts what l-bfgs(-b) accepts."""
    if not is_auto(method):
        return method
    return "l-bfgs-b" if bounded else "l-bfgs"


@dataclass(frozen=True)
class Facts:
    """What the request says about the problem."""

    n: int
    bounded: bool = False  # some bound is finite
    residuals: int | None = None  # m when the objective is a residual r(x) (GN/LM possible)
    callback: bool = False  # every evaluation is a round trip to the caller
    provides_hvp: bool = True
    second_order: bool = True  # Hessians / HVPs can be asked for (autograd through f)
    batch: int = 0  # members of a vectorized batch (0: one problem)
    small: bool = False  # the driver runs tiny CPU float64 problems on numpy (_small)
    gtol: float = 1e-5


@dataclass
class Probes:
    """Measured seconds per evaluation at x0 (None: not measured)."""

    f: float | None = None
    fg: float | None = None
    hvp: float | None = None
    hess: float | None = None
    jac: float | None = None
    quadratic: bool | None = None  # None: not tested
    note: str = ""

    def as_dict(self) -> dict[str, float]:
        out = {}
        for name in ("f", "fg", "hvp", "hess", "jac"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def text(self) -> str:
        labels = {"f": "f", "fg": "f+g", "hvp": "Hv", "hess": "H", "jac": "J"}
        parts = [f"{labels[k]} {_ms(v)}" for k, v in self.as_dict().items()]
        return "probes " + ", ".join(parts) if parts else "no probes"


@dataclass(frozen=True)
class Choice:
    method: str
    reason: str
    estimates: dict[str, float] = field(default_factory=dict)  # method -> estimated seconds


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def _small_applies(method: str, facts: Facts) -> bool:
    from ._small import SMALL_METHODS, SMALL_N_MAX

    return facts.small and method in SMALL_METHODS and facts.n <= SMALL_N_MAX


def estimates(facts: Facts, probes: Probes) -> dict[str, float]:
    """Estimated seconds per candidate: expected iterations x (evaluations + linear algebra
    + bookkeeping), from the measured evaluation costs."""
    n = facts.n
    out: dict[str, float] = {}

    def overhead(method: str) -> float:
        return OVERHEAD_SMALL_S if _small_applies(method, facts) else OVERHEAD_TORCH_S

    fg = probes.fg
    if fg is not None:
        if n <= DENSE_MAX:
            per = EVALS_PER_ITER * fg + 4.0 * n * n / FLOPS_PER_S + overhead("bfgs")
            out["bfgs"] = iters_bfgs(n) * per
        per = EVALS_PER_ITER * fg + LBFGS_FLOPS * n / FLOPS_PER_S + overhead("l-bfgs")
        out["l-bfgs"] = iters_lbfgs(n) * per
        if probes.hvp is not None:
            if probes.quadratic:
                # Both are Krylov methods on a quadratic: about as many Hv products as
                # L-BFGS takes f+g evaluations.
                krylov = out["l-bfgs"] / per
                out["newton-cg"] = krylov * (probes.hvp + CG_FLOPS * n / FLOPS_PER_S)
            else:
                per = EVALS_PER_ITER * fg + CG_PER_ITER * probes.hvp + OVERHEAD_TORCH_S
                out["newton-cg"] = ITERS_NEWTON_CG * per
        if probes.hess is not None and n <= NEWTON_MAX:
            per = EVALS_PER_ITER * fg + probes.hess + n**3 / 3 / FLOPS_PER_S + OVERHEAD_TORCH_S
            out["newton"] = ITERS_NEWTON * per
    if probes.jac is not None and facts.residuals is not None:
        m = facts.residuals
        per = 1.2 * probes.jac + (m * n * n + n**3 / 3) / FLOPS_PER_S + OVERHEAD_TORCH_S
        out["lm"] = ITERS_LM * per
    return out


def lm_feasible(facts: Facts) -> bool:
    m = facts.residuals
    return m is not None and facts.n <= DENSE_MAX and m * facts.n <= JACOBIAN_MAX


def choose(facts: Facts, probes: Probes | None = None) -> Choice:
    """The method for `facts` given the probes' measurements (the rules alone without)."""
    n = facts.n
    probes = probes or Probes()
    if facts.batch:
        return choose_batch(facts)
    if facts.bounded:
        return Choice("l-bfgs-b", f"l-bfgs-b: bounds given (n={n:,}); the one method here "
                                  "that projects onto a box")
    if facts.callback:
        if n <= DENSE_MAX:
            return Choice("bfgs", f"bfgs: callback objective, every evaluation a round trip; "
                                  f"n={n:,} <= {DENSE_MAX:,}, BFGS needs the fewest")
        return Choice("l-bfgs", f"l-bfgs: callback objective and n={n:,} > {DENSE_MAX:,} "
                                "(BFGS's n x n matrix): L-BFGS, few evaluations per step")
    if probes.quadratic:
        if n <= NEWTON_MAX and facts.residuals is None:
            return Choice("newton", f"newton: quadratic (the Newton step at x0 lands on a "
                                    f"stationary point), n={n:,}; {probes.text()}")
    costs = estimates(facts, probes)
    if lm_feasible(facts) and "lm" not in costs:
        costs["lm"] = 0.0  # no Jacobian measured: least squares go to LM
    if not costs:
        method = "bfgs" if n <= DENSE_MAX else "l-bfgs"
        return Choice(method, f"{method}: n={n:,} ({'<=' if n <= DENSE_MAX else '>'} "
                              f"{DENSE_MAX:,}); {probes.text()}")
    best = min(costs, key=costs.get)
    if "lm" in costs and best != "lm" and costs["lm"] < LM_PREFERENCE * costs[best]:
        best = "lm"
    shown = sorted(costs.items(), key=lambda kv: kv[1])[:3]
    est = ", ".join(f"{k} ~{_ms(v)}" for k, v in shown if v > 0)
    what = f"least squares (m={facts.residuals:,})" if facts.residuals is not None else (
        "quadratic (g affine along a probe step)" if probes.quadratic else "f")
    reason = f"{best}: {what}, n={n:,}; est. {est}; {probes.text()}" if est else (
        f"{best}: {what}, n={n:,}; {probes.text()}")
    if best == "lm":
        reason += "; switches to BFGS if LM stalls (large residual)"
    return Choice(best, reason, costs)


def choose_batch(facts: Facts) -> Choice:
    """A vectorized batch: one method for every member, from the rules (no probes: members
    differ, and the engine's masks make every member pay for the slowest)."""
    n, members = facts.n, facts.batch
    if facts.bounded:
        return Choice("l-bfgs-b", f"l-bfgs-b: bounds given (batch of {members:,}, n={n:,})")
    if facts.residuals is not None and n <= 64:
        return Choice("lm", f"lm: least squares, batch of {members:,}, n={n:,} <= 64 (a "
                            f"batched n x n solve per iteration)")
    if n * n * members <= JACOBIAN_MAX:
        return Choice("bfgs", f"bfgs: batch of {members:,} x n={n:,}: the B n x n "
                              f"matrices fit ({members * n * n:,} <= {JACOBIAN_MAX:,})")
    return Choice("l-bfgs", f"l-bfgs: batch of {members:,} x n={n:,}: B dense n x n "
                            f"matrices would not fit")


def resume_method(state: SolveState, facts: Facts) -> tuple[str, str]:
    """The method an auto solve checkpointed with, from its state's kind."""
    if isinstance(state, LeastSquaresState):
        return "lm", "lm: resumed from an LM checkpoint"
    if isinstance(state, DenseQuasiNewtonState):
        return "bfgs", "bfgs: resumed from a BFGS checkpoint"
    if isinstance(state, LbfgsState):
        method = "l-bfgs-b" if facts.bounded else "l-bfgs"
        return method, f"{method}: resumed from an L-BFGS checkpoint"
    # Newton and Newton-CG both keep the plain state: either continues it.
    if facts.n <= NEWTON_MAX and facts.second_order:
        return "newton", "newton: resumed from a Newton-type checkpoint"
    return "newton-cg", "newton-cg: resumed from a Newton-type checkpoint"


# ------------------------------------------------------------------------------- the solve

Driven = Generator[EvalRequest | IterationDone, Evaluation | None, SolverResult]


@dataclass
class _Cached:
    x: Tensor
    ev: Evaluation
    hvp_vector: Tensor | None = None


def _same(a, b: Tensor) -> bool:
    if isinstance(a, np.ndarray):
        return b.device.type == "cpu" and a.shape == tuple(b.shape) and np.array_equal(
            a, b.numpy())
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                      and bool(torch.equal(a, b)))


def _as_numpy(value):
    return None if value is None else value.detach().numpy()


class AutoSolve:
    """A solve whose method is chosen at x0 (see the module docstring); `Solve`'s interface.

    `residuals`: m when the objective is a residual vector (the driver's evaluator then
    answers need_jac requests); `second_order`: Hessians / HVPs may be asked for (probes
    that could fail on an objective without second derivatives are skipped otherwise);
    `callback`: every evaluation is a round trip (no probes); `small`: as Solve's.
    """

    method = AUTO

    def __init__(self, x0: Tensor, *, bounds=None, options: dict | None = None,
                 residuals: int | None = None, callback: bool = False,
                 provides_hvp: bool = True, second_order: bool = True,
                 initial_state: SolveState | None = None,
                 should_stop: Callable[[], bool] | None = None, small: bool = False) -> None:
        bounded_input = bounds is not None
        _, self.options, bound_tensors = check_problem(
            validation_method(AUTO, bounded_input), x0, bounds, options)
        finite = bound_tensors is not None and bool(
            torch.isfinite(bound_tensors[0]).any() or torch.isfinite(bound_tensors[1]).any())
        self.bounds = bound_tensors if finite else None
        self.x0 = x0
        self.facts = Facts(
            n=x0.numel(), bounded=finite, residuals=residuals, callback=callback,
            provides_hvp=provides_hvp, second_order=second_order and not callback,
            small=small and x0.device.type == "cpu" and x0.dtype == torch.float64,
            gtol=self.options.termination.gtol,
        )
        self.small = small
        self._raw_options = dict(options or {})  # checked above; the inner solves re-parse
        self.initial_state = initial_state
        self.should_stop = should_stop or (lambda: False)
        self.choice: Choice | None = None
        self.probes = Probes()
        self.switched_at: int | None = None
        self._inner: Solve | None = None
        self._cache: list[_Cached] = []
        self._wasted = [0, 0, 0]  # nfev, njev, nhev of probes no solver reused
        self._probe_s = 0.0

    # -- Solve's interface ------------------------------------------------------------------
    @property
    def history(self):
        return None if self._inner is None else self._inner.history

    def iterate_info(self, state: SolveState) -> IterateInfo:
        return self._inner.iterate_info(state)

    def evaluator(self, evaluator: Callable[[EvalRequest], Evaluation],
                  numpy_evaluator: Callable[[EvalRequest], Evaluation] | None = None):
        """`evaluator` (answering torch requests), made to answer this solve's requests too:
        numpy ones (f, f+g) while the chosen method runs on the small path, from
        `numpy_evaluator` when given (an expression evaluated on numpy), else through torch."""
        from ._small import TorchBridge

        numpy_side = numpy_evaluator or TorchBridge(evaluator)

        def answer(request: EvalRequest) -> Evaluation:
            if isinstance(request.x, np.ndarray):
                return numpy_side(request)
            return evaluator(request)

        return answer

    def torch_state(self, state: SolveState) -> SolveState:
        from ._small import has_numpy_fields, state_to_torch

        return state_to_torch(state) if has_numpy_fields(state) else state

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> Driven:
        started = time.perf_counter()
        if self.initial_state is not None:
            method, reason = resume_method(self.initial_state, self.facts)
            self.choice = Choice(method, reason)
        else:
            yield from self._probe()
            self.choice = choose(self.facts, self.probes)
        self._probe_s = time.perf_counter() - started
        self._keep_useful(self.choice.method)
        inner = self._solve(self.choice.method, self.initial_state)
        result = yield from self._drive(inner)
        result.nfev += self._wasted[0]
        result.njev += self._wasted[1]
        result.nhev += self._wasted[2]
        if self.initial_state is None:
            result.solve_time_s += self._probe_s
        result.method_chosen = self._inner.method
        reason = self.choice.reason
        if self.switched_at is not None:
            reason = (f"{self._inner.method} from iteration {self.switched_at}: LM stalled "
                      f"(f fell < {1 - STALL_F_RATIO:.0%} per step: a large residual); "
                      f"first {reason}")
        result.method_reason = reason
        return result

    def _solve(self, method: str, initial_state: SolveState | None) -> Solve:
        inner = Solve(method, self.x0, bounds=self.bounds, options=self._raw_options,
                      initial_state=initial_state, should_stop=lambda: self.should_stop(),
                      small=self.small)
        self._inner = inner
        return inner

    def _drive(self, inner: Solve) -> Driven:
        """Runs `inner`, answering its first requests from the probes' evaluations, watching
        LM for a stall."""
        run = inner.run()
        try:
            item = next(run)
        except StopIteration as done:  # e.g. resumed at a converged point
            return done.value
        stalled = 0
        last: tuple[float, float] | None = None
        first_f: float | None = None
        can_switch = inner.method == "lm" and self.facts.residuals is not None
        while True:
            try:
                if isinstance(item, IterationDone):
                    sent = yield item
                    if can_switch:
                        state = item.state
                        f, gn = float(state.f), float(state.grad_norm)
                        first_f = f if first_f is None else first_f
                        if last is not None and last[0] > 0 and last[1] > 0:
                            slow = f > STALL_F_RATIO * last[0] and gn > STALL_G_RATIO * last[1]
                            stalled = stalled + 1 if slow else 0
                        last = (f, gn)
                        if (stalled >= STALL_ITERS and gn > self.facts.gtol
                                and f > STALL_MIN_FRACTION * first_f):
                            run.close()
                            return (yield from self._switch(state))
                    item = run.send(sent)
                else:
                    ev = self._from_cache(item)
                    if ev is None:
                        ev = yield item
                    item = run.send(ev)
            except StopIteration as done:
                return done.value

    def _switch(self, state: LeastSquaresState) -> Driven:
        """LM -> BFGS (L-BFGS past DENSE_MAX) at LM's current point, counts carried on."""
        method = "bfgs" if self.facts.n <= DENSE_MAX else "l-bfgs"
        self.switched_at = state.nit
        # The new method's fresh state at LM's point (torch; Solve converts it for the
        # small path), so no evaluation is repeated.
        template = Solve(method, state.x, options=self._raw_options)
        fresh = template.solver.init_state(state.x, Evaluation(f=state.f, g=state.g))
        for name in ("nit", "nfev", "njev", "nhev", "elapsed_s", "f_prev", "step_size"):
            setattr(fresh, name, getattr(state, name))
        fresh.grad_norm = template.solver.grad_norm(fresh)
        inner = Solve(method, state.x, options=self._raw_options, initial_state=fresh,
                      should_stop=lambda: self.should_stop(), small=self.small)
        history = self._inner.history
        if history is not None and inner.history is not None:
            inner.history = history
        self._inner = inner
        return (yield from self._drive(inner))

    def _keep_useful(self, method: str) -> None:
        """Drops the probes `method` will not ask for again (so no request is compared
        against them): a Jacobian for LM / Gauss-Newton only, a Hessian for Newton, an Hv
        for Newton-CG, f+g for the line-search methods."""
        def useful(entry: _Cached) -> bool:
            ev = entry.ev
            if ev.jac is not None:
                return method in ("lm", "gauss-newton")
            if ev.hess is not None:
                return method == "newton"
            if ev.hvp is not None:
                return method == "newton-cg"
            return method not in ("lm", "gauss-newton") and (
                method == "newton" or entry.x is self.x0)

        self._cache = [entry for entry in self._cache if useful(entry)]

    def _from_cache(self, request: EvalRequest) -> Evaluation | None:
        """A probe's evaluation for the same point (and the same Hv vector), holding what the
        request asks for; each is used once."""
        if not self._cache:
            return None
        for i, entry in enumerate(self._cache):
            ev = entry.ev
            if (request.hvp_vector is None) != (entry.hvp_vector is None):
                continue
            if not _same(request.x, entry.x):
                continue
            if request.hvp_vector is not None and not _same(request.hvp_vector,
                                                             entry.hvp_vector):
                continue
            needs = (("f", request.need_f and not request.need_jac), ("g", request.need_g),
                     ("hess", request.need_hess), ("hvp", request.hvp_vector is not None),
                     ("r", request.need_jac), ("jac", request.need_jac))
            if any(wanted and getattr(ev, name) is None for name, wanted in needs):
                continue
            del self._cache[i]
            out = Evaluation(
                f=ev.f if (request.need_f or request.need_g or request.need_jac) else None,
                g=ev.g if (request.need_g or request.need_jac) else None,
                hvp=ev.hvp if request.hvp_vector is not None else None,
                hess=ev.hess if request.need_hess else None,
                r=ev.r if request.need_jac else None,
                jac=ev.jac if request.need_jac else None,
            )
            self._unwaste(request)
            if isinstance(request.x, np.ndarray):
                out = Evaluation(**{k: _as_numpy(getattr(out, k)) for k in
                                    ("f", "g", "hvp", "hess", "r", "jac")})
            return out
        return None

    def _unwaste(self, request: EvalRequest) -> None:
        self._wasted[0] -= int(request.need_f or request.need_jac)
        self._wasted[1] -= int(request.need_g or request.need_jac)
        self._wasted[2] -= int(request.hvp_vector is not None or request.need_hess)

    def _small_eligible(self) -> bool:
        from ._small import SMALL_N_MAX

        return self.facts.small and self.facts.n <= SMALL_N_MAX

    def _timed(self, request: EvalRequest):
        """Yields a probe request; returns (evaluation, seconds)."""
        sync = isinstance(request.x, Tensor) and request.x.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(request.x.device)
        start = time.perf_counter()
        ev = yield request
        if sync:
            torch.cuda.synchronize(request.x.device)
        seconds = time.perf_counter() - start
        self._wasted[0] += int(request.need_f or request.need_jac)
        self._wasted[1] += int(request.need_g or request.need_jac)
        self._wasted[2] += int(request.hvp_vector is not None or request.need_hess)
        return ev, seconds

    def _timed_settled(self, request: EvalRequest):
        """As _timed, but a first timing far above f+g's is taken again: the first Jacobian,
        Hessian or double backward in a process pays one-off set-up (vmap, 0.5 s and more)
        that says nothing about the solve's evaluations."""
        ev, seconds = yield from self._timed(request)
        fg = self.probes.fg
        if fg is not None and seconds > SETTLE_FACTOR * fg:
            again, second = yield from self._timed(request)
            if second < seconds:
                ev, seconds = again, second
        return ev, seconds

    def _probe(self):
        """The evaluations at x0 the decision needs (none where the rules decide alone)."""
        facts, probes, x0 = self.facts, self.probes, self.x0
        if facts.batch or facts.bounded or facts.callback or self.should_stop():
            return
        # On the small path f+g is asked for on numpy (what that path's evaluations cost).
        start = x0.detach().numpy() if self._small_eligible() else x0
        ev, probes.fg = yield from self._timed(EvalRequest(start, need_f=True, need_g=True))
        if isinstance(start, np.ndarray):
            ev = Evaluation(f=torch.as_tensor(ev.f, dtype=x0.dtype),
                            g=torch.from_numpy(np.asarray(ev.g, dtype=np.float64)))
        if not ev.is_finite():
            probes.note = "non-finite at x0"
            return
        self._cache.append(_Cached(x0, ev))
        g0 = ev.g
        if lm_feasible(facts):
            jev, probes.jac = yield from self._timed_settled(EvalRequest(x0, need_jac=True))
            if jev.is_finite():
                self._cache.append(_Cached(x0, jev))
            return
        if not facts.second_order:
            return
        n = facts.n
        if n <= NEWTON_MAX:
            yield from self._probe_newton_step(ev)
            return
        fev, probes.f = yield from self._timed(EvalRequest(x0, need_f=True, need_g=False))
        del fev
        v = -g0
        hev, probes.hvp = yield from self._timed_settled(
            EvalRequest(x0, need_f=False, need_g=False, hvp_vector=v))
        if not hev.is_finite():
            return
        self._cache.append(_Cached(x0, hev, hvp_vector=v))
        # For a quadratic g(x0 + t v) = g0 + t H v exactly: one more f+g tells.
        scale = max(1.0, float(x0.abs().max()))
        vmax = float(v.abs().max())
        if vmax == 0:
            return
        t = 0.1 * scale / vmax
        tev, _ = yield from self._timed(
            EvalRequest(torch.add(x0, v, alpha=t), need_f=True, need_g=True))
        if tev.is_finite():
            predicted = torch.add(g0, hev.hvp, alpha=t)
            err = float((tev.g - predicted).abs().max())
            size = float(g0.abs().max()) + t * float(hev.hvp.abs().max())
            probes.quadratic = err <= _quadratic_tol(x0) * max(size, 1e-300)

    def _probe_newton_step(self, ev: Evaluation):
        """Small n: the Hessian at x0 and f+g where Newton's first step lands, computed as
        Newton computes them (so a Newton solve reuses both). A quadratic lands on x*."""
        probes, x0 = self.probes, self.x0
        hev, probes.hess = yield from self._timed_settled(
            EvalRequest(x0, need_f=False, need_g=False, need_hess=True))
        if not hev.is_finite():
            return
        self._cache.append(_Cached(x0, hev))
        newton = Newton()
        state = SolveState(x=x0, f=ev.f, g=ev.g)
        direction = newton.direction(state)
        try:
            direction.send(None)
            direction.send(Evaluation(hess=hev.hess))
        except StopIteration as done:
            d = done.value
        else:  # pragma: no cover - Newton asks for one Hessian only
            return
        trial = newton.ops.step(x0, d, newton.initial_step(state, d, 0.0))
        tev, _ = yield from self._timed(EvalRequest(trial, need_f=True, need_g=True))
        if not tev.is_finite():
            return
        self._cache.append(_Cached(trial, tev))
        g1, g0 = float(tev.g.abs().max()), float(ev.g.abs().max())
        probes.quadratic = g1 <= max(self.facts.gtol, _quadratic_tol(x0) * g0) and float(
            tev.f) <= float(ev.f)


def _quadratic_tol(x: Tensor) -> float:
    return 1e-8 if x.dtype == torch.float64 else 1e-3


def make_solve(method: str, x0: Tensor, *, bounds=None, options: dict | None = None,
               initial_state: SolveState | None = None,
               should_stop: Callable[[], bool] | None = None, small: bool = False,
               residuals: int | None = None, callback: bool = False,
               provides_hvp: bool = True, second_order: bool = True):
    """Solve(method, ...) or, for method "auto", an AutoSolve: what drivers construct."""
    if not is_auto(method):
        return Solve(method, x0, bounds=bounds, options=options, initial_state=initial_state,
                     should_stop=should_stop, small=small)
    return AutoSolve(x0, bounds=bounds, options=options, residuals=residuals,
                     callback=callback, provides_hvp=provides_hvp, second_order=second_order,
                     initial_state=initial_state, should_stop=should_stop, small=small)


def auto_minimize(fun, x0: Tensor, *, jac=None, hessp=None, hess=None, bounds=None,
                  options: dict | None = None, callback=None, should_stop=None,
                  initial_state: SolveState | None = None, on_iteration=None) -> SolverResult:
    """minimize(fun, x0, method="auto", ...)."""
    # A fun returning (f, g) computed by hand may have no second derivatives by autograd.
    second_order = jac is not True or hessp is not None or hess is not None
    solve = make_solve(AUTO, x0, bounds=bounds, options=options, initial_state=initial_state,
                       should_stop=should_stop, small=True, second_order=second_order)
    evaluator = solve.evaluator(LocalEvaluator(fun, jac=jac, hessp=hessp, hess=hess))
    return drive_locally(solve, evaluator, callback, on_iteration)


def auto_least_squares(residual, x0: Tensor, *, jac=None, options: dict | None = None,
                       callback=None, should_stop=None,
                       initial_state: SolveState | None = None,
                       on_iteration=None) -> SolverResult:
    """least_squares(residual, x0, method="auto", ...)."""
    with torch.no_grad():
        m = int(residual(x0).numel())
    solve = make_solve(AUTO, x0, options=options, initial_state=initial_state,
                       should_stop=should_stop, small=True, residuals=m)
    evaluator = solve.evaluator(LocalEvaluator(residual=residual, residual_jac=jac))
    return drive_locally(solve, evaluator, callback, on_iteration)


__all__ = [
    "AUTO",
    "AutoSolve",
    "Choice",
    "Facts",
    "Probes",
    "auto_least_squares",
    "auto_minimize",
    "choose",
    "choose_batch",
    "estimates",
    "is_auto",
    "make_solve",
    "validation_method",
]
