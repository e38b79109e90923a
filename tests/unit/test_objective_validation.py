"""build_objective turns wire-level descriptions into objectives or actionable errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.objectives import (
    ExpressionError,
    ObjectiveError,
    ObjectiveLimits,
    TensorSpec,
    build_objective,
    tensor_from_bytes,
)

X0 = torch.ones(3, dtype=torch.float64)


def spec(name: str, tensor: torch.Tensor) -> TensorSpec:
    dtype = str(tensor.dtype).removeprefix("torch.")
    return TensorSpec(name, tuple(tensor.shape), dtype, tensor.contiguous().numpy().tobytes())


def expression(source: str, data=(), x0=X0, kind: str = "expression", **kwargs):
    return build_objective(kind=kind, source=source, data=data, x0=x0, **kwargs)


# -- tensor_from_bytes --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64", "bool"])
def test_tensor_round_trips_from_little_endian_bytes(dtype):
    array = (np.arange(6) % 2).astype(np.dtype(dtype).newbyteorder("<")).reshape(2, 3)

    tensor = tensor_from_bytes("M", (2, 3), dtype, array.tobytes())

    assert tensor.shape == (2, 3) and str(tensor.dtype) == f"torch.{dtype}"
    np.testing.assert_array_equal(tensor.numpy(), array)
    tensor += 1 if dtype != "bool" else True  # writable: it owns its memory


def test_byte_count_mismatch_names_the_tensor_and_both_sizes():
    with pytest.raises(ObjectiveError) as caught:
        tensor_from_bytes("A", (2, 3), "float64", b"\0" * 40)

    assert caught.value.field == "data.A"
    assert "48 bytes" in str(caught.value) and "40 came" in str(caught.value)


@pytest.mark.parametrize(
    ("name", "shape", "dtype", "match"),
    [
        ("A", (3,), "complex64", "not accepted"),
        ("A", (3,), "float16", "not accepted"),
        ("A", (-1,), "float64", "non-negative"),
        ("A", (3.0,), "float64", "non-negative"),
        ("A", (1,) * 9, "float64", "at most 8"),
        ("x", (3,), "float64", "reserved"),
        ("n", (3,), "float64", "reserved"),
        ("sum", (3,), "float64", "reserved"),
        ("__class__", (3,), "float64", "start with _"),
        ("a.b", (3,), "float64", "not a valid name"),
        ("lambda", (3,), "float64", "not a valid name"),
        ("", (3,), "float64", "non-empty"),
    ],
)
def test_bad_tensor_descriptions_are_rejected_with_a_reason(name, shape, dtype, match):
    with pytest.raises(ObjectiveError, match=match):
        tensor_from_bytes(name, shape, dtype, b"\0" * 24)


def test_tensor_over_the_per_tensor_limit_is_rejected_before_reading():
    limits = ObjectiveLimits(max_tensor_bytes=1_000)

    with pytest.raises(ObjectiveError, match="limit per tensor"):
        tensor_from_bytes("A", (1_000,), "float64", b"", limits)


def test_bool_bytes_other_than_0_and_1_are_rejected():
    with pytest.raises(ObjectiveError, match="0 or 1"):
        tensor_from_bytes("mask", (2,), "bool", b"\x01\x02")


# -- build_objective ----------------------------------------------------------------------


def test_shape_mismatch_is_reported_with_the_expression_and_shapes():
    A = torch.ones(2, 4, dtype=torch.float64)

    with pytest.raises(ExpressionError) as caught:
        expression("sum((A @ x) ** 2)", data=[spec("A", A)])

    message = str(caught.value)
    assert caught.value.field == "objective.source"
    assert "`A @ x`" in message and "(2, 4)" in message and "(3,)" in message
    assert "Traceback" not in message


def test_unknown_data_name_lists_the_available_names():
    with pytest.raises(ExpressionError, match=r"unknown name `B`.*A, b"):
        expression(
            "sum(B @ x)",
            data=[spec("A", torch.ones(2, 3, dtype=torch.float64)), spec("b", torch.ones(2))],
        )


def test_non_scalar_expression_is_rejected_with_its_shape():
    with pytest.raises(ExpressionError, match=r"scalar.*\(3,\)"):
        expression("x ** 2")


@pytest.mark.parametrize("source", ["sum(x)", "sum(x) * ones(2, 2)"])
def test_residual_must_be_a_vector(source):
    with pytest.raises(ExpressionError, match="1-D"):
        expression(source, kind="residual")


def test_unknown_kind_names_the_field_and_the_choices():
    with pytest.raises(ObjectiveError) as caught:
        build_objective(kind="python", source="sum(x)", x0=X0)

    assert caught.value.field == "objective.kind"
    assert "expression" in str(caught.value) and "torch_export" in str(caught.value)


@pytest.mark.parametrize(
    ("x0", "match"),
    [
        ([1.0, 2.0], "tensor"),
        (torch.ones(2, 2), "1-D"),
        (torch.ones(0), "non-empty"),
        (torch.ones(3, dtype=torch.int64), "float32 or float64"),
        (torch.tensor([1.0, float("nan")]), "nan"),
    ],
)
def test_bad_x0_is_rejected(x0, match):
    with pytest.raises(ObjectiveError, match=match) as caught:
        build_objective(kind="expression", source="sum(x)", x0=x0)

    assert caught.value.field == "x0"


def test_dimension_over_the_limit_is_rejected():
    with pytest.raises(ObjectiveError, match="dimension"):
        expression("sum(x)", limits=ObjectiveLimits(max_dimension=2))


def test_expression_with_a_blob_and_code_with_a_source_are_rejected():
    with pytest.raises(ObjectiveError) as with_blob:
        build_objective(kind="expression", source="sum(x)", blob=b"\x80", x0=X0)
    with pytest.raises(ObjectiveError) as with_source:
        build_objective(kind="torch_export", source="sum(x)", blob=b"\x80", x0=X0, trusted=True)

    assert with_blob.value.field == "objective.blob"
    assert with_source.value.field == "objective.source"


def test_duplicate_data_names_are_rejected():
    a = spec("A", torch.ones(3, dtype=torch.float64))

    with pytest.raises(ObjectiveError, match="twice") as caught:
        expression("sum(A * x)", data=[a, a])

    assert caught.value.field == "data.A"


def test_total_data_over_the_limit_is_rejected():
    data = [spec(f"D{i}", torch.ones(100, dtype=torch.float64)) for i in range(3)]

    with pytest.raises(ObjectiveError, match="total") as caught:
        expression("sum(x)", data=data, limits=ObjectiveLimits(max_total_data_bytes=2_000))

    assert caught.value.field == "data"


def test_integer_data_in_matmul_is_reported_as_a_dtype_problem():
    with pytest.raises(ExpressionError, match="int64"):
        expression("sum(K @ x)", data=[spec("K", torch.ones(2, 3, dtype=torch.int64))])


def test_objective_evaluates_on_x0_before_returning_and_keeps_its_source():
    objective = expression("sum((x - 2) ** 2)")

    assert objective.kind == "expression" and objective.source == "sum((x - 2) ** 2)"
    assert objective.dimension == 3 and objective.dtype == torch.float64
    torch.testing.assert_close(objective.fun(X0), torch.tensor(3.0, dtype=torch.float64))


def test_float32_x0_compiles_a_float32_objective():
    A = torch.ones(2, 3, dtype=torch.float64)

    objective = expression("sum(A @ x)", data=[spec("A", A)], x0=X0.float())

    assert objective.fun(X0.float()).dtype == torch.float32
    assert objective.data["A"].dtype == torch.float32
