"""method="auto" and the memory planner through the real gateway, Ray and SDK: solves report
the method the worker chose and why, Plan returns the per-stage table (SDK and `secant train
--plan`), and a training job's `zero_stage: auto` is resolved at submission and trains."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import yaml

import secant
from secant import cli
from secant.v1 import optimizer_pb2 as pb

pytestmark = pytest.mark.integration

ROSENBROCK = "sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)"
MODEL = {"kind": "transformer", "vocab": 32, "context": 16, "width": 32, "layers": 2,
         "heads": 2}


def test_an_auto_solve_reports_the_method_the_worker_chose(gateway):
    with secant.Client(gateway) as client:
        scalar = client.minimize(ROSENBROCK, [-1.2, 1.0, -1.2, 1.0], method="auto",
                                 options={"gtol": 1e-8})
        t = np.linspace(0.0, 1.0, 20)
        fit = secant.Residual("x[0] * exp(x[1] * t) - y", data={"t": t, "y": 2.0 * np.exp(-t)})
        residual = client.minimize(fit, [1.0, 0.0], method="auto", options={"gtol": 1e-10})
        bounded = client.minimize(ROSENBROCK, [0.0, 0.0], method="auto",
                                  bounds=([-2.0, -2.0], [0.5, 2.0]))
        listed = [job.id for job in client.jobs(method="auto")]
    assert scalar.success and np.allclose(scalar.x, 1.0, atol=1e-5)
    assert scalar.method_chosen in ("newton", "bfgs", "l-bfgs")
    assert scalar.method_reason.startswith(scalar.method_chosen)
    assert residual.success and np.allclose(residual.x, [2.0, -1.0], atol=1e-6)
    assert residual.method_chosen in ("lm", "bfgs")
    assert "least squares (m=20)" in residual.method_reason
    assert bounded.method_chosen == "l-bfgs-b" and bounded.x[0] <= 0.5 + 1e-12
    assert {scalar.job_id, residual.job_id, bounded.job_id} <= set(listed)


def test_callback_and_batch_solves_choose_by_the_rules(gateway):
    def f(x):
        return float((x[0] - 3.0) ** 2 + 10.0 * (x[1] + 1.0) ** 2)

    def g(x):
        return np.array([2.0 * (x[0] - 3.0), 20.0 * (x[1] + 1.0)])

    with secant.Client(gateway) as client:
        called = client.minimize(f, [0.0, 0.0], jac=g, method="auto")
        batch = client.minimize_batch("(x[0] - a)**2 + (x[1] + 1)**2", np.zeros((4, 2)),
                                      member_data={"a": np.arange(4.0)}, method="auto")
    assert called.success and called.method_chosen == "bfgs"
    assert "round trip" in called.method_reason
    assert batch.all_converged and batch.method_chosen == "bfgs"
    assert np.allclose(batch.x[:, 0], np.arange(4.0), atol=1e-6)


def test_plan_returns_every_stage_and_a_recommendation_that_fits(gateway):
    with secant.Client(gateway) as client:
        roomy = client.plan(MODEL, workers=4, batch=64, amp=True, budget="1GiB")
        first = roomy.rows[0]
        budget = (first.total_bytes + min(r.total_bytes for r in roomy.rows)) // 2
        tight = client.plan(MODEL, workers=4, batch=64, amp=True, budget=budget)
    assert roomy.precision == "bf16" and roomy.workers == 4
    assert {r.zero_stage for r in roomy.rows} == {0, 1, 2, 3}
    assert {r.activation_checkpointing for r in roomy.rows} == {False, True}
    assert roomy.recommended is not None and roomy.recommended.fits
    assert tight.recommended.total_bytes <= budget < first.total_bytes
    assert tight.recommended.step_time > 1.0
    assert "recommended" in str(tight)


def test_plan_refuses_what_it_cannot_plan(gateway):
    with secant.Client(gateway) as client:
        for bad in ({"kind": "mlp", "sizes": [4]}, {"kind": "pickle", "module": "AAAA"}):
            with pytest.raises(secant.SecantError) as err:
                client.plan(bad)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_secant_train_plan_prints_the_table(gateway, tmp_path, capsys):
    spec = {"model": MODEL, "batch_size": 32, "workers": 2, "optimizer": "adam",
            "scaling": {"precision": "bf16", "memory_budget": "256MiB"}, "dataset": "digits"}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert cli.main(["train", str(path), "--plan", "--address", gateway]) == 0
    out = capsys.readouterr().out
    assert "2 worker(s)" in out and "bf16" in out and "<- recommended" in out
    assert "256.0 MiB" in out


def test_zero_stage_auto_is_resolved_when_the_job_is_submitted(gateway):
    spec = {"model": {"kind": "mlp", "sizes": [64, 32, 10]}, "optimizer": "adam",
            "batch_size": 32, "steps": 3, "dataset": "digits", "workers": 2,
            "scaling": {"zero_stage": "auto", "memory_budget": "512MiB"}}
    with secant.Client(gateway) as client:
        run = client.train(spec)
    assert run.steps == 3
    memory = next(values for step, values in run.history if "mem_formula_bytes" in values)
    assert memory["mem_formula_bytes"] > 0
    with grpc.insecure_channel(gateway) as channel:
        job = secant.v1.optimizer_pb2_grpc.OptimizerStub(channel).GetJob(
            pb.GetJobRequest(job_id=run.job_id))
    assert job.state == pb.SUCCEEDED
