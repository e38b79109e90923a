"""Trusted-code objectives through the real gateway: torch.export programs and cloudpickled
callables solve on a server started with --trust-code, and are refused on a default one."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

import secant

pytestmark = pytest.mark.integration


class Rosenbrock(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def shifted_quadratic(x: torch.Tensor) -> torch.Tensor:
    return torch.sum((x - torch.arange(x.numel(), dtype=x.dtype)) ** 2)


@pytest.fixture(scope="module")
def exported() -> secant.TorchExport:
    return secant.TorchExport.from_module(Rosenbrock(), n=4)


@pytest.fixture(scope="module")
def trusting_gateway(gateway_factory):
    return gateway_factory(trust_code=True)


def test_exported_rosenbrock_solves_on_a_trusting_server(trusting_gateway, exported):
    with secant.Client(trusting_gateway.address) as client:
        dsl = client.minimize("sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)",
                              [-1.2, 1.0] * 3, method="bfgs", options={"gtol": 1e-8})
        res = client.minimize(exported, [-1.2, 1.0] * 3, method="bfgs",  # another length
                              options={"gtol": 1e-8})
    assert res.success, res.message
    np.testing.assert_allclose(res.x, np.ones(6), atol=1e-6)
    assert res.nit == dsl.nit
    np.testing.assert_allclose(res.x, dsl.x, rtol=1e-9)


def test_cloudpickled_function_solves_on_a_trusting_server(trusting_gateway):
    with secant.Client(trusting_gateway.address) as client:
        res = client.minimize(secant.Pickled.from_callable(shifted_quadratic), np.zeros(5),
                              method="l-bfgs")
    assert res.success
    np.testing.assert_allclose(res.x, np.arange(5.0), atol=1e-6)


@pytest.mark.parametrize("kind", ["torch_export", "cloudpickle"])
def test_trusted_code_is_refused_by_a_default_server(gateway, exported, kind):
    objective = exported if kind == "torch_export" else secant.Pickled.from_callable(
        shifted_quadratic)
    with secant.Client(gateway) as client, pytest.raises(secant.SecantError) as err:
        client.minimize(objective, np.zeros(4))
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "--trust-code" in err.value.message
