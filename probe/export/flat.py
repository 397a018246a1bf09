"""The flat table shared by CSV and Parquet: one row per measurement, evidence summarised.

A researcher's first question is "which measurements failed, where, how": these
columns answer it without unpacking JSON. The full evidence (every query, connect,
handshake and request) stays in the JSONL and OONI exports. ``schema/DATA_DICTIONARY.md``
documents every column; :data:`COLUMNS` is the order both formats use.

List columns hold distinct values in the order first seen (Parquet: ``list<string>``;
CSV: joined with ``;``). "Last request" is the last hop of a redirect chain: what the
user finally got.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from probe.export.reader import Record


@dataclass(frozen=True)
class Column:
    name: str
    #: "string", "timestamp", "float", "int32", "int64", "bool" or "list"
    type: str
    meaning: str


COLUMNS: tuple[Column, ...] = (
    Column("measurement_uid", "string", "unique id of the measurement"),
    Column("report_id", "string", "id of the run the measurement belongs to"),
    Column("measurement_start_time", "timestamp", "when the measurement started (UTC)"),
    Column("test_runtime", "float", "how long the measurement took, seconds"),
    Column("service", "string", "service the target belongs to"),
    Column("target_id", "string", "the target's id in its service"),
    Column("target_kind", "string", "dns, tcp, tls or http: how far the probe went"),
    Column("input", "string", "the target's URL, host:port list or name"),
    Column("control", "bool", "true for a harmless control target"),
    Column("probe_id", "string", "the probe (a keyed hash with --pseudonymize)"),
    Column("probe_asn", "int64", "the probe network's AS number (0: unknown)"),
    Column("probe_cc", "string", "the probe network's country (ZZ: unknown)"),
    Column("probe_network_name", "string", "the probe network's name"),
    Column("network_type", "string", "wifi, mobile, wired, ... when known"),
    Column("resolver_ip", "string", "the system resolver's address as seen outside"),
    Column("resolver_asn", "int64", "the resolver's AS number (0: unknown)"),
    Column("resolver_network_name", "string", "the resolver network's name"),
    Column("software_version", "string", "version of Vantage that measured"),
    Column("accessible", "bool", "the verdict: reachable (empty: cannot tell)"),
    Column("blocking", "string", "false, dns, tcp_ip, tls, http-failure, http-diff, throttling"),
    Column("confidence", "string", "high, medium or low confidence of the verdict"),
    Column("reasons", "list", "codes of the verdict's reasons"),
    Column("failure", "string", "first failure of the step where nothing got through"),
    Column("observation_count", "int32", "observations recorded"),
    Column("dns_queries", "int32", "DNS queries made"),
    Column("dns_rcodes", "list", "DNS response codes seen"),
    Column("dns_failures", "list", "DNS failure strings seen"),
    Column("dns_addresses", "list", "IPv4/IPv6 addresses in the answers"),
    Column("tcp_connects", "int32", "TCP connects tried"),
    Column("tcp_successes", "int32", "TCP connects that succeeded"),
    Column("tcp_failures", "list", "TCP failure strings seen"),
    Column("tls_handshakes", "int32", "TLS handshakes tried (with the SNI A/B control)"),
    Column("tls_failures", "list", "TLS failure strings seen"),
    Column("tls_version", "string", "version of the first successful target handshake"),
    Column("http_requests", "int32", "HTTP requests made (redirect hops)"),
    Column("http_failure", "string", "failure of the last request"),
    Column("http_status", "int32", "status code of the last request"),
    Column("http_url", "string", "URL of the last request"),
    Column("http_body_length", "int64", "decoded body length of the last response, bytes"),
    Column("http_body_sha256", "string", "SHA-256 of the decoded body of the last response"),
    Column("http_body_is_truncated", "bool", "the kept body is shorter than the response"),
)

NAMES: tuple[str, ...] = tuple(c.name for c in COLUMNS)


def _distinct(values: Iterable[Any]) -> list[str]:
    seen: dict[str, None] = {}
    for value in values:
        if value is not None and value != "":
            seen.setdefault(str(value), None)
    return list(seen)


def _addresses(queries: list[dict[str, Any]]) -> list[str]:
    return _distinct(
        a.get("ipv4") or a.get("ipv6")
        for q in queries
        for a in q.get("answers") or ()
        if a.get("answer_type") in ("A", "AAAA")
    )


def row(rec: Record) -> tuple[Any, ...]:
    """The flat row of ``rec``, in :data:`COLUMNS` order (native Python values)."""
    v = rec.vantage
    verdict = rec.verdict or {}
    queries, tcp, tls, requests = rec.queries, rec.tcp_connect, rec.tls_handshakes, rec.requests
    statuses = [c.get("status") or {} for c in tcp]
    tls_version = next(
        (h.get("tls_version") for h in tls
         if h.get("failure") is None and h.get("purpose", "target") == "target"),
        None,
    )  # fmt: skip
    last = requests[-1] if requests else None
    response = (last or {}).get("response") or {}
    blocking = rec.blocking
    return (
        rec.uid,
        rec.run_id,
        rec.start,
        rec.test_runtime,
        rec.service,
        rec.target_id,
        rec.target_kind,
        rec.input,
        rec.target.control,
        v.probe_id,
        v.asn,
        v.cc,
        v.network_name,
        v.network_type,
        v.resolver_ip,
        v.resolver_asn,
        v.resolver_network_name,
        v.software_version,
        rec.accessible,
        "false" if blocking is False else blocking,
        verdict.get("confidence"),
        _distinct(r.get("code") for r in verdict.get("reasons") or ()),
        rec.failure,
        rec.observation_count,
        len(queries),
        _distinct(q.get("rcode") for q in queries),
        _distinct(q.get("failure") for q in queries),
        _addresses(queries),
        len(tcp),
        sum(1 for s in statuses if s.get("success")),
        _distinct(s.get("failure") for s in statuses),
        len(tls),
        _distinct(h.get("failure") for h in tls),
        tls_version,
        len(requests),
        last.get("failure") if last else None,
        response.get("code"),
        (last.get("request") or {}).get("url") if last else None,
        response.get("body_length"),
        response.get("body_sha256"),
        response.get("body_is_truncated"),
    )


def csv_time(value: dt.datetime) -> str:
    """``2024-05-01T12:00:00Z``: ISO 8601 in UTC, whole seconds as measured."""
    v = value.astimezone(dt.UTC)
    text = f"{v.year:04d}-{v.month:02d}-{v.day:02d}T{v.hour:02d}:{v.minute:02d}:{v.second:02d}"
    if value.microsecond:
        text += f".{value.microsecond:06d}"
    return text + "Z"


#: What a spreadsheet takes as the start of a formula (or a DDE command) in a cell.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_text(value: str) -> str:
    """A text cell that no spreadsheet runs: a value that begins as a formula would
    (``=``, ``+``, ``-``, ``@``, tab, carriage return) gets a leading ``'``, which
    spreadsheets show as "text follows" and do not display. Measured data is
    attacker-controlled (a network name, a target id from a catalog, a service name):
    ``=HYPERLINK(...)`` must reach the reader as text.

    >>> csv_text("=1+1"), csv_text("whatsapp")
    ("'=1+1", 'whatsapp')
    """
    return "'" + value if value.startswith(FORMULA_STARTS) else value
