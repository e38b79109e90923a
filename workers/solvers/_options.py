"""Solver options: scipy and torch spellings normalized, values checked, unknown keys rejected."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# scipy / torch spellings -> ours
_ALIASES = {
    "maxiter": "max_iter",
    "max_iterations": "max_iter",
    "maxfun": "max_evals",
    "maxfev": "max_evals",
    "max_eval": "max_evals",
    "maxcor": "history_size",
    "m": "history_size",
    "history": "history_size",
    "pgtol": "gtol",
    "tolerance_grad": "gtol",
    "tolerance_change": "ftol",
    "time_limit_s": "time_limit",
    "linesearch": "line_search",
    "line_search_fn": "line_search",
}

_LINE_SEARCHES = {"armijo", "strong-wolfe"}


@dataclass(frozen=True)
class Termination:
    """When a solve stops. gtol is on the inf-norm of the (projected) gradient."""

    gtol: float = 1e-5
    ftol: float = 0.0  # relative decrease of f between iterations, as L-BFGS-B's factr*eps
    xtol: float = 0.0  # inf-norm of the step, relative to max(1, |x|_inf)
    max_iter: int | None = None  # None: 200 * n, at least 1000
    max_evals: int | None = None
    time_limit: float | None = None  # seconds


@dataclass(frozen=True)
class SolverOptions:
    termination: Termination
    line_search: str | None  # None: the method's default
    c1: float | None
    c2: float | None
    history_size: int
    cg_max_iter: int | None
    initial_damping: float
    return_history: bool


_FLOAT_KEYS = {"gtol", "ftol", "xtol", "time_limit", "c1", "c2", "initial_damping"}
_INT_KEYS = {"max_iter", "max_evals", "history_size", "cg_max_iter"}
_BOOL_KEYS = {"return_history"}
_STR_KEYS = {"line_search"}
KNOWN_OPTIONS = frozenset(_FLOAT_KEYS | _INT_KEYS | _BOOL_KEYS | _STR_KEYS)


def parse_options(options: dict[str, Any] | None) -> SolverOptions:
    """Checks an options dict (scipy spellings accepted); raises ValueError naming the key."""
    raw: dict[str, Any] = {}
    for key, value in (options or {}).items():
        if not isinstance(key, str):
            raise ValueError(f"option names must be strings, got {key!r}")
        name = _ALIASES.get(key.lower(), key.lower())
        if name not in KNOWN_OPTIONS:
            known = ", ".join(sorted(KNOWN_OPTIONS))
            raise ValueError(f"unknown option {key!r}; known options: {known}")
        if name in raw:
            raise ValueError(f"option {name!r} given twice (as {key!r} and an alias)")
        raw[name] = _check_value(name, key, value)

    line_search = raw.get("line_search")
    if line_search is not None:
        line_search = line_search.lower().replace("_", "-")
        if line_search == "wolfe":
            line_search = "strong-wolfe"
        if line_search not in _LINE_SEARCHES:
            raise ValueError(
                f"option line_search={raw['line_search']!r}: expected one of "
                f"{sorted(_LINE_SEARCHES)}"
            )
    termination = Termination(
        gtol=raw.get("gtol", Termination.gtol),
        ftol=raw.get("ftol", Termination.ftol),
        xtol=raw.get("xtol", Termination.xtol),
        max_iter=raw.get("max_iter"),
        max_evals=raw.get("max_evals"),
        time_limit=raw.get("time_limit"),
    )
    return SolverOptions(
        termination=termination,
        line_search=line_search,
        c1=raw.get("c1"),
        c2=raw.get("c2"),
        history_size=raw.get("history_size", 10),
        cg_max_iter=raw.get("cg_max_iter"),
        initial_damping=raw.get("initial_damping", 1e-3),
        return_history=raw.get("return_history", False),
    )


def _check_value(name: str, key: str, value: Any) -> Any:
    if name in _FLOAT_KEYS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"option {key!r} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"option {key!r} must be finite, got {value}")
        if value < 0 or (name in {"time_limit", "c1", "c2"} and value == 0):
            raise ValueError(f"option {key!r} must be positive, got {value}")
        if name in {"c1", "c2"} and value >= 1:
            raise ValueError(f"option {key!r} must be between 0 and 1, got {value}")
        return value
    if name in _INT_KEYS:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"option {key!r} must be an integer, got {value!r}")
        if value < 1:
            raise ValueError(f"option {key!r} must be at least 1, got {value}")
        return value
    if name in _BOOL_KEYS:
        if not isinstance(value, bool):
            raise ValueError(f"option {key!r} must be true or false, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"option {key!r} must be a string, got {value!r}")
    return value
