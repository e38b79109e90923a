"""Assembles the gateway: store, Ray, scheduler, job manager, grpc.aio server with health and
reflection, the metrics endpoint and the dashboard; and takes it apart again in the right order.

Startup order: store -> Ray (embedded or joined) -> warm worker pool -> job manager (settles
jobs a dead gateway left behind) -> gRPC server -> metrics, dashboard -> health SERVING.
Shutdown: health NOT_SERVING -> dashboard (its event streams end) -> `server.stop(grace)` ->
job manager (ends what is still live) -> workers -> Ray (if embedded) -> store.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from secant.v1 import optimizer_pb2 as pb
from secant.v1 import optimizer_pb2_grpc as pb_grpc
from service.auth import AuthInterceptor, TokenStore, parse_tokens
from service.callbacks import CallbackJobs, CallbackSettings
from service.errors import RequestParsingInterceptor
from service.jobs import JobManager
from service.metrics import Metrics, MetricsInterceptor
from service.scheduler import RayCluster, Scheduler
from service.servicer import OptimizerServicer
from service.solver_pool import SolverPool
from service.store import open_store
from service.training import TrainingJobs
from service.validation import Limits

log = logging.getLogger("secant.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Optimizer"].full_name


@dataclass
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    metrics_port: int | None = 9464  # None: no metrics endpoint; 0: a free port
    metrics_host: str = "127.0.0.1"
    # The web dashboard (service.dashboard): None: off (`secant serve` turns it on at 9465);
    # 0: a free port. Beyond loopback it needs --tokens, as the gRPC port does.
    dashboard_port: int | None = None
    dashboard_host: str = "127.0.0.1"
    # True for the CLI's default port: should it be taken (another gateway on this machine),
    # the gateway serves without a dashboard and says so, rather than not at all.
    dashboard_best_effort: bool = False
    db: str = "./secant.db"
    # Job artifacts (training weights); None: "secant-artifacts" beside the db file.
    artifacts_dir: str | None = None
    ray_address: str | None = None  # None: start an embedded loopback-only Ray
    num_cpus: int | None = None  # embedded Ray only; None: every core
    workers: int = 0  # warm solver processes; 0: one per CPU Ray reports
    trust_code: bool = False
    # Training data files (a spec's data_uri) are read only under this directory; None: off.
    data_root: str | None = None
    # Auth: a tokens file (service.auth); None runs without auth, which only loopback allows.
    tokens: str | None = None
    allow_remote_without_auth: bool = False
    # TLS from PEM files; with tls_client_ca, callers must present a certificate it signed.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    # RPCs in flight at once (streams included); beyond it new RPCs are RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int | None = 4096
    grace_s: float = 5.0
    # How long a cancelled job's worker gets to stop before the gateway ends the job itself
    # (with the last iterate it saw) and replaces the worker process.
    cancel_grace_s: float = 1.5
    # Durability: how often a running solve sends its state back (seconds of solving), and
    # how often a job may lose its worker and resume from that checkpoint.
    checkpoint_interval_s: float = 1.0
    max_worker_restarts: int = 3
    # Small solves start in the gateway's own solver processes (service.solver_pool): this
    # many; None: as many as the Ray workers; 0: none (they start on Ray).
    solver_processes: int | None = None
    limits: Limits = field(default_factory=Limits)
    callbacks: CallbackSettings = field(default_factory=CallbackSettings)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_config(config: GatewayConfig) -> None:
    """Refuses (ValueError) what must not start: a non-loopback bind without tokens (TLS
    alone identifies no one) unless forced, and half a TLS setup."""
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    for flag, path in (("--tls-cert", config.tls_cert), ("--tls-key", config.tls_key),
                       ("--tls-client-ca", config.tls_client_ca), ("--tokens", config.tokens)):
        if path is not None and not Path(path).expanduser().is_file():
            raise ValueError(f"{flag} {path}: no such file")
    if config.tokens is not None:
        parse_tokens(Path(config.tokens).read_text(), config.tokens)  # a broken file: refuse
    if config.data_root is not None and not Path(config.data_root).expanduser().is_dir():
        raise ValueError(f"--data-root {config.data_root}: no such directory")
    if not _is_loopback(config.host) and config.tokens is None:
        if not config.allow_remote_without_auth:
            raise ValueError(
                f"--host {config.host}: binding beyond loopback needs auth (--tokens FILE;"
                " TLS alone does not say who is calling); pass --allow-remote-without-auth"
                " to do it anyway"
            )
        log.warning("serving beyond loopback WITHOUT auth (--allow-remote-without-auth)",
                    extra={"host": config.host})
    elif not _is_loopback(config.host) and config.tls_cert is None:
        log.warning("tokens travel in plaintext: serve with --tls-cert/--tls-key unless a"
                    " TLS proxy fronts this gateway", extra={"host": config.host})
    if config.dashboard_port is not None and not _is_loopback(config.dashboard_host):
        if config.tokens is None and not config.allow_remote_without_auth:
            raise ValueError(
                f"--dashboard-host {config.dashboard_host}: serving the dashboard beyond"
                " loopback needs auth (--tokens FILE); pass --allow-remote-without-auth to do"
                " it anyway, or --no-dashboard"
            )


def _server_credentials(config: GatewayConfig) -> grpc.ServerCredentials:
    def read(path: str) -> bytes:
        return Path(path).expanduser().read_bytes()

    client_ca = read(config.tls_client_ca) if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(read(config.tls_key), read(config.tls_cert))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class Gateway:
    """One running gateway. `await start()`, then `address`; `await stop()` to end it."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.address: str | None = None
        self.metrics_port: int | None = None
        self.dashboard_port: int | None = None
        self._dashboard = None
        self.metrics = Metrics()
        self._store = None
        self._ray: RayCluster | None = None
        self._scheduler: Scheduler | None = None
        self._pool: SolverPool | None = None
        self.jobs: JobManager | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()

    async def start(self) -> None:
        config = self.config
        check_config(config)
        try:
            await self._start(config)
        except BaseException:
            await self.stop(grace_s=0)
            raise

    async def _start(self, config: GatewayConfig) -> None:
        self._store = open_store(config.db)
        # The head's record lives beside the store: the next gateway on this store ends a head
        # that a killed gateway left behind before starting its own.
        owner_file = None if config.db in ("memory", ":memory:") else Path(
            f"{Path(config.db).resolve()}.ray-head")
        self._ray = RayCluster(config.ray_address, num_cpus=config.num_cpus,
                               owner_file=owner_file)
        self._ray.launch()  # from this (the loop's) thread, which outlives the head
        await asyncio.to_thread(self._ray.connect)
        import ray  # after the cluster is up; ray.cluster_resources needs a connection

        workers = config.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._scheduler = Scheduler(workers)
        # The gateway checks batch objectives itself; their first build imports torch's compile
        # machinery (seconds), paid here beside the workers' warm-up instead of by a caller.
        from workers.batch_runner import warm_up_batch

        gateway_warm = asyncio.create_task(asyncio.to_thread(warm_up_batch))
        pool_size = workers if config.solver_processes is None else config.solver_processes
        pool_start = asyncio.create_task(self._start_pool(pool_size)) if pool_size > 0 else None
        warm_s = await self._scheduler.start()
        await gateway_warm
        if pool_start is not None:
            self._pool = await pool_start
        log.info(
            "ray ready",
            extra={"ray_address": self._ray.address, "embedded": self._ray.embedded,
                   "workers": workers, "warm_up_s": round(warm_s, 3)},
        )
        self.jobs = JobManager(
            self._store, self._scheduler, self.metrics, config.limits,
            trusted=config.trust_code, cancel_grace_s=config.cancel_grace_s,
            checkpoint_interval_s=config.checkpoint_interval_s,
            max_worker_restarts=config.max_worker_restarts, pool=self._pool,
        )
        settled = await self.jobs.start()
        if settled:
            log.warning("settled jobs of a previous gateway", extra={"jobs": settled})

        pool = self._pool
        self.metrics.queue_depth.set_function(
            lambda: self._scheduler.queue_depth + (pool.queue_depth if pool else 0))
        self.metrics.running_jobs.set_function(
            lambda: self._scheduler.running + (pool.running if pool else 0))

        limit = config.limits.max_message_bytes
        # Metrics first, so that refused calls are counted with their code.
        interceptors: list[grpc.aio.ServerInterceptor] = [MetricsInterceptor(self.metrics)]
        tokens = TokenStore(config.tokens) if config.tokens is not None else None
        if tokens is not None:
            interceptors.append(AuthInterceptor(tokens))
        interceptors.append(RequestParsingInterceptor())  # innermost: after auth
        self._server = grpc.aio.server(
            interceptors=interceptors,
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
                # Callback evaluations may take minutes: let clients ping an idle stream
                # (every 10 s at the most) and ping them, so a dead peer is noticed.
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.http2.max_pings_without_data", 0),
            ],
        )
        callbacks = CallbackJobs(self.jobs, config.limits, config.callbacks)
        training = TrainingJobs(
            self.jobs, config.limits, self._artifacts_dir(), trusted=config.trust_code,
            data_root=None if config.data_root is None
            else str(Path(config.data_root).expanduser()),
        )
        servicer = OptimizerServicer(
            self.jobs, config.limits, trusted=config.trust_code, callbacks=callbacks,
            training=training,
        )
        pb_grpc.add_OptimizerServicer_to_server(servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server
        )
        target = f"{config.host}:{config.port}"
        if config.tls_cert is not None:
            port = self._server.add_secure_port(target, _server_credentials(config))
        else:
            port = self._server.add_insecure_port(target)
        if port == 0:
            raise OSError(f"could not bind {config.host}:{config.port}")
        await self._server.start()
        self.address = f"{config.host}:{port}"
        if config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(config.metrics_port, host=config.metrics_host)
        if config.dashboard_port is not None:
            from service.dashboard import Dashboard, DashboardSettings  # web stack: only if on

            self._dashboard = Dashboard(self.jobs, self._store, DashboardSettings(
                host=config.dashboard_host, port=config.dashboard_port,
                tls_cert=config.tls_cert, tls_key=config.tls_key,
            ), tokens=tokens)
            try:
                self.dashboard_port = await self._dashboard.start()
            except OSError as exc:
                if not config.dashboard_best_effort:
                    raise
                self._dashboard = None
                log.warning("serving without the dashboard: its default port is taken (pass"
                            " --dashboard-port N, or 0 for any free port)",
                            extra={"error": str(exc)})
        serving = health_pb2.HealthCheckResponse.SERVING
        await self._health.set("", serving)
        await self._health.set(SERVICE_NAME, serving)
        log.info(
            "serving",
            extra={"address": self.address, "metrics_port": self.metrics_port,
                   "dashboard": self.dashboard_url,
                   "db": config.db, "pid": os.getpid(), "auth": config.tokens is not None,
                   "tls": "mutual" if config.tls_client_ca else config.tls_cert is not None},
        )

    async def _start_pool(self, size: int) -> SolverPool | None:
        """The small-solve pool, warm; None (small solves start on Ray) if it cannot start."""
        pool = SolverPool(size)
        try:
            await pool.start()
        except Exception as exc:
            log.warning("the gateway's solver pool did not start; small solves go to Ray",
                        extra={"reason": f"{type(exc).__name__}: {exc}"})
            await pool.stop()
            return None
        return pool

    @property
    def dashboard_url(self) -> str | None:
        return self._dashboard.url if self._dashboard is not None else None

    def _artifacts_dir(self) -> str:
        if self.config.artifacts_dir:
            return self.config.artifacts_dir
        if self.config.db in ("memory", ":memory:"):
            import tempfile

            return tempfile.mkdtemp(prefix="secant-artifacts-")
        return str(Path(self.config.db).resolve().parent / "secant-artifacts")

    async def stop(self, grace_s: float | None = None) -> None:
        grace = self.config.grace_s if grace_s is None else grace_s
        await self._health.enter_graceful_shutdown()
        if self._dashboard is not None:  # first: its event streams end before the jobs do
            await self._dashboard.stop()
            self._dashboard = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self.jobs is not None:
            await self.jobs.stop()
            self.jobs = None
        if self._pool is not None:
            await self._pool.stop()
            self._pool = None
        if self._scheduler is not None:
            await self._scheduler.stop()
            self._scheduler = None
        if self._ray is not None:
            await asyncio.to_thread(self._ray.stop)
            self._ray = None
        if self._store is not None:
            self._store.close()
            self._store = None
        self.metrics.stop()
        log.info("stopped")
