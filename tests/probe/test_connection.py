"""One connection per target: the request rides on the measured connection (issue 17).

A fixture server counts the connections it accepts and the TLS handshakes it answers;
an HTTPS target that does not redirect costs exactly one of each, and every
observation names the connection it used."""

from __future__ import annotations

from tests.conftest import VALID, http_target, run_measure
from tests.fixtures import DNSServer, WebServer


def test_an_https_target_costs_one_connection_and_one_handshake(
    dns_server: DNSServer, web: WebServer, ctx
) -> None:
    dns_server.set(VALID, a=["127.0.0.1"])
    before = (web.connections, len(web.sni_names), len(web.requests))
    m = run_measure(http_target(f"https://{VALID}:{web.port}/"), ctx)
    after = (web.connections, len(web.sni_names), len(web.requests))
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1, 1]
    (conn,), (hs,), (tx,) = m.tcp_connect, m.tls_handshakes, m.requests
    assert tx.status == 200 and tx.failure is None and hs.failure is None
    assert conn.connection == hs.connection == tx.connection == 1
    assert hs.negotiated_protocol in (None, "http/1.1")  # what the request then speaks
    assert tx.address is not None and tx.address.startswith("127.0.0.1")


def test_a_plain_http_target_uses_the_measured_connection(
    dns_server: DNSServer, plain_web: WebServer, ctx
) -> None:
    dns_server.set("plain.test", a=["127.0.0.1"])
    before = plain_web.connections
    m = run_measure(http_target(f"http://plain.test:{plain_web.port}/"), ctx)
    assert plain_web.connections - before == 1
    (conn,), (tx,) = m.tcp_connect, m.requests
    assert tx.status == 200 and conn.connection == tx.connection == 1
    assert m.tls_handshakes == []


def test_redirects_on_the_same_host_stay_on_the_measured_connection(
    dns_server: DNSServer, web: WebServer, ctx
) -> None:
    dns_server.set(VALID, a=["127.0.0.1"])
    before = (web.connections, len(web.sni_names))
    m = run_measure(http_target(f"https://{VALID}:{web.port}/redirect/2"), ctx)
    assert [tx.status for tx in m.requests] == [302, 302, 302, 200]
    assert {tx.connection for tx in m.requests} == {1}  # kept alive and reused
    assert (web.connections - before[0], len(web.sni_names) - before[1]) == (1, 1)


def test_two_addresses_measured_and_the_request_on_the_first_that_worked(
    dns_server: DNSServer, web: WebServer, ctx
) -> None:
    # Two addresses, one refused (nothing listens on 127.0.0.2): both are measured and
    # numbered, and the request rides on the one that worked.
    dns_server.set(VALID, a=["127.0.0.1", "127.0.0.2"])
    before = web.connections
    m = run_measure(http_target(f"https://{VALID}:{web.port}/"), ctx)
    assert sorted(c.connection for c in m.tcp_connect) == [1, 2]
    assert web.connections - before <= 2  # never a third for the request
    (tx,) = m.requests
    used = next(c for c in m.tcp_connect if c.connection == tx.connection)
    assert tx.status == 200 and used.failure is None
