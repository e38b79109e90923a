"""The asyncio client: ``secant.AsyncClient``, ``AsyncJob`` and ``AsyncBatch`` (grpc.aio).

Same surface as the blocking client; requests, result parsing and the resume decisions are
the shared ones in ``_core``, only the waiting differs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import grpc
import grpc.aio

from secant._batch import BatchObjective, BatchProgressBar, BatchSolveResult, build_batch_problem
from secant._core import (
    DEFAULT_ADDRESS,
    EventTracker,
    JobHandleBase,
    ProgressBar,
    RetryPolicy,
    StreamResumer,
    TLSConfig,
    call_metadata,
    channel_settings,
    list_request,
    new_idempotency_key,
    problem_from,
    progress_total,
    tls_from_env,
    token_from_env,
    unbundled,
)
from secant._errors import SecantError, from_rpc_error
from secant._problem import DataLike, Objective, build_problem
from secant._result import JobState, OptimizeResult
from secant._training import MemoryPlan, build_plan_request
from secant.v1 import optimizer_pb2 as pb
from secant.v1 import optimizer_pb2_grpc as pb_grpc


class AsyncClient:
    """An asyncio connection to a secant gateway; create and use it inside one event loop.

    Arguments as for ``secant.Client``. Many concurrent calls share the one HTTP/2
    connection (cheap: no thread per call).

    >>> async with secant.AsyncClient() as client:
    ...     results = await asyncio.gather(*(client.minimize(expr, x0) for x0 in starts))
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        token: str | None = None,
        tls: bool | TLSConfig | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.address = address
        credentials, options = channel_settings(tls_from_env(tls))
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(address, options=options)
        else:
            self._channel = grpc.aio.secure_channel(address, credentials, options=options)
        self._stub = pb_grpc.OptimizerStub(self._channel)
        self._metadata = call_metadata(token_from_env(token))
        self._retry = retry or RetryPolicy()

    async def minimize(
        self,
        objective: Objective,
        x0: Any,
        method: str = "l-bfgs",
        bounds: Any = None,
        data: DataLike | None = None,
        options: Mapping[str, Any] | None = None,
        progress: bool = False,
        report_x_every: int = 0,
        device: str = "cpu",
        dtype: str = "float64",
        labels: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> OptimizeResult:
        """Solves one problem over a Solve stream; see ``Client.minimize``."""
        problem = build_problem(
            objective, x0, method, bounds, data, options, report_x_every, device, dtype, labels
        )
        bar = ProgressBar(progress_total(options)) if progress else None
        tracker = EventTracker(progress=bar)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            async for _ in self._follow(
                tracker,
                lambda remaining: self._stub.Solve(
                    pb.SolveRequest(problem=problem, coalesce_events=True),
                    metadata=self._metadata, timeout=remaining,
                ),
                deadline,
                timeout,
            ):
                pass
        finally:
            tracker.close_progress()
        return tracker.outcome()

    async def submit(
        self,
        objective: Objective,
        x0: Any,
        method: str = "l-bfgs",
        bounds: Any = None,
        data: DataLike | None = None,
        options: Mapping[str, Any] | None = None,
        report_x_every: int = 0,
        device: str = "cpu",
        dtype: str = "float64",
        labels: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> AsyncJob:
        """Submits one problem and returns its job at once; see ``Client.submit``."""
        problem = build_problem(
            objective, x0, method, bounds, data, options, report_x_every, device, dtype, labels
        )
        request = pb.SubmitRequest(
            problem=problem, idempotency_key=idempotency_key or new_idempotency_key()
        )
        info = await self._unary(self._stub.Submit, request)
        return AsyncJob(self, info.job_id, info)

    async def minimize_batch(
        self,
        objective: BatchObjective,
        X0: Any,
        *,
        data: DataLike | None = None,
        member_data: DataLike | None = None,
        method: str = "bfgs",
        bounds: Any = None,
        options: Mapping[str, Any] | None = None,
        dtype: str | None = None,
        device: str | None = None,
        chunk_size: int = 0,
        labels: Mapping[str, str] | None = None,
        progress: bool = False,
        timeout: float | None = None,
    ) -> BatchSolveResult:
        """Solves B same-shape problems as one vectorized job; see ``Client.minimize_batch``."""
        job = await self.submit_batch_problem(
            objective, X0, data=data, member_data=member_data, method=method, bounds=bounds,
            options=options, dtype=dtype, device=device, chunk_size=chunk_size, labels=labels,
        )  # fmt: skip
        return await job.result(timeout=timeout, progress=progress)

    async def submit_batch_problem(
        self,
        objective: BatchObjective,
        X0: Any,
        *,
        data: DataLike | None = None,
        member_data: DataLike | None = None,
        method: str = "bfgs",
        bounds: Any = None,
        options: Mapping[str, Any] | None = None,
        dtype: str | None = None,
        device: str | None = None,
        chunk_size: int = 0,
        labels: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> AsyncBatchJob:
        """Submits a vectorized batch and returns at once; see ``Client.submit_batch_problem``."""
        problem = build_batch_problem(
            objective, X0, data=data, member_data=member_data, method=method, bounds=bounds,
            options=options, dtype=dtype, device=device, chunk_size=chunk_size, labels=labels,
        )  # fmt: skip
        request = pb.SubmitRequest(
            problem=problem, idempotency_key=idempotency_key or new_idempotency_key()
        )
        info = await self._unary(self._stub.Submit, request)
        return AsyncBatchJob(self, info.job_id, info)

    async def get_batch_job(self, job_id: str) -> AsyncBatchJob:
        """A vectorized batch job's handle by id (one GetJob call)."""
        info = await self._unary(self._stub.GetJob, pb.GetJobRequest(job_id=job_id))
        return AsyncBatchJob(self, info.job_id, info)

    async def submit_batch(self, problems: Iterable[pb.Problem | Mapping[str, Any]]) -> AsyncBatch:
        """Submits many problems in one call under one batch id; see ``Client.submit_batch``."""
        request = pb.SubmitBatchRequest(problems=[problem_from(p) for p in problems])
        reply = await self._unary(self._stub.SubmitBatch, request)
        return AsyncBatch(reply.batch_id, [AsyncJob(self, j.job_id, j) for j in reply.jobs])

    async def get_job(self, job_id: str) -> AsyncJob:
        """The job's current record (one GetJob call)."""
        info = await self._unary(self._stub.GetJob, pb.GetJobRequest(job_id=job_id))
        return AsyncJob(self, info.job_id, info)

    async def cancel(self, job_id: str) -> AsyncJob:
        """Asks the server to stop the job; it ends CANCELLED with its last iterate."""
        info = await self._unary(self._stub.CancelJob, pb.CancelJobRequest(job_id=job_id))
        return AsyncJob(self, info.job_id, info)

    async def jobs(
        self,
        state: JobState | int | str | None = None,
        method: str | None = None,
        batch_id: str | None = None,
        page_size: int = 0,
    ) -> AsyncIterator[AsyncJob]:
        """Every job matching the filters (``async for``), one call per page."""
        token = ""
        while True:
            request = list_request(state, method, batch_id, page_size, token)
            reply = await self._unary(self._stub.ListJobs, request)
            for info in reply.jobs:
                yield AsyncJob(self, info.job_id, info)
            token = reply.next_page_token
            if not token:
                return

    def watch(self, job_id: str, after_seq: int = 0) -> AsyncIterator[pb.JobEvent]:
        """The job's events with seq > after_seq, then live ones until it ends."""
        return AsyncJob(self, job_id).events(after_seq=after_seq)

    async def plan(
        self,
        model: Mapping[str, Any] | None = None,
        *,
        workers: int | None = None,
        batch: int | None = None,
        precision: str | None = None,
        amp: bool = False,
        budget: int | str | None = None,
        spec: Mapping[str, Any] | str | None = None,
    ) -> MemoryPlan:
        """A training job's memory plan, as ``Client.plan``."""
        request = build_plan_request(model, spec=spec, workers=workers, batch=batch,
                                     precision=precision, amp=amp, budget=budget)
        return MemoryPlan.from_proto(await self._unary(self._stub.Plan, request))

    async def close(self) -> None:
        """Closes the channel; streams in flight end with CANCELLED."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient(address={self.address!r})"

    async def _unary(self, method: Callable[..., Any], request: Any) -> Any:
        try:
            return await method(request, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def _watch_call(self, job_id: str, after_seq: int, remaining: float | None) -> Any:
        request = pb.WatchRequest(job_id=job_id, after_seq=after_seq, coalesce_events=True)
        return self._stub.Watch(request, metadata=self._metadata, timeout=remaining)

    async def _follow(
        self,
        tracker: EventTracker,
        open_first: Callable[[float | None], Any],
        deadline: float | None,
        timeout: float | None,
    ) -> AsyncIterator[pb.JobEvent]:
        """Async twin of ``Client._follow``: new events until the job ends, resuming drops."""
        resumer = StreamResumer(tracker, self._retry, deadline, timeout)
        call = open_first(resumer.remaining())
        while True:
            try:
                async for message in call:
                    for event in unbundled(message):
                        if tracker.accept(event):
                            resumer.progressed()
                            yield event
                        if tracker.done:
                            return
                resumer.on_clean_end()
                tracker.accept_job((await self.get_job(tracker.job_id)).info)
                if tracker.done:
                    return
            except grpc.RpcError as exc:
                resumer.on_error(exc)
            finally:
                call.cancel()
            await asyncio.sleep(resumer.next_delay())
            call = self._stub.Watch(
                resumer.watch_request(), metadata=self._metadata, timeout=resumer.remaining()
            )


class AsyncJob(JobHandleBase):
    """A handle on one job for asyncio code; see ``secant.Job``."""

    def __init__(self, client: AsyncClient, job_id: str, info: pb.Job | None = None) -> None:
        super().__init__(job_id, info)
        self._client = client

    async def events(self, after_seq: int | None = None) -> AsyncIterator[pb.JobEvent]:
        """``async for`` over JobEvent protos with seq > after_seq until the job ends."""
        start = 0 if after_seq is None else after_seq
        stream_tracker = EventTracker(self.id, batch=self._batch)
        stream_tracker.last_seq = start
        async for event in self._client._follow(
            stream_tracker,
            lambda remaining: self._client._watch_call(self.id, start, remaining),
            None,
            None,
        ):
            self._tracker.accept(event)
            yield event
        if stream_tracker.done and not self._tracker.done:
            self._tracker.adopt_outcome(stream_tracker)

    async def result(self, timeout: float | None = None) -> OptimizeResult:
        """Waits for the job to end and returns its result; see ``Job.result``."""
        if not self._tracker.done:
            deadline = None if timeout is None else time.monotonic() + timeout
            async for _ in self._client._follow(
                self._tracker,
                lambda remaining: self._client._watch_call(
                    self.id, self._tracker.last_seq, remaining
                ),
                deadline,
                timeout,
            ):
                pass
        return self._tracker.outcome()

    async def cancel(self) -> AsyncJob:
        """Asks the server to stop the job (returns at once; the job ends CANCELLED)."""
        self._apply_info((await self._client.cancel(self.id)).info)
        return self

    async def refresh(self) -> AsyncJob:
        """Fetches the job record (one GetJob call) and updates ``state`` and ``info``."""
        self._apply_info((await self._client.get_job(self.id)).info)
        return self


class AsyncBatchJob(AsyncJob):
    """A vectorized batch job for asyncio code; see ``secant.BatchJob``."""

    _batch = True

    async def result(  # type: ignore[override]
        self, timeout: float | None = None, progress: bool = False
    ) -> BatchSolveResult:
        """Waits for the job to end; ``progress=True`` shows members finished meanwhile."""
        if progress and not self._tracker.done:
            self._tracker.attach_progress(BatchProgressBar(self._tracker.members or None))
        try:
            return await super().result(timeout=timeout)  # type: ignore[return-value]
        finally:
            self._tracker.close_progress()


class AsyncBatch:
    """Jobs submitted together under one ``batch_id``, for asyncio code."""

    def __init__(self, batch_id: str, jobs: list[AsyncJob]) -> None:
        self.batch_id = batch_id
        self.jobs = jobs

    async def results(
        self, timeout: float | None = None, return_exceptions: bool = False
    ) -> list[OptimizeResult | SecantError]:
        """Every job's result in submission order, awaited concurrently (one stream each)."""
        outcomes = await asyncio.gather(
            *(job.result(timeout=timeout) for job in self.jobs),
            return_exceptions=return_exceptions,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, SecantError):
                raise outcome
        return list(outcomes)

    async def cancel(self) -> None:
        """Cancels every job of the batch that has not ended."""
        await asyncio.gather(*(job.cancel() for job in self.jobs if not job.state.is_terminal))

    def __iter__(self):
        return iter(self.jobs)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> AsyncJob:
        return self.jobs[index]

    def __repr__(self) -> str:
        return f"AsyncBatch(batch_id={self.batch_id!r}, jobs={len(self.jobs)})"
