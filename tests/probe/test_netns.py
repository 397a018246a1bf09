"""Failures that need a network of their own: built in a namespace this test creates.

The namespace has only its loopback interface, so nothing sent inside it can leave
the machine. That also makes it the one safe place to run the real catalog here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from probe.privacy import local_addresses

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]


def _can_netns() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


@pytest.fixture
def netns() -> Iterator[str]:
    if not _can_netns():
        pytest.skip("needs root and iproute2 (ip netns)")
    name = f"vantage-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        links = subprocess.run(["ip", "-n", name, "-o", "link"], capture_output=True, text=True,
                               check=True).stdout  # fmt: skip
        assert [ln.split(":")[1].strip() for ln in links.splitlines()] == ["lo"]
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


_CONNECT = """
import asyncio, json, sys
from probe.engine.context import EngineContext, Timeouts
from probe.engine.dns import ResolverSpec
from probe.engine.measure import measure
from schema.model import Target, VantagePoint
ctx = EngineContext(resolvers=[ResolverSpec("udp", "127.0.0.1", 53)], timeouts=Timeouts(1, 2, 1, 1))
vp = VantagePoint("p", "t", "linux", "x")
t = Target(id="c", service="s", kind="tcp", host=sys.argv[1], ports=(443,))
m = asyncio.run(measure(t, vp, "r", ctx))
print(json.dumps([m.tcp_connect[0].failure, m.tcp_connect[0].failed_operation]))
"""


def _connect_in(ns: str, address: str) -> list[str]:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", _CONNECT, address],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=True,
    ).stdout  # fmt: skip
    return json.loads(out)


def test_network_unreachable(netns: str) -> None:
    # No route at all inside the namespace: the kernel refuses before sending.
    assert _connect_in(netns, "198.18.0.1") == ["network_unreachable", "connect"]


def test_host_unreachable(netns: str) -> None:
    subprocess.run(["ip", "-n", netns, "route", "add", "unreachable", "198.18.1.0/24"], check=True)
    assert _connect_in(netns, "198.18.1.1") == ["host_unreachable", "connect"]


def test_real_catalog_runs_offline_in_isolation(netns: str, tmp_path: Path) -> None:
    """The whole built-in catalog, end to end, where nothing can get out."""
    # An address of its own besides loopback (a documentation one, no route comes
    # with it): the probe sees it as its IP, and must not let it out.
    own = "198.51.100.77"
    subprocess.run(["ip", "-n", netns, "addr", "add", f"{own}/32", "dev", "lo"], check=True)
    seen = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c",
         "from probe.privacy import local_addresses; print(*local_addresses())"],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=True,
    ).stdout.split()  # fmt: skip
    assert seen == [own]
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")
    env = dict(os.environ, VANTAGE_DNS_RESOLV_CONF=str(resolv), VANTAGE_ENGINE_TCP_TIMEOUT="2")
    proc = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "probe", "run", "--json",
         "--data-dir", str(tmp_path / "data"), "--deadline", "120"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    from probe.catalog import load_catalog

    expected = {(s.name, t.id) for s in load_catalog() for t in s.targets}
    assert {(d["service"], d["target"]["id"]) for d in docs} == expected
    # Nothing answers: DNS is refused on the namespace's loopback, fixed addresses
    # (Telegram's data centres) have no route.
    failures = {d["test_keys"]["failure"] for d in docs}
    assert failures == {"connection_refused", "network_unreachable"}
    telegram_dc = [d for d in docs if d["service"] == "telegram" and d["target"]["id"] != "web"]
    assert {d["test_keys"]["failure"] for d in telegram_dc} == {"network_unreachable"}
    assert own not in proc.stdout and own not in proc.stderr
    assert not [a for a in local_addresses() if a in proc.stdout]  # nor the host's
