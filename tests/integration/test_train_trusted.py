"""Training with a caller's own module and with data files, through the real gateway, Ray and
SDK: a pickled nn.Module and an exported program train on a gateway started with trust_code
(and are refused, unread, by a default one); a data_uri under the gateway's data root trains
(npz and safetensors alike); a file outside the root, a missing file, a wrong tensor name and
a gateway without a data root each answer with their status code before any job exists, as do
a damaged file and one whose header declares more than the size cap; a symlinked data root
takes URIs under its own name."""

from __future__ import annotations

import base64
import io
import os
import zipfile

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import secant
from secant.v1 import optimizer_pb2 as pb
from secant.v1 import optimizer_pb2_grpc as pb_grpc
from workers.training.datasets import load_dataset
from workers.training.loop import evaluate, split

pytestmark = pytest.mark.integration

SPEC = {
    "loss": "cross_entropy",
    "optimizer": {"name": "adam", "lr": 0.01},
    "batch_size": 64,
    "steps": 20,
    "seed": 2,
    "validation_fraction": 0.2,
    "dataset": "digits",
}


class DigitsNet(nn.Module):
    """Defined here, unknown to the workers: it travels by value (cloudpickle)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(64, 32)
        self.out = nn.Linear(32, 10)
        self.register_buffer("scale", torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x * self.scale)))


def _module() -> DigitsNet:
    torch.manual_seed(0)
    return DigitsNet()


def _exported(module: nn.Module) -> torch.export.ExportedProgram:
    return torch.export.export(
        module, (torch.zeros(8, 64),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}}
    )


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data-root")
    X, y = load_dataset("digits")
    np.savez(root / "digits.npz", X=X.numpy().astype(np.float64), y=y.numpy())
    (root / "nested").mkdir()
    save_file({"X": X, "y": y.to(torch.int32)}, str(root / "nested" / "digits.safetensors"))
    np.savez(root / "misnamed.npz", features=X.numpy(), labels=y.numpy())
    np.savez(root.parent / "outside.npz", X=X.numpy(), y=y.numpy())
    with zipfile.ZipFile(root / "huge.npz", "w") as archive:  # headers only: 3.7 GiB declared
        for name, shape, descr in (("X", (10**6, 1000), "<f4"), ("y", (10**6,), "<i8")):
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                header, {"descr": descr, "fortran_order": False, "shape": shape}
            )
            archive.writestr(f"{name}.npy", header.getvalue())
    np.savez_compressed(root / "corrupt.npz", X=X.numpy()[:100], y=y.numpy()[:100])
    data = bytearray((root / "corrupt.npz").read_bytes())
    with zipfile.ZipFile(root / "corrupt.npz") as archive:
        offset = archive.getinfo("X.npy").header_offset
    start = (
        offset
        + 30
        + int.from_bytes(data[offset + 26 : offset + 28], "little")
        + int.from_bytes(data[offset + 28 : offset + 30], "little")
    )
    data[start] = 0xFF  # a reserved deflate block type
    (root / "corrupt.npz").write_bytes(bytes(data))
    return root


@pytest.fixture(scope="module")
def trusting_gateway(gateway_factory, data_root):
    return gateway_factory(trust_code=True, data_root=str(data_root), workers=1)


def _validation_loss(module: nn.Module, state: dict) -> float:
    module.load_state_dict(state)
    X, y = load_dataset("digits")
    _, _, X_val, y_val = split(X, y, SPEC["validation_fraction"], SPEC["seed"])
    return evaluate(module, "cross_entropy", X_val, y_val)["loss"]


def _job_count(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return len(pb_grpc.OptimizerStub(channel).ListJobs(pb.ListJobsRequest(page_size=1000)).jobs)


# ---------------------------------------------------------------- the caller's own module


def test_a_pickled_module_trains_and_its_weights_reproduce_the_validation_loss(trusting_gateway):
    module = _module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with secant.Client(trusting_gateway.address) as client:
        run = client.train(dict(SPEC, model=module, workers=2))
        state = run.state_dict()
        trained = run.model()

    assert run.steps == SPEC["steps"]
    assert set(state) == set(before)  # the module's own names, buffers included
    assert not torch.equal(state["hidden.weight"], before["hidden.weight"])
    loss = _validation_loss(DigitsNet(), state)
    assert loss == pytest.approx(run.metrics["val_loss"], rel=1e-5)
    assert loss < run.history[0][1]["loss"]
    assert isinstance(trained, DigitsNet) and not trained.training


def test_an_exported_program_trains_and_its_weights_reproduce_the_validation_loss(trusting_gateway):
    program = _exported(_module())
    with secant.Client(trusting_gateway.address) as client:
        run = client.train(dict(SPEC, model=program))
        state = run.state_dict()
        trained = run.model()

    loss = _validation_loss(DigitsNet(), state)  # the program's weights fit the module
    assert loss == pytest.approx(run.metrics["val_loss"], rel=1e-5)
    X, y = load_dataset("digits")
    _, _, X_val, y_val = split(X, y, SPEC["validation_fraction"], SPEC["seed"])
    assert evaluate(trained, "cross_entropy", X_val, y_val)["loss"] == pytest.approx(loss)
    assert run.metrics["val_accuracy"] > 0.5


def test_an_exported_program_with_kfac_is_invalid_argument(trusting_gateway):
    with (
        secant.Client(trusting_gateway.address) as client,
        pytest.raises(secant.SecantError) as err,
    ):
        client.train(dict(SPEC, model=_exported(_module()), optimizer="kfac"))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "kfac" in err.value.message


@pytest.mark.parametrize("model", ["module", "program", "junk"])
def test_a_default_gateway_refuses_code_models_without_loading_them(gateway, model):
    junk = {"kind": "pickle", "module": base64.b64encode(b"\x80\x04not a pickle").decode()}
    chosen = {"module": _module, "program": lambda: _exported(_module()), "junk": lambda: junk}[
        model
    ]()
    jobs = _job_count(gateway)
    with secant.Client(gateway) as client, pytest.raises(secant.SecantError) as err:
        client.train(dict(SPEC, model=chosen))
    # junk bytes would be INVALID_ARGUMENT once read: PERMISSION_DENIED means they were not
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "--trust-code" in err.value.message and "spec.model.kind" in err.value.message
    assert _job_count(gateway) == jobs


def test_a_caller_without_the_trust_code_role_is_refused(make_gateway, tmp_path):
    from service.auth import add_token

    tokens = str(tmp_path / "tokens.yaml")
    trainer = add_token(tokens, "trainer", ["train"])
    with_code = add_token(tokens, "coder", ["train", "trust-code"])
    server = make_gateway(tokens=tokens, trust_code=True, workers=1)
    spec = dict(SPEC, model=_module(), steps=2)
    with (
        secant.Client(server.address, token=trainer) as client,
        pytest.raises(secant.SecantError) as err,
    ):
        client.train(spec)
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "lacks the role 'trust-code'" in err.value.message
    with secant.Client(server.address, token=with_code) as client:
        assert client.train(spec).steps == 2


# ---------------------------------------------------------------- data files


def test_npz_and_safetensors_data_uris_train_alike(trusting_gateway, data_root):
    spec = {k: v for k, v in SPEC.items() if k != "dataset"}
    spec["model"] = {"kind": "mlp", "sizes": [64, 32, 10], "activation": "tanh"}
    with secant.Client(trusting_gateway.address) as client:
        from_npz = client.train(dict(spec, data_uri="digits.npz"))
        from_safetensors = client.train(
            dict(spec, data_uri=f"file://{data_root}/nested/digits.safetensors")
        )
        from_dataset = client.train(dict(spec, dataset="digits"))

    assert from_npz.steps == from_safetensors.steps == SPEC["steps"]
    assert from_npz.metrics == pytest.approx(from_safetensors.metrics, rel=1e-6)
    assert from_npz.metrics == pytest.approx(from_dataset.metrics, rel=1e-6)


@pytest.mark.parametrize(
    "uri, code, words",
    [
        ("../outside.npz", grpc.StatusCode.PERMISSION_DENIED, "outside the data root"),
        ("absent.npz", grpc.StatusCode.INVALID_ARGUMENT, "no such file 'absent.npz'"),
        ("misnamed.npz", grpc.StatusCode.INVALID_ARGUMENT, "holds tensors ['features', 'labels']"),
        ("http://example.com/digits.npz", grpc.StatusCode.INVALID_ARGUMENT, "only file:// URIs"),
        ("huge.npz", grpc.StatusCode.INVALID_ARGUMENT, "over this server's cap of 2 GiB"),
        ("corrupt.npz", grpc.StatusCode.INVALID_ARGUMENT, "corrupt compressed data"),
    ],
)
def test_bad_data_uris_are_refused_before_a_job_exists(trusting_gateway, uri, code, words):
    spec = {k: v for k, v in SPEC.items() if k != "dataset"}
    spec["model"] = {"kind": "mlp", "sizes": [64, 10]}
    jobs = _job_count(trusting_gateway.address)
    with (
        secant.Client(trusting_gateway.address) as client,
        pytest.raises(secant.SecantError) as err,
    ):
        client.train(dict(spec, data_uri=uri))
    assert err.value.code == code
    assert err.value.message.startswith("spec.data_uri: ") and words in err.value.message
    assert _job_count(trusting_gateway.address) == jobs


def test_a_gateway_without_a_data_root_refuses_data_uris(gateway):
    spec = {k: v for k, v in SPEC.items() if k != "dataset"}
    spec["model"] = {"kind": "mlp", "sizes": [64, 10]}
    with secant.Client(gateway) as client, pytest.raises(secant.SecantError) as err:
        client.train(dict(spec, data_uri="digits.npz"))
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "--data-root" in err.value.message


def test_a_symlinked_data_root_takes_uris_under_its_own_name(make_gateway, data_root, tmp_path):
    link = tmp_path / "data"  # /data -> /mnt/vol
    os.symlink(data_root, link)
    server = make_gateway(data_root=str(link), workers=1)
    spec = {k: v for k, v in SPEC.items() if k != "dataset"}
    spec.update(model={"kind": "mlp", "sizes": [64, 10]}, steps=2)
    with secant.Client(server.address) as client:
        for uri in (
            f"file://{link}/digits.npz",
            "nested/digits.safetensors",
            f"file://{data_root}/digits.npz",
        ):
            assert client.train(dict(spec, data_uri=uri)).steps == 2
        with pytest.raises(secant.SecantError) as err:
            client.train(dict(spec, data_uri=f"file://{link}/../outside.npz"))
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
