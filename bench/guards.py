"""How fast the service's guards act: what the tests check by condition, timed here.

The tests assert that a hostile expression is refused, that a cancel ends a solve with its
last iterate and that `import secant` loads no heavy package; a wall-clock limit in a test
fails on a loaded machine and proves nothing on a quiet one, so the times live here:

- refusing each case of the hostile-expression corpus (tests/data/hostile_expressions.txt,
  read by tests/unit/test_hostile_inputs.py), p50/p99/max over the corpus, fastest of
  --repeats per case;
- a cancel through the SDK: a long gradient descent (n = 2000) is submitted, its first iterate
  awaited, then `job.cancel()` to the result in hand, over --cancels solves against a gateway
  subprocess on loopback (bench/service.py's Gateway);
- `import secant` in a fresh interpreter (-X importtime's cumulative time), --imports runs.

    .venv/bin/python bench/guards.py [--repeats 3] [--cancels 10] [--imports 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "tests" / "unit")]
from _gateway import Gateway, percentile  # noqa: E402

import secant  # noqa: E402

ROSENBROCK = "sum(100 * (x[1:] - x[:-1]**2)**2 + (1 - x[:-1])**2)"


def hostile_rejections(repeats: int) -> list[float]:
    from test_hostile_inputs import CASES, DATA, X0

    from workers.objectives import ObjectiveError, build_objective

    build_objective(kind="expression", source="sum(A @ x)", data=DATA, x0=X0)  # lazy imports
    fastest = []
    for _, kind, source in CASES:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            try:
                build_objective(kind=kind, source=source, data=DATA, x0=X0)
            except ObjectiveError:
                pass
            else:
                raise AssertionError(f"a hostile case was accepted: {source[:80]!r}")
            times.append(time.perf_counter() - started)
        fastest.append(min(times))
    return fastest


def cancel_latencies(address: str, cancels: int) -> list[float]:
    latencies = []
    with secant.Client(address) as client:
        for _ in range(cancels):
            job = client.submit(ROSENBROCK, np.full(2000, -1.0), method="gd",
                                options={"max_iter": 10_000_000, "gtol": 1e-14})
            for event in job.events():
                if event.WhichOneof("kind") == "iterate":
                    break
            started = time.perf_counter()
            job.cancel()
            result = job.result(timeout=60)
            latencies.append(time.perf_counter() - started)
            assert result.status == secant.Status.CANCELLED, result.message
    return latencies


def import_times(runs: int) -> list[float]:
    seconds = []
    for _ in range(runs):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-c",
             f"import sys; sys.path.insert(0, {str(ROOT / 'client')!r}); import secant"],
            capture_output=True, text=True, check=True, timeout=120,
        )
        line = [row for row in done.stderr.splitlines() if row.rstrip().endswith("| secant")][-1]
        seconds.append(int(line.split("|")[1]) / 1e6)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cancels", type=int, default=10)
    parser.add_argument("--imports", type=int, default=5)
    args = parser.parse_args()

    rejections = hostile_rejections(args.repeats)
    imports = import_times(args.imports)
    with Gateway(startup_timeout_s=180) as gateway:
        cancels = cancel_latencies(gateway.address, args.cancels)

    def row(name: str, samples: list[float], unit: float, suffix: str) -> str:
        cells = (percentile(samples, 50), percentile(samples, 99), max(samples))
        return f"| {name} | {len(samples)} | " + " | ".join(
            f"{value * unit:.2f} {suffix}" for value in cells) + " |"

    print("| guard | samples | p50 | p99 | max |")
    print("|---|---:|---:|---:|---:|")
    print(row("refuse a hostile expression (corpus)", rejections, 1e3, "ms"))
    print(row("cancel -> result in the SDK (gd, n = 2000)", cancels, 1e3, "ms"))
    print(row("`import secant` (fresh interpreter)", imports, 1e3, "ms"))


if __name__ == "__main__":
    main()
