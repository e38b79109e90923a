"""The expression language: a safe math DSL over ``x`` and named data tensors.

A source string is parsed with ``ast.parse(mode="eval")``, checked against an allow-list of
node types, and compiled ONCE into nested Python closures that call torch directly. Nothing
the caller wrote is ever turned into a code object; evaluation never re-walks the tree.

Costs: parsing and compiling are linear in the source length (capped by
:class:`ExpressionLimits`). Evaluating costs the torch ops the expression names plus one
Python call per AST node (about 0.1 us each), so for vectors of more than a few thousand
entries it matches hand-written torch. The closures are pure functions of ``x`` (no
``.item()``, no in-place ops, no branching on values), so ``torch.autograd`` and
``torch.func`` (grad, jvp, vmap, jacrev, hessian) work on them.

The grammar is documented in ``docs/expressions.md``.
"""

from __future__ import annotations

import ast
import math
import operator
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ._errors import ExpressionError

__all__ = [
    "CONSTANT_NAMES",
    "CompiledExpression",
    "ExpressionLimits",
    "FUNCTION_NAMES",
    "RESERVED_NAMES",
    "compile_expression",
]


@dataclass(frozen=True)
class ExpressionLimits:
    """Caps that keep parsing, compiling and the validation probe cheap on hostile input."""

    max_source_chars: int = 10_000
    max_nodes: int = 5_000
    # Bracket nesting in the raw text and AST depth (a chain `a + b + c + ...` counts once).
    max_depth: int = 64
    max_exponent: float = 1_000
    # ones/zeros/arange sizes.
    max_constant_elements: int = 10_000_000
    max_integer: int = 2**53
    # Any tensor the expression produces on the validation probe (checked on meta tensors,
    # before anything is allocated): stops `Acol * x`-style outer products from eating memory.
    max_intermediate_elements: int = 2**28

    def __post_init__(self) -> None:
        for name in (
            "max_source_chars",
            "max_nodes",
            "max_depth",
            "max_constant_elements",
            "max_integer",
            "max_intermediate_elements",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ExpressionLimits.{name} must be a positive int, got {value!r}")
        if not self.max_exponent > 0:
            raise ValueError(f"ExpressionLimits.max_exponent must be > 0, got {self.max_exponent}")


FUNCTION_NAMES: frozenset[str] = frozenset(
    {
        "sum", "mean", "prod", "dot", "norm", "exp", "log", "log1p", "sqrt", "abs", "sin",
        "cos", "tan", "tanh", "sigmoid", "softplus", "logsumexp", "square", "clamp",
        "minimum", "maximum", "where", "arange", "ones", "zeros",
    }
)  # fmt: skip
CONSTANT_NAMES: Mapping[str, float] = {"pi": math.pi, "e": math.e, "inf": math.inf}
RESERVED_NAMES: frozenset[str] = FUNCTION_NAMES | frozenset(CONSTANT_NAMES) | {"x", "n"}

# Evaluated values are torch tensors or Python scalars; a compiled node maps (x, data) to one.
Evaluator = Callable[[Tensor, tuple[Tensor, ...]], Tensor]
_TORCH_ERRORS = (RuntimeError, IndexError, ValueError, TypeError)

_ALLOWED_NODES: tuple[type[ast.AST], ...] = (
    ast.Expression, ast.BinOp, ast.UnaryOp, ast.Call, ast.Name, ast.Constant, ast.Subscript,
    ast.Slice, ast.Tuple, ast.Compare, ast.keyword, ast.Load,
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.MatMult, ast.FloorDiv, ast.Mod,
    ast.USub, ast.UAdd, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq,
)  # fmt: skip
_FORBIDDEN_NODE_NAMES: Mapping[type[ast.AST], str] = {
    ast.Attribute: "attribute access (`a.b`)",
    ast.Lambda: "lambda",
    ast.ListComp: "comprehensions",
    ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions",
    ast.GeneratorExp: "generator expressions",
    ast.Starred: "starred arguments (`*a`)",
    ast.NamedExpr: "assignment expressions (`:=`)",
    ast.JoinedStr: "f-strings",
    ast.FormattedValue: "f-strings",
    ast.BoolOp: "`and`/`or` (use where(cond, a, b))",
    ast.IfExp: "`a if c else b` (use where(c, a, b))",
    ast.List: "list literals",
    ast.Dict: "dict literals",
    ast.Set: "set literals",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
}
_BINARY_OPS: Mapping[type[ast.operator], tuple[str, Callable[[object, object], object]]] = {
    ast.Add: ("+", operator.add),
    ast.Sub: ("-", operator.sub),
    ast.Mult: ("*", operator.mul),
    ast.Div: ("/", operator.truediv),
    ast.Pow: ("**", operator.pow),
    ast.MatMult: ("@", operator.matmul),
    ast.FloorDiv: ("//", operator.floordiv),
    ast.Mod: ("%", operator.mod),
}
_COMPARE_OPS: Mapping[type[ast.cmpop], tuple[str, Callable[[object, object], object]]] = {
    ast.Lt: ("<", operator.lt),
    ast.LtE: ("<=", operator.le),
    ast.Gt: (">", operator.gt),
    ast.GtE: (">=", operator.ge),
    ast.Eq: ("==", operator.eq),
    ast.NotEq: ("!=", operator.ne),
}
# Elementwise functions of one tensor; all-constant calls are folded at compile time.
_UNARY_FUNCTIONS: Mapping[str, Callable[[Tensor], Tensor]] = {
    "exp": torch.exp,
    "log": torch.log,
    "log1p": torch.log1p,
    "sqrt": torch.sqrt,
    "abs": torch.abs,
    "sin": torch.sin,
    "cos": torch.cos,
    "tan": torch.tan,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": torch.nn.functional.softplus,
    "square": torch.square,
}
_ADDITIVE = (ast.Add, ast.Sub)
_MULTIPLICATIVE = (ast.Mult, ast.Div)


@dataclass(frozen=True)
class _Const:
    """A value known at compile time: a Python int, float or bool."""

    value: int | float | bool


@dataclass(frozen=True)
class _Dyn:
    """A value computed at evaluation time by ``run(x, data)``."""

    run: Evaluator
    uses_x: bool


_Value = _Const | _Dyn


def _check_depth_before_parsing(source: str, limits: ExpressionLimits) -> None:
    """Reject deep bracket nesting in O(len) vectorised work, before the parser recurses."""
    codes = np.frombuffer(source.encode("utf-8", "surrogatepass"), dtype=np.uint8)
    opening = (codes == ord("(")) | (codes == ord("[")) | (codes == ord("{"))
    closing = (codes == ord(")")) | (codes == ord("]")) | (codes == ord("}"))
    steps = opening.astype(np.int64) - closing.astype(np.int64)
    if steps.size and int(np.cumsum(steps).max()) > limits.max_depth:
        raise ExpressionError(
            f"brackets are nested more than {limits.max_depth} deep "
            f"(limit ExpressionLimits.max_depth)"
        )


def _parse(source: object, limits: ExpressionLimits) -> ast.Expression:
    if not isinstance(source, str):
        raise ExpressionError(f"expected the expression as a str, got {type(source).__name__}")
    if not source.strip():
        raise ExpressionError("the expression is empty")
    if len(source) > limits.max_source_chars:
        raise ExpressionError(
            f"the expression is {len(source)} characters long; the limit is "
            f"{limits.max_source_chars}"
        )
    _check_depth_before_parsing(source, limits)
    try:
        # The parser warns on odd literals (`1is 1`, bad escapes); the warning is no concern
        # of the caller's and must not reach a `-W error` test run.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source, mode="eval")
    except SyntaxError as exc:
        column = (exc.offset - 1) if exc.offset else None
        where = f" at column {column}" if column is not None else ""
        raise ExpressionError(f"syntax error{where}: {exc.msg}", column=column) from None
    except (RecursionError, MemoryError):
        raise ExpressionError("the expression is too deeply nested to parse") from None
    except ValueError as exc:  # e.g. NUL bytes, integer literals beyond 4300 digits
        raise ExpressionError(f"cannot parse the expression: {exc}") from None
    return tree


def _chain_head(node: ast.AST) -> type | None:
    """The operator family if ``node`` is a link of a left-associated + - or * / chain."""
    if isinstance(node, ast.BinOp):
        for family in (_ADDITIVE, _MULTIPLICATIVE):
            if isinstance(node.op, family):
                return family  # type: ignore[return-value]
    return None


def _check_tree(tree: ast.Expression, source: str, limits: ExpressionLimits) -> None:
    """One iterative pass: node allow-list, literal types, node count and nesting depth."""
    count = 0
    stack: list[tuple[ast.AST, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > limits.max_nodes:
            raise ExpressionError(
                f"the expression has more than {limits.max_nodes} syntax nodes "
                f"(limit ExpressionLimits.max_nodes)"
            )
        if depth > limits.max_depth:
            raise ExpressionError(
                f"the expression is nested more than {limits.max_depth} deep "
                f"(limit ExpressionLimits.max_depth)",
                column=getattr(node, "col_offset", None),
            )
        if not isinstance(node, _ALLOWED_NODES):
            what = _FORBIDDEN_NODE_NAMES.get(type(node), f"`{type(node).__name__}` syntax")
            raise ExpressionError(
                f"{what} is not allowed{_at(node, source)}",
                column=getattr(node, "col_offset", None),
            )
        if isinstance(node, ast.Constant):
            _check_literal(node, source, limits)
        family = _chain_head(node)
        for child in ast.iter_child_nodes(node):
            # `a + b + c` is parsed as ((a + b) + c); the compiler flattens such chains, so
            # the left operand of a chain link sits at the same depth as the link itself.
            same_chain = (
                family is not None
                and child is node.left  # type: ignore[attr-defined]
                and _chain_head(child) is family
            )
            stack.append((child, depth if same_chain else depth + 1))


def _check_literal(node: ast.Constant, source: str, limits: ExpressionLimits) -> None:
    value = node.value
    kind = type(value)
    if kind is int:
        if abs(value) > limits.max_integer:
            raise ExpressionError(
                f"integer literal{_at(node, source)} exceeds the limit of {limits.max_integer} "
                f"in magnitude (write it as a float, e.g. 1e20)",
                column=node.col_offset,
            )
        return
    if kind is float:
        return
    what = {
        str: "string literals",
        bytes: "bytes literals",
        complex: "complex literals",
        bool: "True/False (use a comparison inside where(...))",
    }.get(kind, f"the literal {value!r}")
    raise ExpressionError(f"{what} are not allowed{_at(node, source)}", column=node.col_offset)


def _segment(node: ast.AST, source: str) -> str:
    text = ast.get_source_segment(source, node) or ""
    text = " ".join(text.split())
    return text if len(text) <= 60 else text[:57] + "..."


def _at(node: ast.AST, source: str) -> str:
    column = getattr(node, "col_offset", None)
    if column is None:
        return ""
    return f" in `{_segment(node, source)}` (column {column})"


def _shape_of(value: object) -> str:
    if isinstance(value, Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"{tuple(value.shape)} {dtype}"
    return f"scalar {value!r}"


class _SizeGuard(TorchDispatchMode):
    """Refuses any op output larger than a cap; used only on meta tensors (no compute)."""

    def __init__(self, max_elements: int) -> None:
        super().__init__()
        self.max_elements = max_elements

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        result = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(result):
            if isinstance(leaf, Tensor) and leaf.numel() > self.max_elements:
                raise ValueError(
                    f"the result would have shape {tuple(leaf.shape)} ({leaf.numel()} elements); "
                    f"the limit is {self.max_elements} (ExpressionLimits.max_intermediate_elements)"
                )
        return result


class CompiledExpression:
    """An expression compiled to torch closures, not yet bound to data tensors.

    ``evaluate(x, data)`` costs the torch ops the expression names; :meth:`bind` returns
    ``fun(x)`` with the data fixed (re-bind to move data to another device or dtype; binding
    costs nothing beyond the lookup of the named tensors).
    """

    def __init__(
        self,
        *,
        source: str,
        run: Evaluator,
        data_names: tuple[str, ...],
        dimension: int,
        result: Literal["scalar", "vector"],
        limits: ExpressionLimits,
    ) -> None:
        self.source = source
        self.data_names = data_names  # in slot order: the names the expression uses
        self.dimension = dimension
        self.result = result
        self.limits = limits
        self._run = run

    def __repr__(self) -> str:
        return f"CompiledExpression({self.source!r}, result={self.result!r}, n={self.dimension})"

    def _slots(self, data: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
        return tuple(data[name] for name in self.data_names)

    def evaluate(self, x: Tensor, data: Mapping[str, Tensor]) -> Tensor:
        """Evaluate at ``x``; ``data`` must hold every name in ``data_names``."""
        return self._run(x, self._slots(data))

    def bind(self, data: Mapping[str, Tensor]) -> Callable[[Tensor], Tensor]:
        """``fun(x)`` with the data tensors fixed: a plain torch function, torch.func-safe."""
        slots = self._slots(data)
        run = self._run

        def fun(x: Tensor) -> Tensor:
            return run(x, slots)

        return fun

    def check_shapes(self, x: Tensor, data: Mapping[str, Tensor]) -> torch.Size:
        """Run the expression on meta tensors shaped like ``x`` and ``data``: no compute.

        Finds shape and dtype mismatches and oversized intermediates before anything is
        allocated, and checks the result's rank. Returns the result shape.
        """
        meta_x = torch.empty(x.shape, dtype=x.dtype, device="meta")
        meta_data = {
            name: torch.empty(data[name].shape, dtype=data[name].dtype, device="meta")
            for name in self.data_names
        }
        with _SizeGuard(self.limits.max_intermediate_elements):
            result = self.evaluate(meta_x, meta_data)
        self.check_result(result)
        return result.shape

    def check_result(self, result: object) -> None:
        """Raise ExpressionError unless ``result`` has the promised rank and a float dtype."""
        if not isinstance(result, Tensor):
            raise ExpressionError(f"the expression gave a {type(result).__name__}, not a tensor")
        if not result.dtype.is_floating_point:
            raise ExpressionError(
                f"the expression gives a {str(result.dtype).removeprefix('torch.')} result; "
                "it must be floating point"
            )
        if self.result == "scalar" and result.dim() != 0:
            raise ExpressionError(
                f"the objective must be a scalar, but the expression gives shape "
                f"{tuple(result.shape)} (wrap it in sum(...) or mean(...), or send it as a "
                "residual)"
            )
        if self.result == "vector" and result.dim() != 1:
            raise ExpressionError(
                f"a residual must be a 1-D vector, but the expression gives shape "
                f"{tuple(result.shape)}"
            )


def compile_expression(
    source: str,
    *,
    dimension: int,
    data_names: Sequence[str] = (),
    result: Literal["scalar", "vector"] = "scalar",
    limits: ExpressionLimits | None = None,
) -> CompiledExpression:
    """Parse, check and compile ``source`` once. Cost: linear in the source length.

    ``dimension`` is ``n``, the length of ``x``; ``data_names`` are the data tensors the
    caller sent (the expression may use any subset). ``result`` says whether the value must
    be a scalar (an objective) or a 1-D vector (a residual); that is checked when the
    expression is first run on concrete shapes (:meth:`CompiledExpression.check_shapes`).
    Raises :class:`ExpressionError` for anything outside the grammar or the limits.
    """
    limits = limits or ExpressionLimits()
    if result not in ("scalar", "vector"):
        raise ValueError(f"result must be 'scalar' or 'vector', got {result!r}")
    tree = _parse(source, limits)
    _check_tree(tree, source, limits)
    compiler = _Compiler(source, dimension, tuple(data_names), limits)
    value = compiler.compile(tree.body)
    if isinstance(value, _Const) or not value.uses_x:
        raise ExpressionError("the expression does not depend on x")
    used = tuple(sorted(compiler.slots, key=compiler.slots.__getitem__))
    return CompiledExpression(
        source=source,
        run=value.run,
        data_names=used,
        dimension=dimension,
        result=result,
        limits=limits,
    )


def _materialize(value: _Value) -> _Dyn:
    """A constant as a 0-d tensor in x's dtype and device (for functions that need tensors)."""
    if isinstance(value, _Dyn):
        return value
    constant = value.value

    def run(x: Tensor, data: tuple[Tensor, ...]) -> Tensor:
        return torch.tensor(constant, dtype=x.dtype, device=x.device)

    return _Dyn(run, uses_x=False)


class _Compiler:
    """Turns a checked AST into closures. One instance per compile; recursion depth is
    bounded by ExpressionLimits.max_depth because chains are compiled iteratively."""

    def __init__(
        self, source: str, dimension: int, data_names: tuple[str, ...], limits: ExpressionLimits
    ) -> None:
        self.source = source
        self.dimension = dimension
        self.data_names = data_names
        self.limits = limits
        self.slots: dict[str, int] = {}

    # -- helpers -------------------------------------------------------------------------

    def error(self, node: ast.AST, message: str) -> ExpressionError:
        return ExpressionError(
            f"{message}{_at(node, self.source)}", column=getattr(node, "col_offset", None)
        )

    def located(self, node: ast.AST) -> Callable[[Exception, Sequence[object]], ExpressionError]:
        """Builds, at compile time, the error raised when the op at ``node`` fails at run time."""
        segment, column = _segment(node, self.source), node.col_offset  # type: ignore[attr-defined]

        def make(exc: Exception, operands: Sequence[object]) -> ExpressionError:
            shapes = ", ".join(_shape_of(v) for v in operands)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return ExpressionError(
                f"cannot evaluate `{segment}` (column {column}) with operands [{shapes}]: {reason}",
                column=column,
            )

        return make

    def fold(self, node: ast.AST, compute: Callable[[], object]) -> _Const:
        """Compute a constant at compile time, with Python's own failures made ours."""
        try:
            value = compute()
        except ZeroDivisionError:
            raise self.error(node, "division by zero") from None
        except OverflowError:
            raise self.error(node, "the constant overflows") from None
        except (RuntimeError, ValueError, TypeError) as exc:
            raise self.error(node, f"cannot compute this constant ({exc})") from None
        if isinstance(value, complex):
            raise self.error(node, "the constant is complex (negative base, fractional power)")
        if isinstance(value, Tensor):
            value = value.item()  # compile time only: the closures never call .item()
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > self.limits.max_integer:
                raise self.error(
                    node, f"the integer constant exceeds {self.limits.max_integer} in magnitude"
                )
        return _Const(value)  # type: ignore[arg-type]

    def constant_int(self, node: ast.AST, what: str) -> int:
        value = self.compile(node)
        if not isinstance(value, _Const) or type(value.value) is not int:
            raise self.error(node, f"{what} must be a constant integer (like 2, -1 or n-1)")
        return value.value  # type: ignore[return-value]

    def constant_number(self, node: ast.AST, what: str) -> int | float:
        value = self.compile(node)
        if not isinstance(value, _Const) or type(value.value) not in (int, float):
            raise self.error(node, f"{what} must be a constant number")
        return value.value  # type: ignore[return-value]

    def apply(self, node: ast.AST, op: Callable[..., Tensor], operands: Sequence[_Value]) -> _Dyn:
        """A closure computing ``op(*operands)``; specialised for 1 and 2 operands because
        this is the evaluation hot path. Operands are evaluated outside the try, so only
        this op's own failure is reported at this node."""
        fail = self.located(node)
        uses_x = any(isinstance(v, _Dyn) and v.uses_x for v in operands)
        if len(operands) == 1:
            (a,) = operands
            if isinstance(a, _Const):
                a = _materialize(a)
            fa = a.run

            def run1(x: Tensor, data: tuple[Tensor, ...]) -> Tensor:
                va = fa(x, data)
                try:
                    return op(va)
                except _TORCH_ERRORS as exc:
                    raise fail(exc, (va,)) from exc

            return _Dyn(run1, uses_x)
        if len(operands) == 2:
            a, b = operands
            if isinstance(a, _Dyn) and isinstance(b, _Dyn):
                fa, fb = a.run, b.run

                def run_dd(x: Tensor, data: tuple[Tensor, ...]) -> Tensor:
                    va, vb = fa(x, data), fb(x, data)
                    try:
                        return op(va, vb)
                    except _TORCH_ERRORS as exc:
                        raise fail(exc, (va, vb)) from exc

                return _Dyn(run_dd, uses_x)
            if isinstance(a, _Dyn) and isinstance(b, _Const):
                fa, cb = a.run, b.value

                def run_dc(x: Tensor, data: tuple[Tensor, ...]) -> Tensor:
                    va = fa(x, data)
                    try:
                        return op(va, cb)
                    except _TORCH_ERRORS as exc:
                        raise fail(exc, (va, cb)) from exc

                return _Dyn(run_dc, uses_x)
            if isinstance(a, _Const) and isinstance(b, _Dyn):
                ca, fb = a.value, b.run

                def run_cd(x: Tensor, data: tuple[Tensor, ...]) -> Tensor:
                    vb = fb(x, data)
                    try:
                        return op(ca, vb)
                    except _TORCH_ERRORS as exc:
                        raise fail(exc, (ca, vb)) from exc

                return _Dyn(run_cd, uses_x)
        getters = [
            (lambda x, data, c=v.value: c) if isinstance(v, _Const) else v.run for v in operands
        ]

        def run_n(x: Tensor, data: tuple[Tensor, ...]) -> Tensor:
            values = [g(x, data) for g in getters]
            try:
                return op(*values)
            except _TORCH_ERRORS as exc:
                raise fail(exc, values) from exc

        return _Dyn(run_n, uses_x)

    # -- nodes ---------------------------------------------------------------------------

    def compile(self, node: ast.AST) -> _Value:
        if isinstance(node, ast.Constant):
            return _Const(node.value)
        if isinstance(node, ast.Name):
            return self.name(node)
        if isinstance(node, ast.BinOp):
            return self.binary_chain(node)
        if isinstance(node, ast.UnaryOp):
            return self.unary(node)
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.Subscript):
            return self.subscript(node)
        if isinstance(node, ast.Compare):
            raise self.error(node, "comparisons are only allowed as the condition of where(...)")
        if isinstance(node, ast.Tuple):
            raise self.error(node, "tuples are only allowed inside [...] indexing")
        if isinstance(node, ast.Slice):
            raise self.error(node, "slices are only allowed inside [...] indexing")
        raise self.error(node, f"`{type(node).__name__}` is not allowed here")

    def name(self, node: ast.Name) -> _Value:
        name = node.id
        if name == "x":
            return _Dyn(lambda x, data: x, uses_x=True)
        if name == "n":
            return _Const(self.dimension)
        if name in CONSTANT_NAMES:
            return _Const(CONSTANT_NAMES[name])
        if name in FUNCTION_NAMES:
            raise self.error(node, f"`{name}` is a function; call it like {name}(...)")
        if name in self.data_names:
            slot = self.slots.setdefault(name, len(self.slots))
            return _Dyn(lambda x, data: data[slot], uses_x=False)
        available = ", ".join(self.data_names) if self.data_names else "(none were sent)"
        raise ExpressionError(
            f"unknown name `{name}` (column {node.col_offset}); the names available are x, n, "
            f"pi, e, inf and the data tensors sent: {available}",
            column=node.col_offset,
        )

    def binary_chain(self, node: ast.BinOp) -> _Value:
        # Walk a left-associated chain (a + b - c + ...) iteratively, so long sums cost no
        # Python recursion at compile or evaluation time.
        family = _chain_head(node)
        links: list[ast.BinOp] = [node]
        if family is not None:
            while _chain_head(links[-1].left) is family:
                links.append(links[-1].left)  # type: ignore[arg-type]
        links.reverse()
        value = self.compile(links[0].left)
        for link in links:
            value = self.binary(link, value, self.compile(link.right))
        return value

    def binary(self, node: ast.BinOp, left: _Value, right: _Value) -> _Value:
        symbol, op = _BINARY_OPS[type(node.op)]
        if isinstance(node.op, ast.Pow) and isinstance(right, _Const):
            exponent = right.value
            if abs(exponent) > self.limits.max_exponent:
                raise self.error(
                    node,
                    f"the exponent {exponent!r} exceeds the limit of {self.limits.max_exponent} "
                    "in magnitude",
                )
        if isinstance(left, _Const) and isinstance(right, _Const):
            if isinstance(node.op, ast.MatMult):
                raise self.error(node, "`@` needs tensor operands, not constants")
            a, b = left.value, right.value
            return self.fold(node, lambda: op(a, b))
        if isinstance(node.op, (ast.FloorDiv, ast.Mod)):
            raise self.error(node, f"`{symbol}` is only allowed between constants (like n//2)")
        if isinstance(node.op, ast.MatMult):
            return self.apply(node, torch.matmul, [_materialize(left), _materialize(right)])
        return self.apply(node, op, [left, right])  # type: ignore[arg-type]

    def unary(self, node: ast.UnaryOp) -> _Value:
        operand = self.compile(node.operand)
        if isinstance(node.op, ast.UAdd):
            return operand
        if isinstance(operand, _Const):
            value = operand.value
            return self.fold(node, lambda: -value)
        return self.apply(node, operator.neg, [operand])

    def subscript(self, node: ast.Subscript) -> _Value:
        target = self.compile(node.value)
        if isinstance(target, _Const):
            raise self.error(node, "only tensors can be indexed")
        parts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        index = tuple(self.index_part(part) for part in parts)
        key: object = index[0] if len(index) == 1 else index
        return self.apply(node, lambda t: t[key], [target])

    def index_part(self, node: ast.AST) -> int | slice:
        if isinstance(node, ast.Slice):
            bounds = [
                None if part is None else self.constant_int(part, "a slice bound")
                for part in (node.lower, node.upper, node.step)
            ]
            if bounds[2] is not None and bounds[2] <= 0:
                raise self.error(node, "slice steps must be positive")
            return slice(*bounds)
        return self.constant_int(node, "an index")

    def compare(self, node: ast.Compare) -> _Value:
        """A condition for where(...): comparisons, chained ones joined by logical and."""
        terms: list[_Value] = []
        left = self.compile(node.left)
        for cmpop, comparator in zip(node.ops, node.comparators, strict=True):
            right = self.compile(comparator)
            _, op = _COMPARE_OPS[type(cmpop)]
            if isinstance(left, _Const) and isinstance(right, _Const):
                a, b = left.value, right.value
                terms.append(self.fold(node, lambda a=a, b=b, op=op: bool(op(a, b))))
            else:
                terms.append(self.apply(node, op, [left, right]))  # type: ignore[arg-type]
            left = right
        value = terms[0]
        for term in terms[1:]:
            if isinstance(value, _Const) and isinstance(term, _Const):
                value = _Const(bool(value.value and term.value))
            else:
                value = self.apply(
                    node, torch.logical_and, [_materialize(value), _materialize(term)]
                )
        return value

    # -- calls ---------------------------------------------------------------------------

    def call(self, node: ast.Call) -> _Value:
        if not isinstance(node.func, ast.Name):
            raise self.error(node, "only the listed functions can be called")
        name = node.func.id
        if name not in FUNCTION_NAMES:
            allowed = ", ".join(sorted(FUNCTION_NAMES))
            raise self.error(node, f"`{name}` is not an allowed function; allowed: {allowed}")
        if name in _UNARY_FUNCTIONS:
            (arg,) = self.arguments(node, name, ["t"], required=1)
            return self.elementwise(node, _UNARY_FUNCTIONS[name], self.compile(arg))
        handler = getattr(self, f"call_{name}")
        return handler(node, name)

    def arguments(
        self, node: ast.Call, name: str, params: list[str], *, required: int
    ) -> list[ast.AST | None]:
        """Match positional and keyword arguments to ``params``; None for omitted ones."""
        if len(node.args) > len(params):
            raise self.error(
                node, f"{name}() takes at most {len(params)} arguments ({', '.join(params)})"
            )
        bound: list[ast.AST | None] = list(node.args) + [None] * (len(params) - len(node.args))
        for keyword in node.keywords:
            if keyword.arg is None or keyword.arg not in params:
                raise self.error(
                    node, f"{name}() has no keyword `{keyword.arg}`; it takes {', '.join(params)}"
                )
            position = params.index(keyword.arg)
            if bound[position] is not None:
                raise self.error(node, f"{name}() got `{keyword.arg}` twice")
            bound[position] = keyword.value
        missing = [params[i] for i in range(required) if bound[i] is None]
        if missing:
            raise self.error(node, f"{name}() needs {', '.join(missing)}")
        return bound

    def elementwise(self, node: ast.AST, fn: Callable[[Tensor], Tensor], value: _Value) -> _Value:
        if isinstance(value, _Const):
            constant = value.value
            return self.fold(node, lambda: fn(torch.tensor(float(constant), dtype=torch.float64)))
        return self.apply(node, fn, [value])

    def optional_dim(self, node: ast.AST | None) -> int | None:
        return None if node is None else self.constant_int(node, "dim")

    def reduction(self, node: ast.Call, name: str, reduce_all, reduce_dim) -> _Value:  # noqa: ANN001
        arg, dim_node = self.arguments(node, name, ["t", "dim"], required=1)
        value = self.compile(arg)  # type: ignore[arg-type]
        dim = self.optional_dim(dim_node)
        if isinstance(value, _Const) and dim is None:
            constant = value.value
            return self.fold(
                node, lambda: reduce_all(torch.tensor(float(constant), dtype=torch.float64))
            )
        if dim is None:
            return self.apply(node, reduce_all, [value])
        return self.apply(node, lambda t: reduce_dim(t, dim), [value])

    def call_sum(self, node: ast.Call, name: str) -> _Value:
        return self.reduction(node, name, torch.sum, lambda t, d: torch.sum(t, dim=d))

    def call_mean(self, node: ast.Call, name: str) -> _Value:
        return self.reduction(node, name, torch.mean, lambda t, d: torch.mean(t, dim=d))

    def call_prod(self, node: ast.Call, name: str) -> _Value:
        return self.reduction(node, name, torch.prod, lambda t, d: torch.prod(t, dim=d))

    def call_logsumexp(self, node: ast.Call, name: str) -> _Value:
        return self.reduction(
            node,
            name,
            lambda t: torch.logsumexp(t.reshape(-1), dim=0),
            lambda t, d: torch.logsumexp(t, dim=d),
        )

    def call_norm(self, node: ast.Call, name: str) -> _Value:
        arg, ord_node = self.arguments(node, name, ["t", "ord"], required=1)
        order = 2 if ord_node is None else self.constant_number(ord_node, "norm's ord")
        value = self.compile(arg)  # type: ignore[arg-type]
        if isinstance(value, _Const):
            constant = value.value
            return self.fold(
                node,
                lambda: torch.linalg.vector_norm(
                    torch.tensor(float(constant), dtype=torch.float64), order
                ),
            )
        return self.apply(node, lambda t: torch.linalg.vector_norm(t, order), [value])

    def call_dot(self, node: ast.Call, name: str) -> _Value:
        a, b = self.arguments(node, name, ["a", "b"], required=2)
        operands = [_materialize(self.compile(a)), _materialize(self.compile(b))]  # type: ignore[arg-type]
        return self.apply(node, torch.dot, operands)

    def call_minimum(self, node: ast.Call, name: str) -> _Value:
        return self.extremum(node, name, min, torch.minimum, "max")

    def call_maximum(self, node: ast.Call, name: str) -> _Value:
        return self.extremum(node, name, max, torch.maximum, "min")

    def extremum(self, node: ast.Call, name: str, fold, tensor_op, clamp_side: str) -> _Value:  # noqa: ANN001
        a_node, b_node = self.arguments(node, name, ["a", "b"], required=2)
        a, b = self.compile(a_node), self.compile(b_node)  # type: ignore[arg-type]
        if isinstance(a, _Const) and isinstance(b, _Const):
            va, vb = a.value, b.value
            return self.fold(node, lambda: fold(va, vb))
        if isinstance(a, _Const):
            a, b = b, a
        if isinstance(b, _Const):
            # torch.minimum wants two tensors; against a constant it is a one-sided clamp.
            bound = b.value
            if clamp_side == "max":
                return self.apply(node, lambda t: torch.clamp(t, max=bound), [a])
            return self.apply(node, lambda t: torch.clamp(t, min=bound), [a])
        return self.apply(node, tensor_op, [a, b])

    def call_clamp(self, node: ast.Call, name: str) -> _Value:
        t_node, lo_node, hi_node = self.arguments(node, name, ["t", "min", "max"], required=1)
        if lo_node is None and hi_node is None:
            raise self.error(node, "clamp() needs min, max or both")
        value = self.compile(t_node)  # type: ignore[arg-type]
        low = None if lo_node is None else self.compile(lo_node)
        high = None if hi_node is None else self.compile(hi_node)
        bounds = [b for b in (low, high) if b is not None]
        if isinstance(value, _Const) and all(isinstance(b, _Const) for b in bounds):
            v = value.value
            lo = None if low is None else low.value  # type: ignore[union-attr]
            hi = None if high is None else high.value  # type: ignore[union-attr]
            lowered = v if lo is None else max(v, lo)
            return self.fold(node, lambda: lowered if hi is None else min(lowered, hi))
        value = _materialize(value)
        # torch.clamp takes both bounds as numbers or both as tensors; apply them one side at
        # a time so a caller may mix a constant and a tensor bound.
        if low is not None:
            value = self.apply(node, lambda t, b: torch.clamp(t, min=b), [value, low])
        if high is not None:
            value = self.apply(node, lambda t, b: torch.clamp(t, max=b), [value, high])
        return value

    def call_where(self, node: ast.Call, name: str) -> _Value:
        cond_node, a_node, b_node = self.arguments(node, name, ["cond", "a", "b"], required=3)
        if isinstance(cond_node, ast.Compare):
            condition = self.compare(cond_node)
        else:
            condition = self.compile(cond_node)  # type: ignore[arg-type]
        a, b = self.compile(a_node), self.compile(b_node)  # type: ignore[arg-type]
        if isinstance(a, _Const) and isinstance(b, _Const):
            a = _materialize(a)  # torch.where of two Python floats would give float32
        if isinstance(condition, _Const):
            chosen = condition.value

            def run_cond(x: Tensor, data: tuple[Tensor, ...]) -> Tensor:
                return torch.tensor(bool(chosen), device=x.device)

            condition = _Dyn(run_cond, uses_x=False)
        return self.apply(node, torch.where, [condition, a, b])

    def sizes(self, node: ast.Call, name: str) -> tuple[int, ...]:
        if node.keywords:
            raise self.error(node, f"{name}() takes only positional sizes")
        if not node.args:
            raise self.error(node, f"{name}() needs at least one size")
        shape = tuple(self.constant_int(arg, f"{name}()'s size") for arg in node.args)
        if any(size < 0 for size in shape):
            raise self.error(node, f"{name}() sizes must be >= 0, got {shape}")
        self.check_constant_size(node, name, math.prod(shape))
        return shape

    def check_constant_size(self, node: ast.AST, name: str, elements: int) -> None:
        if elements > self.limits.max_constant_elements:
            raise self.error(
                node,
                f"{name}() would make {elements} elements; the limit is "
                f"{self.limits.max_constant_elements}",
            )

    def call_ones(self, node: ast.Call, name: str) -> _Value:
        shape = self.sizes(node, name)

        def run(x: Tensor, data: tuple[Tensor, ...]) -> Tensor:
            return torch.ones(shape, dtype=x.dtype, device=x.device)

        return _Dyn(run, uses_x=False)

    def call_zeros(self, node: ast.Call, name: str) -> _Value:
        shape = self.sizes(node, name)

        def run(x: Tensor, data: tuple[Tensor, ...]) -> Tensor:
            return torch.zeros(shape, dtype=x.dtype, device=x.device)

        return _Dyn(run, uses_x=False)

    def call_arange(self, node: ast.Call, name: str) -> _Value:
        if node.keywords:
            raise self.error(node, "arange() takes only positional start, stop, step")
        if not 1 <= len(node.args) <= 3:
            raise self.error(node, "arange() takes stop, or start, stop[, step]")
        values = [self.constant_int(arg, "arange()'s bound") for arg in node.args]
        start, stop, step = (0, values[0], 1) if len(values) == 1 else (*values, 1)[:3]
        if step == 0:
            raise self.error(node, "arange() step must not be 0")
        self.check_constant_size(node, name, max(0, -((start - stop) // step)))

        def run(x: Tensor, data: tuple[Tensor, ...]) -> Tensor:
            return torch.arange(start, stop, step, dtype=x.dtype, device=x.device)

        return _Dyn(run, uses_x=False)
