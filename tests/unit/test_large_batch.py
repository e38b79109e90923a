"""Large-batch pieces: batch arithmetic, LR scaling and warmup schedules, LARS/LAMB trust
ratios against a hand computation, gradient accumulation, mixed precision, activation
checkpointing and LoRA."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from workers.training.large_batch import (
    LAMB,
    LARS,
    LargeBatchPlan,
    LoRALinear,
    accumulate_gradients,
    apply_lora,
    autocast,
    effective_batch_size,
    enable_activation_checkpointing,
    exclude_bias_and_norm,
    grad_scaler,
    merge_lora,
    resolve,
    scaled_lr,
    warmup_schedule,
)
from workers.training.models import build_model


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _batch(rows: int = 24):
    g = torch.Generator().manual_seed(3)
    return torch.randn(rows, 6, generator=g), torch.randint(0, 3, (rows,), generator=g)


# ---------------------------------------------------------------- batch and LR


def test_effective_batch_is_micro_times_accumulation_times_workers():
    assert effective_batch_size(32, 4, 2) == 256
    assert LargeBatchPlan(micro_batch=16, accumulation=2, workers=4).effective_batch == 128
    with pytest.raises(ValueError, match="accumulation"):
        effective_batch_size(32, 0, 2)


@pytest.mark.parametrize("rule,expected", [("none", 0.1), ("linear", 0.8),
                                           ("sqrt", 0.1 * math.sqrt(8))])
def test_lr_scaling_rules_from_the_base_batch(rule, expected):
    assert scaled_lr(0.1, 32, 256, rule) == pytest.approx(expected)


def test_linear_warmup_ramps_from_start_to_target_in_equal_steps():
    schedule = warmup_schedule(0.8, "linear", steps=4, start_lr=0.1)
    assert [schedule(t) for t in range(6)] == pytest.approx(
        [0.1, 0.275, 0.45, 0.625, 0.8, 0.8])


def test_constant_warmup_holds_then_jumps_as_in_goyal():
    schedule = warmup_schedule(0.8, "constant", steps=3, start_lr=0.1)
    assert [schedule(t) for t in range(5)] == pytest.approx([0.1, 0.1, 0.1, 0.8, 0.8])


def test_warmup_hands_over_to_a_callable_target_schedule():
    decay = lambda t: 1.0 * 0.5 ** (t // 10)  # noqa: E731
    schedule = warmup_schedule(decay, "linear", steps=10, start_lr=0.0)
    assert schedule(5) == pytest.approx(0.5) and schedule(10) == pytest.approx(0.5)
    assert schedule(25) == pytest.approx(0.25)
    assert resolve(0.3, 7) == 0.3 and resolve(schedule, 0) == 0.0


def test_plan_schedule_warms_up_from_base_lr_to_the_scaled_lr():
    plan = LargeBatchPlan(micro_batch=32, accumulation=4, workers=2, base_batch=32,
                          base_lr=0.1, scaling="linear", warmup="linear", warmup_steps=7)
    schedule = plan.lr_schedule()
    assert plan.peak_lr == pytest.approx(0.8)
    assert schedule(0) == pytest.approx(0.1) and schedule(7) == pytest.approx(0.8)
    assert schedule(3) == pytest.approx(0.1 + 0.7 * 3 / 7)


@pytest.mark.parametrize("field,value", [
    ("micro_batch", 0), ("base_batch", -1), ("base_lr", float("nan")), ("scaling", "cubic"),
    ("warmup", "cosine"), ("warmup_steps", -2), ("precision", "fp8"), ("lora_rank", 2.5),
])
def test_plan_rejects_bad_settings_naming_the_field(field, value):
    settings = {"micro_batch": 8, field: value}
    with pytest.raises(ValueError, match=field):
        LargeBatchPlan(**settings)


def test_plan_refuses_a_warmup_without_steps():
    with pytest.raises(ValueError, match="warmup_steps"):
        LargeBatchPlan(micro_batch=8, warmup="linear")


# ---------------------------------------------------------------- LARS and LAMB


def test_lars_trust_ratio_and_update_match_a_hand_computation():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    w.grad, b.grad = torch.tensor([[0.6, 0.8]]), torch.tensor([0.5])  # ||g|| = 1
    groups = [{"params": [w], "weight_decay": 0.1, "adapt": True},
              {"params": [b], "weight_decay": 0.0, "adapt": False}]
    optimizer = LARS(groups, lr=0.5, momentum=0.9, trust_coefficient=0.01)

    optimizer.step()

    ratio = 0.01 * 5.0 / (1.0 + 0.1 * 5.0)  # eta ||w|| / (||g|| + wd ||w||)
    assert optimizer.last_trust_ratios[w].item() == pytest.approx(ratio)
    expected_w = torch.tensor([[3.0, 4.0]]) - 0.5 * ratio * (
        torch.tensor([[0.6, 0.8]]) + 0.1 * torch.tensor([[3.0, 4.0]]))
    torch.testing.assert_close(w.detach(), expected_w)
    assert b.item() == pytest.approx(1.0 - 0.5 * 0.5)  # excluded: plain SGD
    assert b not in optimizer.last_trust_ratios


def test_lamb_trust_ratio_and_update_match_a_hand_computation():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))
    w.grad = torch.tensor([0.2, -0.1])
    optimizer = LAMB([w], lr=0.1, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01)

    optimizer.step()

    g = torch.tensor([0.2, -0.1])
    m_hat = (0.1 * g) / (1 - 0.9)  # bias-corrected first step: g itself
    v_hat = (0.01 * g * g) / (1 - 0.99)
    r = m_hat / (v_hat.sqrt() + 1e-6) + 0.01 * torch.tensor([3.0, 4.0])
    ratio = 5.0 / r.norm()
    assert optimizer.last_trust_ratios[w].item() == pytest.approx(ratio.item(), rel=1e-5)
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0]) - 0.1 * ratio * r)


def test_bias_and_norm_parameters_are_excluded_from_adaptation_and_decay():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    weights, others = exclude_bias_and_norm(model, weight_decay=1e-4)
    assert [p.shape for p in weights["params"]] == [torch.Size([4, 4])]
    assert len(others["params"]) == 3 and others["weight_decay"] == 0 and not others["adapt"]


@pytest.mark.parametrize("cls", [LARS, LAMB])
def test_lars_and_lamb_train_a_small_model(cls):
    model, (X, y) = _mlp(), _batch(96)
    settings = {"lr": 1.0, "trust_coefficient": 0.01} if cls is LARS else {"lr": 0.05}
    optimizer = cls(exclude_bias_and_norm(model, weight_decay=1e-4), **settings)
    first = nn.functional.cross_entropy(model(X), y).item()
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        optimizer.step()
    assert nn.functional.cross_entropy(model(X), y).item() < 0.7 * first


# ---------------------------------------------------------------- accumulation, precision


def test_accumulating_k_micro_batches_equals_one_batch_k_times_larger():
    X, y = _batch(24)
    whole, accumulated = _mlp(), _mlp()
    nn.functional.cross_entropy(whole(X), y).backward()

    loss = accumulate_gradients(accumulated, nn.functional.cross_entropy, X, y, micro_batches=4)

    assert loss == pytest.approx(nn.functional.cross_entropy(whole(X), y).item(), rel=1e-5)
    for a, b in zip(whole.parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_accumulation_refuses_a_batch_that_does_not_split_evenly():
    X, y = _batch(10)
    with pytest.raises(ValueError, match="micro-batches"):
        accumulate_gradients(_mlp(), nn.functional.cross_entropy, X, y, micro_batches=3)


def test_bf16_autocast_runs_on_cpu_and_fp16_is_refused_there():
    X, y = _batch(8)
    model = _mlp()
    with autocast("cpu", "bf16"):
        out = model(X)
    assert out.dtype == torch.bfloat16
    assert grad_scaler("cpu", "bf16") is None and grad_scaler("cpu", "fp16") is None
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        autocast("cpu", "fp16")
    loss = accumulate_gradients(model, nn.functional.cross_entropy, X, y, 2, precision="bf16")
    assert math.isfinite(loss) and all(p.grad.dtype == torch.float32 for p in model.parameters())


# ---------------------------------------------------------------- activation checkpointing


@pytest.mark.parametrize("spec", [
    {"kind": "transformer", "vocab": 16, "context": 8, "width": 16, "layers": 2, "heads": 2},
    {"kind": "autoencoder", "input_dim": 12, "hidden": [10, 8], "bottleneck": 3},
], ids=["transformer", "autoencoder"])
def test_activation_checkpointing_keeps_outputs_gradients_and_names(spec):
    torch.manual_seed(0)
    plain = build_model(spec)
    torch.manual_seed(0)
    checkpointed = build_model(spec)
    x = torch.randint(0, 16, (3, 8)) if spec["kind"] == "transformer" else torch.randn(3, 12)

    blocks = enable_activation_checkpointing(checkpointed)

    assert blocks >= 2
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    plain(x).square().mean().backward()
    checkpointed(x).square().mean().backward()
    for a, b in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


# ---------------------------------------------------------------- LoRA


def test_lora_trains_only_the_adapters_and_leaves_the_base_unchanged():
    model, (X, y) = _mlp(), _batch(48)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = apply_lora(model, rank=2, alpha=4.0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = nn.functional.cross_entropy(model(X), y).item()

    for _ in range(30):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        optimizer.step()

    assert adapted == ["0", "2"]
    assert trainable == ["0.lora_a", "0.lora_b", "2.lora_a", "2.lora_b"]
    for name, value in base.items():
        layer, _, kind = name.partition(".")
        torch.testing.assert_close(model.get_submodule(f"{layer}.base").get_parameter(kind),
                                   value, rtol=0, atol=0)
    assert nn.functional.cross_entropy(model(X), y).item() < first
    merged_out = merge_lora(model)(X)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert merged_out.shape == (48, 3)


def test_a_fresh_lora_model_computes_the_base_model():
    model, (X, _) = _mlp(), _batch(5)
    expected = model(X)
    apply_lora(model, rank=4)
    torch.testing.assert_close(model(X), expected)
