"""ZeRO stages 0-3 (workers/training/zero.py) at 2 gloo workers on CPU, and a miniature of
Goyal et al.'s large-batch table on digits, in one run.

Part 1. A 10-layer 1000-wide MLP (about 10.0M parameters), Adam, global batch 64 (32 per
worker), 2 spawned workers on 127.0.0.1 with one thread each. Each worker wraps four copies
of the model (stages 0, 1, 2, 3) and steps them round-robin, so every stage sees the same
machine noise; per stage: per-worker bytes of parameters / gradients / optimizer state held
(memory.MemoryProbe on the first step) next to the ZeRO formula, and the median step time
(forward + backward + optimizer step, the slower worker's) relative to DDP. FACTS.md's
reference ratios for the libraries on the same task: ZeroRedundancyOptimizer 1.13x, DeepSpeed
stage 2 1.55x, stage 3 2.04x, FSDP2 full shard 1.9x (DDP 138 ms).

Part 2. digits, MLP 64-128-10, SGD momentum 0.9, same number of epochs for every run: base
batch 32 at lr 0.1; batch 256 with linear scaling (lr 0.8) and linear warmup over the first
`--warmup-epochs`; batch 256 at lr 0.1 (no scaling); batch 256 at lr 0.8 without warmup.
Validation accuracy, mean and spread over seeds.

`--malloc-thresholds` pins glibc's mmap and trim thresholds in both workers (mallopt; what
jemalloc / tcmalloc do by default) for every stage alike: freed blocks stay with the process
instead of going back to the OS and being page-faulted in again on the next step. DDP does
not notice (it re-allocates little); the sharded stages do, stage 3 most (FSDP2 gathers and
frees each unit's parameters twice a step). Off by default: the table then shows what a
stock worker gets.

    python bench/zero.py [--steps 12] [--epochs 30] [--seeds 3] [--skip-zero]
                         [--skip-large-batch] [--malloc-thresholds]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workers.training.datasets import load_dataset  # noqa: E402
from workers.training.large_batch import (  # noqa: E402
    LargeBatchPlan,
    resolve,
    set_lr,
)
from workers.training.loop import split  # noqa: E402
from workers.training.memory import MemoryProbe  # noqa: E402
from workers.training.zero import ShardingPlan, ZeroStage, wrap  # noqa: E402

WORLD = 2
WIDTH, DEPTH, BATCH = 1000, 10, 64
FACTS_RATIO = {
    1: "1.13 (ZeroRedundancyOptimizer)",
    2: "1.55 (DeepSpeed)",
    3: "2.04 (DeepSpeed), 1.9 (FSDP2)",
}
MB = 2**20


def _model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(DEPTH):
        layers.append(nn.Linear(WIDTH, WIDTH))
        if i < DEPTH - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _adam(params):
    return torch.optim.Adam(params, lr=1e-4)


def _pin_malloc_thresholds() -> None:
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    if not (libc.mallopt(m_mmap_threshold, 32 * MB) and libc.mallopt(m_trim_threshold, 2**30)):
        raise RuntimeError("mallopt refused the thresholds")


def _worker(rank: int, port: int, steps: int, out_dir: str, malloc_thresholds: bool) -> None:
    torch.set_num_threads(1)
    try:
        if malloc_thresholds:
            _pin_malloc_thresholds()
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=WORLD,
            timeout=timedelta(seconds=120),
        )
        rows = BATCH // WORLD
        g = torch.Generator().manual_seed(rank)
        xb, target = torch.randn(rows, WIDTH, generator=g), torch.randn(rows, WIDTH, generator=g)
        runs = {s: wrap(_model(), _adam, ShardingPlan(stage=s)) for s in ZeroStage}
        memory, times = {}, {int(s): [] for s in ZeroStage}
        for step in range(steps + 2):  # 2 warm-up steps, not timed
            for stage, (model, optimizer) in runs.items():
                dist.barrier()
                probe = MemoryProbe(model, optimizer) if step == 0 else None
                start = time.perf_counter()
                with probe if probe is not None else _Null():
                    nn.functional.mse_loss(model(xb), target).backward()
                    optimizer.step()
                elapsed = time.perf_counter() - start
                if probe is not None:
                    memory[int(stage)] = probe.report(stage, WORLD, rank)
                optimizer.zero_grad(set_to_none=True)
                slowest = torch.tensor([elapsed])
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                if step >= 2:
                    times[int(stage)].append(slowest.item())
        outcome = {"memory": memory, "times": times}
    except BaseException:
        outcome = traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(outcome, os.path.join(out_dir, f"{rank}.pt"))


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def zero_tables(steps: int, malloc_thresholds: bool = False) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _worker,
            args=(port, steps, tmp, malloc_thresholds),
            nprocs=WORLD,
            join=True,
            start_method="spawn",
        )
        results = [
            torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=False) for r in range(WORLD)
        ]
    for rank, result in enumerate(results):
        if isinstance(result, str):
            raise RuntimeError(f"rank {rank} failed:\n{result}")

    count = results[0]["memory"][0].parameter_count
    print(
        f"\n### Per-worker bytes held, {count / 1e6:.2f}M parameters, fp32 Adam, "
        f"{WORLD} gloo workers (MiB, measured / formula)\n"
    )
    print(
        "| stage | implementation | rank | params | grads | optimizer | total | "
        "formula total | measured / formula |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for stage in ZeroStage:
        for rank, result in enumerate(results):
            r = result["memory"][int(stage)]
            m, f = r.measured, r.formula
            print(
                f"| {int(stage)} | {ShardingPlan(stage=stage).implementation} | {rank} | "
                f"{m.parameters / MB:.1f} / {f.parameters / MB:.1f} | "
                f"{m.gradients / MB:.1f} / {f.gradients / MB:.1f} | "
                f"{m.optimizer / MB:.1f} / {f.optimizer / MB:.1f} | "
                f"{m.total / MB:.1f} | {f.total / MB:.1f} | {r.ratio:.3f} |"
            )
    stage2 = results[0]["memory"][2]
    print(
        f"\nStage 2 parameters: {stage2.measured.parameters / MB:.1f} MiB at the step's "
        f"peak, {stage2.at_rest_parameters / MB:.1f} MiB between steps (one replicated "
        f"copy, 4P = {4 * count / MB:.1f}); gradients held across both workers: "
        f"{sum(r['memory'][2].measured.gradients for r in results) / MB:.1f} MiB (4P)."
    )

    times = {s: results[0]["times"][s] for s in results[0]["times"]}
    base = statistics.median(times[0])
    allocator = "glibc mmap / trim thresholds pinned" if malloc_thresholds else "stock glibc malloc"
    print(
        f"\n### Step time, median of {steps} round-robin steps (slower worker), relative to "
        f"DDP ({allocator})\n"
    )
    print("| stage | implementation | median ms | vs DDP | FACTS.md library ratio |")
    print("|---|---|---|---|---|")
    for stage in ZeroStage:
        median = statistics.median(times[int(stage)])
        print(
            f"| {int(stage)} | {ShardingPlan(stage=stage).implementation} | "
            f"{median * 1e3:.0f} | {median / base:.2f}x | "
            f"{FACTS_RATIO.get(int(stage), '1.00 (DDP, 138 ms)')} |"
        )


# ---------------------------------------------------------------- large batch on digits


def _train_digits(plan: LargeBatchPlan, epochs: int, seed: int, data) -> float:
    X_train, y_train, X_val, y_val = data
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=plan.base_lr, momentum=0.9)
    schedule = plan.lr_schedule()
    batch = plan.effective_batch
    generator = torch.Generator().manual_seed(seed + 1)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(X_train.shape[0], generator=generator)
        for start in range(0, X_train.shape[0] - batch + 1, batch):
            index = order[start : start + batch]
            set_lr(optimizer, resolve(schedule, step))
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(X_train[index]), y_train[index]).backward()
            optimizer.step()
            step += 1
    with torch.no_grad():
        predicted = model(X_val).argmax(1)
    if not torch.isfinite(model[0].weight).all():
        return float("nan")
    return (predicted == y_val).float().mean().item()


def large_batch_table(epochs: int, seeds: int, warmup_epochs: int) -> None:
    X, y = load_dataset("digits")
    data = split(X, y, 0.2, 0)
    rows = data[0].shape[0]
    big = 256
    warmup_steps = warmup_epochs * (rows // big)
    runs = [
        ("base: batch 32, lr 0.1", LargeBatchPlan(micro_batch=32, base_lr=0.1)),
        (
            f"8x: batch 256, linear scaling (lr 0.8) + linear warmup {warmup_steps} steps",
            LargeBatchPlan(
                micro_batch=32,
                accumulation=8,
                base_batch=32,
                base_lr=0.1,
                scaling="linear",
                warmup="linear",
                warmup_steps=warmup_steps,
            ),
        ),
        (
            "8x: batch 256, lr 0.1 (no scaling, no warmup)",
            LargeBatchPlan(micro_batch=32, accumulation=8, base_lr=0.1),
        ),
        (
            "8x: batch 256, linear scaling (lr 0.8), no warmup",
            LargeBatchPlan(
                micro_batch=32, accumulation=8, base_batch=32, base_lr=0.1, scaling="linear"
            ),
        ),
    ]
    print(
        f"\n### Large batch on digits (MLP 64-128-10, SGD momentum 0.9, {epochs} epochs, "
        f"{rows} training rows; validation accuracy over {seeds} seeds)\n"
    )
    print("| run | effective batch | steps | val accuracy mean | min | max |")
    print("|---|---|---|---|---|---|")
    for label, plan in runs:
        # The effective batch runs as one batch here: accumulate_gradients gives the same
        # gradient (tests/unit/test_large_batch.py), so only the arithmetic matters.
        accuracies = [_train_digits(plan, epochs, seed, data) for seed in range(seeds)]
        steps = epochs * (rows // plan.effective_batch)
        print(
            f"| {label} | {plan.effective_batch} | {steps} | "
            f"{statistics.mean(accuracies):.4f} | {min(accuracies):.4f} | "
            f"{max(accuracies):.4f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--warmup-epochs", type=int, default=5)
    parser.add_argument("--skip-zero", action="store_true")
    parser.add_argument("--skip-large-batch", action="store_true")
    parser.add_argument(
        "--malloc-thresholds",
        action="store_true",
        help="pin glibc's mmap / trim thresholds in the workers (every stage alike)",
    )
    args = parser.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(1)
    if not args.skip_zero:
        zero_tables(args.steps, args.malloc_thresholds)
    if not args.skip_large_batch:
        large_batch_table(args.epochs, args.seeds, args.warmup_epochs)
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
