"""The small-solve path end to end: the gateway's solver pool (service/solver_pool.py), the
budgeted first run and its continuation on Ray, coalesced event streams, the group commit.
Every outcome is compared with the same job on a gateway without a pool."""

from __future__ import annotations

import os
import signal
import time

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2

from secant.v1 import optimizer_pb2 as pb
from secant.v1 import optimizer_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

ROSENBROCK = "sum(100 * (x[1:] - x[:-1]**2)**2 + (1 - x[:-1])**2)"
TERMINAL = {pb.SUCCEEDED, pb.FAILED, pb.CANCELLED}


def _problem(x0, method="l-bfgs", options=None, **fields) -> pb.Problem:
    array = np.asarray(x0, dtype=np.float64)
    struct = struct_pb2.Struct()
    struct.update(options or {})
    return pb.Problem(
        objective=pb.Objective(expression=ROSENBROCK),
        x0=pb.Tensor(shape=list(array.shape), dtype=pb.FLOAT64, data=array.tobytes()),
        method=method, options=struct, **fields,
    )


def _long_small(max_iter: int = 4000) -> pb.Problem:
    """Gradient descent on Rosenbrock n = 10: thousands of iterations, far past the pool's
    20 ms budget, so it goes on on Ray from the pool's checkpoint."""
    return _problem(np.tile([-1.2, 1.0], 5), method="gd",
                    options={"max_iter": max_iter, "gtol": 1e-300})


@pytest.fixture(scope="module")
def gateways(gateway_factory):
    """(a gateway with a solver pool, one without), one Ray worker each."""
    pooled = gateway_factory(workers=1, solver_processes=1)
    plain = gateway_factory(workers=1, solver_processes=0)
    assert pooled.gateway.jobs._pool is not None and plain.gateway.jobs._pool is None
    with grpc.insecure_channel(pooled.address) as a, grpc.insecure_channel(plain.address) as b:
        yield pooled, pb_grpc.OptimizerStub(a), pb_grpc.OptimizerStub(b)


def _solve(stub, problem, coalesce=True):
    messages = list(stub.Solve(pb.SolveRequest(problem=problem, coalesce_events=coalesce),
                               timeout=120))
    events = []
    for message in messages:
        rest = list(message.more)
        message.ClearField("more")
        events += [message, *rest]
    return messages, events


def _iterates(events):
    return [(e.iterate.iteration, e.iterate.f, e.iterate.nfev, e.iterate.step_size)
            for e in events if e.WhichOneof("kind") == "iterate"]


def _contiguous(events) -> None:
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    kinds = [e.WhichOneof("kind") for e in events]
    assert kinds[0] == "accepted" and kinds[-1] == "result"
    running = [e for e in events if e.WhichOneof("kind") == "state_change"]
    assert [e.state_change.state for e in running] == [pb.RUNNING]  # once, pool then Ray too
    iterations = [e.iterate.iteration for e in events if e.WhichOneof("kind") == "iterate"]
    assert iterations == list(range(1, len(iterations) + 1))


def test_a_small_solve_comes_in_two_messages_with_rays_outcome(gateways):
    _, pooled, plain = gateways
    messages, events = _solve(pooled, _problem([-1.2, 1.0]))
    _, reference = _solve(plain, _problem([-1.2, 1.0]))
    assert len(messages) == 2  # accepted at once; the rest, stored, together
    _contiguous(events)
    assert _iterates(events) == _iterates(reference)  # the same numpy solve, bit for bit
    a, b = events[-1].result, reference[-1].result
    assert (a.nit, a.nfev, a.status, a.x.data) == (b.nit, b.nfev, b.status, b.x.data)
    # without coalescing: one event per message, the same events
    messages, single = _solve(pooled, _problem([-1.2, 1.0]), coalesce=False)
    assert len(messages) == len(single) == len(events)
    assert _iterates(single) == _iterates(events)


def test_a_small_solve_past_its_budget_goes_on_on_ray_with_the_same_iterates(gateways):
    _, pooled, plain = gateways
    _, events = _solve(pooled, _long_small())
    _, reference = _solve(plain, _long_small())
    _contiguous(events)
    assert len(_iterates(events)) == 4000
    assert _iterates(events) == _iterates(reference)
    assert events[-1].result.x.data == reference[-1].result.x.data
    assert events[-1].result.status == pb.MAX_ITERATIONS


def test_small_solves_do_not_wait_behind_a_big_one(gateways):
    server, pooled, _ = gateways
    big = pooled.Submit(pb.SubmitRequest(problem=_problem(
        np.full(2000, -1.0), method="gd", options={"max_iter": 10_000_000, "gtol": 1e-14})),
        timeout=10)
    try:
        deadline = time.monotonic() + 60
        while pooled.GetJob(pb.GetJobRequest(job_id=big.job_id)).state != pb.RUNNING:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for _ in range(3):  # the only Ray worker is busy; the pool is not
            _, events = _solve(pooled, _problem([-1.2, 1.0]))
            assert events[-1].result.success
        assert pooled.GetJob(pb.GetJobRequest(job_id=big.job_id)).state == pb.RUNNING
    finally:
        pooled.CancelJob(pb.CancelJobRequest(job_id=big.job_id), timeout=10)


def test_a_cancelled_small_solve_ends_cancelled_with_its_last_iterate(gateways):
    _, pooled, _ = gateways
    job = pooled.Submit(pb.SubmitRequest(problem=_long_small(max_iter=10_000_000)), timeout=10)
    stream = pooled.Watch(pb.WatchRequest(job_id=job.job_id), timeout=60)
    for event in stream:
        if event.WhichOneof("kind") == "iterate":
            break
    pooled.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=10)
    rest = list(stream)
    assert rest[-1].result.status == pb.CANCELLED_BY_USER
    assert pooled.GetJob(pb.GetJobRequest(job_id=job.job_id)).state == pb.CANCELLED


def test_a_pool_process_that_dies_is_replaced(gateways):
    server, pooled, _ = gateways
    pool = server.gateway.jobs._pool
    (slot,) = pool._slots
    os.kill(slot.process.pid, signal.SIGKILL)
    deadline = time.monotonic() + 90
    while True:  # replaced in the background; jobs meanwhile go through the restart path
        _, events = _solve(pooled, _problem([-1.2, 1.0]))
        assert events[-1].result.success
        if pool._slots and pool._slots[0] is not slot and pool._slots[0].alive:
            break
        assert time.monotonic() < deadline, "no replacement solver process"
        time.sleep(0.2)
    _, events = _solve(pooled, _problem([-1.2, 1.0]))
    assert events[-1].result.success


def test_concurrent_submits_share_store_writes_and_each_gets_its_job(gateways):
    """The group commit: many submits at once, every one acknowledged with its own stored
    job, every stream contiguous and ending in its result."""
    import concurrent.futures

    _, pooled, _ = gateways
    problems = [_problem([-1.2 + 0.01 * i, 1.0]) for i in range(24)]
    with concurrent.futures.ThreadPoolExecutor(12) as workers:
        outcomes = list(workers.map(lambda p: _solve(pooled, p)[1], problems))
    ids = {events[0].job_id for events in outcomes}
    assert len(ids) == len(problems)
    for events in outcomes:
        _contiguous(events)
        stored = list(pooled.Watch(pb.WatchRequest(job_id=events[0].job_id), timeout=30))
        assert [e.seq for e in stored] == [e.seq for e in events]
        assert pooled.GetJob(pb.GetJobRequest(job_id=events[0].job_id)).state == pb.SUCCEEDED
