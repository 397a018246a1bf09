"""``vantage status``: what the daemon did, does and will do, read while it runs.

From the database: each suite's last run and next run time (the job store), the
blocking events still open, the outbox backlog. From the daemon's state file: whether
it runs and what it is doing, a pause (low disk), missed runs, crash-loop back-off.
From the file system: the database's size and the free space. Nothing is written: a
database that does not exist yet is reported as such, not created (``sudo vantage
status`` must not leave a root-owned database in the daemon's directory).
"""

from __future__ import annotations

import datetime as dt
import fcntl
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa

from probe.config import Config
from probe.daemon.consent import consent_state
from probe.daemon.disk import MB, DiskFree, disk_free
from probe.daemon.state import JOB_PREFIX, LOCK_FILE, STATE_FILE, parse_iso, read_state


def daemon_running(data_dir: Path) -> bool | None:
    """Whether a daemon holds this data directory's lock (robust to stale pids); None
    when this user may not look (the daemon's directory is its own)."""
    try:
        fh = open(data_dir / LOCK_FILE, "rb")  # noqa: SIM115
    except PermissionError:
        return None
    except OSError:
        return False
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return False


def _unknown(running: bool | None, otherwise: str) -> str:
    return "unknown" if running is None else otherwise


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, int | float):
        value = dt.datetime.fromtimestamp(value, dt.UTC)
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC).isoformat(timespec="seconds")
    return str(value)


def gather(cfg: Config, *, disk_free: DiskFree = disk_free) -> dict[str, Any]:
    """Everything ``vantage status`` shows, as JSON-ready data."""
    from probe.daemon.retention import database_file, file_size

    data_dir = cfg.data_dir()
    state = read_state(data_dir / STATE_FILE)
    running = daemon_running(data_dir)
    doc: dict[str, Any] = {
        "consent": consent_state(cfg).to_json(),
        "daemon": {
            "running": running,
            "pid": state.get("pid") if running else None,
            "started_at": state.get("started_at"),
            "activity": state.get("activity") if running else _unknown(running, "stopped"),
            "detail": state.get("detail") if running else "",
            "updated_at": state.get("updated_at"),
            "last_exit_code": None if running else state.get("exit_code"),
            "backoff_until": state.get("backoff_until") if running else None,
            "recent_crashes": len(state.get("crashes") or []),
        },
        "paused": state.get("paused"),
        "retention": state.get("retention"),
        "suites": [],
        "open_events": [],
        "storage": {},
        "outbox": {"backlog": None},
    }
    suite_state = state.get("suites") if isinstance(state.get("suites"), dict) else {}
    try:
        free: int | None = int(disk_free(data_dir))
    except OSError:
        free = None
    doc["storage"] = {
        "data_dir": str(data_dir),
        "database": None,
        "database_bytes": None,
        "free_bytes": free,
        "min_free_bytes": cfg.retention.min_free_mb * MB,
        "retention_days": cfg.retention.days,
    }
    store = _open(cfg)
    try:
        if store is not None:
            path = database_file(store)
            doc["storage"]["database"] = str(path) if path else _safe(cfg.db_url())
            doc["storage"]["database_bytes"] = file_size(path)
        for suite in cfg.suites:
            entry = suite_state.get(suite.name) if isinstance(suite_state, dict) else None
            entry = entry if isinstance(entry, dict) else {}
            doc["suites"].append(
                {
                    "name": suite.name,
                    "schedule": _schedule(suite.interval, suite.jitter, suite.spacing),
                    "last_run": _last_run(store, suite.name) if store else None,
                    "next_run": _next_run(store, suite.name) if store else None,
                    "missed": int(entry.get("missed") or 0),
                    "last_missed": entry.get("last_missed"),
                    "last_skip": entry.get("last_skip"),
                    "last_skipped": entry.get("last_skipped"),
                    "pending": entry.get("pending"),
                    "last_error": entry.get("last_error"),
                }
            )
        if store is not None:
            doc["open_events"] = _open_events(store)
            doc["outbox"] = _backlog(store)
    finally:
        if store is not None:
            store.close()
    return doc


def _safe(url: str) -> str:
    return sa.make_url(url).render_as_string(hide_password=True)


def _open(cfg: Config) -> Any:
    from probe.store import Store

    url = sa.make_url(cfg.db_url())
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        if not Path(url.database).expanduser().exists():
            return None
    return Store.open(cfg.db_url())


def _schedule(interval: float, jitter: float, spacing: str) -> str:
    if spacing == "exponential":
        return f"exponential gaps, mean {interval:g} s"
    return f"every {interval:g} s +- {jitter:.0%}"


def _last_run(store: Any, suite: str) -> dict[str, Any] | None:
    from schema import tables

    r, m = tables.runs, tables.measurements
    with store.engine.connect() as conn:
        row = conn.execute(
            sa.select(r).where(r.c.suite == suite).order_by(r.c.started_at.desc()).limit(1)
        ).first()
        if row is None:
            return None
        count = row.measurement_count
        if row.status == "running":  # written at the end of a daemon run
            count = conn.execute(
                sa.select(sa.func.count()).select_from(m).where(m.c.run_id == row.run_id)
            ).scalar()
    return {
        "run_id": row.run_id,
        "started_at": _iso(row.started_at),
        "finished_at": _iso(row.finished_at),
        "status": row.status,
        "measurements": int(count or 0),
    }


def _next_run(store: Any, suite: str) -> str | None:
    from schema.tables import daemon_jobs as jobs

    try:
        with store.engine.connect() as conn:
            value = conn.execute(
                sa.select(jobs.c.next_run_time).where(jobs.c.id == JOB_PREFIX + suite)
            ).scalar()
    except sa.exc.OperationalError:  # no job store yet: the daemon never ran
        return None
    except sa.exc.ProgrammingError:
        return None
    return _iso(float(value)) if value is not None else None


def _open_events(store: Any) -> list[dict[str, Any]]:
    from schema import tables

    e = tables.events
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(e).where(e.c.ended_at.is_(None)).order_by(e.c.started_at))
        return [
            {
                "service": row.service,
                "status": row.status,
                "blocking": list(row.blocking),
                "since": _iso(row.started_at),
                "asn": row.asn,
                "cc": row.cc,
            }
            for row in rows
        ]


def _backlog(store: Any) -> dict[str, Any]:
    try:
        from probe.outbox import backlog
    except ImportError:  # the uploader is not installed: count the outbox table itself
        from schema import tables

        return {"backlog": store.count(tables.outbox), "source": "outbox table"}
    return {"backlog": int(backlog(store)), "source": "probe.outbox"}


# -- as text ---------------------------------------------------------------------------------


def _ago(text: str | None, now: dt.datetime) -> str:
    t = parse_iso(text)
    if t is None:
        return "-"
    seconds = (t - now).total_seconds()
    span = _span(abs(seconds))
    return (
        f"{t.strftime('%Y-%m-%d %H:%M:%S')} UTC ({'in ' + span if seconds > 0 else span + ' ago'})"
    )


def _span(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 1024**3:
        return f"{n / 1024**3:.1f} GB"
    return f"{n / MB:.1f} MB"


def render(doc: dict[str, Any], out: IO[str], now: dt.datetime | None = None) -> None:
    """``vantage status`` as plain lines."""
    now = now or dt.datetime.now(dt.UTC)
    c = doc["consent"]
    if c["given"]:
        how = "privacy.consent = true" if c["how"] == "config" else f"recorded {c['accepted_at']}"
        out.write(f"consent   given ({how})\n")
    else:
        out.write(f"consent   NOT GIVEN ({c['how']}): run `vantage consent`; nothing is measured\n")
    d = doc["daemon"]
    if d["running"]:
        what = d["activity"] + (f": {d['detail']}" if d["detail"] else "")
        out.write(
            f"daemon    running (pid {d['pid']}, since {_ago(d['started_at'], now)}); {what}\n"
        )
        if d["backoff_until"]:
            out.write(
                f"          backing off after {d['recent_crashes']} crashes until "
                f"{_ago(d['backoff_until'], now)}\n"
            )
    elif d["running"] is None:
        out.write("daemon    unknown: no permission to read its data directory (try sudo)\n")
    else:
        code = d["last_exit_code"]
        last = f" (last exit code {code}, {_ago(d['updated_at'], now)})" if code is not None else ""
        out.write(f"daemon    not running{last}\n")
    if doc["paused"]:
        p = doc["paused"]
        out.write(f"paused    {p['reason']}: {p['detail']} (since {_ago(p.get('since'), now)})\n")
    for s in doc["suites"]:
        out.write(f"suite     {s['name']} ({s['schedule']})\n")
        last = s["last_run"]
        if last:
            out.write(
                f"  last    {_ago(last['started_at'], now)}: {last['status']}, "
                f"{last['measurements']} measurements\n"
            )
        else:
            out.write("  last    never\n")
        due = parse_iso(s["next_run"])
        late = due is not None and due < now and not d["running"]
        when = _ago(s["next_run"], now) if s["next_run"] else "-"
        out.write(f"  next    {when}{'; runs when the daemon starts' if late else ''}\n")
        if s["missed"]:
            report = (s.get("last_missed") or {}).get("report", "")
            out.write(f"  missed  {s['missed']} run(s) in all; last: {report}\n")
        if s.get("pending"):
            out.write(f"  pending since {_ago(s.get('pending'), now)}: waits out the residual "
                      "gap (made when the daemon runs)\n")  # fmt: skip
        if s.get("last_skip"):
            out.write(f"  skipped {_ago(s.get('last_skipped'), now)}: {s['last_skip']}\n")
        if s.get("last_error"):
            out.write(f"  error   {s['last_error']}\n")
    if doc["open_events"]:
        for e in doc["open_events"]:
            kinds = ", ".join(e["blocking"]) or "-"
            out.write(
                f"blocked   {e['service']}: {e['status']} ({kinds}) since {_ago(e['since'], now)}\n"
            )
    else:
        out.write("blocked   no open blocking event\n")
    st = doc["storage"]
    if st["database"] is None:
        out.write(
            f"storage   no database yet in {st['data_dir']}; {_size(st['free_bytes'])} free\n"
        )
    else:
        out.write(
            f"storage   {st['database']}: {_size(st['database_bytes'])}; "
            f"{_size(st['free_bytes'])} free (pause below {_size(st['min_free_bytes'])})\n"
        )
    backlog = doc["outbox"]["backlog"]
    if backlog is not None:
        out.write(f"outbox    {backlog} measurement(s) waiting for upload\n")
