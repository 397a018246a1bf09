"""Measurements for the export tests and benchmark: varied ones through the store, and
large databases generated fast.

:func:`measurements` builds model objects for the built-in catalog's targets with the
evidence real runs leave (answers, connects, certificate chains, redirect chains,
bodies, verdicts with reasons) plus the awkward cases (binary and NUL bodies, non-ASCII
text, times under 1e-4 s, control-SNI handshakes, interrupted measurements); they are
stored with ``Store.write_measurements``, the probe's own path.

:func:`generate_database` writes N measurements straight into SQLite with
``executemany`` (rows shaped exactly as the store writes them, from a few hundred
measurements made by :func:`measurements`): a million in a few minutes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
import sqlite3
import uuid
from pathlib import Path
from typing import Any

from probe.catalog import builtin_services
from probe.store import Store, observation_rows, vantage_fingerprint
from schema import tables, wire
from schema.model import (
    DNSAnswer,
    DNSQuery,
    HTTPTransaction,
    Measurement,
    Reason,
    Target,
    TCPConnect,
    TLSHandshake,
    VantagePoint,
    Verdict,
)

T0 = dt.datetime(2026, 3, 1, 0, 0, tzinfo=dt.UTC)

VANTAGES = (
    VantagePoint(probe_id="11111111-1111-4111-8111-111111111111", software_version="0.4.0",
                 platform="linux", architecture="aarch64", asn=44244, cc="IR",
                 network_name="Iran Cell Service and Communication Company", network_type="mobile",
                 resolver_ip="5.202.100.100", resolver_asn=44244,
                 resolver_network_name="Iran Cell Service and Communication Company"),
    VantagePoint(probe_id="22222222-2222-4222-8222-222222222222", software_version="0.4.0",
                 platform="linux", architecture="armv7l", asn=9121, cc="TR",
                 network_name="Türk Telekom", network_type="wifi", resolver_ip="195.175.39.39",
                 resolver_asn=9121, resolver_network_name="Türk Telekom"),
    VantagePoint(probe_id="33333333-3333-4333-8333-333333333333", software_version="0.4.1",
                 platform="linux", architecture="x86_64", asn=3320, cc="DE",
                 network_name="Deutsche Telekom AG", network_type=None, resolver_ip=None,
                 resolver_asn=0, resolver_network_name=None),
    VantagePoint(probe_id="44444444-4444-4444-8444-444444444444", software_version="0.4.1",
                 platform="linux", architecture="aarch64"),  # unknown network: AS0, ZZ
)  # fmt: skip

FAILURES = {
    "dns": ("dns_nxdomain_error", "dns_servfail_error", "generic_timeout_error"),
    "tcp": ("generic_timeout_error", "connection_refused", "connection_reset"),
    "tls": ("connection_reset", "generic_timeout_error", "ssl_invalid_hostname"),
    "http": ("connection_reset", "http_request_failed", "eof_error"),
}
BLOCK_OF = {"dns": "dns", "tcp": "tcp_ip", "tls": "tls", "http": "http-failure"}


def _catalog_targets() -> list[Target]:
    targets = [t for s in builtin_services() for t in s.targets]
    targets.append(  # a user's own target, with text a CSV or JSON writer must escape
        Target(id="blog-ü", service="news, \"quoted\"", kind="http", host="例え.jp",
               url="https://例え.jp/path?q=a,b;c", method="POST", body="x=1\n")
    )  # fmt: skip
    return targets


def _t(rng: random.Random, start: float) -> tuple[float, float]:
    t0 = round(start + rng.random() * 0.01, 6)
    return t0, round(t0 + rng.random() * 0.2, 6)


def _cert(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


def _queries(rng: random.Random, t: Target, fail: str | None) -> list[DNSQuery]:
    out = []
    for qtype in ("A", "AAAA"):
        t0, t1 = _t(rng, 0.0)
        if rng.random() < 0.05:
            t0 = round(rng.random() * 9e-5, 7)  # under 1e-4 s: Python writes 4.5e-05
        q = DNSQuery(t.host, qtype, "udp", "192.168.1.1:53", t0, t1, system_resolver=True)
        if fail is not None:
            q.failure, q.failed_operation = fail, "resolve"
            q.rcode = {"dns_nxdomain_error": "NXDOMAIN", "dns_servfail_error": "SERVFAIL"}.get(fail)
        else:
            q.rcode = "NOERROR"
            if rng.random() < 0.3:
                q.answers.append(DNSAnswer("CNAME", f"edge.{t.host}", 300))
            for _ in range(rng.randint(1, 2)):
                if qtype == "A":
                    value = f"157.240.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
                else:
                    value = f"2a03:2880:f{rng.randint(0, 0xFFF):03x}::{rng.randint(1, 0xFFFF):x}"
                q.answers.append(DNSAnswer(qtype, value, rng.choice((60, 300, 3600))))
        q.raw_response = rng.randbytes(rng.randint(40, 160))
        out.append(q)
    return out


def _addresses(queries: list[DNSQuery], t: Target) -> list[str]:
    found = [a for q in queries for a in q.addresses()]
    if t.url and t.host.replace(".", "").isdigit():
        return [t.host]
    return found[:2] or ([t.host] if t.host[0].isdigit() else [])


def _http_chain(rng: random.Random, t: Target, address: str | None, fail: str | None,
                start: float) -> list[HTTPTransaction]:  # fmt: skip
    hops = []
    url = t.url or f"https://{t.host}/"
    for i in range(rng.choice((1, 1, 1, 2, 3))):
        t0, t1 = _t(rng, start + 0.1 * i)
        h = HTTPTransaction(url, t.method, t0, t1, address=address,
                            request_headers=[("Host", t.host), ("User-Agent", "Mozilla/5.0"),
                                             ("Accept", "*/*")])  # fmt: skip
        hops.append(h)
        last = i == len(hops) - 1 and rng.random() < 0.6
        if fail is not None and last:
            h.failure, h.failed_operation = fail, "http_round_trip"
            break
        if not last and rng.random() < 0.5:
            h.status = 301
            h.response_headers = [("Location", url + f"next{i}"), ("Content-Length", "0")]
            h.body_sha256 = hashlib.sha256(b"").hexdigest()
            url = url + f"next{i}"
            continue
        kind = rng.random()
        if kind < 0.05:
            body = b"\x00\x01binary\xff" + rng.randbytes(64)  # not text: base64 on the wire
        elif kind < 0.1:
            body = 'Страница заблокирована — 封锁 \u2028 "quotes" \\ end'.encode()
        else:
            size = rng.choice((0, 120, 900, 4000, 12000))
            body = (b"<html><head><title>Example</title></head><body>" + b"x" * size)[:size]
        h.status = rng.choice((200, 200, 200, 403, 404))
        h.response_headers = [("Content-Type", "text/html; charset=utf-8"), ("Server", "nginx"),
                              ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]  # fmt: skip
        h.body = body
        h.body_length = len(body) + (50000 if rng.random() < 0.1 else 0)
        h.body_is_truncated = h.body_length > len(body)
        h.body_sha256 = hashlib.sha256(body).hexdigest()
        break
    return hops


def measurement(rng: random.Random, t: Target, vantage: VantagePoint, run_id: str,
                start: dt.datetime, blocked: bool) -> Measurement:  # fmt: skip
    """One plausible measurement of ``t``; ``blocked``: one step fails, as censorship
    would make it."""
    m = Measurement(str(uuid.UUID(int=rng.getrandbits(128), version=4)), run_id, t, vantage,
                    start, test_runtime=round(rng.random() * 3, 6))  # fmt: skip
    steps = ["dns", "tcp", "tls", "http"][: ["dns", "tcp", "tls", "http"].index(t.kind) + 1]
    if t.url and t.url.startswith("http://"):
        steps = [s for s in steps if s != "tls"]
    if t.url and t.host[0].isdigit():
        steps = [s for s in steps if s != "dns"]
    where = rng.choice(steps) if blocked else None
    fail = rng.choice(FAILURES[where]) if where else None
    if "dns" in steps:
        m.queries = _queries(rng, t, fail if where == "dns" else None)
    addresses = _addresses(m.queries, t) if where != "dns" else []
    ports = t.ports or ((443,) if (t.url or "").startswith("https") else (80,))
    if "tcp" in steps:
        for ip in addresses:
            for port in ports:
                t0, t1 = _t(rng, 0.05)
                f = fail if where == "tcp" else None
                m.tcp_connect.append(TCPConnect(ip, port, t0, t1, failure=f,
                                                failed_operation="connect" if f else None))  # fmt: skip
    ok = [c for c in m.tcp_connect if c.success]
    if "tls" in steps and ok:
        c = ok[0]
        t0, t1 = _t(rng, 0.1)
        if where == "tls":
            m.tls_handshakes.append(TLSHandshake(c.ip, c.port, t.server_name, t0, t1, failure=fail,
                                                 failed_operation="tls_handshake"))  # fmt: skip
            if rng.random() < 0.5:  # the SNI A/B test: same address, a harmless name
                m.tls_handshakes.append(TLSHandshake(
                    c.ip, c.port, "example.com", t1, t1 + 0.05, tls_version="TLSv1.3",
                    cipher_suite="TLS_AES_128_GCM_SHA256", purpose="control_sni",
                    peer_certificates=[_cert(rng, 900)]))  # fmt: skip
        else:
            m.tls_handshakes.append(TLSHandshake(
                c.ip, c.port, t.server_name, t0, t1, tls_version=rng.choice(("TLSv1.3", "TLSv1.2")),
                cipher_suite="TLS_AES_256_GCM_SHA384", negotiated_protocol=rng.choice((None, "h2")),
                peer_certificates=[_cert(rng, 1300), _cert(rng, 1100)]))  # fmt: skip
    reached = "tls" not in steps or any(h.failure is None for h in m.tls_handshakes)
    if "http" in steps and ok and reached:
        m.requests = _http_chain(rng, t, ok[0].ip, fail if where == "http" else None, 0.2)
    if rng.random() < 0.03:
        m.annotations["interrupted"] = "true"
    if rng.random() < 0.02:
        m.annotations["http_body_encoding"] = "https://x/: gzip; ünïcode"
    m.verdict = _verdict(rng, m, where)
    return m


def _verdict(rng: random.Random, m: Measurement, where: str | None) -> Verdict | None:
    if rng.random() < 0.05:
        return None  # not judged
    if where is None:
        return Verdict(True, False, "high", "every step worked",
                       [Reason("reachable", "every step worked")], ["apple-captive"])  # fmt: skip
    if rng.random() < 0.2:
        return Verdict(False, None, "low", "a single timeout proves nothing",
                       [Reason("weak_failure", "one timeout",
                               {"failure": m.failure(), "rate": 4.5e-05, "seen": 1})])  # fmt: skip
    kind = BLOCK_OF[where]
    evidence: dict[str, Any] = {"step": where, "failure": m.failure(), "targets": ["a", "b"],
                                "control": {"resolver": "8.8.8.8", "ok": True}}  # fmt: skip
    return Verdict(False, kind, rng.choice(("high", "medium")), f"blocked at {where}",
                   [Reason(f"{where}_failure", f"{where} failed while controls passed", evidence),
                    Reason("controls_ok", "controls reachable", {"controls": 3})],
                   ["apple-captive", "microsoft-ncsi"])  # fmt: skip


def measurements(n: int, seed: int = 7, *, start: dt.datetime = T0,
                 blocked_share: float = 0.3) -> list[tuple[str, VantagePoint, dt.datetime,
                                                           list[Measurement]]]:  # fmt: skip
    """About ``n`` measurements, as runs: (run_id, vantage, started, measurements).

    Each run measures the whole catalog from one vantage point (the last run is cut
    short to make ``n``); runs are an hour apart and cycle through :data:`VANTAGES`.
    """
    rng = random.Random(seed)
    targets = _catalog_targets()
    runs = []
    made = 0
    i = 0
    while made < n:
        vantage = VANTAGES[i % len(VANTAGES)]
        started = start + dt.timedelta(hours=i, seconds=rng.randint(0, 600))
        run_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        blocked = vantage.cc == "IR" or rng.random() < blocked_share
        batch = []
        for j, t in enumerate(targets[: n - made]):
            when = started + dt.timedelta(seconds=j // 4)
            batch.append(measurement(rng, t, vantage, run_id, when,
                                     blocked and rng.random() < 0.5))  # fmt: skip
        runs.append((run_id, vantage, started, batch))
        made += len(batch)
        i += 1
    return runs


def store(url: str, runs: list[tuple[str, VantagePoint, dt.datetime, list[Measurement]]]) -> None:
    """Write ``runs`` through the probe's store (migrations, rows, observations)."""
    s = Store.open(url, outbox=False)
    try:
        for run_id, vantage, started, batch in runs:
            s.begin_run(run_id, "catalog", vantage, started)
            s.write_measurements(batch)
            s.finish_run(run_id, "complete", started + dt.timedelta(minutes=2))
    finally:
        s.close()


def all_measurements(runs: list[tuple[str, VantagePoint, dt.datetime, list[Measurement]]]
                     ) -> list[Measurement]:  # fmt: skip
    """Every measurement of ``runs``, in export order (start time, then uid)."""
    ms = [m for *_, batch in runs for m in batch]
    return sorted(ms, key=lambda m: (m.start_time, m.measurement_uid))


# -- a large database, fast ---------------------------------------------------------------------


def _stored_time(value: dt.datetime) -> str:
    """A time as SQLAlchemy stores it in SQLite (UTC, no zone)."""
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _templates(seed: int, variants: int) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(measurement row, observation rows) of catalog measurements, as the store makes
    them; the generator stamps copies with new ids, runs and times."""
    rng = random.Random(seed)
    out = []
    for t in _catalog_targets()[:-1]:  # the catalog alone
        for v in range(variants):
            m = measurement(rng, t, VANTAGES[0], "template", T0, blocked=v % 3 == 2)
            doc = wire.to_wire(m)
            keys = doc["test_keys"]
            row = {
                "data_format_version": doc["data_format_version"],
                "service": t.service, "target_id": t.id, "target_kind": t.kind,
                "input": doc["input"], "test_runtime": m.test_runtime, "failure": keys["failure"],
                "observation_count": m.observation_count(), "target": json.dumps(doc["target"]),
                "annotations": json.dumps(dict(m.annotations)),
                "accessible": keys["accessible"],
                "blocking": None if keys["blocking"] is None else str(keys["blocking"]).lower(),
                "verdict": None if keys["analysis"] is None else json.dumps(keys["analysis"]),
            }  # fmt: skip
            obs = []
            for o in observation_rows(m.measurement_uid, keys):
                o = dict(o)
                o["data"] = json.dumps(o["data"])
                del o["measurement_uid"]
                obs.append(o)
            out.append((row, obs))
    return out


def generate_database(path: Path, n: int, *, seed: int = 11, variants: int = 8,
                      runs_per_vantage_day: int = 4) -> Path:  # fmt: skip
    """Write ``n`` measurements into a new SQLite database at ``path`` (migrated by the
    store first): whole catalog runs from the :data:`VANTAGES`, several a day."""
    if path.exists():
        path.unlink()
    Store.open(f"sqlite:///{path}", outbox=False).close()
    templates = _templates(seed, variants)
    per_run = len(templates) // variants
    rng = random.Random(seed)
    db = sqlite3.connect(path)
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA foreign_keys=OFF")
    vp_ids = {}
    vp_cols = [c.name for c in tables.vantage_points.columns if c.name not in ("id", "public_ip")]
    for v in VANTAGES:
        values = {c: getattr(v, c, None) for c in vp_cols}
        values["fingerprint"] = vantage_fingerprint(v)
        cur = db.execute(f"INSERT INTO vantage_points ({','.join(values)}) "
                         f"VALUES ({','.join('?' * len(values))})", list(values.values()))  # fmt: skip
        vp_ids[v.probe_id] = cur.lastrowid
    m_cols = ["measurement_uid", "run_id", "vantage_point_id", "start_time", *templates[0][0]]
    o_cols = ["measurement_uid", "kind", "seq", "hostname", "address", "port", "failure",
              "failed_operation", "t0", "t", "data"]  # fmt: skip
    m_sql = (f"INSERT INTO measurements ({','.join(m_cols)}) VALUES "
             f"({','.join(':' + c for c in m_cols)})")  # fmt: skip
    o_sql = (f"INSERT INTO observations ({','.join(o_cols)}) VALUES "
             f"({','.join(':' + c for c in o_cols)})")  # fmt: skip
    r_sql = ("INSERT INTO runs (run_id, suite, started_at, finished_at, status, vantage_point_id,"
             " measurement_count) VALUES (?, 'catalog', ?, ?, 'complete', ?, ?)")  # fmt: skip
    made = 0
    run = 0
    m_rows: list[dict[str, Any]] = []
    o_rows: list[dict[str, Any]] = []
    while made < n:
        vantage = VANTAGES[run % len(VANTAGES)]
        started = T0 + dt.timedelta(hours=24 * run / (len(VANTAGES) * runs_per_vantage_day))
        run_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        count = min(per_run, n - made)
        db.execute(r_sql, (run_id, _stored_time(started),
                           _stored_time(started + dt.timedelta(minutes=2)), vp_ids[vantage.probe_id],
                           count))  # fmt: skip
        for j in range(count):
            row, obs = templates[j * variants + rng.randrange(variants)]
            uid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            m_rows.append({**row, "measurement_uid": uid, "run_id": run_id,
                           "vantage_point_id": vp_ids[vantage.probe_id],
                           "start_time": _stored_time(started + dt.timedelta(seconds=j // 4))})  # fmt: skip
            for o in obs:
                o_rows.append({**o, "measurement_uid": uid})
        made += count
        run += 1
        if len(m_rows) >= 20000:
            _flush(db, m_sql, o_sql, m_rows, o_rows)
    _flush(db, m_sql, o_sql, m_rows, o_rows)
    db.close()
    return path


def _flush(db: sqlite3.Connection, m_sql: str, o_sql: str, m_rows: list[dict[str, Any]],
           o_rows: list[dict[str, Any]]) -> None:  # fmt: skip
    with db:
        db.executemany(m_sql, m_rows)
        db.executemany(o_sql, o_rows)
    m_rows.clear()
    o_rows.clear()
