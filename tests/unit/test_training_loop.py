"""The single-process training loop: every optimizer trains, metrics stream, weights
round-trip, full-batch L-BFGS matches scipy's L-BFGS-B on the same flattened problem."""

from __future__ import annotations

import pytest
import scipy.optimize
import torch

from workers.solvers import minimize
from workers.training.datasets import load_dataset
from workers.training.loop import (
    TrainSpec,
    flat_objective,
    load_weights,
    loss_function,
    save_weights,
    train,
)
from workers.training.models import build_model

pytest.importorskip("sklearn")

DIGITS_MLP = {"kind": "mlp", "sizes": [64, 32, 10]}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.mark.parametrize("optimizer", [
    {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
    {"name": "adam", "lr": 1e-2},
    {"name": "adamw", "lr": 1e-2, "weight_decay": 1e-2},
    {"name": "kfac", "lr": 0.1, "momentum": 0.9, "damping": 1e-2, "compute_method": "inverse"},
    {"name": "natural-gradient", "lr": 0.5, "damping": 1e-2},
    {"name": "lbfgs", "max_iter": 20},
    {"name": "adam->lbfgs", "lr": 3e-3, "adam_steps": 10, "max_iter": 10},
], ids=lambda o: o["name"])
def test_every_optimizer_lowers_the_training_loss(digits, optimizer):
    X, y = digits
    X, y = X[:400], y[:400]
    spec = {"model": DIGITS_MLP, "loss": "cross_entropy", "optimizer": optimizer,
            "batch_size": 64, "steps": 20, "seed": 0}
    initial = train({**spec, "steps": 0, "optimizer": {"name": "sgd"}}, X, y)
    result = train(spec, X, y)
    assert result.metrics["train_loss"] < 0.7 * initial.metrics["train_loss"]
    # chance is 0.1 and the untrained net scores 0.075; the weakest of these reaches ~0.79
    assert initial.metrics["val_accuracy"] < 0.2 < 0.6 < result.metrics["val_accuracy"] <= 1.0


def test_steps_stream_contiguously_with_their_metrics(digits):
    X, y = digits
    seen = []
    result = train({"model": DIGITS_MLP, "optimizer": {"name": "kfac", "lr": 0.05},
                    "steps": 12, "batch_size": 32, "eval_every": 4}, X[:300], y[:300],
                   callback=seen.append)
    assert [m.step for m in seen] == list(range(1, 13)) and result.steps == 12
    assert all(m.damping == pytest.approx(1e-3) and m.lr == 0.05 for m in seen)
    assert all(m.step_time_s > 0 and m.samples_per_s > 0 for m in seen)
    assert [m.step for m in seen if m.train_loss is not None] == [4, 8, 12]
    assert set(result.preconditioner_state) >= {"steps", "0/a_factor", "2/g_factor"}


def test_callback_returning_true_stops_the_run(digits):
    X, y = digits
    result = train({"model": DIGITS_MLP, "optimizer": {"name": "lbfgs", "max_iter": 50}},
                   X[:200], y[:200], callback=lambda m: m.step >= 3)
    assert result.stopped_early and result.steps == 3


def test_saved_weights_reproduce_the_reported_validation_accuracy(digits):
    X, y = digits
    spec = {"model": {"kind": "cnn", "image_size": 8, "channels": [4], "classes": 10},
            "optimizer": {"name": "adam", "lr": 1e-2}, "steps": 30, "seed": 3}
    result = train(spec, X, y)
    model = load_weights(build_model(spec["model"]), save_weights(result.model))
    from workers.training.loop import evaluate, split

    _, _, X_val, y_val = split(X, y, 0.2, seed=3)
    assert evaluate(model, "cross_entropy", X_val, y_val)["accuracy"] == \
        result.metrics["val_accuracy"]


def test_breast_cancer_trains_with_bce(digits):
    X, y = load_dataset("breast_cancer")
    result = train({"model": {"kind": "mlp", "sizes": [30, 16, 1]}, "loss": "bce",
                    "optimizer": {"name": "kfac", "lr": 0.1, "momentum": 0.9}, "epochs": 3}, X, y)
    assert result.metrics["val_accuracy"] > 0.85


def test_transformer_trains_on_token_sequences():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 8, (64, 9), generator=generator)
    model = {"kind": "transformer", "vocab": 8, "context": 8, "width": 16, "layers": 1,
             "heads": 2}
    spec = {"model": model, "optimizer": {"name": "kfac", "lr": 0.05}, "steps": 20,
            "batch_size": 16}
    initial = train({**spec, "steps": 0}, tokens[:, :-1], tokens[:, 1:])
    result = train(spec, tokens[:, :-1], tokens[:, 1:])
    # 20 K-FAC steps take the loss from 2.30 (uniform over 8 tokens) to 1.89
    assert result.metrics["train_loss"] < 0.9 * initial.metrics["train_loss"]
    # accuracy is per predicted token: it once counted tokens over sequences and passed 1
    for metrics in (initial.metrics, result.metrics):
        assert 0.0 <= metrics["train_accuracy"] <= 1.0 and 0.0 <= metrics["val_accuracy"] <= 1.0
    assert result.metrics["train_accuracy"] > initial.metrics["train_accuracy"]


@pytest.mark.parametrize(("spec", "field"), [
    ({}, "model"),
    ({"model": DIGITS_MLP, "loss": "hinge"}, "loss"),
    ({"model": DIGITS_MLP, "optimizer": {"name": "rmsprop"}}, "optimizer.name"),
    ({"model": DIGITS_MLP, "optimizer": {"name": "sgd", "lr": -1}}, "optimizer.lr"),
    ({"model": DIGITS_MLP, "optimizer": {"name": "sgd", "damping": 1}}, "damping"),
    ({"model": DIGITS_MLP, "optimizer": {"name": "kfac", "compute_method": "qr"}},
     "optimizer.compute_method"),
    ({"model": DIGITS_MLP, "optimizer": {"name": "adam", "betas": [0.9]}}, "optimizer.betas"),
    ({"model": DIGITS_MLP, "batch_size": -1}, "batch_size"),
    ({"model": DIGITS_MLP, "validation_fraction": 0.95}, "validation_fraction"),
    ({"model": DIGITS_MLP, "learning_rate": 0.1}, "learning_rate"),
])
def test_bad_training_spec_is_a_value_error_naming_the_field(digits, spec, field):
    X, y = digits
    with pytest.raises(ValueError, match=field):
        train(spec, X[:10], y[:10])


def test_full_batch_lbfgs_reaches_scipy_lbfgsb_loss_on_the_flattened_problem():
    # a small regression net in float64 on a smooth target
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(64, 2, generator=generator, dtype=torch.float64)
    noise = 0.1 * torch.randn(64, 1, generator=generator, dtype=torch.float64)
    y = torch.tanh(X[:, :1] - 0.5 * X[:, 1:2]) + noise  # noise: the minimum loss is not 0
    torch.manual_seed(0)
    model = build_model({"kind": "mlp", "sizes": [2, 4, 1], "activation": "tanh"}).double()
    objective = flat_objective(model, loss_function("mse"), X, y)
    x0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    ours = minimize(objective, x0, method="l-bfgs", options={"max_iter": 300, "gtol": 1e-9})

    def fun_and_grad(x):
        point = torch.tensor(x, requires_grad=True)
        value = objective(point)
        (grad,) = torch.autograd.grad(value, point)
        return float(value.detach()), grad.numpy()

    reference = scipy.optimize.minimize(fun_and_grad, x0.numpy(), jac=True, method="L-BFGS-B",
                                        options={"maxiter": 300, "gtol": 1e-9, "ftol": 0.0})
    # Same x0, same memory (10), same iteration budget. The problem is nonconvex and its
    # valley is flat (neither run meets gtol in 300 iterations), so the two paths differ in
    # the last digits; the claim is that ours gets at least as low as scipy's, up to 1% of
    # the fitted loss, which is far below the noise floor's scale (the loss falls ~50x).
    assert reference.fun < 0.05 * float(objective(x0).detach())  # really fitted
    assert ours.fun <= reference.fun * 1.01 + 1e-10


# ---------------------------------------------------------------- the scaling section (issue 8)

SCALED = {"model": DIGITS_MLP, "optimizer": {"name": "adam", "lr": 1e-2}, "batch_size": 32,
          "steps": 6, "seed": 1}


@pytest.mark.parametrize(("scaling", "message"), [
    ({"zero_stage": 4}, "scaling.zero_stage"),
    ({"zero_stage": "1"}, "scaling.zero_stage"),
    ({"micro_batch_size": 0}, "scaling.micro_batch_size"),
    ({"accumulation_steps": True}, "scaling.accumulation_steps"),
    ({"lr_scaling": "cubic", "base_batch_size": 8}, "scaling.lr_scaling"),
    ({"lr_scaling": "linear"}, "scaling.base_batch_size"),
    ({"warmup": {"kind": "cosine", "steps": 3}}, "scaling.warmup.kind"),
    ({"warmup": {"kind": "linear", "steps": 0}}, "scaling.warmup.steps"),
    ({"precision": "fp8"}, "scaling.precision"),
    ({"activation_checkpointing": 1}, "scaling.activation_checkpointing"),
    ({"lora": {"rank": 0}}, "scaling.lora.rank"),
    ({"lora": {"rank": 2, "alpha": -1}}, "scaling.lora.alpha"),
    ({"shards": 2}, "scaling: unknown field"),
    ([1], "scaling must be a dict"),
])
def test_scaling_section_rejects_bad_fields_naming_them(scaling, message):
    with pytest.raises(ValueError, match=message):
        TrainSpec.parse({**SCALED, "scaling": scaling})


@pytest.mark.parametrize(("spec", "message"), [
    ({"optimizer": {"name": "kfac"}, "scaling": {"zero_stage": 2}},
     "zero_stage must be 0 with optimizer kfac"),
    ({"optimizer": {"name": "kfac"}, "scaling": {"accumulation_steps": 2}},
     "accumulation_steps must be 1"),
    ({"optimizer": {"name": "lbfgs"}, "scaling": {}}, "takes no scaling section"),
    ({"scaling": {"micro_batch_size": 8, "accumulation_steps": 2}}, "must equal"),
    ({"scaling": {"accumulation_steps": 3}}, "multiple of scaling.accumulation_steps"),
    ({"scaling": {"precision": "fp16"}}, "fp16 needs a CUDA device"),
    ({"batch_size": 0, "scaling": {"micro_batch_size": 4096}}, "exceeds"),
])
def test_scaling_plans_that_cannot_run_are_refused_before_training(digits, spec, message):
    X, y = digits
    with pytest.raises(ValueError, match=message):
        train({**SCALED, **spec}, X[:400], y[:400])


def test_accumulation_and_micro_batches_follow_the_plain_run_and_report_memory(digits):
    X, y = digits
    plain = train(SCALED, X, y)
    reports: list = []
    scaled = train({**SCALED, "batch_size": 32,
                    "scaling": {"micro_batch_size": 8, "accumulation_steps": 4}},
                   X, y, on_memory=reports.append)
    assert [m.loss for m in scaled.history] == pytest.approx(
        [m.loss for m in plain.history], rel=1e-5)
    assert scaled.effective_batch == 32 and scaled.history[0].effective_batch == 32
    [[report]] = reports  # once, after the first step; one worker
    assert report.measured.total == pytest.approx(report.formula.total, rel=0.05)
    assert report.formula.total == 16 * report.parameter_count


def test_lr_scaling_and_warmup_drive_the_step_lr(digits):
    X, y = digits
    result = train({**SCALED, "scaling": {"lr_scaling": "linear", "base_batch_size": 16,
                                          "warmup": {"kind": "linear", "steps": 4}}}, X, y)
    assert [m.lr for m in result.history] == pytest.approx(
        [0.01, 0.0125, 0.015, 0.0175, 0.02, 0.02])
    kfac = train({**SCALED, "optimizer": {"name": "kfac", "lr": 0.1},
                  "scaling": {"lr_scaling": "sqrt", "base_batch_size": 8,
                              "warmup": {"kind": "constant", "steps": 2}}}, X, y)
    assert [m.lr for m in kfac.history] == pytest.approx([0.1, 0.1] + [0.2] * 4)


@pytest.mark.parametrize("spec", [
    {"optimizer": {"name": "lars", "lr": 1.0, "momentum": 0.9, "trust_coefficient": 0.02,
                   "weight_decay": 1e-4},
     "scaling": {"precision": "bf16", "activation_checkpointing": True}},
    {"optimizer": {"name": "adam", "lr": 3e-2}, "scaling": {"lora": {"rank": 4}}},
], ids=["lars-bf16-checkpointing", "adam-lora"])
def test_large_batch_options_train_and_export_plain_zoo_weights(digits, spec):
    X, y = digits
    result = train({**SCALED, **spec, "steps": 20}, X[:600], y[:600])
    assert result.metrics["train_loss"] < 0.8 * result.history[0].loss
    model = load_weights(build_model(DIGITS_MLP), save_weights(result.model))  # LoRA merged
    if "lora" in spec["scaling"]:  # only the adapters trained: W - W0 has rank <= 4
        torch.manual_seed(SCALED["seed"])
        initial = build_model(DIGITS_MLP).state_dict()
        for name, value in model.state_dict().items():
            change = value - initial[name]
            if name.endswith("bias"):
                assert torch.equal(change, torch.zeros_like(change)), name
            else:
                assert 0 < torch.linalg.matrix_rank(change) <= 4, name
