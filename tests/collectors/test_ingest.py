"""POST /api/v1/measurements against a real collector on loopback and PostgreSQL:
per-item results, idempotence, limits, refusals, and rows identical to the probe's."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import uuid
import zlib
from typing import Any

import fastjsonschema
import httpx
import orjson
import pytest
import sqlalchemy as sa
from jsonschema import Draft202012Validator

from collectors import auth
from collectors.ingest import IngestError, compile_validator, decode_body
from probe.store import Store
from schema import tables, wire
from tests.collectors.conftest import Collector
from tests.collectors.samples import doc, measurement

API = "/api/v1/measurements"


def new_id() -> str:
    return str(uuid.uuid4())


def post(
    c: Collector,
    credential: str | None,
    items: list[Any] | None = None,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    compress: bool = False,
) -> httpx.Response:
    data = body if body is not None else json.dumps({"measurements": items}).encode()
    h = {"Content-Type": "application/json", **(headers or {})}
    if compress:
        data = gzip.compress(data)
        h["Content-Encoding"] = "gzip"
    if credential is not None:
        h["Authorization"] = f"Bearer {credential}"
    return c.http.post(API, content=data, headers=h)


@pytest.fixture
def probe(collector: Collector) -> tuple[str, str]:
    probe_id = new_id()
    return probe_id, collector.enroll(probe_id)


def statuses(r: httpx.Response) -> list[str]:
    assert r.status_code == 200, r.text
    return [x["status"] for x in r.json()["results"]]


# -- accepted, duplicate, rejected ------------------------------------------------------


def test_accepted_duplicate_and_rejected_per_item(collector: Collector, probe) -> None:
    probe_id, cred = probe
    run = new_id()
    good = [doc(probe_id, run, i) for i in range(3)]
    bad = doc(probe_id, run, 9)
    bad["test_keys"]["queries"][0]["engine"] = "carrier-pigeon"

    r = post(collector, cred, [good[0], bad, good[1]])
    assert r.status_code == 200, r.text
    answer = r.json()
    assert (answer["accepted"], answer["duplicate"], answer["rejected"]) == (2, 0, 1)
    assert [x["measurement_uid"] for x in answer["results"]] == [
        good[0]["measurement_uid"], bad["measurement_uid"], good[1]["measurement_uid"]
    ]  # fmt: skip
    assert answer["results"][1]["status"] == "rejected"
    assert answer["results"][1]["reason"].startswith("test_keys.queries[0].engine:")

    # Re-sent, and twice within one batch: acknowledged, stored once.
    again = post(collector, cred, [good[0], good[2], good[2], good[1]])
    assert statuses(again) == ["duplicate", "accepted", "duplicate", "duplicate"]
    assert collector.count("measurements") == 3
    per_measurement = measurement(probe_id, run, 0).observation_count()
    assert collector.count("observations") == 3 * per_measurement
    assert collector.count("vantage_points") == 1
    with collector.engine.connect() as conn:
        runs = conn.execute(sa.select(tables.runs)).all()
    assert [(r.run_id, r.status, r.measurement_count) for r in runs] == [(run, "uploaded", 3)]


def test_stored_rows_read_back_as_the_probe_stores_them(collector: Collector, probe) -> None:
    probe_id, cred = probe
    sent = [measurement(probe_id, new_id(), i) for i in range(4)]
    assert statuses(post(collector, cred, [wire.to_wire(m) for m in sent])) == ["accepted"] * 4
    store = Store(collector.engine, outbox=False)
    for m in sent:
        assert store.load_measurement(m.measurement_uid) == m
    # The same rows the probe's own Store writes (SQLite here), column by column.
    probe_store = Store.open("sqlite://")
    for m in sent:
        probe_store.begin_run(m.run_id, "messaging", m.vantage, m.start_time)
    probe_store.write_measurements(sent)
    order = (tables.observations.c.measurement_uid, tables.observations.c.kind,
             tables.observations.c.seq)  # fmt: skip
    with collector.engine.connect() as a, probe_store.engine.connect() as b:
        for table, sort in ((tables.measurements, (tables.measurements.c.measurement_uid,)),
                            (tables.observations, order)):  # fmt: skip
            columns = [c for c in table.c if c.name not in ("id", "vantage_point_id")]
            theirs = [same(r) for r in a.execute(sa.select(*columns).order_by(*sort))]
            ours = [same(r) for r in b.execute(sa.select(*columns).order_by(*sort))]
            assert theirs == ours


def same(row: Any) -> tuple[Any, ...]:
    """A row with its times as UTC instants (PostgreSQL keeps the zone, SQLite drops it)."""
    return tuple(
        (v if v.tzinfo else v.replace(tzinfo=dt.UTC)).astimezone(dt.UTC)
        if isinstance(v, dt.datetime) else v
        for v in row
    )  # fmt: skip


BAD_ITEMS: list[tuple[str, Any, str]] = [
    ("not an object", 42, "a measurement must be a JSON object"),
    ("missing field", lambda d: d.pop("test_keys"), "the measurement must contain"),
    ("old format", lambda d: d.update(data_format_version="0.9.0"), "data_format_version"),
    ("long uid", lambda d: d.update(measurement_uid="x" * 37), "measurement_uid: longer than 36"),
    ("long report id", lambda d: d.update(report_id="r" * 40), "report_id: longer than 36"),
    ("NUL", lambda d: d["target"].update(host="a\x00b"), "NUL"),
    ("NUL key", lambda d: d["annotations"].update({"k\x00": "v"}), "NUL"),
    ("port", lambda d: d["test_keys"]["tcp_connect"][0].update(port=70000), "tcp_connect[0].port"),
    ("huge asn", lambda d: d.update(probe_asn="AS4294967295"), "probe_asn: not a 32-bit integer"),
    ("bad date", lambda d: d.update(measurement_start_time="2024-13-45 99:00:00"), "measurement_start_time"),
    ("bad base64", lambda d: d["test_keys"]["queries"][0].update(raw_response="QQ"), "raw_response"),
    ("extra key", lambda d: d.update(probe_ip_real="198.51.100.1"), "must not contain"),
    ("blocking", lambda d: d["test_keys"].update(blocking="everything"), "test_keys.blocking"),
    ("long service", lambda d: (d.update(service="s" * 65), d["target"].update(service="s" * 65)),
     "service: longer than 64"),
]  # fmt: skip


def test_a_bad_item_never_costs_the_good_ones(collector: Collector, probe) -> None:
    probe_id, cred = probe
    run = new_id()
    items: list[Any] = []
    for n, (_, change, _) in enumerate(BAD_ITEMS):
        items.append(doc(probe_id, run, 2 * n))
        if callable(change):
            bad = doc(probe_id, run, 2 * n + 1)
            change(bad)
            items.append(bad)
        else:
            items.append(change)
    r = post(collector, cred, items)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results[0::2]] == ["accepted"] * len(BAD_ITEMS)
    for (name, _, words), result in zip(BAD_ITEMS, results[1::2], strict=True):
        assert result["status"] == "rejected", name
        assert words in result["reason"], (name, result["reason"])
    assert collector.count("measurements") == len(BAD_ITEMS)


def test_sql_metacharacters_are_stored_unchanged(collector: Collector, probe) -> None:
    probe_id, cred = probe
    nasty = [
        "x'; DROP TABLE measurements; --",
        'Robert"); DELETE FROM probes; --',
        "\\N",  # COPY's NULL marker
        "tab\there\nnewline\rreturn",
        "back\\slash \\. end-of-copy",
        "%s %(x)s $1 ? :name",
        "ünïcødé ✓ 测试 🛰",
    ]
    sent = []
    for i, text in enumerate(nasty):
        m = measurement(probe_id, new_id(), i)
        m.annotations["note"] = text
        m.annotations[text] = "as a key"
        m.requests[0].request_headers.append(("X-Nasty", text))
        sent.append(m)
    docs = [wire.to_wire(m) for m in sent]
    for d, text in zip(docs, nasty, strict=True):
        d["probe_network_name"] = text
        d["target"]["id"] = text
    r = post(collector, cred, docs)
    assert statuses(r) == ["accepted"] * len(nasty)
    store = Store(collector.engine, outbox=False)
    for d, text in zip(docs, nasty, strict=True):
        back = store.load_measurement(d["measurement_uid"])
        assert back is not None
        assert back.annotations["note"] == text
        assert back.annotations[text] == "as a key"
        assert back.requests[0].request_headers[-1] == ("X-Nasty", text)
        assert back.vantage.network_name == text
    with collector.engine.connect() as conn:
        ids = set(conn.execute(sa.select(tables.measurements.c.target_id)).scalars())
    assert ids == set(nasty)
    assert collector.count("probes") == 1  # nothing was deleted


# -- the body -----------------------------------------------------------------------------


def test_gzip_is_accepted(collector: Collector, probe) -> None:
    probe_id, cred = probe
    docs = [doc(probe_id, new_id(), i) for i in range(5)]
    assert statuses(post(collector, cred, docs, compress=True)) == ["accepted"] * 5


@pytest.mark.parametrize(
    ("headers", "body", "status", "words"),
    [
        ({}, b"{not json", 400, "not JSON"),
        ({}, b"[1, 2]", 400, '{"measurements": [...]}'),
        ({}, b'{"measurements": {"a": 1}}', 400, '{"measurements": [...]}'),
        ({}, b'{"measurements": [1e400]}', 400, "not JSON"),
        ({"Content-Encoding": "br"}, b"{}", 415, "'br'"),
        ({"Content-Encoding": "gzip"}, b"this is not gzip", 400, "not valid gzip"),
        ({"Content-Encoding": "gzip"}, gzip.compress(b'{"measurements": []}')[:-12], 400,
         "truncated"),
    ],
)  # fmt: skip
def test_malformed_bodies(collector: Collector, probe, headers, body, status, words) -> None:
    r = post(collector, probe[1], body=body, headers=headers)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


def test_oversized_body_is_413_and_nothing_is_stored(make_collector, pg_url) -> None:
    c = make_collector(max_body=256 * 1024)
    probe_id = new_id()
    cred = c.enroll(probe_id)
    docs = [doc(probe_id, new_id(), i) for i in range(40)]  # about 430 KB
    r = post(c, cred, docs)
    assert r.status_code == 413, r.text
    assert "over 262144 bytes" in r.json()["error"]
    assert c.count("measurements") == 0


def test_a_gzip_bomb_is_413_and_nothing_is_stored(collector: Collector, probe) -> None:
    probe_id, cred = probe
    # A valid batch padded with 64 MiB of spaces: about 64 KB on the wire.
    packer = zlib.compressobj(wbits=31)
    head = json.dumps({"measurements": [doc(probe_id, new_id(), 0)]})[:-1].encode()
    parts = [packer.compress(head)]
    block = b" " * (1 << 20)
    parts += [packer.compress(block) for _ in range(64)]
    parts.append(packer.compress(b"}") + packer.flush())
    bomb = b"".join(parts)
    assert len(bomb) < 200_000
    r = post(collector, cred, body=bomb, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413, r.text
    assert "decompressed" in r.json()["error"]
    assert collector.count("measurements") == 0


def test_decode_body_stops_at_the_limit_whatever_the_ratio() -> None:
    bomb = gzip.compress(b"\0" * (8 << 20))
    with pytest.raises(IngestError) as exc:
        decode_body(bomb, "gzip", 1 << 20)
    assert exc.value.status == 413
    # Two gzip members are one body; exactly the limit passes.
    assert decode_body(gzip.compress(b"ab") + gzip.compress(b"cd"), "gzip", 4) == b"abcd"


def test_too_many_items_is_413(collector: Collector, probe) -> None:
    r = post(collector, probe[1], [{}] * 1001)
    assert r.status_code == 413
    assert "at most 1000" in r.json()["error"]


# -- who may upload -----------------------------------------------------------------------


def test_forged_identity_is_403_and_nothing_is_stored(collector: Collector, probe) -> None:
    probe_id, cred = probe
    other = new_id()
    collector.enroll(other)
    items = [doc(probe_id, new_id(), 0), doc(other, new_id(), 1), doc(probe_id, new_id(), 2)]
    r = post(collector, cred, items)
    assert r.status_code == 403, r.text
    assert "measurements[1].probe_id" in r.json()["error"]
    assert collector.count("measurements") == 0
    assert collector.count("runs") == 0


def test_another_probes_run_cannot_be_joined(collector: Collector) -> None:
    a, b = new_id(), new_id()
    cred_a, cred_b = collector.enroll(a), collector.enroll(b)
    run = new_id()
    assert statuses(post(collector, cred_a, [doc(a, run, 0)])) == ["accepted"]
    r = post(collector, cred_b, [doc(b, run, 1), doc(b, new_id(), 2)])
    assert statuses(r) == ["rejected", "accepted"]
    assert "report_id" in r.json()["results"][0]["reason"]


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer nope", "Basic dXNlcjpwYXNz"])
def test_missing_or_unknown_credential_is_401(collector: Collector, probe, header) -> None:
    probe_id, _ = probe
    h = {"Authorization": header} if header is not None else {}
    r = post(collector, None, [doc(probe_id, new_id(), 0)], headers=h)
    assert r.status_code == 401, r.text
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert collector.count("measurements") == 0


def test_a_revoked_credential_is_401_until_restored_and_enrolled_again(
    collector: Collector, probe
) -> None:
    probe_id, cred = probe
    assert auth.revoke_probe(collector.engine, probe_id)
    r = post(collector, cred, [doc(probe_id, new_id(), 0)])
    assert r.status_code == 401
    assert "revoked" in r.json()["error"]
    assert auth.restore_probe(collector.engine, probe_id)
    fresh = collector.enroll(probe_id)  # a new token: a new credential, the old stays dead
    assert post(collector, cred, [doc(probe_id, new_id(), 0)]).status_code == 401
    assert statuses(post(collector, fresh, [doc(probe_id, new_id(), 0)])) == ["accepted"]


def test_rate_limit_is_429_with_retry_after(make_collector) -> None:
    c = make_collector(upload_rate=1.0, upload_burst=3.0)
    probe_id = new_id()
    cred = c.enroll(probe_id)
    assert (
        statuses(post(c, cred, [doc(probe_id, new_id(), i) for i in range(4)])) == ["accepted"] * 4
    )  # the bucket had 3: one in debt now
    r = post(c, cred, [doc(probe_id, new_id(), 9)])
    assert r.status_code == 429, r.text
    assert int(r.headers["Retry-After"]) >= 1
    assert c.count("measurements") == 4
    other = new_id()  # another probe has its own bucket
    assert statuses(post(c, c.enroll(other), [doc(other, new_id(), 0)])) == ["accepted"]


def test_fleet_health_is_recorded(collector: Collector, probe) -> None:
    probe_id, cred = probe
    r = post(collector, cred, [doc(probe_id, new_id(), 0)], headers={"X-Vantage-Backlog": "42"})
    assert statuses(r) == ["accepted"]
    row = auth.list_probes(collector.engine)[0]
    assert row["backlog"] == 42
    assert (row["asn"], row["cc"]) == (64496, "DE")
    assert row["last_upload_at"] is not None and row["last_seen_at"] is not None
    post(collector, cred, [], headers={"X-Vantage-Backlog": "not a number"})
    assert auth.list_probes(collector.engine)[0]["backlog"] == 42
    # A digit that is not ASCII ("²".isdigit() is true) and a number int() refuses.
    superscript: Any = {"X-Vantage-Backlog": "\u00b2".encode("latin-1")}
    assert post(collector, cred, [], headers=superscript).status_code == 200
    assert auth.list_probes(collector.engine)[0]["backlog"] == 42
    r = post(collector, cred, [], headers={"X-Vantage-Backlog": "9" * 5000})
    assert r.status_code == 200
    assert auth.list_probes(collector.engine)[0]["backlog"] == 2**31 - 1


# -- the fast validator is the schema -----------------------------------------------------


def _paths(node: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) in ``node``, depth first, in a stable order."""
    out: list[tuple[Any, Any]] = []
    keys = (
        list(node) if isinstance(node, dict) else range(len(node)) if isinstance(node, list) else []
    )
    for k in keys:
        out.append((node, k))
        out.extend(_paths(node[k]))
    return out


def _mutations(d: dict[str, Any]) -> list[dict[str, Any]]:
    """Many small changes to a valid document (a value replaced, a key removed)."""
    replacements = [None, 1, -1, 1.5, "x", "", True, [], {}, [["a"]], "AS12", "XX", "ZZZ"]
    out = []
    for n in range(len(_paths(d))):
        extra = ("dns", "unknown_failure: x", "AS0")[n % 3]
        for value in [*replacements[n % 6 :: 6], extra]:
            copied = orjson.loads(orjson.dumps(d))
            parent, key = _paths(copied)[n]
            parent[key] = value
            out.append(copied)
        copied = orjson.loads(orjson.dumps(d))
        parent, key = _paths(copied)[n]
        if isinstance(parent, dict):
            del parent[key]
            out.append(copied)
    return out


def test_the_fast_validator_agrees_with_the_json_schema() -> None:
    """Never accepts what the schema refuses; refuses more only where a base64 field
    does not decode (``contentEncoding``, which from_wire refuses too)."""
    fast = compile_validator()
    reference = Draft202012Validator(wire.json_schema())
    base = doc(new_id(), new_id(), 3, body_size=16)
    base["test_keys"]["queries"][0]["answers"].append(
        {"answer_type": "TXT", "value": "v", "ttl": 1}
    )
    docs = _mutations(base)
    assert len(docs) > 500
    disagreements = []
    for d in docs:
        expected = reference.is_valid(d)
        try:
            fast(d)
            got = True
        except fastjsonschema.JsonSchemaValueException as exc:
            got = False
            if expected and exc.message.endswith("must be encoded by base64"):
                with pytest.raises(wire.WireError):
                    wire.from_wire(d)
                continue
        if got != expected:
            disagreements.append(json.dumps(d)[:300])
    assert disagreements == []


def test_the_same_batch_sent_twice_at_once_is_stored_once(make_collector) -> None:
    """Two uploads race for the same new run, vantage point and measurements: the
    loser's transaction rolls back and is done again, seeing the winner's rows. (Four
    at once from one probe are allowed here: by default a probe has at most two bodies
    in flight, and tokens for one batch at a time.)"""
    import threading

    collector = make_collector(uploads_per_probe=4, upload_burst=20 * 1001)
    probe_id = new_id()
    cred = collector.enroll(probe_id)
    run = new_id()
    docs = [doc(probe_id, run, i) for i in range(50)]
    answers: list[httpx.Response] = []

    def send() -> None:
        with httpx.Client(base_url=collector.url, trust_env=False, timeout=60) as client:
            answers.append(client.post(API, json={"measurements": docs},
                                       headers={"Authorization": f"Bearer {cred}"}))  # fmt: skip

    for _ in range(3):
        threads = [threading.Thread(target=send) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    accepted = sum(r.json()["accepted"] for r in answers)
    duplicate = sum(r.json()["duplicate"] for r in answers)
    assert (accepted, duplicate) == (50, 11 * 50)
    assert collector.count("measurements") == 50
    assert collector.count("runs") == 1 and collector.count("vantage_points") == 1
    with collector.engine.connect() as conn:
        count = conn.execute(sa.select(tables.runs.c.measurement_count)).scalar()
    assert count == 50
