"""The daemon's small state file, ``<data_dir>/daemon.json``, and crash-loop records.

``vantage status`` runs in another process while the daemon measures: what it cannot
read from the database (is the daemon up, what is it doing, is it paused, which runs
were missed, is it backing off after crashes) the daemon writes here. The file is
replaced atomically (write, fsync, rename), and only when something changes, so an SD
card is not worn by it.

Crash-loop protection: each start records itself (``running: true``) and a clean exit
records its exit code. A start that finds the previous one still marked running (it
was killed, lost power, or crashed) or ended with an unexpected code counts a crash.
After :data:`CRASH_LIMIT` crashes within :data:`CRASH_WINDOW` seconds the daemon waits
before measuring, twice as long after each further crash, up to :data:`MAX_BACKOFF`
(systemd keeps restarting it; backing off keeps a broken probe from hammering its SD
card and the network, and leaves time to look at it).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("vantage.daemon")

STATE_FILE = "daemon.json"
LOCK_FILE = "daemon.lock"  # held by the running daemon (one per data directory)
JOB_PREFIX = "suite:"  # the schedule's job id of a suite (status reads the job store)
CRASH_WINDOW = 900.0  # seconds: crashes older than this are forgiven
CRASH_LIMIT = 3  # this many crashes in the window start the back-off
FIRST_BACKOFF = 60.0
MAX_BACKOFF = 3600.0
#: Exit codes that are not crashes: clean stop, no consent (77), bad catalog (65) or
#: configuration (78): restarting cannot fix those, and systemd is told not to.
CLEAN_EXITS = frozenset({0, 65, 77, 78})


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.astimezone(dt.UTC).isoformat(timespec="seconds")


def parse_iso(text: Any) -> dt.datetime | None:
    if not isinstance(text, str):
        return None
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def read_state(path: Path) -> dict[str, Any]:
    """The state file's content; {} when it is missing or damaged (never raises)."""
    try:
        doc = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    return True


def backoff_seconds(crashes: int) -> float:
    """How long to wait before measuring after ``crashes`` recent crashes."""
    if crashes < CRASH_LIMIT:
        return 0.0
    return min(FIRST_BACKOFF * 2 ** (crashes - CRASH_LIMIT), MAX_BACKOFF)


class DaemonState:
    """The state file of a running daemon. Every change is saved at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.doc: dict[str, Any] = {}

    # -- starting and ending ---------------------------------------------------------

    def start(self, pid: int, now: dt.datetime | None = None) -> int:
        """Record this start; returns the number of recent crashes (this one's
        predecessor included when it did not end cleanly)."""
        now = now or utcnow()
        previous = read_state(self.path)
        crashes = [t for t in map(parse_iso, previous.get("crashes") or []) if t is not None]
        # The caller holds the data directory's lock: a predecessor still marked
        # running is gone without saying so (killed, power cut, crash).
        ended_badly = previous.get("running") is True
        code = previous.get("exit_code")
        if ended_badly or (previous.get("running") is False and code not in CLEAN_EXITS):
            crashes.append(parse_iso(previous.get("updated_at")) or now)
        recent = [t for t in crashes if (now - t).total_seconds() <= CRASH_WINDOW]
        self.doc = {
            "pid": pid,
            "running": True,
            "started_at": iso(now),
            "activity": "starting",
            "detail": "",
            "paused": None,
            "backoff_until": None,
            "crashes": [iso(t) for t in recent],
            "suites": previous.get("suites") if isinstance(previous.get("suites"), dict) else {},
            "retention": previous.get("retention"),
        }
        self.save(now)
        return len(recent)

    def end(self, exit_code: int) -> None:
        self.doc.update(running=False, exit_code=exit_code, activity="stopped", detail="")
        self.save()

    # -- what the daemon is doing ------------------------------------------------------

    def activity(self, what: str, detail: str = "") -> None:
        self.doc.update(activity=what, detail=detail)
        self.save()

    def backoff(self, until: dt.datetime | None) -> None:
        self.doc["backoff_until"] = iso(until)
        self.save()

    def pause(self, reason: str, detail: str) -> None:
        paused = self.doc.get("paused")
        since = paused.get("since") if isinstance(paused, dict) else None
        self.doc["paused"] = {"reason": reason, "detail": detail, "since": since or iso(utcnow())}
        self.save()

    def unpause(self) -> None:
        if self.doc.get("paused") is not None:
            self.doc["paused"] = None
            self.save()

    def suite(self, name: str) -> dict[str, Any]:
        suites = self.doc.setdefault("suites", {})
        entry = suites.get(name)
        if not isinstance(entry, dict):
            entry = suites[name] = {"missed": 0}
        return entry

    def missed(self, name: str, count: int, report: dict[str, Any]) -> None:
        entry = self.suite(name)
        entry["missed"] = int(entry.get("missed") or 0) + count
        entry["last_missed"] = report
        self.save()

    def suite_result(self, name: str, **fields: Any) -> None:
        self.suite(name).update(fields)
        self.save()

    def retention(self, report: dict[str, Any]) -> None:
        self.doc["retention"] = report
        self.save()

    # -- writing -----------------------------------------------------------------------

    def save(self, now: dt.datetime | None = None) -> None:
        """Replace the file atomically; a failure is logged, never raised (the daemon
        measures whether or not status can be shown)."""
        self.doc["updated_at"] = iso(now or utcnow())
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(self.doc, fh, indent=1, sort_keys=True)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot write the state file %s: %s", self.path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()
