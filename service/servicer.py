"""The Optimizer servicer: thin. Each method validates (service.validation), calls the
JobManager with the caller the auth interceptor identified (None without auth), and leaves
status codes to service.errors."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from secant.v1 import optimizer_pb2 as pb
from secant.v1 import optimizer_pb2_grpc as pb_grpc
from service import planning
from service.auth import current_caller
from service.callbacks import CallbackJobs
from service.errors import LimitExceeded, grpc_errors, grpc_stream_errors
from service.jobs import JobManager
from service.training import TrainingJobs
from service.validation import Limits, method_filter, validate_problem

# A coalesced message carries events up to about this many bytes (one event may exceed it).
_BUNDLE_BYTES = 1 << 20


async def _bundled(batches) -> AsyncIterator[pb.JobEvent]:
    """Events for a stream that asked for coalesce_events: each batch at hand as few messages
    as fit _BUNDLE_BYTES, the first event of each carrying the rest in `more`. Copies: the
    job's log keeps its events as they are."""
    async with contextlib.aclosing(batches):
        async for batch in batches:
            for message in _bundles(batch):
                yield message


def _bundles(batch: list[pb.JobEvent]) -> list[pb.JobEvent]:
    out = []
    start = 0
    while start < len(batch):
        stop, size = start + 1, batch[start].ByteSize()
        while stop < len(batch) and size < _BUNDLE_BYTES:
            size += batch[stop].ByteSize()
            stop += 1
        message = pb.JobEvent()
        message.CopyFrom(batch[start])
        message.more.extend(batch[start + 1 : stop])
        out.append(message)
        start = stop
    return out


def _required_job_id(job_id: str) -> str:
    if not job_id:
        raise ValueError("job_id: required")
    return job_id


class OptimizerServicer(pb_grpc.OptimizerServicer):
    def __init__(
        self,
        jobs: JobManager,
        limits: Limits,
        *,
        trusted: bool,
        callbacks: CallbackJobs,
        training: TrainingJobs,
    ) -> None:
        self._jobs = jobs
        self._training = training
        self._limits = limits
        self._trusted = trusted
        self._callbacks = callbacks

    def _validate(self, problem: pb.Problem, where: str = "problem"):
        return validate_problem(problem, self._limits, trusted=self._trusted, where=where)

    def _events(self, job_id: str, after_seq: int, caller, coalesce: bool):
        if coalesce:
            return _bundled(self._jobs.watch_batches(job_id, after_seq, caller=caller))
        return self._jobs.watch(job_id, after_seq, caller=caller)

    @grpc_stream_errors
    async def Solve(self, request, context):
        spec = self._validate(request.problem)
        caller = current_caller()
        job = await self._jobs.submit(spec, request.problem, caller=caller)
        async for message in self._events(job.job_id, 0, caller, request.coalesce_events):
            yield message

    @grpc_errors
    async def Submit(self, request, context):
        spec = self._validate(request.problem)
        return await self._jobs.submit(
            spec, request.problem, idempotency_key=request.idempotency_key,
            caller=current_caller(),
        )

    @grpc_errors
    async def SubmitBatch(self, request, context):
        if not request.problems:
            raise ValueError("problems: at least one problem is required")
        if len(request.problems) > self._limits.max_batch_size:
            raise LimitExceeded(
                f"problems: {len(request.problems)} exceed this server's max batch size"
                f" {self._limits.max_batch_size}"
            )
        items = [
            (self._validate(problem, f"problems[{index}]"), problem)
            for index, problem in enumerate(request.problems)
        ]
        batch_id, jobs = await self._jobs.submit_batch(items, caller=current_caller())
        return pb.SubmitBatchResponse(batch_id=batch_id, jobs=jobs)

    @grpc_stream_errors
    async def Watch(self, request, context):
        job_id = _required_job_id(request.job_id)
        async for message in self._events(
            job_id, request.after_seq, current_caller(), request.coalesce_events
        ):
            yield message

    @grpc_errors
    async def GetJob(self, request, context):
        return await self._jobs.get(_required_job_id(request.job_id), caller=current_caller())

    @grpc_errors
    async def ListJobs(self, request, context):
        page = await self._jobs.list(
            state=request.state,
            method=method_filter(request.method),
            batch_id=request.batch_id,
            page_size=request.page_size,
            page_token=request.page_token,
            caller=current_caller(),
        )
        return pb.ListJobsResponse(jobs=page.jobs, next_page_token=page.next_page_token)

    @grpc_errors
    async def CancelJob(self, request, context):
        return await self._jobs.cancel(_required_job_id(request.job_id), caller=current_caller())

    @grpc_stream_errors
    async def SolveWithCallbacks(self, request_iterator, context):
        # The session writes its messages itself (context.write): an evaluation request
        # does not travel up this generator, the error mapping's and the interceptors'.
        await self._callbacks.session(context, current_caller())
        return
        yield  # an async generator still: the shape the interceptors wrap

    @grpc_stream_errors
    async def Train(self, request, context):
        caller = current_caller()
        job_id = await self._training.submit(request, caller=caller)
        async for event in self._jobs.watch(job_id, 0, caller=caller):
            yield event

    @grpc_errors
    async def Plan(self, request, context):
        return await planning.plan(request)

    @grpc_errors
    async def GetArtifact(self, request, context):
        return await self._training.artifact(
            _required_job_id(request.job_id), request.name, caller=current_caller()
        )
