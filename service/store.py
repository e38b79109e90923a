"""Durable job records and their event logs.

One interface (`JobStore`), two implementations: `SQLiteJobStore` (the default, a file) and
`InMemoryJobStore` (tests and throwaway servers). Both pass tests/unit/test_store.py's shared
contract suite. Records are the wire types (`pb.Job`, `pb.JobEvent`) serialized as blobs, with
the columns that ListJobs filters on kept alongside.

The store is synchronous and not thread-safe on its own: the JobManager drives it from one
dedicated thread, so the event loop never waits on an fsync.
"""

from __future__ import annotations

import abc
import sqlite3
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from secant.v1 import optimizer_pb2 as pb

TERMINAL_STATES = frozenset({pb.SUCCEEDED, pb.FAILED, pb.CANCELLED})


@dataclass(frozen=True)
class JobPage:
    jobs: list[pb.Job]
    next_page_token: str  # "" on the last page


@dataclass(frozen=True)
class NewJob:
    """A job to create: its first record, its problem (kept for later rescheduling) and the
    events it starts with (the `accepted` event), all committed together."""

    job: pb.Job
    problem: bytes = b""
    idempotency_key: str = ""
    first_events: Sequence[pb.JobEvent] = ()


class JobStore(abc.ABC):
    """Where jobs and their events live. Every write is committed before the call returns."""

    @abc.abstractmethod
    def create_jobs(self, new_jobs: Sequence[NewJob]) -> list[pb.Job]:
        """Creates the jobs in one transaction. A job whose idempotency key is already taken
        is not created; the existing job is returned in its place."""

    @abc.abstractmethod
    def get_job(self, job_id: str) -> pb.Job | None: ...

    @abc.abstractmethod
    def get_problem(self, job_id: str) -> bytes | None: ...

    @abc.abstractmethod
    def list_jobs(
        self,
        *,
        state: int = 0,
        method: str = "",
        batch_id: str = "",
        page_size: int = 100,
        page_token: str = "",
        owner: str | None = None,
    ) -> JobPage:
        """Newest first; filters are ANDed; empty/zero means any. `owner` None means any
        owner; a string (even "") only that owner's jobs."""

    @abc.abstractmethod
    def write(
        self,
        jobs: Iterable[pb.Job],
        events: Iterable[pb.JobEvent],
        checkpoints: Mapping[str, bytes] | None = None,
    ) -> None:
        """Replaces job records, appends events and replaces jobs' solver checkpoints in one
        transaction (the batched write path: many jobs' iterate events cost one commit). A job
        written in a terminal state loses its checkpoint."""

    def commit(
        self,
        new_jobs: Sequence[NewJob],
        jobs: Iterable[pb.Job],
        events: Iterable[pb.JobEvent],
        checkpoints: Mapping[str, bytes] | None = None,
    ) -> list[pb.Job]:
        """`create_jobs(new_jobs)` and `write(jobs, events, checkpoints)` in one transaction,
        durable as create_jobs is (a group commit: the gateway's submits and results of a
        moment share it). All or nothing. Returns what create_jobs returns."""
        created = self.create_jobs(new_jobs)  # stores that have no one transaction for both
        self.write(jobs, events, checkpoints)
        return created

    @abc.abstractmethod
    def checkpoint(self, job_id: str) -> bytes | None:
        """The job's latest solver checkpoint (safetensors bytes), if any."""

    @abc.abstractmethod
    def events(self, job_id: str, after_seq: int = 0) -> list[pb.JobEvent]:
        """The job's events with seq > after_seq, in order."""

    @abc.abstractmethod
    def unfinished_jobs(self) -> list[pb.Job]:
        """Jobs not in a terminal state (what a restarted gateway must settle)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


def _page_token(ordinal: int) -> str:
    return str(ordinal)


def _parse_page_token(token: str) -> int | None:
    if not token:
        return None
    try:
        value = int(token)
    except ValueError:
        raise ValueError(f"page_token: {token!r} is not a token this server issued") from None
    if value < 0:
        raise ValueError(f"page_token: {token!r} is not a token this server issued")
    return value


def _clamp_page_size(page_size: int) -> int:
    if page_size < 0:
        raise ValueError(f"page_size: must be >= 0, got {page_size}")
    return min(page_size or 100, 1000)


class InMemoryJobStore(JobStore):
    """Everything in dicts; lost on exit. For tests and throwaway servers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, pb.Job] = {}
        self._ordinal: dict[str, int] = {}
        self._problems: dict[str, bytes] = {}
        self._keys: dict[str, str] = {}
        self._events: dict[str, list[pb.JobEvent]] = {}
        self._checkpoints: dict[str, bytes] = {}
        self._next_ordinal = 1

    def create_jobs(self, new_jobs: Sequence[NewJob]) -> list[pb.Job]:
        with self._lock:
            return self._create_jobs(new_jobs)

    def _create_jobs(self, new_jobs: Sequence[NewJob]) -> list[pb.Job]:
        created = []
        for new in new_jobs:
            if new.idempotency_key and new.idempotency_key in self._keys:
                created.append(_copy(self._jobs[self._keys[new.idempotency_key]]))
                continue
            job_id = new.job.job_id
            if job_id in self._jobs:
                raise ValueError(f"job_id: {job_id} already exists")
            self._jobs[job_id] = _copy(new.job)
            self._ordinal[job_id] = self._next_ordinal
            self._next_ordinal += 1
            self._problems[job_id] = new.problem
            if new.idempotency_key:
                self._keys[new.idempotency_key] = job_id
            self._events[job_id] = [_copy(e) for e in new.first_events]
            created.append(_copy(new.job))
        return created

    def commit(self, new_jobs, jobs, events, checkpoints=None):
        with self._lock:
            saved = (dict(self._jobs), dict(self._ordinal), dict(self._problems),
                     dict(self._keys), {k: list(v) for k, v in self._events.items()},
                     dict(self._checkpoints), self._next_ordinal)
            try:
                created = self._create_jobs(new_jobs)
                self._write(list(jobs), list(events), checkpoints)
            except BaseException:
                (self._jobs, self._ordinal, self._problems, self._keys, self._events,
                 self._checkpoints, self._next_ordinal) = saved
                raise
            return created

    def get_job(self, job_id: str) -> pb.Job | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return _copy(job) if job is not None else None

    def get_problem(self, job_id: str) -> bytes | None:
        with self._lock:
            return self._problems.get(job_id)

    def list_jobs(
        self, *, state=0, method="", batch_id="", page_size=100, page_token="", owner=None
    ):
        size = _clamp_page_size(page_size)
        before = _parse_page_token(page_token)
        with self._lock:
            ordered = sorted(self._jobs, key=self._ordinal.__getitem__, reverse=True)
            matches = [
                job_id
                for job_id in ordered
                if (before is None or self._ordinal[job_id] < before)
                and (not state or self._jobs[job_id].state == state)
                and (not method or self._jobs[job_id].method == method)
                and (not batch_id or self._jobs[job_id].batch_id == batch_id)
                and (owner is None or self._jobs[job_id].owner == owner)
            ]
            page = matches[:size]
            token = _page_token(self._ordinal[page[-1]]) if len(matches) > size else ""
            return JobPage([_copy(self._jobs[j]) for j in page], token)

    def write(self, jobs, events, checkpoints=None):
        jobs, events = list(jobs), list(events)
        with self._lock:
            self._write(jobs, events, checkpoints)

    def _write(self, jobs, events, checkpoints=None):
        # Check everything before changing anything, so a bad write changes nothing.
        for job in jobs:
            if job.job_id not in self._jobs:
                raise KeyError(job.job_id)
        last_seq = {}
        for event in events:
            log = self._events.get(event.job_id)
            if log is None:
                raise KeyError(event.job_id)
            previous = last_seq.get(event.job_id, log[-1].seq if log else 0)
            if event.seq <= previous:
                raise ValueError(f"event {event.job_id}#{event.seq}: seq already stored")
            last_seq[event.job_id] = event.seq
        for job in jobs:
            self._jobs[job.job_id] = _copy(job)
        for event in events:
            self._events[event.job_id].append(_copy(event))
        self._checkpoints.update(checkpoints or {})
        for job in jobs:
            if job.state in TERMINAL_STATES:
                self._checkpoints.pop(job.job_id, None)

    def checkpoint(self, job_id):
        with self._lock:
            return self._checkpoints.get(job_id)

    def events(self, job_id, after_seq=0):
        with self._lock:
            return [_copy(e) for e in self._events.get(job_id, []) if e.seq > after_seq]

    def unfinished_jobs(self):
        with self._lock:
            return [_copy(j) for j in self._jobs.values() if j.state not in TERMINAL_STATES]


def _copy(message):
    clone = type(message)()
    clone.CopyFrom(message)
    return clone


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    ordinal INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL UNIQUE,
    state INTEGER NOT NULL,
    method TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    record BLOB NOT NULL,
    problem BLOB NOT NULL,
    owner TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, ordinal);
CREATE INDEX IF NOT EXISTS jobs_batch ON jobs (batch_id, ordinal);
CREATE TABLE IF NOT EXISTS checkpoints (
    job_id TEXT PRIMARY KEY,
    state BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
"""


class SQLiteJobStore(JobStore):
    """A SQLite file in WAL mode.

    Creating jobs is fsynced (synchronous=FULL): a job id handed to a caller survives a power
    cut. Event and state writes (`write`) commit with synchronous=NORMAL: in WAL mode they
    survive the gateway process dying, and reach the disk at the next checkpoint; that spares
    the fsync (about 1.5 ms here) on every result. They also arrive in batches, so hundreds of
    concurrent solves cost a few commits a second."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # The JobManager calls from one dedicated thread, but tests and tools may open/close the
        # store from another; the lock keeps each call atomic either way.
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "owner" not in columns:  # a store written before jobs had owners: theirs is ""
            self._db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT ''")
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, ordinal)")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def create_jobs(self, new_jobs):
        with self._lock, _transaction(self._db, durable=True):
            return self._create_jobs(new_jobs)

    def commit(self, new_jobs, jobs, events, checkpoints=None):
        new_jobs, jobs, events = list(new_jobs), list(jobs), list(events)
        with self._lock, _transaction(self._db, durable=bool(new_jobs)):
            created = self._create_jobs(new_jobs)
            self._write(jobs, events, checkpoints)
        return created

    def _create_jobs(self, new_jobs):
        created = []
        for new in new_jobs:
            if new.idempotency_key:
                row = self._db.execute(
                    "SELECT record FROM jobs WHERE idempotency_key = ?",
                    (new.idempotency_key,),
                ).fetchone()
                if row is not None:
                    created.append(pb.Job.FromString(row[0]))
                    continue
            try:
                self._db.execute(
                    "INSERT INTO jobs (job_id, state, method, batch_id, idempotency_key,"
                    " record, problem, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        new.job.job_id,
                        new.job.state,
                        new.job.method,
                        new.job.batch_id,
                        new.idempotency_key or None,
                        new.job.SerializeToString(),
                        new.problem,
                        new.job.owner,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise ValueError(f"job_id: {new.job.job_id} already exists") from exc
            self._insert_events(new.first_events)
            created.append(_copy(new.job))
        return created

    def get_job(self, job_id):
        with self._lock:
            row = self._db.execute("SELECT record FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return pb.Job.FromString(row[0]) if row else None

    def get_problem(self, job_id):
        with self._lock:
            row = self._db.execute(
                "SELECT problem FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
        return bytes(row[0]) if row else None

    def list_jobs(
        self, *, state=0, method="", batch_id="", page_size=100, page_token="", owner=None
    ):
        size = _clamp_page_size(page_size)
        before = _parse_page_token(page_token)
        clauses, params = [], []
        for column, value in (("state", state), ("method", method), ("batch_id", batch_id)):
            if value:
                clauses.append(f"{column} = ?")
                params.append(value)
        if owner is not None:
            clauses.append("owner = ?")
            params.append(owner)
        if before is not None:
            clauses.append("ordinal < ?")
            params.append(before)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._lock:
            rows = self._db.execute(
                f"SELECT ordinal, record FROM jobs {where} ORDER BY ordinal DESC LIMIT ?",
                (*params, size + 1),
            ).fetchall()
        page = rows[:size]
        token = _page_token(page[-1][0]) if len(rows) > size else ""
        return JobPage([pb.Job.FromString(r[1]) for r in page], token)

    def write(self, jobs, events, checkpoints=None):
        jobs, events = list(jobs), list(events)
        if not jobs and not events and not checkpoints:
            return
        with self._lock, _transaction(self._db):
            self._write(jobs, events, checkpoints)

    def _write(self, jobs, events, checkpoints=None):
        for job in jobs:
            cursor = self._db.execute(
                "UPDATE jobs SET state = ?, record = ? WHERE job_id = ?",
                (job.state, job.SerializeToString(), job.job_id),
            )
            if cursor.rowcount == 0:
                raise KeyError(job.job_id)
        self._insert_events(events)
        if checkpoints:
            self._db.executemany(
                "INSERT OR REPLACE INTO checkpoints (job_id, state) VALUES (?, ?)",
                list(checkpoints.items()),
            )
        finished = [(job.job_id,) for job in jobs if job.state in TERMINAL_STATES]
        if finished:
            self._db.executemany("DELETE FROM checkpoints WHERE job_id = ?", finished)

    def checkpoint(self, job_id):
        with self._lock:
            row = self._db.execute(
                "SELECT state FROM checkpoints WHERE job_id = ?", (job_id,)
            ).fetchone()
        return bytes(row[0]) if row else None

    def _insert_events(self, events):
        try:
            self._db.executemany(
                "INSERT INTO events (job_id, seq, record) VALUES (?, ?, ?)",
                [(e.job_id, e.seq, e.SerializeToString()) for e in events],
            )
        except sqlite3.IntegrityError as exc:
            raise ValueError(f"events: a seq is already stored ({exc})") from exc

    def events(self, job_id, after_seq=0):
        with self._lock:
            rows = self._db.execute(
                "SELECT record FROM events WHERE job_id = ? AND seq > ? ORDER BY seq",
                (job_id, after_seq),
            ).fetchall()
        return [pb.JobEvent.FromString(r[0]) for r in rows]

    def unfinished_jobs(self):
        terminal = tuple(TERMINAL_STATES)
        with self._lock:
            rows = self._db.execute(
                "SELECT record FROM jobs WHERE state NOT IN (?, ?, ?) ORDER BY ordinal", terminal
            ).fetchall()
        return [pb.Job.FromString(r[0]) for r in rows]


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (autocommit connection).
    durable=True fsyncs the commit (synchronous=FULL) before returning."""

    def __init__(self, db: sqlite3.Connection, *, durable: bool = False) -> None:
        self._db = db
        self._durable = durable

    def __enter__(self):
        if self._durable:
            self._db.execute("PRAGMA synchronous=FULL")  # only outside a transaction
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, exc_type, exc, tb):
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            if self._durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
        return False


def open_store(url: str) -> JobStore:
    """`:memory:`-like "memory" gives an InMemoryJobStore; anything else is a SQLite path."""
    if url in ("memory", "memory://"):
        return InMemoryJobStore()
    return SQLiteJobStore(url)
