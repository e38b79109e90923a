"""Vectorized batch jobs in the gateway: chunk plans, the job's one checkpoint blob, and the
conversion of chunks' progress and results into the wire's Iterate and Result.

service.jobs runs a batch job as one job whose members are split into contiguous chunks, one
worker each (a GPU job is one chunk, whole); this module is the pure part of that: it never
awaits and knows nothing of Ray.

The checkpoint blob of a batch job is safetensors (no pickle): one uint8 tensor per chunk
holding that chunk's BatchState bytes, and in the metadata the whole chunk plan
([start, stop, iteration or -1 without a state] per chunk), so a gateway that resumes the job
after a restart rebuilds the same chunks, each from its own state.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from secant.v1 import optimizer_pb2 as pb
from service.validation import SOLVE_STATUS, BatchSolveSpec, Limits, encode_tensor
from workers.batch_runner import BatchProgressEvent, BatchResultEvent
from workers.solvers import Status
from workers.solvers.batched import batch_state_from_bytes

_FORMAT = "secant.batch-checkpoint.v1"
_CONVERGED = int(Status.CONVERGED)
_CANCELLED = int(Status.CANCELLED)
# workers.solvers.Status value -> pb.SolveStatus value, one array lookup for B members.
_PB_STATUS = np.array([SOLVE_STATUS[s.name] for s in sorted(Status)], dtype=np.int32)


@dataclass(eq=False)
class Chunk:
    """Members [start, stop) of a batch job, run by one worker at a time."""

    start: int
    stop: int
    checkpoint: bytes | None = None  # this chunk's BatchState bytes
    checkpoint_nit: int = 0
    progress: BatchProgressEvent | None = None  # the newest from its worker
    result: BatchResultEvent | None = None
    worker: object | None = None  # while leased
    task: object | None = None  # its asyncio task, while it runs

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(eq=False)
class BatchRun:
    """What a live batch job keeps besides the _LiveJob: its chunks."""

    chunks: list[Chunk]
    emitted_at: float = -math.inf  # monotonic time of the last merged iterate
    held: bool = False  # a merged iterate is waiting out the throttle
    scheduled: bool = False  # its chunks' tasks were created
    stopping: bool = False  # a chunk failed: the others are being stopped

    def run_id(self, job_id: str, chunk: Chunk) -> str:
        """The id a chunk's worker knows it by (its cancel key)."""
        return job_id if len(self.chunks) == 1 else f"{job_id}:{chunk.start}"


def plan_chunks(spec: BatchSolveSpec, limits: Limits, workers: int) -> list[tuple[int, int]]:
    """Contiguous member ranges, one per worker-sized piece.

    GPU: one chunk (a GPU runs the whole batch in the same ops). CPU: the caller's
    chunk_size, else the server's batch_chunk_size, else ceil(B / workers) but at least
    min_batch_chunk members; the members are then spread evenly over that many chunks.
    """
    members = spec.members
    if spec.device == "cuda":
        return [(0, members)]
    size = spec.chunk_size or limits.batch_chunk_size
    if not size:
        size = max(limits.min_batch_chunk, -(-members // max(1, workers)))
    count = min(-(-members // size), limits.max_batch_chunks)
    bounds = [index * members // count for index in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def new_run(spec: BatchSolveSpec, limits: Limits, workers: int,
            checkpoint: bytes | None = None) -> BatchRun:
    """The chunks of a job: from its checkpoint blob when it has one (a resumed job keeps
    its plan, whatever the pool's size is now), else planned afresh."""
    if checkpoint:
        chunks = unpack_checkpoint(checkpoint)
        if chunks and chunks[0].start == 0 and chunks[-1].stop == spec.members and all(
            a.stop == b.start for a, b in zip(chunks, chunks[1:], strict=False)
        ):
            return BatchRun(chunks)
    return BatchRun([Chunk(start, stop) for start, stop in plan_chunks(spec, limits, workers)])


# -- the checkpoint blob ---------------------------------------------------------------------


def pack_checkpoint(run: BatchRun) -> bytes:
    tensors = {
        f"chunk.{chunk.start}": np.frombuffer(chunk.checkpoint, dtype=np.uint8)
        for chunk in run.chunks
        if chunk.checkpoint
    }
    plan = [[c.start, c.stop, c.checkpoint_nit if c.checkpoint else -1] for c in run.chunks]
    return st_save(tensors, metadata={"format": _FORMAT, "chunks": json.dumps(plan)})


def is_batch_checkpoint(blob: bytes) -> bool:
    try:
        header_len = int.from_bytes(blob[:8], "little")
        meta = json.loads(blob[8 : 8 + header_len]).get("__metadata__") or {}
    except (ValueError, TypeError, AttributeError):
        return False
    return meta.get("format") == _FORMAT


def unpack_checkpoint(blob: bytes) -> list[Chunk]:
    """The chunks a blob describes, each with its state; ValueError for anything else."""
    if not is_batch_checkpoint(blob):
        raise ValueError("not a batch job checkpoint")
    try:
        header_len = int.from_bytes(blob[:8], "little")
        meta = json.loads(blob[8 : 8 + header_len])["__metadata__"]
        tensors = st_load(bytes(blob))
        chunks = []
        for start, stop, nit in json.loads(meta["chunks"]):
            state = tensors.get(f"chunk.{start}")
            chunks.append(Chunk(
                int(start), int(stop),
                checkpoint=state.tobytes() if state is not None else None,
                checkpoint_nit=max(0, int(nit)),
            ))
    except Exception as exc:  # safetensors' own errors, JSON, a malformed plan
        raise ValueError(f"not a readable batch job checkpoint: {exc}") from exc
    return chunks


def checkpoint_iteration(run: BatchRun) -> int:
    """The engine iteration every chunk has reached in the checkpoint (the least)."""
    return min((c.checkpoint_nit if c.checkpoint else 0) for c in run.chunks)


def resume_summary(run: BatchRun) -> str:
    saved = [c.checkpoint_nit for c in run.chunks if c.checkpoint]
    if len(run.chunks) == 1:
        return f"resuming from iteration {saved[0]}" if saved else "starting again from x0"
    text = (f"resuming {len(saved)} of {len(run.chunks)} chunks from their checkpoints"
            f" (iterations {min(saved)} to {max(saved)})" if saved else "")
    if len(saved) < len(run.chunks):
        text += ", the others from x0" if saved else "starting every chunk again from x0"
    return text


# -- progress ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    size: int
    active: int
    converged: int
    failed: int
    best_grad_norm: float
    median_grad_norm: float
    best_f: float
    median_f: float
    iteration: int
    elapsed_s: float


def _part(chunk: Chunk) -> _Part:
    p = chunk.progress
    if chunk.result is not None:  # exact counts; quantiles of f over all its members
        r = chunk.result
        converged = int(np.count_nonzero(r.status == _CONVERGED))
        finite = r.fun[np.isfinite(r.fun)]
        return _Part(
            chunk.size, 0, converged, chunk.size - converged,
            p.best_grad_norm if p else math.nan, p.median_grad_norm if p else math.nan,
            float(finite.min()) if finite.size else math.nan,
            float(np.median(finite)) if finite.size else math.nan,
            p.iteration if p else int(r.nit.max(initial=0)), p.elapsed_s if p else r.solve_time_s,
        )
    if p is None:  # not started yet: every member still to do
        return _Part(chunk.size, chunk.size, 0, 0, math.nan, math.nan, math.nan, math.nan, 0, 0.0)
    return _Part(p.size, p.active, p.converged, p.failed, p.best_grad_norm, p.median_grad_norm,
                 p.best_f, p.median_f, p.iteration, p.elapsed_s)


def _nanmin(values) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return min(finite) if finite else math.nan


def _weighted_median(pairs: list[tuple[float, int]]) -> float:
    """The members-weighted median of the chunks' medians: the chunks' own medians are all
    the gateway has (never B numbers), and this is exact for one chunk and within the
    chunks' medians' spread for several, which a progress bar needs."""
    pairs = sorted((v, w) for v, w in pairs if w > 0 and not math.isnan(v))
    total = sum(w for _, w in pairs)
    seen = 0
    for value, weight in pairs:
        seen += weight
        if 2 * seen >= total:
            return value
    return math.nan


def merged_iterate(run: BatchRun) -> pb.Iterate:
    """The job's progress over every chunk: counts summed, best = min, medians weighted by
    members (the active ones while any is active, as the engine's medians are), iteration =
    the furthest chunk's engine iteration."""
    parts = [_part(chunk) for chunk in run.chunks]
    any_active = any(p.active for p in parts)

    def weight(p: _Part) -> int:
        return p.active if any_active else p.size

    progress = pb.BatchProgress(
        size=sum(p.size for p in parts),
        active=sum(p.active for p in parts),
        converged=sum(p.converged for p in parts),
        failed=sum(p.failed for p in parts),
        best_grad_norm=_nanmin(p.best_grad_norm for p in parts),
        median_grad_norm=_weighted_median([(p.median_grad_norm, weight(p)) for p in parts]),
        best_f=_nanmin(p.best_f for p in parts),
        median_f=_weighted_median([(p.median_f, weight(p)) for p in parts]),
    )
    return pb.Iterate(
        iteration=max(p.iteration for p in parts),
        f=progress.median_f,
        grad_norm=progress.median_grad_norm,
        elapsed_s=max(p.elapsed_s for p in parts),
        batch=progress,
    )


# -- results -----------------------------------------------------------------------------------


def unstarted_result(spec: BatchSolveSpec, chunk: Chunk) -> BatchResultEvent:
    """A chunk cancelled before any worker finished it: its last checkpoint's iterates if it
    has one (finished members keep their outcome), else its x0 rows, unevaluated (fun and jac
    NaN); every member still running ends CANCELLED."""
    if chunk.checkpoint:
        try:
            return _result_from_state(chunk.checkpoint)
        except ValueError:
            pass
    x = spec.x0[chunk.start : chunk.stop].copy()
    zeros = np.zeros(chunk.size, dtype=np.int64)
    return BatchResultEvent(
        x=x, fun=np.full(chunk.size, np.nan, dtype=x.dtype), jac=np.full_like(x, np.nan),
        status=np.full(chunk.size, _CANCELLED, dtype=np.int64), nit=zeros, nfev=zeros.copy(),
        njev=zeros.copy(), nhev=zeros.copy(), solve_time_s=0.0,
    )


def _result_from_state(blob: bytes) -> BatchResultEvent:
    state = batch_state_from_bytes(blob)
    x, f, g = state.out_x.clone(), state.out_f.clone(), state.out_g.clone()
    status, counts = state.out_status.clone(), state.out_counts.clone()
    # The working rows (whether or not already copied out) hold the newest values; those
    # still iterating end CANCELLED at their last accepted iterate.
    ids = state.index
    x[ids], f[ids], g[ids] = state.x, state.f, state.g
    status[ids] = torch.where(state.status < 0, torch.full_like(state.status, _CANCELLED),
                              state.status)
    counts[ids] = torch.stack((state.nit, state.nfev, state.njev, state.nhev), 1)
    c = counts.numpy()
    return BatchResultEvent(
        x=x.numpy(), fun=f.numpy(), jac=g.numpy(), status=status.numpy().astype(np.int64),
        nit=c[:, 0].copy(), nfev=c[:, 1].copy(), njev=c[:, 2].copy(), nhev=c[:, 3].copy(),
        solve_time_s=float(state.elapsed_s),
    )


def _int_tensor(values: np.ndarray, dtype) -> pb.Tensor:
    return encode_tensor(np.ascontiguousarray(values, dtype=dtype))


def batch_result(run: BatchRun) -> pb.Result:
    """Every chunk's result as one: x and jac (B, n); fun the lowest member value; status
    CONVERGED when every member converged, else the most common other status; per-member
    values in Result.batch."""
    results = [chunk.result for chunk in run.chunks]
    assert all(r is not None for r in results), "every chunk needs its result first"
    x = np.concatenate([r.x for r in results])
    jac = np.concatenate([r.jac for r in results])
    fun = np.concatenate([r.fun for r in results])
    status = np.concatenate([r.status for r in results])
    nit, nfev, njev, nhev = (
        np.concatenate([getattr(r, name) for r in results])
        for name in ("nit", "nfev", "njev", "nhev")
    )
    known = (status >= 0) & (status < len(_PB_STATUS))
    wire_status = np.where(known, _PB_STATUS[np.clip(status, 0, len(_PB_STATUS) - 1)],
                           pb.SOLVE_STATUS_UNSPECIFIED).astype(np.int32)
    members = int(status.size)
    converged = int(np.count_nonzero(wire_status == pb.CONVERGED))
    others = Counter(int(s) for s in wire_status[wire_status != pb.CONVERGED])
    # most_common keeps first-seen order among equal counts: the lowest member id decides.
    overall = pb.CONVERGED if not others else others.most_common(1)[0][0]
    message = f"{converged:,} of {members:,} members converged"
    if others:
        message += "; " + ", ".join(
            f"{count:,} {pb.SolveStatus.Name(value)}" for value, count in others.most_common()
        )
    finite = fun[np.isfinite(fun)]
    return pb.Result(
        x=encode_tensor(x),
        fun=float(finite.min()) if finite.size else math.nan,
        jac=encode_tensor(jac),
        nit=int(nit.max(initial=0)),
        nfev=int(nfev.sum()),
        njev=int(njev.sum()),
        nhev=int(nhev.sum()),
        status=overall,
        success=converged == members,
        message=message,
        # Chunks run side by side: the batch took as long as its slowest chunk.
        solve_time_s=max(r.solve_time_s for r in results),
        batch=pb.BatchResult(
            fun=encode_tensor(fun),
            status=_int_tensor(wire_status, np.int32),
            nit=_int_tensor(nit, np.int64),
            nfev=_int_tensor(nfev, np.int64),
            njev=_int_tensor(njev, np.int64),
            nhev=_int_tensor(nhev, np.int64),
            converged=converged,
        ),
    )


def final_state(result: pb.Result, cancel_requested: bool) -> int:
    """SUCCEEDED when every member converged; CANCELLED when the caller cancelled (or a member
    says so); otherwise FAILED, with the result attached."""
    if result.success:
        return pb.SUCCEEDED
    if cancel_requested or _member_count(result, pb.CANCELLED_BY_USER):
        return pb.CANCELLED
    return pb.FAILED


def _member_count(result: pb.Result, status: int) -> int:
    values = np.frombuffer(result.batch.status.data, dtype="<i4")
    return int(np.count_nonzero(values == status))


def member_counts(result: pb.Result) -> dict[str, int]:
    """Members per final status (lower-case SolveStatus names), for the metrics."""
    values, counts = np.unique(np.frombuffer(result.batch.status.data, dtype="<i4"),
                               return_counts=True)
    return {pb.SolveStatus.Name(int(v)).lower(): int(c) for v, c in zip(values, counts,
                                                                          strict=True)}
