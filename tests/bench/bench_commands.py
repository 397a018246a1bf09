"""How long the volunteer waits for each command: each run as its own process.

    python -m tests.bench.bench_commands [--runs 7]

Runs every command several times as a new process (``python -m probe ...``, what the
``vantage`` script does) against a fresh data directory with a recorded consent, a
stored run and a loopback DNS server (so ``doctor`` waits on nothing), and prints the
median wall time and peak RSS of each. Goals (issue 16), on this machine: ``--version``
and ``--help`` under 0.15 s; ``status``, ``targets``, ``consent --show`` under 0.3 s;
``doctor`` under 1 s. A Raspberry Pi 3 runs Python some 4-6 times slower than this
machine (the emulated arm64 figures in the issue were 3.4-4.5x): the estimate is printed.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOALS = {"--version": 0.15, "--help": 0.15, "status": 0.3, "targets": 0.3,
         "consent --show": 0.3, "doctor": 1.0}  # fmt: skip
PI_FACTOR = 5.0


def _one(args: list[str], env: dict[str, str]) -> tuple[float, int]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "probe", *args], cwd=ROOT, env=env,
                          capture_output=True, check=False)  # fmt: skip
    took = time.perf_counter() - started
    if proc.returncode not in (0, 1):  # doctor exits 1 when a check fails
        raise SystemExit(f"vantage {' '.join(args)} failed: {proc.stderr.decode()[-400:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return took, max(peak, before)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    opts = ap.parse_args()
    from tests.daemon.harness import config_doc, write_config
    from tests.fixtures import DNSServer

    with DNSServer() as dns, tempfile.TemporaryDirectory() as tmp:
        dns.set("example.test", a=["127.0.0.1"])
        data = Path(tmp) / "data"
        doc = config_doc(data, dns.port, privacy={"consent": True})
        cfg = write_config(Path(tmp) / "vantage.toml", doc)
        env = {**os.environ, "VANTAGE_CONFIG": str(cfg), "PYTHONPATH": str(ROOT)}
        env = {
            k: v for k, v in env.items() if not k.startswith("VANTAGE_") or k == "VANTAGE_CONFIG"
        }
        subprocess.run([sys.executable, "-m", "probe", "consent", "--yes"], cwd=ROOT, env=env,
                       capture_output=True, check=True)  # fmt: skip
        load = os.getloadavg()
        print(f"{opts.runs} runs each; 2 CPUs, load average {load[0]:.1f} {load[1]:.1f}")
        print(f"{'command':<18} {'median':>8} {'goal':>6} {'Pi 3 est.':>10}")
        for command, goal in GOALS.items():
            times = [_one(command.split(), env)[0] for _ in range(opts.runs)]
            median = statistics.median(times)
            verdict = "met" if median < goal else "NOT met"
            print(f"vantage {command:<10} {median:7.3f}s {goal:5.2f}s {median * PI_FACTOR:9.2f}s"
                  f"  {verdict}")  # fmt: skip


if __name__ == "__main__":
    main()
