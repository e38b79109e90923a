"""The blocking client: ``secant.Client``, its ``Job`` handles and ``Batch``."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import grpc

from secant._batch import BatchObjective, BatchProgressBar, BatchSolveResult, build_batch_problem
from secant._callbacks import CallbackEvaluator, callback_start
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
from secant._training import (
    MemoryPlan,
    TrainRun,
    build_plan_request,
    build_train_request,
    collect_training,
    load_train_spec,
)
from secant.v1 import optimizer_pb2 as pb
from secant.v1 import optimizer_pb2_grpc as pb_grpc


class Client:
    """A connection to a secant gateway; thread-safe, cheap to share, close when done.

    ``token`` is sent as ``authorization: Bearer <token>`` on every call; None reads
    SECANT_TOKEN. ``tls`` is False (plaintext, for loopback), True (system roots) or a
    ``secant.TLSConfig``; None reads SECANT_TLS_ROOT_CERT / SECANT_TLS_CERT / SECANT_TLS_KEY /
    SECANT_TLS_SERVER_NAME (or SECANT_TLS=1 for system roots) and is plaintext without them.
    Opening costs nothing until the first call connects.

    >>> with secant.Client("127.0.0.1:50051") as client:
    ...     res = client.minimize("sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)", [-1.2, 1.0])
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
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            self._channel = grpc.secure_channel(address, credentials, options=options)
        self._stub = pb_grpc.OptimizerStub(self._channel)
        self._metadata = call_metadata(token_from_env(token))
        self._retry = retry or RetryPolicy()

    # -- solving ---------------------------------------------------------------------------

    def minimize(
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
        *,
        jac: Any = None,
        hessp: Callable[..., Any] | None = None,
        args: tuple = (),
        on_job: Callable[[str], None] | None = None,
    ) -> OptimizeResult:
        """Solves one problem and returns its scipy-compatible result (one Solve stream).

        ``objective`` is a DSL string (or Expression/Residual) the server evaluates, or a
        Python callable ``fun(x, *args) -> float`` that this process evaluates when the server
        asks (callback mode, over one SolveWithCallbacks stream): ``jac`` as in scipy (a
        callable, True when fun returns (f, g), or None for finite differences), ``hessp``
        for newton-cg. ``on_job(job_id)`` is called once the job exists (to resume it after a
        crash with ``resume_callbacks``).

        Blocks until the job ends; ``progress=True`` draws a tqdm bar from the stream. A
        dropped connection is resumed with Watch from the last event seen. A job that ends
        without converging still returns (``success`` False, scipy-like ``status``); a job
        that errors raises SecantError. Raises SecantError(DEADLINE_EXCEEDED) after
        ``timeout`` seconds (the job goes on; find it with ``jobs()``).
        """
        if callable(objective):
            evaluator = CallbackEvaluator(objective, jac, hessp, args)
            problem = build_problem(
                None, x0, method, bounds, data, options, report_x_every, device, dtype, labels
            )
            bar = ProgressBar(progress_total(options)) if progress else None
            return self._solve_with_callbacks(
                callback_start(problem, evaluator), evaluator, EventTracker(progress=bar),
                on_job, timeout,
            )
        problem = build_problem(
            objective, x0, method, bounds, data, options, report_x_every, device, dtype, labels
        )
        bar = ProgressBar(progress_total(options)) if progress else None
        tracker = EventTracker(progress=bar)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            for _ in self._follow(
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

    def resume_callbacks(
        self,
        job_id: str,
        fun: Callable[..., Any],
        *,
        jac: Any = None,
        hessp: Callable[..., Any] | None = None,
        args: tuple = (),
        timeout: float | None = None,
    ) -> OptimizeResult:
        """Reattaches to a callback job waiting for its caller (a crashed or disconnected
        process) and finishes it from its last checkpoint; same result as uninterrupted."""
        evaluator = CallbackEvaluator(fun, jac, hessp, args)
        start = callback_start(pb.Problem(), evaluator, resume_job_id=job_id)
        return self._solve_with_callbacks(
            start, evaluator, EventTracker(job_id=job_id), None, timeout
        )

    def _solve_with_callbacks(
        self,
        start: pb.CallbackClientMessage,
        evaluator: CallbackEvaluator,
        tracker: EventTracker,
        on_job: Callable[[str], None] | None,
        timeout: float | None,
    ) -> OptimizeResult:
        outbox: queue.SimpleQueue = queue.SimpleQueue()
        outbox.put(start)

        def requests() -> Iterator[pb.CallbackClientMessage]:
            while True:
                message = outbox.get()
                if message is None:
                    return
                yield message

        call = self._stub.SolveWithCallbacks(
            requests(), metadata=self._metadata, timeout=timeout
        )
        announced = False
        try:
            for message in call:
                for event in message.events:
                    tracker.accept(event)
                if message.HasField("event"):
                    tracker.accept(message.event)
                if not announced and tracker.job_id and on_job is not None:
                    announced = True
                    on_job(tracker.job_id)
                if message.HasField("request"):
                    outbox.put(evaluator.answer_message(message.request))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            outbox.put(None)
            tracker.close_progress()
            call.cancel()
        return tracker.outcome()

    def train(
        self,
        spec: Mapping[str, Any] | str,
        data: Mapping[str, Any] | None = None,
        *,
        progress: bool = False,
        timeout: float | None = None,
    ) -> TrainRun:
        """Trains a model and returns the finished run (metrics, step history, weights).

        ``spec`` (a dict or a YAML file): model, loss, optimizer, batch_size, steps/epochs,
        seed, validation_fraction, ``dataset``, ``data_uri`` (a file under the server's
        --data-root) or ``data={"X": X, "y": y}``, ``workers``, ``checkpoint_every``
        (docs/training.md). ``spec["model"]`` may be a zoo dict or, on a server started with
        --trust-code, your own ``torch.nn.Module`` (sent pickled) or
        ``torch.export.ExportedProgram``; ``run.model()`` then returns it with the weights.
        """
        spec = load_train_spec(spec)
        request = build_train_request(spec, data, new_idempotency_key())
        bar = ProgressBar(spec.get("steps")) if progress else None
        update = None
        if bar is not None:
            def update(metrics: pb.Metrics) -> None:
                bar.update(pb.Iterate(iteration=metrics.step, f=metrics.values.get("loss", 0)))
        try:
            return collect_training(
                self._stub.Train(request, metadata=self._metadata, timeout=timeout), spec,
                self._artifact, update,
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            if bar is not None:
                bar.close()

    def plan(
        self,
        model: Mapping[str, Any] | None = None,
        *,
        workers: int | None = None,
        batch: int | None = None,
        precision: str | None = None,
        amp: bool = False,
        budget: int | str | None = None,
        spec: Mapping[str, Any] | str | None = None,
        timeout: float | None = None,
    ) -> MemoryPlan:
        """The memory plan of a training job, before it runs: per ZeRO stage 0-3, with and
        without activation checkpointing and gradient accumulation, the parameter, gradient,
        optimizer-state and activation bytes one worker holds, and the configuration that
        fits ``budget`` (bytes or "16GiB" per worker; default the spec's or the server's)
        at the lowest step time. ``model`` is a zoo model dict; or pass a training ``spec``
        (a dict or YAML file). ``precision`` fp32 | bf16 | fp16 (``amp=True``: bf16)."""
        request = build_plan_request(model, spec=spec, workers=workers, batch=batch,
                                     precision=precision, amp=amp, budget=budget)
        return MemoryPlan.from_proto(self._unary(self._stub.Plan, request, timeout))

    def _artifact(self, job_id: str, name: str) -> bytes:
        return self._unary(
            self._stub.GetArtifact, pb.GetArtifactRequest(job_id=job_id, name=name)
        ).data

    def submit(
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
    ) -> Job:
        """Submits one problem and returns its Job at once (stored durably before the reply).

        Safe to retry: the request carries an idempotency key (a fresh one unless given), so
        a resend after a lost reply returns the same job.
        """
        problem = build_problem(
            objective, x0, method, bounds, data, options, report_x_every, device, dtype, labels
        )
        request = pb.SubmitRequest(
            problem=problem, idempotency_key=idempotency_key or new_idempotency_key()
        )
        info = self._unary(self._stub.Submit, request)
        return Job(self, info.job_id, info)

    def minimize_batch(
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
        """Solves B same-shape problems as one vectorized job; returns every member's result.

        ``X0`` is (B, n), one start per member. ``objective`` is written for ONE member, as
        for ``minimize`` (a DSL string, ``secant.Expression`` or ``secant.Residual``);
        ``data`` is shared by all members, and each ``member_data`` array has a leading
        dimension B (member i sees ``array[i]`` under its name). ``bounds``: (n,) for every
        member or (B, n) per member (see ``build_batch_problem``). ``chunk_size`` is members
        per CPU worker chunk (0: the server's default). One Submit, then the job's events:
        ``progress=True`` shows members finished (tqdm if installed, else a stderr line).

        A member that does not converge (or whose start holds NaN) only has its own
        ``status``; a job that errors raises SecantError, as does ``timeout`` (the job goes
        on: ``get_batch_job(job_id).result()``).
        """
        job = self.submit_batch_problem(
            objective, X0, data=data, member_data=member_data, method=method, bounds=bounds,
            options=options, dtype=dtype, device=device, chunk_size=chunk_size, labels=labels,
        )  # fmt: skip
        return job.result(timeout=timeout, progress=progress)

    def submit_batch_problem(
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
    ) -> BatchJob:
        """Submits a vectorized batch (one job, see ``minimize_batch``) and returns at once.

        The handle's ``result()`` is a BatchSolveResult. Safe to retry (idempotency key).
        """
        problem = build_batch_problem(
            objective, X0, data=data, member_data=member_data, method=method, bounds=bounds,
            options=options, dtype=dtype, device=device, chunk_size=chunk_size, labels=labels,
        )  # fmt: skip
        request = pb.SubmitRequest(
            problem=problem, idempotency_key=idempotency_key or new_idempotency_key()
        )
        info = self._unary(self._stub.Submit, request)
        return BatchJob(self, info.job_id, info)

    def get_batch_job(self, job_id: str) -> BatchJob:
        """A vectorized batch job's handle by id (one GetJob call)."""
        info = self._unary(self._stub.GetJob, pb.GetJobRequest(job_id=job_id))
        return BatchJob(self, info.job_id, info)

    def submit_batch(self, problems: Iterable[pb.Problem | Mapping[str, Any]]) -> Batch:
        """Submits many problems in one call, each its own job under one batch id.

        Each entry is a mapping of ``minimize`` keyword arguments (objective, x0, method, ...)
        or a built ``secant.v1`` Problem. The whole batch is one message: keep it under the
        server's message size limit.
        """
        request = pb.SubmitBatchRequest(problems=[problem_from(p) for p in problems])
        reply = self._unary(self._stub.SubmitBatch, request)
        return Batch(reply.batch_id, [Job(self, info.job_id, info) for info in reply.jobs])

    # -- jobs ------------------------------------------------------------------------------

    def get_job(self, job_id: str) -> Job:
        """The job's current record (one GetJob call); NOT_FOUND raises SecantError."""
        info = self._unary(self._stub.GetJob, pb.GetJobRequest(job_id=job_id))
        return Job(self, info.job_id, info)

    def cancel(self, job_id: str) -> Job:
        """Asks the server to stop the job; it ends CANCELLED with its last iterate."""
        info = self._unary(self._stub.CancelJob, pb.CancelJobRequest(job_id=job_id))
        return Job(self, info.job_id, info)

    def jobs(
        self,
        state: JobState | int | str | None = None,
        method: str | None = None,
        batch_id: str | None = None,
        page_size: int = 0,
    ) -> Iterator[Job]:
        """Every job matching the filters, newest pages fetched lazily (one call per page)."""
        token = ""
        while True:
            request = list_request(state, method, batch_id, page_size, token)
            reply = self._unary(self._stub.ListJobs, request)
            for info in reply.jobs:
                yield Job(self, info.job_id, info)
            token = reply.next_page_token
            if not token:
                return

    def watch(self, job_id: str, after_seq: int = 0) -> Iterator[pb.JobEvent]:
        """The job's events with seq > after_seq, then live ones until it ends (resumes
        across dropped connections)."""
        return Job(self, job_id).events(after_seq=after_seq)

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the channel; streams in flight end with CANCELLED."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(address={self.address!r})"

    # -- plumbing --------------------------------------------------------------------------

    def _unary(self, method: Callable[..., Any], request: Any, timeout: float | None = None) -> Any:
        try:
            return method(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def _watch_call(self, job_id: str, after_seq: int, remaining: float | None) -> Any:
        request = pb.WatchRequest(job_id=job_id, after_seq=after_seq, coalesce_events=True)
        return self._stub.Watch(request, metadata=self._metadata, timeout=remaining)

    def _follow(
        self,
        tracker: EventTracker,
        open_first: Callable[[float | None], Any],
        deadline: float | None,
        timeout: float | None,
    ) -> Iterator[pb.JobEvent]:
        """Yields the job's new events until it ends, resuming dropped streams with Watch.

        ``open_first`` opens the first stream (Solve, or Watch); every reconnect is a Watch
        from ``tracker.last_seq``, so nothing is lost or repeated.
        """
        resumer = StreamResumer(tracker, self._retry, deadline, timeout)
        call = open_first(resumer.remaining())
        while True:
            try:
                for message in call:
                    for event in unbundled(message):
                        if tracker.accept(event):
                            resumer.progressed()
                            yield event
                        if tracker.done:
                            return
                resumer.on_clean_end()
                tracker.accept_job(self.get_job(tracker.job_id).info)
                if tracker.done:
                    return
            except grpc.RpcError as exc:
                resumer.on_error(exc)
            finally:
                call.cancel()  # no-op once finished; frees the stream if the caller stopped early
            time.sleep(resumer.next_delay())
            call = self._stub.Watch(
                resumer.watch_request(), metadata=self._metadata, timeout=resumer.remaining()
            )


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class Job(JobHandleBase):
    """A handle on one job: follow its events, wait for its result, cancel it.

    Handles are cheap (no connection of their own); ``state`` is the last known state.
    """

    def __init__(self, client: Client, job_id: str, info: pb.Job | None = None) -> None:
        super().__init__(job_id, info)
        self._client = client

    def events(self, after_seq: int | None = None) -> Iterator[pb.JobEvent]:
        """Yields ``secant.v1.JobEvent`` protos with seq > after_seq until the job ends.

        ``after_seq`` None starts from the beginning (a full replay, then live). Resumes
        across dropped connections; stopping the iteration early closes the stream.
        """
        start = 0 if after_seq is None else after_seq
        # A separate tracker for the yielded sequence (the caller may replay from any point);
        # the handle's own tracker keeps the history and the result.
        stream_tracker = EventTracker(self.id, batch=self._batch)
        stream_tracker.last_seq = start
        for event in self._client._follow(
            stream_tracker,
            lambda remaining: self._client._watch_call(self.id, start, remaining),
            None,
            None,
        ):
            self._tracker.accept(event)
            yield event
        if stream_tracker.done and not self._tracker.done:  # ended via GetJob, not an event
            self._tracker.adopt_outcome(stream_tracker)

    def result(self, timeout: float | None = None) -> OptimizeResult:
        """Waits for the job to end and returns its result (history included).

        Replays the job's events the handle has not seen yet (one Watch stream), so a
        handle from ``jobs()`` or ``get_job()`` also gets the iterate history. Raises the
        job's failure as SecantError, or SecantError(DEADLINE_EXCEEDED) after ``timeout``.
        """
        if not self._tracker.done:
            deadline = None if timeout is None else time.monotonic() + timeout
            for _ in self._client._follow(
                self._tracker,
                lambda remaining: self._client._watch_call(
                    self.id, self._tracker.last_seq, remaining
                ),
                deadline,
                timeout,
            ):
                pass
        return self._tracker.outcome()

    def cancel(self) -> Job:
        """Asks the server to stop the job (returns at once; the job ends CANCELLED)."""
        self._apply_info(self._client.cancel(self.id).info)
        return self

    def refresh(self) -> Job:
        """Fetches the job record (one GetJob call) and updates ``state`` and ``info``."""
        self._apply_info(self._client.get_job(self.id).info)
        return self


class BatchJob(Job):
    """A handle on one vectorized batch job (``submit_batch_problem``); its result is a
    BatchSolveResult with every member's outcome."""

    _batch = True

    def result(  # type: ignore[override]
        self, timeout: float | None = None, progress: bool = False
    ) -> BatchSolveResult:
        """Waits for the job to end; ``progress=True`` shows members finished meanwhile."""
        if progress and not self._tracker.done:
            self._tracker.attach_progress(BatchProgressBar(self._tracker.members or None))
        try:
            return super().result(timeout=timeout)  # type: ignore[return-value]
        finally:
            self._tracker.close_progress()


class Batch:
    """Jobs submitted together under one ``batch_id``."""

    def __init__(self, batch_id: str, jobs: list[Job]) -> None:
        self.batch_id = batch_id
        self.jobs = jobs

    def results(
        self, timeout: float | None = None, return_exceptions: bool = False
    ) -> list[OptimizeResult | SecantError]:
        """Every job's result, in submission order; blocks until all have ended.

        Jobs run concurrently on the server, so waiting on them one by one costs about the
        slowest job's time plus one replay stream per job. A failed job raises its
        SecantError, or with ``return_exceptions`` takes its place in the list.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        results: list[OptimizeResult | SecantError] = []
        for job in self.jobs:
            try:
                results.append(job.result(timeout=_remaining(deadline)))
            except SecantError as exc:
                if not return_exceptions or exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
                results.append(exc)
        return results

    def cancel(self) -> None:
        """Cancels every job of the batch that has not ended."""
        for job in self.jobs:
            if not job.state.is_terminal:
                job.cancel()

    def __iter__(self) -> Iterator[Job]:
        return iter(self.jobs)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> Job:
        return self.jobs[index]

    def __repr__(self) -> str:
        return f"Batch(batch_id={self.batch_id!r}, jobs={len(self.jobs)})"
