"""Batched objectives: one expression solved for B same-shape members at once;
``fun(X, index)`` maps the compiled expression over the rows of X with torch.func.vmap."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ._data import ObjectiveLimits, TensorSpec
from ._errors import ExpressionError, ObjectiveError
from ._expression import CompiledExpression, compile_expression
from ._objective import OBJECTIVE_KINDS, _build_data, _rebind_data

__all__ = ["BATCH_OBJECTIVE_KINDS", "BatchObjective", "build_batch_objective"]

BatchKind = Literal["expression", "residual"]
BATCH_OBJECTIVE_KINDS: tuple[str, ...] = ("expression", "residual")
_SOLVE_DTYPES = (torch.float32, torch.float64)
_MEMBER_FIELD = "batch.member_data"

BatchFunction = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class BatchObjective:
    """A checked batched objective, ready for the batch engine.

    ``fun(X, index)`` takes ``X`` of shape (k, n) and ``index`` (k,) int64, the member ids
    (rows of the member data) of those rows, and returns the k objective values. For
    residual objectives ``residual(X, index)`` is (k, m) and ``fun = 0.5 * sum(r**2, 1)``.
    Members are independent, so the gradient of every member comes from one backward pass
    of ``fun(X, index).sum()``; double backward (Hessian-vector products) and torch.func
    transforms over ``X`` work too. A member whose value is NaN or inf harms no other.

    The member data gathered for ``index`` is cached under the identity of the ``index``
    tensor (one entry): pass the same tensor object while the working set is unchanged.
    """

    kind: BatchKind
    fun: BatchFunction
    residual: BatchFunction | None
    batch_size: int
    dimension: int
    dtype: torch.dtype
    device: torch.device
    source: str = ""
    data: Mapping[str, Tensor] = field(default_factory=dict, repr=False)
    member_data: Mapping[str, Tensor] = field(default_factory=dict, repr=False)
    program: CompiledExpression | None = field(default=None, repr=False)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> BatchObjective:
        """The same objective with its data on ``device`` and floats in ``dtype``.

        Costs one copy of the data tensors (none if nothing changes); the expression is
        re-bound, not recompiled, and the gather cache starts empty.
        """
        device = torch.device(device) if device is not None else self.device
        dtype = dtype if dtype is not None else self.dtype
        if dtype not in _SOLVE_DTYPES:
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        if self.program is None:
            raise ValueError("this BatchObjective has no compiled program to re-bind")
        shared = _rebind_data(self.data, device, dtype)
        member = _rebind_data(self.member_data, device, dtype)
        fun, residual = _bind_batch(self.program, self.kind, shared, member, self.batch_size)
        return replace(
            self,
            fun=fun,
            residual=residual,
            data=shared,
            member_data=member,
            dtype=dtype,
            device=device,
        )


class _GatherCache:
    """The member data gathered for the last ``index`` tensor seen (one entry).

    The entry holds a strong reference to that tensor, so its identity cannot be reused by
    another object while cached. Reads and the write are single tuple operations: threads
    sharing an objective at worst gather twice, never see a torn entry.
    """

    def __init__(self, member: tuple[Tensor, ...], batch_size: int) -> None:
        self.member = member
        self.batch_size = batch_size
        self._entry: tuple[Tensor, tuple[Tensor, ...]] | None = None

    def get(self, index: Tensor) -> tuple[Tensor, ...]:
        if not self.member:
            return ()
        if _is_transformed(index):  # inside a torch.func transform: no caching, no checks
            return tuple(t[index] for t in self.member)
        entry = self._entry
        if entry is not None and entry[0] is index:
            return entry[1]
        gathered = self._gather(index)
        self._entry = (index, gathered)
        return gathered

    def _gather(self, index: Tensor) -> tuple[Tensor, ...]:
        device = self.member[0].device
        if index.dim() != 1:
            raise ValueError(
                f"index must be a 1-D tensor of member ids, got shape {tuple(index.shape)}"
            )
        if index.is_meta:  # the shape check: nothing to compare, nothing to copy
            return tuple(t.index_select(0, index) for t in self.member)
        if index.numel() == self.batch_size:
            identity = torch.arange(self.batch_size, device=index.device, dtype=index.dtype)
            if bool(torch.equal(index, identity)):
                return self.member  # every member, in order: no copy
        ids = index.to(device=device, dtype=torch.int64)
        return tuple(t.index_select(0, ids) for t in self.member)


def _is_transformed(tensor: Tensor) -> bool:
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check(tensor)) if check is not None else False


def _bind_batch(
    program: CompiledExpression,
    kind: str,
    shared: Mapping[str, Tensor],
    member: Mapping[str, Tensor],
    batch_size: int,
) -> tuple[BatchFunction, BatchFunction | None]:
    """``fun(X, index)`` (and ``residual``) over the program's data slots.

    Slots the program uses are split into per-member ones (mapped over their leading
    dimension) and shared ones (passed whole to every member).
    """
    names = program.data_names
    member_names = tuple(name for name in names if name in member)
    cache = _GatherCache(tuple(member[name] for name in member_names), batch_size)
    # slot i of the program: ("m", j) -> j-th gathered member tensor, ("s", t) -> shared t
    layout = tuple(
        ("m", member_names.index(name)) if name in member else ("s", shared[name]) for name in names
    )
    slot_dims = tuple(0 if where == "m" else None for where, _ in layout)
    run = program._run
    mapped = torch.func.vmap(run, in_dims=(0, slot_dims))

    def values(X: Tensor, index: Tensor) -> Tensor:
        gathered = cache.get(index)
        slots = tuple(gathered[ref] if where == "m" else ref for where, ref in layout)  # type: ignore[index]
        return mapped(X, slots)

    if kind == "residual":

        def fun(X: Tensor, index: Tensor) -> Tensor:
            r = values(X, index)
            return 0.5 * torch.sum(r * r, dim=1)

        return fun, values
    return values, None


class _BatchSizeGuard(TorchDispatchMode):
    """Refuses any op output of the whole batch larger than a cap (meta tensors only)."""

    def __init__(self, max_elements: int, batch_size: int) -> None:
        super().__init__()
        self.max_elements = max_elements
        self.batch_size = batch_size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        result = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(result):
            if isinstance(leaf, Tensor) and leaf.numel() > self.max_elements:
                raise ValueError(
                    f"for all {self.batch_size} members at once this is "
                    f"{leaf.numel()} elements (shape {tuple(leaf.shape)}); the limit is "
                    f"{self.max_elements} (ObjectiveLimits.max_batch_intermediate_elements): "
                    "send fewer members per job"
                )
        return result


def _check_batch_x0(x0: object, limits: ObjectiveLimits) -> Tensor:
    # Non-finite entries are allowed: those members end NON_FINITE, the others are solved.
    if not isinstance(x0, Tensor):
        raise ObjectiveError(f"expected a tensor, got {type(x0).__name__}", field="x0")
    if x0.dim() != 2 or x0.shape[0] == 0 or x0.shape[1] == 0:
        raise ObjectiveError(
            f"a batch's x0 must be a non-empty 2-D array (B members x n), got shape "
            f"{tuple(x0.shape)}",
            field="x0",
        )
    if x0.dtype not in _SOLVE_DTYPES:
        raise ObjectiveError(f"x0 must be float32 or float64, got {x0.dtype}", field="x0")
    size, dimension = x0.shape
    if size > limits.max_batch_size:
        raise ObjectiveError(
            f"the batch has {size} members; the limit is {limits.max_batch_size} "
            "(split it into several jobs)",
            field="x0",
        )
    if dimension > limits.max_dimension:
        raise ObjectiveError(
            f"dimension {dimension} exceeds the limit of {limits.max_dimension}", field="x0"
        )
    return x0


def _decode_all(
    shared_specs: Sequence[TensorSpec],
    member_specs: Sequence[TensorSpec],
    limits: ObjectiveLimits,
    x0: Tensor,
) -> tuple[Mapping[str, Tensor], Mapping[str, Tensor]]:
    """(shared, member) tensors; the count and byte limits hold for both kinds together."""
    shared_names = {getattr(spec, "name", None) for spec in shared_specs}
    member_names: set[object] = set()
    for spec in member_specs:
        name = getattr(spec, "name", None)
        if name in shared_names:
            raise ObjectiveError(
                f"{name!r} is sent both as shared data and as per-member data; send it once "
                "(per-member if each member has its own)",
                field=f"{_MEMBER_FIELD}.{name}",
            )
        if name in member_names:
            raise ObjectiveError(
                f"the name {name!r} is sent twice", field=f"{_MEMBER_FIELD}.{name}"
            )
        member_names.add(name)
    try:
        tensors = _build_data([*shared_specs, *member_specs], limits, x0)
    except ObjectiveError as exc:
        name = exc.field.removeprefix("data.")
        if exc.field.startswith("data.") and name in member_names:
            raise ObjectiveError(exc.args[0], field=f"{_MEMBER_FIELD}.{name}") from None
        raise
    shared = MappingProxyType({k: v for k, v in tensors.items() if k not in member_names})
    member = MappingProxyType({k: v for k, v in tensors.items() if k in member_names})
    size, dimension = x0.shape
    for name, tensor in member.items():
        if tensor.dim() == 0:
            raise ObjectiveError(
                f"per-member data {name!r} is a scalar; it needs a leading dimension of "
                f"{size} (one entry per member)",
                field=f"{_MEMBER_FIELD}.{name}",
            )
        if tensor.shape[0] != size:
            raise ObjectiveError(
                f"per-member data {name!r} has shape {tuple(tensor.shape)}: its leading "
                f"dimension is {tensor.shape[0]}, but the batch has {size} members (x0 is "
                f"{size} x {dimension}); member i uses {name}[i]",
                field=f"{_MEMBER_FIELD}.{name}",
            )
    return shared, member


def build_batch_objective(
    *,
    kind: str,
    source: str,
    data: Sequence[TensorSpec] = (),
    member_data: Sequence[TensorSpec] = (),
    x0: Tensor,
    limits: ObjectiveLimits | None = None,
) -> BatchObjective:
    """Check a batch's objective description and turn it into a :class:`BatchObjective`.

    ``kind`` is ``"expression"`` (``source`` gives each member's scalar) or ``"residual"``
    (each member's 1-D vector r; its objective is 0.5*||r||^2). ``x0`` is (B, n); ``data``
    is shared by every member; each ``member_data`` tensor has a leading dimension B and
    member i sees ``tensor[i]`` under the tensor's name. The expression is written for one
    member, exactly as for a single solve. It is compiled against the dtype and device of
    ``x0`` and evaluated once for every member at its row of ``x0``; rows that contain NaN
    or inf, or whose value is not finite, are not an error (those members end NON_FINITE).

    Cost: decoding the data (one copy), compiling (linear in the source), two meta-tensor
    runs (one member, then the whole batch: shape errors and oversized intermediates, no
    compute) and one real evaluation of every member. Evaluating ``fun`` costs the
    expression's torch ops over k members, plus one gather of the member data per new
    ``index`` tensor object (none for 0..B-1 in order).

    Raises ObjectiveError (with ``.field``): trusted-code kinds, x0 not (B, n), member data
    whose leading dimension is not B, a name both shared and per-member, and everything
    :func:`build_objective` refuses in an expression or its data.
    """
    limits = limits or ObjectiveLimits()
    if kind not in OBJECTIVE_KINDS:
        raise ObjectiveError(
            f"unknown kind {kind!r}; expected one of {', '.join(OBJECTIVE_KINDS)}",
            field="objective.kind",
        )
    if kind not in BATCH_OBJECTIVE_KINDS:
        raise ObjectiveError(
            "batch solves take expression or residual objectives", field="objective"
        )
    x0 = _check_batch_x0(x0, limits)
    size, dimension = (int(d) for d in x0.shape)
    shared, member = _decode_all(data, member_data, limits, x0)
    program = compile_expression(
        source,
        dimension=dimension,
        data_names=(*shared, *member),
        result="vector" if kind == "residual" else "scalar",
        limits=limits.expression,
    )
    # One member's shapes: the same messages as a single solve gives.
    program.check_shapes(x0[0], {**shared, **{k: v[0] for k, v in member.items()}})
    try:
        _check_batch_shapes(program, kind, x0, shared, member, limits)
    except ObjectiveError:
        raise
    except Exception as exc:  # vmap refusing the program outside any one op
        raise ExpressionError(
            f"the expression cannot be evaluated for a batch: {type(exc).__name__}: {exc}"
        ) from exc
    fun, residual = _bind_batch(program, kind, shared, member, size)
    _probe(residual if residual is not None else fun, kind, x0)
    return BatchObjective(
        kind=kind,  # type: ignore[arg-type]
        fun=fun,
        residual=residual,
        batch_size=size,
        dimension=dimension,
        dtype=x0.dtype,
        device=x0.device,
        source=source,
        data=shared,
        member_data=member,
        program=program,
    )


def _meta(tensor: Tensor) -> Tensor:
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")


def _check_batch_shapes(
    program: CompiledExpression,
    kind: str,
    x0: Tensor,
    shared: Mapping[str, Tensor],
    member: Mapping[str, Tensor],
    limits: ObjectiveLimits,
) -> None:
    """The whole batch on meta tensors: vmap works and no intermediate is too large."""
    size = int(x0.shape[0])
    meta_shared = {k: _meta(v) for k, v in shared.items()}
    meta_member = {k: _meta(v) for k, v in member.items()}
    fun, residual = _bind_batch(program, kind, meta_shared, meta_member, size)
    index = torch.arange(size, device="meta")
    with _BatchSizeGuard(limits.max_batch_intermediate_elements, size):
        (residual or fun)(_meta(x0), index)


def _probe(fun: BatchFunction, kind: str, x0: Tensor) -> None:
    """Evaluate every member once at x0, so a broken objective fails here, not in a solve."""
    size = int(x0.shape[0])
    index = torch.arange(size, device=x0.device)
    try:
        with torch.no_grad():
            value = fun(x0, index)
    except ObjectiveError:
        raise
    except Exception as exc:  # vmap refusing an op, say: the caller's expression cannot batch
        raise ExpressionError(
            f"evaluating the batch at x0 failed: {type(exc).__name__}: {exc}"
        ) from exc
    rank = 2 if kind == "residual" else 1
    if not isinstance(value, Tensor) or value.dim() != rank or value.shape[0] != size:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ExpressionError(f"the batch evaluates to {shape}, expected {size} members' values")
    if not value.dtype.is_floating_point:
        raise ExpressionError(f"the batch evaluates to {value.dtype}; it must be floating point")
    if kind == "residual" and value.shape[1] == 0:
        raise ExpressionError("the residual is empty at x0")
