"""Batch engine benchmark: many small problems through one batch job vs a caller's own loop.

Side by side in one run (ratios; the machine is noisy):
1. End to end through the service (a `secant serve` subprocess on loopback, SDK
   `minimize_batch`, from the call to all results in numpy) vs an in-process scipy BFGS loop
   with analytic gradients on the same starts: Rosenbrock n=2 (B=10,000), n=10, and a logistic
   regression per group (B=1,000 groups, m=200, d=10) also against torch.func.vmap of a
   fixed-count Newton iteration (every member runs as long as the slowest).
2. The batched core alone in this process: time and state memory per member at B = 100 ...
   100,000 (how the cost grows with B).

    .venv/bin/python bench/batch.py [--quick] [--device cuda]
Targets (issue 15): Rosenbrock n=2 B=10,000 end to end >= 20x the scipy loop, same or more
members solved.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.optimize as so

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "client"), str(ROOT / "bench")]

import torch  # noqa: E402
from _gateway import Gateway  # noqa: E402

import secant  # noqa: E402
from workers.solvers.batched import BatchSolve  # noqa: E402

ROSENBROCK = "sum(100 * (x[1:] - x[:-1]**2)**2 + (1 - x[:-1])**2)"
LOGISTIC = "sum(softplus(-y * (A @ x))) + 0.005 * sum(x**2)"
GTOL = 1e-6


def rosen_np(x):
    return float(np.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2))


def rosen_grad_np(x):
    g = np.zeros_like(x)
    t = x[1:] - x[:-1] ** 2
    g[:-1] = -400.0 * x[:-1] * t - 2.0 * (1.0 - x[:-1])
    g[1:] += 200.0 * t
    return g


def rosen_torch(X, ids=None):
    return (100 * (X[:, 1:] - X[:, :-1] ** 2) ** 2 + (1 - X[:, :-1]) ** 2).sum(1)


def scipy_loop(fun, grad, X0, args_of=lambda i: ()):
    started = time.perf_counter()
    solved, xs = 0, []
    for i, x0 in enumerate(X0):
        r = so.minimize(fun, x0, jac=grad, args=args_of(i), method="BFGS", options={"gtol": GTOL})
        solved += bool(r.success)
        xs.append(r.x)
    return time.perf_counter() - started, solved, np.array(xs)


def service_batch(client, objective, X0, **kw):
    started = time.perf_counter()
    result = client.minimize_batch(objective, X0, method="bfgs", options={"gtol": GTOL}, **kw)
    return time.perf_counter() - started, int(np.sum(result.success)), result


def logistic_data(B, m, d, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((B, m, d))
    w = rng.standard_normal((B, d))
    p = 1 / (1 + np.exp(-np.einsum("bmd,bd->bm", A, w)))
    y = np.where(rng.random((B, m)) < p, 1.0, -1.0)
    return A, y


def logistic_np(x, A, y):
    z = -y * (A @ x)
    return float(np.sum(np.logaddexp(0.0, z)) + 0.005 * x @ x)


def logistic_grad_np(x, A, y):
    z = -y * (A @ x)
    s = 0.5 * (1 + np.tanh(0.5 * z))  # sigmoid(z), overflow-free
    return A.T @ (-y * s) + 0.01 * x


def vmap_newton(A, y, iterations):
    """What a torch user writes by hand: vmap of a fixed number of Newton steps."""
    At = torch.from_numpy(A)
    yt = torch.from_numpy(y)

    def f(x, a, b):
        return torch.nn.functional.softplus(-b * (a @ x)).sum() + 0.005 * (x * x).sum()

    grad = torch.func.grad(f)
    hess = torch.func.hessian(f)

    def solve(a, b):
        x = torch.zeros(a.shape[1], dtype=a.dtype)
        for _ in range(iterations):
            x = x - torch.linalg.solve(hess(x, a, b), grad(x, a, b))
        return x, grad(x, a, b).abs().max()

    started = time.perf_counter()
    X, gnorm = torch.func.vmap(solve)(At, yt)
    return time.perf_counter() - started, int((gnorm <= GTOL).sum()), X.numpy()


def core_scaling(sizes, device, repeats=1):
    rows = []
    for B in sizes:
        gen = torch.Generator().manual_seed(B)
        X0 = (torch.rand(B, 2, generator=gen, dtype=torch.float64) * 4 - 2).to(device)
        state_bytes = {}

        def measure(state, state_bytes=state_bytes):
            if not state_bytes:
                tensors = [getattr(state, n) for n in (*state._ROW_FIELDS, *state._OUT_FIELDS)]
                tensors += list(state.memory.values())
                state_bytes["b"] = sum(t.numel() * t.element_size() for t in tensors)

        best = float("inf")
        for _ in range(repeats):
            state_bytes.clear()
            solve = BatchSolve(rosen_torch, X0, method="bfgs", options={"gtol": GTOL},
                               on_checkpoint=measure, checkpoint_interval_s=1e-12)
            started = time.perf_counter()
            result = solve.run()
            if device != "cpu":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - started)
        rows.append((B, best, best / B * 1e6, state_bytes.get("b", 0) / B,
                     int(result.success.sum()), int(result.nit.max())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches (a smoke run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--core-only", action="store_true")
    parser.add_argument("--core-sizes", default="100,1000,10000,100000")
    args = parser.parse_args()
    torch.set_num_threads(1)
    scale = 10 if args.quick else 1
    rng = np.random.default_rng(0)
    lines = []
    if not args.core_only:
        B2, B10, Bl = 10_000 // scale, 2_000 // scale, 1_000 // scale
        X2 = rng.uniform(-2, 2, (B2, 2))
        X10 = rng.uniform(-2, 2, (B10, 10))
        A, y = logistic_data(Bl, 200, 10)
        Xl = np.zeros((Bl, 10))
        with Gateway(startup_timeout_s=180) as gateway, secant.Client(gateway.address) as client:
            client.minimize_batch(ROSENBROCK, X2[:100], method="bfgs")  # warm the workers
            cases = []
            t_s, ok_s, _ = scipy_loop(rosen_np, rosen_grad_np, X2)
            t_b, ok_b, _ = service_batch(client, ROSENBROCK, X2)
            cases.append((f"Rosenbrock n=2, B={B2:,}", t_s, ok_s, t_b, ok_b, None))
            t_s, ok_s, _ = scipy_loop(rosen_np, rosen_grad_np, X10)
            t_b, ok_b, _ = service_batch(client, ROSENBROCK, X10)
            cases.append((f"Rosenbrock n=10, B={B10:,}", t_s, ok_s, t_b, ok_b, None))
            t_s, ok_s, _ = scipy_loop(logistic_np, logistic_grad_np, Xl, lambda i: (A[i], y[i]))
            t_b, ok_b, _ = service_batch(client, LOGISTIC, Xl, member_data={"A": A, "y": y})
            t_v, ok_v, _ = vmap_newton(A, y, iterations=12)
            cases.append((f"logistic per group, B={Bl:,} m=200 d=10", t_s, ok_s, t_b, ok_b,
                          (t_v, ok_v)))
        lines += ["| problem (BFGS, gtol 1e-6) | scipy loop s (solved) | service batch s "
                  "(solved) | speedup vs scipy | vmap Newton x12 s (solved) |",
                  "|---|---|---|---|---|"]
        for name, t_s, ok_s, t_b, ok_b, vm in cases:
            n = name.split("B=")[1].split()[0]
            vcell = f"{vm[0]:.2f} ({vm[1]:,}/{n})" if vm else "n/a (no fixed-count method)"
            lines.append(f"| {name} | {t_s:.2f} ({ok_s:,}/{n}) | {t_b:.3f} ({ok_b:,}/{n}) | "
                         f"{t_s / t_b:.1f}x | {vcell} |")
        lines.append("")
    sizes = [int(s) for s in args.core_sizes.split(",")]
    if args.quick:
        sizes = [s for s in sizes if s <= 10_000]
    rows = core_scaling(sizes, args.device)
    lines += [f"| B (core alone, {args.device}, Rosenbrock n=2 BFGS) | total s | us per member "
              "| state bytes per member | solved | max nit |", "|---|---|---|---|---|---|"]
    for B, total, per, mem, ok, nit in rows:
        lines.append(f"| {B:,} | {total:.3f} | {per:.1f} | {mem:.0f} | {ok:,} | {nit} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
