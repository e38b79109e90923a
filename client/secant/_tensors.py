"""numpy <-> wire Tensor: shape + dtype + raw little-endian C-order bytes.

Costs: encoding copies the array once (to make it C-contiguous and little-endian); decoding is
zero-copy over the message's bytes (``np.frombuffer``) and returns a read-only view unless
``copy=True``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from secant.v1 import optimizer_pb2 as pb

# Wire dtype -> little-endian numpy dtype. BOOL travels as one byte per element (0 or 1).
_NUMPY_BY_WIRE: dict[int, np.dtype] = {
    pb.FLOAT64: np.dtype("<f8"),
    pb.FLOAT32: np.dtype("<f4"),
    pb.INT64: np.dtype("<i8"),
    pb.INT32: np.dtype("<i4"),
    pb.BOOL: np.dtype("?"),
}
_WIRE_BY_KIND_SIZE: dict[tuple[str, int], int] = {
    ("f", 8): pb.FLOAT64,
    ("f", 4): pb.FLOAT32,
    ("i", 8): pb.INT64,
    ("i", 4): pb.INT32,
    ("b", 1): pb.BOOL,
}
_WIRE_BY_NAME: dict[str, int] = {
    "float64": pb.FLOAT64,
    "double": pb.FLOAT64,
    "f8": pb.FLOAT64,
    "float32": pb.FLOAT32,
    "float": pb.FLOAT32,
    "f4": pb.FLOAT32,
    "int64": pb.INT64,
    "int32": pb.INT32,
    "bool": pb.BOOL,
}


def wire_dtype(dtype: Any) -> int:
    """The wire DType for a numpy dtype, a torch dtype, or a name like "float32".

    Raises ValueError for dtypes the wire cannot carry (complex, float16, uint8, ...).
    """
    if isinstance(dtype, int) and dtype in _NUMPY_BY_WIRE:
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _WIRE_BY_NAME:
            return _WIRE_BY_NAME[key]
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(_WIRE_BY_NAME)}")
    if type(dtype).__module__.startswith("torch"):  # torch.float32 etc., without importing torch
        return wire_dtype(str(dtype))
    try:
        np_dtype = np.dtype(dtype)
    except TypeError as exc:
        raise ValueError(f"unsupported dtype {dtype!r}") from exc
    wire = _WIRE_BY_KIND_SIZE.get((np_dtype.kind, np_dtype.itemsize))
    if wire is None:
        raise ValueError(
            f"unsupported dtype {np_dtype}; the wire carries float64, float32, int64, int32, bool"
        )
    return wire


def numpy_dtype(wire: int) -> np.dtype:
    """The little-endian numpy dtype of a wire DType (UNSPECIFIED means float64)."""
    if wire == pb.DTYPE_UNSPECIFIED:
        return _NUMPY_BY_WIRE[pb.FLOAT64]
    try:
        return _NUMPY_BY_WIRE[wire]
    except KeyError:
        raise ValueError(f"unknown wire dtype {wire}") from None


def to_tensor(value: Any, dtype: Any = None) -> pb.Tensor:
    """Encodes an array-like (numpy, list, scalar, CPU torch tensor) as a wire Tensor.

    ``dtype`` forces a dtype; by default floats keep their width, Python floats and ints
    become float64 and int64, and anything else the wire cannot carry raises ValueError.
    """
    if type(value).__module__.startswith("torch"):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if dtype is not None:
        wire = wire_dtype(dtype)
    elif array.dtype.kind in "iu" and array.dtype.itemsize < 4:
        wire = pb.INT32  # small ints widen losslessly
    elif array.dtype == np.float16:
        wire = pb.FLOAT32
    else:
        wire = wire_dtype(array.dtype)
    # asarray(order="C"), not ascontiguousarray: the latter turns 0-d scalars into shape (1,)
    little = np.asarray(array, dtype=_NUMPY_BY_WIRE[wire], order="C")
    return pb.Tensor(shape=list(little.shape), dtype=wire, data=little.tobytes())


def from_tensor(tensor: pb.Tensor, copy: bool = False) -> np.ndarray:
    """Decodes a wire Tensor into a numpy array in native byte order.

    Raises ValueError when the byte length does not match shape and dtype, or when the shape
    has a negative dimension.
    """
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"tensor shape {list(shape)} has a negative dimension")
    dtype = numpy_dtype(tensor.dtype)
    expected = math.prod(shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise ValueError(
            f"tensor of shape {list(shape)} and dtype {dtype.name} needs {expected} bytes, "
            f"got {len(tensor.data)}"
        )
    array = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    if dtype.byteorder == ">" or (dtype.byteorder == "<" and not _native_is_little()):
        array = array.astype(dtype.newbyteorder("="))
    elif copy:
        array = array.copy()
    return array


def _native_is_little() -> bool:
    import sys

    return sys.byteorder == "little"


def is_empty(tensor: pb.Tensor) -> bool:
    """True for an unset Tensor field (no shape and no bytes)."""
    return len(tensor.shape) == 0 and len(tensor.data) == 0
