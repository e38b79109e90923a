"""Residual expressions from the DSL drive Gauss-Newton and Levenberg-Marquardt to the known
solution (the objective library and the solver engine together)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.objectives import TensorSpec, build_objective
from workers.solvers import least_squares


def _spec(name: str, array: np.ndarray) -> TensorSpec:
    array = np.ascontiguousarray(array, dtype="<f8")
    return TensorSpec(name, tuple(array.shape), "float64", array.tobytes())


@pytest.mark.parametrize("method", ["gauss-newton", "lm"])
def test_linear_residual_reaches_the_least_squares_solution(method):
    rng = np.random.default_rng(7)
    A, b = rng.normal(size=(30, 5)), rng.normal(size=30)
    x0 = torch.zeros(5, dtype=torch.float64)
    objective = build_objective(kind="residual", source="A @ x - b",
                                data=[_spec("A", A), _spec("b", b)], x0=x0)
    result = least_squares(objective.residual, x0, method=method, options={"gtol": 1e-10})
    expected, *_ = np.linalg.lstsq(A, b, rcond=None)
    assert result.success, result.message
    np.testing.assert_allclose(result.x.numpy(), expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", ["gauss-newton", "lm"])
def test_exponential_fit_recovers_its_parameters(method):
    t = np.linspace(0.0, 3.0, 40)
    y = 2.5 * np.exp(-1.3 * t) + 0.4  # exact data: the residual vanishes at the truth
    x0 = torch.tensor([1.0, -0.5, 0.0], dtype=torch.float64)
    objective = build_objective(kind="residual", source="x[0] * exp(x[1] * t) + x[2] - y",
                                data=[_spec("t", t), _spec("y", y)], x0=x0)
    result = least_squares(objective.residual, x0, method=method, options={"gtol": 1e-10})
    assert result.success, result.message
    np.testing.assert_allclose(result.x.numpy(), [2.5, -1.3, 0.4], rtol=1e-7)
    assert result.fun < 1e-16
