"""The JobStore contract, run against every implementation (Flower's StateTest pattern)."""

from __future__ import annotations

import pytest

from secant.v1 import optimizer_pb2 as pb
from service.store import InMemoryJobStore, NewJob, SQLiteJobStore


def _job(job_id: str, *, state=pb.QUEUED, method="bfgs", batch_id="") -> pb.Job:
    return pb.Job(job_id=job_id, state=state, method=method, n=2, batch_id=batch_id, kind="solve")


def _event(job_id: str, seq: int, iteration: int = 0) -> pb.JobEvent:
    return pb.JobEvent(job_id=job_id, seq=seq, iterate=pb.Iterate(iteration=iteration, f=1.0))


class StoreContract:
    """Every JobStore must pass these; subclasses say how to open one."""

    def open(self, tmp_path):
        raise NotImplementedError

    @pytest.fixture
    def store(self, tmp_path):
        store = self.open(tmp_path)
        yield store
        store.close()

    def test_created_job_reads_back_with_its_first_events(self, store):
        accepted = pb.JobEvent(job_id="a", seq=1, accepted=pb.Accepted(state=pb.QUEUED, n=2))
        store.create_jobs([NewJob(_job("a"), b"problem", first_events=[accepted])])

        assert store.get_job("a") == _job("a")
        assert store.get_problem("a") == b"problem"
        assert store.events("a") == [accepted]

    def test_missing_job_is_none(self, store):
        assert store.get_job("nope") is None
        assert store.events("nope") == []

    def test_duplicate_job_id_is_rejected(self, store):
        store.create_jobs([NewJob(_job("a"))])
        with pytest.raises(ValueError, match="already exists"):
            store.create_jobs([NewJob(_job("a"))])

    def test_idempotency_key_returns_the_first_job(self, store):
        first = store.create_jobs([NewJob(_job("a"), idempotency_key="k")])
        again = store.create_jobs([NewJob(_job("b"), idempotency_key="k")])

        assert [j.job_id for j in first] == ["a"]
        assert [j.job_id for j in again] == ["a"]
        assert store.get_job("b") is None

    def test_write_replaces_jobs_and_appends_events_in_order(self, store):
        store.create_jobs([NewJob(_job("a")), NewJob(_job("b"))])
        store.write([], [_event("a", 1), _event("b", 1)])
        done = _job("a", state=pb.SUCCEEDED)
        done.last_seq = 3
        store.write([done], [_event("a", 2, 1), _event("a", 3, 2)])

        assert store.get_job("a") == done
        assert [e.seq for e in store.events("a")] == [1, 2, 3]
        assert [e.seq for e in store.events("a", after_seq=1)] == [2, 3]
        assert [e.seq for e in store.events("b")] == [1]

    def test_duplicate_event_seq_fails_the_whole_write(self, store):
        store.create_jobs([NewJob(_job("a"))])
        store.write([], [_event("a", 1)])
        with pytest.raises(ValueError, match="seq"):
            store.write([_job("a", state=pb.RUNNING)], [_event("a", 2), _event("a", 1)])

        assert store.get_job("a").state == pb.QUEUED
        assert [e.seq for e in store.events("a")] == [1]

    def test_commit_creates_and_writes_in_one_go(self, store):
        store.create_jobs([NewJob(_job("a"))])
        done = _job("a", state=pb.SUCCEEDED)
        done.last_seq = 2
        accepted = pb.JobEvent(job_id="b", seq=1, accepted=pb.Accepted(state=pb.QUEUED, n=2))
        created = store.commit([NewJob(_job("b"), b"p", "key", [accepted])], [done],
                               [_event("a", 1), _event("a", 2, 1)], {"a": b"state"})

        assert [j.job_id for j in created] == ["b"]
        assert store.get_job("a") == done and store.get_job("b") == _job("b")
        assert store.events("b") == [accepted]
        assert [e.seq for e in store.events("a")] == [1, 2]
        assert store.checkpoint("a") is None  # a job written as ended loses its checkpoint
        again = store.commit([NewJob(_job("c"), idempotency_key="key")], [], [])
        assert [j.job_id for j in again] == ["b"] and store.get_job("c") is None

    def test_a_commit_that_fails_changes_nothing(self, store):
        store.create_jobs([NewJob(_job("a"))])
        store.write([], [_event("a", 1)])
        with pytest.raises(ValueError, match="seq"):
            store.commit([NewJob(_job("b"))], [_job("a", state=pb.RUNNING)], [_event("a", 1)])

        assert store.get_job("b") is None
        assert store.get_job("a").state == pb.QUEUED
        assert [e.seq for e in store.events("a")] == [1]
        assert [j.job_id for j in store.create_jobs([NewJob(_job("b"))])] == ["b"]

    def test_list_filters_by_state_method_and_batch(self, store):
        store.create_jobs(
            [
                NewJob(_job("a", method="bfgs", batch_id="b1")),
                NewJob(_job("b", method="lm", batch_id="b1", state=pb.SUCCEEDED)),
                NewJob(_job("c", method="bfgs", state=pb.SUCCEEDED)),
            ]
        )

        def ids(**filters):
            return [j.job_id for j in store.list_jobs(**filters).jobs]

        assert ids() == ["c", "b", "a"]
        assert ids(state=pb.SUCCEEDED) == ["c", "b"]
        assert ids(method="bfgs") == ["c", "a"]
        assert ids(batch_id="b1") == ["b", "a"]
        assert ids(batch_id="b1", state=pb.SUCCEEDED) == ["b"]

    def test_list_pages_through_every_job_once(self, store):
        store.create_jobs([NewJob(_job(f"j{i:02d}")) for i in range(25)])
        seen, token, pages = [], "", 0
        while True:
            page = store.list_jobs(page_size=10, page_token=token)
            seen += [j.job_id for j in page.jobs]
            pages += 1
            token = page.next_page_token
            if not token:
                break

        assert pages == 3
        assert seen == [f"j{i:02d}" for i in reversed(range(25))]

    def test_bad_page_token_and_size_are_value_errors(self, store):
        with pytest.raises(ValueError, match="page_token"):
            store.list_jobs(page_token="not-a-token")
        with pytest.raises(ValueError, match="page_size"):
            store.list_jobs(page_size=-1)

    def test_unfinished_jobs_are_the_non_terminal_ones(self, store):
        store.create_jobs(
            [
                NewJob(_job("q")),
                NewJob(_job("r", state=pb.RUNNING)),
                NewJob(_job("s", state=pb.SUCCEEDED)),
                NewJob(_job("c", state=pb.CANCELLED)),
            ]
        )
        assert sorted(j.job_id for j in store.unfinished_jobs()) == ["q", "r"]


class TestInMemoryStore(StoreContract):
    def open(self, tmp_path):
        return InMemoryJobStore()


class TestSQLiteStore(StoreContract):
    def open(self, tmp_path):
        return SQLiteJobStore(tmp_path / "secant.db")

    def test_jobs_and_events_survive_reopening_the_file(self, tmp_path):
        path = tmp_path / "secant.db"
        store = SQLiteJobStore(path)
        store.create_jobs([NewJob(_job("a"), b"p")])
        store.write([_job("a", state=pb.SUCCEEDED)], [_event("a", 1)])
        store.close()

        reopened = SQLiteJobStore(path)
        assert reopened.get_job("a").state == pb.SUCCEEDED
        assert [e.seq for e in reopened.events("a")] == [1]
        reopened.close()

    def test_the_file_is_in_wal_mode(self, tmp_path):
        store = SQLiteJobStore(tmp_path / "secant.db")
        mode = store._db.execute("PRAGMA journal_mode").fetchone()[0]
        store.close()
        assert mode == "wal"
