"""Service statuses and blocking events kept in SQL across runs."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from probe.analysis import ServiceStatus, decide
from probe.store import Store
from tests.conftest import VANTAGE

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def test_a_block_seen_twice_past_residual_blocking_becomes_an_event(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'e.db'}")
    statuses = ["blocked", "ok", "blocked", "blocked", "ok"]
    actions = []
    for i, status in enumerate(statuses):
        run_id = f"run-{i}"
        store.begin_run(run_id, "whatsapp", VANTAGE, T0 + dt.timedelta(minutes=10 * i))
        blocking = ("dns",) if status == "blocked" else ()
        store.write_service_statuses(
            run_id, [ServiceStatus("whatsapp", status, blocking, ("web",), "x")]
        )
        history = store.service_history(VANTAGE.probe_id, "whatsapp")
        is_open = store.open_event(VANTAGE.probe_id, "whatsapp") is not None
        decision = decide(history, is_open)
        store.apply_decision(VANTAGE, "whatsapp", decision)
        actions.append(decision.action)
    assert actions == ["none", "none", "start", "none", "end"]
    (event,) = store.events(VANTAGE.probe_id)
    assert event["status"] == "blocked" and event["blocking"] == ["dns"]
    assert event["runs"] == ["run-0", "run-2", "run-4"]  # what started it, and what ended it
    assert event["started_at"].replace(tzinfo=dt.UTC) == T0
    assert event["ended_at"].replace(tzinfo=dt.UTC) == T0 + dt.timedelta(minutes=40)
    assert store.open_event(VANTAGE.probe_id, "whatsapp") is None
    store.close()
