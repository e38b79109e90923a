"""Hostile expressions are rejected with ObjectiveError and without side effects (how fast:
bench/guards.py, which times this corpus)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers.objectives import (
    ExpressionLimits,
    ObjectiveError,
    ObjectiveLimits,
    TensorSpec,
    build_objective,
)

CORPUS = Path(__file__).resolve().parents[1] / "data" / "hostile_expressions.txt"


def spec(name: str, tensor: torch.Tensor) -> TensorSpec:
    dtype = str(tensor.dtype).removeprefix("torch.")
    return TensorSpec(name, tuple(tensor.shape), dtype, tensor.contiguous().numpy().tobytes())


X0 = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
DATA = [
    spec("A", torch.arange(6, dtype=torch.float64).reshape(2, 3)),
    spec("b", torch.ones(2, dtype=torch.float64)),
    spec("y", torch.tensor([1, 0, 1], dtype=torch.int64)),
]


def generate(name: str, size: int) -> str:
    """The cases that cannot be written on one line of the corpus."""
    generators = {
        "empty": lambda k: "",
        "whitespace": lambda k: " " * k,
        "nul_byte": lambda k: "sum(x)\x00",
        "newline_chain": lambda k: "sum(x)\nimport os",
        "big_source": lambda k: ("sum(x)" + " + x[0]" * k)[:k],
        "deep_parens": lambda k: "(" * k + "sum(x)" + ")" * k,
        "deep_brackets": lambda k: "[" * k + "]" * k,
        "deep_calls": lambda k: "sum(" * k + "x" + ")" * k,
        "deep_unary": lambda k: "-" * k + "sum(x)",
        "deep_power": lambda k: "x[0]**" * k + "x[0]",
        "many_nodes": lambda k: "+".join(["x[0]"] * k),
        "long_int": lambda k: "sum(x) + " + "9" * k,
        "random_bytes": lambda k: random.Random(k).randbytes(k).decode("latin-1"),
    }
    return generators[name](size)


def load_corpus() -> list[tuple[str, str, str]]:
    """(case id, kind, source) for every case in the corpus file."""
    cases = []
    for number, line in enumerate(CORPUS.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("# ") or line == "#":
            continue
        if line.startswith("#gen:"):
            name, size = line.removeprefix("#gen:").split()
            cases.append((f"L{number}:{name}-{size}", "expression", generate(name, int(size))))
        elif line.startswith("#residual:"):
            source = line.removeprefix("#residual:").strip()
            cases.append((f"L{number}:residual:{source}", "residual", source))
        elif line.startswith("#literal:"):
            source = line.removeprefix("#literal:").strip()
            cases.append((f"L{number}:{source}", "expression", source))
        elif line.startswith("#"):
            raise AssertionError(f"{CORPUS.name}:{number}: unknown escape {line!r}")
        else:
            cases.append((f"L{number}:{line[:50]}", "expression", line))
    return cases


CASES = load_corpus()


@pytest.fixture(scope="module", autouse=True)
def warm_up():
    # The first build pays for lazy imports inside torch: the cases must not see them as
    # their side effects on sys.modules.
    build_objective(kind="expression", source="sum(A @ x)", data=DATA, x0=X0)
    build_objective(kind="residual", source="A @ x - b", data=DATA, x0=X0)
    for bad in ("sum(A @ x[:2])", "x", "x[5]"):
        with pytest.raises(ObjectiveError):
            build_objective(kind="expression", source=bad, data=DATA, x0=X0)


def test_corpus_is_not_empty_and_covers_the_required_cases():
    sources = {source for _, _, source in CASES}
    assert len(CASES) > 100
    for required in ("().__class__.__bases__", "__import__('os')", "9**9**9", "x**10**10"):
        assert required in sources


@pytest.mark.parametrize(("kind", "source"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_expression_is_rejected_fast_without_side_effects(
    kind, source, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    modules_before = set(sys.modules)

    with pytest.raises(ObjectiveError) as caught:
        build_objective(kind=kind, source=source, data=DATA, x0=X0)

    assert type(caught.value).__name__ in ("ObjectiveError", "ExpressionError")
    assert caught.value.field == "objective.source"
    assert str(caught.value)  # a message a person can act on, never empty
    assert list(tmp_path.iterdir()) == []
    assert set(sys.modules) - modules_before == set()


@pytest.mark.parametrize("generator", ["deep_parens", "deep_brackets", "deep_calls"])
def test_deep_nesting_is_refused_before_parsing_even_with_a_raised_length_limit(generator):
    limits = ObjectiveLimits(expression=ExpressionLimits(max_source_chars=10**6))
    source = generate(generator, 100_000)

    # only the linear bracket scan that runs before ast.parse says "brackets are nested"; the
    # parser's own recursion limit says "too deeply nested to parse", after far more work
    with pytest.raises(ObjectiveError, match="brackets are nested"):
        build_objective(kind="expression", source=source, data=DATA, x0=X0, limits=limits)


def test_oversized_intermediate_is_refused_before_allocating():
    limits = ObjectiveLimits(expression=ExpressionLimits(max_intermediate_elements=1_000))
    column = torch.ones(2_000, 1, dtype=torch.float64)
    x0 = torch.ones(2_000, dtype=torch.float64)

    with pytest.raises(ObjectiveError, match="max_intermediate_elements"):
        build_objective(
            kind="expression", source="sum(C * x)", data=[spec("C", column)], x0=x0,
            limits=limits,
        )  # fmt: skip


# -- property-based: anything in, ObjectiveError or a working objective out ---------------

LEAVES = st.sampled_from(
    ["x", "n", "A", "b", "y", "pi", "x[0]", "x[1:]", "x[:-1]", "x[::2]", "A[0]", "A[:, 1]",
     "ones(n)", "arange(n)", "zeros(2)", "0", "1", "2.5", "-3", "1e300", "1000"]
)  # fmt: skip
UNARY = st.sampled_from(
    ["exp", "log", "log1p", "sqrt", "abs", "sin", "cos", "tan", "tanh", "sigmoid", "softplus",
     "square", "sum", "mean", "prod", "norm", "logsumexp", "-", "+"]
)  # fmt: skip
BINARY = st.sampled_from(["+", "-", "*", "/", "**", "@", "//", "%"])
COMPARE = st.sampled_from(["<", "<=", ">", ">=", "==", "!="])


def _extend(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.tuples(UNARY, children).map(lambda t: f"{t[0]}({t[1]})"),
        st.tuples(children, BINARY, children).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(children, st.integers(-2, 2)).map(lambda t: f"sum({t[0]}, {t[1]})"),
        st.tuples(children, COMPARE, children, children, children).map(
            lambda t: f"where({t[0]} {t[1]} {t[2]}, {t[3]}, {t[4]})"
        ),
        st.tuples(children, children).map(lambda t: f"clamp({t[0]}, min={t[1]})"),
        st.tuples(children, children, children).map(lambda t: f"clamp({t[0]}, {t[1]}, {t[2]})"),
        st.tuples(st.sampled_from(["minimum", "maximum", "dot"]), children, children).map(
            lambda t: f"{t[0]}({t[1]}, {t[2]})"
        ),
        st.tuples(children, st.integers(-4, 4), st.integers(-4, 4)).map(
            lambda t: f"{t[0]}[{t[1]}:{t[2]}]"
        ),
    )


EXPRESSIONS = st.recursive(LEAVES, _extend, max_leaves=12)
DSL_ALPHABET = "x()[]+-*/@,:.0123456789 nsumexplogwherAby<>=_e\n\t'\"#\\"
PROPERTY_SETTINGS = settings(
    max_examples=200,
    derandomize=True,
    deadline=2_000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def accepts_and_evaluates_or_rejects(kind: str, source: str) -> None:
    try:
        objective = build_objective(kind=kind, source=source, data=DATA, x0=X0)
    except ObjectiveError as exc:
        assert str(exc)
        return
    # Accepted: it must evaluate and differentiate at x0 (non-finite values are allowed).
    x = X0.clone().requires_grad_()
    value = objective.fun(x)
    assert value.dim() == 0 and value.dtype == torch.float64
    torch.autograd.grad(value, x, allow_unused=True)


@PROPERTY_SETTINGS
@given(EXPRESSIONS, st.booleans())
def test_random_grammar_expressions_evaluate_or_raise_objective_error(body, wrap_in_sum):
    accepts_and_evaluates_or_rejects("expression", f"sum({body})" if wrap_in_sum else body)


@PROPERTY_SETTINGS
@given(EXPRESSIONS)
def test_random_grammar_residuals_evaluate_or_raise_objective_error(body):
    accepts_and_evaluates_or_rejects("residual", body)


@PROPERTY_SETTINGS
@given(st.one_of(st.text(max_size=200), st.text(alphabet=DSL_ALPHABET, max_size=120)))
def test_random_text_evaluates_or_raises_objective_error(text):
    accepts_and_evaluates_or_rejects("expression", text)


@PROPERTY_SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_evaluate_or_raise_objective_error(raw):
    accepts_and_evaluates_or_rejects("expression", raw.decode("utf-8", errors="surrogateescape"))
    with pytest.raises(ObjectiveError):
        build_objective(kind="expression", source=raw, data=DATA, x0=X0)  # bytes, not str
