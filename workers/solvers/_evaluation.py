"""What a solver asks for (an EvalRequest) and what it gets back (an Evaluation).

A solve never calls the objective itself: it yields requests and a driver answers them, from
a local torch objective (LocalEvaluator) or from a remote client (the callback driver).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class EvalRequest:
    """A point to evaluate and which quantities are needed there."""

    x: Tensor
    need_f: bool = True
    need_g: bool = True
    hvp_vector: Tensor | None = None  # Hessian-vector product H(x) @ v wanted
    need_hess: bool = False
    need_jac: bool = False  # residual problems: r(x) and its Jacobian (need_f gives r)


@dataclass
class Evaluation:
    f: Tensor | None = None  # 0-d
    g: Tensor | None = None
    hvp: Tensor | None = None
    hess: Tensor | None = None
    r: Tensor | None = None
    jac: Tensor | None = None

    def is_finite(self) -> bool:
        """True when every returned quantity is finite (one host sync). Torch tensors, or
        numpy arrays and numbers on the small-problem path."""
        quantities = (self.f, self.g, self.hvp, self.hess, self.r, self.jac)
        parts = [t for t in quantities if t is not None]
        if not parts:
            return True
        if not isinstance(parts[0], Tensor):
            return all(bool(np.isfinite(t).all()) for t in parts)
        flags = torch.stack([torch.isfinite(t).all() for t in parts])
        return bool(flags.all())


ScalarFn = Callable[[Tensor], Tensor]


class LocalEvaluator:
    """Answers EvalRequests from torch callables; missing derivatives come from autograd.

    Costs: f alone runs without a graph; f+g is one forward and one backward; an HVP is a
    double backward; the dense Hessian costs n HVPs (torch.func.hessian) and n^2 memory.
    `jac=True` (scipy's spelling) means fun(x) returns (f, g) together: one call per
    evaluation, second derivatives by autograd through f.
    """

    def __init__(
        self,
        fun: Callable[[Tensor], Tensor | tuple[Tensor, Tensor]] | None = None,
        *,
        jac: ScalarFn | bool | None = None,
        hessp: Callable[[Tensor, Tensor], Tensor] | None = None,
        hess: ScalarFn | None = None,
        residual: ScalarFn | None = None,
        residual_jac: ScalarFn | None = None,
    ) -> None:
        if fun is None and residual is None:
            raise ValueError("an objective needs fun(x) or residual(x)")
        self._residual = residual
        self._residual_jac = residual_jac
        if fun is None:

            def fun(x: Tensor) -> Tensor:
                r = residual(x)
                return 0.5 * torch.dot(r, r)

        self._fun_and_grad = None
        if jac is True:
            if fun is None:
                raise ValueError("jac=True needs fun(x) returning (f, g)")
            self._fun_and_grad = fun

            def fun(x: Tensor, _both=fun) -> Tensor:
                return _both(x)[0]

            jac = None
        elif jac is False:
            jac = None
        self._fun = fun
        self._jac = jac
        self._hessp = hessp
        self._hess = hess

    def __call__(self, request: EvalRequest) -> Evaluation:
        x = request.x
        out = Evaluation()
        if request.need_jac:
            out.r, out.jac = self._residual_and_jacobian(x)
            out.f = 0.5 * torch.dot(out.r, out.r)
            out.g = out.jac.T @ out.r
            return out
        if request.need_g:
            out.f, out.g = self._value_and_grad(x)
        elif request.need_f:
            with torch.no_grad():
                out.f = self._fun(x).detach()
        if request.hvp_vector is not None:
            out.hvp = self._hvp(x, request.hvp_vector)
        if request.need_hess:
            out.hess = self._hessian(x)
        return out

    def _value_and_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self._fun_and_grad is not None:
            with torch.no_grad():
                f, g = self._fun_and_grad(x)
            return torch.as_tensor(f, dtype=x.dtype, device=x.device).detach(), torch.as_tensor(
                g, dtype=x.dtype, device=x.device).detach()
        if self._jac is not None:
            with torch.no_grad():
                return self._fun(x).detach(), self._jac(x).detach()
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            f = self._fun(xg)
            (g,) = torch.autograd.grad(f, xg)
        return f.detach(), g

    def _hvp(self, x: Tensor, v: Tensor) -> Tensor:
        if self._hessp is not None:
            with torch.no_grad():
                return self._hessp(x, v).detach()
        if self._hess is not None:
            with torch.no_grad():
                return self._hess(x) @ v
        # Second derivatives come from fun's graph: a user `jac` may be plain numpy inside.
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self._fun(xg), xg, create_graph=True)
            (hv,) = torch.autograd.grad(g, xg, grad_outputs=v, allow_unused=True)
        return torch.zeros_like(x) if hv is None else hv.detach()

    def _hessian(self, x: Tensor) -> Tensor:
        if self._hess is not None:
            with torch.no_grad():
                return self._hess(x).detach()
        return torch.autograd.functional.hessian(self._fun, x, vectorize=True).detach()

    def _residual_and_jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self._residual is None:
            raise ValueError("this method needs a residual function r(x) (use least_squares)")
        with torch.no_grad():
            r = self._residual(x).detach()
        if self._residual_jac is not None:
            with torch.no_grad():
                return r, self._residual_jac(x).detach()
        jac = torch.autograd.functional.jacobian(self._residual, x, vectorize=True)
        return r, jac.detach()
