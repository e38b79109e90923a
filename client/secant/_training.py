"""Training jobs from the SDK: ``client.train(spec, data)`` -> ``TrainRun``.

``spec["model"]`` is a zoo model (a dict) or, for trusted callers on a server started with
--trust-code, the caller's own module: a ``torch.nn.Module`` (sent pickled with ``torch.save``;
its classes travel by value through cloudpickle when it is installed) or a
``torch.export.ExportedProgram`` (sent as ``torch.export.save`` bytes; export it with a dynamic
batch dimension). Either goes as base64 text in the spec (docs/training.md).
"""

from __future__ import annotations

import base64
import copy
import io
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import struct_pb2

from secant._errors import SecantError, status_code_from_name
from secant._problem import _LIBRARIES, to_struct
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


def model_spec(model: Any) -> Any:
    """The wire form of ``spec["model"]``: a zoo dict as it is; an ExportedProgram as
    ``{"kind": "torch_export", "program": base64}``; an nn.Module as ``{"kind": "pickle",
    "module": base64}``. Cost: one serialization of the module (its parameters included) and
    a third more for base64."""
    if isinstance(model, Mapping):
        return model
    torch = sys.modules.get("torch")  # a module object means torch is already imported
    if torch is not None:
        import torch.export

        if isinstance(model, torch.export.ExportedProgram):
            buffer = io.BytesIO()
            torch.export.save(model, buffer)
            return {"kind": "torch_export", "program": _b64(buffer.getvalue())}
        if isinstance(model, torch.nn.Module):
            return {"kind": "pickle", "module": _b64(pickle_module(model))}
    raise SecantError(f"spec.model must be a zoo model spec (a dict), a torch.nn.Module or a "
                      f"torch.export.ExportedProgram, got {type(model).__name__}",
                      status_code_from_name("INVALID_ARGUMENT"))


def pickle_module(module: Any) -> bytes:
    """``torch.save(module)`` bytes. With cloudpickle installed, the classes of the module and
    its submodules that come from the caller's own modules travel by value (the server cannot
    import them); libraries such as torch are referenced."""
    import torch

    buffer = io.BytesIO()
    try:
        import cloudpickle
    except ImportError:  # classes by reference: the server must be able to import them
        torch.save(module, buffer)
        return buffer.getvalue()
    own = set()
    for sub in module.modules():
        found = sys.modules.get(type(sub).__module__ or "")
        if found is not None and found.__name__ != "__main__" and (
                found.__name__.split(".")[0] not in _LIBRARIES):
            own.add(found)
    registered = []
    try:
        for found in own:
            cloudpickle.register_pickle_by_value(found)
            registered.append(found)
        torch.save(module, buffer, pickle_module=cloudpickle)
    finally:
        for found in registered:
            cloudpickle.unregister_pickle_by_value(found)
    return buffer.getvalue()


def _b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode("ascii")


def build_train_request(spec: Mapping[str, Any], data: Mapping[str, Any] | None = None,
                        idempotency_key: str = "") -> pb.TrainRequest:
    """A TrainRequest from a spec dict and optional arrays X, y; ``spec["model"]`` may be the
    caller's nn.Module or ExportedProgram (model_spec)."""
    if spec and "model" in spec and not isinstance(spec["model"], Mapping):
        spec = {**spec, "model": model_spec(spec["model"])}
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
        """The trained model in eval mode: a copy of the caller's own nn.Module, or its
        ExportedProgram's ``module()``, with the weights loaded; or the zoo model, built from
        the spec (needs the secant server package for the model zoo, and torch)."""
        spec_model = self.spec["model"]
        if not isinstance(spec_model, Mapping):
            return _own_module(spec_model, self.state_dict())
        if spec_model.get("kind") in ("torch_export", "pickle"):
            raise SecantError("run.model(): the spec carries a serialized module; load "
                              "run.state_dict() into your module instead",
                              status_code_from_name("FAILED_PRECONDITION"))
        try:
            from workers.training.models import build_model
        except ImportError as exc:
            raise ImportError("run.model() needs the secant server package (the model zoo);"
                              " use run.state_dict() with your own module instead") from exc
        module = build_model(spec_model)
        module.load_state_dict(self.state_dict())
        return module.eval()


def _own_module(model: Any, state: dict):
    import torch.export

    if isinstance(model, torch.export.ExportedProgram):
        module = model.module()
        # module() forbids train()/eval(); nn.Module's own only set the flag (the graph keeps
        # the mode it was exported in), as on the server.
        for name in ("train", "eval"):
            if name in vars(module):
                delattr(module, name)
    else:
        module = copy.deepcopy(model)
    module.load_state_dict(state)
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


# ---------------------------------------------------------------- memory planning

_SIZE = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9,
         "GB": 10**9, "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
         "TIB": 2**40}


def parse_size(value: int | float | str) -> int:
    """Bytes from an int or a size such as "16GiB", "512MB"."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return int(value)
    if isinstance(value, str):
        text = value.strip().upper().replace(" ", "")
        number = text.rstrip("KMGTIB")
        unit = text[len(number):]
        try:
            if unit in _SIZE and float(number) > 0:
                return int(float(number) * _SIZE[unit])
        except ValueError:
            pass
    raise SecantError(f"memory budget must be bytes or a size such as '16GiB', got {value!r}",
                      status_code_from_name("INVALID_ARGUMENT"))


@dataclass(frozen=True)
class PlanRow:
    """One configuration: ZeRO stage, checkpointing, accumulation; bytes per worker."""

    zero_stage: int
    activation_checkpointing: bool
    accumulation_steps: int
    micro_batch_size: int
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    total_bytes: int
    formula_parameter_bytes: int
    formula_gradient_bytes: int
    formula_optimizer_bytes: int
    step_time: float  # relative to stage 0 without checkpointing or accumulation
    fits: bool


@dataclass
class MemoryPlan:
    """The server's memory plan for a training job (``client.plan(...)``); ``str(plan)`` is
    the table ``secant train --plan`` prints."""

    parameter_count: int
    workers: int
    batch_size: int
    precision: str
    optimizer: str
    memory_budget_bytes: int
    rows: list[PlanRow]
    recommended: PlanRow | None
    reason: str
    activation_method: str
    table: str = field(repr=False, default="")

    def __str__(self) -> str:
        return self.table

    @classmethod
    def from_proto(cls, message: pb.PlanResponse) -> MemoryPlan:
        names = [f.name for f in PlanRow.__dataclass_fields__.values()]
        rows = [PlanRow(**{name: getattr(row, name) for name in names})
                for row in message.rows]
        chosen = rows[message.recommended] if 0 <= message.recommended < len(rows) else None
        return cls(parameter_count=int(message.parameter_count), workers=int(message.workers),
                   batch_size=int(message.batch_size), precision=message.precision,
                   optimizer=message.optimizer,
                   memory_budget_bytes=int(message.memory_budget_bytes), rows=rows,
                   recommended=chosen, reason=message.reason,
                   activation_method=message.activation_method, table=message.table)


def build_plan_request(model: Mapping[str, Any] | None = None, *,
                       spec: Mapping[str, Any] | str | Path | None = None,
                       workers: int | None = None, batch: int | None = None,
                       precision: str | None = None, amp: bool = False,
                       budget: int | str | None = None) -> pb.PlanRequest:
    """A PlanRequest: a zoo model (or a whole training spec, a dict or YAML file) and the
    job's shape. ``amp=True`` means bf16 autocast (``precision="bf16"``)."""
    full = load_train_spec(spec) if spec is not None else {}
    if model is not None:
        if not isinstance(model, Mapping):
            raise SecantError("plan: model must be a zoo model spec (a dict)",
                              status_code_from_name("INVALID_ARGUMENT"))
        full["model"] = dict(model)
    if "model" not in full:
        raise SecantError("plan: give a zoo model spec or a training spec with a model",
                          status_code_from_name("INVALID_ARGUMENT"))
    if amp and precision is None:
        precision = "bf16"
    return pb.PlanRequest(spec=to_struct(full), workers=workers or 0, batch_size=batch or 0,
                          precision=precision or "",
                          memory_budget_bytes=parse_size(budget) if budget is not None else 0)
