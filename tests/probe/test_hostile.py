"""The engine against hostile servers: compression bombs, redirects off the measured
path, IDN names, loose DNS answers, truncated UDP replies, odd catalog values and a
run stopped at the worst moment.

Every server here is a small asyncio server on 127.0.0.0/8 written for one misdeed
(or the shared loopback fixtures); nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import ipaddress
import ssl
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import dns.flags
import dns.message
import dns.rrset
import httpx
import pytest

from probe.engine import dns as dnsstep
from probe.engine.content import BodyDecoder
from probe.engine.context import EngineContext
from probe.engine.dns import ResolverSpec
from probe.engine.http import BODY_ENCODING_NOTE, PinnedTransport
from probe.engine.run import Run
from probe.engine.trace import Trace
from schema.model import Measurement, Target, is_failure_string
from tests.conftest import VALID, VANTAGE, http_target, run_measure
from tests.fixtures import Certs, DNSServer, WebServer, closed_port
from tests.fixtures._base import LoopThreadServer, shielded_handler

LOOPBACK_1 = (ipaddress.ip_network("127.0.0.1/32"),)  # only 127.0.0.1 counts as public

# -- servers ----------------------------------------------------------------------

Route = bytes | Callable[["RawHTTP"], bytes]


class RawHTTP(LoopThreadServer):
    """Answers each request with the bytes routed for its path, then closes.

    Logs every accepted connection and every request head, so a test can tell that
    nothing at all reached it.
    """

    def __init__(
        self,
        routes: dict[str, Route],
        host: str = "127.0.0.1",
        ssl_context: ssl.SSLContext | None = None,
        hold: bool = False,
    ) -> None:
        super().__init__(host)
        self.routes = routes
        self.hold = hold  # keep the connection open after the response (a body "to come")
        self.ssl_context = ssl_context
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._server: asyncio.Server | None = None

    async def _astart(self) -> None:
        self._server = await asyncio.start_server(
            shielded_handler(self._handle), self.host, 0, ssl=self.ssl_context
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _astop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        path = lines[0].split(" ")[1]
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            await reader.readexactly(int(headers["content-length"]))
        self.requests.append((path, headers))
        route = self.routes.get(path, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        writer.write(route(self) if callable(route) else route)
        try:
            await writer.drain()
            if self.hold:
                await reader.read()  # until the client gives up
        except ConnectionError:
            pass
        writer.close()

    @property
    def paths(self) -> list[str]:
        return [p for p, _ in self.requests]


def response(body: bytes, status: str = "200 OK", **headers: str) -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}"]
    head += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def redirect(location: str) -> bytes:
    return response(b"", "302 Found", Location=location)


Answerer = Callable[[dns.message.Message], dns.message.Message]


class _Datagram(asyncio.DatagramProtocol):
    def __init__(self, answer: Answerer) -> None:
        self.answer = answer
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        reply = self.answer(dns.message.from_wire(data))
        assert self.transport is not None
        self.transport.sendto(reply.to_wire(max_size=65535), addr)


class ScriptedDNS(LoopThreadServer):
    """UDP only: each query is answered by ``answer(query)``; no TCP listener."""

    def __init__(self, answer: Answerer, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self.answer = answer
        self.count = 0
        self._transport: asyncio.BaseTransport | None = None

    def _counted(self, q: dns.message.Message) -> dns.message.Message:
        self.count += 1
        return self.answer(q)

    async def _astart(self) -> None:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _Datagram(self._counted), local_addr=(self.host, 0)
        )
        self.port = self._transport.get_extra_info("sockname")[1]

    async def _astop(self) -> None:
        if self._transport is not None:
            self._transport.close()

    @property
    def spec(self) -> ResolverSpec:
        return ResolverSpec("udp", self.host, self.port, system=True)


def _resolve(name: str, ctx: EngineContext, qtypes: tuple[str, ...] = ("A",)) -> list:
    return asyncio.run(dnsstep.resolve(name, ctx, Trace(), query_types=qtypes))


# -- 1. compressed bodies -----------------------------------------------------------


def _gzip_bomb(decoded_mib: int) -> bytes:
    """A gzip body of ``decoded_mib`` MiB of zeros, built without holding them."""
    z = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    block = bytes(1 << 20)
    return b"".join([*(z.compress(block) for _ in range(decoded_mib)), z.flush()])


def test_gzip_bomb_is_decoded_only_up_to_the_read_limit(make_ctx) -> None:
    bomb = _gzip_bomb(256)  # ~256 KiB on the wire, 256 MiB decoded
    limit = 1 << 20
    ctx = make_ctx(body_read_limit=limit, body_keep=4096)
    with RawHTTP({"/bomb": response(bomb, Content_Encoding="gzip")}) as srv:
        tracemalloc.start()
        try:
            m = run_measure(http_target(f"http://127.0.0.1:{srv.port}/bomb"), ctx)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    (r,) = m.requests
    assert r.failure is None and r.status == 200
    assert r.body_length == limit and r.body_is_truncated
    assert r.body == bytes(4096)
    assert r.body_sha256 == hashlib.sha256(bytes(limit)).hexdigest()
    # Decoding a whole 64 KiB chunk of this bomb at once would allocate ~64 MiB.
    assert peak < 24 * (1 << 20), f"peak allocation {peak / (1 << 20):.0f} MiB"


@pytest.mark.parametrize(
    ("coding", "encode"),
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("deflate", zlib.compress),  # what HTTP means by deflate: zlib format
        ("deflate", lambda b: zlib.compress(b, wbits=-15)),  # raw deflate, also seen
        ("identity", lambda b: b),
    ],
)
def test_single_codings_are_decoded(make_ctx, coding: str, encode: Callable) -> None:
    text = b"<html>" + b"hello, decoded world " * 5000 + b"</html>"
    ctx = make_ctx()
    with RawHTTP({"/": response(encode(text), Content_Encoding=coding)}) as srv:
        m = run_measure(http_target(f"http://127.0.0.1:{srv.port}/"), ctx)
    (r,) = m.requests
    assert r.failure is None
    assert r.body == text[: ctx.body_keep] and r.body_length == len(text)
    assert r.body_sha256 == hashlib.sha256(text).hexdigest()
    assert BODY_ENCODING_NOTE not in m.annotations


def test_multi_member_gzip_is_decoded_whole() -> None:
    d = BodyDecoder("gzip")
    assert d.decode(gzip.compress(b"one ") + gzip.compress(b"two"), 100) == b"one two"


def test_stacked_codings_are_kept_raw_and_noted(make_ctx) -> None:
    # The reviewer's bomb: 1 GiB of zeros gzipped twice is under 2 KB on the wire.
    payload = gzip.compress(_gzip_bomb(64), 9)
    ctx = make_ctx()
    with RawHTTP({"/": response(payload, Content_Encoding="gzip, gzip")}) as srv:
        m = run_measure(http_target(f"http://127.0.0.1:{srv.port}/"), ctx)
    (r,) = m.requests
    assert r.failure is None
    assert r.body == payload[: ctx.body_keep] and r.body_length == len(payload)
    assert r.body_sha256 == hashlib.sha256(payload).hexdigest()
    assert "stacked" in m.annotations[BODY_ENCODING_NOTE]
    assert f"127.0.0.1:{srv.port}" in m.annotations[BODY_ENCODING_NOTE]


def test_unknown_coding_is_kept_raw_and_noted(make_ctx) -> None:
    with RawHTTP({"/": response(b"\x0b\x02\x80hi\x03", Content_Encoding="br")}) as srv:
        m = run_measure(http_target(f"http://127.0.0.1:{srv.port}/"), make_ctx())
    (r,) = m.requests
    assert r.failure is None and r.body == b"\x0b\x02\x80hi\x03" and r.body_length == 6
    assert "'br' not decoded" in m.annotations[BODY_ENCODING_NOTE]


def test_corrupt_gzip_is_an_http_failure(make_ctx) -> None:
    with RawHTTP({"/": response(b"not gzip at all", Content_Encoding="gzip")}) as srv:
        m = run_measure(http_target(f"http://127.0.0.1:{srv.port}/"), make_ctx())
    (r,) = m.requests
    assert r.status == 200 and (r.failure, r.failed_operation) == ("http_request_failed", "read")


def test_raw_bytes_read_are_capped_too(make_ctx) -> None:
    # A body that decodes to little but is long on the wire: reading stops at the cap.
    member = gzip.compress(b"x")
    payload = member * 20000  # ~420 KB of gzip members
    ctx = make_ctx(body_read_limit=64 * 1024)
    with RawHTTP({"/": response(payload, Content_Encoding="gzip")}) as srv:
        m = run_measure(http_target(f"http://127.0.0.1:{srv.port}/"), ctx)
    (r,) = m.requests
    assert r.failure is None and r.body_is_truncated
    assert 0 < r.body_length <= 64 * 1024 // len(member) + 1
    assert r.body == b"x" * r.body_length


def _doh_server(certs: Certs, body: bytes, **headers: str) -> RawHTTP:
    # The server announces 1 GB and sends only ``body``: the engine must stop on its own.
    head = [
        "HTTP/1.1 200 OK",
        "Content-Type: application/dns-message",
        "Content-Length: 1000000000",
    ]
    head += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    route = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    return RawHTTP({"/dns-query": route}, ssl_context=certs.valid("127.0.0.1"), hold=True)


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (bytes(200_000), {}),  # far more than any DNS message
        (gzip.compress(bytes(10 << 20)), {"Content_Encoding": "gzip"}),  # decodes huge
        (b"\x00\x01", {"Content_Encoding": "gzip, br"}),  # cannot be decoded
    ],
    ids=["oversize", "gzip-bomb", "stacked-codings"],
)
def test_doh_reply_is_bounded(certs: Certs, make_ctx, body: bytes, headers: dict) -> None:
    with _doh_server(certs, body, **headers) as doh:
        ctx = make_ctx(resolvers=[ResolverSpec.parse(f"https://127.0.0.1:{doh.port}/dns-query")])

        async def go() -> list:
            async with httpx.AsyncClient(verify=ctx.ssl_context("http")) as client:
                return await dnsstep.resolve("doh.test", ctx, Trace(), client, ("A",))

        (q,) = asyncio.run(go())
    # Refused once 64 KiB are in, well before the DNS timeout would end the wait.
    assert (q.failure, q.failed_operation) == ("dns_server_misbehaving", "resolve")
    assert q.t - q.t0 < ctx.timeouts.dns / 2


# -- 2. redirects stay on the measured path -----------------------------------------


def test_redirect_to_a_private_ip_literal_is_refused(make_ctx) -> None:
    with RawHTTP({"/secret": response(b"router admin: secret123")}, host="127.0.0.2") as lan:
        hop = redirect(f"http://127.0.0.2:{lan.port}/secret")
        with RawHTTP({"/lan": hop}) as srv:
            ctx = make_ctx(public_ranges=LOOPBACK_1)
            m = run_measure(http_target(f"http://127.0.0.1:{srv.port}/lan"), ctx)
    first, refused = m.requests
    assert first.status == 302 and first.failure is None
    assert refused.url == f"http://127.0.0.2:{lan.port}/secret"
    assert (refused.failure, refused.failed_operation) == ("dns_bogon_error", "resolve")
    assert refused.status is None and refused.body == b"" and refused.address is None
    assert lan.connections == 0  # nothing was sent to the LAN address
    assert m.queries == []  # an IP literal needs no DNS


def test_redirect_to_a_name_with_a_private_answer_is_refused(dns_server, make_ctx) -> None:
    dns_server.set("lan.test", a=["127.0.0.2"])
    with RawHTTP({"/secret": response(b"router admin")}, host="127.0.0.2") as lan:
        with RawHTTP({"/lan": redirect(f"http://lan.test:{lan.port}/secret")}) as srv:
            ctx = make_ctx(public_ranges=LOOPBACK_1)
            m = run_measure(http_target(f"http://127.0.0.1:{srv.port}/lan"), ctx)
    assert [(r.status, r.failure) for r in m.requests] == [(302, None), (None, "dns_bogon_error")]
    assert m.requests[1].failed_operation == "resolve"
    assert lan.connections == 0
    # The engine's own resolver was asked, and its answer is kept as evidence.
    assert {(q.hostname, q.query_type) for q in m.queries} == {
        ("lan.test", "A"),
        ("lan.test", "AAAA"),
    }
    (a,) = [q for q in m.queries if q.query_type == "A"]
    assert a.failure == "dns_bogon_error" and a.addresses() == ["127.0.0.2"]
    assert ("lan.test", "A", "udp") in dns_server.queries


def test_redirect_never_uses_the_system_resolver(dns_server, ctx) -> None:
    # "localhost" resolves through /etc/hosts; the engine's resolver does not know it.
    with RawHTTP({}) as target:
        hop = redirect(f"http://localhost:{target.port}/secret")
        with RawHTTP({"/name": hop}) as srv:
            m = run_measure(http_target(f"http://127.0.0.1:{srv.port}/name"), ctx)
    assert [(r.status, r.failure) for r in m.requests] == [
        (302, None),
        (None, "dns_nxdomain_error"),
    ]
    assert m.requests[1].failed_operation == "resolve"
    assert target.connections == 0 and srv.paths == ["/name"]
    assert {q.hostname for q in m.queries} == {"localhost"}


def test_redirect_to_another_name_is_resolved_and_followed(dns_server, ctx) -> None:
    dns_server.set("other.test", a=["127.0.0.3"])
    with RawHTTP({"/landing": response(b"other site")}, host="127.0.0.3") as other:
        with RawHTTP({"/": redirect(f"http://other.test:{other.port}/landing")}) as srv:
            m = run_measure(http_target(f"http://127.0.0.1:{srv.port}/"), ctx)
    first, second = m.requests
    assert first.status == 302
    assert second.failure is None and second.status == 200 and second.body == b"other site"
    assert second.address == "127.0.0.3"
    assert other.requests[0][1]["host"] == f"other.test:{other.port}"
    assert [q.hostname for q in m.queries] == ["other.test", "other.test"]
    assert all(q.t0 >= first.t for q in m.queries)
    assert ("other.test", "A", "udp") in dns_server.queries


def test_redirect_to_the_same_name_keeps_the_measured_address(
    dns_server: DNSServer, web: WebServer, ctx
) -> None:
    dns_server.set(VALID, a=["127.0.0.1"])
    m = run_measure(http_target(f"https://{VALID}:{web.port}/redirect/1"), ctx)
    assert [r.status for r in m.requests] == [302, 302, 200]
    assert len(m.queries) == 2  # the target's own A and AAAA: no new resolution


@pytest.mark.parametrize(
    "location", ["http://[::1", "http://a:99999/", "ftp://127.0.0.1/x", "mailto:x@example.com"]
)
def test_invalid_location_keeps_the_redirect_response(ctx, location: str) -> None:
    with RawHTTP({"/": redirect(location)}) as srv:
        m = run_measure(http_target(f"http://127.0.0.1:{srv.port}/"), ctx)
    (r,) = m.requests
    assert r.status == 302 and ("Location", location) in r.response_headers
    assert (r.failure, r.failed_operation) == ("http_request_failed", "http_round_trip")
    assert m.failure() == "http_request_failed"


def test_backend_refuses_hosts_without_a_pin(ctx) -> None:
    with RawHTTP({"/": response(b"ok")}) as srv:

        async def go() -> None:
            transport = PinnedTransport({}, ctx.ssl_context("http"))
            try:
                request = httpx.Request("GET", f"http://127.0.0.1:{srv.port}/")
                with pytest.raises(httpx.ConnectError, match="no measured address"):
                    await transport.handle_async_request(request)
            finally:
                await transport.aclose()

        asyncio.run(go())
        assert srv.connections == 0


# -- 3. IDN hosts ---------------------------------------------------------------------


def test_idn_host_goes_to_the_measured_address(dns_server, ctx) -> None:
    with RawHTTP({"/idn": response(b"hello")}) as srv:
        t = http_target(f"http://bücher.test:{srv.port}/idn", addresses=("127.0.0.1",))
        m = run_measure(t, ctx)  # DNS knows no such name: only the catalog's address
    (r,) = m.requests
    assert r.failure is None and r.status == 200 and r.body == b"hello"
    assert r.address == "127.0.0.1"
    assert srv.requests[0][1]["host"] == f"xn--bcher-kva.test:{srv.port}"
    assert {q.failure for q in m.queries} == {"dns_nxdomain_error"}  # the target's own


# -- 4. DNS answers -------------------------------------------------------------------


def _reply(q: dns.message.Message, *records: tuple[str, str, str]) -> dns.message.Message:
    r = dns.message.make_response(q)
    for name, rtype, value in records:
        r.answer.append(dns.rrset.from_text(name, 60, "IN", rtype, value))
    return r


def test_unrelated_records_are_ignored(make_ctx) -> None:
    def answer(q: dns.message.Message) -> dns.message.Message:
        return _reply(
            q,
            ("www.test.", "CNAME", "cdn.test."),
            ("evil.test.", "A", "127.0.0.66"),  # not on the chain
            ("cdn.test.", "A", "127.0.0.20"),
            ("www.test.", "AAAA", "::1"),  # not the queried type
            ("other.test.", "CNAME", "evil.test."),
        )

    with ScriptedDNS(answer) as server:
        (q,) = _resolve("www.test", make_ctx(resolvers=[server.spec], public_ranges=LOOPBACK_1))
    assert [(a.answer_type, a.value) for a in q.answers] == [
        ("CNAME", "cdn.test"),
        ("A", "127.0.0.20"),
    ]
    # 127.0.0.20 is a bogon here; the unrelated 127.0.0.66 plays no part in that.
    assert q.failure == "dns_bogon_error"
    assert b"evil" in (q.raw_response or b"")  # the whole reply is kept as evidence


def test_only_unrelated_records_is_no_answer(ctx) -> None:
    def answer(q: dns.message.Message) -> dns.message.Message:
        return _reply(q, ("evil.test.", "A", "127.0.0.66"))

    with ScriptedDNS(answer) as server:
        ctx.resolvers = [server.spec]
        (q,) = _resolve("www.test", ctx)
    assert q.failure == "dns_no_answer" and q.answers == []


@pytest.mark.parametrize(
    "records",
    [
        [("a.test.", "CNAME", "b.test."), ("b.test.", "CNAME", "a.test.")],  # a loop
        [(f"{'c' * i}a.test.", "CNAME", f"{'c' * (i + 1)}a.test.") for i in range(12)]
        + [(f"{'c' * 12}a.test.", "A", "127.0.0.9")],  # longer than the 8 followed
    ],
)
def test_cname_chains_are_bounded(ctx, records: list) -> None:
    with ScriptedDNS(lambda q: _reply(q, *records)) as server:
        ctx.resolvers = [server.spec]
        (q,) = _resolve("a.test", ctx)
    assert q.failure == "dns_no_answer"
    assert {a.answer_type for a in q.answers} == {"CNAME"}
    assert len(q.answers) <= 8


def test_truncated_udp_reply_is_retried_over_tcp(dns_server: DNSServer, ctx) -> None:
    many = [f"127.0.1.{i}" for i in range(1, 61)]  # too big for 512 bytes of UDP
    dns_server.set("big.test", a=many)
    (q,) = _resolve("big.test", ctx)
    assert q.failure is None and q.engine == "udp"
    assert sorted(q.addresses()) == sorted(many)
    assert [t for n, _, t in dns_server.queries if n == "big.test"] == ["udp", "tcp"]
    reply = dns.message.from_wire(q.raw_response or b"")
    assert not reply.flags & dns.flags.TC  # the evidence is the TCP reply


def test_truncated_reply_without_tcp_is_a_tcp_failure_not_no_answer(ctx) -> None:
    def truncated(q: dns.message.Message) -> dns.message.Message:
        r = dns.message.make_response(q)
        r.flags |= dns.flags.TC
        return r

    with ScriptedDNS(truncated) as server:  # nothing listens on its TCP port
        ctx.resolvers = [server.spec]
        (q,) = _resolve("tc.test", ctx)
    assert server.count == 1
    assert (q.failure, q.failed_operation) == ("connection_refused", "resolve")


# -- 5. stopping a run at the wrong moment --------------------------------------------


def _tcp_targets(n: int) -> list[Target]:
    port = closed_port()
    return [Target(id=f"t{i}", service="s", kind="tcp", host="127.0.0.1", ports=(port,))
            for i in range(n)]  # fmt: skip


def _execute(run: Run, **kw: Any) -> tuple[Any, list[Measurement]]:
    done: list[Measurement] = []

    async def sink(m: Measurement) -> None:
        done.append(m)

    return asyncio.run(run.execute(sink, **kw)), done


@pytest.mark.parametrize("attempt", range(5))
def test_tiny_deadline_completes_as_deadline(ctx, attempt: int) -> None:
    targets = _tcp_targets(6)
    run = Run(targets, VANTAGE, ctx, concurrency=3, deadline=1e-6)
    outcome, done = _execute(run)
    assert outcome.status == "deadline"
    assert outcome.measured == len(done)
    assert outcome.measured + outcome.skipped == len(targets)


def test_stop_before_a_measurement_begins_counts_it_skipped(ctx) -> None:
    targets = _tcp_targets(4)
    run = Run(targets, VANTAGE, ctx, concurrency=2, deadline=None)

    def on_start(target: Target) -> None:
        # Runs before the measurement task first runs: stop() cancels it unstarted.
        asyncio.get_running_loop().call_soon(run.stop, "deadline")

    outcome, done = _execute(run, on_start=on_start)
    assert outcome.status == "deadline"
    assert done == [] and outcome.measured == 0 and outcome.skipped == len(targets)


# -- 6. catalog values the steps could not use ----------------------------------------


def test_bad_ca_file_is_a_failure_not_a_crash(web: WebServer, ctx, tmp_path: Path) -> None:
    bad = tmp_path / "not-a-cert.pem"
    bad.write_text("hello\n")
    t = Target(id="c", service="s", kind="tls", host="127.0.0.1", ports=(web.port,),
               sni=VALID, ca_file=str(bad))  # fmt: skip
    m = run_measure(t, ctx)
    (h,) = m.tls_handshakes
    assert h.failure is not None and h.failure.startswith("unknown_failure: ")
    assert "CA" in h.failure and str(bad) in h.failure
    assert is_failure_string(h.failure) and h.failed_operation == "tls_handshake"
    assert "error" not in m.annotations


def test_bad_ca_file_for_http_is_a_failure_not_a_crash(ctx, tmp_path: Path) -> None:
    bad = tmp_path / "not-a-cert.pem"
    bad.write_text("hello\n")
    with RawHTTP({"/": response(b"ok")}) as srv:
        m = run_measure(http_target(f"http://127.0.0.1:{srv.port}/", ca_file=str(bad)), ctx)
    (r,) = m.requests
    assert r.failure is not None and r.failure.startswith("unknown_failure: ")
    assert srv.requests == [] and "error" not in m.annotations


def test_label_too_long_is_a_failure_not_a_crash(ctx) -> None:
    t = Target(id="d", service="s", kind="dns", host="a" * 70 + ".test")
    m = run_measure(t, ctx)
    assert len(m.queries) == 2
    for q in m.queries:
        assert q.failure is not None and q.failure.startswith("unknown_failure: ")
        assert "LabelTooLong" in q.failure and q.failed_operation == "resolve"
    assert "error" not in m.annotations


def test_bad_sni_is_a_failure_not_a_crash(web: WebServer, ctx) -> None:
    t = Target(id="s", service="s", kind="tls", host="127.0.0.1", ports=(web.port,),
               sni=".example.com")  # fmt: skip
    m = run_measure(t, ctx)
    (h,) = m.tls_handshakes
    assert h.failure is not None and h.failure.startswith("unknown_failure: ")
    assert ".example.com" in h.failure and h.peer_certificates == []
    assert "error" not in m.annotations


def test_anything_else_is_kept_as_an_error_annotation(ctx) -> None:
    # A port out of range fails while working out what to measure, outside any step.
    m = run_measure(http_target("http://127.0.0.1:99999/"), ctx)
    assert m.annotations["error"].startswith("ValueError: ")
    assert m.test_runtime >= 0


def test_a_broken_target_does_not_stop_the_run(web: WebServer, ctx) -> None:
    targets = [
        http_target("http://127.0.0.1:99999/"),
        Target(id="ok", service="s", kind="tls", host="127.0.0.1", ports=(web.port,), sni=VALID),
    ]
    outcome, done = _execute(Run(targets, VANTAGE, ctx, concurrency=2))
    assert outcome.status == "complete" and outcome.measured == 2
    ok = next(m for m in done if m.target.id == "ok")
    assert ok.tls_handshakes[0].failure is None


def test_a_lost_udp_query_is_sent_again(make_ctx) -> None:
    """Like a stub resolver, the engine resends a query whose datagram was lost."""
    import socket
    import threading

    import dns.message

    from probe.engine.context import Timeouts

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    seen: list[int] = []

    def serve() -> None:
        for _ in range(2):  # the first copy is "lost"; the second is answered
            data, peer = sock.recvfrom(4096)
            seen.append(len(data))
            if len(seen) == 2:
                reply = dns.message.make_response(dns.message.from_wire(data))
                reply.answer.append(dns.rrset.from_text("lost.test.", 60, "IN", "A", "127.0.0.9"))
                sock.sendto(reply.to_wire(), peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    from probe.engine.dns import ResolverSpec, query
    from probe.engine.trace import Trace

    ctx = make_ctx(resolvers=[ResolverSpec("udp", "127.0.0.1", sock.getsockname()[1])],
                   timeouts=Timeouts(dns=1.5, tcp=1, tls=1, http=1))  # fmt: skip
    obs = asyncio.run(query("lost.test", "A", ctx.resolvers[0], ctx, Trace()))
    thread.join(5)
    sock.close()
    assert obs.failure is None and obs.addresses() == ["127.0.0.9"]
    assert len(seen) == 2 and 0.4 < obs.t - obs.t0 < 1.5  # answered after one resend
