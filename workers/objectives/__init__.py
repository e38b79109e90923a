"""Objectives a caller can send: the expression DSL, data tensors and trusted code.

Pure torch: no Ray or gRPC imports, so the service can validate with it and workers can
evaluate with it.
"""

from ._batch import BATCH_OBJECTIVE_KINDS, BatchObjective, build_batch_objective
from ._data import ACCEPTED_DTYPES, ObjectiveLimits, TensorSpec, tensor_from_bytes
from ._errors import ExpressionError, ObjectiveError, UntrustedCodeError
from ._expression import (
    CONSTANT_NAMES,
    FUNCTION_NAMES,
    RESERVED_NAMES,
    CompiledExpression,
    ExpressionLimits,
    compile_expression,
)
from ._objective import OBJECTIVE_KINDS, Objective, build_objective
from ._trusted import load_cloudpickle, load_torch_export

__all__ = [
    "ACCEPTED_DTYPES",
    "BATCH_OBJECTIVE_KINDS",
    "BatchObjective",
    "CONSTANT_NAMES",
    "FUNCTION_NAMES",
    "OBJECTIVE_KINDS",
    "RESERVED_NAMES",
    "CompiledExpression",
    "ExpressionError",
    "ExpressionLimits",
    "Objective",
    "ObjectiveError",
    "ObjectiveLimits",
    "TensorSpec",
    "UntrustedCodeError",
    "build_batch_objective",
    "build_objective",
    "compile_expression",
    "load_cloudpickle",
    "load_torch_export",
    "tensor_from_bytes",
]
