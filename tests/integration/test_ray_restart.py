"""The embedded Ray head after a crash: a failed `ray start` is retried and says why, and a
head a killed gateway left behind is ended by the next gateway on the same store."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from service.scheduler import RayCluster, _group_alive, _wait_for_port

pytestmark = pytest.mark.integration


class _FlakyHead(RayCluster):
    """A head whose first `ray start` fails the way a port clash does."""

    def __init__(self, failures: int, **kw) -> None:
        super().__init__(None, num_cpus=1, **kw)
        self.failures = failures
        self.launches = 0

    def _head_command(self, gcs_port: int) -> list[str]:
        self.launches += 1
        if self.launches <= self.failures:
            return [sys.executable, "-c",
                    "import sys; print('ConnectionError: port already in use (simulated)');"
                    " sys.exit(1)"]
        return super()._head_command(gcs_port)


def test_a_failed_ray_start_is_retried_and_logged(caplog):
    head = _FlakyHead(failures=1, start_attempts=3)
    try:
        head.launch()
        with caplog.at_level("WARNING", logger="secant.scheduler"):
            head.wait_until_up()
        assert head.launches == 2
        assert any("port already in use (simulated)" in r.getMessage() for r in caplog.records)
    finally:
        head.stop()


def test_a_head_that_never_starts_ends_with_ray_output():
    head = _FlakyHead(failures=10, start_attempts=2)
    try:
        head.launch()
        with pytest.raises(RuntimeError, match=r"(?s)failed to start 2 times.*simulated"):
            head.wait_until_up()
    finally:
        head.stop()


def test_the_next_gateway_ends_the_head_a_killed_one_left(tmp_path):
    owner = tmp_path / "secant.db.ray-head"
    left_behind = RayCluster(None, num_cpus=1, owner_file=owner)
    left_behind.launch()
    old = left_behind._head
    _wait_for_port(left_behind._head_port, time.monotonic() + 60, old, left_behind._head_log)
    assert owner.exists()
    left_behind._head = None  # as if its gateway died without stopping it
    # A dead gateway's head is reaped by init; here this process is its parent, so reap it.
    reaper = threading.Thread(target=old.wait, daemon=True)
    reaper.start()
    successor = RayCluster(None, num_cpus=1, owner_file=owner)
    try:
        successor.launch()
        reaper.join(10)
        assert not _group_alive(old.pid)
        successor.wait_until_up()
        assert str(successor._head.pid) in owner.read_text()
    finally:
        successor.stop()
    assert not owner.exists()
