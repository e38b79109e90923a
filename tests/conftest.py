"""Shared fixtures: ONE local Ray per test session (loopback only, token auth) and a real gateway
on a free loopback port with a temporary SQLite db, both started lazily by the first test that
needs them and stopped at the end of the session."""

from __future__ import annotations

# Ray reads its auth and node-address settings once, at import: set them before anything
# (a test module, a plugin) imports ray.
from service.ray_env import prepare_loopback_ray_env

prepare_loopback_ray_env()

import asyncio  # noqa: E402
import threading  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from concurrent.futures import Future  # noqa: E402

import grpc  # noqa: E402
import pytest  # noqa: E402

from secant.v1 import optimizer_pb2_grpc as pb_grpc  # noqa: E402

# Logical CPUs of the test cluster: several gateways (each with a couple of one-CPU workers)
# may be up at once; the real cores are still 2.
TEST_RAY_CPUS = 8


class GatewayThread:
    """A real gateway (service.server.Gateway) on its own event loop in a background thread,
    so tests can drive it with plain blocking gRPC stubs."""

    def __init__(self, config) -> None:
        from service.server import Gateway

        self.gateway = Gateway(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gateway", daemon=True)

    def _call(self, coroutine, timeout: float):
        future: Future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(timeout=timeout)

    def start(self, timeout: float = 120.0) -> GatewayThread:
        self._thread.start()
        self._call(self.gateway.start(), timeout)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        if self._loop.is_closed():
            return
        try:
            self._call(self.gateway.stop(grace_s=1.0), timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    @property
    def address(self) -> str:
        return self.gateway.address

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.metrics_port}/metrics"


def gateway_config(db: str, ray_address: str, **overrides):
    from service.server import GatewayConfig
    from service.validation import Limits

    limits = overrides.pop("limits", None) or Limits(max_message_bytes=8 * 2**20)
    return GatewayConfig(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        db=db,
        ray_address=ray_address,
        workers=overrides.pop("workers", 1),
        limits=limits,
        **overrides,
    )


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded loopback-only Ray head for the whole session; yields its address."""
    from service.scheduler import RayCluster

    cluster = RayCluster(None, num_cpus=TEST_RAY_CPUS)
    cluster.start()
    try:
        yield cluster.address
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def gateway_factory(ray_cluster, tmp_path_factory):
    """Starts extra gateways on the session Ray: gateway_factory(db=None, **config overrides).
    Whatever is still running at the end of the session is stopped then."""
    started: list[GatewayThread] = []

    def make(db: str | None = None, **overrides) -> GatewayThread:
        db = db or str(tmp_path_factory.mktemp("gateway") / "secant.db")
        server = GatewayThread(gateway_config(db, ray_cluster, **overrides)).start()
        started.append(server)
        return server

    yield make
    for server in reversed(started):
        server.stop()


@pytest.fixture
def make_gateway(gateway_factory):
    """Like gateway_factory, but the gateways stop at the end of the test."""
    started: list[GatewayThread] = []

    def make(db: str | None = None, **overrides) -> GatewayThread:
        server = gateway_factory(db, **overrides)
        started.append(server)
        return server

    yield make
    for server in reversed(started):
        server.stop()


@pytest.fixture(scope="session")
def gateway_server(ray_cluster, tmp_path_factory) -> Iterator[GatewayThread]:
    db = str(tmp_path_factory.mktemp("gateway") / "secant.db")
    server = GatewayThread(gateway_config(db, ray_cluster, workers=2)).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def gateway(gateway_server) -> str:
    """The session gateway's address, host:port."""
    return gateway_server.address


@pytest.fixture(scope="session")
def grpc_channel(gateway) -> Iterator[grpc.Channel]:
    channel = grpc.insecure_channel(gateway)
    grpc.channel_ready_future(channel).result(timeout=30)
    try:
        yield channel
    finally:
        channel.close()


@pytest.fixture(scope="session")
def stub(grpc_channel) -> pb_grpc.OptimizerStub:
    return pb_grpc.OptimizerStub(grpc_channel)


# -- auth (service.auth): callers with tokens, and a gateway that checks them ----------------

# Callers of the shared auth gateway and their roles.
AUTH_CALLERS = {
    "alice": ["solve", "train"],
    "bob": ["solve"],
    "carol": ["solve", "trust-code"],
    "root": ["admin", "solve"],
    "nobody": [],  # a valid token without any role
    "fuzzer": ["solve"],
}


@pytest.fixture(scope="session")
def auth_tokens(tmp_path_factory) -> tuple[str, dict[str, str]]:
    """A tokens file written by service.auth.add_token: (path, {caller: token})."""
    from service.auth import add_token

    path = str(tmp_path_factory.mktemp("auth") / "tokens.yaml")
    tokens = {name: add_token(path, name, roles) for name, roles in AUTH_CALLERS.items()}
    return path, tokens


@pytest.fixture(scope="session")
def auth_gateway(gateway_factory, auth_tokens) -> GatewayThread:
    """One gateway with auth on (the tokens above) and --trust-code, for the session."""
    path, _ = auth_tokens
    return gateway_factory(tokens=path, trust_code=True, workers=1, cancel_grace_s=0.5)
