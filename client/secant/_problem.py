"""Builds a wire ``Problem`` from the arguments a scipy user would pass to ``minimize``.

Shared by the sync and async clients and the CLI, so every entry point accepts the same
spellings and rejects the same mistakes before anything reaches the network.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from google.protobuf import struct_pb2

from secant._errors import SecantError
from secant._tensors import to_tensor, wire_dtype
from secant.v1 import optimizer_pb2 as pb

DataLike = Mapping[str, Any]
_LIBRARIES = frozenset({"torch", "numpy", "builtins", "math"})  # pickled by reference


@dataclass(frozen=True)
class Expression:
    """A scalar objective in the expression DSL over ``x`` and named ``data`` tensors.

    >>> Expression("sum((A @ x - b)**2)", data={"A": A, "b": b})
    """

    source: str
    data: DataLike = field(default_factory=dict)


@dataclass(frozen=True)
class Residual:
    """A vector residual r(x) in the DSL; the objective is 0.5 * ||r(x)||^2 (Gauss-Newton/LM)."""

    source: str
    data: DataLike = field(default_factory=dict)


@dataclass(frozen=True)
class TorchExport:
    """A ``torch.export`` program computing f(x) (trusted servers and callers only: loading
    an archive can run code). Build one with ``TorchExport.from_module(module, n)``."""

    program: bytes

    @classmethod
    def from_module(cls, module: Any, n: int, dtype: Any = None) -> TorchExport:
        """Exports ``module(x) -> scalar`` with a dynamic length (needs torch; ~1 s)."""
        import io

        import torch

        dtype = dtype or torch.float64
        example = torch.zeros(n, dtype=dtype)
        length = torch.export.Dim("n", min=3)
        program = torch.export.export(module, (example,), dynamic_shapes={"x": {0: length}})
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        return cls(buffer.getvalue())


@dataclass(frozen=True)
class Pickled:
    """A cloudpickled callable f(x) of a torch tensor (trusted servers and callers only)."""

    blob: bytes

    @classmethod
    def from_callable(cls, fun: Any) -> Pickled:
        """Pickles ``fun`` by value, its own module included (the server cannot import the
        caller's modules); libraries such as torch are referenced, not copied."""
        import sys

        import cloudpickle

        module = sys.modules.get(getattr(fun, "__module__", None) or "")
        library = module is None or module.__name__.split(".")[0] in _LIBRARIES
        by_value = not library and module.__name__ != "__main__"
        if by_value:
            cloudpickle.register_pickle_by_value(module)
        try:
            return cls(cloudpickle.dumps(fun))
        finally:
            if by_value:
                cloudpickle.unregister_pickle_by_value(module)


@dataclass(frozen=True)
class Bounds:
    """Box constraints: ``lower <= x <= upper`` (scalars broadcast; None or +/-inf: unbounded)."""

    lower: Any = None
    upper: Any = None


Objective = str | Expression | Residual | TorchExport | Pickled


def build_problem(
    objective: Objective,
    x0: Any,
    method: str = "l-bfgs",
    bounds: Any = None,
    data: DataLike | None = None,
    options: Mapping[str, Any] | None = None,
    report_x_every: int = 0,
    device: str = "cpu",
    dtype: str = "float64",
    labels: Mapping[str, str] | None = None,
) -> pb.Problem:
    """A wire Problem; cost: one copy of x0, the bounds and every data array into the message.

    Raises SecantError(INVALID_ARGUMENT) naming the argument that is wrong, the same error the
    server gives for what only it can check, so callers handle one exception type.
    """
    try:
        return _build_problem(
            objective, x0, method, bounds, data, options, report_x_every, device, dtype, labels
        )
    except (ValueError, TypeError) as exc:
        raise SecantError(str(exc), grpc.StatusCode.INVALID_ARGUMENT) from exc


def _build_problem(
    objective: Objective,
    x0: Any,
    method: str,
    bounds: Any,
    data: DataLike | None,
    options: Mapping[str, Any] | None,
    report_x_every: int,
    device: str,
    dtype: str,
    labels: Mapping[str, str] | None,
) -> pb.Problem:
    solve_dtype = wire_dtype(dtype)
    if solve_dtype not in (pb.FLOAT64, pb.FLOAT32):
        raise ValueError(f"dtype must be float64 or float32, got {dtype!r}")
    try:
        x0_array = np.asarray(x0, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"x0 must be a 1-D array of numbers: {exc}") from exc
    if x0_array.ndim != 1:
        raise ValueError(f"x0 must be a 1-D array, got shape {x0_array.shape}")
    if not isinstance(method, str) or not method:
        raise ValueError(f"method must be a non-empty string, got {method!r}")
    if report_x_every < 0:
        raise ValueError(f"report_x_every must be >= 0, got {report_x_every}")

    problem = pb.Problem(
        objective=build_objective(objective, data),
        x0=to_tensor(x0_array, dtype=solve_dtype),
        method=method,
        device=device,
        dtype=solve_dtype,
        report_x_every=int(report_x_every),
        labels={str(k): str(v) for k, v in (labels or {}).items()},
    )
    if bounds is not None:
        lower, upper = normalize_bounds(bounds, x0_array.shape[0])
        problem.bounds.lower.CopyFrom(to_tensor(lower, dtype=solve_dtype))
        problem.bounds.upper.CopyFrom(to_tensor(upper, dtype=solve_dtype))
    if options:
        problem.options.CopyFrom(to_struct(options))
    return problem


def build_objective(objective: Objective, data: DataLike | None = None) -> pb.Objective:
    """The wire Objective; ``data`` merges with (and may not redefine) the objective's own."""
    merged: dict[str, Any] = {}
    if objective is None:  # callback mode: the caller evaluates it
        if data:
            raise ValueError("data= goes with a DSL objective, not with a Python callable")
        return pb.Objective()
    if isinstance(objective, Expression | Residual):
        merged.update(objective.data)
    for name, value in (data or {}).items():
        if name in merged:
            raise ValueError(f"data {name!r} is given both in the objective and in data=")
        merged[name] = value
    if isinstance(objective, str):
        wire = pb.Objective(expression=objective)
    elif isinstance(objective, Expression):
        wire = pb.Objective(expression=objective.source)
    elif isinstance(objective, Residual):
        wire = pb.Objective(residual=objective.source)
    elif isinstance(objective, TorchExport):
        wire = pb.Objective(torch_export=objective.program)
    elif isinstance(objective, Pickled):
        wire = pb.Objective(cloudpickle=objective.blob)
    else:
        raise TypeError(
            "objective must be a DSL string, secant.Expression or secant.Residual, "
            f"got {type(objective).__name__}"
        )
    for name, value in merged.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"data names must be identifiers, got {name!r}")
        wire.data.append(pb.NamedTensor(name=name, tensor=to_tensor(value)))
    return wire


def normalize_bounds(bounds: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) float64 arrays of length n, with +/-inf where unbounded.

    Accepts ``secant.Bounds``, scipy's ``Bounds`` (anything with ``lb``/``ub``), scipy's
    sequence of n ``(lo, hi)`` pairs with None for unbounded, or a ``(lower, upper)`` pair of
    arrays or scalars. When n == 2 a sequence of two pairs is read as scipy's per-coordinate
    pairs, as scipy would.
    """
    if isinstance(bounds, Bounds):
        lower, upper = bounds.lower, bounds.upper
    elif hasattr(bounds, "lb") and hasattr(bounds, "ub"):
        lower, upper = bounds.lb, bounds.ub
    elif isinstance(bounds, Sequence | np.ndarray) and _is_pair_list(bounds, n):
        lower = [pair[0] for pair in bounds]
        upper = [pair[1] for pair in bounds]
    elif isinstance(bounds, Sequence | np.ndarray) and len(bounds) == 2:
        lower, upper = bounds[0], bounds[1]
    else:
        raise ValueError(
            "bounds must be (lower, upper), a sequence of n (lo, hi) pairs, or secant.Bounds"
        )
    lower_array = _bound_array(lower, n, -math.inf, "lower")
    upper_array = _bound_array(upper, n, math.inf, "upper")
    if np.any(lower_array > upper_array):
        bad = int(np.argmax(lower_array > upper_array))
        raise ValueError(
            f"bounds: lower[{bad}] = {lower_array[bad]} exceeds upper[{bad}] = {upper_array[bad]}"
        )
    return lower_array, upper_array


def _is_pair_list(bounds: Sequence[Any], n: int) -> bool:
    if len(bounds) != n:
        return False
    for item in bounds:
        if isinstance(item, str) or not isinstance(item, Sequence | np.ndarray) or len(item) != 2:
            return False
    return True


def _bound_array(value: Any, n: int, unbounded: float, side: str) -> np.ndarray:
    if value is None:
        return np.full(n, unbounded)
    if np.ndim(value) == 0:
        return np.full(n, unbounded if value is None else float(value))
    items = [unbounded if v is None else v for v in value]
    array = np.asarray(items, dtype=np.float64)
    if array.shape != (n,):
        raise ValueError(f"bounds: {side} has shape {array.shape}, x0 has shape ({n},)")
    if np.any(np.isnan(array)):
        raise ValueError(f"bounds: {side} contains NaN")
    return array


def to_struct(options: Mapping[str, Any]) -> struct_pb2.Struct:
    """Solver options as a protobuf Struct; numpy scalars and arrays become plain numbers."""
    struct = struct_pb2.Struct()
    try:
        struct.update({str(key): _plain(value) for key, value in options.items()})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"options must be JSON-like (numbers, strings, bools): {exc}") from exc
    return struct


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
