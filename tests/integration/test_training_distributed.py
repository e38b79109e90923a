"""The distributed training-job path on a real local Ray (the session's loopback cluster):
N worker actors in a gloo group follow the 1-worker trajectory, stream contiguous steps,
return weights that reproduce their reported accuracy, survive a killed worker by resuming
from a checkpoint, and stop promptly when asked. Four Ray jobs in all."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

from workers.training.checkpoint import (
    TrainingState,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from workers.training.datasets import load_dataset
from workers.training.distributed import (
    CheckpointSaved,
    MemoryReport,
    StepEvent,
    WorkerLost,
    WorkersStarted,
    run_training_job,
)
from workers.training.loop import evaluate, load_weights, split, train
from workers.training.models import build_model

pytest.importorskip("sklearn")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

KFAC = {"name": "kfac", "lr": 0.1, "momentum": 0.9, "damping": 1e-2, "inv_update_steps": 2}
SMALL_JOB = {
    "model": {"kind": "mlp", "sizes": [64, 32, 10]},
    "optimizer": KFAC,
    "batch_size": 64,
    "steps": 12,
    "seed": 1,
    "checkpoint_every": 4,
}


@pytest.fixture(scope="module")
def digits():
    X, y = load_dataset("digits")
    return {"X": X.numpy(), "y": y.numpy()}


@pytest.fixture(scope="module")
def two_worker_job(ray_cluster, digits, tmp_path_factory):
    """One 2-worker K-FAC job on digits: (events, outcome, checkpoint_dir)."""
    events: list = []
    directory = str(tmp_path_factory.mktemp("ckpt"))
    outcome = run_training_job(SMALL_JOB, digits, workers=2, emit=events.append,
                               checkpoint_dir=directory, resume=False)
    return events, outcome, directory


def _steps(events, attempt=None) -> list[StepEvent]:
    return [e for e in events if isinstance(e, StepEvent)
            and (attempt is None or e.attempt == attempt)]


def _single_process_losses(spec: dict, digits) -> list[float]:
    train_spec = {k: v for k, v in spec.items() if k != "checkpoint_every"}
    result = train(train_spec, torch.tensor(digits["X"]), torch.tensor(digits["y"]))
    return [m.loss for m in result.history]


# ---------------------------------------------------------------- equivalence and results


def test_two_workers_give_the_same_losses_as_one_worker_on_the_global_batch(two_worker_job,
                                                                            digits):
    events, outcome, _ = two_worker_job
    started = [e for e in events if isinstance(e, WorkersStarted)]
    assert [(s.workers, s.backend, len(set(s.pids))) for s in started] == [(2, "gloo", 2)]

    expected = _single_process_losses(SMALL_JOB, digits)

    assert [e.loss for e in _steps(events)] == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_job_streams_contiguous_steps_and_returns_weights_reproducing_val_accuracy(
        two_worker_job, digits):
    events, outcome, directory = two_worker_job
    steps = _steps(events)
    assert [e.step for e in steps] == list(range(1, 13)) and outcome.steps == 12
    assert all(e.lr == 0.1 and e.damping == pytest.approx(1e-2) for e in steps)
    assert all(e.step_time_s > 0 and e.samples_per_s > 0 for e in steps)
    assert [e.step for e in events if isinstance(e, CheckpointSaved)] == [4, 8]
    assert [s for s, _ in list_checkpoints(directory)] == [4, 8]  # the newest two are kept
    assert not outcome.stopped_early and outcome.restarts == 0

    model = load_weights(build_model(SMALL_JOB["model"]), outcome.weights)
    X, y = torch.tensor(digits["X"]), torch.tensor(digits["y"])
    _, _, X_val, y_val = split(X, y, 0.2, seed=SMALL_JOB["seed"])

    measured = evaluate(model, "cross_entropy", X_val, y_val)
    assert measured["accuracy"] == outcome.metrics["val_accuracy"] > 0.5
    assert measured["loss"] == pytest.approx(outcome.metrics["val_loss"])


# ---------------------------------------------------------------- failures and stops


def test_killed_worker_restarts_the_group_from_the_last_checkpoint_and_finishes(
        ray_cluster, digits, tmp_path):
    spec = {"model": {"kind": "mlp", "sizes": [64, 256, 256, 10]},
            "optimizer": {**KFAC, "lr": 0.05, "inv_update_steps": 1}, "batch_size": 128,
            "steps": 60, "seed": 2, "checkpoint_every": 5}
    events: list = []

    def emit(event) -> None:
        events.append(event)
        if isinstance(event, StepEvent) and event.attempt == 0 and event.step == 8:
            first = next(e for e in events if isinstance(e, WorkersStarted))
            os.kill(first.pids[1], signal.SIGKILL)  # rank 1 dies mid-job

    outcome = run_training_job(spec, digits, workers=2, emit=emit,
                               checkpoint_dir=str(tmp_path), resume=False)

    lost = [e for e in events if isinstance(e, WorkerLost)]
    assert len(lost) == 1 and outcome.restarts == 1
    resume_step = lost[0].resume_step
    before, after = _steps(events, attempt=0), _steps(events, attempt=1)
    assert resume_step >= 5 and resume_step % 5 == 0 and resume_step <= before[-1].step < 60
    assert [e.step for e in before] == list(range(1, before[-1].step + 1))
    started = [e for e in events if isinstance(e, WorkersStarted)]
    assert [s.resumed_from_step for s in started] == [0, resume_step]
    assert not set(started[0].pids) & set(started[1].pids)  # a fresh group
    assert [e.step for e in after] == list(range(resume_step + 1, 61)) and outcome.steps == 60
    # resumed exactly (model, momentum, K-FAC factors and eigenbases, batch order): the steps
    # run twice, before the kill and after the restart (if any: the kill may land right after
    # a checkpoint), have the same losses
    replayed = {e.step: e.loss for e in before if e.step > resume_step}
    assert [e.loss for e in after[:len(replayed)]] == pytest.approx(
        list(replayed.values()), rel=1e-6)


def test_should_stop_ends_the_job_promptly_with_its_current_weights(ray_cluster, digits,
                                                                   tmp_path):
    spec = {"model": {"kind": "mlp", "sizes": [64, 32, 10]}, "optimizer": "adam",
            "batch_size": 32, "steps": 1_000_000, "checkpoint_every": 0}
    requested = threading.Event()

    def emit(event) -> None:
        if isinstance(event, StepEvent) and event.step >= 3 and not requested.is_set():
            requested.set()

    outcome = run_training_job(spec, digits, workers=1, emit=emit, should_stop=requested.is_set,
                               checkpoint_dir=str(tmp_path), resume=False)

    assert outcome.stopped_early and 3 <= outcome.steps < 1_000_000
    # a hang would spend the test's timeout: 1e6 steps take hours, so steps < 1e6 is the stop
    assert "val_accuracy" in outcome.metrics
    load_weights(build_model(spec["model"]), outcome.weights)


# ---------------------------------------------------------------- scaling plans (issue 8)

SCALED_JOB = {"model": {"kind": "mlp", "sizes": [64, 32, 10]},
              "optimizer": {"name": "adam", "lr": 1e-2}, "batch_size": 32, "steps": 8,
              "seed": 1, "checkpoint_every": 3,
              "scaling": {"accumulation_steps": 2, "lr_scaling": "linear",
                          "base_batch_size": 16, "warmup": {"kind": "linear", "steps": 3}}}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_job_follows_one_worker_training_and_reports_memory(ray_cluster, digits,
                                                                       tmp_path, stage):
    """2 workers x 2 micro-batches of 8 = the 1-worker run's global batch of 32; stage 1
    also resumes from its (consolidated) checkpoint and replays the same losses."""
    spec = {**SCALED_JOB, "scaling": {**SCALED_JOB["scaling"], "zero_stage": stage}}
    events: list = []
    outcome = run_training_job(spec, digits, workers=2, emit=events.append,
                               checkpoint_dir=str(tmp_path), resume=False)

    steps = _steps(events)
    assert [e.loss for e in steps] == pytest.approx(_single_process_losses(spec, digits),
                                                    rel=1e-4, abs=1e-5)
    assert [e.lr for e in steps] == pytest.approx([0.01, 0.04 / 3, 0.05 / 3] + [0.02] * 5)
    assert outcome.effective_batch == 32 and {e.effective_batch for e in steps} == {32}
    [memory] = [e for e in events if isinstance(e, MemoryReport)]
    assert (memory.zero_stage, memory.workers, memory.effective_batch) == (stage, 2, 32)
    p = memory.parameter_count
    assert memory.formula_bytes == {1: 8 * p + 8 * p // 2, 2: 4 * p + 12 * p // 2,
                                    3: 16 * p // 2}[stage]
    if stage == 2:
        # Whole tensors are reduced to their owner: the split follows tensor sizes, the sum
        # over the workers is one full set of gradients.
        assert memory.param_bytes == (4 * p, 4 * p) and sum(memory.grad_bytes) == 4 * p
    else:
        assert memory.grad_bytes == ((4 * p, 4 * p) if stage == 1 else (2 * p, 2 * p))
    assert sum(memory.optimizer_bytes) == pytest.approx(8 * p, rel=0.01)  # Adam, sharded
    metrics = memory.as_metrics()
    assert metrics["mem_formula_bytes"] == memory.formula_bytes
    assert {"mem_param_bytes_rank1", "mem_total_bytes_rank0"} <= set(metrics)
    assert [e.step for e in events if isinstance(e, CheckpointSaved)] == [3, 6]
    model = load_weights(build_model(spec["model"]), outcome.weights)
    assert evaluate(model, "cross_entropy", torch.tensor(digits["X"]),
                    torch.tensor(digits["y"]))["loss"] < 2.3

    if stage == 1:
        replay: list = []
        run_training_job(spec, digits, workers=2, emit=replay.append,
                         checkpoint_dir=str(tmp_path), resume=True)
        assert [(e.step, e.loss) for e in _steps(replay)] == [
            (e.step, pytest.approx(e.loss, rel=1e-6)) for e in steps[6:]]


def test_killed_worker_at_zero_stage_2_resumes_from_its_checkpoint(ray_cluster, digits,
                                                                   tmp_path):
    spec = {"model": {"kind": "mlp", "sizes": [64, 64, 10]},
            "optimizer": {"name": "adam", "lr": 3e-3}, "batch_size": 64, "steps": 200,
            "seed": 3, "checkpoint_every": 5, "scaling": {"zero_stage": 2}}
    events: list = []

    def emit(event) -> None:
        events.append(event)
        if isinstance(event, CheckpointSaved) and event.step == 5 and len(
                [e for e in events if isinstance(e, WorkersStarted)]) == 1:
            first = next(e for e in events if isinstance(e, WorkersStarted))
            os.kill(first.pids[1], signal.SIGKILL)  # rank 1 dies mid-job

    outcome = run_training_job(spec, digits, workers=2, emit=emit,
                               checkpoint_dir=str(tmp_path), resume=False)

    [lost] = [e for e in events if isinstance(e, WorkerLost)]
    assert outcome.restarts == 1 and lost.resume_step >= 5 and lost.resume_step % 5 == 0
    before, after = _steps(events, attempt=0), _steps(events, attempt=1)
    assert [e.step for e in after] == list(range(lost.resume_step + 1, 201))
    assert outcome.steps == 200 and not outcome.stopped_early
    replayed = {e.step: e.loss for e in before if e.step > lost.resume_step}
    assert [e.loss for e in after[:len(replayed)]] == pytest.approx(list(replayed.values()),
                                                                    rel=1e-6)
    assert len([e for e in events if isinstance(e, MemoryReport)]) == 2  # one per attempt
    assert outcome.metrics["val_accuracy"] > 0.8


# ---------------------------------------------------------------- before anything starts


@pytest.mark.parametrize(("spec", "workers", "message"), [
    ({**SMALL_JOB, "batch_size": 63}, 2, "multiple of workers"),
    ({**SMALL_JOB, "optimizer": {"name": "lbfgs"}}, 2, "one worker only"),
    ({**SMALL_JOB, "checkpoint_every": -1}, 1, "checkpoint_every"),
    ({**SMALL_JOB, "optimizer": {"name": "rmsprop"}}, 1, "optimizer.name"),
    (SMALL_JOB, 0, "workers"),
    ({**SMALL_JOB, "scaling": {"zero_stage": 1}}, 2, "zero_stage must be 0 with optimizer kfac"),
    ({**SMALL_JOB, "optimizer": "adam", "scaling": {"zero_stage": 5}}, 2, "scaling.zero_stage"),
    ({**SMALL_JOB, "optimizer": "adam", "scaling": {"micro_batch_size": 8}}, 2, "must equal"),
    ({**SMALL_JOB, "optimizer": "adam", "scaling": {"precision": "fp16"}}, 2, "CUDA"),
])
def test_bad_job_is_a_value_error_before_any_worker_starts(digits, tmp_path, spec, workers,
                                                            message):
    with pytest.raises(ValueError, match=message):
        run_training_job(spec, digits, workers=workers, emit=print,
                         checkpoint_dir=str(tmp_path), resume=False)


def test_checkpoint_round_trips_model_optimizer_and_kfac_state_without_pickle(tmp_path):
    torch.manual_seed(0)
    seen = []
    X, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    spec = {"model": {"kind": "mlp", "sizes": [5, 8, 3]}, "optimizer": KFAC, "batch_size": 16,
            "steps": 6}
    path = tmp_path / "step-00000003.safetensors"
    full = train(spec, X, y, checkpoint_every=3,  # the state's tensors are live: save at once
                 on_checkpoint=lambda s: seen.append(save_checkpoint(s, path, fingerprint="f")))

    state = load_checkpoint(path, fingerprint="f")
    resumed = train(spec, X, y, initial_state=state)

    assert isinstance(state, TrainingState) and state.step == 3
    assert seen == [path] and latest_checkpoint(tmp_path) == path
    assert [m.step for m in resumed.history] == [4, 5, 6]
    assert [m.loss for m in resumed.history] == pytest.approx([m.loss for m in full.history[3:]],
                                                               rel=1e-6)
    with pytest.raises(ValueError, match="another training spec"):
        load_checkpoint(path, fingerprint="g")
