"""The probe's outbox against a REAL collector: ``vantage collector serve`` in its own
process on loopback, on PostgreSQL (helper fixture ``tests.collectors.conftest``).

Counted on both sides: every measurement the probe queued is on the collector exactly
once, and the probe's outbox is empty, whatever happened on the way (the collector
down for a while, the probe killed mid-upload, a revoked credential, rejections, a
restart)."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from probe.outbox import Outcome, backlog, enroll, rejected_counts, upload_loop, upload_now
from probe.store import Store
from schema import tables
from tests.collectors.conftest import CollectorProcess, _migrated
from tests.outbox.conftest import ROOT, Probe, make_config, measurements, outbox_rows, write
from tests.outbox.conftest import vantage_cli as cli

FAST = ["--upload-rate", "1000000", "--upload-burst", "1000000"]


@pytest.fixture
def collector(pg_url: str, tmp_path: Path) -> Iterator[CollectorProcess]:
    """A real collector process on PostgreSQL without a rate limit in the way (the
    rate limit's own test is below)."""
    _migrated(pg_url)
    proc = CollectorProcess(pg_url, tmp_path, extra=FAST)
    proc.start()
    try:
        yield proc
    finally:
        proc.close()


def uids_on(c: CollectorProcess) -> list[str]:
    with c.engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT measurement_uid FROM measurements")).scalars())


def probe_row(c: CollectorProcess, probe_id: str) -> dict:
    with c.engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT * FROM probes WHERE probe_id = :p"), {"p": probe_id}
        ).one()
    return dict(row._mapping)


def enrolled(probe: Probe, c: CollectorProcess) -> Probe:
    enroll(probe.cfg, c.url, c.enroll_token())
    return probe


def test_enroll_upload_and_nothing_duplicated(tmp_path: Path, collector: CollectorProcess) -> None:
    data = tmp_path / "probe"
    proc = cli("enroll", collector.url, "--token", collector.enroll_token(), data_dir=data)
    assert proc.returncode == 0, proc.stderr
    cfg = make_config(data)
    store = Store.open(cfg.db_url())
    pid = (data / "probe_id").read_text().strip()
    uids = write(store, measurements(pid, 1200))
    observations = store.count(tables.observations)
    store.close()

    proc = cli("upload", data_dir=data)
    assert proc.returncode == 0, proc.stderr
    assert "1200 accepted, 0 already there, 0 rejected; 0 waiting" in proc.stdout
    assert sorted(uids_on(collector)) == sorted(uids)
    assert collector.count("observations") == observations
    row = probe_row(collector, pid)
    assert row["backlog"] == 0 and row["last_upload_at"] is not None

    # Again: nothing is pending, nothing is sent.
    proc = cli("upload", data_dir=data)
    assert proc.returncode == 0 and "0 accepted, 0 already there" in proc.stdout
    # An acknowledgement lost on the way (queued again): acknowledged as duplicates.
    store = Store.open(cfg.db_url())
    with store.engine.begin() as conn:
        conn.execute(tables.outbox.insert(), [
            {"measurement_uid": u, "queued_at": dt.datetime.now(dt.UTC)} for u in uids[:100]
        ])  # fmt: skip
    store.close()
    proc = cli("upload", data_dir=data)
    assert proc.returncode == 0 and "0 accepted, 100 already there" in proc.stdout
    assert collector.count("measurements") == 1200


def test_the_collector_down_for_a_while_then_back(
    probe: Probe, collector: CollectorProcess
) -> None:
    p = enrolled(probe, collector).with_config(
        collector__interval="0.3", collector__max_backoff="0.5", collector__batch_size="100"
    )
    uids = p.queue(300)
    collector.stop()
    proc = cli("upload", data_dir=p.cfg.data_dir())
    assert proc.returncode == 75 and "cannot reach" in proc.stderr
    assert backlog(p.store) == 300

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(upload_loop(p.cfg, p.store, stop))
        await asyncio.sleep(2)  # failed passes, backing off
        uids.extend(await asyncio.to_thread(p.queue, 200))  # measuring goes on meanwhile
        await asyncio.to_thread(collector.start)
        deadline = time.monotonic() + 60
        while await asyncio.to_thread(backlog, p.store):
            assert time.monotonic() < deadline, "the backlog did not drain"
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait_for(task, 10)

    asyncio.run(main())
    on_collector = uids_on(collector)
    assert len(on_collector) == len(set(on_collector)) == 500
    assert set(on_collector) == set(uids)
    assert outbox_rows(p.store) == {}


def _acked_bytes(port: int) -> int:
    """Bytes the peer acknowledged on the established connections to ``port`` (from the
    kernel's TCP info, ``ss -ti``), counted only when nothing is left unsent."""
    out = subprocess.run(["ss", "-tinH", "state", "established", "dport", "=", f":{port}"],
                         capture_output=True, text=True, check=False).stdout  # fmt: skip
    total = 0
    for info in out.splitlines():
        acked = re.search(r"\bbytes_acked:(\d+)", info)
        unsent = re.search(r"\bnotsent:(\d+)", info)
        if acked and not unsent and "unacked:" not in info:
            total += int(acked.group(1))
    return total


def test_a_probe_killed_mid_upload_loses_and_duplicates_nothing(
    tmp_path: Path, collector: CollectorProcess
) -> None:
    """SIGSTOP the probe once its first batch (1000 measurements) is on the wire, let
    the collector commit it, then SIGKILL the probe: the collector has the batch, the
    probe never saw the acknowledgement. The next upload sends it again, it is
    acknowledged as duplicates, and each measurement is on the collector once."""
    data = tmp_path / "probe"
    cfg = make_config(data)
    store = Store.open(cfg.db_url())
    e = enroll(cfg, collector.url, collector.enroll_token())
    uids = write(store, measurements(e.probe_id, 3000))
    store.close()
    env = {"VANTAGE_PROBE_DATA_DIR": str(data), "VANTAGE_COLLECTOR_BATCH_SIZE": "1000",
           "VANTAGE_PRIVACY_CONSENT": "true", "PATH": "/usr/bin:/bin"}  # fmt: skip
    upload = subprocess.Popen([sys.executable, "-m", "probe", "upload"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        # In flight: the first batch's request is written whole (the kernel has every
        # byte of it acknowledged), the collector not done with it yet. The upload asks
        # the collector's whoami first, a few hundred bytes on the same connection.
        while _acked_bytes(collector.port) < 20_000:
            assert upload.poll() is None and time.monotonic() < deadline, upload.stderr
            time.sleep(0.005)
        upload.send_signal(signal.SIGSTOP)
        stored_while_stopped = collector.count("measurements")
        while collector.count("measurements") < 1000:  # the collector commits the batch
            assert time.monotonic() < deadline, collector.output()
            time.sleep(0.05)
    finally:
        upload.kill()
        upload.wait()
    assert stored_while_stopped < 1000, "the batch was done before the probe was stopped"
    store = Store.open(cfg.db_url())
    try:
        assert backlog(store) == 3000  # the acknowledgement never arrived
        report = asyncio.run(upload_now(cfg, store))
        assert report.outcome is Outcome.DRAINED
        assert (report.accepted, report.duplicate) == (2000, 1000)
        assert backlog(store) == 0 and outbox_rows(store) == {}
    finally:
        store.close()
    on_collector = uids_on(collector)
    assert len(on_collector) == 3000 and set(on_collector) == set(uids)


def test_a_revoked_credential(probe: Probe, collector: CollectorProcess) -> None:
    p = enrolled(probe, collector)
    p.queue(5)
    assert asyncio.run(upload_now(p.cfg, p.store)).accepted == 5
    revoke = cli("collector", "probes", "revoke", p.probe_id, data_dir=p.cfg.data_dir(),
                 env={"VANTAGE_COLLECTOR_DB": collector.db})  # fmt: skip
    assert revoke.returncode == 0, revoke.stderr
    uids = p.queue(3)
    proc = cli("upload", data_dir=p.cfg.data_dir())
    assert proc.returncode == 77 and "re-enroll" in proc.stderr
    assert set(outbox_rows(p.store)) == set(uids)  # kept for the next credential
    # A revoked id stays revoked until the operator restores it (issue 18).
    proc = cli("enroll", collector.url, "--token", collector.enroll_token(), "--force",
               data_dir=p.cfg.data_dir())  # fmt: skip
    assert proc.returncode != 0 and "restore" in proc.stderr
    restore = cli("collector", "probes", "restore", p.probe_id, data_dir=p.cfg.data_dir(),
                  env={"VANTAGE_COLLECTOR_DB": collector.db})  # fmt: skip
    assert restore.returncode == 0, restore.stderr
    # Re-enrolled (the probe id is the same, its old credential revoked): all arrive.
    proc = cli("enroll", collector.url, "--token", collector.enroll_token(), "--force",
               data_dir=p.cfg.data_dir())  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    proc = cli("upload", data_dir=p.cfg.data_dir())
    assert proc.returncode == 0 and "3 accepted" in proc.stdout, proc.stderr
    assert collector.count("measurements") == 8


def test_rejected_items_are_kept_and_marked(probe: Probe, collector: CollectorProcess) -> None:
    p = enrolled(probe, collector)
    good = p.queue(4)
    bad = p.queue(2)
    # Damage two stored measurements so the wire schema refuses them.
    with p.store.engine.begin() as conn:
        conn.execute(
            tables.measurements.update()
            .where(tables.measurements.c.measurement_uid.in_(bad))
            .values(blocking="by-carrier-pigeon")
        )
    report = asyncio.run(upload_now(p.cfg, p.store))
    assert report.outcome is Outcome.DRAINED
    assert (report.accepted, report.rejected) == (4, 2), report.rejected_reasons
    rows = outbox_rows(p.store)
    assert set(rows) == set(bad)
    assert all(r["last_error"].startswith("rejected (vantage ") for r in rows.values())
    assert sum(rejected_counts(p.store).values()) == 2 and backlog(p.store) == 0
    assert set(uids_on(collector)) == set(good)
    # They are not sent again.
    again = asyncio.run(upload_now(p.cfg, p.store))
    assert (again.accepted, again.duplicate, again.rejected) == (0, 0, 0)


def test_the_outbox_survives_a_probe_restart(tmp_path: Path, collector: CollectorProcess) -> None:
    cfg = make_config(tmp_path / "probe")
    store = Store.open(cfg.db_url())
    e = enroll(cfg, collector.url, collector.enroll_token())
    uids = write(store, measurements(e.probe_id, 50))
    store.close()  # the probe stops (power cut, upgrade) before uploading
    store = Store.open(cfg.db_url())
    try:
        assert backlog(store) == 50
        assert asyncio.run(upload_now(cfg, store)).accepted == 50
    finally:
        store.close()
    assert sorted(uids_on(collector)) == sorted(uids)


def test_the_rate_limit_is_waited_out(pg_url: str, tmp_path: Path, probe: Probe) -> None:
    """A collector with a small per-probe rate: ``vantage upload`` follows its
    Retry-After and still drains everything."""
    _migrated(pg_url)
    c = CollectorProcess(pg_url, tmp_path, extra=["--upload-rate", "25", "--upload-burst", "50"])
    c.start()
    try:
        p = enrolled(probe, c).with_config(collector__batch_size="50")
        uids = p.queue(200)
        waits: list[float] = []

        async def sleep(seconds: float) -> None:
            waits.append(seconds)
            await asyncio.sleep(seconds)

        report = asyncio.run(upload_now(p.cfg, p.store, sleep=sleep))
        assert report.outcome is Outcome.DRAINED and report.accepted == 200
        assert waits and all(0 < w <= 5 for w in waits)  # it was told to wait, and did
        assert sorted(uids_on(c)) == sorted(uids)
    finally:
        c.close()
