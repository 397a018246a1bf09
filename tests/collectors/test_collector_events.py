"""The collector settles runs into service statuses and blocking events, across probes.

The collector only receives measurements; once a run has had no new measurement for
``settle_after`` seconds it judges it with the probe's own rules. The events it
finds must be the ones each probe finds on its own (replayed here through the probe's
store), and judging again must change nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from collectors import analysis
from probe.analysis import decide, offline, service_status
from probe.store import Store
from schema import tables
from schema.model import Measurement, VantagePoint
from tests.collectors.test_query import PROBES, make_measurement, store_runs, vantage

UTC = dt.UTC
T0 = dt.datetime(2024, 6, 1, 8, 0, tzinfo=UTC)
SETTLE = 600.0
A = vantage(*PROBES[0])  # AS64500, DE
B = vantage(*PROBES[2])  # AS64502, IR

Run = tuple[str, VantagePoint, dt.datetime, list[Measurement]]


def run(v: VantagePoint, minutes: float, services: dict[str, Any], *,
        controls_fail: bool = False) -> Run:  # fmt: skip
    """One run: a control target, and two targets per service judged ``services[s]``
    (False: reachable; a kind: blocked that way)."""
    run_id = str(uuid.uuid4())
    started = T0 + dt.timedelta(minutes=minutes)
    ms = [make_measurement(str(uuid.uuid4()), run_id, v, "controls", started,
                           "dns" if controls_fail else False, control=True,
                           target_id="control-web")]  # fmt: skip
    for service, verdict in services.items():
        for k in range(2):
            ms.append(make_measurement(str(uuid.uuid4()), run_id, v, service,
                                       started + dt.timedelta(seconds=k + 1), verdict,
                                       target_id=f"{service}-{k}"))  # fmt: skip
    return (run_id, v, started, ms)


def fleet_runs() -> list[Run]:
    """Probe A: WhatsApp blocked twice (past residual blocking), then reachable: an
    event that started and ended. Probe B: Signal blocked by DNS three times: an
    open event; then an offline run, which changes nothing."""
    return [
        run(A, 0, {"whatsapp": "tcp_ip", "signal": False}),
        run(B, 1, {"whatsapp": False, "signal": "dns"}),
        run(A, 10, {"whatsapp": "tcp_ip", "signal": False}),
        run(B, 11, {"whatsapp": False, "signal": "dns"}),
        run(A, 20, {"whatsapp": False, "signal": False}),
        run(B, 21, {"whatsapp": False, "signal": "dns"}),
        run(B, 31, {"whatsapp": False, "signal": False}, controls_fail=True),
    ]


def as_the_probe_sees_it(runs: list[Run], url: str) -> list[tuple[Any, ...]]:
    """The events each probe computes on its own (probe.cli's path, through Store)."""
    store = Store.open(url)
    for run_id, v, started, ms in sorted(runs, key=lambda r: r[2]):
        store.begin_run(run_id, "messaging", v, started)
        is_offline = offline([m for m in ms if m.target.control])
        services = sorted({m.target.service for m in ms if not m.target.control})
        statuses = [service_status(s, ms, is_offline) for s in services]
        store.write_service_statuses(run_id, statuses)
        for s in statuses:
            history = store.service_history(v.probe_id, s.service)
            is_open = store.open_event(v.probe_id, s.service) is not None
            decision = decide(history, is_open) if not is_offline else decide([], False)
            store.apply_decision(v, s.service, decision)
    found = event_rows(store.engine)
    store.close()
    return found


def event_rows(engine: sa.Engine) -> list[tuple[Any, ...]]:
    e = tables.events
    with engine.connect() as conn:
        rows = conn.execute(sa.select(e).order_by(e.c.started_at, e.c.probe_id)).all()
    return [(r.probe_id, r.asn, r.cc, r.service, r.status, tuple(r.blocking), utc(r.started_at),
             utc(r.ended_at) if r.ended_at else None, tuple(r.runs)) for r in rows]  # fmt: skip


def utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def run_rows(engine: sa.Engine) -> dict[str, tuple[str, int]]:
    r = tables.runs
    with engine.connect() as conn:
        return {row.run_id: (row.status, row.measurement_count)
                for row in conn.execute(sa.select(r.c.run_id, r.c.status, r.c.measurement_count))}  # fmt: skip


def statuses_of(engine: sa.Engine, run_id: str) -> dict[str, str]:
    rs = tables.run_services
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(rs.c.service, rs.c.status)
                                 .where(rs.c.run_id == run_id)).all())  # fmt: skip


@pytest.fixture(params=["sqlite", "postgresql"])
def collector(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    if request.param == "postgresql":
        url = str(request.getfixturevalue("pg_url"))
    else:
        url = f"sqlite:///{tmp_path / 'collector.db'}"
    store = Store.open(url, outbox=False)
    yield store
    store.close()


def test_settled_runs_become_the_events_each_probe_would_find(
    collector: Store, tmp_path: Any
) -> None:
    engine = collector.engine
    runs = fleet_runs()
    store_runs(collector, runs)
    now = T0 + dt.timedelta(hours=2)
    assert analysis.settle_runs(engine, now, SETTLE) == 0  # first sight: the clock starts
    assert analysis.settle_runs(engine, now + dt.timedelta(seconds=SETTLE - 1), SETTLE) == 0
    assert event_rows(engine) == []
    assert analysis.settle_runs(engine, now + dt.timedelta(seconds=SETTLE), SETTLE) == len(runs)

    found = event_rows(engine)
    assert found == as_the_probe_sees_it(runs, f"sqlite:///{tmp_path / 'probe.db'}")
    a_runs = [r[0] for r in runs if r[1] is A]
    b_runs = [r[0] for r in runs if r[1] is B]
    assert found == [
        (A.probe_id, 64500, "DE", "whatsapp", "blocked", ("tcp_ip",), T0,
         T0 + dt.timedelta(minutes=20), (a_runs[0], a_runs[1], a_runs[2])),
        (B.probe_id, 64502, "IR", "signal", "blocked", ("dns",), T0 + dt.timedelta(minutes=1),
         None, (b_runs[0], b_runs[1])),
    ]  # fmt: skip
    assert statuses_of(engine, a_runs[0]) == {"whatsapp": "blocked", "signal": "ok"}
    assert statuses_of(engine, b_runs[3]) == {"whatsapp": "inconclusive", "signal": "inconclusive"}
    assert {status for status, _ in run_rows(engine).values()} == {analysis.SETTLED}

    # Judging again changes nothing.
    later = now + dt.timedelta(days=1)
    assert analysis.settle_runs(engine, later, SETTLE) == 0
    assert event_rows(engine) == found


def test_a_run_still_growing_waits_and_is_judged_whole(collector: Store) -> None:
    engine = collector.engine
    first = run(A, 0, {"whatsapp": "dns"})
    second = run(A, 10, {"whatsapp": "dns"})
    store_runs(collector, [first, second])
    now = T0 + dt.timedelta(hours=1)
    analysis.settle_runs(engine, now, SETTLE)
    # Part of the second run arrives later (a second upload), just before it would settle:
    # now WhatsApp is only partly blocked there.
    more = make_measurement(str(uuid.uuid4()), second[0], A, "whatsapp",
                            second[2] + dt.timedelta(seconds=5), False, target_id="whatsapp-2")  # fmt: skip
    collector.write_measurements([more])
    assert analysis.settle_runs(engine, now + dt.timedelta(seconds=SETTLE), SETTLE) == 1
    assert run_rows(engine)[second[0]] == (analysis.UNSETTLED, 4)  # grown: its clock restarted
    assert event_rows(engine) == []
    assert analysis.settle_runs(engine, now + dt.timedelta(seconds=2 * SETTLE), SETTLE) == 1
    assert statuses_of(engine, second[0]) == {"whatsapp": "partial"}
    ((*_, status, blocking, started, ended, run_ids),) = event_rows(engine)
    assert (status, blocking, started, ended) == ("partial", ("dns",), T0, None)
    assert run_ids == (first[0], second[0])


def test_late_arrivals_noted_by_the_ingest_rejudge_the_run(collector: Store) -> None:
    engine = collector.engine
    runs = [run(B, 0, {"signal": "dns"}), run(B, 10, {"signal": "dns"})]
    store_runs(collector, runs)
    now = T0 + dt.timedelta(hours=1)
    analysis.settle_runs(engine, now, SETTLE)
    assert analysis.settle_runs(engine, now + dt.timedelta(seconds=SETTLE), SETTLE) == 2
    (opened,) = event_rows(engine)
    # A week later the rest of the newest run arrives (the probe was cut off mid-upload):
    # WhatsApp, reachable; Signal unchanged.
    rid = runs[1][0]
    late = [make_measurement(str(uuid.uuid4()), rid, B, "whatsapp", runs[1][2], False,
                             target_id=f"whatsapp-{k}") for k in range(2)]  # fmt: skip
    collector.write_measurements(late)
    arrived = now + dt.timedelta(days=7)
    with engine.begin() as conn:
        analysis.note_arrivals(conn, {rid: len(late), "no-such-run": 3, runs[0][0]: 0}, arrived)
    assert run_rows(engine)[rid] == (analysis.UNSETTLED, 5)
    assert run_rows(engine)[runs[0][0]] == (analysis.SETTLED, 3)
    assert analysis.settle_runs(engine, arrived + dt.timedelta(seconds=SETTLE - 1), SETTLE) == 0
    assert analysis.settle_runs(engine, arrived + dt.timedelta(seconds=SETTLE), SETTLE) == 1
    assert statuses_of(engine, rid) == {"signal": "blocked", "whatsapp": "ok"}
    assert event_rows(engine) == [opened]  # still the one event, not a second


def test_an_older_run_arriving_late_does_not_rewrite_events(collector: Store) -> None:
    engine = collector.engine
    newer = [run(B, 10, {"signal": "dns"}), run(B, 20, {"signal": "dns"})]
    store_runs(collector, newer)
    now = T0 + dt.timedelta(hours=1)
    analysis.settle_runs(engine, now, SETTLE)
    analysis.settle_runs(engine, now + dt.timedelta(seconds=SETTLE), SETTLE)
    before = event_rows(engine)
    assert len(before) == 1 and before[0][7] is None  # open
    older = run(B, 0, {"signal": False})  # uploaded last (it sat in a backlog)
    store_runs(collector, [older])
    later = now + dt.timedelta(hours=1)
    analysis.settle_runs(engine, later, SETTLE)
    assert analysis.settle_runs(engine, later + dt.timedelta(seconds=SETTLE), SETTLE) == 1
    assert statuses_of(engine, older[0]) == {"signal": "ok"}  # recorded...
    assert event_rows(engine) == before  # ...but an old "ok" does not end today's event


def test_a_run_that_changed_meanwhile_is_not_judged(collector: Store) -> None:
    engine = collector.engine
    r = run(A, 0, {"whatsapp": "dns"})
    store_runs(collector, [r])
    analysis.settle_runs(engine, T0, SETTLE)
    assert analysis.settle_run(engine, r[0], expected=99) is False
    assert run_rows(engine)[r[0]][0] == analysis.UNSETTLED and statuses_of(engine, r[0]) == {}
    assert analysis.settle_run(engine, r[0], expected=3) is True
    assert analysis.settle_run(engine, r[0], expected=3) is False  # judged already: once only
    assert statuses_of(engine, r[0]) == {"whatsapp": "blocked"}


def test_the_settle_loop_judges_in_the_background_and_stops_promptly(tmp_path: Any) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'c.db'}", outbox=False)
    runs = [run(A, 0, {"whatsapp": "dns"}), run(A, 10, {"whatsapp": "dns"})]
    store_runs(store, runs)

    async def main() -> float:
        stop = asyncio.Event()
        loop_task = asyncio.create_task(
            analysis.settle_loop(store.engine, stop, 0.2, interval=0.05)
        )
        deadline = asyncio.get_running_loop().time() + 10
        while not event_rows(store.engine):
            assert asyncio.get_running_loop().time() < deadline, "nothing was settled"
            await asyncio.sleep(0.05)
        stop.set()
        t = asyncio.get_running_loop().time()
        await asyncio.wait_for(loop_task, 5)
        return asyncio.get_running_loop().time() - t

    assert asyncio.run(main()) < 1.0
    assert [row[3] for row in event_rows(store.engine)] == ["whatsapp"]
    store.close()


def test_the_settle_loop_survives_a_failing_database(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'nothing.db'}")  # no tables

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(analysis.settle_loop(engine, stop, 1.0, interval=0.02))
        await asyncio.sleep(0.2)
        assert not task.done()
        stop.set()
        await asyncio.wait_for(task, 5)

    with caplog.at_level("ERROR", logger="vantage.collector.analysis"):
        asyncio.run(main())
    assert any("settling runs failed" in r.message for r in caplog.records)
    engine.dispose()
