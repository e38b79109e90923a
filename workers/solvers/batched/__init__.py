"""Batched solvers: B same-shape problems advanced together over a leading batch dimension,
masked per member (status, line search, memory) and compacted as members finish.

`minimize_batch(fun, X0)` / `least_squares_batch(residual, X0)` with fun(X, ids) -> (k,)
(or (k, m) residuals); a batch of one gives the single solver's answer.
"""

from ._engine import (
    BATCH_METHODS,
    BatchSolve,
    check_batch_problem,
    least_squares_batch,
    minimize_batch,
)
from ._result import BatchProgress, BatchResult
from ._state import RUNNING, BatchState, batch_state_from_bytes, batch_state_to_bytes

__all__ = [
    "BATCH_METHODS",
    "RUNNING",
    "BatchProgress",
    "BatchResult",
    "BatchSolve",
    "BatchState",
    "batch_state_from_bytes",
    "batch_state_to_bytes",
    "check_batch_problem",
    "least_squares_batch",
    "minimize_batch",
]
