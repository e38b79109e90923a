"""Seeded, bounded fuzzing of a live gateway (tests/conftest.py's `auth_gateway`).

Hypothesis builds `Problem` messages field by field from the protobuf types (tensors with
random shapes, dtypes and byte lengths; methods; options Structs with NaN, inf, huge and
negative values; expressions mixing valid ones, hostile ones and junk; mismatched bounds;
code objectives from a caller without `trust-code`) and sends them to Submit, SubmitBatch and
Solve. Every answer must be OK or a deliberate status, never UNKNOWN or INTERNAL, within a
per-call deadline; accepted jobs are cancelled and must all end; health still answers. Random
bytes on the raw method paths must not hurt the gateway either.
"""

from __future__ import annotations

import collections
import math
import time

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secant.v1 import optimizer_pb2 as pb
from secant.v1 import optimizer_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

DELIBERATE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
TERMINAL = {pb.SUCCEEDED, pb.FAILED, pb.CANCELLED}
CALL_TIMEOUT_S = 20.0
FUZZ = dict(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

_DTYPES = {pb.FLOAT64: np.float64, pb.FLOAT32: np.float32, pb.INT64: np.int64,
           pb.INT32: np.int32, pb.BOOL: np.bool_}
_FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -0.0, 1e308, -1e308, 5e-324, math.nan, math.inf, -math.inf])


@st.composite
def tensors(draw, max_n: int = 8) -> pb.Tensor:
    """A wire tensor: usually consistent, sometimes with wrong bytes, shapes or dtypes."""
    dtype = draw(st.sampled_from([*_DTYPES, 0, 9, -1, 2**31 - 1]))
    shape = draw(st.lists(
        st.integers(0, max_n) | st.sampled_from([-1, 2**40, 2**62]), min_size=0, max_size=3))
    kind = draw(st.sampled_from(["consistent", "consistent", "junk", "truncated"]))
    numpy_dtype = _DTYPES.get(dtype, np.float64)
    count = math.prod(shape) if all(0 <= d <= max_n for d in shape) else 1
    if kind == "junk":
        data = draw(st.binary(max_size=64))
    else:
        values = draw(st.lists(_FLOATS, min_size=count, max_size=count))
        with np.errstate(all="ignore"):
            array = np.asarray(values, dtype=np.float64).astype(numpy_dtype)
        data = array.tobytes()
        if kind == "truncated" and data:
            data = data[: draw(st.integers(0, len(data) - 1))]
    return pb.Tensor(shape=shape, dtype=dtype, data=data)


def vectors() -> st.SearchStrategy[pb.Tensor]:
    """Mostly valid 1-D float vectors (so the fuzzer gets past the shape checks)."""
    return st.integers(1, 6).flatmap(lambda n: st.lists(_FLOATS, min_size=n, max_size=n)).map(
        lambda v: pb.Tensor(shape=[len(v)], dtype=pb.FLOAT64,
                            data=np.asarray(v, dtype=np.float64).tobytes()))


_EXPRESSIONS = st.sampled_from([
    "sum((x - 1)**2)", "sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)", "x @ x", "sum(exp(x))",
    "sum(log(x))", "sum(x / 0)", "sqrt(-sum(x**2))", "x", "x[0]", "A @ x", "sum(x**x**x**x)",
    "__import__('os').system('true')", "().__class__.__bases__[0].__subclasses__()",
    "lambda: 0", "[i for i in range(10**9)]", "9" * 5000, "(" * 500 + ")" * 500,
    "sum(x) if x else 0", "open('/etc/passwd')", "sum(x[::0])", "x.T.T.__dict__", "",
])
_TEXT = st.text(max_size=80) | st.binary(max_size=80).map(
    lambda b: b.decode("utf-8", errors="replace"))
_METHODS = st.sampled_from([
    "", "l-bfgs", "L-BFGS-B", "bfgs", "newton", "newton-cg", "gd", "lm", "gauss-newton",
    "trust-ncg", "nelder-mead", "nope", "\x00", "l-bfgs ",
]) | st.text(max_size=12)
_OPTION_KEYS = st.sampled_from([
    "max_iter", "gtol", "ftol", "xtol", "max_evals", "time_limit_s", "history_size",
    "line_search", "c1", "c2", "max_step", "initial_step", "memory", "tol",
]) | st.text(max_size=10)
_OPTION_VALUES = st.recursive(
    st.none() | st.booleans() | _FLOATS | st.integers(-(2**60), 2**60).map(float)
    | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=5,
)


@st.composite
def options(draw) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    for key, value in draw(st.dictionaries(_OPTION_KEYS, _OPTION_VALUES, max_size=4)).items():
        struct[key] = value
    return struct


@st.composite
def objectives(draw) -> pb.Objective:
    kind = draw(st.sampled_from(
        ["expression", "expression", "expression", "residual", "junk", "torch_export",
         "cloudpickle", "none"]))
    objective = pb.Objective()
    if kind in ("expression", "residual"):
        setattr(objective, kind, draw(_EXPRESSIONS | _TEXT))
    elif kind == "junk":
        objective.expression = draw(st.binary(max_size=200)).decode("latin-1")
    elif kind in ("torch_export", "cloudpickle"):
        setattr(objective, kind, draw(st.binary(max_size=100)))
    for name in draw(st.lists(st.sampled_from(["A", "b", "x", "", "sum", "__class__"]),
                              max_size=2)):
        objective.data.add(name=name, tensor=draw(tensors()))
    return objective


_VALID_EXPRESSIONS = st.sampled_from([
    "sum((x - 1)**2)", "sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)", "sum(exp(x))",
    "x @ x + sum(sin(x))", "sum(abs(x))", "sum(x**4) - sum(x)",
])
_VALID_METHODS = st.sampled_from(["", "l-bfgs", "bfgs", "gd", "newton-cg", "newton"])
_FINITE = st.floats(-1e3, 1e3, allow_nan=False)


@st.composite
def valid_options(draw) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct["max_iter"] = float(draw(st.integers(1, 30)))
    if draw(st.booleans()):
        struct["gtol"] = draw(st.floats(1e-12, 1.0))
    return struct


@st.composite
def wild_problem(draw) -> pb.Problem:
    problem = pb.Problem(
        objective=draw(objectives()),
        method=draw(_METHODS),
        options=draw(options()),
        dtype=draw(st.sampled_from([0, pb.FLOAT64, pb.FLOAT32, pb.INT32, 77])),
        device=draw(st.sampled_from(["", "cpu", "CUDA ", "tpu", "cuda:7"])),
        report_x_every=draw(st.integers(-3, 3)),
    )
    if draw(st.integers(0, 9)):  # now and then no x0 at all
        problem.x0.CopyFrom(draw(vectors() | tensors()))
    if draw(st.booleans()):
        problem.bounds.lower.CopyFrom(draw(vectors() | tensors()))
        problem.bounds.upper.CopyFrom(draw(vectors() | tensors()))
    for key, value in draw(st.dictionaries(_TEXT, _TEXT, max_size=2)).items():
        problem.labels[key] = value
    return problem


@st.composite
def problems(draw) -> pb.Problem:
    """A third valid problems (short solves), a third valid but for one wild field, a third
    wild in every field."""
    mode = draw(st.sampled_from(["valid", "one-wild", "wild"]))
    if mode == "wild":
        return draw(wild_problem())
    n = draw(st.integers(1, 6))
    x0 = np.asarray(draw(st.lists(_FINITE, min_size=n, max_size=n)), dtype=np.float64)
    problem = pb.Problem(
        objective=pb.Objective(expression=draw(_VALID_EXPRESSIONS)),
        x0=pb.Tensor(shape=[n], dtype=pb.FLOAT64, data=x0.tobytes()),
        method=draw(_VALID_METHODS),
        options=draw(valid_options()),
        dtype=draw(st.sampled_from([0, pb.FLOAT64, pb.FLOAT32])),
        report_x_every=draw(st.integers(0, 2)),
    )
    if mode == "one-wild":
        wild = draw(wild_problem())
        field = draw(st.sampled_from(
            ["objective", "x0", "method", "options", "dtype", "device", "bounds", "labels"]))
        if field in ("x0", "bounds") and not wild.HasField(field):
            problem.ClearField(field)
        elif field == "labels":
            problem.labels.update(wild.labels)
        elif field in ("objective", "x0", "options", "bounds"):
            getattr(problem, field).CopyFrom(getattr(wild, field))
        else:
            setattr(problem, field, getattr(wild, field))
    return problem


@pytest.fixture(scope="module")
def fuzz_channel(auth_gateway):
    with grpc.insecure_channel(auth_gateway.address) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield channel


@pytest.fixture(scope="module")
def fuzzer(fuzz_channel, auth_tokens):
    """(stub, metadata) of the `fuzzer` caller (roles: solve; no trust-code)."""
    return pb_grpc.OptimizerStub(fuzz_channel), (("authorization",
                                                  f"Bearer {auth_tokens[1]['fuzzer']}"),)


@pytest.fixture(scope="module")
def accepted(fuzzer):
    """Job ids the fuzz accepted; at the end every one must have ended (after a cancel)."""
    ids: list[str] = []
    yield ids
    stub, md = fuzzer
    for job_id in ids:
        stub.CancelJob(pb.CancelJobRequest(job_id=job_id), metadata=md, timeout=CALL_TIMEOUT_S)
    deadline = time.monotonic() + 30
    unfinished = set(ids)
    while unfinished and time.monotonic() < deadline:
        for job_id in list(unfinished):
            job = stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=md, timeout=10)
            if job.state in TERMINAL:
                unfinished.discard(job_id)
        time.sleep(0.05)
    assert not unfinished, f"{len(unfinished)} accepted jobs never ended"


def code_of(fn) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


SEEN: collections.Counter = collections.Counter()  # (test, code) -> answers, for the report


def assert_deliberate(code: grpc.StatusCode, details: str, what, test: str = "") -> None:
    SEEN[test, code.name] += 1
    assert code in DELIBERATE, f"{code.name}: {details!r} for {what}"


def cancel_now(stub, md, job_id: str) -> None:
    stub.CancelJob(pb.CancelJobRequest(job_id=job_id), metadata=md, timeout=CALL_TIMEOUT_S)


@settings(max_examples=150, **FUZZ)
@given(problem=problems())
def test_fuzzed_submit_gets_ok_or_a_deliberate_status(fuzzer, accepted, problem):
    stub, md = fuzzer
    replies = []
    code, details = code_of(lambda: replies.append(stub.Submit(
        pb.SubmitRequest(problem=problem), metadata=md, timeout=CALL_TIMEOUT_S)))
    assert_deliberate(code, details, problem, "submit")
    if replies:
        accepted.append(replies[0].job_id)
        cancel_now(stub, md, replies[0].job_id)


@settings(max_examples=30, **FUZZ)
@given(batch=st.lists(problems(), min_size=0, max_size=4))
def test_fuzzed_batches_and_solve_streams_get_ok_or_a_deliberate_status(
    fuzzer, accepted, batch
):
    stub, md = fuzzer
    replies = []
    code, details = code_of(lambda: replies.append(stub.SubmitBatch(
        pb.SubmitBatchRequest(problems=batch), metadata=md, timeout=CALL_TIMEOUT_S)))
    assert_deliberate(code, details, batch, "batch")
    for reply in replies:
        for job in reply.jobs:
            accepted.append(job.job_id)
            cancel_now(stub, md, job.job_id)
    if not batch:
        return
    # Solve: the first event (accepted) or the error; then the job is cancelled.
    stream = stub.Solve(pb.SolveRequest(problem=batch[0]), metadata=md, timeout=CALL_TIMEOUT_S)
    first = []
    code, details = code_of(lambda: first.append(next(stream)))
    assert_deliberate(code, details, batch[0], "solve")
    if first:
        accepted.append(first[0].job_id)
        cancel_now(stub, md, first[0].job_id)
    stream.cancel()


RAW_METHODS = ["Submit", "Solve", "SubmitBatch", "GetJob", "ListJobs", "Watch", "CancelJob",
               "SolveWithCallbacks"]


@settings(max_examples=120, **FUZZ)
@given(method=st.sampled_from(RAW_METHODS), body=st.binary(max_size=512),
       with_token=st.booleans())
def test_random_bytes_on_the_raw_method_paths_are_refused_cleanly(
    fuzz_channel, auth_tokens, accepted, method, body, with_token
):
    """Bytes that do not parse are INVALID_ARGUMENT (the gateway parses requests itself);
    bytes that happen to parse are ordinary requests, answered as such."""
    md = (("authorization", f"Bearer {auth_tokens[1]['fuzzer']}"),) if with_token else ()
    path = f"/secant.v1.Optimizer/{method}"
    if method in ("Solve", "Watch"):
        rpc = fuzz_channel.unary_stream(path)
        call = rpc(body, metadata=md, timeout=CALL_TIMEOUT_S)
        code, details = code_of(lambda: next(call))
        call.cancel()
    elif method == "SolveWithCallbacks":
        rpc = fuzz_channel.stream_stream(path)
        call = rpc(iter([body]), metadata=md, timeout=CALL_TIMEOUT_S)
        code, details = code_of(lambda: next(call))
        call.cancel()
    else:
        replies = []
        code, details = code_of(lambda: replies.append(fuzz_channel.unary_unary(path)(
            body, metadata=md, timeout=CALL_TIMEOUT_S)))
        for reply in replies:  # a parsed Submit may have created a job
            if method in ("Submit", "SubmitBatch"):
                ids = ([pb.Job.FromString(reply).job_id] if method == "Submit" else
                       [j.job_id for j in pb.SubmitBatchResponse.FromString(reply).jobs])
                accepted.extend(i for i in ids if i)
    if code == grpc.StatusCode.CANCELLED:  # our own call.cancel() after the first message
        return
    if not with_token:
        assert code == grpc.StatusCode.UNAUTHENTICATED, (code, details)
    assert_deliberate(code, details, (method, body), "raw")


def test_the_fuzz_reached_past_validation_and_the_gateway_still_serves(
    fuzz_channel, fuzzer, accepted
):
    print("fuzz answers:", dict(SEEN), "accepted jobs:", len(accepted))
    # The strategies are worth something only if some inputs pass validation and some not.
    assert SEEN["submit", "OK"] > 0 and SEEN["submit", "INVALID_ARGUMENT"] > 0
    assert SEEN["submit", "PERMISSION_DENIED"] > 0  # code objectives without trust-code
    assert SEEN["raw", "INVALID_ARGUMENT"] > 0 and SEEN["raw", "UNAUTHENTICATED"] > 0
    health = health_pb2_grpc.HealthStub(fuzz_channel)
    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub, md = fuzzer
    job = stub.Submit(pb.SubmitRequest(problem=pb.Problem(
        objective=pb.Objective(expression="sum((x - 1)**2)"),
        x0=pb.Tensor(shape=[2], dtype=pb.FLOAT64, data=np.zeros(2).tobytes()),
    )), metadata=md, timeout=CALL_TIMEOUT_S)
    events = list(stub.Watch(pb.WatchRequest(job_id=job.job_id), metadata=md, timeout=30))
    assert events[-1].result.success
