"""Fault injection: a solve whose worker process is killed, and a gateway SIGKILLed during
20 running jobs, both finish with the results of uninterrupted runs; watchers see every
sequence number once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import secant
from secant.v1 import optimizer_pb2 as pb
from secant.v1 import optimizer_pb2_grpc as pb_grpc
from workers.runner import ResultEvent, RunSpec, iter_solve

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHAINED_ROSENBROCK = "sum(100 * (x[1:] - x[:-1]**2)**2 + (1 - x[:-1])**2)"


def _x0(n: int, scale: float = 1.0) -> np.ndarray:
    return np.tile([-1.2 * scale, 1.0], n // 2)


def _problem(n: int, scale: float = 1.0) -> pb.Problem:
    return secant.build_problem(CHAINED_ROSENBROCK, _x0(n, scale), method="l-bfgs",
                                options={"gtol": 1e-8, "max_iter": 20000})


def test_a_killed_worker_resumes_from_its_checkpoint_with_the_same_result(make_gateway):
    server = make_gateway(workers=1, checkpoint_interval_s=0.02)
    stub = pb_grpc.OptimizerStub(grpc.insecure_channel(server.address))
    n = 400
    reference = list(stub.Solve(pb.SolveRequest(problem=_problem(n)), timeout=120))[-1].result

    job = stub.Submit(pb.SubmitRequest(problem=_problem(n)))
    events = []
    for event in stub.Watch(pb.WatchRequest(job_id=job.job_id), timeout=120):
        events.append(event)
        if event.HasField("iterate") and event.iterate.iteration >= 300:
            break
    manager = server.gateway.jobs
    live = manager._live[job.job_id]
    assert live.checkpoint is not None, "no checkpoint after 300 iterations"
    pid = server._call(manager._scheduler.worker_pid(live.worker), 10)
    os.kill(pid, signal.SIGKILL)

    rest = list(stub.Watch(pb.WatchRequest(job_id=job.job_id, after_seq=events[-1].seq),
                           timeout=120))
    events += rest
    result = events[-1].result
    assert events[-1].HasField("result"), events[-1]
    assert result.success
    assert result.nit == reference.nit
    assert result.fun == reference.fun
    assert secant.from_tensor(result.x).tolist() == secant.from_tensor(reference.x).tolist()
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    iterations = [e.iterate.iteration for e in events if e.HasField("iterate")]
    assert iterations == list(range(1, result.nit + 1))  # none repeated, none missing
    reasons = [e.state_change.reason for e in events if e.HasField("state_change")]
    assert any("resuming from iteration" in r for r in reasons), reasons


# -- a gateway killed with SIGKILL and started again on the same db ----------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_gateway(db: Path, port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "client")]))
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port),
               "--metrics-port", "-1", "--db", str(db), "--num-cpus", "2",
               "--checkpoint-interval-s", "0.05", "--log-level", "warning"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("ab"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return process
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    process.kill()
    raise TimeoutError(log.read_text()[-3000:])


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # its Ray, if anything is left
    except ProcessLookupError:
        pass
    process.wait(10)


class _Watcher(threading.Thread):
    """Follows one job's events across the gateway's death, resuming with after_seq."""

    def __init__(self, address: str, job_id: str) -> None:
        super().__init__(daemon=True)
        self.address, self.job_id = address, job_id
        self.seqs: list[int] = []
        self.done = False

    def run(self) -> None:
        deadline = time.monotonic() + 240
        while not self.done and time.monotonic() < deadline:
            after = self.seqs[-1] if self.seqs else 0
            try:
                with grpc.insecure_channel(self.address) as channel:
                    stub = pb_grpc.OptimizerStub(channel)
                    request = pb.WatchRequest(job_id=self.job_id, after_seq=after)
                    for event in stub.Watch(request, timeout=60):
                        self.seqs.append(event.seq)
                        if event.HasField("result") or event.HasField("failure"):
                            self.done = True
            except grpc.RpcError:
                time.sleep(0.2)  # the gateway is down: try again


def _reference(n: int, scale: float) -> ResultEvent:
    """The uninterrupted result: the worker's own code on the same spec, in this process (the
    path it takes, numpy for a small float64 solve or torch, is the one the service takes)."""
    spec = RunSpec(job_id="reference", objective_kind="expression", source=CHAINED_ROSENBROCK,
                   blob=b"", data=(), x0=_x0(n, scale), lower=None, upper=None,
                   method="l-bfgs", options={"gtol": 1e-8, "max_iter": 20000})
    torch.set_num_threads(1)
    results = [event for event in iter_solve(spec) if isinstance(event, ResultEvent)]
    assert len(results) == 1
    return results[0]


def test_a_sigkilled_gateway_finishes_every_job_after_a_restart(tmp_path):
    db, log, port = tmp_path / "secant.db", tmp_path / "gateway.log", _free_port()
    address = f"127.0.0.1:{port}"
    n, scales = 200, [1.0 + 0.01 * k for k in range(20)]
    gateway = _start_gateway(db, port, log)
    try:
        with secant.Client(address) as client:
            jobs = [client.submit(CHAINED_ROSENBROCK, _x0(n, s), method="l-bfgs",
                                  options={"gtol": 1e-8, "max_iter": 20000}) for s in scales]
        watchers = [_Watcher(address, job.id) for job in jobs[::4]]
        for watcher in watchers:
            watcher.start()
        deadline = time.monotonic() + 60
        while not any(len(w.seqs) > 20 for w in watchers):  # solves are under way
            assert time.monotonic() < deadline, "no job made progress"
            time.sleep(0.05)
        os.kill(gateway.pid, signal.SIGKILL)
        gateway.wait(30)
        # no pause: the next gateway ends the Ray head this one leaves behind (RayCluster)
        gateway = _start_gateway(db, port, log)

        with secant.Client(address) as client:
            listed = list(client.jobs())
            results = [client.get_job(job.id).result(timeout=180) for job in jobs]
            resumed = [job.id for job in jobs if any(
                "gateway restarted" in event.state_change.reason
                for event in client.watch(job.id) if event.HasField("state_change"))]
        for watcher in watchers:
            watcher.join(60)
    finally:
        _stop(gateway)

    assert sorted(j.id for j in listed) == sorted(j.id for j in jobs)  # none lost or doubled
    assert resumed, "no job was running or queued when the gateway died"
    for scale, result in zip(scales, results, strict=True):
        expected = _reference(n, scale)
        assert result.success, result.message
        assert result.nit == expected.nit
        np.testing.assert_allclose(result.x, expected.x, rtol=1e-10, atol=1e-12)
    for watcher in watchers:
        assert watcher.done
        assert watcher.seqs == list(range(1, len(watcher.seqs) + 1))


def test_idempotent_submit_returns_the_same_job(gateway):
    with grpc.insecure_channel(gateway) as channel:
        stub = pb_grpc.OptimizerStub(channel)
        request = pb.SubmitRequest(problem=_problem(4), idempotency_key="retry-me-1")
        first, second = stub.Submit(request), stub.Submit(request)
    assert first.job_id == second.job_id




def _kill_group_and_restart(gateway: subprocess.Popen, db: Path, port: int,
                            log: Path) -> subprocess.Popen:
    """SIGKILL of the gateway's whole process group (an OOM kill or a lost node), then a new
    gateway on the same store at once: its old Ray head may still be exiting."""
    os.killpg(gateway.pid, signal.SIGKILL)
    gateway.wait(30)
    return _start_gateway(db, port, log)


def test_a_gateway_killed_with_its_group_comes_up_again_every_time(tmp_path):
    rounds = int(os.environ.get("SECANT_RESTART_ROUNDS", "3"))
    db, log, port = tmp_path / "secant.db", tmp_path / "gateway.log", _free_port()
    address = f"127.0.0.1:{port}"
    n = 200
    submitted: list[tuple[str, float]] = []
    gateway = _start_gateway(db, port, log)
    deadline = time.monotonic() + 60.0 * rounds + 120
    try:
        for round_ in range(rounds):
            assert time.monotonic() < deadline, f"only {round_} restarts within the time bound"
            with secant.Client(address) as client:
                for k in range(3):
                    scale = 1.0 + 0.01 * (3 * round_ + k)
                    job = client.submit(CHAINED_ROSENBROCK, _x0(n, scale), method="l-bfgs",
                                        options={"gtol": 1e-8, "max_iter": 20000})
                    submitted.append((job.id, scale))
                # Kill while the newest job is under way (its first iterates are stored).
                watch_deadline = time.monotonic() + 30
                for event in client.watch(submitted[-1][0]):
                    if event.HasField("iterate") or time.monotonic() > watch_deadline:
                        break
            gateway = _kill_group_and_restart(gateway, db, port, log)
        with secant.Client(address) as client:
            results = {job_id: client.get_job(job_id).result(timeout=240)
                       for job_id, _ in submitted}
            seqs = {job_id: [event.seq for event in client.watch(job_id)]
                    for job_id, _ in submitted}
            listed = sorted(job.id for job in client.jobs())
    finally:
        _stop(gateway)
    assert listed == sorted(job_id for job_id, _ in submitted)  # none lost or doubled
    for job_id, scale in submitted:
        expected = _reference(n, scale)
        result = results[job_id]
        assert result.success, result.message
        assert result.nit == expected.nit
        np.testing.assert_allclose(result.x, expected.x, rtol=1e-10, atol=1e-12)
        assert seqs[job_id] == list(range(1, len(seqs[job_id]) + 1))
    assert "failed to start" not in log.read_text()
