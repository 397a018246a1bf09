"""The collector under attack (issue 18), poisoning: one odd value or one bad run must
not break exports, settling or memory for everyone else."""

from __future__ import annotations

import copy
import datetime as dt
import io
import uuid
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from collectors import analysis
from collectors.ingest import Ingestor
from probe.analysis import offline, service_status
from probe.export.flat import csv_time
from probe.store import Store
from schema import tables, wire
from tests.collectors.conftest import Collector
from tests.collectors.samples import doc
from tests.collectors.test_collector_events import (
    SETTLE,
    T0,
    A,
    B,
    fleet_runs,
    run,
    run_rows,
    statuses_of,
)
from tests.collectors.test_query import store_runs

API = "/api/v1/measurements"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """The collector's tables (both backends), without the app."""
    if request.param == "postgresql":
        url = str(request.getfixturevalue("pg_url"))
    else:
        url = f"sqlite:///{tmp_path / 'collector.db'}"
    s = Store.open(url, outbox=False)
    yield s
    s.close()


def new_id() -> str:
    return str(uuid.uuid4())


def upload(c: Collector, cred: str, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    r = c.http.post(API, json={"measurements": docs}, headers={"Authorization": f"Bearer {cred}"})
    assert r.status_code == 200, r.text
    return list(r.json()["results"])


@pytest.fixture
def fleet(make_collector, tmp_path: Path) -> tuple[Collector, str, str, str]:
    token = tmp_path / "operator.token"
    c = make_collector(operator_token_file=str(token))
    probe_id = new_id()
    return c, probe_id, c.enroll(probe_id), token.read_text().strip()


# -- 5. times out of range ------------------------------------------------------------------


@pytest.mark.parametrize(
    "when", ["0001-01-01 00:00:00", "1999-12-31 23:59:59", "2101-01-01 00:00:00",
             "2024-13-01 00:00:00", "2024-02-30 00:00:00", "9999-12-31 23:59:59"],
)  # fmt: skip
def test_a_measurement_dated_out_of_range_is_rejected(fleet, when) -> None:
    c, probe_id, cred, _ = fleet
    bad = doc(probe_id, new_id(), 0)
    bad["measurement_start_time"] = when
    good = doc(probe_id, new_id(), 1)
    first, second = upload(c, cred, [bad, good])
    assert first["status"] == "rejected"
    assert "measurement_start_time" in first["reason"]
    assert second["status"] == "accepted"
    assert c.count("measurements") == 1


@pytest.mark.parametrize("when", ["2000-01-01 00:00:00", "2100-12-31 23:59:59"])
def test_the_ends_of_the_range_are_accepted(fleet, when) -> None:
    c, probe_id, cred, _ = fleet
    d = doc(probe_id, new_id(), 0)
    d["measurement_start_time"] = when
    assert [r["status"] for r in upload(c, cred, [d])] == ["accepted"]


def test_times_are_written_zero_padded_and_read_back() -> None:
    # What was stored before the range check (or by a probe) still reads and writes.
    early = dt.datetime(1, 1, 1, tzinfo=dt.UTC)
    assert wire.format_time(early) == "0001-01-01 00:00:00"
    assert wire.parse_time(wire.format_time(early)) == early.replace(tzinfo=None)
    assert csv_time(early) == "0001-01-01T00:00:00Z"
    m = wire.from_wire(doc(new_id(), new_id(), 0))
    m.start_time = dt.datetime(999, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
    assert wire.to_wire(m)["measurement_start_time"] == "0999-03-04 05:06:07"
    assert wire.from_wire(wire.to_wire(m)).start_time == m.start_time


def test_a_run_that_cannot_be_judged_is_set_aside_and_the_rest_are_judged(store) -> None:
    # The attack: one unreadable run, judged first, made every pass fail for every probe.
    engine = store.engine
    poisoned = run(A, 0, {"whatsapp": "dns"})
    others = [run(A, 10, {"whatsapp": "dns"}), run(B, 1, {"signal": False})]
    store_runs(store, [poisoned, *others])
    with engine.begin() as conn:  # a row that no longer reads back as a target
        conn.execute(tables.measurements.update()
                     .where(tables.measurements.c.run_id == poisoned[0])
                     .values(target={"id": "x"}))  # fmt: skip
    now = T0 + dt.timedelta(hours=1)
    analysis.settle_runs(engine, now, SETTLE)
    assert analysis.settle_runs(engine, now + dt.timedelta(seconds=SETTLE), SETTLE) == 2
    rows = run_rows(engine)
    assert rows[poisoned[0]][0] == analysis.SET_ASIDE
    assert {rows[r[0]][0] for r in others} == {analysis.SETTLED}
    # Set aside, it is not tried again at every pass; it is when it grows.
    assert analysis.settle_runs(engine, now + dt.timedelta(days=1), SETTLE) == 0
    with engine.begin() as conn:
        analysis.note_arrivals(conn, {poisoned[0]: 1}, now)
    assert run_rows(engine)[poisoned[0]][0] == analysis.UNSETTLED


# -- 6. integers out of range ---------------------------------------------------------------


def _set(d: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    d = copy.deepcopy(d)
    node: Any = d
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return d


@pytest.mark.parametrize(("path", "value", "words"), [
    (("test_keys", "requests", 0, "response", "code"), 2**31, "code"),
    (("test_keys", "requests", 0, "response", "code"), -1, "code"),
    (("test_keys", "requests", 0, "response", "body_length"), 2**63, "body_length"),
    (("test_keys", "queries", 0, "answers", 0, "ttl"), 2**31, "ttl"),
    (("test_keys", "queries", 0, "t0"), 1e300, "t0"),
    (("test_runtime",), -1.0, "test_runtime"),
    (("target", "expect", "asns"), [2**32], "asns"),
    (("target", "expect", "status"), [2**31], "status"),
    (("probe_asn",), "AS99999999999", "probe_asn"),
])  # fmt: skip
def test_out_of_range_numbers_are_rejected_and_parquet_still_exports(
    fleet, path, value, words
) -> None:
    c, probe_id, cred, operator = fleet
    base = doc(probe_id, new_id(), 0)
    if path[0] == "target" and base["target"].get("expect") is None:
        base["target"]["expect"] = {"asns": [], "status": []}
    bad = _set(base, path, value)
    (result,) = upload(c, cred, [bad])
    assert result["status"] == "rejected", result
    assert words in result["reason"]
    upload(c, cred, [doc(probe_id, new_id(), 1)])
    r = c.http.get("/api/v1/export", params={"format": "parquet"},
                   headers={"Authorization": f"Bearer {operator}"})  # fmt: skip
    assert r.status_code == 200
    assert pq.read_table(io.BytesIO(r.content)).num_rows == 1


def test_the_largest_values_in_range_export_to_parquet(fleet) -> None:
    c, probe_id, cred, operator = fleet
    d = doc(probe_id, new_id(), 0)
    d = _set(d, ("test_keys", "requests", 0, "response", "code"), 999)
    d = _set(d, ("test_keys", "requests", 0, "response", "body_length"), 2**63 - 1)
    assert [r["status"] for r in upload(c, cred, [d])] == ["accepted"]
    r = c.http.get("/api/v1/export", params={"format": "parquet"},
                   headers={"Authorization": f"Bearer {operator}"})  # fmt: skip
    assert r.status_code == 200
    table = pq.read_table(io.BytesIO(r.content))
    assert table.column("http_body_length").to_pylist() == [2**63 - 1]


# -- 7. growing a judged run ----------------------------------------------------------------


def test_judging_reads_rows_not_evidence_and_agrees_with_the_full_measurements(
    store,
) -> None:
    engine = store.engine
    runs = fleet_runs()
    store_runs(store, runs)
    for run_id, *_ in runs:
        full = analysis.measurements_of(engine, run_id)
        light = analysis.judging_view(engine, run_id)
        services = sorted({m.target.service for m in full if not m.target.control})
        assert offline([m for m in light if m.target.control]) == offline(
            [m for m in full if m.target.control]
        )
        is_offline = offline([m for m in full if m.target.control])
        assert [service_status(s, light, is_offline) for s in services] == [
            service_status(s, full, is_offline) for s in services
        ]
    # Without the observations (the bulk of a run) it is judged all the same.
    with engine.begin() as conn:
        conn.execute(tables.observations.delete())
    now = T0 + dt.timedelta(hours=1)
    analysis.settle_runs(engine, now, SETTLE)
    assert analysis.settle_runs(engine, now + dt.timedelta(seconds=SETTLE), SETTLE) == len(runs)


def test_settling_takes_probes_in_turn(store) -> None:
    # The attack: one probe's many (re)grown runs, judged oldest first, pushed another
    # probe's new run to the back. Each pass takes one run of each probe in turn.
    engine = store.engine
    many = [run(A, k, {"whatsapp": "dns"}) for k in range(8)]
    newest = run(B, 60, {"signal": False})
    store_runs(store, [*many, newest])
    now = T0 + dt.timedelta(hours=2)
    analysis.settle_runs(engine, now, SETTLE)
    later = now + dt.timedelta(seconds=SETTLE)
    assert analysis.settle_runs(engine, later, SETTLE, budget=2) == 2
    assert statuses_of(engine, newest[0]) == {"signal": "ok"}
    assert run_rows(engine)[many[0][0]][0] == analysis.SETTLED
    assert run_rows(engine)[many[1][0]][0] == analysis.UNSETTLED  # next pass
    while analysis.settle_runs(engine, later, SETTLE, budget=2):
        pass
    assert {status for status, _ in run_rows(engine).values()} == {analysis.SETTLED}


def test_in_turn() -> None:
    items = ["a1", "a2", "a3", "b1", "c1", "c2"]
    assert list(analysis.in_turn(items, key=lambda s: s[0])) == ["a1", "b1", "c1", "a2", "c2", "a3"]
    assert list(analysis.in_turn([], key=str)) == []


# -- 8. the vantage-point cache -------------------------------------------------------------


def test_the_vantage_point_cache_stays_bounded(pg_url) -> None:
    # The attack: a probe varying one field of its vantage point grew the cache forever.
    store = Store.open(pg_url, outbox=False)
    try:
        ingestor = Ingestor(store.engine, cache_size=4)
        probe_id, run_id = new_id(), new_id()
        sent = []
        for k in range(12):
            d = doc(probe_id, run_id, k)
            d["probe_network_name"] = f"network {k}"
            sent.append(d)
            assert ingestor.ingest(probe_id, [d]).counts()["accepted"] == 1
            assert len(ingestor._vantage_ids) <= 4
        # An evicted vantage point is found in the table again, not stored twice.
        again = doc(probe_id, run_id, 99)
        again["probe_network_name"] = "network 0"
        assert ingestor.ingest(probe_id, [again]).counts()["accepted"] == 1
        with store.engine.connect() as conn:
            n = conn.execute(sa.select(sa.func.count()).select_from(tables.vantage_points))
            assert n.scalar() == 12
            vp = conn.execute(
                sa.select(tables.vantage_points.c.network_name)
                .join(tables.measurements,
                      tables.measurements.c.vantage_point_id == tables.vantage_points.c.id)
                .where(tables.measurements.c.measurement_uid == again["measurement_uid"])
            ).scalar()  # fmt: skip
        assert vp == "network 0"
    finally:
        store.close()
