"""The expression DSL on numpy (workers.objectives._numpy_expression) gives torch autograd's
f and gradient, covers what it says it covers, and keeps torch for the rest."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_expression import CASES, build, make_data, make_x

from workers.objectives import _numpy_expression
from workers.objectives._numpy_expression import compile_numpy

# What the numpy reading leaves to torch (Objective.numpy_program gives None for them).
NOT_COVERED = {
    "prod(x)",
    "prod(x[:3], 0)",
    "norm(x - c, 3)",
    "sum(clamp(x, max=c) * x)",
    "sum(clamp(x, min=c, max=2) ** 2)",
    "sum(maximum(x ** 2, c))",
}


def _torch_value_and_grad(objective, x: torch.Tensor):
    xg = x.detach().clone().requires_grad_(True)
    value = objective.fun(xg)
    (gradient,) = torch.autograd.grad(value, xg)
    return float(value.detach()), gradient.numpy()


@pytest.mark.parametrize(("source", "reference"), CASES, ids=[c[0] for c in CASES])
def test_value_and_gradient_match_torch_autograd(source, reference):
    objective = build(source, make_data(), make_x())
    program = objective.numpy_program(make_x())
    if source in NOT_COVERED:
        assert program is None
        return
    assert program is not None, "this expression should run on numpy"
    for seed in range(4):
        x = make_x(seed=20 + seed)
        f, g = program.value_and_grad(x.numpy().copy())
        f_ref, g_ref = _torch_value_and_grad(objective, x)
        assert abs(float(f) - f_ref) <= 1e-12 * max(1.0, abs(f_ref))
        np.testing.assert_allclose(g, g_ref, rtol=1e-12, atol=1e-12)
        assert g.dtype == np.float64 and g.shape == (5,) and g.flags.writeable
        assert float(program.value(x.numpy().copy())) == float(f)


def test_residuals_give_half_the_sum_of_squares_and_its_gradient():
    data = make_data()
    objective = build("A @ x - b", data, make_x(), kind="residual")
    program = objective.numpy_program(make_x())
    assert program is not None
    x = make_x(seed=5)
    f, g = program.value_and_grad(x.numpy().copy())
    f_ref, g_ref = _torch_value_and_grad(objective, x)
    assert abs(float(f) - f_ref) <= 1e-12 * max(1.0, abs(f_ref))
    np.testing.assert_allclose(g, g_ref, rtol=1e-12, atol=1e-12)


def test_non_finite_values_come_out_where_torchs_do():
    objective = build("sum(log(x)) + sum(sqrt(x))", {}, make_x())
    program = objective.numpy_program(make_x())
    x = torch.tensor([0.5, -1.0, 0.0, 2.0, 1.0], dtype=torch.float64)
    f, g = program.value_and_grad(x.numpy().copy())
    f_ref, g_ref = _torch_value_and_grad(objective, x)
    assert np.isnan(f) and np.isnan(f_ref)
    np.testing.assert_array_equal(np.isnan(g), np.isnan(g_ref))
    np.testing.assert_array_equal(np.isinf(g), np.isinf(g_ref))


def test_integer_data_and_float32_stay_on_torch():
    x0 = make_x()
    idx = {"k": torch.arange(5, dtype=torch.int64)}
    assert build("sum(k * x ** 2)", idx, x0).numpy_program(x0) is None
    x32 = x0.float()
    assert build("sum(x ** 2)", {}, x32).numpy_program(x32) is None
    assert compile_numpy("sum(x)", dimension=5, data={"k": np.arange(5)}) is None


def test_a_program_that_disagrees_with_torch_at_x0_is_not_used(monkeypatch):
    """The check at build time: a wrong derivative (simulated here) keeps torch."""
    forward, _ = _numpy_expression._ELEMENTWISE["exp"]
    monkeypatch.setitem(_numpy_expression._ELEMENTWISE, "exp",
                        (forward, lambda g, t, out: 2.0 * g * out))
    objective = build("sum(exp(x))", {}, make_x())
    assert objective.numpy_program(make_x()) is None


def test_the_program_is_built_once_per_objective_and_not_shared_by_copies():
    objective = build("sum(x ** 2)", {}, make_x())
    first = objective.numpy_program(make_x())
    assert objective.numpy_program(make_x(seed=9)) is first
    moved = objective.to(dtype=torch.float32)
    assert moved.numpy_program(make_x().float()) is None  # not the float64 one's
