"""Table rows summarise each step; literal measurements, no network."""

from __future__ import annotations

import datetime as dt

from probe.output import summarise
from schema.model import DNSQuery, HTTPTransaction, Measurement, Target, TCPConnect
from tests.conftest import VANTAGE


def _m(**kw) -> Measurement:
    t = Target(id="t", service="s", kind="http", host="a.test", url="https://a.test/")
    return Measurement("u", "r", t, VANTAGE, dt.datetime(2026, 1, 1, tzinfo=dt.UTC), **kw)


def _q(resolver: str, qtype: str, failure: str | None) -> DNSQuery:
    return DNSQuery("a.test", qtype, "udp", resolver, 0.0, 0.1, failure=failure)


def test_missing_aaaa_is_not_a_dns_failure_but_a_disagreeing_resolver_is() -> None:
    ok = [_q("r1", "A", None), _q("r1", "AAAA", "dns_no_answer")]
    assert summarise(_m(queries=ok))["dns"] == "ok"
    mixed = ok + [_q("r2", "A", "dns_nxdomain_error"), _q("r2", "AAAA", "dns_nxdomain_error")]
    assert summarise(_m(queries=mixed))["dns"] == "1/2 ok; dns_nxdomain_error"


def test_tcp_partial_and_http_redirects() -> None:
    tcp = [TCPConnect("1.1.1.1", 443, 0, 1), TCPConnect("1.1.1.2", 443, 0, 1, "connection_reset")]
    hops = [HTTPTransaction("https://a.test/", "GET", 0, 1, status=302),
            HTTPTransaction("https://a.test/x", "GET", 1, 2, status=200)]  # fmt: skip
    row = summarise(_m(tcp_connect=tcp, requests=hops))
    assert row["tcp"] == "1/2 ok; connection_reset"
    assert row["http"] == "200 after 1 redirects"
    assert row["tls"] == "-"
