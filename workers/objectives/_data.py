"""Data tensors from their wire form, and the limits on everything an objective may carry.

A data tensor travels as (name, shape, dtype string, raw little-endian bytes). Building one
costs one copy of its bytes (the wire buffer is read-only and may be foreign-endian); casting
floats to the solve dtype costs another.
"""

from __future__ import annotations

import keyword
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ._errors import ObjectiveError
from ._expression import RESERVED_NAMES, ExpressionLimits

__all__ = ["ACCEPTED_DTYPES", "ObjectiveLimits", "TensorSpec", "tensor_from_bytes"]

# Wire dtype name -> little-endian numpy dtype and the torch dtype it becomes.
ACCEPTED_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "float32": (np.dtype("<f4"), torch.float32),
    "float64": (np.dtype("<f8"), torch.float64),
    "int32": (np.dtype("<i4"), torch.int32),
    "int64": (np.dtype("<i8"), torch.int64),
    "bool": (np.dtype("?"), torch.bool),
}
_MAX_RANK = 8


@dataclass(frozen=True)
class ObjectiveLimits:
    """Caps on what one objective description may carry; the service makes them configurable."""

    max_tensor_bytes: int = 512 * 2**20
    max_total_data_bytes: int = 1024 * 2**20
    max_data_tensors: int = 64
    max_dimension: int = 2**31 - 1
    # Batch solves: members per job, and any tensor of the whole batch's evaluation (checked
    # on meta tensors before the probe allocates it; 2**29 float64 elements are 4 GiB).
    max_batch_size: int = 2**22
    max_batch_intermediate_elements: int = 2**29
    # torch.export archives and pickles (trusted callers only).
    max_blob_bytes: int = 512 * 2**20
    expression: ExpressionLimits = field(default_factory=ExpressionLimits)


@dataclass(frozen=True)
class TensorSpec:
    """A data tensor as it comes over the wire: raw little-endian bytes, C order."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    raw: bytes

    def __repr__(self) -> str:  # never print megabytes of raw bytes into a log line
        return (
            f"TensorSpec(name={self.name!r}, shape={self.shape!r}, dtype={self.dtype!r}, "
            f"raw=<{len(self.raw)} bytes>)"
        )


def check_data_name(name: object) -> str:
    """Return ``name`` if it can name a data tensor in an expression, else raise."""
    if not isinstance(name, str) or not name:
        raise ObjectiveError(
            f"a data tensor name must be a non-empty str, got {name!r}", field="data"
        )
    field_name = f"data.{name}"
    if not (name.isascii() and name.isidentifier()) or keyword.iskeyword(name):
        raise ObjectiveError(
            f"{name!r} is not a valid name: use letters, digits and _ (like A, b, X_train)",
            field=field_name,
        )
    if name.startswith("_"):
        raise ObjectiveError(f"names may not start with _ ({name!r})", field=field_name)
    if name in RESERVED_NAMES:
        raise ObjectiveError(
            f"{name!r} is reserved in expressions (x, n, constants and function names)",
            field=field_name,
        )
    return name


def tensor_from_bytes(
    name: str,
    shape: Sequence[int],
    dtype: str,
    raw: bytes,
    limits: ObjectiveLimits | None = None,
) -> torch.Tensor:
    """Build a CPU tensor from its wire form, checking everything against ``limits``.

    Raises :class:`ObjectiveError` with ``field="data.<name>"`` naming the problem: a bad
    name, an unknown dtype, a bad shape, too many bytes, or ``len(raw)`` not equal to
    ``prod(shape) * itemsize``. Cost: one copy of ``raw``.
    """
    limits = limits or ObjectiveLimits()
    check_data_name(name)
    field_name = f"data.{name}"
    if dtype not in ACCEPTED_DTYPES:
        raise ObjectiveError(
            f"dtype {dtype!r} is not accepted; use one of {', '.join(ACCEPTED_DTYPES)}",
            field=field_name,
        )
    wire_dtype, torch_dtype = ACCEPTED_DTYPES[dtype]
    try:
        dims = tuple(shape)
    except TypeError:
        raise ObjectiveError(
            f"shape must be a sequence of ints, got {shape!r}", field=field_name
        ) from None
    if len(dims) > _MAX_RANK or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims
    ):
        raise ObjectiveError(
            f"shape must be at most {_MAX_RANK} non-negative ints, got {dims!r}", field=field_name
        )
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise ObjectiveError(f"raw must be bytes, got {type(raw).__name__}", field=field_name)
    expected = math.prod(dims) * wire_dtype.itemsize
    if expected > limits.max_tensor_bytes:
        raise ObjectiveError(
            f"shape {dims} of {dtype} is {expected} bytes; the limit per tensor is "
            f"{limits.max_tensor_bytes}",
            field=field_name,
        )
    if len(raw) != expected:
        raise ObjectiveError(
            f"shape {dims} of {dtype} needs {expected} bytes "
            f"({math.prod(dims)} x {wire_dtype.itemsize}), but {len(raw)} came",
            field=field_name,
        )
    array = np.frombuffer(raw, dtype=wire_dtype)
    if dtype == "bool" and array.size and int(np.frombuffer(raw, np.uint8).max()) > 1:
        raise ObjectiveError("bool data must be bytes 0 or 1", field=field_name)
    # astype to the native byte order copies, giving torch a writable buffer it owns.
    native = array.astype(wire_dtype.newbyteorder("="), copy=True).reshape(dims)
    return torch.from_numpy(native)
