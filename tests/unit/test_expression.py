"""The expression DSL evaluates and differentiates like hand-written torch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
import torch
from torch.func import grad, hessian, jacrev, jvp

from workers.objectives import (
    ExpressionError,
    ObjectiveError,
    TensorSpec,
    build_objective,
    compile_expression,
)

F = torch.nn.functional


def spec(name: str, tensor: torch.Tensor) -> TensorSpec:
    tensor = tensor.contiguous()
    dtype = str(tensor.dtype).removeprefix("torch.")
    return TensorSpec(name, tuple(tensor.shape), dtype, tensor.numpy().tobytes())


def make_data() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "A": torch.randn(4, 5, generator=generator, dtype=torch.float64),
        "b": torch.randn(4, generator=generator, dtype=torch.float64),
        "c": 0.7 + 0.6 * torch.rand(5, generator=generator, dtype=torch.float64),
    }


def make_x(n: int = 5, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # in [0.55, 1.45]: positive for log/sqrt, away from the kinks the cases use at 0.5 and 1.5
    return 0.55 + 0.9 * torch.rand(n, generator=generator, dtype=torch.float64)


def build(source: str, data: dict[str, torch.Tensor] | None = None, x0=None, kind="expression"):
    data = make_data() if data is None else data
    x0 = make_x() if x0 is None else x0
    return build_objective(
        kind=kind, source=source, data=[spec(k, v) for k, v in data.items()], x0=x0
    )


# (source, the same function written by hand in torch)
CASES = [
    ("sum(x)", lambda x, d: torch.sum(x)),
    ("mean(x)", lambda x, d: torch.mean(x)),
    ("prod(x)", lambda x, d: torch.prod(x)),
    ("dot(x, x)", lambda x, d: torch.dot(x, x)),
    ("dot(A[0], x) * dot(x, c)", lambda x, d: torch.dot(d["A"][0], x) * torch.dot(x, d["c"])),
    ("norm(x)", lambda x, d: torch.linalg.vector_norm(x)),
    ("norm(x - c, 3)", lambda x, d: torch.linalg.vector_norm(x - d["c"], 3)),
    ("sum(exp(x))", lambda x, d: torch.exp(x).sum()),
    ("sum(log(x))", lambda x, d: torch.log(x).sum()),
    ("sum(log1p(x))", lambda x, d: torch.log1p(x).sum()),
    ("sum(sqrt(x))", lambda x, d: torch.sqrt(x).sum()),
    ("sum(abs(x - 1.5) * x)", lambda x, d: (torch.abs(x - 1.5) * x).sum()),
    ("sum(sin(x))", lambda x, d: torch.sin(x).sum()),
    ("sum(cos(x))", lambda x, d: torch.cos(x).sum()),
    ("sum(tan(x))", lambda x, d: torch.tan(x).sum()),
    ("sum(tanh(x))", lambda x, d: torch.tanh(x).sum()),
    ("sum(sigmoid(x))", lambda x, d: torch.sigmoid(x).sum()),
    ("sum(softplus(x))", lambda x, d: F.softplus(x).sum()),
    ("logsumexp(x)", lambda x, d: torch.logsumexp(x, 0)),
    ("logsumexp(A @ x - b)", lambda x, d: torch.logsumexp(d["A"] @ x - d["b"], 0)),
    ("sum(logsumexp(A * x, 1))", lambda x, d: torch.logsumexp(d["A"] * x, 1).sum()),
    ("sum(square(x))", lambda x, d: torch.square(x).sum()),
    ("sum(clamp(x, 0.5, 1.5) ** 3)", lambda x, d: (torch.clamp(x, 0.5, 1.5) ** 3).sum()),
    ("sum(clamp(x ** 2, min=0.5))", lambda x, d: torch.clamp(x**2, min=0.5).sum()),
    ("sum(clamp(x, max=c) * x)", lambda x, d: (torch.clamp(x, max=d["c"]) * x).sum()),
    ("sum(clamp(x, min=c, max=2) ** 2)", lambda x, d: (torch.clamp_min(x, d["c"]) ** 2).sum()),
    ("sum(minimum(x, 1.5) * x)", lambda x, d: (torch.clamp(x, max=1.5) * x).sum()),
    ("sum(maximum(x ** 2, c))", lambda x, d: torch.maximum(x**2, d["c"]).sum()),
    ("sum(minimum(0.5, x) + maximum(x, 3))", lambda x, d: (0 * x + 0.5 + 3).sum()),
    ("sum(where(x > c, x ** 2, -x))", lambda x, d: torch.where(x > d["c"], x**2, -x).sum()),
    ("sum(where(0.5 <= x < 1.5, x ** 3, 0))", lambda x, d: (x**3).sum()),
    ("sum(where(x != 7, x, 2))", lambda x, d: x.sum()),
    ("sum(arange(n) * x)", lambda x, d: (torch.arange(5, dtype=x.dtype) * x).sum()),
    ("sum(arange(1, n + 1, 2) * x[::2])", lambda x, d: (torch.tensor([1.0, 3, 5]) * x[::2]).sum()),
    ("sum(ones(n - 1) * x[1:] ** 3)", lambda x, d: (x[1:] ** 3).sum()),
    ("sum(zeros(n) + x ** 2)", lambda x, d: (x**2).sum()),
    ("sum(sum(A * x, 0) ** 2)", lambda x, d: ((d["A"] * x).sum(0) ** 2).sum()),
    ("mean(mean(A * x ** 2, dim=1))", lambda x, d: (d["A"] * x**2).mean(1).mean()),
    ("prod(x[:3], 0)", lambda x, d: x[:3].prod(0)),
    ("x[0] ** 2 + x[-1] * x[1] + sum(x[::2])",
     lambda x, d: x[0] ** 2 + x[-1] * x[1] + x[::2].sum()),
    ("sum((A @ x - b) ** 2) / 2", lambda x, d: ((d["A"] @ x - d["b"]) ** 2).sum() / 2),
    ("A[1, 1:] @ x[1:] + A[:, 0] @ A @ x",
     lambda x, d: d["A"][1, 1:] @ x[1:] + d["A"][:, 0] @ d["A"] @ x),
    ("-sum(x) / n + pi * e * x[0]", lambda x, d: -x.sum() / 5 + math.pi * math.e * x[0]),
    ("sum(x ** 0.5 + 2 ** x + x ** -2)", lambda x, d: (x**0.5 + 2**x + x**-2).sum()),
    ("sum(-x * +x) + x[n // 2] * x[7 % n]", lambda x, d: (-x * x).sum() + x[2] * x[2]),
]  # fmt: skip


def central_gradient(f, x: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    out = torch.empty_like(x)
    for i in range(x.numel()):
        step = torch.zeros_like(x)
        step[i] = h
        out[i] = (f(x + step) - f(x - step)) / (2 * h)
    return out


@pytest.mark.parametrize(("source", "reference"), CASES, ids=[c[0] for c in CASES])
def test_function_matches_hand_written_torch_in_value_gradient_and_hvp(source, reference):
    data = make_data()
    x = make_x()
    objective = build(source, data, x)

    value = objective.fun(x)
    gradient = grad(objective.fun)(x)
    direction = torch.linspace(-1.0, 1.0, x.numel(), dtype=torch.float64)
    _, hvp = jvp(grad(objective.fun), (x,), (direction,))

    torch.testing.assert_close(value, reference(x, data), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gradient, central_gradient(objective.fun, x), rtol=1e-6, atol=1e-6)
    h = 1e-5
    hvp_fd = (grad(objective.fun)(x + h * direction) - grad(objective.fun)(x - h * direction)) / (
        2 * h
    )
    torch.testing.assert_close(hvp, hvp_fd, rtol=1e-5, atol=1e-5)


ROSENBROCK = "sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)"


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return torch.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)


def test_rosenbrock_matches_hand_written_value_gradient_and_hessian():
    x = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    objective = build(ROSENBROCK, {}, x)

    torch.testing.assert_close(objective.fun(x), rosenbrock(x))
    torch.testing.assert_close(grad(objective.fun)(x), grad(rosenbrock)(x))
    torch.testing.assert_close(hessian(objective.fun)(x), hessian(rosenbrock)(x))
    assert objective.fun(torch.ones(50, dtype=torch.float64)).item() == 0.0


def test_autograd_backward_works_on_the_compiled_closure():
    x = make_x().requires_grad_()
    objective = build(ROSENBROCK, {}, x.detach())

    objective.fun(x).backward()

    torch.testing.assert_close(x.grad, grad(rosenbrock)(x.detach()))


def logistic_data(samples: int = 400, features: int = 8):
    generator = torch.Generator().manual_seed(7)
    X = torch.randn(samples, features, generator=generator, dtype=torch.float64)
    w_true = torch.randn(features, generator=generator, dtype=torch.float64)
    probability = torch.sigmoid(X @ w_true)
    y = (torch.rand(samples, generator=generator, dtype=torch.float64) < probability).double()
    return X, y


LOGISTIC = "mean(softplus(X @ x) - y * (X @ x)) + 0.01 * dot(x, x)"


def logistic_numpy(w: np.ndarray, X: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    z = X @ w
    value = np.mean(np.logaddexp(0.0, z) - y * z) + 0.01 * w @ w
    gradient = X.T @ (1.0 / (1.0 + np.exp(-z)) - y) / len(y) + 0.02 * w
    return float(value), gradient


def test_logistic_regression_matches_numpy_and_scipy_finds_the_same_minimum():
    X, y = logistic_data()
    x0 = torch.zeros(X.shape[1], dtype=torch.float64)
    objective = build(LOGISTIC, {"X": X, "y": y}, x0)
    X_np, y_np = X.numpy(), y.numpy()

    def dsl_value_and_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
        x = torch.from_numpy(w).requires_grad_()
        value = objective.fun(x)
        (gradient,) = torch.autograd.grad(value, x)
        return value.item(), gradient.numpy()

    probe = np.linspace(-1, 1, X.shape[1])
    dsl_value, dsl_grad = dsl_value_and_grad(probe)
    ref_value, ref_grad = logistic_numpy(probe, X_np, y_np)
    np.testing.assert_allclose(dsl_value, ref_value, rtol=1e-12)
    np.testing.assert_allclose(dsl_grad, ref_grad, rtol=1e-10, atol=1e-12)

    options = {"gtol": 1e-10, "ftol": 1e-14}
    ours = scipy.optimize.minimize(
        dsl_value_and_grad, np.zeros(X.shape[1]), jac=True, method="L-BFGS-B", options=options
    )
    theirs = scipy.optimize.minimize(
        logistic_numpy, np.zeros(X.shape[1]), args=(X_np, y_np), jac=True, method="L-BFGS-B",
        options=options,
    )  # fmt: skip
    assert ours.success and theirs.success
    np.testing.assert_allclose(ours.x, theirs.x, atol=1e-6)
    np.testing.assert_allclose(ours.fun, theirs.fun, rtol=1e-12)


def test_least_squares_residual_gives_half_squared_norm_and_jacobian_a():
    generator = torch.Generator().manual_seed(5)
    A = torch.randn(7, 4, generator=generator, dtype=torch.float64)
    b = torch.randn(7, generator=generator, dtype=torch.float64)
    x = torch.randn(4, generator=generator, dtype=torch.float64)
    objective = build("A @ x - b", {"A": A, "b": b}, x, kind="residual")

    torch.testing.assert_close(objective.residual(x), A @ x - b)
    torch.testing.assert_close(objective.fun(x), 0.5 * torch.sum((A @ x - b) ** 2))
    torch.testing.assert_close(jacrev(objective.residual)(x), A)
    torch.testing.assert_close(grad(objective.fun)(x), A.T @ (A @ x - b))


def test_nonlinear_residual_jacobian_matches_finite_differences():
    x = make_x(4)
    objective = build("exp(x[:-1]) - x[1:] ** 2 + sum(x)", {}, x, kind="residual")
    jacobian = jacrev(objective.residual)(x)

    for column in range(4):
        step = torch.zeros(4, dtype=torch.float64)
        step[column] = 1e-6
        fd = (objective.residual(x + step) - objective.residual(x - step)) / 2e-6
        torch.testing.assert_close(jacobian[:, column], fd, rtol=1e-6, atol=1e-6)


def test_long_sums_are_not_limited_by_nesting_depth():
    source = " + ".join(f"x[{i}] ** 2" for i in range(300))
    x = make_x(300)

    objective = build(source, {}, x)

    torch.testing.assert_close(objective.fun(x), (x**2).sum())


def test_constant_subtrees_are_folded_at_compile_time():
    x = make_x()
    objective = build("sum(x * (2 ** 3 - exp(0) + n // 2))", {}, x)

    torch.testing.assert_close(objective.fun(x), x.sum() * 9)


def test_to_float32_rebinds_the_data_and_keeps_the_value():
    data = make_data()
    x = make_x()
    objective = build("sum((A @ x - b) ** 2)", data, x)

    single = objective.to(dtype=torch.float32)

    assert single.data["A"].dtype == torch.float32 and single.dtype == torch.float32
    torch.testing.assert_close(
        single.fun(x.float()).double(), objective.fun(x), rtol=1e-5, atol=1e-5
    )
    assert objective.data["A"].dtype == torch.float64  # the original is unchanged


def test_float32_data_is_cast_to_the_solve_dtype_and_int_data_is_kept():
    data = {"A": make_data()["A"].float(), "k": torch.arange(5, dtype=torch.int64)}
    objective = build("sum(A @ x) + sum(k * x)", data, make_x())

    assert objective.data["A"].dtype == torch.float64
    assert objective.data["k"].dtype == torch.int64
    assert objective.fun(make_x()).dtype == torch.float64


def test_vmap_over_a_batch_of_points():
    x = make_x()
    objective = build(ROSENBROCK, {}, x)
    batch = torch.stack([x, x * 0.5, x + 1])

    values = torch.vmap(objective.fun)(batch)

    torch.testing.assert_close(values, torch.stack([rosenbrock(p) for p in batch]))


def test_compile_expression_reports_only_the_data_it_uses():
    program = compile_expression("sum(B @ x)", dimension=3, data_names=["A", "B", "C"])

    assert program.data_names == ("B",)


def test_expression_error_is_an_objective_error_with_a_field_and_column():
    with pytest.raises(ExpressionError) as caught:
        build("sum(x) + foo", {}, make_x())

    assert isinstance(caught.value, ObjectiveError)
    assert caught.value.field == "objective.source"
    assert caught.value.column == 9
    assert "foo" in str(caught.value)
