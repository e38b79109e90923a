"""Environment for a loopback-only Ray with token auth. Import-light on purpose: Ray reads these
variables once, when `ray` is first imported (its C++ config and constants), so they must be set
before anything imports ray. `secant serve` and tests/conftest.py call this first thing."""

from __future__ import annotations

import os
import secrets


def prepare_loopback_ray_env() -> None:
    """Turns on Ray token auth with a fresh token (unless one is set) and makes Ray resolve this
    node's address to 127.0.0.1, so an embedded head and its workers bind loopback only."""
    if "ray" in __import__("sys").modules:
        raise RuntimeError("prepare_loopback_ray_env() must run before ray is imported")
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def loopback_ray_env_ready() -> bool:
    return (
        os.environ.get("RAY_AUTH_MODE") == "token"
        and bool(os.environ.get("RAY_AUTH_TOKEN"))
        and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"
    )
