"""Running solves on Ray: the cluster connection and a pool of warm solver processes.

`RayCluster` either starts an embedded head that listens on 127.0.0.1 only, or joins an existing
cluster (`--ray-address`). Two things keep the embedded head on loopback (measured with
`ss -ltnp`, see FACTS.md): `--node-ip-address=127.0.0.1` and
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, which makes Ray resolve its own node address to the
loopback one, so every component (GCS, raylet, agents, workers) binds there instead of on
all interfaces. Every port Ray would otherwise take at a fixed default is picked free, so two
gateways (or a gateway and a test session) on one machine do not collide. A new cluster uses
Ray's token auth; service.ray_env generates the token and puts it, and the loopback setting, in
the environment before ray is imported (Ray reads both once, at import), and the head inherits
it: nothing is read from or written to ~/.ray.

`Scheduler` keeps one warm `SolverWorker` actor per CPU it was given (torch imported, a tiny
solve already run: Ray's first task costs 350-400 ms and a torch import about a second, which a
small solve must not pay). A job leases an idle worker (queueing when none is free) and streams
its events from the worker's `run` generator; CUDA jobs get a fresh actor holding `num_gpus=1`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import ray

from service.ray_env import loopback_ray_env_ready
from workers.runner import WARM_UP_SPEC, FailureEvent, RunSpec, SolverWorker, WorkerEvent

log = logging.getLogger("secant.scheduler")

_LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_LOOPBACK, 0))
        return sock.getsockname()[1]


def _tail(path: Path | None, limit: int = 4000) -> str:
    if path is None:
        return ""
    try:
        return path.read_bytes()[-limit:].decode(errors="replace").strip()
    except OSError:
        return ""


def _wait_for_port(port: int, deadline: float, process: subprocess.Popen,
                   output: Path | None = None) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with code {process.returncode}:\n"
                               f"{_tail(output)}")
        with socket.socket() as sock:
            if sock.connect_ex((_LOOPBACK, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"the Ray head did not open port {port} in time")


def _stop_when_parent_dies() -> None:
    """In the forked head: ask Linux for SIGTERM when the gateway dies, so a killed gateway
    does not leave a Ray cluster behind (`ray start --block` stops its processes on SIGTERM)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_is_ray_head(pgid: int, temp_dir: str) -> bool:
    """Only a group whose leader still runs `ray start` on the recorded temp dir is ours to
    end (a pid the system has since given to something else is left alone)."""
    try:
        command = Path(f"/proc/{pgid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # the leader is gone but members remain: they are the head's stragglers
    return f"--temp-dir={temp_dir}".encode() in command


class RayCluster:
    """The gateway's Ray: an embedded loopback-only head (default) or an existing cluster.

    Starting the embedded head costs about 3 s and 400 MB; `stop` ends every process it began.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: int | None = None,
        num_gpus: int | None = None,
        startup_timeout_s: float = 60.0,
        owner_file: Path | None = None,
        start_attempts: int = 4,
    ) -> None:
        self.requested_address = address
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.startup_timeout_s = startup_timeout_s
        # Where this gateway records its head (pid and temp dir), so that the next gateway on
        # the same store can end what a killed one left behind before starting its own.
        self.owner_file = owner_file
        self.start_attempts = max(1, start_attempts)
        self.address: str | None = address
        self._head: subprocess.Popen | None = None
        self._head_port: int | None = None
        self._temp_dir: str | None = None
        self._head_log: Path | None = None
        self._initialized_ray = False

    @property
    def embedded(self) -> bool:
        return self._head is not None

    def launch(self) -> None:
        """Starts the embedded head's process (quick; does not wait for it). Call it from a
        thread that lives as long as the cluster: the head is told to stop when it dies."""
        if self.requested_address is None and self._head is None:
            self._launch_head()

    def connect(self) -> None:
        """Blocking (seconds): waits for the head and joins it; run it off the event loop."""
        self.wait_until_up()
        if ray.is_initialized():
            # Another gateway in this process (tests) already joined: share its connection.
            return
        ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False)
        self._initialized_ray = True

    def wait_until_up(self) -> None:
        """Waits for an embedded head to open its port. A head that exits while starting is
        started again with fresh ports (after a short, growing pause) up to `start_attempts`
        times, each failure logged with Ray's own output; then RuntimeError with the last.
        Retries fork from the calling thread (a thread of the loop's executor, which lives as
        long as the gateway), so the head's parent-death signal still follows the gateway."""
        attempt = 1
        while self._head is not None and self._head_port is not None:
            try:
                _wait_for_port(
                    self._head_port, time.monotonic() + self.startup_timeout_s, self._head,
                    self._head_log,
                )
                break
            except RuntimeError as exc:
                log.warning("the embedded Ray head did not start (attempt %d of %d): %s",
                            attempt, self.start_attempts, exc)
                self._end_head()
                if attempt >= self.start_attempts:
                    raise RuntimeError(
                        f"the embedded Ray head failed to start {attempt} times; last: {exc}"
                    ) from None
                time.sleep(0.5 * 2 ** (attempt - 1))
                attempt += 1
                self._launch_head()

    def start(self) -> None:
        """launch() then connect(), blocking."""
        self.launch()
        self.connect()

    def _end_leftovers(self) -> None:
        """Ends the embedded head a previous gateway on this store recorded and did not stop
        (it was killed): its processes may still hold ports and CPU while they exit."""
        if self.owner_file is None:
            return
        try:
            record = json.loads(self.owner_file.read_text())
            pgid, temp_dir = int(record["pgid"]), str(record["temp_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        if _group_alive(pgid) and _group_is_ray_head(pgid, temp_dir):
            log.warning("ending the Ray head a previous gateway left behind (group %d)", pgid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
            deadline = time.monotonic() + 5.0
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            deadline = time.monotonic() + 5.0
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
        if temp_dir.startswith(tempfile.gettempdir()) and Path(temp_dir).name.startswith(
                "secant-ray-"):
            shutil.rmtree(temp_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.owner_file.unlink()

    def _record_owner(self) -> None:
        if self.owner_file is None or self._head is None:
            return
        with contextlib.suppress(OSError):
            self.owner_file.write_text(json.dumps(
                {"pgid": self._head.pid, "temp_dir": self._temp_dir, "gateway_pid": os.getpid()}
            ))

    def _launch_head(self) -> None:
        # Ray's temp dir holds unix sockets whose paths must stay short (108 bytes).
        if not loopback_ray_env_ready():
            raise RuntimeError(
                "an embedded Ray needs service.ray_env.prepare_loopback_ray_env() to run before"
                " ray is imported (secant serve does this)"
            )
        self._end_leftovers()
        self._temp_dir = tempfile.mkdtemp(prefix="secant-ray-", dir="/tmp")
        env = dict(os.environ)  # the head and its workers share our token and loopback setting
        gcs_port = free_port()
        command = self._head_command(gcs_port)
        log.info("starting an embedded Ray head on %s:%d", _LOOPBACK, gcs_port)
        self._head_log = Path(self._temp_dir) / "ray-start.log"
        with self._head_log.open("wb") as output:  # kept: a failed start says why
            self._head = subprocess.Popen(
                command,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() ends all of it, only it
                preexec_fn=_stop_when_parent_dies,
            )
        self._head_port = gcs_port
        self.address = f"{_LOOPBACK}:{gcs_port}"
        self._record_owner()

    def _head_command(self, gcs_port: int) -> list[str]:
        command = [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--head",
            "--block",
            f"--node-ip-address={_LOOPBACK}",
            f"--port={gcs_port}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--dashboard-port={free_port()}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={self._temp_dir}",
        ]
        if self.num_cpus is not None:
            command.append(f"--num-cpus={self.num_cpus}")
        if self.num_gpus is not None:
            command.append(f"--num-gpus={self.num_gpus}")
        return command

    def stop(self) -> None:
        """Blocking. Disconnects if we connected, and ends the embedded head if we started it."""
        if self._initialized_ray:
            with contextlib.suppress(Exception):
                ray.shutdown()
            self._initialized_ray = False
        self._end_head()
        with contextlib.suppress(OSError):
            if self.owner_file is not None:
                self.owner_file.unlink()

    def _end_head(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            # `ray start --block` stops the processes it started when it gets SIGTERM.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(timeout=2)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(head.pid, signal.SIGKILL)
                head.wait(timeout=2)
            # Stragglers of the head's session (workers re-parented away) share its group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(head.pid, signal.SIGKILL)
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None


@dataclass
class _Worker:
    actor: ray.actor.ActorHandle
    pooled: bool  # False: a one-job actor (CUDA), killed when the job ends


class WorkerLost(RuntimeError):
    """The worker process running a job died (killed, OOM, node lost); the job can resume."""


class NoCapacity(ValueError):
    """The cluster cannot ever run this job (e.g. CUDA asked of a cluster without GPUs)."""


class Scheduler:
    """A pool of warm solver actors, one job at a time each; jobs wait for a free one."""

    def __init__(self, workers: int, *, torch_threads: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers: need at least 1, got {workers}")
        self.size = workers
        self.torch_threads = torch_threads
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._all: list[_Worker] = []
        self._waiting = 0
        self._running = 0
        self._gpus = 0.0
        self._stopped = False
        self._cpu_actor_class = ray.remote(num_cpus=torch_threads, max_concurrency=4)(
            SolverWorker
        )

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for a worker."""
        return self._waiting

    @property
    def running(self) -> int:
        return self._running

    async def start(self) -> float:
        """Creates and warms the pool; returns the warm-up time in seconds."""
        started = time.perf_counter()
        self._gpus = float(ray.cluster_resources().get("GPU", 0.0))
        workers = [self._new_cpu_worker() for _ in range(self.size)]
        await asyncio.gather(*(w.actor.warm_up.remote() for w in workers))
        # The first streaming call on an actor costs more than a plain one: pay it now too.
        await asyncio.gather(*(self._drain(w, WARM_UP_SPEC) for w in workers))
        for worker in workers:
            self._all.append(worker)
            self._idle.put_nowait(worker)
        return time.perf_counter() - started

    async def _drain(self, worker: _Worker, spec: RunSpec) -> None:
        async for _batch in self.stream(worker, spec):
            pass

    def _new_cpu_worker(self) -> _Worker:
        return _Worker(self._cpu_actor_class.remote(self.torch_threads), pooled=True)

    def check_capacity(self, device: str) -> None:
        if device == "cuda" and self._gpus < 1:
            raise NoCapacity("problem.device: 'cuda' was asked for, but the Ray cluster has no GPU")

    @contextlib.asynccontextmanager
    async def lease(self, device: str = "cpu") -> AsyncIterator[_Worker]:
        """Waits for a worker for one job (this wait is the queue) and gives it back after."""
        self._waiting += 1
        try:
            if device == "cuda":
                actor_class = ray.remote(num_cpus=1, num_gpus=1, max_concurrency=4)(SolverWorker)
                worker = _Worker(actor_class.remote(self.torch_threads), pooled=False)
                await worker.actor.ping.remote()  # returns once Ray has placed it on a GPU
            else:
                worker = await self._idle.get()
        finally:
            self._waiting -= 1
        self._running += 1
        healthy = True
        try:
            yield worker
        except (ray.exceptions.RayActorError, WorkerLost, asyncio.CancelledError):
            # The process died, or we walked away from a solve it may still be running
            # (a cancel it did not honour in time): either way it must not take another job.
            healthy = False
            raise
        finally:
            self._running -= 1
            if not worker.pooled:
                ray.kill(worker.actor)
            elif healthy:
                self._idle.put_nowait(worker)
            else:
                self._replace(worker)

    async def worker_pid(self, worker: _Worker) -> int:
        """The OS process of a worker (fault-injection tests kill it)."""
        return await worker.actor.pid.remote()

    def _replace(self, worker: _Worker) -> None:
        with contextlib.suppress(Exception):
            ray.kill(worker.actor)
        with contextlib.suppress(ValueError):
            self._all.remove(worker)
        if self._stopped:
            return
        replacement = self._new_cpu_worker()  # starts (imports torch) in the background
        self._all.append(replacement)
        self._idle.put_nowait(replacement)

    async def stream(self, worker: _Worker, spec: RunSpec) -> AsyncIterator[list[WorkerEvent]]:
        """The job's events in batches, through Ray's streaming generator (the one channel)."""
        generator = worker.actor.run.options(num_returns="streaming").remote(spec)
        try:
            async for ref in generator:
                yield await ref
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                ray.exceptions.ObjectLostError) as exc:
            raise WorkerLost(f"the worker running job {spec.job_id} died: "
                             f"{type(exc).__name__}") from exc
        except ray.exceptions.RayTaskError as exc:
            log.error("job %s: worker task failed: %s", spec.job_id, exc)
            yield [FailureEvent("INTERNAL", "the solver worker failed")]

    async def run_quick(self, worker: _Worker, spec: RunSpec, budget_s: float) -> list[WorkerEvent]:
        """The job's events from one plain actor call (SolverWorker.run_quick): all of them,
        or those of its first `budget_s` seconds ending with a CheckpointEvent to go on from
        with `stream`."""
        try:
            return await worker.actor.run_quick.remote(spec, budget_s)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                ray.exceptions.ObjectLostError) as exc:
            raise WorkerLost(f"the worker running job {spec.job_id} died: "
                             f"{type(exc).__name__}") from exc
        except ray.exceptions.RayTaskError as exc:
            log.error("job %s: worker task failed: %s", spec.job_id, exc)
            return [FailureEvent("INTERNAL", "the solver worker failed")]

    async def cancel(self, worker: _Worker, job_id: str) -> None:
        await worker.actor.cancel.remote(job_id)

    async def stop(self) -> None:
        self._stopped = True
        for worker in self._all:
            with contextlib.suppress(Exception):
                ray.kill(worker.actor)
        self._all.clear()
