"""Condition waits for tests: poll until something holds, and fail loudly at the deadline.

A fixed sleep is either too short on a loaded machine (a flaky test) or too long everywhere (a
slow suite); these wait exactly as long as the condition needs, up to a bound that only a hang
reaches. Imported as `from waiting import ...` (tests/ is on sys.path through its conftest).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float, what: str,
               interval: float = 0.02) -> T:
    """condition()'s first truthy value, polled every `interval` s; AssertionError naming
    `what` once `timeout` s have passed without one."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_for_state(get_job: Callable[[], object], states: Collection[int], timeout: float,
                   describe: Callable[[int], str] = str):
    """The job get_job() returns once its `state` is one of `states`; AssertionError with the
    state it was left in when `timeout` s pass first."""
    last: list[object] = []

    def reached():
        job = get_job()
        last[:] = [job]
        return job if job.state in states else None

    try:
        return wait_until(reached, timeout, f"a state in {sorted(map(describe, states))}")
    except AssertionError as timed_out:
        state = describe(last[0].state) if last else "unknown"
        raise AssertionError(f"{timed_out}; the job is still {state}") from None
