"""The volunteer's address behind a NAT, end to end, in namespaces this test creates.

    probe ns  10.77.x.2 --veth-- 10.77.x.1  world ns (198.51.100.10: web, DNS, collector)
              SNAT to 203.0.113.7 on the way out

The probe's interfaces never hold 203.0.113.7, so nothing on the machine tells it the
address; the servers echo it back in every form a real server was seen to (bodies plain,
stacked-gzip, UTF-16 and past the kept part, headers, cookies, redirects, reverse-DNS
names, content codings), and the resolver's whoami answers with it. The collector is
down for the first run, then comes up: the probe enrolls, uploads and exports. The
address must then appear nowhere in the database files, any upload or any export.
Nothing leaves the two namespaces: the world has no route out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.probe.natworld import forms

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
PUBLIC = "203.0.113.7"
WORLD = "198.51.100.10"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def nat() -> Iterator[tuple[str, str]]:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nft") is None:
        pytest.skip("needs root, iproute2 and nftables")
    tag = uuid.uuid4().hex[:6]
    probe, world = f"vnp-{tag}", f"vnw-{tag}"
    net = 77 + int(tag[:2], 16) % 100  # 10.N.0.0/24 inside the namespaces only
    _ip("netns", "add", probe)
    _ip("netns", "add", world)
    try:
        _ip("link", "add", f"vp{tag}", "netns", probe, "type", "veth", "peer", "name",
            f"vw{tag}", "netns", world)  # fmt: skip
        for ns, dev, addr in ((probe, f"vp{tag}", f"10.{net}.0.2/24"),
                              (world, f"vw{tag}", f"10.{net}.0.1/24")):  # fmt: skip
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", addr, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", world, "addr", "add", f"{WORLD}/32", "dev", "lo")
        _ip("-n", probe, "route", "add", "default", "via", f"10.{net}.0.1")
        _ip("-n", world, "route", "add", f"{PUBLIC}/32", "via", f"10.{net}.0.2")
        rules = (f"table ip nat {{ chain post {{ type nat hook postrouting priority 100; "
                 f'oifname "vp{tag}" snat to {PUBLIC}; }}; }}\n')  # fmt: skip
        subprocess.run(["ip", "netns", "exec", probe, "nft", "-f", "-"], input=rules, text=True,
                       check=True)  # fmt: skip
        yield probe, world
    finally:
        for ns in (probe, world):
            for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                      text=True).stdout.split():  # fmt: skip
                subprocess.run(["kill", "-9", pid], check=False)
            subprocess.run(["ip", "netns", "del", ns], check=False)


def _start_world(ns: str, out: Path, *flags: str) -> subprocess.Popen[bytes]:
    ready = out / ("collector.ready" if flags else "world.ready")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.probe.natworld",
         "--address", WORLD, "--dir", str(out), *flags],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "world did not start"
        time.sleep(0.05)
    return proc


def _vantage(ns: str, cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VANTAGE_CONFIG": str(cfg)}
    return subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "probe", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


CATALOG = """format = 1
[service]
name = "natecho"
title = "Servers that echo the client's address"
source = { url = "https://example.org/", checked = 2026-12-04 }
""" + "".join(
    f'\n[[target]]\nid = "{name}"\nkind = "http"\nurl = "http://echo.nat.test/{path}"\n'
    for name, path in (("redirect", ""), ("gz", "gz"), ("deflate", "deflate"), ("enc", "enc"),
                       ("u16", "u16"), ("big", "big"))
)  # fmt: skip


def _spellings() -> list[bytes]:
    out = [f.encode() for f in forms(PUBLIC)]
    out += [PUBLIC.encode("utf-16-le"), PUBLIC.encode("utf-16-be"), b"203-0-113-7"]
    return out


def _leaks(data: bytes) -> list[bytes]:
    low = data.lower()
    return [s for s in _spellings() if s.lower() in low]


def test_the_public_address_behind_a_nat_never_leaves(nat: tuple[str, str], tmp_path: Path):
    probe_ns, world_ns = nat
    out = tmp_path / "world"
    out.mkdir()
    data = tmp_path / "data"
    (tmp_path / "resolv.conf").write_text(f"nameserver {WORLD}\n")
    (tmp_path / "nat.toml").write_text(CATALOG)
    cfg = tmp_path / "vantage.toml"
    cfg.write_text(f"""
[probe]
data_dir = "{data}"
[dns]
resolv_conf = "{tmp_path / "resolv.conf"}"
[vantage]
resolver_whoami = "whoami.nat.test"
[engine]
public_ranges = ["198.51.100.0/24", "203.0.113.0/24"]
http_timeout = 10.0
[privacy]
consent = true
[collector]
url = "http://{WORLD}:8080"
timeout = 3.0
""")
    world = _start_world(world_ns, out)
    collector = None
    try:
        run = _vantage(probe_ns, cfg, "run", "--targets", str(tmp_path / "nat.toml"),
                       "--service", "natecho", "--json")  # fmt: skip
        assert run.stdout.count("\n") == 6, run.stderr
        seen = set((out / "seen.txt").read_text().split())
        assert seen == {PUBLIC}, "the NAT is not in place: the test would prove nothing"
        # Nothing could tell the address yet: what was stored holds it, on the probe only.
        assert _leaks(run.stdout.encode())
        # The collector comes back: enroll, upload (whoami tells the address now).
        collector = _start_world(world_ns, out, "--collector")
        enrolled = _vantage(probe_ns, cfg, "enroll", f"http://{WORLD}:8080", "--token", "t")
        assert enrolled.returncode == 0, enrolled.stderr
        uploaded = _vantage(probe_ns, cfg, "upload")
        assert uploaded.returncode == 0, uploaded.stderr + uploaded.stdout
        assert PUBLIC in json.loads((data / "own_addresses.json").read_text())["addresses"]
        exports: dict[str, bytes] = {}
        for fmt in ("jsonl", "csv", "ooni", "parquet"):
            target = tmp_path / f"export.{fmt}"
            done = _vantage(probe_ns, cfg, "export", "--format", fmt, "--out", str(target))
            if fmt == "parquet" and done.returncode != 0 and "pyarrow" in done.stderr:
                continue
            assert done.returncode == 0, done.stderr
            exports[fmt] = target.read_bytes()
        if "parquet" in exports:
            import pyarrow.parquet as pq

            exports["parquet"] = json.dumps(pq.read_table(tmp_path / "export.parquet")
                                            .to_pylist(), default=str).encode()  # fmt: skip
        uploads = (out / "uploads.jsonl").read_bytes()
        assert uploads.count(b"measurement_uid") >= 6
        # A second run knows the address already: its measurements are scrubbed when
        # stored, and its resolver whoami answer (the address) is not kept.
        again = _vantage(probe_ns, cfg, "run", "--targets", str(tmp_path / "nat.toml"),
                         "--service", "natecho", "--json")  # fmt: skip
        assert again.stdout.count("\n") == 6, again.stderr
    finally:
        for proc in (world, collector):
            if proc is not None:
                proc.kill()
                proc.wait(10)
    leaks = {"upload": _leaks(uploads), "run --json": _leaks(again.stdout.encode())}
    leaks |= {f"export {k}": _leaks(v) for k, v in exports.items()}
    for path in data.iterdir():
        if path.name != "own_addresses.json":  # where the address is remembered, on purpose
            leaks[path.name] = _leaks(path.read_bytes())
    assert {k: v for k, v in leaks.items() if v} == {}
    # The evidence is still there: the bodies' lengths, the pages that could be kept.
    docs = [json.loads(line) for line in exports["jsonl"].splitlines()]
    assert len(docs) == 6  # exported before the second run
    assert all(d["test_keys"]["requests"] for d in docs)
    assert any(d["annotations"].get("scrubbed") == "true" for d in docs)
