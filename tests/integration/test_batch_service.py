"""Vectorized batches through a real gateway and local Ray: one job per batch, per-member results,
progress as counts, chunks, cancel, lost workers and restarts, replay, quotas and refusals."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
import uuid

import grpc
import numpy as np
import pytest
import torch
import waiting  # tests/waiting.py
from google.protobuf import struct_pb2

from secant.v1 import optimizer_pb2 as pb
from secant.v1 import optimizer_pb2_grpc as pb_grpc
from service import batch_jobs
from service.store import NewJob, open_store
from service.validation import Limits, validate_problem
from workers.batch_runner import iter_batch_solve
from workers.objectives import build_batch_objective
from workers.runner import CheckpointEvent
from workers.solvers.batched import minimize_batch

pytestmark = pytest.mark.integration

ROSENBROCK = "sum(100 * (x[1:] - x[:-1]**2)**2 + (1 - x[:-1])**2)"
# Member i's Rosenbrock valley shifted by its own c[i]: its minimum is at c[i] + 1.
SHIFTED = "sum(100 * ((x - c)[1:] - (x - c)[:-1]**2)**2 + (1 - (x - c)[:-1])**2)"
TERMINAL = {pb.SUCCEEDED, pb.FAILED, pb.CANCELLED}
_NUMPY = {pb.FLOAT64: "<f8", pb.FLOAT32: "<f4", pb.INT64: "<i8", pb.INT32: "<i4"}


def tensor(values) -> pb.Tensor:
    array = np.ascontiguousarray(values, dtype=np.float64)
    return pb.Tensor(shape=list(array.shape), dtype=pb.FLOAT64, data=array.tobytes())


def array(t: pb.Tensor) -> np.ndarray:
    return np.frombuffer(t.data, dtype=_NUMPY[t.dtype]).reshape(tuple(t.shape))


def batch_problem(x0, *, expression=ROSENBROCK, method="bfgs", options=None, member_data=None,
                  chunk_size=0, size=None, **fields) -> pb.Problem:
    x0 = np.asarray(x0, dtype=np.float64)
    struct = struct_pb2.Struct()
    struct.update(options or {})
    return pb.Problem(
        objective=pb.Objective(expression=expression),
        x0=tensor(x0),
        method=method,
        options=struct,
        batch=pb.BatchSpec(
            size=x0.shape[0] if size is None else size,
            member_data=[pb.NamedTensor(name=k, tensor=tensor(v))
                         for k, v in (member_data or {}).items()],
            chunk_size=chunk_size,
        ),
        **fields,
    )


def starts(members: int, n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-2.0, 2.0, (members, n))


def wait_for_state(stub, job_id, states, timeout=30.0) -> pb.Job:
    return waiting.wait_for_state(
        lambda: stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=5), states, timeout,
        pb.JobState.Name)


def all_jobs(stub) -> list[pb.Job]:
    jobs, token = [], ""
    while True:
        page = stub.ListJobs(pb.ListJobsRequest(page_size=500, page_token=token), timeout=10)
        jobs += page.jobs
        token = page.next_page_token
        if not token:
            return jobs


QUOTA = 150_000


@pytest.fixture(scope="module")
def server(gateway_factory):
    """Two CPU workers (so chunks run side by side), quick checkpoints, a short cancel grace."""
    server = gateway_factory(
        workers=2, checkpoint_interval_s=0.05, cancel_grace_s=2.0,
        limits=Limits(max_message_bytes=8 * 2**20, max_dimension_per_caller=QUOTA),
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.OptimizerStub(channel)


# -- one job, per-member results --------------------------------------------------------------


def test_a_batch_is_one_job_with_every_members_result(stub):
    x0 = starts(48)
    before = {job.job_id for job in all_jobs(stub)}

    events = list(stub.Solve(pb.SolveRequest(problem=batch_problem(x0)), timeout=60))

    new_jobs = [job for job in all_jobs(stub) if job.job_id not in before]
    assert len(new_jobs) == 1
    job = new_jobs[0]
    assert job.state == pb.SUCCEEDED and job.n == 2 and job.method == "bfgs"
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    accepted = events[0].accepted
    assert accepted.members == 48 and accepted.n == 2
    result = events[-1].result
    assert result == job.result
    assert result.success and result.status == pb.CONVERGED
    assert result.message == "48 of 48 members converged"
    assert result.batch.converged == 48
    x = array(result.x)
    assert x.shape == (48, 2) and array(result.jac).shape == (48, 2)
    np.testing.assert_allclose(x, 1.0, atol=1e-4)
    assert array(result.batch.status).tolist() == [pb.CONVERGED] * 48
    fun, nit = array(result.batch.fun), array(result.batch.nit)
    assert fun.shape == (48,) and nit.shape == (48,) and (nit > 0).all()
    assert result.fun == fun.min()
    assert result.nit == nit.max() and result.nfev == array(result.batch.nfev).sum()

    # The engine in this process, on the same starts, gives the same members' answers.
    X0 = torch.from_numpy(x0)
    objective = build_batch_objective(kind="expression", source=ROSENBROCK, x0=X0)
    local = minimize_batch(objective.fun, X0, method="bfgs")
    np.testing.assert_array_equal(x, local.x.numpy())
    np.testing.assert_array_equal(nit, local.nit.numpy())


def test_metrics_count_members_by_status_and_batch_sizes(stub, server):
    def scrape() -> str:
        return urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()

    def value(text: str, name: str) -> float:
        lines = [line for line in text.splitlines() if line.startswith(name + " ")]
        return float(lines[0].split()[-1]) if lines else 0.0

    converged = 'secant_batch_members_total{method="bfgs",status="converged"}'
    non_finite = 'secant_batch_members_total{method="bfgs",status="non_finite"}'
    sizes = 'secant_batch_size_count{method="bfgs"}'
    before = scrape()
    x0 = starts(10, seed=8)
    x0[0] = np.nan
    list(stub.Solve(pb.SolveRequest(problem=batch_problem(x0)), timeout=60))

    after = scrape()
    assert value(after, converged) - value(before, converged) == 9
    assert value(after, non_finite) - value(before, non_finite) == 1
    assert value(after, sizes) - value(before, sizes) == 1


def test_progress_is_counts_and_quantiles_never_one_event_per_member(stub):
    members = 40
    events = list(stub.Solve(pb.SolveRequest(problem=batch_problem(starts(members, seed=1))),
                             timeout=60))

    iterates = [e.iterate for e in events if e.HasField("iterate")]
    result = events[-1].result
    assert iterates, "a batch reports progress"
    assert len(iterates) <= result.nit + 1  # at most one per engine iteration, not B
    for it in iterates:
        p = it.batch
        assert p.size == members
        assert p.active + p.converged + p.failed == members
        assert not it.HasField("x")
        assert it.f == p.median_f or (np.isnan(it.f) and np.isnan(p.median_f))
    assert [it.iteration for it in iterates] == sorted(it.iteration for it in iterates)
    assert iterates[-1].batch.converged == members and iterates[-1].batch.active == 0


def test_a_nan_member_ends_non_finite_and_the_others_converge(stub):
    x0 = starts(16, seed=2)
    x0[5] = [np.nan, 0.5]

    events = list(stub.Solve(pb.SolveRequest(problem=batch_problem(x0)), timeout=60))

    result = events[-1].result
    status = array(result.batch.status)
    assert status[5] == pb.NON_FINITE
    assert (np.delete(status, 5) == pb.CONVERGED).all()
    np.testing.assert_allclose(np.delete(array(result.x), 5, axis=0), 1.0, atol=1e-4)
    assert not result.success and result.status == pb.NON_FINITE
    assert result.message == "15 of 16 members converged; 1 NON_FINITE"
    assert result.batch.converged == 15
    job = stub.GetJob(pb.GetJobRequest(job_id=events[0].job_id), timeout=5)
    assert job.state == pb.FAILED and job.result == result


def test_the_sdk_solves_a_batch_with_per_member_data_in_one_job(server):
    import secant

    members = 20
    shifts = np.random.default_rng(11).uniform(-1.0, 1.0, (members, 2))
    x0 = starts(members, seed=12)
    x0[3] = np.nan
    with secant.Client(server.address) as client:
        result = client.minimize_batch(SHIFTED, x0, member_data={"c": shifts}, method="bfgs",
                                       chunk_size=7, timeout=60)

    assert result.size == members and result.converged == members - 1
    assert not result.success[3] and result.success.sum() == members - 1
    np.testing.assert_allclose(np.delete(result.x, 3, 0), np.delete(shifts + 1.0, 3, 0),
                               atol=1e-4)
    assert result.status_counts() == {"CONVERGED": members - 1, "NON_FINITE": 1}
    assert result[0].success and result[0].x.shape == (2,)


# -- refusals ---------------------------------------------------------------------------------


def _refusal(stub, problem) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Submit(pb.SubmitRequest(problem=problem), timeout=10)
    return caught.value


def test_member_data_of_the_wrong_length_is_invalid_and_named(stub):
    x0 = starts(8)
    problem = batch_problem(x0, expression=SHIFTED, member_data={"c": np.zeros((7, 2))})

    error = _refusal(stub, problem)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "problem.batch.member_data.c" in error.details()
    assert "7" in error.details() and "8" in error.details()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda p: setattr(p.batch, "size", 9), "problem.x0.shape"),
        (lambda p: p.x0.CopyFrom(tensor(np.zeros(8))), "problem.x0.shape"),
        (lambda p: setattr(p, "method", "newton-cg"), "problem.method"),
        (lambda p: p.bounds.lower.CopyFrom(tensor(np.zeros(3))), "problem.bounds.lower"),
        (lambda p: setattr(p, "report_x_every", 1), "problem.report_x_every"),
        (lambda p: (p.objective.data.add(name="c", tensor=tensor(np.zeros(2))),
                    p.batch.member_data.add(name="c", tensor=tensor(np.zeros((8, 2))))),
         "problem.batch.member_data.c"),
    ],
)
def test_malformed_batches_are_invalid_arguments_naming_the_field(stub, change, field):
    problem = batch_problem(starts(8))
    change(problem)
    if problem.HasField("bounds") and not problem.bounds.HasField("upper"):
        problem.method = "l-bfgs-b"
        problem.bounds.upper.CopyFrom(tensor(np.ones(3)))

    error = _refusal(stub, problem)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    if field is not None:
        assert error.details().startswith(field), error.details()


def test_the_default_quotas_admit_a_10000_by_10_batch_and_a_quota_names_itself(stub):
    assert validate_problem(batch_problem(starts(10_000, 10)), Limits(),
                            trusted=False).quota_dimensions == 100_000
    assert Limits().max_dimension_per_caller >= 100_000

    # This gateway's quota (QUOTA) takes one such batch at a time: a batch counts B x n.
    job = stub.Submit(pb.SubmitRequest(problem=batch_problem(starts(10_000, 10))), timeout=30)
    try:
        error = _refusal(stub, batch_problem(starts(6_000, 10)))
    finally:
        stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=5)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_dimension_per_caller" in error.details()
    assert "100000 dimensions" in error.details() and "60000 more" in error.details()
    assert wait_for_state(stub, job.job_id, TERMINAL).state == pb.CANCELLED


# -- chunks -----------------------------------------------------------------------------------


def test_a_chunked_batch_gives_the_unchunked_answers(stub, server):
    members = 30
    x0 = starts(members, seed=3)
    shifts = np.random.default_rng(4).uniform(-1.0, 1.0, (members, 2))

    def solve(chunk_size):
        problem = batch_problem(x0, expression=SHIFTED, member_data={"c": shifts},
                                chunk_size=chunk_size)
        return list(stub.Solve(pb.SolveRequest(problem=problem), timeout=60))

    whole, chunked = solve(0), solve(8)  # 4 chunks of 7-8 members on 2 workers

    a, b = whole[-1].result, chunked[-1].result
    assert a.success and b.success
    np.testing.assert_allclose(array(a.x), shifts + 1.0, atol=1e-4)
    np.testing.assert_allclose(array(b.x), array(a.x), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(array(b.batch.status), array(a.batch.status))
    np.testing.assert_array_equal(array(b.batch.nit), array(a.batch.nit))
    np.testing.assert_allclose(array(b.batch.fun), array(a.batch.fun), rtol=0, atol=1e-18)
    assert b.message == a.message == f"{members} of {members} members converged"
    final = [e.iterate for e in chunked if e.HasField("iterate")][-1].batch
    assert (final.size, final.converged, final.active) == (members, members, 0)


# A batch that runs for many seconds: Rosenbrock in 400 dimensions by L-BFGS with no
# tolerance that could stop it early.
LONG = {"gtol": 0.0, "ftol": 0.0, "xtol": 0.0, "max_iter": 1_000_000}


def test_cancel_mid_batch_ends_cancelled_with_every_members_iterate(stub):
    members, n = 8, 400
    problem = batch_problem(starts(members, n, seed=5), method="l-bfgs", options=LONG,
                            chunk_size=4)
    job = stub.Submit(pb.SubmitRequest(problem=problem), timeout=10)
    stream = stub.Watch(pb.WatchRequest(job_id=job.job_id), timeout=60)
    events = []
    for event in stream:
        events.append(event)
        if event.HasField("iterate") and event.iterate.iteration >= 5:
            break

    stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=5)
    events += list(stream)  # ends with the job; the stream's 60 s deadline guards a hang

    final = stub.GetJob(pb.GetJobRequest(job_id=job.job_id), timeout=5)
    assert final.state == pb.CANCELLED
    result = final.result
    assert events[-1].result == result
    assert not result.success and result.status == pb.CANCELLED_BY_USER
    x = array(result.x)
    assert x.shape == (members, n) and np.isfinite(x).all()
    assert array(result.batch.status).tolist() == [pb.CANCELLED_BY_USER] * members
    assert array(result.batch.nit).max() >= 5  # the furthest chunk's members got that far
    assert np.isfinite(array(result.batch.fun)).all()


def test_workers_that_do_not_stop_in_time_end_the_batch_cancelled_without_a_result(
    make_gateway
):
    server = make_gateway(workers=2, cancel_grace_s=0.0)  # no time to answer at all
    problem = batch_problem(starts(8, 400, seed=13), method="l-bfgs", options=LONG,
                            chunk_size=4)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.OptimizerStub(channel)
        job = stub.Submit(pb.SubmitRequest(problem=problem), timeout=10)
        stream = stub.Watch(pb.WatchRequest(job_id=job.job_id), timeout=60)
        events = []
        for event in stream:
            events.append(event)
            if event.HasField("iterate") and event.iterate.iteration >= 2:
                break
        stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=5)
        events += list(stream)
        final = stub.GetJob(pb.GetJobRequest(job_id=job.job_id), timeout=5)

    assert final.state == pb.CANCELLED and not final.HasField("result")
    last = events[-1]
    assert last.state_change.state == pb.CANCELLED
    assert "did not stop within 0 s, so there is no per-member result" in (
        last.state_change.reason)


def test_a_lost_worker_reruns_only_its_chunk_from_its_checkpoint(stub, server):
    members, n = 8, 20
    x0 = starts(members, n, seed=6)

    def problem():
        return batch_problem(x0, method="l-bfgs", options={"gtol": 1e-9}, chunk_size=4)

    reference = list(stub.Solve(pb.SolveRequest(problem=problem()), timeout=60))[-1].result
    job = stub.Submit(pb.SubmitRequest(problem=problem()), timeout=10)
    manager = server.gateway.jobs
    deadline = time.monotonic() + 30
    chunk = None
    while chunk is None and time.monotonic() < deadline:
        live = manager._live.get(job.job_id)
        chunks = live.batch.chunks if live is not None else []
        chunk = next((c for c in chunks if c.checkpoint and c.worker is not None), None)
        time.sleep(0.005)
    if chunk is None:
        pytest.skip("the batch finished before a chunk checkpointed")
    worker = chunk.worker
    pid = server._call(manager._scheduler.worker_pid(worker), 10)
    if chunk.result is not None:
        pytest.skip("the chunk finished before its worker could be killed")
    os.kill(pid, signal.SIGKILL)

    events = list(stub.Watch(pb.WatchRequest(job_id=job.job_id), timeout=60))

    assert events[-1].HasField("result"), events[-1]
    result = events[-1].result
    np.testing.assert_array_equal(array(result.x), array(reference.x))
    np.testing.assert_array_equal(array(result.batch.nit), array(reference.batch.nit))
    np.testing.assert_array_equal(array(result.batch.status), array(reference.batch.status))
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    reasons = [e.state_change.reason for e in events if e.HasField("state_change")]
    assert any(f"members [{chunk.start}, {chunk.stop}) resume from iteration" in r
               for r in reasons), reasons


# -- replay -----------------------------------------------------------------------------------


def test_watch_replays_a_finished_batch_job(stub):
    job = stub.Submit(pb.SubmitRequest(problem=batch_problem(starts(12, seed=7))), timeout=10)
    final = wait_for_state(stub, job.job_id, TERMINAL)

    everything = list(stub.Watch(pb.WatchRequest(job_id=job.job_id), timeout=30))
    tail = list(stub.Watch(pb.WatchRequest(job_id=job.job_id, after_seq=2), timeout=30))

    assert [e.seq for e in everything] == list(range(1, final.last_seq + 1))
    assert everything[0].accepted.members == 12
    assert everything[-1].result == final.result
    assert array(final.result.x).shape == (12, 2)
    assert tail == everything[2:]


def test_a_restarted_gateway_resumes_each_chunk_from_its_own_checkpoint(stub, make_gateway,
                                                                         tmp_path):
    x0 = starts(8, 20, seed=9)
    problem = batch_problem(x0, method="l-bfgs", options={"gtol": 1e-9}, chunk_size=4)
    reference = list(stub.Solve(pb.SolveRequest(problem=problem), timeout=60))[-1].result

    # What a gateway killed mid-job leaves in its store: the job RUNNING, its problem, and
    # the job's checkpoint blob, here with a state for the first chunk only.
    spec = validate_problem(problem, Limits(), trusted=False)
    run = batch_jobs.new_run(spec, Limits(), workers=2)
    assert [(c.start, c.stop) for c in run.chunks] == [(0, 4), (4, 8)]
    states = [e for e in iter_batch_solve(spec.run_spec("dead", 0, 4, checkpoint_interval_s=1e-9))
              if isinstance(e, CheckpointEvent)]
    run.chunks[0].checkpoint, run.chunks[0].checkpoint_nit = states[5].state, states[5].nit
    db = str(tmp_path / "secant.db")
    job = pb.Job(job_id=uuid.uuid4().hex, state=pb.RUNNING, method=spec.method, n=spec.n,
                 kind="solve", last_seq=2)
    job.created.GetCurrentTime()
    accepted = pb.JobEvent(job_id=job.job_id, seq=1, accepted=pb.Accepted(
        state=pb.QUEUED, method=spec.method, n=spec.n, members=spec.members))
    running = pb.JobEvent(job_id=job.job_id, seq=2, state_change=pb.StateChange(
        state=pb.RUNNING))
    store = open_store(db)
    store.create_jobs([NewJob(job, problem.SerializeToString(), "", [accepted])])
    store.write([job], [running], {job.job_id: batch_jobs.pack_checkpoint(run)})
    store.close()

    server = make_gateway(db=db, workers=2)
    with grpc.insecure_channel(server.address) as channel:
        events = list(pb_grpc.OptimizerStub(channel).Watch(
            pb.WatchRequest(job_id=job.job_id), timeout=60))

    assert events[-1].HasField("result"), events[-1]
    result = events[-1].result
    np.testing.assert_array_equal(array(result.x), array(reference.x))
    np.testing.assert_array_equal(array(result.batch.nit), array(reference.batch.nit))
    np.testing.assert_array_equal(array(result.batch.status), array(reference.batch.status))
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    reasons = [e.state_change.reason for e in events if e.HasField("state_change")]
    assert any("the gateway restarted; resuming" in r for r in reasons), reasons


def test_the_checkpoint_blob_keeps_the_plan_and_each_chunks_state():
    spec = validate_problem(batch_problem(starts(10), chunk_size=4), Limits(), trusted=False)
    run = batch_jobs.new_run(spec, Limits(), workers=2)
    assert [(c.start, c.stop) for c in run.chunks] == [(0, 3), (3, 6), (6, 10)]
    run.chunks[1].checkpoint, run.chunks[1].checkpoint_nit = b"state of chunk 1", 7

    restored = batch_jobs.new_run(spec, Limits(), workers=5,
                                  checkpoint=batch_jobs.pack_checkpoint(run))

    assert [(c.start, c.stop, c.checkpoint, c.checkpoint_nit) for c in restored.chunks] == [
        (0, 3, None, 0), (3, 6, b"state of chunk 1", 7), (6, 10, None, 0)]
    with pytest.raises(ValueError):
        batch_jobs.unpack_checkpoint(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    # A small batch stays whole on CPU; a large one is spread over the workers.
    whole = validate_problem(batch_problem(starts(1_000)), Limits(), trusted=False)
    assert batch_jobs.plan_chunks(whole, Limits(), workers=4) == [(0, 1_000)]
    large = validate_problem(batch_problem(starts(10_000)), Limits(), trusted=False)
    assert batch_jobs.plan_chunks(large, Limits(), workers=4) == [
        (0, 2_500), (2_500, 5_000), (5_000, 7_500), (7_500, 10_000)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_cuda_batch_runs_whole_on_one_gpu_worker(stub):
    problem = batch_problem(starts(3_000, seed=10), chunk_size=1_000, device="cuda")
    spec = validate_problem(problem, Limits(), trusted=False)
    assert batch_jobs.plan_chunks(spec, Limits(), workers=2) == [(0, 3_000)]

    events = list(stub.Solve(pb.SolveRequest(problem=problem), timeout=120))

    result = events[-1].result
    assert result.success, result.message
    np.testing.assert_allclose(array(result.x), 1.0, atol=1e-4)
