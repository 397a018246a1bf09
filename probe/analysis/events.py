"""Blocking events: a block is declared when it repeats, and ended when it stops.

A single bad run is not a block (a timeout, a flaky Wi-Fi). The detector looks at a
service's statuses in the last runs from one vantage point: a block *starts* when at
least ``needed`` of the last ``window`` runs found it blocked or partial, those runs
at least ``spacing`` seconds apart (past the Great Firewall's 90-180 s residual
blocking, so one trigger is not counted twice), while the control targets worked;
it *ends* at the first run that finds the service ok. Pure: the store keeps state.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

BLOCKED = ("blocked", "partial")


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    started_at: dt.datetime
    status: str  # a service status of that run
    blocking: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    action: str  # "start" | "end" | "none"
    runs: tuple[str, ...] = ()
    status: str = ""
    blocking: tuple[str, ...] = ()
    at: dt.datetime | None = None


def decide(
    history: Sequence[RunStatus],
    event_open: bool,
    *,
    window: int = 3,
    needed: int = 2,
    spacing: float = 180.0,
) -> Decision:
    """What to do after the newest run. ``history`` is oldest first, newest last."""
    if not history:
        return Decision("none")
    newest = history[-1]
    if event_open:
        if newest.status == "ok":
            return Decision("end", (newest.run_id,), at=newest.started_at)
        return Decision("none")
    if newest.status not in BLOCKED:
        return Decision("none")
    recent = list(history[-window:])
    counted: list[RunStatus] = []
    for run in recent:  # keep blocked runs spaced past residual blocking
        if run.status not in BLOCKED:
            continue
        if counted and (run.started_at - counted[-1].started_at).total_seconds() < spacing:
            continue
        counted.append(run)
    if len(counted) < needed:
        return Decision("none")
    kinds = tuple(sorted({k for run in counted for k in run.blocking}))
    status = "blocked" if all(r.status == "blocked" for r in counted) else "partial"
    return Decision("start", tuple(r.run_id for r in counted), status, kinds, counted[0].started_at)
