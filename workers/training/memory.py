"""Per-worker memory accounting: bytes of parameters, gradients and optimizer state that one
data-parallel worker actually holds, next to the ZeRO paper's formula for its stage.

    probe = MemoryProbe(model, optimizer)          # model, optimizer from zero.wrap
    with probe:                                    # records the in-step peak of parameters
        loss_fn(model(xb), yb).backward()
        optimizer.step()
    report = probe.report(stage=2, world_size=2)   # call before zero_grad: grads still held
    report.as_dict()  # -> job event / metrics

What is counted: the storage behind every tensor reachable from the model's registered
parameters and the optimizer's parameters (so FSDP2's sharded DTensor locals and any full
copy it has gathered when the forward pass ends both count), their `.grad`s (DDP's bucket
views counted once; at stage 2 only the owner holds a parameter's .grad), and the optimizer
state (ZeroRedundancyOptimizer: its local optimizer's state only). Storage is de-duplicated
by address, so views, flat buckets and padding are counted as what they occupy. Activations,
communication buffers and the allocator's cache are not counted; neither are transient
gradients inside backward (FSDP's unsharded ones; at stage 2 the reduces in flight, at most
ShardingPlan.bucket_cap_mb).

Formulas (P parameters, N workers; Adam: K = 8 bytes of fp32 state per parameter):

    fp32:   stage 0: 4P + 4P + 8P = 16P      mixed (ZeRO paper, K = 12: fp32 master + m + v):
            stage 1: 4P + 4P + 8P/N                  stage 0: 2P + 2P + 12P = 16P
            stage 2: 4P + 4P/N + 8P/N                stage 1: 2P + 2P + 12P/N
            stage 3: 4P/N + 4P/N + 8P/N              stage 2: 2P + 2P/N + 12P/N
                                                     stage 3: 2P/N + 2P/N + 12P/N
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass

from torch import Tensor, nn
from torch.optim import Optimizer


class Precision(enum.Enum):
    """Which formula applies: fp32 training, or the ZeRO paper's mixed precision (fp16/bf16
    parameters and gradients, fp32 master weights and Adam moments in the optimizer)."""

    FP32 = "fp32"
    MIXED = "mixed"


@dataclass(frozen=True)
class Bytes:
    parameters: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer


def zero_formula(
    stage: int, parameters: int, world_size: int, precision: Precision | str = Precision.FP32
) -> Bytes:
    """Per-worker bytes the ZeRO paper's accounting predicts (Adam; see the module docstring)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    precision = Precision(precision)
    p, n = parameters, world_size
    weight, grad, state = (4, 4, 8) if precision is Precision.FP32 else (2, 2, 12)
    return Bytes(
        parameters=weight * p // (n if stage >= 3 else 1),
        gradients=grad * p // (n if stage >= 2 else 1),
        optimizer=state * p // (n if stage >= 1 else 1),
    )


def _storage_key(t: Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def _local(t: Tensor) -> Tensor:
    to_local = getattr(t, "to_local", None)  # DTensor: this worker's shard
    return to_local() if callable(to_local) else t


def _sum_storages(tensors, seen: set[tuple[int, int]]) -> int:
    total = 0
    for t in tensors:
        if not isinstance(t, Tensor):
            continue
        local = _local(t)
        if local.device.type == "meta":
            continue
        key = _storage_key(local)
        if key[1] == 0 or key in seen:
            continue
        seen.add(key)
        total += key[1]
    return total


def _optimizer_params(optimizer: Optimizer | None) -> list[Tensor]:
    if optimizer is None:
        return []
    return [p for group in optimizer.param_groups for p in group["params"]]


def _local_optimizer(optimizer: Optimizer) -> Optimizer:
    # ZeroRedundancyOptimizer keeps this worker's shard of the state in `.optim`.
    inner = getattr(optimizer, "optim", None)
    return inner if isinstance(inner, Optimizer) else optimizer


def held_bytes(model: nn.Module, optimizer: Optimizer | None) -> Bytes:
    """What this worker holds right now (see the module docstring for what counts)."""
    params = list(model.parameters()) + _optimizer_params(optimizer)
    param_bytes = _sum_storages(params, set())
    grad_bytes = _sum_storages((p.grad for p in params if p.grad is not None), set())
    state_tensors = []
    if optimizer is not None:
        for state in _local_optimizer(optimizer).state.values():
            state_tensors.extend(v for v in state.values() if isinstance(v, Tensor))
    return Bytes(param_bytes, grad_bytes, _sum_storages(state_tensors, set()))


@dataclass(frozen=True)
class MemoryReport:
    """One worker's measured bytes next to the formula for its stage; `ratio` is measured /
    formula for the totals. `peak_parameters` is the most parameter storage seen while the
    step ran (FSDP's gathered copy included); `measured.parameters` counts it too."""

    stage: int
    world_size: int
    rank: int
    parameter_count: int
    precision: str
    measured: Bytes
    formula: Bytes
    at_rest_parameters: int

    @property
    def ratio(self) -> float:
        return self.measured.total / self.formula.total if self.formula.total else float("nan")

    def as_dict(self) -> dict[str, float | int | str]:
        """Flat, for a job event or Prometheus gauges."""
        flat: dict[str, float | int | str] = {
            "stage": self.stage,
            "world_size": self.world_size,
            "rank": self.rank,
            "parameter_count": self.parameter_count,
            "precision": self.precision,
            "at_rest_parameter_bytes": self.at_rest_parameters,
            "ratio": self.ratio,
        }
        for prefix, value in (("held", self.measured), ("formula", self.formula)):
            flat |= {f"{prefix}_{k}_bytes": v for k, v in asdict(value).items()}
            flat[f"{prefix}_total_bytes"] = value.total
        return flat


def global_parameter_count(model: nn.Module) -> int:
    """P: the unsharded parameter count (DTensor shapes are global)."""
    return sum(p.numel() for p in model.parameters())


class MemoryProbe:
    """Measures one training step. Enter before the forward pass, leave after
    optimizer.step() and before zero_grad(); a hook on the model's forward records the
    parameter storage held when the forward pass ends (a sharded model that keeps gathered
    parameters from there into backward would peak there)."""

    def __init__(self, model: nn.Module, optimizer: Optimizer | None) -> None:
        self.model, self.optimizer = model, optimizer
        self.at_rest = held_bytes(model, optimizer).parameters
        self.peak_parameters = self.at_rest
        self._handle = None

    def _after_forward(self, *_args) -> None:
        params = list(self.model.parameters()) + _optimizer_params(self.optimizer)
        self.peak_parameters = max(self.peak_parameters, _sum_storages(params, set()))

    def __enter__(self) -> MemoryProbe:
        self._handle = self.model.register_forward_hook(self._after_forward)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def report(
        self,
        stage: int,
        world_size: int,
        rank: int = 0,
        precision: Precision | str = Precision.FP32,
    ) -> MemoryReport:
        now = held_bytes(self.model, self.optimizer)
        measured = Bytes(max(self.peak_parameters, now.parameters), now.gradients, now.optimizer)
        count = global_parameter_count(self.model)
        precision = Precision(precision)
        return MemoryReport(
            stage=int(stage),
            world_size=world_size,
            rank=rank,
            parameter_count=count,
            precision=precision.value,
            measured=measured,
            formula=zero_formula(int(stage), count, world_size, precision),
            at_rest_parameters=self.at_rest,
        )


__all__ = [
    "Bytes",
    "MemoryProbe",
    "MemoryReport",
    "Precision",
    "global_parameter_count",
    "held_bytes",
    "zero_formula",
]
