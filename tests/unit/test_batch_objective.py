"""build_batch_objective: B members evaluated at once equal a loop of single objectives:
values, gradients, Hessians, member subsets, residuals, the gather cache and refusals."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from workers.objectives import (
    BatchObjective,
    ExpressionError,
    ObjectiveError,
    ObjectiveLimits,
    TensorSpec,
    _batch,
    build_batch_objective,
    build_objective,
)

B, M, D = 6, 15, 3
LOGISTIC = "sum(log(1 + exp(-y * (X @ x))))"


def spec(name: str, value) -> TensorSpec:
    tensor = torch.as_tensor(value)
    dtype = str(tensor.dtype).removeprefix("torch.")
    return TensorSpec(name, tuple(tensor.shape), dtype, tensor.contiguous().numpy().tobytes())


def batch(source: str, x0, data=None, member=None, kind: str = "expression", **kwargs):
    return build_batch_objective(
        kind=kind,
        source=source,
        data=[spec(k, v) for k, v in (data or {}).items()],
        member_data=[spec(k, v) for k, v in (member or {}).items()],
        x0=x0,
        **kwargs,
    )


def singles(source: str, x0, data=None, member=None, kind: str = "expression"):
    """The per-member loop the batch must match: one build_objective per member."""
    out = []
    for i in range(x0.shape[0]):
        tensors = {**(data or {}), **{k: v[i] for k, v in (member or {}).items()}}
        out.append(
            build_objective(
                kind=kind,
                source=source,
                data=[spec(k, v) for k, v in tensors.items()],
                x0=x0[i].clone(),
            )
        )
    return out


@pytest.fixture
def logistic():
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(B, M, D, generator=generator, dtype=torch.float64)
    y = torch.sign(torch.randn(B, M, generator=generator, dtype=torch.float64))
    x0 = torch.randn(B, D, generator=generator, dtype=torch.float64)
    return X, y, x0


def per_member_grads(objectives, x0):
    grads = []
    for objective, row in zip(objectives, x0, strict=True):
        point = row.clone().requires_grad_()
        (grad,) = torch.autograd.grad(objective.fun(point), point)
        grads.append(grad)
    return torch.stack(grads)


# -- values and derivatives ----------------------------------------------------------------


def test_logistic_regression_with_per_member_data_matches_a_loop(logistic):
    X, y, x0 = logistic

    objective = batch(LOGISTIC, x0, member={"X": X, "y": y})
    loop = singles(LOGISTIC, x0, member={"X": X, "y": y})

    assert isinstance(objective, BatchObjective)
    assert (objective.batch_size, objective.dimension) == (B, D)
    assert objective.dtype == torch.float64 and objective.kind == "expression"
    values = objective.fun(x0, torch.arange(B))
    assert values.shape == (B,)
    expected = torch.stack([o.fun(x0[i]) for i, o in enumerate(loop)])
    torch.testing.assert_close(values, expected, rtol=1e-12, atol=1e-12)


def test_gradients_of_all_members_come_from_one_backward_pass(logistic):
    X, y, x0 = logistic
    objective = batch(LOGISTIC, x0, member={"X": X, "y": y})
    loop = singles(LOGISTIC, x0, member={"X": X, "y": y})

    point = x0.clone().requires_grad_()
    (grad,) = torch.autograd.grad(objective.fun(point, torch.arange(B)).sum(), point)

    torch.testing.assert_close(grad, per_member_grads(loop, x0), rtol=1e-12, atol=1e-12)


def test_double_backward_gives_per_member_hessian_vector_products(logistic):
    X, y, x0 = logistic
    objective = batch(LOGISTIC, x0, member={"X": X, "y": y})
    loop = singles(LOGISTIC, x0, member={"X": X, "y": y})
    index = torch.arange(B)
    v = torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    point = x0.clone().requires_grad_()
    (grad,) = torch.autograd.grad(objective.fun(point, index).sum(), point, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * v).sum(), point)

    hessians = torch.stack([torch.func.hessian(o.fun)(x0[i]) for i, o in enumerate(loop)])
    torch.testing.assert_close(hvp, (hessians @ v[:, :, None])[:, :, 0], rtol=1e-10, atol=1e-12)


def test_torch_func_transforms_work_over_x_and_index(logistic):
    X, y, x0 = logistic
    objective = batch(LOGISTIC, x0, member={"X": X, "y": y})
    loop = singles(LOGISTIC, x0, member={"X": X, "y": y})

    def one(row, i):
        return objective.fun(row[None], i[None])[0]

    hessians = torch.func.vmap(torch.func.hessian(one))(x0, torch.arange(B))

    expected = torch.stack([torch.func.hessian(o.fun)(x0[i]) for i, o in enumerate(loop)])
    torch.testing.assert_close(hessians, expected, rtol=1e-10, atol=1e-12)


def test_a_subset_of_members_is_evaluated_with_its_own_data(logistic):
    X, y, x0 = logistic
    objective = batch(LOGISTIC, x0, member={"X": X, "y": y})
    full = objective.fun(x0, torch.arange(B))
    index = torch.tensor([4, 1, 5])

    values = objective.fun(x0[index] + 0.0, index)

    torch.testing.assert_close(values, full[index], rtol=0, atol=0)
    # the next working set, a new index object: the cache follows it
    index2 = torch.tensor([0, 4])
    torch.testing.assert_close(objective.fun(x0[index2], index2), full[index2], rtol=0, atol=0)


def test_gather_runs_once_per_index_object_and_never_copies_the_full_batch(logistic):
    X, y, x0 = logistic
    objective = batch(LOGISTIC, x0, member={"X": X, "y": y})
    full = torch.arange(B)
    subset = torch.tensor([2, 3])
    real_gather = _batch._GatherCache._gather
    seen = []

    def gather(self, index):
        out = real_gather(self, index)
        seen.append((index, out))
        return out

    with mock.patch.object(_batch._GatherCache, "_gather", gather):
        for _ in range(3):
            objective.fun(x0, full)
        assert len(seen) == 1  # checked once for this index object
        # 0..B-1 in order: the member data itself, no copy
        assert {id(t) for t in seen[0][1]} == {id(t) for t in objective.member_data.values()}
        for _ in range(3):
            objective.fun(x0[subset], subset)
        assert len(seen) == 2
        objective.fun(x0[subset], subset.clone())  # same ids, new object: gathered again
        assert len(seen) == 3
        assert sorted(tuple(t.shape) for t in seen[1][1]) == [(2, M), (2, M, D)]


def test_shared_and_per_member_data_mix():
    generator = torch.Generator().manual_seed(2)
    A = torch.randn(4, 3, dtype=torch.float64, generator=generator)
    b = torch.randn(B, 4, dtype=torch.float64, generator=generator)
    x0 = torch.randn(B, 3, dtype=torch.float64, generator=generator)
    source = "sum((A @ x - b)**2) + 0.1 * dot(x, x)"

    objective = batch(source, x0, data={"A": A}, member={"b": b})
    loop = singles(source, x0, data={"A": A}, member={"b": b})

    expected = torch.stack([o.fun(x0[i]) for i, o in enumerate(loop)])
    torch.testing.assert_close(objective.fun(x0, torch.arange(B)), expected)
    assert set(objective.data) == {"A"} and set(objective.member_data) == {"b"}


def test_no_member_data_evaluates_each_row_on_its_own():
    x0 = torch.tensor([[-1.2, 1.0], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    source = "sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)"

    objective = batch(source, x0)
    values = objective.fun(x0, torch.arange(3))

    expected = torch.stack([o.fun(x0[i]) for i, o in enumerate(singles(source, x0))])
    torch.testing.assert_close(values, expected)
    assert values[2] == 0


@pytest.mark.parametrize(
    "source",
    [
        "sum(x**2 * w) + prod(x + 3)",
        "norm(x - w) + norm(x, 1) + logsumexp(w * x)",
        "sum(where(x > 0, x**2, -x)) + sum(clamp(x, min=-w, max=w)**2)",
        "sum(minimum(x, w)**2 + maximum(x, 0.5)) + mean(softplus(x) * sigmoid(w))",
        "dot(x[0:2], w[1:3]) + x[-1]**3 + sum(x * arange(n)) + sum(ones(n) * tanh(x))",
        "sum(sqrt(1 + square(x)) + log1p(abs(x)) + sin(x) * cos(w))",
        "sum(mask * x**2) + sum(x**2) / n",
    ],
)
def test_dsl_functions_batch_like_a_loop(source):
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn(B, 4, dtype=torch.float64, generator=generator)
    w = torch.rand(B, 4, dtype=torch.float64, generator=generator) + 0.5
    mask = torch.rand(B, 4, generator=generator) > 0.5
    member = {"w": w, "mask": mask}

    objective = batch(source, x0, member=member)
    loop = singles(source, x0, member=member)

    point = x0.clone().requires_grad_()
    values = objective.fun(point, torch.arange(B))
    (grad,) = torch.autograd.grad(values.sum(), point)
    expected = torch.stack([o.fun(x0[i]) for i, o in enumerate(loop)])
    torch.testing.assert_close(values.detach(), expected)
    torch.testing.assert_close(grad, per_member_grads(loop, x0))


# -- residuals -------------------------------------------------------------------------------


def test_residual_objective_is_half_the_squared_norm_per_member():
    generator = torch.Generator().manual_seed(4)
    t = torch.linspace(0, 2, 7, dtype=torch.float64)
    y = torch.exp(-torch.rand(B, 1, generator=generator, dtype=torch.float64) * t)
    x0 = torch.ones(B, 2, dtype=torch.float64)
    source = "x[0] * exp(-x[1] * t) - y"

    objective = batch(source, x0, data={"t": t}, member={"y": y}, kind="residual")
    loop = singles(source, x0, data={"t": t}, member={"y": y}, kind="residual")

    index = torch.arange(B)
    r = objective.residual(x0, index)
    assert objective.kind == "residual" and r.shape == (B, 7)
    torch.testing.assert_close(r, torch.stack([o.residual(x0[i]) for i, o in enumerate(loop)]))
    torch.testing.assert_close(objective.fun(x0, index), 0.5 * (r**2).sum(dim=1))
    jacobians = torch.func.vmap(
        torch.func.jacrev(lambda row, i: objective.residual(row[None], i[None])[0])
    )(x0, index)
    expected = torch.stack([torch.func.jacrev(o.residual)(x0[i]) for i, o in enumerate(loop)])
    torch.testing.assert_close(jacobians, expected)


# -- non-finite members ----------------------------------------------------------------------


def test_nan_rows_of_x0_and_non_finite_values_only_touch_their_members(logistic):
    X, y, x0 = logistic
    x0 = x0.clone()
    x0[1, 0] = float("nan")
    x0[3] = float("inf")

    objective = batch(LOGISTIC, x0, member={"X": X, "y": y})
    values = objective.fun(x0, torch.arange(B))

    finite = torch.isfinite(values)
    assert finite.tolist() == [True, False, True, False, True, True]

    # a value that is non-finite at x0 for some members only (log of a negative) is accepted
    x1 = torch.tensor([[1.0, 2.0], [-1.0, 2.0]], dtype=torch.float64)
    values = batch("sum(log(x))", x1).fun(x1, torch.arange(2))
    assert torch.isfinite(values).tolist() == [True, False]


# -- dtype and device --------------------------------------------------------------------


def test_float32_x0_and_to_rebinds_data(logistic):
    X, y, x0 = logistic
    objective32 = batch(LOGISTIC, x0.float(), member={"X": X, "y": y})
    assert objective32.dtype == torch.float32
    assert objective32.member_data["X"].dtype == torch.float32

    objective64 = objective32.to(dtype=torch.float64)

    assert objective64.dtype == torch.float64 and objective64.device == torch.device("cpu")
    assert objective64.member_data["X"].dtype == torch.float64
    index = torch.arange(B)
    torch.testing.assert_close(
        objective64.fun(x0, index).float(), objective32.fun(x0.float(), index), rtol=1e-5, atol=1e-5
    )
    assert objective32.member_data["y"].dtype == torch.float32  # the original is unchanged
    with pytest.raises(ValueError, match="float32 or float64"):
        objective32.to(dtype=torch.int64)


def test_integer_and_bool_member_data_keep_their_dtype():
    x0 = torch.zeros(3, 2, dtype=torch.float64)
    labels = torch.tensor([[0, 1], [1, 1], [0, 0]])

    objective = batch("sum(where(labels == 1, (x - 1)**2, x**2))", x0, member={"labels": labels})

    assert objective.member_data["labels"].dtype == torch.int64
    torch.testing.assert_close(
        objective.fun(x0, torch.arange(3)), torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    )


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x0", "match"),
    [
        (torch.zeros(3, dtype=torch.float64), "2-D"),
        (torch.zeros(2, 2, 2, dtype=torch.float64), "2-D"),
        (torch.zeros(0, 3, dtype=torch.float64), "non-empty"),
        (torch.zeros(3, 0, dtype=torch.float64), "non-empty"),
        (torch.zeros(3, 2, dtype=torch.int64), "float32 or float64"),
        ([[1.0, 2.0]], "expected a tensor"),
    ],
)
def test_x0_must_be_a_float_matrix(x0, match):
    with pytest.raises(ObjectiveError, match=match) as caught:
        batch("sum(x**2)", x0)

    assert caught.value.field == "x0"


def test_batch_size_and_dimension_limits():
    x0 = torch.zeros(5, 3, dtype=torch.float64)

    with pytest.raises(ObjectiveError, match="5 members; the limit is 4") as caught:
        batch("sum(x**2)", x0, limits=ObjectiveLimits(max_batch_size=4))
    assert caught.value.field == "x0"
    with pytest.raises(ObjectiveError, match="dimension 3 exceeds the limit of 2"):
        batch("sum(x**2)", x0, limits=ObjectiveLimits(max_dimension=2))


def test_member_data_with_the_wrong_leading_dimension_names_tensor_and_sizes():
    x0 = torch.zeros(4, 3, dtype=torch.float64)

    with pytest.raises(ObjectiveError) as caught:
        batch("sum((x - b)**2)", x0, member={"b": torch.zeros(5, 3, dtype=torch.float64)})

    assert caught.value.field == "batch.member_data.b"
    message = str(caught.value)
    assert "'b'" in message and "5" in message and "4 members" in message

    with pytest.raises(ObjectiveError, match="scalar") as caught:
        batch("sum(x * c)", x0, member={"c": torch.tensor(2.0, dtype=torch.float64)})
    assert caught.value.field == "batch.member_data.c"


def test_a_name_both_shared_and_per_member_is_refused():
    x0 = torch.zeros(2, 3, dtype=torch.float64)
    b = torch.zeros(3, dtype=torch.float64)

    with pytest.raises(ObjectiveError, match="both as shared data and as per-member") as caught:
        batch("sum((x - b)**2)", x0, data={"b": b}, member={"b": torch.zeros(2, 3)})

    assert caught.value.field == "batch.member_data.b"


def test_member_data_decoding_errors_name_the_member_field():
    x0 = torch.zeros(2, 3, dtype=torch.float64)
    bad = TensorSpec("b", (2, 3), "float64", b"\0" * 8)

    with pytest.raises(ObjectiveError, match="needs 48 bytes") as caught:
        build_batch_objective(kind="expression", source="sum(x*b)", member_data=[bad], x0=x0)

    assert caught.value.field == "batch.member_data.b"


@pytest.mark.parametrize("kind", ["torch_export", "cloudpickle"])
def test_trusted_code_kinds_are_refused(kind):
    with pytest.raises(ObjectiveError, match="batch solves take expression or residual") as caught:
        batch("sum(x**2)", torch.zeros(2, 2, dtype=torch.float64), kind=kind)

    assert caught.value.field == "objective"


def test_unknown_kind_is_refused():
    with pytest.raises(ObjectiveError, match="unknown kind") as caught:
        batch("sum(x**2)", torch.zeros(2, 2, dtype=torch.float64), kind="lambda")

    assert caught.value.field == "objective.kind"


def test_shape_errors_are_reported_for_one_member():
    x0 = torch.zeros(4, 3, dtype=torch.float64)
    A = torch.zeros(4, 5, 2, dtype=torch.float64)  # each member's A is 5 x 2, x has 3

    with pytest.raises(ExpressionError, match=r"A @ x.*\(5, 2\).*\(3,\)") as caught:
        batch("sum((A @ x)**2)", x0, member={"A": A})

    assert caught.value.field == "objective.source"


def test_result_rank_is_checked_per_member():
    x0 = torch.zeros(2, 3, dtype=torch.float64)

    with pytest.raises(ExpressionError, match="must be a scalar"):
        batch("x**2", x0)
    with pytest.raises(ExpressionError, match="1-D vector"):
        batch("sum(x)", x0, kind="residual")


def test_syntax_and_names_are_checked_as_for_single_solves():
    x0 = torch.zeros(2, 3, dtype=torch.float64)

    with pytest.raises(ExpressionError, match="unknown name `w`.*b"):
        batch("sum(w * x)", x0, member={"b": torch.zeros(2, 3)})
    with pytest.raises(ExpressionError, match="attribute access"):
        batch("x.__class__", x0)


def test_the_whole_batchs_intermediates_are_capped_before_anything_is_allocated():
    x0 = torch.zeros(100, 50, dtype=torch.float64)
    col = torch.zeros(50, 1, dtype=torch.float64)  # col * x: 2,500 per member, 250,000 in all
    limits = ObjectiveLimits(max_batch_intermediate_elements=100_000)

    with mock.patch.object(_batch, "_probe") as probe:
        with pytest.raises(ExpressionError, match="max_batch_intermediate_elements") as caught:
            batch("sum(col * x)", x0, data={"col": col}, limits=limits)

    probe.assert_not_called()
    assert "100 members" in str(caught.value)
    batch("sum(col * x)", x0[:10], data={"col": col}, limits=limits)  # 25,000: fine
