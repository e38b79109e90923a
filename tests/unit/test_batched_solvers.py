"""The batch engine against the single solvers: per-member equivalence on the standard set,
frozen members, NaN isolation, compaction, checkpoint resume and cancel."""

from __future__ import annotations

import math

import pytest
import torch

from workers.solvers import Status, least_squares, minimize
from workers.solvers.batched import (
    RUNNING,
    BatchSolve,
    BatchState,
    batch_state_from_bytes,
    batch_state_to_bytes,
    check_batch_problem,
    least_squares_batch,
    minimize_batch,
)
from workers.solvers.problems import get_problem

PRECISION_PAIR = {int(Status.CONVERGED), int(Status.LINE_SEARCH_FAILED)}


def rosenbrock(X: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    return (100 * (X[:, 1:] - X[:, :-1] ** 2) ** 2 + (1 - X[:, :-1]) ** 2).sum(1)


def rosenbrock_residual(X: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    return torch.stack((10 * (X[:, 1] - X[:, 0] ** 2), 1 - X[:, 0]), 1)


def starts(B: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(B, n, generator=gen, dtype=torch.float64) * 4 - 2


def test_batch_of_one_is_the_single_solver():
    x0 = torch.tensor([-1.2, 1.0], dtype=torch.float64)
    for method in ("bfgs", "l-bfgs", "newton", "l-bfgs-b"):
        single = minimize(lambda x: rosenbrock(x[None])[0], x0, method=method)
        batch = minimize_batch(rosenbrock, x0[None], method=method)
        assert int(batch.status[0]) == int(single.status), method
        assert int(batch.nit[0]) == single.nit, method
        assert int(batch.nfev[0]) == single.nfev, method
        torch.testing.assert_close(batch.x[0], single.x, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["bfgs", "l-bfgs", "newton", "l-bfgs-b"])
def test_random_rosenbrock_members_match_single_solves(method):
    X0 = starts(16)
    batch = minimize_batch(rosenbrock, X0, method=method, options={"gtol": 1e-6})
    for i in range(len(X0)):
        single = minimize(lambda x: rosenbrock(x[None])[0], X0[i], method=method,
                          options={"gtol": 1e-6})
        assert int(batch.status[i]) == int(single.status), (method, i)
        torch.testing.assert_close(batch.x[i], single.x, rtol=1e-6, atol=1e-8)
    assert bool(batch.success.all())


@pytest.mark.parametrize("method", ["lm", "gauss-newton"])
def test_least_squares_members_match_single_solves(method):
    X0 = starts(30, seed=1)
    batch = least_squares_batch(rosenbrock_residual, X0, method=method, options={"gtol": 1e-8})
    for i in range(len(X0)):
        single = least_squares(lambda x: rosenbrock_residual(x[None])[0], X0[i], method=method,
                               options={"gtol": 1e-8})
        assert int(batch.status[i]) == int(single.status), (method, i)
        torch.testing.assert_close(batch.x[i], single.x, rtol=1e-6, atol=1e-8)


# Problems from the standard (MGH) set, each solved from x0 and two moved starts.
STANDARD = ["beale", "helical_valley", "box3d", "wood", "powell_singular", "brown_badly_scaled",
            "freudenstein_roth", "kowalik_osborne", "bard", "rosenbrock"]


def _batched(fun):
    return lambda X, ids: torch.func.vmap(fun)(X)


def _agree(problem, single, batch, i) -> bool:
    """Same status and the same point (or, where the path went its own way by rounding on a
    flat valley, the same value); the precision-loss stop at f's rounding floor may read
    CONVERGED on one side and LINE_SEARCH_FAILED on the other."""
    same_status = int(batch.status[i]) == int(single.status)
    f_single, f_batch = float(single.fun), float(batch.fun[i])
    same_value = abs(f_single - f_batch) <= max(problem.f_atol, 1e-9 * abs(f_single))
    if same_status:
        return bool(torch.allclose(batch.x[i], single.x, rtol=1e-4, atol=1e-6)) or same_value
    both_at_floor = {int(batch.status[i]), int(single.status)} == PRECISION_PAIR
    return both_at_floor and same_value


@pytest.mark.parametrize("method", ["bfgs", "l-bfgs", "newton", "lm"])
def test_standard_problems_member_by_member(method):
    mismatches = []
    for name in STANDARD:
        problem = get_problem(name)
        x0 = problem.x0_tensor()
        X0 = torch.stack((x0, x0 * 1.05 + 0.01, x0 * 0.9 - 0.02))
        options = {"max_iter": 150}
        if method == "lm":
            if problem.residual is None:
                continue
            batch = least_squares_batch(_batched(problem.residual), X0, method=method,
                                        options=options)
        else:
            batch = minimize_batch(_batched(problem.fun), X0, method=method, options=options)
        for i in range(3):
            if method == "lm":
                single = least_squares(problem.residual, X0[i], method=method, options=options)
            else:
                single = minimize(problem.fun, X0[i], method=method, options=options)
            if not _agree(problem, single, batch, i):
                mismatches.append((name, i, single.status.name, Status(int(batch.status[i])).name))
    assert not mismatches, mismatches


def test_finished_members_never_change_again():
    X0 = starts(64)
    X0[0] = torch.tensor([1.0, 1.0], dtype=torch.float64) + 1e-9  # converges at once
    X0[1] = torch.tensor([1.0, 1.0], dtype=torch.float64) + 1e-4  # within a step or two
    seen: dict[int, torch.Tensor] = {}
    violations = []

    def watch(state):
        for row in range(state.rows):
            member = int(state.index[row])
            if int(state.status[row]) != RUNNING or int(state.out_status[member]) != RUNNING:
                x = state.x[row].clone()
                if member in seen and not torch.equal(seen[member], x):
                    violations.append(member)
                seen.setdefault(member, x)
        for member, x in seen.items():
            if int(state.out_status[member]) != RUNNING and not torch.equal(
                    state.out_x[member], x):
                violations.append(member)

    result = BatchSolve(rosenbrock, X0, method="bfgs", options={"gtol": 1e-6},
                        on_checkpoint=watch, checkpoint_interval_s=1e-12).run()
    assert int(result.nit[0]) == 0 and int(result.nit[1]) <= 3
    assert 0 in seen and 1 in seen
    assert not violations
    torch.testing.assert_close(result.x[0], X0[0], rtol=0, atol=0)


def test_working_set_shrinks_as_members_finish():
    X0 = starts(400)
    X0[:300] = 1.0 + 1e-7 * X0[:300]  # most members are done in a step or two
    rows = []
    BatchSolve(rosenbrock, X0, method="bfgs", options={"gtol": 1e-6},
               on_checkpoint=lambda s: rows.append(s.rows), checkpoint_interval_s=1e-12).run()
    assert rows[0] == 400
    assert min(rows) <= 100  # compacted: later iterations touch only the running members


def test_a_members_nan_never_fails_the_others():
    X0 = starts(50, seed=3)
    clean = minimize_batch(rosenbrock, X0, method="bfgs", options={"gtol": 1e-6})
    X0_bad = X0.clone()
    X0_bad[7, 0] = math.nan

    def poisoned(X, ids):
        # member 11's objective is NaN beyond x0 = 0.5: its searches meet non-finite values
        f = rosenbrock(X)
        return torch.where((ids == 11) & (X[:, 0] > 0.5), torch.full_like(f, math.nan), f)

    result = minimize_batch(poisoned, X0_bad, method="bfgs", options={"gtol": 1e-6})
    assert int(result.status[7]) == int(Status.NON_FINITE)
    others = [i for i in range(50) if i not in (7, 11)]
    assert bool(result.success[others].all())
    torch.testing.assert_close(result.x[others], clean.x[others], rtol=0, atol=0)
    assert int(result.status[11]) != int(Status.CONVERGED) or float(result.x[11, 0]) <= 0.5


def test_resume_from_a_checkpoint_gives_the_same_result():
    X0 = starts(200, n=4, seed=5)
    full = minimize_batch(rosenbrock, X0, method="l-bfgs", options={"gtol": 1e-7})
    saved = []

    def keep(state):
        if state.iteration in (3, 15):
            saved.append(batch_state_to_bytes(state))

    BatchSolve(rosenbrock, X0, method="l-bfgs", options={"gtol": 1e-7}, on_checkpoint=keep,
               checkpoint_interval_s=1e-12).run()
    assert len(saved) == 2
    for blob in saved:
        state = batch_state_from_bytes(blob)
        resumed = minimize_batch(rosenbrock, X0, method="l-bfgs", options={"gtol": 1e-7},
                                 initial_state=state)
        for name in ("x", "fun", "status", "nit", "nfev", "njev"):
            torch.testing.assert_close(getattr(resumed, name), getattr(full, name), rtol=0,
                                       atol=0)


def test_cancel_returns_every_members_best_iterate():
    X0 = starts(300, n=6, seed=7)
    calls = {"n": 0}

    def counted(X, ids):
        calls["n"] += 1
        return rosenbrock(X)

    result = minimize_batch(counted, X0, method="bfgs", options={"gtol": 1e-9},
                            should_stop=lambda: calls["n"] >= 12)
    status = result.status
    cancelled = status == int(Status.CANCELLED)
    assert bool(cancelled.any())
    assert bool(((status == int(Status.CONVERGED)) | cancelled).all())
    f0 = rosenbrock(X0)
    assert bool(torch.isfinite(result.x).all())
    assert bool((result.fun <= f0).all())
    torch.testing.assert_close(result.fun, rosenbrock(result.x), rtol=1e-12, atol=0)


def test_callback_progress_is_counts_and_can_cancel():
    X0 = starts(100, seed=9)
    seen = []

    def on_progress(p):
        seen.append(p)
        return p.iteration >= 5

    result = minimize_batch(rosenbrock, X0, method="bfgs", callback=on_progress)
    assert all(p.size == 100 and p.active + p.converged + p.failed == 100 for p in seen[:-1])
    assert seen[-1].active == 0
    assert int((result.status == int(Status.CANCELLED)).sum()) == seen[-1].failed


def test_caps_are_per_member():
    X0 = torch.tensor([[1.0 + 1e-9, 1.0], [-1.2, 1.0]], dtype=torch.float64)
    result = minimize_batch(rosenbrock, X0, method="bfgs", options={"max_iter": 5})
    assert [Status(int(s)) for s in result.status] == [Status.CONVERGED, Status.MAX_ITERATIONS]
    assert int(result.nit[1]) == 5
    result = minimize_batch(rosenbrock, X0, method="bfgs", options={"max_evals": 8})
    assert Status(int(result.status[1])) is Status.MAX_EVALUATIONS
    assert not bool(result.success[1])


def test_bounds_and_float32():
    X0 = starts(20, seed=11)
    lower = torch.tensor([-2.0, -2.0], dtype=torch.float64)
    upper = torch.tensor([0.5, 2.0], dtype=torch.float64)
    result = minimize_batch(rosenbrock, X0, method="l-bfgs-b", bounds=(lower, upper))
    assert bool(result.success.all())
    torch.testing.assert_close(result.x[:, 0], torch.full((20,), 0.5, dtype=torch.float64))
    X32 = X0.float()
    r32 = minimize_batch(rosenbrock, X32, method="bfgs", options={"gtol": 1e-3})
    assert r32.x.dtype == torch.float32 and bool(r32.success.all())


def test_bad_problems_are_value_errors_naming_the_field():
    X0 = starts(4)
    with pytest.raises(ValueError, match="no batched version"):
        check_batch_problem("newton-cg", X0)
    with pytest.raises(ValueError, match=r"\(B, n\)"):
        check_batch_problem("bfgs", X0[0])
    with pytest.raises(ValueError, match="bounds.lower"):
        check_batch_problem("l-bfgs-b", X0, (torch.zeros(3), torch.ones(2)))
    with pytest.raises(ValueError, match="does not take bounds"):
        check_batch_problem("bfgs", X0, (torch.zeros(2), torch.ones(2)))
    with pytest.raises(ValueError, match="unknown option"):
        check_batch_problem("bfgs", X0, None, {"nope": 1})


@pytest.mark.parametrize("method", ["bfgs", "l-bfgs", "gauss-newton"])
def test_the_gpu_path_syncs_once_per_engine_step(monkeypatch, method):
    """sync_free (the CUDA default) reads one number back per engine step, and one more per
    compaction; run here on the CPU, it gives the same members as the gathering CPU path."""
    X0 = starts(300, seed=13)
    least = method == "gauss-newton"
    fun = rosenbrock_residual if least else rosenbrock
    gathered = BatchSolve(fun, X0, method=method, residual=least, sync_free=False).run()
    solve = BatchSolve(fun, X0, method=method, residual=least, sync_free=True)
    syncs = {"n": 0}
    compactions = {"n": 0}

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            syncs["n"] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in ("__bool__", "__int__", "__float__", "item", "tolist", "nonzero"):
        counting(name)
    keep_rows = BatchState.keep_rows

    def counted_keep_rows(self, rows):
        compactions["n"] += 1
        return keep_rows(self, rows)

    monkeypatch.setattr(BatchState, "keep_rows", counted_keep_rows)
    steps = {"n": 0}
    solve.on_checkpoint = lambda state: steps.__setitem__("n", state.iteration + 1)
    solve.checkpoint_interval_s = 1e-12
    result = solve.run()
    monkeypatch.undo()
    assert syncs["n"] <= steps["n"] + 2 + 2 * compactions["n"], (syncs, steps, compactions)
    for name in ("x", "status", "nit", "nfev"):
        torch.testing.assert_close(getattr(result, name), getattr(gathered, name), rtol=0, atol=0)
