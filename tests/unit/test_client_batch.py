"""The SDK's vectorized batch pieces that need no server: the Problem it builds from numpy,
decoding a batch Result, progress, and minimize_batch / the CLI over a fake stub."""

from __future__ import annotations

import asyncio
import builtins
import io
import json
import math

import grpc
import numpy as np
import pytest

import secant
from secant import cli
from secant._batch import BatchProgressBar, statuses_from_wire
from secant._core import EventTracker
from secant.v1 import optimizer_pb2 as pb

B, N = 4, 3
EXPR = "sum(log(1 + exp(-y * (X @ x))))"


def starts(b: int = B, n: int = N) -> np.ndarray:
    return np.arange(b * n, dtype=np.float64).reshape(b, n) / 10


# -- building the Problem --------------------------------------------------------------------


def test_problem_carries_x0_member_data_and_shared_data():
    X = np.ones((B, 5, N))
    y = np.ones((B, 5), dtype=np.int64)
    w = np.full(N, 0.5)

    problem = secant.build_batch_problem(
        EXPR + " + dot(w, x)", starts(), data={"w": w}, member_data={"X": X, "y": y},
        method="l-bfgs", options={"gtol": 1e-8}, chunk_size=2, labels={"run": 7},
    )  # fmt: skip

    assert problem.objective.expression.startswith("sum(log")
    assert list(problem.x0.shape) == [B, N] and problem.x0.dtype == pb.FLOAT64
    np.testing.assert_array_equal(secant.from_tensor(problem.x0), starts())
    assert problem.batch.size == B and problem.batch.chunk_size == 2
    member = {t.name: t.tensor for t in problem.batch.member_data}
    assert list(member["X"].shape) == [B, 5, N] and list(member["y"].shape) == [B, 5]
    assert member["y"].dtype == pb.INT64  # data keep their dtype; the server casts floats
    assert [t.name for t in problem.objective.data] == ["w"]
    assert problem.method == "l-bfgs" and problem.options["gtol"] == 1e-8
    assert problem.device == "" and dict(problem.labels) == {"run": "7"}
    assert not problem.HasField("bounds")


def test_objective_spellings_and_dtypes():
    residual = secant.Residual("x - b", data={"c": np.ones(N)})
    problem = secant.build_batch_problem(residual, starts(), member_data={"b": starts()})
    assert problem.objective.residual == "x - b"
    assert [t.name for t in problem.objective.data] == ["c"]

    as_float32 = secant.build_batch_problem("sum(x**2)", starts().astype(np.float32))
    assert as_float32.dtype == pb.FLOAT32 and as_float32.x0.dtype == pb.FLOAT32
    forced = secant.build_batch_problem("sum(x**2)", [[1, 2], [3, 4]], dtype="float32")
    assert forced.dtype == pb.FLOAT32 and list(forced.x0.shape) == [2, 2]
    on_gpu = secant.build_batch_problem("sum(x**2)", starts(), device="cuda")
    assert on_gpu.device == "cuda"


def test_nan_rows_of_x0_are_sent_as_they_are():
    x0 = starts()
    x0[1] = np.nan

    problem = secant.build_batch_problem("sum(x**2)", x0)

    assert np.isnan(secant.from_tensor(problem.x0)[1]).all()


@pytest.mark.parametrize(
    "bounds",
    [
        ([0, 0, 0], [1, 2, 3]),
        secant.Bounds([0, 0, 0], [1, 2, 3]),
        [(0, 1), (0, 2), (0, 3)],
        (0, np.array([1.0, 2.0, 3.0])),
    ],
)
def test_shared_bounds_are_n_vectors(bounds):
    problem = secant.build_batch_problem("sum(x**2)", starts(), bounds=bounds)

    np.testing.assert_array_equal(secant.from_tensor(problem.bounds.lower), [0, 0, 0])
    np.testing.assert_array_equal(secant.from_tensor(problem.bounds.upper), [1, 2, 3])


def test_shared_bounds_with_unbounded_sides():
    problem = secant.build_batch_problem(
        "sum(x**2)", starts(), bounds=[(0, None), (None, 1), (None, None)]
    )

    np.testing.assert_array_equal(secant.from_tensor(problem.bounds.lower), [0, -np.inf, -np.inf])
    np.testing.assert_array_equal(secant.from_tensor(problem.bounds.upper), [np.inf, 1, np.inf])


def test_per_member_bounds_are_b_by_n_and_the_other_side_is_repeated():
    upper = np.arange(B * N, dtype=np.float64).reshape(B, N) + 1

    problem = secant.build_batch_problem("sum(x**2)", starts(), bounds=(0, upper))
    lower_wire = secant.from_tensor(problem.bounds.lower)
    upper_wire = secant.from_tensor(problem.bounds.upper)
    assert lower_wire.shape == upper_wire.shape == (B, N)
    np.testing.assert_array_equal(lower_wire, np.zeros((B, N)))
    np.testing.assert_array_equal(upper_wire, upper)

    mixed = secant.build_batch_problem(
        "sum(x**2)", starts(), bounds=secant.Bounds(None, [[1, None, 2]] * B)
    )
    assert list(mixed.bounds.lower.shape) == [B, N]
    np.testing.assert_array_equal(secant.from_tensor(mixed.bounds.lower), np.full((B, N), -np.inf))
    np.testing.assert_array_equal(secant.from_tensor(mixed.bounds.upper)[0], [1, np.inf, 2])


def test_per_member_bounds_square_batch_is_not_read_as_pairs():
    # B == n == 2: a (lower, upper) pair of 2 x 2 arrays, not scipy's two (lo, hi) pairs
    lower = np.zeros((2, 2))
    upper = np.array([[1.0, 2.0], [3.0, 4.0]])

    problem = secant.build_batch_problem("sum(x**2)", np.zeros((2, 2)), bounds=(lower, upper))

    np.testing.assert_array_equal(secant.from_tensor(problem.bounds.upper), upper)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"X0": [[1.0, 2.0], [3.0]]}, "X0 is ragged"),
        ({"X0": [1.0, 2.0]}, r"2-D array \(B members x n\).*shape \(2,\)"),
        ({"X0": np.zeros((2, 2, 2))}, "2-D array"),
        ({"X0": np.zeros((0, 3))}, "at least one member"),
        ({"X0": [["a", "b"]]}, "must hold numbers"),
        (
            {"member_data": {"b": np.ones((B + 1, N))}},
            rf"member_data\['b'\] has shape \(5, 3\).*{B} rows",
        ),
        ({"member_data": {"b": 2.0}}, r"member_data\['b'\] is a scalar"),
        (
            {"member_data": {"b": [[1.0], [2.0, 3.0], [4.0], [5.0]]}},
            r"member_data\['b'\] is ragged",
        ),
        ({"member_data": {"not a name": np.ones(B)}}, "identifiers"),
        ({"data": {"b": np.ones(N)}, "member_data": {"b": np.ones((B, N))}}, "both as shared"),
        ({"bounds": (np.zeros((B + 1, N)), 1)}, r"lower has shape \(5, 3\).*\(4, 3\)"),
        ({"bounds": (0, np.zeros((B, N)) - 1)}, "for member 0, lower.0. = 0.0 exceeds"),
        ({"bounds": ([0, 0], [1, 1])}, r"bounds: lower has shape \(2,\)"),
        ({"bounds": (np.full((B, N), np.nan), 1)}, "NaN"),
        ({"chunk_size": -1}, "chunk_size must be >= 0"),
        ({"chunk_size": 1.5}, "chunk_size must be an int"),
        ({"dtype": "int64"}, "float64 or float32"),
        ({"method": ""}, "method"),
    ],
)
def test_wrong_inputs_are_refused_before_sending(kwargs, match):
    arguments = {"objective": "sum((x - b)**2)", "X0": starts(), **kwargs}

    with pytest.raises(ValueError, match=match) as caught:
        secant.build_batch_problem(**arguments)

    assert isinstance(caught.value, secant.SecantError)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "objective", [lambda x: float(np.sum(x**2)), secant.Pickled(b"x"), secant.TorchExport(b"x")]
)
def test_only_dsl_objectives_batch(objective):
    with pytest.raises(ValueError, match="expression or residual|Python callables"):
        secant.build_batch_problem(objective, starts())


# -- decoding the result ---------------------------------------------------------------------


def batch_result(size: int = B, n: int = N) -> pb.Result:
    x = np.arange(size * n, dtype=np.float64).reshape(size, n)
    fun = np.array([0.5, np.nan, 2.0, 0.25][:size])
    wire_status = np.array([pb.CONVERGED, pb.NON_FINITE, pb.MAX_ITERATIONS, pb.CONVERGED][:size])
    result = pb.Result(
        x=secant.to_tensor(x), jac=secant.to_tensor(x / 100), fun=0.25, nit=40, nfev=90,
        status=pb.MAX_ITERATIONS, success=False, message="2 of 4 members converged",
        solve_time_s=0.5, wall_time_s=0.75,
    )  # fmt: skip
    result.batch.fun.CopyFrom(secant.to_tensor(fun))
    result.batch.status.CopyFrom(secant.to_tensor(wire_status, dtype="int32"))
    for name, base in (("nit", 10), ("nfev", 20), ("njev", 20), ("nhev", 0)):
        values = base + np.arange(size, dtype=np.int64)
        getattr(result.batch, name).CopyFrom(secant.to_tensor(values))
    result.batch.converged = 2
    return result


def test_a_batch_result_decodes_into_arrays():
    result = secant.BatchSolveResult.from_proto(batch_result(), job_id="job-1")

    assert len(result) == result.size == B
    assert result.x.shape == (B, N) and result.jac.shape == (B, N)
    np.testing.assert_array_equal(result.fun[[0, 2, 3]], [0.5, 2.0, 0.25])
    assert np.isnan(result.fun[1])
    assert result.status.tolist() == [0, 4, 1, 0]  # scipy-like codes, as minimize gives
    assert result.success.tolist() == [True, False, False, True]
    assert result.nit.tolist() == [10, 11, 12, 13] and result.nfev.tolist() == [20, 21, 22, 23]
    assert result.njev.dtype == np.int64 and result.nhev.tolist() == [0, 1, 2, 3]
    assert result.converged == 2 and not result.all_converged
    assert result.message == "2 of 4 members converged" and result.job_id == "job-1"
    assert (result.wall_time_s, result.solve_time_s) == (0.75, 0.5)
    assert result.status_counts() == {"CONVERGED": 2, "MAX_ITERATIONS": 1, "NON_FINITE": 1}
    assert "4 members, 2 converged" in result.summary() and "median nit 11.5" in result.summary()
    result.x[0, 0] = 99.0  # the arrays own their memory
    assert "job-1" in repr(result)


def test_a_member_is_the_sdks_optimize_result():
    result = secant.BatchSolveResult.from_proto(batch_result(), job_id="job-1")

    member = result[2]

    assert isinstance(member, secant.OptimizeResult)
    np.testing.assert_array_equal(member.x, [6.0, 7.0, 8.0])
    np.testing.assert_array_equal(member.jac, [0.06, 0.07, 0.08])
    assert member.fun == 2.0 and member.nit == 12 and member.nfev == 22
    assert member.status == secant.Status.MAX_ITERATIONS and member.success is False
    assert member.message == "Maximum number of iterations has been exceeded."
    assert member.job_id == "job-1" and member.member == 2 and member.history == []
    assert result.member(-1).status == 0 and result.member(-1).member == B - 1
    assert result.member(np.int64(1)).message.startswith("NaN or Inf")
    assert [m.member for m in result] == list(range(B))
    with pytest.raises(IndexError, match="member 4 out of range for a batch of 4"):
        result[B]


def test_wire_statuses_map_like_minimize():
    wire = np.array([0, 1, 2, 3, 4, 5, 6, 7, 99, -3])

    assert statuses_from_wire(wire).tolist() == [-1, 0, 1, 2, 3, 4, 5, 6, -1, -1]


def test_a_result_without_batch_fields_gives_every_member_the_jobs_outcome():
    result = pb.Result(
        x=secant.to_tensor(np.zeros((3, 2))), status=pb.CANCELLED_BY_USER, nit=5, message="stop"
    )

    decoded = secant.BatchSolveResult.from_proto(result)

    assert len(decoded) == 3 and np.isnan(decoded.fun).all()
    assert decoded.status.tolist() == [5, 5, 5] and decoded.nit.tolist() == [5, 5, 5]
    assert decoded.converged == 0 and decoded.jac.size == 0
    assert decoded[0].jac.shape == (0,)


def test_inconsistent_result_arrays_are_reported():
    result = batch_result()
    result.batch.nit.CopyFrom(secant.to_tensor(np.arange(B + 1)))

    with pytest.raises(ValueError, match=r"nit has shape \(5,\), expected \(4,\)"):
        secant.BatchSolveResult.from_proto(result)


# -- the event stream ------------------------------------------------------------------------


def iterate_event(seq: int, iteration: int, converged: int, failed: int, size: int = B):
    progress = pb.BatchProgress(
        size=size, active=size - converged - failed, converged=converged, failed=failed,
        best_f=0.1, median_f=1.5, best_grad_norm=1e-9, median_grad_norm=1e-3,
    )  # fmt: skip
    iterate = pb.Iterate(iteration=iteration, f=1.5, grad_norm=1e-3, batch=progress)
    return pb.JobEvent(job_id="job-1", seq=seq, iterate=iterate)


def job_events(size: int = B) -> list[pb.JobEvent]:
    accepted = pb.Accepted(state=pb.QUEUED, method="bfgs", n=N, members=size)
    return [
        pb.JobEvent(job_id="job-1", seq=1, accepted=accepted),
        iterate_event(2, 1, 0, 0, size),
        iterate_event(3, 2, 1, 1, size),
        pb.JobEvent(job_id="job-1", seq=4, result=batch_result(size)),
    ]


def test_the_tracker_folds_a_batch_jobs_events_into_a_batch_result():
    tracker = EventTracker()
    for event in job_events():
        tracker.accept(event)

    result = tracker.outcome()

    assert isinstance(result, secant.BatchSolveResult)
    assert tracker.batch and tracker.members == B
    assert [r.nit for r in result.history] == [1, 2] and result.history[0].f == 1.5
    assert tracker.state == secant.JobState.FAILED  # not every member converged


def test_progress_without_tqdm_is_one_stderr_line(monkeypatch):
    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name.startswith("tqdm"):
            raise ImportError("no tqdm here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    stream = io.StringIO()
    bar = BatchProgressBar(B, stream=stream, min_interval_s=0.0)
    bar.update(iterate_event(2, 1, 0, 0).iterate)
    bar.update(iterate_event(3, 2, 1, 2).iterate)
    bar.update(pb.Iterate(iteration=3))  # a single-problem iterate: ignored
    bar.close()

    text = stream.getvalue()
    assert "0/4 members done" in text
    assert text.rstrip("\n").split("\r")[-1].startswith("secant batch: 3/4 members done")
    assert "(1 converged, 2 failed)" in text and text.endswith("\n")


def test_progress_with_tqdm_counts_members_finished():
    pytest.importorskip("tqdm")
    bar = BatchProgressBar(None)
    bar.update(iterate_event(2, 1, 1, 1).iterate)

    assert bar._bar.total == B and bar._bar.n == 2
    bar.close()


# -- minimize_batch, the async client and the CLI over a fake stub -------------------------


class FakeCall:
    """A server stream as grpc returns it: iterable, cancellable."""

    def __init__(self, events):
        self._events = list(events)

    def __iter__(self):
        return iter(self._events)

    def __aiter__(self):
        async def generate():
            for event in self._events:
                yield event

        return generate()

    def cancel(self):
        return True


class FakeStub:
    def __init__(self, asynchronous: bool = False):
        self.submitted: list[pb.SubmitRequest] = []
        self.asynchronous = asynchronous

    def _submit(self, request, metadata=None, timeout=None):
        self.submitted.append(request)
        return pb.Job(job_id="job-1", state=pb.QUEUED, method=request.problem.method)

    def Submit(self, request, metadata=None, timeout=None):  # noqa: N802 (grpc's spelling)
        job = self._submit(request)
        if self.asynchronous:

            async def reply():
                return job

            return reply()
        return job

    def Watch(self, request, metadata=None, timeout=None):  # noqa: N802
        assert request.job_id == "job-1"
        size = self.submitted[-1].problem.batch.size
        return FakeCall(e for e in job_events(size) if e.seq > request.after_seq)


def test_minimize_batch_submits_one_job_and_returns_every_member():
    client = secant.Client("127.0.0.1:1")
    client._stub = FakeStub()
    X = np.ones((B, 5, N))
    y = np.ones((B, 5))
    try:
        result = client.minimize_batch(
            EXPR, starts(), member_data={"X": X, "y": y}, bounds=(0, 1), options={"gtol": 1e-6}
        )
    finally:
        client.close()

    (request,) = client._stub.submitted
    assert request.idempotency_key and request.problem.batch.size == B
    assert request.problem.method == "bfgs"
    assert isinstance(result, secant.BatchSolveResult) and result.job_id == "job-1"
    assert len(result) == B and result.converged == 2 and len(result.history) == 2


def test_submit_batch_problem_returns_a_handle_with_a_batch_result(capsys):
    client = secant.Client("127.0.0.1:1")
    client._stub = FakeStub()
    try:
        job = client.submit_batch_problem("sum(x**2)", starts(), labels={"sweep": "a"})
        assert isinstance(job, secant.BatchJob) and job.id == "job-1"
        result = job.result(progress=True)
    finally:
        client.close()

    assert isinstance(result, secant.BatchSolveResult) and result[0].success
    assert dict(client._stub.submitted[0].problem.labels) == {"sweep": "a"}


def test_the_async_client_has_minimize_batch():
    async def run():
        client = secant.AsyncClient("127.0.0.1:1")
        client._stub = FakeStub(asynchronous=True)
        try:
            return await client.minimize_batch("sum(x**2)", starts(), method="l-bfgs")
        finally:
            await client.close()

    result = asyncio.run(run())

    assert isinstance(result, secant.BatchSolveResult) and len(result) == B


def test_cli_solves_a_batch_from_an_npz(tmp_path, monkeypatch, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"objective": EXPR + " + c * dot(x, x)", "method": "l-bfgs",
                                "data": {"c": 0.01}}))  # fmt: skip
    archive = tmp_path / "batch.npz"
    np.savez(archive, x0=starts(), X=np.ones((B, 5, N)), y=np.ones((B, 5)), w=np.ones(N))
    out = tmp_path / "results.npz"
    stub = FakeStub()

    def fake_client(args):
        client = secant.Client("127.0.0.1:1")
        client._stub = stub
        return client

    monkeypatch.setattr(cli, "_client", fake_client)
    status = cli.main(["solve", str(spec), "--batch", str(archive), "--member-data", "X",
                       "--member-data", "y", "--out", str(out), "-q"])  # fmt: skip

    assert status == cli.EXIT_NOT_CONVERGED  # 2 of 4 members converged
    printed = capsys.readouterr().out
    assert "4 members, 2 converged" in printed and "median nit" in printed
    assert "wall time" in printed
    problem = stub.submitted[0].problem
    assert sorted(t.name for t in problem.batch.member_data) == ["X", "y"]
    assert sorted(t.name for t in problem.objective.data) == ["c", "w"]
    with np.load(out) as saved:
        assert saved["x"].shape == (B, N) and saved["status"].tolist() == [0, 4, 1, 0]
        assert saved["nit"].tolist() == [10, 11, 12, 13] and math.isnan(saved["fun"][1])


@pytest.mark.parametrize(
    ("arrays", "flags", "spec_extra", "match"),
    [
        ({"X0": np.zeros((2, 2))}, [], {}, "has no 'x0' array"),
        ({"x0": np.zeros((2, 2))}, ["--member-data", "y"], {}, "--member-data y: not in"),
        ({"x0": np.zeros((2, 2))}, [], {"x0": [1.0, 2.0]}, "remove 'x0' from the spec"),
    ],
)
def test_cli_batch_usage_errors(tmp_path, capsys, arrays, flags, spec_extra, match):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"objective": "sum(x**2)", **spec_extra}))
    archive = tmp_path / "batch.npz"
    np.savez(archive, **arrays)

    status = cli.main(["--address", "127.0.0.1:1", "solve", str(spec), "--batch", str(archive),
                       *flags])  # fmt: skip

    assert status == cli.EXIT_USAGE
    assert match in capsys.readouterr().err


def test_cli_batch_flags_need_batch(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"objective": "sum(x**2)", "x0": [1.0]}))

    status = cli.main(["--address", "127.0.0.1:1", "solve", str(spec), "--out", "r.npz"])

    assert status == cli.EXIT_USAGE and "go with --batch" in capsys.readouterr().err


def test_watch_lines_show_batch_counts():
    events = job_events()

    assert "members=4" in cli.format_event(events[0])
    assert "converged=1 failed=1/4" in cli.format_event(events[2])
    assert "converged=2/4" in cli.format_event(events[3])


def test_cli_batch_detach_and_json(tmp_path, monkeypatch, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"objective": {"residual": "x - b"}, "method": "lm"}))
    archive = tmp_path / "batch.npz"
    np.savez(archive, x0=starts(), b=starts())
    stub = FakeStub()

    def fake_client(args):
        client = secant.Client("127.0.0.1:1")
        client._stub = stub
        return client

    monkeypatch.setattr(cli, "_client", fake_client)
    common = ["solve", str(spec), "--batch", str(archive), "--member-data", "b"]

    assert cli.main([*common, "--detach", "--chunk-size", "2"]) == cli.EXIT_OK
    assert capsys.readouterr().out.strip() == "job-1"
    assert stub.submitted[0].problem.batch.chunk_size == 2
    assert stub.submitted[0].problem.objective.residual == "x - b"

    assert cli.main([*common, "--json"]) == cli.EXIT_NOT_CONVERGED
    summary = json.loads(capsys.readouterr().out)
    assert summary["members"] == B and summary["converged"] == 2
    assert summary["median_nit"] == 11.5 and summary["status_counts"]["NON_FINITE"] == 1
