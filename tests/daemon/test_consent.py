"""Informed consent: the notice, recording acceptance, and what counts as consent."""

from __future__ import annotations

import json
import os
import pty
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from probe.config import load_config
from probe.daemon.consent import (
    NOTICE_VERSION,
    consent_state,
    has_consent,
    notice,
    record_consent,
    refusal,
)
from tests.daemon.harness import ROOT, env_without_consent, vantage


@pytest.fixture(autouse=True)
def _no_consent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VANTAGE_PRIVACY_CONSENT")


def _cfg(data: Path, **env: str):
    return load_config(None, env=env, overrides={"probe.data_dir": str(data)})


def test_the_notice_says_what_it_does_keeps_shares_and_risks(tmp_path: Path) -> None:
    text = notice(_cfg(tmp_path / "d"))
    for words in ("WHAT IT DOES", "WHAT IT KEEPS", "WHAT IT SHARES", "THE RISKS",
                  "visible", "punished", "never stored (unless",
                  "privacy.store_ip = true", str(tmp_path / "d" / "vantage.db"),
                  "older than 90 days", f"notice version {NOTICE_VERSION}"):  # fmt: skip
        assert words in text, words
    assert "kept until you delete them" in notice(
        load_config(None, env={}, overrides={"retention.days": "0"})
    )


def test_recorded_consent_and_what_does_not_count(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "d")
    assert not has_consent(cfg) and consent_state(cfg).how == "missing"
    assert "no consent is recorded" in refusal(cfg)
    path = record_consent(cfg)
    assert has_consent(cfg)
    doc = json.loads(path.read_text())
    assert doc["accepted"] is True and doc["notice_version"] == NOTICE_VERSION
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    # An older notice's consent must be given again.
    path.write_text(json.dumps({**doc, "notice_version": NOTICE_VERSION - 1}))
    assert not has_consent(cfg) and consent_state(cfg).how == "outdated"
    assert "notice changed" in refusal(cfg)
    for damaged in ("{", "[]", json.dumps({"accepted": "yes", "notice_version": 1})):
        path.write_text(damaged)
        assert not has_consent(cfg) and consent_state(cfg).how == "unreadable"
    # The fleet operator's key.
    assert has_consent(_cfg(tmp_path / "d", VANTAGE_PRIVACY_CONSENT="true"))
    assert consent_state(_cfg(tmp_path / "d", VANTAGE_PRIVACY_CONSENT="true")).how == "config"


def test_consent_command_records_only_on_yes(tmp_path: Path) -> None:
    data = tmp_path / "d"
    env = env_without_consent()
    shown = vantage("consent", "--show", "--data-dir", str(data), env=env)
    assert shown.returncode == 0 and "THE RISKS" in shown.stdout
    assert "Consent: not given (missing)" in shown.stdout
    assert not (data / "consent.json").exists()
    piped = vantage("consent", "--data-dir", str(data), env=env)  # stdin is not a terminal
    assert piped.returncode == 1 and "--yes" in piped.stderr
    assert not (data / "consent.json").exists()
    accepted = vantage("consent", "--yes", "--data-dir", str(data), env=env)
    assert accepted.returncode == 0 and "THE RISKS" in accepted.stdout
    assert f"Consent recorded in {data / 'consent.json'}" in accepted.stdout
    assert has_consent(_cfg(data))
    shown = vantage("consent", "--show", "--data-dir", str(data), env=env)
    assert "Consent: recorded" in shown.stdout


def _on_a_terminal(data: Path, answer: str) -> tuple[int, str]:
    """`vantage consent` with a pseudo-terminal as stdin and stdout, answering."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "probe", "consent", "--data-dir", str(data)],
                            stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
                            env=env_without_consent())  # fmt: skip
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 60
    while b'Type "yes"' not in out and time.monotonic() < deadline:
        out += os.read(master, 65536)
    os.write(master, answer.encode() + b"\n")
    code = proc.wait(timeout=60)
    try:
        while chunk := os.read(master, 65536):
            out += chunk
    except OSError:  # the terminal closed with the process
        pass
    os.close(master)
    return code, out.decode(errors="replace")


def test_consent_on_a_terminal(tmp_path: Path) -> None:
    code, out = _on_a_terminal(tmp_path / "no", "no thanks")
    assert code == 1 and "not accepted" in out
    assert not (tmp_path / "no" / "consent.json").exists()
    code, out = _on_a_terminal(tmp_path / "yes", "yes")
    assert code == 0 and "Consent recorded" in out
    assert has_consent(_cfg(tmp_path / "yes"))
