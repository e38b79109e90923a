"""Training jobs through the gateway: the Train RPC's job lifecycle.

A training job is a job like any other (stored, numbered events, Watch, CancelJob, metrics);
its work is `workers.training.distributed.run_training_job`, which forms a group of Ray actors
(gloo on CPU, NCCL on GPU) and blocks until the job ends, so it runs on a thread here and its
events hop back to the event loop. Step events become `metrics` job events (a scaled job's
MemoryReport too, at step 0); the trained weights are stored as the artifact
"weights.safetensors" next to the job store.

Two parts of a spec need the server's consent, checked before a job exists:
- a caller's own module (`model.kind` torch_export or pickle) loads only on a server started
  with --trust-code and from a caller with the trust-code role (the objectives' rule); it is
  loaded once here to check it, then on every worker;
- `data_uri` names a file under the server's --data-root (off by default); the gateway checks
  the URI, the root and the file's header (names, dtypes, shapes, and the declared size
  against datasets.MAX_DATA_FILE_BYTES), and the workers read the file.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from google.protobuf import json_format

from secant.v1 import optimizer_pb2 as pb
from service.errors import JobNotFound, LimitExceeded
from service.jobs import JobManager
from service.validation import Limits, decode_tensor, require_code_trust

log = logging.getLogger("secant.training")

WEIGHTS = "weights.safetensors"
_ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_GATEWAY_KEYS = ("workers", "device")
MAX_TRAINING_WORKERS = 64


@dataclass(frozen=True)
class TrainJobSpec:
    """A checked training request; quacks like SolveSpec where the JobManager looks."""

    spec: dict
    data: dict[str, np.ndarray] | None
    workers: int
    device: str
    labels: dict[str, str] = field(default_factory=dict)
    trusted: bool = False  # the model is the caller's code and this caller may run it

    @property
    def method(self) -> str:
        optimizer = self.spec.get("optimizer", "adam")
        name = optimizer.get("name", "adam") if isinstance(optimizer, dict) else optimizer
        return f"train:{name}"

    @property
    def n(self) -> int:
        return 0


def validate_train_request(request: pb.TrainRequest, limits: Limits, *, trusted: bool = False,
                           data_root: str | None = None) -> TrainJobSpec:
    """Turns a TrainRequest into a checked spec; ValueError naming the field, PermissionError
    for a caller's module this server or caller may not run (`trusted`: --trust-code) or a
    data_uri it may not read (`data_root`: --data-root; None refuses every data_uri). A
    caller's module is loaded here to check it (it runs the caller's code, as a trusted
    objective's validation does); a data file's header is read, not its tensors."""
    from workers.training.datasets import inspect_data_file, resolve_data_uri
    from workers.training.distributed import JOB_KEYS
    from workers.training.loop import TrainSpec, check_model_plan
    from workers.training.models import build_model, is_code_model, parse_model_spec
    from workers.training.planner import is_auto_zero, resolve_auto_zero

    raw = json_format.MessageToDict(request.spec)
    spec = _integers(raw)
    workers = spec.pop("workers", 1)
    device = str(spec.pop("device", "cpu")).lower()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"spec.workers: an integer >= 1, got {workers!r}")
    if workers > MAX_TRAINING_WORKERS:
        raise LimitExceeded(f"spec.workers: {workers} exceeds {MAX_TRAINING_WORKERS}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"spec.device: 'cpu' or 'cuda', got {device!r}")
    data = None
    if request.data:
        data = {}
        for index, named in enumerate(request.data):
            where = f"data[{index}]"
            if named.name not in ("X", "y"):
                raise ValueError(f"{where}.name: training data is 'X' and 'y', got {named.name!r}")
            data[named.name] = decode_tensor(named.tensor, f"{where}.tensor",
                                             max_elements=limits.max_dimension)
        if set(data) != {"X", "y"}:
            raise ValueError("data: send both 'X' and 'y' (or name a dataset in the spec)")
        # The zoo's models train in float32; class labels stay integers.
        data = {name: array.astype(np.float32) if array.dtype.kind == "f" else array
                for name, array in data.items()}
    code_model = is_code_model(spec.get("model"))
    if code_model:  # before anything reads the bytes
        require_code_trust(f"spec.model.kind {spec['model']['kind']!r}", trusted=trusted,
                           instead="name a zoo model (mlp, cnn, autoencoder, transformer)")
    train_spec = {k: v for k, v in spec.items() if k not in JOB_KEYS}
    if is_auto_zero(train_spec):  # the planner picks the stage for this many workers now
        try:
            train_spec, plan = resolve_auto_zero(train_spec, workers)
        except ValueError as exc:
            raise ValueError(f"spec: {exc}") from None
        spec = {**spec, "scaling": train_spec["scaling"]}
        log.info("zero_stage auto resolved", extra={"reason": plan.reason})
    try:
        parsed = TrainSpec.parse(train_spec)
        parse_model_spec(parsed.model)
    except ValueError as exc:
        raise ValueError(f"spec: {exc}") from None
    sources = [name for name, given in (("data", data is not None),
                                        ("spec.dataset", "dataset" in spec),
                                        ("spec.data_uri", "data_uri" in spec)) if given]
    if not sources:
        raise ValueError("spec.dataset: name a bundled dataset (digits, breast_cancer), send"
                         " data (X, y) or give a data_uri")
    if len(sources) > 1:
        raise ValueError(f"{sources[1]}: give one of data, spec.dataset and spec.data_uri, got"
                         f" {' and '.join(sources)}")
    if "data_uri" in spec:
        try:
            inspect_data_file(resolve_data_uri(spec["data_uri"], data_root))
        except (ValueError, PermissionError) as exc:
            raise type(exc)(f"spec.{exc}") from None
    if code_model:
        try:
            module = build_model(parsed.model, trusted=True)  # trust was checked above
        except ValueError as exc:
            raise ValueError(f"spec.model: {exc}") from None
        try:
            check_model_plan(module, parsed)
        except ValueError as exc:
            raise ValueError(f"spec: {exc}") from None
    return TrainJobSpec(spec=spec, data=data, workers=workers, device=device, trusted=code_model)


def _integers(value):
    """Struct numbers are doubles: give integral ones back their int type."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integers(v) for v in value]
    return value


class TrainingJobs:
    def __init__(self, jobs: JobManager, limits: Limits, artifacts_dir: str | Path, *,
                 trusted: bool = False, data_root: str | Path | None = None) -> None:
        self._jobs = jobs
        self._limits = limits
        self._artifacts = Path(artifacts_dir)
        self._trusted = trusted  # --trust-code
        # Absolute but not resolved: a symlinked root (/data -> /mnt/vol) must still take
        # file:///data/... (resolve_data_uri compares resolved paths to the resolved root).
        self._data_root = None if data_root is None else os.path.abspath(data_root)
        self._tasks: set[asyncio.Task] = set()

    async def submit(self, request: pb.TrainRequest, caller=None) -> str:
        """Validates and stores the job, starts it; returns its id. Validation runs on a
        thread (it may load a caller's module or read a data file's header); the caller's
        context (service.auth's contextvar) goes with it."""
        spec = await asyncio.to_thread(validate_train_request, request, self._limits,
                                       trusted=self._trusted, data_root=self._data_root)
        job, live = await self._jobs.create_training_job(spec, request, caller=caller)
        if live is not None:
            task = asyncio.create_task(self._run(live), name=f"train-{job.job_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return job.job_id

    async def _run(self, live) -> None:
        from workers.training.distributed import (
            MemoryReport,
            StepEvent,
            TrainingJobError,
            WorkerLost,
            run_training_job,
        )

        loop = asyncio.get_running_loop()
        stop = threading.Event()
        live.on_cancel = stop.set
        spec: TrainJobSpec = live.spec
        job_id = live.job.job_id
        metrics = self._jobs.metrics

        def on_event(event) -> None:  # on the event loop
            if isinstance(event, StepEvent):
                values = {"loss": event.loss, "lr": event.lr, "step_time_s": event.step_time_s,
                          "samples_per_s": event.samples_per_s}
                if event.damping is not None:
                    values["damping"] = event.damping
                if event.train_loss is not None:
                    values["train_loss"] = event.train_loss
                self._jobs.record_metrics(live, event.step, values)
                metrics.train_steps.labels(spec.method).inc()
                metrics.train_step_time.labels(spec.method).observe(event.step_time_s)
            elif isinstance(event, MemoryReport):
                # per-worker bytes next to the ZeRO formula (mem_param_bytes_rank0, ...,
                # mem_formula_bytes, effective_batch), as a step-0 metrics event per attempt
                self._jobs.record_metrics(live, 0, event.as_metrics())
                held = {"param": event.param_bytes, "grad": event.grad_bytes,
                        "optimizer": event.optimizer_bytes}
                for kind, by_rank in held.items():
                    for rank, value in enumerate(by_rank):
                        metrics.train_memory.labels(str(event.zero_stage), kind, str(rank)).set(
                            value)
                metrics.train_memory_formula.labels(str(event.zero_stage)).set(
                    event.formula_bytes)
            elif isinstance(event, WorkerLost):
                self._jobs.set_state(live, pb.RUNNING,
                                     f"a worker was lost ({event.reason}); resumed from step"
                                     f" {event.resume_step}")

        def emit(event) -> None:  # on the training thread
            loop.call_soon_threadsafe(on_event, event)

        self._jobs.set_state(live, pb.RUNNING)
        directory = self._artifacts / job_id
        try:
            outcome = await asyncio.to_thread(
                run_training_job, spec.spec, spec.data, workers=spec.workers, emit=emit,
                should_stop=stop.is_set, checkpoint_dir=str(directory / "checkpoints"),
                use_gpu=spec.device == "cuda", data_root=self._data_root, trusted=spec.trusted,
            )
        except ValueError as exc:
            await self._jobs.finish_failed(live, "INVALID_ARGUMENT", f"spec: {exc}")
            return
        except PermissionError as exc:  # a data file moved out of the root since validation
            await self._jobs.finish_failed(live, "PERMISSION_DENIED", f"spec: {exc}")
            return
        except TrainingJobError as exc:
            await self._jobs.finish_failed(live, "ABORTED", str(exc))
            return
        except Exception as exc:
            log.exception("training job failed", extra={"job_id": job_id})
            await self._jobs.finish_failed(live, "INTERNAL",
                                           f"the training job failed: {type(exc).__name__}")
            return
        await asyncio.sleep(0)  # let the last step events land before the final one
        directory.mkdir(parents=True, exist_ok=True)
        (directory / WEIGHTS).write_bytes(outcome.weights)
        shutil.rmtree(directory / "checkpoints", ignore_errors=True)
        await self._jobs.finish_training(live, pb.TrainResult(
            metrics={k: float(v) for k, v in outcome.metrics.items()}, steps=outcome.steps,
            stopped_early=outcome.stopped_early, restarts=outcome.restarts,
            train_time_s=outcome.train_time_s, artifacts=[WEIGHTS],
        ))

    async def artifact(self, job_id: str, name: str, caller=None) -> pb.Artifact:
        name = name or WEIGHTS
        if not _ARTIFACT_NAME.match(name) or name.startswith("."):
            raise ValueError(f"name: not an artifact name: {name!r}")
        await self._jobs.get(job_id, caller=caller)  # NotFound for unknown or foreign jobs
        path = self._artifacts / job_id / name
        if not path.is_file():
            raise JobNotFound(f"{job_id}/{name}")
        data = await asyncio.to_thread(path.read_bytes)
        return pb.Artifact(job_id=job_id, name=name, content_type="application/safetensors",
                           data=data)
