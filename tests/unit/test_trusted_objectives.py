"""Caller-supplied code loads only for trusted callers, and then behaves like the original."""

from __future__ import annotations

import io
import pickle

import cloudpickle
import pytest
import torch
from torch.export import Dim
from torch.func import grad

from workers.objectives import (
    ObjectiveError,
    UntrustedCodeError,
    build_objective,
    load_cloudpickle,
    load_torch_export,
)


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return torch.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)


class Rosenbrock(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rosenbrock(x)


def exported_rosenbrock() -> bytes:
    example = torch.randn(5, dtype=torch.float64)
    # Rosenbrock slices x[1:] and x[:-1], so export proves the graph only for n >= 3.
    program = torch.export.export(
        Rosenbrock(), (example,), dynamic_shapes={"x": {0: Dim("n", min=3)}}
    )
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


class CreatesFileWhenUnpickled:
    """A pickle that runs code when loaded: the thing the trust gate exists for."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def export_blob() -> bytes:
    return exported_rosenbrock()


def test_trusted_torch_export_rosenbrock_matches_value_and_gradient_at_another_n(export_blob):
    x0 = torch.randn(11, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    objective = build_objective(kind="torch_export", blob=export_blob, x0=x0, trusted=True)

    torch.testing.assert_close(objective.fun(x0), rosenbrock(x0))
    x = x0.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(objective.fun(x), x)
    torch.testing.assert_close(gradient, grad(rosenbrock)(x0))
    assert objective.kind == "torch_export" and objective.residual is None


def test_trusted_cloudpickle_function_loads_and_evaluates():
    def shifted_sphere(x: torch.Tensor) -> torch.Tensor:
        return torch.sum((x - 3.0) ** 2)

    blob = cloudpickle.dumps(shifted_sphere)
    x0 = torch.zeros(4, dtype=torch.float64)

    objective = build_objective(kind="cloudpickle", blob=blob, x0=x0, trusted=True)

    torch.testing.assert_close(objective.fun(x0), torch.tensor(36.0, dtype=torch.float64))
    torch.testing.assert_close(grad(objective.fun)(x0), torch.full((4,), -6.0, dtype=torch.float64))


@pytest.mark.parametrize("trusted", [False, "yes", 1, None])
def test_untrusted_torch_export_is_refused(export_blob, trusted):
    with pytest.raises(UntrustedCodeError):
        build_objective(kind="torch_export", blob=export_blob, x0=torch.ones(4), trusted=trusted)


@pytest.mark.parametrize("kind", ["torch_export", "cloudpickle"])
def test_untrusted_code_is_refused_before_the_bytes_are_read(kind, tmp_path):
    marker = tmp_path / "pwned"
    blob = pickle.dumps(CreatesFileWhenUnpickled(str(marker)))

    with pytest.raises(UntrustedCodeError) as caught:
        build_objective(kind=kind, blob=blob, x0=torch.ones(3, dtype=torch.float64))

    assert isinstance(caught.value, PermissionError)
    assert not isinstance(caught.value, ObjectiveError)
    assert not marker.exists()


def test_loaders_refuse_untrusted_callers_directly(export_blob):
    with pytest.raises(UntrustedCodeError):
        load_torch_export(export_blob)
    with pytest.raises(UntrustedCodeError):
        load_cloudpickle(cloudpickle.dumps(rosenbrock))


@pytest.mark.parametrize("kind", ["torch_export", "cloudpickle"])
def test_trusted_garbage_blob_is_an_objective_error_naming_the_blob(kind):
    with pytest.raises(ObjectiveError) as caught:
        build_objective(
            kind=kind, blob=b"not a program", x0=torch.ones(3, dtype=torch.float64), trusted=True
        )

    assert caught.value.field == "objective.blob"


def test_trusted_function_with_a_vector_result_is_rejected():
    blob = cloudpickle.dumps(lambda x: x * 2)

    with pytest.raises(ObjectiveError, match="scalar") as caught:
        build_objective(kind="cloudpickle", blob=blob, x0=torch.ones(3), trusted=True)

    assert caught.value.field == "objective.blob"


def test_trusted_function_that_raises_is_reported_as_an_objective_error():
    def broken(x: torch.Tensor) -> torch.Tensor:
        raise KeyError("boom")

    with pytest.raises(ObjectiveError, match="KeyError"):
        build_objective(
            kind="cloudpickle", blob=cloudpickle.dumps(broken), x0=torch.ones(3), trusted=True
        )


def test_trusted_export_objective_moves_with_to(export_blob):
    x0 = torch.rand(6, dtype=torch.float64)
    objective = build_objective(kind="torch_export", blob=export_blob, x0=x0, trusted=True)

    moved = objective.to("cpu")

    torch.testing.assert_close(moved.fun(x0), rosenbrock(x0))
