"""A due suite, in process: residual gap between runs sharing endpoints, the low-disk
pause (shown by ``vantage status``), draining a run, crash-loop records, systemd
notifications. Loopback only."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from probe.catalog import load_catalog
from probe.config import Config, ConfigError, SuiteSection, load_config
from probe.daemon.disk import MB, check_disk
from probe.daemon.notify import Notifier
from probe.daemon.runs import Ledger, SuiteRunner, suite_services
from probe.daemon.state import CRASH_LIMIT, DaemonState, backoff_seconds, read_state
from probe.daemon.status import gather, render
from probe.engine.context import Timeouts
from probe.engine.run import Run
from probe.store import Store
from schema.model import Measurement, Target
from tests.conftest import VANTAGE
from tests.daemon.harness import config_doc, write_catalog, write_config
from tests.fixtures import DNSServer


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    with DNSServer() as server:
        for name in ("shared.test", "other.test", "ctl.test"):
            server.set(name, a=["127.0.0.1"])
        yield server


def _setup(tmp_path: Path, dns: DNSServer, **sections: dict[str, Any]) -> tuple[Config, list]:
    lab = write_catalog(tmp_path / "lab.toml", [{"id": "a", "kind": "dns", "host": "shared.test"}])
    other = write_catalog(tmp_path / "other.toml",
                          [{"id": "o", "kind": "dns", "host": "other.test"}], name="other")  # fmt: skip
    controls = tmp_path / "controls.toml"
    controls.write_text('format = 1\n[service]\nname = "controls"\ncontrol = true\n'
                        '[[target]]\nid = "c"\nkind = "dns"\nhost = "ctl.test"\n')  # fmt: skip
    suites = {"a": {"services": ["lab"]}, "b": {"services": ["lab"]}, "c": {"services": ["other"]}}
    doc = config_doc(tmp_path / "data", dns.port, suites=suites, **sections)
    cfg = load_config(write_config(tmp_path / "v.toml", doc), env=os.environ)
    return cfg, load_catalog([lab, other, controls], builtin=False)


def _runner(cfg: Config, catalog: list, disk_free=lambda path: 10**12) -> SuiteRunner:
    store = Store.open(cfg.db_url())
    state = DaemonState(cfg.data_dir() / "daemon.json")
    state.start(os.getpid())
    return SuiteRunner(cfg, catalog, store, state, disk_free=disk_free)


def _runs(cfg: Config) -> list[tuple[str, dt.datetime, dt.datetime]]:
    db = sqlite3.connect(cfg.data_dir() / "vantage.db")
    rows = db.execute("SELECT suite, started_at, finished_at FROM runs ORDER BY started_at")
    return [(s, dt.datetime.fromisoformat(a), dt.datetime.fromisoformat(b)) for s, a, b in rows]


def test_suites_sharing_an_endpoint_wait_out_the_residual_gap(
    tmp_path: Path, dns: DNSServer
) -> None:
    cfg, catalog = _setup(tmp_path, dns, daemon={"residual_gap": 1.5})
    runner = _runner(cfg, catalog)

    async def main() -> tuple[float, float]:
        await runner.due("a")
        t0 = time.monotonic()
        await runner.due("c")  # other.test, and the controls just measured: no wait
        t1 = time.monotonic()
        await runner.due("b")  # shared.test again: waits
        return t1 - t0, time.monotonic() - t1

    c_took, b_took = asyncio.run(main())
    runner.store.close()
    runs = _runs(cfg)
    assert [r[0] for r in runs] == ["a", "c", "b"]
    (_, _, a_end), _, (_, b_start, _) = runs
    assert (b_start - a_end).total_seconds() >= 1.5  # the endpoint rested
    assert b_took >= 1.0 and c_took < 1.0  # control targets do not count


def test_residual_gap_is_remembered_across_a_restart(tmp_path: Path, dns: DNSServer) -> None:
    cfg, catalog = _setup(tmp_path, dns, daemon={"residual_gap": 30.0})
    runner = _runner(cfg, catalog)
    asyncio.run(runner.due("a"))
    runner.store.close()
    fresh = _runner(cfg, catalog)  # a new daemon process
    fresh.ledger.seed(fresh.store, time.time(), lookback=60.0)
    targets = [t for s in suite_services(catalog, cfg.suites[1]) for t in s.targets]
    wait, why = fresh.ledger.wait(targets, time.time())
    fresh.store.close()
    assert 25.0 < wait <= 30.0 and why == ["shared.test"]


def test_a_run_waiting_out_the_gap_when_the_daemon_stops_is_made_when_it_starts(
    tmp_path: Path, dns: DNSServer
) -> None:
    cfg, catalog = _setup(tmp_path, dns, daemon={"residual_gap": 30.0})
    runner = _runner(cfg, catalog)

    async def stopped_while_waiting() -> None:
        await runner.due("a")
        waiting = asyncio.ensure_future(runner.due("b"))  # shared.test: waits 30 s
        while runner.state.suite("b").get("pending") is None:
            await asyncio.sleep(0.01)
        await runner.stop(grace=1.0)  # the daemon stops during the wait
        await waiting

    asyncio.run(stopped_while_waiting())
    runner.store.close()
    assert [r[0] for r in _runs(cfg)] == ["a"]  # b was not measured...
    state = read_state(cfg.data_dir() / "daemon.json")
    assert state["suites"]["b"]["pending"]  # ...but it is not forgotten
    shown = io.StringIO()
    render(gather(cfg), shown)
    assert "pending since" in shown.getvalue()
    # The daemon comes back (the gap has passed): the run is made, and no longer pending.
    back = load_config(write_config(tmp_path / "v2.toml", config_doc(
        tmp_path / "data", dns.port, suites={"a": {"services": ["lab"]}, "b": {"services": ["lab"]}},
        daemon={"residual_gap": 0.0})), env=os.environ)  # fmt: skip
    fresh = _runner(back, catalog)
    assert fresh.pending_runs() == ["b"]
    for name in fresh.pending_runs():
        asyncio.run(fresh.due(name))
    fresh.store.close()
    assert [r[0] for r in _runs(cfg)] == ["a", "b"]
    assert fresh.pending_runs() == []


def test_ledger_keys_on_the_host_and_exempts_controls() -> None:
    ledger = Ledger(gap=180.0)
    web = Target(id="w", service="s", kind="http", host="Web.Example.", url="https://web.example/")
    tcp = Target(id="t", service="x", kind="tcp", host="web.example", ports=(5222,))
    ctl = Target(id="c", service="controls", kind="dns", host="ctl.example", control=True)
    ledger.record([web, ctl], at=1000.0)
    assert ledger.wait([tcp], now=1100.0) == (80.0, ["web.example"])
    assert ledger.wait([ctl], now=1001.0) == (0.0, [])
    assert ledger.wait([tcp], now=1180.0) == (0.0, [])


def test_unknown_suite_service_names_the_key(tmp_path: Path, dns: DNSServer) -> None:
    _, catalog = _setup(tmp_path, dns)
    with pytest.raises(ConfigError, match=r"suites.x.services: unknown service 'nope'"):
        suite_services(catalog, SuiteSection(name="x", services=("nope",)))
    every = suite_services(catalog, SuiteSection(name="all"))
    assert [s.name for s in every] == ["lab", "other", "controls"]  # controls join every suite


def test_low_disk_pauses_measuring_and_status_says_so(tmp_path: Path, dns: DNSServer) -> None:
    cfg, catalog = _setup(tmp_path, dns, retention={"min_free_mb": 256})
    free = {"bytes": 100 * MB}
    runner = _runner(cfg, catalog, disk_free=lambda path: free["bytes"])
    asyncio.run(runner.due("a"))
    assert _runs(cfg) == []  # skipped: nothing measured
    doc = gather(cfg, disk_free=lambda path: free["bytes"])
    assert doc["paused"]["reason"] == "low disk"
    assert "100 MB free" in doc["paused"]["detail"] and "256" in doc["paused"]["detail"]
    suite_a = next(s for s in doc["suites"] if s["name"] == "a")
    assert suite_a["last_skip"] == "low disk"
    lines: list[str] = []

    class Out:
        def write(self, text: str) -> None:
            lines.append(text)

    render(doc, Out())  # type: ignore[arg-type]
    assert any(line.startswith("paused    low disk: 100 MB free") for line in lines)
    # Space comes back: the next due run measures and the pause is lifted.
    free["bytes"] = 10 * 1024 * MB
    asyncio.run(runner.due("a"))
    runner.store.close()
    assert [r[0] for r in _runs(cfg)] == ["a"]
    assert gather(cfg)["paused"] is None


def test_disk_check_uses_the_nearest_existing_directory(tmp_path: Path) -> None:
    check = check_disk(tmp_path / "not" / "yet", 1)
    assert check.free > 0 and check.ok
    assert not check_disk(tmp_path, 1, disk_free=lambda path: MB - 1).ok


def test_drain_lets_in_flight_finish_and_skips_the_rest(make_ctx, dns_server) -> None:
    dns_server.set("slow.test", a=["127.0.0.1"], delay=0.4)
    targets = [Target(id=f"t{i}", service="s", kind="dns", host="slow.test") for i in range(5)]
    ctx = make_ctx(timeouts=Timeouts(dns=3, tcp=1, tls=1, http=1))

    async def go(run: Run) -> tuple[Any, list[Measurement]]:
        done: list[Measurement] = []

        async def sink(m: Measurement) -> None:
            done.append(m)

        asyncio.get_running_loop().call_later(0.1, run.drain)
        return await run.execute(sink), done

    outcome, done = asyncio.run(go(Run(targets, VANTAGE, ctx, concurrency=2, deadline=None)))
    assert outcome.status == "interrupted" and outcome.measured == 2 and outcome.skipped == 3
    assert all("interrupted" not in m.annotations for m in done)  # they finished
    assert all(any(q.query_type == "A" and q.failure is None for q in m.queries) for m in done)
    # Drained when every target had started: nothing was left out, the run is complete.
    outcome, done = asyncio.run(go(Run(targets[:2], VANTAGE, ctx, concurrency=2, deadline=None)))
    assert outcome.status == "complete" and outcome.measured == 2


def test_crash_loop_records_and_back_off(tmp_path: Path) -> None:
    path = tmp_path / "daemon.json"
    state = DaemonState(path)
    assert state.start(100) == 0
    state.end(0)  # a clean stop is no crash
    assert DaemonState(path).start(101) == 0
    # Killed (still marked running), twice, then a crash exit code.
    assert DaemonState(path).start(102) == 1
    assert DaemonState(path).start(103) == 2
    s = DaemonState(path)
    assert s.start(104) == 3
    s.end(70)
    assert DaemonState(path).start(105) == 4
    assert backoff_seconds(CRASH_LIMIT - 1) == 0
    assert backoff_seconds(CRASH_LIMIT) == 60 and backoff_seconds(CRASH_LIMIT + 1) == 120
    assert backoff_seconds(50) == 3600
    # Old crashes are forgiven.
    doc = read_state(path)
    doc["crashes"] = ["2020-01-01T00:00:00+00:00"] * 5
    doc["running"] = False
    doc["exit_code"] = 0
    path.write_text(json.dumps(doc))
    assert DaemonState(path).start(106) == 0
    # A damaged file starts afresh rather than failing.
    path.write_text("{not json")
    assert DaemonState(path).start(107) == 0


def test_notifier_sends_datagrams_and_never_blocks(tmp_path: Path) -> None:
    path = str(tmp_path / "n.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
        assert n.watchdog_interval() == 2.0
        n.ready("measuring 1 suite(s)")
        assert sock.recv(4096) == b"READY=1\nSTATUS=measuring 1 suite(s)"
        started = time.monotonic()
        for _ in range(5000):  # nobody reads: the queue fills, sending must not block
            n.watchdog()
        assert time.monotonic() - started < 5
    finally:
        sock.close()
    assert Notifier.from_env({}).watchdog_interval() is None
    Notifier.from_env({}).ready("nothing happens outside systemd")
    other = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval() is None  # the watchdog is another process's
