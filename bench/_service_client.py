"""One measurement round of bench/service.py, in a process of its own.

bench/service.py runs this file with PYTHONPATH set to the tree being measured (this checkout,
or the ``--baseline`` one that bench/service.py exported), so the SDK, the solver and the
gateway functions timed here are that tree's. It prints one JSON object on stdout.

    python bench/_service_client.py latency --address HOST:PORT --count N --warmup W
    python bench/_service_client.py throughput --address HOST:PORT --count N --concurrency C
    python bench/_service_client.py inprocess --count N --warmup W

Only public SDK calls (``Client.minimize``, ``Client.watch``, ``AsyncClient.minimize``) and
functions that exist in every tree measured so far are used, so one file drives both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

ROSENBROCK = "sum(100 * (x[1:] - x[:-1]**2)**2 + (1 - x[:-1])**2)"
X0 = [-1.2, 1.0]


def _ns(timestamp) -> int:
    return timestamp.seconds * 1_000_000_000 + timestamp.nanos


def _stamps(events) -> dict[str, int]:
    """The gateway's wall-clock stamps of a job's accepted, RUNNING and result events."""
    stamps: dict[str, int] = {}
    for event in events:
        kind = event.WhichOneof("kind")
        if kind == "accepted":
            stamps["accepted"] = _ns(event.time)
        elif kind == "state_change" and event.state_change.state == 2 and "running" not in stamps:
            stamps["running"] = _ns(event.time)  # 2: RUNNING
        elif kind == "result":
            stamps["result"] = _ns(event.time)
    return stamps


def latency(address: str, count: int, warmup: int) -> dict:
    """Sequential warm solves through the SDK (Client.minimize: one Solve stream each).

    Each solve's wall time is split at the gateway's own event stamps (same host, same clock):
    request -> accepted (SDK encode, the RPC, interceptors, validation), accepted -> RUNNING
    (the job's store commit, its task, the worker lease), RUNNING -> result less the solver
    (the hop to the worker and back: Ray call, objective, events), the solver
    (Result.solve_time_s) and result -> minimize() returns (the final store write, fan-out,
    the stream to the SDK, decoding). The events are read back after the timed loop."""
    import secant

    samples = []
    with secant.Client(address) as client:
        for _ in range(warmup):
            client.minimize(ROSENBROCK, X0, method="l-bfgs")
        for _ in range(count):
            wall0 = time.time_ns()
            started = time.perf_counter()
            result = client.minimize(ROSENBROCK, X0, method="l-bfgs")
            elapsed = time.perf_counter() - started
            wall1 = time.time_ns()
            if not result.success:
                raise RuntimeError(f"solve failed: {result.message}")
            samples.append((result.job_id, wall0, wall1, elapsed, result.solve_time_s,
                            len(result.history)))
        rows = []
        for job_id, wall0, wall1, elapsed, solve_s, iterates in samples:
            stamps = _stamps(client.watch(job_id))
            accepted, running, done = stamps["accepted"], stamps["running"], stamps["result"]
            rows.append({
                "total": elapsed,
                "intake": (accepted - wall0) / 1e9,
                "queue": (running - accepted) / 1e9,
                "hop": (done - running) / 1e9 - solve_s,
                "solve": solve_s,
                "delivery": (wall1 - done) / 1e9,
                "iterates": iterates,
            })
    return {"rows": rows, "parts": parts()}


def parts(repeat: int = 300) -> dict[str, float]:
    """Seconds per call of pieces of the path timed in this process with this tree's code:
    the SDK's encode, the gateway's validation, the job store's two writes of a small job,
    the worker's whole solve (objective from its cache, solver, events)."""
    import numpy as np

    from secant._problem import build_problem

    def median(call, count: int = repeat) -> float:
        for _ in range(min(20, count)):
            call()
        times = []
        for _ in range(count):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
        return float(np.median(times))

    out = {"encode": median(lambda: build_problem(ROSENBROCK, X0, "l-bfgs").SerializeToString())}
    problem = build_problem(ROSENBROCK, X0, "l-bfgs")
    try:
        import torch

        torch.set_num_threads(1)
        from service.validation import Limits, validate_problem

        limits = Limits()
        out["validate"] = median(lambda: validate_problem(problem, limits, trusted=False))
        spec = validate_problem(problem, limits, trusted=False).run_spec("bench", trusted=False)
        from workers.runner import run_solve

        def worker_solve() -> None:
            events = []
            run_solve(spec, events.append)

        out["worker_solve"] = median(worker_solve, 100)
    except ImportError:  # a tree without the gateway (an SDK-only checkout)
        pass
    out.update(_store_parts(problem))
    return out


def _store_parts(problem) -> dict[str, float]:
    import tempfile
    import uuid

    import numpy as np

    from secant.v1 import optimizer_pb2 as pb

    try:
        from service.store import NewJob, SQLiteJobStore
    except ImportError:
        return {}
    blob = problem.SerializeToString()
    with tempfile.TemporaryDirectory(prefix="secant-bench-store-") as folder:
        store = SQLiteJobStore(f"{folder}/jobs.db")
        create, finish = [], []
        for _ in range(200):
            job = pb.Job(job_id=uuid.uuid4().hex, state=pb.QUEUED, method="l-bfgs", n=2,
                         last_seq=1)
            accepted = pb.JobEvent(job_id=job.job_id, seq=1, accepted=pb.Accepted())
            started = time.perf_counter()
            store.create_jobs([NewJob(job, blob, "", [accepted])])
            create.append(time.perf_counter() - started)
            job.state, job.last_seq = pb.SUCCEEDED, 39
            events = [pb.JobEvent(job_id=job.job_id, seq=seq, iterate=pb.Iterate(iteration=seq))
                      for seq in range(2, 40)]
            started = time.perf_counter()
            store.write([job], events, {})
            finish.append(time.perf_counter() - started)
        store.close()
    return {"store_create": float(np.median(create)), "store_finish": float(np.median(finish))}


def throughput(address: str, count: int, concurrency: int) -> dict:
    import secant

    async def run() -> dict:
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
            await asyncio.gather(*(one(i) for i in range(count)))
            return {"seconds": time.perf_counter() - started, "failures": failures}

    return asyncio.run(run())


def inprocess(count: int, warmup: int) -> dict:
    """This tree's workers.solvers.minimize on a torch Rosenbrock (gradients by autograd) and
    with scipy's rosen/rosen_der (jac=True: the solver alone), and scipy's L-BFGS-B."""
    import numpy as np
    import torch
    from scipy.optimize import minimize as scipy_minimize
    from scipy.optimize import rosen, rosen_der

    from workers.solvers import minimize as torch_minimize

    torch.set_num_threads(1)

    def rosenbrock(x: torch.Tensor) -> torch.Tensor:
        return torch.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)

    def rosen_both(x: torch.Tensor):
        values = x.numpy()
        return torch.tensor(rosen(values), dtype=x.dtype), torch.from_numpy(rosen_der(values))

    x0_torch = torch.tensor(X0, dtype=torch.float64)
    x0_numpy = np.array(X0)
    calls = {
        "torch_autograd": lambda: torch_minimize(rosenbrock, x0_torch.clone(), method="l-bfgs"),
        "torch_scipy_fg": lambda: torch_minimize(rosen_both, x0_torch.clone(), method="l-bfgs",
                                                 jac=True),
        "scipy": lambda: scipy_minimize(rosen, x0_numpy, jac=rosen_der, method="L-BFGS-B"),
    }
    out = {}
    for name, call in calls.items():
        result = call()
        if not result.success:
            raise RuntimeError(f"{name}: {result.message}")
        for _ in range(warmup):
            call()
        times = []
        for _ in range(count):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
        out[name] = times
    loop_started = time.perf_counter()
    for _ in range(500):
        calls["scipy"]()
    out["scipy_loop_500"] = time.perf_counter() - loop_started
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("round", choices=["latency", "throughput", "inprocess"])
    parser.add_argument("--address", default="")
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    if args.round == "latency":
        out = latency(args.address, args.count, args.warmup)
    elif args.round == "throughput":
        out = throughput(args.address, args.count, args.concurrency)
    else:
        out = inprocess(args.count, args.warmup)
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
