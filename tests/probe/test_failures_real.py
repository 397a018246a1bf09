"""Every failure string the engine produces, produced through real loopback sockets.

Each test builds a server that misbehaves in one way and checks the exact failure
string and failed operation the engine records for it.
"""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from probe.engine import dns as dnsstep
from probe.engine.context import EngineContext
from probe.engine.dns import ResolverSpec
from probe.engine.measure import measure
from probe.engine.trace import Trace
from schema.model import FAILURES, Target, is_failure_string
from tests.conftest import EXPIRED, UNKNOWN, VALID, VANTAGE, WRONG, http_target, run_measure
from tests.fixtures import DNSServer, TCPServer, WebServer, closed_port
from tests.fixtures.webserver import huge_body

# -- DNS ------------------------------------------------------------------------


def _dns_target(name: str) -> Target:
    return Target(id="d", service="test", kind="dns", host=name)


@pytest.mark.parametrize(
    ("behaviour", "failure"),
    [
        ({"rcode": "NXDOMAIN"}, "dns_nxdomain_error"),
        ({"rcode": "SERVFAIL"}, "dns_servfail_error"),
        ({"rcode": "REFUSED"}, "dns_refused_error"),
        ({"rcode": "NOTIMP"}, "dns_server_misbehaving"),
        ({"garbage": True}, "dns_server_misbehaving"),
        ({"drop": True}, "generic_timeout_error"),
        ({}, "dns_no_answer"),  # the name exists but has no A/AAAA
    ],
)
def test_dns_failures(
    dns_server: DNSServer, ctx: EngineContext, behaviour: dict, failure: str
) -> None:
    dns_server.set("x.test", **behaviour)
    m = run_measure(_dns_target("x.test"), ctx)
    assert [q.query_type for q in m.queries] == ["A", "AAAA"]
    assert {q.failure for q in m.queries} == {failure}
    assert {q.failed_operation for q in m.queries} == {"resolve"}
    assert m.failure() == failure


def test_dns_answer_recorded_with_raw_wire_and_ttl(
    dns_server: DNSServer, ctx: EngineContext
) -> None:
    dns_server.set("ok.test", a=["127.0.0.7", "127.0.0.8"], aaaa=["::1"], ttl=123)
    m = run_measure(_dns_target("ok.test"), ctx)
    a, aaaa = m.queries
    assert a.failure is None and aaaa.failure is None
    assert sorted(a.addresses()) == ["127.0.0.7", "127.0.0.8"] and aaaa.addresses() == ["::1"]
    assert {ans.ttl for ans in a.answers} == {123}
    assert a.rcode == "NOERROR"
    import dns.message

    assert dns.message.from_wire(a.raw_response).answer[0].ttl == 123
    assert a.resolver_address == f"{ctx.resolvers[0].address}:{ctx.resolvers[0].port}"
    assert a.system_resolver is True
    assert 0 <= a.t0 <= a.t


def test_bogon_answer_is_flagged_and_not_connected(
    dns_server: DNSServer, make_ctx, web: WebServer
) -> None:
    dns_server.set(VALID, a=["127.0.0.1"])
    ctx = make_ctx(public_ranges=())  # loopback is a bogon unless declared public
    m = run_measure(http_target(f"https://{VALID}:{web.port}/"), ctx)
    assert m.queries[0].failure == "dns_bogon_error"
    assert m.queries[0].addresses() == ["127.0.0.1"]  # the evidence is kept
    assert m.tcp_connect == [] and m.requests == []


def test_dns_over_tcp(dns_server: DNSServer, make_ctx) -> None:
    dns_server.set("tcp.test", a=["127.0.0.9"])
    ctx = make_ctx(resolvers=[ResolverSpec("tcp", dns_server.host, dns_server.port)])
    m = run_measure(_dns_target("tcp.test"), ctx)
    assert m.queries[0].engine == "tcp" and m.queries[0].addresses() == ["127.0.0.9"]
    assert ("tcp.test", "A", "tcp") in dns_server.queries


def test_dns_over_https(certs, make_ctx) -> None:
    from tests.fixtures import Behaviour

    zone = {"doh.test": Behaviour(a=["127.0.0.10"])}
    with WebServer(default_ssl=certs.valid("localhost"), doh_zone=zone) as doh:
        ctx = make_ctx(resolvers=[ResolverSpec.parse(f"https://localhost:{doh.port}/dns-query")])

        async def go() -> list:
            import httpx

            async with httpx.AsyncClient(verify=ctx.ssl_context("http")) as client:
                return await dnsstep.resolve("doh.test", ctx, Trace(), client)

        a, aaaa = asyncio.run(go())
    assert a.engine == "doh" and a.addresses() == ["127.0.0.10"] and a.raw_response
    assert aaaa.failure == "dns_no_answer"


def test_two_resolvers_both_recorded(dns_server: DNSServer, make_ctx) -> None:
    with DNSServer() as other:
        dns_server.set("n.test", a=["127.0.0.11"])
        other.set("n.test", rcode="NXDOMAIN")
        ctx = make_ctx(
            resolvers=[
                ResolverSpec("udp", dns_server.host, dns_server.port, system=True),
                ResolverSpec("udp", other.host, other.port),
            ]
        )
        m = run_measure(_dns_target("n.test"), ctx)
    by_resolver = {(q.resolver_address, q.query_type): q.failure for q in m.queries}
    assert by_resolver[(f"127.0.0.1:{dns_server.port}", "A")] is None
    assert by_resolver[(f"127.0.0.1:{other.port}", "A")] == "dns_nxdomain_error"


# -- TCP ------------------------------------------------------------------------


def _tcp_target(port: int, *addresses: str) -> Target:
    return Target(id="c", service="test", kind="tcp", host=addresses[0], ports=(port,),
                  addresses=addresses[1:])  # fmt: skip


def test_connection_refused(ctx: EngineContext) -> None:
    m = run_measure(_tcp_target(closed_port(), "127.0.0.1"), ctx)
    assert m.queries == []  # an address needs no DNS
    (c,) = m.tcp_connect
    assert (c.failure, c.failed_operation) == ("connection_refused", "connect")


def test_connect_timeout(ctx: EngineContext) -> None:
    with TCPServer("blackhole") as hole:
        m = run_measure(_tcp_target(hole.port, "127.0.0.1"), ctx)
    # A timed-out connect is tried once more (a lost run of SYNs rarely repeats).
    first, again = m.tcp_connect
    for c in (first, again):
        assert (c.ip, c.port, c.failure) == ("127.0.0.1", hole.port, "generic_timeout_error")
        assert c.t - c.t0 >= ctx.timeouts.tcp * 0.9
    assert again.t0 >= first.t


# -- TLS ------------------------------------------------------------------------


def _tls_target(name: str, port: int) -> Target:
    return Target(id="h", service="test", kind="tls", host="127.0.0.1", ports=(port,), sni=name)


@pytest.mark.parametrize(
    ("name", "failure"),
    [
        (WRONG, "ssl_invalid_hostname"),
        (UNKNOWN, "ssl_unknown_authority"),
        (EXPIRED, "ssl_invalid_certificate"),
    ],
)
def test_certificate_failures_keep_the_chain(
    web: WebServer, ctx: EngineContext, name: str, failure: str
) -> None:
    m = run_measure(_tls_target(name, web.port), ctx)
    (h,) = m.tls_handshakes
    assert (h.failure, h.failed_operation) == (failure, "tls_handshake")
    assert h.server_name == name
    assert h.peer_certificates, "the chain must be kept even when validation fails"
    from cryptography import x509

    leaf = x509.load_der_x509_certificate(h.peer_certificates[0])
    assert leaf.subject  # a real certificate, parsed back


def test_valid_handshake(web: WebServer, ctx: EngineContext) -> None:
    m = run_measure(_tls_target(VALID, web.port), ctx)
    (h,) = m.tls_handshakes
    assert h.failure is None
    assert h.tls_version in ("TLSv1.2", "TLSv1.3") and h.cipher_suite
    from cryptography import x509

    leaf = x509.load_der_x509_certificate(h.peer_certificates[0])
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert VALID in names.get_values_for_type(x509.DNSName)


def test_extra_ca_is_needed_for_a_private_root(web: WebServer, make_ctx) -> None:
    ctx = make_ctx(ca_files=())  # no system store, no fixture CA
    m = run_measure(_tls_target(VALID, web.port), ctx)
    assert m.tls_handshakes[0].failure == "ssl_unknown_authority"


@pytest.mark.parametrize(
    ("mode", "failure"),
    [
        ("reset_after_read", "connection_reset"),
        ("eof_after_read", "eof_error"),
        ("garbage_after_read", "ssl_failed_handshake"),
        ("accept", "generic_timeout_error"),  # accepts, then never answers the hello
    ],
)
def test_handshake_interference(ctx: EngineContext, mode: str, failure: str) -> None:
    with TCPServer(mode) as server:
        m = run_measure(_tls_target(VALID, server.port), ctx)
    assert m.tcp_connect[0].failure is None
    h, control = m.tls_handshakes
    assert (h.purpose, h.failure, h.failed_operation) == ("target", failure, "tls_handshake")
    # The SNI A/B test: the same address again with a harmless name. This server
    # misbehaves whatever the name, so the control fails the same way.
    assert (control.purpose, control.server_name, control.failure) == (
        "control_sni",
        "example.com",
        failure,
    )
    assert len(m.tcp_connect) == 1  # the control's connect is not a target connect


def test_sni_ab_only_after_interference(web: WebServer, ctx: EngineContext) -> None:
    m = run_measure(_tls_target(EXPIRED, web.port), ctx)
    assert [h.purpose for h in m.tls_handshakes] == ["target"]  # a certificate error is an answer


# -- HTTP -----------------------------------------------------------------------


def test_https_through_measured_address(dns_server: DNSServer, web: WebServer, ctx) -> None:
    dns_server.set(VALID, a=["127.0.0.1"])
    m = run_measure(http_target(f"https://{VALID}:{web.port}/headers"), ctx)
    (r,) = m.requests
    assert r.failure is None and r.status == 200
    assert r.address == "127.0.0.1"
    import json

    sent = {k.lower(): v for k, v in json.loads(r.body)}
    assert sent["host"] == f"{VALID}:{web.port}"  # the name, although we dialled the address
    assert "Mozilla/5.0" in sent["user-agent"]
    assert [k.lower() for k, _ in r.request_headers][:1] == ["host"]
    assert r.response_headers and r.response_headers[0][0]  # in server order


def test_redirect_chain_keeps_every_hop(dns_server: DNSServer, web: WebServer, ctx) -> None:
    dns_server.set(VALID, a=["127.0.0.1"])
    m = run_measure(http_target(f"https://{VALID}:{web.port}/redirect/2"), ctx)
    assert [r.status for r in m.requests] == [302, 302, 302, 200]
    assert m.requests[-1].url == f"https://{VALID}:{web.port}/"
    assert b"Fixture home page" in m.requests[-1].body
    assert all(a.t0 <= a.t <= b.t0 for a, b in zip(m.requests, m.requests[1:], strict=False))


def test_redirect_loop_fails_after_ten(dns_server: DNSServer, web: WebServer, ctx) -> None:
    dns_server.set(VALID, a=["127.0.0.1"])
    m = run_measure(http_target(f"https://{VALID}:{web.port}/redirect-loop"), ctx)
    assert len(m.requests) == 11  # the request and 10 redirects followed
    assert m.requests[-1].failure == "http_request_failed"
    assert m.failure() == "http_request_failed"


def test_huge_body_truncated_with_full_length_and_hash(
    dns_server: DNSServer, web: WebServer, ctx
) -> None:
    dns_server.set(VALID, a=["127.0.0.1"])
    size = 3 * 1024 * 1024 + 17
    m = run_measure(http_target(f"https://{VALID}:{web.port}/huge?size={size}"), ctx)
    (r,) = m.requests
    expected = huge_body(size)
    assert r.failure is None
    assert r.body == expected[: 64 * 1024] and r.body_is_truncated
    assert r.body_length == size
    assert r.body_sha256 == hashlib.sha256(expected).hexdigest()


def test_reset_during_body(dns_server: DNSServer, web: WebServer, ctx) -> None:
    dns_server.set(VALID, a=["127.0.0.1"])
    m = run_measure(http_target(f"https://{VALID}:{web.port}/reset-body"), ctx)
    (r,) = m.requests
    assert r.status == 200
    assert (r.failure, r.failed_operation) == ("connection_reset", "read")


def test_slow_body_times_out(dns_server: DNSServer, web: WebServer, make_ctx) -> None:
    from probe.engine.context import Timeouts

    dns_server.set(VALID, a=["127.0.0.1"])
    ctx = make_ctx(timeouts=Timeouts(dns=1, tcp=1, tls=1, http=0.5))
    m = run_measure(http_target(f"https://{VALID}:{web.port}/slow?delay=3"), ctx)
    (r,) = m.requests
    assert r.status == 200 and r.failure == "generic_timeout_error"


def test_blockpage_is_kept_as_evidence(plain_web: WebServer, ctx) -> None:
    m = run_measure(http_target(f"http://127.0.0.1:{plain_web.port}/blockpage"), ctx)
    (r,) = m.requests
    assert r.status == 200 and b"blocked by order of the authorities" in r.body
    assert ("Server", "Protected by WireFilter") in r.response_headers


def test_post_like_telegram(plain_web: WebServer, ctx) -> None:
    t = http_target(f"http://127.0.0.1:{plain_web.port}/api", method="POST", body="hello")
    m = run_measure(t, ctx)
    (r,) = m.requests
    assert r.method == "POST" and r.status == 200 and r.body == b"received 5 bytes"


# -- Interruption and the vocabulary ----------------------------------------------


def test_cancelled_measurement_is_kept_as_interrupted(dns_server: DNSServer, make_ctx) -> None:
    from probe.engine.context import Timeouts

    dns_server.set("slow.test", a=["127.0.0.1"], delay=5)
    ctx = make_ctx(timeouts=Timeouts(dns=10, tcp=1, tls=1, http=1))

    async def go():
        task = asyncio.create_task(measure(_dns_target("slow.test"), VANTAGE, "r", ctx))
        await asyncio.sleep(0.3)
        task.cancel()
        return await task

    m = asyncio.run(go())
    assert {q.failure for q in m.queries} == {"interrupted"}
    assert m.annotations.get("interrupted") == "true"


def test_vocabulary_is_closed() -> None:
    assert all(is_failure_string(f) for f in FAILURES)
    assert is_failure_string("unknown_failure: ValueError: x")
    assert not is_failure_string("unknown_failure: ")
    assert not is_failure_string("connection_refused_error")
