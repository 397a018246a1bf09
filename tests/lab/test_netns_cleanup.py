"""Crash leftovers of the lab: removed with their processes, and nobody else's touched.

Needs root and iproute2 only (no nftables: no lab is built). Every namespace here is
made by the test, with a random id, and removed at the end whatever happens.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from probe.lab.netns import NETNS_ETC, STATE_DIR, Topology, cleanup_leftovers, namespace_pids

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None,
        reason="needs root and iproute2 (ip netns)",
    ),
]

DEAD_PID = 2**22 + 1  # above the largest pid_max Linux allows: never a live process


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.split()}


class Made:
    """Namespaces, processes and state files this test made, undone at the end."""

    def __init__(self) -> None:
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.states: list[str] = []

    def namespace(self, name: str, *, sleeper: bool = True) -> subprocess.Popen[bytes] | None:
        assert name not in _namespaces()
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.namespaces.append(name)
        if not sleeper:
            return None
        # Like a lab agent: its own session, so it would outlive whoever started it.
        proc = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "600"],
                                start_new_session=True)  # fmt: skip
        self.procs.append(proc)
        deadline = time.monotonic() + 10
        while proc.pid not in namespace_pids(name):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        return proc

    def state(self, lab_id: str, pid: int, namespaces: list[str]) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        (STATE_DIR / f"{lab_id}.json").write_text(
            json.dumps({"pid": pid, "namespaces": namespaces})
        )
        self.states.append(lab_id)

    def undo(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for name in self.namespaces:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
            shutil.rmtree(NETNS_ETC / name, ignore_errors=True)
        for lab_id in self.states:
            (STATE_DIR / f"{lab_id}.json").unlink(missing_ok=True)


@pytest.fixture
def made() -> Iterator[Made]:
    m = Made()
    try:
        yield m
    finally:
        m.undo()


def _lab_id() -> str:
    while True:
        lab_id = secrets.token_hex(3)
        if (
            not any(ns.startswith(f"vl-{lab_id}-") for ns in _namespaces())
            and not (STATE_DIR / f"{lab_id}.json").exists()
        ):
            return lab_id


def _gone(proc: subprocess.Popen[bytes]) -> bool:
    try:
        return proc.wait(timeout=5) == -9  # killed with SIGKILL, and reaped here
    except subprocess.TimeoutExpired:
        return False


def test_a_crashed_lab_is_removed_with_its_processes(made: Made) -> None:
    lab_id = _lab_id()
    ns = f"vl-{lab_id}-probe"
    sleeper = made.namespace(ns)
    assert sleeper is not None
    (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
    (NETNS_ETC / ns / "resolv.conf").write_text("nameserver 198.18.0.1\n")
    made.state(lab_id, DEAD_PID, [ns])

    assert lab_id in cleanup_leftovers()
    assert _gone(sleeper)
    assert ns not in _namespaces() and namespace_pids(ns) == []
    assert not (STATE_DIR / f"{lab_id}.json").exists() and not (NETNS_ETC / ns).exists()


def test_a_namespace_of_ours_without_state_is_removed_with_its_processes(made: Made) -> None:
    ns = f"vl-{_lab_id()}-router"
    sleeper = made.namespace(ns)
    assert sleeper is not None
    assert ns in cleanup_leftovers()
    assert _gone(sleeper) and ns not in _namespaces()


def test_other_namespaces_and_live_labs_are_not_touched(made: Made) -> None:
    rand = secrets.token_hex(3)
    others = [f"vl-someone-else-{rand}", f"vl-{rand}-probe2", f"vl-{rand.upper()}X-net",
              f"vl-{rand}0-net", f"xvl-{rand}-net"]  # fmt: skip
    sleepers = [made.namespace(name) for name in others]
    # A lab whose owner (this process) is alive, and a state file naming a namespace
    # that is not a lab's: neither is removed.
    live = _lab_id()
    made.namespace(f"vl-{live}-net", sleeper=False)
    made.state(live, os.getpid(), [f"vl-{live}-net"])
    dead = _lab_id()
    made.state(dead, DEAD_PID, [others[0]])

    removed = cleanup_leftovers()
    assert not set(removed) & {*others, live, f"vl-{live}-net"}
    assert dead in removed  # its state file goes; the namespace it names stays
    assert {*others, f"vl-{live}-net"} <= _namespaces()
    assert (STATE_DIR / f"{live}.json").exists()
    for name, proc in zip(others, sleepers, strict=True):
        assert proc is not None and proc.poll() is None
        assert proc.pid in namespace_pids(name)


def test_teardown_kills_processes_and_reaps_the_link(made: Made) -> None:
    topo = Topology(_lab_id())
    made.state(topo.id, os.getpid(), topo.namespaces)
    sleepers = [made.namespace(ns) for ns in topo.namespaces]
    # Stands for the userspace link, which runs in the router's namespace.
    topo.link = subprocess.Popen(["ip", "netns", "exec", topo.router, "sleep", "600"])
    link = topo.link
    deadline = time.monotonic() + 10
    while link.pid not in namespace_pids(topo.router):
        assert time.monotonic() < deadline
        time.sleep(0.01)

    topo.teardown()
    assert topo.link is None and link.returncode == -9  # reaped by teardown
    assert all(p is not None and _gone(p) for p in sleepers)
    assert not set(topo.namespaces) & _namespaces()
    assert not (STATE_DIR / f"{topo.id}.json").exists()
