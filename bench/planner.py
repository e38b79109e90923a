"""The memory planner (workers/training/planner.py) against what the training path holds.

    .venv/bin/python bench/planner.py [--batch 64] [--workers 1 2 4]

Part 1, states. For each zoo model, at 1, 2 and 4 gloo workers (spawned on 127.0.0.1, one
thread each) and ZeRO stages 0-3: every rank builds the model, wraps it with zero.wrap as the
training path does (one worker: unwrapped, every stage runs as stage 0), takes one Adam step
through large_batch.accumulate_gradients, and memory.MemoryProbe reports the parameter,
gradient and optimizer-state bytes it holds. The table gives the largest rank's measured
total next to the planner's (planner.held_per_rank) and the ZeRO paper's formula
(memory.zero_formula, fp32 Adam: 4P + 4P + 8P), and the worst per-rank error of the planner.

Part 2, activations. One worker, the same models, micro-batch `--batch`, with and without
activation checkpointing (large_batch.enable_activation_checkpointing), fp32 and bf16
autocast: the peak of the bytes allocated during one forward + backward (torch.profiler's
memory timeline on the CPU allocator, the second step, gradients already allocated) next to
the planner's estimate (planner.measure_activations: one forward + backward at micro-batches
2 and 4, tensors tracked by a dispatch mode rather than the allocator, extended linearly).

Prints markdown tables; not part of the tests.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workers.training.large_batch import (  # noqa: E402
    accumulate_gradients,
    enable_activation_checkpointing,
)
from workers.training.loop import loss_function  # noqa: E402
from workers.training.memory import MemoryProbe, zero_formula  # noqa: E402
from workers.training.models import build_model  # noqa: E402
from workers.training.planner import (  # noqa: E402
    can_checkpoint,
    default_loss,
    example_batch,
    held_per_rank,
    measure_activations,
)
from workers.training.zero import ShardingPlan, no_sync, wrap  # noqa: E402

MODELS = {
    "mlp 784-1024-1024-10": {"kind": "mlp", "sizes": [784, 1024, 1024, 10]},
    "cnn 28x28, 32-64": {"kind": "cnn", "in_channels": 1, "image_size": 28,
                         "channels": [32, 64], "classes": 10},
    "autoencoder 784-512-256-64-16": {"kind": "autoencoder", "input_dim": 784,
                                      "hidden": [512, 256, 64], "bottleneck": 16},
    "transformer 4x128, ctx 64": {"kind": "transformer", "vocab": 512, "context": 64,
                                  "width": 128, "layers": 4, "heads": 4},
}
MIB = 2**20


def _adam(params):
    return torch.optim.Adam(params, lr=1e-3)


def _step(model, optimizer, spec: dict, rows: int) -> MemoryProbe:
    x, y = example_batch(spec, rows)
    loss = loss_function(default_loss(spec))
    probe = MemoryProbe(model, optimizer)
    with probe:
        accumulate_gradients(model, loss, x, y, 1, no_sync=no_sync if dist.is_initialized()
                             else None)
        optimizer.step()
    return probe


def _rank_main(rank: int, world: int, port: int, out: str, rows: int) -> None:
    torch.set_num_threads(1)
    result: dict | str = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=300))
        for name, spec in MODELS.items():
            for stage in range(4):
                torch.manual_seed(0)
                model = build_model(spec)
                wrapped, optimizer = wrap(model, _adam, ShardingPlan(stage=stage))
                probe = _step(wrapped, optimizer, spec, rows)
                report = probe.report(stage, world, rank)
                result[(name, stage)] = (report.measured, report.parameter_count)
                del wrapped, optimizer, probe, model
                gc.collect()
    except BaseException:
        result = traceback.format_exc()
    finally:
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, os.path.join(out, f"{rank}.pt"))


def measure_states(world: int, rows: int) -> dict:
    """{(model, stage): [Bytes per rank]} measured by the training path at `world` workers."""
    if world == 1:
        out = {}
        for name, spec in MODELS.items():
            torch.manual_seed(0)
            model = build_model(spec)
            optimizer = _adam([p for p in model.parameters() if p.requires_grad])
            report = _step(model, optimizer, spec, rows).report(0, 1, 0)
            for stage in range(4):
                out[(name, stage)] = [report.measured]
        return out
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank_main, args=(world, port, tmp, rows // world), nprocs=world,
                           join=True, start_method="spawn")
        per_rank = []
        for rank in range(world):
            got = torch.load(os.path.join(tmp, f"{rank}.pt"), weights_only=False)
            if isinstance(got, str):
                raise RuntimeError(f"rank {rank} failed:\n{got}")
            per_rank.append(got)
    return {key: [r[key][0] for r in per_rank] for key in per_rank[0]}


def _peak_allocated(fn) -> int:
    """Peak bytes allocated (and not yet freed) while fn() runs, by the CPU allocator."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def measure_activation(spec: dict, rows: int, checkpointing: bool, precision: str) -> int:
    torch.manual_seed(0)
    model = build_model(spec)
    if checkpointing:
        enable_activation_checkpointing(model)
    x, y = example_batch(spec, rows)
    loss = loss_function(default_loss(spec))

    def step():
        accumulate_gradients(model, loss, x, y, 1, precision=precision)

    step()  # gradients exist from here on: the next step allocates activations only
    return _peak_allocated(step)


def states_table(worlds: list[int], rows: int) -> None:
    print("### Per-worker states (parameters + gradients + Adam state), planned vs "
          "measured\n")
    print("| model | P | workers | stage | measured MiB (largest rank) | planned MiB | "
          "planner error (worst rank) | ZeRO formula MiB | formula / measured |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    worst_overall = 0.0
    for world in worlds:
        measured = measure_states(world, rows)
        for name, spec in MODELS.items():
            torch.manual_seed(0)
            model = build_model(spec)
            shapes = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
            count = sum(p.numel() for p in model.parameters())
            for stage in range(4) if world > 1 else (0,):
                held = measured[(name, stage)]
                planned = held_per_rank(shapes, stage, world)
                errors = [abs(p.total - m.total) / m.total for p, m in zip(planned, held,
                                                                            strict=True)]
                worst_overall = max(worst_overall, max(errors))
                biggest = max(m.total for m in held)
                formula = zero_formula(stage, count, world).total
                print(f"| {name} | {count:,} | {world} | {stage if world > 1 else '0-3'} | "
                      f"{biggest / MIB:.3f} | {max(p.total for p in planned) / MIB:.3f} | "
                      f"{max(errors):.2%} | {formula / MIB:.3f} | {formula / biggest:.3f} |")
    print(f"\nWorst planner error over every rank, model, stage and worker count: "
          f"{worst_overall:.2%}.\n")


def activations_table(rows: int) -> None:
    print(f"### Activations, one worker, micro-batch {rows}: planned vs the CPU allocator's "
          f"peak in forward + backward\n")
    print("| model | precision | checkpointing | measured MiB | planned MiB | error |")
    print("|---|---|---|---:|---:|---:|")
    errors = []
    for name, spec in MODELS.items():
        for precision in ("fp32", "bf16"):
            estimate = measure_activations(spec, precision=precision)
            for ckpt in (False, True):
                if ckpt and not can_checkpoint(build_model(spec)):
                    continue
                planned = estimate.bytes(rows, ckpt)
                actual = measure_activation(spec, rows, ckpt, precision)
                error = (planned - actual) / actual
                errors.append(abs(error))
                print(f"| {name} | {precision} | {'yes' if ckpt else 'no'} | "
                      f"{actual / MIB:.2f} | {planned / MIB:.2f} | {error:+.1%} |")
    errors.sort()
    print(f"\nActivation error: median {errors[len(errors) // 2]:.1%}, worst "
          f"{errors[-1]:.1%} (|planned - measured| / measured).\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="global batch (examples)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--skip-states", action="store_true")
    parser.add_argument("--skip-activations", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("## Memory planner vs the training path (fp32 Adam, CPU)\n")
    if not args.skip_states:
        states_table(args.workers, args.batch)
    if not args.skip_activations:
        activations_table(args.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
