"""The SDK in one page: solve, stream, submit, cancel. Needs a gateway (`make serve`).

python examples/sdk_quickstart.py [--address 127.0.0.1:50051]
"""

from __future__ import annotations

import argparse

import numpy as np

import secant

ROSENBROCK = "sum(100 * (x[1:] - x[:-1]**2)**2 + (1 - x[:-1])**2)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", default=secant.DEFAULT_ADDRESS)
    args = parser.parse_args()

    with secant.Client(args.address) as client:
        # 1. scipy-style: blocks, returns an OptimizeResult (progress bar from the stream)
        result = client.minimize(ROSENBROCK, x0=[-1.2, 1.0], method="l-bfgs", progress=True)
        print(result)

        # 2. data tensors travel with the objective; bounds as scipy pairs (None: unbounded)
        a_matrix, b = np.array([[3.0, 1.0], [1.0, 2.0]]), np.array([1.0, -4.0])
        quadratic = secant.Expression(
            "0.5 * dot(x, A @ x) - dot(b, x)", data={"A": a_matrix, "b": b}
        )
        boxed = client.minimize(
            quadratic, [0.0, 0.0], method="l-bfgs-b", bounds=[(None, None), (-1, 1)]
        )
        print("boxed quadratic:", boxed.x, boxed.fun)

        # 3. submit now, follow the events, collect the result later
        job = client.submit(ROSENBROCK, x0=np.full(100, -1.0), method="bfgs")
        for event in job.events():
            if event.WhichOneof("kind") == "iterate" and event.iterate.iteration % 50 == 0:
                print(f"  iter {event.iterate.iteration}: f={event.iterate.f:.3e}")
        print("job", job.id, job.state, job.result().fun)

        # 4. errors carry the gRPC status code and the server's message
        try:
            client.minimize(ROSENBROCK, [1.0, 2.0], method="no-such-method")
        except secant.SecantError as err:
            print("refused:", err.code.name, err.message)


if __name__ == "__main__":
    main()
