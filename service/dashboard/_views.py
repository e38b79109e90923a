"""What the dashboard's pages and event streams show of the wire records (pb.Job, pb.JobEvent,
pb.Problem, pb.TrainRequest): plain dicts of display values, computed on request.

Tensors are summarized (shape, dtype, a few leading values), never sent whole: an x of a
million numbers stays on the server. Non-finite floats become None, because JSON (and so the
browser's JSON.parse) has no inf or nan.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
from google.protobuf import json_format

from secant.v1 import optimizer_pb2 as pb
from service.store import TERMINAL_STATES
from service.validation import decode_tensor

HEAD_VALUES = 8  # leading values shown of a tensor
NIT_BINS = 20  # bars of a batch's iteration histogram
STATES = [pb.JobState.Name(v).lower() for v in pb.JobState.values() if v]


def finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def state_name(state: int) -> str:
    return pb.JobState.Name(state).lower() if state in pb.JobState.values() else str(state)


def parse_state(name: str) -> int:
    """A state filter ("running", any case) as the wire enum; ValueError names the choices."""
    if not name:
        return 0
    try:
        return pb.JobState.Value(name.strip().upper())
    except ValueError:
        raise ValueError(f"state: unknown {name!r}; one of {', '.join(STATES)}") from None


def seconds(timestamp) -> float | None:
    return timestamp.ToNanoseconds() / 1e9 if timestamp.seconds or timestamp.nanos else None


def iso(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def duration(job: pb.Job) -> float | None:
    """Seconds from start (or creation) to finish, or to now while the job runs."""
    start = seconds(job.started) or seconds(job.created)
    if start is None:
        return None
    end = seconds(job.finished) if job.state in TERMINAL_STATES else None
    return max(0.0, (end or time.time()) - start)


def human_duration(value: float | None) -> str:
    if value is None:
        return ""
    if value < 1:
        return f"{value * 1e3:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def kind_of(job: pb.Job) -> str:
    if job.kind == "train":
        return "train"
    if job.result.HasField("batch"):
        return "batch"
    return job.kind or "solve"


def job_row(job: pb.Job) -> dict[str, Any]:
    """One row of the jobs table."""
    row: dict[str, Any] = {
        "id": job.job_id,
        "short_id": job.job_id[:12],
        "kind": kind_of(job),
        "method": job.method,
        "n": job.n,
        "state": state_name(job.state),
        "terminal": job.state in TERMINAL_STATES,
        "owner": job.owner,
        "batch_id": job.batch_id,
        "created": seconds(job.created),
        "created_text": iso(seconds(job.created)),
        "started": seconds(job.started),
        "duration": duration(job),
        "duration_text": human_duration(duration(job)),
        "progress": "",
        "value": "",
        "outcome": "",
    }
    if job.HasField("result"):
        r = job.result
        row["progress"] = f"{r.nit} it"
        row["value"] = _number(r.fun)
        row["outcome"] = pb.SolveStatus.Name(r.status).lower().replace("_", " ")
        if r.HasField("batch"):
            row["outcome"] = f"{r.batch.converged}/{_members(r.batch)} converged"
    elif job.HasField("train_result"):
        t = job.train_result
        row["progress"] = f"{t.steps} steps"
        loss = t.metrics.get("val_loss", t.metrics.get("train_loss"))
        row["value"] = _number(loss) if loss is not None else ""
        row["outcome"] = "stopped early" if t.stopped_early else "done"
    elif job.HasField("failure"):
        row["outcome"] = job.failure.code
    return row


def _members(batch: pb.BatchResult) -> int:
    return int(batch.status.shape[0]) if batch.status.shape else 0


def _number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.6g}"


SORT_KEYS = {
    "created": lambda r: r["created"] or 0.0,
    "state": lambda r: r["state"],
    "method": lambda r: r["method"],
    "kind": lambda r: r["kind"],
    "n": lambda r: r["n"],
    "owner": lambda r: r["owner"],
    "duration": lambda r: r["duration"] or 0.0,
}


def sort_rows(rows: list[dict], sort: str) -> list[dict]:
    """Rows ordered by `sort` ("-created" is the store's own order: newest first)."""
    descending = sort.startswith("-")
    key = SORT_KEYS.get(sort.lstrip("-"))
    if key is None:
        raise ValueError(f"sort: unknown {sort!r}; one of {', '.join(sorted(SORT_KEYS))}"
                         " (prefix - for descending)")
    return sorted(rows, key=key, reverse=descending)


# -- one job ----------------------------------------------------------------------------


def tensor_summary(tensor: pb.Tensor, where: str = "tensor") -> dict[str, Any]:
    shape = list(tensor.shape)
    summary: dict[str, Any] = {"shape": shape, "dtype": pb.DType.Name(tensor.dtype).lower(),
                               "size": math.prod(shape) if shape else 0, "head": []}
    try:
        values = decode_tensor(tensor, where).ravel()
    except Exception:  # a record the gateway stored is readable; a damaged one shows its shape
        return summary
    summary["head"] = [_number(float(v)) for v in values[:HEAD_VALUES]]
    summary["more"] = values.size > HEAD_VALUES
    if values.size and np.issubdtype(values.dtype, np.floating):
        good = values[np.isfinite(values)]  # a batch's NaN members must not hide the rest
        summary["norm_inf"] = _number(float(np.max(np.abs(good)))) if good.size else "nan"
    return summary


def _struct(message) -> dict:
    return _whole(json_format.MessageToDict(message)) if message.ListFields() else {}


def _whole(value):
    """A Struct's numbers are all doubles on the wire; 64.0 reads better as the 64 sent."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _whole(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole(v) for v in value]
    return value


def problem_view(kind: str, blob: bytes | None) -> dict[str, Any] | None:
    """The job's request as submitted: a Problem (solves, callbacks, batches) or a
    TrainRequest (training jobs)."""
    if not blob:
        return None
    if kind == "train":
        request = pb.TrainRequest.FromString(blob)
        return {
            "kind": "train",
            "spec": _struct(request.spec),
            "data": [{"name": d.name, **tensor_summary(d.tensor, d.name)} for d in request.data],
        }
    problem = pb.Problem.FromString(blob)
    objective = problem.objective
    which = objective.WhichOneof("kind")
    view: dict[str, Any] = {
        "kind": "problem",
        "method": problem.method,
        "objective_kind": which or "callback",
        "objective": getattr(objective, which) if which in ("expression", "residual") else "",
        "code_bytes": len(getattr(objective, which)) if which in ("torch_export", "cloudpickle")
        else 0,
        "data": [{"name": d.name, **tensor_summary(d.tensor, d.name)} for d in objective.data],
        "x0": tensor_summary(problem.x0, "x0"),
        "bounds": None,
        "options": _struct(problem.options),
        "device": problem.device or "cpu",
        "dtype": pb.DType.Name(problem.dtype).lower() if problem.dtype else "float64",
        "report_x_every": problem.report_x_every,
        "labels": dict(problem.labels),
        "batch": None,
    }
    if problem.HasField("bounds"):
        view["bounds"] = {"lower": tensor_summary(problem.bounds.lower, "lower"),
                          "upper": tensor_summary(problem.bounds.upper, "upper")}
    if problem.HasField("batch"):
        view["batch"] = {
            "size": problem.batch.size,
            "chunk_size": problem.batch.chunk_size,
            "member_data": [{"name": d.name, **tensor_summary(d.tensor, d.name)}
                            for d in problem.batch.member_data],
        }
    return view


def result_view(result: pb.Result) -> dict[str, Any]:
    view = {
        "fun": _number(result.fun),
        "nit": result.nit, "nfev": result.nfev, "njev": result.njev, "nhev": result.nhev,
        "status": pb.SolveStatus.Name(result.status),
        "success": result.success,
        "message": result.message,
        "solve_time": human_duration(result.solve_time_s),
        "wall_time": human_duration(result.wall_time_s),
        "x": tensor_summary(result.x, "x") if result.HasField("x") else None,
        "jac": tensor_summary(result.jac, "jac") if result.HasField("jac") else None,
        "batch": batch_view(result.batch) if result.HasField("batch") else None,
    }
    return view


def batch_view(batch: pb.BatchResult) -> dict[str, Any]:
    """Per-member outcomes as distributions: status counts, an iteration histogram and
    quantiles of the final values."""
    view: dict[str, Any] = {"converged": batch.converged, "statuses": [], "nit_bins": [],
                            "fun_quantiles": [], "members": 0}
    try:
        status = decode_tensor(batch.status, "status").astype(np.int64)
        nit = decode_tensor(batch.nit, "nit").astype(np.int64)
        fun = decode_tensor(batch.fun, "fun").astype(np.float64)
    except Exception:
        return view
    view["members"] = int(status.size)
    names, counts = np.unique(status, return_counts=True)
    total = max(1, int(status.size))
    view["statuses"] = [
        {"name": pb.SolveStatus.Name(int(v)) if int(v) in pb.SolveStatus.values() else str(v),
         "count": int(c), "share": 100.0 * int(c) / total}
        for v, c in sorted(zip(names, counts, strict=True), key=lambda p: -p[1])
    ]
    if nit.size:
        low, high = int(nit.min()), int(nit.max())
        width = max(1, math.ceil((high - low + 1) / NIT_BINS))
        edges = list(range(low, high + width + 1, width))
        hist, _ = np.histogram(nit, bins=edges)
        peak = max(1, int(hist.max()))
        view["nit_bins"] = [
            {"low": edges[i], "high": edges[i + 1] - 1, "count": int(h), "share": 100.0 * h / peak}
            for i, h in enumerate(hist)
        ]
        view["nit_summary"] = {"min": low, "median": float(np.median(nit)), "max": high}
    good = fun[np.isfinite(fun)]
    if good.size:
        view["fun_quantiles"] = [
            {"q": label, "value": _number(float(np.quantile(good, q)))}
            for label, q in (("min", 0.0), ("25%", 0.25), ("median", 0.5), ("75%", 0.75),
                             ("max", 1.0))
        ]
    view["non_finite"] = int(fun.size - good.size)
    return view


def train_result_view(result: pb.TrainResult) -> dict[str, Any]:
    return {
        "metrics": [{"name": k, "value": _number(v)} for k, v in sorted(result.metrics.items())],
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "restarts": result.restarts,
        "train_time": human_duration(result.train_time_s),
        "wall_time": human_duration(result.wall_time_s),
        "artifacts": list(result.artifacts),
    }


# -- events on the wire to the browser ---------------------------------------------------


def event_json(event: pb.JobEvent) -> dict[str, Any]:
    """A job event as the job page's script reads it: iterates and metrics as numbers only."""
    which = event.WhichOneof("kind")
    out: dict[str, Any] = {"seq": event.seq, "kind": which, "time": seconds(event.time)}
    if which == "iterate":
        it = event.iterate
        out.update(it=it.iteration, f=finite(it.f), g=finite(it.grad_norm),
                   step=finite(it.step_size), nfev=it.nfev, t=finite(it.elapsed_s))
        if it.HasField("batch"):
            b = it.batch
            out["batch"] = {
                "size": b.size, "active": b.active, "converged": b.converged, "failed": b.failed,
                "best_f": finite(b.best_f), "median_f": finite(b.median_f),
                "best_g": finite(b.best_grad_norm), "median_g": finite(b.median_grad_norm),
            }
    elif which == "metrics":
        out.update(step=event.metrics.step,
                   values={k: finite(v) for k, v in event.metrics.values.items()})
    elif which == "state_change":
        out.update(state=state_name(event.state_change.state), reason=event.state_change.reason)
    elif which == "accepted":
        out.update(state=state_name(event.accepted.state), method=event.accepted.method)
    elif which == "result":
        out.update(status=pb.SolveStatus.Name(event.result.status),
                   message=event.result.message, nit=event.result.nit)
    elif which == "failure":
        out.update(code=event.failure.code, message=event.failure.message)
    elif which == "train_result":
        out.update(steps=event.train_result.steps)
    return out
