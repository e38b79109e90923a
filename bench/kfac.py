"""K-FAC against SGD-momentum and Adam on sklearn digits, side by side in one run.

Two problems: an MLP classifier (64-128-10, ReLU, cross-entropy) and the K-FAC paper's deep
autoencoder scaled to digits (64-128-64-32-8-32-64-128-64, tanh, linear code, squared
error). For each optimizer: steps and wall time until the full training loss first reaches a
fixed target (checked every `--eval-every` steps, outside the timed steps), and the time of
one step. Every configuration runs on `--seeds` seeds (initialization, data order, the
sampled Fisher's draws) and the table gives medians over the seeds. Adam runs a small
learning-rate grid, the autoencoder's K-FAC a grid of as many initial dampings, and each
reports its best grid point (the lowest median wall time among the points that reach the
target on every seed). All runs use the same thread count, batch size and data; before the
timed runs, every configuration takes a few untimed steps (one-time library warm-up).

    python bench/kfac.py [--threads 1] [--seeds 3] [--max-steps-mlp 1500] [--max-steps-ae 4000]

Prints markdown tables; ratios are K-FAC / best Adam and per-step / SGD. Targets from
issue 7: autoencoder K-FAC wall <= 0.5x best Adam; MLP K-FAC steps <= 0.5x Adam's, wall
<= 1.0x; per-step <= 3x SGD (MLP).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from workers.training import load_dataset, train

MLP = {"kind": "mlp", "sizes": [64, 128, 10], "activation": "relu"}
AUTOENCODER = {
    "kind": "autoencoder",
    "input_dim": 64,
    "hidden": [128, 64, 32],
    "bottleneck": 8,
    "activation": "tanh",
}

# MLP: kfac-pytorch's shape (preconditioned gradient, SGD momentum, KL clip, factors every
# step, inverses every 20; Cholesky inverses: the same preconditioned gradient as eigen, cheaper).
KFAC_MLP = {
    "lr": 0.1,
    "momentum": 0.9,
    "damping": 1e-2,
    "factor_decay": 0.95,
    "kl_clip": 1e-3,
    "factor_update_steps": 1,
    "inv_update_steps": 20,
    "compute_method": "inverse",
}
# Autoencoder: Martens & Grosse's (sampled Fisher; 6.4's alpha / mu step on the exact
# Gauss-Newton quadratic model of the batch; 6.5's Levenberg-Marquardt damping every 5
# steps, starting from the grid's value; Cholesky inverses of the damped factors).
KFAC_AE = {
    "lr": 1.0,
    "rescale": True,
    "adapt_damping": 5,
    "fisher": "sampled",
    "factor_decay": 0.9,
    "factor_update_steps": 1,
    "inv_update_steps": 1,
    "compute_method": "inverse",
}
ADAM_LRS = [1e-3, 3e-3, 1e-2]
KFAC_AE_DAMPINGS = [1e-7, 1e-5, 1e-3]


@dataclass
class Run:
    seed: int
    reached: bool
    steps: int
    wall_s: float
    step_ms: float
    mean_step_ms: float
    final_loss: float


@dataclass
class Summary:
    """One configuration over the seeds: medians (steps and wall over the seeds that reach
    the target; per-step times over all)."""

    label: str
    runs: list[Run]

    @property
    def reached(self) -> int:
        return sum(run.reached for run in self.runs)

    @property
    def all_reached(self) -> bool:
        return self.reached == len(self.runs)

    def _median(self, field: str, reached_only: bool = True) -> float:
        runs = [r for r in self.runs if r.reached or not reached_only]
        return statistics.median(getattr(r, field) for r in runs) if runs else float("nan")

    @property
    def steps(self) -> float:
        return self._median("steps")

    @property
    def wall_s(self) -> float:
        return self._median("wall_s")

    @property
    def step_ms(self) -> float:
        return self._median("step_ms", reached_only=False)

    @property
    def mean_step_ms(self) -> float:
        return self._median("mean_step_ms", reached_only=False)

    @property
    def final_loss(self) -> float:
        return self._median("final_loss", reached_only=False)

    def outcome(self) -> str:
        if self.all_reached:
            return f"{self.steps:g} steps"
        return f"{self.reached}/{len(self.runs)} reached (median final {self.final_loss:.4f})"

    def per_seed(self) -> str:
        return ", ".join(
            f"seed {r.seed}: "
            + (
                f"{r.steps} / {r.wall_s:.3f} s"
                if r.reached
                else f"not reached ({r.final_loss:.4f})"
            )
            for r in self.runs
        )


def run_one(
    model: dict,
    loss: str,
    optimizer: dict,
    X,
    y,
    *,
    seed: int,
    target: float,
    max_steps: int,
    eval_every: int,
    batch_size: int,
) -> Run:
    reached = {"step": None}
    losses = []

    def stop_at_target(metrics) -> bool:
        if metrics.train_loss is not None:
            losses.append(metrics.train_loss)
            if metrics.train_loss <= target:
                reached["step"] = metrics.step
                return True
        return False

    spec = {
        "model": model,
        "loss": loss,
        "optimizer": optimizer,
        "batch_size": batch_size,
        "steps": max_steps,
        "seed": seed,
        "validation_fraction": 0.0,
        "eval_every": eval_every,
    }
    result = train(spec, X, y, callback=stop_at_target)
    step_times = [m.step_time_s for m in result.history]
    return Run(
        seed=seed,
        reached=reached["step"] is not None,
        steps=result.steps,
        wall_s=result.train_time_s,
        step_ms=1e3 * statistics.median(step_times[5:] or step_times),
        mean_step_ms=1e3 * statistics.fmean(step_times[5:] or step_times),
        final_loss=losses[-1] if losses else float("nan"),
    )


def run_seeds(
    label: str,
    model: dict,
    loss: str,
    optimizer: dict,
    X,
    y,
    *,
    seeds: list[int],
    batch_size: int,
    **common,
) -> Summary:
    # untimed warm-up: first calls into a code path (linalg, forward-mode AD) cost extra once
    train(
        {
            "model": model,
            "loss": loss,
            "optimizer": optimizer,
            "batch_size": batch_size,
            "steps": 5,
            "seed": seeds[0],
            "validation_fraction": 0.0,
        },
        X,
        y,
    )
    return Summary(
        label,
        [
            run_one(model, loss, optimizer, X, y, seed=seed, batch_size=batch_size, **common)
            for seed in seeds
        ],
    )


def best_of(grid: list[Summary]) -> Summary:
    return min(grid, key=lambda s: (not s.all_reached, s.wall_s if s.all_reached else s.final_loss))


def bench_problem(
    name: str,
    model: dict,
    loss: str,
    X,
    y,
    *,
    sgd_lr: float,
    kfac_grid: list[tuple[str, dict]],
    **common,
) -> list[Summary]:
    sgd = run_seeds(
        "sgd-momentum", model, loss, {"name": "sgd", "lr": sgd_lr, "momentum": 0.9}, X, y, **common
    )
    adam_grid = [
        run_seeds(f"adam lr={lr:g}", model, loss, {"name": "adam", "lr": lr}, X, y, **common)
        for lr in ADAM_LRS
    ]
    kfac_runs = [
        run_seeds(label, model, loss, {"name": "kfac", **settings}, X, y, **common)
        for label, settings in kfac_grid
    ]
    for grid_name, grid in (("adam", adam_grid), ("kfac", kfac_runs)):
        if len(grid) > 1:
            print(
                f"  {name}: {grid_name} grid (median over seeds) "
                + "; ".join(f"{s.label}: {s.outcome()}, {s.wall_s:.3f} s" for s in grid),
                flush=True,
            )
    return [sgd, best_of(adam_grid), best_of(kfac_runs)]


def table(name: str, target: float, runs: list[Summary]) -> str:
    sgd, adam, _ = runs
    lines = [
        f"### {name} (target training loss {target:g}; medians over {len(sgd.runs)} seeds)",
        "",
        "| optimizer | reached | steps | wall to target (s) | per step (ms, median) | "
        "per step (ms, mean) | steps / Adam | wall / Adam | per step / SGD (median) | "
        "per step / SGD (mean) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        comparable = adam.all_reached and run.all_reached
        steps_ratio = run.steps / adam.steps if comparable else float("nan")
        wall_ratio = run.wall_s / adam.wall_s if comparable else float("nan")
        lines.append(
            f"| {run.label} | {run.outcome()} | "
            f"{run.steps:g} | {run.wall_s:.3f} | {run.step_ms:.3f} | {run.mean_step_ms:.3f} | "
            f"{steps_ratio:.2f} | {wall_ratio:.2f} | {run.step_ms / sgd.step_ms:.2f} | "
            f"{run.mean_step_ms / sgd.mean_step_ms:.2f} |"
        )
    lines += ["", "Per seed (steps / wall to target):", ""]
    lines += [f"- {run.label}: {run.per_seed()}" for run in runs]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=3)
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
    seeds = list(range(args.seeds))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), digits "
        f"{tuple(X.shape)}, batch {args.batch_size}, seeds {seeds}",
        flush=True,
    )
    common = {"seeds": seeds, "eval_every": args.eval_every, "batch_size": args.batch_size}
    mlp_runs = bench_problem(
        "mlp",
        MLP,
        "cross_entropy",
        X,
        y,
        target=args.mlp_target,
        max_steps=args.max_steps_mlp,
        sgd_lr=0.1,
        kfac_grid=[("kfac", KFAC_MLP)],
        **common,
    )
    ae_runs = bench_problem(
        "autoencoder",
        AUTOENCODER,
        "mse",
        X,
        X,
        target=args.ae_target,
        max_steps=args.max_steps_ae,
        sgd_lr=0.1,
        kfac_grid=[(f"kfac damping={d:g}", {**KFAC_AE, "damping": d}) for d in KFAC_AE_DAMPINGS],
        **common,
    )
    print()
    print(table("MLP classifier 64-128-10", args.mlp_target, mlp_runs))
    print()
    print(table("Autoencoder 64-128-64-32-8-32-64-128-64", args.ae_target, ae_runs))
    print(
        f"\nK-FAC settings: MLP {KFAC_MLP}; autoencoder {KFAC_AE}, initial damping in "
        f"{KFAC_AE_DAMPINGS}; Adam lr in {ADAM_LRS}; total bench time "
        f"{time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
