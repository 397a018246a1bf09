"""End-to-end engine benchmark: N full DNS+TCP+TLS+HTTPS measurements, stored.

Run from the repository root::

    python -m tests.bench.bench_engine [--n 500] [--concurrency 16] [--json]
    python -m tests.bench.bench_engine --versus-curl [--n 500] [--rounds 3]

``--versus-curl`` runs, against the same fixture server and the same URLs, alternating,
``vantage run`` as a process (the whole command: catalog, discovery, engine, verdicts,
SQLite store) and ``curl --parallel --parallel-max 16``, and prints each one's median
wall time, the ratio and vantage's peak RSS. Goal (issue 17): at most 2x curl's wall time
for 500 HTTPS targets, peak RSS under 120 MB, every measurement accessible.

The fixture servers (DNS answering every name under bench.test with 127.0.0.1,
HTTPS with a cert for ``*.bench.test``) run in a separate process
(``tests.fixtures.benchserver``) so their CPU does not share this process's GIL.
This process runs the engine exactly as ``vantage run`` does, with the SQLite
store and batch writer, and reports wall time, CPU, peak RSS and correctness.
Only loopback (127.0.0.0/8) is ever contacted.

Exit status: 0 when the benchmark ran and >= 95% of measurements fully
succeeded (whether or not the performance goal was met); 1 when the benchmark
could not run; 2 when fewer than 95% of measurements succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import probe
from probe.engine.context import EngineContext
from probe.engine.dns import ResolverSpec
from probe.engine.run import Run
from probe.store import BatchWriter, Store
from schema.model import Measurement, Target, VantagePoint
from tests.fixtures.benchserver import bench_name

try:  # optional: only used to report the server process's CPU
    import psutil
except ImportError:  # pragma: no cover - psutil is in the "test" extra
    psutil = None

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 20.0
RUN_DEADLINE = 120.0
SUCCESS_THRESHOLD = 0.95
GOAL_N = 500
GOAL_WALL_S = 10.0
GOAL_RSS_MB = 150.0

EX_OK = 0
EX_CANNOT_RUN = 1
EX_TOO_MANY_FAILURES = 2


class BenchError(RuntimeError):
    """The benchmark itself could not run."""


def _rusage_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux (bytes on macOS).
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (1024 * 1024) if sys.platform == "darwin" else maxrss / 1024


def _server_cpu(proc: subprocess.Popen[bytes]) -> float | None:
    if psutil is None:
        return None
    try:
        t = psutil.Process(proc.pid).cpu_times()
    except psutil.Error:
        return None
    return float(t.user + t.system)


def start_server(n: int, workdir: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Start the fixture servers in another process and wait for its ready file."""
    ready = workdir / "ready.json"
    log = workdir / "server.log"
    cmd = [
        sys.executable, "-m", "tests.fixtures.benchserver",
        "--names", str(n), "--ready-file", str(ready),
    ]  # fmt: skip
    with log.open("wb") as log_fh:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log_fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready.exists():
            if proc.poll() is not None:
                raise BenchError(
                    f"fixture server exited with status {proc.returncode} before it was ready:\n"
                    + log.read_text(errors="replace")[-2000:]
                )
            if time.monotonic() > deadline:
                raise BenchError(f"fixture server not ready after {READY_TIMEOUT:.0f} s")
            time.sleep(0.05)
        info: dict[str, Any] = json.loads(ready.read_text())
    except BaseException:
        stop_server(proc)
        raise
    return proc, info


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def build_targets(n: int, https_port: int) -> list[Target]:
    targets = []
    for i in range(n):
        host = bench_name(i)
        targets.append(
            Target(
                id=f"t{i}",
                service="bench",
                kind="http",
                host=host,
                url=f"https://{host}:{https_port}/",
            )
        )
    return targets


def fully_successful(m: Measurement) -> bool:
    return m.failure() is None and bool(m.requests) and m.requests[-1].status == 200


def failure_label(m: Measurement) -> str:
    failure = m.failure()
    if failure is not None:
        return failure
    if not m.requests:
        return "no HTTP request made"
    status = m.requests[-1].status
    return f"HTTP status {status}"


async def _run(
    targets: list[Target],
    vantage: VantagePoint,
    ctx: EngineContext,
    store: Store,
    concurrency: int,
) -> tuple[Run, list[Measurement], float, float]:
    done: list[Measurement] = []

    async def stored(m: Measurement) -> None:
        done.append(m)

    run = Run(targets, vantage, ctx, concurrency=concurrency, deadline=RUN_DEADLINE)
    writer = BatchWriter(store, stored)
    await asyncio.to_thread(store.begin_run, run.run_id, "bench", vantage, ctx.now_utc())
    cpu0 = _rusage_cpu()
    t0 = time.perf_counter()
    try:
        await run.execute(writer.add)
    finally:
        await writer.flush()
        wall = time.perf_counter() - t0
        cpu = _rusage_cpu() - cpu0
        await asyncio.to_thread(store.finish_run, run.run_id, run.status, ctx.now_utc())
    return run, done, wall, cpu


def benchmark(n: int, concurrency: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vantage-bench-") as tmp:
        workdir = Path(tmp)
        proc, info = start_server(n, workdir)
        try:
            ctx = EngineContext(
                resolvers=[ResolverSpec("udp", "127.0.0.1", int(info["dns_port"]), system=True)],
                ca_files=(str(info["ca"]),),
                system_cas=False,
                public_ranges=(ipaddress.ip_network("127.0.0.0/8"),),
            )
            vantage = VantagePoint(
                probe_id=str(uuid.uuid4()),
                software_version=probe.__version__,
                platform=sys.platform,
                architecture=platform.machine(),
            )
            targets = build_targets(n, int(info["https_port"]))
            store = Store.open(f"sqlite:///{workdir}/bench.db")
            try:
                rss_before = _peak_rss_mb()
                server_cpu0 = _server_cpu(proc)
                run, done, wall, cpu = asyncio.run(_run(targets, vantage, ctx, store, concurrency))
                server_cpu1 = _server_cpu(proc)
                stored_count = store.count()
            finally:
                store.close()
        finally:
            stop_server(proc)

    ok = sum(1 for m in done if fully_successful(m))
    failures = Counter(failure_label(m) for m in done if not fully_successful(m))
    server_cpu = (
        server_cpu1 - server_cpu0 if server_cpu0 is not None and server_cpu1 is not None else None
    )
    rss = _peak_rss_mb()
    return {
        "n": n,
        "concurrency": concurrency,
        "run_status": run.status,
        "measurements": len(done),
        "stored": stored_count,
        "successful": ok,
        "failures": dict(failures.most_common()),
        "wall_s": round(wall, 3),
        "rate_per_s": round(len(done) / wall, 1) if wall > 0 else None,
        "cpu_s": round(cpu, 3),
        "cpu_ms_per_measurement": round(1000 * cpu / len(done), 2) if done else None,
        "peak_rss_mb": round(rss, 1),
        "rss_before_run_mb": round(rss_before, 1),
        "server_cpu_s": round(server_cpu, 3) if server_cpu is not None else None,
        "goal": _goal(n, wall, rss),
    }


def _goal(n: int, wall: float, rss: float) -> dict[str, Any]:
    # Scale the wall-time goal linearly when N differs from 500.
    wall_goal = GOAL_WALL_S * n / GOAL_N
    return {
        "wall_s_max": round(wall_goal, 2),
        "rss_mb_max": GOAL_RSS_MB,
        "met": wall < wall_goal and rss < GOAL_RSS_MB,
    }


def verdict(result: dict[str, Any]) -> tuple[int, str | None]:
    n = result["n"]
    if result["stored"] != n:
        return EX_TOO_MANY_FAILURES, (
            f"{result['stored']} measurements stored, expected {n} (run {result['run_status']})"
        )
    if n and result["successful"] < SUCCESS_THRESHOLD * n:
        return EX_TOO_MANY_FAILURES, (
            f"only {result['successful']} of {n} measurements fully succeeded "
            f"(< {SUCCESS_THRESHOLD:.0%})"
        )
    return EX_OK, None


def print_report(r: dict[str, Any]) -> None:
    print(f"measurements: {r['measurements']} ({r['successful']} fully successful), "
          f"stored: {r['stored']}, run status: {r['run_status']}, "
          f"concurrency: {r['concurrency']}")  # fmt: skip
    for label, count in r["failures"].items():
        print(f"  failed: {count} x {label}")
    print(f"wall time: {r['wall_s']:.2f} s  ->  {r['rate_per_s']} measurements/s")
    print(f"CPU: {r['cpu_s']:.2f} s  ->  {r['cpu_ms_per_measurement']} ms CPU per measurement")
    print(f"peak RSS: {r['peak_rss_mb']:.1f} MB (before the run: {r['rss_before_run_mb']:.1f} MB)")
    if r["server_cpu_s"] is not None:
        print(f"server process CPU (information): {r['server_cpu_s']:.2f} s")
    g = r["goal"]
    print(f"goal: {r['n']} in < {g['wall_s_max']:g} s wall, peak RSS < {g['rss_mb_max']:g} MB: "
          f"{'MET' if g['met'] else 'NOT MET'}")  # fmt: skip


def _child(
    cmd: list[str], cwd: Path, env: dict[str, str] | None = None
) -> tuple[float, float, int]:
    """Run ``cmd``; (wall seconds, its own peak RSS in MB, exit status)."""
    import os

    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        print(err.decode(errors="replace")[-1500:], file=sys.stderr)
    return wall, usage.ru_maxrss / 1024, proc.returncode


def versus_curl(n: int, rounds: int) -> int:
    import os
    import shutil
    import statistics

    curl = shutil.which("curl")
    if curl is None:
        print("bench_engine: curl is not installed (apt-get install curl)", file=sys.stderr)
        return EX_CANNOT_RUN
    with tempfile.TemporaryDirectory(prefix="vantage-bench-") as tmp:
        workdir = Path(tmp)
        proc, info = start_server(n, workdir)
        try:
            port, ca = int(info["https_port"]), str(info["ca"])
            names = [bench_name(i) for i in range(n)]
            catalog = workdir / "bench.toml"
            catalog.write_text(
                'format = 1\n[service]\nname = "bench"\n' + "".join(
                    f'[[target]]\nid = "t{i}"\nkind = "http"\nurl = "https://{h}:{port}/"\n'
                    for i, h in enumerate(names)
                )
            )  # fmt: skip
            config = workdir / "vantage.toml"
            config.write_text(
                f'[probe]\ndata_dir = "{workdir / "data"}"\n'
                f'[dns]\nsystem = false\nresolvers = ["udp://127.0.0.1:{info["dns_port"]}"]\n'
                f'[vantage]\nresolver_whoami = ""\n'
                f'[engine]\nca_bundle = ["{ca}"]\nsystem_cas = false\n'
                f'public_ranges = ["127.0.0.0/8"]\nconcurrency = 16\n'
                f"[privacy]\nconsent = true\n"
            )  # fmt: skip
            curl_cfg = workdir / "curl.cfg"
            curl_cfg.write_text("".join(
                f'resolve = "{h}:{port}:127.0.0.1"\nurl = "https://{h}:{port}/"\n'
                f'output = "/dev/null"\n' for h in names
            ))  # fmt: skip
            env = {k: v for k, v in os.environ.items() if not k.startswith("VANTAGE_")}
            env |= {"VANTAGE_CONFIG": str(config), "PYTHONPATH": str(REPO_ROOT)}
            vantage_cmd = [sys.executable, "-m", "probe", "run", "--no-builtin", "--targets",
                           str(catalog), "--json"]  # fmt: skip
            curl_cmd = [curl, "--silent", "--parallel", "--parallel-max", "16", "--cacert", ca,
                        "--config", str(curl_cfg)]  # fmt: skip
            vantage_runs, curl_runs, rss = [], [], 0.0
            for _ in range(rounds):  # alternating, so both see the same machine
                wall, peak, code = _child(vantage_cmd, REPO_ROOT, env)
                if code not in (0,):
                    print(f"bench_engine: vantage run exited {code}", file=sys.stderr)
                    return EX_CANNOT_RUN
                vantage_runs.append(wall)
                rss = max(rss, peak)
                wall, _, code = _child(curl_cmd, REPO_ROOT)
                if code != 0:
                    print(f"bench_engine: curl exited {code}", file=sys.stderr)
                    return EX_CANNOT_RUN
                curl_runs.append(wall)
            accessible, total = _accessible(workdir / "data" / "vantage.db")
        finally:
            stop_server(proc)
    v, c = statistics.median(vantage_runs), statistics.median(curl_runs)
    print(f"{n} HTTPS targets, {rounds} rounds, alternating; load average "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"vantage run (process): median {v:.2f} s  {[round(x, 2) for x in vantage_runs]}")
    print(f"curl --parallel 16:    median {c:.2f} s  {[round(x, 2) for x in curl_runs]}")
    print(f"ratio vantage/curl: {v / c:.2f} (goal <= 2.0: {'met' if v / c <= 2.0 else 'NOT met'})")
    print(f"vantage peak RSS: {rss:.1f} MB (goal < 120 MB: {'met' if rss < 120 else 'NOT met'})")
    print(f"accessible: {accessible} of {total} measurements stored")
    return EX_OK if accessible == total == n * rounds else EX_TOO_MANY_FAILURES


def _accessible(db: Path) -> tuple[int, int]:
    import sqlite3

    con = sqlite3.connect(db)
    try:
        total = con.execute("SELECT count(*) FROM measurements").fetchone()[0]
        ok = con.execute("SELECT count(*) FROM measurements WHERE accessible = 1").fetchone()[0]
    finally:
        con.close()
    return int(ok), int(total)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_engine")
    parser.add_argument("--n", type=int, default=500, help="measurements to make (default 500)")
    parser.add_argument("--concurrency", type=int, default=16, help="in flight (default 16)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument(
        "--versus-curl",
        action="store_true",
        help="vantage run as a process against curl --parallel, alternating",
    )
    parser.add_argument("--rounds", type=int, default=3, help="with --versus-curl (default 3)")
    args = parser.parse_args(argv)
    if args.versus_curl:
        return versus_curl(args.n, max(1, args.rounds))
    if args.n < 1 or args.concurrency < 1:
        parser.error("--n and --concurrency must be at least 1")
    try:
        result = benchmark(args.n, args.concurrency)
    except BenchError as exc:
        print(f"bench_engine: cannot run: {exc}", file=sys.stderr)
        return EX_CANNOT_RUN
    except Exception as exc:  # noqa: BLE001 - report why the benchmark could not run
        print(f"bench_engine: cannot run: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EX_CANNOT_RUN
    code, why = verdict(result)
    result["ok"] = code == EX_OK
    if why:
        result["error"] = why
    if args.json:
        print(json.dumps(result))
    else:
        print_report(result)
    if why:
        print(f"bench_engine: {why}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
