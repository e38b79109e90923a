"""Auth, roles, ownership, quotas and TLS through a real gateway (tests/conftest.py's
`auth_gateway`: tokens for alice, bob, carol, root, nobody; --trust-code on).

Every RPC of secant.v1.Optimizer is taken from the service descriptor, so an RPC added later
is covered (and refused) without touching these tests."""

from __future__ import annotations

import subprocess

import grpc
import numpy as np
import pytest
import waiting  # tests/waiting.py
from google.protobuf import message_factory, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

import secant
from secant.v1 import optimizer_pb2 as pb
from secant.v1 import optimizer_pb2_grpc as pb_grpc
from service.auth import METHOD_ROLES, TokenStore, add_token, hash_token, parse_tokens
from service.health_cli import check as health_check
from service.server import GatewayConfig, check_config
from service.validation import Limits

pytestmark = pytest.mark.integration

SERVICE = pb.DESCRIPTOR.services_by_name["Optimizer"]
METHODS = [method.name for method in SERVICE.methods]
QUADRATIC = "sum((x - 1)**2)"
TERMINAL = {pb.SUCCEEDED, pb.FAILED, pb.CANCELLED}


def tensor(values) -> pb.Tensor:
    array = np.asarray(values, dtype=np.float64)
    return pb.Tensor(shape=list(array.shape), dtype=pb.FLOAT64, data=array.tobytes())


def problem(x0=(0.0, 0.0), expression=QUADRATIC, method="l-bfgs", options=None) -> pb.Problem:
    struct = struct_pb2.Struct()
    struct.update(options or {})
    return pb.Problem(
        objective=pb.Objective(expression=expression), x0=tensor(x0), method=method,
        options=struct,
    )


def long_problem(n: int = 500) -> pb.Problem:
    """Gradient descent with a tiny tolerance: runs until cancelled."""
    return problem(
        x0=np.full(n, -1.0), expression="sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)",
        method="gd", options={"max_iter": 10_000_000, "gtol": 1e-14},
    )


def request_for(method: str, job_id: str = "0" * 32):
    """A plausible request for each RPC (what matters is who sends it)."""
    return {
        "Solve": pb.SolveRequest(problem=problem()),
        "Submit": pb.SubmitRequest(problem=problem()),
        "SubmitBatch": pb.SubmitBatchRequest(problems=[problem()]),
        "Watch": pb.WatchRequest(job_id=job_id),
        "GetJob": pb.GetJobRequest(job_id=job_id),
        "ListJobs": pb.ListJobsRequest(),
        "CancelJob": pb.CancelJobRequest(job_id=job_id),
        "SolveWithCallbacks": pb.CallbackClientMessage(
            start=pb.CallbackStart(resume_job_id=job_id)
        ),
        "GetArtifact": pb.GetArtifactRequest(job_id=job_id),
    }.get(method) or message_factory.GetMessageClass(SERVICE.methods_by_name[method].input_type)()


def call(channel: grpc.Channel, method: str, request, token: str | None, timeout: float = 15.0):
    """Calls any Optimizer RPC; returns (status code, responses)."""
    desc = SERVICE.methods_by_name[method]
    path = f"/{SERVICE.full_name}/{method}"
    response_class = message_factory.GetMessageClass(desc.output_type)
    kwargs = {"request_serializer": type(request).SerializeToString,
              "response_deserializer": response_class.FromString}
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    try:
        if desc.client_streaming and desc.server_streaming:
            responses = list(channel.stream_stream(path, **kwargs)(
                iter([request]), metadata=metadata, timeout=timeout))
        elif desc.server_streaming:
            responses = list(channel.unary_stream(path, **kwargs)(
                request, metadata=metadata, timeout=timeout))
        elif desc.client_streaming:
            responses = [channel.stream_unary(path, **kwargs)(
                iter([request]), metadata=metadata, timeout=timeout)]
        else:
            responses = [channel.unary_unary(path, **kwargs)(
                request, metadata=metadata, timeout=timeout)]
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, responses


@pytest.fixture(scope="module")
def channel(auth_gateway):
    with grpc.insecure_channel(auth_gateway.address) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield channel


@pytest.fixture(scope="module")
def tokens(auth_tokens) -> dict[str, str]:
    return auth_tokens[1]


def stub_call(channel, token):
    stub = pb_grpc.OptimizerStub(channel)
    metadata = (("authorization", f"Bearer {token}"),)
    return stub, metadata


def wait_for_state(channel, token, job_id, states, timeout=30.0) -> pb.Job:
    stub, md = stub_call(channel, token)
    return waiting.wait_for_state(
        lambda: stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=md), states, timeout,
        pb.JobState.Name)


# -- no token, bad token, no role -------------------------------------------------------------


def test_every_optimizer_rpc_has_an_explicit_role_rule():
    assert set(METHODS) == set(METHOD_ROLES)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "metadata",
    [None, "Bearer secant_not-a-token", "Bearer ", "Basic YWxpY2U6cGFzcw==", "secant_x"],
    ids=["none", "unknown", "empty", "basic", "no-scheme"],
)
def test_every_rpc_without_a_valid_token_is_unauthenticated(channel, method, metadata):
    path = f"/{SERVICE.full_name}/{method}"
    call_metadata = (("authorization", metadata),) if metadata else ()
    rpc = channel.unary_unary(path)  # raw bytes: the body is never parsed before auth
    with pytest.raises(grpc.RpcError) as err:
        rpc(request_for(method).SerializeToString(), metadata=call_metadata, timeout=15)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
    assert "token" in err.value.details()


@pytest.mark.parametrize("method", METHODS)
def test_every_rpc_with_a_bad_token_is_unauthenticated_on_its_own_stub_shape(
    channel, tokens, method
):
    code, details = call(channel, method, request_for(method), tokens["alice"] + "x")
    assert code == grpc.StatusCode.UNAUTHENTICATED, details


@pytest.mark.parametrize("method", [m for m, role in METHOD_ROLES.items() if role])
def test_a_caller_without_the_methods_role_is_permission_denied(channel, tokens, method):
    code, details = call(channel, method, request_for(method), tokens["nobody"])
    assert code == grpc.StatusCode.PERMISSION_DENIED, details
    assert repr(METHOD_ROLES[method]) in details and "nobody" in details


def test_train_needs_the_train_role(channel, tokens):
    code, details = call(channel, "Train", pb.TrainRequest(), tokens["bob"])
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "'train'" in details
    code, _ = call(channel, "Train", pb.TrainRequest(), tokens["alice"])
    assert code not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


def test_health_and_reflection_need_no_token(channel):
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE.full_name), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_valid_token_solves_and_the_job_is_the_callers(auth_gateway, tokens):
    with secant.Client(auth_gateway.address, token=tokens["alice"]) as client:
        res = client.minimize(QUADRATIC, [0.0, 0.0])
        job = client.get_job(res.job_id)
    assert res.success
    assert job.info.owner == "alice"


# -- ownership -------------------------------------------------------------------------------


def test_another_callers_jobs_are_not_found_and_admin_sees_all(channel, tokens):
    alice, alice_md = stub_call(channel, tokens["alice"])
    _, bob_md = stub_call(channel, tokens["bob"])
    _, root_md = stub_call(channel, tokens["root"])
    done = alice.Submit(pb.SubmitRequest(problem=problem(), idempotency_key="k1"),
                        metadata=alice_md)
    assert wait_for_state(channel, tokens["alice"], done.job_id, TERMINAL).state == pb.SUCCEEDED
    running = alice.Submit(pb.SubmitRequest(problem=long_problem()), metadata=alice_md)
    assert running.owner == "alice"
    wait_for_state(channel, tokens["alice"], running.job_id, {pb.RUNNING})

    # bob: every job-scoped RPC on alice's jobs (live and finished) is NOT_FOUND, like a
    # job that does not exist, with the same message shape.
    for job_id in (running.job_id, done.job_id):
        for method in ("GetJob", "Watch", "CancelJob", "GetArtifact"):
            code, details = call(channel, method, request_for(method, job_id), tokens["bob"])
            assert code == grpc.StatusCode.NOT_FOUND, (method, code, details)
            assert details == f"job_id: no job {job_id!r}" or "no job" in details
        code, details = call(
            channel, "SolveWithCallbacks", request_for("SolveWithCallbacks", job_id),
            tokens["bob"],
        )
        assert code == grpc.StatusCode.NOT_FOUND, details
    assert alice.GetJob(pb.GetJobRequest(job_id=running.job_id),
                        metadata=alice_md).state == pb.RUNNING  # bob's cancel did nothing

    # Idempotency keys are per caller: bob's "k1" is a new job of bob's, not alice's.
    bobs = alice.Submit(pb.SubmitRequest(problem=problem(), idempotency_key="k1"),
                        metadata=bob_md)
    assert bobs.job_id != done.job_id and bobs.owner == "bob"
    again = alice.Submit(pb.SubmitRequest(problem=problem(), idempotency_key="k1"),
                         metadata=alice_md)
    assert again.job_id == done.job_id

    # ListJobs: own jobs only; admin: everyone's.
    def listed(md, **filters):
        return {j.job_id: j.owner for j in alice.ListJobs(
            pb.ListJobsRequest(page_size=1000, **filters), metadata=md).jobs}

    bob_list, alice_list, root_list = listed(bob_md), listed(alice_md), listed(root_md)
    assert bobs.job_id in bob_list and set(bob_list.values()) == {"bob"}
    assert {running.job_id, done.job_id} <= set(alice_list)
    assert set(alice_list.values()) == {"alice"}
    assert {running.job_id, done.job_id, bobs.job_id} <= set(root_list)
    assert running.job_id not in listed(bob_md, state=pb.RUNNING)

    # admin reads, watches and cancels alice's job.
    assert alice.GetJob(pb.GetJobRequest(job_id=done.job_id), metadata=root_md).owner == "alice"
    events = list(alice.Watch(pb.WatchRequest(job_id=done.job_id), metadata=root_md, timeout=10))
    assert events[-1].HasField("result")
    alice.CancelJob(pb.CancelJobRequest(job_id=running.job_id), metadata=root_md)
    assert wait_for_state(channel, tokens["alice"], running.job_id, TERMINAL).state == (
        pb.CANCELLED
    )


# -- trusted code ----------------------------------------------------------------------------


def shifted(x):
    import torch

    return torch.sum((x - 2.0) ** 2)


def test_code_objectives_need_the_trust_code_role(auth_gateway, tokens):
    pickled = secant.Pickled.from_callable(shifted)
    with secant.Client(auth_gateway.address, token=tokens["bob"]) as bob:
        with pytest.raises(secant.SecantError) as err:
            bob.minimize(pickled, np.zeros(3))
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "trust-code" in err.value.message and "bob" in err.value.message
        with pytest.raises(secant.SecantError) as err:  # in a batch too, naming the entry
            bob.submit_batch([{"objective": QUADRATIC, "x0": [0.0]},
                              {"objective": pickled, "x0": [0.0]}])
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "problems[1]" in err.value.message
    with secant.Client(auth_gateway.address, token=tokens["carol"]) as carol:
        res = carol.minimize(pickled, np.zeros(3))
    assert res.success
    np.testing.assert_allclose(res.x, np.full(3, 2.0), atol=1e-6)


# -- quotas and concurrent RPCs --------------------------------------------------------------


def test_per_caller_quotas_are_resource_exhausted_with_the_numbers(make_gateway, auth_tokens):
    path, tokens = auth_tokens
    gateway = make_gateway(
        tokens=path, workers=1, cancel_grace_s=0.5, max_concurrent_rpcs=6,
        limits=Limits(max_message_bytes=8 * 2**20, max_jobs_per_caller=2,
                      max_dimension_per_caller=1200),
    )
    with grpc.insecure_channel(gateway.address) as channel:
        stub, alice = stub_call(channel, tokens["alice"])
        _, bob = stub_call(channel, tokens["bob"])
        first = stub.Submit(pb.SubmitRequest(problem=long_problem(500)), metadata=alice)
        stub.Submit(pb.SubmitRequest(problem=long_problem(500)), metadata=alice)
        with pytest.raises(grpc.RpcError) as err:
            stub.Submit(pb.SubmitRequest(problem=problem()), metadata=alice)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_jobs_per_caller" in err.value.details()
        assert "'alice' has 2 jobs" in err.value.details() and "quota is 2" in err.value.details()

        # Quotas are per caller: bob has his own, and meets the dimension quota.
        stub.Submit(pb.SubmitRequest(problem=long_problem(1000)), metadata=bob)
        with pytest.raises(grpc.RpcError) as err:
            stub.SubmitBatch(pb.SubmitBatchRequest(problems=[problem(x0=np.zeros(201))]),
                             metadata=bob)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = err.value.details()
        assert "max_dimension_per_caller" in details and "1000" in details and "201" in details

        # maximum_concurrent_rpcs: with the server's RPC slots taken by streams, one more
        # RPC is refused (RESOURCE_EXHAUSTED), and served again once they end.
        streams = [stub.Watch(pb.WatchRequest(job_id=first.job_id), metadata=alice)
                   for _ in range(6)]
        for stream in streams:
            next(stream)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetJob(pb.GetJobRequest(job_id=first.job_id), metadata=alice, timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for stream in streams:
            stream.cancel()

        def served():  # the slots come back once the server has seen the streams end
            try:
                return stub.GetJob(pb.GetJobRequest(job_id=first.job_id), metadata=alice,
                                   timeout=10)
            except grpc.RpcError as refused:
                assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
                return None

        waiting.wait_until(served, 30, "the RPC slots of the cancelled streams to free")

        # An ended job gives its quota back.
        stub.CancelJob(pb.CancelJobRequest(job_id=first.job_id), metadata=alice)
        wait_for_state(channel, tokens["alice"], first.job_id, TERMINAL)
        third = stub.Submit(pb.SubmitRequest(problem=problem()), metadata=alice)
        page = stub.ListJobs(pb.ListJobsRequest(), metadata=alice).jobs
        root = stub_call(channel, tokens["root"])[1]
        for job in stub.ListJobs(pb.ListJobsRequest(), metadata=root).jobs:
            stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), metadata=root)
    assert third.owner == "alice" and len(page) == 3


# -- TLS and mutual TLS ----------------------------------------------------------------------


def _openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A test CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("certs")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=secant test CA", cwd=d)
    for name, usage, san in (("server", "serverAuth", "DNS:localhost,IP:127.0.0.1"),
                             ("client", "clientAuth", "DNS:alice")):
        (d / f"{name}.ext").write_text(
            f"subjectAltName={san}\nbasicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n"
        )
        _openssl("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
                 "-extfile", f"{name}.ext", cwd=d)
    return {p.stem + p.suffix: str(p) for p in d.iterdir()}


def test_tls_round_trip_and_plaintext_is_refused(make_gateway, auth_tokens, certs):
    path, tokens = auth_tokens
    gateway = make_gateway(tokens=path, tls_cert=certs["server.pem"],
                           tls_key=certs["server.key"])
    tls = secant.TLSConfig(root_certificates=certs["ca.pem"])
    with secant.Client(gateway.address, token=tokens["alice"], tls=tls) as client:
        assert client.minimize(QUADRATIC, [3.0]).success
    with secant.Client(gateway.address, token=tokens["alice"], tls=False) as client:
        with pytest.raises(secant.SecantError) as err:
            client.get_job("0" * 32)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    # TLS does not replace the token.
    with secant.Client(gateway.address, token="", tls=tls) as client:
        with pytest.raises(secant.SecantError) as err:
            client.minimize(QUADRATIC, [3.0])
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_mutual_tls_needs_a_client_certificate(make_gateway, auth_tokens, certs, monkeypatch):
    path, tokens = auth_tokens
    gateway = make_gateway(tokens=path, tls_cert=certs["server.pem"],
                           tls_key=certs["server.key"], tls_client_ca=certs["ca.pem"])
    # Everything from the environment, as a deployed caller would have it.
    monkeypatch.setenv("SECANT_TOKEN", tokens["bob"])
    monkeypatch.setenv("SECANT_TLS_ROOT_CERT", certs["ca.pem"])
    monkeypatch.setenv("SECANT_TLS_CERT", certs["client.pem"])
    monkeypatch.setenv("SECANT_TLS_KEY", certs["client.key"])
    monkeypatch.setenv("SECANT_TLS_SERVER_NAME", "localhost")
    with secant.Client(gateway.address) as client:
        res = client.minimize(QUADRATIC, [3.0, 4.0])
    assert res.success

    async def async_round_trip():
        async with secant.AsyncClient(gateway.address) as client:
            return await client.minimize(QUADRATIC, [5.0])

    import asyncio

    assert asyncio.run(async_round_trip()).success
    tls_files = {"root_cert": certs["ca.pem"], "cert": certs["client.pem"],
                 "key": certs["client.key"], "server_name": "localhost"}
    assert health_check(gateway.address, **tls_files) == "SERVING"  # `secant health` too

    no_cert = secant.TLSConfig(root_certificates=certs["ca.pem"])
    with secant.Client(gateway.address, tls=no_cert) as client:
        with pytest.raises(secant.SecantError) as err:
            client.minimize(QUADRATIC, [3.0], timeout=10)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


# -- configuration and the tokens file -------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::"])
def test_a_non_loopback_bind_without_tokens_is_refused_even_with_tls(host, certs, auth_tokens):
    tokens_file = auth_tokens[0]
    tls = {"tls_cert": certs["server.pem"], "tls_key": certs["server.key"]}
    with pytest.raises(ValueError, match="--tokens"):
        check_config(GatewayConfig(host=host, **tls))
    check_config(GatewayConfig(host=host, allow_remote_without_auth=True, **tls))  # forced
    with pytest.raises(ValueError, match="no such file"):
        check_config(GatewayConfig(host=host, tokens="/nonexistent/tokens.yaml", **tls))
    check_config(GatewayConfig(host=host, tokens=tokens_file, **tls))
    check_config(GatewayConfig(host="127.0.0.1"))
    with pytest.raises(ValueError, match="together"):
        check_config(GatewayConfig(tls_cert=certs["server.pem"]))


def test_secant_tokens_add_prints_a_token_once_and_stores_its_hash(tmp_path, capsys):
    from service.cli import main

    path = tmp_path / "tokens.yaml"
    assert main(["tokens", "add", "dave", "--roles", "solve,train", "--file", str(path)]) == 0
    token = capsys.readouterr().out.strip()
    text = path.read_text()
    assert token.startswith("secant_") and token not in text
    (entry,) = parse_tokens(text)
    assert entry.caller == "dave" and entry.roles == {"solve", "train"}
    assert entry.sha256 == hash_token(token)
    assert TokenStore(path).lookup(token).name == "dave"
    assert path.stat().st_mode & 0o077 == 0
    assert main(["tokens", "add", "eve", "--roles", "root", "--file", str(path)]) == 2
    assert main(["tokens", "list", "--file", str(path)]) == 0
    assert "dave\tsolve,train" in capsys.readouterr().out


def test_the_tokens_file_is_reread_so_tokens_rotate_without_a_restart(tmp_path):
    path = tmp_path / "tokens.yaml"
    old = add_token(path, "frank", ["solve"])
    store = TokenStore(path, recheck_s=0.0)
    new = add_token(path, "frank", ["solve"])
    assert store.lookup(new).name == "frank"
    path.write_text("".join(line for line in path.read_text().splitlines(keepends=True)
                            if hash_token(old) not in line))
    assert store.lookup(old) is None and store.lookup(new).name == "frank"
    path.write_text("not: [valid")  # a broken edit keeps the last good tokens
    assert store.lookup(new).name == "frank"
