"""K-FAC (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions), in the three layers
of kfac-pytorch / KFAC-JAX:

1. curvature blocks (`LinearBlock`, `Conv2dBlock`): per layer, the Kronecker factors
   A = E[a a^T] (layer inputs, with a homogeneous coordinate for the bias) and
   G = E[g g^T] (gradients w.r.t. the layer's outputs), their running averages, their damped
   inverses or eigendecompositions, and the preconditioning G^-1 (grad) A^-1;
2. a work-assignment policy (`CostBalancedAssignment`): which worker inverts which layer;
3. the orchestrator (`KFACPreconditioner`): collects factors through module hooks, averages
   them across workers through a `Communicator`, has each layer inverted by its assigned
   worker and broadcast, rewrites every covered parameter's `.grad` with the preconditioned
   gradient (KL-clipped), and leaves the update itself to a wrapped torch optimizer (SGD with
   momentum and weight decay, as kfac-pytorch does):

       preconditioner = KFACPreconditioner(model, damping=1e-3, lr=0.1)
       optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
       loss.backward(); preconditioner.step(); optimizer.step()

Conventions (the scale of the factors matters against the damping):
- rows: a layer's input and output-gradient tensors are flattened to rows over every
  dimension but the feature one (batch, sequence positions, conv patches / spatial positions).
- A = (1/R) sum_r a_r a_r^T over the R rows (mean).
- G = (1/N) sum_r (N g_r)(N g_r)^T with N the batch size (dimension 0): for a loss that is a
  mean over the N examples, N g_r is the gradient of the per-example loss, so G is the mean
  over examples of the per-example outer products, summed over the rows of one example
  (spatial positions; Grosse & Martens' KFC with the 1/|T| moved into A). For a plain Linear
  layer on (N, features) inputs this is exactly E[g g^T] of per-example gradients.
- the curvature is the empirical Fisher: g comes from the backward pass of the training loss.
- damping lambda is split between the factors with Martens & Grosse's pi-correction:
  A + pi sqrt(lambda) I and G + sqrt(lambda)/pi I, pi = sqrt((tr A / dim A) / (tr G / dim G)).
  The eigen method applies the same split to the eigenvalues, so both methods compute the
  same preconditioned gradient.
- the preconditioned gradient of a weight matrix W (out x in, bias as the last column) is
  G_d^-1 grad_W A_d^-1, which is (G_d^-1 (x) A_d^-1) vec(grad_W) with row-major vec.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

Schedule = float | Callable[[int], float]
IntSchedule = int | Callable[[int], int]


def value_at(schedule: Schedule | IntSchedule, step: int):
    """A schedule's value at `step`: constants are constant, callables are called."""
    return schedule(step) if callable(schedule) else schedule


class ComputeMethod(enum.Enum):
    """How the damped factors are applied.

    EIGEN: symmetric eigendecompositions Q diag(d) Q^T of A and G; preconditioning costs two
    extra (out x in) products per layer and an elementwise divide. Most robust.
    INVERSE: Cholesky inverses of the damped factors; preconditioning is two products.
    Both cost O(dim_A^3 + dim_G^3) per layer at each inverse update.
    """

    EIGEN = "eigen"
    INVERSE = "inverse"


# ======================================================================== curvature blocks


class CurvatureBlock:
    """The Kronecker-factored curvature of one layer.

    Memory: the running factors take dim_A^2 + dim_G^2 numbers (dim_A = fan-in + 1 with a
    bias, dim_G = fan-out); INVERSE keeps as many again, EIGEN keeps the eigenvectors
    (as many again) plus a dim_G x dim_A table of damped eigenvalue products. Inverse
    updates cost O(dim_A^3 + dim_G^3) flops, done in float64 then cast back.
    """

    def __init__(self, name: str, module: nn.Module, method: ComputeMethod) -> None:
        self.name = name
        self.module = module
        self.method = method
        self.has_bias = module.bias is not None
        # running averages
        self.a_factor: Tensor | None = None
        self.g_factor: Tensor | None = None
        # this step's batch statistics (summed over forward calls, then averaged)
        self._a_sum: Tensor | None = None
        self._g_sum: Tensor | None = None
        self._a_calls = 0
        self._g_calls = 0
        # the damped curvature's inverse or eigendecomposition
        self.a_inverse: Tensor | None = None
        self.g_inverse: Tensor | None = None
        self.a_eigenvectors: Tensor | None = None
        self.g_eigenvectors: Tensor | None = None
        self.a_eigenvalues: Tensor | None = None
        self.g_eigenvalues: Tensor | None = None
        self.a_damping = 0.0
        self.g_damping = 0.0
        self._eigen_denominator: Tensor | None = None

    # ---- shapes, per layer type
    def input_rows(self, inputs: Tensor) -> Tensor:
        raise NotImplementedError

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def a_dim(self) -> int:
        raise NotImplementedError

    @property
    def g_dim(self) -> int:
        raise NotImplementedError

    @property
    def inversion_cost(self) -> float:
        return float(self.a_dim) ** 3 + float(self.g_dim) ** 3

    # ---- gradients as one matrix (bias as the last column)
    def grad_matrix(self) -> Tensor | None:
        weight = self.module.weight
        if weight.grad is None:
            return None
        grad = weight.grad.reshape(weight.shape[0], -1)
        if self.has_bias:
            bias_grad = self.module.bias.grad
            if bias_grad is None:
                bias_grad = torch.zeros_like(self.module.bias)
            grad = torch.cat([grad, bias_grad.unsqueeze(1)], dim=1)
        return grad

    def set_grad_matrix(self, matrix: Tensor) -> None:
        weight = self.module.weight
        weight_columns = matrix.shape[1] - (1 if self.has_bias else 0)
        weight.grad.copy_(matrix[:, :weight_columns].reshape(weight.shape))
        if self.has_bias:
            if self.module.bias.grad is None:
                self.module.bias.grad = torch.zeros_like(self.module.bias)
            self.module.bias.grad.copy_(matrix[:, weight_columns])

    # ---- statistics from hooks
    def accumulate_inputs(self, inputs: Tensor) -> None:
        rows = self.input_rows(inputs.detach())
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        covariance = rows.T @ rows / rows.shape[0]
        self._a_sum = covariance if self._a_sum is None else self._a_sum + covariance
        self._a_calls += 1

    def accumulate_output_grads(self, grad_output: Tensor) -> None:
        batch_size = grad_output.shape[0]
        rows = self.output_grad_rows(grad_output.detach())
        # (1/N) sum_r (N g_r)(N g_r)^T = N sum_r g_r g_r^T
        covariance = (rows.T @ rows) * batch_size
        self._g_sum = covariance if self._g_sum is None else self._g_sum + covariance
        self._g_calls += 1

    def take_batch_factors(self) -> tuple[Tensor, Tensor] | None:
        """This step's A and G (averaged over the forward calls), and resets the sums."""
        if self._a_sum is None or self._g_sum is None:
            self._reset_batch()
            return None
        factors = (self._a_sum / self._a_calls, self._g_sum / self._g_calls)
        self._reset_batch()
        return factors

    def _reset_batch(self) -> None:
        self._a_sum = self._g_sum = None
        self._a_calls = self._g_calls = 0

    def update_running_factors(self, a_batch: Tensor, g_batch: Tensor, decay: float) -> None:
        """Exponential moving average; the first batch initializes the average."""
        if self.a_factor is None:
            self.a_factor, self.g_factor = a_batch.clone(), g_batch.clone()
        else:
            self.a_factor.mul_(decay).add_(a_batch, alpha=1.0 - decay)
            self.g_factor.mul_(decay).add_(g_batch, alpha=1.0 - decay)

    # ---- damping and inverses
    def split_damping(self, damping: float) -> tuple[float, float]:
        """Tikhonov damping lambda split as (pi sqrt(lambda), sqrt(lambda) / pi)."""
        a_mean_eig = float(self.a_factor.trace()) / self.a_dim
        g_mean_eig = float(self.g_factor.trace()) / self.g_dim
        if a_mean_eig > 0 and g_mean_eig > 0:
            pi = math.sqrt(a_mean_eig / g_mean_eig)
        else:
            pi = 1.0
        root = math.sqrt(damping)
        return pi * root, root / pi

    def compute_inverses(self, damping: float) -> None:
        """Inverts (or eigendecomposes) the damped factors: O(dim_A^3 + dim_G^3)."""
        if self.a_factor is None:
            return
        self.a_damping, self.g_damping = self.split_damping(damping)
        if self.method is ComputeMethod.INVERSE:
            self.a_inverse = _damped_inverse(self.a_factor, self.a_damping)
            self.g_inverse = _damped_inverse(self.g_factor, self.g_damping)
        else:
            self.a_eigenvalues, self.a_eigenvectors = _eigh(self.a_factor)
            self.g_eigenvalues, self.g_eigenvectors = _eigh(self.g_factor)
        self.after_inverses_received()

    def inverse_tensors(self) -> list[Tensor]:
        """The tensors its assigned worker broadcasts (allocated on every worker)."""
        dtype, device = self.module.weight.dtype, self.module.weight.device
        if self.method is ComputeMethod.INVERSE:
            if self.a_inverse is None:
                self.a_inverse = torch.zeros(self.a_dim, self.a_dim, dtype=dtype, device=device)
                self.g_inverse = torch.zeros(self.g_dim, self.g_dim, dtype=dtype, device=device)
            tensors = [self.a_inverse, self.g_inverse]
        else:
            if self.a_eigenvectors is None:
                self.a_eigenvectors = torch.zeros(self.a_dim, self.a_dim, dtype=dtype,
                                                  device=device)
                self.g_eigenvectors = torch.zeros(self.g_dim, self.g_dim, dtype=dtype,
                                                  device=device)
                self.a_eigenvalues = torch.zeros(self.a_dim, dtype=dtype, device=device)
                self.g_eigenvalues = torch.zeros(self.g_dim, dtype=dtype, device=device)
            tensors = [self.a_eigenvectors, self.g_eigenvectors, self.a_eigenvalues,
                       self.g_eigenvalues]
        return tensors

    def after_inverses_received(self) -> None:
        if self.method is ComputeMethod.EIGEN and self.a_eigenvalues is not None:
            self._eigen_denominator = torch.outer(
                self.g_eigenvalues + self.g_damping, self.a_eigenvalues + self.a_damping
            )

    @property
    def ready(self) -> bool:
        if self.method is ComputeMethod.INVERSE:
            return self.a_inverse is not None
        return self._eigen_denominator is not None

    def precondition(self, grad: Tensor) -> Tensor:
        """G_d^-1 grad A_d^-1 for grad of shape (dim_G, dim_A)."""
        if self.method is ComputeMethod.INVERSE:
            return self.g_inverse @ grad @ self.a_inverse
        rotated = self.g_eigenvectors.T @ grad @ self.a_eigenvectors
        return self.g_eigenvectors @ (rotated / self._eigen_denominator) @ self.a_eigenvectors.T

    # ---- checkpoints
    def state_tensors(self) -> dict[str, Tensor]:
        names = ["a_factor", "g_factor"]
        if self.method is ComputeMethod.INVERSE:
            names += ["a_inverse", "g_inverse"]
        else:
            names += ["a_eigenvectors", "g_eigenvectors", "a_eigenvalues", "g_eigenvalues"]
        state = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        state["damping"] = torch.tensor([self.a_damping, self.g_damping], dtype=torch.float64)
        return state

    def load_state_tensors(self, state: dict[str, Tensor]) -> None:
        expected = {"a_factor": (self.a_dim,) * 2, "g_factor": (self.g_dim,) * 2,
                    "a_inverse": (self.a_dim,) * 2, "g_inverse": (self.g_dim,) * 2,
                    "a_eigenvectors": (self.a_dim,) * 2, "g_eigenvectors": (self.g_dim,) * 2,
                    "a_eigenvalues": (self.a_dim,), "g_eigenvalues": (self.g_dim,)}
        weight = self.module.weight
        for name, tensor in state.items():
            if name == "damping":
                self.a_damping, self.g_damping = (float(v) for v in tensor.tolist())
                continue
            if name not in expected:
                raise ValueError(f"K-FAC state for layer {self.name!r}: unknown entry {name!r}")
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(
                    f"K-FAC state for layer {self.name!r}: {name} has shape "
                    f"{tuple(tensor.shape)}, expected {expected[name]}"
                )
            setattr(self, name, tensor.detach().to(dtype=weight.dtype, device=weight.device)
                    .clone())
        self.after_inverses_received()


class LinearBlock(CurvatureBlock):
    """nn.Linear; inputs of any shape (..., in_features): every leading position is a row."""

    def input_rows(self, inputs: Tensor) -> Tensor:
        return inputs.reshape(-1, inputs.shape[-1])

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        return grad_output.reshape(-1, grad_output.shape[-1])

    @property
    def a_dim(self) -> int:
        return self.module.in_features + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return self.module.out_features


class Conv2dBlock(CurvatureBlock):
    """nn.Conv2d (groups=1, zero padding): rows are the unfolded input patches (Grosse &
    Martens' KFC), C_in*kh*kw (+1) wide, one per output position; A costs an unfold of the
    input (kh*kw times its size) on factor-update steps."""

    def input_rows(self, inputs: Tensor) -> Tensor:
        conv = self.module
        patches = F.unfold(inputs, conv.kernel_size, dilation=conv.dilation,
                           padding=conv.padding, stride=conv.stride)  # (N, C*kh*kw, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        return grad_output.permute(0, 2, 3, 1).reshape(-1, grad_output.shape[1])

    @property
    def a_dim(self) -> int:
        conv = self.module
        return conv.in_channels * math.prod(conv.kernel_size) + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return self.module.out_channels


def _damped_inverse(factor: Tensor, damping: float) -> Tensor:
    wide = factor.to(torch.float64)
    wide = wide + damping * torch.eye(wide.shape[0], dtype=torch.float64, device=wide.device)
    cholesky, info = torch.linalg.cholesky_ex(wide)
    inverse = torch.cholesky_inverse(cholesky) if int(info) == 0 else torch.linalg.pinv(wide)
    return inverse.to(factor.dtype)


def _eigh(factor: Tensor) -> tuple[Tensor, Tensor]:
    eigenvalues, eigenvectors = torch.linalg.eigh(factor.to(torch.float64))
    # the factors are PSD; rounding can leave tiny negative eigenvalues
    return eigenvalues.clamp(min=0).to(factor.dtype), eigenvectors.to(factor.dtype).contiguous()


def make_block(name: str, module: nn.Module, method: ComputeMethod) -> CurvatureBlock | None:
    """The block for a supported layer, None for anything K-FAC does not cover (those
    parameters keep their plain gradient)."""
    if isinstance(module, nn.Linear):
        return LinearBlock(name, module, method)
    if (isinstance(module, nn.Conv2d) and module.groups == 1
            and module.padding_mode == "zeros" and isinstance(module.padding, tuple)):
        return Conv2dBlock(name, module, method)
    return None


# ======================================================================== work assignment


class WorkAssignment(Protocol):
    """Decides which worker computes each layer's inverse (the others receive it)."""

    def assign(self, inversion_costs: dict[str, float], world_size: int) -> dict[str, int]: ...


class CostBalancedAssignment:
    """Round-robin by cost (longest processing time first): layers in decreasing order of
    inversion cost, each to the worker with the least cost assigned so far. Within 4/3 of
    the best possible makespan; ties go to the lowest rank, so every worker computes the
    same assignment without talking."""

    def assign(self, inversion_costs: dict[str, float], world_size: int) -> dict[str, int]:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        loads = [0.0] * world_size
        assignment: dict[str, int] = {}
        for name, cost in sorted(inversion_costs.items(), key=lambda item: (-item[1], item[0])):
            rank = min(range(world_size), key=lambda r: (loads[r], r))
            assignment[name] = rank
            loads[rank] += cost
        return assignment


# ======================================================================== communicators


class Communicator(Protocol):
    """How K-FAC talks to the other data-parallel workers."""

    rank: int
    world_size: int

    def all_reduce_mean(self, tensors: list[Tensor]) -> None:
        """Replaces each tensor, in place, by its mean over the workers."""

    def broadcast(self, tensors: list[Tensor], src: int) -> None:
        """Overwrites the tensors, in place, with worker `src`'s."""


class LocalCommunicator:
    """A single worker: nothing to exchange."""

    rank = 0
    world_size = 1

    def all_reduce_mean(self, tensors: list[Tensor]) -> None:
        return None

    def broadcast(self, tensors: list[Tensor], src: int) -> None:
        if src != 0:
            raise ValueError(f"broadcast from rank {src} with a single worker")


class TorchDistributedCommunicator:
    """torch.distributed (gloo on CPU, NCCL on GPU) on an initialized process group. Tensors
    are packed into one flat buffer per call, so a step makes one all-reduce and one
    broadcast per source rank, whatever the number of layers."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchDistributedCommunicator needs torch.distributed initialized")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def all_reduce_mean(self, tensors: list[Tensor]) -> None:
        if not tensors or self.world_size == 1:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=self.group)
        flat /= self.world_size
        _unpack(flat, tensors)

    def broadcast(self, tensors: list[Tensor], src: int) -> None:
        if not tensors or self.world_size == 1:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        global_src = dist.get_global_rank(self.group, src) if self.group is not None else src
        dist.broadcast(flat, src=global_src, group=self.group)
        _unpack(flat, tensors)


def _unpack(flat: Tensor, tensors: list[Tensor]) -> None:
    offset = 0
    for tensor in tensors:
        count = tensor.numel()
        tensor.copy_(flat[offset:offset + count].view_as(tensor))
        offset += count


# ======================================================================== orchestrator


class KFACPreconditioner:
    """Orders a K-FAC step: factors -> (all-reduce) -> inverses on assigned workers ->
    (broadcast) -> precondition -> KL clip -> write .grad. Call `step()` after
    `loss.backward()` and before the wrapped optimizer's `step()`.

    Settings (schedules are a constant or a function of the step number):
      damping: Tikhonov lambda, split between factors with the pi-correction.
      factor_update_steps / inv_update_steps: how often factors are collected / inverted
        (hooks do nothing on other steps).
      factor_decay: running-average weight of the old factors, in [0, 1).
      kl_clip: scale the update so that lr^2 * sum(precond_grad * grad) <= kl_clip
        (None: no clipping); lr is the wrapped optimizer's learning rate (a schedule).
      compute_method: ComputeMethod.EIGEN or .INVERSE.
      skip_layers: module names or class names (case-insensitive) to leave unpreconditioned.
      communicator / assignment: see `Communicator`, `WorkAssignment`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        damping: Schedule = 1e-3,
        factor_update_steps: IntSchedule = 1,
        inv_update_steps: IntSchedule = 10,
        factor_decay: Schedule = 0.95,
        kl_clip: Schedule | None = 1e-3,
        lr: Schedule = 0.1,
        compute_method: ComputeMethod | str = ComputeMethod.EIGEN,
        skip_layers: Iterable[str] = (),
        communicator: Communicator | None = None,
        assignment: WorkAssignment | None = None,
    ) -> None:
        self.compute_method = ComputeMethod(compute_method)
        self.damping = _checked_schedule("damping", damping, lower=0.0, lower_open=True)
        self.factor_update_steps = _checked_interval("factor_update_steps", factor_update_steps)
        self.inv_update_steps = _checked_interval("inv_update_steps", inv_update_steps)
        self.factor_decay = _checked_schedule("factor_decay", factor_decay, lower=0.0, upper=1.0)
        self.kl_clip = (None if kl_clip is None
                        else _checked_schedule("kl_clip", kl_clip, lower=0.0, lower_open=True))
        self.lr = _checked_schedule("lr", lr, lower=0.0, lower_open=True)
        self.communicator: Communicator = communicator or LocalCommunicator()
        self.assignment_policy: WorkAssignment = assignment or CostBalancedAssignment()
        skip = {s.lower() for s in skip_layers}

        self.blocks: dict[str, CurvatureBlock] = {}
        for name, module in model.named_modules():
            if name.lower() in skip or type(module).__name__.lower() in skip:
                continue
            block = make_block(name, module, self.compute_method)
            if block is not None:
                self.blocks[name] = block
        if not self.blocks:
            raise ValueError("K-FAC found no nn.Linear or nn.Conv2d layer to precondition")
        self.inverse_workers = self.assignment_policy.assign(
            {name: block.inversion_cost for name, block in self.blocks.items()},
            self.communicator.world_size,
        )
        self.steps = 0
        self._hooks = []
        for block in self.blocks.values():
            self._hooks.append(block.module.register_forward_hook(self._forward_hook(block)))

    # ---- hooks
    def _collecting(self) -> bool:
        return self.steps % value_at(self.factor_update_steps, self.steps) == 0

    def _forward_hook(self, block: CurvatureBlock):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if not (module.training and torch.is_grad_enabled() and self._collecting()):
                return
            block.accumulate_inputs(inputs[0])
            if output.requires_grad:
                output.register_hook(block.accumulate_output_grads)

        return hook

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # ---- the step
    @property
    def current_damping(self) -> float:
        return float(value_at(self.damping, self.steps))

    @torch.no_grad()
    def step(self) -> None:
        step = self.steps
        if self._collecting():
            self._update_factors(float(value_at(self.factor_decay, step)))
        if step % value_at(self.inv_update_steps, step) == 0:
            self._update_inverses(float(value_at(self.damping, step)))
        self._precondition_grads(step)
        self.steps += 1

    def _update_factors(self, decay: float) -> None:
        collected = [(block, block.take_batch_factors()) for block in self.blocks.values()]
        collected = [(block, factors) for block, factors in collected if factors is not None]
        self.communicator.all_reduce_mean([t for _, factors in collected for t in factors])
        for block, (a_batch, g_batch) in collected:
            block.update_running_factors(a_batch, g_batch, decay)

    def _update_inverses(self, damping: float) -> None:
        rank = self.communicator.rank
        by_source: dict[int, list[CurvatureBlock]] = {}
        for name, block in self.blocks.items():
            if block.a_factor is None:
                continue
            source = self.inverse_workers[name]
            if source == rank:
                block.compute_inverses(damping)
            else:
                # the damping split is cheap and needed to apply received eigenvalues
                block.a_damping, block.g_damping = block.split_damping(damping)
            by_source.setdefault(source, []).append(block)
        if self.communicator.world_size > 1:
            for source in range(self.communicator.world_size):
                blocks = by_source.get(source, [])
                self.communicator.broadcast(
                    [t for block in blocks for t in block.inverse_tensors()], source
                )
                for block in blocks:
                    block.after_inverses_received()

    def _precondition_grads(self, step: int) -> None:
        updates: list[tuple[CurvatureBlock, Tensor, Tensor]] = []
        for block in self.blocks.values():
            grad = block.grad_matrix()
            if grad is None or not block.ready:
                continue
            updates.append((block, grad, block.precondition(grad)))
        if not updates:
            return
        scale = None
        if self.kl_clip is not None:
            lr = float(value_at(self.lr, step))
            kl_clip = float(value_at(self.kl_clip, step))
            # vg = lr^2 * <precond_grad, grad>: the update's size in the Fisher metric
            vg_sum = sum((pre * grad).sum() for _, grad, pre in updates) * lr**2
            scale = torch.clamp(torch.sqrt(kl_clip / vg_sum.abs().clamp(min=1e-30)), max=1.0)
        for block, _, pre in updates:
            block.set_grad_matrix(pre if scale is None else pre * scale)

    # ---- checkpoints: a flat dict of tensors (safetensors-ready, no pickle)
    def state_dict(self) -> dict[str, Tensor]:
        state = {"steps": torch.tensor(self.steps, dtype=torch.int64)}
        for name, block in self.blocks.items():
            for key, tensor in block.state_tensors().items():
                state[f"{name}/{key}"] = tensor.detach().contiguous().clone()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        per_block: dict[str, dict[str, Tensor]] = {name: {} for name in self.blocks}
        for key, tensor in state.items():
            if key == "steps":
                continue
            name, _, entry = key.rpartition("/")
            if name not in per_block:
                raise ValueError(f"K-FAC state has entry {key!r} for an unknown layer")
            per_block[name][entry] = tensor
        if "steps" not in state:
            raise ValueError("K-FAC state has no 'steps' entry")
        for name, entries in per_block.items():
            self.blocks[name].load_state_tensors(entries)
        self.steps = int(state["steps"])


def _checked_schedule(name: str, value, *, lower: float | None = None, upper: float | None = None,
                      lower_open: bool = False):
    if callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number or a callable of the step, "
                         f"got {value!r}")
    if lower is not None and (value < lower or (lower_open and value == lower)):
        raise ValueError(f"{name} must be {'>' if lower_open else '>='} {lower}, got {value}")
    if upper is not None and value >= upper:
        raise ValueError(f"{name} must be < {upper}, got {value}")
    return float(value)


def _checked_interval(name: str, value):
    if callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer or a callable of the step, "
                         f"got {value!r}")
    return value


__all__ = [
    "CurvatureBlock",
    "Communicator",
    "ComputeMethod",
    "Conv2dBlock",
    "CostBalancedAssignment",
    "IntSchedule",
    "KFACPreconditioner",
    "LinearBlock",
    "LocalCommunicator",
    "Schedule",
    "TorchDistributedCommunicator",
    "WorkAssignment",
    "make_block",
    "value_at",
]
