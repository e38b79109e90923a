"""Callback mode end to end: a real gateway, real SDK, the objective in this (or a child)
process. The solver runs in the gateway and asks the caller for every f, g and Hv."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

import secant
from secant.v1 import optimizer_pb2 as pb
from secant.v1 import optimizer_pb2_grpc as pb_grpc
from service.callbacks import CallbackSettings

pytestmark = pytest.mark.integration

ROSENBROCK_DSL = "sum(100 * (x[1:] - x[:-1]**2)**2 + (1 - x[:-1])**2)"
REPO = Path(__file__).resolve().parents[2]


def rosen(x):
    return float(np.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2))


def rosen_der(x):
    g = np.zeros_like(x)
    d = x[1:] - x[:-1] ** 2
    g[:-1] += -400.0 * x[:-1] * d - 2.0 * (1.0 - x[:-1])
    g[1:] += 200.0 * d
    return g


def rosen_hessp(x, p):
    hp = np.zeros_like(x)
    hp[0] = (1200 * x[0] ** 2 - 400 * x[1] + 2) * p[0] - 400 * x[0] * p[1]
    hp[1:-1] = (
        -400 * x[:-2] * p[:-2]
        + (202 + 1200 * x[1:-1] ** 2 - 400 * x[2:]) * p[1:-1]
        - 400 * x[1:-1] * p[2:]
    )
    hp[-1] = -400 * x[-2] * p[-2] + 200 * p[-1]
    return hp


X0 = [-1.2, 1.0, -1.2, 1.0]


@pytest.fixture(scope="module")
def client(gateway):
    with secant.Client(gateway) as c:
        yield c


@pytest.mark.parametrize(
    "method,bounds",
    [
        ("bfgs", None),
        ("l-bfgs", None),
        ("newton-cg", None),
        ("l-bfgs-b", None),
        ("l-bfgs-b", [(-2.0, 0.5), (-1.0, 2.0), (-2.0, 2.0), (-1.0, 2.0)]),
    ],
)
def test_callback_solve_follows_the_dsl_solve(client, method, bounds):
    options = {"gtol": 1e-8, "max_iter": 500}
    hessp = rosen_hessp if method == "newton-cg" else None
    remote = client.minimize(rosen, X0, method=method, bounds=bounds, options=options,
                             jac=rosen_der, hessp=hessp)
    server = client.minimize(ROSENBROCK_DSL, X0, method=method, bounds=bounds, options=options)

    assert remote.status == server.status, (remote.message, server.message)
    assert remote.success or bounds is not None  # the bounded case may stop on precision loss
    assert remote.nit == server.nit
    assert remote.nfev == server.nfev
    np.testing.assert_allclose(remote.x, server.x, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose([h.f for h in remote.history], [h.f for h in server.history],
                               rtol=1e-6, atol=1e-12)
    if bounds is not None:
        lower, upper = np.array(bounds).T
        assert np.all(remote.x >= lower) and np.all(remote.x <= upper)


def test_callback_without_jac_uses_finite_differences(client):
    result = client.minimize(rosen, [-1.2, 1.0], method="bfgs", options={"gtol": 1e-5})
    assert result.success
    np.testing.assert_allclose(result.x, [1.0, 1.0], atol=1e-3)


def test_jac_true_means_fun_returns_value_and_gradient(client):
    result = client.minimize(lambda x: (rosen(x), rosen_der(x)), X0, method="l-bfgs", jac=True,
                             options={"gtol": 1e-8})
    assert result.success
    np.testing.assert_allclose(result.x, np.ones(4), atol=1e-6)


def test_nan_mid_solve_ends_non_finite_with_a_finite_iterate(client):
    calls = {"n": 0}

    def turns_nan(x):
        calls["n"] += 1
        return rosen(x) if calls["n"] < 8 else float("nan")

    result = client.minimize(turns_nan, X0, method="bfgs", jac=rosen_der)
    assert not result.success
    assert result.status == secant.Status.NON_FINITE
    assert np.all(np.isfinite(result.x))
    assert np.isfinite(result.fun)


def test_a_raising_objective_is_reported_like_nan(client):
    def raises_after_a_while(x):
        if abs(x[0]) < 0.9:
            raise RuntimeError("the simulator crashed")
        return rosen(x)

    result = client.minimize(raises_after_a_while, X0, method="l-bfgs", jac=rosen_der)
    assert not result.success
    assert np.all(np.isfinite(result.x))


def test_callback_mode_refuses_methods_it_cannot_feed(client):
    with pytest.raises(secant.SecantError) as err:
        client.minimize(rosen, X0, method="newton-cg", jac=rosen_der)  # no hessp
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "Hessian-vector" in err.value.message
    with pytest.raises(secant.SecantError) as err:
        client.minimize(rosen, X0, method="lm", jac=rosen_der)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


_CHILD = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import secant
    sys.path.insert(0, {tests!r})
    from test_callbacks import rosen, rosen_der

    address, job_file, die_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
    calls = 0

    def fun(x):
        global calls
        calls += 1
        if die_after and calls > die_after:
            os._exit(17)  # the caller dies mid-solve, no goodbye on the stream
        return rosen(x)

    def remember(job_id):
        with open(job_file, "w") as fh:
            fh.write(job_id)

    with secant.Client(address) as client:
        r = client.minimize(fun, [-1.2, 1.0] * 5, method="l-bfgs", jac=rosen_der,
                            options={{"gtol": 1e-9}}, on_job=remember)
    print(r.nit, r.nfev, repr(r.fun), flush=True)
    """
)


def _run_child(address: str, job_file: Path, die_after: int) -> subprocess.CompletedProcess:
    script = _CHILD.format(tests=str(Path(__file__).parent))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "client")]))
    return subprocess.run(
        [sys.executable, "-c", script, address, str(job_file), str(die_after)],
        capture_output=True, text=True, timeout=120, env=env,
    )


def test_a_killed_caller_resumes_from_a_new_process_with_the_same_result(gateway, tmp_path):
    reference = _run_child(gateway, tmp_path / "ref", 0)
    assert reference.returncode == 0, reference.stderr

    crashed = _run_child(gateway, tmp_path / "job", 25)
    assert crashed.returncode == 17, crashed.stderr
    job_id = (tmp_path / "job").read_text()

    with secant.Client(gateway) as client:
        deadline = time.monotonic() + 10
        while client.get_job(job_id).state != secant.JobState.WAITING_FOR_CLIENT:
            assert time.monotonic() < deadline, "the job never started waiting for its caller"
            time.sleep(0.05)
        resumed = client.resume_callbacks(job_id, rosen, jac=rosen_der)

    nit, nfev, fun = reference.stdout.split()
    assert resumed.success
    assert resumed.nit == int(nit)
    assert resumed.nfev == int(nfev)
    assert resumed.fun == float(fun)  # bit for bit: the resume continued the same iterates
    iterations = [h.nit for h in resumed.history]
    assert iterations == list(range(1, resumed.nit + 1))  # every iterate once, none repeated


def _start(stub, method="l-bfgs"):
    """A raw SolveWithCallbacks stream: returns (outbox queue, response iterator)."""
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    problem = pb.Problem(method=method, x0=secant.to_tensor(np.array(X0)))
    outbox.put(pb.CallbackClientMessage(start=pb.CallbackStart(problem=problem,
                                                               provides_gradient=True)))

    def requests():
        while (item := outbox.get()) is not None:
            yield item

    return outbox, stub.SolveWithCallbacks(requests())


def _events(message: pb.CallbackServerMessage) -> list[pb.JobEvent]:
    """Events ride along with requests (message.events) or come alone (message.event)."""
    return list(message.events) + ([message.event] if message.HasField("event") else [])


def _answer(request: pb.EvaluationRequest) -> pb.CallbackClientMessage:
    x = secant.from_tensor(request.x)
    return pb.CallbackClientMessage(result=pb.EvaluationResult(
        request_id=request.request_id, f=rosen(x),
        gradient=secant.to_tensor(rosen_der(x)),
    ))


def test_an_abandoned_job_ends_cancelled_with_its_last_iterate_after_the_lease(make_gateway):
    server = make_gateway(callbacks=CallbackSettings(lease_s=1.0, evaluation_deadline_s=30))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.OptimizerStub(channel)
        outbox, responses = _start(stub)
        job_id, iterates = "", 0
        for message in responses:
            for event in _events(message):
                job_id = event.job_id
                iterates += event.HasField("iterate")
            if not message.HasField("request"):
                continue
            if iterates >= 3:
                break
            outbox.put(_answer(message.request))
        responses.cancel()  # the caller goes away mid-solve
        outbox.put(None)

        deadline = time.monotonic() + 15
        while True:
            job = stub.GetJob(pb.GetJobRequest(job_id=job_id))
            if job.state == pb.CANCELLED:
                break
            assert time.monotonic() < deadline, pb.JobState.Name(job.state)
            time.sleep(0.1)
    assert job.result.status == pb.CANCELLED_BY_USER
    assert job.result.nit >= 3
    assert np.all(np.isfinite(secant.from_tensor(job.result.x)))
    assert "lease" in job.result.message


def test_a_caller_that_never_answers_fails_its_job_at_the_deadline(make_gateway):
    server = make_gateway(callbacks=CallbackSettings(lease_s=60, evaluation_deadline_s=0.5))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.OptimizerStub(channel)
        outbox, responses = _start(stub)
        events = [e for m in responses for e in _events(m)]  # never answer
        outbox.put(None)
        failure = events[-1]
        assert failure.HasField("failure")
        assert failure.failure.code == "DEADLINE_EXCEEDED"
        assert "did not answer evaluation request 1" in failure.failure.message
        job = stub.GetJob(pb.GetJobRequest(job_id=failure.job_id))
        assert job.state == pb.FAILED
        assert [e.seq for e in events] == list(range(1, len(events) + 1))


def test_cancel_job_stops_an_attached_callback_solve(gateway):
    with secant.Client(gateway) as client, grpc.insecure_channel(gateway) as channel:
        stub = pb_grpc.OptimizerStub(channel)
        outbox, responses = _start(stub)
        job_id = ""
        answered = 0
        result = None
        for message in responses:
            for event in _events(message):
                job_id = event.job_id
                if event.HasField("result"):
                    result = event.result
            if result is not None:
                break
            if not message.HasField("request"):
                continue
            answered += 1
            if answered == 5:
                client.cancel(job_id)
            outbox.put(_answer(message.request))
        outbox.put(None)
        assert result.status == pb.CANCELLED_BY_USER
        assert client.get_job(job_id).state == secant.JobState.CANCELLED


def test_a_float32_solve_in_callback_mode(client):
    # float32 x travels as FLOAT32 (not the float64 fast path); gradients come back float64.
    seen = []

    def fun(x):
        seen.append(x.dtype)
        return rosen(x), rosen_der(x)

    result = client.minimize(fun, X0, method="l-bfgs", jac=True, dtype="float32",
                             options={"gtol": 1e-3})
    assert result.success, result.message
    assert set(seen) == {np.dtype(np.float64)}
    np.testing.assert_allclose(result.x, np.ones(4), atol=1e-2)


def test_a_gradient_of_the_wrong_length_fails_the_job(make_gateway):
    server = make_gateway(callbacks=CallbackSettings(evaluation_deadline_s=30))
    with grpc.insecure_channel(server.address) as channel:
        outbox, responses = _start(pb_grpc.OptimizerStub(channel))
        failure = None
        for message in responses:
            for event in _events(message):
                if event.HasField("failure"):
                    failure = event.failure
            if message.HasField("request"):
                x = secant.from_tensor(message.request.x)
                outbox.put(pb.CallbackClientMessage(result=pb.EvaluationResult(
                    request_id=message.request.request_id, f=rosen(x),
                    gradient=secant.to_tensor(rosen_der(x)[:-1]),
                )))
        outbox.put(None)
    assert failure is not None
    assert "gradient has shape [3], expected [4]" in failure.message


def test_a_fault_in_the_gateway_fails_the_job_instead_of_leaving_it_running(
    make_gateway, monkeypatch
):
    """A solver or gateway bug mid-solve (not the caller's doing): the RPC ends INTERNAL and
    the job ends FAILED with the reason, rather than RUNNING with nobody driving it."""
    from service import callbacks

    server = make_gateway()
    advance = callbacks._Driver._advance
    calls = []

    def faulty_advance(self, run, item):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("injected solver fault")
        return advance(self, run, item)

    monkeypatch.setattr(callbacks._Driver, "_advance", faulty_advance)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.OptimizerStub(channel)
        outbox, responses = _start(stub)
        job_id = ""
        with pytest.raises(grpc.RpcError) as raised:
            for message in responses:
                for event in _events(message):
                    job_id = event.job_id
                if message.HasField("request"):
                    outbox.put(_answer(message.request))
        outbox.put(None)
        assert raised.value.code() == grpc.StatusCode.INTERNAL
        job = stub.GetJob(pb.GetJobRequest(job_id=job_id))
        assert job.state == pb.FAILED
        events = list(stub.Watch(pb.WatchRequest(job_id=job_id)))
        [failure] = [e.failure for e in events if e.HasField("failure")]
        assert failure.code == "INTERNAL" and "injected solver fault" in failure.message


def test_a_malformed_message_mid_solve_fails_the_job_as_invalid_argument(gateway):
    with grpc.insecure_channel(gateway) as channel:
        rpc = channel.stream_stream(
            "/secant.v1.Optimizer/SolveWithCallbacks",
            response_deserializer=pb.CallbackServerMessage.FromString,
        )
        outbox: queue.SimpleQueue = queue.SimpleQueue()
        problem = pb.Problem(method="l-bfgs", x0=secant.to_tensor(np.array(X0)))
        outbox.put(pb.CallbackClientMessage(
            start=pb.CallbackStart(problem=problem, provides_gradient=True)
        ).SerializeToString())

        def requests():
            while (item := outbox.get()) is not None:
                yield item

        job_id, answered = "", 0
        with pytest.raises(grpc.RpcError) as raised:
            for message in rpc(requests()):
                for event in _events(message):
                    job_id = event.job_id
                if message.HasField("request"):
                    answered += 1
                    reply = _answer(message.request).SerializeToString()
                    outbox.put(reply if answered < 3 else b"\x00")
        outbox.put(None)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid SolveWithCallbacks request" in raised.value.details()
        stub = pb_grpc.OptimizerStub(channel)
        assert stub.GetJob(pb.GetJobRequest(job_id=job_id)).state == pb.FAILED
        events = list(stub.Watch(pb.WatchRequest(job_id=job_id)))
        [failure] = [e.failure for e in events if e.HasField("failure")]
        assert failure.code == "INVALID_ARGUMENT"
