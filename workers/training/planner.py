"""Memory planner for training jobs: what one worker will hold at each ZeRO stage, before
anything runs, and which configuration fits a per-worker memory budget.

    plan = make_plan({"kind": "mlp", "sizes": [784, 1024, 10]}, workers=4, batch_size=512,
                     precision="bf16", budget_bytes=2 * 2**30)
    print(plan.table()); plan.recommended  # -> PlanRow (stage, checkpointing, accumulation)

Per ZeRO stage 0-3, with and without activation checkpointing and for each gradient
accumulation that splits the per-worker batch evenly, a row gives per-worker bytes of:

- parameters, gradients, optimizer state as secant's training path holds them
  (workers/training/zero.py, measured by memory.MemoryProbe): fp32 parameters and gradients
  at every precision (bf16/fp16 run under autocast with fp32 master weights), Adam's two fp32
  moments (SGD momentum's one) plus its step counter, per rank. Stages 1-2 shard whole
  tensors (ZeroRedundancyOptimizer's greedy partition, replayed here, so the planned bytes
  are the largest rank's, not 8P/N); stage 3 shards every tensor's first dimension (FSDP2,
  padded to a multiple of N). With one worker every stage runs unsharded. Next to them, the
  ZeRO paper's formula for the stage (memory.zero_formula: 2P + 2P + 12P in mixed precision,
  4P + 4P + 8P in fp32; Rajbhandari et al. 2020).
- activations: measured, not guessed: one forward + backward of the zoo model at
  micro-batches 2 and 4 (CPU, the job's precision under autocast, the training path's
  activation checkpointing where asked), tracking every tensor it creates until autograd
  lets it go (a TorchDispatchMode with finalizers; parameters and gradients excluded); the
  peak is extended linearly to the row's micro-batch. It holds what autograd saves for
  backward and the transients of backward (a weight's fresh gradient before it is added in,
  the gradients flowing between layers, a checkpointed block's recomputation).

Step time, relative to stage 0 without checkpointing or accumulation: the stage's
communication (bench/zero.py's measured ratios on 2 gloo workers), +33% for checkpointing
(one more forward per block: a forward is about a third of a step) and a few per cent per
extra micro-batch. The recommendation is the row that fits the budget at the lowest relative
step time (ties: the smaller footprint). bench/planner.py checks the planned bytes against
what the training path measures.
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .memory import Bytes, Precision, zero_formula

DEFAULT_BUDGET_BYTES = 16 * 2**30  # per worker, when neither the request nor the spec says
PRECISIONS = ("fp32", "bf16", "fp16")
# Bytes of optimizer state per parameter element (fp32 moments), and per parameter tensor
# (torch's Adam keeps its step count as a 0-d float32 tensor).
_STATE_PER_ELEMENT = {"adam": 8, "adamw": 8, "lamb": 8, "lars": 4, "sgd": 0, "sgd-momentum": 4}
_STATE_PER_TENSOR = {"adam": 4, "adamw": 4, "lamb": 4}
# Step time vs DDP measured by bench/zero.py (10M-parameter MLP, 2 gloo workers, README):
# stage 1 1.02-1.16, stage 2 0.98-1.11, stage 3 1.74-1.97.
STAGE_STEP_FACTOR = {0: 1.00, 1: 1.09, 2: 1.05, 3: 1.80}
CHECKPOINT_RECOMPUTE = 0.33  # one extra forward: about a third of forward + backward
ACCUMULATION_OVERHEAD = 0.03  # per extra micro-batch: per-call costs of a smaller batch
MAX_ACCUMULATION = 8  # rows for 1, 2, 4, 8 micro-batches (those that split the batch)
MEASURE_BATCHES = (2, 4)


# --------------------------------------------------------------------------- parameters


def parse_bytes(value: Any, where: str = "memory_budget") -> int:
    """An int of bytes, or a string such as "16GiB", "512MB", "2e9"."""
    if isinstance(value, bool):
        raise ValueError(f"{where} must be bytes (an integer) or a size such as '16GiB'")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{where} must be > 0, got {value!r}")
        return int(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([KMGT]i?B?|B)?\s*", value, re.I)
        if match:
            number, unit = float(match.group(1)), (match.group(2) or "B").upper()
            powers = {"K": 1, "M": 2, "G": 3, "T": 4}
            base = 1024 if "I" in unit else 1000
            scale = base ** powers[unit[0]] if unit[0] in powers else 1
            if number > 0:
                return int(number * scale)
    raise ValueError(f"{where} must be bytes (an integer) or a size such as '16GiB', "
                     f"got {value!r}")


def _trainable_shapes(model: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in model.parameters() if p.requires_grad]


def _groups(shapes: list[tuple[int, ...]], optimizer: str) -> list[list[int]]:
    """Indices of the optimizer's param groups (LARS / LAMB: weights, then biases and norms)."""
    if optimizer in ("lars", "lamb"):
        groups = [[i for i, s in enumerate(shapes) if len(s) > 1],
                  [i for i, s in enumerate(shapes) if len(s) <= 1]]
        return [g for g in groups if g]
    return [list(range(len(shapes)))]


def zero_partition(shapes: list[tuple[int, ...]], world: int, optimizer: str = "adam"
                   ) -> list[list[int]]:
    """Which tensors each rank owns at stages 1-2: ZeroRedundancyOptimizer's partition
    (per param group, largest first, each to the rank with the fewest elements so far)."""
    sizes = [0] * world
    owned: list[list[int]] = [[] for _ in range(world)]
    for group in _groups(shapes, optimizer):
        for i in sorted(group, key=lambda i: math.prod(shapes[i]), reverse=True):
            rank = sizes.index(min(sizes))
            owned[rank].append(i)
            sizes[rank] += math.prod(shapes[i])
    return owned


def _fsdp_local(shape: tuple[int, ...], world: int, rank: int) -> tuple[int, int]:
    """(padded, unpadded) elements of `rank`'s FSDP2 shard of a tensor (dim-0 chunks)."""
    if not shape:
        return (1, 1) if rank == 0 else (1, 0)
    rest = math.prod(shape[1:])
    chunk = -(-shape[0] // world)
    rows = max(0, min(chunk, shape[0] - rank * chunk))
    return chunk * rest, rows * rest


def held_per_rank(shapes: list[tuple[int, ...]], stage: int, world: int,
                  optimizer: str = "adam") -> list[Bytes]:
    """Per rank: the bytes of parameters, gradients and optimizer state the training path
    holds after a step (fp32 storage; see the module docstring)."""
    per_element = _STATE_PER_ELEMENT[optimizer]
    per_tensor = _STATE_PER_TENSOR.get(optimizer, 0)
    numel = [math.prod(s) for s in shapes]
    total = sum(numel)
    if world == 1 or stage == 0:
        state = per_element * total + per_tensor * len(shapes) if per_element else 0
        return [Bytes(4 * total, 4 * total, state)] * world
    out = []
    if stage in (1, 2):
        owned = zero_partition(shapes, world, optimizer)
        for rank in range(world):
            mine = sum(numel[i] for i in owned[rank])
            state = per_element * mine + per_tensor * len(owned[rank]) if per_element else 0
            grads = 4 * total if stage == 1 else 4 * mine
            out.append(Bytes(4 * total, grads, state))
        return out
    for rank in range(world):
        padded = sum(_fsdp_local(s, world, rank)[0] for s in shapes)
        local = sum(_fsdp_local(s, world, rank)[1] for s in shapes)
        state = per_element * local + per_tensor * len(shapes) if per_element else 0
        out.append(Bytes(4 * padded, 4 * padded, state))
    return out


# --------------------------------------------------------------------------- activations


def example_batch(model_spec: dict, rows: int) -> tuple[Tensor, Tensor]:
    """Inputs and targets of the shapes a zoo model trains on (the values do not matter)."""
    kind = model_spec.get("kind")
    g = torch.Generator().manual_seed(0)
    if kind == "transformer":
        vocab, context = int(model_spec["vocab"]), int(model_spec["context"])
        tokens = torch.randint(0, vocab, (rows, context), generator=g)
        return tokens, torch.randint(0, vocab, (rows, context), generator=g)
    if kind == "mlp":
        features, classes = model_spec["sizes"][0], model_spec["sizes"][-1]
        return torch.randn(rows, features, generator=g), torch.randint(0, classes, (rows,),
                                                                         generator=g)
    if kind == "cnn":
        features = int(model_spec.get("in_channels", 1)) * int(model_spec["image_size"]) ** 2
        return (torch.randn(rows, features, generator=g),
                torch.randint(0, int(model_spec["classes"]), (rows,), generator=g))
    if kind == "autoencoder":
        x = torch.rand(rows, int(model_spec["input_dim"]), generator=g)
        return x, x.clone()
    raise ValueError(f"the planner takes the zoo's models (mlp, cnn, autoencoder, "
                     f"transformer), got model.kind {kind!r}")


def default_loss(model_spec: dict) -> str:
    return "mse" if model_spec.get("kind") == "autoencoder" else "cross_entropy"


def can_checkpoint(model: nn.Module) -> bool:
    """Whether large_batch.enable_activation_checkpointing takes the model."""
    from .models import GPT

    return isinstance(model, GPT | nn.Sequential)


class _LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by tensors created while it is active: every op's outputs
    are seen here, and a finalizer on each (PyTorch keeps a tensor's Python object alive as
    long as autograd holds the tensor) says when its storage is let go. Storages that existed
    before (parameters, gradients) are not counted."""

    def __init__(self, existing: set[int]) -> None:
        super().__init__()
        self.existing = existing
        self.refs: dict[tuple[int, int], int] = {}
        self.live = self.peak = 0

    def _release(self, key: tuple[int, int]) -> None:
        count = self.refs.get(key)
        if count is None:
            return
        if count > 1:
            self.refs[key] = count - 1
            return
        del self.refs[key]
        self.live -= key[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key[1] == 0 or key[0] in self.existing:
                continue
            if key in self.refs:
                self.refs[key] += 1
            else:
                self.refs[key] = 1
                self.live += key[1]
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release, key)
        return out


def step_peak_bytes(model: nn.Module, model_spec: dict, rows: int, loss_name: str,
                    precision: str) -> int:
    """Peak bytes of the tensors one forward + backward creates at `rows` examples (after a
    first step, so the gradients exist, as from a job's second step on)."""
    from .large_batch import accumulate_gradients
    from .loop import loss_function

    x, y = example_batch(model_spec, rows)
    loss = loss_function(loss_name)
    model.train()
    accumulate_gradients(model, loss, x, y, 1, precision=precision)
    existing = {t.untyped_storage().data_ptr() for p in model.parameters()
                for t in (p, p.grad) if t is not None}
    mode = _LiveBytes(existing)
    with mode:
        accumulate_gradients(model, loss, x, y, 1, precision=precision)
    for p in model.parameters():
        p.grad = None
    return mode.peak


@dataclass(frozen=True)
class Activations:
    """bytes(micro) = base + per_example * micro, plain and checkpointed (None: cannot)."""

    base: float
    per_example: float
    checkpointed_base: float | None
    checkpointed_per_example: float | None
    method: str

    def bytes(self, micro: int, checkpointing: bool = False) -> int | None:
        if checkpointing:
            if self.checkpointed_base is None:
                return None
            return int(max(0.0, self.checkpointed_base + self.checkpointed_per_example * micro))
        return int(max(0.0, self.base + self.per_example * micro))


def measure_activations(model_spec: dict, *, precision: str = "fp32",
                        loss: str | None = None) -> Activations:
    """The peak of forward + backward beyond the states, at MEASURE_BATCHES examples, with
    and without checkpointing, fitted as base + slope x micro-batch."""
    loss = loss or default_loss(model_spec)
    threads = torch.get_num_threads()
    # Micro-batches of 2 and 4 gain nothing from intra-op threads, and on a busy host their
    # spin-waits made each of these passes ~100x slower (1 s against 10 ms, 2 cores).
    torch.set_num_threads(1)
    try:
        return _measure(model_spec, precision, loss)
    finally:
        torch.set_num_threads(threads)


def _measure(model_spec: dict, precision: str, loss: str) -> Activations:
    from .large_batch import enable_activation_checkpointing
    from .models import build_model

    def fit(checkpointing: bool) -> tuple[float, float] | None:
        torch.manual_seed(0)
        model = build_model(model_spec)
        if checkpointing:
            if not can_checkpoint(model):
                return None
            enable_activation_checkpointing(model)
        b1, b2 = MEASURE_BATCHES
        v1, v2 = (step_peak_bytes(model, model_spec, b, loss, precision) for b in (b1, b2))
        slope = (v2 - v1) / (b2 - b1)
        return v1 - slope * b1, slope

    base, slope = fit(False)
    checkpointed = fit(True)
    method = (f"peak bytes of one forward + backward at micro-batches {MEASURE_BATCHES[0]} "
              f"and {MEASURE_BATCHES[1]} ({precision}), linear in the micro-batch")
    return Activations(base, slope, *(checkpointed or (None, None)), method)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PlanRow:
    stage: int
    checkpointing: bool
    accumulation: int
    micro_batch: int
    parameters: int  # per worker: the most any rank holds
    gradients: int
    optimizer: int
    activations: int
    formula: Bytes  # the ZeRO paper's per-worker bytes for this stage and precision
    step_time: float  # relative to stage 0, no checkpointing, no accumulation
    fits: bool

    @property
    def states(self) -> int:
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.states + self.activations

    def describe(self) -> str:
        extras = []
        if self.checkpointing:
            extras.append("activation checkpointing")
        if self.accumulation > 1:
            extras.append(f"{self.accumulation} micro-batches of {self.micro_batch}")
        return f"ZeRO stage {self.stage}" + (f" + {' + '.join(extras)}" if extras else "")

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["formula"] = asdict(self.formula)
        out["total"] = self.total
        return out


@dataclass(frozen=True)
class Plan:
    model: dict
    parameter_count: int
    workers: int
    batch_size: int
    precision: str
    optimizer: str
    budget_bytes: int
    rows: tuple[PlanRow, ...]
    recommended_index: int | None
    reason: str
    activation_method: str
    per_rank: dict[int, list[Bytes]] = field(default_factory=dict, repr=False)

    @property
    def recommended(self) -> PlanRow | None:
        return None if self.recommended_index is None else self.rows[self.recommended_index]

    def table(self) -> str:
        """The rows as a fixed-width text table (MiB), the recommendation marked."""
        head = (f"{self.parameter_count:,} parameters, {self.workers} worker(s), batch "
                f"{self.batch_size}, {self.precision}, {self.optimizer}; budget "
                f"{_mib(self.budget_bytes)} MiB per worker")
        cols = ("stage", "ckpt", "accum", "micro", "params", "grads", "optim", "activ",
                "total", "paper", "step", "fits")
        lines = [head, "  ".join(f"{c:>8}" for c in cols)]
        for i, r in self._shown():
            cells = (r.stage, "yes" if r.checkpointing else "no", r.accumulation,
                     r.micro_batch, _mib(r.parameters), _mib(r.gradients), _mib(r.optimizer),
                     _mib(r.activations), _mib(r.total), _mib(r.formula.total),
                     f"{r.step_time:.2f}x", "yes" if r.fits else "no")
            mark = "  <- recommended" if i == self.recommended_index else ""
            lines.append("  ".join(f"{c!s:>8}" for c in cells) + mark)
        lines.append(f"(MiB per worker; 'paper' = ZeRO formula for the states; activations: "
                     f"{self.activation_method})")
        lines.append(self.reason)
        return "\n".join(lines)

    def _shown(self) -> list[tuple[int, PlanRow]]:
        """Per stage and checkpointing: no accumulation, and the least accumulation that
        fits when that does not (all rows stay in `rows`), and the recommendation."""
        shown: dict[int, PlanRow] = {}
        for stage in range(4):
            for ckpt in (False, True):
                group = [(i, r) for i, r in enumerate(self.rows)
                         if r.stage == stage and r.checkpointing == ckpt]
                if not group:
                    continue
                shown.setdefault(*group[0])
                fitting = [(i, r) for i, r in group if r.fits]
                if fitting and not group[0][1].fits:
                    shown.setdefault(*fitting[0])
        if self.recommended_index is not None:
            shown.setdefault(self.recommended_index, self.recommended)
        return sorted(shown.items())

    def as_dict(self) -> dict[str, Any]:
        return {
            "parameter_count": self.parameter_count, "workers": self.workers,
            "batch_size": self.batch_size, "precision": self.precision,
            "optimizer": self.optimizer, "budget_bytes": self.budget_bytes,
            "rows": [r.as_dict() for r in self.rows],
            "recommended": self.recommended_index, "reason": self.reason,
            "activation_method": self.activation_method,
        }


def _mib(value: int) -> str:
    return f"{value / 2**20:.1f}"


def _accumulations(per_worker: int, limit: int = MAX_ACCUMULATION) -> list[int]:
    out, k = [], 1
    while k <= min(per_worker, limit):
        if per_worker % k == 0:
            out.append(k)
        k *= 2
    return out


def _optimizer_key(optimizer: Any) -> str:
    if isinstance(optimizer, dict):
        name = optimizer.get("name", "adam")
        if name == "sgd" and optimizer.get("momentum"):
            return "sgd-momentum"
        return name
    return optimizer or "adam"


def make_plan(model_spec: dict, *, workers: int = 1, batch_size: int = 128,
              precision: str = "fp32", optimizer: Any = "adam",
              budget_bytes: int | None = None, loss: str | None = None,
              accumulation: list[int] | None = None, checkpointing: list[bool] | None = None,
              model: nn.Module | None = None) -> Plan:
    """The plan for a zoo model on `workers` data-parallel workers at a global batch (see the
    module docstring). `accumulation` / `checkpointing` restrict the rows (default: every
    power-of-two accumulation that splits the per-worker batch, both checkpointing values)."""
    from .models import build_model

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if batch_size % workers:
        raise ValueError(f"batch_size ({batch_size}) must be a multiple of workers ({workers})")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    opt = _optimizer_key(optimizer)
    if opt not in _STATE_PER_ELEMENT:
        raise ValueError(f"optimizer must be one of {sorted(_STATE_PER_ELEMENT)} for the "
                         f"planner, got {opt!r}")
    budget = DEFAULT_BUDGET_BYTES if budget_bytes is None else int(budget_bytes)
    if budget <= 0:
        raise ValueError(f"memory budget must be > 0 bytes, got {budget}")
    if not isinstance(model_spec, dict) or model_spec.get("kind") in ("torch_export", "pickle"):
        raise ValueError("the planner takes the zoo's models (mlp, cnn, autoencoder, "
                         "transformer); a caller's own module is not planned")
    if model is None:
        torch.manual_seed(0)
        model = build_model(model_spec)
    shapes = _trainable_shapes(model)
    count = sum(math.prod(s) for s in shapes)
    activations = measure_activations(model_spec, precision=precision, loss=loss)
    per_worker = batch_size // workers
    ks = accumulation or _accumulations(per_worker)
    bad = [k for k in ks if k < 1 or per_worker % k]
    if bad:
        raise ValueError(f"accumulation {bad} must divide the per-worker batch {per_worker}")
    ckpts = checkpointing if checkpointing is not None else [False, True]
    paper = Precision.FP32 if precision == "fp32" else Precision.MIXED
    rows: list[PlanRow] = []
    per_rank: dict[int, list[Bytes]] = {}
    for stage in range(4):
        held = held_per_rank(shapes, stage, workers, opt)
        per_rank[stage] = held
        worst = max(held, key=lambda b: b.total)
        formula = zero_formula(stage if workers > 1 else 0, count, workers, paper)
        comm = STAGE_STEP_FACTOR[stage] if workers > 1 else 1.0
        for ckpt in ckpts:
            for k in ks:
                act = activations.bytes(per_worker // k, ckpt)
                if act is None:
                    continue
                step = comm * (1 + CHECKPOINT_RECOMPUTE * ckpt) * (1 + ACCUMULATION_OVERHEAD
                                                                    * (k - 1))
                total = worst.total + act
                rows.append(PlanRow(stage, ckpt, k, per_worker // k, worst.parameters,
                                    worst.gradients, worst.optimizer, act, formula,
                                    round(step, 4), total <= budget))
    fitting = [i for i, r in enumerate(rows) if r.fits]
    if fitting:
        best = min(fitting, key=lambda i: (rows[i].step_time, rows[i].total))
        row = rows[best]
        reason = (f"recommended: {row.describe()}, {_mib(row.total)} MiB per worker of "
                  f"{_mib(budget)} MiB, step time {row.step_time:.2f}x stage 0's")
        if workers == 1:
            reason += " (one worker: every stage runs unsharded)"
    else:
        best = None
        smallest = min(rows, key=lambda r: r.total)
        reason = (f"nothing fits {_mib(budget)} MiB per worker: the smallest is "
                  f"{smallest.describe()} at {_mib(smallest.total)} MiB; add workers, shrink "
                  f"the batch or the model")
    return Plan(dict(model_spec), count, workers, batch_size, precision, opt, budget,
                tuple(rows), best, reason, activations.method, per_rank)


# --------------------------------------------------------------------------- training specs


def plan_for_spec(spec: dict, *, workers: int | None = None,
                  budget_bytes: int | None = None) -> Plan:
    """The plan for a training spec (what `secant train --plan` and `zero_stage: auto` use):
    its model, batch_size, optimizer, scaling.precision and scaling.memory_budget."""
    if not isinstance(spec, dict) or "model" not in spec:
        raise ValueError("a training spec with a model is required")
    scaling = spec.get("scaling") or {}
    workers = workers if workers is not None else spec.get("workers", 1)
    batch = spec.get("batch_size", 128)
    if scaling.get("micro_batch_size") and "batch_size" not in spec:
        batch = (int(scaling["micro_batch_size"]) * int(scaling.get("accumulation_steps", 1))
                 * workers)
    if budget_bytes is None and scaling.get("memory_budget") is not None:
        budget_bytes = parse_bytes(scaling["memory_budget"], "scaling.memory_budget")
    accumulation = None
    if "accumulation_steps" in scaling:
        accumulation = [int(scaling["accumulation_steps"])]
    checkpointing = None
    if "activation_checkpointing" in scaling:
        checkpointing = [bool(scaling["activation_checkpointing"])]
    return make_plan(spec["model"], workers=workers, batch_size=batch,
                     precision=scaling.get("precision", "fp32"),
                     optimizer=spec.get("optimizer", "adam"), budget_bytes=budget_bytes,
                     loss=spec.get("loss"), accumulation=accumulation,
                     checkpointing=checkpointing)


def is_auto_zero(spec: Any) -> bool:
    scaling = spec.get("scaling") if isinstance(spec, dict) else None
    return isinstance(scaling, dict) and scaling.get("zero_stage") == "auto"


def resolve_auto_zero(spec: dict, workers: int) -> tuple[dict, Plan | None]:
    """A spec whose `scaling.zero_stage` is "auto", with the planner's recommended stage (and
    its checkpointing / accumulation where the spec leaves them open) filled in; the plan
    too. Other specs come back as they are, with None. ValueError when nothing fits."""
    if not is_auto_zero(spec):
        return spec, None
    scaling = dict(spec["scaling"])
    probe = {**spec, "scaling": {k: v for k, v in scaling.items() if k != "zero_stage"}}
    try:
        plan = plan_for_spec(probe, workers=workers)
    except ValueError as exc:
        raise ValueError(f"scaling.zero_stage auto: {exc}") from None
    row = plan.recommended
    if row is None:
        raise ValueError(f"scaling.zero_stage auto: {plan.reason}")
    scaling["zero_stage"] = row.stage
    scaling.setdefault("activation_checkpointing", row.checkpointing)
    if "micro_batch_size" not in scaling:
        scaling.setdefault("accumulation_steps", row.accumulation)
    scaling.pop("memory_budget", None)
    return {**spec, "scaling": scaling}, plan


__all__ = [
    "DEFAULT_BUDGET_BYTES",
    "Activations",
    "Plan",
    "PlanRow",
    "held_per_rank",
    "is_auto_zero",
    "make_plan",
    "measure_activations",
    "parse_bytes",
    "plan_for_spec",
    "resolve_auto_zero",
    "step_peak_bytes",
    "zero_partition",
]
