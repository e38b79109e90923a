"""The validation layer and the error mapping, without a server: every refusal names its field
and maps to the status code a caller can act on."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2

from secant.v1 import optimizer_pb2 as pb
from service.errors import JobNotFound, LimitExceeded, status_for
from service.validation import Limits, validate_problem
from workers.objectives import ObjectiveError, UntrustedCodeError

ROSENBROCK = "sum(100 * (x[1:] - x[:-1]**2)**2 + (1 - x[:-1])**2)"


def problem(x0=(-1.2, 1.0), *, expression=ROSENBROCK, options=None, **fields) -> pb.Problem:
    array = np.asarray(x0, dtype=np.float64)
    struct = struct_pb2.Struct()
    struct.update(options or {})
    return pb.Problem(
        objective=pb.Objective(expression=expression),
        x0=pb.Tensor(shape=list(array.shape), dtype=pb.FLOAT64, data=array.tobytes()),
        options=struct,
        **fields,
    )


def test_a_good_problem_becomes_a_spec_with_the_canonical_method():
    spec = validate_problem(problem(method="L-BFGS-B"), Limits(), trusted=False)

    assert spec.method == "l-bfgs-b"
    assert spec.n == 2 and spec.dtype == "float64" and spec.device == "cpu"
    np.testing.assert_array_equal(spec.x0, [-1.2, 1.0])


@pytest.mark.parametrize(
    ("objective", "bounds", "expected"),
    [("expression", False, "l-bfgs"), ("expression", True, "l-bfgs-b"), ("residual", False, "lm")],
)
def test_the_default_method_suits_the_problem(objective, bounds, expected):
    p = problem()
    if objective == "residual":
        p.objective.residual = "x - 1"
    if bounds:
        p.bounds.lower.CopyFrom(p.x0)
        p.bounds.upper.CopyFrom(p.x0)
    assert validate_problem(p, Limits(), trusted=False).method == expected


def test_float32_solves_keep_float32_vectors():
    spec = validate_problem(problem(dtype=pb.FLOAT32), Limits(), trusted=False)
    assert spec.dtype == "float32" and spec.x0.dtype == np.float32


def test_bounds_of_another_shape_name_the_bound():
    p = problem(method="l-bfgs-b")
    p.bounds.lower.CopyFrom(p.x0)
    p.bounds.upper.CopyFrom(problem(x0=(1.0, 2.0, 3.0)).x0)
    with pytest.raises(ValueError, match=r"problem\.bounds\.upper"):
        validate_problem(p, Limits(), trusted=False)


def test_nan_option_names_the_option():
    with pytest.raises(ValueError, match=r"problem\.options\.gtol"):
        validate_problem(problem(options={"gtol": math.nan}), Limits(), trusted=False)


def test_the_dimension_limit_is_a_limit_not_a_bad_argument():
    with pytest.raises(LimitExceeded, match=r"problem\.x0"):
        validate_problem(problem(x0=np.zeros(11)), Limits(max_dimension=10), trusted=False)


def test_an_expression_shape_error_surfaces_at_validation():
    with pytest.raises(ValueError, match=r"problem\.objective"):
        validate_problem(problem(expression="x @ x[:1]"), Limits(), trusted=False)


def test_where_prefixes_every_message():
    with pytest.raises(ValueError, match=r"^problems\[7\]\.method"):
        validate_problem(problem(method="nope"), Limits(), trusted=False, where="problems[7]")


def test_trusted_code_needs_a_trusting_server():
    p = problem()
    p.objective.torch_export = b"PK..."
    with pytest.raises(PermissionError, match="--trust-code"):
        validate_problem(p, Limits(), trusted=False)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ValueError("x0: bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (ObjectiveError("bad", field="objective.source"), grpc.StatusCode.INVALID_ARGUMENT),
        (PermissionError("no"), grpc.StatusCode.PERMISSION_DENIED),
        (UntrustedCodeError("no"), grpc.StatusCode.PERMISSION_DENIED),
        (LimitExceeded("too big"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (JobNotFound("j1"), grpc.StatusCode.NOT_FOUND),
        (RuntimeError("secret internals"), grpc.StatusCode.INTERNAL),
    ],
)
def test_domain_errors_map_to_one_status_each(error, code):
    mapped, message = status_for(error)
    assert mapped == code
    if code is grpc.StatusCode.INTERNAL:
        assert "secret" not in message  # never leak internals
    else:
        assert message == str(error)
