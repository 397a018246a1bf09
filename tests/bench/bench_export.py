"""Export benchmark: rows per second and peak memory per format, next to DuckDB.

    python -m tests.bench.bench_export [--rows 1000000] [--formats jsonl,csv,parquet,ooni]
                                       [--db PATH] [--regenerate] [--no-duckdb]

Generates (once, cached under /tmp) a SQLite database of N measurements shaped as the
store writes them (``tests.export.dataset.generate_database``: whole catalog runs, DNS
answers, certificate chains, redirect chains, bodies, verdicts), then runs
``vantage export`` for each format in its own process and prints wall time, rows/s, output
size and peak RSS (psutil, sampled, and the kernel's ru_maxrss). For reference it prints
what reading the same rows costs with plain ``sqlite3`` (no parsing: the floor any
exporter in Python pays), and DuckDB making the same Parquet table from the same SQLite
tables. DuckDB's sqlite extension is used when it loads offline; otherwise that is said
and the raw rows reach DuckDB through Python (Arrow batches), DuckDB doing the JSON
extraction, aggregation and Parquet writing.

Goals (issue 7): JSONL and CSV >= 50,000 rows/s; every format < 300 MB peak RSS; Parquet
within 3x of DuckDB. The figures depend on the machine: the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
GENERATOR_VERSION = 1
FORMATS = ("jsonl", "csv", "parquet", "ooni")


def _database(rows: int, path: Path | None, regenerate: bool) -> Path:
    path = path or Path(tempfile.gettempdir()) / f"vantage-bench-export-{rows}.db"
    meta = path.with_suffix(".meta.json")
    wanted = {"rows": rows, "generator": GENERATOR_VERSION}
    if not regenerate and path.exists():
        if not meta.exists() or json.loads(meta.read_text()) == wanted:
            print(f"database: {path} (cached, {path.stat().st_size / 1e9:.2f} GB)")
            return path
    sys.path.insert(0, str(ROOT))
    from tests.export.dataset import generate_database

    print(f"generating {rows:,} measurements into {path} ...", flush=True)
    started = time.monotonic()
    generate_database(path, rows)
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    meta.write_text(json.dumps(wanted))
    print(f"  {time.monotonic() - started:.0f} s, {path.stat().st_size / 1e9:.2f} GB")
    return path


def _high_water(pid: int) -> int:
    """Peak resident memory of ``pid`` so far, bytes (VmHWM: starts afresh at exec)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _watch(proc: subprocess.Popen[bytes]) -> float:
    """Wait for ``proc``; its peak RSS in MB (the high-water mark, and psutil's RSS)."""
    watched = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, _high_water(proc.pid), watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    return peak / 2**20


def _run(argv: list[str]) -> tuple[float, float, str]:
    """Run ``argv``; (wall seconds, peak RSS in MB, stderr)."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    peak = _watch(proc)
    elapsed = time.monotonic() - started
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:6])} failed ({proc.returncode}):\n{err}")
    return elapsed, peak, err


def _raw_read(db: Path, rows: int) -> float:
    """Seconds plain sqlite3 takes to read the measurements in export order, chunk by
    chunk, with their observations (text only, nothing parsed)."""
    con = sqlite3.connect(db)
    con.execute("PRAGMA cache_size=-32768")
    started = time.monotonic()
    ids = con.execute("SELECT measurement_uid FROM measurements ORDER BY start_time, "
                      "measurement_uid")  # fmt: skip
    while True:
        chunk = [r[0] for r in ids.fetchmany(1000)]
        if not chunk:
            break
        marks = ",".join("?" * len(chunk))
        con.execute(f"SELECT * FROM measurements WHERE measurement_uid IN ({marks})",
                    chunk).fetchall()  # fmt: skip
        con.execute(f"SELECT measurement_uid, kind, data FROM observations WHERE measurement_uid "
                    f"IN ({marks}) ORDER BY measurement_uid, kind, seq", chunk).fetchall()  # fmt: skip
    con.close()
    return time.monotonic() - started


DUCKDB_FLAT = """
COPY (
  WITH obs AS (
    SELECT measurement_uid,
      count(*) FILTER (kind = 'dns')::INTEGER AS dns_queries,
      list_distinct(list(json_extract_string(data, '$.rcode')) FILTER (kind = 'dns'))
        AS dns_rcodes,
      list_distinct(list(failure) FILTER (kind = 'dns' AND failure IS NOT NULL))
        AS dns_failures,
      list_distinct(flatten(list(
        list_transform(json_extract(data, '$.answers[*]')::JSON[],
                       lambda a: coalesce(a ->> 'ipv4', a ->> 'ipv6'))
      ) FILTER (kind = 'dns'))) AS dns_addresses,
      count(*) FILTER (kind = 'tcp')::INTEGER AS tcp_connects,
      count(*) FILTER (kind = 'tcp' AND failure IS NULL)::INTEGER AS tcp_successes,
      list_distinct(list(failure) FILTER (kind = 'tcp' AND failure IS NOT NULL))
        AS tcp_failures,
      count(*) FILTER (kind = 'tls')::INTEGER AS tls_handshakes,
      list_distinct(list(failure) FILTER (kind = 'tls' AND failure IS NOT NULL))
        AS tls_failures,
      first(json_extract_string(data, '$.tls_version') ORDER BY seq)
        FILTER (kind = 'tls' AND failure IS NULL) AS tls_version,
      count(*) FILTER (kind = 'http')::INTEGER AS http_requests,
      last(failure ORDER BY seq) FILTER (kind = 'http') AS http_failure,
      last(json_extract(data, '$.response.code')::INTEGER ORDER BY seq)
        FILTER (kind = 'http') AS http_status,
      last(json_extract_string(data, '$.request.url') ORDER BY seq)
        FILTER (kind = 'http') AS http_url,
      last(json_extract(data, '$.response.body_length')::BIGINT ORDER BY seq)
        FILTER (kind = 'http') AS http_body_length,
      last(json_extract_string(data, '$.response.body_sha256') ORDER BY seq)
        FILTER (kind = 'http') AS http_body_sha256,
      last(json_extract(data, '$.response.body_is_truncated')::BOOLEAN ORDER BY seq)
        FILTER (kind = 'http') AS http_body_is_truncated
    FROM o GROUP BY measurement_uid
  )
  SELECT m.measurement_uid, m.run_id AS report_id,
         (m.start_time || '+00')::TIMESTAMPTZ AS measurement_start_time, m.test_runtime,
         m.service, m.target_id, m.target_kind, m.input,
         json_extract(m.target, '$.control')::BOOLEAN AS control,
         vp.probe_id, vp.asn::BIGINT AS probe_asn, vp.cc AS probe_cc,
         vp.network_name AS probe_network_name, vp.network_type, vp.resolver_ip,
         vp.resolver_asn::BIGINT AS resolver_asn, vp.resolver_network_name,
         vp.software_version, m.accessible::BOOLEAN AS accessible, m.blocking,
         json_extract_string(m.verdict, '$.confidence') AS confidence,
         list_distinct(json_extract_string(m.verdict, '$.reasons[*].code')) AS reasons,
         m.failure, m.observation_count::INTEGER AS observation_count,
         obs.* EXCLUDE (measurement_uid)
  FROM m JOIN vp ON vp.id = m.vantage_point_id
  LEFT JOIN obs USING (measurement_uid)
  ORDER BY m.start_time, m.measurement_uid
) TO '{out}' (FORMAT parquet, COMPRESSION snappy)
"""

DUCKDB_SCRIPT = r"""
import sqlite3, sys, time, duckdb, pyarrow as pa
db, out, work = sys.argv[1], sys.argv[2], sys.argv[3]
con = duckdb.connect(work)
con.execute("SET preserve_insertion_order = false")
con.execute("SET autoinstall_known_extensions = false")  # never download: offline is the rule
how = "sqlite extension"
try:
    con.execute("LOAD sqlite_scanner")
    con.execute(f"ATTACH '{db}' AS s (TYPE sqlite, READ_ONLY)")
    for t in ("measurements", "observations", "vantage_points"):
        con.execute(f"CREATE VIEW {t[0] if t != 'vantage_points' else 'vp'} AS SELECT * FROM s.{t}")
except Exception as exc:
    how = ("DuckDB's sqlite extension cannot load offline (not installed, no download): "
           "the rows reach DuckDB through Python as Arrow batches")
    src = sqlite3.connect(db, check_same_thread=False)  # DuckDB pulls batches from its threads
    def load(name, query):
        cur = src.execute(query)
        cols = [d[0] for d in cur.description]
        def batches():
            while True:
                rows = cur.fetchmany(50000)
                if not rows:
                    return
                yield pa.RecordBatch.from_arrays(
                    [pa.array(list(c)) for c in zip(*rows)], names=cols)
        first = next(batches())
        reader = pa.RecordBatchReader.from_batches(first.schema, (b for g in ([first], batches()) for b in g))
        con.execute(f"CREATE TABLE {name} AS SELECT * FROM reader")
    load("m", "SELECT measurement_uid, run_id, vantage_point_id, start_time, test_runtime, service, "
              "target_id, target_kind, input, failure, observation_count, target, accessible, "
              "blocking, verdict FROM measurements")
    load("o", "SELECT measurement_uid, kind, seq, failure, data FROM observations")
    load("vp", "SELECT * FROM vantage_points")
loaded = time.monotonic()
con.execute(sys.argv[4].replace("{out}", out))
print(how)
"""


def _duckdb(db: Path, out: Path) -> tuple[float, float, str]:
    work = out.with_suffix(".duckdb")
    work.unlink(missing_ok=True)
    script = out.with_suffix(".py")
    script.write_text(DUCKDB_SCRIPT)
    argv = [sys.executable, str(script), str(db), str(out), str(work), DUCKDB_FLAT]
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = _watch(proc)
    elapsed = time.monotonic() - started
    how = (proc.stdout.read().decode() if proc.stdout else "").strip()
    if proc.returncode != 0:
        raise SystemExit(f"duckdb failed:\n{proc.stderr.read().decode() if proc.stderr else ''}")
    work.unlink(missing_ok=True)
    script.unlink(missing_ok=True)
    return elapsed, peak, how


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--db", type=Path, help="database to use/generate (default: cached in /tmp)")
    ap.add_argument("--regenerate", action="store_true")
    ap.add_argument("--no-duckdb", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=Path(tempfile.gettempdir()))
    args = ap.parse_args()
    db = _database(args.rows, args.db, args.regenerate)
    con = sqlite3.connect(db)
    rows = con.execute("SELECT count(*) FROM measurements").fetchone()[0]
    obs = con.execute("SELECT count(*) FROM observations").fetchone()[0]
    con.close()
    print(
        f"{rows:,} measurements, {obs:,} observations; {os.cpu_count()} CPUs, "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    raw = _raw_read(db, rows)
    print(f"{'sqlite3 read, no parsing':<26} {raw:7.1f} s {rows / raw:10,.0f} rows/s")
    results: dict[str, float] = {}
    for fmt in args.formats.split(","):
        out = args.out_dir / f"vantage-bench-export.{fmt}"
        out.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "probe", "export", "--format", fmt,
                "--db", f"sqlite:///{db}", "--out", str(out), "--force"]  # fmt: skip
        elapsed, peak, _ = _run(argv)
        results[fmt] = elapsed
        size = out.stat().st_size
        print(f"{'vantage export ' + fmt:<26} {elapsed:7.1f} s {rows / elapsed:10,.0f} rows/s "
              f"{size / 1e6:9,.0f} MB  peak RSS {peak:5.0f} MB", flush=True)  # fmt: skip
        out.unlink()
    if not args.no_duckdb:
        out = args.out_dir / "vantage-bench-export-duckdb.parquet"
        elapsed, peak, how = _duckdb(db, out)
        print(f"{'duckdb parquet':<26} {elapsed:7.1f} s {rows / elapsed:10,.0f} rows/s "
              f"{out.stat().st_size / 1e6:9,.0f} MB  peak RSS {peak:5.0f} MB\n  ({how})")  # fmt: skip
        out.unlink()
        if "parquet" in results:
            print(f"parquet: {results['parquet'] / elapsed:.2f}x DuckDB's time (goal <= 3x)")
    print("goals: jsonl, csv >= 50,000 rows/s; peak RSS < 300 MB; parquet <= 3x DuckDB")


if __name__ == "__main__":
    main()
