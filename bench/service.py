"""Service overhead benchmark: a small solve through secant vs the same solve in-process.

Starts its own gateway (``python -m service.cli serve`` on a free loopback port with a
temporary db), waits for health SERVING, measures, and stops it (SIGTERM, then SIGKILL of
its process group after a grace period). Prints one markdown table.

    .venv/bin/python bench/service.py [--solves 200] [--throughput-solves 500]

Measured (one run, side by side; ratios matter more than absolute times on a noisy box):
- warm end-to-end latency of Rosenbrock n=2 with l-bfgs through the SDK (Solve stream),
  p50/p99 over --solves after --warmup, next to workers.solvers.minimize on a torch
  Rosenbrock in this process and scipy's L-BFGS-B;
- throughput of --throughput-solves small solves in flight together from one AsyncClient
  (at most --concurrency at once), next to a scipy loop in this process.
Targets (issue 5): p50 <= 30 ms warm; >= 50 solves/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "client")]

import secant  # noqa: E402

ROSENBROCK = "sum(100 * (x[1:] - x[:-1]**2)**2 + (1 - x[:-1])**2)"
X0 = [-1.2, 1.0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Gateway:
    """A gateway subprocess on loopback; a context manager that always stops it."""

    def __init__(self, startup_timeout_s: float) -> None:
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._tmp = tempfile.TemporaryDirectory(prefix="secant-bench-")
        self._log = open(Path(self._tmp.name) / "gateway.log", "w+b")  # noqa: SIM115
        self._startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> Gateway:
        command = [
            sys.executable, "-m", "service.cli", "serve",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--metrics-port", str(_free_port()),
            "--db", str(Path(self._tmp.name) / "bench.db"),
            "--log-level", "warning",
        ]  # fmt: skip
        # own session: on the way out we can stop everything it started, and nothing else
        self._process = subprocess.Popen(
            command, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            self._wait_serving()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_serving(self) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + self._startup_timeout_s
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise RuntimeError(
                        f"gateway exited with {self._process.returncode}:\n{self.log()}"
                    )
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"gateway not SERVING after {self._startup_timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def __exit__(self, *exc_info: object) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        if process is not None:
            try:  # leftovers of its session (Ray workers), if it left any
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()
        self._tmp.cleanup()


def percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q))


def time_calls(call, count: int, warmup: int) -> list[float]:
    """Seconds per call, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def in_process_solvers():
    """(torch solve, scipy solve) callables on the same problem, if the packages are there."""
    import torch
    from scipy.optimize import minimize as scipy_minimize
    from scipy.optimize import rosen, rosen_der

    from workers.solvers import minimize as torch_minimize

    def rosenbrock(x: torch.Tensor) -> torch.Tensor:
        return torch.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)

    x0_torch = torch.tensor(X0, dtype=torch.float64)
    x0_numpy = np.array(X0)

    def torch_solve():
        result = torch_minimize(rosenbrock, x0_torch.clone(), method="l-bfgs")
        assert result.success, result.message

    def scipy_solve():
        result = scipy_minimize(rosen, x0_numpy, jac=rosen_der, method="L-BFGS-B")
        assert result.success, result.message

    return torch_solve, scipy_solve


async def service_throughput(address: str, solves: int, concurrency: int) -> tuple[float, int]:
    """(seconds for ``solves`` minimize calls, at most ``concurrency`` in flight; failures)."""
    gate = asyncio.Semaphore(concurrency)
    failures = 0

    async with secant.AsyncClient(address) as client:

        async def one(i: int) -> None:
            nonlocal failures
            async with gate:
                x0 = [-1.2 + 0.001 * (i % 100), 1.0]
                result = await client.minimize(ROSENBROCK, x0, method="l-bfgs")
                failures += not result.success

        await client.minimize(ROSENBROCK, X0)  # connect before the clock starts
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(solves)))
        return time.perf_counter() - started, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solves", type=int, default=200, help="timed latency samples")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--throughput-solves", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=64, help="solves in flight at once")
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    args = parser.parse_args(argv)

    torch_solve, scipy_solve = in_process_solvers()
    rows: list[tuple[str, str, str, str]] = []

    print(f"starting a gateway (up to {args.startup_timeout} s) ...", file=sys.stderr)
    with Gateway(args.startup_timeout) as gateway, secant.Client(gateway.address) as client:
        print(f"gateway SERVING on {gateway.address}; measuring ...", file=sys.stderr)

        def service_solve():
            result = client.minimize(ROSENBROCK, X0, method="l-bfgs")
            assert result.success, result.message

        service = time_calls(service_solve, args.solves, args.warmup)
        local_torch = time_calls(torch_solve, args.solves, args.warmup)
        local_scipy = time_calls(scipy_solve, args.solves, args.warmup)

        elapsed, failures = asyncio.run(
            service_throughput(gateway.address, args.throughput_solves, args.concurrency)
        )
        scipy_loop_started = time.perf_counter()
        for _ in range(args.throughput_solves):
            scipy_solve()
        scipy_loop = time.perf_counter() - scipy_loop_started

    service_p50 = percentile(service, 50)
    for name, samples in (
        ("secant service (SDK, Solve stream)", service),
        ("in-process workers.solvers.minimize (torch)", local_torch),
        ("in-process scipy L-BFGS-B", local_scipy),
    ):
        p50, p99 = percentile(samples, 50), percentile(samples, 99)
        rows.append((name, f"{p50 * 1e3:.2f}", f"{p99 * 1e3:.2f}", f"{service_p50 / p50:.1f}x"))

    print(f"\n### Latency: Rosenbrock n=2, l-bfgs, {args.solves} warm solves\n")
    print("| path | p50 (ms) | p99 (ms) | service p50 / this p50 |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")

    service_rate = args.throughput_solves / elapsed
    scipy_rate = args.throughput_solves / scipy_loop
    print(f"\n### Throughput: {args.throughput_solves} small solves\n")
    print("| path | solves/s | wall (s) | failures |")
    print("|---|---:|---:|---:|")
    print(
        f"| secant service, AsyncClient, {args.concurrency} in flight | {service_rate:.1f} | "
        f"{elapsed:.2f} | {failures} |"
    )
    print(f"| in-process scipy loop | {scipy_rate:.1f} | {scipy_loop:.2f} | 0 |")

    p50_ok = service_p50 <= 0.030
    rate_ok = service_rate >= 50
    print(
        f"\nTargets: p50 <= 30 ms: {'met' if p50_ok else 'MISSED'} "
        f"({service_p50 * 1e3:.1f} ms); >= 50 solves/s: {'met' if rate_ok else 'MISSED'} "
        f"({service_rate:.0f}/s); {os.cpu_count()} CPUs."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
