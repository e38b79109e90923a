"""secant's solver library: pure math on torch tensors (no Ray, no gRPC).

A solver is a descent direction + a step rule + termination, advancing an explicit state
one evaluation at a time; `minimize` and `least_squares` drive it from a local objective,
`Solve` lets any other driver (a remote client) answer its evaluation requests.
"""

from ._checkpoint import load_state, save_state, state_from_bytes, state_to_bytes
from ._driver import IterationDone, Solve, check_problem, drive_locally, least_squares, minimize
from ._evaluation import EvalRequest, Evaluation, LocalEvaluator
from ._linesearch import BacktrackingArmijo, LineSearchResult, StrongWolfe
from ._methods import METHODS, SolveState, canonical_method
from ._options import KNOWN_OPTIONS, Termination, parse_options
from ._result import IterateInfo, SolverResult, Status
from ._small import SMALL_METHODS, SMALL_N_MAX, NumpyEvaluator, TorchBridge

__all__ = [
    "KNOWN_OPTIONS",
    "METHODS",
    "SMALL_METHODS",
    "SMALL_N_MAX",
    "BacktrackingArmijo",
    "EvalRequest",
    "Evaluation",
    "IterateInfo",
    "IterationDone",
    "LineSearchResult",
    "LocalEvaluator",
    "NumpyEvaluator",
    "Solve",
    "SolveState",
    "SolverResult",
    "Status",
    "StrongWolfe",
    "Termination",
    "TorchBridge",
    "canonical_method",
    "check_problem",
    "drive_locally",
    "least_squares",
    "load_state",
    "minimize",
    "parse_options",
    "save_state",
    "state_from_bytes",
    "state_to_bytes",
]
