"""OONI format: every measurement checked field by field against REFERENCE.md section 3,
and the messaging services' test keys against runs whose outcome is known."""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
from pathlib import Path

import pytest

from probe.cli import main
from schema.model import (
    DNSAnswer,
    DNSQuery,
    HTTPTransaction,
    Measurement,
    Target,
    TCPConnect,
    Verdict,
    is_failure_string,
)
from tests.export import dataset
from tests.export.conftest import export_bytes, lines
from tests.fixtures.mmdb import write_asn_db

TIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
BASE_KEYS = {
    "data_format_version", "measurement_start_time", "test_start_time", "test_runtime",
    "test_name", "test_version", "input", "report_id", "probe_asn", "probe_cc", "probe_ip",
    "probe_network_name", "resolver_ip", "resolver_asn", "resolver_network_name",
    "software_name", "software_version", "annotations", "test_keys",
}  # fmt: skip
OONI_TESTS = {"whatsapp", "telegram", "signal", "facebook_messenger"}


def _failure_ok(value: object) -> bool:
    return value is None or (isinstance(value, str) and is_failure_string(value))


def test_every_field_follows_the_reference(engine, stored) -> None:
    docs = [json.loads(x) for x in lines(export_bytes(engine, "ooni"))]
    assert len(docs) == len(stored)
    for d, m in zip(docs, stored, strict=True):
        v = m.vantage
        assert set(d) == BASE_KEYS
        assert d["data_format_version"] == "0.2.0"
        assert TIME.match(d["measurement_start_time"])
        assert d["measurement_start_time"] == m.start_time.strftime("%Y-%m-%d %H:%M:%S")
        assert TIME.match(d["test_start_time"])
        assert d["test_runtime"] == m.test_runtime
        assert d["test_name"] == (m.target.service if m.target.service in OONI_TESTS
                                  else "reachability")  # fmt: skip
        assert d["input"] == m.target.input and d["report_id"] == m.run_id
        assert d["probe_asn"] == f"AS{v.asn}" and re.match(r"^AS\d+$", d["probe_asn"])
        assert d["probe_cc"] == v.cc and re.match(r"^[A-Z]{2}$", d["probe_cc"])
        assert d["probe_ip"] == "127.0.0.1"
        assert d["probe_network_name"] == (v.network_name or "")
        assert d["resolver_ip"] == (v.resolver_ip or "")
        assert d["resolver_asn"] == f"AS{v.resolver_asn}"
        assert d["resolver_network_name"] == (v.resolver_network_name or "")
        assert d["software_name"] == "vantage" and d["software_version"] == v.software_version
        ann = d["annotations"]
        assert all(isinstance(x, str) for x in ann.values())
        assert ann["architecture"] == v.architecture and ann["platform"] == v.platform
        assert ann.get("network_type") == v.network_type
        assert ann["vantage_measurement_uid"] == m.measurement_uid
        assert ann["vantage_target_id"] == m.target.id
        _check_test_keys(d["test_keys"], m)


def _check_test_keys(k: dict, m: Measurement) -> None:
    assert k["failure"] == m.failure() and _failure_ok(k["failure"])
    assert k["accessible"] == (m.verdict.accessible if m.verdict else None)
    assert k["blocking"] == (m.verdict.blocking if m.verdict else None)
    assert len(k["queries"]) == len(m.queries)
    for q, mq in zip(k["queries"], m.queries, strict=True):
        assert (q["hostname"], q["query_type"], q["engine"], q["resolver_address"]) == (
            mq.hostname, mq.query_type, mq.engine, mq.resolver_address)  # fmt: skip
        assert q["failure"] == mq.failure and _failure_ok(q["failure"])
        assert q["t0"] == mq.t0 and q["t"] == mq.t
        assert q["rcode"] == {"NOERROR": 0, "SERVFAIL": 2, "NXDOMAIN": 3}[mq.rcode] if mq.rcode \
            else "rcode" not in q  # fmt: skip
        assert base64.b64decode(q["raw_response"]) == mq.raw_response
        for a, ma in zip(q["answers"], mq.answers, strict=True):
            key = {"A": "ipv4", "AAAA": "ipv6", "CNAME": "hostname"}[ma.answer_type]
            assert a["answer_type"] == ma.answer_type and a[key] == ma.value
            assert a["ttl"] == ma.ttl
            if key != "hostname":
                assert a["asn"] == 0 and a["as_org_name"] == ""  # no ASN database given
    for c, mc in zip(k["tcp_connect"], m.tcp_connect, strict=True):
        assert (c["ip"], c["port"], c["t0"], c["t"]) == (mc.ip, mc.port, mc.t0, mc.t)
        assert c["status"] == {"failure": mc.failure, "success": mc.success}
        assert _failure_ok(c["status"]["failure"])
    assert len(k["tls_handshakes"]) == len(m.tls_handshakes)
    for h, mh in zip(k["tls_handshakes"], m.tls_handshakes, strict=True):
        assert h["address"] == f"{mh.ip}:{mh.port}" if ":" not in mh.ip else f"[{mh.ip}]:{mh.port}"
        assert h["server_name"] == mh.server_name
        assert h["tls_version"] == (mh.tls_version or "")
        assert h["cipher_suite"] == (mh.cipher_suite or "")
        assert h["negotiated_protocol"] == (mh.negotiated_protocol or "")
        assert h["no_tls_verify"] is mh.no_tls_verify
        assert [base64.b64decode(c["data"]) for c in h["peer_certificates"]] == \
            mh.peer_certificates  # fmt: skip
        assert all(c["format"] == "base64" for c in h["peer_certificates"])
        assert h["failure"] == mh.failure and _failure_ok(h["failure"])
        assert h["tags"] == (["control_sni"] if mh.purpose == "control_sni" else [])
    # newest first
    assert len(k["requests"]) == len(m.requests)
    for r, mr in zip(k["requests"], list(reversed(m.requests)), strict=True):
        assert r["request"]["url"] == mr.url and r["request"]["method"] == mr.method
        assert r["request"]["headers_list"] == [list(p) for p in mr.request_headers]
        assert r["failure"] == mr.failure and _failure_ok(r["failure"])
        assert r["t0"] == mr.t0 and r["t"] == mr.t
        resp = r["response"]
        if mr.status is None:
            assert resp["code"] == 0 and resp["body"] == ""
        else:
            assert resp["code"] == mr.status
            assert resp["headers_list"] == [list(p) for p in mr.response_headers]
            assert resp["headers"] == dict(reversed(mr.response_headers))  # first value kept
            body = resp["body"]
            got = base64.b64decode(body["data"]) if isinstance(body, dict) else body.encode()
            assert got == mr.body
            assert resp["body_is_truncated"] is mr.body_is_truncated


# -- service-level keys, from runs whose outcome is known -------------------------------------


def _targets(service: str) -> dict[str, Target]:
    return {t.id: t for t in dataset._catalog_targets() if t.service == service}


def _m(t: Target, run: str, i: int, *, connect: bool | None = None, failure: str | None = None,
       http_ok: bool | None = None, blocking: object = False) -> Measurement:  # fmt: skip
    """A measurement of ``t``: connects that worked (or not), an HTTP answer (or not)."""
    start = dataset.T0 + dt.timedelta(days=40, seconds=i)
    m = Measurement(f"{run[:8]}-{i:04d}-4000-8000-{t.id[:12]:0>12}", run, t,
                    dataset.VANTAGES[1], start, test_runtime=0.5)  # fmt: skip
    m.queries = [DNSQuery(t.host, "A", "udp", "1.1.1.1:53", 0.001, 0.01, rcode="NOERROR",
                          answers=[DNSAnswer("A", "157.240.1.1", 60)])]  # fmt: skip
    if connect is not None:
        for port in t.ports or (443,):
            m.tcp_connect.append(TCPConnect("157.240.1.1", port, 0.02, 0.03,
                                            failure=None if connect else "generic_timeout_error"))  # fmt: skip
    if http_ok is not None:
        tx = HTTPTransaction(t.url or "", t.method, 0.04, 0.05)
        if http_ok:
            tx.status, tx.body, tx.body_length = 200, b"ok", 2
        else:
            tx.failure = failure or "connection_reset"
        m.requests = [tx]
    accessible = blocking is False and (connect is not False) and (http_ok is not False)
    m.verdict = Verdict(accessible if blocking is not None else None, blocking, "high", "test")
    return m


def _store_run(tmp_path: Path, ms: list[Measurement]) -> str:
    runs = [(ms[0].run_id, ms[0].vantage, ms[0].start_time, ms)]
    url = f"sqlite:///{tmp_path / 'svc.db'}"
    dataset.store(url, runs)  # type: ignore[arg-type]
    return url


def _ooni(url: str, **filters) -> list[dict]:
    from probe.export.commands import open_engine

    engine = open_engine(url)
    try:
        return [json.loads(x) for x in lines(export_bytes(engine, "ooni", **filters))]
    finally:
        engine.dispose()


def test_whatsapp_keys(tmp_path: Path) -> None:
    t = _targets("whatsapp")
    run = "aaaaaaaa-0000-4000-8000-000000000001"
    ms = [_m(t[f"endpoint-e{n}"], run, n, connect=n == 3, blocking=False if n == 3 else "tcp_ip")
          for n in range(1, 6)]  # fmt: skip
    ms.append(_m(t["registration"], run, 10, connect=True, http_ok=True))
    ms.append(_m(t["web"], run, 11, connect=True, http_ok=False, failure="connection_reset",
                 blocking="http-failure"))  # fmt: skip
    url = _store_run(tmp_path, ms)
    docs = _ooni(url)
    assert {d["test_name"] for d in docs} == {"whatsapp"}
    keys = docs[0]["test_keys"]
    assert all(d["test_keys"]["whatsapp_endpoints_status"] == "ok" for d in docs)  # e3 worked
    assert keys["whatsapp_endpoints_blocked"] == [f"e{n}.whatsapp.net" for n in (1, 2, 4, 5)]
    assert keys["whatsapp_endpoints_dns_inconsistent"] == []
    assert keys["registration_server_status"] == "ok"
    assert keys["registration_server_failure"] is None
    assert keys["whatsapp_web_status"] == "blocked"
    assert keys["whatsapp_web_failure"] == "connection_reset"
    # the keys come from the whole run, whatever the export's filter
    only = _ooni(url, blocking=["http-failure"])
    assert len(only) == 1 and only[0]["test_keys"]["whatsapp_endpoints_status"] == "ok"


def test_whatsapp_endpoints_blocked_when_no_connect_works(tmp_path: Path) -> None:
    t = _targets("whatsapp")
    run = "aaaaaaaa-0000-4000-8000-000000000002"
    ms = [_m(t[f"endpoint-e{n}"], run, n, connect=False, blocking="tcp_ip") for n in (1, 2)]
    keys = _ooni(_store_run(tmp_path, ms))[0]["test_keys"]
    assert keys["whatsapp_endpoints_status"] == "blocked"
    assert keys["whatsapp_endpoints_blocked"] == ["e1.whatsapp.net", "e2.whatsapp.net"]
    assert keys["registration_server_status"] is None  # not measured in this run
    assert keys["whatsapp_web_status"] is None


@pytest.mark.parametrize("dc_connect,dc_http,tcp_blocking,http_blocking", [
    (False, None, True, True),   # no access point accepts a connection
    (True, False, False, True),  # connections work, no request gets an answer
    (True, True, False, False),  # answers come back
])  # fmt: skip
def test_telegram_keys(tmp_path: Path, dc_connect, dc_http, tcp_blocking, http_blocking) -> None:
    t = _targets("telegram")
    run = "bbbbbbbb-0000-4000-8000-000000000001"
    ms = [_m(t[i], run, n, connect=dc_connect, http_ok=dc_http,
             blocking=False if dc_http else "tcp_ip")
          for n, i in enumerate(("dc1-80", "dc1-443", "dc2-80"))]  # fmt: skip
    ms.append(_m(t["web"], run, 9, connect=True, http_ok=True))
    keys = _ooni(_store_run(tmp_path, ms))[0]["test_keys"]
    assert keys["telegram_tcp_blocking"] is tcp_blocking
    assert keys["telegram_http_blocking"] is http_blocking
    assert keys["telegram_web_status"] == "ok" and keys["telegram_web_failure"] is None


def test_signal_keys(tmp_path: Path) -> None:
    t = _targets("signal")
    run = "cccccccc-0000-4000-8000-000000000001"
    ms = [_m(t["cdsi"], run, 1, connect=True, http_ok=True),
          _m(t["chat"], run, 2, connect=True, http_ok=False, failure="ssl_invalid_hostname",
             blocking="tls"),
          _m(t["uptime"], run, 3)]  # fmt: skip
    docs = _ooni(_store_run(tmp_path, ms))
    for d in docs:
        assert d["test_name"] == "signal"
        assert d["test_keys"]["signal_backend_status"] == "blocked"
        assert d["test_keys"]["signal_backend_failure"] == "ssl_invalid_hostname"


def test_facebook_messenger_keys(tmp_path: Path) -> None:
    t = _targets("facebook_messenger")
    run = "dddddddd-0000-4000-8000-000000000001"
    ms = [_m(t["stun"], run, 0),
          _m(t["b-api"], run, 1, connect=True, blocking="dns"),
          _m(t["b-graph"], run, 2, connect=True),
          _m(t["star"], run, 3, connect=False, blocking="tcp_ip")]  # fmt: skip
    keys = _ooni(_store_run(tmp_path, ms))[0]["test_keys"]
    assert keys["facebook_b_api_dns_consistent"] is False
    assert keys["facebook_b_graph_dns_consistent"] is True
    assert keys["facebook_star_dns_consistent"] is True
    assert keys["facebook_stun_dns_consistent"] is True
    assert keys["facebook_dns_blocking"] is True
    assert keys["facebook_b_graph_reachable"] is True
    assert keys["facebook_star_reachable"] is False
    assert keys["facebook_stun_reachable"] is None  # UDP: OONI does not connect either
    assert keys["facebook_tcp_blocking"] is True  # star: consistent DNS, no connect
    assert keys["facebook_edge_dns_consistent"] is None  # not measured
    assert keys["facebook_edge_reachable"] is None


def test_dns_answers_get_their_as_from_the_asn_database(db_url, tmp_path: Path, stored) -> None:
    asn_db = write_asn_db(tmp_path / "asn.mmdb", {"157.240.0.0/16": (32934, "Facebook, Inc.")})
    out = tmp_path / "o.jsonl"
    assert main(["export", "--format", "ooni", "--db", db_url, "--out", str(out),
                 "--asn-db", str(asn_db)]) == 0  # fmt: skip
    answers = [a for line in out.read_bytes().split(b"\n")[:-1]
               for q in json.loads(line)["test_keys"]["queries"] for a in q["answers"]
               if a["answer_type"] == "A"]  # fmt: skip
    meta = [a for a in answers if a["ipv4"].startswith("157.240.")]
    assert meta and all(a["asn"] == 32934 and a["as_org_name"] == "Facebook, Inc." for a in meta)
    assert all(a["asn"] == 0 for a in answers if not a["ipv4"].startswith("157.240."))
