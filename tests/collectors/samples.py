"""Realistic wire measurements for the collector's tests and the ingest benchmark.

Each looks like what the engine produces for an HTTPS target: an A and an AAAA query
with raw answers, two TCP connects (one refused), a TLS handshake with a two-certificate
chain, and a request whose body was truncated, plus a verdict. Built literally (no
network); the contents are deterministic for a given ``seed`` (default ``i``), the
``measurement_uid`` is new each time unless given.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from typing import Any

from schema import wire
from schema.model import (
    DNSAnswer,
    DNSQuery,
    Expectations,
    HTTPTransaction,
    Measurement,
    Reason,
    Target,
    TCPConnect,
    TLSHandshake,
    VantagePoint,
    Verdict,
)

START = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.UTC)
SERVICES = ("whatsapp", "telegram", "signal", "messenger", "snapchat")


def vantage(probe_id: str, asn: int = 64496, cc: str = "DE") -> VantagePoint:
    return VantagePoint(
        probe_id=probe_id,
        software_version="0.4.0",
        platform="linux",
        architecture="aarch64",
        asn=asn,
        cc=cc,
        network_name="Example Broadband",
        network_type="wifi",
        resolver_ip="198.51.100.53",
        resolver_asn=64497,
        resolver_network_name="Example Resolver",
    )


def measurement(
    probe_id: str,
    run_id: str,
    i: int = 0,
    *,
    body_size: int = 4096,
    seed: int | None = None,
    uid: str | None = None,
) -> Measurement:
    """The ``i``-th measurement of a run (``body_size`` bytes of body kept)."""
    rnd = random.Random(seed if seed is not None else i)
    service = SERVICES[i % len(SERVICES)]
    host = f"web{i % 7}.{service}.example"
    target = Target(
        id=f"{service}-web-{i % 7}",
        service=service,
        kind="http",
        host=host,
        ports=(443,),
        url=f"https://{host}/",
        expect=Expectations(asns=(64510,), cert_names=(host,), status=(200,)),
    )
    addr4, addr6 = f"192.0.2.{i % 250 + 1}", f"2001:db8::{i % 250 + 1:x}"
    queries = [
        DNSQuery(host, "A", "udp", "198.51.100.53:53", t0=0.0003, t=0.0211 + rnd.random() / 50,
                 rcode="NOERROR", answers=[DNSAnswer("A", addr4, 300)],
                 raw_response=rnd.randbytes(64), system_resolver=True),
        DNSQuery(host, "AAAA", "udp", "198.51.100.53:53", t0=0.0004, t=0.0232,
                 rcode="NOERROR", answers=[DNSAnswer("AAAA", addr6, 300)],
                 raw_response=rnd.randbytes(76), system_resolver=True),
    ]  # fmt: skip
    tcp = [
        TCPConnect(addr4, 443, t0=0.025, t=0.061),
        TCPConnect(addr6, 443, t0=0.025, t=0.031, failure="connection_refused",
                   failed_operation="connect"),
    ]  # fmt: skip
    tls = [
        TLSHandshake(addr4, 443, host, t0=0.062, t=0.141, tls_version="TLSv1.3",
                     cipher_suite="TLS_AES_128_GCM_SHA256", negotiated_protocol="h2",
                     peer_certificates=[rnd.randbytes(1310), rnd.randbytes(1090)]),
    ]  # fmt: skip
    body = bytes(rnd.choices(b"abcdefghijklmnopqrstuvwxyz <>/=\n", k=body_size))
    http = [
        HTTPTransaction(
            url=f"https://{host}/", method="GET", t0=0.142, t=0.388, address=f"{addr4}:443",
            request_headers=[("Host", host), ("User-Agent", "Mozilla/5.0 (X11; Linux)"),
                             ("Accept", "*/*")],
            status=200,
            response_headers=[("Content-Type", "text/html; charset=utf-8"),
                              ("Server", "example"), ("Cache-Control", "no-store"),
                              ("Content-Length", "73128")],
            body=body, body_is_truncated=True, body_length=73128,
            body_sha256=f"{rnd.getrandbits(256):064x}",
        )
    ]  # fmt: skip
    verdict = Verdict(
        accessible=True,
        blocking=False,
        confidence="high",
        explanation=f"{service} answered as expected",
        reasons=[Reason("http_ok", "the page loaded with the expected status", {"status": 200})],
        controls=["catalog", "trusted_dns"],
    )
    return Measurement(
        measurement_uid=uid or str(uuid.uuid4()),
        run_id=run_id,
        target=target,
        vantage=vantage(probe_id),
        start_time=START + dt.timedelta(seconds=i),
        test_runtime=0.39,
        queries=queries,
        tcp_connect=tcp,
        tls_handshakes=tls,
        requests=http,
        annotations={"suite": "messaging"},
        verdict=verdict,
    )


def doc(probe_id: str, run_id: str, i: int = 0, **kw: Any) -> dict[str, Any]:
    """:func:`measurement` as a wire document."""
    return wire.to_wire(measurement(probe_id, run_id, i, **kw))
