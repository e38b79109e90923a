"""The small-problem path (workers.solvers._small) is the torch path's solver on numpy: the
same steps, statuses and counts, iterates equal to rounding; checkpoints move between them.

The two paths' arithmetic differs in the last bit (torch fuses a + alpha * d and its dot
products into FMAs; numpy rounds twice), so a long run near the precision floor may take a
different number of steps, as the torch path itself does on another CPU. What must hold
exactly is checked from equal starting states: one step of either path from the same state
makes the same decisions and lands on the same point.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from workers.solvers import (
    SMALL_METHODS,
    SMALL_N_MAX,
    LocalEvaluator,
    Solve,
    Status,
    drive_locally,
    minimize,
    state_from_bytes,
    state_to_bytes,
)
from workers.solvers._small import state_to_numpy
from workers.solvers.problems import extended_rosenbrock, get_problem, standard_problems

METHODS = sorted(SMALL_METHODS)
SMALL_PROBLEMS = [p for p in standard_problems() if len(p.x0) <= SMALL_N_MAX]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _solve(method, fun, x0, *, small, options=None, initial_state=None, on_iteration=None):
    solve = Solve(method, x0.clone(), options=options, initial_state=initial_state, small=small)
    assert solve.small is small
    evaluator = solve.evaluator(LocalEvaluator(fun))
    return drive_locally(solve, evaluator, on_iteration=on_iteration)


def _rosenbrock(x):
    return torch.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "gd"])
def test_rosenbrock_takes_the_same_steps_on_both_paths(method):
    """The issue's problem: n = 2 from the standard start, every small method converging."""
    x0 = torch.tensor([-1.2, 1.0], dtype=torch.float64)
    options = {"return_history": True}
    big = _solve(method, _rosenbrock, x0, small=False, options=options)
    small = _solve(method, _rosenbrock, x0, small=True, options=options)
    assert big.status is small.status is Status.CONVERGED
    assert (big.nit, big.nfev, big.njev) == (small.nit, small.nfev, small.njev)
    torch.testing.assert_close(small.x, big.x, rtol=1e-10, atol=1e-12)
    assert abs(small.fun - big.fun) <= 1e-12
    # Mid-run, where Rosenbrock's valley amplifies rounding, iterates agree to ~1e-9 (DFP,
    # whose update is the least stable, to ~1e-7).
    for a, b in zip(big.history, small.history, strict=True):
        assert (a.nit, a.nfev, a.njev) == (b.nit, b.nfev, b.njev)
        torch.testing.assert_close(b.x, a.x, rtol=1e-6, atol=1e-6)
        assert abs(a.f - b.f) <= 1e-6 * max(1.0, abs(a.f))


def _states_along(method, problem, count: int = 3):
    """States of the torch path's run on `problem` at a few iterations (copies), while the
    gradient is still above the noise of f (a step from a converged point searches noise)."""
    states = []

    def keep(state):
        if state.grad_norm > 1e-6:
            states.append(copy.deepcopy(state))

    _solve(method, problem.fun, problem.x0_tensor(), small=False,
           options={"max_iter": 40, "gtol": 1e-12}, on_iteration=keep)
    picks = np.unique(np.linspace(0, len(states) - 1, count).astype(int))
    return [states[i] for i in picks] if states else []


STEP_CASES = [(m, p.name) for m in METHODS for p in SMALL_PROBLEMS]


@pytest.mark.parametrize(("method", "name"), STEP_CASES)
def test_one_step_from_the_same_state_is_the_same_step(method, name):
    """From each of a few states of a torch-path run, one more iteration on either path: the
    same status, counts and line-search outcome, the same point to rounding."""
    problem = get_problem(name)
    for state in _states_along(method, problem):
        options = {"max_iter": state.nit + 1, "gtol": 0.0}  # no verdict at a threshold
        outcomes = []
        for small in (False, True):
            result = _solve(method, problem.fun, problem.x0_tensor(), small=small,
                            options=options, initial_state=copy.deepcopy(state))
            outcomes.append(result)
        big, small = outcomes
        where = f"{method} {name} from iteration {state.nit}"
        assert big.status is small.status, where
        assert (big.nit, big.nfev, big.njev) == (small.nit, small.nfev, small.njev), where
        scale = max(1.0, float(big.x.abs().max()))
        assert float((big.x - small.x).abs().max()) <= 1e-8 * scale, where
        assert abs(big.fun - small.fun) <= 1e-8 * max(1.0, abs(big.fun)), where


@pytest.mark.parametrize("method", ["bfgs", "l-bfgs", "sr1"])
def test_both_paths_solve_the_same_standard_problems(method):
    """Whole runs at the default gtol: where the torch path converges to the problem's
    minimum, so does the numpy path (statuses may differ only at the precision floor).
    Gradient descent and DFP, which rarely converge within the cap, are left to the one-step
    test (their whole runs here take a minute)."""
    solved = {False: set(), True: set()}
    for problem in SMALL_PROBLEMS:
        for small in (False, True):
            result = _solve(method, problem.fun, problem.x0_tensor(), small=small,
                            options={"max_iter": 1000})
            if result.success and problem.is_solved(result.fun):
                solved[small].add(problem.name)
    assert len(solved[True]) >= len(solved[False]) - 1, (solved[False] - solved[True])
    assert len(solved[True] & solved[False]) >= len(solved[False]) - 2


def test_minimize_takes_the_small_path_only_where_it_applies():
    x0 = torch.tensor([-1.2, 1.0], dtype=torch.float64)
    assert Solve("l-bfgs", x0, small=True).small
    assert not Solve("l-bfgs", x0).small  # drivers opt in (callback jobs stay on torch)
    assert not Solve("l-bfgs", x0.float(), small=True).small
    assert not Solve("newton", x0, small=True).small
    assert not Solve("l-bfgs-b", x0, small=True, bounds=[(0, 1), (0, 1)]).small
    big = torch.zeros(SMALL_N_MAX + 1, dtype=torch.float64)
    assert not Solve("l-bfgs", big, small=True).small
    result = minimize(_rosenbrock, x0, method="bfgs")
    assert isinstance(result.x, torch.Tensor) and result.x.dtype == torch.float64
    assert isinstance(result.jac, torch.Tensor) and isinstance(result.hess_inv, torch.Tensor)
    assert result.success


def test_callbacks_and_history_see_torch_tensors():
    x0 = torch.tensor([-1.2, 1.0], dtype=torch.float64)
    seen = []
    states = []
    result = minimize(_rosenbrock, x0, callback=lambda info: seen.append(info.x.clone()),
                      on_iteration=lambda state: states.append(state.x.clone()),
                      options={"return_history": True})
    assert seen and all(isinstance(x, torch.Tensor) for x in seen)
    assert all(isinstance(x, torch.Tensor) for x in states)
    assert all(isinstance(info.x, torch.Tensor) for info in result.history)
    torch.testing.assert_close(seen[-1], result.x)


@pytest.mark.parametrize("method", ["l-bfgs", "bfgs"])
def test_checkpoints_move_between_the_paths(method):
    """A small-path state checkpoints as the torch path's class; either path resumes it."""
    problem = extended_rosenbrock(10)
    options = {"gtol": 1e-10, "max_iter": 300}
    states = []
    reference = _solve(method, problem.fun, problem.x0_tensor(), small=True, options=options,
                       on_iteration=lambda s: states.append(state_to_bytes(s)))
    k = 17  # past the L-BFGS ring's first wrap (m = 10)
    blob = states[k - 1]
    resumed = _solve(method, problem.fun, problem.x0_tensor(), small=True, options=options,
                     initial_state=state_from_bytes(blob))
    assert (resumed.nit, resumed.nfev, resumed.status) == (
        reference.nit, reference.nfev, reference.status)
    assert torch.equal(resumed.x, reference.x)  # bit for bit on the same path
    on_torch = _solve(method, problem.fun, problem.x0_tensor(), small=False, options=options,
                      initial_state=state_from_bytes(blob))
    assert on_torch.status is reference.status is Status.CONVERGED
    torch.testing.assert_close(on_torch.x, reference.x, rtol=1e-6, atol=1e-8)


def test_an_older_slot_ordered_lbfgs_checkpoint_resumes_on_the_small_path():
    """State layout 0 (SY/YY in slot order, checkpoints from before the chronological
    layout) is reordered on the way in, as the torch path does."""
    problem = extended_rosenbrock(10)
    states = []
    _solve("l-bfgs", problem.fun, problem.x0_tensor(), small=False,
           options={"max_iter": 15}, on_iteration=lambda s: states.append(copy.deepcopy(s)))
    state = states[-1]
    assert state.count == 10 and state.layout == 1
    # rewrite it in slot order: chronological index i sits in slot (oldest + i) % m
    m, oldest = 10, (state.newest - state.count + 1) % 10
    slot_of = [(oldest + i) % m for i in range(m)]
    old = copy.deepcopy(state)
    for name in ("SY", "YY"):
        chrono = getattr(state, name)
        slots = torch.zeros_like(chrono)
        for i in range(m):
            for j in range(m):
                slots[slot_of[i], slot_of[j]] = chrono[i, j]
        setattr(old, name, slots)
    old.layout = 0
    converted = state_to_numpy(old, history_size=m)
    np.testing.assert_array_equal(converted.SY, state.SY.numpy())
    np.testing.assert_array_equal(converted.YY, state.YY.numpy())
    a = _solve("l-bfgs", problem.fun, problem.x0_tensor(), small=True, initial_state=old)
    b = _solve("l-bfgs", problem.fun, problem.x0_tensor(), small=True, initial_state=state)
    assert torch.equal(a.x, b.x) and a.nit == b.nit
