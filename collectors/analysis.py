"""Blocking events across the fleet: the collector settles runs and judges them.

A probe judges each run's services and keeps its own events, but it uploads only
measurements. The collector rebuilds the same judgement from what it received, with
the same rules (``probe.analysis.service_status`` and ``probe.analysis.decide``), so
its ``run_services`` and ``events`` cover every probe of the fleet.

A run's measurements arrive in batches, possibly days apart (a probe offline, an
upload cut short). A run is judged once it has *settled*: no new measurement of it
for ``settle_after`` seconds. The bookkeeping lives on the collector's ``runs`` row:

- ``status``: ``uploaded`` (:data:`UNSETTLED`: measurements came in since the last
  judgement) or ``settled`` (:data:`SETTLED`);
- ``finished_at``: when the collector last saw the run grow (on the collector a run
  never "finishes"; its last arrival is what matters);
- ``measurement_count``: how many of its measurements the collector has.

The ingest SHOULD call :func:`note_arrivals` in the transaction that stores a batch:
the times are then exact, and a run that gains measurements after it was judged goes
back to ``uploaded`` and is judged again. Without it, :func:`settle_runs` notices
growth itself by counting (at the resolution of its passes), for runs not yet judged.

Judging a run is one transaction: its status moves to ``settled`` (a guarded update:
two collector workers never judge the same run twice), its ``run_services`` rows are
replaced, and each service's event is started or ended as ``decide`` says, with the
history of that probe's runs up to this one. An older run that settles after a newer
one of the same probe is recorded but does not move events (they follow the newest
run, as on the probe). A run whose control targets all failed (the probe was offline)
changes no event, as on the probe.

Judging is fair and contained (issue 18): a pass takes settled runs in turn from each
probe, at most :data:`PASS_BUDGET` of them; a run is judged from its measurement rows
(target, verdict, failure, annotations), never its observations, so a run that grew
costs its row count, not its evidence; a run that cannot be judged is set aside
(:data:`SET_ASIDE`) until it grows again, and the pass goes on.

>>> settle_runs(engine, dt.datetime.now(dt.UTC), settle_after=900)
3
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import sqlalchemy as sa

from probe.analysis import Decision, RunStatus, ServiceStatus, decide, offline, service_status
from probe.store import Store, record_decision
from schema import tables, wire
from schema.model import Measurement, VantagePoint

log = logging.getLogger("vantage.collector.analysis")

UNSETTLED = "uploaded"
SETTLED = "settled"
#: A run judging failed on; judged again when it grows (note_arrivals), never before.
SET_ASIDE = "set_aside"
#: Seconds without a new measurement before a run is judged: past the probe's default
#: upload interval (300 s), so a run uploaded in two batches is judged whole.
DEFAULT_SETTLE_AFTER = 900.0
#: How many of a probe's latest runs ``decide`` looks at (its default window).
WINDOW = 3

r_t, m_t, rs_t, vp_t = tables.runs, tables.measurements, tables.run_services, tables.vantage_points


def note_arrivals(conn: sa.Connection, counts: Mapping[str, int], now: dt.datetime) -> None:
    """Record, in the ingest's transaction, that runs gained measurements just now.

    ``counts`` maps each run id to how many new measurements of it were stored.

    >>> note_arrivals(conn, {"3f2a...": 40}, dt.datetime.now(dt.UTC))
    """
    rows = [{"rid": run_id, "n": n} for run_id, n in counts.items() if n > 0]
    if rows:
        conn.execute(
            r_t.update()
            .where(r_t.c.run_id == sa.bindparam("rid"))
            .values(
                status=UNSETTLED,
                finished_at=now,
                measurement_count=r_t.c.measurement_count + sa.bindparam("n"),
            ),
            rows,
        )


#: Runs judged in one pass at most, taken in turn from each probe: one probe's many
#: runs (or many growing ones) cannot push another probe's new run back for long.
PASS_BUDGET = 100


def settle_runs(
    engine: sa.Engine,
    now: dt.datetime | None = None,
    settle_after: float = DEFAULT_SETTLE_AFTER,
    budget: int = PASS_BUDGET,
) -> int:
    """Judge the runs that have settled by ``now``; returns how many were judged.

    Fair between probes: the candidates are taken in turn from each probe (one run of
    each, then the next of each; a probe's own runs oldest first), at most ``budget``
    judged per pass. Isolating: a run that cannot be judged (its rows do not read
    back, a rule raises) is logged and set aside (:data:`SET_ASIDE`) until it grows
    again; it never stops the pass or costs another run its judgement.

    Idempotent: a run is judged once per settling (calling again judges nothing new).
    """
    now = _utc(now or dt.datetime.now(dt.UTC))
    arrived = (
        sa.select(sa.func.count())
        .where(m_t.c.run_id == r_t.c.run_id)
        .scalar_subquery()
        .label("arrived")
    )
    query = (
        sa.select(
            r_t.c.run_id, r_t.c.finished_at, r_t.c.measurement_count, arrived, vp_t.c.probe_id
        )
        .join(vp_t, vp_t.c.id == r_t.c.vantage_point_id)
        .where(r_t.c.status == UNSETTLED)
        .order_by(r_t.c.started_at, r_t.c.run_id)  # a probe's runs in the order it ran them
    )
    with engine.connect() as conn:
        candidates = conn.execute(query).all()
    judged = tried = 0
    for run in in_turn(candidates, key=lambda r: r.probe_id):
        if run.finished_at is None or run.arrived != run.measurement_count:
            _seen_growing(engine, run.run_id, run.arrived, now)
            continue
        if (now - _utc(run.finished_at)).total_seconds() < settle_after:
            continue
        if tried >= budget:
            break
        tried += 1
        try:
            if settle_run(engine, run.run_id, run.arrived):
                judged += 1
        except Exception as exc:  # noqa: BLE001 - one bad run must not stop the others
            log.error("run %s cannot be judged, set aside until it grows: %r", run.run_id, exc)
            _set_aside(engine, run.run_id, run.arrived)
    return judged


T = TypeVar("T")


def in_turn(items: Sequence[T], key: Callable[[T], str]) -> Iterator[T]:
    """``items`` taken in turn by ``key`` (the first of each key, then the second of
    each, ...), each key's items in their order; keys in order of first appearance.

    >>> list(in_turn(["a1", "a2", "a3", "b1"], key=lambda s: s[0]))
    ['a1', 'b1', 'a2', 'a3']
    """
    queues: dict[str, list[T]] = {}
    for item in items:
        queues.setdefault(key(item), []).append(item)
    lanes = list(queues.values())
    depth = 0
    while lanes:
        for lane in lanes:
            yield lane[depth]
        depth += 1
        lanes = [lane for lane in lanes if len(lane) > depth]


def _set_aside(engine: sa.Engine, run_id: str, arrived: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            r_t.update()
            .where(
                r_t.c.run_id == run_id,
                r_t.c.status == UNSETTLED,
                r_t.c.measurement_count == arrived,
            )
            .values(status=SET_ASIDE)
        )


def _seen_growing(engine: sa.Engine, run_id: str, arrived: int, now: dt.datetime) -> None:
    with engine.begin() as conn:
        conn.execute(
            r_t.update()
            .where(r_t.c.run_id == run_id, r_t.c.status == UNSETTLED)
            .values(measurement_count=arrived, finished_at=now)
        )


def settle_run(engine: sa.Engine, run_id: str, expected: int) -> bool:
    """Judge one run of ``expected`` measurements; False when it changed meanwhile (or
    another worker judged it): a later pass takes it up again."""
    measurements = judging_view(engine, run_id)
    if len(measurements) != expected:
        return False
    non_controls = sorted({m.target.service for m in measurements if not m.target.control})
    is_offline = offline([m for m in measurements if m.target.control])
    statuses = [service_status(s, measurements, is_offline) for s in non_controls]
    with engine.begin() as conn:
        claimed = conn.execute(
            r_t.update()
            .where(
                r_t.c.run_id == run_id,
                r_t.c.status == UNSETTLED,
                r_t.c.measurement_count == expected,
            )
            .values(status=SETTLED)
        ).rowcount
        count = conn.execute(sa.select(sa.func.count()).where(m_t.c.run_id == run_id)).scalar()
        if claimed != 1 or count != expected:
            conn.rollback()
            return False
        _judge(conn, run_id, statuses, is_offline)
    log.info("settled run %s: %s", run_id, ", ".join(f"{s.service} {s.status}" for s in statuses))
    return True


def _judge(
    conn: sa.Connection, run_id: str, statuses: Sequence[ServiceStatus], is_offline: bool | None
) -> None:
    conn.execute(rs_t.delete().where(rs_t.c.run_id == run_id))
    if statuses:
        conn.execute(rs_t.insert(), [
            {"run_id": run_id, "service": s.service, "status": s.status,
             "blocking": list(s.blocking), "blocked_targets": list(s.blocked_targets),
             "explanation": s.explanation} for s in statuses
        ])  # fmt: skip
    run = conn.execute(
        sa.select(r_t.c.started_at, vp_t).join(vp_t, vp_t.c.id == r_t.c.vantage_point_id)
        .where(r_t.c.run_id == run_id)
    ).one()  # fmt: skip
    vantage = VantagePoint(
        probe_id=run.probe_id,
        software_version=run.software_version,
        platform=run.platform,
        architecture=run.architecture,
        asn=run.asn,
        cc=run.cc,
    )
    started = _utc(run.started_at)
    for s in statuses:
        if is_offline:
            continue  # an offline probe says nothing about blocking
        history = _history(conn, vantage.probe_id, s.service, run_id, started)
        if history is None:
            continue  # a newer run of this probe was judged already: events follow it
        e = tables.events
        is_open = (
            conn.execute(
                sa.select(e.c.id).where(
                    e.c.probe_id == vantage.probe_id,
                    e.c.service == s.service,
                    e.c.ended_at.is_(None),
                )
            ).first()
            is not None
        )
        decision: Decision = decide(history, is_open)
        record_decision(conn, vantage, s.service, decision)


def _history(
    conn: sa.Connection, probe_id: str, service: str, run_id: str, started: dt.datetime
) -> list[RunStatus] | None:
    """The probe's judged statuses of ``service`` up to this run, oldest first; None
    when a later run of the probe is judged already."""
    base = (
        sa.select(r_t.c.run_id, r_t.c.started_at, rs_t.c.status, rs_t.c.blocking)
        .join(rs_t, rs_t.c.run_id == r_t.c.run_id)
        .join(vp_t, vp_t.c.id == r_t.c.vantage_point_id)
        .where(vp_t.c.probe_id == probe_id, rs_t.c.service == service)
    )
    later = sa.or_(
        r_t.c.started_at > started, sa.and_(r_t.c.started_at == started, r_t.c.run_id > run_id)
    )
    if conn.execute(base.where(later).limit(1)).first() is not None:
        return None
    rows = conn.execute(
        base.where(sa.not_(later)).order_by(r_t.c.started_at.desc(), r_t.c.run_id.desc())
        .limit(WINDOW)
    ).all()  # fmt: skip
    return [
        RunStatus(row.run_id, _utc(row.started_at), row.status, tuple(row.blocking))
        for row in reversed(rows)
    ]


async def settle_loop(
    engine: sa.Engine, stop: asyncio.Event, settle_after: float, interval: float | None = None
) -> None:
    """Judge settled runs every ``interval`` seconds (default: a quarter of
    ``settle_after``, between 1 and 60 s) until ``stop`` is set; returns soon after.

    The database work runs in a worker thread; a failing pass is logged and retried
    at the next one (the collector keeps serving). A pass that used its whole budget
    (:data:`PASS_BUDGET`) is followed by the next at once: the budget shares the work
    out fairly, it does not slow it down.
    """
    pause = interval if interval is not None else min(max(settle_after / 4, 1.0), 60.0)
    while not stop.is_set():
        wait = pause
        try:
            judged = await asyncio.to_thread(settle_runs, engine, None, settle_after)
            if judged >= PASS_BUDGET:
                wait = 0.0
        except Exception:  # a database outage must not end the loop
            log.exception("settling runs failed; trying again in %.0f s", pause)
        try:
            await asyncio.wait_for(stop.wait(), wait)
        except TimeoutError:
            pass


def measurements_of(engine: sa.Engine, run_id: str) -> list[Measurement]:
    """A run's measurements as the collector holds them (for tests and tools)."""
    return [wire.from_wire(d) for d in Store(engine, outbox=False).iter_documents(run_id)]


@dataclass
class JudgedMeasurement(Measurement):
    """A measurement as judging needs it: its target, verdict, annotations and
    failure, read from its ``measurements`` row alone (no observations), so that a run
    that grew is judged again in time linear in its rows, not in its evidence."""

    stored_failure: str | None = None

    def failure(self) -> str | None:
        return self.stored_failure


def judging_view(engine: sa.Engine, run_id: str) -> list[Measurement]:
    """What :func:`settle_run` judges: each measurement of ``run_id`` from its row."""
    query = (
        sa.select(
            m_t.c.measurement_uid, m_t.c.start_time, m_t.c.target, m_t.c.annotations,
            m_t.c.failure, m_t.c.accessible, m_t.c.blocking, m_t.c.verdict, vp_t.c.probe_id,
        )
        .join(vp_t, vp_t.c.id == m_t.c.vantage_point_id)
        .where(m_t.c.run_id == run_id)
        .order_by(m_t.c.start_time, m_t.c.measurement_uid)
    )  # fmt: skip
    out: list[Measurement] = []
    with engine.connect() as conn:
        for row in conn.execute(query):
            blocking = False if row.blocking == "false" else row.blocking
            verdict = wire.verdict_from_wire(
                {"analysis": row.verdict, "accessible": row.accessible, "blocking": blocking}
            )
            out.append(
                JudgedMeasurement(
                    measurement_uid=row.measurement_uid,
                    run_id=run_id,
                    target=wire.target_from_wire(row.target),
                    vantage=VantagePoint(row.probe_id, "", "", ""),  # not judged on
                    start_time=_utc(row.start_time),
                    annotations=dict(row.annotations),
                    verdict=verdict,
                    stored_failure=row.failure,
                )
            )
    return out


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
