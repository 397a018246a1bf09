"""The store when the database fails: nothing is lost, nothing is silent.

A write that fails (another process holds SQLite's write lock past the busy timeout, a
constraint) is a :class:`StoreError` naming the operation; the batch writer keeps the
batch and reports the failure to its caller; a rolled-back transaction leaves no stale
cached ids behind.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from jsonschema import Draft202012Validator

from probe.analysis.events import Decision
from probe.analysis.service import ServiceStatus
from probe.store import BatchWriter, Store, StoreError
from schema import tables, wire
from schema.model import HTTPTransaction, Measurement, Target, VantagePoint

VANTAGE = VantagePoint(probe_id="p", software_version="0", platform="linux", architecture="x")
OTHER = VantagePoint(probe_id="other", software_version="0", platform="linux", architecture="x")
TARGET = Target(id="t", service="s", kind="dns", host="example.com")
RUN = "run-1"
NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)


def _m(vantage: VantagePoint = VANTAGE) -> Measurement:
    return Measurement(str(uuid.uuid4()), RUN, TARGET, vantage, NOW)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "v.db"


@pytest.fixture
def store(db: Path) -> Iterator[Store]:
    s = Store.open(f"sqlite:///{db}", busy_timeout=0.1)
    s.begin_run(RUN, "test", VANTAGE, NOW)
    yield s
    s.close()


@pytest.fixture
def lock(db: Path) -> Iterator[sqlite3.Connection]:
    """Another connection holding the database's write lock until it commits."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    yield conn
    if conn.in_transaction:
        conn.execute("COMMIT")
    conn.close()


def test_a_failed_timed_flush_is_raised_and_nothing_is_lost(
    store: Store, lock: sqlite3.Connection
) -> None:
    made = [_m() for _ in range(4)]
    reported: list[str] = []
    loop_errors: list[dict] = []

    async def stored(m: Measurement) -> None:
        reported.append(m.measurement_uid)

    async def go() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, c: loop_errors.append(c))
        writer = BatchWriter(store, stored, batch_size=10, max_delay=0.05)
        for m in made[:3]:
            await writer.add(m)
        await asyncio.sleep(0.6)  # the timed flush ran, waited 0.1 s for the lock, failed
        assert reported == [] and store.count() == 0
        assert writer.pending == 3  # the failed batch was kept
        with pytest.raises(StoreError, match="cannot write 3 measurement.*database is locked"):
            await writer.add(made[3])
        assert writer.pending == 4  # the measurement added is kept too
        with pytest.raises(StoreError, match="database is locked"):
            await writer.flush()  # the final flush raises while it still cannot write
        assert writer.pending == 4 and reported == []
        lock.execute("COMMIT")
        await writer.flush()
        assert writer.pending == 0 and writer.written == 4
        await writer.flush()  # nothing left, and the failure is not raised again

    asyncio.run(go())
    assert reported == [m.measurement_uid for m in made]
    assert store.count() == 4
    assert [store.load_measurement(m.measurement_uid) for m in made] == made
    assert loop_errors == []  # no task died with an unretrieved exception


def test_a_timed_flush_that_succeeds_on_retry_raises_nothing(
    store: Store, lock: sqlite3.Connection
) -> None:
    reported: list[str] = []

    async def go() -> None:
        writer = BatchWriter(store, lambda m: reported.append(m.measurement_uid), max_delay=0.05)
        await writer.add(_m())
        await asyncio.sleep(0.4)  # failed in the background
        assert writer.pending == 1
        lock.execute("COMMIT")
        await writer.flush()  # the retry writes it: nothing was lost, nothing to raise

    asyncio.run(go())
    assert len(reported) == 1 and store.count() == 1


def test_a_full_batch_that_cannot_be_written_raises_from_add(
    store: Store, lock: sqlite3.Connection
) -> None:
    async def go() -> None:
        writer = BatchWriter(store, batch_size=2, max_delay=60)
        await writer.add(_m())
        with pytest.raises(StoreError, match="database is locked"):
            await writer.add(_m())
        assert writer.pending == 2
        lock.execute("COMMIT")
        await writer.flush()

    asyncio.run(go())
    assert store.count() == 2


def test_every_write_names_its_operation(store: Store, lock: sqlite3.Connection) -> None:
    at = NOW + dt.timedelta(hours=1)
    with pytest.raises(StoreError, match="cannot begin run run-2: database is locked"):
        store.begin_run("run-2", "test", OTHER, at)
    with pytest.raises(StoreError, match=r"cannot write 1 measurement\(s\): database is locked"):
        store.write_measurements([_m()])
    with pytest.raises(StoreError, match="cannot finish run run-1: database is locked"):
        store.finish_run(RUN, "complete", at)
    with pytest.raises(StoreError, match="cannot write service statuses of run run-1"):
        store.write_service_statuses(RUN, [ServiceStatus("s", "blocked", ("dns",), ("t",))])
    with pytest.raises(StoreError, match="cannot record the s event: database is locked"):
        store.apply_decision(VANTAGE, "s", Decision("start", (RUN,), "blocked", ("dns",), at))
    lock.execute("COMMIT")
    # The vantage point of the failed begin_run was rolled back with it, and is not cached.
    store.begin_run("run-2", "test", OTHER, at)
    assert store.count(tables.vantage_points) == 2


def test_a_constraint_violation_is_a_store_error_and_stores_nothing(store: Store) -> None:
    m = _m()
    with pytest.raises(StoreError, match="UNIQUE constraint failed") as info:
        store.write_measurements([m, m])
    assert isinstance(info.value.__cause__, sa.exc.IntegrityError)
    assert "INSERT" not in str(info.value)  # the reason, not the SQL and its parameters
    assert store.count() == 0


def test_a_read_error_is_a_store_error(store: Store) -> None:
    missing = sa.Table("missing", sa.MetaData(), sa.Column("id", sa.Integer))
    with pytest.raises(StoreError, match="cannot count missing: no such table"):
        store.count(missing)


def test_vantage_ids_are_cached_only_after_commit(store: Store) -> None:
    """A batch inserting a new vantage point rolls back: the id it got is not reused."""
    first = _m(OTHER)
    with pytest.raises(StoreError):
        store.write_measurements([first, first])  # duplicate uid: all rolled back
    second = _m(OTHER)
    store.write_measurements([second])  # used to fail: FOREIGN KEY constraint failed
    assert store.load_measurement(second.measurement_uid) == second
    third = _m(OTHER)
    store.write_measurements([third])  # from the cache now
    assert store.count() == 2


# -- bodies with NUL bytes ---------------------------------------------------------------

NUL_BODY = "caf\u00e9 \x00 ok\x00".encode()


def _with_body(body: bytes) -> Measurement:
    m = Measurement(str(uuid.uuid4()), RUN, TARGET, VANTAGE, NOW)
    m.requests.append(HTTPTransaction(url="http://example.com/", method="GET", t0=0.0, t=0.1,
                                      status=200, body=body, body_length=len(body)))  # fmt: skip
    return m


def test_a_body_with_nul_bytes_travels_base64_and_round_trips_exactly() -> None:
    m = _with_body(NUL_BODY)
    line = wire.dumps(m)
    assert "\\u0000" not in line  # PostgreSQL's JSONB rejects it in strings
    doc = json.loads(line)
    body = doc["test_keys"]["requests"][0]["response"]["body"]
    assert body["format"] == "base64"
    Draft202012Validator(wire.json_schema()).validate(doc)
    assert wire.from_wire(doc) == m
    assert wire.from_wire(doc).requests[0].body == NUL_BODY
    # A UTF-8 body without NUL stays a plain string.
    plain = json.loads(wire.dumps(_with_body("caf\u00e9".encode())))
    assert plain["test_keys"]["requests"][0]["response"]["body"] == "caf\u00e9"


def test_a_body_with_nul_bytes_round_trips_through_the_store(store: Store) -> None:
    m = _with_body(NUL_BODY)
    store.write_measurements([m])
    back = store.load_measurement(m.measurement_uid)
    assert back == m and back.requests[0].body == NUL_BODY
