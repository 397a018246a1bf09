"""Asking a control helper: the answer, and every way asking can fail (loopback only)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from typing import Any

import httpx
import pytest

from collectors.control import ControlHelper, ControlSettings
from probe.control import ControlResult, ask_control, control_endpoint
from probe.engine.dns import ResolverSpec
from schema import wire
from schema.model import Measurement, Target
from tests.collectors import serving
from tests.conftest import FAST, LOOPBACK, VALID, VANTAGE, http_target
from tests.fixtures import DNSServer, TCPServer, WebServer, closed_port

TOKEN = "t0ken"


def ask(url: str, target: Target, **kw: Any) -> ControlResult:
    return asyncio.run(ask_control(url, target, **kw))


@pytest.fixture
def helper(dns_server: DNSServer, ca_file: str) -> ControlHelper:
    return ControlHelper(
        ControlSettings(
            resolvers=(ResolverSpec("udp", dns_server.host, dns_server.port),),
            ca_files=(ca_file,),
            system_cas=False,
            allow_ranges=LOOPBACK,
            timeouts=FAST,
            token=TOKEN,
        )
    )


def test_the_helpers_measurement_comes_back(
    helper: ControlHelper, dns_server: DNSServer, web: WebServer
) -> None:
    dns_server.set(VALID, a=["127.0.0.1"])
    target = http_target(f"https://{VALID}:{web.port}/")
    with serving(helper) as url:
        result = ask(url + "/", target, token=TOKEN)
    assert result.error is None and result.measurement is not None
    m = result.measurement
    assert m.target == target and m.vantage.probe_id == "control-helper"
    assert [r.status for r in m.requests] == [200]


def test_refusals_and_auth_become_error_text(helper: ControlHelper) -> None:
    target = Target(id="c", service="s", kind="tcp", host="127.0.0.1", ports=(closed_port(),))
    with serving(helper) as url:
        assert (
            ask(url, target).error
            == "control helper answered HTTP 401: a valid bearer token is required"
        )
        ok = ask(url + "/api/v1/control", target, token=TOKEN)
    assert ok.error is None and ok.measurement is not None
    assert [c.failure for c in ok.measurement.tcp_connect] == ["connection_refused"]


def test_server_down() -> None:
    result = ask(f"http://127.0.0.1:{closed_port()}", http_target("https://example.test/"))
    assert result.measurement is None
    assert result.error is not None and result.error.startswith("control helper unreachable")


def test_timeout() -> None:
    with TCPServer("accept") as silent:  # accepts, reads, never answers
        result = ask(
            f"http://127.0.0.1:{silent.port}", http_target("https://example.test/"), timeout=0.5
        )
    assert result.measurement is None
    assert result.error is not None and result.error.startswith("control helper timed out")


def test_not_json() -> None:
    reply = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 6\r\n\r\n<html>"
    with TCPServer("garbage_after_read", reply=reply) as srv:
        result = ask(f"http://127.0.0.1:{srv.port}", http_target("https://example.test/"))
    assert result.measurement is None
    assert result.error is not None and result.error.startswith("control helper sent invalid JSON")


def mock(handler: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def answer(status: int, content: bytes) -> httpx.AsyncClient:
    return mock(lambda request: httpx.Response(status, content=content))


TARGET = http_target("https://example.test/")


def measurement_doc(target: Target = TARGET) -> dict[str, Any]:
    m = Measurement(
        measurement_uid="u",
        run_id="r",
        target=target,
        vantage=VANTAGE,
        start_time=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    )
    return {"measurement": wire.to_wire(m)}


@pytest.mark.parametrize(
    ("status", "content", "words"),
    [
        (
            500,
            b'{"detail": "the control helper could not measure this target"}',
            "HTTP 500: the control helper could not measure this target",
        ),
        (502, b"<html>bad gateway</html>", "HTTP 502: <html>bad gateway</html>"),
        (503, b"", "HTTP 503"),
        (200, b"[1, 2", "invalid JSON"),
        (200, b"[]", "no measurement"),
        (200, b'{"measurement": {"data_format_version": "9.9.9"}}', "invalid measurement"),
        (200, b'{"measurement": {"data_format_version": "1.0.0"}}', "invalid measurement"),
        (
            200,
            json.dumps(measurement_doc(http_target("https://other.test/"))).encode(),
            "different target",
        ),
    ],
)
def test_bad_answers_become_error_text(status: int, content: bytes, words: str) -> None:
    result = ask("http://control.test", TARGET, client=answer(status, content))
    assert result.measurement is None
    assert result.error is not None and words in result.error, result.error


def test_only_the_target_is_sent() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=measurement_doc())

    result = ask("https://control.test/base/", TARGET, token=TOKEN, client=mock(handler))
    assert result.error is None and result.measurement is not None
    (request,) = seen
    assert str(request.url) == "https://control.test/base/api/v1/control"
    assert json.loads(request.content) == {"target": wire.target_to_wire(TARGET)}
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    sent = {k.lower() for k in request.headers}
    assert sent <= {
        "host",
        "accept",
        "accept-encoding",
        "connection",
        "user-agent",
        "content-type",
        "content-length",
        "authorization",
    }
    assert not any("forwarded" in k or k.startswith("x-") for k in sent)


def test_an_oversized_answer_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("probe.control.MAX_RESPONSE", 1000)
    result = ask("http://control.test", TARGET, client=answer(200, b" " * 5000))
    assert result.error is not None and "over 1000 bytes" in result.error


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        ("http://127.0.0.1:8700", "http://127.0.0.1:8700/api/v1/control"),
        ("http://127.0.0.1:8700/", "http://127.0.0.1:8700/api/v1/control"),
        ("https://c.example/vantage/", "https://c.example/vantage/api/v1/control"),
        ("https://c.example/api/v1/control", "https://c.example/api/v1/control"),
    ],
)
def test_control_endpoint(url: str, endpoint: str) -> None:
    assert control_endpoint(url) == endpoint
