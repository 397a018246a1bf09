"""``vantage enroll``: the credential file, the collector's refusals, hostile answers."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from starlette.responses import JSONResponse, Response

from probe.outbox import EnrollmentError, enroll, enrollment, enrollment_path
from probe.vantage import probe_id
from tests.fixtures import closed_port
from tests.outbox.conftest import Probe, stored_json, vantage_cli
from tests.outbox.standin import StandIn


def test_enroll_stores_the_credential_for_this_user_only(probe: Probe, standin: StandIn) -> None:
    old = os.umask(0)  # even with a permissive umask
    try:
        e = enroll(probe.cfg, standin.url + "/", standin.token)
    finally:
        os.umask(old)
    path = enrollment_path(probe.cfg)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = stored_json(path)
    assert doc["url"] == standin.url  # no trailing slash
    assert doc["probe_id"] == probe_id(probe.cfg.data_dir()) == e.probe_id
    assert doc["credential"] == standin.credential
    assert doc["enrolled_at"].startswith("20")
    assert enrollment(probe.cfg) == e
    assert standin.credential not in repr(e)
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_an_existing_enrollment_needs_force(probe: Probe, standin: StandIn) -> None:
    first = enroll(probe.cfg, standin.url, standin.token)
    with pytest.raises(EnrollmentError, match="already enrolled at .* use --force") as info:
        enroll(probe.cfg, standin.url, standin.token)
    assert info.value.reason == "exists"
    # The collector still has this probe: --force alone meets its 409, and the old
    # enrollment is kept.
    with pytest.raises(EnrollmentError, match="already enrolled at .*revoke") as info:
        enroll(probe.cfg, standin.url, standin.token, force=True)
    assert info.value.reason == "conflict"
    assert enrollment(probe.cfg) == first
    standin.enrolled.clear()  # the operator revoked it
    standin.credential = "cred-second"
    second = enroll(probe.cfg, standin.url, standin.token, force=True)
    assert second.credential == "cred-second" and enrollment(probe.cfg) == second


def test_a_refused_token_stores_nothing(probe: Probe, standin: StandIn) -> None:
    with pytest.raises(EnrollmentError, match="refused the token.*unknown token") as info:
        enroll(probe.cfg, standin.url, "wrong")
    assert info.value.reason == "refused"
    assert not enrollment_path(probe.cfg).exists() and enrollment(probe.cfg) is None


def test_an_unreachable_collector(probe: Probe) -> None:
    with pytest.raises(EnrollmentError, match="cannot reach the collector") as info:
        enroll(probe.cfg, f"http://127.0.0.1:{closed_port()}", "t")
    assert info.value.reason == "unreachable"


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (Response(b"<html>", status_code=201), "malformed enrollment answer"),
        (JSONResponse([1], status_code=201), "not a JSON object"),
        (JSONResponse({"probe_id": "someone-else", "credential": "c"}, 201), "names probe"),
        (None, "not printable ASCII"),  # a credential with a newline: header injection
        (Response(b"x" * 200_000, status_code=201), "malformed"),
        (JSONResponse({"error": "down for maintenance"}, 500), "HTTP 500.*maintenance"),
        (Response(status_code=302, headers={"location": "http://elsewhere.test/"}), "HTTP 302"),
    ],
)
def test_hostile_enrollment_answers_store_nothing(
    probe: Probe, standin: StandIn, answer: Response | None, match: str
) -> None:
    def hostile(body: dict) -> Response:
        if answer is not None:
            return answer
        return JSONResponse({"probe_id": body["probe_id"], "credential": "a\r\nX-Evil: 1"}, 201)

    standin.on_enroll = hostile
    with pytest.raises(EnrollmentError, match=match) as info:
        enroll(probe.cfg, standin.url, standin.token)
    assert info.value.reason == "protocol"
    assert not enrollment_path(probe.cfg).exists()


def test_bad_urls(probe: Probe) -> None:
    for url in ("collector.example.org", "ftp://x.test/", "https://x.test/?a=1", "http://"):
        with pytest.raises(EnrollmentError, match="collector URL") as info:
            enroll(probe.cfg, url, "t")
        assert info.value.reason == "usage"


def test_a_damaged_enrollment_file_is_a_clear_error(probe: Probe, standin: StandIn) -> None:
    path = enrollment_path(probe.cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    for content in ("{not json", json.dumps({"url": standin.url}), "[]"):
        path.write_text(content)
        with pytest.raises(EnrollmentError, match=f"{path}: damaged enrollment.*--force"):
            enrollment(probe.cfg)
    # Enrolling replaces a damaged file without --force.
    assert enroll(probe.cfg, standin.url, standin.token).credential == standin.credential


def test_collector_url_in_the_config_overrides_the_stored_one(
    probe: Probe, standin: StandIn
) -> None:
    enroll(probe.cfg, standin.url, standin.token)
    moved = probe.with_config(collector__url="https://collector.example.org/v/")
    e = enrollment(moved.cfg)
    assert e is not None and e.url == "https://collector.example.org/v"
    assert e.credential == standin.credential


# -- the command line -----------------------------------------------------------------


def test_cli_enroll_and_its_exit_codes(tmp_path: Path, standin: StandIn) -> None:
    data = tmp_path / "d"
    proc = vantage_cli("upload", data_dir=data)
    assert proc.returncode == 77 and "not enrolled" in proc.stderr
    proc = vantage_cli("enroll", standin.url, "--token", "nope", data_dir=data)
    assert proc.returncode == 77 and "refused the token" in proc.stderr
    proc = vantage_cli("enroll", f"http://127.0.0.1:{closed_port()}", "--token", "t", data_dir=data)
    assert proc.returncode == 75 and "cannot reach" in proc.stderr
    proc = vantage_cli("enroll", standin.url, "--token-file", "-", data_dir=data,
                       input=standin.token + "\n")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    pid = (data / "probe_id").read_text().strip()
    assert f"enrolled probe {pid} at {standin.url}" in proc.stdout
    assert stored_json(data / "collector.json")["credential"] == standin.credential
    proc = vantage_cli("enroll", standin.url, "--token", standin.token, data_dir=data)
    assert proc.returncode == 64 and "--force" in proc.stderr
    proc = vantage_cli("enroll", standin.url, "--token", standin.token, "--force", data_dir=data)
    assert proc.returncode == 77 and "revoke" in proc.stderr  # the collector's 409
    proc = vantage_cli("enroll", "not-a-url", "--token", "t", "--force", data_dir=data)
    assert proc.returncode == 64 and "not an http:// or https:// URL" in proc.stderr
