"""Every shipped scenario, run for real: namespaces, censor, the real probe.

Needs root, iproute2 and nftables; skipped with the reason otherwise. Select with
``-m lab``. Each scenario builds its own namespaces (no link to the host) and tears
them down.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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
    proc = subprocess.run([sys.executable, "-m", "probe", "lab", "run", "--json", "server-down", str(wrong)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    summaries = [x["summary"] for x in lines if "summary" in x]
    assert [(s["scenario"], s["ok"]) for s in summaries] == [
        ("server-down", True),
        ("server-down", False),
    ]
    rows = [x for x in lines if "summary" not in x]
    assert {"scenario", "service", "target", "expected", "observed", "match"} <= set(rows[0])
    assert [r["match"] for r in rows] == [True, True, True, False]
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "vl-" not in left  # torn down


def test_leftovers_of_a_crashed_lab_are_removed() -> None:
    from probe.lab.netns import STATE_DIR, cleanup_leftovers

    subprocess.run(["ip", "netns", "add", "vl-dead00-probe"], check=True)
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    (STATE_DIR / "dead00.json").write_text(
        json.dumps({"pid": 2**22 + 1, "namespaces": ["vl-dead00-probe"]})
    )
    assert "dead00" in cleanup_leftovers()
    assert (
        "vl-dead00"
        not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    )


def test_two_labs_at_once() -> None:
    """Two labs side by side: separate namespaces, no clash, both torn down."""
    cmd = [sys.executable, "-m", "probe", "lab", "run", "--json"]
    procs = [subprocess.Popen([*cmd, name], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT)
             for name in ("tls-sni-reset-signal", "dns-nxdomain-whatsapp")]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert json.loads(out.splitlines()[-1])["summary"]["ok"] is True
    assert (
        "vl-" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    )
