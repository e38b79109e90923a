"""The gateway through raw gRPC stubs: a real gateway on a loopback port, a real local Ray."""

from __future__ import annotations

import math
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import waiting  # tests/waiting.py
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from secant.v1 import optimizer_pb2 as pb
from secant.v1 import optimizer_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

ROSENBROCK = "sum(100 * (x[1:] - x[:-1]**2)**2 + (1 - x[:-1])**2)"
TERMINAL = {pb.SUCCEEDED, pb.FAILED, pb.CANCELLED}


def tensor(values, dtype=pb.FLOAT64) -> pb.Tensor:
    array = np.asarray(values, dtype=np.float64 if dtype == pb.FLOAT64 else np.float32)
    return pb.Tensor(shape=list(array.shape), dtype=dtype, data=array.tobytes())


def problem(x0=(-1.2, 1.0), method="l-bfgs", options=None, expression=ROSENBROCK, **fields):
    struct = struct_pb2.Struct()
    struct.update(options or {})
    return pb.Problem(
        objective=pb.Objective(expression=expression),
        x0=tensor(x0),
        method=method,
        options=struct,
        **fields,
    )


def long_problem() -> pb.Problem:
    """Gradient descent down a long Rosenbrock valley: many seconds unless cancelled."""
    return problem(
        x0=np.full(2000, -1.0), method="gd",
        options={"max_iter": 10_000_000, "gtol": 1e-14}, report_x_every=1,
    )


def vector(t: pb.Tensor) -> np.ndarray:
    return np.frombuffer(t.data, dtype=np.float64 if t.dtype == pb.FLOAT64 else np.float32)


def wait_for_state(stub, job_id, states, timeout=60.0) -> pb.Job:
    return waiting.wait_for_state(
        lambda: stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=5), states, timeout,
        pb.JobState.Name)


# -- health and reflection --------------------------------------------------------------------


def test_health_reports_serving(grpc_channel):
    health = health_pb2_grpc.HealthStub(grpc_channel)
    for service in ("", "secant.v1.Optimizer"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(grpc_channel):
    reflection = reflection_pb2_grpc.ServerReflectionStub(grpc_channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    replies = list(reflection.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in replies[0].list_services_response.service}
    assert "secant.v1.Optimizer" in names
    assert "grpc.health.v1.Health" in names


# -- solving ----------------------------------------------------------------------------------


def test_solve_streams_contiguous_events_ending_with_the_result(stub):
    events = list(stub.Solve(pb.SolveRequest(problem=problem()), timeout=60))

    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[0].WhichOneof("kind") == "accepted"
    assert events[1].state_change.state == pb.RUNNING
    assert all(e.WhichOneof("kind") == "iterate" for e in events[2:-1])
    assert [e.iterate.iteration for e in events[2:-1]] == list(range(1, len(events) - 2))
    result = events[-1].result
    assert result.success and result.status == pb.CONVERGED
    np.testing.assert_allclose(vector(result.x), [1.0, 1.0], atol=1e-5)
    job = stub.GetJob(pb.GetJobRequest(job_id=events[0].job_id))
    assert job.state == pb.SUCCEEDED
    assert job.last_seq == events[-1].seq
    assert job.result == result


def test_solve_and_submit_watch_give_identical_results(stub):
    solved = list(stub.Solve(pb.SolveRequest(problem=problem()), timeout=60))
    job = stub.Submit(pb.SubmitRequest(problem=problem()), timeout=10)
    watched = list(stub.Watch(pb.WatchRequest(job_id=job.job_id), timeout=60))

    assert job.state in (pb.QUEUED, pb.RUNNING, pb.SUCCEEDED)
    assert [e.seq for e in watched] == list(range(1, len(watched) + 1))
    a, b = solved[-1].result, watched[-1].result
    assert vector(a.x).tolist() == vector(b.x).tolist()
    assert (a.fun, a.nit, a.nfev, a.njev, a.status) == (b.fun, b.nit, b.nfev, b.njev, b.status)
    assert [e.iterate.f for e in solved[2:-1]] == [e.iterate.f for e in watched[2:-1]]


def test_watch_after_a_disconnect_replays_exactly_the_missed_events(stub):
    stream = stub.Solve(pb.SolveRequest(problem=problem(method="bfgs")), timeout=60)
    seen = [next(stream) for _ in range(3)]
    stream.cancel()  # the client goes away mid-solve
    job_id = seen[0].job_id

    rest = list(stub.Watch(pb.WatchRequest(job_id=job_id, after_seq=seen[-1].seq), timeout=60))
    everything = list(stub.Watch(pb.WatchRequest(job_id=job_id), timeout=60))

    assert seen + rest == everything
    assert [e.seq for e in everything] == list(range(1, len(everything) + 1))
    assert everything[-1].WhichOneof("kind") == "result"


def test_cancel_ends_a_long_solve_with_its_last_iterate(stub):
    job = stub.Submit(pb.SubmitRequest(problem=long_problem()), timeout=10)
    events = []
    stream = stub.Watch(pb.WatchRequest(job_id=job.job_id), timeout=60)
    for event in stream:
        events.append(event)
        if event.WhichOneof("kind") == "iterate" and event.iterate.iteration >= 3:
            break

    stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=5)
    events += list(stream)  # the stream ends when the job does (its 60 s deadline: a hang)

    final = stub.GetJob(pb.GetJobRequest(job_id=job.job_id))
    assert final.state == pb.CANCELLED
    result = final.result
    assert result.status == pb.CANCELLED_BY_USER and not result.success
    last_iterate = [e.iterate for e in events if e.WhichOneof("kind") == "iterate"][-1]
    assert result.nit >= last_iterate.iteration
    assert vector(result.x).shape == (2000,)
    assert events[-1].result == result


@pytest.fixture(scope="module")
def small_stub(gateway_factory):
    """A gateway with one worker and room for two jobs in flight, which gives a cancelled
    worker no time to stop by itself (so the gateway's own way of ending a job runs). No
    solver pool: its small jobs queue for that one worker too."""
    from service.validation import Limits

    server = gateway_factory(
        workers=1, limits=Limits(max_concurrent_jobs=2), cancel_grace_s=0.0,
        solver_processes=0,
    )
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.OptimizerStub(channel)
    server.stop()


def test_cancel_of_a_queued_job_ends_it_before_it_starts(small_stub):
    stub = small_stub
    blocker = stub.Submit(pb.SubmitRequest(problem=long_problem()), timeout=10)
    queued = stub.Submit(pb.SubmitRequest(problem=problem()), timeout=10)
    wait_for_state(stub, blocker.job_id, {pb.RUNNING})

    stub.CancelJob(pb.CancelJobRequest(job_id=queued.job_id), timeout=5)
    stub.CancelJob(pb.CancelJobRequest(job_id=blocker.job_id), timeout=5)

    assert wait_for_state(stub, queued.job_id, TERMINAL, 5).state == pb.CANCELLED
    assert wait_for_state(stub, blocker.job_id, TERMINAL, 5).state == pb.CANCELLED
    events = list(stub.Watch(pb.WatchRequest(job_id=queued.job_id), timeout=5))
    assert [e.WhichOneof("kind") for e in events] == ["accepted", "state_change"]


def test_a_worker_that_does_not_stop_in_time_is_replaced_and_the_job_ends_cancelled(small_stub):
    stub = small_stub
    job = stub.Submit(pb.SubmitRequest(problem=long_problem()), timeout=10)
    stream = stub.Watch(pb.WatchRequest(job_id=job.job_id), timeout=60)
    seen = []
    for event in stream:
        seen.append(event)
        if event.WhichOneof("kind") == "iterate" and event.iterate.iteration >= 2:
            break

    stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=5)
    seen += list(stream)

    result = seen[-1].result
    assert stub.GetJob(pb.GetJobRequest(job_id=job.job_id)).state == pb.CANCELLED
    assert result.status == pb.CANCELLED_BY_USER
    assert "did not stop in time" in result.message
    last = [e.iterate for e in seen if e.WhichOneof("kind") == "iterate"][-1]
    assert result.nit == last.iteration
    assert vector(result.x).tolist() == vector(last.x).tolist()
    # The pool replaced the worker: the next job runs.
    after = list(stub.Solve(pb.SolveRequest(problem=problem()), timeout=60))
    assert after[-1].result.success


# -- batches and listing ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_batch(stub):
    problems = [problem(x0=(-1.2 + 0.01 * i, 1.0)) for i in range(100)]
    reply = stub.SubmitBatch(pb.SubmitBatchRequest(problems=problems), timeout=30)
    def all_succeeded() -> bool:
        done = stub.ListJobs(
            pb.ListJobsRequest(batch_id=reply.batch_id, state=pb.SUCCEEDED, page_size=1000)
        )
        return len(done.jobs) == 100

    waiting.wait_until(all_succeeded, 120, "all 100 jobs of the batch to succeed", 0.1)
    return reply


def test_submit_batch_of_100_problems_all_finish(stub, finished_batch):
    assert len(finished_batch.jobs) == 100
    assert len({j.job_id for j in finished_batch.jobs}) == 100
    assert all(j.batch_id == finished_batch.batch_id for j in finished_batch.jobs)
    done = stub.ListJobs(pb.ListJobsRequest(batch_id=finished_batch.batch_id, page_size=1000))
    assert sorted(pb.JobState.Name(j.state) for j in done.jobs) == ["SUCCEEDED"] * 100
    assert all(j.result.success for j in done.jobs)


def test_list_jobs_filters_by_state_method_and_batch_and_pages(stub, finished_batch):
    batch = finished_batch.batch_id
    seen, token, pages = [], "", 0
    while True:
        page = stub.ListJobs(pb.ListJobsRequest(batch_id=batch, page_size=30, page_token=token))
        seen += [j.job_id for j in page.jobs]
        pages += 1
        token = page.next_page_token
        if not token:
            break

    assert pages == 4
    assert sorted(seen) == sorted(j.job_id for j in finished_batch.jobs)
    by_method = stub.ListJobs(pb.ListJobsRequest(batch_id=batch, method="bfgs"))
    assert by_method.jobs == []
    by_method = stub.ListJobs(pb.ListJobsRequest(batch_id=batch, method="L-BFGS", page_size=5))
    assert len(by_method.jobs) == 5 and all(j.method == "l-bfgs" for j in by_method.jobs)
    failed = stub.ListJobs(pb.ListJobsRequest(batch_id=batch, state=pb.FAILED))
    assert failed.jobs == []


# -- restart ----------------------------------------------------------------------------------


def test_a_restarted_gateway_lists_every_job_with_its_result(make_gateway, tmp_path):
    from service.store import NewJob, SQLiteJobStore

    db = str(tmp_path / "restart.db")
    first = make_gateway(db)
    stub = pb_grpc.OptimizerStub(grpc.insecure_channel(first.address))
    finished = [
        list(stub.Solve(pb.SolveRequest(problem=problem(x0=(x, 1.0))), timeout=60))[-1]
        for x in (-1.2, 0.5, 2.0)
    ]
    first.stop()
    # A job the dead gateway had running: its record says RUNNING, nobody will finish it.
    store = SQLiteJobStore(db)
    orphan = pb.Job(job_id="orphan", state=pb.RUNNING, method="bfgs", n=2, last_seq=2)
    store.create_jobs([NewJob(orphan)])
    store.close()

    second = make_gateway(db)
    stub = pb_grpc.OptimizerStub(grpc.insecure_channel(second.address))
    jobs = {j.job_id: j for j in stub.ListJobs(pb.ListJobsRequest()).jobs}

    assert len(jobs) == 4
    for event in finished:
        assert jobs[event.job_id].state == pb.SUCCEEDED
        assert jobs[event.job_id].result == event.result
        replay = list(stub.Watch(pb.WatchRequest(job_id=event.job_id), timeout=10))
        assert replay[-1] == event
    assert jobs["orphan"].state == pb.FAILED
    assert "gateway restarted" in jobs["orphan"].failure.message


# -- malformed requests -----------------------------------------------------------------------


def _without_x0() -> pb.Problem:
    p = problem()
    p.ClearField("x0")
    return p


def _short_x0_bytes() -> pb.Problem:
    p = problem()
    p.x0.data = p.x0.data[:-3]
    return p


def _bad_dtype() -> pb.Problem:
    p = problem()
    p.x0.dtype = 42
    return p


def _trusted_code() -> pb.Problem:
    p = problem()
    p.objective.cloudpickle = b"\x80\x05N."
    return p


def _objective_missing() -> pb.Problem:
    p = problem()
    p.ClearField("objective")
    return p


MALFORMED = {
    "missing x0": (_without_x0, grpc.StatusCode.INVALID_ARGUMENT, "problem.x0"),
    "x0 bytes short of its shape": (_short_x0_bytes, grpc.StatusCode.INVALID_ARGUMENT,
                                    "problem.x0.data"),
    "unknown dtype": (_bad_dtype, grpc.StatusCode.INVALID_ARGUMENT, "problem.x0.dtype"),
    "x0 of two dimensions": (
        lambda: problem(x0=[[1.0, 2.0]]), grpc.StatusCode.INVALID_ARGUMENT, "problem.x0.shape"),
    "unknown method": (lambda: problem(method="simplex-ish"), grpc.StatusCode.INVALID_ARGUMENT,
                       "problem.method"),
    "NaN tolerance": (lambda: problem(options={"gtol": math.nan}),
                      grpc.StatusCode.INVALID_ARGUMENT, "problem.options"),
    "unknown option": (lambda: problem(options={"tolerance": 1e-3}),
                       grpc.StatusCode.INVALID_ARGUMENT, "problem.options"),
    "bad expression": (lambda: problem(expression="x[0] +* 2"),
                       grpc.StatusCode.INVALID_ARGUMENT, "problem.objective"),
    "no objective": (_objective_missing, grpc.StatusCode.INVALID_ARGUMENT, "problem.objective"),
    "least squares method on a scalar objective": (
        lambda: problem(method="lm"), grpc.StatusCode.INVALID_ARGUMENT, "problem.method"),
    "cuda on a cluster without GPUs": (
        lambda: problem(device="cuda"), grpc.StatusCode.INVALID_ARGUMENT, "problem.device"),
    "expression over the length limit": (
        lambda: problem(expression="x[0]" + " + x[0]" * 3000),
        grpc.StatusCode.RESOURCE_EXHAUSTED, "problem.objective.expression"),
    "trusted code on an untrusted server": (
        _trusted_code, grpc.StatusCode.PERMISSION_DENIED, "--trust-code"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_problem_gets_a_status_naming_the_field(stub, case):
    make, code, field = MALFORMED[case]
    with pytest.raises(grpc.RpcError) as submit_error:
        stub.Submit(pb.SubmitRequest(problem=make()), timeout=10)
    with pytest.raises(grpc.RpcError) as solve_error:
        list(stub.Solve(pb.SolveRequest(problem=make()), timeout=10))

    for error in (submit_error.value, solve_error.value):
        assert error.code() == code, error.details()
        assert field in error.details()


def test_oversize_message_is_resource_exhausted(stub):
    huge = problem(x0=np.zeros(1_200_000))  # 9.6 MB against the fixture's 8 MiB limit
    with pytest.raises(grpc.RpcError) as error:
        stub.Submit(pb.SubmitRequest(problem=huge), timeout=10)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_batch_errors_name_the_problem_index(stub):
    problems = [problem(), problem(method="nope")]
    with pytest.raises(grpc.RpcError) as error:
        stub.SubmitBatch(pb.SubmitBatchRequest(problems=problems), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "problems[1].method" in error.value.details()


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.GetJob(pb.GetJobRequest(job_id="no-such-job"), timeout=5),
        lambda s: list(s.Watch(pb.WatchRequest(job_id="no-such-job"), timeout=5)),
        lambda s: s.CancelJob(pb.CancelJobRequest(job_id="no-such-job"), timeout=5),
    ],
    ids=["GetJob", "Watch", "CancelJob"],
)
def test_unknown_job_is_not_found(stub, call):
    with pytest.raises(grpc.RpcError) as error:
        call(stub)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-job" in error.value.details()


def test_bad_page_token_is_invalid_argument(stub):
    with pytest.raises(grpc.RpcError) as error:
        stub.ListJobs(pb.ListJobsRequest(page_token="garbage"), timeout=5)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in error.value.details()


def test_too_many_concurrent_jobs_is_resource_exhausted(small_stub):
    stub = small_stub
    running = stub.Submit(pb.SubmitRequest(problem=long_problem()), timeout=10)
    queued = stub.Submit(pb.SubmitRequest(problem=long_problem()), timeout=10)
    with pytest.raises(grpc.RpcError) as error:
        stub.Submit(pb.SubmitRequest(problem=problem()), timeout=10)

    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-concurrent-jobs" in error.value.details()
    for job in (queued, running):
        stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=5)
        wait_for_state(stub, job.job_id, TERMINAL, 5)


# -- metrics ----------------------------------------------------------------------------------


def _scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_metrics_counters_move(stub, gateway_server):
    before = _scrape(gateway_server.metrics_url)
    list(stub.Solve(pb.SolveRequest(problem=problem()), timeout=60))
    with pytest.raises(grpc.RpcError):
        stub.Submit(pb.SubmitRequest(problem=_without_x0()), timeout=5)
    after = _scrape(gateway_server.metrics_url)

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('secant_rpc_requests_total{code="OK",method="Solve"}') == 1
    assert delta('secant_rpc_requests_total{code="INVALID_ARGUMENT",method="Submit"}') == 1
    assert delta('secant_jobs_submitted_total{method="l-bfgs"}') >= 1
    assert delta('secant_jobs_finished_total{method="l-bfgs",state="SUCCEEDED"}') >= 1
    assert delta('secant_solve_iterations_count{method="l-bfgs"}') >= 1
    assert delta('secant_evaluations_total{kind="f",method="l-bfgs"}') > 0
    assert 'secant_rpc_latency_seconds_count{code="OK",method="Solve"}' in after
    assert "secant_queue_depth" in after and "secant_running_jobs" in after


def _our_pids() -> set[int]:
    """This process and every process of the session's Ray: they all carry our Ray token."""
    import os
    from pathlib import Path

    token = os.environ["RAY_AUTH_TOKEN"].encode()
    pids = {os.getpid()}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if token in (proc / "environ").read_bytes():
                    pids.add(int(proc.name))
            except OSError:
                continue
    return pids


def test_everything_the_gateway_and_ray_opened_listens_on_loopback_only(gateway_server):
    import re
    import subprocess

    ours = _our_pids()
    listening = subprocess.run(
        ["ss", "-Hltnp"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    checked = 0
    for line in listening:
        pids = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if pids & ours:
            checked += 1
            local = line.split()[3]
            assert local.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")), line
    assert checked >= 4, "expected the gateway, its metrics, the GCS and the raylet"


def test_a_retried_submit_with_the_same_idempotency_key_returns_the_first_job(stub):
    request = pb.SubmitRequest(problem=problem(), idempotency_key="retry-me-" + str(time.time()))
    first = stub.Submit(request, timeout=10)
    again = stub.Submit(request, timeout=10)

    assert again.job_id == first.job_id
    wait_for_state(stub, first.job_id, TERMINAL)
    assert stub.Submit(request, timeout=10).job_id == first.job_id


def test_many_watchers_of_one_job_see_the_same_events(stub):
    job = stub.Submit(pb.SubmitRequest(problem=problem(method="bfgs")), timeout=10)
    streams: list[list] = [[] for _ in range(5)]

    def follow(index):
        streams[index] = list(stub.Watch(pb.WatchRequest(job_id=job.job_id), timeout=60))

    threads = [threading.Thread(target=follow, args=(i,)) for i in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert all(s == streams[0] for s in streams)
    assert streams[0][-1].WhichOneof("kind") == "result"


# -- the command ------------------------------------------------------------------------------


def test_secant_serve_reaches_serving_and_stops_cleanly_on_sigterm(ray_cluster, tmp_path):
    import signal
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    command = [
        sys.executable, "-m", "service.cli", "serve", "--port", "0", "--metrics-port", "-1",
        "--db", str(tmp_path / "serve.db"), "--ray-address", ray_cluster, "--workers", "1",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        with ThreadPoolExecutor(1) as pool:
            first_line = pool.submit(process.stdout.readline).result(timeout=90)
        assert first_line.startswith("secant serving on "), first_line
        address = first_line.split()[-1]
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = pb_grpc.OptimizerStub(channel)
            events = list(stub.Solve(pb.SolveRequest(problem=problem()), timeout=60))
            assert events[-1].result.success

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
