"""GET /api/v1/export, in a small FastAPI app of our own served by uvicorn on loopback:
the same bytes as the command line, streamed; errors as {"error": ...}."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pyarrow.parquet as pq
import pytest
import uvicorn
from fastapi import FastAPI

from collectors.export import router
from probe.export import reader as reader_module
from probe.export.pseudonym import Pseudonymizer
from probe.export.reader import ReadError
from tests.export.conftest import export_bytes, lines

OPERATOR = "vop_the-operator-of-this-test-collector"


@pytest.fixture
def settings(tmp_path: Path) -> SimpleNamespace:
    token_file = tmp_path / "operator.token"
    token_file.write_text(OPERATOR + "\n")
    return SimpleNamespace(asn_db="", pseudonym_key_file="", operator_token_file=str(token_file))


@pytest.fixture
def base_url(engine, settings) -> Iterator[str]:
    app = FastAPI()
    app.state.engine = engine
    app.state.settings = settings
    app.include_router(router)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)


def _get(base_url: str, query: str, operator: bool = True) -> httpx.Response:
    """An export as the operator (who may have real probe ids), or as the public."""
    headers = {"Authorization": f"Bearer {OPERATOR}"} if operator else {}
    return httpx.get(f"{base_url}/api/v1/export?{query}", timeout=30, headers=headers)


@pytest.mark.parametrize("fmt,media", [("jsonl", "application/x-ndjson"),
                                       ("csv", "text/csv; charset=utf-8"),
                                       ("ooni", "application/x-ndjson"),
                                       ("parquet", "application/vnd.apache.parquet")])  # fmt: skip
def test_same_bytes_as_the_command_line(base_url, engine, stored, fmt, media) -> None:
    r = _get(base_url, f"format={fmt}")
    assert r.status_code == 200
    assert r.headers["content-type"] == media
    assert r.headers["transfer-encoding"] == "chunked"  # streamed, not buffered
    assert r.headers["x-vantage-measurements"] == str(len(stored))
    assert r.headers["content-disposition"].startswith('attachment; filename="vantage-')
    assert r.content == export_bytes(engine, fmt)
    if fmt == "parquet":
        assert pq.read_table(io.BytesIO(r.content)).num_rows == len(stored)


def test_filters_repeat_and_combine(base_url, engine) -> None:
    r = _get(base_url, "format=jsonl&cc=IR&cc=TR&service=telegram&blocking=true")
    assert r.status_code == 200
    assert r.content == export_bytes(engine, "jsonl", cc=["IR", "TR"], service=["telegram"],
                                     blocking=["true"])  # fmt: skip
    assert {json.loads(x)["probe_cc"] for x in lines(r.content)} <= {"IR", "TR"}


@pytest.mark.parametrize("query,status,message", [
    ("format=xml", 422, "unknown format 'xml'"),
    ("since=2024-01-01", 422, "format: needed"),
    ("format=csv&since=2024-02-30", 422, "since: not a date"),
    ("format=csv&colour=red", 422, "colour: unknown parameter"),
    ("format=csv&format=jsonl", 422, "format: given more than once"),
    ("format=parquet&partition_by=date", 422, "partition_by: a dataset directory"),
    ("format=csv&pseudonymize=true", 422, "no pseudonym key"),
    ("format=csv&pseudonymize=yes", 422, "pseudonymize: must be true or false"),
    ("format=csv&cc=FR", 404, "no measurement matches (cc FR)"),
])  # fmt: skip
def test_errors(base_url, query, status, message) -> None:
    r = _get(base_url, query)
    assert r.status_code == status
    assert message in r.json()["error"]


def test_pseudonymize_with_the_collectors_key(base_url, settings, engine, tmp_path) -> None:
    settings.pseudonym_key_file = str(tmp_path / "collector.key")
    r = _get(base_url, "format=jsonl&pseudonymize=true")
    assert r.status_code == 200
    key_file = Path(settings.pseudonym_key_file)
    assert key_file.stat().st_mode & 0o777 == 0o600
    p = Pseudonymizer.from_key_file(key_file)
    plain = [json.loads(x) for x in lines(export_bytes(engine, "jsonl"))]
    hashed = [json.loads(x) for x in lines(r.content)]
    assert [d["probe_id"] for d in hashed] == [p(d["probe_id"]) for d in plain]
    assert _get(base_url, "format=jsonl&pseudonymize=true").content == r.content  # same key


def test_the_public_gets_pseudonyms_only(base_url, settings, engine, tmp_path) -> None:
    r = _get(base_url, "format=jsonl", operator=False)
    assert r.status_code == 403  # no pseudonym key: nothing is published
    assert "no pseudonym key" in r.json()["error"]
    settings.pseudonym_key_file = str(tmp_path / "collector.key")
    r = _get(base_url, "format=jsonl&pseudonymize=false", operator=False)
    assert r.status_code == 403
    assert "operator's token" in r.json()["error"]
    wrong = httpx.get(f"{base_url}/api/v1/export?format=jsonl&pseudonymize=false",
                      headers={"Authorization": "Bearer vop_not-the-token"}, timeout=30)  # fmt: skip
    assert wrong.status_code == 403
    public = _get(base_url, "format=jsonl", operator=False)
    assert public.status_code == 200
    assert public.content == _get(base_url, "format=jsonl&pseudonymize=true").content


def test_a_failure_midway_cuts_the_response_short(base_url, monkeypatch) -> None:
    def failing(self, conn, uids):
        raise ReadError("cannot read measurements: disk I/O error")

    monkeypatch.setattr(reader_module.Reader, "_fetch", failing)
    with pytest.raises(httpx.RemoteProtocolError):
        _get(base_url, "format=csv")  # the header row went out: the body never ends cleanly
