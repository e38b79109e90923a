"""Large-batch training: batch arithmetic, LR scaling and warmup, LARS and LAMB, gradient
accumulation, mixed precision, activation checkpointing and LoRA adapters.

    plan = LargeBatchPlan(micro_batch=32, accumulation=4, workers=2, base_batch=32,
                          base_lr=0.1, scaling="linear", warmup="linear", warmup_steps=50)
    plan.effective_batch                 # 256 = 32 x 4 x 2
    schedule = plan.lr_schedule()        # step -> lr: 0.1 ramping to 0.8 over 50 steps
    set_lr(optimizer, resolve(schedule, step))

Schedules are `float | Callable[[int], float]` (a constant or a function of the 0-based
optimizer step); `resolve` reads either. Pure torch, device-agnostic (CPU and CUDA).
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.checkpoint import checkpoint

Schedule = float | Callable[[int], float]


def resolve(schedule: Schedule, step: int) -> float:
    return float(schedule(step)) if callable(schedule) else float(schedule)


def set_lr(optimizer: Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------- batch and learning rate


def effective_batch_size(micro_batch: int, accumulation: int = 1, workers: int = 1) -> int:
    """Examples behind one optimizer step: micro x accumulation x workers."""
    for name, value in (("micro_batch", micro_batch), ("accumulation", accumulation),
                        ("workers", workers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return micro_batch * accumulation * workers


class LRScaling(enum.Enum):
    """How the learning rate follows the batch size from a stated base batch:
    linear (Goyal et al. 2017, SGD), sqrt (Krizhevsky 2014; common for Adam/LAMB), none."""

    NONE = "none"
    LINEAR = "linear"
    SQRT = "sqrt"


def scaled_lr(base_lr: float, base_batch: int, batch: int,
              rule: LRScaling | str = LRScaling.LINEAR) -> float:
    """base_lr x (batch / base_batch) for linear, x sqrt(batch / base_batch) for sqrt."""
    rule = LRScaling(rule)
    if base_batch < 1 or batch < 1:
        raise ValueError(f"batch sizes must be >= 1, got base {base_batch} and {batch}")
    ratio = batch / base_batch
    if rule is LRScaling.LINEAR:
        return base_lr * ratio
    if rule is LRScaling.SQRT:
        return base_lr * math.sqrt(ratio)
    return base_lr


class Warmup(enum.Enum):
    """Goyal et al. 2017 sec. 2.2: `linear` (gradual: from the start LR up to the target in
    equal increments over k steps) or `constant` (hold the start LR for k steps, then jump to
    the target); `none`: the target from step 0."""

    NONE = "none"
    LINEAR = "linear"
    CONSTANT = "constant"


def warmup_schedule(target: Schedule, kind: Warmup | str, steps: int,
                    start_lr: float) -> Callable[[int], float]:
    """The LR at each 0-based step: the warmup for `steps` steps, then `target` (a constant
    or a schedule, called with the same step). Linear warmup: start_lr + (target - start_lr)
    x t / steps for t < steps, so step `steps` is the first at the full target."""
    kind = Warmup(kind)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {steps!r}")
    if not math.isfinite(start_lr) or start_lr < 0:
        raise ValueError(f"warmup start_lr must be a finite number >= 0, got {start_lr!r}")

    def lr(step: int) -> float:
        goal = resolve(target, step)
        if kind is Warmup.NONE or step >= steps:
            return goal
        if kind is Warmup.CONSTANT:
            return start_lr
        return start_lr + (goal - start_lr) * step / steps

    return lr


class Precision(enum.Enum):
    """Compute precision. bf16: autocast (CPU or CUDA), fp32 weights and optimizer state.
    fp16: autocast + GradScaler, CUDA only (CPU fp16 kernels are slow and lack a scaler)."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


def autocast(device: torch.device | str, precision: Precision | str):
    """The forward pass's autocast context for this device and precision."""
    precision, device_type = Precision(precision), torch.device(device).type
    if precision is Precision.FP32:
        return nullcontext()
    if precision is Precision.FP16 and device_type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device; use bf16 on CPU")
    dtype = torch.bfloat16 if precision is Precision.BF16 else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)


def grad_scaler(device: torch.device | str, precision: Precision | str, *,
                sharded_gradients: bool = False):
    """A GradScaler for fp16 on CUDA; None otherwise (bf16 and fp32 need no loss scaling).

    With gradients sharded across ranks (ZeRO stages 2-3) each rank sees only its shard, so
    the inf/NaN check must be agreed on by all ranks: ShardedGradScaler all-reduces it, and
    every rank skips (or takes) the same steps, keeping the collectives in step."""
    if Precision(precision) is Precision.FP16 and torch.device(device).type == "cuda":
        if sharded_gradients:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler("cuda")
        return torch.amp.GradScaler("cuda")
    return None


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class LargeBatchPlan:
    """The batch/LR part of a training job's scaling plan, checked when built.

    micro_batch: examples per worker per forward/backward; accumulation: micro-batches per
    optimizer step; workers: data-parallel workers. base_lr is right for base_batch; the
    rule scales it to the effective batch; warmup starts at base_lr (Goyal et al.) unless
    warmup_start_lr is given. Memory: accumulation costs no extra memory (gradients add in
    place); activations scale with micro_batch only.
    """

    micro_batch: int
    accumulation: int = 1
    workers: int = 1
    base_batch: int | None = None  # default: the effective batch (no scaling)
    base_lr: float = 0.1
    scaling: LRScaling | str = LRScaling.NONE
    warmup: Warmup | str = Warmup.NONE
    warmup_steps: int = 0
    warmup_start_lr: float | None = None
    precision: Precision | str = Precision.FP32
    activation_checkpointing: bool = False
    lora_rank: int = 0  # 0: no adapters

    def __post_init__(self) -> None:
        effective_batch_size(self.micro_batch, self.accumulation, self.workers)
        base = self.base_batch
        if base is not None and (isinstance(base, bool) or not isinstance(base, int)
                                 or base < 1):
            raise ValueError(f"LargeBatchPlan.base_batch must be an integer >= 1, got {base!r}")
        lr = self.base_lr
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not (
                math.isfinite(lr) and lr > 0):
            raise ValueError(f"LargeBatchPlan.base_lr must be a finite number > 0, got {lr!r}")
        for name, enum_cls in (("scaling", LRScaling), ("warmup", Warmup),
                               ("precision", Precision)):
            try:
                object.__setattr__(self, name, enum_cls(getattr(self, name)))
            except ValueError as exc:
                raise ValueError(
                    f"LargeBatchPlan.{name} must be one of {[e.value for e in enum_cls]}, "
                    f"got {getattr(self, name)!r}") from exc
        steps = self.warmup_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"LargeBatchPlan.warmup_steps must be an integer >= 0, "
                             f"got {steps!r}")
        if self.warmup is not Warmup.NONE and steps == 0:
            raise ValueError("LargeBatchPlan.warmup_steps must be > 0 when warmup is set")
        start = self.warmup_start_lr
        if start is not None and (isinstance(start, bool) or not isinstance(start, int | float)
                                  or not math.isfinite(start) or start < 0):
            raise ValueError(f"LargeBatchPlan.warmup_start_lr must be a finite number >= 0, "
                             f"got {start!r}")
        rank = self.lora_rank
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= 1024:
            raise ValueError(f"LargeBatchPlan.lora_rank must be an integer in [0, 1024], "
                             f"got {rank!r}")
        if not isinstance(self.activation_checkpointing, bool):
            raise ValueError("LargeBatchPlan.activation_checkpointing must be a boolean")

    @property
    def effective_batch(self) -> int:
        return effective_batch_size(self.micro_batch, self.accumulation, self.workers)

    @property
    def peak_lr(self) -> float:
        base = self.base_batch or self.effective_batch
        return scaled_lr(self.base_lr, base, self.effective_batch, self.scaling)

    def lr_schedule(self, after_warmup: Schedule | None = None) -> Callable[[int], float]:
        """step -> lr: warmup from warmup_start_lr (default base_lr) to peak_lr, then
        `after_warmup` (default: constant peak_lr)."""
        start = self.base_lr if self.warmup_start_lr is None else self.warmup_start_lr
        target = self.peak_lr if after_warmup is None else after_warmup
        return warmup_schedule(target, self.warmup, self.warmup_steps, start)


# ---------------------------------------------------------------- a job's scaling section


SCALING_KEYS = ("zero_stage", "micro_batch_size", "accumulation_steps", "lr_scaling",
                "base_batch_size", "warmup", "precision", "activation_checkpointing", "lora",
                "memory_budget")


def _scaling_int(name: str, value: Any, lower: int, upper: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lower or (
            upper is not None and value > upper):
        bound = f"in [{lower}, {upper}]" if upper is not None else f">= {lower}"
        raise ValueError(f"scaling.{name} must be an integer {bound}, got {value!r}")
    return value


def _scaling_enum(name: str, enum_cls: type[enum.Enum], value: Any, allowed=None):
    choices = [e.value for e in (allowed or enum_cls)]
    if value not in choices:
        raise ValueError(f"scaling.{name} must be one of {choices}, got {value!r}")
    return enum_cls(value)


@dataclass(frozen=True)
class ScalingSpec:
    """The `scaling` section of a training spec (loop.TrainSpec), checked field by field;
    a ValueError names the field (`scaling.<name>`).

    zero_stage 0-3 (zero.ShardingPlan; with one worker every stage runs unsharded, where the
    ZeRO formulas coincide), micro_batch_size (examples per worker per forward/backward;
    default: batch_size / (accumulation_steps x workers)), accumulation_steps, lr_scaling
    none|linear|sqrt from base_batch_size (required with a rule) to the effective batch,
    warmup {"kind": linear|constant, "steps": k, "start_lr": default the optimizer's lr},
    precision fp32|bf16|fp16 (fp16: CUDA only), activation_checkpointing, lora
    {"rank": r, "alpha": default r}. `batch_size` is the spec's own batch_size when it was
    given (checked against micro x accumulation x workers), filled in by TrainSpec.parse.
    """

    zero_stage: int = 0
    micro_batch_size: int | None = None
    accumulation_steps: int = 1
    lr_scaling: LRScaling = LRScaling.NONE
    base_batch_size: int | None = None
    warmup: Warmup = Warmup.NONE
    warmup_steps: int = 0
    warmup_start_lr: float | None = None
    precision: Precision = Precision.FP32
    activation_checkpointing: bool = False
    lora_rank: int = 0
    lora_alpha: float | None = None
    batch_size: int | None = None

    @classmethod
    def parse(cls, raw: Any) -> ScalingSpec:
        if not isinstance(raw, dict):
            raise ValueError(f"scaling must be a dict, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(SCALING_KEYS))
        if unknown:
            raise ValueError(f"scaling: unknown field(s) {unknown}; known: "
                             f"{sorted(SCALING_KEYS)}")
        micro = raw.get("micro_batch_size")
        base = raw.get("base_batch_size")
        rule = _scaling_enum("lr_scaling", LRScaling, raw.get("lr_scaling", "none"))
        if base is not None:
            base = _scaling_int("base_batch_size", base, 1)
        if rule is not LRScaling.NONE and base is None:
            raise ValueError(f"scaling.base_batch_size is required with lr_scaling "
                             f"{rule.value!r}: the batch the optimizer's lr is right for")
        kind, steps, start = Warmup.NONE, 0, None
        warmup = raw.get("warmup")
        if warmup is not None:
            if not isinstance(warmup, dict):
                raise ValueError(f"scaling.warmup must be a dict {{kind, steps}}, "
                                 f"got {warmup!r}")
            extra = sorted(set(warmup) - {"kind", "steps", "start_lr"})
            if extra:
                raise ValueError(f"scaling.warmup: unknown field(s) {extra}; known: "
                                 f"['kind', 'start_lr', 'steps']")
            kind = _scaling_enum("warmup.kind", Warmup, warmup.get("kind"),
                                 (Warmup.LINEAR, Warmup.CONSTANT))
            steps = _scaling_int("warmup.steps", warmup.get("steps"), 1)
            start = warmup.get("start_lr")
            if start is not None and (isinstance(start, bool) or not isinstance(
                    start, int | float) or not math.isfinite(start) or start < 0):
                raise ValueError(f"scaling.warmup.start_lr must be a finite number >= 0, "
                                 f"got {start!r}")
        lora = raw.get("lora")
        rank, alpha = 0, None
        if lora is not None:
            if not isinstance(lora, dict) or "rank" not in lora:
                raise ValueError(f"scaling.lora must be a dict with a rank, got {lora!r}")
            extra = sorted(set(lora) - {"rank", "alpha"})
            if extra:
                raise ValueError(f"scaling.lora: unknown field(s) {extra}; known: "
                                 f"['alpha', 'rank']")
            rank = _scaling_int("lora.rank", lora["rank"], 1, 1024)
            alpha = lora.get("alpha")
            if alpha is not None and (isinstance(alpha, bool) or not isinstance(
                    alpha, int | float) or not math.isfinite(alpha) or alpha <= 0):
                raise ValueError(f"scaling.lora.alpha must be a finite number > 0, "
                                 f"got {alpha!r}")
        if raw.get("zero_stage") == "auto":
            # Resolved before training by the memory planner (the gateway, run_training_job
            # and loop.train call workers.training.planner.resolve_auto_zero).
            raise ValueError("scaling.zero_stage 'auto' must be resolved by the memory planner "
                             "first (workers.training.planner.resolve_auto_zero)")
        if raw.get("memory_budget") is not None:
            from .planner import parse_bytes

            parse_bytes(raw["memory_budget"], "scaling.memory_budget")
        checkpointing = raw.get("activation_checkpointing", False)
        if not isinstance(checkpointing, bool):
            raise ValueError(f"scaling.activation_checkpointing must be true or false, "
                             f"got {checkpointing!r}")
        return cls(
            zero_stage=_scaling_int("zero_stage", raw.get("zero_stage", 0), 0, 3),
            micro_batch_size=None if micro is None else _scaling_int("micro_batch_size",
                                                                      micro, 1),
            accumulation_steps=_scaling_int("accumulation_steps",
                                            raw.get("accumulation_steps", 1), 1),
            lr_scaling=rule, base_batch_size=base,
            warmup=kind, warmup_steps=steps,
            warmup_start_lr=None if start is None else float(start),
            precision=_scaling_enum("precision", Precision, raw.get("precision", "fp32")),
            activation_checkpointing=checkpointing,
            lora_rank=rank, lora_alpha=None if alpha is None else float(alpha),
        )

    def global_batch(self, workers: int, train_rows: int) -> int:
        """The effective batch: micro x accumulation x workers; ValueError if it does not fit
        the spec's batch_size or the training split."""
        split = self.accumulation_steps * workers
        if self.micro_batch_size is not None:
            batch = self.micro_batch_size * split
            if self.batch_size is not None and self.batch_size not in (0, batch):
                raise ValueError(
                    f"batch_size ({self.batch_size}) must equal scaling.micro_batch_size x "
                    f"scaling.accumulation_steps x workers ({self.micro_batch_size} x "
                    f"{self.accumulation_steps} x {workers} = {batch}), or be left out")
        else:
            batch = train_rows if self.batch_size in (None, 0) else self.batch_size
            if batch % split:
                raise ValueError(
                    f"batch_size ({batch}) must be a multiple of scaling.accumulation_steps "
                    f"x workers ({self.accumulation_steps} x {workers}): each worker runs "
                    f"equal micro-batches")
        if batch > train_rows:
            raise ValueError(f"the effective batch ({batch} = micro x accumulation x workers) "
                             f"exceeds the {train_rows} training examples")
        return batch

    def plan(self, workers: int, train_rows: int, base_lr: float) -> LargeBatchPlan:
        """The LargeBatchPlan (batch arithmetic, LR scaling and warmup) for this job."""
        batch = self.global_batch(workers, train_rows)
        return LargeBatchPlan(
            micro_batch=batch // (self.accumulation_steps * workers),
            accumulation=self.accumulation_steps, workers=workers,
            base_batch=self.base_batch_size, base_lr=base_lr, scaling=self.lr_scaling,
            warmup=self.warmup, warmup_steps=self.warmup_steps,
            warmup_start_lr=self.warmup_start_lr, precision=self.precision,
            activation_checkpointing=self.activation_checkpointing, lora_rank=self.lora_rank)


# ---------------------------------------------------------------- LARS and LAMB


def exclude_bias_and_norm(model: nn.Module, weight_decay: float,
                          **group_settings: Any) -> list[dict]:
    """Two param groups as You et al. train them: weights (decay, layer-wise adaptation) and
    biases / normalisation parameters (1-D tensors: no decay, no adaptation)."""
    weights, others = [], []
    for p in model.parameters():
        if p.requires_grad:
            (weights if p.ndim > 1 else others).append(p)
    return [
        {"params": weights, "weight_decay": weight_decay, "adapt": True, **group_settings},
        {"params": others, "weight_decay": 0.0, "adapt": False, **group_settings},
    ]


def _trust_ratio(weight_norm: Tensor, update_norm: Tensor, coefficient: float,
                 eps: float) -> Tensor:
    ratio = coefficient * weight_norm / (update_norm + eps)
    return torch.where((weight_norm > 0) & (update_norm > 0), ratio, torch.ones_like(ratio))


class LARS(Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You, Gitman & Ginsburg 2017).

    Per parameter tensor (a "layer"): local_lr = trust_coefficient x ||w|| /
    (||grad|| + wd x ||w||) (1 when either norm is 0); g <- local_lr x (grad + wd x w);
    v <- momentum x v + g; w <- w - lr x v. Groups with adapt=False (biases and norms, see
    exclude_bias_and_norm) take plain SGD with momentum. Memory: one momentum buffer, 4P
    bytes in fp32. `last_trust_ratios` holds the latest step's ratios (parameter -> tensor).
    """

    def __init__(self, params: Iterable, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 0.0, trust_coefficient: float = 0.001,
                 eps: float = 1e-9, adapt: bool = True) -> None:
        _check_positive("LARS", "lr", lr)
        _check_range("LARS", "momentum", momentum, 0.0, 1.0)
        _check_range("LARS", "weight_decay", weight_decay, 0.0, math.inf)
        _check_positive("LARS", "trust_coefficient", trust_coefficient)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, adapt=adapt)
        super().__init__(params, defaults)
        self.last_trust_ratios: dict[Tensor, Tensor] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                decay = group["weight_decay"]
                g = p.grad.add(p, alpha=decay) if decay else p.grad.clone()
                if group["adapt"]:
                    weight_norm = p.norm()
                    ratio = _trust_ratio(weight_norm, p.grad.norm() + decay * weight_norm,
                                         group["trust_coefficient"], group["eps"])
                    self.last_trust_ratios[p] = ratio
                    g.mul_(ratio)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = g
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


class LAMB(Optimizer):
    """Adam with layer-wise trust ratios (You et al. 2020, "Large batch optimization for
    deep learning: training BERT in 76 minutes"), bias-corrected as in the paper's Algorithm 2.

    Per parameter tensor: m, v as Adam; r = m_hat / (sqrt(v_hat) + eps) + wd x w;
    trust = ||w|| / ||r|| (1 when either norm is 0); w <- w - lr x trust x r. Groups with
    adapt=False use trust 1 (biases and norms). Memory: m and v, 8P bytes in fp32 (as Adam).
    `last_trust_ratios` holds the latest step's ratios.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, adapt: bool = True) -> None:
        _check_positive("LAMB", "lr", lr)
        for i, beta in enumerate(betas):
            _check_range("LAMB", f"betas[{i}]", beta, 0.0, 1.0)
        _check_range("LAMB", "weight_decay", weight_decay, 0.0, math.inf)
        _check_positive("LAMB", "eps", eps)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        adapt=adapt)
        super().__init__(params, defaults)
        self.last_trust_ratios: dict[Tensor, Tensor] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = m / (1 - beta1**t)
                v_hat = v / (1 - beta2**t)
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                if group["adapt"]:
                    ratio = _trust_ratio(p.norm(), update.norm(), 1.0, 0.0)
                    self.last_trust_ratios[p] = ratio
                    update.mul_(ratio)
                p.add_(update, alpha=-group["lr"])
        return loss


def _check_positive(owner: str, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"{owner}.{name} must be a finite number > 0, got {value!r}")


def _check_range(owner: str, name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value < high:
        raise ValueError(f"{owner}.{name} must be in [{low}, {high}), got {value!r}")


# ---------------------------------------------------------------- gradient accumulation


def accumulate_gradients(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                         X: Tensor, y: Tensor, micro_batches: int, *,
                         precision: Precision | str = Precision.FP32,
                         scaler: Any = None,
                         no_sync: Callable[[nn.Module], Any] | None = None) -> float:
    """Forward/backward of (X, y) as `micro_batches` equal micro-batches, adding into .grad
    so the result equals one backward of the whole batch (loss_fn a mean over rows). Does not
    zero the grads or step. `no_sync` (zero.no_sync) defers the data-parallel gradient
    communication to the last micro-batch. Returns the batch's mean loss. Memory: the
    activations of one micro-batch; gradients add in place."""
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or \
            micro_batches < 1:
        raise ValueError(f"micro_batches must be an integer >= 1, got {micro_batches!r}")
    if X.shape[0] % micro_batches:
        raise ValueError(f"batch of {X.shape[0]} rows does not split into {micro_batches} "
                         f"equal micro-batches")
    device = X.device
    total = 0.0
    for i, (xb, yb) in enumerate(zip(X.chunk(micro_batches), y.chunk(micro_batches),
                                     strict=True)):
        last = i == micro_batches - 1
        context = no_sync(model) if (no_sync is not None and not last) else nullcontext()
        with context:
            with autocast(device, precision):
                loss = loss_fn(model(xb), yb) / micro_batches
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += float(loss.detach())
    return total


# ---------------------------------------------------------------- activation checkpointing


def _checkpointed_forward(module: nn.Module, forward: Callable, *args: Any, **kwargs: Any):
    if not (module.training and torch.is_grad_enabled()):
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(blocks: Sequence[nn.Module]) -> None:
    """Recompute each block's activations in backward instead of storing them
    (torch.utils.checkpoint, non-reentrant). Memory: only each block's input is kept, at the
    cost of one extra forward per block. The forward is replaced on the instance, so
    parameter names and state dicts are unchanged."""
    for block in blocks:
        block.forward = functools.partial(_checkpointed_forward, block, block.forward)


def enable_activation_checkpointing(model: nn.Module, segment: int = 2) -> int:
    """Checkpoints the zoo's deep models: a transformer's blocks; an MLP / autoencoder /
    any nn.Sequential in groups of `segment` layers (Linear + activation). Returns the number
    of checkpointed blocks."""
    from .models import GPT

    if isinstance(model, GPT):
        checkpoint_blocks(list(model.blocks))
        return len(model.blocks)
    if isinstance(model, nn.Sequential):
        layers = list(model)
        groups = [nn.Sequential(*layers[i:i + segment]) for i in range(0, len(layers), segment)]
        # Wrappers share the layers (no copy); the model runs its layers through them.
        checkpoint_blocks(groups)
        model.forward = functools.partial(_run_groups, groups)
        return len(groups)
    raise ValueError(f"activation checkpointing supports the zoo's transformer and "
                     f"sequential models, got {type(model).__name__}")


def _run_groups(groups: list[nn.Module], x: Tensor) -> Tensor:
    for group in groups:
        x = group(x)
    return x


# ---------------------------------------------------------------- LoRA


class LoRALinear(nn.Module):
    """nn.Linear plus a trainable low-rank update (Hu et al. 2021):
    y = base(x) + (alpha / r) x B A x, A (r x in) Kaiming-initialised, B (out x r) zeros, so
    training starts from the base model. The base weight and bias are frozen. Memory:
    r x (in + out) trainable parameters per layer, and their grads and optimizer state."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"lora rank must be an integer >= 1, got {rank!r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.scaling = (alpha if alpha is not None else rank) / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with the update folded into the weight."""
        layer = nn.Linear(self.base.in_features, self.base.out_features,
                          bias=self.base.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(self.base.weight + self.scaling * self.lora_b @ self.lora_a)
            if self.base.bias is not None:
                layer.bias.copy_(self.base.bias)
        return layer.to(self.base.weight.device)


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None,
               include: Callable[[str, nn.Linear], bool] | None = None) -> list[str]:
    """Replaces the model's nn.Linear layers (those `include(name, layer)` accepts; default
    all) by LoRALinear adapters and freezes every other parameter of the model. Returns the
    adapted layers' names."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora rank must be an integer >= 1, got {rank!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and (include is None or include(name, module))]
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(layer, min(rank, layer.in_features,
                                                     layer.out_features), alpha))
    return [name for name, _ in targets]


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every LoRALinear back into a plain nn.Linear, in place (for export)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.merged())
    return model


__all__ = [
    "LAMB",
    "LARS",
    "LRScaling",
    "LargeBatchPlan",
    "LoRALinear",
    "Precision",
    "SCALING_KEYS",
    "ScalingSpec",
    "Schedule",
    "Warmup",
    "accumulate_gradients",
    "apply_lora",
    "autocast",
    "checkpoint_blocks",
    "effective_batch_size",
    "enable_activation_checkpointing",
    "exclude_bias_and_norm",
    "grad_scaler",
    "merge_lora",
    "resolve",
    "scaled_lr",
    "set_lr",
    "warmup_schedule",
]
