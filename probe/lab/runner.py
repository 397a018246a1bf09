"""Run one scenario: plan, build, start the agents, measure, compare, tear down.

>>> result = run_scenario(load_scenario(Path("dns-nxdomain.toml")))
>>> result.ok
True
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probe.analysis import offline, service_status
from probe.analysis.verdict import system_queries, target_handshakes
from probe.lab import addresses as A
from probe.lab import firewall
from probe.lab.netns import (
    LabError,
    LabUnavailable,
    PathConditions,
    Topology,
    cleanup_leftovers,
    host_clashes,
    preflight,
)
from probe.lab.plan import (
    LabPlan,
    asn_networks,
    catalog_toml,
    internet_config,
    make_plan,
    site_addresses,
    write_asn_database,
    write_certificates,
)
from probe.lab.scenario import Expectation, Scenario
from probe.tomltable import to_toml
from schema.model import Measurement
from schema.wire import from_wire

#: The probe's settings in the lab: short timeouts so blocked steps fail fast, the
#: lab range counted as public, and only the lab CA trusted.
LAB_PROBE_DEFAULTS: dict[str, dict[str, Any]] = {
    "engine": {"tcp_timeout": 3, "tls_timeout": 3, "dns_timeout": 2, "http_timeout": 6,
               "run_deadline": 300, "system_cas": False},
    "control": {"url": f"http://{A.CONTROL_HELPER}:{A.CONTROL_PORT}", "timeout": 15},
}  # fmt: skip
READY_TIMEOUT = 30.0


@dataclass
class ExpectationResult:
    expectation: Expectation
    measurement: str  # "service/target"
    observed: dict[str, Any]
    match: bool

    def to_json(self, scenario: str) -> dict[str, Any]:
        e = self.expectation
        expected: dict[str, Any] = {}
        for key in (
            "step",
            "failure",
            "operation",
            "status",
            "body_contains",
            "blocking",
            "accessible",
            "reason",
        ):
            if getattr(e, key) is not None:
                expected[key] = getattr(e, key)
        if e.answers:
            expected["answers"] = list(e.answers)
        if e.service_status:
            expected["service_status"] = list(e.service_status)
        service, _, target = self.measurement.partition("/")
        return {"scenario": scenario, "service": service, "target": target,
                "expected": expected, "observed": self.observed, "match": self.match}  # fmt: skip


@dataclass
class ScenarioResult:
    scenario: Scenario
    results: list[ExpectationResult] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    probe_seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.results) and all(r.match for r in self.results)


def _step(m: Measurement, step: str, resolver: str | None = None) -> tuple[str, str | None, Any]:
    """(outcome, failed operation, the observations) of one step of a measurement."""
    if step == "dns" and resolver is not None:
        obs: list[Any] = [q for q in m.queries if q.resolver_address == resolver]
    elif step == "dns":
        obs = system_queries(m)
    elif step == "tcp":
        obs = list(m.tcp_connect)
    elif step == "tls":
        obs = target_handshakes(m)  # not the SNI A/B control handshake
    else:
        obs = m.requests[-1:]
    if not obs:
        return "absent", None, obs
    if any(o.failure is None for o in obs):
        return "none", None, obs
    return obs[0].failure, obs[0].failed_operation, obs


def _verdict_text(value: object) -> str:
    return "unknown" if value is None else str(value).lower()


def evaluate(
    expectations: tuple[Expectation, ...], measurements: list[Measurement]
) -> list[ExpectationResult]:
    """Compare what was measured (and judged) with what the scenario expects (pure)."""
    results = []
    is_offline = offline([m for m in measurements if m.target.control])
    for e in expectations:
        if e.service_status:
            status = service_status(e.service, measurements, is_offline)
            observed: dict[str, Any] = {"service_status": status.status, "why": status.explanation}
            results.append(ExpectationResult(e, f"{e.service}/*", observed,
                                             status.status in e.service_status))  # fmt: skip
            if e.step is None and e.blocking is None and e.accessible is None and not e.reason:
                continue
        chosen = [m for m in measurements if m.target.service == e.service
                  and (e.target is None or m.target.id == e.target)]  # fmt: skip
        if not chosen:
            results.append(ExpectationResult(e, f"{e.service}/{e.target or '*'}",
                                             {"error": "not measured"}, False))  # fmt: skip
            continue
        for m in sorted(chosen, key=lambda x: x.target.id):
            observed, ok = {}, True
            if e.step is not None:
                outcome, operation, obs = _step(m, e.step, e.resolver)
                observed["failure"] = outcome
                ok = outcome == e.failure
                if e.operation is not None:
                    observed["operation"] = operation
                    ok = ok and operation == e.operation
                if e.step == "http" and (e.status is not None or e.body_contains is not None):
                    last = obs[0] if obs else None
                    observed["status"] = last.status if last else None
                    if e.status is not None:
                        ok = ok and observed["status"] == e.status
                    if e.body_contains is not None:
                        body = last.body.decode("utf-8", "replace") if last else ""
                        observed["body_contains"] = e.body_contains in body
                        ok = ok and observed["body_contains"]
                if e.answers:
                    got = sorted({a for q in obs for a in q.addresses()}) if e.step == "dns" else []
                    observed["answers"] = got
                    ok = ok and set(e.answers) <= set(got)
            v = m.verdict
            if e.blocking is not None:
                observed["blocking"] = _verdict_text(v.blocking if v else None)
                ok = ok and observed["blocking"] == e.blocking
            if e.accessible is not None:
                observed["accessible"] = _verdict_text(v.accessible if v else None)
                ok = ok and observed["accessible"] == e.accessible
            if e.reason is not None:
                observed["reasons"] = [r.code for r in v.reasons] if v else []
                ok = ok and e.reason in observed["reasons"]
            if (e.blocking is not None or e.accessible is not None) and v is not None:
                observed["confidence"] = v.confidence
                observed["why"] = v.explanation
            results.append(ExpectationResult(e, f"{m.target.service}/{m.target.id}", observed, ok))
    return results


def resolve_match(plan: LabPlan, entries: tuple[str, ...]) -> list[str]:
    """Lab addresses for rule entries: names, ``*.suffix`` patterns, or addresses."""
    out: list[str] = []
    for entry in entries:
        entry = entry.lower().rstrip(".")
        if entry.startswith("*."):
            out += [a for n, a in plan.names.items() if n.endswith(entry[1:])]
        elif (address := plan.address_of(entry)) is not None:
            out.append(address)
    return sorted(set(out))


def router_config(s: Scenario, plan: LabPlan, ready: Path) -> dict[str, Any]:
    dns_rules, proxy_rules, inject = [], [], []
    for rule in s.rules:
        if rule.kind == "dns":
            dns_rules.append({"match": list(rule.match), "action": rule.action,
                              "addresses": list(rule.addresses)})  # fmt: skip
        elif rule.kind == "dns-inject":
            inject.append({"match": list(rule.match), "addresses": list(rule.addresses)})
        elif rule.kind in ("tls", "http"):
            item: dict[str, Any] = {"kind": rule.kind, "match": list(rule.match),
                                    "action": rule.action, "residual": rule.residual}  # fmt: skip
            if rule.keyword:
                item["keyword"] = rule.keyword
            proxy_rules.append(item)
        elif rule.kind == "throttle":
            proxy_rules.append({"kind": "throttle", "addresses": resolve_match(plan, rule.match),
                                "rate": rule.rate})  # fmt: skip
    return {
        "resolver": {"listen": A.ROUTER_LAN, "upstream": A.AUTHORITATIVE, "rules": dns_rules},
        "proxy": {"listen_port": A.PROXY_PORT, "rules": proxy_rules},
        "inject": inject,
        "lan_interface": "lan",
        "blockpage_address": A.BLOCKPAGE,
        "nft_table": firewall.TABLE,
        "ready_file": str(ready),
    }


def _probe_config(s: Scenario, ca: Path, asn_db: Path | None = None) -> str:
    sections: dict[str, dict[str, Any]] = {k: dict(v) for k, v in LAB_PROBE_DEFAULTS.items()}
    sections["engine"]["public_ranges"] = [str(A.LAB_RANGE)]
    sections["engine"]["ca_bundle"] = [str(ca)]
    if asn_db is not None:  # a scenario may still set [probe.vantage] asn_db = "" (none)
        sections.setdefault("vantage", {})["asn_db"] = str(asn_db)
    for section, values in s.probe_config.items():
        if not isinstance(values, dict):
            raise LabError(f"{s.origin}: probe.{section}: expected a table of probe settings")
        sections.setdefault(section, {}).update(values)
    files = sections.get("analysis", {}).get("fingerprints")
    if isinstance(files, list):  # a scenario names extra fingerprint files beside itself
        here = Path(s.origin).parent
        sections["analysis"]["fingerprints"] = [str(here / f) for f in files]
    return "".join(to_toml({name: values}) for name, values in sections.items())


def _start(
    topo: Topology, ns: str, module: str, config: dict[str, Any], workdir: Path
) -> subprocess.Popen[bytes]:
    cfg = workdir / f"{module.rsplit('.', 1)[-1]}.json"
    cfg.write_text(json.dumps(config))
    args = ["ip", "netns", "exec", ns, sys.executable, "-m", module, str(cfg)]
    return _spawn(args, workdir / f"{module.rsplit('.', 1)[-1]}.log")


def _spawn(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start a lab agent in its own session, its output in ``log_path``. The child has
    its own copy of the log's descriptor: ours is closed as soon as it has started."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_ready(
    procs: dict[str, subprocess.Popen[bytes]], files: dict[str, Path], workdir: Path
) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                log = (workdir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise LabError(f"lab agent {name} exited with {proc.returncode}:\n{log}")
        if all(f.exists() for f in files.values()):
            return
        time.sleep(0.05)
    raise LabError(f"lab agents not ready after {READY_TIMEOUT:.0f}s: "
                   f"{[n for n, f in files.items() if not f.exists()]}")  # fmt: skip


def _start_control_helper(topo: Topology, ca: Path, workdir: Path) -> subprocess.Popen[bytes]:
    """The control helper on the uncensored side: it resolves with the authoritative
    server and trusts the lab CA, so it sees each site as it really is."""
    args = ["ip", "netns", "exec", topo.net, sys.executable, "-m", "probe", "control", "serve",
            "--host", A.CONTROL_HELPER, "--port", str(A.CONTROL_PORT),
            "--resolver", f"udp://{A.AUTHORITATIVE}", "--ca-bundle", str(ca), "--no-system-cas",
            "--allow-range", str(A.LAB_RANGE)]  # fmt: skip
    return _spawn(args, workdir / "control.log")


def _wait_listening(
    topo: Topology, proc: subprocess.Popen[bytes], host: str, port: int, workdir: Path
) -> None:
    probe = (
        "import socket, sys, time\n"
        f"end = time.monotonic() + {READY_TIMEOUT}\n"
        "while time.monotonic() < end:\n"
        "    try:\n"
        f"        socket.create_connection(({host!r}, {port}), 0.5).close(); sys.exit(0)\n"
        "    except OSError:\n"
        "        time.sleep(0.05)\n"
        "sys.exit(1)\n"
    )
    done = subprocess.run(
        ["ip", "netns", "exec", topo.net, sys.executable, "-c", probe], check=False
    )
    if done.returncode != 0 or proc.poll() is not None:
        log = (workdir / "control.log").read_text(errors="replace")[-2000:]
        raise LabError(f"the control helper did not start:\n{log}")


@contextmanager
def lab(s: Scenario, workdir: Path) -> Iterator[tuple[Topology, LabPlan, Path]]:
    """A built lab with its agents running; torn down on exit, whatever happens."""
    preflight()
    cleanup_leftovers()
    clashes = host_clashes()
    if clashes:
        raise LabUnavailable(f"this host uses the lab's range {A.LAB_RANGE}: {', '.join(clashes)}")
    plan = make_plan(s)
    ca, certs = write_certificates(plan, workdir / "certs")
    topo = Topology()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        sites = site_addresses(plan)
        extra = [
            A.AUTHORITATIVE,
            A.PUBLIC_RESOLVER,
            A.BLOCKPAGE,
            A.CONTROL_HELPER,
            *sites,
        ]
        topo.build(extra, PathConditions(s.path.delay_ms, s.path.jitter_ms, s.path.loss_pct))
        resolved = {f"rule{i}": resolve_match(plan, r.match) for i, r in enumerate(s.rules)}
        topo.firewall(firewall.ruleset(s.rules, resolved, sites))
        ready = {"internet": workdir / "internet.ready", "router": workdir / "router.ready"}
        net_cfg = internet_config(plan, certs, ready["internet"])
        procs["internet"] = _start(topo, topo.net, "probe.lab.internet", net_cfg, workdir)
        router_cfg = router_config(s, plan, ready["router"])
        procs["router"] = _start(topo, topo.router, "probe.lab.router", router_cfg, workdir)
        procs["control"] = _start_control_helper(topo, ca, workdir)
        _wait_ready(procs, ready, workdir)
        _wait_listening(topo, procs["control"], A.CONTROL_HELPER, A.CONTROL_PORT, workdir)
        yield topo, plan, ca
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()  # reaped: no zombie left behind
        topo.teardown()
        signal.signal(signal.SIGTERM, previous)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal an agent's whole session (it may have children); it may be gone already."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def probe_command(topo: Topology, plan: LabPlan, s: Scenario, ca: Path, workdir: Path) -> list[str]:
    """The ``vantage run`` the lab runs inside the probe's namespace."""
    args = ["ip", "netns", "exec", topo.probe, sys.executable, "-m", "probe"]
    config = workdir / "probe.toml"
    asn_db = write_asn_database(asn_networks(plan, s), workdir / "lab-asn.mmdb")
    config.write_text(_probe_config(s, ca, asn_db))
    args += [
        "--config",
        str(config),
        "run",
        "--json",
        "--no-builtin",
        "--data-dir",
        str(workdir / "data"),
    ]
    for service in plan.services:
        path = workdir / f"catalog-{service.name}.toml"
        path.write_text(catalog_toml(service))
        args += ["--targets", str(path)]
    if s.concurrency:
        args += ["--concurrency", str(s.concurrency)]
    return args


def run_scenario(s: Scenario, workdir: Path | None = None) -> ScenarioResult:
    """Build the lab, run the real probe in it, and judge the expectations."""
    result = ScenarioResult(s)
    with tempfile.TemporaryDirectory(prefix="vantage-lab-") as tmp:
        work = workdir or Path(tmp)
        try:
            with lab(s, work) as (topo, plan, ca):
                cmd = probe_command(topo, plan, s, ca, work)
                started = time.monotonic()
                # The lab's traffic stays in its own namespaces: no volunteer to inform.
                env = {k: v for k, v in os.environ.items() if not k.startswith("VANTAGE_")}
                env["VANTAGE_PRIVACY_CONSENT"] = "true"
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
                result.probe_seconds = time.monotonic() - started
                if proc.returncode != 0:
                    raise LabError(
                        f"the probe exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}"
                    )
                lines = [line for line in proc.stdout.splitlines() if line.strip()]
                result.measurements = [from_wire(json.loads(line)) for line in lines]
        except LabUnavailable:
            raise
        except LabError as exc:
            result.error = str(exc)
            return result
    result.results = evaluate(s.expectations, result.measurements)
    return result
