"""Checkpoint -> resume gives the iterates of an uninterrupted run, bit for bit; the external
evaluator mode (Solve.run() driven by hand) gives exactly minimize's result; checkpoints are
safetensors (no pickle) and garbage is refused cleanly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from workers.solvers import (
    EvalRequest,
    IterationDone,
    LocalEvaluator,
    Solve,
    SolveState,
    least_squares,
    load_state,
    minimize,
    save_state,
    state_from_bytes,
    state_to_bytes,
)
from workers.solvers.problems import bounded_problems, extended_rosenbrock, get_problem


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_BOUNDED_ROSEN = {p.name: p for p in bounded_problems()}["extended_rosenbrock_10_bounded"]

# method -> (problem, checkpoint iteration k, extra kwargs)
CASES = {
    "l-bfgs": (extended_rosenbrock(10), 17, {}),  # k > m: the history ring has wrapped
    "bfgs": (extended_rosenbrock(10), 9, {}),
    "newton-cg": (get_problem("wood"), 6, {}),
    "l-bfgs-b": (_BOUNDED_ROSEN, 12, {"bounds": _BOUNDED_ROSEN.bounds}),
    "lm": (get_problem("box3d"), 3, {}),
    "gauss-newton": (get_problem("helical_valley"), 2, {}),
    "sr1": (extended_rosenbrock(10), 8, {}),
    "newton": (get_problem("wood"), 5, {}),
}


def _solve(method, problem, **kwargs):
    if method in ("lm", "gauss-newton"):
        return least_squares(problem.residual, problem.x0_tensor(), method=method, **kwargs)
    return minimize(problem.fun, problem.x0_tensor(), method=method, **kwargs)


def _recording():
    """(iterates list, on_iteration hook that clones x, f and g after every iteration)."""
    seen: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def hook(state: SolveState) -> None:
        seen.append((state.nit, state.x.clone(), state.f.clone(), state.g.clone()))

    return seen, hook




@pytest.mark.parametrize(
    "method",
    CASES,
)
def test_resume_from_checkpoint_gives_identical_iterates(method):
    problem, k, kwargs = CASES[method]
    options = {"gtol": 1e-10, "max_iter": 500}
    full, record_full = _recording()
    reference = _solve(method, problem, options=options, on_iteration=record_full, **kwargs)
    assert reference.nit > k + 2, "pick k well inside the run"

    blobs: dict[int, bytes] = {}

    def checkpoint_at_k(state: SolveState) -> None:
        if state.nit == k:
            blobs[k] = state_to_bytes(state)

    _solve(method, problem, options=options, on_iteration=checkpoint_at_k, **kwargs)
    resumed_seen, record_resumed = _recording()
    resumed = _solve(
        method,
        problem,
        options=options,
        on_iteration=record_resumed,
        initial_state=state_from_bytes(blobs[k]),
        **kwargs,
    )

    assert [s[0] for s in resumed_seen] == [s[0] for s in full[k:]]
    for (nit, x, f, g), (_, x_ref, f_ref, g_ref) in zip(resumed_seen, full[k:], strict=True):
        assert torch.equal(x, x_ref), f"x differs at iteration {nit}"
        assert torch.equal(f, f_ref) and torch.equal(g, g_ref), f"f/g differ at {nit}"
    assert torch.equal(resumed.x, reference.x)
    assert resumed.fun == reference.fun
    assert (resumed.nit, resumed.nfev, resumed.njev, resumed.nhev, resumed.status) == (
        reference.nit,
        reference.nfev,
        reference.njev,
        reference.nhev,
        reference.status,
    )


def test_checkpoint_round_trip_through_a_file_keeps_every_field(tmp_path):
    problem = extended_rosenbrock(10)
    states: list[SolveState] = []

    def keep_at_12(state):
        if state.nit == 12:
            save_state(state, tmp_path / "state.safetensors")
            states.append(state_from_bytes(state_to_bytes(state)))

    minimize(problem.fun, problem.x0_tensor(), method="l-bfgs", on_iteration=keep_at_12)
    loaded = load_state(tmp_path / "state.safetensors")

    (expected,) = states
    assert type(loaded) is type(expected)
    for name, value in vars(expected).items():
        other = getattr(loaded, name)
        if isinstance(value, torch.Tensor):
            assert torch.equal(other, value) and other.dtype == value.dtype, name
        else:
            assert other == value or (value != value and other != other), name  # NaN == NaN


def test_float32_state_resumes_as_float32():
    problem = extended_rosenbrock(4)
    blobs = []

    def keep_at_5(state):
        if state.nit == 5:
            blobs.append(state_to_bytes(state))

    x0 = problem.x0_tensor(torch.float32)
    reference = minimize(
        problem.fun, x0, method="l-bfgs", options={"gtol": 1e-4}, on_iteration=keep_at_5
    )
    state = state_from_bytes(blobs[0])
    resumed = minimize(
        problem.fun, x0, method="l-bfgs", options={"gtol": 1e-4}, initial_state=state
    )

    assert state.x.dtype == torch.float32
    assert resumed.x.dtype == torch.float32 and torch.equal(resumed.x, reference.x)


@pytest.mark.parametrize("method", ["l-bfgs", "bfgs", "newton-cg", "l-bfgs-b", "newton", "gd"])
def test_external_evaluator_gives_exactly_minimizes_result(method):
    problem = get_problem("wood")
    options = {"gtol": 1e-9}
    reference = minimize(problem.fun, problem.x0_tensor(), method=method, options=options)
    # As minimize drives it: a small problem on the numpy path (workers.solvers._small),
    # whose requests the evaluator answers through solve.evaluator().
    solve = Solve(method, problem.x0_tensor(), options=options, small=True)
    evaluator = solve.evaluator(LocalEvaluator(problem.fun))
    requests = iterations = 0

    run = solve.run()
    item = next(run)
    try:
        while True:
            if isinstance(item, EvalRequest):
                requests += 1
                item = run.send(evaluator(item))
            else:
                assert isinstance(item, IterationDone)
                iterations += 1
                item = run.send(None)
    except StopIteration as done:
        result = done.value

    assert torch.equal(result.x, reference.x)
    assert result.fun == reference.fun and torch.equal(result.jac, reference.jac)
    assert (result.nit, result.nfev, result.njev, result.nhev, result.status) == (
        reference.nit,
        reference.nfev,
        reference.njev,
        reference.nhev,
        reference.status,
    )
    assert iterations == result.nit
    assert requests >= result.nfev


def test_external_evaluator_for_least_squares():
    problem = get_problem("box3d")
    reference = least_squares(problem.residual, problem.x0_tensor(), method="lm")
    evaluator = LocalEvaluator(residual=problem.residual)
    run = Solve("lm", problem.x0_tensor()).run()

    item = next(run)
    try:
        while True:
            item = run.send(evaluator(item) if isinstance(item, EvalRequest) else None)
    except StopIteration as done:
        result = done.value

    assert torch.equal(result.x, reference.x) and result.nfev == reference.nfev


def _checkpoint_blob() -> bytes:
    problem = extended_rosenbrock(4)
    blobs = []
    minimize(
        problem.fun,
        problem.x0_tensor(),
        method="l-bfgs",
        options={"max_iter": 3},
        on_iteration=lambda s: blobs.append(state_to_bytes(s)),
    )
    return blobs[-1]


def test_checkpoint_is_safetensors_without_pickle():
    blob = _checkpoint_blob()

    tensors = load_safetensors(blob)  # parses as safetensors
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + header_len])
    data_bytes = max(
        end for name, v in header.items() if name != "__metadata__" for end in v["data_offsets"]
    )

    assert len(blob) == 8 + header_len + data_bytes  # nothing hidden after the tensors
    assert not blob.startswith(b"\x80") and not blob.startswith(b"PK")  # not pickle / zip
    assert {"x", "f", "g", "W"} <= set(tensors)
    assert all(isinstance(v, str) for v in header["__metadata__"].values())
    json.loads(header["__metadata__"]["scalars"])  # numbers are JSON


def _valid_safetensors(metadata: dict[str, str] | None) -> bytes:
    return save_safetensors({"x": torch.zeros(2)}, metadata=metadata)


GARBAGE = [
    ("empty", b""),
    ("short", b"hello"),
    ("zero_header", b"\x00" * 8),
    ("huge_header_length", b"\xff" * 16),
    ("header_not_json", b"\x04\x00\x00\x00\x00\x00\x00\x00{{{{"),
    ("pickle", b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00."),
    ("no_metadata", _valid_safetensors(None)),
    ("unknown_class", _valid_safetensors({"class": "os.system", "scalars": "{}"})),
    ("missing_scalars", _valid_safetensors({"class": "LbfgsState"})),
    ("scalars_not_json", _valid_safetensors({"class": "SolveState", "scalars": "{"})),
    ("missing_tensors", _valid_safetensors({"class": "SolveState", "scalars": "{}"})),
    ("unknown_field", _valid_safetensors({"class": "SolveState", "scalars": '{"evil": 1}'})),
]




@pytest.mark.parametrize(
    "blob",
    [g[1] for g in GARBAGE],
    ids=[g[0] for g in GARBAGE],
)
def test_garbage_checkpoint_raises_value_error(blob):
    with pytest.raises(ValueError):
        state_from_bytes(blob)


def test_truncated_checkpoint_raises_value_error():
    blob = _checkpoint_blob()
    for cut in (7, 20, len(blob) // 2, len(blob) - 1):
        with pytest.raises(ValueError):
            state_from_bytes(blob[:cut])


@pytest.mark.parametrize("method", ["l-bfgs", "l-bfgs-b"])
def test_checkpoint_with_slot_ordered_history_resumes_identically(method):
    # Checkpoints written before the chronological layout (layout = 0) kept SY/YY in ring-slot
    # order and no S^T S; resuming one reorders them once and continues the same iterates.
    problem, k, kwargs = CASES[method]
    options = {"gtol": 1e-10, "max_iter": 500}
    full, record_full = _recording()
    _solve(method, problem, options=options, on_iteration=record_full, **kwargs)
    blobs: dict[int, bytes] = {}

    def keep_k(state: SolveState) -> None:
        if state.nit == k:
            blobs[k] = state_to_bytes(state)

    _solve(method, problem, options=options, on_iteration=keep_k, **kwargs)
    state = state_from_bytes(blobs[k])
    m, count = state.SY.shape[0], state.count
    slots = [(state.newest - count + 1 + i) % m for i in range(count)]
    idx = torch.tensor(slots)
    for name in ("SY", "YY"):
        chrono = getattr(state, name)[:count, :count]
        legacy = torch.zeros_like(getattr(state, name))
        legacy[idx.unsqueeze(1), idx.unsqueeze(0)] = chrono
        setattr(state, name, legacy)
    state.layout, state.SS = 0, None

    resumed_seen, record_resumed = _recording()
    _solve(method, problem, options=options, on_iteration=record_resumed, initial_state=state,
           **kwargs)

    assert len(resumed_seen) == len(full[k:])
    for (nit, x, f, _g), (_, x_ref, f_ref, _) in zip(resumed_seen, full[k:], strict=True):
        torch.testing.assert_close(x, x_ref, rtol=1e-12, atol=1e-12, msg=f"x at {nit}")
        torch.testing.assert_close(f, f_ref, rtol=1e-12, atol=1e-14)
