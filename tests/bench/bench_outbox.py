"""Outbox benchmark: does ``vantage upload`` stay in constant memory as the backlog grows?

Run from the repository root::

    python -m tests.bench.bench_outbox [--sizes 1000,10000,40000] [--batch 500]

For each backlog size it stores that many measurements (every observation kind,
a few kB each on the wire) in a fresh SQLite store, enrolls the probe at a loopback
stand-in collector that remembers uids only (``tests.outbox.standin``), runs
``vantage upload`` in a child process and prints the child's peak RSS, the time and
the rate, and its largest RSS while the first and while the last quarter of the
backlog went up. Constant memory: the RSS does not grow as the backlog is sent (the
last quarter costs what the first did) nor much with the backlog's size. Only
127.0.0.1 is contacted.

Exit status: 0 when every upload drained its backlog with each measurement received
exactly once; 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from probe.outbox.enrollment import Enrollment, enrollment_path, write_enrollment
from probe.store import Store
from probe.vantage import probe_id
from tests.outbox.conftest import make_config, measurements, write
from tests.outbox.standin import StandIn

ROOT = Path(__file__).resolve().parents[2]
CHILD = (
    "import resource, sys\n"
    "from probe.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def one(size: int, batch: int, workdir: Path) -> tuple[bool, str]:
    data = workdir / f"n{size}"
    cfg = make_config(data)
    store = Store.open(cfg.db_url())
    pid = probe_id(cfg.data_dir())
    t0 = time.perf_counter()
    uids = write(store, measurements(pid, size))
    written = time.perf_counter() - t0
    store.close()  # checkpoints the WAL into the database file
    db_mb = (data / "vantage.db").stat().st_size / 1e6
    with StandIn(keep=False) as sink:
        write_enrollment(
            enrollment_path(cfg),
            Enrollment(sink.url, pid, sink.credential, dt.datetime.now(dt.UTC)),
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("VANTAGE_")}
        env |= {"VANTAGE_PROBE_DATA_DIR": str(data), "VANTAGE_COLLECTOR_BATCH_SIZE": str(batch)}
        t0 = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-c", CHILD, "upload"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)  # fmt: skip
        quarter, late = _sample(child, sink, size)
        out, err = child.communicate(timeout=3600)
        took = time.perf_counter() - t0
        received = [u for r in sink.received for u in r.uids]
    rss = next((int(line.split()[1]) for line in err.splitlines() if line.startswith("MAXRSS")), 0)
    ok = child.returncode == 0 and sorted(received) == sorted(uids)
    line = (
        f"{size:>8} {db_mb:>8.1f} {written:>8.1f} {took:>8.1f} {size / took:>9.0f} "
        f"{rss / 1024:>9.1f} {quarter:>9.1f} {late:>9.1f}  "
        f"{'ok' if ok else 'FAILED: ' + err.strip()[-300:]}"
    )
    return ok, line


def _sample(child: subprocess.Popen[str], sink: StandIn, size: int) -> tuple[float, float]:
    """The child's largest RSS (MiB) while the first quarter of the backlog went up, and
    while the last quarter did: equal when memory does not grow with what was sent."""
    proc = psutil.Process(child.pid)
    early = late = 0.0
    while child.poll() is None:
        try:
            rss = proc.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            break
        done = sum(len(r.uids) for r in sink.received)
        if done <= size // 4:
            early = max(early, rss)
        elif done >= size * 3 // 4:
            late = max(late, rss)
        time.sleep(0.02)
    return early, late


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,40000", help="backlog sizes, comma-separated")
    ap.add_argument("--batch", type=int, default=500, help="collector.batch_size")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"vantage upload, batch {args.batch}, SQLite store, loopback stand-in collector")
    print(f"{'backlog':>8} {'db MB':>8} {'write s':>8} {'upload s':>8} {'meas./s':>9} "
          f"{'peak MiB':>9} {'1st 25%':>9} {'last 25%':>9}")  # fmt: skip
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench-outbox-") as tmp:
        for size in sizes:
            good, line = one(size, args.batch, Path(tmp))
            print(line, flush=True)
            ok &= good
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
