"""The single-process training loop (one Ray Train worker will run this, sharded).

    result = train(spec, X, y, callback=print)

spec (a dict from the wire; every field checked, ValueError names the field):
    model:       a model spec (see models.py): the zoo, or a trusted caller's own module
                 (torch_export, pickle; loaded only with train(..., trusted=True))
    loss:        "cross_entropy" | "mse" | "bce" (bce takes logits)
    optimizer:   {"name": ..., "lr": ...} with name one of
                 sgd (momentum, nesterov, weight_decay), adam / adamw (betas, weight_decay),
                 kfac (SGD settings + damping, factor_decay, kl_clip, factor_update_steps,
                 inv_update_steps, compute_method, fisher, rescale, rescale_steps,
                 adapt_damping: see kfac.py), natural-gradient (SGD settings + damping),
                 lbfgs (full batch on the training split through workers.solvers:
                 max_iter, gtol, history_size), adam->lbfgs (adam_steps of Adam, then lbfgs)
                 lars (lr, momentum, weight_decay, trust_coefficient, eps), lamb (Adam
                 settings): large_batch.py's layer-wise adaptive optimizers
    batch_size:  examples per step (0: the whole training split); default 128
    steps | epochs: how long the minibatch phase runs (steps wins if both); default 1 epoch
    seed:        initialization, split and shuffling; default 0
    validation_fraction: held out, in [0, 0.9); default 0.2
    eval_every:  also report the full training-split loss every this many steps (0: never);
                 evaluated outside the timed step
    scaling:     optional large-batch / ZeRO plan (large_batch.ScalingSpec: zero_stage,
                 micro_batch_size, accumulation_steps, lr_scaling + base_batch_size,
                 warmup, precision, activation_checkpointing, lora); such runs (and
                 LARS / LAMB) go through _Run.scaled: zero.wrap instead of the
                 hand all-reduce, accumulation, the LR schedule, a memory report.
                 K-FAC keeps its own path (stage 0; the plan's batch and LR only).

The callback gets a StepMetrics after every step (for L-BFGS: every iteration) and may
return True to stop the run early.

Data parallelism (workers/training/distributed.py runs one train() per Ray worker): pass a
`communicator` with world_size > 1 and every worker draws the same global batch and trains
on its rank's equal slice of it (batch_size must be a multiple of world_size); gradients,
the batch loss and the stop flag are averaged in one all-reduce per step (K-FAC also
all-reduces its factors and splits its inverses through the same communicator), so N
workers follow the 1-worker trajectory up to float rounding. `should_stop` is polled every
step and agreed across workers in that all-reduce, so all stop after the same step.
`initial_state` (a checkpoint.TrainingState) resumes a minibatch run at its step;
`on_checkpoint` receives a TrainingState every `checkpoint_every` steps (its tensors are the live
model/optimizer/K-FAC tensors: save or copy them before returning). Full-batch L-BFGS and
natural-gradient run on one worker only and are not checkpointed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn
from torch.func import functional_call

from workers.solvers import minimize

from .checkpoint import TrainingState
from .kfac import Communicator, ComputeMethod, FisherType, KFACPreconditioner, LocalCommunicator
from .large_batch import (
    LAMB,
    LARS,
    ScalingSpec,
    apply_lora,
    enable_activation_checkpointing,
    merge_lora,
    set_lr,
)
from .memory import MemoryReport
from .models import build_model, check_code_model_plan
from .natural_gradient import NaturalGradientPreconditioner

LOSSES = ("cross_entropy", "mse", "bce")
OPTIMIZERS = ("sgd", "adam", "adamw", "kfac", "natural-gradient", "lbfgs", "adam->lbfgs",
              "lars", "lamb")

_SGD_KEYS = {"lr", "momentum", "nesterov", "weight_decay"}
_ADAM_KEYS = {"lr", "betas", "eps", "weight_decay"}
_KFAC_KEYS = _SGD_KEYS | {"damping", "factor_decay", "kl_clip", "factor_update_steps",
                          "inv_update_steps", "compute_method", "fisher", "rescale",
                          "rescale_steps", "adapt_damping"}
_LBFGS_KEYS = {"max_iter", "gtol", "history_size"}
_OPTIMIZER_KEYS = {
    "sgd": _SGD_KEYS,
    "adam": _ADAM_KEYS,
    "adamw": _ADAM_KEYS,
    "kfac": _KFAC_KEYS,
    "natural-gradient": _SGD_KEYS | {"damping"},
    "lbfgs": _LBFGS_KEYS,
    "adam->lbfgs": _ADAM_KEYS | _LBFGS_KEYS | {"adam_steps"},
    "lars": {"lr", "momentum", "weight_decay", "trust_coefficient", "eps"},
    "lamb": _ADAM_KEYS,
}
_SPEC_KEYS = {"model", "loss", "optimizer", "batch_size", "steps", "epochs", "seed", "scaling",
              "validation_fraction", "eval_every"}


@dataclass(frozen=True)
class StepMetrics:
    step: int
    loss: float  # the step's batch loss (L-BFGS: the full training loss)
    lr: float  # L-BFGS: the accepted step length
    damping: float | None
    step_time_s: float
    samples_per_s: float
    train_loss: float | None = None  # full training split, every `eval_every` steps
    effective_batch: int | None = None  # examples behind the step (micro x accum x workers)


@dataclass
class TrainResult:
    model: nn.Module
    metrics: dict[str, float]  # train_loss, val_loss, val_accuracy (classification)
    steps: int
    train_time_s: float  # summed step times, evaluation excluded
    stopped_early: bool
    preconditioner_state: dict[str, Tensor] | None = None
    history: list[StepMetrics] = field(default_factory=list, repr=False)
    effective_batch: int | None = None  # minibatch runs: examples per optimizer step

    @property
    def state_dict(self) -> dict[str, Tensor]:
        return self.model.state_dict()


# ---------------------------------------------------------------- spec checks


def _number(owner: str, name: str, value: Any, *, lower: float | None = None,
            upper: float | None = None, lower_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{owner}.{name} must be a finite number, got {value!r}")
    if lower is not None and (value < lower or (lower_open and value == lower)):
        raise ValueError(f"{owner}.{name} must be {'>' if lower_open else '>='} {lower}, "
                         f"got {value}")
    if upper is not None and value >= upper:
        raise ValueError(f"{owner}.{name} must be < {upper}, got {value}")
    return float(value)


def _integer(owner: str, name: str, value: Any, *, lower: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lower:
        raise ValueError(f"{owner}.{name} must be an integer >= {lower}, got {value!r}")
    return value


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    settings: dict[str, Any]

    @classmethod
    def parse(cls, raw: Any) -> OptimizerSpec:
        if isinstance(raw, str):
            raw = {"name": raw}
        if not isinstance(raw, dict):
            raise ValueError(f"optimizer must be a dict with a name, got {raw!r}")
        name = raw.get("name")
        if name not in _OPTIMIZER_KEYS:
            raise ValueError(f"optimizer.name must be one of {list(OPTIMIZERS)}, got {name!r}")
        known = _OPTIMIZER_KEYS[name]
        unknown = sorted(set(raw) - known - {"name"})
        if unknown:
            raise ValueError(f"optimizer: unknown field(s) {unknown} for {name}; known: "
                             f"{sorted(known)}")
        o = "optimizer"
        checks = {
            "lr": lambda v: _number(o, "lr", v, lower=0.0, lower_open=True),
            "momentum": lambda v: _number(o, "momentum", v, lower=0.0, upper=1.0),
            "weight_decay": lambda v: _number(o, "weight_decay", v, lower=0.0),
            "eps": lambda v: _number(o, "eps", v, lower=0.0, lower_open=True),
            "damping": lambda v: _number(o, "damping", v, lower=0.0, lower_open=True),
            "factor_decay": lambda v: _number(o, "factor_decay", v, lower=0.0, upper=1.0),
            "kl_clip": lambda v: None if v is None else _number(o, "kl_clip", v, lower=0.0,
                                                                 lower_open=True),
            "gtol": lambda v: _number(o, "gtol", v, lower=0.0),
            "factor_update_steps": lambda v: _integer(o, "factor_update_steps", v, lower=1),
            "inv_update_steps": lambda v: _integer(o, "inv_update_steps", v, lower=1),
            "max_iter": lambda v: _integer(o, "max_iter", v, lower=1),
            "history_size": lambda v: _integer(o, "history_size", v, lower=1),
            "adam_steps": lambda v: _integer(o, "adam_steps", v, lower=0),
            "nesterov": lambda v: _boolean(o, "nesterov", v),
            "betas": lambda v: _betas(v),
            "compute_method": lambda v: _compute_method(v),
            "fisher": lambda v: _fisher(v),
            "rescale": lambda v: _boolean(o, "rescale", v),
            "rescale_steps": lambda v: _integer(o, "rescale_steps", v, lower=1),
            "adapt_damping": lambda v: _integer(o, "adapt_damping", v, lower=0),
            "trust_coefficient": lambda v: _number(o, "trust_coefficient", v, lower=0.0,
                                                   lower_open=True),
        }
        settings = {key: checks[key](value) for key, value in raw.items() if key != "name"}
        if settings.get("nesterov") and not settings.get("momentum"):
            raise ValueError("optimizer.nesterov needs optimizer.momentum > 0")
        if settings.get("rescale"):
            clashing = sorted(k for k in ("momentum", "nesterov", "weight_decay", "kl_clip")
                              if settings.get(k))
            if clashing:
                raise ValueError(f"optimizer.rescale chooses the step (alpha, mu): drop "
                                 f"{clashing}")
        elif settings.get("adapt_damping"):
            raise ValueError("optimizer.adapt_damping needs optimizer.rescale")
        return cls(name, settings)


def _boolean(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{name} must be true or false, got {value!r}")
    return value


def _betas(value: Any) -> tuple[float, float]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ValueError(f"optimizer.betas must be a pair of numbers, got {value!r}")
    return tuple(_number("optimizer", f"betas[{i}]", v, lower=0.0, upper=1.0)
                 for i, v in enumerate(value))


def _compute_method(value: Any) -> ComputeMethod:
    try:
        return ComputeMethod(value)
    except ValueError as exc:
        raise ValueError(f"optimizer.compute_method must be one of "
                         f"{[m.value for m in ComputeMethod]}, got {value!r}") from exc


def _fisher(value: Any) -> FisherType:
    try:
        return FisherType(value)
    except ValueError as exc:
        raise ValueError(f"optimizer.fisher must be one of {[f.value for f in FisherType]}, "
                         f"got {value!r}") from exc


@dataclass(frozen=True)
class TrainSpec:
    model: dict
    loss: str
    optimizer: OptimizerSpec
    batch_size: int
    steps: int | None
    epochs: int
    seed: int
    validation_fraction: float
    eval_every: int
    scaling: ScalingSpec | None = None  # large_batch.ScalingSpec; None: no scaling section

    @classmethod
    def parse(cls, raw: Any) -> TrainSpec:
        if not isinstance(raw, dict):
            raise ValueError(f"training spec must be a dict, got {type(raw).__name__}")
        unknown = sorted(set(raw) - _SPEC_KEYS)
        if unknown:
            raise ValueError(f"training spec: unknown field(s) {unknown}; known: "
                             f"{sorted(_SPEC_KEYS)}")
        if "model" not in raw:
            raise ValueError("model is required")
        loss = raw.get("loss", "cross_entropy")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
        steps = raw.get("steps")
        optimizer = OptimizerSpec.parse(raw.get("optimizer", "adam"))
        scaling = _scaling(raw, optimizer)
        check_code_model_plan(raw["model"], optimizer=optimizer.name,
                              lora=scaling is not None and scaling.lora_rank > 0,
                              activation_checkpointing=scaling is not None
                              and scaling.activation_checkpointing,
                              zero_stage=0 if scaling is None else scaling.zero_stage)
        return cls(
            model=raw["model"],
            loss=loss,
            optimizer=optimizer,
            batch_size=_integer("spec", "batch_size", raw.get("batch_size", 128)),
            steps=None if steps is None else _integer("spec", "steps", steps, lower=0),
            epochs=_integer("spec", "epochs", raw.get("epochs", 1), lower=1),
            seed=_integer("spec", "seed", raw.get("seed", 0)),
            validation_fraction=_number("spec", "validation_fraction",
                                        raw.get("validation_fraction", 0.2), lower=0.0,
                                        upper=0.9),
            eval_every=_integer("spec", "eval_every", raw.get("eval_every", 0)),
            scaling=scaling,
        )

    @property
    def scaled(self) -> bool:
        """Runs through _Run.scaled (zero.wrap, accumulation, LR schedule): a scaling section
        with a minibatch optimizer other than K-FAC, or LARS / LAMB."""
        name = self.optimizer.name
        return name in ("lars", "lamb") or (self.scaling is not None and name != "kfac")


def _scaling(raw: dict, optimizer: OptimizerSpec) -> ScalingSpec | None:
    if "scaling" not in raw:
        return None
    scaling = ScalingSpec.parse(raw["scaling"])
    if "batch_size" in raw:
        scaling = dataclasses.replace(
            scaling, batch_size=_integer("spec", "batch_size", raw["batch_size"]))
    name = optimizer.name
    if name in ("lbfgs", "adam->lbfgs", "natural-gradient"):
        raise ValueError(f"scaling: optimizer {name!r} takes no scaling section (it applies to "
                         f"the minibatch optimizers sgd, adam, adamw, lars, lamb and kfac)")
    if name == "kfac":
        clashes = [(scaling.zero_stage != 0, "scaling.zero_stage must be 0 with optimizer "
                    "kfac: K-FAC keeps its own data-parallel path (replicated model, factors "
                    "all-reduced)"),
                   (scaling.accumulation_steps != 1, "scaling.accumulation_steps must be 1 "
                    "with optimizer kfac (its factors are per batch)"),
                   (scaling.precision.value != "fp32", "scaling.precision must be fp32 with "
                    "optimizer kfac"),
                   (scaling.lora_rank > 0, "scaling.lora is not supported with optimizer kfac"),
                   (scaling.activation_checkpointing, "scaling.activation_checkpointing is "
                    "not supported with optimizer kfac (its hooks would see the recomputed "
                    "forward)")]
        for clash, message in clashes:
            if clash:
                raise ValueError(message)
    return scaling


# ---------------------------------------------------------------- losses


def loss_function(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """A mean-over-examples loss of (model output, target)."""
    if name == "cross_entropy":
        def cross_entropy(output: Tensor, target: Tensor) -> Tensor:
            return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
        return cross_entropy
    if name == "mse":
        def mse(output: Tensor, target: Tensor) -> Tensor:
            return F.mse_loss(output, target.reshape(output.shape))
        return mse
    if name == "bce":
        def bce(output: Tensor, target: Tensor) -> Tensor:
            return F.binary_cross_entropy_with_logits(output, target.reshape(output.shape))
        return bce
    raise ValueError(f"loss must be one of {list(LOSSES)}, got {name!r}")


@torch.no_grad()
def evaluate(model: nn.Module, loss_name: str, X: Tensor, y: Tensor,
             batch_size: int = 4096) -> dict[str, float]:
    """Mean loss (and accuracy for classification) over a whole set, in eval mode."""
    was_training = model.training
    model.eval()
    loss_fn = loss_function(loss_name)
    total_loss, correct, count, predictions = 0.0, 0, 0, 0
    classification = loss_name == "cross_entropy" or (loss_name == "bce" and y.dim() == 1)
    for start in range(0, X.shape[0], batch_size):
        xb, yb = X[start:start + batch_size], y[start:start + batch_size]
        output = model(xb)
        total_loss += float(loss_fn(output, yb)) * xb.shape[0]
        if loss_name == "cross_entropy":
            correct += int((output.argmax(-1) == yb).sum())
        elif classification:
            correct += int(((output.reshape(-1) > 0).to(yb.dtype) == yb).sum())
        count += xb.shape[0]
        predictions += yb.numel()  # a sequence model predicts every token, not one per row
    model.train(was_training)
    metrics = {"loss": total_loss / max(count, 1)}
    if classification:
        metrics["accuracy"] = correct / max(predictions, 1)
    return metrics


# ---------------------------------------------------------------- the loop


def split(X: Tensor, y: Tensor, fraction: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(X.shape[0], generator=generator)
    n_val = int(round(fraction * X.shape[0]))
    val, tr = order[:n_val], order[n_val:]
    return X[tr], y[tr], X[val], y[val]


def _worker_slice(xb: Tensor, yb: Tensor, rank: int, world: int) -> tuple[Tensor, Tensor]:
    """This worker's equal slice of the global batch (all of it on one worker)."""
    if world <= 1:
        return xb, yb
    rows = xb.shape[0] // world
    return xb[rank * rows:(rank + 1) * rows], yb[rank * rows:(rank + 1) * rows]


class _Stop(Exception):
    pass


def train(spec: dict, X: Tensor, y: Tensor, *,
          callback: Callable[[StepMetrics], bool | None] | None = None,
          communicator: Communicator | None = None,
          should_stop: Callable[[], bool] | None = None,
          initial_state: TrainingState | None = None,
          on_checkpoint: Callable[[TrainingState], None] | None = None,
          checkpoint_every: int = 0,
          device: str | torch.device | None = None,
          on_memory: Callable[[list[MemoryReport]], None] | None = None,
          trusted: bool = False) -> TrainResult:
    """Trains the spec's model on (X, y); see the module docstring for the spec and for the
    data-parallel, stop and checkpoint arguments. `on_memory` receives every worker's
    memory.MemoryReport (by rank) after the first step of a scaled run. `trusted` lets a
    caller's own module (models.py: torch_export, pickle) load; only the service decides it."""
    if communicator is None or communicator.world_size == 1:
        from .planner import resolve_auto_zero

        spec, _ = resolve_auto_zero(spec, 1)  # scaling.zero_stage "auto" on one worker
    parsed = TrainSpec.parse(spec)
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X and y must have as many rows, got {X.shape[0]} and {y.shape[0]}")
    communicator = communicator or LocalCommunicator()
    check_parallel(parsed, communicator.world_size, X.shape[0], device=device)
    torch.manual_seed(parsed.seed)
    model = build_model(parsed.model, trusted=trusted)
    check_model_plan(model, parsed)
    scaling = parsed.scaling
    if scaling is not None and scaling.lora_rank:
        apply_lora(model, scaling.lora_rank, scaling.lora_alpha)
    if device is not None:
        model, X, y = model.to(device), X.to(device), y.to(device)
    if initial_state is not None:
        model.load_state_dict(initial_state.model)
    if scaling is not None and scaling.activation_checkpointing:
        enable_activation_checkpointing(model)
    X_train, y_train, X_val, y_val = split(X, y, parsed.validation_fraction, parsed.seed)
    if X_train.shape[0] == 0:
        raise ValueError("validation_fraction leaves no training examples")
    run = _Run(parsed, model, X_train, y_train, callback)
    run.communicator, run.should_stop = communicator, should_stop
    run.initial_state, run.on_checkpoint = initial_state, on_checkpoint
    run.checkpoint_every = checkpoint_every
    run.on_memory = on_memory
    if initial_state is not None:
        run.step = initial_state.step
    optimizer = parsed.optimizer
    if optimizer.name != "lbfgs":
        run.effective_batch = run.batch_size()
    try:
        if optimizer.name == "lbfgs":
            run.lbfgs(optimizer.settings)
        elif optimizer.name == "adam->lbfgs":
            adam_settings = {k: v for k, v in optimizer.settings.items() if k in _ADAM_KEYS}
            run.minibatch("adam", adam_settings, steps=optimizer.settings.get("adam_steps", 100))
            run.lbfgs({k: v for k, v in optimizer.settings.items() if k in _LBFGS_KEYS})
        elif parsed.scaled:
            run.scaled(optimizer.name, optimizer.settings, steps=run.default_steps())
        else:
            if scaling is not None:  # K-FAC: its own path, with the plan's batch and LR
                run.lr_schedule = scaling.plan(
                    communicator.world_size, X_train.shape[0],
                    optimizer.settings.get("lr", _default_lr(optimizer.name))).lr_schedule()
            run.minibatch(optimizer.name, optimizer.settings, steps=run.default_steps())
    except _Stop:
        run.stopped_early = True
    if run.final_state is not None:  # scaled runs: a plain (unsharded, LoRA-merged) model
        model = _export_model(parsed, run.final_state, device, trusted=trusted)

    metrics = {f"train_{k}": v for k, v in evaluate(model, parsed.loss, X_train, y_train).items()}
    if X_val.shape[0]:
        metrics |= {f"val_{k}": v for k, v in evaluate(model, parsed.loss, X_val, y_val).items()}
    return TrainResult(model=model, metrics=metrics, steps=run.step, train_time_s=run.train_time,
                       stopped_early=run.stopped_early,
                       preconditioner_state=run.preconditioner_state, history=run.history,
                       effective_batch=run.effective_batch)


def _optimizer_factory(name: str, settings: dict, lr: float):
    """(factory(params or param groups) -> optimizer, group_params or None) for the minibatch
    optimizers of a scaled run. LARS / LAMB: weights adapted and decayed, biases and norms
    (1-D tensors) neither (You et al.)."""
    def pick(*keys: str) -> dict:
        return {k: settings[k] for k in keys if k in settings}

    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        extra = pick("betas", "eps", "weight_decay")
    elif name == "lamb":
        cls, extra = LAMB, pick("betas", "eps")
    elif name == "lars":
        cls, extra = LARS, pick("momentum", "trust_coefficient", "eps")
    else:
        cls = torch.optim.SGD
        extra = {"momentum": settings.get("momentum", 0.0),
                 "nesterov": settings.get("nesterov", False),
                 "weight_decay": settings.get("weight_decay", 0.0)}
    group_params = None
    if name in ("lars", "lamb"):
        decay = settings.get("weight_decay", 0.0)

        def group_params(params: list) -> list[dict]:
            groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": decay,
                       "adapt": True},
                      {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0,
                       "adapt": False}]
            return [g for g in groups if g["params"]]

    return (lambda params: cls(params, lr=lr, **extra)), group_params


def _default_lr(name: str) -> float:
    return 1e-3 if name in ("adam", "adamw", "lamb") else 0.1


def _export_model(spec: TrainSpec, state: dict[str, Tensor],
                  device: str | torch.device | None, *, trusted: bool = False) -> nn.Module:
    """A fresh zoo model (or the caller's module, loaded again) holding `state` (a scaled
    run's full weights), LoRA adapters merged into plain Linear layers, so the weights load
    into build_model(spec.model)."""
    model = build_model(spec.model, trusted=trusted)
    if spec.scaling is not None and spec.scaling.lora_rank:
        apply_lora(model, spec.scaling.lora_rank, spec.scaling.lora_alpha)
    model.load_state_dict({k: v.to("cpu") for k, v in state.items()})
    merge_lora(model)
    return model.to(device) if device is not None else model


def check_model_plan(model: nn.Module, spec: TrainSpec) -> None:
    """ValueError when the spec's plan needs layers `model` lacks: K-FAC preconditions
    nn.Linear / nn.Conv2d layers, activation checkpointing runs the zoo's transformer blocks or
    a sequential model's layers (large_batch.enable_activation_checkpointing, which refuses
    the zoo's CNN alike). Run before training, and by the gateway on a caller's own module
    (models.py: pickle, torch_export) once loaded."""
    from .models import GPT

    if spec.optimizer.name == "kfac" and not any(
            isinstance(m, nn.Linear | nn.Conv2d) for m in model.modules()):
        raise ValueError("optimizer kfac needs nn.Linear or nn.Conv2d layers; the model has "
                         "none (choose sgd, adam, lars, lamb, ...)")
    scaling = spec.scaling
    if (scaling is not None and scaling.activation_checkpointing
            and not isinstance(model, nn.Sequential | GPT)):
        raise ValueError(f"scaling.activation_checkpointing runs an nn.Sequential's layers "
                         f"(or the zoo transformer's blocks); the model is a "
                         f"{type(model).__name__}")


def check_parallel(spec: TrainSpec, world_size: int, rows: int, *,
                   device: str | torch.device | None = None) -> None:
    """ValueError unless `spec` can run data-parallel on `world_size` workers (rows: the
    whole data set, before the validation split) on `device` (default CPU)."""
    train_rows = rows - int(round(spec.validation_fraction * rows))
    if spec.scaling is not None:
        spec.scaling.global_batch(world_size, train_rows)  # ValueError naming the field
        if (spec.scaling.precision.value == "fp16"
                and torch.device(device or "cpu").type != "cuda"):
            raise ValueError("scaling.precision fp16 needs a CUDA device (it uses a gradient "
                             "scaler); use bf16 on CPU")
    if world_size == 1:
        return
    if spec.optimizer.name not in ("sgd", "adam", "adamw", "kfac", "lars", "lamb"):
        raise ValueError(f"optimizer {spec.optimizer.name!r} runs on one worker only; "
                         f"data-parallel training takes sgd, adam, adamw, lars, lamb or kfac")
    if spec.scaling is not None:
        return
    batch = spec.batch_size or train_rows
    if batch % world_size:
        raise ValueError(f"batch_size ({batch}) must be a multiple of workers ({world_size}): "
                         f"each worker trains on an equal slice of the global batch")


class _Run:
    """The mutable state of one train() call: step counter, timings, history."""

    def __init__(self, spec: TrainSpec, model: nn.Module, X: Tensor, y: Tensor, callback):
        self.spec, self.model, self.X, self.y, self.callback = spec, model, X, y, callback
        self.loss_fn = loss_function(spec.loss)
        self.step = 0
        self.train_time = 0.0
        self.stopped_early = False
        self.preconditioner_state: dict[str, Tensor] | None = None
        self.history: list[StepMetrics] = []
        self.generator = torch.Generator().manual_seed(spec.seed + 1)
        self.communicator: Communicator = LocalCommunicator()
        self.should_stop: Callable[[], bool] | None = None
        self.initial_state: TrainingState | None = None
        self.on_checkpoint: Callable[[TrainingState], None] | None = None
        self.checkpoint_every = 0
        self.on_memory: Callable[[list[MemoryReport]], None] | None = None
        self.lr_schedule: Callable[[int], float] | None = None  # K-FAC with a scaling plan
        self.final_state: dict[str, Tensor] | None = None  # scaled runs: the full weights
        self.effective_batch: int | None = None

    def batch_size(self) -> int:
        n = self.X.shape[0]
        if self.spec.scaling is not None:  # micro x accumulation x workers
            return self.spec.scaling.global_batch(self.communicator.world_size, n)
        return n if self.spec.batch_size in (0, None) else min(self.spec.batch_size, n)

    def default_steps(self) -> int:
        if self.spec.steps is not None:
            return self.spec.steps
        return self.spec.epochs * math.ceil(self.X.shape[0] / self.batch_size())

    def batches(self, start_step: int = 0):
        """Global batches; from `start_step` on, the same ones an uninterrupted run draws."""
        n, size = self.X.shape[0], self.batch_size()
        starts = range(0, n - size + 1, size)  # drop the ragged tail: equal batches
        skipped_epochs, offset = divmod(start_step, len(starts))
        for _ in range(skipped_epochs):
            torch.randperm(n, generator=self.generator)
        while True:
            order = torch.randperm(n, generator=self.generator)
            for start in starts[offset:]:
                index = order[start:start + size]
                yield self.X[index], self.y[index]
            offset = 0

    def report(self, loss: float, lr: float, damping: float | None, seconds: float,
               samples: int) -> None:
        self.step += 1
        self.train_time += seconds
        train_loss = None
        every = self.spec.eval_every
        if every and self.step % every == 0:
            train_loss = evaluate(self.model, self.spec.loss, self.X, self.y)["loss"]
        metrics = StepMetrics(step=self.step, loss=loss, lr=lr, damping=damping,
                              step_time_s=seconds,
                              samples_per_s=samples / seconds if seconds > 0 else math.inf,
                              train_loss=train_loss, effective_batch=samples)
        self.history.append(metrics)
        if self.callback is not None and self.callback(metrics):
            raise _Stop

    def minibatch(self, name: str, settings: dict, steps: int) -> None:
        model, loss_fn = self.model, self.loss_fn
        lr = settings.get("lr", 1e-3 if name in ("adam", "adamw") else 0.1)
        preconditioner = natural = None
        if name in ("adam", "adamw"):
            cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
            extra = {k: settings[k] for k in ("betas", "eps", "weight_decay") if k in settings}
            optimizer = cls(model.parameters(), lr=lr, **extra)
        else:
            optimizer = torch.optim.SGD(
                model.parameters(), lr=lr, momentum=settings.get("momentum", 0.0),
                nesterov=settings.get("nesterov", False),
                weight_decay=settings.get("weight_decay", 0.0))
        communicator = self.communicator
        rank, world = communicator.rank, communicator.world_size
        if name == "kfac":
            extra = {k: settings[k] for k in ("damping", "factor_decay", "kl_clip",
                                              "factor_update_steps", "inv_update_steps",
                                              "compute_method", "fisher", "rescale",
                                              "rescale_steps", "adapt_damping")
                     if k in settings}
            if extra.get("rescale"):
                extra["kl_clip"] = None
            preconditioner = KFACPreconditioner(
                model, lr=lr, communicator=communicator, loss=self.spec.loss,
                seed=self.spec.seed, **extra)
        elif name == "natural-gradient":
            natural = NaturalGradientPreconditioner(model, loss_fn,
                                                    damping=settings.get("damping", 1e-3))
        if self.initial_state is not None and self.step > 0:
            optimizer.load_state_dict(self.initial_state.optimizer)
            if preconditioner is not None and self.initial_state.preconditioner is not None:
                preconditioner.load_state_dict(self.initial_state.preconditioner)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        batches = self.batches(self.step)
        try:
            while self.step < steps:
                xb, yb = next(batches)
                global_rows = xb.shape[0]
                xb, yb = _worker_slice(xb, yb, rank, world)
                start = time.perf_counter()
                lr = self._scheduled_lr(optimizer, preconditioner, lr)
                optimizer.zero_grad(set_to_none=True)
                damping = None
                stop = self.should_stop is not None and bool(self.should_stop())
                if natural is not None:
                    damping = natural.current_damping
                    loss = natural.step(xb, yb)
                    loss_value = float(loss.detach())
                else:
                    output = model(xb)
                    loss = loss_fn(output, yb)
                    if preconditioner is not None:
                        preconditioner.curvature_backward(output)
                    loss.backward()
                    loss_value, stop = self._synchronize(trainable, loss, stop)
                    if preconditioner is not None:
                        damping = preconditioner.current_damping
                        preconditioner.step(xb, yb, loss_value)
                optimizer.step()
                self.report(loss_value, lr, damping, time.perf_counter() - start, global_rows)
                if (self.on_checkpoint is not None and self.checkpoint_every
                        and self.step % self.checkpoint_every == 0 and self.step < steps):
                    self.on_checkpoint(TrainingState(
                        step=self.step, model=model.state_dict(),
                        optimizer=optimizer.state_dict(),
                        preconditioner=None if preconditioner is None
                        else preconditioner.state_dict()))
                if stop:
                    raise _Stop
        finally:
            if preconditioner is not None:
                preconditioner.remove_hooks()
                self.preconditioner_state = preconditioner.state_dict()

    def _scheduled_lr(self, optimizer, preconditioner, lr: float) -> float:
        """K-FAC with a scaling plan: this step's scaled / warmed-up lr (optimizer and K-FAC
        alike); otherwise `lr` unchanged."""
        if self.lr_schedule is None:
            return lr
        lr = float(self.lr_schedule(self.step))
        set_lr(optimizer, lr)
        if preconditioner is not None:
            preconditioner.lr = lr
        return lr

    def scaled(self, name: str, settings: dict, steps: int) -> None:
        """Minibatch training through the spec's scaling plan (large_batch.ScalingSpec;
        defaults when the spec has none, e.g. for LARS / LAMB). With N > 1 workers the model
        and optimizer go through zero.wrap at the plan's stage (DDP, ZeroRedundancyOptimizer,
        FSDP2 fully_shard), which averages the gradients in backward; every worker runs
        accumulation_steps micro-batches of its slice (communicating on the last only); one
        small all-reduce carries the batch loss and the stop flag. The lr follows the plan's
        schedule (scaling rule and warmup) step by step. After the first step every worker
        measures what it holds (memory.MemoryProbe) and the reports go to `on_memory`.
        Checkpoints gather the full weights and optimizer state (collective at stages 1-3:
        every worker takes part, the one with `on_checkpoint` writes). With one worker the
        same code runs unsharded."""
        from . import zero
        from .large_batch import accumulate_gradients, grad_scaler, resolve
        from .memory import MemoryProbe

        scaling = self.spec.scaling or ScalingSpec()
        communicator = self.communicator
        rank, world = communicator.rank, communicator.world_size
        lr = settings.get("lr", _default_lr(name))
        plan = scaling.plan(world, self.X.shape[0], lr)
        schedule = plan.lr_schedule()
        self.effective_batch = plan.effective_batch
        factory, group_params = _optimizer_factory(name, settings, lr)
        model = self.model
        sharded = world > 1
        stage = scaling.zero_stage if sharded else 0
        if sharded:
            wrapped, optimizer = zero.wrap(model, factory, zero.ShardingPlan(stage=stage),
                                           group_params=group_params)
        else:
            trainable = [p for p in model.parameters() if p.requires_grad]
            wrapped = model
            optimizer = factory(trainable if group_params is None else group_params(trainable))
        if self.initial_state is not None and self.step > 0:
            zero.load_full_optimizer_state_dict(wrapped, optimizer, self.initial_state.optimizer)
        scaler = grad_scaler(self.X.device, scaling.precision, sharded_gradients=stage >= 2)
        no_sync = zero.no_sync if sharded else None

        def full_weights() -> dict[str, Tensor]:  # collective at stages 2-3
            return zero.full_model_state_dict(wrapped) if stage >= 2 else model.state_dict()

        wrapped.train()
        batches = self.batches(self.step)
        measured = False
        try:
            while self.step < steps:
                xb, yb = next(batches)
                global_rows = xb.shape[0]
                xb, yb = _worker_slice(xb, yb, rank, world)
                probe = None if measured else MemoryProbe(wrapped, optimizer)
                start = time.perf_counter()
                lr_now = resolve(schedule, self.step)
                set_lr(optimizer, lr_now)
                optimizer.zero_grad(set_to_none=True)
                stop = self.should_stop is not None and bool(self.should_stop())
                with probe if probe is not None else contextlib.nullcontext():
                    local = accumulate_gradients(
                        wrapped, self.loss_fn, xb, yb, plan.accumulation,
                        precision=plan.precision, scaler=scaler, no_sync=no_sync)
                    info = torch.tensor([local, float(stop)], dtype=torch.float64,
                                        device=xb.device)
                    communicator.all_reduce_mean([info])
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                seconds = time.perf_counter() - start
                self.report(float(info[0]), lr_now, None, seconds, global_rows)
                if probe is not None:  # grads still held: zero_grad comes next step
                    measured = True
                    self._report_memory(probe, stage, xb.device)
                if (self.checkpoint_every and self.step % self.checkpoint_every == 0
                        and self.step < steps and (sharded or self.on_checkpoint is not None)):
                    weights = full_weights()
                    optimizer_state = zero.full_optimizer_state_dict(wrapped, optimizer)
                    if self.on_checkpoint is not None:
                        self.on_checkpoint(TrainingState(step=self.step, model=weights,
                                                         optimizer=optimizer_state))
                if bool(info[1] > 0):
                    raise _Stop
        except _Stop:
            self.final_state = full_weights()
            raise
        self.final_state = full_weights()

    def _report_memory(self, probe, stage: int, device: torch.device) -> None:
        """Every worker's MemoryProbe numbers, exchanged in one all-reduce, to on_memory."""
        from .memory import Bytes, MemoryReport, zero_formula

        communicator = self.communicator
        world, rank = communicator.world_size, communicator.rank
        mine = probe.report(self.spec.scaling.zero_stage if self.spec.scaling else 0,
                            world, rank)
        table = torch.zeros(world, 4, dtype=torch.float64, device=device)
        table[rank] = torch.tensor([mine.measured.parameters, mine.measured.gradients,
                                    mine.measured.optimizer, mine.at_rest_parameters],
                                   dtype=torch.float64)
        communicator.all_reduce_mean([table])
        table = (table * world).round().to(torch.int64).tolist()
        formula = zero_formula(stage, mine.parameter_count, world)
        reports = [MemoryReport(stage=mine.stage, world_size=world, rank=r,
                                parameter_count=mine.parameter_count, precision="fp32",
                                measured=Bytes(*row[:3]), formula=formula,
                                at_rest_parameters=row[3])
                   for r, row in enumerate(table)]
        if self.on_memory is not None:
            self.on_memory(reports)

    def _synchronize(self, trainable: list[Tensor], loss: Tensor, stop: bool) -> tuple[float, bool]:
        """Data parallelism's gradient average (DDP's job, done by hand in one flat all-reduce
        that also carries the batch loss and the stop flag). Returns (global batch loss,
        whether any worker asked to stop)."""
        if self.communicator.world_size == 1:
            return float(loss.detach()), stop
        for p in trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        info = torch.stack([loss.detach(), loss.new_tensor(float(stop))]).to(trainable[0].dtype)
        self.communicator.all_reduce_mean([p.grad for p in trainable] + [info])
        return float(info[0]), bool(info[1] > 0)

    def lbfgs(self, settings: dict) -> None:
        """Full batch L-BFGS (workers.solvers) on the flattened parameters."""
        model, loss_fn, X, y = self.model, self.loss_fn, self.X, self.y
        model.eval()  # a deterministic objective: no dropout inside a line search
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        shapes = [p.shape for _, p in model.named_parameters() if p.requires_grad]
        x0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()
                        if p.requires_grad])
        objective = flat_objective(model, loss_fn, X, y)
        last = {"elapsed": 0.0}

        def on_iteration(info) -> bool:
            seconds = info.elapsed_s - last["elapsed"]
            last["elapsed"] = info.elapsed_s
            _write_flat(model, names, shapes, info.x)
            try:
                self.report(info.f, info.step_size, None, seconds, X.shape[0])
            except _Stop:
                return True
            return self.should_stop is not None and bool(self.should_stop())

        options = {"max_iter": settings.get("max_iter", 200), "gtol": settings.get("gtol", 1e-6)}
        if "history_size" in settings:
            options["history_size"] = settings["history_size"]
        result = minimize(objective, x0, method="l-bfgs", options=options, callback=on_iteration)
        _write_flat(model, names, shapes, result.x)
        model.train()
        if result.status.name == "CANCELLED":
            raise _Stop


def flat_objective(model: nn.Module, loss_fn, X: Tensor, y: Tensor) -> Callable[[Tensor], Tensor]:
    """loss(x) with x the model's trainable parameters flattened in named_parameters order,
    evaluated through torch.func.functional_call (the model's own tensors are untouched)."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in model.named_parameters() if p.requires_grad]
    sizes = [math.prod(shape) for shape in shapes]
    buffers = dict(model.named_buffers())

    def objective(x: Tensor) -> Tensor:
        pieces = torch.split(x, sizes)
        params = {name: piece.view(shape) for name, piece, shape in
                  zip(names, pieces, shapes, strict=True)}
        return loss_fn(functional_call(model, (params, buffers), (X,)), y)

    return objective


@torch.no_grad()
def _write_flat(model: nn.Module, names: list[str], shapes, x: Tensor) -> None:
    parameters = dict(model.named_parameters())
    offset = 0
    for name, shape in zip(names, shapes, strict=True):
        count = math.prod(shape)
        parameters[name].copy_(x[offset:offset + count].view(shape))
        offset += count


# ---------------------------------------------------------------- weights


def save_weights(model: nn.Module) -> bytes:
    """The model's state_dict as safetensors bytes (no pickle)."""
    state = {name: tensor.detach().contiguous().clone() for name, tensor in
             model.state_dict().items()}
    return safetensors_save(state)


def load_weights(model: nn.Module, data: bytes) -> nn.Module:
    model.load_state_dict(safetensors_load(data))
    return model


__all__ = [
    "LOSSES",
    "OPTIMIZERS",
    "OptimizerSpec",
    "StepMetrics",
    "TrainResult",
    "TrainSpec",
    "check_model_plan",
    "check_parallel",
    "evaluate",
    "flat_objective",
    "load_weights",
    "loss_function",
    "save_weights",
    "split",
    "train",
]
