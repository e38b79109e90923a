"""Callback-mode benchmark: what one remote evaluation costs, and a remote solve end to end.

Starts its own gateway (bench/service.py's Gateway: a `secant serve` subprocess on a free
loopback port, stopped at the end) and a bare grpc.aio bidi echo server in this process, then
prints one markdown table:

- per-evaluation overhead of callback mode: n = 1000 float64 per x, a trivial objective; the
  time from the caller sending an answer to the next request arriving (the server's solver
  step, both hops, encode/decode), p50/p99 over a long l-bfgs solve; next to the round trip
  of the same payload through a bare bidi echo driven the same way (a request iterator fed
  from a queue, as the SDK does);
- wall time of remote L-BFGS on Rosenbrock n=1000 (the caller evaluates f and g with numpy)
  next to scipy's L-BFGS-B in this process on the same functions and tolerances.

Targets (issue 6): overhead p50 <= 2x the bare echo; remote solve <= 2x scipy in-process.

    .venv/bin/python bench/callbacks.py [--evaluations 2000]
"""

from __future__ import annotations

import os

# The same BLAS threading for scipy and for us, set before numpy loads (as bench/solvers.py).
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import queue  # noqa: E402
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import scipy.optimize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gateway import Gateway, percentile

import secant
from secant.v1 import optimizer_pb2 as pb  # noqa: E402

N = 1000


def rosen(x: np.ndarray) -> float:
    return float(np.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2))


def rosen_der(x: np.ndarray) -> np.ndarray:
    g = np.zeros_like(x)
    d = x[1:] - x[:-1] ** 2
    g[:-1] += -400.0 * x[:-1] * d - 2.0 * (1.0 - x[:-1])
    g[1:] += 200.0 * d
    return g


def callback_overhead(address: str, evaluations: int) -> list[float]:
    """Seconds between answering one request and receiving the next, per evaluation."""
    marks: list[tuple[float, float]] = []
    scale = np.linspace(1.0, 100.0, N)  # ill-conditioned enough to keep l-bfgs busy

    def fun(x):
        started = time.perf_counter()
        value = 0.5 * float(np.dot(scale * x, x)), scale * x
        marks.append((started, time.perf_counter()))
        return value

    with secant.Client(address) as client:
        client.minimize(fun, np.ones(N), method="gd", jac=True,
                        options={"gtol": 1e-300, "max_evals": evaluations})
    return [nxt[0] - prev[1] for prev, nxt in zip(marks[5:], marks[6:], strict=False)]


class _Echo:
    """A bare grpc.aio bidi echo of CallbackServerMessage/CallbackClientMessage-sized payloads."""

    def __init__(self) -> None:
        self.port = 0
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self) -> None:
        async def echo(request_iterator, context):
            async for message in request_iterator:
                yield message

        handler = grpc.method_handlers_generic_handler(
            "bench.Echo",
            {"Echo": grpc.stream_stream_rpc_method_handler(
                echo, request_deserializer=pb.EvaluationRequest.FromString,
                response_serializer=pb.EvaluationRequest.SerializeToString)},
        )
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await server.stop(0)

    def __enter__(self) -> _Echo:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def echo_round_trips(port: int, count: int) -> list[float]:
    payload = pb.EvaluationRequest(request_id=1, x=secant.to_tensor(np.ones(N)), need_f=True,
                                   need_gradient=True)
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    times: list[float] = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(
            "/bench.Echo/Echo", request_serializer=pb.EvaluationRequest.SerializeToString,
            response_deserializer=pb.EvaluationRequest.FromString,
        )

        def requests():
            while (item := outbox.get()) is not None:
                yield item

        sent = time.perf_counter()
        outbox.put(payload)
        for _reply in call(requests()):
            now = time.perf_counter()
            times.append(now - sent)
            if len(times) >= count:
                break
            sent = time.perf_counter()
            outbox.put(payload)
        outbox.put(None)
    return times[5:]


def remote_vs_scipy(address: str, repeats: int = 3) -> dict[str, float]:
    x0 = np.tile([-1.2, 1.0], N // 2)
    options = {"gtol": 1e-6, "max_iter": 5000}
    remote, local = [], []
    with secant.Client(address) as client:
        for _ in range(repeats):
            started = time.perf_counter()
            r = client.minimize(rosen, x0, method="l-bfgs", jac=rosen_der, options=options)
            remote.append(time.perf_counter() - started)
            started = time.perf_counter()
            s = scipy.optimize.minimize(rosen, x0, jac=rosen_der, method="L-BFGS-B",
                                        options={"gtol": 1e-6, "maxiter": 5000, "maxcor": 10})
            local.append(time.perf_counter() - started)
    return {"remote_s": float(np.median(remote)), "scipy_s": float(np.median(local)),
            "remote_nit": r.nit, "remote_nfev": r.nfev, "remote_f": r.fun,
            "scipy_nit": s.nit, "scipy_nfev": s.nfev, "scipy_f": s.fun,
            "remote_ok": r.success}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=2000)
    args = parser.parse_args(argv)
    with _Echo() as echo:
        idle = echo_round_trips(echo.port, args.evaluations)
        # The echo again while the gateway (and its Ray cluster) runs, as the callback
        # measurement does: the same load on the machine for both.
        with Gateway(startup_timeout_s=120) as gateway:
            bare = echo_round_trips(echo.port, args.evaluations)
            overhead = callback_overhead(gateway.address, args.evaluations)
            solve = remote_vs_scipy(gateway.address)
    p50, p99 = percentile(overhead, 50), percentile(overhead, 99)
    e50, e99 = percentile(bare, 50), percentile(bare, 99)
    print(f"## callback mode (n = {N} float64 per x, {len(overhead)} evaluations)\n")
    print("| measurement | p50 | p99 | ratio p50 | target |")
    print("|---|---:|---:|---:|---|")
    i50, i99 = percentile(idle, 50), percentile(idle, 99)
    print(f"| bare grpc.aio bidi echo, same payload, idle machine | {i50 * 1e3:.3f} ms"
          f" | {i99 * 1e3:.3f} ms | {i50 / e50:.2f} | |")
    print(f"| bare grpc.aio bidi echo, same payload, gateway up | {e50 * 1e3:.3f} ms"
          f" | {e99 * 1e3:.3f} ms | 1.00 | |")
    print(f"| callback evaluation overhead | {p50 * 1e3:.3f} ms | {p99 * 1e3:.3f} ms "
          f"| {p50 / e50:.2f} | <= 2.0 |")
    print()
    print("| Rosenbrock n=1000, gtol 1e-6 | wall (median of 3) | nit | nfev | f | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| scipy L-BFGS-B in-process | {solve['scipy_s']:.3f} s | {solve['scipy_nit']} "
          f"| {solve['scipy_nfev']} | {solve['scipy_f']:.2e} | 1.00 |")
    print(f"| secant l-bfgs, callback mode | {solve['remote_s']:.3f} s | {solve['remote_nit']} "
          f"| {solve['remote_nfev']} | {solve['remote_f']:.2e} "
          f"| {solve['remote_s'] / solve['scipy_s']:.2f} (target <= 2) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
