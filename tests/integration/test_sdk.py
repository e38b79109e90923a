"""The Python SDK and the CLI against a real gateway (the `gateway` fixture: a loopback port,
a real local Ray). Set SECANT_TEST_ADDRESS=host:port to point these at a gateway you started.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from scipy.optimize import minimize as scipy_minimize

import secant
from secant.cli import main as cli_main

pytestmark = pytest.mark.integration

ROSENBROCK = "sum(100 * (x[1:] - x[:-1]**2)**2 + (1 - x[:-1])**2)"
ROSENBROCK_X0 = [-1.2, 1.0]
EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
# Gradient descent on a long Rosenbrock valley: runs for many seconds unless cancelled.
LONG_SOLVE = dict(
    objective=ROSENBROCK,
    x0=np.full(2000, -1.0),
    method="gd",
    options={"max_iter": 10_000_000, "gtol": 1e-14},
)
# The same, stopped by the solver after about 1.5 s.
TIMED_SOLVE = {**LONG_SOLVE, "options": {"max_iter": 10_000_000, "gtol": 1e-14, "time_limit": 1.5}}


def _rosenbrock(x: np.ndarray) -> float:
    return float(np.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2))


def _rosenbrock_grad(x: np.ndarray) -> np.ndarray:
    grad = np.zeros_like(x)
    grad[:-1] = -400.0 * x[:-1] * (x[1:] - x[:-1] ** 2) - 2.0 * (1.0 - x[:-1])
    grad[1:] += 200.0 * (x[1:] - x[:-1] ** 2)
    return grad


@pytest.fixture(scope="module")
def address(request) -> str:
    return os.environ.get("SECANT_TEST_ADDRESS") or request.getfixturevalue("gateway")


@pytest.fixture(scope="module")
def client(address) -> Iterator[secant.Client]:
    with secant.Client(address, token="integration-test") as client:
        yield client


# -- solving ---------------------------------------------------------------------------------


def test_minimize_rosenbrock_matches_scipy_bfgs(client):
    expected = scipy_minimize(
        _rosenbrock, ROSENBROCK_X0, jac=_rosenbrock_grad, method="BFGS", options={"gtol": 1e-8}
    )

    result = client.minimize(ROSENBROCK, ROSENBROCK_X0, method="l-bfgs", options={"gtol": 1e-8})

    assert result.success, result.message
    assert result.status == secant.Status.CONVERGED
    np.testing.assert_allclose(result.x, expected.x, atol=1e-5)
    assert result.fun == pytest.approx(expected.fun, abs=1e-9)
    assert result.jac.shape == (2,)
    assert result.nit > 0 and result.nfev >= result.nit
    assert result.job_id
    assert len(result.history) > 0
    assert [r.nit for r in result.history] == sorted(r.nit for r in result.history)
    assert result["x"] is result.x  # scipy's dict-style access works too


def test_minimize_with_data_bounds_and_float32(client):
    a_matrix = np.array([[3.0, 1.0], [1.0, 2.0]])
    b = np.array([1.0, -4.0])
    objective = secant.Expression("0.5 * dot(x, A @ x) - dot(b, x)", data={"A": a_matrix, "b": b})

    free = client.minimize(objective, [0.0, 0.0], method="bfgs", options={"gtol": 1e-10})
    boxed = client.minimize(
        objective, [0.0, 0.0], method="l-bfgs-b", bounds=[(None, None), (-1, 1)]
    )
    single = client.minimize(objective, [0.0, 0.0], dtype="float32")

    np.testing.assert_allclose(free.x, np.linalg.solve(a_matrix, b), atol=1e-6)
    assert -1 - 1e-9 <= boxed.x[1] <= 1 + 1e-9
    assert boxed.fun >= free.fun - 1e-9
    np.testing.assert_allclose(single.x, np.linalg.solve(a_matrix, b), atol=1e-3)


def test_submit_events_are_contiguous_and_end_with_the_result(client):
    job = client.submit(ROSENBROCK, ROSENBROCK_X0, method="bfgs")

    events = list(job.events())
    result = job.result()

    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert {e.job_id for e in events} == {job.id}
    assert events[0].WhichOneof("kind") == "accepted"
    assert events[-1].WhichOneof("kind") == "result"
    assert job.state == secant.JobState.SUCCEEDED
    assert result.success
    np.testing.assert_allclose(result.x, [1.0, 1.0], atol=1e-4)


def test_solve_and_submit_give_identical_results(client):
    solved = client.minimize(ROSENBROCK, ROSENBROCK_X0, method="bfgs")
    submitted = client.submit(ROSENBROCK, ROSENBROCK_X0, method="bfgs").result(timeout=60)

    np.testing.assert_array_equal(solved.x, submitted.x)
    assert solved.nit == submitted.nit and solved.fun == submitted.fun


def test_result_from_a_fresh_handle_replays_the_history(client):
    job_id = client.submit(ROSENBROCK, ROSENBROCK_X0).id
    first = client.get_job(job_id).result(timeout=60)

    replayed = client.get_job(job_id).result(timeout=60)

    assert replayed.job_id == job_id
    np.testing.assert_array_equal(replayed.x, first.x)
    assert [r.f for r in replayed.history] == [r.f for r in first.history]
    assert len(replayed.history) == replayed.nit or len(replayed.history) > 0


def test_report_x_every_sends_x_on_every_kth_iterate(client):
    result = client.minimize(ROSENBROCK, ROSENBROCK_X0, report_x_every=2)

    with_x = [r for r in result.history if r.x is not None]

    assert with_x and all(r.nit % 2 == 0 for r in with_x)
    assert all(r.x.shape == (2,) for r in with_x)


def test_cancel_ends_a_long_solve_promptly_with_its_last_iterate(client):
    job = client.submit(**LONG_SOLVE)
    for event in job.events():
        if event.WhichOneof("kind") == "iterate":
            break  # the solve is running

    job.cancel()
    result = job.result(timeout=30)  # a hang guard; how prompt a cancel is: bench/guards.py

    assert job.state == secant.JobState.CANCELLED
    assert result.status == secant.Status.CANCELLED and not result.success
    assert result.x.shape == (2000,)
    assert result.nit >= 1


def test_result_timeout_raises_deadline_exceeded_and_the_job_goes_on(client):
    job = client.submit(**LONG_SOLVE)
    try:
        with pytest.raises(secant.SecantError) as info:
            job.result(timeout=0.5)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert not client.get_job(job.id).state.is_terminal
    finally:
        job.cancel()


def test_submit_batch_runs_every_problem(client):
    starts = [[-1.2, 1.0], [0.0, 0.0], [2.0, 2.0], [-0.5, 0.5]]

    batch = client.submit_batch([{"objective": ROSENBROCK, "x0": x0} for x0 in starts])
    results = batch.results(timeout=120)

    assert batch.batch_id and len(batch) == len(starts)
    assert len({job.id for job in batch}) == len(starts)
    for result in results:
        assert result.success
        np.testing.assert_allclose(result.x, [1.0, 1.0], atol=1e-4)
    listed = {job.id for job in client.jobs(batch_id=batch.batch_id)}
    assert listed == {job.id for job in batch}


def test_jobs_lists_every_page_and_filters(client):
    batch = client.submit_batch(
        [{"objective": ROSENBROCK, "x0": [i - 2.5, 1.0], "method": "bfgs"} for i in range(5)]
    )
    batch.results(timeout=120)

    paged = list(client.jobs(batch_id=batch.batch_id, page_size=2))
    succeeded = list(client.jobs(state="succeeded", batch_id=batch.batch_id))
    other_method = list(client.jobs(method="newton", batch_id=batch.batch_id))

    assert {job.id for job in paged} == {job.id for job in batch}
    assert len(paged) == 5  # three pages, nothing repeated
    assert {job.id for job in succeeded} == {job.id for job in batch}
    assert all(job.state == secant.JobState.SUCCEEDED for job in succeeded)
    assert other_method == []


# -- errors ----------------------------------------------------------------------------------


def test_unknown_method_is_invalid_argument(client):
    with pytest.raises(secant.SecantError) as info:
        client.minimize(ROSENBROCK, ROSENBROCK_X0, method="no-such-method")

    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "no-such-method" in info.value.message


@pytest.mark.parametrize("bad_x0", [[np.nan, 1.0], []], ids=["nan", "empty"])
def test_bad_x0_is_invalid_argument_from_the_server(client, bad_x0):
    with pytest.raises(secant.SecantError) as info:
        client.submit(ROSENBROCK, bad_x0)

    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.message


def test_x0_that_is_not_a_vector_is_refused_before_sending(client):
    with pytest.raises(secant.SecantError) as info:
        client.minimize(ROSENBROCK, [[1.0, 2.0]])

    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "x0" in info.value.message


def test_unknown_job_is_not_found(client):
    with pytest.raises(secant.SecantError) as info:
        client.get_job("no-such-job")

    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_unreachable_gateway_is_unavailable():
    with secant.Client(f"127.0.0.1:{_free_port()}") as nowhere:
        with pytest.raises(secant.SecantError) as info:
            nowhere.minimize(ROSENBROCK, ROSENBROCK_X0)

    assert info.value.code == grpc.StatusCode.UNAVAILABLE


# -- resuming a dropped stream ---------------------------------------------------------------


def test_watch_resumed_after_a_disconnect_replays_exactly_the_missed_events(client):
    job = client.submit(ROSENBROCK, ROSENBROCK_X0, method="bfgs")
    job.result(timeout=60)
    everything = list(client.watch(job.id, after_seq=0))

    first_part = []
    for event in client.watch(job.id, after_seq=0):
        first_part.append(event)
        if len(first_part) == 3:
            break  # drop the stream mid-way
    rest = list(client.watch(job.id, after_seq=first_part[-1].seq))

    assert [e.seq for e in first_part + rest] == [e.seq for e in everything]
    assert [e.SerializeToString() for e in first_part + rest] == [
        e.SerializeToString() for e in everything
    ]


def test_events_survive_connection_resets_mid_stream(address):
    # A real TCP proxy between the SDK and the gateway: resetting its connections is a
    # network failure as the SDK sees it, without touching the gateway.
    with _ResettingProxy(address) as proxy, secant.Client(proxy.address) as client:
        job = client.submit(**TIMED_SOLVE)
        seqs = []
        for event in job.events():
            seqs.append(event.seq)
            # drop the connection twice: at the third event, then once the SDK has reconnected
            # (events already buffered before a reset still arrive first)
            if len(seqs) >= 3 and proxy.resets < 2 and proxy.connections > proxy.resets:
                proxy.reset_all()
        result = job.result(timeout=60)

    assert proxy.connections == 3  # the first, and one reconnect after each reset
    assert seqs == list(range(1, len(seqs) + 1))
    assert result.status == secant.Status.TIME_LIMIT
    assert result.nit >= 1


def test_minimize_survives_a_connection_reset_mid_stream(address):
    with _ResettingProxy(address) as proxy, secant.Client(proxy.address) as client:
        timer = threading.Timer(0.5, proxy.reset_all)
        timer.start()
        result = client.minimize(**TIMED_SOLVE)
        timer.join()

    assert proxy.connections == 2
    assert result.status == secant.Status.TIME_LIMIT
    iterations = [record.nit for record in result.history]
    assert iterations == list(range(1, len(iterations) + 1))  # nothing lost or repeated


# -- asyncio ---------------------------------------------------------------------------------


def test_async_client_minimize_submit_batch_and_list(address):
    async def scenario():
        async with secant.AsyncClient(address) as client:
            solved = await client.minimize(ROSENBROCK, ROSENBROCK_X0, method="bfgs")
            job = await client.submit(ROSENBROCK, ROSENBROCK_X0, method="bfgs")
            seqs = [event.seq async for event in job.events()]
            submitted = await job.result()
            batch = await client.submit_batch(
                [{"objective": ROSENBROCK, "x0": [float(i), 0.0]} for i in range(3)]
            )
            batch_results = await batch.results(timeout=120)
            listed = [j.id async for j in client.jobs(batch_id=batch.batch_id, page_size=2)]
            concurrent = await asyncio.gather(
                *(client.minimize(ROSENBROCK, [float(i), 1.0]) for i in range(4))
            )
            with pytest.raises(secant.SecantError) as info:
                await client.minimize(ROSENBROCK, ROSENBROCK_X0, method="no-such-method")
            return solved, seqs, submitted, batch, batch_results, listed, concurrent, info.value

    solved, seqs, submitted, batch, batch_results, listed, concurrent, error = asyncio.run(
        scenario()
    )

    np.testing.assert_allclose(solved.x, [1.0, 1.0], atol=1e-4)
    np.testing.assert_array_equal(solved.x, submitted.x)
    assert seqs == list(range(1, len(seqs) + 1))
    assert all(r.success for r in batch_results)
    assert sorted(listed) == sorted(job.id for job in batch)
    assert all(r.success for r in concurrent)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT


def test_async_cancel(address):
    async def scenario():
        async with secant.AsyncClient(address) as client:
            job = await client.submit(**LONG_SOLVE)
            async for event in job.events():
                if event.WhichOneof("kind") == "iterate":
                    break
            await job.cancel()
            return job, await job.result(timeout=30)

    job, result = asyncio.run(scenario())

    assert job.state == secant.JobState.CANCELLED
    assert result.status == secant.Status.CANCELLED


# -- CLI -------------------------------------------------------------------------------------


def test_cli_solve_prints_the_result(address, capsys):
    status = cli_main(["--address", address, "solve", os.path.join(EXAMPLES, "rosenbrock.yaml")])

    out = capsys.readouterr().out
    assert status == 0, out
    assert "success: True" in out
    assert "job_id" in out


@pytest.mark.parametrize("example", ["logistic.yaml", "least_squares.yaml"])
def test_cli_solves_the_other_examples(address, capsys, example):
    status = cli_main(["solve", os.path.join(EXAMPLES, example), "--json", "--address", address])

    out = capsys.readouterr().out
    assert status == 0, out
    assert '"success": true' in out


def test_cli_jobs_list_show_watch_cancel_and_plot(address, client, capsys, tmp_path):
    job = client.submit(ROSENBROCK, ROSENBROCK_X0, labels={"from": "cli-test"})
    job.result(timeout=60)
    long_job = client.submit(**LONG_SOLVE)
    image = tmp_path / "conv.png"

    assert cli_main(["--address", address, "jobs", "list", "--limit", "0"]) == 0
    listing = capsys.readouterr().out
    assert cli_main(["jobs", "show", job.id, "--address", address]) == 0
    shown = capsys.readouterr().out
    assert cli_main(["jobs", "watch", job.id, "--address", address]) == 0
    watched = capsys.readouterr().out
    assert cli_main(["jobs", "cancel", long_job.id, "--address", address]) == 0
    cancelled = capsys.readouterr().out
    assert cli_main(["jobs", "plot", job.id, "-o", str(image), "--address", address]) == 0

    assert job.id in listing and "succeeded" in listing
    assert "cli-test" in shown and "success: True" in shown
    assert watched.splitlines()[0].split()[:2] == ["1", "accepted"]
    assert watched.splitlines()[-1].split()[1] == "result"
    assert long_job.id in cancelled
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert long_job.result(timeout=30).status == secant.Status.CANCELLED


def test_cli_reports_errors_with_status_code(address, capsys, tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(f'objective: "{ROSENBROCK}"\nx0: [1.0, 2.0]\nmethod: no-such-method\n')

    status = cli_main(["--address", address, "solve", str(spec)])

    assert status == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


def test_result_plot_writes_a_png(client, tmp_path):
    pytest.importorskip("matplotlib")
    result = client.minimize(ROSENBROCK, ROSENBROCK_X0)

    result.plot(str(tmp_path / "r.png"))

    assert (tmp_path / "r.png").stat().st_size > 1000


# -- helpers ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _ResettingProxy:
    """A loopback TCP forwarder whose open connections can be reset (RST) on demand."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self.resets = 0
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._upstream)
            self.connections += 1
            with self._lock:
                self._sockets += [downstream, upstream]
            for source, sink in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                sock.close()  # with SO_LINGER 0 after reset_all(): the peer gets an RST

    def reset_all(self) -> None:
        """Drops every open connection with an RST, as a crashed peer or a lost NAT entry
        would. (Closing a socket another thread is blocked in recv() on sends nothing on
        Linux, so this wakes the pumps with shutdown(SHUT_RD) and they close.)"""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        self.resets += 1

    def __enter__(self) -> _ResettingProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._closed = True
        self._listener.close()
        self.reset_all()
        self.resets -= 1
