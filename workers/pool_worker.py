"""A solver process of the gateway's pool (service/solver_pool.py): budgeted runs over a pipe.

    python -m workers.pool_worker

Frames on stdin and on the original stdout (stray prints go to stderr): a 4-byte little-endian
length, then a pickle. In: ("job", job_id, RunSpec, budget_s), ("cancel", job_id), ("stop",).
Out: ("ready",) once warm, then ("events", job_id, [WorkerEvent, ...]) per job: iter_solve with
suspend_after_s=budget_s, so a long solve ends in a CheckpointEvent the caller continues from.
The solver asks `should_stop` before every evaluation; it looks for a cancel on stdin then.
Only the gateway writes to stdin, so unpickling it is as safe as the gateway's own memory.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import sys

_HEADER = struct.Struct("<I")


def _read_exactly(fd: int, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int):
    (size,) = _HEADER.unpack(_read_exactly(fd, _HEADER.size))
    return pickle.loads(_read_exactly(fd, size))


def frame(message) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main() -> int:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the gateway says when to stop
    out = os.dup(1)
    os.dup2(2, 1)  # print() and friends now reach stderr, not the protocol
    sys.stdout = sys.stderr
    inp = sys.stdin.fileno()

    import torch

    torch.set_num_threads(1)
    from workers.runner import WARM_UP_SPEC, FailureEvent, iter_solve

    list(iter_solve(WARM_UP_SPEC))

    def send(message) -> None:
        data = frame(message)
        while data:
            data = data[os.write(out, data):]

    send(("ready",))
    pending_stop: list[str] = []
    while True:
        try:
            message = read_frame(inp)
        except EOFError:
            return 0
        if message[0] == "stop":
            return 0
        if message[0] != "job":  # a cancel that came after its job ended
            continue
        _, job_id, spec, budget_s = message
        pending_stop.clear()

        def should_stop(job_id=job_id) -> bool:
            if not pending_stop:
                while select.select([inp], [], [], 0)[0]:
                    incoming = read_frame(inp)
                    if incoming[0] in ("cancel", "stop") and incoming[-1] in (job_id, "stop"):
                        pending_stop.append(incoming[0])
                        break
            return bool(pending_stop)

        try:
            events = list(iter_solve(spec, should_stop, suspend_after_s=budget_s))
        except Exception as exc:  # iter_solve reports problems itself; this is a bug
            events = [FailureEvent("INTERNAL", f"the solver process failed: {type(exc).__name__}")]
        send(("events", job_id, events))
        if "stop" in pending_stop:
            return 0


if __name__ == "__main__":
    sys.exit(main())
