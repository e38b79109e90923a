"""The one validation layer: a wire `Problem` becomes a checked `SolveSpec`, or an error that
names the field (`problem.x0: ...`, `problems[3].options: ...`).

Checks, in order: the server's limits (LimitExceeded -> RESOURCE_EXHAUSTED), the tensors'
dtype/shape/byte counts, the method and options (workers.solvers.check_problem), and the
objective itself (workers.objectives.build_objective, which compiles it and evaluates it once at
x0, so shape errors surface here and not on a worker). Trusted-code objectives on a server
started without --trust-code, or from a caller without the `trust-code` role (the caller the
auth interceptor put in service.auth's contextvar), are a PermissionError. Nothing is created
before this passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from secant.v1 import optimizer_pb2 as pb
from service.auth import current_caller
from service.errors import LimitExceeded
from workers.objectives import (
    ExpressionLimits,
    ObjectiveError,
    ObjectiveLimits,
    TensorSpec,
    UntrustedCodeError,
    build_objective,
)
from workers.runner import RunSpec
from workers.solvers import canonical_method, check_problem, parse_options

_WIRE_DTYPES = {
    pb.DTYPE_UNSPECIFIED: "float64",
    pb.FLOAT64: "float64",
    pb.FLOAT32: "float32",
    pb.INT64: "int64",
    pb.INT32: "int32",
    pb.BOOL: "bool",
}
_NUMPY = {
    "float64": np.dtype("<f8"),
    "float32": np.dtype("<f4"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "bool": np.dtype("?"),
}
_SOLVE_DTYPES = {pb.DTYPE_UNSPECIFIED: "float64", pb.FLOAT64: "float64", pb.FLOAT32: "float32"}
_TORCH = {"float64": torch.float64, "float32": torch.float32}
TRUSTED_KINDS = frozenset({"torch_export", "cloudpickle"})


@dataclass(frozen=True)
class Limits:
    """What one request may ask of this server; each is a `secant serve` flag."""

    max_message_bytes: int = 64 * 2**20
    max_dimension: int = 10_000_000
    max_expression_length: int = 10_000
    max_concurrent_jobs: int = 10_000  # queued + running, across callers
    max_batch_size: int = 10_000
    # Quotas per caller (the token's caller name; one anonymous caller without auth).
    max_jobs_per_caller: int = 1_000  # queued + running
    max_dimension_per_caller: int = 100_000_000  # sum of n over its queued + running jobs


@dataclass(frozen=True)
class SolveSpec:
    """A checked problem: everything a worker needs, as plain data."""

    objective_kind: str
    source: str
    blob: bytes
    data: tuple[TensorSpec, ...]
    x0: np.ndarray
    lower: np.ndarray | None
    upper: np.ndarray | None
    method: str  # canonical name
    options: dict
    dtype: str
    device: str
    report_x_every: int
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.x0.size)

    def run_spec(self, job_id: str, *, trusted: bool) -> RunSpec:
        return RunSpec(
            job_id=job_id,
            objective_kind=self.objective_kind,
            source=self.source,
            blob=self.blob,
            data=self.data,
            x0=self.x0,
            lower=self.lower,
            upper=self.upper,
            method=self.method,
            options=self.options,
            dtype=self.dtype,
            device=self.device,
            report_x_every=self.report_x_every,
            trusted=trusted,
        )


def decode_tensor(tensor: pb.Tensor, where: str, *, max_elements: int | None = None) -> np.ndarray:
    """A wire tensor as a numpy array (a copy), checking dtype, shape and byte count."""
    if tensor.dtype not in _WIRE_DTYPES:
        raise ValueError(f"{where}.dtype: unknown dtype value {tensor.dtype}")
    dtype_name = _WIRE_DTYPES[tensor.dtype]
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"{where}.shape: dimensions must be >= 0, got {list(shape)}")
    count = math.prod(shape)
    if max_elements is not None and count > max_elements:
        raise LimitExceeded(
            f"{where}: {count} elements exceed this server's max dimension {max_elements}"
        )
    itemsize = _NUMPY[dtype_name].itemsize
    if len(tensor.data) != count * itemsize:
        raise ValueError(
            f"{where}.data: shape {list(shape)} of {dtype_name} needs {count * itemsize} bytes"
            f" ({count} x {itemsize}), but {len(tensor.data)} came"
        )
    return np.frombuffer(tensor.data, dtype=_NUMPY[dtype_name]).reshape(shape).copy()


def _vector(tensor: pb.Tensor, where: str, solve_dtype: str, limits: Limits) -> np.ndarray:
    array = decode_tensor(tensor, where, max_elements=limits.max_dimension)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{where}.shape: must be a non-empty 1-D vector, got {list(array.shape)}")
    if array.dtype == np.bool_:
        raise ValueError(f"{where}.dtype: must be a number type, got bool")
    return array.astype(_NUMPY[solve_dtype], copy=False)


def _options(struct, where: str) -> dict:
    options = {}
    for key, value in struct.items():
        if isinstance(value, float) and math.isnan(value):
            raise ValueError(f"{where}.{key}: must be a number, got NaN")
        options[key] = value
    try:
        parse_options(options)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return options


def validate_problem(
    problem: pb.Problem,
    limits: Limits,
    *,
    trusted: bool,
    where: str = "problem",
) -> SolveSpec:
    """Checks one Problem; raises ValueError / LimitExceeded / PermissionError naming the field."""
    objective = problem.objective
    kind = objective.WhichOneof("kind")
    if kind is None:
        raise ValueError(
            f"{where}.objective: set one of expression, residual, torch_export, cloudpickle"
        )
    if kind in TRUSTED_KINDS and not trusted:
        raise PermissionError(
            f"{where}.objective.{kind}: this server runs caller code only when started with"
            " --trust-code; send an expression instead"
        )
    caller = current_caller()
    if kind in TRUSTED_KINDS and caller is not None and "trust-code" not in caller.roles:
        raise PermissionError(
            f"{where}.objective.{kind}: caller {caller.name!r} lacks the role 'trust-code'"
            " that objectives carrying code need; send an expression instead"
        )
    source = getattr(objective, kind) if kind in ("expression", "residual") else ""
    blob = getattr(objective, kind) if kind in TRUSTED_KINDS else b""
    if len(source) > limits.max_expression_length:
        raise LimitExceeded(
            f"{where}.objective.{kind}: {len(source)} characters exceed this server's max"
            f" expression length {limits.max_expression_length}"
        )

    x0, lower, upper, method, options, solve_dtype, x0_tensor, device = _check_common(
        problem, limits, where, kind
    )

    data = []
    for index, named in enumerate(objective.data):
        if named.tensor.dtype not in _WIRE_DTYPES:
            raise ValueError(
                f"{where}.objective.data[{index}].tensor.dtype: unknown value {named.tensor.dtype}"
            )
        data.append(
            TensorSpec(
                name=named.name,
                shape=tuple(named.tensor.shape),
                dtype=_WIRE_DTYPES[named.tensor.dtype],
                raw=named.tensor.data,
            )
        )
    objective_limits = ObjectiveLimits(
        max_dimension=limits.max_dimension,
        expression=ExpressionLimits(max_source_chars=limits.max_expression_length),
    )
    try:
        build_objective(
            kind=kind,
            source=source,
            blob=blob,
            data=data,
            x0=x0_tensor,
            trusted=trusted,
            limits=objective_limits,
        )
    except ObjectiveError as exc:
        raise ValueError(f"{where}.{exc}") from None
    except UntrustedCodeError as exc:
        raise PermissionError(f"{where}.objective.{kind}: {exc}") from None

    return SolveSpec(
        objective_kind=kind,
        source=source,
        blob=blob,
        data=tuple(data),
        x0=x0,
        lower=lower,
        upper=upper,
        method=method.name,
        options=options,
        dtype=solve_dtype,
        device=device,
        report_x_every=problem.report_x_every,
        labels=dict(problem.labels),
    )


def require_code_trust(where: str, *, trusted: bool, instead: str) -> None:
    """PermissionError unless this server runs caller code (started with --trust-code) and the
    caller, when auth is on, has the `trust-code` role: the objectives' rule (validate_problem),
    for training's own modules. `instead` says what to send instead."""
    if not trusted:
        raise PermissionError(
            f"{where}: this server runs caller code only when started with --trust-code;"
            f" {instead}"
        )
    caller = current_caller()
    if caller is not None and "trust-code" not in caller.roles:
        raise PermissionError(
            f"{where}: caller {caller.name!r} lacks the role 'trust-code' that requests"
            f" carrying code need; {instead}"
        )


def _check_common(problem: pb.Problem, limits: Limits, where: str, kind: str):
    """x0, dtype, device, bounds, method and options: what every kind of solve shares."""
    if not problem.HasField("x0"):
        raise ValueError(f"{where}.x0: required (the starting point)")
    if problem.dtype not in _SOLVE_DTYPES:
        raise ValueError(f"{where}.dtype: solves run in FLOAT64 or FLOAT32, got {problem.dtype}")
    solve_dtype = _SOLVE_DTYPES[problem.dtype]
    x0 = _vector(problem.x0, f"{where}.x0", solve_dtype, limits)

    device = (problem.device or "cpu").strip().lower()
    if device not in ("cpu", "cuda"):
        raise ValueError(f"{where}.device: 'cpu' or 'cuda', got {problem.device!r}")
    if problem.report_x_every < 0:
        raise ValueError(f"{where}.report_x_every: must be >= 0, got {problem.report_x_every}")

    lower = upper = None
    if problem.HasField("bounds"):
        lower = _vector(problem.bounds.lower, f"{where}.bounds.lower", solve_dtype, limits)
        upper = _vector(problem.bounds.upper, f"{where}.bounds.upper", solve_dtype, limits)
        for name, bound in (("lower", lower), ("upper", upper)):
            if bound.shape != x0.shape:
                raise ValueError(
                    f"{where}.bounds.{name}: shape {list(bound.shape)} differs from x0's"
                    f" {list(x0.shape)}"
                )

    if problem.method:
        try:
            method = canonical_method(problem.method)
        except ValueError as exc:
            raise ValueError(f"{where}.method: {exc}") from None
    else:
        default = "lm" if kind == "residual" else "l-bfgs-b" if lower is not None else "l-bfgs"
        method = canonical_method(default)
    if method.least_squares and kind != "residual":
        raise ValueError(
            f"{where}.method: {method.name!r} solves least squares; send the objective as"
            " objective.residual (or pick a minimization method)"
        )
    options = _options(problem.options, f"{where}.options")

    x0_tensor = torch.from_numpy(x0).to(_TORCH[solve_dtype])
    bounds = None
    if lower is not None:
        bounds = (torch.from_numpy(lower), torch.from_numpy(upper))
    try:
        check_problem(method.name, x0_tensor, bounds, options)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return x0, lower, upper, method, options, solve_dtype, x0_tensor, device


def method_filter(method: str) -> str:
    """A ListJobs method filter in canonical spelling ("L-BFGS" finds l-bfgs jobs)."""
    if not method:
        return ""
    try:
        return canonical_method(method).name
    except ValueError as exc:
        raise ValueError(f"method: {exc}") from None


CALLBACK_METHODS_NEEDING_HVP = frozenset({"newton-cg"})


def validate_callback_start(start: pb.CallbackStart, limits: Limits) -> SolveSpec:
    """Checks the first message of SolveWithCallbacks: the problem without an objective (the
    caller evaluates it) and what the caller can evaluate."""
    where = "start.problem"
    problem = start.problem
    if problem.objective.WhichOneof("kind") is not None or len(problem.objective.data):
        raise ValueError(
            f"{where}.objective: leave it empty in callback mode; the caller evaluates f"
        )
    if not start.provides_gradient:
        raise ValueError(
            "start.provides_gradient: callback mode needs the gradient from the caller (the SDK"
            " computes finite differences when no jac is given)"
        )
    x0, lower, upper, method, options, solve_dtype, _, device = _check_common(
        problem, limits, where, "callback"
    )
    if method.least_squares or method.name == "newton":
        raise ValueError(
            f"{where}.method: {method.name!r} needs residual Jacobians or dense Hessians, which"
            " callback mode does not carry; use newton-cg (with Hessian-vector products),"
            " bfgs, l-bfgs or l-bfgs-b"
        )
    if method.name in CALLBACK_METHODS_NEEDING_HVP and not start.provides_hvp:
        raise ValueError(
            f"{where}.method: {method.name!r} needs Hessian-vector products; pass hessp= (and"
            " provides_hvp) or pick bfgs / l-bfgs"
        )
    if device != "cpu":
        raise ValueError(f"{where}.device: callback solves run in the gateway, on the CPU")
    return SolveSpec(
        objective_kind="callback", source="", blob=b"", data=(), x0=x0, lower=lower,
        upper=upper, method=method.name, options=options, dtype=solve_dtype, device=device,
        report_x_every=problem.report_x_every, labels=dict(problem.labels),
    )
