"""Training jobs from the SDK: ``client.train(spec, data)`` -> ``TrainRun``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import struct_pb2

from secant._errors import SecantError, status_code_from_name
from secant._problem import to_struct
from secant._tensors import to_tensor
from secant.v1 import optimizer_pb2 as pb


def load_train_spec(spec: Mapping[str, Any] | str | Path) -> dict:
    """A spec dict, read from a YAML file when given a path."""
    if isinstance(spec, str | Path):
        import yaml

        spec = yaml.safe_load(Path(spec).read_text())
    if not isinstance(spec, Mapping):
        raise SecantError("spec must be a mapping (or a YAML file holding one)",
                          status_code_from_name("INVALID_ARGUMENT"))
    return dict(spec)


def build_train_request(spec: Mapping[str, Any], data: Mapping[str, Any] | None = None,
                        idempotency_key: str = "") -> pb.TrainRequest:
    """A TrainRequest from a spec dict and optional arrays X, y."""
    request = pb.TrainRequest(spec=to_struct(spec) if spec else struct_pb2.Struct(),
                              idempotency_key=idempotency_key)
    for name, value in (data or {}).items():
        request.data.append(pb.NamedTensor(name=name, tensor=to_tensor(value)))
    return request


@dataclass
class TrainRun:
    """A finished training job: its metrics, the per-step history, and its weights."""

    job_id: str
    spec: dict
    metrics: dict[str, float]
    steps: int
    stopped_early: bool
    restarts: int
    train_time_s: float
    wall_time_s: float
    history: list[tuple[int, dict[str, float]]] = field(repr=False, default_factory=list)
    _fetch: Any = field(repr=False, default=None)

    def weights(self) -> bytes:
        """The trained state_dict as safetensors bytes (one GetArtifact call)."""
        return self._fetch(self.job_id, "weights.safetensors")

    def state_dict(self) -> dict:
        """The weights as torch tensors (needs torch and safetensors)."""
        from safetensors.torch import load

        return load(self.weights())

    def model(self):
        """The trained zoo model, built from the spec and loaded (needs the secant server
        package for the model zoo, and torch)."""
        try:
            from workers.training.models import build_model
        except ImportError as exc:
            raise ImportError("run.model() needs the secant server package (the model zoo);"
                              " use run.state_dict() with your own module instead") from exc
        module = build_model(self.spec["model"])
        module.load_state_dict(self.state_dict())
        return module.eval()


def collect_training(job_events: Iterable[pb.JobEvent], spec: Mapping[str, Any], fetch,
                     progress=None) -> TrainRun:
    """Folds a Train stream's events into a TrainRun (raises the job's failure)."""
    history: list[tuple[int, dict[str, float]]] = []
    job_id, last_seq = "", 0
    for event in job_events:
        if event.seq <= last_seq:
            continue
        last_seq = event.seq
        job_id = job_id or event.job_id
        kind = event.WhichOneof("kind")
        if kind == "metrics":
            history.append((int(event.metrics.step), dict(event.metrics.values)))
            if progress is not None:
                progress(event.metrics)
        elif kind == "failure":
            raise SecantError(f"job {job_id} failed: {event.failure.message}",
                              status_code_from_name(event.failure.code))
        elif kind == "train_result":
            r = event.train_result
            return TrainRun(job_id=job_id, spec=dict(spec), metrics=dict(r.metrics),
                            steps=int(r.steps), stopped_early=r.stopped_early,
                            restarts=int(r.restarts), train_time_s=r.train_time_s,
                            wall_time_s=r.wall_time_s, history=history, _fetch=fetch)
        elif kind == "state_change" and event.state_change.state == pb.CANCELLED:
            raise SecantError(f"job {job_id} was cancelled",
                              status_code_from_name("CANCELLED"))
    raise SecantError(f"job {job_id}: the stream ended before the job did",
                      status_code_from_name("UNAVAILABLE"))
