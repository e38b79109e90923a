"""K-FAC against SGD-momentum and Adam on sklearn digits, side by side in one run.

Two problems: an MLP classifier (64-128-10, ReLU, cross-entropy) and the K-FAC paper's deep
autoencoder scaled to digits (64-128-64-32-8-32-64-128-64, tanh, linear code, squared
error). For each optimizer: steps and wall time until the full training loss first reaches a
fixed target (checked every `--eval-every` steps, outside the timed steps), and the median
time of one step. Adam runs a small learning-rate grid and its best run is reported. All
runs use the same thread count, batch size, initialization and data order.

    python bench/kfac.py [--threads 1] [--max-steps-mlp 1500] [--max-steps-ae 4000]

Prints a markdown table; ratios are K-FAC / best Adam and per-step / SGD. Targets from issue 7:
autoencoder K-FAC wall <= 0.5x best Adam; MLP K-FAC steps <= 0.5x Adam's, wall <= 1.0x;
per-step <= 3x SGD.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from workers.training import load_dataset, train

MLP = {"kind": "mlp", "sizes": [64, 128, 10], "activation": "relu"}
AUTOENCODER = {"kind": "autoencoder", "input_dim": 64, "hidden": [128, 64, 32],
               "bottleneck": 8, "activation": "tanh"}


@dataclass
class Run:
    label: str
    reached: bool
    steps: int
    wall_s: float
    step_ms: float
    mean_step_ms: float
    final_loss: float


def run_one(label: str, model: dict, loss: str, optimizer: dict, X, y, *, target: float,
            max_steps: int, eval_every: int, batch_size: int) -> Run:
    reached = {"step": None}
    losses = []

    def stop_at_target(metrics) -> bool:
        if metrics.train_loss is not None:
            losses.append(metrics.train_loss)
            if metrics.train_loss <= target:
                reached["step"] = metrics.step
                return True
        return False

    spec = {"model": model, "loss": loss, "optimizer": optimizer, "batch_size": batch_size,
            "steps": max_steps, "seed": 0, "validation_fraction": 0.0, "eval_every": eval_every}
    result = train(spec, X, y, callback=stop_at_target)
    step_times = [m.step_time_s for m in result.history]
    return Run(label=label, reached=reached["step"] is not None, steps=result.steps,
               wall_s=result.train_time_s,
               step_ms=1e3 * statistics.median(step_times[5:] or step_times),
               mean_step_ms=1e3 * statistics.fmean(step_times[5:] or step_times),
               final_loss=losses[-1] if losses else float("nan"))


def bench_problem(name: str, model: dict, loss: str, X, y, *, target: float, max_steps: int,
                  eval_every: int, batch_size: int, kfac: dict, sgd_lr: float,
                  adam_lrs: list[float]) -> list[Run]:
    common = {"target": target, "max_steps": max_steps, "eval_every": eval_every,
              "batch_size": batch_size}
    runs = [run_one("sgd-momentum", model, loss,
                    {"name": "sgd", "lr": sgd_lr, "momentum": 0.9}, X, y, **common)]
    adam_runs = [run_one(f"adam lr={lr:g}", model, loss, {"name": "adam", "lr": lr}, X, y,
                         **common) for lr in adam_lrs]
    best_adam = min(adam_runs, key=lambda r: (not r.reached, r.wall_s if r.reached
                                              else r.final_loss))
    runs += [best_adam]
    runs.append(run_one("kfac", model, loss, {"name": "kfac", **kfac}, X, y, **common))
    print(f"  {name}: adam grid " + ", ".join(f"{r.label}: {_outcome(r)}" for r in adam_runs),
          flush=True)
    return runs


def _outcome(run: Run) -> str:
    return f"{run.steps} steps" if run.reached else f"not reached ({run.final_loss:.4f})"


def table(name: str, target: float, runs: list[Run]) -> str:
    sgd, adam, kfac = runs
    lines = [f"### {name} (target training loss {target:g})", "",
             "| optimizer | reached | steps | wall to target (s) | per step (ms, median) | "
             "per step (ms, mean) | steps / Adam | wall / Adam | per step / SGD (median) | "
             "per step / SGD (mean) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        steps_ratio = run.steps / adam.steps if adam.reached and run.reached else float("nan")
        wall_ratio = run.wall_s / adam.wall_s if adam.reached and run.reached else float("nan")
        lines.append(
            f"| {run.label} | {_outcome(run)} | "
            f"{run.steps} | {run.wall_s:.3f} | {run.step_ms:.3f} | {run.mean_step_ms:.3f} | "
            f"{steps_ratio:.2f} | {wall_ratio:.2f} | {run.step_ms / sgd.step_ms:.2f} | "
            f"{run.mean_step_ms / sgd.mean_step_ms:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--mlp-target", type=float, default=0.05)
    parser.add_argument("--ae-target", type=float, default=0.02)
    parser.add_argument("--max-steps-mlp", type=int, default=1500)
    parser.add_argument("--max-steps-ae", type=int, default=4000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    X, y = load_dataset("digits")
    started = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), digits "
          f"{tuple(X.shape)}, batch {args.batch_size}", flush=True)

    # MLP: kfac-pytorch's shape (preconditioned gradient, SGD momentum, KL clip).
    # Autoencoder: Martens & Grosse's (sampled Fisher, 6.4's alpha/mu step on the exact
    # Gauss-Newton quadratic model, 6.5's Levenberg-Marquardt damping every 5 steps).
    kfac_settings = {"lr": 0.1, "momentum": 0.9, "damping": 1e-2, "factor_decay": 0.95,
                     "kl_clip": 1e-3, "factor_update_steps": 1, "inv_update_steps": 20}
    kfac_ae_settings = {"lr": 1.0, "rescale": True, "adapt_damping": 5, "fisher": "sampled",
                        "damping": 0.1, "factor_decay": 0.95, "inv_update_steps": 5}
    mlp_runs = bench_problem(
        "mlp", MLP, "cross_entropy", X, y, target=args.mlp_target,
        max_steps=args.max_steps_mlp, eval_every=args.eval_every, batch_size=args.batch_size,
        kfac=kfac_settings, sgd_lr=0.1, adam_lrs=[1e-3, 3e-3, 1e-2])
    ae_runs = bench_problem(
        "autoencoder", AUTOENCODER, "mse", X, X, target=args.ae_target,
        max_steps=args.max_steps_ae, eval_every=args.eval_every, batch_size=args.batch_size,
        kfac=kfac_ae_settings, sgd_lr=0.1, adam_lrs=[1e-3, 3e-3, 1e-2])
    print()
    print(table("MLP classifier 64-128-10", args.mlp_target, mlp_runs))
    print()
    print(table("Autoencoder 64-128-64-32-8-32-64-128-64", args.ae_target, ae_runs))
    print(f"\nK-FAC settings: MLP {kfac_settings}, autoencoder {kfac_ae_settings}; "
          f"total bench time "
          f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
