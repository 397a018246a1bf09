"""OONI's data format (``data_format_version`` 0.2.0), so OONI's tools and analysts can read
Vantage measurements beside OONI's own (REFERENCE.md section 3).

Each Vantage measurement becomes one OONI measurement (one JSON line): OONI's base keys
(``measurement_start_time`` as ``YYYY-MM-DD HH:MM:SS`` UTC, ``probe_asn`` ``"AS1234"``,
``probe_cc``, ``probe_ip`` always ``"127.0.0.1"``, ...), ``annotations`` (strings only),
and ``test_keys`` with ``queries``, ``tcp_connect``, ``tls_handshakes`` and ``requests``
(newest first) in OONI's shapes, OONI's failure strings, and the verdict as
``accessible``/``blocking`` (web_connectivity's meaning) plus ``x_vantage_verdict``.

Messaging services (``whatsapp``, ``telegram``, ``signal``, ``facebook_messenger``) get
OONI's test name and the test keys OONI uses where the concept matches. OONI measures a
whole service in one measurement, Vantage one target per measurement: the
service-level keys are derived from *all* measurements of the same run and service
(whatever the export's filters), so every measurement of that run carries the same
values. Count them once per ``report_id`` and ``test_name`` when comparing with OONI.
The rules, target by target, are in ``schema/DATA_DICTIONARY.md``.

There is no probe id in OONI's format (OONI publishes none), so none is written.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import dns.rcode

from probe.export.jsonl import dumps_record
from probe.export.reader import Doc, Record, TargetFacts
from schema import wire

DATA_FORMAT_VERSION = "0.2.0"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"

#: Vantage services that match an OONI test: (OONI test_name, builder of its keys).
TEST_NAMES: dict[str, str] = {
    "whatsapp": "whatsapp",
    "telegram": "telegram",
    "signal": "signal",
    "facebook_messenger": "facebook_messenger",
}

#: Messenger catalog target ids -> OONI's endpoint names (ts-019).
FACEBOOK_ENDPOINTS: dict[str, str] = {
    "stun": "stun",
    "b-api": "b_api",
    "b-graph": "b_graph",
    "edge-mqtt": "edge",
    "external-xx": "external_cdn",
    "scontent-xx": "scontent_cdn",
    "star": "star",
}

AsnLookup = Callable[[str], tuple[int, str]]


# -- service-level keys ---------------------------------------------------------------------


def _status(p: TargetFacts | None) -> tuple[str | None, str | None]:
    """OONI's ``*_status``/``*_failure`` pair: "ok" when the target got through every
    step (OONI ignores the HTTP status too), else "blocked" and the failure."""
    if p is None:
        return None, None
    return ("ok", None) if p.failure is None else ("blocked", p.failure)


def _one(peers: Sequence[TargetFacts], target_id: str) -> TargetFacts | None:
    return next((p for p in peers if p.target_id == target_id), None)


def whatsapp_keys(peers: Sequence[TargetFacts]) -> Doc:
    endpoints = [p for p in peers if p.target_id.startswith("endpoint-")]
    blocked = list(dict.fromkeys(p.host for p in endpoints if p.tcp_ok == 0))
    endpoints_status = None
    if endpoints:  # any one connect that worked is enough, as for the app
        endpoints_status = "blocked" if all(p.tcp_ok == 0 for p in endpoints) else "ok"
    registration, registration_failure = _status(_one(peers, "registration"))
    web, web_failure = _status(_one(peers, "web"))
    return {
        "registration_server_failure": registration_failure,
        "registration_server_status": registration,
        "whatsapp_endpoints_blocked": blocked,
        "whatsapp_endpoints_dns_inconsistent": [],
        "whatsapp_endpoints_status": endpoints_status,
        "whatsapp_web_failure": web_failure,
        "whatsapp_web_status": web,
    }


def telegram_keys(peers: Sequence[TargetFacts]) -> Doc:
    dcs = [p for p in peers if p.target_id.startswith("dc")]
    web, web_failure = _status(_one(peers, "web"))
    return {
        # blocked at TCP only if no access point accepted a connection on any port;
        # at HTTP unless some access point answered a request
        "telegram_http_blocking": all(p.http_ok == 0 for p in dcs) if dcs else None,
        "telegram_tcp_blocking": all(p.tcp_ok == 0 for p in dcs) if dcs else None,
        "telegram_web_failure": web_failure,
        "telegram_web_status": web,
    }


def signal_keys(peers: Sequence[TargetFacts]) -> Doc:
    backends = [p for p in peers if p.target_kind == "http"]
    failed = [p for p in backends if p.failure is not None]
    return {
        "signal_backend_failure": failed[0].failure if failed else None,
        "signal_backend_status": ("blocked" if failed else "ok") if backends else None,
    }


def facebook_keys(peers: Sequence[TargetFacts]) -> Doc:
    keys: Doc = {}
    consistent_all: list[bool | None] = []
    reachable_consistent: list[bool] = []
    for target_id, name in FACEBOOK_ENDPOINTS.items():
        p = _one(peers, target_id)
        consistent: bool | None = None
        reachable: bool | None = None
        if p is not None:
            # the verdict tells DNS blocking (answers outside Meta's network, bogons, ...)
            consistent = None if p.blocking is None else p.blocking != "dns"
            if name != "stun":  # STUN is UDP: OONI does not connect to it either
                reachable = p.tcp_ok > 0
        keys[f"facebook_{name}_dns_consistent"] = consistent
        keys[f"facebook_{name}_reachable"] = reachable
        if p is not None:
            consistent_all.append(consistent)
            if consistent and reachable is not None:
                reachable_consistent.append(reachable)
    dns_blocking = None
    if False in consistent_all:
        dns_blocking = True
    elif True in consistent_all:
        dns_blocking = False
    keys["facebook_dns_blocking"] = dns_blocking
    keys["facebook_tcp_blocking"] = (
        (False in reachable_consistent) if reachable_consistent else None
    )
    return keys


SERVICE_KEYS: dict[str, Callable[[Sequence[TargetFacts]], Doc]] = {
    "whatsapp": whatsapp_keys,
    "telegram": telegram_keys,
    "signal": signal_keys,
    "facebook_messenger": facebook_keys,
}


# -- observations in OONI's shapes -------------------------------------------------------------


def _rcode(text: Any) -> int | None:
    if not isinstance(text, str):
        return None
    try:
        return int(dns.rcode.from_text(text))
    except (dns.rcode.UnknownRcode, ValueError):
        return None


def _answer(a: Doc, asn_of: Callable[[str], tuple[int, str]]) -> Doc:
    out: Doc = {"answer_type": a.get("answer_type")}
    for key in ("ipv4", "ipv6", "hostname", "value"):
        if a.get(key) is not None:
            out[key] = a[key]
    address = a.get("ipv4") or a.get("ipv6")
    if isinstance(a.get("asn"), int) and a["asn"] > 0:  # recorded when the answer came in
        out["asn"], out["as_org_name"] = a["asn"], a.get("as_org_name") or ""
    elif address:
        out["asn"], out["as_org_name"] = asn_of(address)
    out["ttl"] = a.get("ttl")
    return out


def _query(q: Doc, asn_of: Callable[[str], tuple[int, str]]) -> Doc:
    out: Doc = {
        "answers": [_answer(a, asn_of) for a in q.get("answers") or ()],
        "engine": q.get("engine"),
        "failure": q.get("failure"),
        "hostname": q.get("hostname"),
        "query_type": q.get("query_type"),
        "resolver_address": q.get("resolver_address") or "",
        "resolver_hostname": None,
        "resolver_port": None,
        "t0": q.get("t0"),
        "t": q.get("t"),
    }
    rcode = _rcode(q.get("rcode"))
    if rcode is not None:
        out["rcode"] = rcode
    if q.get("raw_response") is not None:
        out["raw_response"] = q["raw_response"]
    return out


def _tcp(c: Doc) -> Doc:
    status = c.get("status") or {}
    return {
        "ip": c.get("ip"),
        "port": c.get("port"),
        "status": {"failure": status.get("failure"), "success": bool(status.get("success"))},
        "t0": c.get("t0"),
        "t": c.get("t"),
    }


def _tls(h: Doc) -> Doc:
    return {
        "network": "tcp",
        "address": h.get("address"),
        "cipher_suite": h.get("cipher_suite") or "",
        "failure": h.get("failure"),
        "negotiated_protocol": h.get("negotiated_protocol") or "",
        "no_tls_verify": bool(h.get("no_tls_verify")),
        "peer_certificates": [
            {"format": "base64", "data": c.get("data")}
            for c in h.get("peer_certificates") or ()
            if isinstance(c, dict)
        ],
        "server_name": h.get("server_name"),
        "t0": h.get("t0"),
        "t": h.get("t"),
        # the SNI A/B test's second handshake (same address, a harmless name)
        "tags": ["control_sni"] if h.get("purpose") == "control_sni" else [],
        "tls_version": h.get("tls_version") or "",
    }


def _headers_map(pairs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or ():
        if isinstance(pair, list | tuple) and len(pair) == 2:
            out.setdefault(pair[0], pair[1])  # OONI's map keeps the first value
    return out


def _endpoint(address: str | None, url: str) -> str | None:
    """OONI's ``ip:port``: a bare address gets the URL's port; any other form is kept."""
    if not address:
        return None
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return address  # already "ip:port" (or "[v6]:port")
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return address
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _maybe_binary(value: Any) -> Any:
    """OONI's MaybeBinaryData: a string, or ``{"format": "base64", "data": ...}``."""
    if isinstance(value, dict):
        return {"format": "base64", "data": value.get("data")}
    return "" if value is None else value


def _http(t: Doc, request_body: str) -> Doc:
    request = t.get("request") or {}
    response = t.get("response")
    url = request.get("url") or ""
    if isinstance(response, dict):
        reply = {
            "body": _maybe_binary(response.get("body")),
            "body_is_truncated": bool(response.get("body_is_truncated")),
            "code": response.get("code") or 0,
            "headers_list": response.get("headers_list") or [],
            "headers": _headers_map(response.get("headers_list")),
        }
    else:  # no response: OONI's zero-valued response
        reply = {"body": "", "body_is_truncated": False, "code": 0, "headers_list": [],
                 "headers": {}}  # fmt: skip
    out: Doc = {"network": "tcp"}
    address = _endpoint(t.get("address"), url)
    if address:
        out["address"] = address
    out.update(
        failure=t.get("failure"),
        request={
            "body": request_body,
            "body_is_truncated": False,
            "headers_list": request.get("headers_list") or [],
            "headers": _headers_map(request.get("headers_list")),
            "method": request.get("method"),
            "tor": {"exit_ip": None, "exit_name": None, "is_tor": False},
            "x_transport": "tcp",
            "url": url,
        },
        response=reply,
        t0=t.get("t0"),
        t=t.get("t"),
    )
    return out


def _sorted(value: Any) -> Any:
    """Free-form mappings with sorted keys: the same bytes whichever database kept them
    (PostgreSQL's JSONB does not keep key order)."""
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def _no_asn(_address: str) -> tuple[int, str]:
    return 0, ""


# -- the measurement ---------------------------------------------------------------------------


def ooni_measurement(rec: Record, asn_of: AsnLookup = _no_asn) -> Doc:
    """``rec`` as an OONI 0.2.0 measurement."""
    v = rec.vantage
    target = rec.target
    annotations: dict[str, str] = {
        str(k): str(val) for k, val in rec.annotations.items() if val is not None
    }
    annotations.update(
        architecture=v.architecture,
        engine_name=v.software_name,
        engine_version=v.software_version,
        platform=v.platform,
        vantage_measurement_uid=rec.uid,
        vantage_service=rec.service,
        vantage_target_id=rec.target_id,
    )
    if v.network_type:
        annotations["network_type"] = v.network_type
    body = target.doc.get("body") or ""  # sent with the first request only
    requests = [_http(t, body if i == 0 else "") for i, t in enumerate(rec.requests)]
    verdict = rec.verdict
    test_keys: Doc = {
        "agent": "redirect",
        "failure": rec.failure,
        "queries": [_query(q, asn_of) for q in rec.queries],
        "tcp_connect": [_tcp(c) for c in rec.tcp_connect],
        "tls_handshakes": [_tls(h) for h in rec.tls_handshakes],
        "requests": requests[::-1],  # newest first, as OONI lists them
        "accessible": rec.accessible,
        "blocking": rec.blocking,
        "x_vantage_verdict": None
        if verdict is None
        else {
            "confidence": verdict.get("confidence"),
            "explanation": verdict.get("explanation"),
            "reasons": [
                {
                    "code": r.get("code"),
                    "detail": r.get("detail"),
                    "evidence": _sorted(r.get("evidence")),
                }  # fmt: skip
                for r in verdict.get("reasons") or ()
            ],
            "controls": verdict.get("controls") or [],
        },
    }
    service_keys = SERVICE_KEYS.get(rec.service)
    if service_keys is not None:
        test_keys.update(service_keys(rec.peers))
    start = wire.format_time(rec.start)
    return {
        "data_format_version": DATA_FORMAT_VERSION,
        "measurement_start_time": start,
        "test_start_time": wire.format_time(rec.run_started) if rec.run_started else start,
        "test_runtime": rec.test_runtime,
        "test_name": TEST_NAMES.get(rec.service, wire.TEST_NAME),
        "test_version": wire.TEST_VERSION,
        "input": rec.input,
        "report_id": rec.run_id,
        "probe_asn": f"AS{v.asn}",
        "probe_cc": v.cc,
        "probe_ip": "127.0.0.1",
        "probe_network_name": v.network_name or "",
        "resolver_ip": v.resolver_ip or "",
        "resolver_asn": f"AS{v.resolver_asn}",
        "resolver_network_name": v.resolver_network_name or "",
        "software_name": v.software_name,
        "software_version": v.software_version,
        "annotations": dict(sorted(annotations.items())),
        "test_keys": test_keys,
    }


class OONIEncoder:
    """Encodes chunks of records as OONI measurements, one JSON line each.

    ``asn_of(address) -> (asn, as_org_name)`` fills each DNS answer's ``asn`` (OONI
    records it); without it they are ``0`` and ``""``, OONI's "unknown".
    """

    name = "ooni"
    suffix = ".jsonl"
    media_type = "application/x-ndjson"
    stdout_ok = True
    needs_peers = True

    def __init__(self, asn_of: AsnLookup | None = None) -> None:
        self.asn_of: AsnLookup = functools.lru_cache(maxsize=65536)(asn_of or _no_asn)

    def begin(self) -> bytes:
        return b""

    def encode(self, records: Sequence[Record]) -> bytes:
        lines = [dumps_record(ooni_measurement(rec, self.asn_of), rec) for rec in records]
        lines.append(b"")
        return b"\n".join(lines)

    def end(self) -> bytes:
        return b""
