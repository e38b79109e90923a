"""method="auto" (workers.solvers._auto): the rules, the probes, reuse of the probes'
evaluations, LM's switch to BFGS on a large residual, and resuming from a checkpoint."""

from __future__ import annotations

import pytest
import torch

from workers.solvers import least_squares, minimize
from workers.solvers._auto import (
    DENSE_MAX,
    Facts,
    Probes,
    choose,
    choose_batch,
    estimates,
    is_auto,
    validation_method,
)
from workers.solvers.problems import extended_rosenbrock, get_problem, quadratic

GTOL = 1e-6


def test_the_rules_decide_without_probes_where_the_textbook_does():
    assert choose(Facts(n=10, bounded=True)).method == "l-bfgs-b"
    assert choose(Facts(n=50, callback=True)).method == "bfgs"
    assert choose(Facts(n=DENSE_MAX + 1, callback=True)).method == "l-bfgs"
    assert choose(Facts(n=5, residuals=20)).method == "lm"  # least squares, no timing
    assert choose(Facts(n=5, batch=100, residuals=0)).method == "lm"
    assert choose_batch(Facts(n=50, batch=100)).method == "bfgs"
    assert choose_batch(Facts(n=5000, batch=100)).method == "l-bfgs"
    assert choose(Facts(n=3), Probes(fg=1e-4, hess=5e-4, quadratic=True)).method == "newton"


def test_measured_costs_decide_between_candidates():
    cheap_hvp = Probes(fg=1e-3, hvp=1e-5)
    dear_hvp = Probes(fg=1e-3, hvp=5e-3)
    n = 100_000
    assert choose(Facts(n=n), cheap_hvp).method == "newton-cg"
    assert choose(Facts(n=n), dear_hvp).method == "l-bfgs"
    # A Jacobian far dearer than f+g moves a least-squares problem off LM.
    costs = estimates(Facts(n=10, residuals=10_000), Probes(fg=1e-4, jac=5e-1))
    assert costs["lm"] > costs["bfgs"]
    assert choose(Facts(n=10, residuals=10_000), Probes(fg=1e-4, jac=5e-1)).method == "bfgs"


def test_auto_is_accepted_where_methods_are_named():
    assert is_auto("auto") and is_auto(" AUTO ") and not is_auto("l-bfgs")
    assert validation_method("auto", bounded=True) == "l-bfgs-b"
    assert validation_method("bfgs", bounded=True) == "bfgs"


def test_a_small_quadratic_goes_to_newton_and_reuses_every_probe():
    p = quadratic(8, 100.0)
    # Newton first: the process's first Hessian pays vmap's set-up, which a probe would time
    # again (one more Hessian, counted).
    fixed = minimize(p.fun, p.x0_tensor(), method="newton", options={"gtol": GTOL})
    result = minimize(p.fun, p.x0_tensor(), method="auto", options={"gtol": GTOL})
    assert result.success and result.method_chosen == "newton"
    assert "quadratic" in result.method_reason
    assert p.is_solved(result.fun)
    # The probes (f+g at x0, the Hessian, f+g at the Newton point) are Newton's own
    # first evaluations: not one more than the fixed method.
    assert (result.nfev, result.njev, result.nhev) == (fixed.nfev, fixed.njev, fixed.nhev)
    assert torch.equal(result.x, fixed.x)


def test_least_squares_go_to_lm_with_the_reason():
    p = get_problem("helical_valley")
    result = least_squares(p.residual, p.x0_tensor(), method="auto", options={"gtol": GTOL})
    assert result.success and p.is_solved(2 * result.fun)
    assert result.method_chosen in ("lm", "bfgs")
    assert result.method_reason.startswith(result.method_chosen)
    assert "probes" in result.method_reason


def test_a_large_residual_problem_leaves_lm_for_bfgs():
    # Brown & Dennis: f* = 85822 (a large residual): LM's steps shrink f by a few per cent
    # each for hundreds of iterations; BFGS from where LM stalls finishes in tens. The solve
    # resumes from one LM iteration, so it runs LM whatever the probes would have timed.
    p = get_problem("brown_dennis")
    states = []
    least_squares(p.residual, p.x0_tensor(), method="lm", options={"max_iter": 1},
                  on_iteration=states.append)
    result = least_squares(p.residual, p.x0_tensor(), method="auto", options={"gtol": 1e-5},
                           initial_state=states[-1])
    lm = least_squares(p.residual, p.x0_tensor(), method="lm", options={"gtol": 1e-5})
    assert result.method_chosen == "bfgs"
    assert "LM stalled" in result.method_reason and "resumed" in result.method_reason
    assert p.is_solved(2 * result.fun)
    assert result.nit < lm.nit / 3


def test_large_n_times_its_probes_and_takes_a_hessian_free_method():
    p = extended_rosenbrock(5_000)
    x0 = torch.tensor([-1.2, 1.0] * 2_500, dtype=torch.float64)
    result = least_squares(p.residual, x0, method="auto", options={"gtol": 1e-5})
    # Which of the two is timed; on a quiet machine L-BFGS (an Hv costs about 2 f+g).
    assert result.method_chosen in ("l-bfgs", "newton-cg"), result.method_reason
    for label in ("f ", "f+g", "Hv", "est."):
        assert label in result.method_reason
    assert result.success


def test_bounds_go_to_l_bfgs_b_and_are_respected():
    p = get_problem("rosenbrock_bounded")
    lower, upper = p.lower_upper()
    result = minimize(p.fun, p.x0_tensor(), method="auto", bounds=(lower, upper),
                      options={"gtol": GTOL})
    assert result.method_chosen == "l-bfgs-b"
    assert bool((result.x >= lower).all() and (result.x <= upper).all())
    assert result.fun == pytest.approx(p.f_star, abs=1e-8)


def test_an_auto_solve_resumes_from_its_checkpoint_with_the_same_method():
    p = extended_rosenbrock(20)
    options = {"gtol": GTOL}
    states = []
    first = minimize(p.fun, p.x0_tensor(), method="auto", options=options,
                     callback=lambda info: len(states) >= 3, on_iteration=states.append)
    resumed = minimize(p.fun, p.x0_tensor(), method="auto", options=options,
                       initial_state=states[-1])
    # The choice is timed, so it may differ between runs; a resume keeps the first's.
    straight = minimize(p.fun, p.x0_tensor(), method=first.method_chosen, options=options)
    assert resumed.method_chosen == first.method_chosen
    assert "resumed" in resumed.method_reason
    assert resumed.nit == straight.nit
    assert resumed.fun == pytest.approx(straight.fun, rel=1e-9, abs=1e-14)


def test_probes_count_as_evaluations_when_no_method_reuses_them():
    p = extended_rosenbrock(10)
    x0 = p.x0_tensor()
    result = least_squares(p.residual, x0, method="auto", options={"gtol": 1e-5})
    fixed = least_squares(p.residual, x0, method=result.method_chosen, options={"gtol": 1e-5})
    # f+g and J are both probed; the chosen method reuses one (LM the Jacobian, BFGS f+g),
    # the other is counted on top.
    assert (result.nfev, result.njev) == (fixed.nfev + 1, fixed.njev + 1)
    assert result.nit == fixed.nit and result.success
