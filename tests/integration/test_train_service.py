"""Training jobs through the real gateway and SDK: Train streams per-step metrics, the
weights come back as an artifact and reproduce the reported validation accuracy."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

import secant
from secant.v1 import optimizer_pb2 as pb
from workers.training.datasets import load_dataset
from workers.training.loop import evaluate, split

pytestmark = pytest.mark.integration

SPEC = {
    "model": {"kind": "mlp", "sizes": [64, 32, 10], "activation": "tanh"},
    "loss": "cross_entropy",
    "optimizer": {"name": "kfac", "lr": 0.1, "damping": 0.01},
    "batch_size": 128,
    "steps": 30,
    "seed": 3,
    "validation_fraction": 0.2,
    "dataset": "digits",
    "workers": 2,
}


@pytest.fixture(scope="module")
def run(gateway):
    with secant.Client(gateway) as client:  # open while the tests fetch the weights
        yield client.train(SPEC)


def test_training_job_streams_contiguous_steps_and_metrics(run, gateway):
    assert [step for step, _ in run.history] == list(range(1, SPEC["steps"] + 1))
    assert all("loss" in values and "lr" in values for _, values in run.history)
    assert run.steps == SPEC["steps"]
    assert 0.0 <= run.metrics["val_accuracy"] <= 1.0
    with grpc.insecure_channel(gateway) as channel:
        job = secant.v1.optimizer_pb2_grpc.OptimizerStub(channel).GetJob(
            pb.GetJobRequest(job_id=run.job_id))
    assert job.kind == "train" and job.state == pb.SUCCEEDED
    assert job.train_result.steps == SPEC["steps"]


def test_returned_weights_reproduce_the_reported_validation_accuracy(run):
    model = run.model()
    X, y = load_dataset("digits")
    _, _, X_val, y_val = split(X, y, SPEC["validation_fraction"], SPEC["seed"])
    scores = evaluate(model, "cross_entropy", X_val, y_val)
    assert scores["accuracy"] == pytest.approx(run.metrics["val_accuracy"], abs=1e-9)
    assert run.metrics["val_accuracy"] > 0.5  # 30 K-FAC steps learn digits


def test_a_bad_training_spec_is_invalid_argument(gateway):
    bad = dict(SPEC, model={"kind": "mlp", "sizes": [64]})
    with secant.Client(gateway) as client, pytest.raises(secant.SecantError) as err:
        client.train(bad)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "sizes" in err.value.message


def test_artifact_of_an_unknown_job_is_not_found(gateway):
    with grpc.insecure_channel(gateway) as channel:
        stub = secant.v1.optimizer_pb2_grpc.OptimizerStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetArtifact(pb.GetArtifactRequest(job_id="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_uploaded_data_trains_too(gateway):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 5))
    y = (X @ np.arange(5.0) > 0).astype(np.int64)
    spec = {"model": {"kind": "mlp", "sizes": [5, 8, 2]}, "loss": "cross_entropy",
            "optimizer": "adam", "batch_size": 50, "steps": 5, "seed": 0}
    with secant.Client(gateway) as client:
        run = client.train(spec, data={"X": X, "y": y})
        weights = run.state_dict()
    assert run.steps == 5
    assert weights and all(isinstance(t, torch.Tensor) for t in weights.values())


def test_secant_train_cli_writes_the_weights(gateway, tmp_path, capsys):
    from secant.cli import main

    spec = tmp_path / "spec.yaml"
    spec.write_text("model: {kind: mlp, sizes: [64, 16, 10]}\noptimizer: sgd\nsteps: 3\n"
                    "dataset: digits\nbatch_size: 64\n")
    weights = tmp_path / "w.safetensors"
    code = main(["--address", gateway, "train", str(spec), "-q", "-o", str(weights)])
    assert code == 0
    assert '"steps": 3' in capsys.readouterr().out
    assert weights.stat().st_size > 0


def test_a_zero_stage_3_job_reports_its_memory_next_to_the_formula(gateway_server):
    spec = {"model": {"kind": "mlp", "sizes": [64, 32, 10]}, "loss": "cross_entropy",
            "optimizer": "adam", "batch_size": 64, "steps": 3, "seed": 0, "dataset": "digits",
            "workers": 2, "scaling": {"zero_stage": 3}}
    with secant.Client(gateway_server.address) as client:
        run = client.train(spec)
    memory = [values for step, values in run.history if step == 0]
    assert memory, "no memory report event"
    report = memory[0]
    assert report["zero_stage"] == 3 and report["workers"] == 2
    assert {"mem_formula_param_bytes", "mem_param_bytes_rank0", "mem_param_bytes_rank1"} <= set(
        report)
    import urllib.request

    with urllib.request.urlopen(gateway_server.metrics_url, timeout=5) as response:
        exposition = response.read().decode()
    assert 'secant_train_memory_bytes{kind="optimizer",rank="1",stage="3"}' in exposition
