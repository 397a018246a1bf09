"""CSV: one row per measurement; read back with the csv module and compared, field by
field, with the database rows and with the measurements that were stored."""

from __future__ import annotations

import csv
import datetime as dt
import io
from typing import Any

import sqlalchemy as sa

from probe.export.flat import NAMES
from schema import tables
from schema.model import Measurement
from tests.export.conftest import export_bytes


def _read(data: bytes) -> list[dict[str, str]]:
    text = data.decode("utf-8")
    assert "\r\n" in text  # RFC 4180 line ends
    reader = csv.DictReader(io.StringIO(text, newline=""))
    assert tuple(reader.fieldnames or ()) == NAMES
    return list(reader)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ";".join(value)
    return str(value)


def _distinct(values) -> list[str]:
    out: list[str] = []
    for v in values:
        if v and v not in out:
            out.append(v)
    return out


def _expected(m: Measurement) -> dict[str, str]:
    """The summary columns, from the model (a second, plain derivation)."""
    v = m.verdict
    last = m.requests[-1] if m.requests else None
    good_tls = [h for h in m.tls_handshakes if h.failure is None and h.purpose == "target"]
    values = {
        "test_runtime": repr(m.test_runtime),
        "control": m.target.control,
        "accessible": v.accessible if v else None,
        "blocking": (str(v.blocking).lower() if v.blocking is not None else None) if v else None,
        "confidence": v.confidence if v else None,
        "reasons": _distinct(r.code for r in v.reasons) if v else [],
        "failure": m.failure(),
        "observation_count": m.observation_count(),
        "dns_queries": len(m.queries),
        "dns_rcodes": _distinct(q.rcode for q in m.queries),
        "dns_failures": _distinct(q.failure for q in m.queries),
        "dns_addresses": _distinct(a for q in m.queries for a in q.addresses()),
        "tcp_connects": len(m.tcp_connect),
        "tcp_successes": sum(c.success for c in m.tcp_connect),
        "tcp_failures": _distinct(c.failure for c in m.tcp_connect),
        "tls_handshakes": len(m.tls_handshakes),
        "tls_failures": _distinct(h.failure for h in m.tls_handshakes),
        "tls_version": good_tls[0].tls_version if good_tls else None,
        "http_requests": len(m.requests),
        "http_failure": last.failure if last else None,
        "http_status": last.status if last else None,
        "http_url": last.url if last else None,
        "http_body_length": last.body_length if last and last.status is not None else None,
        "http_body_sha256": last.body_sha256 if last and last.status is not None else None,
        "http_body_is_truncated": last.body_is_truncated if last and last.status is not None
        else None,
    }  # fmt: skip
    return {k: _cell(val) for k, val in values.items()}


def test_rows_match_the_database_field_by_field(engine, stored) -> None:
    rows = _read(export_bytes(engine, "csv"))
    assert [r["measurement_uid"] for r in rows] == [m.measurement_uid for m in stored]
    m, vp = tables.measurements, tables.vantage_points
    with engine.connect() as conn:
        db = {
            r.measurement_uid: r
            for r in conn.execute(
                sa.select(m, vp.c.probe_id, vp.c.asn, vp.c.cc, vp.c.network_name,
                          vp.c.network_type, vp.c.resolver_ip, vp.c.resolver_asn,
                          vp.c.resolver_network_name, vp.c.software_version)
                .join(vp, vp.c.id == m.c.vantage_point_id)
            )
        }  # fmt: skip
    for row in rows:
        d = db[row["measurement_uid"]]
        start = d.start_time.replace(tzinfo=dt.UTC)
        assert row["measurement_start_time"] == start.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert row["report_id"] == d.run_id
        assert float(row["test_runtime"]) == d.test_runtime
        for name in ("service", "target_id", "target_kind", "input", "failure", "probe_id",
                     "network_type", "resolver_ip", "resolver_network_name", "software_version"):  # fmt: skip
            assert row[name] == _cell(getattr(d, name)), name
        assert row["probe_asn"] == str(d.asn) and row["probe_cc"] == d.cc
        assert row["probe_network_name"] == _cell(d.network_name)
        assert row["resolver_asn"] == str(d.resolver_asn)
        assert row["accessible"] == _cell(d.accessible)
        assert row["blocking"] == _cell(d.blocking)
        assert row["observation_count"] == str(d.observation_count)
        assert row["confidence"] == _cell(d.verdict["confidence"] if d.verdict else None)


def test_evidence_summaries_match_the_measurements(engine, stored) -> None:
    rows = _read(export_bytes(engine, "csv"))
    for row, m in zip(rows, stored, strict=True):
        for name, value in _expected(m).items():
            assert row[name] == value, (m.measurement_uid, name)


def test_text_with_commas_quotes_and_newlines_survives(engine, stored) -> None:
    rows = _read(export_bytes(engine, "csv", service=['news, "quoted"']))
    assert rows and all(r["service"] == 'news, "quoted"' for r in rows)
    assert all(r["input"] == "https://例え.jp/path?q=a,b;c" for r in rows)


def test_csv_text_neutralises_what_starts_like_a_formula() -> None:
    from probe.export.flat import FORMULA_STARTS, csv_text

    for start in FORMULA_STARTS:
        assert csv_text(f"{start}HYPERLINK(1)") == f"'{start}HYPERLINK(1)"
    assert csv_text("whatsapp") == "whatsapp" and csv_text("") == ""
    assert csv_text("a=b") == "a=b"  # only the start of a cell counts
