"""A real ``vantage daemon`` process: SIGTERM mid-run, SIGHUP reloads, systemd
notifications, ``vantage status`` while it runs and after, consent. Loopback only."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.harness import (
    DaemonProcess,
    config_doc,
    env_without_consent,
    vantage,
    write_catalog,
    write_config,
)
from tests.fixtures import DNSServer, TCPServer


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    with DNSServer() as server:
        server.set("fast.test", a=["127.0.0.1"])
        server.set("slow.test", a=["127.0.0.1"])
        yield server


def _fast_catalog(path: Path) -> Path:
    return write_catalog(path, [{"id": "fast", "kind": "dns", "host": "fast.test"}])


def _status(config: Path) -> dict:
    proc = vantage("--config", str(config), "status", "--json")
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def test_sigterm_mid_run_keeps_what_finished_and_marks_what_was_cut(
    tmp_path: Path, dns: DNSServer
) -> None:
    data = tmp_path / "data"
    with TCPServer("blackhole") as hole:
        catalog = write_catalog(tmp_path / "c.toml", [
            {"id": "fast", "kind": "dns", "host": "fast.test"},
            {"id": "slow1", "kind": "tcp", "host": "slow.test", "ports": [hole.port]},
            {"id": "slow2", "kind": "tcp", "host": "slow.test", "ports": [hole.port]},
        ])  # fmt: skip
        config = write_config(tmp_path / "v.toml", config_doc(data, dns.port))
        with DaemonProcess(config, catalog, data) as daemon:
            daemon.wait_state(lambda s: s.get("activity") == "measuring")
            time.sleep(1.0)  # the DNS target is done; the connects hang (30 s timeout)
            sent = time.monotonic()
            daemon.signal(signal.SIGTERM)
            code = daemon.wait(timeout=30)
            took = time.monotonic() - sent
    assert code == 0, daemon.log()
    assert took < 1.0 + 6.0  # stop_timeout, then cancel, write and exit
    assert "have 1 s to finish" in daemon.log()
    assert "cancelling the measurements still in flight" in daemon.log()
    db = sqlite3.connect(data / "vantage.db")
    (run_id, status, count), *more = db.execute(
        "SELECT run_id, status, measurement_count FROM runs"
    ).fetchall()
    assert not more and status == "interrupted" and count == 3
    rows = {
        target: json.loads(annotations)
        for target, annotations in db.execute(
            "SELECT target_id, annotations FROM measurements WHERE run_id = ?", (run_id,)
        )
    }
    assert set(rows) == {"fast", "slow1", "slow2"}
    assert "interrupted" not in rows["fast"]
    assert rows["slow1"]["interrupted"] == rows["slow2"]["interrupted"] == "true"
    failures = {f for (f,) in db.execute("SELECT failure FROM observations WHERE kind = 'tcp'")}
    assert failures == {"interrupted"}
    state = json.loads((data / "daemon.json").read_text())
    assert state["running"] is False and state["exit_code"] == 0


def test_sighup_rejects_a_bad_config_and_applies_a_good_one(tmp_path: Path, dns: DNSServer) -> None:
    data = tmp_path / "data"
    catalog = _fast_catalog(tmp_path / "c.toml")
    good = config_doc(data, dns.port, suites={"s": {"interval": 3600.0, "jitter": 0.1}})
    config = write_config(tmp_path / "v.toml", good)
    with DaemonProcess(config, catalog, data) as daemon:
        daemon.wait_for_line("vantage daemon running")
        before = _status(config)["suites"][0]["next_run"]
        assert before is not None
        config.write_text(config.read_text() + "\n# broken\n[engine]\nconcurrency = -1\n")
        mark = len(daemon.lines)
        daemon.signal(signal.SIGHUP)
        line = daemon.wait_for_line("reload of .* rejected", start=mark)
        assert "duplicate" in line or "engine" in line  # the reason names the key
        # An unknown service in a suite is rejected too, naming the key.
        bad = config_doc(data, dns.port, suites={"s": {"interval": 3600.0, "services": ["nope"]}})
        write_config(config, bad)
        mark = len(daemon.lines)
        daemon.signal(signal.SIGHUP)
        line = daemon.wait_for_line("reload of .* rejected", start=mark)
        assert "suites.s.services: unknown service 'nope'" in line
        assert daemon.proc.poll() is None
        assert _status(config)["suites"][0]["next_run"] == before  # the old one runs on
        # A good one with a new schedule reschedules the suite.
        write_config(config, config_doc(data, dns.port,
                                        suites={"s": {"interval": 7200.0, "jitter": 0.1}}))  # fmt: skip
        mark = len(daemon.lines)
        daemon.signal(signal.SIGHUP)
        daemon.wait_for_line("configuration reloaded", start=mark)
        assert daemon.wait_for_line("suite s: rescheduled", start=mark)
        status = _status(config)
        assert status["suites"][0]["next_run"] != before
        assert status["suites"][0]["schedule"] == "every 7200 s +- 10%"
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0


def test_a_bad_config_value_is_rejected_on_reload_naming_the_key(
    tmp_path: Path, dns: DNSServer
) -> None:
    data = tmp_path / "data"
    catalog = _fast_catalog(tmp_path / "c.toml")
    doc = config_doc(data, dns.port, suites={"s": {"interval": 3600.0}})
    config = write_config(tmp_path / "v.toml", doc)
    with DaemonProcess(config, catalog, data) as daemon:
        daemon.wait_for_line("vantage daemon running")
        doc["engine"]["concurrency"] = -1
        write_config(config, doc)
        daemon.signal(signal.SIGHUP)
        line = daemon.wait_for_line("reload of .* rejected")
        assert "engine.concurrency: must be at least 1, got -1" in line
        assert daemon.proc.poll() is None


def test_systemd_notifications(tmp_path: Path, dns: DNSServer) -> None:
    data = tmp_path / "data"
    catalog = _fast_catalog(tmp_path / "c.toml")
    config = write_config(tmp_path / "v.toml", config_doc(data, dns.port,
                          suites={"s": {"interval": 3600.0}}))  # fmt: skip
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="200000")
    got: list[str] = []

    def receive(until: float) -> None:
        deadline = time.monotonic() + until
        while time.monotonic() < deadline:
            try:
                got.append(sock.recv(4096).decode())
            except TimeoutError:
                pass

    try:
        with DaemonProcess(config, catalog, data, env=env) as daemon:
            daemon.wait_for_line("vantage daemon running")
            receive(0.8)
            daemon.signal(signal.SIGHUP)
            daemon.wait_for_line("configuration reloaded")
            receive(0.3)
            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0
            receive(0.3)
    finally:
        sock.close()
    assert any("READY=1" in m and "STATUS=measuring 1 suite" in m for m in got), got
    assert sum("WATCHDOG=1" in m for m in got) >= 3  # every 0.1 s
    assert any("RELOADING=1" in m and "MONOTONIC_USEC=" in m for m in got)
    assert any(m.startswith("STOPPING=1") for m in got)


def test_status_while_running_and_after(tmp_path: Path, dns: DNSServer) -> None:
    data = tmp_path / "data"
    catalog = _fast_catalog(tmp_path / "c.toml")
    config = write_config(tmp_path / "v.toml", config_doc(data, dns.port))
    with DaemonProcess(config, catalog, data) as daemon:
        daemon.wait_for_line("suite s: run .* complete: 1 of 1")
        running = _status(config)
        assert running["daemon"]["running"] is True
        assert running["daemon"]["pid"] == daemon.proc.pid
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
    doc = _status(config)
    assert doc["daemon"]["running"] is False and doc["daemon"]["last_exit_code"] == 0
    assert doc["consent"]["given"] is True and doc["consent"]["how"] == "config"
    (suite,) = doc["suites"]
    assert suite["name"] == "s" and suite["schedule"] == "every 0.5 s +- 0%"
    last = suite["last_run"]
    db = sqlite3.connect(data / "vantage.db")
    runs = db.execute("SELECT count(*) FROM runs WHERE suite = 's'").fetchone()[0]
    newest, status, count = db.execute(
        "SELECT run_id, status, measurement_count FROM runs ORDER BY started_at DESC LIMIT 1"
    ).fetchone()
    # Every 0.5 s a run starts: SIGTERM may land before the newest run's one target began
    # (then it is interrupted, with nothing measured) or after (complete, 1 measurement).
    assert (status, count) in (("complete", 1), ("interrupted", 0))
    assert last["run_id"] == newest
    assert (last["status"], last["measurements"]) == (status, count)
    assert suite["next_run"] is not None  # from the job store
    measured = db.execute("SELECT count(*) FROM measurements").fetchone()[0]
    assert measured == runs - (count == 0)  # one target per run that began measuring
    assert doc["outbox"]["backlog"] == measured  # nothing uploads here
    storage = doc["storage"]
    assert storage["database_bytes"] >= (data / "vantage.db").stat().st_size > 0
    assert storage["free_bytes"] > 0 and storage["min_free_bytes"] == 0
    assert doc["open_events"] == [] and doc["paused"] is None
    text = vantage("--config", str(config), "status")
    assert text.returncode == 0
    assert "daemon    not running (last exit code 0" in text.stdout
    assert f"{status}, {count} measurements" in text.stdout
    assert f"outbox    {measured} measurement(s) waiting" in text.stdout


def test_one_daemon_per_data_directory(tmp_path: Path, dns: DNSServer) -> None:
    data = tmp_path / "data"
    catalog = _fast_catalog(tmp_path / "c.toml")
    config = write_config(tmp_path / "v.toml", config_doc(data, dns.port,
                          suites={"s": {"interval": 3600.0}}))  # fmt: skip
    with DaemonProcess(config, catalog, data) as first:
        first.wait_for_line("vantage daemon running")
        with DaemonProcess(config, catalog, data) as second:
            assert second.wait(timeout=60) == 75
            assert "another vantage daemon is using" in second.log()
        assert first.proc.poll() is None


def test_daemon_and_run_refuse_to_measure_without_consent(tmp_path: Path, dns: DNSServer) -> None:
    data = tmp_path / "data"
    catalog = _fast_catalog(tmp_path / "c.toml")
    config = write_config(tmp_path / "v.toml", config_doc(data, dns.port))
    env = env_without_consent()
    with DaemonProcess(config, catalog, data, env=env) as daemon:
        assert daemon.wait(timeout=60) == 77
    assert "no consent is recorded" in daemon.log() and "vantage consent" in daemon.log()
    assert not (data / "vantage.db").exists()  # nothing measured, nothing stored
    run = vantage("--config", str(config), "run", "--no-builtin", "--targets", str(catalog),
                  env=env)  # fmt: skip
    assert run.returncode == 77 and "vantage consent" in run.stderr
    assert not (data / "vantage.db").exists()
    # Once accepted, both measure.
    accepted = vantage("--config", str(config), "consent", "--yes", env=env)
    assert accepted.returncode == 0 and "THE RISKS" in accepted.stdout
    run = vantage("--config", str(config), "run", "--no-builtin", "--targets", str(catalog),
                  "--json", env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[0])["target"]["id"] == "fast"
