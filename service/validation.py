"""The one validation layer: a wire `Problem` becomes a checked `SolveSpec`, or an error that
names the field (`problem.x0: ...`, `problems[3].options: ...`).

Checks, in order: the server's limits (LimitExceeded -> RESOURCE_EXHAUSTED), the tensors'
dtype/shape/byte counts, the method and options (workers.solvers.check_problem), and the
objective itself (workers.objectives.build_objective, which compiles it and evaluates it once at
x0, so shape errors surface here and not on a worker). A Problem with `batch` set is a
vectorized batch (x0 is (B, n)) and becomes a `BatchSolveSpec` by the same steps, with the
batch engine's checks (workers.solvers.batched.check_batch_problem, build_batch_objective).
Trusted-code objectives on a server started without --trust-code, or from a caller without the
`trust-code` role (the caller the auth interceptor put in service.auth's contextvar), are a
PermissionError. Nothing is created before this passes.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from secant.v1 import optimizer_pb2 as pb
from service.auth import current_caller
from service.errors import LimitExceeded
from workers.batch_runner import BatchRunSpec
from workers.objectives import (
    BATCH_OBJECTIVE_KINDS,
    ExpressionLimits,
    ObjectiveError,
    ObjectiveLimits,
    TensorSpec,
    UntrustedCodeError,
    build_batch_objective,
    build_objective,
)
from workers.runner import RunSpec
from workers.solvers import canonical_method, check_problem, parse_options
from workers.solvers._auto import Facts, choose_batch, is_auto, validation_method
from workers.solvers._methods import MethodInfo
from workers.solvers.batched import BATCH_METHODS, check_batch_problem

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
    max_batch_size: int = 10_000  # problems per SubmitBatch (each its own job)
    # Vectorized batches (Problem.batch, one job): members per job; B * n counts against
    # max_dimension, and the result (x and jac, B x n each) must fit max_message_bytes.
    max_batch_members: int = 1_000_000
    # CPU batches are split into chunks of members, one worker each. 0: ceil(B / workers),
    # but never below min_batch_chunk members, so a small batch runs whole on one worker
    # (a chunk's start-up, about a ms, is more than a small batch's whole solve).
    batch_chunk_size: int = 0
    min_batch_chunk: int = 2_000
    max_batch_chunks: int = 1_024  # a caller's chunk_size may not make more chunks
    # Quotas per caller (the token's caller name; one anonymous caller without auth).
    max_jobs_per_caller: int = 1_000  # queued + running
    # Sum of n over its queued + running jobs; a batch job counts B * n.
    max_dimension_per_caller: int = 100_000_000


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

    @property
    def quota_dimensions(self) -> int:
        return self.n


@dataclass(frozen=True)
class BatchSolveSpec:
    """A checked vectorized batch: B same-shape members, x0 (B, n). One job; Job.n is n."""

    objective_kind: str  # expression | residual
    source: str
    data: tuple[TensorSpec, ...]  # shared by every member
    member_data: tuple[TensorSpec, ...]  # leading dimension B
    x0: np.ndarray  # (B, n), may hold NaN rows (those members end NON_FINITE)
    lower: np.ndarray | None  # (n,) shared or (B, n)
    upper: np.ndarray | None
    method: str  # canonical name, one of BATCH_METHODS
    options: dict
    dtype: str
    device: str
    chunk_size: int = 0  # the caller's; 0: the server's default
    labels: dict[str, str] = field(default_factory=dict)
    report_x_every: int = 0  # batches report counts, never x (kept for the job code)
    method_reason: str = ""  # method "auto": why `method` (Result.method_reason)

    @property
    def n(self) -> int:
        return int(self.x0.shape[1])

    @property
    def members(self) -> int:
        return int(self.x0.shape[0])

    @property
    def quota_dimensions(self) -> int:
        return self.members * self.n

    def run_spec(
        self,
        job_id: str,
        start: int = 0,
        stop: int | None = None,
        *,
        checkpoint: bytes | None = None,
        checkpoint_interval_s: float = 0.0,
    ) -> BatchRunSpec:
        """What a worker needs for members [start, stop): their rows of x0, bounds and
        member data (a byte slice of each tensor: rows are contiguous in C order)."""
        stop = self.members if stop is None else stop
        if not 0 <= start < stop <= self.members:
            raise ValueError(f"members [{start}, {stop}) are not within the batch's {self.members}")
        whole = start == 0 and stop == self.members

        def rows(bound: np.ndarray | None) -> np.ndarray | None:
            if bound is None or bound.ndim == 1 or whole:
                return bound
            return bound[start:stop]

        member_data = self.member_data if whole else tuple(
            _member_rows(spec, self.members, start, stop) for spec in self.member_data
        )
        return BatchRunSpec(
            job_id=job_id,
            kind=self.objective_kind,
            source=self.source,
            data=self.data,
            member_data=member_data,
            x0=self.x0 if whole else self.x0[start:stop],
            lower=rows(self.lower),
            upper=rows(self.upper),
            method=self.method,
            options=self.options,
            dtype=self.dtype,
            device=self.device,
            member_offset=start,
            checkpoint=checkpoint,
            checkpoint_interval_s=checkpoint_interval_s,
        )


def _member_rows(spec: TensorSpec, members: int, start: int, stop: int) -> TensorSpec:
    row_bytes = len(spec.raw) // members
    return TensorSpec(
        name=spec.name,
        shape=(stop - start, *spec.shape[1:]),
        dtype=spec.dtype,
        raw=bytes(memoryview(spec.raw)[start * row_bytes : stop * row_bytes]),
    )


# workers.solvers.Status names -> the wire's SolveStatus (single solves and batch members).
SOLVE_STATUS = {
    "CONVERGED": pb.CONVERGED,
    "MAX_ITERATIONS": pb.MAX_ITERATIONS,
    "MAX_EVALUATIONS": pb.MAX_EVALUATIONS,
    "LINE_SEARCH_FAILED": pb.LINE_SEARCH_FAILED,
    "NON_FINITE": pb.NON_FINITE,
    "CANCELLED": pb.CANCELLED_BY_USER,
    "TIME_LIMIT": pb.TIME_LIMIT,
}
_WIRE_FLOAT = {np.dtype("float64"): pb.FLOAT64, np.dtype("float32"): pb.FLOAT32}
_WIRE_INT = {np.dtype("int64"): pb.INT64, np.dtype("int32"): pb.INT32}


def encode_tensor(array: np.ndarray) -> pb.Tensor:
    """A numpy array as a wire tensor: float32/float64 and int32/int64 keep their type,
    anything else becomes float64."""
    array = np.asarray(array)
    wire = _WIRE_FLOAT.get(array.dtype) or _WIRE_INT.get(array.dtype)
    if wire is None:
        array, wire = array.astype(np.float64), pb.FLOAT64
    return pb.Tensor(
        shape=list(array.shape),
        dtype=wire,
        data=array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes(),
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

    if problem.HasField("batch"):
        return _validate_batch(problem, limits, where, kind, source)

    x0, lower, upper, method, options, solve_dtype, x0_tensor, device = _check_common(
        problem, limits, where, kind
    )

    data = _tensor_specs(objective.data, f"{where}.objective.data")
    key = _checked_key(kind, source, data, x0_tensor, limits)
    if key is None or not _checked_before(key):
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
        if key is not None:
            _remember_checked(key)

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


# Expressions (and residuals) that passed build_objective, so that a caller solving the same
# one again skips its compile and probes (about 1.3 ms of a small solve's 10). Whether an
# expression builds depends only on its source, n, dtype and data (the DSL has no branching on
# values: the probe at x0 finds shape errors, which the meta run already found), so those, with
# the data's bytes compared in full and the limits, are the key. Bounded like the workers'
# objective cache: small data only, least recently used out first.
_CHECKED_MAX_ENTRIES = 256
_CHECKED_MAX_DATA_BYTES = 1 << 20
_checked: OrderedDict[tuple, bool] = OrderedDict()
_checked_lock = threading.Lock()


def _checked_key(kind: str, source: str, data: list[TensorSpec], x0: torch.Tensor,
                 limits: Limits) -> tuple | None:
    if kind not in ("expression", "residual"):
        return None
    if sum(len(spec.raw) for spec in data) > _CHECKED_MAX_DATA_BYTES:
        return None
    return (
        kind, source, x0.numel(), str(x0.dtype), limits.max_dimension,
        limits.max_expression_length,
        tuple((spec.name, tuple(spec.shape), spec.dtype, bytes(spec.raw)) for spec in data),
    )


def _checked_before(key: tuple) -> bool:
    with _checked_lock:
        if key in _checked:
            _checked.move_to_end(key)
            return True
    return False


def _remember_checked(key: tuple) -> None:
    with _checked_lock:
        _checked[key] = True
        while len(_checked) > _CHECKED_MAX_ENTRIES:
            _checked.popitem(last=False)


def _tensor_specs(named_tensors, where: str) -> list[TensorSpec]:
    specs = []
    for index, named in enumerate(named_tensors):
        if named.tensor.dtype not in _WIRE_DTYPES:
            raise ValueError(f"{where}[{index}].tensor.dtype: unknown value {named.tensor.dtype}")
        specs.append(
            TensorSpec(
                name=named.name,
                shape=tuple(named.tensor.shape),
                dtype=_WIRE_DTYPES[named.tensor.dtype],
                raw=named.tensor.data,
            )
        )
    return specs


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


def _solve_dtype(problem: pb.Problem, where: str) -> str:
    if not problem.HasField("x0"):
        raise ValueError(f"{where}.x0: required (the starting point)")
    if problem.dtype not in _SOLVE_DTYPES:
        raise ValueError(f"{where}.dtype: solves run in FLOAT64 or FLOAT32, got {problem.dtype}")
    return _SOLVE_DTYPES[problem.dtype]


def _device(problem: pb.Problem, where: str) -> str:
    device = (problem.device or "cpu").strip().lower()
    if device not in ("cpu", "cuda"):
        raise ValueError(f"{where}.device: 'cpu' or 'cuda', got {problem.device!r}")
    return device


# method "auto" is resolved where the objective is evaluated (workers.solvers._auto: the
# worker, or the gateway's solver pool for callbacks): its probes time evaluations on the
# job's own device. Here it is checked as l-bfgs(-b) would be, which takes whatever any
# method auto may pick takes; a batch's "auto" is resolved here, by the rules alone.
AUTO_METHOD = MethodInfo("auto", bounds=True)


def _method(problem: pb.Problem, where: str, kind: str, bounded: bool):
    if is_auto(problem.method):
        return AUTO_METHOD
    if problem.method:
        try:
            method = canonical_method(problem.method)
        except ValueError as exc:
            raise ValueError(f"{where}.method: {exc}") from None
    else:
        default = "lm" if kind == "residual" else "l-bfgs-b" if bounded else "l-bfgs"
        method = canonical_method(default)
    if method.least_squares and kind != "residual":
        raise ValueError(
            f"{where}.method: {method.name!r} solves least squares; send the objective as"
            " objective.residual (or pick a minimization method)"
        )
    return method


def _check_common(problem: pb.Problem, limits: Limits, where: str, kind: str):
    """x0, dtype, device, bounds, method and options: what every kind of solve shares."""
    solve_dtype = _solve_dtype(problem, where)
    x0 = _vector(problem.x0, f"{where}.x0", solve_dtype, limits)

    device = _device(problem, where)
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

    method = _method(problem, where, kind, lower is not None)
    options = _options(problem.options, f"{where}.options")

    x0_tensor = torch.from_numpy(x0).to(_TORCH[solve_dtype])
    bounds = None
    if lower is not None:
        bounds = (torch.from_numpy(lower), torch.from_numpy(upper))
    solver_method = validation_method(method.name, bounds is not None)
    # Without bounds, what check_problem finds depends on x0 only through its size, dtype and
    # finiteness: a combination seen before needs only the (numpy) finiteness test.
    seen = None if bounds is not None else (
        solver_method, repr(sorted(options.items())), x0.size, solve_dtype)
    if seen is None or not _checked_before(seen) or not bool(np.isfinite(x0).all()):
        try:
            check_problem(solver_method, x0_tensor, bounds, options)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if seen is not None:
            _remember_checked(seen)
    return x0, lower, upper, method, options, solve_dtype, x0_tensor, device


# What one member costs in a result message beyond x and jac: fun, status, 4 counters, with
# the tensor framing; the estimate need not be exact, only never below the truth.
_RESULT_BYTES_PER_MEMBER = 8 + 4 + 4 * 8
_RESULT_OVERHEAD_BYTES = 64 * 1024


def _validate_batch(
    problem: pb.Problem, limits: Limits, where: str, kind: str, source: str
) -> BatchSolveSpec:
    """A vectorized batch (Problem.batch): x0 (B, n), shared and per-member data, shared or
    per-member bounds. NaN in a member's row of x0 is no error: that member ends NON_FINITE."""
    batch = problem.batch
    at = f"{where}.batch"
    if kind not in BATCH_OBJECTIVE_KINDS:
        raise ValueError(
            f"{where}.objective.{kind}: batch solves take objective.expression or"
            " objective.residual"
        )
    if batch.size < 1:
        raise ValueError(f"{at}.size: the number of members B, at least 1; got {batch.size}")
    if batch.size > limits.max_batch_members:
        raise LimitExceeded(
            f"{at}.size: {batch.size:,} members exceed this server's max batch members"
            f" {limits.max_batch_members:,}; split the batch into several jobs"
        )
    solve_dtype = _solve_dtype(problem, where)
    shape = tuple(problem.x0.shape)
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise ValueError(
            f"{where}.x0.shape: a batch's x0 is (B, n), one row per member; got {list(shape)}"
        )
    members, n = int(shape[0]), int(shape[1])
    if members != batch.size:
        raise ValueError(
            f"{where}.x0.shape: {list(shape)} has {members} rows, but {at}.size is"
            f" {batch.size}; they must be equal"
        )
    if members * n > limits.max_dimension:
        raise LimitExceeded(
            f"{where}.x0: {members:,} members x n={n:,} = {members * n:,} elements exceed this"
            f" server's max dimension {limits.max_dimension:,} (a batch counts B * n)"
        )
    result_bytes = 2 * members * n * np.dtype(solve_dtype).itemsize
    result_bytes += members * _RESULT_BYTES_PER_MEMBER + _RESULT_OVERHEAD_BYTES
    if result_bytes > limits.max_message_bytes:
        raise LimitExceeded(
            f"{at}.size: the result of {members:,} members x n={n:,} (x and jac, B x n each)"
            f" is about {result_bytes:,} bytes, more than this server's max message size"
            f" {limits.max_message_bytes:,}; split the batch into several jobs"
        )
    x0 = decode_tensor(problem.x0, f"{where}.x0")
    if x0.dtype == np.bool_:
        raise ValueError(f"{where}.x0.dtype: must be a number type, got bool")
    x0 = x0.astype(_NUMPY[solve_dtype], copy=False)

    device = _device(problem, where)
    if problem.report_x_every != 0:
        raise ValueError(
            f"{where}.report_x_every: batch jobs report counts and quantiles, never x; leave"
            f" it 0 (got {problem.report_x_every})"
        )

    lower = upper = None
    if problem.HasField("bounds"):
        lower, upper = (
            _batch_bound(getattr(problem.bounds, name), f"{where}.bounds.{name}", members, n,
                         solve_dtype)
            for name in ("lower", "upper")
        )
        if lower.shape != upper.shape:  # one shared, one per member: both per member
            lower, upper = (np.ascontiguousarray(np.broadcast_to(b, (members, n)))
                            for b in (lower, upper))

    method = _method(problem, where, kind, lower is not None)
    reason = ""
    if method is AUTO_METHOD:
        choice = choose_batch(Facts(n=n, bounded=lower is not None, batch=members,
                                    residuals=0 if kind == "residual" else None))
        method, reason = canonical_method(choice.method), choice.reason
    if method.name not in BATCH_METHODS:
        raise ValueError(
            f"{where}.method: {method.name!r} has no batch engine; batch solves run"
            f" {', '.join(BATCH_METHODS)}"
        )
    options = _options(problem.options, f"{where}.options")

    if batch.chunk_size < 0:
        raise ValueError(f"{at}.chunk_size: must be >= 0 (0: the server's), got {batch.chunk_size}")
    if batch.chunk_size and -(-members // batch.chunk_size) > limits.max_batch_chunks:
        least = -(-members // limits.max_batch_chunks)
        raise ValueError(
            f"{at}.chunk_size: {batch.chunk_size} members per chunk make"
            f" {-(-members // batch.chunk_size):,} chunks; this server runs at most"
            f" {limits.max_batch_chunks} per job (use chunk_size >= {least})"
        )

    data = _tensor_specs(problem.objective.data, f"{where}.objective.data")
    member_data = _tensor_specs(batch.member_data, f"{at}.member_data")
    for spec in member_data:
        # Before decoding anything: the chunks slice these tensors by their leading dimension.
        if not spec.shape or spec.shape[0] != members:
            leading = spec.shape[0] if spec.shape else "none (a scalar)"
            raise ValueError(
                f"{at}.member_data.{spec.name}: leading dimension {leading}, but {at}.size is"
                f" {members}; tensor {spec.name!r} needs one entry per member (shape"
                f" [{members}, ...]), got {list(spec.shape)}"
            )

    x0_tensor = torch.from_numpy(x0).to(_TORCH[solve_dtype])
    bounds = None
    if lower is not None:
        bounds = (torch.from_numpy(lower), torch.from_numpy(upper))
    try:
        check_batch_problem(method.name, x0_tensor, bounds, options)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None

    objective_limits = ObjectiveLimits(
        max_dimension=limits.max_dimension,
        max_batch_size=limits.max_batch_members,
        expression=ExpressionLimits(max_source_chars=limits.max_expression_length),
    )
    try:
        build_batch_objective(
            kind=kind, source=source, data=data, member_data=member_data, x0=x0_tensor,
            limits=objective_limits,
        )
    except ObjectiveError as exc:
        raise ValueError(f"{where}.{exc}") from None

    return BatchSolveSpec(
        objective_kind=kind,
        source=source,
        data=tuple(data),
        member_data=tuple(member_data),
        x0=x0,
        lower=lower,
        upper=upper,
        method=method.name,
        options=options,
        dtype=solve_dtype,
        device=device,
        chunk_size=int(batch.chunk_size),
        labels=dict(problem.labels),
        method_reason=reason,
    )


def _batch_bound(tensor: pb.Tensor, where: str, members: int, n: int, dtype: str) -> np.ndarray:
    array = decode_tensor(tensor, where, max_elements=members * n)
    if array.shape not in ((n,), (members, n)):
        raise ValueError(
            f"{where}.shape: a batch's bounds are ({n},), shared by every member, or"
            f" ({members}, {n}), one row per member; got {list(array.shape)}"
        )
    if array.dtype == np.bool_:
        raise ValueError(f"{where}.dtype: must be a number type, got bool")
    return array.astype(_NUMPY[dtype], copy=False)


def method_filter(method: str) -> str:
    """A ListJobs method filter in canonical spelling ("L-BFGS" finds l-bfgs jobs)."""
    if not method:
        return ""
    if is_auto(method):
        return "auto"
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
    if problem.HasField("batch"):
        raise ValueError(
            f"{where}.batch: callback mode solves one problem; send a batch with Solve or"
            " Submit and an expression or residual objective"
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
