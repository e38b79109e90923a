"""The job lifecycle: queued -> running -> succeeded | failed | cancelled.

`JobManager` owns every live job of this gateway. A job is committed to the store (with its
`accepted` event, seq 1) before its id is returned. Its task then leases a warm worker from the
Scheduler (the wait is the queue), streams the worker's events through Ray's streaming
generator (the one channel), numbers them, appends them to the job's in-memory log and queues
them for the store. Events reach the store in batched transactions (every `flush_interval_s`),
so hundreds of concurrent solves cost a few commits a second, and watchers get each event only
once it is stored: a gateway that dies and comes back never shows a watcher a sequence number
twice or skips one. A job's final event is flushed at once. New jobs join the same batched
write (a group commit, fsynced): concurrent submits and results share one transaction.

Small solves (one CPU problem of at most SMALL_N_MAX variables) do not stream: their first
QUICK_BUDGET_S of solving CPU time is one budgeted run, in the gateway's own solver processes
when it has them and the objective is an expression (service.solver_pool), else one plain Ray
call (SolverWorker.run_quick); its events come back together. A solve that outlasts the
budget comes back with a checkpoint and goes on streaming on Ray from it, with the iterates an
uninterrupted run has. Most small solves end inside the budget: one round trip, one store write
for the end.

Durability (rescheduling from checkpoints, not detached actors: the embedded Ray dies with its
gateway, and a solve is cheap to restart from its state): a running solve sends its solver
state every `checkpoint_interval_s`; it is stored with the events. When the worker process
dies the job goes back to the queue and resumes from that checkpoint on another worker; when
the gateway itself was killed, the next one finds the unfinished solves in the store and
resumes them the same way. Resumed solves give the iterates of an uninterrupted run.

Watch replays the stored log of a job (from memory while it is live, from the store after),
then follows it. Cancel asks the worker to stop (the solver checks before every evaluation)
and, should the worker not answer within `cancel_grace_s`, ends the job itself with the last
iterate it saw and replaces the worker process.

A vectorized batch (Problem.batch) is one such job, Job.n its members' n: its members are split
into contiguous chunks (service.batch_jobs plans them), each chunk leases its own worker and
streams side by side with the others, and the gateway merges the chunks' progress into one
iterate (counts and quantiles) and their results into one Result. Every chunk checkpoints on
its own; the job's checkpoint is all of them in one blob, and a lost worker costs only its
chunk a restart from that chunk's state. A cancel goes to every chunk's worker; each answers
with its members' last iterates (CANCELLED where still running).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from secant.v1 import optimizer_pb2 as pb
from service import batch_jobs
from service.auth import Caller, visible
from service.batch_jobs import BatchRun, Chunk
from service.errors import JobNotFound, LimitExceeded
from service.metrics import Metrics
from service.scheduler import Scheduler, WorkerLost
from service.solver_pool import Slot as PoolSlot
from service.solver_pool import SolverPool
from service.store import TERMINAL_STATES, JobPage, JobStore, NewJob
from service.validation import SOLVE_STATUS as _STATUS
from service.validation import (
    BatchSolveSpec,
    Limits,
    SolveSpec,
    encode_tensor,
    validate_problem,
)
from workers.batch_runner import BatchProgressEvent, BatchResultEvent
from workers.runner import CheckpointEvent, FailureEvent, IterateEvent, ResultEvent
from workers.solvers import METHODS, SMALL_N_MAX, state_from_bytes

log = logging.getLogger("secant.jobs")


def _now(timestamp) -> None:
    # Timestamp.FromNanoseconds, without its checks (a few us per event on the hot path)
    timestamp.seconds, timestamp.nanos = divmod(time.time_ns(), 1_000_000_000)


def _copy(message):
    clone = type(message)()
    clone.CopyFrom(message)
    return clone


def _dimensions(spec) -> int:
    """What a job counts against max_dimension_per_caller: n, or B * n for a batch."""
    return getattr(spec, "quota_dimensions", spec.n)


@dataclass(eq=False)
class _LiveJob:
    job: pb.Job
    spec: SolveSpec
    submitted: float  # monotonic
    events: list[pb.JobEvent]  # the whole log, seq 1.. (events[i].seq == i + 1)
    watchers: set[asyncio.Queue] = field(default_factory=set)
    task: asyncio.Task | None = None
    worker: object | None = None
    cancel_requested: bool = False
    last_iterate: pb.Iterate | None = None
    last_x: pb.Tensor | None = None
    # Callback jobs: what to do on CancelJob (the solver runs in the gateway, not on Ray).
    on_cancel: Callable[[], None] | None = None
    # Durability: the newest solver checkpoint the worker sent, and how often the job's
    # worker was lost and the job resumed from it.
    checkpoint: bytes | None = None
    checkpoint_nit: int = 0
    restarts: int = 0
    # Vectorized batch jobs: the chunks and their progress (service.batch_jobs).
    batch: BatchRun | None = None
    # Watchers only ever see events already in the store (events[:flushed_seq]), so a
    # gateway that dies and comes back never shows them a sequence number twice.
    flushed_seq: int = 0


class _ChunkFailed(Exception):
    """A batch chunk's worker reported a failure (code, message for the caller)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code, self.message = code, message


BATCH_ITERATE_INTERVAL_S = 0.02
# Small solves start with one budgeted run of at most this much solving CPU time (then stream
# on from its checkpoint): no streaming call's start and end (about 1 ms on Ray), and events
# no later than a stream's first batch would bring them (20 ms).
QUICK_BUDGET_S = 0.02


def _quick(spec) -> bool:
    """A job whose worker run starts as one plain call (SolverWorker.run_quick): a single CPU
    solve of at most SMALL_N_MAX variables (the numpy path's), whose checkpoint, should it
    outlast the budget, is small (2mn numbers for L-BFGS, n^2 for the dense methods: at most
    8 MB)."""
    return (
        isinstance(spec, SolveSpec)
        and spec.device == "cpu"
        and spec.n <= SMALL_N_MAX
        and spec.method in METHODS
    )


class JobManager:
    def __init__(
        self,
        store: JobStore,
        scheduler: Scheduler,
        metrics: Metrics,
        limits: Limits,
        *,
        trusted: bool = False,
        flush_interval_s: float = 0.02,
        cancel_grace_s: float = 1.5,
        checkpoint_interval_s: float = 1.0,
        max_worker_restarts: int = 3,
        pool: SolverPool | None = None,
    ) -> None:
        # Small solves start in the gateway's own solver processes (service.solver_pool).
        self._pool = pool
        self._checkpoint_interval_s = checkpoint_interval_s
        self._max_worker_restarts = max_worker_restarts
        self._pending_checkpoints: dict[str, bytes] = {}
        self._store = store
        self._scheduler = scheduler
        self._metrics = metrics
        self._limits = limits
        self._trusted = trusted
        self._flush_interval_s = flush_interval_s
        self._cancel_grace_s = cancel_grace_s
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="secant-db")
        self._live: dict[str, _LiveJob] = {}
        self._reserved = 0
        # Per-caller quota use: owner -> [jobs, dimensions] queued or running (or reserved).
        self._usage: dict[str, list[int]] = {}
        self._pending_events: list[pb.JobEvent] = []
        self._dirty: dict[str, _LiveJob] = {}
        # New jobs waiting for the next store write (one transaction with the events queued
        # by then, fsynced: a group commit), each group with the future its submit awaits.
        self._pending_creates: list[tuple[list[NewJob], asyncio.Future]] = []
        self._flush_lock = asyncio.Lock()
        self._flusher: asyncio.Task | None = None
        self._stopping = False
        self._background: set[asyncio.Task] = set()

    async def _in_db(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(
            self._db, lambda: fn(*args, **kwargs)
        )

    # -- lifecycle of the manager ----------------------------------------------------------

    async def start(self) -> int:
        """Takes over the jobs a previous gateway left unfinished: solves are rescheduled from
        their last checkpoint (or from x0); callback and training jobs, whose other half died
        with that gateway, end FAILED. Returns how many jobs it settled or resumed."""
        unfinished = await self._in_db(self._store.unfinished_jobs)
        resumable = [job for job in unfinished if job.kind in ("", "solve")]
        settled = await self._in_db(
            self._fail_jobs, [job for job in unfinished if job not in resumable]
        )
        for job in resumable:
            await self._resume_after_restart(job)
        self._flusher = asyncio.create_task(self._flush_periodically(), name="secant-flusher")
        return settled + len(resumable)

    async def _resume_after_restart(self, job: pb.Job) -> None:
        problem_bytes, events, checkpoint = await self._in_db(
            lambda: (self._store.get_problem(job.job_id), self._store.events(job.job_id),
                     self._store.checkpoint(job.job_id))
        )
        try:
            problem = pb.Problem.FromString(problem_bytes or b"")
            spec = validate_problem(problem, self._limits, trusted=self._trusted)
        except Exception as exc:  # a problem this gateway no longer accepts
            await self._in_db(
                self._fail_jobs, [job], f"the gateway restarted and could not resume it: {exc}"
            )
            return
        # The stored log is complete up to the last flush; the record's last_seq says the same.
        job.last_seq = events[-1].seq if events else 0
        live = _LiveJob(job, spec, time.monotonic(), list(events), checkpoint=checkpoint,
                        flushed_seq=job.last_seq)
        if live.events:
            for event in reversed(live.events):
                if event.HasField("iterate"):
                    live.last_iterate = event.iterate
                    break
        self._usage.setdefault(job.owner, [0, 0])
        self._usage[job.owner][0] += 1
        self._usage[job.owner][1] += _dimensions(spec)
        self._live[job.job_id] = live
        job.state = pb.QUEUED
        if isinstance(spec, BatchSolveSpec):
            try:
                live.batch = batch_jobs.new_run(spec, self._limits, self._scheduler.size,
                                                checkpoint)
            except ValueError:  # unreadable: the members start again from x0
                live.batch = batch_jobs.new_run(spec, self._limits, self._scheduler.size)
            if not any(chunk.checkpoint for chunk in live.batch.chunks):
                live.checkpoint = checkpoint = None
            if checkpoint:
                live.checkpoint_nit = batch_jobs.checkpoint_iteration(live.batch)
        elif checkpoint:
            live.checkpoint_nit = state_from_bytes(checkpoint).nit
        if live.batch is not None and checkpoint:
            reason = f"the gateway restarted; {batch_jobs.resume_summary(live.batch)}"
        elif checkpoint:
            reason = f"the gateway restarted; resuming from iteration {live.checkpoint_nit}"
        else:
            reason = "the gateway restarted; starting again from x0"
        self._emit(live, state_change=pb.StateChange(state=pb.QUEUED, reason=reason))
        live.task = asyncio.create_task(self._run(live), name=f"job-{job.job_id}")
        log.warning("job resumed after a gateway restart", extra={"job_id": job.job_id})

    def _fail_jobs(self, jobs_to_fail: list[pb.Job], why: str = "") -> int:
        jobs, events = [], []
        for job in jobs_to_fail:
            was = pb.JobState.Name(job.state).lower()
            failure = pb.Failure(
                code="UNAVAILABLE",
                message=why or f"gateway restarted while the {job.kind or 'solve'} job was"
                f" {was}; its caller's side did not survive: submit it again",
            )
            job.state = pb.FAILED
            job.failure.CopyFrom(failure)
            _now(job.finished)
            job.last_seq += 1
            event = pb.JobEvent(job_id=job.job_id, seq=job.last_seq, failure=failure)
            _now(event.time)
            jobs.append(job)
            events.append(event)
            log.warning("job failed: gateway restarted", extra={"job_id": job.job_id})
        self._store.write(jobs, events)
        return len(jobs)

    async def stop(self) -> None:
        """Ends what is still live as FAILED (the gateway is going away) and flushes."""
        self._stopping = True
        for live in list(self._live.values()):
            if live.task is not None:
                live.task.cancel()
        tasks = [live.task for live in self._live.values() if live.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self._flush()
        self._db.shutdown(wait=True)

    # -- submitting ------------------------------------------------------------------------

    async def submit(
        self,
        spec: SolveSpec,
        problem: pb.Problem,
        *,
        idempotency_key: str = "",
        caller: Caller | None = None,
    ) -> pb.Job:
        jobs = await self._create(
            [(spec, problem)], batch_id="", idempotency_key=idempotency_key, caller=caller
        )
        return jobs[0]

    async def submit_batch(
        self, items: Sequence[tuple[SolveSpec, pb.Problem]], *, caller: Caller | None = None
    ) -> tuple[str, list[pb.Job]]:
        batch_id = uuid.uuid4().hex
        return batch_id, await self._create(items, batch_id=batch_id, caller=caller)

    def _reserve_quota(self, owner: str, items) -> tuple[int, int]:
        """Counts `items` against the owner's quotas, or raises LimitExceeded naming the
        quota and the numbers. Returns what was reserved, for `_release_quota`."""
        jobs, dims = len(items), sum(_dimensions(spec) for spec, _ in items)
        used = self._usage.setdefault(owner, [0, 0])
        who = f"caller {owner!r}" if owner else "this (unauthenticated) caller"
        limits = self._limits
        if used[0] + jobs > limits.max_jobs_per_caller:
            raise LimitExceeded(
                f"quota max_jobs_per_caller: {who} has {used[0]} jobs queued or running and"
                f" asked for {jobs} more; the quota is {limits.max_jobs_per_caller}"
                " (--max-jobs-per-caller)"
            )
        if used[1] + dims > limits.max_dimension_per_caller:
            raise LimitExceeded(
                f"quota max_dimension_per_caller: {who} has {used[1]} dimensions in queued or"
                f" running jobs and asked for {dims} more (a batch counts members x n); the"
                f" quota is {limits.max_dimension_per_caller} (--max-dimension-per-caller)"
            )
        used[0] += jobs
        used[1] += dims
        return jobs, dims

    def _release_quota(self, owner: str, jobs: int, dims: int) -> None:
        used = self._usage.get(owner)
        if used is None:
            return
        used[0] -= jobs
        used[1] -= dims
        if used[0] <= 0:
            del self._usage[owner]

    async def _create(
        self,
        items,
        *,
        batch_id: str,
        idempotency_key: str = "",
        kind: str = "solve",
        caller: Caller | None = None,
    ) -> list[pb.Job]:
        for spec, _ in items:
            self._scheduler.check_capacity(spec.device)
        if self._stopping:
            raise LimitExceeded("the gateway is shutting down")
        in_flight = len(self._live) + self._reserved
        if in_flight + len(items) > self._limits.max_concurrent_jobs:
            raise LimitExceeded(
                f"{in_flight} jobs are queued or running; this server takes at most"
                f" {self._limits.max_concurrent_jobs} (--max-concurrent-jobs)"
            )
        owner = caller.name if caller is not None else ""
        if idempotency_key and owner:
            # Keys are per caller: another caller's key must neither collide nor reveal a job.
            idempotency_key = f"{owner}/{idempotency_key}"
        self._reserve_quota(owner, items)
        # Released per job when it ends (_finish); the rest (idempotent retries, errors) below.
        unreleased = {index: _dimensions(spec) for index, (spec, _) in enumerate(items)}
        self._reserved += len(items)
        try:
            new_jobs, lives = [], []
            for spec, problem in items:
                job = pb.Job(
                    job_id=uuid.uuid4().hex,
                    owner=owner,
                    state=pb.QUEUED,
                    method=spec.method,
                    n=spec.n,
                    batch_id=batch_id,
                    labels=spec.labels,
                    kind=kind,
                    last_seq=1,
                )
                _now(job.created)
                accepted = pb.JobEvent(
                    job_id=job.job_id,
                    seq=1,
                    accepted=pb.Accepted(
                        state=pb.QUEUED, method=spec.method, n=spec.n, batch_id=batch_id,
                        members=getattr(spec, "members", 0),
                    ),
                )
                accepted.time.CopyFrom(job.created)
                new_jobs.append(
                    NewJob(job, problem.SerializeToString(), idempotency_key, [accepted])
                )
                # The accepted event is stored with the job (seq 1).
                live = _LiveJob(job, spec, time.monotonic(), [accepted], flushed_seq=1)
                if isinstance(spec, BatchSolveSpec):
                    live.batch = batch_jobs.new_run(spec, self._limits, self._scheduler.size)
                lives.append(live)
            created = asyncio.get_running_loop().create_future()
            self._pending_creates.append((new_jobs, created))
            await self._flush()
            stored = await created
        except BaseException:
            self._release_quota(owner, len(unreleased), sum(unreleased.values()))
            raise
        finally:
            self._reserved -= len(items)
        results = []
        for index, (live, job) in enumerate(zip(lives, stored, strict=True)):
            if job.job_id != live.job.job_id:  # an idempotent retry: the first job stands
                self._release_quota(owner, 1, unreleased.pop(index))
                first = self._live.get(job.job_id)
                results.append(_copy(first.job) if first is not None else job)
                continue
            unreleased.pop(index)
            self._live[job.job_id] = live
            if kind == "solve":
                live.task = asyncio.create_task(self._run(live), name=f"job-{job.job_id}")
            self._metrics.jobs_submitted.labels(live.spec.method).inc()
            self._metrics.jobs.labels("queued", live.spec.method).inc()
            log.info(
                "job queued",
                extra={"job_id": job.job_id, "method": job.method, "n": job.n,
                       "batch_id": batch_id},
            )
            results.append(_copy(live.job))
        return results

    # -- running ---------------------------------------------------------------------------

    async def _run(self, live: _LiveJob) -> None:
        job_id = live.job.job_id
        try:
            while True:
                try:
                    await self._run_once(live)
                    break
                except WorkerLost as lost:
                    # A batch's chunks restart themselves; one that gives up ends the job.
                    if (live.batch is not None or live.cancel_requested
                            or live.restarts >= self._max_worker_restarts):
                        raise
                    live.restarts += 1
                    nit = live.checkpoint_nit
                    log.warning("worker lost; rescheduling", extra={
                        "job_id": job_id, "restart": live.restarts, "reason": str(lost)})
                    self._emit(live, state_change=pb.StateChange(
                        state=pb.QUEUED,
                        reason=f"{lost}; resuming from iteration {nit}" if live.checkpoint
                        else f"{lost}; starting again from x0",
                    ))
                    live.job.state = pb.QUEUED
            if live.job.state not in TERMINAL_STATES:
                await self._finish_failed(live, "INTERNAL", "the worker ended without a result")
        except asyncio.CancelledError:
            if live.job.state in TERMINAL_STATES:
                return
            if live.cancel_requested:
                await self._finish_cancelled(live)
            else:
                await self._finish_failed(
                    live, "UNAVAILABLE", "the gateway shut down while the job was "
                    + pb.JobState.Name(live.job.state).lower()
                )
        except WorkerLost as lost:
            if live.job.state not in TERMINAL_STATES:
                await self._finish_failed(
                    live, "UNAVAILABLE",
                    f"{lost}; gave up after {live.restarts} restarts from its checkpoint",
                )
        except Exception:
            log.exception("job failed in the gateway", extra={"job_id": job_id})
            if live.job.state not in TERMINAL_STATES:
                await self._finish_failed(live, "INTERNAL", "the job's worker failed")
        finally:
            live.worker = None

    async def _run_once(self, live: _LiveJob) -> None:
        """One attempt on one worker; WorkerLost when that worker dies under it."""
        if live.batch is not None:
            await self._run_batch(live)
            return
        job_id = live.job.job_id
        pooled = self._pool is not None and self._pool.accepts(live.spec)
        if pooled:
            if await self._run_in_pool(live):
                return
            if live.cancel_requested:  # asked while its pool run ended: stop here
                await self._finish_cancelled(live)
                return
        async with self._scheduler.lease(live.spec.device) as worker:
            live.worker = worker
            if live.job.state != pb.RUNNING:  # it is when it goes on from its pool run
                self._set_running(live)
            run_spec = dataclasses.replace(
                live.spec.run_spec(job_id, trusted=self._trusted),
                checkpoint=live.checkpoint,
                checkpoint_interval_s=self._checkpoint_interval_s,
            )
            try:
                if _quick(live.spec) and not pooled:
                    # One plain call; a solve that outlasts the budget comes back as a
                    # checkpoint and goes on streaming from it, on the same worker.
                    for event in await self._scheduler.run_quick(worker, run_spec, QUICK_BUDGET_S):
                        await self._on_worker_event(live, event)
                    if live.job.state in TERMINAL_STATES:
                        return
                    run_spec = dataclasses.replace(run_spec, checkpoint=live.checkpoint)
                async for batch in self._scheduler.stream(worker, run_spec):
                    for event in batch:
                        await self._on_worker_event(live, event)
                    if live.job.state in TERMINAL_STATES:
                        break
            finally:
                live.worker = None

    def _set_running(self, live: _LiveJob) -> None:
        live.job.state = pb.RUNNING
        if not live.job.HasField("started"):
            _now(live.job.started)
        self._emit(live, state_change=pb.StateChange(state=pb.RUNNING))
        log.info("job running", extra={"job_id": live.job.job_id})

    async def _run_in_pool(self, live: _LiveJob) -> bool:
        """The job's first QUICK_BUDGET_S of solving in the gateway's solver pool
        (service.solver_pool); True when that ended it. Otherwise it has a checkpoint to go
        on from on Ray."""
        job_id = live.job.job_id
        run_spec = dataclasses.replace(
            live.spec.run_spec(job_id, trusted=self._trusted),
            checkpoint=live.checkpoint,
            checkpoint_interval_s=self._checkpoint_interval_s,
        )
        try:
            async with self._pool.slot() as slot:
                live.worker = slot
                self._set_running(live)
                events = await self._pool.run(slot, run_spec, QUICK_BUDGET_S)
            for event in events:
                await self._on_worker_event(live, event)
        finally:
            live.worker = None
        return live.job.state in TERMINAL_STATES

    # -- batch jobs: chunks side by side (service.batch_jobs has the merging) ---------------

    async def _run_batch(self, live: _LiveJob) -> None:
        """Every unfinished chunk on a worker of its own, side by side; then one result.

        A chunk that fails (or gives up on its worker) stops the others; they are asked to
        stop and given cancel_grace_s before their tasks are cancelled (and the workers
        replaced)."""
        run = live.batch
        run.scheduled = True
        chunks = [chunk for chunk in run.chunks if chunk.result is None]
        tasks = []
        for chunk in chunks:
            chunk.task = asyncio.create_task(
                self._run_chunk(live, chunk), name=f"job-{live.job.job_id}-{chunk.start}"
            )
            tasks.append(chunk.task)
        try:
            _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            if pending:
                await self._stop_chunks(live, pending)
        except asyncio.CancelledError:  # the job's own task: shutdown or an unheeded cancel
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            for chunk in chunks:
                chunk.task = None
        errors = []
        for chunk, task in zip(chunks, tasks, strict=True):
            if task.cancelled():
                if chunk.result is None and live.cancel_requested:
                    chunk.result = batch_jobs.unstarted_result(live.spec, chunk)
            elif task.exception() is not None:
                errors.append(task.exception())
        failures = [e for e in errors if isinstance(e, _ChunkFailed)]
        if failures:  # the first cause; what the stopped chunks raised after it is noise
            await self._finish_failed(live, failures[0].code, failures[0].message)
            return
        if errors:
            raise errors[0]  # WorkerLost after its restarts, or a gateway error: _run decides
        if any(chunk.result is None for chunk in run.chunks):
            await self._finish_failed(live, "INTERNAL",
                                      "the batch's workers ended without a result")
            return
        self._emit_batch_iterate(live, force=True)
        result = batch_jobs.batch_result(run)
        if live.spec.method_reason:  # method "auto", resolved at validation
            result.method_chosen, result.method_reason = live.spec.method, live.spec.method_reason
        await self._finish(live, batch_jobs.final_state(result, live.cancel_requested),
                           result=result)

    async def _stop_chunks(self, live: _LiveJob, tasks) -> None:
        run = live.batch
        run.stopping = True
        for chunk in run.chunks:
            if chunk.task not in tasks:
                continue
            if chunk.worker is not None:
                with contextlib.suppress(Exception):
                    await self._scheduler.cancel(chunk.worker, run.run_id(live.job.job_id, chunk))
            else:
                chunk.task.cancel()
        _, late = await asyncio.wait(tasks, timeout=self._cancel_grace_s)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)

    async def _run_chunk(self, live: _LiveJob, chunk: Chunk) -> None:
        """One chunk to its result; a lost worker reschedules it from its own checkpoint."""
        while True:
            try:
                await self._run_chunk_once(live, chunk)
                return
            except WorkerLost as lost:
                if live.cancel_requested:  # no worker left to answer: its last checkpoint
                    chunk.result = batch_jobs.unstarted_result(live.spec, chunk)
                    return
                if live.restarts >= self._max_worker_restarts or live.batch.stopping:
                    raise
                live.restarts += 1
                members = f"members [{chunk.start}, {chunk.stop})"
                log.warning("worker lost; rescheduling a batch chunk", extra={
                    "job_id": live.job.job_id, "restart": live.restarts, "reason": str(lost),
                    "chunk_start": chunk.start, "chunk_stop": chunk.stop})
                reason = (f"{lost}; {members} resume from iteration {chunk.checkpoint_nit}"
                          if chunk.checkpoint else f"{lost}; {members} start again from x0")
                # The job is still running while other chunks are; alone, it waits again.
                others = any(c.worker is not None for c in live.batch.chunks if c is not chunk)
                state = pb.RUNNING if others else pb.QUEUED
                live.job.state = state
                self._emit(live, state_change=pb.StateChange(state=state, reason=reason))

    async def _run_chunk_once(self, live: _LiveJob, chunk: Chunk) -> None:
        job_id, run = live.job.job_id, live.batch
        failure = None
        async with self._scheduler.lease(live.spec.device) as worker:
            chunk.worker = worker
            try:
                if live.job.state != pb.RUNNING:
                    self.set_state(live, pb.RUNNING)
                    log.info("job running", extra={"job_id": job_id, "chunks": len(run.chunks)})
                run_spec = live.spec.run_spec(
                    run.run_id(job_id, chunk), chunk.start, chunk.stop,
                    checkpoint=chunk.checkpoint,
                    checkpoint_interval_s=self._checkpoint_interval_s,
                )
                async for batch in self._scheduler.stream(worker, run_spec):
                    for event in batch:
                        failure = failure or self._on_chunk_event(live, chunk, event)
            finally:
                chunk.worker = None
        if failure is not None:
            raise _ChunkFailed(*failure)
        if chunk.result is None:
            raise _ChunkFailed("INTERNAL", "a worker ended its part of the batch without a result")

    def _on_chunk_event(self, live: _LiveJob, chunk: Chunk, event) -> tuple[str, str] | None:
        """Takes in one event of a chunk's worker; returns (code, message) of a failure."""
        run = live.batch
        if isinstance(event, CheckpointEvent):
            chunk.checkpoint, chunk.checkpoint_nit = event.state, event.nit
            live.checkpoint = batch_jobs.pack_checkpoint(run)
            live.checkpoint_nit = batch_jobs.checkpoint_iteration(run)
            self._pending_checkpoints[live.job.job_id] = live.checkpoint
        elif isinstance(event, BatchProgressEvent):
            chunk.progress = event
            self._emit_batch_iterate(live)
        elif isinstance(event, BatchResultEvent):
            chunk.result = event
            self._emit_batch_iterate(live, force=True)
        elif isinstance(event, FailureEvent):
            log.warning("batch chunk failed", extra={
                "job_id": live.job.job_id, "chunk_start": chunk.start, "code": event.code})
            return event.code, event.message
        return None

    def _emit_batch_iterate(self, live: _LiveJob, *, force: bool = False) -> None:
        """The chunks' progress merged into one iterate, at most one per
        BATCH_ITERATE_INTERVAL_S (every chunk reports up to 50 a second) unless forced."""
        run = live.batch
        now = time.monotonic()
        if not force and now - run.emitted_at < BATCH_ITERATE_INTERVAL_S:
            if not run.held:  # sent when the interval is over, should no event come first
                run.held = True
                asyncio.get_running_loop().call_later(
                    BATCH_ITERATE_INTERVAL_S, self._emit_held_iterate, live
                )
            return
        run.held = False
        iterate = batch_jobs.merged_iterate(run)
        last = live.last_iterate
        if last is not None and (
            iterate.iteration < last.iteration  # a resumed chunk replays what was reported
            or (iterate.iteration == last.iteration and iterate.batch == last.batch)
        ):
            return
        run.emitted_at = now
        live.last_iterate = iterate
        self._emit(live, iterate=iterate)

    def _emit_held_iterate(self, live: _LiveJob) -> None:
        if live.batch.held and live.job.state not in TERMINAL_STATES:
            self._emit_batch_iterate(live, force=True)

    async def _on_worker_event(self, live: _LiveJob, event) -> None:
        if isinstance(event, CheckpointEvent):
            live.checkpoint, live.checkpoint_nit = event.state, event.nit
            self._pending_checkpoints[live.job.job_id] = event.state
            return
        if isinstance(event, IterateEvent):
            self.record_iterate(live, event)
        elif isinstance(event, ResultEvent):
            result = pb.Result(
                x=encode_tensor(event.x),
                fun=event.fun,
                jac=encode_tensor(event.jac),
                nit=event.nit,
                nfev=event.nfev,
                njev=event.njev,
                nhev=event.nhev,
                status=_STATUS.get(event.status, pb.SOLVE_STATUS_UNSPECIFIED),
                success=event.success,
                message=event.message,
                solve_time_s=event.solve_time_s,
                method_chosen=event.method_chosen,
                method_reason=event.method_reason,
            )
            if event.success:
                state = pb.SUCCEEDED
            elif result.status == pb.CANCELLED_BY_USER:
                state = pb.CANCELLED
            else:
                state = pb.FAILED
            await self._finish(live, state, result=result)
        elif isinstance(event, FailureEvent):
            await self._finish_failed(live, event.code, event.message)

    def _emit(self, live: _LiveJob, **kind) -> pb.JobEvent:
        """Numbers an event and queues it for the store; watchers get it once it is stored."""
        live.job.last_seq += 1
        event = pb.JobEvent(job_id=live.job.job_id, seq=live.job.last_seq, **kind)
        _now(event.time)
        live.events.append(event)
        self._pending_events.append(event)
        self._dirty[live.job.job_id] = live
        if "state_change" in kind:
            entered = kind["state_change"].state
        elif kind.keys() & {"result", "failure", "train_result"}:
            entered = live.job.state
        else:
            entered = None
        if entered is not None:
            self._metrics.jobs.labels(pb.JobState.Name(entered).lower(), live.spec.method).inc()
        return event

    async def _finish(
        self,
        live: _LiveJob,
        state: int,
        *,
        result: pb.Result | None = None,
        failure: pb.Failure | None = None,
        state_change: pb.StateChange | None = None,
        train_result: pb.TrainResult | None = None,
    ) -> None:
        job = live.job
        if job.state in TERMINAL_STATES:
            return
        job.state = state
        _now(job.finished)
        wall = time.monotonic() - live.submitted
        if result is not None:
            result.wall_time_s = wall
            job.result.CopyFrom(result)
            self._emit(live, result=result)
        elif failure is not None:
            job.failure.CopyFrom(failure)
            self._emit(live, failure=failure)
        elif train_result is not None:
            train_result.wall_time_s = wall
            job.train_result.CopyFrom(train_result)
            self._emit(live, train_result=train_result)
        else:
            self._emit(live, state_change=state_change)
        # The quota is free the moment the job's record says it ended (GetJob shows that
        # before the flush below completes).
        if job.job_id in self._live:
            self._release_quota(job.owner, 1, _dimensions(live.spec))
        # Durable before anyone hears of it: a client that saw the end can read it back.
        await self._flush()
        for queue in live.watchers:
            queue.put_nowait(None)
        self._live.pop(job.job_id, None)
        self._record_finish(live, wall)

    def _record_finish(self, live: _LiveJob, wall: float) -> None:
        job, method, m = live.job, live.spec.method, self._metrics
        state = pb.JobState.Name(job.state)
        m.jobs_finished.labels(state, method).inc()
        m.job_wall_time.labels(method).observe(wall)
        if job.HasField("result"):
            r = job.result
            m.solve_duration.labels(method).observe(r.solve_time_s)
            m.iterations.labels(method).observe(r.nit)
            m.evaluations.labels(method, "f").inc(r.nfev)
            m.evaluations.labels(method, "grad").inc(r.njev)
            m.evaluations.labels(method, "hess").inc(r.nhev)
        if live.batch is not None:
            m.batch_size.labels(method).observe(live.spec.members)
            if job.HasField("result"):
                for status, count in batch_jobs.member_counts(job.result).items():
                    m.batch_members.labels(method, status).inc(count)
        extra = {"job_id": job.job_id, "state": state, "wall_s": round(wall, 6)}
        if live.batch is not None:
            extra.update(members=live.spec.members, chunks=len(live.batch.chunks))
        if job.HasField("result"):
            extra.update(nit=job.result.nit, status=pb.SolveStatus.Name(job.result.status))
        if job.HasField("failure"):
            extra.update(code=job.failure.code, reason=job.failure.message)
        log.info("job finished", extra=extra)

    async def _finish_failed(self, live: _LiveJob, code: str, message: str) -> None:
        await self._finish(live, pb.FAILED, failure=pb.Failure(code=code, message=message))

    async def _finish_cancelled(self, live: _LiveJob) -> None:
        """Ends a job the worker did not end itself: before it started, or a worker that did
        not stop in time (then the result is the last iterate the gateway saw)."""
        if live.batch is not None and live.job.HasField("started"):
            # A batch's iterate is counts, not a point: there is no result to make of it.
            running = [f"[{c.start}, {c.stop})" for c in live.batch.chunks if c.result is None]
            await self._finish(live, pb.CANCELLED, state_change=pb.StateChange(
                state=pb.CANCELLED,
                reason=f"cancelled; the workers running members {', '.join(running)} did not"
                f" stop within {self._cancel_grace_s:g} s, so there is no per-member result",
            ))
            return
        if live.last_iterate is None:
            await self._finish(
                live,
                pb.CANCELLED,
                state_change=pb.StateChange(
                    state=pb.CANCELLED, reason="cancelled before it started"
                ),
            )
            return
        last = live.last_iterate
        result = pb.Result(
            fun=last.f,
            nit=last.iteration,
            nfev=last.nfev,
            njev=last.njev,
            status=pb.CANCELLED_BY_USER,
            success=False,
            message="The solve was cancelled; the worker did not stop in time, so this is"
            " its last reported iterate.",
            solve_time_s=last.elapsed_s,
        )
        if live.last_x is not None:
            result.x.CopyFrom(live.last_x)
        await self._finish(live, pb.CANCELLED, result=result)

    # -- the store -------------------------------------------------------------------------

    async def _flush(self) -> None:
        """Writes queued new jobs, events, job records and checkpoints in one transaction
        (fsynced when it creates jobs), then hands the stored events to watchers and the
        created jobs to their submits. Concurrent callers wait for the write in progress and
        share the next one, so a burst of submits and results costs a few commits, not one
        each. Returns once everything queued before the call is stored."""
        async with self._flush_lock:
            creates, self._pending_creates = self._pending_creates, []
            if not (creates or self._pending_events or self._dirty or self._pending_checkpoints):
                return
            events, self._pending_events = self._pending_events, []
            checkpoints, self._pending_checkpoints = self._pending_checkpoints, {}
            lives = list(self._dirty.values())
            jobs = [_copy(live.job) for live in lives]
            self._dirty = {}
            groups = [group for group, _ in creates]
            write = asyncio.get_running_loop().run_in_executor(
                self._db, self._commit, groups, jobs, events, checkpoints
            )
            # Whoever waits, the outcome reaches the submits and watchers it belongs to; the
            # one DB thread keeps writes in order even if this caller goes away.
            write.add_done_callback(lambda done: self._written(done, creates, events))
            await asyncio.shield(write)
            error = write.result()[1]
            if error is not None:
                raise error

    def _commit(self, groups, jobs, events, checkpoints):
        """On the DB thread: (the created jobs per group, the event write's error or None)."""
        new_jobs = [new for group in groups for new in group]
        if not new_jobs:
            self._store.write(jobs, events, checkpoints)
            return [], None
        try:
            created = self._store.commit(new_jobs, jobs, events, checkpoints)
            error = None
        except Exception:
            # Apart, so that a write that fails (it should not) refuses no new job.
            created = self._store.create_jobs(new_jobs)
            try:
                self._store.write(jobs, events, checkpoints)
                error = None
            except Exception as exc:
                error = exc
        out, start = [], 0
        for group in groups:
            out.append(created[start : start + len(group)])
            start += len(group)
        return out, error

    def _written(self, done: asyncio.Future, creates, events) -> None:
        if done.cancelled() or done.exception() is not None:
            exc = done.exception() if not done.cancelled() else asyncio.CancelledError()
            for _, created in creates:
                if not created.done():
                    created.set_exception(exc)
            return
        per_group, error = done.result()
        for (_, created), jobs in zip(creates, per_group, strict=True):
            if not created.done():
                created.set_result(jobs)
        if error is not None:
            return
        for event in events:
            live = self._live.get(event.job_id)
            if live is None:
                continue
            live.flushed_seq = event.seq
            for queue in live.watchers:
                queue.put_nowait(event)

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval_s)
            try:
                await self._flush()
            except Exception:
                log.exception("writing job events to the store failed")

    # -- reading ---------------------------------------------------------------------------

    async def get(self, job_id: str, *, caller: Caller | None = None) -> pb.Job:
        """The job's record. Another caller's job is JobNotFound, as if it did not exist."""
        live = self._live.get(job_id)
        if live is not None and visible(caller, live.job.owner):
            return _copy(live.job)
        job = await self._in_db(self._store.get_job, job_id) if live is None else None
        if job is None or not visible(caller, job.owner):
            raise JobNotFound(job_id)
        return job

    async def list(
        self, *, state: int = 0, method: str = "", batch_id: str = "", page_size: int = 0,
        page_token: str = "", caller: Caller | None = None,
    ) -> JobPage:
        """Newest first; a caller (not admin) lists only its own jobs."""
        owner = None if caller is None or caller.is_admin else caller.name
        page = await self._in_db(
            self._store.list_jobs, state=state, method=method, batch_id=batch_id,
            page_size=page_size, page_token=page_token, owner=owner,
        )
        # The store lags live jobs by up to one flush interval; show the live record.
        jobs = [_copy(self._live[j.job_id].job) if j.job_id in self._live else j for j in page.jobs]
        return JobPage(jobs, page.next_page_token)

    async def watch(
        self, job_id: str, after_seq: int = 0, *, caller: Caller | None = None
    ) -> AsyncIterator[pb.JobEvent]:
        """Every event with seq > after_seq, then live ones until the job ends."""
        batches = self.watch_batches(job_id, after_seq, caller=caller)
        async with contextlib.aclosing(batches):
            async for batch in batches:
                for event in batch:
                    yield event

    async def watch_batches(
        self, job_id: str, after_seq: int = 0, *, caller: Caller | None = None
    ) -> AsyncIterator[list[pb.JobEvent]]:
        """As `watch`, in lists of the events at hand: the stored backlog in one, then what
        each store write made visible (a small solve's iterates and result come together)."""
        if after_seq < 0:
            raise ValueError(f"after_seq: must be >= 0, got {after_seq}")
        live = self._live.get(job_id)
        if live is not None and not visible(caller, live.job.owner):
            raise JobNotFound(job_id)
        if live is None:
            job = await self._in_db(self._store.get_job, job_id)
            if job is None or not visible(caller, job.owner):
                raise JobNotFound(job_id)
            live = self._live.get(job_id)
        if live is None:  # finished: everything is in the store
            events = await self._in_db(self._store.events, job_id, after_seq)
            if events:
                yield events
            return
        queue: asyncio.Queue = asyncio.Queue()
        backlog = live.events[after_seq : live.flushed_seq]  # seq k sits at index k - 1
        live.watchers.add(queue)
        last_seq = backlog[-1].seq if backlog else after_seq
        try:
            if backlog:
                yield backlog
            while True:
                event = await queue.get()
                batch, ended = [], False
                while True:
                    if event is None:
                        ended = True
                        break
                    if event.seq > last_seq:  # the final event may be in backlog and queue
                        last_seq = event.seq
                        batch.append(event)
                    if queue.empty():
                        break
                    event = queue.get_nowait()
                if batch:
                    yield batch
                if ended:
                    return
        finally:
            live.watchers.discard(queue)

    # -- cancelling ------------------------------------------------------------------------

    async def cancel(self, job_id: str, *, caller: Caller | None = None) -> pb.Job:
        live = self._live.get(job_id)
        if live is None or not visible(caller, live.job.owner):
            return await self.get(job_id, caller=caller)  # ended, foreign or unknown: NotFound
        if not live.cancel_requested:
            live.cancel_requested = True
            log.info("job cancel requested", extra={"job_id": job_id})
            if live.job.kind in ("callback", "train"):
                if live.on_cancel is not None:
                    live.on_cancel()  # the driver stops before its next evaluation
            elif live.batch is not None:
                await self._cancel_batch(live)
            elif live.worker is None:
                live.task.cancel()  # still waiting for a worker
            else:
                if isinstance(live.worker, PoolSlot):
                    SolverPool.cancel(live.worker, job_id)
                else:
                    await self._scheduler.cancel(live.worker, job_id)
                enforcer = asyncio.create_task(self._enforce_cancel(live))
                self._background.add(enforcer)  # the loop keeps only weak references
                enforcer.add_done_callback(self._background.discard)
        return _copy(live.job)

    async def _cancel_batch(self, live: _LiveJob) -> None:
        """Every chunk's worker is asked to stop (each answers with its members' last
        iterates); chunks still waiting for a worker end at once."""
        run = live.batch
        if not run.scheduled:
            live.task.cancel()  # no chunk was scheduled yet
            return
        # Chunks whose task is gone have their result: the job is assembling it now.
        started = [chunk for chunk in run.chunks if chunk.task is not None]
        asked = False
        for chunk in started:
            if chunk.worker is not None:
                await self._scheduler.cancel(chunk.worker, run.run_id(live.job.job_id, chunk))
                asked = True
            else:
                chunk.task.cancel()
        if asked:
            enforcer = asyncio.create_task(self._enforce_cancel(live))
            self._background.add(enforcer)
            enforcer.add_done_callback(self._background.discard)

    async def _enforce_cancel(self, live: _LiveJob) -> None:
        await asyncio.sleep(self._cancel_grace_s)
        if live.job.state not in TERMINAL_STATES and live.task is not None:
            log.warning("worker did not stop in time", extra={"job_id": live.job.job_id})
            live.task.cancel()  # _run ends it with the last iterate; the worker is replaced

    # -- callback jobs (the solver runs in the gateway; see service.callbacks) -------------

    async def create_callback_job(
        self, spec: SolveSpec, problem: pb.Problem, *, caller: Caller | None = None
    ) -> _LiveJob:
        """Stores a callback job (accepted, seq 1) and returns its live record."""
        (job,) = await self._create([(spec, problem)], batch_id="", kind="callback",
                                    caller=caller)
        return self._live[job.job_id]

    async def create_training_job(
        self, spec, request: pb.TrainRequest, *, caller: Caller | None = None
    ) -> tuple[pb.Job, _LiveJob | None]:
        """Stores a training job (accepted, seq 1); service.training runs it. The live record
        is None for an idempotent retry of a job (then only watch it)."""
        (job,) = await self._create([(spec, request)], batch_id="", kind="train", caller=caller,
                                    idempotency_key=request.idempotency_key)
        live = self._live.get(job.job_id)
        if live is not None and live.on_cancel is not None:
            live = None  # a retry of a job that is already running
        return job, live

    def record_metrics(self, live: _LiveJob, step: int, values: dict[str, float]) -> None:
        self._emit(live, metrics=pb.Metrics(step=step, values=values))

    async def finish_training(self, live: _LiveJob, result: pb.TrainResult) -> None:
        state = pb.CANCELLED if result.stopped_early and live.cancel_requested else pb.SUCCEEDED
        await self._finish(live, state, train_result=result)

    async def finish_failed(self, live: _LiveJob, code: str, message: str) -> None:
        await self._finish_failed(live, code, message)

    def callback_job(self, job_id: str, *, caller: Caller | None = None) -> _LiveJob:
        """The live record of a callback job of this gateway, to resume it."""
        live = self._live.get(job_id)
        if live is None or not visible(caller, live.job.owner):
            raise JobNotFound(job_id)
        if live.job.kind != "callback":
            raise ValueError(f"start.resume_job_id: job {job_id!r} is not a callback job")
        return live

    def set_state(self, live: _LiveJob, state: int, reason: str = "") -> None:
        """A non-final state change (RUNNING, WAITING_FOR_CLIENT), as an event."""
        live.job.state = state
        if state == pb.RUNNING and not live.job.HasField("started"):
            _now(live.job.started)
        self._emit(live, state_change=pb.StateChange(state=state, reason=reason))

    async def record(self, live: _LiveJob, event: IterateEvent | ResultEvent | FailureEvent):
        """An iterate, result or failure of a job whose solver runs outside Ray."""
        await self._on_worker_event(live, event)

    def record_iterate(self, live: _LiveJob, event: IterateEvent) -> None:
        """An iterate (numbered, queued for the store's next batched write, then fanned out
        to watchers); one from before the last reported iterate (a resume from an older
        checkpoint replays a few) is dropped. Never waits: callback jobs record one per
        iteration between two evaluations."""
        last = live.last_iterate
        if last is not None and event.iteration <= last.iteration:
            return
        # As _emit(live, iterate=...), built in place: a small solve's forty iterates are
        # most of the gateway's work for it.
        job = live.job
        job.last_seq += 1
        out = pb.JobEvent(job_id=job.job_id, seq=job.last_seq)
        iterate = out.iterate
        iterate.iteration = event.iteration
        iterate.f = event.f
        iterate.grad_norm = event.grad_norm
        iterate.step_size = event.step_size
        iterate.nfev = event.nfev
        iterate.njev = event.njev
        iterate.elapsed_s = event.elapsed_s
        _now(out.time)
        if event.x is not None:
            iterate.x.CopyFrom(encode_tensor(event.x))
            live.last_x = iterate.x
        live.last_iterate = iterate
        live.events.append(out)
        self._pending_events.append(out)
        self._dirty[job.job_id] = live

    @staticmethod
    def stored_events(live: _LiveJob) -> list[pb.JobEvent]:
        """The job's events that are in the store (what a new watcher replays)."""
        return live.events[: live.flushed_seq]

    def watch_live(self, live: _LiveJob) -> asyncio.Queue:
        """A queue receiving the job's new events (None after the last); unwatch() it."""
        queue: asyncio.Queue = asyncio.Queue()
        live.watchers.add(queue)
        return queue

    @staticmethod
    def unwatch(live: _LiveJob, queue: asyncio.Queue) -> None:
        live.watchers.discard(queue)

    @property
    def metrics(self) -> Metrics:
        return self._metrics

    @property
    def live_jobs(self) -> int:
        return len(self._live)
