"""Every shipped scenario, run for real: namespaces, censor, the real probe.

Needs root, iproute2 and nftables; skipped with the reason otherwise. Select with
``-m lab``. Each scenario builds its own namespaces (no link to the host) and tears
them down.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from probe.lab.runner import run_scenario
from probe.lab.scenario import load_scenario, shipped_scenarios

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (network namespaces)"),
    pytest.mark.skipif(
        not (shutil.which("ip") and shutil.which("nft")),
        reason="the lab needs iproute2 and nftables",
    ),  # fmt: skip
]


@pytest.mark.parametrize("path", shipped_scenarios(), ids=lambda p: p.stem)
def test_shipped_scenario(path: Path) -> None:
    result = run_scenario(load_scenario(path))
    assert result.error is None, result.error
    failed = [r.to_json(result.scenario.name) for r in result.results if not r.match]
    assert not failed, json.dumps(failed, indent=1)
    assert result.results


def test_cli_json_and_exit_code(tmp_path: Path) -> None:
    """`vantage lab run --json`: one object per expectation, then a summary; exit 0
    only when all hold (a scenario expecting the wrong thing exits 1)."""
    wrong = tmp_path / "wrong.toml"
    text = (ROOT / "probe/lab/scenarios/server-down.toml").read_text()
    wrong.write_text(text.replace('failure = "connection_refused"', 'failure = "none"'))
    (proc,), ((out, err),), labs = _run_watching(
        [[sys.executable, "-m", "probe", "lab", "run", "--json", "server-down", str(wrong)]]
    )
    assert proc.returncode == 1, err
    lines = [json.loads(x) for x in out.splitlines()]
    summaries = [x["summary"] for x in lines if "summary" in x]
    assert [(s["scenario"], s["ok"]) for s in summaries] == [
        ("server-down", True),
        ("server-down", False),
    ]
    rows = [x for x in lines if "summary" not in x]
    assert {"scenario", "service", "target", "expected", "observed", "match"} <= set(rows[0])
    n = len(rows) // 2  # the same expectations, once per scenario
    assert all(r["match"] for r in rows[:n])
    failed = [r for r in rows[n:] if not r["match"]]
    assert [(f["expected"], f["observed"]) for f in failed] == [
        ({"step": "tcp", "failure": "none"}, {"failure": "connection_refused"})
    ]
    assert len(labs) == 2 and not _left_of(labs)  # one lab per scenario, both torn down


def test_leftovers_of_a_crashed_lab_are_removed() -> None:
    from probe.lab.netns import STATE_DIR, cleanup_leftovers

    lab_id = secrets.token_hex(3)  # this test's own: other labs may run at the same time
    ns, state = f"vl-{lab_id}-probe", STATE_DIR / f"{lab_id}.json"
    assert ns not in _namespaces() and not state.exists()
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps({"pid": 2**22 + 1, "namespaces": [ns]}))
        assert lab_id in cleanup_leftovers()
        assert ns not in _namespaces() and not state.exists()
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        state.unlink(missing_ok=True)


def test_two_labs_at_once() -> None:
    """Two labs side by side: separate namespaces, no clash, both torn down."""
    cmd = [sys.executable, "-m", "probe", "lab", "run", "--json"]
    procs, outs, labs = _run_watching(
        [[*cmd, name] for name in ("tls-sni-reset-signal", "dns-nxdomain-whatsapp")]
    )
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert json.loads(out.splitlines()[-1])["summary"]["ok"] is True
    assert len(labs) == 2 and not _left_of(labs)


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.split()}


def _labs_owned_by(pids: set[int]) -> set[str]:
    """Ids of the labs (state files) whose owner is one of ``pids``."""
    from probe.lab.netns import STATE_DIR

    found = set()
    for state in STATE_DIR.glob("*.json") if STATE_DIR.is_dir() else ():
        try:
            if json.loads(state.read_text()).get("pid") in pids:
                found.add(state.stem)
        except (OSError, ValueError, AttributeError):
            continue  # written or removed right now
    return found


def _run_watching(
    commands: list[list[str]],
) -> tuple[list[subprocess.Popen[str]], list[tuple[str, str]], set[str]]:
    """Run ``vantage lab`` commands at once; also return the ids of the labs they built
    (seen in the state directory while they ran), so that the checks that follow look
    at those labs only: other labs may be running on this machine at the same time."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT) for c in commands]  # fmt: skip
    outs: list[tuple[str, str]] = [("", "")] * len(procs)

    def collect(i: int) -> None:
        outs[i] = procs[i].communicate(timeout=300)

    readers = [threading.Thread(target=collect, args=(i,)) for i in range(len(procs))]
    for t in readers:
        t.start()
    labs: set[str] = set()
    pids = {p.pid for p in procs}
    while any(t.is_alive() for t in readers):
        labs |= _labs_owned_by(pids)
        time.sleep(0.02)
    return procs, outs, labs


def _left_of(labs: set[str]) -> set[str]:
    """What remains of these labs: namespaces, state files."""
    from probe.lab.netns import STATE_DIR

    left = {ns for ns in _namespaces() for i in labs if ns.startswith(f"vl-{i}-")}
    return left | {f"{i}.json" for i in labs if (STATE_DIR / f"{i}.json").exists()}


CLEAN = [p for p in shipped_scenarios() if not load_scenario(p).rules]


@pytest.mark.parametrize("path", CLEAN, ids=lambda p: p.stem)
def test_noise_is_never_called_blocking(path: Path) -> None:
    """Every clean scenario again over a bad link (5% loss, 200 ms jitter): lost packets
    may leave things unjudged, but no service may be called blocked."""
    import dataclasses

    from probe.analysis import offline, service_status
    from probe.lab.scenario import Path_

    s = load_scenario(path)
    noisy = dataclasses.replace(
        s, name=f"{s.name}-noisy", path=Path_(delay_ms=40, jitter_ms=200, loss_pct=5)
    )
    result = run_scenario(noisy)
    assert result.error is None, result.error
    ms = result.measurements
    assert ms
    is_offline = offline([m for m in ms if m.target.control])
    statuses = {
        sv: service_status(sv, ms, is_offline).status for sv in {m.target.service for m in ms}
    }
    assert not {sv: st for sv, st in statuses.items() if st in ("blocked", "partial")}, statuses
