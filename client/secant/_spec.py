"""Problem spec files (YAML or JSON) for ``secant solve``: what the CLI and scripts share.

Format (every key but objective and x0 is optional; unknown keys are refused)::

    objective: {expression: "sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)"}
    #          or {residual: "A @ x - b"}, or a bare string (an expression)
    data:                         # named tensors the objective uses
      A: [[1.0, 2.0], [3.0, 4.0]] # inline (float64 unless {values: ..., dtype: int64})
      b: {file: b.npy}            # a .npy file, relative to the spec's folder
    x0: [-1.2, 1.0]               # or {fill: -1.2, n: 100}
    method: l-bfgs
    bounds: {lower: 0, upper: [1, 2]}   # or [[lo, hi], ...] pairs, null for unbounded
    options: {gtol: 1.0e-8, max_iter: 500}
    device: cpu
    dtype: float64
    report_x_every: 0
    labels: {team: research}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from secant._problem import Bounds, Expression, Residual

SPEC_KEYS = {
    "objective", "data", "x0", "method", "bounds", "options", "device", "dtype",
    "report_x_every", "labels",
}  # fmt: skip


class SpecError(ValueError):
    """A spec file is malformed; the message names the key and what was expected."""


def load_spec(path: str | Path, require_x0: bool = True) -> dict[str, Any]:
    """Reads a spec file into ``Client.minimize`` keyword arguments (data files loaded).

    ``require_x0=False`` (``secant solve --batch``, where x0 comes from an .npz) lets the
    spec leave x0 out; the result then has no "x0" key.
    """
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() == ".json":
        raw = json.loads(text)
    else:
        try:
            import yaml
        except ImportError as exc:
            raise ImportError("YAML specs need pyyaml: pip install 'secant[yaml]'") from exc
        raw = yaml.safe_load(text)
    return spec_to_kwargs(raw, base_dir=path.parent, require_x0=require_x0)


def spec_to_kwargs(
    raw: Any, base_dir: Path = Path("."), require_x0: bool = True
) -> dict[str, Any]:
    """Turns a parsed spec (a mapping) into ``minimize`` keyword arguments."""
    if not isinstance(raw, Mapping):
        raise SpecError("a spec must be a mapping with at least 'objective' and 'x0'")
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise SpecError(f"unknown spec keys {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    for required in ("objective", "x0") if require_x0 else ("objective",):
        if required not in raw:
            raise SpecError(f"spec is missing {required!r}")
    data = {str(k): _data_tensor(k, v, base_dir) for k, v in (raw.get("data") or {}).items()}
    kwargs: dict[str, Any] = {"objective": _objective(raw["objective"], data)}
    if "x0" in raw:
        kwargs["x0"] = _x0(raw["x0"])
    for key in ("method", "options", "device", "dtype", "report_x_every", "labels"):
        if raw.get(key) is not None:
            kwargs[key] = raw[key]
    if raw.get("bounds") is not None:
        kwargs["bounds"] = _bounds(raw["bounds"])
    return kwargs


def _objective(value: Any, data: dict[str, np.ndarray]) -> Expression | Residual:
    if isinstance(value, str):
        return Expression(value, data)
    if isinstance(value, Mapping) and len(value) == 1:
        ((kind, source),) = value.items()
        if kind == "expression" and isinstance(source, str):
            return Expression(source, data)
        if kind == "residual" and isinstance(source, str):
            return Residual(source, data)
    raise SpecError("objective must be a string, {expression: SOURCE} or {residual: SOURCE}")


def _x0(value: Any) -> np.ndarray:
    if isinstance(value, Mapping):
        if set(value) != {"fill", "n"}:
            raise SpecError("x0 as a mapping must be {fill: VALUE, n: LENGTH}")
        n = value["n"]
        if not isinstance(n, int) or n <= 0:
            raise SpecError(f"x0.n must be a positive integer, got {n!r}")
        return np.full(n, float(value["fill"]))
    if isinstance(value, list):
        try:
            return np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise SpecError(f"x0 must be a list of numbers: {exc}") from exc
    raise SpecError("x0 must be a list of numbers or {fill: VALUE, n: LENGTH}")


def _bounds(value: Any) -> Any:
    if isinstance(value, Mapping):
        unknown = set(value) - {"lower", "upper"}
        if unknown:
            raise SpecError(f"bounds accepts lower and upper, not {sorted(unknown)}")
        return Bounds(value.get("lower"), value.get("upper"))
    if isinstance(value, list):
        return [tuple(pair) if isinstance(pair, list) else pair for pair in value]
    raise SpecError("bounds must be {lower: ..., upper: ...} or a list of [lo, hi] pairs")


def _data_tensor(name: Any, value: Any, base_dir: Path) -> np.ndarray:
    if isinstance(value, Mapping) and "file" in value:
        if set(value) != {"file"}:
            raise SpecError(f"data.{name}: a file entry is {{file: PATH.npy}}")
        path = base_dir / str(value["file"])
        # allow_pickle=False: a spec file must never be a way to run code
        return np.load(path, allow_pickle=False)
    if isinstance(value, Mapping) and "values" in value:
        if set(value) - {"values", "dtype"}:
            raise SpecError(f"data.{name}: an inline entry is {{values: [...], dtype: NAME}}")
        return np.asarray(value["values"], dtype=value.get("dtype", "float64"))
    if isinstance(value, list | int | float):
        try:
            return np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise SpecError(f"data.{name} must be numbers (nested lists): {exc}") from exc
    raise SpecError(
        f"data.{name} must be a list, {{file: PATH.npy}} or {{values: ..., dtype: ...}}"
    )
