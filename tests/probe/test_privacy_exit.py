"""The scrub on every way out: textual forms, decoded bodies, keyed hashes, annotations,
the resolver, addresses remembered, stored measurements scrubbed again, stale runs, the
probe's environment, and a first migration killed at random points."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import gzip
import ipaddress
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path

import pytest

from probe.config import CollectorSection, load_config
from probe.measuring import RunLock
from probe.privacy import ANNOTATION, SCRUBBED, OwnAddresses, Scrub, exit_scrub, scrub_key
from probe.store import Store
from schema import tables, wire
from schema.model import DNSAnswer, DNSQuery, HTTPTransaction, Measurement, Target, VantagePoint

ROOT = Path(__file__).resolve().parents[2]
V4, V6 = "203.0.113.7", "2001:db8:1:2::7"
VANTAGE = VantagePoint("probe-1", "0.1.0", "linux", "x86_64", asn=64500, cc="ZZ",
                       resolver_ip=V4)  # fmt: skip

#: Every spelling of the two addresses that a server was seen to echo.
FORMS = [
    V4, "203-0-113-7", "203_0_113_7", "7.113.0.203.in-addr.arpa", "7-113-0-203",
    "203%2E0%2E113%2E7", "203%2e0%2e113%2e7", "203.000.113.007", "3405803783", "0xcb007107",
    "203%252E0%252E113%252E7", "&#50;&#48;&#51;&#46;0.113.7", "\\u0032\\u0030\\u0033.0.113.7",
    "::ffff:203.0.113.7", V6, "2001:db8:1:2:0:0:0:7", "2001:0db8:1:2::7", "2001:DB8:1:2::7",
    "2001:0db8:0001:0002:0000:0000:0000:0007", "2001%3Adb8%3A1%3A2%3A%3A7", "2001-db8-1-2--7",
    "7.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa",
    # An independent review's: embedded in IPv6, inet_aton's hex and octal, bare hex,
    # base64 (a cookie or token), fullwidth and other digits, other separators,
    # invisible characters, markup, deep percent-encoding.
    "::ffff:cb00:7107", "64:ff9b::cb00:7107", "2002:cb00:7107::1", "cb007107",
    "0xcb.0x00.0x71.0x07", "0313.0.0161.07", "eyJpcCI6IjIwMy4wLjExMy43In0=",
    "\uff12\uff10\uff13\uff0e\uff10\uff0e\uff11\uff11\uff13\uff0e\uff17",
    "\u0662\u0660\u0663.\u0660.\u0661\u0661\u0663.\u0667", "203 0 113 7", "203,0,113,7",
    "203/0/113/7", "203.0\u200b.113.7", "203.0.<b>113</b>.7",
    "203%2525252E0%2525252E113%2525252E7",
]  # fmt: skip
#: Other addresses that share digits with them: never scrubbed.
OTHERS = ["203.0.113.70", "1203.0.113.7", "203.0.113.71", "2001:db8:1:2::70",
          "2001:db8:1:2::7:1", "version 203.0.11.7", "3405803784"]  # fmt: skip


def _spelled(text: str) -> bool:
    """Whether a string still spells either address, in any form above."""
    return any(form.lower() in text.lower() for form in FORMS if len(form) > 8)


@pytest.mark.parametrize("form", FORMS)
def test_every_textual_form_is_scrubbed(form: str) -> None:
    s = Scrub({V4, V6})
    for text in (form, f"seen={form};", f"http://x.test/?ip={form}&a=1", f"host-{form}.dyn.test"):
        out = s.text(text)
        assert SCRUBBED in out and not _spelled(out), (text, out)


@pytest.mark.parametrize("other", OTHERS)
def test_other_addresses_are_left(other: str) -> None:
    assert Scrub({V4, V6}).text(f"x {other} y") == f"x {other} y"


def _tx(body: bytes, headers: list[tuple[str, str]], *, truncated: bool = False,
        url: str = "http://site.test/") -> HTTPTransaction:  # fmt: skip
    return HTTPTransaction(url, "GET", 0, 1, status=200, response_headers=headers, body=body,
                           body_length=len(body) + (100_000 if truncated else 0),
                           body_is_truncated=truncated,
                           body_sha256="ab" * 32)  # fmt: skip


def _m(*requests: HTTPTransaction, **kw: object) -> Measurement:
    m = Measurement(str(uuid.uuid4()), "run-1", Target(id="t", service="s", kind="http",
                    host="site.test", url="http://site.test/"), VANTAGE,
                    dt.datetime(2026, 1, 1, tzinfo=dt.UTC), requests=list(requests))  # fmt: skip
    return dataclasses.replace(m, **kw)  # type: ignore[arg-type]


def _brotli(data: bytes) -> bytes:
    brotli = pytest.importorskip("brotli")
    return bytes(brotli.compress(data))


PAGE = f"<p>Your address is {V4}</p>".encode()
ENCODED = {
    "gzip, gzip": gzip.compress(gzip.compress(PAGE)),
    "deflate, gzip": gzip.compress(zlib.compress(PAGE)),
}


@pytest.mark.parametrize("coding", sorted(ENCODED))
def test_a_body_kept_encoded_that_holds_the_address_is_dropped(coding: str) -> None:
    raw = ENCODED[coding]
    clean = Scrub({V4}, b"k" * 32).measurement(_m(_tx(raw, [("Content-Encoding", coding)])))
    tx = clean.requests[0]
    assert tx.body == b"" and tx.body_length == len(raw)
    assert tx.body_sha256 is None and tx.body_keyed_sha256 is not None
    assert clean.annotations[ANNOTATION] == "true"


def test_bodies_that_hide_their_text_are_read_first() -> None:
    cases = [
        ([("Content-Encoding", "gzip")], gzip.compress(PAGE)),  # sent compressed twice:
        ([], gzip.compress(PAGE)),  # the engine removed one layer, or none was declared
        ([("Content-Encoding", "identity")], zlib.compress(PAGE)),
        ([("Content-Type", "text/html; charset=utf-7")], b"IP 203+AC4-0+AC4-113+AC4-7"),
        ([], b"x" * 5000 + PAGE.decode().encode("utf-16-le")),  # wide text after ASCII
    ]
    for headers, raw in cases:
        tx = Scrub({V4}).measurement(_m(_tx(raw, headers))).requests[0]
        assert tx.body == b"", (headers, raw[:20])


def test_an_encoded_body_without_the_address_is_kept_as_sent() -> None:
    raw = gzip.compress(gzip.compress(b"<p>hello 198.51.100.1</p>"))
    tx = Scrub({V4}).measurement(_m(_tx(raw, [("Content-Encoding", "gzip, gzip")]))).requests[0]
    assert tx.body == raw and tx.body_sha256 == "ab" * 32


def test_undecodable_bodies_are_dropped() -> None:
    for headers, raw in (([("Content-Encoding", "gzip, gzip")], b"not gzip at all"),
                         ([("Content-Encoding", "x-unknown")], PAGE)):  # fmt: skip
        tx = Scrub({V4}, b"k" * 32).measurement(_m(_tx(raw, headers))).requests[0]
        assert tx.body == b"" and tx.body_sha256 is None and tx.body_keyed_sha256


def test_wide_text_is_read_before_it_is_judged() -> None:
    for codec in ("utf-16", "utf-16-le", "utf-32"):
        raw = PAGE.decode().encode(codec)
        headers = [("Content-Type", f"text/html; charset={codec}")]
        tx = Scrub({V4}).measurement(_m(_tx(raw, headers))).requests[0]
        assert tx.body == b"", codec
    # Without a charset, NUL bytes between characters give UTF-16 away.
    tx = Scrub({V4}).measurement(_m(_tx(PAGE.decode().encode("utf-16-be"), []))).requests[0]
    assert tx.body == b""


def test_a_plain_body_is_scrubbed_in_place_and_keeps_a_keyed_hash() -> None:
    key = b"k" * 32
    tx = Scrub({V4}, key).measurement(_m(_tx(PAGE, []))).requests[0]
    assert tx.body == f"<p>Your address is {SCRUBBED}</p>".encode()
    assert tx.body_sha256 is None and tx.body_keyed_sha256 is not None
    # Keyed: the same page gives the same value under one key, another under another.
    again = Scrub({V4}, key).measurement(_m(_tx(PAGE, []))).requests[0]
    other = Scrub({V4}, b"o" * 32).measurement(_m(_tx(PAGE, []))).requests[0]
    assert again.body_keyed_sha256 == tx.body_keyed_sha256 != other.body_keyed_sha256


def test_a_truncated_body_never_keeps_its_plain_hash() -> None:
    # The address may lie past the kept part: the hash of the whole would give it away.
    tx = Scrub({V4}, b"k" * 32).measurement(_m(_tx(b"clean start", [], truncated=True)))
    kept = tx.requests[0]
    assert kept.body == b"clean start" and kept.body_sha256 is None
    assert kept.body_keyed_sha256 is not None


def test_annotations_urls_verdict_and_resolver_are_scrubbed() -> None:
    hop = _tx(b"ok", [("X-Client-IP", V4), ("Content-Encoding", f"x-{V4}")],
              url=f"http://site.test/?seen={V4}")  # fmt: skip
    m = _m(_tx(b"", [("Location", f"http://site.test/?seen={V4}")]), hop,
           annotations={"http_body_encoding": f"http://site.test/?seen={V4}: content coding "
                                              f"'x-{V4}' not decoded"})  # fmt: skip
    doc = Scrub({V4}).document(wire.to_wire(m))
    text = json.dumps(doc)
    assert V4 not in text and doc["resolver_ip"] is None
    assert doc["annotations"][ANNOTATION] == "true"
    # A DNS answer that is the probe's own address (a resolver answering with the address
    # it saw, as whoami services do) becomes the unspecified address; the raw reply,
    # which holds it too, goes. Other answers are kept as answered (evidence).
    raw = b"\x01\x02" + ipaddress.ip_address(V4).packed
    q = DNSQuery("a.test", "A", "udp", "192.0.2.53:53", 0, 1, rcode="NOERROR",
                 answers=[DNSAnswer("A", V4, 60), DNSAnswer("A", "198.51.100.9", 60)],
                 raw_response=raw)  # fmt: skip
    kept = Scrub({V4}).measurement(_m(queries=[q]))
    assert [a.value for a in kept.queries[0].answers] == ["0.0.0.0", "198.51.100.9"]
    assert kept.queries[0].raw_response is None
    other = dataclasses.replace(q, answers=[DNSAnswer("A", "198.51.100.9", 60)],
                                raw_response=b"\x01\x02\xc6\x33\x64\x09")  # fmt: skip
    assert Scrub({V4}).measurement(_m(queries=[other])).queries[0] == other


def test_an_endpoint_that_is_the_probe_itself_is_a_placeholder() -> None:
    s = Scrub({V4, V6})
    assert s.observations("tcp_connect", [{"ip": V4, "port": 443}]) == [{"ip": "0.0.0.0",
                                                                         "port": 443}]  # fmt: skip
    (tls,) = s.observations("tls_handshakes", [{"ip": V6, "address": f"[{V6}]:443"}])
    assert tls == {"ip": "::", "address": "[::]:443"}
    (http,) = s.observations("requests", [{"address": f"{V4}:80", "request": {"url": "x"}}])
    assert http["address"] == "0.0.0.0:80"


def test_own_addresses_are_remembered(tmp_path: Path) -> None:
    own = OwnAddresses(tmp_path)
    assert own.learn([V4, "127.0.0.1", "not an address"], "test") == {V4}
    assert own.learn([V4], "test") == set()
    assert own.addresses() == {V4}
    assert oct(own.path.stat().st_mode & 0o777) == oct(0o600)
    own.unsure("run-1")
    own.unsure("run-1")
    assert own.unsure_runs() == ["run-1"]
    own.path.write_text("{ damaged")
    assert OwnAddresses(tmp_path).addresses() == set()  # starts again, never crashes
    assert V4 in exit_scrub(tmp_path, [V4]).addresses


def test_stored_measurements_are_scrubbed_again_once_the_address_is_learnt(
    tmp_path: Path,
) -> None:
    db = tmp_path / "vantage.db"
    store = Store.open(f"sqlite:///{db}")
    m = _m(_tx(PAGE, [("X-Client-IP", V4)], url=f"http://site.test/?seen={V4}"))
    store.begin_run("run-1", "s", VANTAGE, m.start_time)
    store.write_measurements([m])
    other = dataclasses.replace(_m(_tx(PAGE, [])), run_id="run-2")
    store.begin_run("run-2", "s", VANTAGE, m.start_time)
    store.write_measurements([other])
    assert V4.encode() in _all_bytes(tmp_path)
    scrub = Scrub({V4}, scrub_key(tmp_path))
    assert store.rescrub(scrub, ["run-1"]) == 1
    doc = store.documents([m.measurement_uid])[0]
    assert V4 not in json.dumps(doc) and doc["annotations"][ANNOTATION] == "true"
    assert doc["resolver_ip"] is None
    # Only the runs asked for are rewritten (the other is scrubbed on its way out).
    assert V4 in json.dumps(store.documents([other.measurement_uid])[0]["test_keys"])
    store.rescrub(scrub, ["run-2"])
    store.close()
    data = _all_bytes(tmp_path)
    assert V4.encode() not in data and b"203-0-113-7" not in data


def _all_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in directory.iterdir() if p.name.startswith("vantage"))


def test_a_run_left_running_is_interrupted_only_when_no_run_is_alive(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'v.db'}")
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    store.begin_run("killed", "s", VANTAGE, now)
    alive = RunLock.acquire(tmp_path)  # another run in progress (a separate open file)
    alive.share()
    second = RunLock.acquire(tmp_path)
    assert not second.alone  # the other run holds it: nothing may be marked
    second.release()
    alive.release()
    third = RunLock.acquire(tmp_path)
    assert third.alone
    assert store.interrupt_stale_runs(VANTAGE.probe_id, now) == 1
    assert store.interrupt_stale_runs("another-probe", now) == 0
    third.release()
    with store.engine.connect() as conn:
        status = conn.execute(tables.runs.select()).one().status
    assert status == "interrupted"
    store.close()


def test_the_collector_servers_variables_are_not_the_probes(tmp_path: Path) -> None:
    env = {"VANTAGE_COLLECTOR_DB": "postgresql://x", "VANTAGE_COLLECTOR_SETTLE_AFTER": "5",
           "VANTAGE_COLLECTOR_TIMEOUT": "7", "VANTAGE_PROBE_DATA_DIR": str(tmp_path)}  # fmt: skip
    cfg = load_config(None, env=env)
    assert cfg.collector.timeout == 7.0  # the probe's own collector.* keys still apply
    from collectors.settings import CollectorSettings

    server = {f.name for f in dataclasses.fields(CollectorSettings)}
    probe = {f.name for f in dataclasses.fields(CollectorSection)}
    assert server & probe == set(), "a variable would be read by both programs"


_MIGRATE = "import sys; from probe.store import Store; Store.open('sqlite:///' + sys.argv[1])"


def test_a_first_migration_killed_anywhere_leaves_a_usable_database(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def start(db: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", _MIGRATE, str(db)], cwd=ROOT, env=env)

    began = time.monotonic()
    assert start(tmp_path / "whole.db").wait(timeout=60) == 0
    whole = time.monotonic() - began
    rng = random.Random(20261204)
    for i in range(25):  # bounded: 25 kills spread over the whole start-up and migration
        db = tmp_path / f"k{i}.db"
        proc = start(db)
        time.sleep(rng.uniform(0.0, whole))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        store = Store.open(f"sqlite:///{db}")  # never "table already exists"
        store.close()
        with sqlite3.connect(db) as conn:
            version = conn.execute("SELECT version_num FROM alembic_version").fetchall()
            assert version == [(_head(),)], i


def _head() -> str:
    versions = ROOT / "schema" / "migrations" / "versions"
    return max(p.name.split("_", 1)[0] for p in versions.glob("0*.py"))


def test_wire_body_forms_round_trip() -> None:
    body = {"format": "base64", "data": base64.b64encode(b"\x00" + PAGE).decode()}
    resp = {"code": 200, "headers_list": [], "body": body, "body_is_truncated": False,
            "body_length": 10, "body_sha256": None}  # fmt: skip
    out = Scrub({V4}).response(resp)
    # A body with NUL bytes may be wide text: it cannot be edited in place, so it goes.
    assert out["body"] in ("", {"format": "base64", "data": ""})
    assert out["body_length"] == 10 and ipaddress.ip_address(V4)
