"""Callback mode: the caller keeps its objective; the server asks for f, g (and Hv).

``Client.minimize(fun, x0, jac=..., hessp=...)`` with a Python callable lands here. The
server drives the solver and sends evaluation requests over one SolveWithCallbacks stream;
`CallbackEvaluator` answers them (sans-IO: it only turns requests into results).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from secant._tensors import from_tensor, to_tensor
from secant.v1 import optimizer_pb2 as pb

ScalarFn = Callable[..., Any]
_LITTLE_ENDIAN = sys.byteorder == "little"


def _vector(tensor: pb.Tensor) -> np.ndarray:
    """A request's vector as a writable float64 array (the caller's code may modify it)."""
    data = tensor.data
    if (tensor.dtype == pb.FLOAT64 and len(tensor.shape) == 1
            and len(data) == 8 * tensor.shape[0] and _LITTLE_ENDIAN):
        return np.frombuffer(data, dtype=np.float64).copy()
    return from_tensor(tensor, copy=True).astype(np.float64, copy=False)


def _fill(field: pb.Tensor, vector: np.ndarray) -> None:
    """A float64 vector straight into a message field (what to_tensor makes, one copy less)."""
    if vector.dtype == np.float64 and vector.ndim == 1 and _LITTLE_ENDIAN:
        field.shape.append(vector.shape[0])
        field.dtype = pb.FLOAT64
        field.data = vector.tobytes()
    else:
        field.CopyFrom(to_tensor(vector, dtype=pb.FLOAT64))


class CallbackEvaluator:
    """Answers EvaluationRequests with scipy-style callables.

    ``fun(x, *args) -> float`` (or ``(f, g)`` when ``jac is True``); ``jac(x, *args) ->
    array`` or None for 2-point finite differences (n + 1 calls of fun per gradient, as
    scipy's default); ``hessp(x, p, *args) -> array``. An exception in the caller's code, or a
    non-finite value, is reported to the server, which treats it like scipy does (the step is
    rejected; if it persists the job ends with the non-finite status).
    """

    def __init__(self, fun: ScalarFn, jac: Any = None, hessp: ScalarFn | None = None,
                 args: tuple = ()) -> None:
        if not callable(fun):
            raise TypeError("fun must be callable")
        if jac is not None and jac is not True and not callable(jac):
            raise TypeError("jac must be None, True (fun returns (f, g)) or a callable")
        if hessp is not None and not callable(hessp):
            raise TypeError("hessp must be a callable hessp(x, p) or None")
        self.fun, self.jac, self.hessp, self.args = fun, jac, hessp, tuple(args)
        self.evaluations = 0

    @property
    def provides_hvp(self) -> bool:
        return self.hessp is not None

    def answer(self, request: pb.EvaluationRequest) -> pb.EvaluationResult:
        return self.answer_message(request).result

    def answer_message(self, request: pb.EvaluationRequest) -> pb.CallbackClientMessage:
        """The stream message answering `request` (built in place: no copies of the vectors)."""
        self.evaluations += 1
        message = pb.CallbackClientMessage()
        result = message.result
        result.request_id = request.request_id
        try:
            x = _vector(request.x)
            f, g = self._value_and_gradient(x, request.need_f, request.need_gradient)
            if f is not None:
                result.f = f
            if g is not None:
                _fill(result.gradient, g)
            if request.HasField("hvp_vector"):
                if self.hessp is None:
                    raise ValueError("the server asked for a Hessian-vector product; no hessp")
                p = _vector(request.hvp_vector)
                hv = np.asarray(self.hessp(x, p, *self.args), dtype=np.float64).reshape(-1)
                _fill(result.hvp, hv)
        except Exception as exc:  # the caller's code failed: the solver backs off
            result.Clear()
            result.request_id = request.request_id
            result.error = f"{type(exc).__name__}: {exc}"[:1000] or "evaluation failed"
        return message

    def _value_and_gradient(self, x: np.ndarray, need_f: bool, need_g: bool):
        if self.jac is True:
            f, g = self.fun(x, *self.args)
            return float(f), np.asarray(g, dtype=np.float64).reshape(-1) if need_g else None
        f = float(self.fun(x, *self.args)) if need_f or (need_g and self.jac is None) else None
        if not need_g:
            return f, None
        if callable(self.jac):
            return f, np.asarray(self.jac(x, *self.args), dtype=np.float64).reshape(-1)
        return f, self._finite_differences(x, f)

    def _finite_differences(self, x: np.ndarray, f0: float) -> np.ndarray:
        step = math.sqrt(np.finfo(np.float64).eps) * np.maximum(1.0, np.abs(x))
        grad = np.empty_like(x)
        for i in range(x.size):
            shifted = x.copy()
            shifted[i] += step[i]
            grad[i] = (float(self.fun(shifted, *self.args)) - f0) / step[i]
        return grad


def callback_start(problem: pb.Problem, evaluator: CallbackEvaluator,
                   resume_job_id: str = "") -> pb.CallbackClientMessage:
    """The stream's first message: the problem without an objective, and what we evaluate."""
    problem.ClearField("objective")
    return pb.CallbackClientMessage(start=pb.CallbackStart(
        problem=problem, provides_gradient=True, provides_hvp=evaluator.provides_hvp,
        resume_job_id=resume_job_id,
    ))
