"""The SDK's numpy <-> wire Tensor codec: round trips, byte order, shapes, and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from secant import from_tensor, to_tensor
from secant.v1 import optimizer_pb2 as pb

ROUND_TRIP_DTYPES = [np.float64, np.float32, np.int64, np.int32, np.bool_]


@pytest.mark.parametrize("dtype", ROUND_TRIP_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (5,), (2, 3), (2, 0, 4), (3, 1, 2)])
def test_round_trip_keeps_values_dtype_and_shape(dtype, shape):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal(shape) * 100).astype(dtype)

    decoded = from_tensor(to_tensor(array))

    assert decoded.dtype == np.dtype(dtype)
    assert decoded.shape == shape
    np.testing.assert_array_equal(decoded, array)


def test_wire_bytes_are_little_endian_c_order():
    array = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=">f8").T  # big-endian, Fortran-ordered view

    tensor = to_tensor(array)

    assert tensor.dtype == pb.FLOAT64
    assert list(tensor.shape) == [2, 2]
    assert tensor.data == np.array([[1.0, 3.0], [2.0, 4.0]], dtype="<f8").tobytes()


def test_decodes_bytes_written_by_another_language():
    # what a little-endian client in any language sends for int32 [1, -2, 3]
    tensor = pb.Tensor(
        shape=[3], dtype=pb.INT32, data=b"\x01\x00\x00\x00\xfe\xff\xff\xff\x03\x00\x00\x00"
    )

    np.testing.assert_array_equal(from_tensor(tensor), [1, -2, 3])


def test_unspecified_dtype_means_float64():
    tensor = pb.Tensor(shape=[2], data=np.array([1.5, -2.0], "<f8").tobytes())

    decoded = from_tensor(tensor)

    assert decoded.dtype == np.float64
    np.testing.assert_array_equal(decoded, [1.5, -2.0])


def test_decoding_is_a_read_only_view_unless_copied():
    tensor = to_tensor(np.arange(3.0))

    view = from_tensor(tensor)
    copy = from_tensor(tensor, copy=True)
    copy[0] = 42.0

    assert not view.flags.writeable
    assert view[0] == 0.0


def test_python_lists_and_scalars_encode_as_float64_and_int64():
    assert to_tensor([1.0, 2.0]).dtype == pb.FLOAT64
    assert to_tensor([1, 2]).dtype == pb.INT64
    assert to_tensor(3.0).dtype == pb.FLOAT64 and list(to_tensor(3.0).shape) == []


def test_forced_dtype_converts():
    tensor = to_tensor([1, 2, 3], dtype="float32")

    assert tensor.dtype == pb.FLOAT32
    assert len(tensor.data) == 12


def test_small_ints_and_half_floats_widen():
    assert to_tensor(np.array([1, 2], dtype=np.int8)).dtype == pb.INT32
    assert to_tensor(np.array([1, 2], dtype=np.float16)).dtype == pb.FLOAT32


@pytest.mark.parametrize("dtype", [np.complex128, np.uint64, "U3", object])
def test_dtypes_the_wire_cannot_carry_raise(dtype):
    with pytest.raises(ValueError, match="unsupported dtype"):
        to_tensor(np.zeros(2, dtype=dtype))


@pytest.mark.parametrize(
    ("shape", "dtype", "nbytes"),
    [
        ([3], pb.FLOAT64, 23),
        ([3], pb.FLOAT64, 25),
        ([2, 2], pb.FLOAT32, 8),
        ([0], pb.INT64, 8),
        ([], pb.FLOAT64, 0),
        ([4], pb.BOOL, 3),
    ],
)
def test_byte_length_that_does_not_match_shape_and_dtype_raises(shape, dtype, nbytes):
    tensor = pb.Tensor(shape=shape, dtype=dtype, data=b"\x00" * nbytes)

    with pytest.raises(ValueError, match="needs .* bytes"):
        from_tensor(tensor)


def test_negative_dimension_raises():
    with pytest.raises(ValueError, match="negative dimension"):
        from_tensor(pb.Tensor(shape=[-1], dtype=pb.FLOAT64, data=b""))


def test_unknown_wire_dtype_raises():
    with pytest.raises(ValueError, match="unknown wire dtype"):
        from_tensor(pb.Tensor(shape=[1], dtype=99, data=b"\x00" * 8))
