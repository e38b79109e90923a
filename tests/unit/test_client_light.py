"""The SDK stays light: importing it pulls in neither torch nor ray, nor its optional extras."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CLIENT_DIR = Path(__file__).resolve().parents[2] / "client"
HEAVY = ("torch", "ray", "scipy", "matplotlib", "tqdm", "yaml", "pandas")


def _modules_after(statement: str) -> set[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    # the SDK folder first, as an installed `secant` would be; a fresh interpreter so this
    # test process's own imports (pytest plugins, other tests) do not count
    env_path = str(CLIENT_DIR)
    completed = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {env_path!r}); {code}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return {name.split(".")[0] for name in json.loads(completed.stdout.strip().splitlines()[-1])}


def test_import_secant_loads_no_heavy_or_optional_packages():
    loaded = _modules_after("import secant")

    assert "secant" in loaded
    assert not loaded.intersection(HEAVY), sorted(loaded.intersection(HEAVY))


def test_building_a_problem_and_a_client_loads_no_heavy_packages():
    loaded = _modules_after(
        "import secant; secant.build_problem('sum(x**2)', [1.0, 2.0], bounds=[(0, None)] * 2); "
        "secant.Client('127.0.0.1:1').close()"
    )

    assert not loaded.intersection(HEAVY), sorted(loaded.intersection(HEAVY))


def test_cli_help_loads_no_heavy_packages():
    loaded = _modules_after("import secant.cli")

    assert not loaded.intersection(HEAVY), sorted(loaded.intersection(HEAVY))
