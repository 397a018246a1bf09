"""Retention: old rows pruned, unsent measurements kept while uploads are expected,
the database intact and compact."""

from __future__ import annotations

import dataclasses
import datetime as dt
import sqlite3
import uuid
from pathlib import Path

import sqlalchemy as sa

from probe.analysis.events import Decision
from probe.analysis.service import ServiceStatus
from probe.config import Config, load_config
from probe.daemon.retention import compact, prune, retain, uploads_expected
from probe.store import Store
from schema import tables
from schema.model import Measurement, Target, TCPConnect, VantagePoint

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
OLD = NOW - dt.timedelta(days=120)
VP = VantagePoint(probe_id="00000000-0000-4000-8000-0000000000aa", software_version="t",
                  platform="linux", architecture="x86_64")  # fmt: skip


def _run(store: Store, started: dt.datetime, n: int, suite: str = "s") -> list[str]:
    """A finished run of ``n`` measurements (each with observations) started then."""
    run_id = str(uuid.uuid4())
    store.begin_run(run_id, suite, VP, started)
    batch = []
    for i in range(n):
        target = Target(id=f"t{i}", service="svc", kind="tcp", host="h.test", ports=(443,))
        batch.append(Measurement(
            measurement_uid=str(uuid.uuid4()), run_id=run_id, target=target, vantage=VP,
            start_time=started + dt.timedelta(seconds=i),
            tcp_connect=[TCPConnect("127.0.0.1", 443, 0.0, 0.01),
                         TCPConnect("127.0.0.2", 443, 0.0, 0.02, "connection_refused")],
            annotations={"padding": "x" * 2000},
        ))  # fmt: skip
    store.write_measurements(batch)
    store.finish_run(run_id, "complete", started + dt.timedelta(minutes=1))
    return [m.measurement_uid for m in batch]


def _acknowledge(store: Store, uids: list[str]) -> None:
    with store.engine.begin() as conn:
        conn.execute(tables.outbox.delete().where(tables.outbox.c.measurement_uid.in_(uids)))


def _cfg(tmp_path: Path, **retention: object) -> Config:
    doc = "[retention]\n" + "".join(f"{k} = {v}\n" for k, v in retention.items())
    path = tmp_path / "v.toml"
    path.write_text(f'[probe]\ndata_dir = "{tmp_path / "data"}"\n{doc}')
    return load_config(path, env={})


def _uids(store: Store) -> set[str]:
    with store.engine.connect() as conn:
        return set(conn.execute(sa.select(tables.measurements.c.measurement_uid)).scalars())


def _check_integrity(path: Path) -> None:
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    # No orphans: every observation and outbox row has its measurement, every
    # measurement and service status its run.
    assert db.execute("SELECT count(*) FROM observations o LEFT JOIN measurements m "
                      "ON o.measurement_uid = m.measurement_uid "
                      "WHERE m.measurement_uid IS NULL").fetchone() == (0,)  # fmt: skip
    assert db.execute("SELECT count(*) FROM outbox o LEFT JOIN measurements m "
                      "ON o.measurement_uid = m.measurement_uid "
                      "WHERE m.measurement_uid IS NULL").fetchone() == (0,)  # fmt: skip
    assert db.execute("SELECT count(*) FROM run_services s LEFT JOIN runs r "
                      "ON s.run_id = r.run_id WHERE r.run_id IS NULL").fetchone() == (0,)  # fmt: skip
    db.close()


def test_prune_keeps_what_the_collector_has_not_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    store = Store.open(f"sqlite:///{path}")
    old_sent = _run(store, OLD, 4)
    old_unsent = _run(store, OLD + dt.timedelta(hours=1), 3)
    new = _run(store, NOW - dt.timedelta(days=1), 2)
    _acknowledge(store, old_sent + new)
    result = prune(store, NOW - dt.timedelta(days=90), keep_unsent=True)
    assert result.measurements == 4 and result.kept_unsent == 3
    assert _uids(store) == set(old_unsent) | set(new)
    assert result.runs == 1  # the run whose measurements are all gone
    assert store.count(tables.runs) == 2
    assert store.count(tables.observations) == 2 * 5
    assert store.count(tables.outbox) == 3  # still waiting
    store.close()
    _check_integrity(path)


def test_without_uploads_old_measurements_go_with_their_outbox_rows(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    store = Store.open(f"sqlite:///{path}")
    _run(store, OLD, 5)
    new = _run(store, NOW, 1)
    result = prune(store, NOW - dt.timedelta(days=90), keep_unsent=False)
    assert result.measurements == 5 and result.kept_unsent == 0
    assert _uids(store) == set(new) and store.count(tables.outbox) == 1
    store.close()
    _check_integrity(path)


def test_events_and_service_statuses_are_pruned_with_their_age(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    store = Store.open(f"sqlite:///{path}")
    _run(store, OLD, 1)
    with store.engine.begin() as conn:
        run_id = conn.execute(sa.select(tables.runs.c.run_id)).scalar()
    store.write_service_statuses(run_id, [ServiceStatus("svc", "blocked", ("tcp_ip",), ("t0",))])
    start = Decision("start", (run_id,), "blocked", ("tcp_ip",), OLD)
    store.apply_decision(VP, "svc", start)
    store.apply_decision(VP, "svc", Decision("end", (run_id,), at=OLD + dt.timedelta(days=1)))
    store.apply_decision(VP, "other", Decision("start", (run_id,), "blocked", ("dns",), OLD))
    result = prune(store, NOW - dt.timedelta(days=90), keep_unsent=False)
    assert result.events == 1  # the ended one; an open event is current, whatever its age
    assert [e["service"] for e in store.events()] == ["other"]
    assert store.count(tables.run_services) == 0 and store.count(tables.runs) == 0
    store.close()
    _check_integrity(path)


def test_a_big_prune_vacuums_and_the_file_shrinks(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    store = Store.open(f"sqlite:///{path}")
    for day in range(6):
        _run(store, OLD + dt.timedelta(days=day), 40)
    _run(store, NOW, 5)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    before = path.stat().st_size
    cfg = _cfg(tmp_path, days=90)
    result = retain(store, cfg, NOW, free_bytes=10 * before)
    assert result is not None and result.measurements == 240 and result.vacuumed
    assert path.stat().st_size < before / 3
    assert result.size_after is not None and result.size_before is not None
    assert result.size_after < result.size_before
    assert len(_uids(store)) == 5
    # Without room on the disk for VACUUM's copy, it does not vacuum.
    for day in range(6):
        _run(store, OLD + dt.timedelta(days=day), 40)
    assert not retain(store, cfg, NOW, free_bytes=1).vacuumed  # type: ignore[union-attr]
    store.close()
    _check_integrity(path)


def test_small_prunes_reuse_pages_without_vacuum(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'r.db'}")
    for day in range(10):
        _run(store, NOW - dt.timedelta(days=day), 20)
    _run(store, OLD, 5)  # a few old ones: under a quarter of the file
    cfg = _cfg(tmp_path, days=90)
    result = retain(store, cfg, NOW, free_bytes=10**12)
    assert result is not None and result.measurements == 5 and not result.vacuumed
    assert compact(store, free_bytes=10**12) is False
    store.close()


def test_retention_zero_keeps_everything_and_uploads_are_detected(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'r.db'}")
    _run(store, OLD, 3)
    assert retain(store, _cfg(tmp_path, days=0), NOW, free_bytes=10**12) is None
    assert len(_uids(store)) == 3
    store.close()
    cfg = _cfg(tmp_path, days=90)
    assert not uploads_expected(cfg)
    assert uploads_expected(dataclasses.replace(
        cfg, collector=dataclasses.replace(cfg.collector, url="https://c.example")))  # fmt: skip
    cfg.data_dir().mkdir(parents=True, exist_ok=True)
    (cfg.data_dir() / "collector.json").write_text("{}")  # enrolled, even if damaged
    assert uploads_expected(cfg)
