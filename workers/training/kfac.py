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
- the curvature (`fisher`): EMPIRICAL takes g from the backward pass of the training loss;
  SAMPLED (Martens & Grosse's true Fisher) takes g from the backward pass of a loss whose
  targets are drawn from the model's own predictive distribution (`sampled_loss`), so that
  E[G] is the Gauss-Newton / Fisher factor: a softmax label for cross_entropy, a Bernoulli one
  for bce, Gaussian noise for mse. It costs one extra backward on factor-update steps only
  (`curvature_backward(output)`, before `loss.backward()`), down to the layer outputs only.
- running averages use the paper's warm start: decay min(1 - 1/k, factor_decay) at the k-th
  factor update (k=1 initializes the average).
- the update (`rescale`): False leaves the preconditioned gradient to the wrapped optimizer
  (learning rate, momentum, KL clip, as kfac-pytorch); True is Martens & Grosse's section 6.4:
  the step is alpha * Delta + mu * delta_prev, with Delta the preconditioned descent direction
  and (alpha, mu) minimizing the quadratic model with the exact (Gauss-Newton) Fisher of the
  batch, damped with lambda: a 2x2 solve on two Jacobian-vector products (forward mode). The
  loop then runs plain SGD (no momentum, no weight decay) and K-FAC writes -step / lr.
  Cost: an nn.Sequential of covered Linear layers and parameter-free modules takes one
  hand-written forward-mode pass for both directions (tangents batched; tanh, sigmoid, ReLU
  in closed form; other known row-wise activations with the directions folded into the
  batch; any other module, e.g. batch norm, one torch forward-mode pass per direction);
  other models one torch forward-mode pass per direction. The hand-written pass takes only
  plain nn.Linear layers (exactly that type, not parametrized) and nothing with forward
  hooks or pre-hooks (the model's, a layer's, or global ones; K-FAC's own excepted): a
  subclass, a hook or a parametrization may change what the layer computes, so such models
  take the generic pass. These passes leave the model's buffers (batch norm's running
  statistics) as the training forward left them. The 2x2 system is read back in one
  transfer.
  `adapt_damping` adds section 6.5's Levenberg-Marquardt rule every T steps:
  rho = (h(theta + step) - h(theta)) / M(step); lambda *= (19/20)^T if rho > 3/4,
  lambda /= (19/20)^T if rho < 1/4.
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
import warnings
from collections.abc import Callable, Iterable
from typing import Protocol

import torch
import torch.autograd.forward_ad as fwad
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules import module as _module_hooks
from torch.nn.utils import parametrize

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


class FisherType(enum.Enum):
    """Where the output gradients g of the G factor come from (see the module docstring)."""

    EMPIRICAL = "empirical"
    SAMPLED = "sampled"


LOSS_KINDS = ("cross_entropy", "mse", "bce")


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
        # layer outputs kept for the sampled-Fisher backward (factor-update steps only)
        self.outputs: list[Tensor] = []
        # the damped curvature's inverse or eigendecomposition
        self.a_inverse: Tensor | None = None
        self.g_inverse: Tensor | None = None
        self.a_eigenvectors: Tensor | None = None
        self.g_eigenvectors: Tensor | None = None
        self.a_eigenvalues: Tensor | None = None
        self.g_eigenvalues: Tensor | None = None
        self.a_damping = 0.0
        self.g_damping = 0.0

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

    @property
    def weight_columns(self) -> int:
        """The weight's columns in the gradient matrix (the bias, if any, is the next)."""
        return self.a_dim - int(self.has_bias)

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
            rows = F.pad(rows, (0, 1), value=1.0)
        covariance = (rows.T @ rows).div_(rows.shape[0])
        self._a_sum = covariance if self._a_sum is None else self._a_sum + covariance
        self._a_calls += 1

    def accumulate_output_grads(self, grad_output: Tensor) -> None:
        batch_size = grad_output.shape[0]
        rows = self.output_grad_rows(grad_output.detach())
        # (1/N) sum_r (N g_r)(N g_r)^T = N sum_r g_r g_r^T
        covariance = (rows.T @ rows).mul_(batch_size)
        self._g_sum = covariance if self._g_sum is None else self._g_sum + covariance
        self._g_calls += 1

    def take_batch_factors(self) -> tuple[Tensor, Tensor] | None:
        """This step's A and G (averaged over the forward calls), and resets the sums."""
        if self._a_sum is None or self._g_sum is None:
            self._reset_batch()
            return None
        factors = (
            self._a_sum if self._a_calls == 1 else self._a_sum / self._a_calls,
            self._g_sum if self._g_calls == 1 else self._g_sum / self._g_calls,
        )
        self._reset_batch()
        return factors

    def _reset_batch(self) -> None:
        self._a_sum = self._g_sum = None
        self._a_calls = self._g_calls = 0
        self.outputs = []

    def update_running_factors(self, a_batch: Tensor, g_batch: Tensor, decay: float) -> None:
        """Exponential moving average; the first batch initializes the average."""
        if self.a_factor is None:
            self.a_factor, self.g_factor = a_batch.clone(), g_batch.clone()
        else:  # decay * old + (1 - decay) * batch
            self.a_factor.lerp_(a_batch, 1.0 - decay)
            self.g_factor.lerp_(g_batch, 1.0 - decay)

    # ---- damping and inverses
    def split_damping(self, damping: float) -> tuple[float, float]:
        """Tikhonov damping lambda split as (pi sqrt(lambda), sqrt(lambda) / pi)."""
        a_mean_eig = float(self.a_factor.trace()) / self.a_dim
        g_mean_eig = float(self.g_factor.trace()) / self.g_dim
        pi = 1.0
        if a_mean_eig > 0 and g_mean_eig > 0:
            ratio = math.sqrt(a_mean_eig / g_mean_eig)
            if math.isfinite(ratio) and ratio > 0:  # (a diverged run can overflow a trace)
                pi = ratio
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

    def redamp(self, damping: float) -> None:
        """A new lambda on the current factors: EIGEN reuses its eigenbases (two products per
        factor), INVERSE inverts again."""
        if self.a_factor is None:
            return
        if self.method is ComputeMethod.INVERSE:
            self.compute_inverses(damping)
        elif self.a_eigenvalues is not None:
            self.a_damping, self.g_damping = self.split_damping(damping)
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
                self.a_eigenvectors = torch.zeros(
                    self.a_dim, self.a_dim, dtype=dtype, device=device
                )
                self.g_eigenvectors = torch.zeros(
                    self.g_dim, self.g_dim, dtype=dtype, device=device
                )
                self.a_eigenvalues = torch.zeros(self.a_dim, dtype=dtype, device=device)
                self.g_eigenvalues = torch.zeros(self.g_dim, dtype=dtype, device=device)
            tensors = [
                self.a_eigenvectors,
                self.g_eigenvectors,
                self.a_eigenvalues,
                self.g_eigenvalues,
            ]
        return tensors

    def after_inverses_received(self) -> None:
        """EIGEN: the damped inverses Q diag(1 / (d + damping)) Q^T, formed once per inverse
        (or damping) update so that every step's preconditioning is two products."""
        if self.method is ComputeMethod.EIGEN and self.a_eigenvalues is not None:
            self.a_inverse = _from_eigen(self.a_eigenvectors, self.a_eigenvalues, self.a_damping)
            self.g_inverse = _from_eigen(self.g_eigenvectors, self.g_eigenvalues, self.g_damping)

    @property
    def ready(self) -> bool:
        return self.a_inverse is not None

    def precondition(self, grad: Tensor) -> Tensor:
        """G_d^-1 grad A_d^-1 for grad of shape (dim_G, dim_A)."""
        return self.g_inverse @ grad @ self.a_inverse

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
        expected = {
            "a_factor": (self.a_dim,) * 2,
            "g_factor": (self.g_dim,) * 2,
            "a_inverse": (self.a_dim,) * 2,
            "g_inverse": (self.g_dim,) * 2,
            "a_eigenvectors": (self.a_dim,) * 2,
            "g_eigenvectors": (self.g_dim,) * 2,
            "a_eigenvalues": (self.a_dim,),
            "g_eigenvalues": (self.g_dim,),
        }
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
            setattr(
                self, name, tensor.detach().to(dtype=weight.dtype, device=weight.device).clone()
            )
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
        patches = F.unfold(
            inputs,
            conv.kernel_size,
            dilation=conv.dilation,
            padding=conv.padding,
            stride=conv.stride,
        )  # (N, C*kh*kw, L)
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


def _from_eigen(vectors: Tensor, values: Tensor, damping: float) -> Tensor:
    return (vectors / (values + damping)) @ vectors.T


def _eigh(factor: Tensor) -> tuple[Tensor, Tensor]:
    eigenvalues, eigenvectors = torch.linalg.eigh(factor.to(torch.float64))
    # the factors are PSD; rounding can leave tiny negative eigenvalues
    return eigenvalues.clamp(min=0).to(factor.dtype), eigenvectors.to(factor.dtype).contiguous()


def make_block(name: str, module: nn.Module, method: ComputeMethod) -> CurvatureBlock | None:
    """The block for a supported layer, None for anything K-FAC does not cover (those
    parameters keep their plain gradient)."""
    if isinstance(module, nn.Linear):
        return LinearBlock(name, module, method)
    if (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and isinstance(module.padding, tuple)
    ):
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
        tensor.copy_(flat[offset : offset + count].view_as(tensor))
        offset += count


# ======================================================================== sampled Fisher


def sampled_loss(loss: str, output: Tensor, noise: Tensor) -> Tensor:
    """A loss whose gradient w.r.t. `output` is the gradient of the training loss `loss` (a mean
    over its M items: rows for cross_entropy, elements for mse and bce) at targets drawn from
    the model's predictive distribution: (1/M) sum_m r_m . output_m with r_m = p_m - onehot(y~),
    y~ ~ softmax (cross_entropy); r_m = s_m - y~, y~ ~ Bernoulli(sigmoid) (bce);
    r_m = sqrt(2) eps, eps ~ N(0, 1), the gradient of (f - y~)^2 at y~ ~ N(f, 1/2) (mse).
    E[r r^T] is the loss's Hessian in the output (diag(p) - p p^T; s(1-s); 2), so the G factor
    built from these gradients is, in expectation, the Gauss-Newton (= true Fisher) factor.

    `noise` holds uniforms in [0, 1) for cross_entropy (output.shape[:-1] + (1,)) and bce
    (output.shape), standard normals for mse (output.shape): drawn by the caller, so that data
    parallel workers can slice one global draw (see KFACPreconditioner)."""
    detached = output.detach()
    if loss == "cross_entropy":
        probs = torch.softmax(detached, dim=-1)
        labels = (probs.cumsum(-1) < noise).sum(-1, keepdim=True).clamp(max=probs.shape[-1] - 1)
        residual = probs - torch.zeros_like(probs).scatter_(-1, labels, 1.0)
        items = detached.numel() // detached.shape[-1]
    elif loss == "bce":
        probs = torch.sigmoid(detached)
        residual = probs - (noise < probs).to(probs.dtype)
        items = detached.numel()
    elif loss == "mse":
        residual = math.sqrt(2.0) * noise
        items = detached.numel()
    else:
        raise ValueError(f"loss must be one of {list(LOSS_KINDS)}, got {loss!r}")
    return (output * residual).sum() / items


def _loss_value(loss: str, output: Tensor, target: Tensor) -> Tensor:
    """The training loss (the same means as workers.training.loop.loss_function)."""
    if loss == "cross_entropy":
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
    if loss == "mse":
        return F.mse_loss(output, target.reshape(output.shape))
    return F.binary_cross_entropy_with_logits(output, target.reshape(output.shape))


# f'(x) from y = f(x), for the chain's elementwise modules (None: the identity)
_ELEMENTWISE_DERIVATIVES: dict[type, Callable[[Tensor], Tensor] | None] = {
    nn.Tanh: lambda y: 1 - y * y,
    nn.Sigmoid: lambda y: y * (1 - y),
    nn.ReLU: lambda y: (y > 0).to(y.dtype),
    nn.Identity: None,
}
# Parameter-free modules known to act on each row (example) alone, elementwise: the forward-mode
# pass may fold the k tangent directions into the batch for them. Anything else (batch norm,
# dropout, softmax over some dimension, a caller's module) takes one pass per direction.
_ROW_WISE: frozenset[type] = frozenset(
    {
        nn.GELU,
        nn.SiLU,
        nn.Mish,
        nn.ELU,
        nn.CELU,
        nn.SELU,
        nn.LeakyReLU,
        nn.ReLU6,
        nn.Hardtanh,
        nn.Hardsigmoid,
        nn.Hardswish,
        nn.Softplus,
        nn.Softsign,
        nn.LogSigmoid,
        nn.Tanhshrink,
        nn.Softshrink,
        nn.Hardshrink,
        nn.Threshold,
    }
)


def _has_forward_hooks(module: nn.Module, own: set[int] = frozenset()) -> bool:
    """Whether calling `module` runs forward hooks or pre-hooks other than those in `own`
    (hook handle ids)."""
    return bool(set(module._forward_hooks) - own or set(module._forward_pre_hooks) - own)


def _global_forward_hooks() -> bool:
    return bool(_module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks)


def _scratch_buffers(module: nn.Module) -> dict[str, Tensor]:
    """Copies of the module's buffers, for functional_call: a forward in train mode (batch
    norm) updates these instead of the module's running statistics."""
    return {name: buffer.clone() for name, buffer in module.named_buffers()}


def _call_with_scratch_buffers(module: nn.Module, *args):
    scratch = _scratch_buffers(module)
    return functional_call(module, scratch, args, strict=False) if scratch else module(*args)


def _gauss_newton_gram(loss: str, output: Tensor, tangents: Tensor | list[Tensor]) -> Tensor:
    """The k x k matrix of u_i^T H u_j / M summed over the M items of the loss (its output
    Hessian H, as a mean), for the output tangents u_1..u_k (stacked or a list): one
    product for every pair."""
    k = len(tangents)
    tangents = tangents if isinstance(tangents, Tensor) else torch.stack(tangents)
    if loss == "cross_entropy":
        classes = output.shape[-1]
        probs = torch.softmax(output.reshape(-1, classes), dim=-1)
        stacked = tangents.reshape(k, -1, classes)
        weighted = stacked * probs
        projected = weighted.sum(-1)  # (k, rows): p . u per row
        return (
            weighted.reshape(k, -1) @ stacked.reshape(k, -1).T - projected @ projected.T
        ) / probs.shape[0]
    stacked = tangents.reshape(k, -1)
    if loss == "bce":
        probs = torch.sigmoid(output).reshape(-1)
        return (stacked * (probs * (1 - probs))) @ stacked.T / stacked.shape[1]
    return (stacked @ stacked.T) * (2.0 / stacked.shape[1])


# ======================================================================== orchestrator


class KFACPreconditioner:
    """Orders a K-FAC step: factors -> (all-reduce) -> inverses on assigned workers ->
    (broadcast) -> precondition -> KL clip or rescale -> write .grad. Per step:

        output = model(x); loss = loss_fn(output, y)
        kfac.curvature_backward(output)   # sampled Fisher, factor-update steps only
        loss.backward()
        kfac.step(x, y, float(loss))      # inputs / targets / loss: for rescale only
        optimizer.step()

    Settings (schedules are a constant or a function of the step number):
      damping: Tikhonov lambda, split between factors with the pi-correction (with
        adapt_damping: its starting value, then Levenberg-Marquardt adapted).
      factor_update_steps / inv_update_steps: how often factors are collected / inverted
        (hooks do nothing on other steps). Integer intervals travel in `state_dict`, and a
        loaded checkpoint's replace the constructor's integers (the schedule goes on where it
        was); a callable schedule given to the constructor is kept (a warning if the
        checkpoint holds an integer instead).
      factor_decay: running-average weight of the old factors, in [0, 1) (warm-started).
      kl_clip: scale the update so that lr^2 * sum(precond_grad * grad) <= kl_clip
        (None: no clipping); lr is the wrapped optimizer's learning rate (a schedule).
        Not used with rescale (alpha sets the scale).
      compute_method: ComputeMethod.EIGEN or .INVERSE.
      fisher / loss / seed: FisherType.EMPIRICAL or .SAMPLED; sampled needs the loss kind
        (cross_entropy, mse, bce) and draws from a generator seeded with `seed`, one global
        draw sliced by rank (so N workers compute what 1 worker computes on the global batch).
      rescale: Martens & Grosse 6.4's alpha / mu step (see the module docstring; needs `loss`);
        rescale_steps: solve for (alpha, mu) every this many steps, reusing them in between
        (1: every step, as the paper; each solve costs two forward-mode passes).
      adapt_damping: Levenberg-Marquardt lambda every this many steps (paper: 5); 0: off.
        Needs rescale (rho uses its quadratic model).
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
        fisher: FisherType | str = FisherType.EMPIRICAL,
        loss: str | None = None,
        seed: int = 0,
        rescale: bool = False,
        rescale_steps: int = 1,
        adapt_damping: int = 0,
        skip_layers: Iterable[str] = (),
        communicator: Communicator | None = None,
        assignment: WorkAssignment | None = None,
    ) -> None:
        self.model = model
        self.compute_method = ComputeMethod(compute_method)
        self.fisher = FisherType(fisher)
        self.damping = _checked_schedule("damping", damping, lower=0.0, lower_open=True)
        self.factor_update_steps = _checked_interval("factor_update_steps", factor_update_steps)
        self.inv_update_steps = _checked_interval("inv_update_steps", inv_update_steps)
        self.factor_decay = _checked_schedule("factor_decay", factor_decay, lower=0.0, upper=1.0)
        self.kl_clip = (
            None
            if kl_clip is None
            else _checked_schedule("kl_clip", kl_clip, lower=0.0, lower_open=True)
        )
        self.lr = _checked_schedule("lr", lr, lower=0.0, lower_open=True)
        if loss is not None and loss not in LOSS_KINDS:
            raise ValueError(f"loss must be one of {list(LOSS_KINDS)}, got {loss!r}")
        if loss is None and (self.fisher is FisherType.SAMPLED or rescale):
            raise ValueError("fisher='sampled' and rescale need the loss kind (loss=...)")
        if adapt_damping and not rescale:
            raise ValueError("adapt_damping needs rescale (rho uses its quadratic model)")
        self.loss = loss
        self.rescale = bool(rescale)
        self.rescale_steps = _checked_interval("rescale_steps", rescale_steps)
        self.adapt_damping = (
            _checked_interval("adapt_damping", adapt_damping or 1) if adapt_damping else 0
        )
        self.generator = torch.Generator().manual_seed(seed)
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
        self.factor_updates = 0
        self.lm_damping = float(value_at(self.damping, 0))  # adapt_damping's lambda
        self.previous_update: Tensor | None = None  # rescale's delta_prev, flat
        self.alpha_mu = (0.0, 0.0)
        self.last_rho: float | None = None
        self._inverse_damping: float | None = None
        self._hooks_enabled = True
        self._named_parameters = list(model.named_parameters())
        self._chain: list[tuple[str, nn.Module]] | bool | None = None  # see _chain_plan
        # rescale: each covered parameter's place in its block's gradient matrix
        self._param_slots: dict[nn.Parameter, tuple[CurvatureBlock, bool]] = {}
        for block in self.blocks.values():
            self._param_slots[block.module.weight] = (block, False)
            if block.has_bias:
                self._param_slots[block.module.bias] = (block, True)
        self._hooks = []
        for block in self.blocks.values():
            self._hooks.append(block.module.register_forward_hook(self._forward_hook(block)))

    # ---- hooks
    @property
    def collecting(self) -> bool:
        """Whether this step collects factor statistics."""
        return self.steps % value_at(self.factor_update_steps, self.steps) == 0

    def _forward_hook(self, block: CurvatureBlock):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if not (
                self._hooks_enabled
                and module.training
                and torch.is_grad_enabled()
                and self.collecting
            ):
                return
            block.accumulate_inputs(inputs[0])
            if not output.requires_grad:
                return
            if self.fisher is FisherType.SAMPLED:
                block.outputs.append(output)
            else:
                output.register_hook(block.accumulate_output_grads)

        return hook

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def curvature_backward(self, output: Tensor) -> None:
        """The sampled Fisher's backward pass (fisher='sampled', factor-update steps; a no-op
        otherwise): gradients of `sampled_loss` w.r.t. the layer outputs only (no parameter
        gradients), keeping the graph for the training loss's backward."""
        if self.fisher is not FisherType.SAMPLED or not self.collecting:
            return
        blocks = [block for block in self.blocks.values() if block.outputs]
        if not blocks:
            return
        outputs = [out for block in blocks for out in block.outputs]
        grads = torch.autograd.grad(
            sampled_loss(self.loss, output, self._noise(output)),
            outputs,
            retain_graph=True,
            allow_unused=True,
        )
        position = 0
        for block in blocks:
            for out in block.outputs:
                grad = grads[position]
                position += 1
                block.accumulate_output_grads(torch.zeros_like(out) if grad is None else grad)
            block.outputs = []

    def _noise(self, output: Tensor) -> Tensor:
        """One draw for the global batch (world_size equal shards), this rank's slice."""
        rank, world = self.communicator.rank, self.communicator.world_size
        rows = output.shape[0]
        shape = output.shape if self.loss != "cross_entropy" else (*output.shape[:-1], 1)
        draw = torch.rand if self.loss != "mse" else torch.randn
        noise = draw((rows * world, *shape[1:]), generator=self.generator, dtype=output.dtype)
        return noise[rank * rows : (rank + 1) * rows].to(output.device)

    # ---- the step
    @property
    def current_damping(self) -> float:
        if self.adapt_damping:
            return self.lm_damping
        return float(value_at(self.damping, self.steps))

    @torch.no_grad()
    def step(
        self, inputs: Tensor | None = None, targets: Tensor | None = None, loss: float | None = None
    ) -> None:
        """Preconditions the gradients in place. rescale needs this step's `inputs` and
        `targets` (this worker's shard) and, with adapt_damping, its (global) batch `loss`."""
        step = self.steps
        if self._collecting_now(step):
            self._update_factors(float(value_at(self.factor_decay, step)))
        damping = self.current_damping
        if step % value_at(self.inv_update_steps, step) == 0:
            self._update_inverses(damping)
        elif self.adapt_damping and damping != self._inverse_damping:
            for block in self.blocks.values():
                block.redamp(damping)
            self._inverse_damping = damping
        if self.rescale:
            if inputs is None or targets is None:
                raise ValueError("rescale needs step(inputs, targets, loss)")
            self._rescaled_step(step, inputs, targets, loss)
        else:
            self._precondition_grads(step)
        self.steps += 1

    def _collecting_now(self, step: int) -> bool:
        collecting = step % value_at(self.factor_update_steps, step) == 0
        if collecting and self.fisher is FisherType.SAMPLED:
            pending = [b.name for b in self.blocks.values() if b.outputs]
            if pending:
                for block in self.blocks.values():
                    block._reset_batch()
                raise RuntimeError(
                    "fisher='sampled': call curvature_backward(output) before "
                    f"step() on factor-update steps (layers {pending})"
                )
        return collecting

    def _update_factors(self, decay: float) -> None:
        collected = [(block, block.take_batch_factors()) for block in self.blocks.values()]
        collected = [(block, factors) for block, factors in collected if factors is not None]
        if not collected:
            return
        self.communicator.all_reduce_mean([t for _, factors in collected for t in factors])
        self.factor_updates += 1
        decay = min(1.0 - 1.0 / self.factor_updates, decay)  # the paper's warm start
        for block, (a_batch, g_batch) in collected:
            block.update_running_factors(a_batch, g_batch, decay)

    def _update_inverses(self, damping: float) -> None:
        self._inverse_damping = damping
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

    def _ready_grad_matrices(self) -> list[tuple[CurvatureBlock, Tensor]]:
        ready = []
        for block in self.blocks.values():
            if block.ready:
                grad = block.grad_matrix()
                if grad is not None:
                    ready.append((block, grad))
        return ready

    def _precondition_blocks(self) -> list[tuple[CurvatureBlock, Tensor, Tensor]]:
        return [
            (block, grad, block.precondition(grad)) for block, grad in self._ready_grad_matrices()
        ]

    def _precondition_grads(self, step: int) -> None:
        updates = self._precondition_blocks()
        if not updates:
            return
        scale = None
        if self.kl_clip is not None:
            lr = float(value_at(self.lr, step))
            kl_clip = float(value_at(self.kl_clip, step))
            # vg = lr^2 * <precond_grad, grad>: the update's size in the Fisher metric
            vg_sum = (
                torch.stack(
                    [torch.vdot(pre.reshape(-1), grad.reshape(-1)) for _, grad, pre in updates]
                ).sum()
                * lr**2
            )
            scale = torch.clamp(torch.sqrt(kl_clip / vg_sum.abs().clamp(min=1e-30)), max=1.0)
        for block, _, pre in updates:
            block.set_grad_matrix(pre if scale is None else pre * scale)

    # ---- Martens & Grosse 6.4 / 6.5
    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [
            (name, p)
            for name, p in self._named_parameters
            if p.requires_grad and p.grad is not None
        ]

    def _rescaled_step(
        self, step: int, inputs: Tensor, targets: Tensor, loss: float | None
    ) -> None:
        """Flat vectors in parameter order: the raw gradient g, the preconditioned descent
        direction Delta (covered layers; other parameters keep -g), delta_prev."""
        named = self._trainable()
        params = [p for _, p in named]
        grads = [p.grad for p in params]
        raw = torch.cat([g.reshape(-1) for g in grads])
        preconditioned = {
            block: block.precondition(grad) for block, grad in self._ready_grad_matrices()
        }
        pieces = []
        for p, grad in zip(params, grads, strict=True):
            slot = self._param_slots.get(p)
            pre = None if slot is None else preconditioned.get(slot[0])
            if pre is None:
                pieces.append(grad.reshape(-1))
            else:
                columns = slot[0].weight_columns
                pieces.append(pre[:, columns] if slot[1] else pre[:, :columns].reshape(-1))
        direction = torch.cat(pieces).neg_()  # Delta
        previous = self.previous_update
        if previous is not None and previous.shape != direction.shape:
            previous = None
        solve = step % self.rescale_steps == 0 or self.alpha_mu == (0.0, 0.0)
        adapt = bool(self.adapt_damping) and step % self.adapt_damping == 0 and loss is not None
        if solve or adapt:
            alpha, mu, model_decrease = self._quadratic_solve(
                named, inputs, direction, previous, raw
            )
            if solve:
                self.alpha_mu = (alpha, mu)
        alpha, mu = self.alpha_mu
        update = direction.mul_(alpha)  # Delta is not needed any more
        if previous is not None:
            update.add_(previous, alpha=mu)
        if adapt:
            if solve:
                decrease = model_decrease
            else:  # the quadratic model of the step actually taken
                decrease = self._model_value(named, inputs, update, raw)
            self._adapt_damping(named, inputs, targets, update, loss, decrease)
        self.previous_update = update
        # the wrapped SGD applies -lr * grad = update
        scaled = update * (-1.0 / float(value_at(self.lr, step)))
        torch._foreach_copy_(
            grads,
            [
                piece.view_as(p)
                for piece, p in zip(
                    torch.split(scaled, [p.numel() for p in params]), params, strict=True
                )
            ],
        )

    def _jvps(self, named, inputs: Tensor, vectors: list[Tensor]) -> tuple[Tensor, Tensor]:
        """The model's output on `inputs` and its directional derivatives along each flat
        parameter vector, stacked (k, *output.shape). An nn.Sequential of covered nn.Linear
        layers and parameter-free modules takes one pass for all k vectors (`_chain_jvps`);
        any other model one forward-mode pass per vector through functional_call
        (`_generic_jvps`). The plan is made on every call (cheap): hooks or parametrizations
        added after the preconditioner was built count."""
        self._chain = self._chain_plan()
        if self._chain:
            return self._chain_jvps(named, inputs, vectors)
        return self._generic_jvps(named, inputs, vectors)

    def _generic_jvps(self, named, inputs: Tensor, vectors: list[Tensor]) -> tuple[Tensor, Tensor]:
        """torch's forward mode through the whole model, one pass per vector, on copies of
        the model's buffers (its running statistics stay as the training forward left them)."""
        sizes = [p.numel() for _, p in named]
        detached = [p.detach() for _, p in named]
        self._hooks_enabled = False
        try:
            tangents_out = []
            output = None
            for vector in vectors:
                with fwad.dual_level():
                    duals = {
                        name: fwad.make_dual(p, piece.view_as(p))
                        for (name, _), p, piece in zip(
                            named, detached, torch.split(vector, sizes), strict=True
                        )
                    }
                    state = {**_scratch_buffers(self.model), **duals}
                    dual_output = functional_call(self.model, state, (inputs,), strict=False)
                    output, tangent = fwad.unpack_dual(dual_output)
                    tangents_out.append(torch.zeros_like(output) if tangent is None else tangent)
        finally:
            self._hooks_enabled = True
        return output, torch.stack(tangents_out)

    def _chain_plan(self) -> list[tuple[str, nn.Module]] | bool:
        """The model as a chain for `_chain_jvps`, or False: it must be a plain nn.Sequential
        (not a subclass, no forward hooks) whose children are covered layers of type exactly
        nn.Linear, unhooked and not parametrized (their forward is F.linear on their own
        weight and bias), or modules without parameters; and no global forward hooks.
        Kinds: "linear" and "elementwise" (closed forms), "rowwise" (torch's forward mode,
        the k directions folded into the batch: `_ROW_WISE`, unhooked), "module" (torch's
        forward mode, one pass per direction)."""
        if (
            type(self.model) is not nn.Sequential
            or _has_forward_hooks(self.model)
            or _global_forward_hooks()
        ):
            return False
        own = {handle.id for handle in self._hooks}  # K-FAC's own, off during these passes
        linear = {
            id(block.module) for block in self.blocks.values() if isinstance(block, LinearBlock)
        }
        plan = []
        for child in self.model:
            hooked = _has_forward_hooks(child, own)
            if (
                id(child) in linear
                and type(child) is nn.Linear
                and not hooked
                and not parametrize.is_parametrized(child)
            ):
                plan.append(("linear", child))
            elif next(child.parameters(), None) is not None:
                return False
            elif type(child) in _ELEMENTWISE_DERIVATIVES and not hooked:
                plan.append(("elementwise", child))
            elif type(child) in _ROW_WISE and not hooked:
                plan.append(("rowwise", child))
            else:
                plan.append(("module", child))
        return plan

    def _chain_jvps(self, named, inputs: Tensor, vectors: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Forward mode by hand along the chain, the k tangents batched in a leading
        dimension: a Linear layer's tangent is W t + dW h + db, an elementwise activation's
        f'(x) t (closed forms in _ELEMENTWISE_DERIVATIVES); known row-wise activations go
        through torch's forward mode with the k tangents folded into the batch; any other
        parameter-free module (it may mix rows, as batch norm in train mode does) one forward
        pass per tangent, on copies of its buffers."""
        k = len(vectors)
        sizes = [p.numel() for _, p in named]
        splits = [torch.split(vector, sizes) for vector in vectors]
        tangent_of = {
            p: [split[i].view_as(p) for split in splits] for i, (_, p) in enumerate(named)
        }
        h, t = inputs, None  # the primal and the stacked tangents (k, *h.shape)
        for kind, module in self._chain:
            if kind == "linear":
                weight, bias = module.weight, module.bias
                out = F.linear(h, weight, bias)
                rows = h.reshape(-1, h.shape[-1])
                bias_tangent = tangent_of.get(bias) if bias is not None else None
                shift = None if bias_tangent is None else torch.stack(bias_tangent).unsqueeze(1)
                if weight in tangent_of:  # dW h + db, (k, rows, out)
                    weight_tangent = torch.stack(tangent_of[weight]).mT
                    contribution = (
                        torch.matmul(rows, weight_tangent)
                        if shift is None
                        else torch.baddbmm(shift, rows.expand(k, *rows.shape), weight_tangent)
                    )
                elif shift is not None:
                    contribution = shift.expand(k, rows.shape[0], shift.shape[-1])
                else:
                    contribution = None
                if t is not None:  # + W t
                    through = torch.matmul(t.reshape(k, -1, rows.shape[1]), weight.T)
                    contribution = through if contribution is None else through.add_(contribution)
                t = None if contribution is None else contribution.reshape(k, *out.shape)
                h = out
            elif kind == "elementwise":
                out = module(h)
                derivative = _ELEMENTWISE_DERIVATIVES[type(module)]
                if t is not None and derivative is not None:
                    t = t * derivative(out)
                h = out
            elif t is None:
                h = _call_with_scratch_buffers(module, h)
            elif kind == "module":
                tangents = []
                for tangent_in in t:
                    with fwad.dual_level():
                        dual = fwad.make_dual(h, tangent_in)
                        primal, tangent = fwad.unpack_dual(_call_with_scratch_buffers(module, dual))
                    tangents.append(torch.zeros_like(primal) if tangent is None else tangent)
                h, t = primal, torch.stack(tangents)
            else:  # "rowwise"
                rows = h.shape[0]
                with fwad.dual_level():
                    dual = fwad.make_dual(
                        h.repeat(k, *([1] * (h.dim() - 1))), t.reshape(k * rows, *h.shape[1:])
                    )
                    primal, tangent = fwad.unpack_dual(module(dual))
                h = primal[:rows]
                t = (torch.zeros_like(primal) if tangent is None else tangent).reshape(k, *h.shape)
        if t is None:
            t = h.new_zeros(k, *h.shape)
        return h, t

    def _quadratic_solve(self, named, inputs, direction, previous, raw):
        """(alpha, mu) minimizing M(alpha Delta + mu delta_prev) = g^T d + d^T (F + lambda) d / 2
        with F the batch's exact Gauss-Newton matrix; and M at the minimum (< 0). One
        forward-mode pass per vector, one all-reduce, one read of the 2x2 system."""
        lam = self.current_damping
        vectors = [direction] if previous is None else [direction, previous]
        k = len(vectors)
        output, tangents = self._jvps(named, inputs, vectors)
        gram = _gauss_newton_gram(self.loss, output, tangents).to(torch.float64)
        self.communicator.all_reduce_mean([gram])
        stacked = torch.stack([*vectors, raw])
        inner = (stacked @ stacked.T).to(torch.float64)  # <v_i, v_j> and <v_i, g>
        values = torch.cat([gram.reshape(-1), inner.reshape(-1)]).tolist()
        form = [
            [values[i * k + j] + lam * values[k * k + i * (k + 1) + j] for j in range(k)]
            for i in range(k)
        ]
        linear = [values[k * k + i * (k + 1) + k] for i in range(k)]
        alpha, mu = -linear[0] / max(form[0][0], 1e-30), 0.0
        if k == 2:
            det = form[0][0] * form[1][1] - form[0][1] * form[1][0]
            if det > 1e-12 * form[0][0] * form[1][1]:
                alpha = -(form[1][1] * linear[0] - form[0][1] * linear[1]) / det
                mu = -(form[0][0] * linear[1] - form[1][0] * linear[0]) / det
        return alpha, mu, 0.5 * (alpha * linear[0] + mu * (linear[1] if k == 2 else 0.0))

    def _model_value(self, named, inputs, update, raw) -> float:
        output, tangents = self._jvps(named, inputs, [update])
        gram = _gauss_newton_gram(self.loss, output, tangents).to(torch.float64).reshape(1)
        self.communicator.all_reduce_mean([gram])
        stacked = torch.stack([update, raw])
        inner = (stacked @ update).tolist()
        curvature = float(gram[0]) + self.current_damping * inner[0]
        return inner[1] + 0.5 * curvature

    def _adapt_damping(self, named, inputs, targets, update, loss, decrease) -> None:
        """Levenberg-Marquardt: rho = actual / predicted reduction of this step."""
        detached = [p.detach() for _, p in named]
        shifted = torch._foreach_add(
            detached,
            [
                piece.view_as(p)
                for piece, p in zip(
                    torch.split(update, [p.numel() for p in detached]), detached, strict=True
                )
            ],
        )
        moved = {name: tensor for (name, _), tensor in zip(named, shifted, strict=True)}
        self._hooks_enabled = False
        try:
            output = functional_call(
                self.model, {**_scratch_buffers(self.model), **moved}, (inputs,), strict=False
            )
        finally:
            self._hooks_enabled = True
        after = _loss_value(self.loss, output, targets).to(torch.float64).reshape(1)
        self.communicator.all_reduce_mean([after])
        if decrease >= 0:
            rho = -math.inf
        else:
            rho = (float(after[0]) - loss) / decrease
        self.last_rho = rho
        omega = (19.0 / 20.0) ** self.adapt_damping
        if rho > 0.75:
            self.lm_damping *= omega
        elif rho < 0.25:
            self.lm_damping /= omega
        self.lm_damping = min(max(self.lm_damping, 1e-8), 1e4)

    # ---- checkpoints: a flat dict of tensors (safetensors-ready, no pickle)
    def state_dict(self) -> dict[str, Tensor]:
        state = {
            "steps": torch.tensor(self.steps, dtype=torch.int64),
            "factor_updates": torch.tensor(self.factor_updates, dtype=torch.int64),
            "lm_damping": torch.tensor(self.lm_damping, dtype=torch.float64),
            "alpha_mu": torch.tensor(self.alpha_mu, dtype=torch.float64),
            "inverse_damping": torch.tensor(
                math.nan if self._inverse_damping is None else self._inverse_damping,
                dtype=torch.float64,
            ),
            "generator": self.generator.get_state(),
        }
        for name in _INTERVALS:  # callables are code, not state: the caller passes them again
            interval = getattr(self, name)
            if not callable(interval):
                state[name] = torch.tensor(interval, dtype=torch.int64)
        if self.previous_update is not None:
            state["previous_update"] = self.previous_update.detach().clone()
        for name, block in self.blocks.items():
            for key, tensor in block.state_tensors().items():
                state[f"{name}/{key}"] = tensor.detach().contiguous().clone()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        per_block: dict[str, dict[str, Tensor]] = {name: {} for name in self.blocks}
        scalars = {
            "steps",
            "factor_updates",
            "lm_damping",
            "alpha_mu",
            "generator",
            "previous_update",
            "inverse_damping",
            *_INTERVALS,
        }
        for key, tensor in state.items():
            if key in scalars:
                continue
            name, _, entry = key.rpartition("/")
            if name not in per_block:
                raise ValueError(f"K-FAC state has entry {key!r} for an unknown layer")
            per_block[name][entry] = tensor
        if "steps" not in state:
            raise ValueError("K-FAC state has no 'steps' entry")
        intervals = {
            name: _checked_interval(name, int(state[name])) for name in _INTERVALS if name in state
        }
        for name, entries in per_block.items():
            self.blocks[name].load_state_tensors(entries)
        for name, interval in intervals.items():
            current = getattr(self, name)
            if callable(current):  # code, not state: the caller's schedule stays
                warnings.warn(
                    f"K-FAC checkpoint has {name}={interval}; keeping this preconditioner's"
                    f" callable {name} schedule",
                    stacklevel=2,
                )
            else:  # the checkpoint's integer schedule goes on where it was
                setattr(self, name, interval)
        self.steps = int(state["steps"])
        # older checkpoints: every factor-update step so far counted
        self.factor_updates = int(state.get("factor_updates", torch.tensor(self.steps)))
        if "lm_damping" in state:
            self.lm_damping = float(state["lm_damping"])
        if "alpha_mu" in state:
            self.alpha_mu = tuple(float(v) for v in state["alpha_mu"].tolist())
        if "generator" in state:
            self.generator.set_state(state["generator"].to(torch.uint8).cpu())
        self.previous_update = (
            state["previous_update"].detach().clone() if "previous_update" in state else None
        )
        inverse_damping = float(state.get("inverse_damping", torch.tensor(math.nan)))
        self._inverse_damping = None if math.isnan(inverse_damping) else inverse_damping


def _checked_schedule(
    name: str,
    value,
    *,
    lower: float | None = None,
    upper: float | None = None,
    lower_open: bool = False,
):
    if callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number or a callable of the step, got {value!r}")
    if lower is not None and (value < lower or (lower_open and value == lower)):
        raise ValueError(f"{name} must be {'>' if lower_open else '>='} {lower}, got {value}")
    if upper is not None and value >= upper:
        raise ValueError(f"{name} must be < {upper}, got {value}")
    return float(value)


_INTERVALS = ("factor_update_steps", "inv_update_steps")


def _checked_interval(name: str, value):
    if callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{name} must be a positive integer or a callable of the step, got {value!r}"
        )
    return value


__all__ = [
    "CurvatureBlock",
    "Communicator",
    "ComputeMethod",
    "FisherType",
    "LOSS_KINDS",
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
    "sampled_loss",
    "value_at",
]
