"""Expression DSL vs the same function hand-written in torch: f + gradient by autograd.

Prints one table of times and ratios (DSL / hand) measured side by side in one run,
interleaved, median of repeats, with the same torch thread count for both. Target: ratio
within 1.5x. Run: ``.venv/bin/python bench/objectives.py [--threads N] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from workers.objectives import TensorSpec, build_objective

F = torch.nn.functional


def spec(name: str, tensor: torch.Tensor) -> TensorSpec:
    dtype = str(tensor.dtype).removeprefix("torch.")
    return TensorSpec(name, tuple(tensor.shape), dtype, tensor.contiguous().numpy().tobytes())


def value_and_grad_seconds(fun: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    point = x.detach().requires_grad_()
    started = time.perf_counter()
    value = fun(point)
    torch.autograd.grad(value, point)
    return time.perf_counter() - started


def compare(name: str, dsl, hand, x: torch.Tensor, repeats: int) -> tuple[str, float, float]:
    torch.testing.assert_close(dsl(x), hand(x))
    for _ in range(3):  # warm up both: allocator, lazy kernels
        value_and_grad_seconds(dsl, x)
        value_and_grad_seconds(hand, x)
    dsl_times, hand_times = [], []
    for repeat in range(repeats):
        # Alternate the order so drift in machine load hits both sides alike.
        pair = [(dsl, dsl_times), (hand, hand_times)]
        for fun, times in pair if repeat % 2 == 0 else reversed(pair):
            times.append(value_and_grad_seconds(fun, x))
    return name, statistics.median(dsl_times), statistics.median(hand_times)


def rosenbrock_case(repeats: int, n: int = 1_000_000) -> tuple[str, float, float]:
    x = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    objective = build_objective(
        kind="expression", source="sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)", x0=x
    )

    def hand(x: torch.Tensor) -> torch.Tensor:
        return torch.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)

    return compare(f"rosenbrock n={n:.0e}", objective.fun, hand, x, repeats)


def logistic_case(repeats: int, samples: int = 10_000, features: int = 100):
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(samples, features, generator=generator, dtype=torch.float64)
    y = (torch.rand(samples, generator=generator, dtype=torch.float64) < 0.5).double()
    x = 0.1 * torch.randn(features, generator=generator, dtype=torch.float64)
    objective = build_objective(
        kind="expression",
        source="mean(softplus(X @ x) - y * (X @ x)) + 0.01 * dot(x, x)",
        data=[spec("X", X), spec("y", y)],
        x0=x,
    )

    def hand(w: torch.Tensor) -> torch.Tensor:
        return torch.mean(F.softplus(X @ w) - y * (X @ w)) + 0.01 * torch.dot(w, w)

    return compare(f"logistic X {samples}x{features}", objective.fun, hand, x, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=31)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = [rosenbrock_case(args.repeats), logistic_case(args.repeats)]

    print(f"f + autograd gradient, float64, {args.threads} threads, median of {args.repeats}")
    print(f"{'case':<26}{'DSL ms':>10}{'hand ms':>10}{'ratio':>8}")
    for name, dsl, hand in rows:
        print(f"{name:<26}{dsl * 1e3:>10.3f}{hand * 1e3:>10.3f}{dsl / hand:>8.3f}")


if __name__ == "__main__":
    main()
