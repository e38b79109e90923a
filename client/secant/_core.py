"""What the sync and async clients share: connection settings, request building, retry
policy, and a sans-IO tracker that folds a job's event stream into its result.

The clients only move bytes (blocking or with await); every decision about what an event
means, when a job is over, and whether a dropped stream may be resumed is made here, once.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from secant._batch import BatchSolveResult
from secant._errors import SecantError, from_rpc_error, status_code_from_name
from secant._problem import build_problem
from secant._result import IterateRecord, JobState, OptimizeResult
from secant.v1 import optimizer_pb2 as pb

DEFAULT_ADDRESS = "127.0.0.1:50051"
SERVICE_NAME = "secant.v1.Optimizer"
USER_AGENT = "secant-python/0.1"
# The server enforces its own limits; the client should never be the one refusing a result.
MAX_MESSAGE_BYTES = 512 * 1024 * 1024

# Unary calls that are safe to send twice: reads, cancel, and Submit (the client always sends
# an idempotency key). gRPC retries them itself on UNAVAILABLE. Streams are resumed by hand,
# with Watch from the last sequence number seen (see EventTracker).
_RETRY_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": SERVICE_NAME, "method": method}
                    for method in ("Submit", "GetJob", "ListJobs", "CancelJob")
                ],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


@dataclass(frozen=True)
class TLSConfig:
    """TLS settings; each field is PEM bytes, or a path (str/Path) to a PEM file.

    ``root_certificates`` None means the system roots; ``certificate_chain`` and
    ``private_key`` together give a client certificate (mutual TLS); ``server_name``
    overrides the name checked against the server's certificate (e.g. dialing an IP).
    """

    root_certificates: bytes | str | Path | None = None
    certificate_chain: bytes | str | Path | None = None
    private_key: bytes | str | Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """Reads the files (if paths) and builds channel credentials."""
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.root_certificates),
            private_key=_pem(self.private_key),
            certificate_chain=_pem(self.certificate_chain),
        )


def _pem(value: bytes | str | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).expanduser().read_bytes()


# Environment variables the clients (and so the CLI) fall back on when an argument is None.
ENV_TOKEN = "SECANT_TOKEN"
ENV_TLS = "SECANT_TLS"  # "1": TLS with the system roots
ENV_TLS_ROOT_CERT = "SECANT_TLS_ROOT_CERT"
ENV_TLS_CERT = "SECANT_TLS_CERT"  # client certificate chain (mutual TLS)
ENV_TLS_KEY = "SECANT_TLS_KEY"
ENV_TLS_SERVER_NAME = "SECANT_TLS_SERVER_NAME"


def token_from_env(token: str | None) -> str | None:
    """``token``, or SECANT_TOKEN when it is None ("" means: send none)."""
    if token is None:
        token = os.environ.get(ENV_TOKEN) or None
    return token or None


def tls_from_env(tls: bool | TLSConfig | None) -> bool | TLSConfig | None:
    """``tls``, or when it is None the SECANT_TLS_* variables: a root CA, a client
    certificate and key, a server name override; SECANT_TLS=1 alone means system roots.
    ``tls=False`` is plaintext whatever the environment says."""
    if tls is not None:
        return tls
    env = os.environ
    root, cert, key, name = (
        env.get(ENV_TLS_ROOT_CERT) or None,
        env.get(ENV_TLS_CERT) or None,
        env.get(ENV_TLS_KEY) or None,
        env.get(ENV_TLS_SERVER_NAME) or None,
    )
    if root or cert or key or name:
        return TLSConfig(root_certificates=root, certificate_chain=cert, private_key=key,
                         server_name=name)
    if env.get(ENV_TLS, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return None


def channel_settings(
    tls: bool | TLSConfig | None,
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
    """(credentials or None for plaintext, channel options) for both grpc and grpc.aio."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.primary_user_agent", USER_AGENT),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", _RETRY_SERVICE_CONFIG),
    ]
    if tls is None or tls is False:
        return None, options
    if tls is True:
        return grpc.ssl_channel_credentials(), options
    if isinstance(tls, TLSConfig):
        if tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        return tls.credentials(), options
    raise TypeError(f"tls must be None, True or secant.TLSConfig, got {type(tls).__name__}")


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Per-call metadata: the bearer token, when there is one."""
    if token and any(c.isspace() for c in token):
        raise ValueError("token: a bearer token has no whitespace (check SECANT_TOKEN / --token)")
    return (("authorization", f"Bearer {token}"),) if token else ()


@dataclass(frozen=True)
class RetryPolicy:
    """How a dropped event stream is resumed: up to ``max_attempts`` reconnects in a row
    (reset whenever a new event arrives), waiting an exponentially growing, jittered delay.
    """

    max_attempts: int = 6
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 3.0
    multiplier: float = 2.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before reconnect number ``attempt`` (1-based); full jitter."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


# A stream that ends with one of these codes lost its connection, not its job: resume it.
_RESUMABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})


def is_resumable(error: grpc.RpcError) -> bool:
    code = error.code() if callable(getattr(error, "code", None)) else None
    if code in _RESUMABLE_CODES:
        return True
    # A connection reset can surface as INTERNAL with an HTTP/2 RST_STREAM detail.
    details = (error.details() or "") if callable(getattr(error, "details", None)) else ""
    return code == grpc.StatusCode.INTERNAL and "RST_STREAM" in details


def lost_stream_error(job_id: str, last_seq: int, attempts: int, cause: str) -> SecantError:
    return SecantError(
        f"lost the event stream of job {job_id} after {attempts} reconnect attempts ({cause}); "
        f"the job goes on and its events are kept: resume with "
        f"get_job({job_id!r}).events(after_seq={last_seq}) or .result()",
        grpc.StatusCode.UNAVAILABLE,
    )


def deadline_error(job_id: str, timeout: float | None) -> SecantError:
    return SecantError(
        f"job {job_id} did not finish within {timeout} s; it is still running",
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )


def problem_from(spec: pb.Problem | Mapping[str, Any]) -> pb.Problem:
    """A batch entry: a built wire Problem, or a mapping of ``minimize`` keyword arguments."""
    if isinstance(spec, pb.Problem):
        return spec
    if isinstance(spec, Mapping):
        return build_problem(**spec)
    raise SecantError(
        f"each batch problem must be a mapping of minimize() arguments or a secant.v1 Problem, "
        f"got {type(spec).__name__}",
        grpc.StatusCode.INVALID_ARGUMENT,
    )


def list_request(
    state: JobState | int | str | None,
    method: str | None,
    batch_id: str | None,
    page_size: int,
    page_token: str = "",
) -> pb.ListJobsRequest:
    try:
        wire_state = int(JobState.parse(state)) if state is not None else 0
    except ValueError as exc:
        raise SecantError(str(exc), grpc.StatusCode.INVALID_ARGUMENT) from exc
    return pb.ListJobsRequest(
        state=wire_state,
        method=method or "",
        batch_id=batch_id or "",
        page_size=page_size,
        page_token=page_token,
    )


class ProgressBar:
    """A tqdm bar fed by iterate events (f and gradient norm in the postfix).

    tqdm is an optional extra, imported on first use; its own refresh throttling keeps the
    cost per event to a few microseconds.
    """

    def __init__(self, total: int | None = None, description: str = "secant") -> None:
        try:
            from tqdm.auto import tqdm
        except ImportError as exc:
            raise ImportError("progress=True needs tqdm: pip install 'secant[progress]'") from exc
        self._bar = tqdm(total=total, desc=description, unit="it", dynamic_ncols=True)

    def update(self, iterate: pb.Iterate) -> None:
        self._bar.set_postfix(f=f"{iterate.f:.6g}", gnorm=f"{iterate.grad_norm:.3g}", refresh=False)
        advance = int(iterate.iteration) - self._bar.n
        if advance > 0:
            self._bar.update(advance)

    def set_description(self, text: str) -> None:
        self._bar.set_description(text, refresh=False)

    def close(self) -> None:
        self._bar.close()


class EventTracker:
    """Folds one job's events into what is known about it (sans-IO, shared by both clients).

    Events at or below ``last_seq`` are duplicates from a replay and are dropped, so feeding
    a resumed stream is always safe. Memory: one small record per iterate (plus x when the
    caller asked for it).
    """

    def __init__(
        self, job_id: str = "", progress: ProgressBar | None = None, batch: bool = False
    ) -> None:
        self.job_id = job_id
        self.last_seq = 0
        self.state = JobState.UNSPECIFIED
        self.method = ""
        self.batch_id = ""
        # A vectorized batch job (known from the caller, Accepted.members or the result):
        # its result is a BatchSolveResult.
        self.batch = batch
        self.members = 0
        self.history: list[IterateRecord] = []
        self.result: OptimizeResult | BatchSolveResult | None = None
        self.failure: SecantError | None = None
        self.gaps = 0  # events the server skipped (it should never; counted for diagnosis)
        self._progress = progress

    @property
    def done(self) -> bool:
        return self.result is not None or self.failure is not None

    def accept(self, event: pb.JobEvent) -> bool:
        """Applies one event; False (and no change) for a duplicate already seen."""
        if event.seq and event.seq <= self.last_seq:
            return False
        if event.seq > self.last_seq + 1 and self.last_seq:
            self.gaps += event.seq - self.last_seq - 1
        self.last_seq = max(self.last_seq, int(event.seq))
        if event.job_id and not self.job_id:
            self.job_id = event.job_id
        kind = event.WhichOneof("kind")
        if kind == "accepted":
            self.state = JobState.parse(event.accepted.state or pb.QUEUED)
            self.method = event.accepted.method
            self.batch_id = event.accepted.batch_id
            self.members = int(event.accepted.members)
            self.batch = self.batch or self.members > 0
        elif kind == "iterate":
            self.state = JobState.RUNNING
            self.history.append(IterateRecord.from_proto(event.iterate))
            if self._progress is not None:
                self._progress.update(event.iterate)
        elif kind == "state_change":
            self.state = JobState.parse(event.state_change.state)
        elif kind == "result":
            self._finish_with_result(event.result)
        elif kind == "failure":
            self._finish_with_failure(event.failure)
        return True

    def accept_job(self, job: pb.Job, finish: bool = True) -> None:
        """Applies a job record (GetJob/ListJobs). With ``finish``, an ended job's stored
        result (or failure) ends the tracker; without, only the state is taken, so a later
        replay of the events still collects the iterate history."""
        self.job_id = self.job_id or job.job_id
        self.state = JobState.parse(job.state)
        self.method = job.method or self.method
        self.batch_id = job.batch_id or self.batch_id
        if not finish or self.done or not self.state.is_terminal:
            return
        if job.HasField("result"):
            self._finish_with_result(job.result)
        elif job.HasField("failure"):
            self._finish_with_failure(job.failure)

    def _finish_with_result(self, result: pb.Result) -> None:
        if self.batch or result.HasField("batch"):
            self.result = BatchSolveResult.from_proto(
                result, job_id=self.job_id, history=self.history
            )
        else:
            self.result = OptimizeResult.from_proto(
                result, job_id=self.job_id, history=self.history
            )
        if not self.state.is_terminal:
            if result.success:
                self.state = JobState.SUCCEEDED
            elif result.status == pb.CANCELLED_BY_USER:
                self.state = JobState.CANCELLED
            else:
                self.state = JobState.FAILED
        self.close_progress()

    def _finish_with_failure(self, failure: pb.Failure) -> None:
        self.failure = SecantError(
            f"job {self.job_id} failed: {failure.message}", status_code_from_name(failure.code)
        )
        if not self.state.is_terminal:
            self.state = JobState.FAILED
        self.close_progress()

    def adopt_outcome(self, other: EventTracker) -> None:
        """Takes another tracker's ending (one that learned it from the job record)."""
        self.result, self.failure = other.result, other.failure
        self.state = other.state

    def attach_progress(self, progress: Any) -> None:
        """Feeds later iterate events to ``progress`` (anything with update(iterate), close())."""
        self.close_progress()
        self._progress = progress

    def close_progress(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def outcome(self) -> OptimizeResult | BatchSolveResult:
        """The result (OptimizeResult, or BatchSolveResult for a batch job), or raises the
        job's failure as a SecantError."""
        if self.failure is not None:
            raise self.failure
        if self.result is None:
            raise SecantError(
                f"job {self.job_id} has not finished", grpc.StatusCode.FAILED_PRECONDITION
            )
        return self.result


def progress_total(options: Mapping[str, Any] | None) -> int | None:
    """The bar's length: the iteration cap, when the caller set one."""
    for key in ("max_iter", "maxiter"):
        value = (options or {}).get(key)
        if isinstance(value, int | float) and math.isfinite(value) and value > 0:
            return int(value)
    return None


def new_idempotency_key() -> str:
    import uuid

    return uuid.uuid4().hex


class JobHandleBase:
    """What sync and async job handles share: identity and last known state (no I/O)."""

    _batch = False  # batch job handles decode the result as a BatchSolveResult

    def __init__(self, job_id: str, info: pb.Job | None = None) -> None:
        self._tracker = EventTracker(job_id, batch=self._batch)
        self._info = info
        if info is not None:
            self._tracker.accept_job(info, finish=False)

    @property
    def id(self) -> str:
        return self._tracker.job_id

    @property
    def state(self) -> JobState:
        """Last known state, from the events seen and the last refresh(); costs no RPC."""
        return self._tracker.state

    @property
    def info(self) -> pb.Job | None:
        """The job record from the last GetJob/ListJobs/Submit reply (None if never fetched)."""
        return self._info

    @property
    def last_seq(self) -> int:
        """Sequence number of the last event this handle has seen (0: none)."""
        return self._tracker.last_seq

    def _apply_info(self, info: pb.Job) -> None:
        self._info = info
        if not self._tracker.done:
            self._tracker.accept_job(info, finish=False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, state={self.state.name})"


class StreamResumer:
    """The decisions of following a job's stream, shared by the blocking and asyncio loops.

    A loop opens a stream, feeds events to ``tracker`` (calling ``progressed()`` on each new
    one), and when the stream breaks asks this object what to do: ``on_error`` raises unless
    the break is a lost connection of a known job; ``on_clean_end`` says whether to consult
    the job record; ``next_delay`` counts the reconnect (raising after too many in a row)
    and says how long to wait before a Watch from ``tracker.last_seq``.
    """

    def __init__(
        self,
        tracker: EventTracker,
        policy: RetryPolicy,
        deadline: float | None = None,
        timeout: float | None = None,
    ) -> None:
        self.tracker = tracker
        self.policy = policy
        self.deadline = deadline
        self.timeout = timeout
        self.attempts = 0
        self.cause = ""

    def remaining(self) -> float | None:
        """Seconds left before the caller's deadline (None: no deadline)."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def progressed(self) -> None:
        self.attempts = 0  # a new event arrived: the connection works again

    def on_error(self, error: grpc.RpcError) -> None:
        """Raises SecantError unless the stream may be resumed."""
        code = error.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and self.deadline is not None:
            raise deadline_error(self.tracker.job_id, self.timeout) from None
        if not (is_resumable(error) and self.tracker.job_id):
            raise from_rpc_error(error) from None
        self.cause = f"{code.name}: {error.details()}"

    def on_clean_end(self) -> None:
        """The server closed the stream before the job's last event (a gateway shutting down,
        say): the caller should read the job record (GetJob) and feed it to the tracker."""
        if not self.tracker.job_id:
            raise SecantError(
                "the server closed the stream before naming the job", grpc.StatusCode.UNAVAILABLE
            )
        self.cause = "the stream closed before the job ended"

    def next_delay(self) -> float:
        """Counts one reconnect; raises after too many in a row or past the deadline."""
        self.attempts += 1
        if self.attempts > self.policy.max_attempts:
            raise lost_stream_error(
                self.tracker.job_id, self.tracker.last_seq, self.attempts - 1, self.cause
            )
        delay = self.policy.delay(self.attempts)
        remaining = self.remaining()
        if remaining is not None and remaining <= delay:
            raise deadline_error(self.tracker.job_id, self.timeout)
        return delay

    def watch_request(self) -> pb.WatchRequest:
        return pb.WatchRequest(
            job_id=self.tracker.job_id, after_seq=self.tracker.last_seq, coalesce_events=True
        )


def unbundled(message: pb.JobEvent) -> tuple[pb.JobEvent, ...]:
    """The events one stream message carries: itself, then those it brought along in `more`
    (the clients ask for coalesced streams, SolveRequest.coalesce_events: a small solve's
    iterates and result arrive as one message instead of dozens). The first comes back
    without `more`, so every event is a plain JobEvent, as from a server that never
    coalesces."""
    if not len(message.more):
        return (message,)
    rest = tuple(message.more)
    message.ClearField("more")
    return (message, *rest)
