"""Small solves in the gateway's own solver processes, beside the Ray workers.

A small job (one problem, CPU, at most SMALL_N_MAX variables, an expression or residual with
little data) starts with one budgeted run: workers.runner.iter_solve with suspend_after_s, as
SolverWorker.run_quick does on Ray. In a pool process it costs a pipe round trip (about
0.1 ms) where a Ray actor call costs 1-2 ms of wall time and about 1.3 ms of the gateway's CPU,
and the solve runs in a plain single-threaded process instead of a threaded actor beside Ray's
own threads (README "Service" has the measurements, docs/decisions.md why it is allowed). A
solve still running when its budget is spent comes back as a checkpoint and goes on on Ray (a
lease and the streamed run) with the same iterates.

Processes: `size` of them (`python -m workers.pool_worker`, not forks of the gateway, which
runs gRPC and Ray threads), each importing the solver and running a warm-up solve before it
reports ready, each serving one job at a time over its stdin/stdout. A reader task per process
takes its replies off the event loop's pipe transport (no thread, no executor hop). A cancel is
a message the solver looks for before every evaluation. A process that dies is replaced, and
its job fails with WorkerLost (so it restarts, as on Ray). Caller code (torch.export,
cloudpickle) never runs here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import sys
from dataclasses import dataclass

from service.scheduler import WorkerLost
from workers.pool_worker import frame
from workers.runner import RunSpec, WorkerEvent

log = logging.getLogger("secant.pool")

# Data a pool job may carry: its spec goes down a pipe the event loop writes to.
MAX_POOL_DATA_BYTES = 64 * 1024
_HEADER = struct.Struct("<I")


@dataclass(eq=False)
class Slot:
    """One pool process and the job it runs (a job's `worker` while it runs here)."""

    process: asyncio.subprocess.Process
    job_id: str | None = None
    reply: asyncio.Future | None = None
    alive: bool = True
    reader: asyncio.Task | None = None


class SolverPool:
    """`size` warm solver processes for small solves; see the module docstring."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size: need at least 1 process, got {size}")
        self.size = size
        self._slots: list[Slot] = []
        self._idle: asyncio.Queue[Slot] = asyncio.Queue()
        self._waiting = 0
        self._running = 0
        self._stopped = False
        self._background: set[asyncio.Task] = set()

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return self._running

    @staticmethod
    def accepts(spec) -> bool:
        """Whether a job's first run may go to the pool: a single solve of an expression or
        residual on the CPU, small enough for the numpy path, with little data."""
        from service.validation import SolveSpec
        from workers.solvers import METHODS, SMALL_N_MAX

        return (
            isinstance(spec, SolveSpec)
            and spec.objective_kind in ("expression", "residual")
            and spec.device == "cpu"
            and spec.n <= SMALL_N_MAX
            and spec.method in METHODS
            and sum(len(t.raw) for t in spec.data) <= MAX_POOL_DATA_BYTES
        )

    # -- processes -------------------------------------------------------------------------

    async def start(self, timeout_s: float = 120.0) -> None:
        """Starts the processes and waits until every one has warmed up."""
        slots = await asyncio.wait_for(
            asyncio.gather(*(self._start_one() for _ in range(self.size))), timeout_s
        )
        for slot in slots:
            self._idle.put_nowait(slot)

    async def _start_one(self) -> Slot:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "workers.pool_worker",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C at the gateway's terminal is the gateway's
        )
        slot = Slot(process)
        try:
            message = await self._read(slot)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            raise
        if message != ("ready",):
            raise RuntimeError(f"a solver process said {message!r} instead of ready")
        slot.reader = asyncio.create_task(self._replies(slot), name="secant-pool-reader")
        self._slots.append(slot)
        return slot

    @staticmethod
    async def _read(slot: Slot):
        import pickle

        header = await slot.process.stdout.readexactly(_HEADER.size)
        (size,) = _HEADER.unpack(header)
        return pickle.loads(await slot.process.stdout.readexactly(size))

    async def _replies(self, slot: Slot) -> None:
        try:
            while True:
                message = await self._read(slot)
                reply, slot.reply, slot.job_id = slot.reply, None, None
                if message[0] == "events" and reply is not None and not reply.done():
                    reply.set_result(message[2])
                if slot.alive and reply is not None and reply.cancelled():
                    self._idle.put_nowait(slot)  # its job's caller left: free again now
        except asyncio.CancelledError:
            raise
        except Exception:  # EOF, a broken pipe, garbage: the process is gone or useless
            self._lost(slot)

    def _lost(self, slot: Slot) -> None:
        """The process died (or its pipe broke): fail its job, replace it."""
        if not slot.alive:
            return
        slot.alive = False
        with contextlib.suppress(ProcessLookupError):
            slot.process.kill()
        if slot.reply is not None and not slot.reply.done():
            slot.reply.set_exception(WorkerLost(
                f"the gateway's solver process running job {slot.job_id} died"
                f" (exit code {slot.process.returncode})"))
        with contextlib.suppress(ValueError):
            self._slots.remove(slot)
        if self._stopped:
            return
        log.warning("a solver process died; starting another", extra={"job_id": slot.job_id})
        task = asyncio.create_task(self._replace())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _replace(self) -> None:
        try:
            slot = await self._start_one()
        except Exception:
            log.exception("a replacement solver process failed to start")
            return
        self._idle.put_nowait(slot)

    # -- jobs ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def slot(self):
        """Waits for an idle process (this wait is the pool's queue) and gives it back."""
        self._waiting += 1
        try:
            while True:
                slot = await self._idle.get()
                if slot.alive:
                    break
        finally:
            self._waiting -= 1
        self._running += 1
        try:
            yield slot
        finally:
            self._running -= 1
            # A job whose caller left mid-run keeps its process until the reply (_replies).
            if slot.alive and slot.reply is None:
                self._idle.put_nowait(slot)

    async def run(self, slot: Slot, spec: RunSpec, budget_s: float) -> list[WorkerEvent]:
        """The job's events from one budgeted run on `slot` (see the module docstring)."""
        slot.job_id = spec.job_id
        slot.reply = reply = asyncio.get_running_loop().create_future()
        try:
            slot.process.stdin.write(frame(("job", spec.job_id, spec, budget_s)))
        except (OSError, RuntimeError):
            self._lost(slot)
        return await reply

    @staticmethod
    def cancel(slot: Slot, job_id: str) -> None:
        """Asks the solve running on `slot` to stop at its next evaluation."""
        if slot.alive and slot.job_id == job_id:
            with contextlib.suppress(OSError, RuntimeError):
                slot.process.stdin.write(frame(("cancel", job_id)))

    async def stop(self) -> None:
        self._stopped = True
        slots, self._slots = list(self._slots), []
        for slot in slots:
            if slot.reader is not None:
                slot.reader.cancel()
            with contextlib.suppress(OSError, RuntimeError):
                slot.process.stdin.write(frame(("stop",)))
                slot.process.stdin.close()
        for slot in slots:
            try:
                await asyncio.wait_for(slot.process.wait(), 3.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.kill()
                await slot.process.wait()
