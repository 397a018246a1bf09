"""JSONL in Vantage's wire format: one measurement per line, as ``vantage run --json`` prints it.

Each line is byte for byte what :func:`schema.wire.dumps` gives for the stored
measurement (compact separators, UTF-8 kept, keys in wire order), built from the rows
without parsing them into model objects. Lines are encoded with :mod:`orjson` when it
is installed; where orjson and the standard library would spell a number differently
(floats under 1e-4 or from 1e16, which Python writes with an exponent) the token is
respelled, or the document re-encoded with the standard library, so the bytes never
depend on it.

Read back with ``schema.wire.from_wire(json.loads(line))``, or pandas/DuckDB (see
``schema/DATA_DICTIONARY.md``).

PostgreSQL's JSONB does not keep the key order of objects: from the collector, every
object of the wire format gets its keys back in wire order; free-form mappings
(``annotations`` beyond the probe's own, and a verdict reason's ``evidence``) come in
the order PostgreSQL keeps them (shorter keys first).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

from probe.export.reader import Doc, Record
from schema import wire
from schema.model import (
    DNSQuery,
    HTTPTransaction,
    Reason,
    TCPConnect,
    TLSHandshake,
    Verdict,
)

try:
    import orjson
except ImportError:  # pragma: no cover - exercised where orjson is missing
    orjson = None  # type: ignore[assignment]

#: A number token that orjson spells differently from :func:`json.dumps`: in compact
#: JSON every number follows ``:``, ``,`` or ``[``. A string that happens to contain
#: such text only costs a slower, still exact, encoding.
_RISKY_NUMBER = re.compile(rb"[:,\[]-?(?:0\.0000|\d[\d.]*[eE])")


def _stdlib(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def dumps(doc: Any) -> bytes:
    """``doc`` as compact JSON, exactly as ``json.dumps(doc, ensure_ascii=False,
    separators=(",", ":"))`` spells it (which :func:`schema.wire.dumps` uses)."""
    if orjson is None:
        return _stdlib(doc)
    try:
        text = orjson.dumps(doc)
    except TypeError:  # NaN (reader.NonFinite), a huge integer, a lone surrogate
        return _stdlib(doc)
    if _RISKY_NUMBER.search(text):
        return _stdlib(doc)
    return text


def _spelled_alike(value: Any) -> bool:
    """True when orjson and Python write ``value`` the same way: Python uses an
    exponent for floats below 1e-4 and from 1e16, orjson does not (integers and
    anything else are written alike)."""
    if not isinstance(value, float):
        return True
    magnitude = abs(value)
    return magnitude == 0.0 or 1e-4 <= magnitude < 1e16


def _plain(value: Any) -> bool:
    """No float in ``value`` that orjson would spell differently (a small walk: used
    on free-form mappings)."""
    if isinstance(value, float):
        return _spelled_alike(value)
    if isinstance(value, dict):
        return all(_plain(v) for v in value.values())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return True


def _exponent_floats(rec: Record) -> set[tuple[str, Any]] | None:
    """The (key, value) pairs of ``rec``'s floats that Python writes with an exponent,
    or None when one is where it cannot be patched (a free-form mapping). Checked on
    the values, not the output: the wire format's observations have floats only in
    ``t0`` and ``t`` (every other number is an integer)."""
    found: set[tuple[str, Any]] = set()
    if not _spelled_alike(rec.test_runtime):
        found.add(("test_runtime", rec.test_runtime))
    for items in (rec.queries, rec.tcp_connect, rec.tls_handshakes, rec.requests):
        for o in items:
            t0, t = o.get("t0"), o.get("t")
            if not _spelled_alike(t0):
                found.add(("t0", t0))
            if not _spelled_alike(t):
                found.add(("t", t))
    if not (rec.plain or (_plain(rec.verdict) and _plain(rec.annotations))):
        return None
    return found


def dumps_record(doc: Doc, rec: Record) -> bytes:
    """The JSON line of ``doc`` (built from ``rec``), exactly as the standard library
    spells it. orjson writes it; a ``t0``, ``t`` or ``test_runtime`` that Python spells
    with an exponent (``4.5e-05``, orjson ``0.000045``) is then respelled in place: the
    token ``"t0":0.000045`` can only be that key (a quote inside a string is escaped).
    Anything else unusual goes to the standard library."""
    if orjson is None:
        return _stdlib(doc)
    exponents = _exponent_floats(rec)
    if exponents is None:
        return _stdlib(doc)
    try:
        text = orjson.dumps(doc)
    except TypeError:  # NaN (reader.NonFinite), a huge integer, a lone surrogate
        return _stdlib(doc)
    for key, value in exponents:
        if not isinstance(value, float) or not math.isfinite(value):
            return _stdlib(doc)
        prefix = b'"' + key.encode() + b'":'
        ours, python = orjson.dumps(value), repr(value).encode()
        for end in (b",", b"}"):
            text = text.replace(prefix + ours + end, prefix + python + end)
    return text


# -- key order: the wire format's own, taken from schema.wire so it cannot drift -------------


def _keys(doc: Doc) -> tuple[str, ...]:
    return tuple(doc)


_QUERY = _keys(wire.query_to_wire(DNSQuery("h", "A", "udp", "r", 0.0, 0.0)))
#: One value key per answer (``ipv4``, ``ipv6``, ``hostname`` or ``value``), as
#: ``schema.wire.query_to_wire`` writes them.
_ANSWER = ("answer_type", "ipv4", "ipv6", "hostname", "value", "asn", "as_org_name", "ttl")
_TCP = _keys(wire.tcp_to_wire(TCPConnect("1.1.1.1", 1, 0.0, 0.0)))
_TCP_STATUS = _keys(wire.tcp_to_wire(TCPConnect("1.1.1.1", 1, 0.0, 0.0))["status"])
_TLS = _keys(wire.tls_to_wire(TLSHandshake("1.1.1.1", 1, "h", 0.0, 0.0)))
_BINARY = ("format", "data")
_SAMPLE_HTTP = HTTPTransaction("u", "GET", 0.0, 0.0, status=200)
_HTTP = _keys(wire.http_to_wire(_SAMPLE_HTTP))
_HTTP_REQUEST = _keys(wire.http_to_wire(_SAMPLE_HTTP)["request"])
_HTTP_RESPONSE = _keys(wire.http_to_wire(_SAMPLE_HTTP)["response"])
_ANALYSIS = _keys(wire.verdict_to_wire(Verdict(None, None, "low", "", [Reason("c", "d")])) or {})
_REASON = ("code", "detail", "evidence")


def _ordered(doc: Any, keys: tuple[str, ...]) -> Any:
    """``doc`` with ``keys`` first, in that order, then any others as they came."""
    if not isinstance(doc, dict) or tuple(doc) == keys:
        return doc
    out = {k: doc[k] for k in keys if k in doc}
    out.update((k, v) for k, v in doc.items() if k not in out)
    return out


def _query(q: Doc) -> Doc:
    q = _ordered(q, _QUERY)
    if q.get("answers"):
        q["answers"] = [_ordered(a, _ANSWER) for a in q["answers"]]
    return q


def _tcp(c: Doc) -> Doc:
    c = _ordered(c, _TCP)
    if isinstance(c.get("status"), dict):
        c["status"] = _ordered(c["status"], _TCP_STATUS)
    return c


def _tls(h: Doc) -> Doc:
    h = _ordered(h, _TLS)
    if h.get("peer_certificates"):
        h["peer_certificates"] = [_ordered(c, _BINARY) for c in h["peer_certificates"]]
    return h


def _http(t: Doc) -> Doc:
    t = _ordered(t, _HTTP)
    if isinstance(t.get("request"), dict):
        t["request"] = _ordered(t["request"], _HTTP_REQUEST)
    response = t.get("response")
    if isinstance(response, dict):
        response = t["response"] = _ordered(response, _HTTP_RESPONSE)
        if isinstance(response.get("body"), dict):
            response["body"] = _ordered(response["body"], _BINARY)
    return t


def _analysis(a: Doc | None) -> Doc | None:
    if a is None:
        return None
    a = _ordered(a, _ANALYSIS)
    if a.get("reasons"):
        a["reasons"] = [_ordered(r, _REASON) for r in a["reasons"]]
    return a


def reorder(rec: Record) -> None:
    """Put the keys of every wire-format object of ``rec`` back in wire order (needed
    where the database does not keep them: PostgreSQL's JSONB)."""
    rec.queries = [_query(q) for q in rec.queries]
    rec.tcp_connect = [_tcp(c) for c in rec.tcp_connect]
    rec.tls_handshakes = [_tls(h) for h in rec.tls_handshakes]
    rec.requests = [_http(t) for t in rec.requests]
    rec.verdict = _analysis(rec.verdict)


# -- the document ------------------------------------------------------------------------------


def wire_document(rec: Record) -> Doc:
    """The wire document of ``rec``: equal to what ``Store.iter_documents`` yields, and
    to :func:`schema.wire.to_wire` of the measurement that was stored."""
    v = rec.vantage
    annotations = dict(rec.annotations)
    annotations.update(architecture=v.architecture, platform=v.platform)
    if v.network_type:
        annotations["network_type"] = v.network_type
    target = rec.target
    return {
        "data_format_version": wire.DATA_FORMAT_VERSION,
        "measurement_uid": rec.uid,
        "report_id": rec.run_id,
        "measurement_start_time": rec.start.isoformat(" ")[:19],  # wire.TIME_FORMAT
        "test_runtime": rec.test_runtime,
        "test_name": wire.TEST_NAME,
        "test_version": wire.TEST_VERSION,
        "input": target.input,
        "service": target.service,
        "target": target.doc,
        "probe_id": v.probe_id,
        "probe_asn": f"AS{v.asn}",
        "probe_cc": v.cc,
        "probe_ip": "127.0.0.1",
        "probe_network_name": v.network_name,
        "resolver_ip": v.resolver_ip,
        "resolver_asn": f"AS{v.resolver_asn}",
        "resolver_network_name": v.resolver_network_name,
        "software_name": v.software_name,
        "software_version": v.software_version,
        "annotations": annotations,
        "test_keys": {
            "failure": rec.failure,
            "accessible": rec.accessible,
            "blocking": rec.blocking,
            "analysis": rec.verdict,
            "queries": rec.queries,
            "tcp_connect": rec.tcp_connect,
            "tls_handshakes": rec.tls_handshakes,
            "requests": rec.requests[::-1],
        },
    }


class JSONLEncoder:
    """Encodes chunks of records as JSON lines. ``reorder``: the database does not keep
    the key order of JSON objects (PostgreSQL), see :func:`reorder`."""

    name = "jsonl"
    suffix = ".jsonl"
    media_type = "application/x-ndjson"
    stdout_ok = True

    def __init__(self, *, reorder: bool = False) -> None:
        self.reorder = reorder

    def begin(self) -> bytes:
        return b""

    def encode(self, records: Sequence[Record]) -> bytes:
        if self.reorder:
            for rec in records:
                reorder(rec)
        lines = [dumps_record(wire_document(rec), rec) for rec in records]
        lines.append(b"")
        return b"\n".join(lines)

    def end(self) -> bytes:
        return b""
