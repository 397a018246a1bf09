"""The JSON wire format of a measurement, with an explicit version.

Field names follow OONI's data format (0.2.0) wherever the concept is the same, so a
Vantage measurement lines up with OONI data: ``measurement_start_time``,
``test_runtime``, ``probe_asn`` ("AS1234"), ``probe_cc``, ``test_keys.queries``,
``tcp_connect``, ``tls_handshakes``, ``requests`` (newest first, as OONI orders them),
and OONI's failure strings. ``probe_ip`` is always ``"127.0.0.1"``: the probe's
address never leaves the machine.

>>> doc = to_wire(measurement)
>>> from_wire(doc) == measurement
True

The round trip is exact except for a target's ``ca_file``: a local path (it may
name the volunteer's home directory) that is deliberately not exported.

``schema/measurement.schema.json`` is the JSON Schema of what :func:`to_wire` emits.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
from importlib import resources
from typing import Any

from schema.model import (
    DNSAnswer,
    DNSQuery,
    Expectations,
    HTTPTransaction,
    Measurement,
    Reason,
    Source,
    Target,
    TCPConnect,
    TLSHandshake,
    VantagePoint,
    Verdict,
)

DATA_FORMAT_VERSION = "1.0.0"
TEST_NAME = "reachability"
TEST_VERSION = "0.1.0"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"

Doc = dict[str, Any]


class WireError(ValueError):
    """A wire document is not a valid measurement; the message names the field."""


def json_schema() -> Doc:
    """The JSON Schema (draft 2020-12) of the wire format."""
    text = resources.files("schema").joinpath("measurement.schema.json").read_text("utf-8")
    return json.loads(text)  # type: ignore[no-any-return]


_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}")


def parse_time(value: str) -> dt.datetime:
    """A ``TIME_FORMAT`` time (naive). Not ``strptime``: that is 40x slower and takes a
    process-wide lock, which the collector's ingest threads then queue for."""
    if not isinstance(value, str) or not _TIME.fullmatch(value):
        raise ValueError(f"time data {value!r} does not match format {TIME_FORMAT!r}")
    return dt.datetime.fromisoformat(value)


#: The years a measurement may be dated (the wire schema's pattern says the same): no
#: probe ran before 2000, and a date past 2100 is a clock error.
MIN_YEAR, MAX_YEAR = 2000, 2100


def format_time(value: dt.datetime) -> str:
    """``TIME_FORMAT`` with a zero-padded four-digit year: ``strftime("%Y")`` writes
    year 1 as "1", which :func:`parse_time` (rightly) refuses to read back."""
    return (
        f"{value.year:04d}-{value.month:02d}-{value.day:02d} "
        f"{value.hour:02d}:{value.minute:02d}:{value.second:02d}"
    )


def format_asn(asn: int) -> str:
    return f"AS{asn}"


def parse_asn(value: str) -> int:
    if not (isinstance(value, str) and value.startswith("AS") and value[2:].isdigit()):
        raise WireError(f"not an ASN string like 'AS1234': {value!r}")
    return int(value[2:])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def body_to_wire(body: bytes) -> str | Doc:
    # A NUL byte is valid UTF-8, but PostgreSQL's JSONB rejects "\u0000" in strings:
    # such a body travels base64-encoded like one that is not UTF-8.
    if b"\x00" not in body:
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return {"format": "base64", "data": _b64(body)}


def body_from_wire(value: str | Doc) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    return base64.b64decode(value["data"])


def _headers(pairs: list[tuple[str, str]]) -> list[list[str]]:
    return [[k, v] for k, v in pairs]


def target_to_wire(t: Target) -> Doc:
    return {
        "id": t.id,
        "service": t.service,
        "kind": t.kind,
        "host": t.host,
        "ports": list(t.ports),
        "url": t.url,
        "method": t.method,
        "body": t.body,
        "addresses": list(t.addresses),
        "sni": t.sni,
        "control": t.control,
        **({"role": t.role} if t.role != "essential" else {}),
        "expect": {
            "asns": list(t.expect.asns),
            "cert_names": list(t.expect.cert_names),
            "status": list(t.expect.status),
        },
        "source": (
            {"url": t.source.url, "checked": t.source.checked.isoformat()} if t.source else None
        ),
    }


def target_from_wire(d: Doc) -> Target:
    src = d.get("source")
    exp = d.get("expect") or {}
    return Target(
        id=d["id"],
        service=d["service"],
        kind=d["kind"],
        host=d["host"],
        ports=tuple(d.get("ports") or ()),
        url=d.get("url"),
        method=d.get("method") or "GET",
        body=d.get("body"),
        addresses=tuple(d.get("addresses") or ()),
        sni=d.get("sni"),
        control=bool(d.get("control", False)),
        role="diagnostic" if d.get("role") == "diagnostic" else "essential",
        expect=Expectations(
            asns=tuple(exp.get("asns") or ()),
            cert_names=tuple(exp.get("cert_names") or ()),
            status=tuple(exp.get("status") or ()),
        ),
        source=Source(src["url"], dt.date.fromisoformat(src["checked"])) if src else None,
    )


def query_to_wire(q: DNSQuery) -> Doc:
    return {
        "hostname": q.hostname,
        "query_type": q.query_type,
        "engine": q.engine,
        "resolver_address": q.resolver_address,
        "system_resolver": q.system_resolver,
        "rcode": q.rcode,
        "answers": [_answer_to_wire(a) for a in q.answers],
        "raw_response": _b64(q.raw_response) if q.raw_response is not None else None,
        "failure": q.failure,
        "failed_operation": q.failed_operation,
        "t0": q.t0,
        "t": q.t,
    }


def _answer_to_wire(a: DNSAnswer) -> Doc:
    key = {"A": "ipv4", "AAAA": "ipv6", "CNAME": "hostname"}.get(a.answer_type, "value")
    doc: Doc = {"answer_type": a.answer_type, key: a.value}
    if a.asn is not None:  # looked up in an ASN database when the answer came in
        doc["asn"], doc["as_org_name"] = a.asn, a.as_org_name
    doc["ttl"] = a.ttl
    return doc


def query_from_wire(d: Doc) -> DNSQuery:
    answers = []
    for a in d.get("answers") or ():
        value = a.get("ipv4") or a.get("ipv6") or a.get("hostname") or a.get("value") or ""
        asn = a.get("asn")
        answers.append(
            DNSAnswer(
                a["answer_type"],
                value,
                int(a["ttl"]),
                int(asn) if isinstance(asn, int) and not isinstance(asn, bool) else None,
                a.get("as_org_name") if isinstance(a.get("as_org_name"), str) else None,
            )
        )
    raw = d.get("raw_response")
    return DNSQuery(
        hostname=d["hostname"],
        query_type=d["query_type"],
        engine=d["engine"],
        resolver_address=d["resolver_address"],
        system_resolver=bool(d.get("system_resolver", False)),
        rcode=d.get("rcode"),
        answers=answers,
        raw_response=base64.b64decode(raw) if raw is not None else None,
        failure=d.get("failure"),
        failed_operation=d.get("failed_operation"),
        t0=d["t0"],
        t=d["t"],
    )


def _with_connection(doc: Doc, connection: int | None) -> Doc:
    if connection is not None:  # absent in measurements made before connections had numbers
        doc["connection"] = connection
    return doc


def tcp_to_wire(c: TCPConnect) -> Doc:
    return _with_connection({
        "ip": c.ip,
        "port": c.port,
        "status": {"success": c.success, "failure": c.failure},
        "failed_operation": c.failed_operation,
        "t0": c.t0,
        "t": c.t,
    }, c.connection)  # fmt: skip


def tcp_from_wire(d: Doc) -> TCPConnect:
    return TCPConnect(
        ip=d["ip"],
        port=int(d["port"]),
        failure=d["status"].get("failure"),
        failed_operation=d.get("failed_operation"),
        t0=d["t0"],
        t=d["t"],
        connection=d.get("connection"),
    )


def tls_to_wire(h: TLSHandshake) -> Doc:
    return _with_connection({
        "address": f"[{h.ip}]:{h.port}" if ":" in h.ip else f"{h.ip}:{h.port}",
        "ip": h.ip,
        "port": h.port,
        "server_name": h.server_name,
        "tls_version": h.tls_version,
        "cipher_suite": h.cipher_suite,
        "negotiated_protocol": h.negotiated_protocol,
        "peer_certificates": [{"format": "base64", "data": _b64(c)} for c in h.peer_certificates],
        "no_tls_verify": h.no_tls_verify,
        "purpose": h.purpose,
        "failure": h.failure,
        "failed_operation": h.failed_operation,
        "t0": h.t0,
        "t": h.t,
    }, h.connection)  # fmt: skip


def tls_from_wire(d: Doc) -> TLSHandshake:
    return TLSHandshake(
        ip=d["ip"],
        port=int(d["port"]),
        server_name=d["server_name"],
        tls_version=d.get("tls_version"),
        cipher_suite=d.get("cipher_suite"),
        negotiated_protocol=d.get("negotiated_protocol"),
        peer_certificates=[base64.b64decode(c["data"]) for c in d.get("peer_certificates") or ()],
        no_tls_verify=bool(d.get("no_tls_verify", False)),
        purpose=d.get("purpose", "target"),
        failure=d.get("failure"),
        failed_operation=d.get("failed_operation"),
        t0=d["t0"],
        t=d["t"],
        connection=d.get("connection"),
    )


def http_to_wire(h: HTTPTransaction) -> Doc:
    response = None
    if h.status is not None:
        response = {
            "code": h.status,
            "headers_list": _headers(h.response_headers),
            "body": body_to_wire(h.body),
            "body_is_truncated": h.body_is_truncated,
            "body_length": h.body_length,
            "body_sha256": h.body_sha256,
        }
        if h.body_keyed_sha256 is not None:
            response["body_keyed_sha256"] = h.body_keyed_sha256
    return _with_connection({
        "address": h.address,
        "request": {
            "url": h.url,
            "method": h.method,
            "headers_list": _headers(h.request_headers),
        },
        "response": response,
        "failure": h.failure,
        "failed_operation": h.failed_operation,
        "t0": h.t0,
        "t": h.t,
    }, h.connection)  # fmt: skip


def http_from_wire(d: Doc) -> HTTPTransaction:
    req = d["request"]
    resp = d.get("response")
    tx = HTTPTransaction(
        url=req["url"],
        method=req["method"],
        request_headers=[(k, v) for k, v in req.get("headers_list") or ()],
        address=d.get("address"),
        failure=d.get("failure"),
        failed_operation=d.get("failed_operation"),
        t0=d["t0"],
        t=d["t"],
        connection=d.get("connection"),
    )
    if resp is not None:
        tx.status = int(resp["code"])
        tx.response_headers = [(k, v) for k, v in resp.get("headers_list") or ()]
        tx.body = body_from_wire(resp.get("body", ""))
        tx.body_is_truncated = bool(resp.get("body_is_truncated", False))
        tx.body_length = int(resp.get("body_length", len(tx.body)))
        tx.body_sha256 = resp.get("body_sha256")
        tx.body_keyed_sha256 = resp.get("body_keyed_sha256")
    return tx


def verdict_to_wire(v: Verdict | None) -> Doc | None:
    if v is None:
        return None
    return {
        "confidence": v.confidence,
        "explanation": v.explanation,
        "reasons": [
            {"code": r.code, "detail": r.detail, "evidence": r.evidence} for r in v.reasons
        ],
        "controls": list(v.controls),
    }


def verdict_from_wire(keys: Doc) -> Verdict | None:
    analysis = keys.get("analysis")
    if analysis is None:
        return None
    return Verdict(
        accessible=keys.get("accessible"),
        blocking=keys.get("blocking"),
        confidence=analysis["confidence"],
        explanation=analysis["explanation"],
        reasons=[
            Reason(r["code"], r["detail"], dict(r.get("evidence") or {}))
            for r in analysis.get("reasons") or ()
        ],  # fmt: skip
        controls=list(analysis.get("controls") or ()),
    )


def vantage_from_wire(d: Doc) -> VantagePoint:
    ann = d.get("annotations") or {}
    return VantagePoint(
        probe_id=d["probe_id"],
        software_name=d.get("software_name", "vantage"),
        software_version=d["software_version"],
        platform=ann.get("platform", ""),
        architecture=ann.get("architecture", ""),
        asn=parse_asn(d["probe_asn"]),
        cc=d["probe_cc"],
        network_name=d.get("probe_network_name"),
        network_type=ann.get("network_type"),
        resolver_ip=d.get("resolver_ip"),
        resolver_asn=parse_asn(d.get("resolver_asn") or "AS0"),
        resolver_network_name=d.get("resolver_network_name"),
    )


VANTAGE_ANNOTATIONS = ("architecture", "platform", "network_type")


def to_wire(m: Measurement) -> Doc:
    """A measurement as a JSON-ready dict in wire format ``DATA_FORMAT_VERSION``."""
    v = m.vantage
    annotations = dict(m.annotations)
    annotations.update(architecture=v.architecture, platform=v.platform)
    if v.network_type:
        annotations["network_type"] = v.network_type
    return {
        "data_format_version": DATA_FORMAT_VERSION,
        "measurement_uid": m.measurement_uid,
        "report_id": m.run_id,
        "measurement_start_time": format_time(m.start_time),
        "test_runtime": m.test_runtime,
        "test_name": TEST_NAME,
        "test_version": TEST_VERSION,
        "input": m.target.input,
        "service": m.target.service,
        "target": target_to_wire(m.target),
        "probe_id": v.probe_id,
        "probe_asn": format_asn(v.asn),
        "probe_cc": v.cc,
        "probe_ip": "127.0.0.1",
        "probe_network_name": v.network_name,
        "resolver_ip": v.resolver_ip,
        "resolver_asn": format_asn(v.resolver_asn),
        "resolver_network_name": v.resolver_network_name,
        "software_name": v.software_name,
        "software_version": v.software_version,
        "annotations": annotations,
        "test_keys": {
            "failure": m.failure(),
            "accessible": m.verdict.accessible if m.verdict else None,
            "blocking": m.verdict.blocking if m.verdict else None,
            "analysis": verdict_to_wire(m.verdict),
            "queries": [query_to_wire(q) for q in m.queries],
            "tcp_connect": [tcp_to_wire(c) for c in m.tcp_connect],
            "tls_handshakes": [tls_to_wire(h) for h in m.tls_handshakes],
            "requests": [http_to_wire(r) for r in reversed(m.requests)],
        },
    }


def from_wire(d: Doc) -> Measurement:
    """Parse a wire document; raises :class:`WireError` naming the bad field."""
    if not isinstance(d, dict):
        raise WireError("a measurement must be a JSON object")
    version = d.get("data_format_version")
    if version != DATA_FORMAT_VERSION:
        raise WireError(f"data_format_version {version!r} is not {DATA_FORMAT_VERSION!r}")
    try:
        keys = d["test_keys"]
        annotations = {
            k: str(v)
            for k, v in (d.get("annotations") or {}).items()
            if k not in VANTAGE_ANNOTATIONS
        }
        try:
            start = parse_time(d["measurement_start_time"])
        except ValueError as exc:
            raise WireError(f"measurement_start_time: {exc}") from None
        return Measurement(
            measurement_uid=d["measurement_uid"],
            run_id=d["report_id"],
            target=target_from_wire(d["target"]),
            vantage=vantage_from_wire(d),
            start_time=start.replace(tzinfo=dt.UTC),
            test_runtime=float(d["test_runtime"]),
            queries=[query_from_wire(q) for q in keys.get("queries") or ()],
            tcp_connect=[tcp_from_wire(c) for c in keys.get("tcp_connect") or ()],
            tls_handshakes=[tls_from_wire(h) for h in keys.get("tls_handshakes") or ()],
            requests=[http_from_wire(r) for r in reversed(keys.get("requests") or ())],
            annotations=annotations,
            verdict=verdict_from_wire(keys),
        )
    except KeyError as exc:
        raise WireError(f"missing field {exc.args[0]!r}") from exc
    except WireError:
        raise
    except (TypeError, ValueError, AttributeError) as exc:
        raise WireError(f"malformed measurement: {exc}") from exc


def dumps(m: Measurement) -> str:
    """One measurement as one line of JSON (JSONL)."""
    return json.dumps(to_wire(m), ensure_ascii=False, separators=(",", ":"))
