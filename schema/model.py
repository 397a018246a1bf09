"""The measurement model as plain, immutable-where-it-matters data.

Nothing here does I/O. The engine fills these records, analysis reads them, the
store and the wire format (``schema.wire``) turn them into rows and JSON.

Vocabulary (see ARCHITECTURE.md): a *target* is one thing to measure, a *service*
groups targets, a *measurement* is one target measured once from one *vantage
point*, and each step of it leaves an *observation*.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Literal

TargetKind = Literal["dns", "tcp", "tls", "http"]
TARGET_KINDS: tuple[str, ...] = ("dns", "tcp", "tls", "http")
TargetRole = Literal["essential", "diagnostic"]
TARGET_ROLES: tuple[str, ...] = ("essential", "diagnostic")

#: The closed failure vocabulary (REFERENCE.md section 3). ``unknown_failure: <detail>``
#: is the one open-ended member; see :func:`is_failure_string`.
FAILURES: frozenset[str] = frozenset(
    {
        "connection_refused",
        "connection_reset",
        "eof_error",
        "generic_timeout_error",
        "host_unreachable",
        "network_unreachable",
        "dns_nxdomain_error",
        "dns_no_answer",
        "dns_servfail_error",
        "dns_refused_error",
        "dns_bogon_error",
        "dns_server_misbehaving",
        "ssl_invalid_hostname",
        "ssl_unknown_authority",
        "ssl_invalid_certificate",
        "ssl_failed_handshake",
        "http_request_failed",
        "interrupted",
    }
)
UNKNOWN_FAILURE_PREFIX = "unknown_failure: "

#: How a measurement can be blocked (OONI's values, plus TLS and throttling).
BLOCKING_KINDS: tuple[str, ...] = (
    "dns",
    "tcp_ip",
    "tls",
    "http-failure",
    "http-diff",
    "throttling",
)
CONFIDENCE: tuple[str, ...] = ("high", "medium", "low")
SERVICE_STATUSES: tuple[str, ...] = ("ok", "blocked", "partial", "down", "inconclusive")

#: The operation a failure happened in.
OPERATIONS: frozenset[str] = frozenset(
    {"resolve", "connect", "tls_handshake", "http_round_trip", "read", "write"}
)


def is_failure_string(value: str) -> bool:
    """True if ``value`` belongs to the failure vocabulary."""
    return value in FAILURES or (
        value.startswith(UNKNOWN_FAILURE_PREFIX) and len(value) > len(UNKNOWN_FAILURE_PREFIX)
    )


@dataclass(frozen=True)
class Source:
    """Where a catalog fact came from and when a person last checked it."""

    url: str
    checked: dt.date


@dataclass(frozen=True)
class Expectations:
    """What a genuine answer looks like; empty means "no expectation"."""

    asns: tuple[int, ...] = ()
    cert_names: tuple[str, ...] = ()
    status: tuple[int, ...] = ()


@dataclass(frozen=True)
class Target:
    """One thing to measure.

    ``kind`` says how far the engine goes: ``dns`` resolves only; ``tcp`` also
    connects to every address on every port; ``tls`` also handshakes with SNI;
    ``http`` fetches ``url`` (TLS first when the scheme is https).
    ``addresses`` are fixed addresses measured besides (or instead of) resolved ones.
    """

    id: str
    service: str
    kind: TargetKind
    host: str
    ports: tuple[int, ...] = ()
    url: str | None = None
    method: str = "GET"
    body: str | None = None
    addresses: tuple[str, ...] = ()
    sni: str | None = None
    expect: Expectations = field(default_factory=Expectations)
    source: Source | None = None
    control: bool = False
    ca_file: str | None = None
    #: "essential" (the service needs it) or "diagnostic" (it only helps explain a
    #: result, such as Signal's uptime name: it never decides the service's status).
    role: TargetRole = "essential"

    @property
    def input(self) -> str:
        """The OONI-style ``input`` string: the URL, ``host:port``, or the name."""
        if self.url:
            return self.url
        if self.kind == "dns" or not self.ports:
            return self.host
        return ",".join(f"{_bracket(self.host)}:{p}" for p in self.ports)

    @property
    def server_name(self) -> str:
        return self.sni or self.host


@dataclass(frozen=True)
class Service:
    """A named group of targets (WhatsApp is many endpoints)."""

    name: str
    title: str
    targets: tuple[Target, ...]
    source: Source | None = None
    control: bool = False
    notes: str = ""
    origin: str = ""  # the catalog file it came from


@dataclass(frozen=True)
class VantagePoint:
    """Who measured from where. The probe's own IP is absent unless the volunteer
    opted in to storing it (``public_ip``); it never goes on the wire."""

    probe_id: str
    software_version: str
    platform: str
    architecture: str
    asn: int = 0
    cc: str = "ZZ"
    network_name: str | None = None
    network_type: str | None = None
    resolver_ip: str | None = None
    resolver_asn: int = 0
    resolver_network_name: str | None = None
    software_name: str = "vantage"
    #: Kept only when the volunteer opts in (privacy.store_ip); stored on the probe
    #: alone: the wire format's probe_ip is always "127.0.0.1".
    public_ip: str | None = None


@dataclass
class DNSAnswer:
    answer_type: str  # "A", "AAAA", "CNAME", ...
    value: str
    ttl: int
    #: The network an address answer belongs to, from the offline ASN database when
    #: the answer came in (as OONI records it): None when no database was consulted,
    #: 0 when the database does not know the address.
    asn: int | None = None
    as_org_name: str | None = None


@dataclass
class DNSQuery:
    hostname: str
    query_type: str
    engine: str  # "udp", "tcp", "doh"
    resolver_address: str
    t0: float
    t: float
    rcode: str | None = None
    answers: list[DNSAnswer] = field(default_factory=list)
    raw_response: bytes | None = None
    failure: str | None = None
    failed_operation: str | None = None
    system_resolver: bool = False

    def addresses(self) -> list[str]:
        return [a.value for a in self.answers if a.answer_type in ("A", "AAAA")]


@dataclass
class TCPConnect:
    ip: str
    port: int
    t0: float
    t: float
    failure: str | None = None
    failed_operation: str | None = None
    #: The connection's number in its measurement (1, 2, ...): the TLS handshake on it
    #: and every HTTP request sent over it carry the same number.
    connection: int | None = None

    @property
    def success(self) -> bool:
        return self.failure is None


@dataclass
class TLSHandshake:
    ip: str
    port: int
    server_name: str
    t0: float
    t: float
    tls_version: str | None = None
    cipher_suite: str | None = None
    negotiated_protocol: str | None = None
    peer_certificates: list[bytes] = field(default_factory=list)
    no_tls_verify: bool = False
    failure: str | None = None
    failed_operation: str | None = None
    #: "target" (the measured name) or "control_sni" (the same address with a harmless
    #: name, repeated after a failure: the SNI A/B test).
    purpose: str = "target"
    #: The number of the TCP connection it ran on (:attr:`TCPConnect.connection`).
    connection: int | None = None


@dataclass
class HTTPTransaction:
    """One HTTP request/response hop; a redirect chain is several of these."""

    url: str
    method: str
    t0: float
    t: float
    request_headers: list[tuple[str, str]] = field(default_factory=list)
    address: str | None = None
    status: int | None = None
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    body_is_truncated: bool = False
    body_length: int = 0
    body_sha256: str | None = None
    #: Set instead of ``body_sha256`` when the body left the store scrubbed, dropped or
    #: truncated (probe.privacy): HMAC-SHA256 of the plain hash under the probe's secret.
    body_keyed_sha256: str | None = None
    #: The measured connection the request was sent over (:attr:`TCPConnect.connection`),
    #: or None for one the HTTP client opened itself (a redirect to another host).
    connection: int | None = None
    failure: str | None = None
    failed_operation: str | None = None


@dataclass(frozen=True)
class Reason:
    """One piece of a verdict: a machine-readable code, a line for people, and the
    evidence it rests on (which answer, which control, which fingerprint)."""

    code: str
    detail: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass
class Verdict:
    """What analysis concluded about one measurement.

    ``blocking`` is False (not blocked), one of ``BLOCKING_KINDS``, or None (cannot
    be told); it MUST be False whenever ``accessible`` is True.
    """

    accessible: bool | None
    blocking: str | bool | None
    confidence: str  # one of CONFIDENCE
    explanation: str
    reasons: list[Reason] = field(default_factory=list)
    controls: list[str] = field(default_factory=list)  # the controls the verdict used


@dataclass
class Measurement:
    """One target measured once from one vantage point."""

    measurement_uid: str
    run_id: str
    target: Target
    vantage: VantagePoint
    start_time: dt.datetime  # UTC
    test_runtime: float = 0.0
    queries: list[DNSQuery] = field(default_factory=list)
    tcp_connect: list[TCPConnect] = field(default_factory=list)
    tls_handshakes: list[TLSHandshake] = field(default_factory=list)
    requests: list[HTTPTransaction] = field(default_factory=list)  # in request order
    annotations: dict[str, str] = field(default_factory=dict)
    verdict: Verdict | None = None

    def observation_count(self) -> int:
        return (
            len(self.queries)
            + len(self.tcp_connect)
            + len(self.tls_handshakes)
            + len(self.requests)
        )

    def failure(self) -> str | None:
        """The first failure in step order (DNS, TCP, TLS, HTTP) when nothing got through.

        A measurement "fails" at a step when no observation of that step succeeded;
        its failure is then the first failure string of that step. This is a
        summary for tables, not a verdict (analysis decides blocking).
        """
        for step in (self.queries, self.tcp_connect, self.tls_handshakes):
            if step and all(o.failure for o in step):
                return step[0].failure
        if self.requests:  # the last hop of a redirect chain is what the user got
            return self.requests[-1].failure
        return None


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
