"""Memory of a real ``vantage daemon``: idle, and at its peak during runs.

Run from the repository root::

    python -m tests.bench.bench_daemon_memory [--n 60] [--runs 2] [--interval 12] [--json]
                                              [--importtime]

The fixture servers (``tests.fixtures.benchserver``: DNS answering every name under
bench.test with 127.0.0.1, HTTPS with a certificate for ``*.bench.test``) run in their
own process. The daemon runs as systemd would start it (``vantage daemon`` with a
configuration file), one suite of ``--n`` HTTPS targets on loopback every
``--interval`` seconds (60 is about the built-in catalog, 53 targets; try 200 for a
big one). Its resident set (RSS) is sampled with psutil every 20 ms and sorted by
what the daemon says it does (its state file): idle before the first run, measuring,
idle between runs. The peak over its life comes from the kernel (``VmHWM``), so a
short spike between samples is not missed. The database is created (migrated)
beforehand, as it is on every start but the first after an install or upgrade.
``--importtime`` runs the daemon under ``python -X importtime`` and prints what it
imported, by package, slowest first: where to look when the figures grow.

Goals (issue 5): idle under 60 MB, under 120 MB during a run. Only loopback
(127.0.0.0/8) is ever contacted.

Exit status: 0 when the benchmark ran and every run measured its targets (whether or
not the goals were met); 1 when it could not run; 2 when runs failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from probe.store import Store
from probe.tomltable import to_toml
from tests.bench.bench_engine import BenchError, start_server, stop_server
from tests.fixtures.benchserver import bench_name

REPO_ROOT = Path(__file__).resolve().parents[2]
GOAL_IDLE_MB = 60.0
GOAL_RUN_MB = 120.0
SAMPLE_S = 0.02
SETTLE_S = 1.0  # seconds after a run before the daemon counts as idle again
START_TIMEOUT = 60.0

EX_OK = 0
EX_CANNOT_RUN = 1
EX_RUNS_FAILED = 2


def _write_files(workdir: Path, info: dict[str, Any], n: int, interval: float) -> Path:
    targets = [{"id": f"t{i}", "kind": "http",
                "url": f"https://{bench_name(i)}:{info['https_port']}/"} for i in range(n)]  # fmt: skip
    catalog = workdir / "catalog.toml"
    catalog.write_text(to_toml({"format": 1, "service": {"name": "bench"}, "target": targets}))
    config = {
        "probe": {"data_dir": str(workdir / "data")},
        "vantage": {"resolver_whoami": ""},
        "dns": {"system": False, "resolvers": [f"udp://127.0.0.1:{info['dns_port']}"]},
        "engine": {
            "ca_bundle": [str(info["ca"])],
            "system_cas": False,
            "public_ranges": ["127.0.0.0/8"],
            "control_sni": "",
        },  # fmt: skip
        "daemon": {"residual_gap": 0, "stop_timeout": 5},
        "retention": {"min_free_mb": 0},
        "suites": {"bench": {"interval": interval, "jitter": 0.0}},
    }
    path = workdir / "vantage.toml"
    path.write_text(to_toml(config))
    return catalog


def _state(data: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((data / "daemon.json").read_text()))
    except (OSError, ValueError):
        return {}


def _imports(log: str) -> list[tuple[str, float]]:
    """Cumulative import time (ms) of each top-level package, slowest first."""
    own: dict[str, float] = defaultdict(float)
    for line in log.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if m:
            own[m.group(2).split(".")[0]] += int(m.group(1)) / 1000
    return sorted(own.items(), key=lambda kv: -kv[1])


def benchmark(n: int, runs: int, interval: float, importtime: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vantage-bench-daemon-") as tmp:
        workdir = Path(tmp)
        server, info = start_server(n, workdir)
        try:
            catalog = _write_files(workdir, info, n, interval)
            data = workdir / "data"
            # A probe's database exists but on its very first start: migrating it (alembic,
            # once after an install or upgrade) is not what the daemon's days look like.
            Store.open(f"sqlite:///{data / 'vantage.db'}").close()
            env = dict(os.environ, VANTAGE_PRIVACY_CONSENT="true")  # loopback only
            env.pop("NOTIFY_SOCKET", None)
            cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "probe",
                   "--config", str(workdir / "vantage.toml"), "daemon", "--no-builtin",
                   "--targets", str(catalog)]  # fmt: skip
            log_path = workdir / "daemon.log"
            with log_path.open("w") as log:
                proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                                        stderr=log)  # fmt: skip
            try:
                samples = _sample(proc, data, runs)
                hwm = _high_water_mark(proc.pid)
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
            text = log_path.read_text(errors="replace")
        finally:
            stop_server(server)
    completed = re.findall(r"suite bench: run \S+ (\w+): (\d+) of (\d+) targets measured", text)
    result: dict[str, Any] = {
        "n": n,
        "runs": [{"status": s, "measured": int(m), "targets": int(t)} for s, m, t in completed],
        "exit_code": proc.returncode,
        "idle_before_first_run_mb": _mb(max(samples["idle-before"], default=0)),
        "peak_in_run_sampled_mb": _mb(max(samples["measuring"], default=0)),
        "idle_between_runs_mb": _mb(max(samples["idle-after"], default=0)),
        "peak_lifetime_mb": round(hwm / 1024, 1),
        "samples": {k: len(v) for k, v in samples.items()},
    }
    idle = max(result["idle_before_first_run_mb"], result["idle_between_runs_mb"])
    result["goal"] = {
        "idle_mb_max": GOAL_IDLE_MB,
        "run_mb_max": GOAL_RUN_MB,
        "idle_met": idle < GOAL_IDLE_MB,
        "run_met": result["peak_lifetime_mb"] < GOAL_RUN_MB,
    }
    if importtime:
        result["imports_ms"] = [(name, round(ms, 1)) for name, ms in _imports(text)[:20]]
    if proc.returncode != 0:
        raise BenchError(f"the daemon exited with {proc.returncode}:\n{text[-3000:]}")
    return result


def _high_water_mark(pid: int) -> int:
    """The process's peak RSS so far, in KiB (``VmHWM``: since its exec, unlike
    ``wait4``'s ``ru_maxrss``, which also counts the forked image of this benchmark)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise BenchError("no VmHWM in /proc (not Linux?)")


def _mb(rss: int) -> float:
    return round(rss / (1024 * 1024), 1)


def _sample(proc: subprocess.Popen[bytes], data: Path, runs: int) -> dict[str, list[int]]:
    """RSS samples by phase, until ``runs`` runs finished and an idle spell after."""
    ps = psutil.Process(proc.pid)
    samples: dict[str, list[int]] = defaultdict(list)
    started = time.monotonic()
    finished_runs = 0
    last_run = None
    idle_after_since: float | None = None
    while True:
        if proc.poll() is not None:
            raise BenchError(f"the daemon exited with {proc.returncode} early")
        try:
            rss = ps.memory_info().rss
        except psutil.Error as exc:
            raise BenchError(f"cannot read the daemon's memory: {exc}") from exc
        state = _state(data)
        activity = state.get("activity")
        suite = (state.get("suites") or {}).get("bench", {})
        run = suite.get("last_run")
        if run is not None and run != last_run:
            finished_runs += 1
            last_run = run
        if activity == "measuring":
            samples["measuring"].append(rss)
            idle_after_since = None
        elif activity == "idle" and not suite.get("last_started"):
            samples["idle-before"].append(rss)
        elif activity == "idle" and finished_runs == 0:
            pass  # the first run is starting or ending: neither idle nor measuring yet
        elif activity == "idle":
            idle_after_since = idle_after_since or time.monotonic()
            settled = time.monotonic() - idle_after_since > SETTLE_S
            if settled:  # the run has let go of what it held
                samples["idle-after"].append(rss)
            if finished_runs >= runs and settled and len(samples["idle-after"]) > 25:
                return samples
        if finished_runs == 0 and time.monotonic() - started > START_TIMEOUT + 600:
            raise BenchError("no run finished in time")
        time.sleep(SAMPLE_S)


def print_report(r: dict[str, Any]) -> None:
    for i, run in enumerate(r["runs"], 1):
        print(f"run {i}: {run['status']}, {run['measured']} of {run['targets']} measured")
    print(f"idle before the first run: {r['idle_before_first_run_mb']:.1f} MB RSS")
    print(f"during runs (sampled every {SAMPLE_S * 1000:.0f} ms): "
          f"{r['peak_in_run_sampled_mb']:.1f} MB RSS at most")  # fmt: skip
    print(f"idle between runs ({SETTLE_S:g} s after a run): {r['idle_between_runs_mb']:.1f} MB RSS")
    print(f"peak over the daemon's life (kernel VmHWM): {r['peak_lifetime_mb']:.1f} MB")
    g = r["goal"]
    print(f"goal: idle < {g['idle_mb_max']:g} MB: {'MET' if g['idle_met'] else 'NOT MET'}; "
          f"during a run < {g['run_mb_max']:g} MB: {'MET' if g['run_met'] else 'NOT MET'}")  # fmt: skip
    if "imports_ms" in r:
        print("imports (ms, by top-level package): " +
              ", ".join(f"{name} {ms:g}" for name, ms in r["imports_ms"]))  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_daemon_memory")
    parser.add_argument("--n", type=int, default=60, help="HTTPS targets per run (default 60)")
    parser.add_argument("--runs", type=int, default=2, help="runs to watch (default 2)")
    parser.add_argument("--interval", type=float, default=12.0,
                        help="seconds between runs (default 12)")  # fmt: skip
    parser.add_argument("--importtime", action="store_true", help="also list what it imported")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args(argv)
    if args.n < 1 or args.runs < 1 or args.interval <= 0:
        parser.error("--n and --runs must be at least 1, --interval positive")
    try:
        result = benchmark(args.n, args.runs, args.interval, args.importtime)
    except BenchError as exc:
        print(f"bench_daemon_memory: cannot run: {exc}", file=sys.stderr)
        return EX_CANNOT_RUN
    failed = [r for r in result["runs"] if r["measured"] != r["targets"]]
    if args.json:
        print(json.dumps(result))
    else:
        print_report(result)
    return EX_RUNS_FAILED if failed or not result["runs"] else EX_OK


if __name__ == "__main__":
    raise SystemExit(main())
