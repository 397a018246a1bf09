"""The outbox table: what is pending, oldest first, settling, rejected items, restarts.
Run against SQLite and PostgreSQL (the probe may use either)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from probe.outbox import backlog, rejected_counts
from probe.outbox.queue import next_batch, rejection_mark, requeue_rejected, settle
from probe.store import Store
from schema import tables
from tests.outbox.conftest import measurements, outbox_rows, write

PID = "00000000-0000-4000-8000-0000000000aa"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'p.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store.open(db_url)
    yield s
    s.close()


def _same(got: list[str], want: list[str], store: Store) -> bool:
    """In queue order on SQLite (rowid: exact insertion order); elsewhere measurements
    queued in one transaction share ``queued_at`` and come in any order among them."""
    return got == want if store.engine.dialect.name == "sqlite" else sorted(got) == sorted(want)


def test_every_stored_measurement_is_queued_oldest_first(store: Store) -> None:
    first = write(store, measurements(PID, 30), chunk=30)
    second = write(store, measurements(PID, 20), chunk=20)
    assert backlog(store) == 50
    batch = next_batch(store, 10)
    assert set(batch) <= set(first)  # the older transaction first
    if store.engine.dialect.name == "sqlite":
        assert batch == first[:10]
    settle(store, acknowledged=batch)
    assert _same(next_batch(store, 20), [u for u in first if u not in batch], store)
    settle(store, acknowledged=first)
    assert _same(next_batch(store, 100), second, store)


def test_settle_deletes_only_what_was_acknowledged(store: Store) -> None:
    uids = write(store, measurements(PID, 6))
    settle(
        store,
        acknowledged=uids[:2],
        rejected={uids[2]: "test_keys.queries[0]: bad"},
        unanswered=uids[3:4],
    )
    rows = outbox_rows(store)
    assert set(rows) == set(uids[2:])
    assert rows[uids[2]]["last_error"] == rejection_mark("test_keys.queries[0]: bad")
    assert rows[uids[2]]["attempts"] == 1 and rows[uids[3]]["attempts"] == 1
    assert rows[uids[4]]["attempts"] == 0 and rows[uids[3]]["last_error"] is None
    # The measurements themselves stay (retention decides), only the queue entry goes.
    assert store.count(tables.measurements) == 6
    # A rejected item is not pending: not in the backlog, not in a batch, but counted.
    assert backlog(store) == 3
    assert uids[2] not in next_batch(store, 100)
    assert rejected_counts(store) == {rejection_mark("test_keys.queries[0]: bad"): 1}


def test_rejected_items_come_back_when_the_software_changes(store: Store) -> None:
    uids = write(store, measurements(PID, 3))
    settle(store, rejected={uids[0]: "old schema", uids[1]: "old schema"})
    assert requeue_rejected(store) == 0  # same version: stay rejected
    assert requeue_rejected(store, version="99.0") == 2  # another version: pending again
    assert backlog(store) == 3 and rejected_counts(store) == {}
    settle(store, rejected={uids[2]: "x"})
    assert requeue_rejected(store, every=True) == 1 and backlog(store) == 3


def test_rejected_counts_by_reason_most_common_first(store: Store) -> None:
    uids = write(store, measurements(PID, 5))
    settle(store, rejected={uids[0]: "a", uids[1]: "b", uids[2]: "b"})
    assert list(rejected_counts(store).values()) == [2, 1]
    assert rejected_counts(store, limit=1) == {rejection_mark("b"): 2}


def test_documents_of_a_batch_are_the_stored_wire_documents(store: Store) -> None:
    ms = measurements(PID, 4)
    uids = write(store, ms)
    by_uid = {d["measurement_uid"]: d for d in store.iter_documents()}
    docs = store.documents([uids[2], "not-stored", uids[0]])
    assert [d["measurement_uid"] for d in docs] == [uids[2], uids[0]]
    assert docs == [by_uid[uids[2]], by_uid[uids[0]]]
    assert docs[0]["probe_id"] == PID


def test_the_outbox_survives_a_restart(db_url: str) -> None:
    s = Store.open(db_url)
    uids = write(s, measurements(PID, 7))
    settle(s, acknowledged=uids[:2], rejected={uids[2]: "bad"})
    s.close()
    again = Store.open(db_url)
    try:
        assert backlog(again) == 4
        assert _same(next_batch(again, 10), uids[3:], again)
        assert sum(rejected_counts(again).values()) == 1
    finally:
        again.close()
