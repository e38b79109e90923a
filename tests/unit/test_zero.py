"""ZeRO stages 0-3 behind zero.wrap: two gloo workers on 127.0.0.1 (torch.multiprocessing
spawn) follow 1-worker training on the same global batch, each worker holds the bytes the
ZeRO formulas say, and at stage 2 each gradient ends up on its owner only."""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import tempfile
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from workers.training.large_batch import accumulate_gradients
from workers.training.memory import MemoryProbe, zero_formula
from workers.training.zero import (
    ShardingPlan,
    ZeroStage,
    full_model_state_dict,
    no_sync,
    wrap,
)

WORLD = 2
STEPS = 20
GLOBAL_BATCH = 16
SPAWN_TIMEOUT_S = 60


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
    )


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(STEPS, GLOBAL_BATCH, 8, generator=g)
    y = torch.randint(0, 4, (STEPS, GLOBAL_BATCH), generator=g)
    return X, y


def _adam(params):
    return torch.optim.Adam(params, lr=1e-2)


def _reference_losses() -> tuple[list[float], dict[str, torch.Tensor]]:
    model, (X, y) = _mlp(), _data()
    optimizer = _adam(model.parameters())
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(X[step]), y[step])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, model.state_dict()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_workers(fn, *args) -> list:
    """Runs fn(rank, *args) on WORLD gloo ranks; returns each rank's result."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _worker_main, args=(fn, port, tmp, *args), nprocs=WORLD, join=True, start_method="spawn"
        )
        results = []
        for rank in range(WORLD):
            outcome = torch.load(os.path.join(tmp, f"{rank}.pt"), weights_only=False)
            if isinstance(outcome, str):
                pytest.fail(f"rank {rank} failed:\n{outcome}")
            results.append(outcome)
        return results


def _worker_main(rank: int, fn, port: int, tmp: str, *args) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=WORLD,
            timeout=timedelta(seconds=SPAWN_TIMEOUT_S),
        )
        outcome = fn(rank, *args)
    except BaseException:  # reported to the parent test, which fails with it
        outcome = traceback.format_exc()
    finally:
        # Models, hooks and optimizers in reference cycles still hold the gloo process
        # group; left to interpreter exit, its destruction there can abort (SIGABRT,
        # "terminate called without an active exception"). Free them while it is alive.
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(outcome, os.path.join(tmp, f"{rank}.pt"))


def _mean_losses(model, optimizer, X, y, rank: int, steps: int) -> list[float]:
    """Trains on this rank's slice of each global batch; the loss averaged over the ranks."""
    rows = GLOBAL_BATCH // WORLD
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        xb, yb = (t[step, rank * rows : (rank + 1) * rows] for t in (X, y))
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        optimizer.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / WORLD)
    return losses


def _train_every_stage(rank: int) -> dict:
    X, y = _data()
    out = {}
    for stage in ZeroStage:
        model, optimizer = wrap(_mlp(), _adam, ShardingPlan(stage=stage))
        losses = _mean_losses(model, optimizer, X, y, rank, STEPS)
        out[int(stage)] = (losses, full_model_state_dict(model))
        out[("accumulated", int(stage))] = _accumulated_losses(rank, stage, "float32")
    out[("bf16", 3)] = _accumulated_losses(rank, ZeroStage.PARAMETERS, "bfloat16")
    return out


def _accumulated_losses(rank: int, stage: ZeroStage, param_dtype: str) -> list[float]:
    """5 steps, each worker's slice as 2 micro-batches (communication on the last only)."""
    X, y = _data()
    rows = GLOBAL_BATCH // WORLD
    model, optimizer = wrap(_mlp(), _adam, ShardingPlan(stage=stage, param_dtype=param_dtype))
    losses = []
    for step in range(5):
        optimizer.zero_grad()
        xb, yb = (t[step, rank * rows : (rank + 1) * rows] for t in (X, y))
        local = accumulate_gradients(model, nn.functional.cross_entropy, xb, yb, 2, no_sync=no_sync)
        mean = torch.tensor([local])
        dist.all_reduce(mean)
        optimizer.step()
        losses.append(mean.item() / WORLD)
    return losses


def test_every_stage_at_two_workers_follows_one_worker_training():
    """20 steps per stage; also 5 steps with 2-micro-batch accumulation per stage, and 5 with
    a bf16 compute copy at stage 3 (bf16 tolerance)."""
    expected_losses, expected_weights = _reference_losses()

    results = _run_workers(_train_every_stage)

    for stage in ZeroStage:
        for rank, result in enumerate(results):
            losses, weights = result[int(stage)]
            assert losses == pytest.approx(expected_losses, rel=1e-4, abs=1e-5), (stage, rank)
            accumulated = result[("accumulated", int(stage))]
            assert accumulated == pytest.approx(expected_losses[:5], rel=1e-4, abs=1e-5)
            for name, value in expected_weights.items():
                torch.testing.assert_close(
                    weights[name],
                    value,
                    rtol=1e-4,
                    atol=1e-5,
                    msg=f"stage {stage} rank {rank} {name}",
                )
    for result in results:
        assert result[("bf16", 3)] == pytest.approx(expected_losses[:5], rel=3e-2)


def _stage3_paths(rank: int) -> dict:
    """5 steps each: (a) no module matches shard_modules, so the root holds every parameter
    and its reduce-scatter runs inside FSDP2's end-of-backward callback; (b) two
    synchronising backward passes per step (the second adds into .grad) after
    zero_grad(set_to_none=False)."""
    X, y = _data()
    rows = GLOBAL_BATCH // WORLD
    out = {}
    model, optimizer = wrap(_mlp(), _adam, ShardingPlan(stage=3, shard_modules=(nn.Conv1d,)))
    out["root"] = _mean_losses(model, optimizer, X, y, rank, 5)
    model, optimizer = wrap(_mlp(), _adam, ShardingPlan(stage=3))
    losses = []
    for step in range(5):
        optimizer.zero_grad(set_to_none=False)
        xb, yb = (t[step, rank * rows : (rank + 1) * rows] for t in (X, y))
        total = 0.0
        for xh, yh in zip(xb.chunk(2), yb.chunk(2), strict=True):
            loss = nn.functional.cross_entropy(model(xh), yh) / 2
            loss.backward()
            total += loss.item()
        optimizer.step()
        mean = torch.tensor([total])
        dist.all_reduce(mean)
        losses.append(mean.item() / WORLD)
    out["two_backwards"] = losses
    return out


def test_stage_3_root_only_and_gradients_added_across_backwards():
    expected_losses, _ = _reference_losses()

    results = _run_workers(_stage3_paths)

    for result in results:
        for key in ("root", "two_backwards"):
            assert result[key] == pytest.approx(expected_losses[:5], rel=1e-4, abs=1e-5), key


WIDTH, DEPTH = 512, 4  # P = 4 * (512 * 512 + 512) ~ 1.05M: padding cannot dominate


def _wide() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH)])


def _measure_every_stage(rank: int) -> dict:
    out = {}
    xb = torch.randn(4, WIDTH)
    for stage in ZeroStage:
        model, optimizer = wrap(_wide(), _adam, ShardingPlan(stage=stage))
        probe = MemoryProbe(model, optimizer)
        with probe:
            model(xb).square().mean().backward()
            optimizer.step()
        out[int(stage)] = probe.report(stage, WORLD, rank)
    return out


def test_each_worker_holds_what_the_zero_formula_says():
    results = _run_workers(_measure_every_stage)

    for reports in results:
        for stage in ZeroStage:
            report = reports[int(stage)]
            formula = zero_formula(stage, report.parameter_count, WORLD)
            assert report.formula == formula
            assert report.measured.parameters == pytest.approx(formula.parameters, rel=0.05)
            assert report.measured.gradients == pytest.approx(formula.gradients, rel=0.05)
            assert report.measured.optimizer == pytest.approx(formula.optimizer, rel=0.05)
            assert report.ratio == pytest.approx(1.0, abs=0.05)
        # Stage 2 is ZeRO-2 as the paper counts it: one replicated fp32 copy of the
        # parameters, in the step and between steps (no second, sharded master copy).
        stage2 = reports[2]
        p = stage2.parameter_count
        assert stage2.at_rest_parameters == stage2.measured.parameters == 4 * p
    # Every gradient is held by exactly one worker, its owner: 4P in all.
    assert sum(reports[2].measured.gradients for reports in results) == 4 * p


class _TwoHeads(nn.Module):
    """A body and two heads; `extra` is used only when asked (on one rank, below)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head, self.extra = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, use_extra: bool = True) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        return self.head(h) + self.extra(h) if use_extra else self.head(h)


def _two_head_loss(model: nn.Module, rank: int, micro: int) -> torch.Tensor:
    """Rank `rank`'s micro-batch `micro` of 2, scaled as accumulation over 2 micro-batches."""
    X, y = _data()
    rows = GLOBAL_BATCH // WORLD // 2
    start = rank * 2 * rows + micro * rows
    xb, yb = X[0, start : start + rows], y[0, start : start + rows]
    return nn.functional.cross_entropy(model(xb, use_extra=rank == 0), yb) / 2


def _stage2_gradients(rank: int) -> dict:
    model, _ = wrap(_TwoHeads(), _adam, ShardingPlan(stage=2))
    model, optimizer = wrap(model, _adam, ShardingPlan(stage=2))  # replaces the first's hooks
    for micro in range(2):
        with no_sync(model) if micro == 0 else contextlib.nullcontext():
            _two_head_loss(model, rank, micro).backward()
    grads = {
        name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()
    }
    optimizer.step()
    return {"grads": grads, "weights": full_model_state_dict(model)}


def test_stage_2_reduces_each_gradient_to_its_owner_only():
    """2 micro-batches per rank, no_sync on the first (a no-op at stage 2: every micro-batch
    is reduced), a head only rank 0 uses (rank 1 contributes zeros for it), and a model
    wrapped twice (the second wrap's hooks replace the first's: nothing is reduced twice)."""
    reference = _TwoHeads()
    for rank in range(WORLD):
        for micro in range(2):
            (_two_head_loss(reference, rank, micro) / WORLD).backward()

    results = _run_workers(_stage2_gradients)

    for name, p in reference.named_parameters():
        held = [r["grads"][name] for r in results if r["grads"][name] is not None]
        assert len(held) == 1, name
        torch.testing.assert_close(held[0], p.grad, rtol=1e-5, atol=1e-7, msg=name)
    for name, value in results[0]["weights"].items():
        torch.testing.assert_close(results[1]["weights"][name], value, rtol=0, atol=0)


def _reference_gradients() -> dict[str, torch.Tensor]:
    """The averaged gradient of step 0's global batch, 1 worker."""
    model, (X, y) = _mlp(), _data()
    nn.functional.cross_entropy(model(X[0]), y[0]).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _stage3_gradients_without_deferral(rank: int) -> dict:
    """Two units settings under which FSDP2 reads the reduce-scatter output as soon as the
    custom reduce-scatter returns: forced SUM (post-divide by N after it) and an all-reduce
    hook (tripling it). Returns each parameter's full gradient."""
    from torch.distributed.fsdp import FSDPModule

    X, y = _data()
    rows = GLOBAL_BATCH // WORLD
    xb, yb = X[0, rank * rows : (rank + 1) * rows], y[0, rank * rows : (rank + 1) * rows]
    out = {}
    for setting in ("sum", "hook"):
        model, _ = wrap(_mlp(), _adam, ShardingPlan(stage=3))
        for module in model.modules():
            if isinstance(module, FSDPModule):
                if setting == "sum":
                    module.set_force_sum_reduction_for_comms(True)
                elif module._get_fsdp_state()._fsdp_param_groups:
                    module.set_all_reduce_hook(lambda t: t.mul_(3))
        nn.functional.cross_entropy(model(xb), yb).backward()
        out[setting] = {name: p.grad.full_tensor().clone() for name, p in model.named_parameters()}
    return out


def test_stage_3_defers_only_reduce_scatters_nothing_reads_at_once():
    """FSDP2 post-divides a SUM reduce-scatter's output and runs the all-reduce hook on it
    right after the custom reduce-scatter returns: those are summed at once, not deferred."""
    expected = _reference_gradients()

    results = _run_workers(_stage3_gradients_without_deferral)

    for rank, result in enumerate(results):
        for name, grad in expected.items():
            torch.testing.assert_close(
                result["sum"][name], grad, rtol=1e-5, atol=1e-7, msg=f"sum {rank} {name}"
            )
            torch.testing.assert_close(
                result["hook"][name], 3 * grad, rtol=1e-5, atol=1e-7, msg=f"hook {rank} {name}"
            )


def _checkpointed_mlp() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(256, 256), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(256, 4))


def _gathers_per_step(rank: int) -> dict:
    """All-gathers per step at stage 3, 3 steps, without and with activation checkpointing
    ([Linear, Tanh] groups, recomputed in backward), and the weights after them."""
    from workers.training import zero
    from workers.training.large_batch import enable_activation_checkpointing

    calls = [0]
    gather = zero._P2PAllGather.__call__

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return gather(self, *args, **kwargs)

    zero._P2PAllGather.__call__ = counting
    out = {}
    for checkpointed in (False, True):
        model = _checkpointed_mlp()
        if checkpointed:
            enable_activation_checkpointing(model)
        model, optimizer = wrap(model, _adam, ShardingPlan(stage=3))
        generator = torch.Generator().manual_seed(rank)
        counts = []
        for _ in range(3):
            calls[0] = 0
            optimizer.zero_grad()
            model(torch.randn(8, 256, generator=generator)).square().mean().backward()
            optimizer.step()
            counts.append(calls[0])
        out[checkpointed] = (counts, full_model_state_dict(model))
    return out


def test_stage_3_forward_prefetch_skips_activation_checkpointing_recompute():
    """The recompute runs each unit's forward inside backward, after the next unit's
    backward: a forward prefetch there would gather a unit nobody uses (and nobody waits on
    until backward ends). 5 units: 5 gathers in forward, 5 in backward, either way."""
    results = _run_workers(_gathers_per_step)

    for result in results:
        plain, plain_weights = result[False]
        checkpointed, checkpointed_weights = result[True]
        assert plain == [10, 10, 10]
        assert checkpointed == plain
        for name, value in plain_weights.items():
            torch.testing.assert_close(checkpointed_weights[name], value, msg=name)


class _HookRaised(RuntimeError):
    pass


def _raise(_grad: torch.Tensor) -> None:
    raise _HookRaised("injected failure in backward")


def _stage2_after_failed_backward(rank: int) -> dict:
    """Step 0's backward raises on every rank (a tensor hook, half way through backward,
    after some reduces were launched); steps 1-2 then train as usual."""
    X, y = _data()
    rows = GLOBAL_BATCH // WORLD
    model, optimizer = wrap(_mlp(), _adam, ShardingPlan(stage=2))
    handle = model[2].weight.register_hook(_raise)
    optimizer.zero_grad()
    xb, yb = (t[0, rank * rows : (rank + 1) * rows] for t in (X, y))
    try:
        nn.functional.cross_entropy(model(xb), yb).backward()
    except _HookRaised:
        pass
    else:
        raise AssertionError("the hook did not raise")
    handle.remove()
    losses, grads = [], []
    for step in (1, 2):
        optimizer.zero_grad()
        xb, yb = (t[step, rank * rows : (rank + 1) * rows] for t in (X, y))
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        grads.append(
            {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        )
        optimizer.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / WORLD)
    return {"losses": losses, "grads": grads, "weights": full_model_state_dict(model)}


def test_stage_2_recovers_from_a_backward_that_raised():
    model, (X, y) = _mlp(), _data()
    optimizer = _adam(model.parameters())
    losses, grads = [], []
    for step in (1, 2):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(X[step]), y[step])
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        optimizer.step()
        losses.append(loss.item())

    results = _run_workers(_stage2_after_failed_backward)

    for rank, result in enumerate(results):
        assert result["losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6), rank
        for name, value in model.state_dict().items():
            torch.testing.assert_close(result["weights"][name], value, msg=f"{rank} {name}")
    for step in range(2):
        for name, grad in grads[step].items():
            held = [r["grads"][step][name] for r in results if r["grads"][step][name] is not None]
            assert len(held) == 1, (step, name)
            torch.testing.assert_close(held[0], grad, rtol=1e-5, atol=1e-7, msg=name)


def _stage2_unused_head(rank: int) -> dict:
    model, optimizer = wrap(
        _TwoHeads(),
        lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=0.1),
        ShardingPlan(stage=2),
    )
    before = {n: p.detach().clone() for n, p in model.extra.named_parameters()}
    for micro in range(2):  # `extra` is used by no rank, in either micro-batch
        X, y = _data()
        xb, yb = X[micro, rank * 4 : rank * 4 + 4], y[micro, rank * 4 : rank * 4 + 4]
        nn.functional.cross_entropy(model(xb, use_extra=False), yb).backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    after = {n: p.detach().clone() for n, p in model.extra.named_parameters()}
    return {"grads": grads, "before": before, "after": after}


def test_stage_2_parameter_no_rank_uses_keeps_no_gradient():
    """As in a 1-worker run, a parameter without a gradient anywhere ends with .grad None on
    every rank (its owner included), so Adam's weight decay does not move it."""
    results = _run_workers(_stage2_unused_head)

    for result in results:
        assert result["grads"]["extra.weight"] is None
        assert result["grads"]["extra.bias"] is None
        for name, value in result["before"].items():
            torch.testing.assert_close(result["after"][name], value, rtol=0, atol=0)
    for name in ("body.weight", "body.bias", "head.weight", "head.bias"):
        assert sum(r["grads"][name] is not None for r in results) == 1, name


@pytest.mark.parametrize(
    "field,value",
    [
        ("stage", 4),
        ("stage", "2"),
        ("stage", True),
        ("param_dtype", "float8"),
        ("bucket_cap_mb", 0),
    ],
)
def test_sharding_plan_rejects_bad_settings_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"ShardingPlan.{field}"):
        ShardingPlan(**{field: value})


def test_bf16_compute_copy_needs_sharded_parameters():
    for stage in (1, 2):
        with pytest.raises(ValueError, match="param_dtype"):
            ShardingPlan(stage=stage, param_dtype="bfloat16")
    assert ShardingPlan(stage=3, param_dtype="bfloat16").stage is ZeroStage.PARAMETERS


def test_formulas_match_the_zero_paper():
    p, n = 1_000_000, 4
    assert zero_formula(0, p, n).total == 16 * p
    assert zero_formula(1, p, n).total == 8 * p + 8 * p // n
    assert zero_formula(2, p, n).total == 4 * p + 12 * p // n
    assert zero_formula(3, p, n).total == 16 * p // n
    assert zero_formula(1, p, n, "mixed").total == 4 * p + 12 * p // n
    assert zero_formula(2, p, n, "mixed").total == 2 * p + 14 * p // n
    assert zero_formula(3, p, n, "mixed").total == 16 * p // n
