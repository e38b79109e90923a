"""method="auto" against every fixed method: wall time per problem, side by side in one run.

    .venv/bin/python bench/auto.py [--quick] [--reps 5] [--time-limit 20]

Problems: standard_problems() (the MGH least-squares problems as residuals, so Gauss-Newton
and LM can run on them; the two quadratics as scalar functions), then the large set:
extended Rosenbrock (residual form) and an SPD tridiagonal quadratic (cond 100, scalar) at
n = 1e2, 1e4, 1e6. Every method, auto included, is called the same way (least_squares for
residuals, minimize otherwise), gtol 1e-5, from the same start, one thread; each run is
repeated `--reps` times in rotating order (fewer for the large ones) and the fastest kept,
since the machine is shared. Dense methods (newton, bfgs, gauss-newton, lm) are not run at
n >= 1e4 (an n x n matrix of 800 MB at 1e4; refused above 2e4). A run that does not reach
the problem's known minimum (TestProblem.is_solved) is unsolved: it never counts as the best,
and in the totals it costs at least what the slowest solved run on that problem took (a
failure is never cheaper than a success). Prints markdown tables; not part of the tests.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workers.solvers import least_squares, minimize  # noqa: E402
from workers.solvers.problems import extended_rosenbrock, standard_problems  # noqa: E402

torch.set_num_threads(1)
GTOL = 1e-5
METHODS = ("gd", "newton", "newton-cg", "bfgs", "l-bfgs", "l-bfgs-b", "gauss-newton", "lm")
DENSE = {"newton", "bfgs", "gauss-newton", "lm"}
LEAST_SQUARES = {"gauss-newton", "lm"}


@dataclass
class Case:
    name: str
    n: int
    x0: Callable[[], torch.Tensor]
    fun: Callable | None  # scalar form (None: residual form only)
    residual: Callable | None
    solved: Callable[[float], bool]  # takes f in the problem's own scale (MGH: sum r^2)


@dataclass
class Run:
    seconds: float
    solved: bool
    method: str = ""
    reason: str = ""


def _mgh_cases() -> list[Case]:
    cases = []
    for p in standard_problems():
        cases.append(Case(p.name, p.n, p.x0_tensor, None if p.residual else p.fun,
                          p.residual, p.is_solved))
    return cases


def _tridiagonal(n: int, condition: float = 100.0) -> Case:
    """f = 0.5 x^T A x - b^T x, A = diag(d) + L (L the path Laplacian), d log-spaced in
    [1, condition]: SPD, minimizer by a banded solve."""
    from scipy.linalg import solveh_banded

    d = torch.logspace(0.0, math.log10(condition), n, dtype=torch.float64)
    b = torch.ones(n, dtype=torch.float64)
    diag = d.numpy() + 2.0
    diag[0] -= 1.0
    diag[-1] -= 1.0
    bands = np.vstack([np.r_[0.0, -np.ones(n - 1)], diag])
    x_star = solveh_banded(bands, b.numpy())
    f_star = float(-0.5 * b.numpy() @ x_star)

    def fun(x: torch.Tensor) -> torch.Tensor:
        dx = x[1:] - x[:-1]
        return 0.5 * torch.dot(d * x, x) + 0.5 * torch.dot(dx, dx) - torch.dot(b, x)

    def solved(f: float) -> bool:
        return math.isfinite(f) and f - f_star <= max(1e-10, 1e-8 * abs(f_star))

    return Case(f"tridiagonal_quadratic_{n:g}", n, lambda: torch.zeros(n, dtype=torch.float64),
                fun, None, solved)


def _rosenbrock(n: int) -> Case:
    p = extended_rosenbrock(n)
    x0 = torch.tensor([-1.2, 1.0] * (n // 2), dtype=torch.float64)
    return Case(f"extended_rosenbrock_{n:g}", n, x0.clone, None, p.residual, p.is_solved)


def _large_cases(sizes) -> list[Case]:
    cases = []
    for n in sizes:
        cases += [_rosenbrock(n), _tridiagonal(n)]
    return cases


def applicable(method: str, case: Case) -> bool:
    if method in LEAST_SQUARES and case.residual is None:
        return False
    return not (method in DENSE and case.n >= 10_000)


def run(method: str, case: Case, time_limit: float) -> Run:
    options = {"gtol": GTOL, "time_limit": time_limit}
    x0 = case.x0()
    start = time.perf_counter()
    if case.residual is not None:
        r = least_squares(case.residual, x0, method=method, options=options)
        f = 2.0 * r.fun  # MGH's scale: sum r^2
    else:
        r = minimize(case.fun, x0, method=method, options=options)
        f = r.fun
    seconds = time.perf_counter() - start
    return Run(seconds, bool(case.solved(f)), r.method_chosen, r.method_reason)


def measure(case: Case, reps: int, time_limit: float) -> dict[str, Run]:
    methods = [m for m in METHODS if applicable(m, case)] + ["auto"]
    best: dict[str, Run] = {}
    for rep in range(reps):
        order = methods[rep % len(methods):] + methods[: rep % len(methods)]
        for method in order:
            if rep and method in best and best[method].seconds > 4 * time_limit / 5:
                continue  # a run that hit the time limit once will hit it again
            got = run(method, case, time_limit)
            kept = best.get(method)
            if kept is None or got.seconds < kept.seconds:
                best[method] = got
    return best


def _fmt(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def report(results: list[tuple[Case, dict[str, Run]]]) -> None:
    header = ["problem", "n", "best fixed", "ms", "auto picks", "ms", "auto/best"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    within = 0
    totals = {m: 0.0 for m in (*METHODS, "auto")}
    solved = dict.fromkeys(totals, 0)
    counted = dict.fromkeys(totals, 0)
    auto_on = dict.fromkeys(totals, 0.0)  # auto's total on the problems each method ran
    for case, runs in results:
        fixed = {m: r for m, r in runs.items() if m != "auto"}
        good = {m: r for m, r in fixed.items() if r.solved}
        auto = runs["auto"]
        slowest = max((r.seconds for r in runs.values() if r.solved), default=None)
        def cost(r: Run, slowest: float | None = slowest) -> float:
            return r.seconds if r.solved or slowest is None else max(r.seconds, slowest)

        for m, r in runs.items():
            totals[m] += cost(r)
            counted[m] += 1
            solved[m] += int(r.solved)
            auto_on[m] += cost(auto)
        if good:
            name = min(good, key=lambda m: good[m].seconds)
            ratio = auto.seconds / good[name].seconds if auto.solved else math.inf
            within += int(ratio <= 1.2)
            best_cells = [name, _fmt(good[name].seconds)]
            ratio_cell = f"{ratio:.2f}" if math.isfinite(ratio) else "unsolved"
        else:
            best_cells, ratio_cell = ["(none solved)", "-"], "-"
        mark = "" if auto.solved else " (unsolved)"
        print(f"| {case.name} | {case.n:,} | {best_cells[0]} | {best_cells[1]} | "
              f"{auto.method}{mark} | {_fmt(auto.seconds)} | {ratio_cell} |")
    print(f"\nauto within 1.2x of the best fixed method on {within} of {len(results)} "
          "problems.\n")
    print("| method | problems run | solved | total s (unsolved: at least the slowest "
          "solved run) | auto's total s on the same problems | method / auto |")
    print("|---|---|---|---|---|---|")
    for m in sorted(totals, key=lambda m: (m != "auto", totals[m])):
        print(f"| {m} | {counted[m]} | {solved[m]} | {totals[m]:.3f} | {auto_on[m]:.3f} | "
              f"{totals[m] / auto_on[m]:.2f} |")
    everywhere = [m for m in METHODS if counted[m] == len(results)]
    if everywhere:
        best = min(everywhere, key=lambda m: totals[m])
        print(f"\nOver all {len(results)} problems: auto {totals['auto']:.3f} s, best "
              f"single fixed method run on every problem {best} {totals[best]:.3f} s "
              f"({totals[best] / totals['auto']:.2f}x auto).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="standard problems and n = 1e2, 1e4 only")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--time-limit", type=float, default=20.0)
    parser.add_argument("--reasons", action="store_true", help="print auto's reasons too")
    args = parser.parse_args(argv)

    # The first call of each kind of evaluation (autograd, vmap'd Jacobians and Hessians)
    # pays one-off set-up costs: pay them before any clock runs.
    warm = _mgh_cases()[0]
    for method in METHODS + ("auto",):
        run(method, warm, args.time_limit)
    run("auto", _tridiagonal(100), args.time_limit)

    results = []
    for case in _mgh_cases():
        results.append((case, measure(case, args.reps, args.time_limit)))
    sizes = (100, 10_000) if args.quick else (100, 10_000, 1_000_000)
    for case in _large_cases(sizes):
        reps = args.reps if case.n <= 100 else 3 if case.n <= 10_000 else 1
        results.append((case, measure(case, reps, args.time_limit)))
        print(f"<!-- {case.name} done -->", file=sys.stderr, flush=True)

    print(f"## method=\"auto\" vs fixed methods (gtol {GTOL:g}, fastest of the repetitions)\n")
    report(results)
    if args.reasons:
        print()
        for case, runs in results:
            print(f"- {case.name}: {runs['auto'].reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
