"""The store: round trips, atomic batches, migrations, and a run killed mid-way."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from probe.store import BatchWriter, Store, StoreError
from schema import tables, wire
from tests.conftest import VALID, http_target, run_measure
from tests.fixtures import DNSServer, WebServer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path: Path):
    s = Store.open(f"sqlite:///{tmp_path / 'v.db'}")
    yield s
    s.close()


def _measurement(dns_server: DNSServer, web: WebServer, ctx, path: str = "/redirect/1"):
    dns_server.set(VALID, a=["127.0.0.1"], aaaa=["::1"])
    return run_measure(http_target(f"https://{VALID}:{web.port}{path}"), ctx)


def _begin(store: Store, m) -> None:
    store.begin_run(m.run_id, "test", m.vantage, m.start_time)


def test_round_trip_is_exact(store: Store, dns_server, web, ctx) -> None:
    m = _measurement(dns_server, web, ctx)
    assert len(m.requests) == 3 and m.tls_handshakes[0].peer_certificates
    _begin(store, m)
    store.write_measurements([m])
    assert store.load_measurement(m.measurement_uid) == m
    (doc,) = list(store.iter_documents())
    assert doc == json.loads(json.dumps(wire.to_wire(m)))


def test_a_failing_batch_stores_nothing(store: Store, dns_server, web, ctx) -> None:
    first = _measurement(dns_server, web, ctx)
    second = _measurement(dns_server, web, ctx, "/")
    _begin(store, first)
    store.write_measurements([first])
    with pytest.raises(StoreError, match="UNIQUE constraint failed"):
        store.write_measurements([second, first])  # first is a duplicate: the batch fails
    assert store.count() == 1
    assert store.load_measurement(second.measurement_uid) is None
    assert store.count(tables.observations) == first.observation_count()


def test_migrations_match_the_tables(tmp_path: Path) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    s = Store.open(f"sqlite:///{tmp_path / 'm.db'}")
    with s.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), tables.metadata)
    s.close()
    assert diff == []
    # Opening again is a no-op and keeps data.
    Store.open(f"sqlite:///{tmp_path / 'm.db'}").close()


def test_bad_url_is_a_clear_error() -> None:
    with pytest.raises(StoreError, match="not a database URL"):
        Store.open("not a url")


def test_batch_writer_reports_only_after_commit(store: Store, dns_server, web, ctx) -> None:
    import asyncio

    m = _measurement(dns_server, web, ctx)
    _begin(store, m)
    seen: list[int] = []

    async def stored(x) -> None:
        seen.append(store.count())  # already in the database when reported

    async def go() -> None:
        writer = BatchWriter(store, stored, batch_size=10, max_delay=0.05)
        await writer.add(m)
        assert seen == []
        await asyncio.sleep(0.3)

    asyncio.run(go())
    assert seen == [1]


def _catalog(path: Path, port: int, n: int) -> None:
    lines = ["format = 1", "[service]", 'name = "slow"']
    for i in range(n):
        lines += ["[[target]]", f'id = "t{i}"', 'kind = "http"',
                  f'url = "https://{VALID}:{port}/slow?delay=0.4"']  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def _run_args(
    catalog: Path, db: Path, tmp: Path, dns_port: int, ca_file: str, concurrency: int
) -> list[str]:
    """`vantage run` against loopback fixtures, printing JSON lines."""
    return [sys.executable, "-m", "probe", "run", "--json", "--no-builtin",
            "--targets", str(catalog), "--db", f"sqlite:///{db}", "--data-dir", str(tmp / "d"),
            "--no-system-resolver", "--resolver", f"udp://127.0.0.1:{dns_port}",
            "--ca-bundle", ca_file, "--public-range", "127.0.0.0/8",
            "--concurrency", str(concurrency)]  # fmt: skip


def test_run_killed_midway_leaves_only_whole_measurements(tmp_path: Path, certs, ca_file) -> None:
    with DNSServer() as dns_server, WebServer(default_ssl=certs.valid(VALID)) as web:
        dns_server.set(VALID, a=["127.0.0.1"])
        catalog = tmp_path / "slow.toml"
        _catalog(catalog, web.port, 400)
        db = tmp_path / "kill.db"
        proc = subprocess.Popen(
            _run_args(catalog, db, tmp_path, dns_server.port, ca_file, concurrency=8),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT,
        )  # fmt: skip
        assert proc.stdout is not None
        reported = [proc.stdout.readline() for _ in range(20)]  # 20 measurements are stored
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert all(json.loads(line)["test_keys"]["failure"] is None for line in reported)
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    rows = con.execute(
        "SELECT m.measurement_uid, m.observation_count, COUNT(o.id) FROM measurements m "
        "LEFT JOIN observations o ON o.measurement_uid = m.measurement_uid GROUP BY 1, 2"
    ).fetchall()
    con.close()
    assert 20 <= len(rows) < 400  # killed mid-way, after what was reported
    assert all(count == expected for _, expected, count in rows)  # no half-written one
    stored = Store.open(f"sqlite:///{db}")
    uids = {json.loads(line)["measurement_uid"] for line in reported}
    assert all(stored.load_measurement(uid) is not None for uid in uids)
    stored.close()


def test_ctrl_c_stops_cleanly_and_keeps_what_finished(tmp_path: Path, certs, ca_file) -> None:
    with DNSServer() as dns_server, WebServer(default_ssl=certs.valid(VALID)) as web:
        dns_server.set(VALID, a=["127.0.0.1"])
        catalog = tmp_path / "slow.toml"
        _catalog(catalog, web.port, 200)
        db = tmp_path / "int.db"
        errors = tmp_path / "stderr.txt"
        with errors.open("w") as err_file:
            proc = subprocess.Popen(
                _run_args(catalog, db, tmp_path, dns_server.port, ca_file, concurrency=4),
                stdout=subprocess.PIPE, stderr=err_file, text=True, cwd=ROOT,
            )  # fmt: skip
            assert proc.stdout is not None
            first = [proc.stdout.readline() for _ in range(8)]
            proc.send_signal(signal.SIGINT)
            # The rest through the same buffered reader: communicate() would read the
            # pipe's descriptor and lose what readline() had read ahead (a line seen cut).
            rest = proc.stdout.read()
            proc.wait(timeout=30)
        err = errors.read_text()
    assert proc.returncode == 130, err
    printed = [json.loads(line) for line in first + rest.splitlines() if line.strip()]
    assert 8 <= len(printed) < 200 and "(interrupted)" in err
    # The ones in flight at Ctrl-C are kept and say so; nothing printed is missing.
    assert any(d["annotations"].get("interrupted") == "true" for d in printed)
    con = sqlite3.connect(db)
    assert con.execute("SELECT status, measurement_count FROM runs").fetchall() == [
        ("interrupted", len(printed))
    ]
    con.close()
