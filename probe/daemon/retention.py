"""Retention: old rows go, the SQLite file stays compact, nothing unsent is lost.

``retention.days`` (0 keeps everything) bounds what the probe keeps. :func:`prune`
deletes measurements (with their observations and outbox rows) that started before
the cutoff, runs and their service statuses with no measurement left, and blocking
events that ended before it. A measurement still in the outbox is never deleted while
uploads are expected (the probe is enrolled or ``collector.url`` is set): the
collector has not acknowledged it yet. Deletes go in small transactions so a run
writing at the same time never waits long for the lock.

Compaction: SQLite reuses the pages freed by a prune for the next rows, so a probe in
its steady state (one day's worth pruned each day) does not grow; rewriting the whole
file every time would only wear the SD card. After a *big* prune (more than
:data:`VACUUM_FRACTION` of the file free, e.g. after lowering ``retention.days``)
:func:`compact` runs ``VACUUM`` once, if the disk has room for the copy it makes,
and truncates the write-ahead log either way.

>>> result = prune(store, cutoff(cfg, now), keep_unsent=uploads_expected(cfg))
>>> result.measurements, result.runs, result.events
(1200, 19, 1)
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from probe.config import Config
from probe.store import Store, StoreError
from schema import tables

log = logging.getLogger("vantage.daemon")

CHUNK = 500  # measurements per delete transaction
VACUUM_FRACTION = 0.25  # VACUUM when this much of the file is free pages
ENROLLMENT_FILE = "collector.json"  # probe.outbox's enrollment, in the data directory


@dataclass
class Pruned:
    measurements: int = 0
    runs: int = 0
    events: int = 0
    kept_unsent: int = 0  # old measurements kept because the collector has not got them
    vacuumed: bool = False
    size_before: int | None = None  # bytes of the database file (SQLite)
    size_after: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def cutoff(cfg: Config, now: dt.datetime) -> dt.datetime | None:
    """Rows older than this go; None when ``retention.days`` is 0 (keep everything)."""
    return now - dt.timedelta(days=cfg.retention.days) if cfg.retention.days else None


def uploads_expected(cfg: Config) -> bool:
    """Whether measurements wait in the outbox for a collector (enrolled, or a URL set).

    The enrollment file is looked at directly as well as through ``probe.outbox``:
    when in doubt, keep the data.
    """
    if cfg.collector.url or (cfg.data_dir() / ENROLLMENT_FILE).exists():
        return True
    try:
        from probe.outbox import enrollment
    except ImportError:
        return False
    try:
        return enrollment(cfg) is not None
    except Exception:  # noqa: BLE001  (whatever a damaged enrollment raises: keep the data)
        return True


def prune(
    store: Store,
    before: dt.datetime,
    *,
    keep_unsent: bool,
    chunk: int = CHUNK,
    should_stop: Callable[[], bool] = lambda: False,
) -> Pruned:
    """Delete what is older than ``before`` (see the module docstring). Blocking: call
    it in a worker thread. Raises :class:`StoreError` if the database fails."""
    m, o, obs = tables.measurements, tables.outbox, tables.observations
    r, rs, e = tables.runs, tables.run_services, tables.events
    result = Pruned()
    unsent = sa.exists().where(o.c.measurement_uid == m.c.measurement_uid)
    old = sa.select(m.c.measurement_uid).where(m.c.start_time < before)
    if keep_unsent:
        old = old.where(~unsent)
    try:
        while not should_stop():
            with store.engine.begin() as conn:
                uids = list(conn.execute(old.limit(chunk)).scalars())
                if not uids:
                    break
                conn.execute(obs.delete().where(obs.c.measurement_uid.in_(uids)))
                conn.execute(o.delete().where(o.c.measurement_uid.in_(uids)))
                conn.execute(m.delete().where(m.c.measurement_uid.in_(uids)))
            result.measurements += len(uids)
        with store.engine.begin() as conn:
            if keep_unsent:
                result.kept_unsent = int(
                    conn.execute(
                        sa.select(sa.func.count())
                        .select_from(m)
                        .where(m.c.start_time < before, unsent)
                    ).scalar()
                    or 0
                )
            empty = sa.select(r.c.run_id).where(
                r.c.started_at < before,
                ~sa.exists().where(m.c.run_id == r.c.run_id),
            )
            run_ids = list(conn.execute(empty).scalars())
            for i in range(0, len(run_ids), chunk):
                part = run_ids[i : i + chunk]
                conn.execute(rs.delete().where(rs.c.run_id.in_(part)))
                conn.execute(r.delete().where(r.c.run_id.in_(part)))
            result.runs = len(run_ids)
            ended = e.delete().where(e.c.ended_at.is_not(None), e.c.ended_at < before)
            result.events = conn.execute(ended).rowcount or 0
    except sa.exc.SQLAlchemyError as exc:
        raise StoreError(f"cannot prune old measurements: {exc}") from exc
    return result


def database_file(store: Store) -> Path | None:
    """The SQLite file of ``store`` (None for a server database or memory)."""
    url = store.engine.url
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database).expanduser()


def file_size(path: Path | None) -> int | None:
    """Bytes of an SQLite database with its write-ahead log."""
    if path is None:
        return None
    total = 0
    for p in (path, path.with_name(path.name + "-wal")):
        try:
            total += p.stat().st_size
        except OSError:
            pass
    return total


def compact(store: Store, free_bytes: int) -> bool:
    """VACUUM after a big prune when the disk has room for the copy; truncate the WAL.
    Returns whether it vacuumed. Blocking; SQLite only (a no-op elsewhere)."""
    path = database_file(store)
    if path is None:
        return False
    try:
        with store.engine.connect() as conn:
            pages = int(conn.exec_driver_sql("PRAGMA page_count").scalar() or 0)
            free = int(conn.exec_driver_sql("PRAGMA freelist_count").scalar() or 0)
            page_size = int(conn.exec_driver_sql("PRAGMA page_size").scalar() or 4096)
        size = pages * page_size
        vacuum = pages > 0 and free / pages > VACUUM_FRACTION and free_bytes > 2 * size
        auto = store.engine.execution_options(isolation_level="AUTOCOMMIT")
        with auto.connect() as conn:
            if vacuum:
                conn.exec_driver_sql("VACUUM")
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    except sa.exc.SQLAlchemyError as exc:
        raise StoreError(f"cannot compact the database: {exc}") from exc
    return vacuum


def retain(
    store: Store,
    cfg: Config,
    now: dt.datetime,
    free_bytes: int,
    should_stop: Callable[[], bool] = lambda: False,
) -> Pruned | None:
    """One retention pass (prune, then compact when it pays); None when
    ``retention.days`` is 0. Blocking: call it in a worker thread."""
    before = cutoff(cfg, now)
    if before is None:
        return None
    path = database_file(store)
    size_before = file_size(path)
    result = prune(store, before, keep_unsent=uploads_expected(cfg), should_stop=should_stop)
    if result.measurements or result.runs or result.events:
        result.vacuumed = compact(store, free_bytes)
    result.size_before, result.size_after = size_before, file_size(path)
    return result
