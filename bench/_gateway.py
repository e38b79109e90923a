"""Loads bench/service.py's Gateway (a `secant serve` subprocess) for the other benchmarks,
under its own module name: `service` is the gateway package's name."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "secant_bench_service", Path(__file__).resolve().parent / "service.py"
)
_module = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _module  # dataclasses in it look their module up by name
_spec.loader.exec_module(_module)

Gateway = _module.Gateway
percentile = _module.percentile
