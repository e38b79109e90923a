"""Runs the dashboard's ASGI app under uvicorn as a task of the gateway's own event loop, on a
socket the gateway binds itself (so port 0 works and a taken port is a plain OSError).

Cost when nobody looks: uvicorn's 0.1 s housekeeping tick and one listening socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass

import uvicorn

from service.auth import TokenStore
from service.dashboard._app import create_app
from service.jobs import JobManager
from service.store import JobStore

log = logging.getLogger("secant.dashboard")


@dataclass(frozen=True)
class DashboardSettings:
    host: str = "127.0.0.1"
    port: int = 9465  # 0: a free port
    # TLS from the gateway's PEM files: the dashboard then serves HTTPS with the same cert.
    tls_cert: str | None = None
    tls_key: str | None = None
    # How often an open jobs table re-reads its page of jobs (one store query per viewer).
    list_poll_s: float = 1.0
    # Open event streams get this long to end on shutdown before they are cut.
    shutdown_grace_s: float = 1.0
    max_connections: int = 1024


class _EmbeddedServer(uvicorn.Server):
    """uvicorn's server minus its signal handlers: the gateway owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class Dashboard:
    """The dashboard of one gateway: `port = await start()`, then `await stop()`."""

    def __init__(
        self,
        jobs: JobManager,
        store: JobStore,
        settings: DashboardSettings,
        *,
        tokens: TokenStore | None = None,
    ) -> None:
        self.settings = settings
        self.port: int | None = None
        self._app = create_app(
            jobs, store, tokens=tokens, secure=settings.tls_cert is not None,
            loopback_only=_is_loopback(settings.host), list_poll_s=settings.list_poll_s,
        )
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str | None:
        if self.port is None:
            return None
        scheme = "https" if self.settings.tls_cert else "http"
        host = self.settings.host
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{self.port}/"

    async def start(self) -> int:
        settings = self.settings
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((settings.host.strip("[]"), settings.port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise OSError(f"dashboard: could not bind {settings.host}:{settings.port}: "
                          f"{exc.strerror or exc}") from exc
        self._socket = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            lifespan="off",
            log_config=None,  # the gateway's structured logging stays as it is
            log_level="warning",
            access_log=False,
            ws="none",
            ssl_certfile=settings.tls_cert,
            ssl_keyfile=settings.tls_key,
            timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)),
            # open pages hold an event stream each; past this, new connections get a 503
            limit_concurrency=settings.max_connections,
            server_header=False,
        )
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]),
                                         name="secant-dashboard")
        # Started (or failed) within a few loop turns; a failure must not pass unnoticed.
        for _ in range(200):
            if self._server.started or self._task.done():
                break
            await asyncio.sleep(0.01)
        if self._task.done():
            error = self._task.exception()
            self._task = None
            raise OSError(f"dashboard: uvicorn did not start ({error!r})")
        log.info("dashboard serving", extra={"url": self.url})
        return self.port

    async def stop(self) -> None:
        self._app.state.closing.set()  # event streams end themselves
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(self._task),
                                       self.settings.shutdown_grace_s + 5.0)
            except Exception:  # stuck or failed: cut it
                self._task.cancel()
                with contextlib.suppress(BaseException):
                    await self._task
        self._task = self._server = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
