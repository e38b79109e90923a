"""The expression DSL on numpy, with reverse-mode gradients, for the small-problem path.

Why: at n = 2 one torch op costs 2-4 us of dispatch, and f and g of Rosenbrock by autograd cost
about 130 us (ten forward ops, about twenty in the backward); the same arithmetic on numpy
takes about 20 us, and a small solve makes forty such evaluations (workers.solvers._small).

What it is: a second reading of an expression the torch compiler (_expression.py) has already
parsed, checked and built (so every error a caller can make is still reported by that one
compiler). The same checked AST becomes a flat program of numpy steps, each with the
vector-Jacobian product torch's autograd uses for that op (the same formulas: pow's
exponent * x^(exponent-1), sqrt's g / (2 sqrt x), abs's sign, clamp passing the gradient where
the bound holds with equality, norm's zero at the origin, softplus's threshold of 20, where's
masks). Constants are folded exactly as the torch compiler folds them (the same Python and
torch calls).

What it covers: x, n, constants and float data tensors; + - * / and ** with a constant on one
side; unary minus; @ between vectors and matrices; indexing with constant integers and
slices; sum, mean (whole or along a dim), dot, norm (ord 2), logsumexp; the elementwise
functions; clamp/minimum/maximum against constants; where over comparisons; ones, zeros,
arange. Anything else (prod, other norms, tensor bounds, integer data, tensor ** tensor, ...)
gives None: the objective keeps its torch evaluation. A program is checked against torch
autograd at x0 before it is used (`numpy_evaluator`); any disagreement beyond rounding keeps
torch.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

import numpy as np
import torch

from ._expression import (
    _BINARY_OPS,
    _COMPARE_OPS,
    _UNARY_FUNCTIONS,
    CONSTANT_NAMES,
    ExpressionLimits,
    _chain_head,
    _parse,
)


class Unsupported(Exception):
    """The expression uses something this backend does not cover (torch evaluates it)."""


def _unbroadcast(g, shape: tuple[int, ...]):
    """Sums a gradient over the dimensions broadcasting added (torch's sum_to_size)."""
    if np.shape(g) == shape:
        return g
    g = np.asarray(g)
    while g.ndim > len(shape):
        g = g.sum(axis=0)
    for axis, size in enumerate(shape):
        if size == 1 and g.shape[axis] != 1:
            g = g.sum(axis=axis, keepdims=True)
    return g


class _C:
    """A compile-time constant: a Python number or bool, or a numpy array (ones, arange)."""

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value


class _S:
    """A value computed at evaluation time, in slot `slot` of the program's value list."""

    __slots__ = ("slot", "uses_x")

    def __init__(self, slot: int, uses_x: bool) -> None:
        self.slot, self.uses_x = slot, uses_x


# Forward and backward of the elementwise functions: (numpy forward, vjp(g, x, out)).
def _softplus(t):
    return np.where(t > 20.0, t, np.log1p(np.exp(t)))


def _softplus_vjp(g, t, out):
    z = np.exp(t)
    return np.where(t > 20.0, g, g * z / (z + 1.0))


_ELEMENTWISE: dict[str, tuple[Callable, Callable]] = {
    "exp": (np.exp, lambda g, t, out: g * out),
    "log": (np.log, lambda g, t, out: g / t),
    "log1p": (np.log1p, lambda g, t, out: g / (t + 1.0)),
    "sqrt": (np.sqrt, lambda g, t, out: g / (2.0 * out)),
    "abs": (np.abs, lambda g, t, out: g * np.sign(t)),
    "sin": (np.sin, lambda g, t, out: g * np.cos(t)),
    "cos": (np.cos, lambda g, t, out: g * -np.sin(t)),
    "tan": (np.tan, lambda g, t, out: g * (1.0 + out * out)),
    "tanh": (np.tanh, lambda g, t, out: g * (1.0 - out * out)),
    "sigmoid": (lambda t: 1.0 / (1.0 + np.exp(-t)), lambda g, t, out: g * (1.0 - out) * out),
    "softplus": (_softplus, _softplus_vjp),
    "square": (np.square, lambda g, t, out: g * 2.0 * t),
}
assert set(_ELEMENTWISE) == set(_UNARY_FUNCTIONS)


def _pow_vjp_base(exponent):
    if exponent == 0:
        return lambda g, a, out: np.zeros_like(np.asarray(a, dtype=np.float64))
    return lambda g, a, out: g * (exponent * a ** (exponent - 1))


def _pow_vjp_exponent(base):
    if base == 0:
        return lambda g, b, out: np.where(np.asarray(b) >= 0, 0.0, g * (out * -math.inf))
    log_base = math.log(base) if base > 0 else math.nan
    return lambda g, b, out: g * (out * log_base)


def _matmul_vjp_a(g, a, b):
    if a.ndim == 1 and b.ndim == 1:
        return g * b
    if a.ndim == 2 and b.ndim == 1:
        return np.outer(g, b)
    if a.ndim == 1 and b.ndim == 2:
        return b @ g
    if a.ndim == 2 and b.ndim == 2:
        return g @ b.T
    raise Unsupported("matmul beyond vectors and matrices")  # found by the check at x0


def _matmul_vjp_b(g, a, b):
    if a.ndim == 1 and b.ndim == 1:
        return g * a
    if a.ndim == 2 and b.ndim == 1:
        return a.T @ g
    if a.ndim == 1 and b.ndim == 2:
        return np.outer(a, g)
    if a.ndim == 2 and b.ndim == 2:
        return a.T @ g
    raise Unsupported("matmul beyond vectors and matrices")


class _Op:
    """One step of a program: slot = fwd(*sources); vjps[i](g, *values, out) for operand i."""

    __slots__ = ("slot", "fwd", "sources", "vjps", "targets")

    def __init__(self, slot, fwd, sources, vjps, targets) -> None:
        self.slot, self.fwd, self.sources, self.vjps, self.targets = (
            slot, fwd, sources, vjps, targets)


def _back_step(op: _Op, shapes: dict[int, tuple[int, ...]], values: list) -> Callable:
    """The backward step of `op` for the shapes the program has (they never change: x and
    the data have fixed shapes), summing over broadcast dimensions only where it must."""
    slot, sources = op.slot, op.sources
    args = [values[s] if s is not None else c for s, c in sources]
    probe = np.ones(shapes[slot])
    plan = []
    for i, target in op.targets:
        vjp = op.vjps[i]
        shape = shapes[target]
        reduce = np.shape(vjp(probe, *args, values[slot])) != shape
        plan.append((vjp, target, shape, reduce))

    def accumulate(grads, target, grad):
        previous = grads[target]
        grads[target] = grad if previous is None else previous + grad

    if len(sources) == 1 and len(plan) == 1:
        (a, _), (vjp, target, shape, reduce) = sources[0], plan[0]

        def back(values, grads):
            g = grads[slot]
            if g is not None:
                grad = vjp(g, values[a], values[slot])
                accumulate(grads, target, _unbroadcast(grad, shape) if reduce else grad)

        return back
    if len(sources) == 2:
        (a, ca), (b, cb) = sources

        def back(values, grads):
            g = grads[slot]
            if g is None:
                return
            va = values[a] if a is not None else ca
            vb = values[b] if b is not None else cb
            out = values[slot]
            for vjp, target, shape, reduce in plan:
                grad = vjp(g, va, vb, out)
                accumulate(grads, target, _unbroadcast(grad, shape) if reduce else grad)

        return back

    def back(values, grads):
        g = grads[slot]
        if g is None:
            return
        operands = [values[s] if s is not None else c for s, c in sources]
        out = values[slot]
        for vjp, target, shape, reduce in plan:
            grad = vjp(g, *operands, out)
            accumulate(grads, target, _unbroadcast(grad, shape) if reduce else grad)

    return back


class NumpyProgram:
    """f (and g) of one expression on numpy; see the module docstring. Call `prepare(x)`
    once (it learns the shapes) before evaluating. Not thread-safe."""

    def __init__(self, steps, ops, n_slots: int, out: int, x_slot: int, data_slots,
                 residual: bool) -> None:
        self._steps, self._ops = steps, ops
        self._backs: list[Callable] | None = None
        self._n_slots, self._out, self._x = n_slots, out, x_slot
        self._data_slots = data_slots  # [(slot, array)]
        self.residual = residual

    def prepare(self, x: np.ndarray) -> None:
        with np.errstate(all="ignore"):
            values = self._forward(x)
            shapes = {slot: np.shape(value) for slot, value in enumerate(values)}
            self._backs = [_back_step(op, shapes, values) for op in reversed(self._ops)]

    def _forward(self, x: np.ndarray) -> list:
        values = [None] * self._n_slots
        values[self._x] = x
        for slot, array in self._data_slots:
            values[slot] = array
        for step in self._steps:
            step(values)
        return values

    def value(self, x: np.ndarray):
        with np.errstate(all="ignore"):
            out = self._forward(x)[self._out]
            if self.residual:
                return np.float64(0.5 * float(out @ out))
            return np.float64(out)

    def value_and_grad(self, x: np.ndarray):
        with np.errstate(all="ignore"):
            values = self._forward(x)
            out = values[self._out]
            grads = [None] * self._n_slots
            if self.residual:
                f = np.float64(0.5 * float(out @ out))
                grads[self._out] = out
            else:
                f = np.float64(out)
                grads[self._out] = np.float64(1.0)
            for back in self._backs:
                back(values, grads)
            g = grads[self._x]
            if g is None:
                g = np.zeros_like(x)
            elif np.shape(g) != x.shape or not isinstance(g, np.ndarray) or not g.flags.writeable:
                g = np.array(np.broadcast_to(g, x.shape), dtype=np.float64)
            return f, g


class _Builder:
    def __init__(self, dimension: int, data: dict[str, np.ndarray], limits: ExpressionLimits):
        self.dimension = dimension
        self.data = data
        self.limits = limits
        self.n_slots = 0
        self.steps: list[Callable] = []
        self.ops: list[_Op] = []
        self.x_slot = self._new_slot()
        self.data_slots: dict[str, int] = {}

    def _new_slot(self) -> int:
        self.n_slots += 1
        return self.n_slots - 1

    # -- emitting one op -------------------------------------------------------------------

    def emit(self, fwd: Callable, operands: list, vjps: list[Callable | None]) -> _S:
        """A slot holding fwd(*operand values); vjps[i](g, *values, out) -> operand i's grad."""
        slot = self._new_slot()
        sources = [(v.slot, None) if isinstance(v, _S) else (None, v.value) for v in operands]
        if len(sources) == 1 and sources[0][0] is not None:
            a = sources[0][0]

            def step(values, a=a, slot=slot):
                values[slot] = fwd(values[a])
        elif len(sources) == 2 and sources[0][0] is not None and sources[1][0] is not None:
            a, b = sources[0][0], sources[1][0]

            def step(values, a=a, b=b, slot=slot):
                values[slot] = fwd(values[a], values[b])
        elif len(sources) == 2 and sources[0][0] is not None:
            a, cb = sources[0][0], sources[1][1]

            def step(values, a=a, cb=cb, slot=slot):
                values[slot] = fwd(values[a], cb)
        elif len(sources) == 2 and sources[1][0] is not None:
            ca, b = sources[0][1], sources[1][0]

            def step(values, ca=ca, b=b, slot=slot):
                values[slot] = fwd(ca, values[b])
        else:

            def step(values, slot=slot):
                values[slot] = fwd(*[values[s] if s is not None else c for s, c in sources])

        self.steps.append(step)
        uses_x = any(isinstance(v, _S) and v.uses_x for v in operands)
        if uses_x:
            targets = [
                (i, v.slot) for i, v in enumerate(operands)
                if isinstance(v, _S) and v.uses_x and vjps[i] is not None
            ]
            self.ops.append(_Op(slot, fwd, sources, vjps, targets))
        return _S(slot, uses_x)

    # -- constants, folded as the torch compiler folds them --------------------------------

    def fold(self, compute: Callable[[], object]) -> _C:
        try:
            value = compute()
        except (ZeroDivisionError, OverflowError, RuntimeError, ValueError, TypeError) as exc:
            raise Unsupported(f"constant: {exc}") from None  # the torch compiler refused it
        if isinstance(value, torch.Tensor):
            value = value.item()
        if isinstance(value, complex):
            raise Unsupported("complex constant")
        return _C(value)

    @staticmethod
    def array(value: _C | _S):
        """A constant as a float64 0-d array (what the torch compiler's _materialize makes)."""
        if isinstance(value, _S):
            return value
        v = value.value
        return _C(v if isinstance(v, np.ndarray) else np.array(float(v)))

    # -- the tree --------------------------------------------------------------------------

    def compile(self, node: ast.AST):
        if isinstance(node, ast.Constant):
            return _C(node.value)
        if isinstance(node, ast.Name):
            return self.name(node)
        if isinstance(node, ast.BinOp):
            return self.binary_chain(node)
        if isinstance(node, ast.UnaryOp):
            operand = self.compile(node.operand)
            if isinstance(node.op, ast.UAdd):
                return operand
            if isinstance(operand, _C):
                value = operand.value
                return self.fold(lambda: -value)
            return self.emit(operator.neg, [operand], [lambda g, a, out: -g])
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.Subscript):
            return self.subscript(node)
        raise Unsupported(type(node).__name__)

    def name(self, node: ast.Name):
        name = node.id
        if name == "x":
            return _S(self.x_slot, True)
        if name == "n":
            return _C(self.dimension)
        if name in CONSTANT_NAMES:
            return _C(CONSTANT_NAMES[name])
        if name in self.data:
            slot = self.data_slots.get(name)
            if slot is None:
                slot = self.data_slots[name] = self._new_slot()
            return _S(slot, False)
        raise Unsupported(f"name {name}")

    def binary_chain(self, node: ast.BinOp):
        family = _chain_head(node)
        links = [node]
        if family is not None:
            while _chain_head(links[-1].left) is family:
                links.append(links[-1].left)
        links.reverse()
        value = self.compile(links[0].left)
        for link in links:
            value = self.binary(link, value, self.compile(link.right))
        return value

    def binary(self, node: ast.BinOp, left, right):
        _, op = _BINARY_OPS[type(node.op)]
        if isinstance(left, _C) and isinstance(right, _C) and not isinstance(node.op, ast.MatMult):
            if isinstance(left.value, np.ndarray) or isinstance(right.value, np.ndarray):
                raise Unsupported("array constants in arithmetic")
            a, b = left.value, right.value
            return self.fold(lambda: op(a, b))
        kind = type(node.op)
        if kind is ast.Add:
            return self.emit(operator.add, [left, right],
                             [lambda g, a, b, out: g, lambda g, a, b, out: g])
        if kind is ast.Sub:
            return self.emit(operator.sub, [left, right],
                             [lambda g, a, b, out: g, lambda g, a, b, out: -g])
        if kind is ast.Mult:
            return self.emit(operator.mul, [left, right],
                             [lambda g, a, b, out: g * b, lambda g, a, b, out: g * a])
        if kind is ast.Div:
            return self.emit(operator.truediv, [left, right],
                             [lambda g, a, b, out: g / b, lambda g, a, b, out: -g * a / (b * b)])
        if kind is ast.Pow:
            if isinstance(right, _C) and not isinstance(right.value, np.ndarray):
                exponent = right.value
                vjp = _pow_vjp_base(exponent)
                return self.emit(operator.pow, [left, right],
                                 [lambda g, a, b, out: vjp(g, a, out), None])
            if isinstance(left, _C) and not isinstance(left.value, np.ndarray):
                base = left.value
                vjp = _pow_vjp_exponent(base)
                return self.emit(lambda a, b: np.power(float(a), b), [left, right],
                                 [None, lambda g, a, b, out: vjp(g, b, out)])
            raise Unsupported("tensor ** tensor")
        if kind is ast.MatMult:
            return self.matmul(left, right)
        raise Unsupported(f"operator {kind.__name__}")

    def matmul(self, left, right):
        left, right = self.array(left), self.array(right)
        return self.emit(np.matmul, [left, right],
                         [lambda g, a, b, out: _matmul_vjp_a(g, a, b),
                          lambda g, a, b, out: _matmul_vjp_b(g, a, b)])

    def subscript(self, node: ast.Subscript):
        target = self.compile(node.value)
        if isinstance(target, _C):
            raise Unsupported("indexing a constant")
        parts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        index = tuple(self.index_part(part) for part in parts)
        key = index[0] if len(index) == 1 else index

        def scatter(g, a, out, key=key):
            z = np.zeros(np.shape(a))
            z[key] = g
            return z

        return self.emit(lambda a, key=key: a[key], [target], [scatter])

    def constant_int(self, node: ast.AST) -> int:
        value = self.compile(node)
        if not isinstance(value, _C) or type(value.value) is not int:
            raise Unsupported("non-constant index")
        return value.value

    def index_part(self, node: ast.AST):
        if isinstance(node, ast.Slice):
            return slice(*[None if p is None else self.constant_int(p)
                           for p in (node.lower, node.upper, node.step)])
        return self.constant_int(node)

    # -- calls -----------------------------------------------------------------------------

    def arguments(self, node: ast.Call, params: list[str]) -> list[ast.AST | None]:
        bound: list[ast.AST | None] = list(node.args) + [None] * (len(params) - len(node.args))
        for keyword in node.keywords:
            bound[params.index(keyword.arg)] = keyword.value
        return bound

    def call(self, node: ast.Call):
        name = node.func.id  # type: ignore[attr-defined]
        if name in _ELEMENTWISE:
            (arg,) = self.arguments(node, ["t"])
            value = self.compile(arg)
            torch_fn = _UNARY_FUNCTIONS[name]
            if isinstance(value, _C):
                constant = value.value
                if isinstance(constant, np.ndarray):
                    raise Unsupported("function of an array constant")
                return self.fold(lambda: torch_fn(torch.tensor(float(constant),
                                                                dtype=torch.float64)))
            fwd, vjp = _ELEMENTWISE[name]
            return self.emit(fwd, [value], [vjp])
        handler = getattr(self, f"call_{name}", None)
        if handler is None:
            raise Unsupported(f"function {name}")
        return handler(node)

    def _dim(self, node: ast.AST | None) -> int | None:
        return None if node is None else self.constant_int(node)

    def _reduction(self, node: ast.Call, torch_all, fwd_all, fwd_dim, vjp_all, vjp_dim):
        arg, dim_node = self.arguments(node, ["t", "dim"])
        value = self.compile(arg)
        dim = self._dim(dim_node)
        if isinstance(value, _C):
            if dim is not None or isinstance(value.value, np.ndarray):
                raise Unsupported("reduction of a constant")
            constant = value.value
            return self.fold(lambda: torch_all(torch.tensor(float(constant), dtype=torch.float64)))
        if dim is None:
            return self.emit(fwd_all, [value], [vjp_all])
        return self.emit(lambda t: fwd_dim(t, dim), [value],
                         [lambda g, t, out: vjp_dim(g, t, out, dim)])

    def call_sum(self, node):
        return self._reduction(
            node, torch.sum, np.sum, lambda t, d: np.sum(t, axis=d),
            lambda g, t, out: np.full(np.shape(t), g),
            lambda g, t, out, d: np.broadcast_to(np.expand_dims(g, d), np.shape(t)).copy(),
        )

    def call_mean(self, node):
        return self._reduction(
            node, torch.mean, np.mean, lambda t, d: np.mean(t, axis=d),
            lambda g, t, out: np.full(np.shape(t), g / max(np.size(t), 1)),
            lambda g, t, out, d: np.broadcast_to(
                np.expand_dims(g, d) / np.shape(t)[d], np.shape(t)).copy(),
        )

    def call_logsumexp(self, node):
        def lse(t, axis=None):
            m = np.max(t, axis=axis, keepdims=True)
            m = np.where(np.isinf(m), 0.0, m)
            out = np.log(np.sum(np.exp(t - m), axis=axis, keepdims=True)) + m
            return out.reshape(()) if axis is None else np.squeeze(out, axis=axis)

        return self._reduction(
            node,
            lambda t: torch.logsumexp(t.reshape(-1), dim=0),
            lse,
            lambda t, d: lse(t, d),
            lambda g, t, out: g * np.exp(t - out),
            lambda g, t, out, d: np.expand_dims(g, d) * np.exp(t - np.expand_dims(out, d)),
        )

    def call_norm(self, node):
        arg, ord_node = self.arguments(node, ["t", "ord"])
        if ord_node is not None:
            order = self.compile(ord_node)
            if not isinstance(order, _C) or order.value != 2:
                raise Unsupported("norm of order other than 2")
        value = self.compile(arg)
        if isinstance(value, _C):
            raise Unsupported("norm of a constant")

        def norm_vjp(g, t, out):
            return t * (0.0 if out == 0 else g / out)

        return self.emit(lambda t: np.sqrt(np.sum(t * t)), [value], [norm_vjp])

    def call_dot(self, node):
        a_node, b_node = self.arguments(node, ["a", "b"])
        a, b = self.array(self.compile(a_node)), self.array(self.compile(b_node))
        return self.emit(lambda a, b: a @ b, [a, b],
                         [lambda g, a, b, out: g * b, lambda g, a, b, out: g * a])

    def _clamp(self, value, low=None, high=None):
        """torch.clamp(t, min=low, max=high) with constant bounds (either may be None)."""
        def fwd(t):
            if low is not None:
                t = np.maximum(t, low)
            if high is not None:
                t = np.minimum(t, high)
            return t

        def vjp(g, t, out):
            mask = np.ones(np.shape(t), dtype=bool)
            if low is not None:
                mask &= t >= low
            if high is not None:
                mask &= t <= high
            return g * mask

        return self.emit(fwd, [value], [vjp])

    def _extremum(self, node, fold, clamp_side: str):
        a_node, b_node = self.arguments(node, ["a", "b"])
        a, b = self.compile(a_node), self.compile(b_node)
        if isinstance(a, _C) and isinstance(b, _C):
            va, vb = a.value, b.value
            return self.fold(lambda: fold(va, vb))
        if isinstance(a, _C):
            a, b = b, a
        if not isinstance(b, _C) or isinstance(b.value, np.ndarray):
            raise Unsupported("minimum/maximum of two tensors")
        if clamp_side == "max":
            return self._clamp(a, high=b.value)
        return self._clamp(a, low=b.value)

    def call_minimum(self, node):
        return self._extremum(node, min, "max")

    def call_maximum(self, node):
        return self._extremum(node, max, "min")

    def call_clamp(self, node):
        t_node, lo_node, hi_node = self.arguments(node, ["t", "min", "max"])
        value = self.compile(t_node)
        low = None if lo_node is None else self.compile(lo_node)
        high = None if hi_node is None else self.compile(hi_node)
        for bound in (low, high):
            if bound is not None and (not isinstance(bound, _C)
                                      or isinstance(bound.value, np.ndarray)):
                raise Unsupported("clamp with a tensor bound")
        if isinstance(value, _C):
            raise Unsupported("clamp of a constant")
        value = self.array(value)
        # as the torch compiler: min first, then max, each its own clamp
        if low is not None:
            value = self._clamp(value, low=low.value)
        if high is not None:
            value = self._clamp(value, high=high.value)
        return value

    def compare(self, node: ast.Compare):
        terms = []
        left = self.compile(node.left)
        for cmpop, comparator in zip(node.ops, node.comparators, strict=True):
            right = self.compile(comparator)
            _, op = _COMPARE_OPS[type(cmpop)]
            if isinstance(left, _C) and isinstance(right, _C):
                a, b = left.value, right.value
                terms.append(self.fold(lambda a=a, b=b, op=op: bool(op(a, b))))
            else:
                terms.append(self.emit(op, [left, right], [None, None]))
            left = right
        value = terms[0]
        for term in terms[1:]:
            if isinstance(value, _C) and isinstance(term, _C):
                value = _C(bool(value.value and term.value))
            else:
                value = self.emit(np.logical_and, [value, term], [None, None])
        return value

    def call_where(self, node):
        cond_node, a_node, b_node = self.arguments(node, ["cond", "a", "b"])
        if isinstance(cond_node, ast.Compare):
            condition = self.compare(cond_node)
        else:
            condition = self.compile(cond_node)
        a, b = self.compile(a_node), self.compile(b_node)
        if isinstance(a, _C) and isinstance(b, _C):
            a = self.array(a)
        if isinstance(condition, _C):
            condition = _C(np.array(bool(condition.value)))
        return self.emit(
            np.where, [condition, a, b],
            [None, lambda g, c, a, b, out: np.where(c, g, 0.0),
             lambda g, c, a, b, out: np.where(c, 0.0, g)],
        )

    def _sizes(self, node: ast.Call) -> tuple[int, ...]:
        return tuple(self.constant_int(arg) for arg in node.args)

    def call_ones(self, node):
        return _C(np.ones(self._sizes(node)))

    def call_zeros(self, node):
        return _C(np.zeros(self._sizes(node)))

    def call_arange(self, node):
        values = [self.constant_int(arg) for arg in node.args]
        start, stop, step = (0, values[0], 1) if len(values) == 1 else (*values, 1)[:3]
        return _C(np.arange(start, stop, step, dtype=np.float64))

    def call_prod(self, node):
        raise Unsupported("prod")


def compile_numpy(source: str, *, dimension: int, data: dict[str, np.ndarray],
                  residual: bool = False,
                  limits: ExpressionLimits | None = None) -> NumpyProgram | None:
    """The numpy program of an expression the torch compiler accepted, or None where this
    backend does not cover it. `data`: the float64 data tensors by name."""
    limits = limits or ExpressionLimits()
    if any(array.dtype != np.float64 for array in data.values()):
        return None
    try:
        tree = _parse(source, limits)
        builder = _Builder(dimension, data, limits)
        value = builder.compile(tree.body)
    except (Unsupported, RecursionError, KeyError, ValueError, TypeError, IndexError):
        return None
    if not isinstance(value, _S) or not value.uses_x:
        return None
    data_slots = [(slot, data[name]) for name, slot in builder.data_slots.items()]
    return NumpyProgram(builder.steps, builder.ops, builder.n_slots, value.slot,
                        builder.x_slot, data_slots, residual)

