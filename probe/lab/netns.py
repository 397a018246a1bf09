"""Build and tear down the lab's namespaces, links, addresses, firewall and path.

Every command is ``ip``/``nft``/``tc`` run by subprocess as root. The namespaces have
no link to the machine's own interfaces: the only veth pairs join lab namespaces to
each other, so nothing inside can reach, or be reached from, the outside.

A lab records itself in ``/run/vantage-lab/<id>.json`` (its namespaces and the pid
that owns it); the next start removes labs whose owner is gone (crash leftovers):
it kills the processes still inside their namespaces, then deletes them.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from probe.lab import addresses as A

STATE_DIR = Path("/run/vantage-lab")
NETNS_ETC = Path("/etc/netns")


class LabError(RuntimeError):
    """Building or running the lab failed; the message says where."""


class LabUnavailable(LabError):
    """The lab cannot run on this machine at all (not root, tools missing, range clash)."""


def _run(args: Sequence[str], *, input: str | None = None) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, input=input, check=False)
    if proc.returncode != 0:
        raise LabError(f"{' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def preflight() -> None:
    """Say clearly what is missing before touching anything."""
    if os.geteuid() != 0:
        raise LabUnavailable(
            "the lab needs root (network namespaces, nftables, tc): run it with sudo"
        )
    missing = [tool for tool in ("ip", "nft", "tc") if shutil.which(tool) is None]
    if missing:
        raise LabError(
            f"the lab needs {', '.join(missing)} (Debian: apt-get install iproute2 nftables)"
        )


def host_clashes() -> list[str]:
    """Host addresses or routes inside the lab's range (the lab then refuses to start)."""
    clashes = []
    for kind in ("addr", "route"):
        data = json.loads(_run(["ip", "-j", kind, "show"]) or "[]")
        for item in data:
            prefixes = []
            if kind == "addr":
                prefixes = [f"{a['local']}/{a['prefixlen']}" for a in item.get("addr_info", [])]
            elif item.get("dst") not in (None, "default"):
                prefixes = [item["dst"]]
            for text in prefixes:
                try:
                    net = ipaddress.ip_network(text, strict=False)
                except ValueError:
                    continue
                if net.version == 4 and net.overlaps(A.LAB_RANGE):
                    clashes.append(f"host {kind} {text}")
    return clashes


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: The namespaces a lab makes (``Topology``): only these are ever removed as leftovers.
LAB_NAMESPACE = re.compile(r"^vl-(?P<id>[0-9a-f]{6})-(?:probe|router|net)$")
KILL_TIMEOUT = 5.0


def namespace_pids(ns: str) -> list[int]:
    """The processes living in namespace ``ns`` (empty if it does not exist)."""
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                         check=False).stdout  # fmt: skip
    return [int(p) for p in out.split() if p.isdigit()]


def remove_namespace(ns: str) -> None:
    """SIGKILL every process in ``ns``, then delete it and its ``/etc/netns`` files.

    ``ip netns del`` alone only drops the name: a process still inside (a lab agent,
    which runs in its own session and so outlives its owner) keeps the namespace, its
    addresses and its sockets alive. Processes are killed until none is left (one may
    fork while the list is read), for at most ``KILL_TIMEOUT`` seconds.
    """
    deadline = time.monotonic() + KILL_TIMEOUT
    while (pids := namespace_pids(ns)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
    shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


def cleanup_leftovers() -> list[str]:
    """Remove labs whose owning process is gone: their processes, namespaces and state.

    Returns what was removed: lab ids (from state files) and namespace names (ours,
    ``vl-<6 hex>-probe|router|net``, with no state file at all). Nothing else is touched.
    """
    removed = []
    if STATE_DIR.is_dir():
        for state in STATE_DIR.glob("*.json"):
            try:
                info = json.loads(state.read_text())
            except (OSError, ValueError):
                info = {"pid": -1, "namespaces": []}
            if not isinstance(info, dict):
                info = {"pid": -1, "namespaces": []}
            pid = info.get("pid", -1)
            if isinstance(pid, int) and pid > 0 and _alive(pid):
                continue
            for ns in info.get("namespaces") or []:
                if isinstance(ns, str) and LAB_NAMESPACE.match(ns):
                    remove_namespace(ns)
            state.unlink(missing_ok=True)
            removed.append(state.stem)
    # Namespaces of ours with no state file at all (state lost with a crash). A lab
    # writes its state file before it adds a namespace, so a live lab always has one.
    listed = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=False
    ).stdout
    known = {p.stem for p in STATE_DIR.glob("*.json")} if STATE_DIR.is_dir() else set()
    for line in listed.splitlines():
        ns = line.split()[0] if line.split() else ""
        match = LAB_NAMESPACE.match(ns)
        if match and match["id"] not in known:
            remove_namespace(ns)
            removed.append(ns)
    return removed


@dataclass
class PathConditions:
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0


class Topology:
    """Three namespaces: probe -- router (the ISP) -- net (the Internet)."""

    def __init__(self, lab_id: str | None = None) -> None:
        self.id = lab_id or uuid.uuid4().hex[:6]
        self.probe = f"vl-{self.id}-probe"
        self.router = f"vl-{self.id}-router"
        self.net = f"vl-{self.id}-net"
        self.namespaces = [self.probe, self.router, self.net]
        self.built = False
        self.link: subprocess.Popen[bytes] | None = None
        self._link_log: IO[bytes] | None = None

    def _state(self) -> Path:
        return STATE_DIR / f"{self.id}.json"

    def ns(self, namespace: str, *args: str) -> str:
        return _run(["ip", "netns", "exec", namespace, *args])

    def build(self, extra_net_addresses: Sequence[str], path: PathConditions) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self._state().write_text(json.dumps({"pid": os.getpid(), "namespaces": self.namespaces}))
        self.built = True
        for ns in self.namespaces:
            _run(["ip", "netns", "add", ns])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        p, r, n = self.probe, self.router, self.net
        if path.delay_ms or path.jitter_ms or path.loss_pct:
            self._userspace_link(path)
        else:  # veth pair created directly inside the namespaces: never in the host's
            _run(["ip", "link", "add", "lan", "netns", r, "type", "veth",
                  "peer", "name", "eth0", "netns", p])  # fmt: skip
        _run(["ip", "link", "add", "wan", "netns", r, "type", "veth",
              "peer", "name", "eth0", "netns", n])  # fmt: skip
        _run(["ip", "-n", p, "addr", "add", f"{A.PROBE}/24", "dev", "eth0"])
        _run(["ip", "-n", r, "addr", "add", f"{A.ROUTER_LAN}/24", "dev", "lan"])
        _run(["ip", "-n", r, "addr", "add", f"{A.ROUTER_WAN}/16", "dev", "wan"])
        _run(["ip", "-n", n, "addr", "add", f"{A.NET_MAIN}/16", "dev", "eth0"])
        batch = "".join(f"addr add {a}/32 dev eth0\n" for a in extra_net_addresses)
        if batch:
            _run(["ip", "-n", n, "-batch", "-"], input=batch)
        for ns, dev in ((p, "eth0"), (r, "lan"), (r, "wan"), (n, "eth0")):
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
        _run(["ip", "-n", p, "route", "add", "default", "via", A.ROUTER_LAN])
        _run(["ip", "-n", n, "route", "add", "default", "via", A.ROUTER_WAN])
        self.ns(r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # The probe's resolv.conf names the ISP resolver (bind-mounted by ip netns exec).
        etc = NETNS_ETC / p
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"nameserver {A.ROUTER_LAN}\n")

    def _userspace_link(self, path: PathConditions) -> None:
        """The probe's access link as a delaying, lossy userspace link (see link.py);
        this kernel may lack tc netem."""
        ready = STATE_DIR / f"{self.id}.link.ready"
        ready.unlink(missing_ok=True)
        args = ["ip", "netns", "exec", self.router, sys.executable, "-m", "probe.lab.link",
                "--probe-ns", self.probe, "--delay", str(path.delay_ms / 2000),
                "--jitter", str(path.jitter_ms / 2000), "--loss", str(path.loss_pct / 200),
                "--ready", str(ready)]  # fmt: skip
        # Its errors go to an unnamed file, not a pipe: nobody reads a pipe while the lab
        # runs, and a full one would stall the link.
        self._link_log = tempfile.TemporaryFile()
        self.link = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self._link_log)
        deadline = time.monotonic() + 10
        while not ready.exists():
            if self.link.poll() is not None or time.monotonic() > deadline:
                self._link_log.seek(0)
                err = self._link_log.read().decode(errors="replace")
                raise LabError(f"the lab's access link did not start: {err.strip()[-500:]}")
            time.sleep(0.02)
        ready.unlink(missing_ok=True)

    def firewall(self, ruleset: str) -> None:
        """Load an nftables ruleset into the router."""
        _run(["ip", "netns", "exec", self.router, "nft", "-f", "-"], input=ruleset)

    def teardown(self) -> None:
        for ns in self.namespaces:
            remove_namespace(ns)
        self._reap_link()
        self._state().unlink(missing_ok=True)
        self.built = False

    def _reap_link(self) -> None:
        """Wait for the userspace link (killed with the router's namespace) and close
        its log; kill it directly if it somehow outlived its namespace."""
        if self.link is not None:
            try:
                self.link.wait(timeout=KILL_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.link.kill()
                self.link.wait()
            self.link = None
        if self._link_log is not None:
            self._link_log.close()
            self._link_log = None
