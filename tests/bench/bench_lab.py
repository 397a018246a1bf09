"""Lab benchmark: the probe on a 100 ms round-trip access link, 200 HTTPS targets.

Prints the probe's wall time next to the latency-bound minimum: the round trips one
full measurement needs, times the batches the concurrency allows. Needs root
(it builds the lab).

    sudo python -m tests.bench.bench_lab [--targets 200] [--rtt-ms 100] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from probe.lab.plan import LAB_DNS_DELAY
from probe.lab.runner import run_scenario
from probe.lab.scenario import parse_scenario

# One HTTPS measurement: DNS (A and AAAA in parallel), TCP connect, TLS 1.3 handshake,
# then the request and response over that same connection (probe.engine.connection).
ROUND_TRIPS = {"dns": 1, "tcp": 1, "tls": 1, "http request": 1}


def scenario_text(n: int, rtt_ms: float, concurrency: int, helper: bool) -> str:
    parts = [f'name = "bench-lab"\ndescription = "{n} HTTPS targets, {rtt_ms:g} ms RTT"\n'
             f"services = []\nconcurrency = {concurrency}\n[path]\ndelay_ms = {rtt_ms}\n"]  # fmt: skip
    if not helper:  # the probe alone: the control helper's own work is not the probe's
        parts.append('[probe.control]\nurl = ""\n')
    for i in range(n):
        parts.append(f'[[site]]\nname = "s{i}.bench.example"\n')
        parts.append(
            f'[[target]]\nid = "t{i}"\nkind = "http"\nurl = "https://s{i}.bench.example/"\n'
        )
    parts.append(
        '[[expect]]\nservice = "scenario"\nstep = "http"\nfailure = "none"\nstatus = 200\n'
    )
    return "".join(parts)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--targets", type=int, default=200)
    p.add_argument("--rtt-ms", type=float, default=100.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--with-control-helper",
        action="store_true",
        help="also ask the lab's control helper about every target (as lab runs do)",
    )
    a = p.parse_args()
    s = parse_scenario(
        scenario_text(a.targets, a.rtt_ms, a.concurrency, a.with_control_helper), "bench-lab"
    )
    result = run_scenario(s)
    if result.error:
        print(f"benchmark could not run: {result.error}", file=sys.stderr)
        return 1
    ok = sum(r.match for r in result.results)
    rtt = a.rtt_ms / 1000
    per_measurement = sum(ROUND_TRIPS.values()) * rtt + LAB_DNS_DELAY
    batches = math.ceil(a.targets / a.concurrency)
    minimum = per_measurement * batches
    spans = [m.test_runtime for m in result.measurements]
    figures = {
        "targets": a.targets, "measured": len(result.measurements), "successful": ok,
        "rtt_ms": a.rtt_ms, "concurrency": a.concurrency,
        "round_trips_per_measurement": sum(ROUND_TRIPS.values()),
        "lab_dns_delay_s": LAB_DNS_DELAY, "batches": batches,
        "minimum_s": round(minimum, 2), "probe_wall_s": round(result.probe_seconds, 2),
        "ratio": round(result.probe_seconds / minimum, 3),
        "mean_measurement_s": round(sum(spans) / len(spans), 3) if spans else None,
    }  # fmt: skip
    if a.json:
        print(json.dumps(figures))
    else:
        print(f"targets: {a.targets}, measured {len(result.measurements)}, {ok} fully successful")
        print(f"path: {a.rtt_ms:g} ms round trip; concurrency {a.concurrency} -> {batches} batches")
        print(f"latency-bound minimum: {sum(ROUND_TRIPS.values())} round trips x {rtt:g} s "
              f"+ {LAB_DNS_DELAY:g} s resolver recursion = {per_measurement:.2f} s per measurement, "
              f"x {batches} batches = {minimum:.2f} s")  # fmt: skip
        print(f"probe wall time (process start to exit): {result.probe_seconds:.2f} s "
              f"= {figures['ratio']}x the minimum (goal: within 1.2x)")  # fmt: skip
        print(f"mean measurement: {figures['mean_measurement_s']} s")
    return 0 if ok == a.targets else 2


if __name__ == "__main__":
    raise SystemExit(main())
