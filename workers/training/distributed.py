"""Training jobs on Ray: N data-parallel worker actors forming a torch.distributed group by
hand (gloo on 127.0.0.1 for CPU, NCCL on GPU), per-step events streamed back as they happen,
safetensors checkpoints, restart from the last checkpoint when a worker is lost.

    outcome = run_training_job(spec, {"X": X, "y": y}, workers=2, emit=print,
                               should_stop=lambda: False, checkpoint_dir="/jobs/7/ckpt",
                               resume=False)
    model = load_weights(build_model(spec["model"]), outcome.weights)

`spec` is loop.py's training spec plus three job fields: `dataset` (a bundled set by name) or
`data_uri` (a .npz / .safetensors file under `data_root`, read by every worker itself: see
datasets.py), when `data` is None, and `checkpoint_every` (steps; 0: never; default 0).

Why plain actors rather than Ray Train's TorchTrainer: measured on this 2-core machine with
2 CPU workers, a TorchTrainer fit() of a trivial function took 14-26 s (FACTS: workers enter
the function ~11 s after fit(), ~6 s teardown, result.metrics sometimes None), while two
actors forming a gloo group took 1.5-5.5 s (mostly the worker processes importing torch) and
ray.kill tears them down at once. Ray Train's worker group is the same thing (actors + a
rendezvous); what we give up is FailureConfig, which `_run_attempts` replaces: any failure
with a dead worker restarts the whole group from the newest checkpoint, up to max_restarts.
A failure with every worker alive is a bug in the job (bad data, NaN, ...) and is raised.

Each worker actor is threaded (STYLE: long work off the actor's main thread): `train` runs on
one actor thread while `events` (a long poll, 0.2 s) and `stop` are served on others. The
driver waits on rank 0's event poll and on every worker's `train` at once, so a dead worker is
noticed within one poll. Stop is agreed across workers inside the step's all-reduce (loop.py),
so all workers end after the same step and rank 0 returns the weights as they are.

Costs: every attempt starts fresh worker processes (about 1.5-5 s here, each imports torch);
every worker holds the whole data set (uploaded tensors travel once through the object
store; a `data_uri` file is read by each worker, so large data never passes the gateway; a
sharded reader would plug in at `_TrainingWorker.train`); rank 0 writes the
checkpoints (the state is replicated in plain data parallelism).

Scaling plans (issue 8; the spec's `scaling` section, large_batch.ScalingSpec): the workers
run loop._Run.scaled, which wraps the model and optimizer with zero.wrap at the plan's ZeRO
stage (DDP, ZeroRedundancyOptimizer, FSDP2) instead of the hand-written gradient all-reduce.
After the first step of each attempt every worker measures the bytes it holds and rank 0
emits one MemoryReport with all ranks' numbers. Checkpoints stay one file written by rank 0:
at stages 1-3 every worker takes part in gathering the full weights (zero.full_model_state_
dict) and the optimizer state (consolidated onto rank 0 at stage 1, a full state dict at
stages 2-3), so a checkpoint resumes at any stage (and any worker count, for a new job) and
costs the unsharded state on rank 0 while it is written. Per-rank shard files would avoid
that peak; not needed at the sizes this service trains.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from .checkpoint import (
    TrainingState,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    spec_fingerprint,
)
from .datasets import inspect_data_file, load_dataset, open_data_uri, resolve_data_uri
from .loop import StepMetrics, TrainSpec, check_parallel, save_weights, train

JOB_KEYS = ("dataset", "checkpoint_every", "data_uri")
EVENT_POLL_S = 0.2
KEEP_CHECKPOINTS = 2


# ---------------------------------------------------------------- events (plain dataclasses)


@dataclass(frozen=True)
class WorkersStarted:
    attempt: int  # 0 for the first group, +1 per restart
    workers: int
    backend: str  # "gloo" | "nccl" | "none" (one worker)
    pids: tuple[int, ...]  # by rank
    startup_s: float  # actor creation + process group
    resumed_from_step: int  # 0: from scratch


@dataclass(frozen=True)
class StepEvent:
    step: int
    loss: float  # the global batch's loss
    lr: float
    damping: float | None
    step_time_s: float
    samples_per_s: float  # global batch rows per second
    train_loss: float | None
    attempt: int
    effective_batch: int | None = None  # examples per optimizer step: micro x accum x workers


@dataclass(frozen=True)
class MemoryReport:
    """What each worker held after the first step of an attempt (memory.MemoryProbe: bytes of
    parameters, gradients and optimizer state) next to the ZeRO formula for the stage (fp32
    Adam: 16P; stage 1: 8P + 8P/N; stage 2: 4P + 12P/N; stage 3: 16P/N). Tuples by rank."""

    attempt: int
    zero_stage: int
    workers: int
    implementation: str
    effective_batch: int | None
    parameter_count: int
    param_bytes: tuple[int, ...]
    grad_bytes: tuple[int, ...]
    optimizer_bytes: tuple[int, ...]
    at_rest_param_bytes: tuple[int, ...]
    formula_param_bytes: int
    formula_grad_bytes: int
    formula_optimizer_bytes: int

    @property
    def formula_bytes(self) -> int:
        return self.formula_param_bytes + self.formula_grad_bytes + self.formula_optimizer_bytes

    def as_metrics(self) -> dict[str, float]:
        """Flat, for a `metrics` job event: mem_*_bytes_rank<r>, mem_formula_*_bytes, ..."""
        flat: dict[str, float] = {
            "zero_stage": self.zero_stage, "workers": self.workers,
            "parameter_count": self.parameter_count,
            "mem_formula_param_bytes": self.formula_param_bytes,
            "mem_formula_grad_bytes": self.formula_grad_bytes,
            "mem_formula_optimizer_bytes": self.formula_optimizer_bytes,
            "mem_formula_bytes": self.formula_bytes,
        }
        if self.effective_batch is not None:
            flat["effective_batch"] = self.effective_batch
        for rank in range(self.workers):
            total = (self.param_bytes[rank] + self.grad_bytes[rank]
                     + self.optimizer_bytes[rank])
            flat |= {f"mem_param_bytes_rank{rank}": self.param_bytes[rank],
                     f"mem_grad_bytes_rank{rank}": self.grad_bytes[rank],
                     f"mem_optimizer_bytes_rank{rank}": self.optimizer_bytes[rank],
                     f"mem_total_bytes_rank{rank}": total,
                     f"mem_ratio_rank{rank}": total / self.formula_bytes
                     if self.formula_bytes else math.nan}
        return {k: float(v) for k, v in flat.items()}


@dataclass(frozen=True)
class CheckpointSaved:
    step: int
    path: str


@dataclass(frozen=True)
class WorkerLost:
    """A worker died; the group restarts and steps after `resume_step` are run again (watchers
    should treat earlier events for those steps as superseded)."""

    attempt: int
    reason: str
    resume_step: int


TrainingEvent = WorkersStarted | StepEvent | CheckpointSaved | WorkerLost | MemoryReport


@dataclass(frozen=True)
class TrainingOutcome:
    weights: bytes  # the model's state_dict as safetensors (rank 0)
    metrics: dict[str, float]  # train_loss, val_loss, val_accuracy (classification), ...
    steps: int
    stopped_early: bool
    restarts: int
    train_time_s: float  # summed step times of the final attempt
    wall_time_s: float
    last_checkpoint: str | None = None
    spec: dict = field(default_factory=dict, repr=False)
    effective_batch: int | None = None  # minibatch runs: micro x accumulation x workers


class TrainingJobError(RuntimeError):
    """The job failed: an error in the training itself, or workers lost more often than
    max_restarts allows. The cause is chained."""


class _WorkerFailure(Exception):
    def __init__(self, reason: str, lost: bool) -> None:
        super().__init__(reason)
        self.reason, self.lost = reason, lost


# ---------------------------------------------------------------- the worker


class _TrainingWorker:
    """One data-parallel rank. Made remote at creation by `_start_group`."""

    def __init__(self, rank: int, world_size: int, threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        self.rank, self.world_size = rank, world_size
        self._events: queue.Queue = queue.Queue()
        self._stop = threading.Event()

    def pid(self) -> int:
        return os.getpid()

    def rendezvous_address(self) -> tuple[str, int]:
        host = ray.util.get_node_ip_address()
        with socket.socket() as sock:
            sock.bind((host, 0))
            return host, sock.getsockname()[1]

    def join_group(self, host: str, port: int, backend: str, timeout_s: float) -> None:
        import torch.distributed as dist

        dist.init_process_group(
            backend,
            init_method=f"tcp://{host}:{port}",
            rank=self.rank,
            world_size=self.world_size,
            timeout=timedelta(seconds=timeout_s),
        )

    def stop(self) -> None:
        self._stop.set()

    def events(self, timeout_s: float) -> list[TrainingEvent]:
        """Whatever happened since the last call; waits up to timeout_s for the first."""
        drained: list = []
        try:
            drained.append(self._events.get(timeout=timeout_s))
            while True:
                drained.append(self._events.get_nowait())
        except queue.Empty:
            pass
        return drained

    def train(
        self,
        spec: dict,
        X: np.ndarray,
        y: np.ndarray,
        *,
        attempt: int,
        resume_path: str | None,
        checkpoint_dir: str,
        checkpoint_every: int,
        fingerprint: str,
        device: str,
        data_uri: str | None = None,
        data_root: str | None = None,
        trusted: bool = False,
    ) -> dict[str, Any] | None:
        from .kfac import TorchDistributedCommunicator

        if data_uri is not None:  # read here, not by the driver: large data skips the gateway
            X_t, y_t = open_data_uri(data_uri, data_root)
        else:
            X_t, y_t = torch.tensor(X), torch.tensor(y)

        communicator = TorchDistributedCommunicator() if self.world_size > 1 else None
        initial = load_checkpoint(resume_path, fingerprint=fingerprint) if resume_path else None
        leader = self.rank == 0

        def on_step(metrics: StepMetrics) -> None:
            if leader:
                self._events.put(
                    StepEvent(
                        step=metrics.step,
                        loss=metrics.loss,
                        lr=metrics.lr,
                        damping=metrics.damping,
                        step_time_s=metrics.step_time_s,
                        samples_per_s=metrics.samples_per_s,
                        train_loss=metrics.train_loss,
                        attempt=attempt,
                        effective_batch=metrics.effective_batch,
                    )
                )

        def on_memory(reports: list) -> None:
            from .zero import ShardingPlan

            first = reports[0]
            self._events.put(MemoryReport(
                attempt=attempt, zero_stage=first.stage, workers=first.world_size,
                implementation=ShardingPlan(stage=first.stage).implementation
                if first.world_size > 1 else "single worker (unsharded)",
                effective_batch=effective.get("batch"),
                parameter_count=first.parameter_count,
                param_bytes=tuple(r.measured.parameters for r in reports),
                grad_bytes=tuple(r.measured.gradients for r in reports),
                optimizer_bytes=tuple(r.measured.optimizer for r in reports),
                at_rest_param_bytes=tuple(r.at_rest_parameters for r in reports),
                formula_param_bytes=first.formula.parameters,
                formula_grad_bytes=first.formula.gradients,
                formula_optimizer_bytes=first.formula.optimizer,
            ))

        effective: dict[str, int | None] = {}

        def on_step_with_batch(metrics: StepMetrics) -> None:
            effective["batch"] = metrics.effective_batch
            on_step(metrics)

        def on_checkpoint(state: TrainingState) -> None:
            path = save_checkpoint(
                state,
                checkpoint_path(checkpoint_dir, state.step),
                fingerprint=fingerprint,
                keep=KEEP_CHECKPOINTS,
            )
            self._events.put(CheckpointSaved(step=state.step, path=str(path)))

        result = train(
            spec,
            X_t,
            y_t,
            callback=on_step_with_batch,
            communicator=communicator,
            should_stop=self._stop.is_set,
            initial_state=initial,
            on_checkpoint=on_checkpoint if leader and checkpoint_every else None,
            checkpoint_every=checkpoint_every,
            device=device,
            on_memory=on_memory if leader else None,
            trusted=trusted,
        )
        if not leader:
            return None
        return {
            "weights": save_weights(result.model.to("cpu")),
            "metrics": result.metrics,
            "steps": result.steps,
            "stopped_early": result.stopped_early,
            "train_time_s": result.train_time_s,
            "effective_batch": result.effective_batch,
        }


# ---------------------------------------------------------------- the driver


@dataclass(frozen=True)
class _Job:
    train_spec: dict
    dataset: str | None
    checkpoint_every: int
    data_uri: str | None = None

    @classmethod
    def parse(cls, spec: Any, data: dict | None, workers: int) -> _Job:
        if not isinstance(spec, dict):
            raise ValueError(f"training spec must be a dict, got {type(spec).__name__}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
        train_spec = {k: v for k, v in spec.items() if k not in JOB_KEYS}
        dataset = spec.get("dataset")
        data_uri = spec.get("data_uri")
        every = spec.get("checkpoint_every", 0)
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"checkpoint_every must be an integer >= 0, got {every!r}")
        sources = [data is not None, dataset is not None, data_uri is not None]
        if not any(sources):
            raise ValueError("a training job needs data (X, y), a dataset name or a data_uri")
        if sum(sources) > 1:
            raise ValueError("give one of data, dataset and data_uri, not several")
        if data is not None and (not isinstance(data, dict) or set(data) != {"X", "y"}):
            raise ValueError("data must be a dict with exactly the arrays 'X' and 'y'")
        from .planner import resolve_auto_zero

        train_spec, _ = resolve_auto_zero(train_spec, workers)  # scaling.zero_stage "auto"
        TrainSpec.parse(train_spec)  # ValueError naming the field, before anything starts
        return cls(train_spec, dataset, every, data_uri)


def run_training_job(
    spec: dict,
    data: dict[str, np.ndarray] | None,
    *,
    workers: int,
    emit: Callable[[TrainingEvent], None],
    should_stop: Callable[[], bool] = lambda: False,
    checkpoint_dir: str,
    resume: bool = False,
    use_gpu: bool = False,
    cpus_per_worker: int = 1,
    max_restarts: int = 3,
    startup_timeout_s: float = 120.0,
    data_root: str | None = None,
    trusted: bool = False,
) -> TrainingOutcome:
    """Runs one training job on the connected Ray cluster and blocks until it ends (call it
    from a thread, or from a Ray task, when the caller has an event loop).

    emit(event) is called on this thread, in order, as events arrive: WorkersStarted per
    attempt, StepEvent per step (contiguous within an attempt), CheckpointSaved, WorkerLost.
    should_stop() is polled about every 0.2 s; once true, every worker stops after the same
    step and the outcome has stopped_early=True and the weights of that step.
    resume=True continues from the newest checkpoint in checkpoint_dir written for this same
    spec; resume=False deletes the directory's checkpoints first.
    data_root: where a spec's `data_uri` may point (None: data URIs are refused); the driver
    reads only the file's header, every worker loads the file. trusted=True lets a caller's
    own module (models.py: torch_export, pickle) load on the workers; the service decides it.
    Raises ValueError for a bad spec or data (before starting anything), PermissionError for a
    data_uri without a root or outside it, TrainingJobError when the training fails or
    workers are lost more than max_restarts times.
    """
    started = time.monotonic()
    job = _Job.parse(spec, data, workers)
    if job.data_uri is not None:
        X = y = None
        rows = inspect_data_file(resolve_data_uri(job.data_uri, data_root)).rows
    elif job.dataset is not None:
        X_t, y_t = load_dataset(job.dataset)
        X, y = X_t.numpy(), y_t.numpy()
    else:
        X, y = np.asarray(data["X"]), np.asarray(data["y"])
        if X.shape[0] != y.shape[0]:
            raise ValueError(f"X and y must have as many rows, got {X.shape[0]} and {y.shape[0]}")
    if X is not None:
        rows = X.shape[0]
    check_parallel(TrainSpec.parse(job.train_spec), workers, rows,
                   device="cuda" if use_gpu else "cpu")
    fingerprint = spec_fingerprint(
        {"spec": job.train_spec, "workers": workers, "rows": int(rows)}
    )
    os.makedirs(checkpoint_dir, exist_ok=True)
    resume_path = None
    if resume:
        resume_path = latest_checkpoint(checkpoint_dir)
        if resume_path is not None:
            load_checkpoint(resume_path, fingerprint=fingerprint)  # ValueError if foreign
    else:
        for _, old in list_checkpoints(checkpoint_dir):
            old.unlink(missing_ok=True)

    data_refs = (None, None) if X is None else (ray.put(X), ray.put(y))
    restarts = 0
    while True:
        try:
            result = _run_attempt(
                job,
                data_refs,
                workers=workers,
                emit=emit,
                should_stop=should_stop,
                checkpoint_dir=checkpoint_dir,
                resume_path=resume_path,
                attempt=restarts,
                use_gpu=use_gpu,
                cpus_per_worker=cpus_per_worker,
                fingerprint=fingerprint,
                startup_timeout_s=startup_timeout_s,
                data_root=data_root,
                trusted=trusted,
            )
            break
        except _WorkerFailure as failure:
            if not failure.lost:
                raise TrainingJobError(f"training failed: {failure.reason}") from failure.__cause__
            if restarts >= max_restarts:
                raise TrainingJobError(
                    f"workers lost {restarts + 1} times (max_restarts="
                    f"{max_restarts}); last: {failure.reason}"
                ) from failure.__cause__
            restarts += 1
            found = latest_checkpoint(checkpoint_dir)
            resume_path = str(found) if found is not None else None
            resume_step = list_checkpoints(checkpoint_dir)[-1][0] if found else 0
            emit(WorkerLost(attempt=restarts - 1, reason=failure.reason, resume_step=resume_step))
    last = latest_checkpoint(checkpoint_dir)
    return TrainingOutcome(
        weights=result["weights"],
        metrics=result["metrics"],
        steps=result["steps"],
        stopped_early=result["stopped_early"],
        restarts=restarts,
        train_time_s=result["train_time_s"],
        wall_time_s=time.monotonic() - started,
        last_checkpoint=str(last) if last else None,
        spec=dict(spec),
        effective_batch=result.get("effective_batch"),
    )


def _start_group(
    workers: int, *, use_gpu: bool, cpus_per_worker: int, timeout_s: float
) -> tuple[list, str, tuple[int, ...]]:
    """Creates the worker actors and forms their process group; kills what it made if any of
    it fails. Returns (actors by rank, backend, pids)."""
    resources = {"num_cpus": cpus_per_worker, "max_concurrency": 4}
    if use_gpu:
        resources["num_gpus"] = 1
    cls = ray.remote(**resources)(_TrainingWorker)
    actors = [cls.remote(rank, workers, cpus_per_worker) for rank in range(workers)]
    backend = "none" if workers == 1 else ("nccl" if use_gpu else "gloo")
    try:
        pids = tuple(ray.get([a.pid.remote() for a in actors], timeout=timeout_s))
        if workers > 1:
            host, port = ray.get(actors[0].rendezvous_address.remote(), timeout=timeout_s)
            ray.get(
                [a.join_group.remote(host, port, backend, timeout_s) for a in actors],
                timeout=timeout_s,
            )
    except BaseException:
        _kill(actors)
        raise
    return actors, backend, pids


def _kill(actors: list) -> None:
    for actor in actors:
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)


def _run_attempt(
    job: _Job,
    data_refs,
    *,
    workers: int,
    emit,
    should_stop,
    checkpoint_dir: str,
    resume_path: str | None,
    attempt: int,
    use_gpu: bool,
    cpus_per_worker: int,
    fingerprint: str,
    startup_timeout_s: float,
    data_root: str | None = None,
    trusted: bool = False,
) -> dict[str, Any]:
    began = time.monotonic()
    try:
        actors, backend, pids = _start_group(
            workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, timeout_s=startup_timeout_s
        )
    except (RayActorError, GetTimeoutError) as exc:
        raise _WorkerFailure(f"worker group did not start: {exc}", lost=True) from exc
    runs: dict = {}
    try:
        resumed_step = 0
        if resume_path is not None:
            resumed_step = int(os.path.basename(resume_path).split("-")[1].split(".")[0])
        emit(
            WorkersStarted(
                attempt=attempt,
                workers=workers,
                backend=backend,
                pids=pids,
                startup_s=time.monotonic() - began,
                resumed_from_step=resumed_step,
            )
        )
        device = "cuda" if use_gpu else "cpu"
        runs.update({
            actor.train.remote(
                job.train_spec,
                *data_refs,
                attempt=attempt,
                resume_path=resume_path,
                checkpoint_dir=checkpoint_dir,
                checkpoint_every=job.checkpoint_every,
                fingerprint=fingerprint,
                device=device,
                data_uri=job.data_uri,
                data_root=data_root,
                trusted=trusted,
            ): rank
            for rank, actor in enumerate(actors)
        })
        return _drive(actors, runs, emit, should_stop)
    finally:
        _kill(actors)
        for ref in runs:  # collect the killed workers' errors (Ray logs uncollected ones)
            with contextlib.suppress(Exception):
                ray.get(ref, timeout=5.0)


def _drive(actors: list, runs: dict, emit, should_stop) -> dict[str, Any]:
    """Streams rank 0's events to emit, forwards a stop, returns rank 0's result; raises
    _WorkerFailure when a worker dies or the training raises."""
    leader = actors[0]
    poll = leader.events.remote(EVENT_POLL_S)
    result: dict[str, Any] | None = None
    stop_sent = False
    while True:
        if not stop_sent and should_stop():
            for actor in actors:
                actor.stop.remote()
            stop_sent = True
        if not runs:  # finished: the outstanding poll first, then what is left, in order
            for event in _get(poll, actors) + _get(leader.events.remote(0.0), actors):
                emit(event)
            assert result is not None
            return result
        ready, _ = ray.wait([poll, *runs], num_returns=1, timeout=1.0)
        for ref in ready:
            if ref == poll:
                for event in _get(poll, actors):
                    emit(event)
                poll = leader.events.remote(EVENT_POLL_S)
            else:
                rank = runs.pop(ref)
                value = _get(ref, actors)
                if rank == 0:
                    result = value


def _get(ref, actors: list):
    try:
        return ray.get(ref)
    except RayError as exc:
        lost = isinstance(exc, RayActorError) or not _all_alive(actors)
        cause = exc.cause if isinstance(exc, RayTaskError) and not lost else exc
        raise _WorkerFailure(_one_line(cause), lost=lost) from cause


def _all_alive(actors: list, timeout_s: float = 10.0) -> bool:
    try:
        ray.get([actor.pid.remote() for actor in actors], timeout=timeout_s)
        return True
    except (RayError, GetTimeoutError):
        return False


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:500]


__all__ = [
    "CheckpointSaved",
    "MemoryReport",
    "StepEvent",
    "TrainingEvent",
    "TrainingJobError",
    "TrainingOutcome",
    "WorkerLost",
    "WorkersStarted",
    "run_training_job",
]
