"""The Plan RPC's domain side: a PlanRequest becomes the memory planner's table.

Validation names the field at fault (`spec.model: ...`, `workers: ...`); the planner itself
(workers.training.planner) builds the zoo model once and runs one small forward pass, so it
runs on a thread, off the event loop. Only zoo models are planned: a caller's own module would
have to be loaded (its code run) to be measured.
"""

from __future__ import annotations

import asyncio

from google.protobuf import json_format

from secant.v1 import optimizer_pb2 as pb
from service.errors import LimitExceeded

MAX_PLAN_WORKERS = 1024


def plan_request(request: pb.PlanRequest) -> pb.PlanResponse:
    """The plan for a request (ValueError naming the field for bad input)."""
    from service.training import _integers
    from workers.training.models import is_code_model, parse_model_spec
    from workers.training.planner import PRECISIONS, plan_for_spec

    spec = _integers(json_format.MessageToDict(request.spec)) if request.HasField("spec") else {}
    if "model" not in spec:
        raise ValueError("spec.model: required (a zoo model spec: mlp, cnn, autoencoder, "
                         "transformer)")
    if is_code_model(spec["model"]):
        raise ValueError("spec.model: the planner takes zoo models only (a caller's own module"
                         " would have to run to be measured)")
    try:
        parse_model_spec(spec["model"])
    except ValueError as exc:
        raise ValueError(f"spec.model: {exc}") from None
    if request.workers < 0 or request.batch_size < 0 or request.memory_budget_bytes < 0:
        raise ValueError("workers, batch_size and memory_budget_bytes must be >= 0 (0: the "
                         "spec's)")
    workers = request.workers or spec.get("workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: an integer >= 1, got {workers!r}")
    if workers > MAX_PLAN_WORKERS:
        raise LimitExceeded(f"workers: {workers} exceeds {MAX_PLAN_WORKERS}")
    if request.batch_size:
        spec["batch_size"] = int(request.batch_size)
    scaling = dict(spec.get("scaling") or {})
    if request.precision:
        if request.precision not in PRECISIONS:
            raise ValueError(f"precision: one of {list(PRECISIONS)}, got {request.precision!r}")
        scaling["precision"] = request.precision
    spec["scaling"] = scaling
    budget = request.memory_budget_bytes or None
    try:
        plan = plan_for_spec(spec, workers=workers, budget_bytes=budget)
    except ValueError as exc:
        raise ValueError(f"spec: {exc}") from None
    return to_message(plan)


def to_message(plan) -> pb.PlanResponse:
    rows = [
        pb.PlanRow(
            zero_stage=r.stage, activation_checkpointing=r.checkpointing,
            accumulation_steps=r.accumulation, micro_batch_size=r.micro_batch,
            parameter_bytes=r.parameters, gradient_bytes=r.gradients,
            optimizer_bytes=r.optimizer, activation_bytes=r.activations,
            total_bytes=r.total, formula_parameter_bytes=r.formula.parameters,
            formula_gradient_bytes=r.formula.gradients,
            formula_optimizer_bytes=r.formula.optimizer, step_time=r.step_time, fits=r.fits,
        )
        for r in plan.rows
    ]
    return pb.PlanResponse(
        parameter_count=plan.parameter_count, workers=plan.workers,
        batch_size=plan.batch_size, precision=plan.precision, optimizer=plan.optimizer,
        memory_budget_bytes=plan.budget_bytes, rows=rows,
        recommended=-1 if plan.recommended_index is None else plan.recommended_index,
        reason=plan.reason, activation_method=plan.activation_method, table=plan.table(),
    )


async def plan(request: pb.PlanRequest) -> pb.PlanResponse:
    return await asyncio.to_thread(plan_request, request)
