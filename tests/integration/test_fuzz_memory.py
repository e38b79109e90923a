"""The fuzzer against a gateway subprocess: every answer deliberate, and the gateway's
resident memory flat across rounds (bench/fuzz.py, a short run; `make fuzz` runs it long)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "bench" / "fuzz.py"


def test_fuzzed_gateway_answers_deliberately_and_its_memory_stays_flat(capsys):
    spec = importlib.util.spec_from_file_location("secant_bench_fuzz", BENCH)
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    code = fuzz.main(["--inputs", "300", "--rounds", "3", "--max-growth-mb", "30"])
    report = capsys.readouterr().out
    assert code == 0, report
    assert "inputs in" in report
