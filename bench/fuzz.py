"""A longer run of the suite's fuzzer (tests/integration/test_fuzz.py's strategies) against a
gateway subprocess, watching that gateway's memory.

Starts `secant serve` on a free loopback port (bench/service.py's Gateway), sends
--inputs generated Problems to Submit (accepted jobs are cancelled at once) and random bytes
to the raw method paths, and prints how many inputs it tried, the status codes it got, and the
gateway's resident memory after each round. Exits 1 if any answer was not a deliberate status
or the memory grew by more than --max-growth-mb between the first and the last round.

    .venv/bin/python bench/fuzz.py [--inputs 3000] [--rounds 6]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import grpc
from hypothesis import given, settings
from hypothesis import strategies as st

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))
from _gateway import Gateway
from test_fuzz import DELIBERATE, FUZZ, RAW_METHODS, problems

from secant.v1 import optimizer_pb2 as pb  # noqa: E402
from secant.v1 import optimizer_pb2_grpc as pb_grpc  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--max-growth-mb", type=float, default=50.0)
    args = parser.parse_args(argv)
    per_round = max(1, args.inputs // args.rounds)
    codes: collections.Counter = collections.Counter()
    bad: list[str] = []
    memory: list[float] = []
    tried = 0
    with Gateway(startup_timeout_s=120) as gateway, \
            grpc.insecure_channel(gateway.address) as channel:
        stub = pb_grpc.OptimizerStub(channel)
        pid = gateway._process.pid

        def record(call, what: str) -> None:
            nonlocal tried
            tried += 1
            try:
                reply = call()
                code = grpc.StatusCode.OK
                if isinstance(reply, pb.Job):
                    stub.CancelJob(pb.CancelJobRequest(job_id=reply.job_id), timeout=20)
            except grpc.RpcError as exc:
                code = exc.code()
                if code not in DELIBERATE:
                    bad.append(f"{code.name} for {what}: {exc.details()!r}")
            codes[code.name] += 1

        @settings(max_examples=per_round, **{**FUZZ, "derandomize": False})
        @given(problem=problems())
        def submit_round(problem):
            record(lambda: stub.Submit(pb.SubmitRequest(problem=problem), timeout=20),
                   "Submit")

        @settings(max_examples=max(1, per_round // 4), **{**FUZZ, "derandomize": False})
        @given(method=st.sampled_from(RAW_METHODS), body=st.binary(max_size=512))
        def raw_round(method, body):
            path = f"/secant.v1.Optimizer/{method}"
            if method in ("Solve", "Watch"):
                stream = channel.unary_stream(path)(body, timeout=20)
                record(lambda: next(stream, None), f"raw {method}")
                stream.cancel()
            elif method == "SolveWithCallbacks":
                stream = channel.stream_stream(path)(iter([body]), timeout=20)
                record(lambda: next(stream, None), f"raw {method}")
                stream.cancel()
            else:
                call = channel.unary_unary(path)

                def unary():
                    reply = call(body, timeout=20)
                    if method == "Submit":
                        return pb.Job.FromString(reply)
                    if method == "SubmitBatch":
                        for job in pb.SubmitBatchResponse.FromString(reply).jobs:
                            stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=20)
                    return reply

                record(unary, f"raw {method}")

        started = time.monotonic()
        for _ in range(args.rounds):
            submit_round()
            raw_round()
            memory.append(rss_mb(pid))
        elapsed = time.monotonic() - started
    growth = memory[-1] - memory[0]
    print(f"## fuzz: {tried} inputs in {elapsed:.0f} s against one gateway\n")
    print("| status | answers |\n|---|---:|")
    for name, count in codes.most_common():
        print(f"| {name} | {count} |")
    print("\n| round | gateway RSS (MiB) |\n|---:|---:|")
    for index, value in enumerate(memory, 1):
        print(f"| {index} | {value:.1f} |")
    print(f"\ngrowth first -> last round: {growth:+.1f} MiB (limit {args.max_growth_mb})")
    for line in bad[:20]:
        print("NOT DELIBERATE:", line)
    return 1 if bad or growth > args.max_growth_mb else 0


if __name__ == "__main__":
    sys.exit(main())
