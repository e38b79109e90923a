"""The one validation layer: a wire-level objective description in, a checked Objective out.

:func:`build_objective` checks every field, compiles or loads the objective, runs it once on
meta tensors (expressions: shape errors and oversized intermediates, no compute) and once
on ``x0`` itself, and only then returns. Everything the caller got wrong is an
:class:`ObjectiveError` naming the field; trusted-code kinds for untrusted callers are an
:class:`UntrustedCodeError`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ._data import ObjectiveLimits, TensorSpec, check_data_name, tensor_from_bytes
from ._errors import ExpressionError, ObjectiveError
from ._expression import CompiledExpression, compile_expression
from ._numpy_expression import NumpyProgram, compile_numpy
from ._trusted import load_cloudpickle, load_torch_export

__all__ = ["OBJECTIVE_KINDS", "Objective", "build_objective"]

ObjectiveKind = Literal["expression", "residual", "torch_export", "cloudpickle"]
OBJECTIVE_KINDS: tuple[str, ...] = ("expression", "residual", "torch_export", "cloudpickle")
_SOLVE_DTYPES = (torch.float32, torch.float64)


def _sum_of_squares(residual: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def fun(x: Tensor) -> Tensor:
        r = residual(x)
        return 0.5 * torch.dot(r, r)

    return fun


@dataclass(frozen=True)
class Objective:
    """A checked objective, ready for a solver.

    ``fun(x)`` is the scalar objective; for residual objectives ``residual(x)`` is the 1-D
    vector r and ``fun(x) = 0.5 * ||r(x)||^2``. Both are plain torch functions: gradients,
    Hessian-vector products and Hessians come from ``torch.autograd`` / ``torch.func``.
    ``data`` holds the data tensors on ``device`` (floats in ``dtype``).
    """

    kind: ObjectiveKind
    fun: Callable[[Tensor], Tensor]
    residual: Callable[[Tensor], Tensor] | None
    dimension: int
    dtype: torch.dtype
    device: torch.device
    source: str = ""
    data: Mapping[str, Tensor] = field(default_factory=dict, repr=False)
    program: CompiledExpression | None = field(default=None, repr=False)
    # What numpy_program() found, once: {"numpy": NumpyProgram | None}.
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def numpy_program(self, x0: Tensor) -> NumpyProgram | None:
        """The expression on numpy with its gradient (workers.objectives._numpy_expression),
        for the small-problem solver path: CPU float64 expressions and residuals only, and
        only when it agrees with torch autograd at `x0` (f and g to 1e-9 relative, NaN where
        torch has NaN). None otherwise: evaluate `fun` with torch. Built once per objective."""
        if "numpy" not in self._derived:
            self._derived["numpy"] = self._build_numpy_program(x0)
        return self._derived["numpy"]

    def _build_numpy_program(self, x0: Tensor) -> NumpyProgram | None:
        if (self.program is None or self.dtype != torch.float64 or self.device.type != "cpu"
                or x0.dtype != torch.float64 or x0.numel() != self.dimension):
            return None
        data = {name: tensor.detach().numpy() for name, tensor in self.data.items()
                if name in self.program.data_names}
        program = compile_numpy(self.source, dimension=self.dimension, data=data,
                                residual=self.kind == "residual", limits=self.program.limits)
        if program is None:
            return None
        x = x0.detach().numpy().copy()
        try:
            program.prepare(x)
            f, g = program.value_and_grad(x)
        except Exception:  # an op this backend got wrong for these shapes: keep torch
            return None
        with torch.enable_grad():
            xt = x0.detach().clone().requires_grad_(True)
            ft = self.fun(xt)
            (gt,) = torch.autograd.grad(ft, xt)
        return program if _agree(f, ft.detach().numpy()) and _agree(g, gt.numpy()) else None

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Objective:
        """The same objective with its data on ``device`` and floats in ``dtype``.

        Costs one copy of the data tensors (none if nothing changes). Expressions are
        re-bound, not recompiled. For trusted code (torch.export / cloudpickle), modules are
        copied and moved with ``Module.to``; a plain function is called as it is and must
        itself cope with the dtype and device of ``x``.
        """
        device = torch.device(device) if device is not None else self.device
        dtype = dtype if dtype is not None else self.dtype
        if dtype not in _SOLVE_DTYPES:
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        if self.program is not None:
            data = _rebind_data(self.data, device, dtype)
            fun, residual = _bind(self.program, self.kind, data)
            return replace(self, fun=fun, residual=residual, data=data, dtype=dtype, device=device)
        fun = self.fun
        if isinstance(fun, torch.nn.Module) and device != self.device:
            fun = copy.deepcopy(fun).to(device=device)  # the original keeps its device
        return replace(self, fun=fun, dtype=dtype, device=device)


def _agree(ours, torch_value, rtol: float = 1e-9) -> bool:
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(torch_value, dtype=np.float64)
    if ours.shape != theirs.shape:
        return False
    finite = np.isfinite(theirs)
    if not np.array_equal(np.isfinite(ours), finite) or not np.array_equal(
            np.isnan(ours), np.isnan(theirs)):
        return False
    if not finite.any():
        return bool(np.array_equal(ours[~finite], theirs[~finite], equal_nan=True))
    scale = max(1.0, float(np.max(np.abs(theirs[finite]))))
    close = np.abs(ours[finite] - theirs[finite]) <= rtol * scale
    return bool(close.all()) and bool(np.array_equal(ours[~finite], theirs[~finite],
                                                     equal_nan=True))


def _rebind_data(
    data: Mapping[str, Tensor], device: torch.device, dtype: torch.dtype
) -> Mapping[str, Tensor]:
    # Floats follow the solve dtype so `A @ x` never mixes precisions; ints and bools stay.
    moved = {
        name: tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
        for name, tensor in data.items()
    }
    return MappingProxyType(moved)


def _bind(
    program: CompiledExpression, kind: str, data: Mapping[str, Tensor]
) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor] | None]:
    bound = program.bind(data)
    if kind == "residual":
        return _sum_of_squares(bound), bound
    return bound, None


def _check_x0(x0: object, limits: ObjectiveLimits) -> Tensor:
    if not isinstance(x0, Tensor):
        raise ObjectiveError(f"expected a tensor, got {type(x0).__name__}", field="x0")
    if x0.dim() != 1 or x0.numel() == 0:
        raise ObjectiveError(
            f"x0 must be a non-empty 1-D vector, got shape {tuple(x0.shape)}", field="x0"
        )
    if x0.dtype not in _SOLVE_DTYPES:
        raise ObjectiveError(f"x0 must be float32 or float64, got {x0.dtype}", field="x0")
    if x0.numel() > limits.max_dimension:
        raise ObjectiveError(
            f"dimension {x0.numel()} exceeds the limit of {limits.max_dimension}", field="x0"
        )
    if not bool(torch.isfinite(x0).all()):
        raise ObjectiveError("x0 contains inf or nan", field="x0")
    return x0


def _build_data(
    specs: Sequence[TensorSpec], limits: ObjectiveLimits, x0: Tensor
) -> Mapping[str, Tensor]:
    if len(specs) > limits.max_data_tensors:
        raise ObjectiveError(
            f"{len(specs)} data tensors sent; the limit is {limits.max_data_tensors}",
            field="data",
        )
    total = sum(len(spec.raw) for spec in specs)
    if total > limits.max_total_data_bytes:
        raise ObjectiveError(
            f"the data tensors total {total} bytes; the limit is {limits.max_total_data_bytes}",
            field="data",
        )
    tensors: dict[str, Tensor] = {}
    for spec in specs:
        if not isinstance(spec, TensorSpec):
            raise ObjectiveError(
                f"expected TensorSpec entries, got {type(spec).__name__}", field="data"
            )
        name = check_data_name(spec.name)
        if name in tensors:
            raise ObjectiveError(f"the name {name!r} is sent twice", field=f"data.{name}")
        tensors[name] = tensor_from_bytes(name, spec.shape, spec.dtype, spec.raw, limits)
    return _rebind_data(tensors, x0.device, x0.dtype)


def _probe(fun: Callable[[Tensor], Tensor], x0: Tensor, field_name: str) -> Tensor:
    """Evaluate once on x0 so that a broken objective fails here, not inside a solve."""
    try:
        with torch.no_grad():
            return fun(x0)
    except ObjectiveError:
        raise
    except Exception as exc:  # trusted code may raise anything; report it as the caller's
        raise ObjectiveError(
            f"evaluating the objective at x0 failed: {type(exc).__name__}: {exc}",
            field=field_name,
        ) from exc


def _check_code_result(value: object, field_name: str) -> None:
    if not isinstance(value, Tensor):
        raise ObjectiveError(
            f"the objective returned a {type(value).__name__}; it must return a scalar tensor",
            field=field_name,
        )
    if value.dim() != 0 or not value.dtype.is_floating_point:
        raise ObjectiveError(
            f"the objective must return a floating-point scalar, got shape "
            f"{tuple(value.shape)} {value.dtype}",
            field=field_name,
        )


def build_objective(
    *,
    kind: str,
    source: str = "",
    blob: bytes = b"",
    data: Sequence[TensorSpec] = (),
    x0: Tensor,
    trusted: bool = False,
    limits: ObjectiveLimits | None = None,
) -> Objective:
    """Check a wire-level objective description and turn it into an :class:`Objective`.

    ``kind`` is ``"expression"`` (``source`` gives a scalar), ``"residual"`` (``source``
    gives a 1-D vector r; the objective is 0.5*||r||^2), ``"torch_export"`` or
    ``"cloudpickle"`` (``blob`` holds the code; both need ``trusted=True``). The objective is
    compiled against the dtype and device of ``x0`` and evaluated once at ``x0``.

    Cost: decoding the data (one copy), compiling (linear in the source), one meta-tensor
    run (no compute) and one real evaluation at ``x0``.
    Raises ObjectiveError (with ``.field``) or UntrustedCodeError.
    """
    limits = limits or ObjectiveLimits()
    if kind not in OBJECTIVE_KINDS:
        raise ObjectiveError(
            f"unknown kind {kind!r}; expected one of {', '.join(OBJECTIVE_KINDS)}",
            field="objective.kind",
        )
    x0 = _check_x0(x0, limits)
    if kind in ("expression", "residual"):
        if blob:
            raise ObjectiveError(
                f"a {kind} objective is sent as source text; blob must be empty",
                field="objective.blob",
            )
        return _build_expression(kind, source, data, x0, limits)  # type: ignore[arg-type]

    if source or data:
        which = "objective.source" if source else "data"
        raise ObjectiveError(
            f"a {kind} objective is sent as blob only; {which} must be empty", field=which
        )
    if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) == 0:
        raise ObjectiveError("expected the program bytes in blob", field="objective.blob")
    if len(blob) > limits.max_blob_bytes:
        raise ObjectiveError(
            f"blob is {len(blob)} bytes; the limit is {limits.max_blob_bytes}",
            field="objective.blob",
        )
    loader = load_torch_export if kind == "torch_export" else load_cloudpickle
    fun = loader(blob, trusted=trusted)  # refuses untrusted callers before reading blob
    if isinstance(fun, torch.nn.Module):
        fun = fun.to(device=x0.device)
    _check_code_result(_probe(fun, x0, "objective.blob"), "objective.blob")
    return Objective(
        kind=kind,  # type: ignore[arg-type]
        fun=fun,
        residual=None,
        dimension=x0.numel(),
        dtype=x0.dtype,
        device=x0.device,
    )


def _build_expression(
    kind: Literal["expression", "residual"],
    source: str,
    specs: Sequence[TensorSpec],
    x0: Tensor,
    limits: ObjectiveLimits,
) -> Objective:
    tensors = _build_data(specs, limits, x0)
    program = compile_expression(
        source,
        dimension=x0.numel(),
        data_names=tuple(tensors),
        result="vector" if kind == "residual" else "scalar",
        limits=limits.expression,
    )
    program.check_shapes(x0, tensors)
    fun, residual = _bind(program, kind, tensors)
    value = _probe(residual if residual is not None else fun, x0, "objective.source")
    program.check_result(value)
    if residual is not None and value.numel() == 0:
        raise ExpressionError("the residual is empty at x0")
    return Objective(
        kind=kind,
        fun=fun,
        residual=residual,
        dimension=x0.numel(),
        dtype=x0.dtype,
        device=x0.device,
        source=source,
        data=tensors,
        program=program,
    )
