"""Natural gradient with the exact empirical Fisher, for small models.

F = (1/N) sum_i g_i g_i^T over the per-example gradients g_i of the batch (computed at once
with torch.func.vmap), and the update direction solves (F + lambda I) d = g with g the mean
gradient. With J the (N x P) matrix of per-example gradients:
- P <= N: form F (P x P: P^2 numbers) and solve by Cholesky, O(N P^2 + P^3);
- P > N: Woodbury, d = (g - J^T (N lambda I + J J^T)^-1 J g) / lambda, O(N^2 P + N^3).
Either way J itself takes N * P numbers, which is what limits this to small models
(`max_parameters`). The direction is written into `.grad`; the wrapped optimizer (SGD)
takes the step, as with K-FAC.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .kfac import Schedule, _checked_schedule, value_at

LossFn = Callable[[Tensor, Tensor], Tensor]


class NaturalGradientPreconditioner:
    """`step(inputs, targets)` evaluates the batch, sets every parameter's `.grad` to the
    damped natural-gradient direction and returns the (mean) loss. `loss_fn(output, target)`
    must be a mean over the examples of the batch."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, damping: Schedule = 1e-3,
                 max_parameters: int = 200_000) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.damping = _checked_schedule("damping", damping, lower=0.0, lower_open=True)
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if count > max_parameters:
            raise ValueError(
                f"natural-gradient: the model has {count:,} parameters, more than "
                f"max_parameters={max_parameters:,} (the exact Fisher needs batch x P memory)"
            )
        self.steps = 0

    @property
    def current_damping(self) -> float:
        return float(value_at(self.damping, self.steps))

    def per_example_grads(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """(J, losses): J is (N, P), row i the flattened gradient of example i's loss."""
        params = {name: p.detach() for name, p in self.model.named_parameters()
                  if p.requires_grad}
        buffers = dict(self.model.named_buffers())

        def example_loss(parameters, x, y):
            output = functional_call(self.model, (parameters, buffers), (x.unsqueeze(0),))
            return self.loss_fn(output, y.unsqueeze(0))

        def grad_and_loss(parameters, x, y):
            grads = grad(example_loss)(parameters, x, y)
            return grads, example_loss(parameters, x, y)

        grads, losses = vmap(grad_and_loss, in_dims=(None, 0, 0), randomness="different")(
            params, inputs, targets
        )
        jacobian = torch.cat([grads[name].reshape(inputs.shape[0], -1) for name in self.names],
                             dim=1)
        return jacobian, losses

    def direction(self, jacobian: Tensor, damping: float) -> Tensor:
        """Solves (J^T J / N + damping I) d = mean(J)."""
        n, p = jacobian.shape
        wide = jacobian.to(torch.float64)
        mean_grad = wide.mean(dim=0)
        if p <= n:
            fisher = wide.T @ wide / n
            fisher.diagonal().add_(damping)
            step = torch.cholesky_solve(mean_grad.unsqueeze(1),
                                        torch.linalg.cholesky(fisher)).squeeze(1)
        else:
            gram = wide @ wide.T
            gram.diagonal().add_(n * damping)
            inner = torch.cholesky_solve((wide @ mean_grad).unsqueeze(1),
                                         torch.linalg.cholesky(gram)).squeeze(1)
            step = (mean_grad - wide.T @ inner) / damping
        return step.to(jacobian.dtype)

    def step(self, inputs: Tensor, targets: Tensor) -> Tensor:
        jacobian, losses = self.per_example_grads(inputs, targets)
        step = self.direction(jacobian, self.current_damping)
        offset = 0
        for name, parameter in self.model.named_parameters():
            if name not in self.names:
                continue
            count = parameter.numel()
            parameter.grad = step[offset:offset + count].view_as(parameter).clone()
            offset += count
        self.steps += 1
        return losses.mean().detach()


__all__ = ["NaturalGradientPreconditioner"]
