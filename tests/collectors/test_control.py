"""The control helper: its API, its refusals and limits, and what it measures (loopback only)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from collectors.control import (
    API_CONTROL,
    API_HEALTH,
    BadTarget,
    ControlHelper,
    ControlSettings,
    EgressRefused,
    GuardedEventLoop,
    create_app,
    parse_request,
)
from probe import __version__
from probe.catalog import load_catalog
from probe.engine.context import Timeouts
from probe.engine.dns import ResolverSpec
from schema import wire
from schema.model import Measurement, Target
from tests.collectors import serving
from tests.conftest import EXPIRED, FAST, LOOPBACK, VALID, http_target
from tests.fixtures import Behaviour, Certs, DNSServer, TCPServer, WebServer, closed_port

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token"


@pytest.fixture
def make_helper(dns_server: DNSServer, ca_file: str) -> Callable[..., ControlHelper]:
    """A helper that resolves with the fixture DNS server and trusts the fixture CA."""

    def make(**kw: Any) -> ControlHelper:
        kw.setdefault("resolvers", (ResolverSpec("udp", dns_server.host, dns_server.port),))
        kw.setdefault("ca_files", (ca_file,))
        kw.setdefault("system_cas", False)
        kw.setdefault("allow_ranges", LOOPBACK)
        kw.setdefault("timeouts", FAST)
        return ControlHelper(ControlSettings(**kw))

    return make


def body(target: Target) -> dict[str, Any]:
    return {"target": wire.target_to_wire(target)}


def ask(url: str, target: Target, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(trust_env=False, timeout=30) as client:
        return client.post(url + API_CONTROL, json=body(target), headers=headers)


def measured(response: httpx.Response) -> Measurement:
    assert response.status_code == 200, response.text
    return wire.from_wire(response.json()["measurement"])


# -- measuring, through uvicorn on the guarded loop -----------------------------------


def test_valid_https_page(make_helper, dns_server: DNSServer, web: WebServer) -> None:
    dns_server.set(VALID, a=["127.0.0.1"])
    target = http_target(f"https://{VALID}:{web.port}/")
    with serving(make_helper()) as url:
        m = measured(ask(url, target))
    assert m.vantage.probe_id == "control-helper"
    assert m.vantage.software_version == __version__
    assert m.target == target
    assert {q.query_type for q in m.queries} == {"A", "AAAA"}
    assert m.queries[0].resolver_address == f"127.0.0.1:{dns_server.port}"
    assert [(c.ip, c.failure) for c in m.tcp_connect] == [("127.0.0.1", None)]
    assert [h.failure for h in m.tls_handshakes] == [None]
    assert m.tls_handshakes[0].peer_certificates  # the chain is evidence
    assert [r.status for r in m.requests] == [200]
    assert b"Fixture home page" in m.requests[0].body
    assert m.failure() is None
    assert "control_refused" not in m.annotations


def test_expired_certificate(make_helper, dns_server: DNSServer, web: WebServer) -> None:
    dns_server.set(EXPIRED, a=["127.0.0.1"])
    with serving(make_helper()) as url:
        m = measured(ask(url, http_target(f"https://{EXPIRED}:{web.port}/")))
    assert [h.failure for h in m.tls_handshakes] == ["ssl_invalid_certificate"]
    assert m.requests == []
    assert m.failure() == "ssl_invalid_certificate"


def test_closed_port(make_helper) -> None:
    target = Target(id="c", service="s", kind="tcp", host="127.0.0.1", ports=(closed_port(),))
    with serving(make_helper()) as url:
        m = measured(ask(url, target))
    assert m.queries == []  # an address needs no DNS
    assert [c.failure for c in m.tcp_connect] == ["connection_refused"]


def test_nxdomain_is_reported_not_refused(make_helper, dns_server: DNSServer) -> None:
    dns_server.set("gone.test", rcode="NXDOMAIN")
    target = Target(id="g", service="s", kind="dns", host="gone.test")
    with serving(make_helper()) as url:
        m = measured(ask(url, target))
    assert {q.failure for q in m.queries} == {"dns_nxdomain_error"}


def test_dns_answers_outside_the_allowed_ranges_are_not_connected(
    make_helper, dns_server: DNSServer, web: WebServer
) -> None:
    """A public name resolving to a private address is the engine's dns_bogon_error."""
    dns_server.set(VALID, a=["127.0.0.1"])
    helper = make_helper(allow_ranges=(ipaddress.ip_network("127.0.0.2/32"),))
    with serving(helper) as url:
        m = measured(ask(url, http_target(f"https://{VALID}:{web.port}/")))
    assert {q.failure for q in m.queries} >= {"dns_bogon_error"}
    assert m.tcp_connect == [] and m.requests == []


def test_redirect_to_a_private_address_is_not_followed(make_helper, plain_web: WebServer) -> None:
    """The guarded loop stops a public server bouncing the helper into private space."""
    location = f"http://127.0.0.1:{plain_web.port}/"
    reply = f"HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n".encode()
    helper = make_helper(allow_ranges=(ipaddress.ip_network("127.0.0.2/32"),))
    with TCPServer("garbage_after_read", host="127.0.0.2", reply=reply) as bouncer:
        target = http_target(f"http://127.0.0.2:{bouncer.port}/")
        before = len(plain_web.requests)
        with serving(helper) as url:
            m = measured(ask(url, target))
    assert [r.status for r in m.requests] == [302, None]
    # The engine refuses the hop before connecting (a non-public address).
    assert (m.requests[1].failure, m.requests[1].failed_operation) == ("dns_bogon_error", "resolve")
    assert len(plain_web.requests) == before  # nothing reached the private server


def test_the_deadline_bounds_a_measurement(make_helper) -> None:
    with TCPServer("blackhole") as hole:
        helper = make_helper(timeouts=Timeouts(dns=1, tcp=10, tls=1, http=1), deadline=0.5)
        target = Target(id="h", service="s", kind="tcp", host="127.0.0.1", ports=(hole.port,))
        started = time.monotonic()
        with serving(helper) as url:
            m = measured(ask(url, target))
    assert time.monotonic() - started < 5
    assert [c.failure for c in m.tcp_connect] == ["interrupted"]
    assert m.annotations["interrupted"] == "true"
    assert m.annotations["interrupted_reason"] == "control_deadline"


# -- the API, in-process (httpx.ASGITransport) ------------------------------------------


class NeverMeasures(ControlHelper):
    """For refusal tests: reaching the engine is a failure of the test, not traffic."""

    async def measure(self, target: Target) -> Measurement:
        raise AssertionError(f"measured {target.input}")


def call(
    helper: ControlHelper,
    method: str,
    path: str,
    *,
    content: bytes | None = None,
    json_body: Any = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(helper))
        async with httpx.AsyncClient(transport=transport, base_url="http://control") as client:
            return await client.request(
                method, path, content=content, json=json_body, headers=headers
            )

    return asyncio.run(go())


def never(**kw: Any) -> NeverMeasures:
    settings = ControlSettings(resolvers=(ResolverSpec("udp", "127.0.0.1", 1),), **kw)
    return NeverMeasures(settings)


def test_health() -> None:
    r = call(never(token=TOKEN), "GET", API_HEALTH)
    assert r.status_code == 200 and r.json() == {"ok": True}


LOOPBACK_TARGET = Target(id="l", service="s", kind="tcp", host="127.0.0.1", ports=(80,))


@pytest.mark.parametrize(
    "target",
    [
        LOOPBACK_TARGET,
        Target(id="p", service="s", kind="tcp", host="10.1.2.3", ports=(80,)),
        Target(id="v6", service="s", kind="tcp", host="::1", ports=(80,)),
        Target(id="m", service="s", kind="tcp", host="::ffff:127.0.0.1", ports=(80,)),
        Target(
            id="a",
            service="s",
            kind="tcp",
            host="name.test",
            ports=(80,),
            addresses=("192.168.1.1",),
        ),
        Target(
            id="u",
            service="s",
            kind="http",
            host="169.254.169.254",
            url="http://169.254.169.254/latest/meta-data/",
        ),
        Target(id="u2", service="s", kind="http", host="name.test", url="http://10.0.0.1/"),
    ],
    ids=lambda t: t.id,
)
def test_non_public_targets_are_refused(target: Target) -> None:
    r = call(never(), "POST", API_CONTROL, json_body=body(target))
    assert r.status_code == 403, r.text
    assert "non-public" in r.json()["detail"] and "--allow-range" in r.json()["detail"]


def test_allow_range_admits_a_reserved_range(make_helper) -> None:
    helper = make_helper(allow_ranges=(ipaddress.ip_network("127.0.0.0/8"),))
    with serving(helper) as url:
        m = measured(
            ask(
                url,
                Target(id="c", service="s", kind="tcp", host="127.0.0.1", ports=(closed_port(),)),
            )
        )
    assert [c.failure for c in m.tcp_connect] == ["connection_refused"]


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {TOKEN}", "Bearer", ""])
def test_token_is_required(header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else None
    r = call(
        never(token=TOKEN), "POST", API_CONTROL, json_body=body(LOOPBACK_TARGET), headers=headers
    )
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"


def test_the_right_token_passes() -> None:
    r = call(
        never(token=TOKEN),
        "POST",
        API_CONTROL,
        json_body=body(LOOPBACK_TARGET),
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert r.status_code == 403  # past authentication, then refused as loopback


GOOD = wire.target_to_wire(
    Target(id="g", service="s", kind="tcp", host="example.test", ports=(443,))
)


def with_(**changes: Any) -> dict[str, Any]:
    return {"target": {**GOOD, **changes}}


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (b"this is not json", "not JSON"),
        (b"\xff\xfe\x00garbage", "not JSON"),
        (b"[" * 40_000, "not JSON"),  # too deep for the parser: not a crash
        (b"[]", '{"target"'),
        (b'{"target": 5}', '{"target"'),
        (b'{"target": {"id": "x"}}', "target.service"),
        (json.dumps(with_(kind="ftp")).encode(), "target.kind"),
        (json.dumps(with_(host="")).encode(), "target.host"),
        (json.dumps(with_(host="a b.test")).encode(), "target.host"),
        (json.dumps(with_(host=["x"])).encode(), "target.host"),
        (json.dumps(with_(ports=[0])).encode(), "target.ports"),
        (json.dumps(with_(ports=[70000])).encode(), "target.ports"),
        (json.dumps(with_(ports=["443"])).encode(), "target.ports"),
        (json.dumps(with_(ports=list(range(1, 20)))).encode(), "target.ports"),
        (json.dumps(with_(kind="http", url=None)).encode(), "needs target.url"),
        (json.dumps(with_(kind="http", url="ftp://example.test/")).encode(), "target.url"),
        (json.dumps(with_(kind="http", url="http://exa mple.test/")).encode(), "target.url"),
        (json.dumps(with_(kind="http", url="http://example.test:99999/")).encode(), "target.url"),
        (json.dumps(with_(method="G E T")).encode(), "target.method"),
        (json.dumps(with_(addresses=["not-an-ip"])).encode(), "target.addresses"),
        (json.dumps(with_(body=5)).encode(), "target.body"),
        (json.dumps(with_(expect={"asns": ["AS1"]})).encode(), "target.expect.asns"),
        (json.dumps(with_(source={"url": "x", "checked": "yesterday"})).encode(), "valid target"),
    ],
)
def test_garbage_is_422_with_a_clear_message(payload: bytes, words: str) -> None:
    r = call(never(), "POST", API_CONTROL, content=payload)
    assert r.status_code == 422, r.text
    assert words in r.json()["detail"]


def test_body_size_is_limited() -> None:
    big = json.dumps(with_(body="x" * 70_000)).encode()
    r = call(never(), "POST", API_CONTROL, content=big)
    assert r.status_code == 413

    async def chunked() -> Any:  # no Content-Length: counted while reading
        for _ in range(70):
            yield b" " * 1024

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(never()))
        async with httpx.AsyncClient(transport=transport, base_url="http://control") as client:
            return await client.post(API_CONTROL, content=chunked())

    assert asyncio.run(go()).status_code == 413


def test_every_catalog_target_is_accepted() -> None:
    """The built-in catalog's targets pass validation and arrive unchanged."""
    targets = [t for s in load_catalog([], builtin=True) for t in s.targets]
    assert targets
    for t in targets:
        got = parse_request(json.dumps(body(t)).encode())
        assert wire.target_to_wire(got) == wire.target_to_wire(t)
        assert got.ca_file is None


def test_a_client_cannot_name_a_local_ca_file() -> None:
    doc = with_()
    doc["target"]["ca_file"] = "/etc/shadow"
    assert parse_request(json.dumps(doc).encode()).ca_file is None
    with pytest.raises(BadTarget):
        parse_request(b"{}")


def test_busy_when_every_slot_is_taken(make_helper) -> None:
    with TCPServer("blackhole") as hole:
        helper = make_helper(
            timeouts=Timeouts(dns=1, tcp=2, tls=1, http=1),
            max_concurrent=1,
            queue_wait=0.2,
            deadline=1.0,
        )
        target = Target(id="h", service="s", kind="tcp", host="127.0.0.1", ports=(hole.port,))

        async def go() -> list[int]:
            transport = httpx.ASGITransport(app=create_app(helper))
            async with httpx.AsyncClient(transport=transport, base_url="http://c") as client:
                rs = await asyncio.gather(
                    *(client.post(API_CONTROL, json=body(target)) for _ in range(2))
                )
            return sorted(r.status_code for r in rs)

        assert asyncio.run(go()) == [200, 503]


def test_an_engine_crash_is_a_500_not_a_dead_server(make_helper) -> None:
    class Broken(ControlHelper):
        async def measure(self, target: Target) -> Measurement:
            raise RuntimeError("the probe itself cannot run")

    helper = make_helper()
    broken = Broken(helper.settings)
    r = call(
        broken,
        "POST",
        API_CONTROL,
        json_body=body(Target(id="c", service="s", kind="tcp", host="127.0.0.1", ports=(1,))),
    )
    assert r.status_code == 500
    assert "could not measure" in r.json()["detail"]
    assert call(broken, "GET", API_HEALTH).status_code == 200


# -- the guarded event loop -----------------------------------------------------------


def test_guarded_loop_refuses_what_it_does_not_permit() -> None:
    with TCPServer("accept") as srv:
        loop = GuardedEventLoop(lambda address, port: address == "127.0.0.2")
        try:
            for host in ("127.0.0.1", "localhost"):
                with pytest.raises(EgressRefused):
                    loop.run_until_complete(asyncio.open_connection(host, srv.port))
        finally:
            loop.close()
        loop = GuardedEventLoop(lambda address, port: address == "127.0.0.1")

        async def connect() -> None:
            _, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.close()
            await writer.wait_closed()

        try:
            loop.run_until_complete(connect())
        finally:
            loop.close()


# -- the command ----------------------------------------------------------------------


def vantage(*args: str, code: str | None = None) -> subprocess.CompletedProcess[str]:
    prog = code or "from probe.cli import main; import sys; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", prog, *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )


def test_serve_without_fastapi_exits_69() -> None:
    code = (
        "import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None; "
        "from probe.cli import main; sys.exit(main(['control', 'serve']))"
    )
    proc = vantage(code=code)
    assert proc.returncode == 69, proc.stderr
    assert "pip install 'vantage-probe[collector]'" in proc.stderr


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--allow-range", "not-a-net"], "--allow-range"),
        (["--resolver", "dns.example"], "not an IP address"),
        (["--ca-bundle", "/nonexistent/ca.pem"], "--ca-bundle"),
        (["--port", "0"], "--port"),
    ],
)
def test_serve_rejects_bad_flags(flags: list[str], words: str) -> None:
    proc = vantage("control", "serve", "--resolver", "udp://127.0.0.1:53", *flags)
    assert proc.returncode == 78, proc.stderr
    assert words in proc.stderr


def test_serve_runs_and_stops_on_sigint(dns_server: DNSServer, ca_file: str) -> None:
    port = closed_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "probe",
            "control",
            "serve",
            "--port",
            str(port),
            "--resolver",
            f"udp://127.0.0.1:{dns_server.port}",
            "--ca-bundle",
            ca_file,
            "--no-system-cas",
            "--allow-range",
            "127.0.0.0/8",
            "--token",
            TOKEN,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                r = httpx.get(base + API_HEALTH, trust_env=False, timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
                time.sleep(0.1)
        assert r.json() == {"ok": True}
        target = Target(id="c", service="s", kind="tcp", host="127.0.0.1", ports=(closed_port(),))
        assert ask(base, target).status_code == 401
        m = measured(ask(base, target, TOKEN))
        assert [c.failure for c in m.tcp_connect] == ["connection_refused"]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "POST /api/v1/control" not in err  # no access log: clients are volunteers' IPs


def test_only_a_tcp_resolvers_own_port_is_exempt() -> None:
    helper = ControlHelper(ControlSettings(resolvers=(ResolverSpec.parse("tcp://127.0.0.53:53"),)))
    assert helper.permits("127.0.0.53", 53)
    assert not helper.permits("127.0.0.53", 80)
    assert not helper.permits("10.0.0.1", 53)
    assert not helper.permits("not an address", 53)


def test_doh_resolver(make_helper, certs: Certs) -> None:
    zone = {"doh.test": Behaviour(a=["127.0.0.10"])}
    with WebServer(default_ssl=certs.valid("localhost"), doh_zone=zone) as doh:
        helper = make_helper(
            resolvers=(ResolverSpec.parse(f"https://localhost:{doh.port}/dns-query"),)
        )
        with serving(helper) as url:
            m = measured(ask(url, Target(id="d", service="s", kind="dns", host="doh.test")))
    a = next(q for q in m.queries if q.query_type == "A")
    assert a.engine == "doh" and a.failure is None and a.addresses() == ["127.0.0.10"]
