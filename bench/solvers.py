"""secant's solvers side by side with scipy.optimize (and torch.optim.LBFGS at large n).

    .venv/bin/python bench/solvers.py [--quick]

Prints markdown tables:
1. On standard_problems() (and bounded_problems() for L-BFGS-B), same start points, same
   gtol, exact gradients from the same torch function for both sides (scipy through a numpy
   wrapper): secant bfgs / scipy BFGS, secant l-bfgs-b / scipy L-BFGS-B, secant newton-cg /
   scipy Newton-CG (Hessian-vector products by autograd on both sides), secant newton /
   scipy trust-exact (autograd Hessian on both sides). Solved = problem.is_solved(f).
2. Extended Rosenbrock at n = 1e4, 1e5, 1e6 (float64, m = 10) from the standard start, one
   hand-written analytic f-and-gradient function (one call per evaluation) shared by all
   three sides: wall time, time inside it, and the difference (solver-internal time, as
   scipy's SlowRosen benchmark separates them) for secant l-bfgs, scipy L-BFGS-B
   (maxcor=10) and torch.optim.LBFGS(history_size=10, line_search_fn="strong_wolfe")
   (secant with jac=True, scipy with jac=True, torch from one closure).

Every side runs with one BLAS / OpenMP thread (set below before numpy and torch load).
Not part of the test suite.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import scipy.optimize as so  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workers.solvers import minimize  # noqa: E402
from workers.solvers.problems import (  # noqa: E402
    TestProblem,
    bounded_problems,
    standard_problems,
)

torch.set_num_threads(1)
GTOL = 1e-5


@dataclass
class Run:
    solved: bool
    nfev: int
    nit: int
    seconds: float
    f: float


# ------------------------------------------------------------------------------------------
# 1. the standard problems
# ------------------------------------------------------------------------------------------


def _np_fg(fun):
    def fg(x):
        t = torch.from_numpy(np.array(x, dtype=np.float64)).requires_grad_(True)
        value = fun(t)
        (g,) = torch.autograd.grad(value, t)
        return float(value.detach()), g.numpy()

    return fg


def _np_hessp(fun):
    def hessp(x, v):
        t = torch.from_numpy(np.array(x, dtype=np.float64)).requires_grad_(True)
        (g,) = torch.autograd.grad(fun(t), t, create_graph=True)
        (hv,) = torch.autograd.grad(g, t, grad_outputs=torch.from_numpy(np.asarray(v)))
        return hv.detach().numpy()

    return hessp


def _np_hess(fun):
    def hess(x):
        t = torch.from_numpy(np.array(x, dtype=np.float64))
        return torch.autograd.functional.hessian(fun, t, vectorize=True).numpy()

    return hess


def run_secant(method: str, p: TestProblem, bounded: bool) -> Run:
    started = time.perf_counter()
    r = minimize(
        p.fun,
        p.x0_tensor(),
        method=method,
        bounds=p.bounds if bounded else None,
        options={"gtol": GTOL},
    )
    seconds = time.perf_counter() - started
    return Run(
        p.is_solved(r.fun, None if p.f_star_known else _REFERENCE.get(p.name))
        and math.isfinite(r.fun),
        r.nfev,
        r.nit,
        seconds,
        r.fun,
    )


def run_scipy(method: str, p: TestProblem, bounded: bool) -> Run:
    kw: dict = {"jac": True}
    options: dict = {"gtol": GTOL}
    if method == "Newton-CG":
        kw["hessp"] = _np_hessp(p.fun)
        options = {"xtol": 1e-5}  # scipy's Newton-CG has no gtol: it stops on the step size
    elif method == "trust-exact":
        kw["hess"] = _np_hess(p.fun)
    elif method == "L-BFGS-B":
        options["ftol"] = 0.0  # secant's default: no relative-decrease stop
        if bounded:
            kw["bounds"] = p.bounds
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = so.minimize(_np_fg(p.fun), np.array(p.x0), method=method, options=options, **kw)
    seconds = time.perf_counter() - started
    f = float(r.fun)
    ok = p.is_solved(f, None if p.f_star_known else _REFERENCE.get(p.name))
    return Run(ok and math.isfinite(f), int(r.nfev), int(r.nit), seconds, f)


_REFERENCE: dict[str, float] = {}


def _references(problems: list[TestProblem]) -> None:
    """Bounded problems with unknown f*: scipy L-BFGS-B at a tight tolerance is the reference."""
    for p in problems:
        if p.f_star_known:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = so.minimize(
                _np_fg(p.fun),
                np.array(p.x0),
                jac=True,
                method="L-BFGS-B",
                bounds=p.bounds,
                options={"gtol": 1e-10, "ftol": 0.0, "maxiter": 100_000},
            )
        _REFERENCE[p.name] = float(r.fun)


def compare(ours: str, theirs: str, problems: list[TestProblem], bounded: bool) -> list[str]:
    rows_ours = [run_secant(ours, p, bounded) for p in problems]
    rows_theirs = [run_scipy(theirs, p, bounded) for p in problems]
    both = [(a, b) for a, b in zip(rows_ours, rows_theirs, strict=True) if a.solved and b.solved]
    ratio = statistics.median(a.nfev / b.nfev for a, b in both) if both else math.nan
    missed = [
        p.name
        for p, a, b in zip(problems, rows_ours, rows_theirs, strict=True)
        if b.solved and not a.solved
    ]
    label = f"{len(problems)} {'bounded' if bounded else 'standard'}"
    lines = []
    for name, rows in ((f"secant {ours}", rows_ours), (f"scipy {theirs}", rows_theirs)):
        solved = [r for r in rows if r.solved]
        lines.append(
            f"| {name} | {label} | {len(solved)} | "
            f"{statistics.median(r.nfev for r in solved) if solved else math.nan:.0f} | "
            f"{statistics.median(r.nit for r in solved) if solved else math.nan:.0f} | "
            f"{sum(r.seconds for r in rows):.2f} | "
            + (
                f"{ratio:.2f} | {', '.join(missed) or '-'} |"
                if name.startswith("secant")
                else " | |"
            )
        )
    return lines


def part1() -> None:
    standard, bounded = standard_problems(), bounded_problems()
    _references(bounded)
    print(f"## Standard problems (gtol {GTOL:g}, exact gradients, same start points)\n")
    print(
        "| solver | problems | solved | median nfev (solved) | median nit (solved) | "
        "total time s | median nfev ratio secant/scipy (both solved) | solved by scipy "
        "only |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print_notes = (
        "scipy Newton-CG has no gtol; it runs with its default xtol = 1e-5 on the "
        "step. scipy L-BFGS-B runs with ftol = 0, as secant's default."
    )
    pairs = [
        ("bfgs", "BFGS", standard, False),
        ("l-bfgs-b", "L-BFGS-B", standard, False),
        ("l-bfgs-b", "L-BFGS-B", bounded, True),
        ("newton-cg", "Newton-CG", standard, False),
        ("newton", "trust-exact", standard, False),
    ]
    for ours, theirs, problems, is_bounded in pairs:
        for line in compare(ours, theirs, problems, is_bounded):
            print(line)
        sys.stdout.flush()
    print(f"\n{print_notes}\n")


# ------------------------------------------------------------------------------------------
# 2. large n: extended Rosenbrock, analytic f and g shared by every side
# ------------------------------------------------------------------------------------------


class Timed:
    """f and g of extended Rosenbrock in one call (shared intermediates), clocked."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def fg(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        started = time.perf_counter()
        xo, xe = x[0::2], x[1::2]
        t = xe - xo * xo
        u = 1.0 - xo
        value = 100.0 * torch.dot(t, t) + torch.dot(u, u)
        grad = torch.empty_like(x)
        torch.mul(xo * t, -400.0, out=grad[0::2])
        grad[0::2] -= 2.0 * u
        torch.mul(t, 200.0, out=grad[1::2])
        self.seconds += time.perf_counter() - started
        self.calls += 1
        return value, grad


def start(n: int) -> torch.Tensor:
    x0 = torch.empty(n, dtype=torch.float64)
    x0[0::2], x0[1::2] = -1.2, 1.0
    return x0


def large_secant(n: int, gtol: float) -> dict:
    t = Timed()
    started = time.perf_counter()
    r = minimize(
        t.fg, start(n), method="l-bfgs", jac=True, options={"gtol": gtol, "history_size": 10}
    )
    wall = time.perf_counter() - started
    return {
        "wall": wall,
        "eval": t.seconds,
        "nfev": r.nfev,
        "nit": r.nit,
        "f": r.fun,
        "ok": r.success,
        "calls": t.calls,
    }


def large_scipy(n: int, gtol: float) -> dict:
    t = Timed()

    def fg(x):
        value, grad = t.fg(torch.from_numpy(x))
        return float(value), grad.numpy()

    started = time.perf_counter()
    r = so.minimize(
        fg,
        start(n).numpy(),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": gtol, "ftol": 0.0, "maxcor": 10, "maxiter": 100_000, "maxfun": 100_000},
    )
    wall = time.perf_counter() - started
    return {
        "wall": wall,
        "eval": t.seconds,
        "nfev": r.nfev,
        "nit": r.nit,
        "f": float(r.fun),
        "ok": bool(r.success),
        "calls": t.calls,
    }


def large_torch(n: int, gtol: float) -> dict:
    t = Timed()
    x = start(n).clone()
    opt = torch.optim.LBFGS(
        [x],
        lr=1.0,
        history_size=10,
        max_iter=100_000,
        max_eval=125_000,
        tolerance_grad=gtol,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )

    def closure():
        value, x.grad = t.fg(x.detach())
        return value

    started = time.perf_counter()
    with torch.no_grad():
        opt.step(closure)
    wall = time.perf_counter() - started
    state = opt.state[x]
    eval_seconds = t.seconds
    f_final, g_final = t.fg(x.detach())  # for the report, outside the timings
    return {
        "wall": wall,
        "eval": eval_seconds,
        "nfev": state["func_evals"],
        "nit": state["n_iter"],
        "f": float(f_final),
        "ok": float(g_final.abs().max()) <= gtol,
        "calls": t.calls,
    }


def part2(sizes: list[int], gtol: float) -> None:
    print(
        f"## Extended Rosenbrock, float64, m = 10, gtol {gtol:g} (inf-norm of the gradient), "
        "start (-1.2, 1, ...)\n"
    )
    print(
        "internal = wall - time inside f and g (the same analytic torch functions on every "
        "side; scipy gets zero-copy numpy views of them).\n"
    )
    print(
        "| n | solver | converged | nit | nfev | final f | wall s | f+g s | internal s | "
        "internal ms/iter |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    large_secant(1000, gtol), large_scipy(1000, gtol), large_torch(1000, gtol)  # warm up
    ratios = []
    for n in sizes:
        results = {
            "secant l-bfgs": large_secant(n, gtol),
            "scipy L-BFGS-B": large_scipy(n, gtol),
            "torch LBFGS": large_torch(n, gtol),
        }
        for name, r in results.items():
            internal = r["wall"] - r["eval"]
            print(
                f"| {n:.0e} | {name} | {r['ok']} | {r['nit']} | {r['nfev']} | {r['f']:.3e} | "
                f"{r['wall']:.3f} | {r['eval']:.3f} | {internal:.3f} | "
                f"{1e3 * internal / max(r['nit'], 1):.2f} |"
            )
        sys.stdout.flush()
        ours = results["secant l-bfgs"]
        row = [n]
        for other in ("scipy L-BFGS-B", "torch LBFGS"):
            o = results[other]
            row += [
                ours["wall"] / o["wall"],
                (ours["wall"] - ours["eval"]) / max(o["wall"] - o["eval"], 1e-12),
            ]
        ratios.append(row)
    print(
        "\n| n | wall secant/scipy | internal secant/scipy | wall secant/torch | "
        "internal secant/torch |"
    )
    print("|---|---|---|---|---|")
    for n, w1, i1, w2, i2 in ratios:
        print(f"| {n:.0e} | {w1:.2f} | {i1:.2f} | {w2:.2f} | {i2:.2f} |")
    print(
        "\nTargets at n = 1e6 (issue 3): wall <= 0.5x scipy and <= 0.9x torch; internal <= "
        "0.3x scipy and <= 0.6x torch.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n up to 1e5 only")
    parser.add_argument("--skip-standard", action="store_true")
    args = parser.parse_args()
    print("# secant solver benchmark\n")
    print(
        f"- {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, scipy {scipy.__version__}, numpy {np.__version__}"
    )
    print(
        "- BLAS/OpenMP threads pinned to 1 for every side: OPENBLAS_NUM_THREADS = "
        "OMP_NUM_THREADS = MKL_NUM_THREADS = 1 (set before numpy/torch import), "
        f"torch.get_num_threads() = {torch.get_num_threads()}\n"
    )
    if not args.skip_standard:
        part1()
    part2([10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000], GTOL)


if __name__ == "__main__":
    main()
