"""Callback jobs: the caller keeps its objective and secant drives the solve over one stream.

Where the solver runs: in the gateway, next to the stream. Every evaluation is a round trip
to the caller anyway (~0.25 ms on loopback); a Ray hop would add ~1.6 ms to each. The job is
still a job: stored, numbered events, metrics, CancelJob.

The solver is `workers.solvers.Solve`, the same generator the local driver feeds: it yields
EvalRequests, which go to the caller as EvaluationRequests, and IterationDone markers, where
the state is checkpointed (safetensors bytes) and an iterate event is recorded. When the
caller disconnects, the job waits (WAITING_FOR_CLIENT) with its last checkpoint for a lease;
a caller that comes back with `resume_job_id` continues from that checkpoint, so the iterates
are those of an uninterrupted run. After the lease the job ends CANCELLED with its last
iterate. An evaluation not answered within the deadline fails the job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from secant.v1 import optimizer_pb2 as pb
from service.auth import Caller
from service.errors import MalformedRequest
from service.jobs import JobManager, encode_tensor
from service.validation import Limits, decode_tensor, validate_callback_start
from workers.runner import FailureEvent, IterateEvent, ResultEvent
from workers.solvers import (
    EvalRequest,
    Evaluation,
    IterationDone,
    SolveState,
    Status,
    state_from_bytes,
    state_to_bytes,
)
from workers.solvers._auto import make_solve

log = logging.getLogger("secant.callbacks")

_TORCH = {"float64": torch.float64, "float32": torch.float32}
_SNAPSHOT_INTERVAL_S = 0.2
_inference_mode = torch.inference_mode
_LITTLE_ENDIAN = sys.byteorder == "little"


@dataclass(frozen=True)
class CallbackSettings:
    """`secant serve --callback-lease-s --callback-eval-deadline-s`."""

    lease_s: float = 300.0
    evaluation_deadline_s: float = 600.0
    first_message_deadline_s: float = 30.0


class _StreamBroken(Exception):
    """The caller's stream failed under a read or write (aborted, reset, server stopping):
    the job waits for the caller as after a disconnect."""


class CallerProtocolError(ValueError):
    """The caller answered something that does not fit the request (wrong id, shape, field)."""


@dataclass
class _Suspended:
    """A callback job whose caller went away: what a resume needs, and its lease."""

    checkpoint: bytes | None
    next_request_id: int
    last: ResultEvent | None = None  # the last iterate, as the result if nobody comes back
    lease: asyncio.TimerHandle | None = None


class CallbackJobs:
    def __init__(self, jobs: JobManager, limits: Limits, settings: CallbackSettings) -> None:
        self._jobs = jobs
        self._limits = limits
        self._settings = settings
        self._suspended: dict[str, _Suspended] = {}
        self._attached: set[str] = set()
        self._background: set[asyncio.Task] = set()  # the loop keeps only weak references

    async def session(
        self, context: grpc.aio.ServicerContext, caller: Caller | None = None
    ) -> None:
        """One SolveWithCallbacks stream: starts or resumes a job and drives its solver,
        writing its messages with `context.write` (none of them travels up the servicer's and
        the interceptors' async generators). A caller resumes only its own jobs (another's
        is JobNotFound)."""
        first = await self._read(context, self._settings.first_message_deadline_s, "start")
        if first is None:
            return
        if first.WhichOneof("kind") != "start":
            raise ValueError("the first message of SolveWithCallbacks must be `start`")
        start = first.start
        if start.resume_job_id:
            live, suspended = self._take_suspended(start.resume_job_id, caller)
            checkpoint, request_id = suspended.checkpoint, suspended.next_request_id
        else:
            spec = validate_callback_start(start, self._limits)
            live = await self._jobs.create_callback_job(spec, start.problem, caller=caller)
            checkpoint, request_id = None, 1
        job_id = live.job.job_id
        self._attached.add(job_id)
        backlog = self._jobs.stored_events(live)  # the caller sees the whole log, then new events
        queue = self._jobs.watch_live(live)
        for event in backlog:
            queue.put_nowait(event)
        driver = _Driver(self, live, checkpoint, request_id)
        try:
            live.on_cancel = driver.cancel
            self._jobs.set_state(live, pb.RUNNING, "resumed" if start.resume_job_id else "")
            await driver.run(context, queue)
        except (asyncio.CancelledError, GeneratorExit):
            driver.suspend("the caller's stream was cancelled")
            raise
        except _StreamBroken as exc:
            driver.suspend(str(exc))  # the caller may come back; nothing more can be sent
        except Exception as exc:
            # A malformed message from the caller (ValueError: INVALID_ARGUMENT) or a fault
            # in the gateway (INTERNAL): the job ends FAILED with that code rather than
            # staying RUNNING with nobody driving it; the RPC reports the same code.
            await driver.fail_unexpectedly(exc)
            raise
        finally:
            self._attached.discard(job_id)
            self._jobs.unwatch(live, queue)

    async def _read(self, context, deadline: float, what: str):
        """The caller's next message; None when it has gone (half-close). TimeoutError when
        it says nothing within `deadline` seconds; _StreamBroken when the stream fails."""
        try:
            async with asyncio.timeout(deadline):  # no extra task per read, unlike wait_for
                message = await context.read()
        except (TimeoutError, asyncio.CancelledError, MalformedRequest):
            raise
        except Exception as exc:
            raise _StreamBroken(f"reading from the caller's stream failed ({exc})") from exc
        if message is grpc.aio.EOF:
            return None
        return message

    def _take_suspended(self, job_id: str, caller: Caller | None):
        live = self._jobs.callback_job(job_id, caller=caller)
        suspended = self._suspended.get(job_id)
        if suspended is None or job_id in self._attached:
            raise ValueError(
                f"start.resume_job_id: job {job_id!r} is not waiting for its caller (it is "
                + pb.JobState.Name(live.job.state).lower()
                + ")"
            )
        del self._suspended[job_id]
        if suspended.lease is not None:
            suspended.lease.cancel()
        return live, suspended

    def suspend(self, live, checkpoint: bytes | None, next_request_id: int, reason: str,
                last: ResultEvent | None = None):
        """The caller went away: keep what a resume needs (`checkpoint`) and the result the
        job ends with if nobody comes back (`last`: the last iterate)."""
        job_id = live.job.job_id
        suspended = _Suspended(checkpoint, next_request_id, last)
        loop = asyncio.get_running_loop()
        suspended.lease = loop.call_later(
            self._settings.lease_s, self._expire, live, "lease"
        )
        self._suspended[job_id] = suspended
        live.on_cancel = lambda: self._expire(live, "cancel")
        self._jobs.set_state(live, pb.WAITING_FOR_CLIENT, reason)
        log.info("callback job waiting for its caller",
                 extra={"job_id": job_id, "lease_s": self._settings.lease_s})

    def _expire(self, live, why: str) -> None:
        suspended = self._suspended.pop(live.job.job_id, None)
        if suspended is None:
            return
        if suspended.lease is not None:
            suspended.lease.cancel()
        if why == "lease":
            message = (f"The caller did not come back within the lease ({self._settings.lease_s}"
                       " s); the result is the last iterate.")
        else:
            message = "The solve was cancelled while waiting for its caller; last iterate."
        if suspended.last is not None:
            event = dataclasses.replace(suspended.last, message=message)
        else:
            state = state_from_bytes(suspended.checkpoint) if suspended.checkpoint else None
            event = _cancelled_result(live.spec, state, message)
        task = asyncio.get_running_loop().create_task(self._jobs.record(live, event))
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class _Driver:
    """Feeds one Solve from one caller stream."""

    def __init__(self, owner: CallbackJobs, live, checkpoint: bytes | None, request_id: int):
        self.owner = owner
        self.live = live
        self.spec = live.spec
        self._resumed_from = checkpoint
        self.snapshot: SolveState | None = None
        self.request_id = request_id
        self.finished = False
        self.suspended = False
        dtype = _TORCH[self.spec.dtype]
        self.dtype = dtype
        self.n = self.spec.n
        state = state_from_bytes(checkpoint) if checkpoint else None
        x0 = torch.from_numpy(np.ascontiguousarray(self.spec.x0)).to(dtype)
        bounds = None
        if self.spec.lower is not None:
            bounds = tuple(torch.from_numpy(np.ascontiguousarray(b)).to(dtype)
                           for b in (self.spec.lower, self.spec.upper))
        # method "auto" picks by the rules alone here: every probe would be a round trip.
        self.solve = make_solve(self.spec.method, x0, bounds=bounds,
                                options=self.spec.options, initial_state=state,
                                should_stop=lambda: self.live.cancel_requested, callback=True)
        self.snapshot_time = 0.0
        self.state: SolveState | None = None
        self.snapshot_interval = _SNAPSHOT_INTERVAL_S
        # The evaluation deadline: one timer per session, re-armed only when it fires, instead
        # of a timeout context (a timer handle plus bookkeeping) per read.
        self._deadline_s = owner._settings.evaluation_deadline_s
        self._watchdog: asyncio.TimerHandle | None = None
        self._reading_since: float | None = None
        self._reader: asyncio.Task | None = None
        self._deadline_hit = False
        # Iterate events taken at iteration boundaries, recorded once the next request is sent.
        self._pending_iterates: list[IterateEvent] = []

    async def _read(self, context):
        """The caller's answer; None when it has gone (half-close). TimeoutError when it has
        not answered within the evaluation deadline."""
        loop = asyncio.get_running_loop()
        self._reader = asyncio.current_task()
        self._reading_since = loop.time()
        if self._watchdog is None:
            self._watchdog = loop.call_at(self._reading_since + self._deadline_s, self._watch)
        try:
            message = await context.read()
        except asyncio.CancelledError:
            if not self._deadline_hit:
                raise
            self._deadline_hit = False
            self._reader.uncancel()
            raise TimeoutError from None
        except MalformedRequest:
            raise
        except Exception as exc:
            raise _StreamBroken(f"reading from the caller's stream failed ({exc})") from exc
        finally:
            self._reading_since = None
        if message is grpc.aio.EOF:
            return None
        return message

    def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        since = self._reading_since
        now = loop.time()
        if since is not None and now - since >= self._deadline_s:
            self._watchdog = None
            self._deadline_hit = True
            self._reader.cancel()
            return
        due = now + self._deadline_s if since is None else since + self._deadline_s
        self._watchdog = loop.call_at(due, self._watch)

    def cancel(self) -> None:
        """CancelJob while attached: the solver stops before its next evaluation."""

    def suspend(self, reason: str) -> None:
        if self.finished or self.suspended:
            return
        self.suspended = True
        self._record_pending()
        last = None
        if self.state is not None:  # between steps x, f, g are the last accepted iterate's
            last = _cancelled_result(self.spec, self.state, "")
        self.owner.suspend(self.live, self.checkpoint, self.request_id, reason, last)

    async def run(self, context, queue: asyncio.Queue) -> None:
        """Feeds the solver until it returns, writing requests (with the job's new events)
        and reading answers. The solver's steps run in inference mode (no autograd dispatch:
        nothing here differentiates), entered around each synchronous stretch and never
        across an await, so other tasks on the loop never run in it."""
        jobs = self.owner._jobs
        roundtrip = jobs.metrics.callback_roundtrip
        write = context.write
        run = self.solve.run()
        try:
            with _inference_mode():
                item = self._advance(run, next(run))
            while True:
                request_id = self.request_id
                self.request_id += 1
                message = pb.CallbackServerMessage()
                _fill_request(message.request, request_id, item)  # in place: no copy of x
                if not queue.empty():
                    message.events.extend(_pending(queue))
                sent = time.perf_counter()
                try:
                    await write(message)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the stream ended under us (aborted, server stopping)
                    raise _StreamBroken(f"writing to the caller's stream failed ({exc})") from exc
                # The caller evaluates now: record what the solver reported meanwhile.
                self._record_pending()
                try:
                    reply = await self._read(context)
                except TimeoutError:
                    why = (
                        f"the caller did not answer evaluation request {request_id} within"
                        f" {self._deadline_s:g} s (--callback-eval-deadline-s)"
                    )
                    await self._fail(context, queue, "DEADLINE_EXCEEDED", why)
                    return
                if reply is None:
                    self.suspend("the caller closed its stream")
                    return
                roundtrip.observe(time.perf_counter() - sent)
                try:
                    with _inference_mode():
                        evaluation = self._evaluation(reply, request_id, item)
                        item = self._advance(run, run.send(evaluation))
                except CallerProtocolError as exc:
                    await self._fail(context, queue, "INVALID_ARGUMENT", str(exc))
                    return
        except StopIteration as done:
            result = done.value
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
        self.finished = True
        self._record_pending()
        await jobs.record(self.live, _result_event(result))
        await _drain(context, queue)

    def _advance(self, run, item):
        """Past the IterationDone markers (checkpoint, iterate event) to the next request;
        StopIteration when the solver returns."""
        while isinstance(item, IterationDone):
            state = self.state = item.state
            self._checkpoint(state)
            self._pending_iterates.append(self._iterate_event(state))
            item = run.send(None)
        return item

    def _record_pending(self) -> None:
        """Records the iterate events taken at the last iteration boundaries. The driver
        calls it once the next request is on its way (off the round trip's critical path)
        and before anything else is recorded (failure, suspension, result), so the job's log
        keeps the solver's order."""
        if self._pending_iterates:
            record = self.owner._jobs.record_iterate
            for event in self._pending_iterates:
                record(self.live, event)
            self._pending_iterates.clear()

    def _iterate_event(self, state: SolveState) -> IterateEvent:
        info = self.solve.iterate_info(state)
        every = self.spec.report_x_every
        x = None
        if every > 0 and info.nit % every == 0:
            x = info.x.detach().cpu().numpy().copy()
        return IterateEvent(
            iteration=info.nit,
            f=info.f,
            grad_norm=info.grad_norm,
            step_size=info.step_size,
            nfev=info.nfev,
            njev=info.njev,
            elapsed_s=info.elapsed_s,
            x=x,
        )

    async def fail_unexpectedly(self, exc: Exception) -> None:
        if self.finished or self.suspended:
            return
        self.finished = True
        self._record_pending()
        if isinstance(exc, ValueError):
            code, message = "INVALID_ARGUMENT", str(exc)
        else:
            code = "INTERNAL"
            message = f"the callback job failed in the gateway: {type(exc).__name__}: {exc}"
        await self.owner._jobs.record(self.live, FailureEvent(code, message))

    async def _fail(self, context, queue: asyncio.Queue, code: str, message: str) -> None:
        self.finished = True
        self._record_pending()
        await self.owner._jobs.record(self.live, FailureEvent(code, message))
        await _drain(context, queue)

    def _checkpoint(self, state: SolveState) -> None:
        """Keeps a copy of the state at this iteration boundary, every few tenths of a second
        (serialized only if the caller goes away: safetensors costs ~0.2 ms even for a tiny
        state). A resume from an older copy redoes a few iterations with the same results;
        the job log drops the iterates it already has."""
        now = time.monotonic()
        if self.snapshot is not None and now - self.snapshot_time < self.snapshot_interval:
            return
        self.snapshot = _copy_state(state)
        copied = time.monotonic()
        self.snapshot_time = copied
        # Copies take at most ~2% of the solve, however big the state (2mn for L-BFGS).
        self.snapshot_interval = max(_SNAPSHOT_INTERVAL_S, 50 * (copied - now))

    @property
    def checkpoint(self) -> bytes | None:
        if self.snapshot is None:
            return self._resumed_from
        return state_to_bytes(self.snapshot)

    def _evaluation(self, reply, request_id: int, request: EvalRequest) -> Evaluation:
        if reply.WhichOneof("kind") != "result":
            raise CallerProtocolError(
                f"evaluation {request_id}: expected a result message, got "
                f"{reply.WhichOneof('kind')!r}"
            )
        answer = reply.result
        if answer.request_id != request_id:
            raise CallerProtocolError(
                f"evaluation {request_id}: the answer names request {answer.request_id}"
            )
        if answer.error:
            log.warning("the caller's evaluation failed", extra={
                "job_id": self.live.job.job_id, "request_id": request_id,
                "reason": answer.error[:200]})
            nan = torch.full((), math.nan, dtype=self.dtype)
            return Evaluation(f=nan, g=torch.full((self.n,), math.nan, dtype=self.dtype),
                              hvp=torch.full((self.n,), math.nan, dtype=self.dtype)
                              if request.hvp_vector is not None else None)
        out = Evaluation()
        if request.need_f:
            out.f = torch.scalar_tensor(answer.f, dtype=self.dtype)
        if request.need_g:
            out.g = self._vector(answer.gradient, "gradient", request_id)
        if request.hvp_vector is not None:
            out.hvp = self._vector(answer.hvp, "hvp", request_id)
        return out

    def _vector(self, tensor: pb.Tensor, name: str, request_id: int) -> torch.Tensor:
        data = tensor.data
        if (tensor.dtype == pb.FLOAT64 and len(data) == 8 * self.n and len(tensor.shape) == 1
                and tensor.shape[0] == self.n and _LITTLE_ENDIAN):
            # The common case, straight from the message's bytes: one copy, no checks to redo.
            vector = torch.frombuffer(bytearray(data), dtype=torch.float64)
            return vector if self.dtype == torch.float64 else vector.to(self.dtype)
        where = f"evaluation {request_id}: {name}"
        if not data and not tensor.shape:
            raise CallerProtocolError(f"{where} is required for this request")
        try:
            array = decode_tensor(tensor, where)
        except ValueError as exc:
            raise CallerProtocolError(str(exc)) from None
        if array.shape != (self.n,):
            raise CallerProtocolError(
                f"{where} has shape {list(array.shape)}, expected [{self.n}]"
            )
        return torch.from_numpy(array.astype(np.float64, copy=False)).to(self.dtype)


def _copy_state(state: SolveState) -> SolveState:
    copied = dataclasses.replace(state)
    for f in dataclasses.fields(state):
        value = getattr(state, f.name)
        if isinstance(value, torch.Tensor):
            setattr(copied, f.name, value.clone())
    return copied


def _pending(queue: asyncio.Queue) -> list[pb.JobEvent]:
    events = []
    while not queue.empty():
        event = queue.get_nowait()
        if event is not None:
            events.append(event)
    return events


async def _drain(context, queue: asyncio.Queue) -> None:
    """Writes the job's remaining events (its final one among them) to the caller."""
    while not queue.empty():
        event = queue.get_nowait()
        if event is not None:
            await context.write(pb.CallbackServerMessage(event=event))


def _fill_request(message: pb.EvaluationRequest, request_id: int, request: EvalRequest) -> None:
    message.request_id = request_id
    message.need_f = request.need_f
    message.need_gradient = request.need_g
    _encode_into(message.x, request.x)
    if request.hvp_vector is not None:
        _encode_into(message.hvp_vector, request.hvp_vector)


def _encode_into(field: pb.Tensor, tensor: torch.Tensor) -> None:
    """A 1-D float64 tensor's bytes straight into the message field (no numpy round trip);
    anything else through encode_tensor."""
    tensor = tensor.detach()
    if tensor.dtype == torch.float64 and tensor.dim() == 1 and _LITTLE_ENDIAN:
        field.shape.append(tensor.shape[0])
        field.dtype = pb.FLOAT64
        field.data = tensor.cpu().numpy().tobytes()
    else:
        field.CopyFrom(encode_tensor(tensor.cpu().numpy()))


def _result_event(result) -> ResultEvent:
    return ResultEvent(
        x=result.x.detach().cpu().numpy().copy(), fun=float(result.fun),
        jac=result.jac.detach().cpu().numpy().copy(), nit=int(result.nit),
        nfev=int(result.nfev), njev=int(result.njev), nhev=int(result.nhev),
        status=result.status.name, success=bool(result.success), message=result.message,
        solve_time_s=float(result.solve_time_s), method_chosen=result.method_chosen,
        method_reason=result.method_reason,
    )


def _cancelled_result(spec, state: SolveState | None, message: str) -> ResultEvent:
    if state is None:
        x, fun, jac = spec.x0, math.nan, np.full_like(spec.x0, math.nan)
        counts = (0, 0, 0, 0)
        elapsed = 0.0
    else:
        x = state.x.detach().cpu().numpy().copy()
        fun, jac = float(state.f), state.g.detach().cpu().numpy().copy()
        counts = (state.nit, state.nfev, state.njev, state.nhev)
        elapsed = state.elapsed_s
    return ResultEvent(
        x=x, fun=fun, jac=jac, nit=counts[0], nfev=counts[1], njev=counts[2], nhev=counts[3],
        status=Status.CANCELLED.name, success=False, message=message, solve_time_s=elapsed,
    )
