"""The collector's read API against generated data, on SQLite and on PostgreSQL.

Every expectation is computed here, in Python, from the generated measurements
themselves (never from the API): filters, keyset pages, daily aggregates, events and
the probe fleet. Hostile filter values (quotes, semicolons, LIKE wildcards,
backslashes, NUL) must be inert: an empty answer or a 422 naming the parameter, and
nothing in the database changes.
"""

from __future__ import annotations

import collections
import datetime as dt
import random
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from collectors import query
from probe.store import Store
from schema import tables, wire
from schema.model import DNSAnswer, DNSQuery, Measurement, Target, TCPConnect, VantagePoint, Verdict

UTC = dt.UTC
DAY0 = dt.datetime(2024, 5, 1, tzinfo=UTC)
SERVICES = ("whatsapp", "telegram", "signal")
#: (probe id, ASN, country): two networks in one country, one elsewhere.
PROBES = (
    ("11111111-1111-4111-8111-111111111111", 64500, "DE"),
    ("22222222-2222-4222-8222-222222222222", 64501, "DE"),
    ("33333333-3333-4333-8333-333333333333", 64502, "IR"),
)
#: What a verdict may say; None twice: "cannot tell" and "not analysed".
VERDICTS: tuple[Any, ...] = (False, False, False, "dns", "tcp_ip", "tls", None, "unanalysed")


def vantage(probe_id: str, asn: int, cc: str) -> VantagePoint:
    return VantagePoint(probe_id=probe_id, software_version="0.4.0", platform="linux",
                        architecture="aarch64", asn=asn, cc=cc, network_name=f"Net {asn}")  # fmt: skip


def make_measurement(
    uid: str, run_id: str, v: VantagePoint, service: str, start: dt.datetime, verdict: Any,
    *, control: bool = False, target_id: str | None = None,
) -> Measurement:  # fmt: skip
    """A small TCP measurement whose verdict says ``verdict`` (a blocking value, or
    "unanalysed" for none at all)."""
    tid = target_id or f"{service}-web"
    target = Target(id=tid, service=service, kind="tcp", host=f"{tid}.example", ports=(443,),
                    control=control)  # fmt: skip
    failure = None if verdict in (False, "unanalysed") else "generic_timeout_error"
    m = Measurement(
        measurement_uid=uid, run_id=run_id, target=target, vantage=v, start_time=start,
        test_runtime=0.25,
        queries=[DNSQuery(target.host, "A", "udp", "127.0.0.53:53", 0.001, 0.01, rcode="NOERROR",
                          answers=[DNSAnswer("A", "192.0.2.7", 60)])],
        tcp_connect=[TCPConnect("192.0.2.7", 443, 0.011, 0.05, failure,
                                "connect" if failure else None)],
        annotations={"suite": "messaging"},
    )  # fmt: skip
    if verdict != "unanalysed":
        accessible = True if verdict is False else (None if verdict is None else False)
        confidence = "low" if verdict is None else "high"
        m.verdict = Verdict(accessible, verdict, confidence, "test verdict")
    return m


def generate(seed: int = 7) -> list[tuple[str, VantagePoint, dt.datetime, list[Measurement]]]:
    """Runs of three probes over four days: (run id, vantage, started, measurements)."""
    rnd = random.Random(seed)
    runs = []
    for probe_id, asn, cc in PROBES:
        v = vantage(probe_id, asn, cc)
        for day in range(4):
            started = DAY0 + dt.timedelta(days=day, hours=rnd.randrange(0, 20))
            run_id = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
            ms = []
            for service in SERVICES:
                for _ in range(rnd.randrange(2, 7)):
                    start = started + dt.timedelta(seconds=rnd.randrange(0, 4 * 3600),
                                                   microseconds=rnd.randrange(10**6))  # fmt: skip
                    uid = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
                    ms.append(make_measurement(uid, run_id, v, service, start,
                                               rnd.choice(VERDICTS)))  # fmt: skip
            # Ties on start_time (pages order them by uid) and both sides of midnight.
            same = ms[0].start_time
            for k in range(3):
                uid = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
                ms.append(make_measurement(uid, run_id, v, SERVICES[k], same, False))
            midnight = DAY0 + dt.timedelta(days=day + 1)
            for when in (midnight - dt.timedelta(microseconds=1), midnight):
                uid = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
                ms.append(make_measurement(uid, run_id, v, "signal", when, "dns"))
            runs.append((run_id, v, started, ms))
    return runs


def open_collector_db(url: str) -> Store:
    return Store.open(url, outbox=False)


def store_runs(store: Store, runs: list[tuple[str, VantagePoint, dt.datetime, list[Measurement]]],
               status: str = "uploaded") -> None:  # fmt: skip
    """Store runs as the collector's ingest does: a run row with status "uploaded"."""
    for run_id, v, started, ms in runs:
        store.begin_run(run_id, "messaging", v, started)
        store.write_measurements(ms)
        with store.engine.begin() as conn:
            conn.execute(tables.runs.update().where(tables.runs.c.run_id == run_id)
                         .values(status=status))  # fmt: skip


def seed_probes(engine: sa.Engine, now: dt.datetime) -> list[dict[str, Any]]:
    with engine.begin() as conn:
        token_id = conn.execute(tables.enroll_tokens.insert().values(
            token_hash="t" * 64, label="test", created_at=DAY0)).inserted_primary_key[0]  # fmt: skip
    rows = [
        {"probe_id": PROBES[0][0], "credential_hash": "h0", "enrolled_at": DAY0,
         "last_seen_at": now - dt.timedelta(minutes=2), "last_upload_at": now - dt.timedelta(minutes=2),
         "backlog": 0, "asn": 64500, "cc": "DE", "revoked_at": None},
        {"probe_id": PROBES[1][0], "credential_hash": "h1", "enrolled_at": DAY0,
         "last_seen_at": now - dt.timedelta(days=3), "last_upload_at": now - dt.timedelta(days=3),
         "backlog": 1234, "asn": 64501, "cc": "DE", "revoked_at": None},
        {"probe_id": PROBES[2][0], "credential_hash": "h2", "enrolled_at": DAY0,
         "last_seen_at": now - dt.timedelta(hours=1), "last_upload_at": None,
         "backlog": None, "asn": 64502, "cc": "IR", "revoked_at": now - dt.timedelta(minutes=30)},
        {"probe_id": "44444444-4444-4444-8444-444444444444", "credential_hash": "h3",
         "enrolled_at": DAY0, "last_seen_at": None, "last_upload_at": None, "backlog": None,
         "asn": None, "cc": None, "revoked_at": None},
    ]  # fmt: skip
    with engine.begin() as conn:
        conn.execute(tables.probes.insert(), [dict(r, token_id=token_id) for r in rows])
    return rows


OPERATOR = "vop_the-operator-of-the-read-api-tests"


def app_for(engine: sa.Engine, pseudonym_key_file: str = "") -> FastAPI:
    """The read API alone; a client with :data:`OPERATOR_HEADERS` is the operator
    (who sees real probe ids), one without is the public."""
    app = FastAPI()
    app.state.engine = engine
    token = Path(tempfile.mkdtemp()) / "operator.token"
    token.write_text(OPERATOR + "\n")
    app.state.settings = SimpleNamespace(
        operator_token_file=str(token), pseudonym_key_file=pseudonym_key_file
    )
    app.include_router(query.router)
    return app


OPERATOR_HEADERS = {"Authorization": f"Bearer {OPERATOR}"}


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "postgresql":
        return str(request.getfixturevalue("pg_url"))
    return f"sqlite:///{tmp_path / 'collector.db'}"


class Seeded:
    def __init__(self, url: str) -> None:
        self.store = open_collector_db(url)
        self.engine = self.store.engine
        self.runs = generate()
        store_runs(self.store, self.runs)
        self.ms = [m for *_, ms in self.runs for m in ms]
        self.client = TestClient(app_for(self.engine), headers=OPERATOR_HEADERS)

    def expected(self, keep: Any = lambda m: True) -> list[str]:
        return [m.measurement_uid for m in sorted(self.ms, key=order) if keep(m)]

    def all_pages(self, params: dict[str, Any], limit: int = 500) -> list[dict[str, Any]]:
        docs: list[dict[str, Any]] = []
        after = None
        for _ in range(10_000):
            p = dict(params, limit=limit) | ({"after": after} if after else {})
            r = self.client.get("/api/v1/measurements", params=p)
            assert r.status_code == 200, r.text
            body = r.json()
            assert len(body["measurements"]) <= limit
            docs.extend(body["measurements"])
            after = body["next"]
            if after is None:
                return docs
        raise AssertionError("pagination never ended")


def order(m: Measurement) -> tuple[dt.datetime, str]:
    return (m.start_time, m.measurement_uid)


def blocking_of(m: Measurement) -> Any:
    return m.verdict.blocking if m.verdict else None


@pytest.fixture
def seeded(db_url: str) -> Iterator[Seeded]:
    s = Seeded(db_url)
    yield s
    s.client.close()
    s.store.close()


# -- measurements -------------------------------------------------------------------------


def test_every_filter_selects_what_python_selects(seeded: Seeded) -> None:
    d = seeded
    day1, day2 = DAY0 + dt.timedelta(days=1), DAY0 + dt.timedelta(days=2)
    cases: list[tuple[dict[str, Any], Any]] = [
        ({}, lambda m: True),
        ({"service": "telegram"}, lambda m: m.target.service == "telegram"),
        ({"cc": "de"}, lambda m: m.vantage.cc == "DE"),
        ({"asn": "AS64501"}, lambda m: m.vantage.asn == 64501),
        ({"asn": "64502"}, lambda m: m.vantage.asn == 64502),
        ({"probe": PROBES[2][0]}, lambda m: m.vantage.probe_id == PROBES[2][0]),
        ({"blocking": "false"}, lambda m: blocking_of(m) is False),
        ({"blocking": "dns"}, lambda m: blocking_of(m) == "dns"),
        ({"blocking": "null"}, lambda m: blocking_of(m) is None),
        ({"blocking": "unknown"}, lambda m: blocking_of(m) is None),
        ({"blocking": "true"}, lambda m: blocking_of(m) not in (None, False)),
        # A date-only until includes that day; a datetime until is exclusive.
        ({"since": "2024-05-02", "until": "2024-05-02"}, lambda m: day1 <= m.start_time < day2),
        ({"since": "2024-05-02T00:00:00Z", "until": "2024-05-03T00:00:00"},
         lambda m: day1 <= m.start_time < day2),
        # An offset is honoured: 02:00+02:00 is midnight UTC.
        ({"since": "2024-05-02T02:00:00+02:00"}, lambda m: m.start_time >= day1),
        ({"service": "signal", "cc": "DE", "blocking": "dns", "until": "2024-05-03"},
         lambda m: m.target.service == "signal" and m.vantage.cc == "DE"
         and blocking_of(m) == "dns" and m.start_time < DAY0 + dt.timedelta(days=3)),
    ]  # fmt: skip
    for params, keep in cases:
        got = [doc["measurement_uid"] for doc in d.all_pages(params)]
        want = d.expected(keep)
        assert got == want, params
        assert want or params == {}, f"the data has no case for {params}"
    assert len(d.expected()) == len(d.ms) > 100


def test_documents_are_the_wire_documents_stored(seeded: Seeded) -> None:
    by_uid = {m.measurement_uid: m for m in seeded.ms}
    docs = seeded.all_pages({"probe": PROBES[0][0]}, limit=1000)
    assert docs
    for doc in docs:
        assert doc == wire.to_wire(by_uid[doc["measurement_uid"]])


def test_keyset_pages_are_stable_while_measurements_arrive(seeded: Seeded) -> None:
    d = seeded
    before = d.expected()
    seen: list[str] = []
    after = None
    pages = 0
    late: list[Measurement] = []
    while True:
        params: dict[str, Any] = {"limit": 7} | ({"after": after} if after else {})
        body = d.client.get("/api/v1/measurements", params=params).json()
        seen.extend(doc["measurement_uid"] for doc in body["measurements"])
        pages += 1
        if pages == 3:  # new data lands mid-way: one earlier than this page, one later
            run_id, v, started, _ = d.runs[0]
            late = [
                make_measurement(str(uuid.uuid4()), run_id, v, "whatsapp", DAY0, "dns"),
                make_measurement(str(uuid.uuid4()), run_id, v, "whatsapp",
                                 DAY0 + dt.timedelta(days=30), "dns"),
            ]  # fmt: skip
            d.store.write_measurements(late)
        after = body["next"]
        if after is None:
            break
    assert len(seen) == len(set(seen)), "a measurement came twice"
    # Everything that was there is seen exactly once, in order; the later arrival
    # too (it sorts after the cursor), the earlier one not (it sorts before it).
    assert [u for u in seen if u in set(before)] == before
    assert late[1].measurement_uid in seen and late[0].measurement_uid not in seen
    assert pages == -(-(len(before) + 1) // 7)


def test_page_size_is_capped_and_the_last_page_has_no_next(seeded: Seeded) -> None:
    c = seeded.client
    assert len(c.get("/api/v1/measurements").json()["measurements"]) == query.DEFAULT_LIMIT
    r = c.get("/api/v1/measurements", params={"limit": query.MAX_LIMIT + 1})
    assert r.status_code == 422 and r.json()["error"].startswith("limit:")
    n = len(seeded.ms)
    body = c.get("/api/v1/measurements", params={"limit": n}).json()
    assert len(body["measurements"]) == n and body["next"] is None
    body = c.get("/api/v1/measurements", params={"limit": n - 1}).json()
    assert body["next"] is not None
    rest = c.get("/api/v1/measurements", params={"limit": n, "after": body["next"]}).json()
    assert len(rest["measurements"]) == 1 and rest["next"] is None


# -- aggregates ---------------------------------------------------------------------------


def expected_aggregates(ms: list[Measurement], keep: Any = lambda m: True) -> list[dict[str, Any]]:
    counts: collections.Counter[tuple[Any, ...]] = collections.Counter()
    for m in ms:
        if keep(m):
            key = (m.start_time.strftime("%Y-%m-%d"), m.target.service, m.vantage.cc,
                   m.vantage.asn, blocking_of(m))  # fmt: skip
            counts[key] += 1

    def sort_key(item: tuple[tuple[Any, ...], int]) -> tuple[Any, ...]:
        (day, service, cc, asn, blocking), _ = item
        # SQL orders the stored text: "false" among the kinds, NULL last.
        text = "false" if blocking is False else blocking
        return (day, service, cc, asn, text is None, text or "")

    return [
        {"day": day, "service": service, "cc": cc, "asn": asn, "blocking": blocking, "count": n}
        for (day, service, cc, asn, blocking), n in sorted(counts.items(), key=sort_key)
    ]


def test_aggregates_match_counts_computed_by_hand(seeded: Seeded) -> None:
    c = seeded.client
    got = c.get("/api/v1/aggregates").json()["aggregates"]
    assert got == expected_aggregates(seeded.ms)
    assert sum(a["count"] for a in got) == len(seeded.ms)
    assert {a["day"] for a in got} == {"2024-05-01", "2024-05-02", "2024-05-03", "2024-05-04",
                                       "2024-05-05"}  # the last microsecond before midnight, and midnight  # fmt: skip
    got = c.get("/api/v1/aggregates",
                params={"cc": "DE", "since": "2024-05-02", "blocking": "dns"}).json()["aggregates"]  # fmt: skip
    assert got == expected_aggregates(
        seeded.ms,
        lambda m: m.vantage.cc == "DE" and m.start_time >= DAY0 + dt.timedelta(days=1)
        and blocking_of(m) == "dns",
    )  # fmt: skip
    assert got


# -- events and probes -------------------------------------------------------------------


def seed_events(engine: sa.Engine) -> list[dict[str, Any]]:
    e = tables.events
    rows = [
        {"probe_id": PROBES[0][0], "asn": 64500, "cc": "DE", "service": "whatsapp",
         "status": "blocked", "blocking": ["dns"], "started_at": DAY0,
         "ended_at": DAY0 + dt.timedelta(days=1), "runs": ["a", "b", "c"]},
        {"probe_id": PROBES[0][0], "asn": 64500, "cc": "DE", "service": "whatsapp",
         "status": "partial", "blocking": ["tcp_ip"], "started_at": DAY0 + dt.timedelta(days=2),
         "ended_at": None, "runs": ["d", "e"]},
        {"probe_id": PROBES[2][0], "asn": 64502, "cc": "IR", "service": "signal",
         "status": "blocked", "blocking": ["dns", "tls"], "started_at": DAY0 + dt.timedelta(days=3),
         "ended_at": None, "runs": ["f", "g"]},
    ]  # fmt: skip
    with engine.begin() as conn:
        conn.execute(e.insert(), rows)
    return rows


def test_events_open_and_past_across_probes(seeded: Seeded) -> None:
    seed_events(seeded.engine)
    c = seeded.client
    opened = c.get("/api/v1/events", params={"open": "true"}).json()["events"]
    assert [(ev["service"], ev["probe_id"], ev["cc"], ev["asn"]) for ev in opened] == [
        ("signal", PROBES[2][0], "IR", 64502),  # newest first
        ("whatsapp", PROBES[0][0], "DE", 64500),
    ]
    assert opened[0]["blocking"] == ["dns", "tls"] and opened[0]["ended_at"] is None
    assert opened[0]["started_at"] == "2024-05-04T00:00:00Z"
    past = c.get("/api/v1/events", params={"open": "false"}).json()["events"]
    assert len(past) == 1 and past[0]["ended_at"] == "2024-05-02T00:00:00Z"
    assert past[0]["runs"] == ["a", "b", "c"]
    assert len(c.get("/api/v1/events").json()["events"]) == 3
    assert len(c.get("/api/v1/events", params={"cc": "de"}).json()["events"]) == 2
    assert (
        len(c.get("/api/v1/events", params={"service": "signal", "open": "true"}).json()["events"])
        == 1
    )
    # since/until: the events going on at some time in between.
    during = c.get("/api/v1/events", params={"since": "2024-05-03"}).json()["events"]
    assert sorted(ev["runs"][0] for ev in during) == ["d", "f"]  # the first one ended May 2
    before = c.get("/api/v1/events", params={"until": "2024-05-02"}).json()["events"]
    assert [ev["runs"][0] for ev in before] == ["a"]  # the others started on May 3 and 4
    r = c.get("/api/v1/events", params={"open": "maybe"})
    assert r.status_code == 422 and r.json()["error"].startswith("open:")


def test_probes_show_fleet_health(seeded: Seeded) -> None:
    now = dt.datetime.now(UTC).replace(microsecond=0)
    seed_probes(seeded.engine, now)
    got = seeded.client.get("/api/v1/probes").json()["probes"]
    assert [p["probe_id"] for p in got] == [PROBES[0][0], PROBES[2][0], PROBES[1][0],
                                           "44444444-4444-4444-8444-444444444444"]  # fmt: skip
    first, revoked, behind, never = got
    assert first["last_seen_at"] == (now - dt.timedelta(minutes=2)).isoformat().replace(
        "+00:00", "Z"
    )
    assert behind["backlog"] == 1234 and behind["asn"] == 64501 and behind["cc"] == "DE"
    assert revoked["revoked"] is True and revoked["revoked_at"] is not None
    assert first["revoked"] is False and never["last_seen_at"] is None
    assert "credential_hash" not in first
    r = seeded.client.get("/api/v1/probes", params={"cc": "DE"})
    assert r.status_code == 422 and r.json()["error"].startswith("cc:")


# -- bad and hostile parameters ----------------------------------------------------------

HOSTILE = ["' OR '1'='1", "x'; DROP TABLE measurements; --", '"; DELETE FROM runs; --', "%", "_",
           "whatsapp%", "whats_pp", "\\", "whatsapp\\", "\\%", "'", ";", "--", "/*", "\u00e9\u00e8"]  # fmt: skip


def counts(engine: sa.Engine) -> tuple[int, ...]:
    with engine.connect() as conn:
        return tuple(
            conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
            for t in (tables.measurements, tables.runs, tables.vantage_points, tables.events)
        )


def test_sql_metacharacters_in_every_filter_are_inert(seeded: Seeded) -> None:
    c = seeded.client
    seed_events(seeded.engine)
    before = counts(seeded.engine)
    for value in HOSTILE:
        for path in ("/api/v1/measurements", "/api/v1/aggregates", "/api/v1/events"):
            for name in ("service", "probe"):  # free text: compared exactly, so nothing matches
                r = c.get(path, params={name: value})
                assert r.status_code == 200, (path, name, value, r.text)
                assert not next(iter(r.json().values())), (path, name, value)
            names = ["since", "until", "cc", "asn", "limit"]
            names += ["blocking"] if path != "/api/v1/events" else ["open"]
            names += ["after"] if path == "/api/v1/measurements" else []
            for name in names:  # typed: refused, naming the parameter
                r = c.get(path, params={name: value})
                assert r.status_code == 422, (path, name, value, r.text)
                assert r.json()["error"].startswith(f"{name}:"), r.text
    # NUL never reaches the database (PostgreSQL would refuse it mid-query).
    for name in ("service", "probe", "cc", "since"):
        r = c.get("/api/v1/measurements", params={name: "whats\x00app"})
        assert r.status_code == 422 and r.json()["error"] == f"{name}: contains a NUL character"
    # A forged cursor carrying SQL is a value like any other.
    forged = query.encode_cursor(DAY0, "' OR '1'='1")
    body = c.get("/api/v1/measurements", params={"after": forged, "limit": 5}).json()
    assert [d["measurement_uid"] for d in body["measurements"]] == seeded.expected(
        lambda m: (m.start_time, m.measurement_uid) > (DAY0, "' OR '1'='1"))[:5]  # fmt: skip
    assert counts(seeded.engine) == before
    # The real values still work after all that.
    assert c.get("/api/v1/measurements", params={"service": "whatsapp", "limit": 1}).json()[
        "measurements"
    ]


@pytest.mark.parametrize(
    ("path", "params", "named"),
    [
        ("/api/v1/measurements", {"sevice": "whatsapp"}, "sevice"),
        ("/api/v1/measurements", [("service", "a"), ("service", "b")], "service"),
        ("/api/v1/measurements", {"since": "2024-05-03", "until": "2024-05-01"}, "until"),
        ("/api/v1/measurements", {"since": "2024-02-30"}, "since"),
        ("/api/v1/measurements", {"until": "yesterday"}, "until"),
        ("/api/v1/measurements", {"limit": "0"}, "limit"),
        ("/api/v1/measurements", {"limit": "ten"}, "limit"),
        ("/api/v1/measurements", {"after": "bm90IGEgY3Vyc29y"}, "after"),
        ("/api/v1/measurements", {"blocking": "censored"}, "blocking"),
        ("/api/v1/measurements", {"asn": "AS99999999999"}, "asn"),
        ("/api/v1/measurements", {"cc": "DEU"}, "cc"),
        ("/api/v1/measurements", {"service": " "}, "service"),
        ("/api/v1/measurements", {"probe": "x" * 201}, "probe"),
        ("/api/v1/aggregates", {"limit": "5"}, "limit"),
        ("/api/v1/events", {"blocking": "dns"}, "blocking"),
    ],
)
def test_bad_parameters_are_named(path: str, params: Any, named: str, tmp_path: Any) -> None:
    store = open_collector_db(f"sqlite:///{tmp_path / 'c.db'}")
    with TestClient(app_for(store.engine)) as c:
        r = c.get(path, params=params)
    store.close()
    assert r.status_code == 422
    assert r.json()["error"].startswith(f"{named}: "), r.text


def test_a_database_that_cannot_answer_is_a_503_not_a_crash(tmp_path: Any) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'empty.db'}")  # no tables at all
    with TestClient(app_for(engine)) as c:
        for path in ("/api/v1/measurements", "/api/v1/aggregates", "/api/v1/events",
                     "/api/v1/probes"):  # fmt: skip
            r = c.get(path)
            assert r.status_code == 503, path
            assert r.json()["error"].startswith("the database cannot answer: no such table")
    engine.dispose()


def test_parse_time_and_cursor_round_trip() -> None:
    assert query.parse_time("since", "2024-05-01") == DAY0
    assert query.parse_time("until", "2024-05-01", end=True) == DAY0 + dt.timedelta(days=1)
    assert query.parse_time("since", "2024-05-01T01:30:00+01:30") == DAY0
    when = DAY0 + dt.timedelta(microseconds=7)
    assert query.decode_cursor(query.encode_cursor(when, "u-1")) == (when, "u-1")
    with pytest.raises(query.BadParameter, match="^after: "):
        query.decode_cursor("W10")  # "[]"


# -- what the public sees (issue 18, item 10) ----------------------------------------------


def test_the_public_sees_probes_only_by_their_pseudonyms(seeded: Seeded, tmp_path: Path) -> None:
    from probe.export.pseudonym import Pseudonymizer

    key = tmp_path / "pseudonym.key"
    public = TestClient(app_for(seeded.engine, str(key)))
    p = Pseudonymizer.from_key_file(key)
    real = PROBES[2][0]
    docs = public.get("/api/v1/measurements", params={"limit": 1000}).json()["measurements"]
    assert docs and {d["probe_id"] for d in docs} <= {p(pid) for pid, *_ in PROBES}
    mine = public.get("/api/v1/measurements", params={"probe": p(real), "limit": 1000})
    assert [d["measurement_uid"] for d in mine.json()["measurements"]] == seeded.expected(
        lambda m: m.vantage.probe_id == real
    )[:1000]
    # A real id given by the public matches nothing: it cannot confirm a guess.
    guess = public.get("/api/v1/measurements", params={"probe": real}).json()
    assert guess["measurements"] == []
    seed_probes(seeded.engine, dt.datetime.now(dt.UTC))
    listed = public.get("/api/v1/probes").json()["probes"]
    assert {x["probe_id"] for x in listed} <= {p(pid) for pid in [*(q[0] for q in PROBES),
                                                                   "44444444-4444-4444-8444-444444444444"]}  # fmt: skip
    assert real not in public.get("/api/v1/probes").text
    # Without a pseudonym key the public sees no probe ids at all.
    anonymous = TestClient(app_for(seeded.engine))
    docs = anonymous.get("/api/v1/measurements", params={"limit": 5}).json()["measurements"]
    assert {d["probe_id"] for d in docs} == {None}
    r = anonymous.get("/api/v1/measurements", params={"probe": real})
    assert r.status_code == 422 and r.json()["error"].startswith("probe:")
