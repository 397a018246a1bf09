"""Ingest throughput: measurements per second through the collector's API into PostgreSQL,
next to a raw ``COPY`` of the same rows into the same tables (the ceiling).

    VANTAGE_TEST_PG=postgresql+psycopg://vantage:vantage@127.0.0.1:5432/postgres \\
        python -m tests.bench.bench_ingest [--measurements 20000] [--clients 4] [--batch 500]

The API side is a real ``vantage collector serve`` process on loopback; ``--clients``
threads (one enrolled probe each, one keep-alive connection each) post gzipped batches
of ``--batch`` wire measurements as the probe's outbox does. Each measurement is what
the engine produces for an HTTPS target: two DNS queries with raw answers, two TCP
connects, a TLS handshake with a two-certificate chain, one request whose body was
truncated (``--body`` bytes kept; the engine keeps up to 64 KiB), and a verdict:
about 10.7 KB of JSON with the default 4 KiB body, 6 observations.

The ceiling: the rows the collector would write (built by the collector's own code
before the clock starts) copied with psycopg's ``COPY`` into a fresh database, over
``--clients`` connections, one transaction per batch, as the API does.

Each side runs in a fresh database created on the server ``VANTAGE_TEST_PG`` names
(dropped afterwards). Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import sqlalchemy as sa

from collectors import auth
from collectors.app import open_engine
from collectors.ingest import _M_NAMES, _O_NAMES, compile_validator, prepare
from collectors.settings import CollectorSettings
from probe.store import vantage_fingerprint
from schema import tables
from tests.collectors.samples import doc
from tests.fixtures.tcpserver import closed_port

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    base = sa.make_url(admin_url)
    name = f"vt_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def batches(probes: list[str], n: int, batch: int, body: int) -> list[tuple[int, list[dict]]]:
    """``n`` measurements in batches of ``batch``, spread over the probes' runs."""
    out = []
    made = 0
    while made < n:
        k = len(out) % len(probes)
        size = min(batch, n - made)
        run = str(uuid.uuid4())
        out.append((k, [doc(probes[k], run, made + i, body_size=body) for i in range(size)]))
        made += size
    return out


def parallel(jobs: list[Any], workers: int, work: Callable[[int, Any], None]) -> float:
    """Run ``work(worker, job)`` over ``jobs`` with ``workers`` threads; wall seconds."""
    q: queue.Queue[Any] = queue.Queue()
    for job in jobs:
        q.put(job)
    errors: list[BaseException] = []

    def run(worker: int) -> None:
        while True:
            try:
                job = q.get_nowait()
            except queue.Empty:
                return
            try:
                work(worker, job)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    threads = [threading.Thread(target=run, args=(w,)) for w in range(workers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - start
    if errors:
        raise errors[0]
    return took


def through_api(db: str, work: list[tuple[int, list[dict]]], probes: list[str], clients: int,
                tmp: Path, workers: int = 1) -> tuple[float, float]:  # fmt: skip
    """Seconds to ingest ``work`` through a real server, and its CPU seconds meanwhile."""
    engine = open_engine(CollectorSettings(db=db, pool_size=1))
    credentials = {}
    for probe_id in probes:
        token, _ = auth.create_token(engine)
        credentials[probe_id] = auth.enroll(engine, token, probe_id).credential
    engine.dispose()
    port = closed_port()
    log = (tmp / "bench-collector.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "probe", "collector", "serve", "--db", db, "--port", str(port),
         "--upload-rate", "1e9", "--upload-burst", "1e9", "--workers", str(workers)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/api/v1/health", trust_env=False, timeout=1).is_success:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the collector did not start; see bench-collector.log")
            time.sleep(0.1)
        bodies = [
            (probes[k], gzip.compress(json.dumps({"measurements": items}).encode(), 6))
            for k, items in work
        ]
        sessions = [
            httpx.Client(base_url=url, trust_env=False, timeout=300) for _ in range(clients)
        ]

        def post(worker: int, job: tuple[str, bytes]) -> None:
            probe_id, body = job
            r = sessions[worker].post(
                "/api/v1/measurements",
                content=body,
                headers={"Authorization": f"Bearer {credentials[probe_id]}",
                         "Content-Encoding": "gzip", "Content-Type": "application/json",
                         "X-Vantage-Backlog": "0"},
            )  # fmt: skip
            answer = r.json()
            if r.status_code != 200 or answer["rejected"] or answer["duplicate"]:
                raise RuntimeError(f"upload answered {r.status_code}: {r.text[:300]}")

        parent = psutil.Process(server.pid)
        processes = [parent, *parent.children(recursive=True)]
        before = sum(sum(p.cpu_times()[:2]) for p in processes)
        took = parallel(bodies, clients, post)
        used = sum(sum(p.cpu_times()[:2]) for p in processes) - before
        for s in sessions:
            s.close()
        return took, used
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        log.close()


def raw_copy(db: str, work: list[tuple[int, list[dict]]], probes: list[str], clients: int) -> float:
    """Seconds to COPY the same rows (built beforehand by the collector's code)."""
    engine = open_engine(CollectorSettings(db=db, pool_size=1))
    validate = compile_validator()
    jobs = []
    vp_ids: dict[str, int] = {}
    with engine.begin() as conn:
        for _, items in work:
            prepared = [prepare(i, d, validate) for i, d in enumerate(items)]
            fp = vantage_fingerprint(prepared[0].vantage)
            if fp not in vp_ids:
                vp_ids[fp] = conn.execute(
                    tables.vantage_points.insert()
                    .values(fingerprint=fp, **prepared[0].vantage_row)
                    .returning(tables.vantage_points.c.id)
                ).scalar_one()
            conn.execute(tables.runs.insert().values(
                run_id=prepared[0].run_id, suite="", started_at=prepared[0].start_time,
                status="uploaded", vantage_point_id=vp_ids[fp], measurement_count=0))  # fmt: skip
            m_rows, o_rows = [], []
            for item in prepared:
                item.measurement_row["vantage_point_id"] = vp_ids[fp]
                m_rows.append([item.measurement_row[n] for n in _M_NAMES])
                o_rows += [[row[n] for n in _O_NAMES] for row in item.observation_rows]
            jobs.append((m_rows, o_rows))
    engine.dispose()
    plain = sa.make_url(db).set(drivername="postgresql").render_as_string(hide_password=False)
    connections = [psycopg.connect(plain) for _ in range(clients)]

    def copy(worker: int, job: tuple[list[list[Any]], list[list[Any]]]) -> None:
        conn = connections[worker]
        with conn.cursor() as cur:
            with cur.copy(f"COPY measurements ({', '.join(_M_NAMES)}) FROM STDIN") as cp:
                for row in job[0]:
                    cp.write_row(row)
            with cur.copy(f"COPY observations ({', '.join(_O_NAMES)}) FROM STDIN") as cp:
                for row in job[1]:
                    cp.write_row(row)
        conn.commit()

    try:
        return parallel(jobs, clients, copy)
    finally:
        for c in connections:
            c.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--measurements", type=int, default=20000)
    p.add_argument("--clients", type=int, default=4, help="parallel connections (and probes)")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--workers", type=int, default=1, help="collector worker processes")
    p.add_argument("--body", type=int, default=4096, help="bytes of HTTP body kept per measurement")
    p.add_argument("--pg", default=os.environ.get("VANTAGE_TEST_PG"), help="admin URL")
    args = p.parse_args(argv)
    if not args.pg:
        print("set VANTAGE_TEST_PG (or --pg) to a PostgreSQL role that may create databases",
              file=sys.stderr)  # fmt: skip
        return 2
    probes = [str(uuid.uuid4()) for _ in range(args.clients)]
    print(f"generating {args.measurements} measurements ...", file=sys.stderr)
    work = batches(probes, args.measurements, args.batch, args.body)
    size = sum(len(json.dumps(items)) for _, items in work) / args.measurements
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    with fresh_database(args.pg) as db:
        api, server_cpu = through_api(db, work, probes, args.clients, tmp, args.workers)
        with sa.create_engine(db).connect() as conn:
            stored = conn.execute(sa.text("SELECT count(*) FROM measurements")).scalar()
        assert stored == args.measurements, stored
    with fresh_database(args.pg) as db:
        ceiling = raw_copy(db, work, probes, args.clients)
    n = args.measurements
    print(f"measurements: {n} x {size / 1024:.1f} KiB JSON ({args.body} B body), "
          f"batches of {args.batch}, {args.clients} clients, gzip, "
          f"{args.workers} collector worker(s)")  # fmt: skip
    print(f"through the API : {n / api:8.0f} measurements/s  ({api:.1f} s; "
          f"server CPU {server_cpu / n * 1e6:.0f} us/measurement)")  # fmt: skip
    print(f"raw COPY        : {n / ceiling:8.0f} measurements/s  ({ceiling:.1f} s)")
    print(f"API / COPY      : {api / ceiling:8.2f}x the time of COPY (goal: within 3x; "
          f"{'met' if api / ceiling <= 3 else 'NOT met'})")  # fmt: skip
    print(f"goal 5000/s     : {'met' if n / api >= 5000 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
