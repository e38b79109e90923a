"""Many problems at once: one SubmitBatch call, then every result; the asyncio client too.

python examples/batch.py [--address 127.0.0.1:50051] [--count 20]
"""

from __future__ import annotations

import argparse
import asyncio

import numpy as np

import secant

ROSENBROCK = "sum(100 * (x[1:] - x[:-1]**2)**2 + (1 - x[:-1])**2)"


def blocking(address: str, count: int) -> None:
    rng = np.random.default_rng(0)
    problems = [
        {"objective": ROSENBROCK, "x0": rng.uniform(-2, 2, size=4), "labels": {"sweep": "demo"}}
        for _ in range(count)
    ]
    with secant.Client(address) as client:
        batch = client.submit_batch(problems)
        print(f"batch {batch.batch_id}: {len(batch)} jobs")
        results = batch.results(timeout=300, return_exceptions=True)
        for job, result in zip(batch, results, strict=True):
            if isinstance(result, secant.SecantError):
                print(f"  {job.id} failed: {result}")
            else:
                print(f"  {job.id} f={result.fun:.2e} nit={result.nit} success={result.success}")
        # the batch can be found again later
        print("listed:", sum(1 for _ in client.jobs(batch_id=batch.batch_id)))


async def concurrent(address: str, count: int) -> None:
    async with secant.AsyncClient(address) as client:
        starts = [[-1.2 + 0.1 * i, 1.0] for i in range(count)]
        results = await asyncio.gather(*(client.minimize(ROSENBROCK, x0) for x0 in starts))
        print(f"asyncio: {sum(r.success for r in results)}/{count} converged")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", default=secant.DEFAULT_ADDRESS)
    parser.add_argument("--count", type=int, default=20)
    args = parser.parse_args()
    blocking(args.address, args.count)
    asyncio.run(concurrent(args.address, args.count))


if __name__ == "__main__":
    main()
