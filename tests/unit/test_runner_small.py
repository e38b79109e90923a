"""The worker's side of a small solve: one plain call (SolverWorker.run_quick) that either
finishes the job or hands back a checkpoint the streaming run continues from, with the
iterates of an uninterrupted run; expressions evaluated on numpy give torch's outcome."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import numpy as np
import pytest
import torch

from workers.objectives import Objective
from workers.runner import (
    CheckpointEvent,
    IterateEvent,
    ResultEvent,
    RunSpec,
    SolverWorker,
    iter_solve,
)

ROSENBROCK = "sum(100 * (x[1:] - x[:-1]**2)**2 + (1 - x[:-1])**2)"


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _spec(method: str = "l-bfgs", x0=(-1.2, 1.0), **kw) -> RunSpec:
    return RunSpec(job_id=f"test-{method}", objective_kind="expression", source=ROSENBROCK,
                   blob=b"", data=(), x0=np.array(x0), lower=None, upper=None, method=method,
                   **kw)


def _iterates(events):
    return [(e.iteration, e.f, e.grad_norm, e.step_size, e.nfev, e.njev)
            for e in events if isinstance(e, IterateEvent)]


@pytest.mark.parametrize("method", ["l-bfgs", "bfgs", "newton"])
def test_a_quick_run_gives_the_streamed_runs_events(method):
    worker = SolverWorker()
    quick = worker.run_quick(_spec(method), budget_s=10.0)
    streamed = [event for batch in worker.run(_spec(method)) for event in batch]
    assert isinstance(quick[-1], ResultEvent) and quick[-1].success
    assert _iterates(quick) == _iterates(streamed)
    a, b = quick[-1], streamed[-1]
    assert (a.nit, a.nfev, a.status) == (b.nit, b.nfev, b.status)
    np.testing.assert_array_equal(a.x, b.x)
    assert not worker._stops  # nothing left behind


@pytest.mark.parametrize("method", ["l-bfgs", "bfgs", "newton"])
def test_a_quick_run_out_of_time_ends_in_a_checkpoint_that_resumes_exactly(method):
    worker = SolverWorker()
    spec = _spec(method)
    reference = list(iter_solve(spec))
    first = worker.run_quick(spec, budget_s=0.0)  # suspends after its first iteration
    assert [type(e) for e in first] == [IterateEvent, CheckpointEvent]
    assert first[-1].nit == first[0].iteration == 1
    rest = [e for batch in worker.run(dataclasses.replace(spec, checkpoint=first[-1].state))
            for e in batch]
    assert _iterates(first) + _iterates(rest) == _iterates(reference)
    a, b = rest[-1], reference[-1]
    assert (a.nit, a.nfev, a.njev, a.status) == (b.nit, b.nfev, b.njev, b.status)
    np.testing.assert_array_equal(a.x, b.x)
    assert not worker._stops


def test_a_cancel_reaches_a_quick_run():
    worker = SolverWorker()
    spec = _spec("gd", options={"max_iter": 100_000, "gtol": 1e-300})
    worker.cancel(spec.job_id)  # asked before it starts: it stops at its first evaluation
    events = worker.run_quick(spec, budget_s=10.0)
    assert events[-1].status == "CANCELLED"


def test_expressions_on_numpy_give_the_torch_evaluations_outcome(monkeypatch):
    spec = _spec("l-bfgs", x0=(-1.2, 1.0, -1.2, 1.0, 0.5))
    on_numpy = list(iter_solve(spec))
    monkeypatch.setattr(Objective, "numpy_program", lambda self, x0: None)
    monkeypatch.setattr("workers.runner._objective_cache", OrderedDict())  # not the cached one
    on_torch = list(iter_solve(spec))
    a, b = on_numpy[-1], on_torch[-1]
    assert a.status == b.status == "CONVERGED"
    assert (a.nit, a.nfev) == (b.nit, b.nfev)
    np.testing.assert_allclose(a.x, b.x, rtol=1e-9, atol=1e-12)
