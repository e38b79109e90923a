"""Service overhead benchmark: a small solve through secant vs the same solve in-process.

Starts its own gateway (``python -m service.cli serve`` on a free loopback port with a
temporary db), waits for health SERVING, measures, and stops it (SIGTERM, then SIGKILL of
its process group after a grace period). Prints markdown tables.

    .venv/bin/python bench/service.py [--solves 200] [--throughput-solves 500] [--dashboard on]
                                      [--baseline REF] [--rounds 4]

Measured (one run, side by side; ratios matter more than absolute times on a noisy box):
- warm end-to-end latency of Rosenbrock n=2 with l-bfgs through the SDK (Solve stream),
  p50/p99 over --solves after --warmup, next to workers.solvers.minimize on a torch
  Rosenbrock in this process (gradients by autograd, and with scipy's rosen/rosen_der) and
  scipy's L-BFGS-B;
- throughput of --throughput-solves small solves in flight together from one AsyncClient
  (at most --concurrency at once), next to a scipy loop in this process;
- where each SDK solve's time goes: its wall time split at the gateway's own event stamps
  (accepted, RUNNING, result) and Result.solve_time_s, plus pieces of the path timed alone
  (SDK encode, validation, the store's writes, the worker's whole solve).
The measuring runs in subprocesses (bench/_service_client.py) with the measured tree's SDK and
solver on PYTHONPATH. --baseline REF exports git REF (git archive) and measures its gateway,
SDK and solver too, rounds interleaved with this checkout's: the breakdown then has a before
and an after column, and a before/after table follows.
Targets (issue 16): p50 <= 10 ms and p99 <= 25 ms warm; >= 300 solves/s with 64 in flight on
2 cores; in-process torch solver for n=2 within 3x of scipy.

--dashboard on serves the web dashboard too, with one viewer holding the live jobs table open
for the whole run (its event stream re-reads the job list every second); off (the default)
starts the gateway with --no-dashboard. Run both to see what the dashboard costs a solve.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "client")]  # the other benchmarks load this file


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tree_env(root: Path) -> dict[str, str]:
    """The environment of a process that must import `service`, `workers` and `secant` from
    `root` (PYTHONPATH comes before the editable install's finder; the gateway's Ray head and
    workers inherit it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "client")])
    return env


def _knows_flag(root: Path, flag: str) -> bool:
    try:
        return flag in (root / "service" / "cli.py").read_text()
    except OSError:
        return False


class Gateway:
    """A gateway subprocess on loopback; a context manager that always stops it."""

    def __init__(self, startup_timeout_s: float, dashboard: bool = False,
                 root: Path = ROOT) -> None:
        # root: the source tree whose gateway runs (this checkout, or a --baseline export)
        self.root = root
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_port = _free_port() if dashboard else None
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
        if self.dashboard_port is None:
            if _knows_flag(self.root, "--no-dashboard"):  # a tree from before the dashboard
                command.append("--no-dashboard")
        else:
            command += ["--dashboard-port", str(self.dashboard_port)]
        # own session: on the way out we can stop everything it started, and nothing else
        self._process = subprocess.Popen(
            command, cwd=self.root, env=tree_env(self.root), stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
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


class DashboardViewer:
    """A browser's share of the load: the live jobs table's event stream, read until stop()."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._stop = threading.Event()
        self.messages = 0
        self._connection = None
        self._thread = threading.Thread(target=self._read, name="dashboard-viewer", daemon=True)

    def __enter__(self) -> DashboardViewer:
        self._thread.start()
        return self

    def _read(self) -> None:
        import http.client

        connection = http.client.HTTPConnection("127.0.0.1", self._port, timeout=60)
        self._connection = connection
        try:
            connection.request("GET", "/jobs/stream", headers={"accept": "text/event-stream"})
            response = connection.getresponse()
            while not self._stop.is_set():
                line = response.fp.readline()
                if not line:
                    return
                self.messages += line.startswith(b"event: rows")
        except OSError:
            pass  # the gateway went away, or __exit__ cut the connection
        finally:
            connection.close()

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        sock = getattr(self._connection, "sock", None)
        if sock is not None:  # unblocks the reader now rather than at the next message
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=10)


def percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q))


def export_tree(ref: str, into: Path) -> Path:
    """The files of git `ref` of this repository (git archive), under `into`: the gateway, SDK
    and solver a --baseline run measures beside this checkout's."""
    import io
    import tarfile

    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", ref],
        check=True, capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def client_round(root: Path, *args: str, timeout_s: float = 600.0) -> dict:
    """One round of bench/_service_client.py with `root`'s SDK and solver (see there)."""
    command = [sys.executable, "-P", str(Path(__file__).with_name("_service_client.py")), *args]
    done = subprocess.run(command, env=tree_env(root), capture_output=True, text=True,
                          timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"measurement round {args} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)


@dataclass
class Side:
    """One tree measured: its gateway and what its rounds collected."""

    name: str
    root: Path
    gateway: Gateway | None = None
    rows: list[dict] = field(default_factory=list)  # per solve: stages (seconds)
    parts: list[dict] = field(default_factory=list)  # per round: in-process pieces
    inprocess: dict[str, list[float]] = field(default_factory=dict)
    scipy_loops: list[float] = field(default_factory=list)
    rates: list[tuple[float, int]] = field(default_factory=list)  # (seconds, failures)
    rate: float = 0.0  # solves/s, the median round

    def column(self, key: str) -> list[float]:
        return [row[key] for row in self.rows]

    def part(self, key: str) -> float | None:
        values = [p[key] for p in self.parts if key in p]
        return float(np.median(values)) if values else None


STAGES = (
    ("intake", "request -> accepted: SDK encode, RPC, interceptors, validation"),
    ("queue", "accepted -> RUNNING: store commit, job task, worker lease"),
    ("hop", "RUNNING -> result, less the solver: worker call, objective, events back"),
    ("solve", "the solver (Result.solve_time_s)"),
    ("delivery", "result -> minimize() returns: final store write, stream, SDK decode"),
)
PARTS = (
    ("encode", "SDK: build_problem + serialize"),
    ("validate", "gateway: validate_problem"),
    ("store_create", "store: create a job (fsync)"),
    ("store_finish", "store: record + 38 events"),
    ("worker_solve", "worker: run_solve (cached objective, solver, events)"),
)


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.2f}"


def print_breakdown(sides: list[Side]) -> None:
    print("\n### Where a warm small solve's time goes (ms; p50 and mean per stage)\n")
    print("Stages split each SDK solve at the gateway's event stamps; the mean total is their"
          " sum. Pieces are timed in a process of their own with that tree's code.\n")
    head = " | ".join(f"{s.name} p50 | {s.name} mean" for s in sides)
    print(f"| stage | {head} |")
    print("|---|" + "---:|" * (2 * len(sides)))
    for key, label in (*STAGES, ("total", "total (SDK minimize)")):
        cells = " | ".join(
            f"{_ms(percentile(s.column(key), 50))} | {_ms(float(np.mean(s.column(key))))}"
            for s in sides
        )
        print(f"| {label} | {cells} |")
    for key, label in PARTS:
        cells = " | ".join(f"{_ms(s.part(key))} | " for s in sides)
        print(f"| piece: {label} | {cells}|")
    iterates = {s.name: int(np.median(s.column("iterates"))) for s in sides}
    print(f"\n(iterate events per solve: {iterates})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solves", type=int, default=200, help="timed latency samples")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--throughput-solves", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=64, help="solves in flight at once")
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    parser.add_argument("--dashboard", choices=["off", "on"], default="off",
                        help="serve the web dashboard, with a viewer on its jobs table")
    parser.add_argument("--baseline", metavar="REF", default=None,
                        help="also measure git REF's gateway, SDK and solver (git archive),"
                        " interleaved with this checkout's: the before/after tables")
    parser.add_argument("--rounds", type=int, default=4,
                        help="latency and in-process samples come in this many rounds per"
                        " side, alternating sides")
    args = parser.parse_args(argv)
    dashboard = args.dashboard == "on"
    rounds = max(1, args.rounds)
    per_round = max(1, args.solves // rounds)

    with contextlib.ExitStack() as stack:
        sides = [Side("after" if args.baseline else "this tree", ROOT)]
        if args.baseline:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="secant-base-")))
            sides.insert(0, Side(f"before ({args.baseline})", export_tree(args.baseline, folder)))
        for side in sides:
            print(f"starting the {side.name} gateway (up to {args.startup_timeout} s) ...",
                  file=sys.stderr)
            side.gateway = stack.enter_context(Gateway(
                args.startup_timeout, dashboard=dashboard and side.root == ROOT, root=side.root
            ))
        current = sides[-1]
        viewer = (stack.enter_context(DashboardViewer(current.gateway.dashboard_port))
                  if dashboard else None)
        print("measuring ...", file=sys.stderr)
        for index in range(rounds):
            for side in sides if index % 2 == 0 else sides[::-1]:
                warmup = str(args.warmup if index < 2 else 5)
                out = client_round(side.root, "latency", "--address", side.gateway.address,
                                   "--count", str(per_round), "--warmup", warmup)
                side.rows += out["rows"]
                side.parts.append(out["parts"])
                out = client_round(side.root, "inprocess", "--count", str(per_round),
                                   "--warmup", warmup)
                side.scipy_loops.append(out.pop("scipy_loop_500") / 500)
                for name, times in out.items():
                    side.inprocess.setdefault(name, []).extend(times)
        for index in range(2 if args.baseline else 1):
            for side in sides if index % 2 == 0 else sides[::-1]:
                out = client_round(side.root, "throughput", "--address", side.gateway.address,
                                   "--count", str(args.throughput_solves),
                                   "--concurrency", str(args.concurrency))
                side.rates.append((out["seconds"], out["failures"]))

    if viewer is not None:
        print(f"dashboard on, one jobs-table viewer ({viewer.messages} table updates)",
              file=sys.stderr)
    service = current.column("total")
    service_p50 = percentile(service, 50)
    rows: list[tuple[str, str, str, str]] = []
    for name, samples in (
        ("secant service (SDK, Solve stream)", service),
        ("in-process workers.solvers.minimize (torch, autograd)",
         current.inprocess["torch_autograd"]),
        ("in-process workers.solvers.minimize (scipy's rosen, rosen_der)",
         current.inprocess["torch_scipy_fg"]),
        ("in-process scipy L-BFGS-B", current.inprocess["scipy"]),
    ):
        p50, p99 = percentile(samples, 50), percentile(samples, 99)
        rows.append((name, f"{p50 * 1e3:.2f}", f"{p99 * 1e3:.2f}", f"{service_p50 / p50:.1f}x"))

    print(f"\n### Latency: Rosenbrock n=2, l-bfgs, {len(service)} warm solves"
          f" (dashboard {args.dashboard})\n")
    print("| path | p50 (ms) | p99 (ms) | service p50 / this p50 |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")

    elapsed = float(np.median([seconds for seconds, _ in current.rates]))
    failures = sum(failed for _, failed in current.rates)
    scipy_loop = float(np.median(current.scipy_loops)) * args.throughput_solves
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

    print_breakdown(sides)
    if args.baseline:
        print("\n### Before / after, measured side by side (interleaved rounds)\n")
        print(f"| measure | {sides[0].name} | {sides[1].name} | after / before |")
        print("|---|---:|---:|---:|")

        def line(label: str, before: float, after: float, unit: str, scale: float) -> None:
            print(f"| {label} | {before * scale:.2f} {unit} | {after * scale:.2f} {unit} |"
                  f" {after / before:.2f}x |")

        for label, q in (("SDK solve p50", 50), ("SDK solve p99", 99)):
            line(label, percentile(sides[0].column("total"), q),
                 percentile(sides[1].column("total"), q), "ms", 1e3)
        for side in sides:
            side.rate = args.throughput_solves / float(np.median([s for s, _ in side.rates]))
        line(f"solves/s, {args.concurrency} in flight", sides[0].rate, sides[1].rate, "/s", 1)
        for label, key in (("in-process solve p50, torch objective (autograd)", "torch_autograd"),
                           ("in-process solve p50, scipy's rosen and rosen_der", "torch_scipy_fg"),
                           ("in-process scipy L-BFGS-B p50", "scipy")):
            line(label, percentile(sides[0].inprocess[key], 50),
                 percentile(sides[1].inprocess[key], 50), "ms", 1e3)

    torch_p50 = percentile(current.inprocess["torch_autograd"], 50)
    scipy_p50 = percentile(current.inprocess["scipy"], 50)
    service_p99 = percentile(service, 99)
    targets = (
        (f"p50 <= 10 ms ({service_p50 * 1e3:.1f} ms)", service_p50 <= 0.010),
        (f"p99 <= 25 ms ({service_p99 * 1e3:.1f} ms)", service_p99 <= 0.025),
        (f">= 300 solves/s ({service_rate:.0f}/s)", service_rate >= 300),
        (f"in-process torch <= 3x scipy ({torch_p50 / scipy_p50:.1f}x; with scipy's f and g"
         f" {percentile(current.inprocess['torch_scipy_fg'], 50) / scipy_p50:.1f}x)",
         torch_p50 <= 3 * scipy_p50),
    )
    verdicts = "; ".join(f"{text}: {'met' if ok else 'MISSED'}" for text, ok in targets)
    print(f"\nTargets (issue 16): {verdicts}; {os.cpu_count()} CPUs.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
