"""Server building blocks shared by the lab's Internet agent and the loopback test fixtures.

DNS answers come from a zone through dnspython; HTTP is a minimal HTTP/1.1 server on
asyncio streams. Both are hand-written (no framework) so servers can be made to
misbehave at the byte level, and so the lab and the fixtures answer identically.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ssl
import struct
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset

# --------------------------------------------------------------------------- DNS

GARBAGE = b"\x00\x01garbage"
"""What a ``garbage=True`` name is answered with: not parseable as DNS."""

RCODES = ("NOERROR", "NXDOMAIN", "SERVFAIL", "REFUSED", "FORMERR", "NOTIMP")


@dataclass
class Behaviour:
    """How a server answers one name; precedence: drop > garbage > rcode > records."""

    a: list[str] = field(default_factory=list)
    aaaa: list[str] = field(default_factory=list)
    ttl: int = 300
    rcode: str | None = None
    drop: bool = False
    garbage: bool = False
    delay: float = 0.0
    txt: list[str] = field(default_factory=list)


Zone = dict[str, Behaviour]
Finder = Callable[[str], Behaviour | None]
"""Maps a normalised query name to its Behaviour (None = NXDOMAIN)."""


@dataclass(frozen=True)
class Reply:
    """Outcome of answering one query: what to send (None = stay silent) and when."""

    name: str
    rdtype: str
    wire: bytes | None
    delay: float = 0.0
    malformed: bool = False


def normalise_name(name: str) -> str:
    """Lower-case and drop the trailing dot, so "A.test." and "a.test" are one key."""
    return name.strip().lower().rstrip(".")


def lookup(zone: Zone, name: str, default: Behaviour | None = None) -> Behaviour | None:
    """Find the Behaviour for ``name`` whatever form the zone key was written in."""
    key = normalise_name(name)
    found = zone.get(key)
    if found is None:
        found = zone.get(key + ".")
    if found is None:
        for other, behaviour in list(zone.items()):
            if normalise_name(other) == key:
                return behaviour
        return default
    return found


def _txt_rdata(text: str) -> dns.rdata.Rdata:
    raw = text.encode()
    chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
    return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, chunks)


def _records(qname: dns.name.Name, rdtype: int, behaviour: Behaviour) -> list[dns.rrset.RRset]:
    """RRsets of ``rdtype`` (or all, for ANY) that ``behaviour`` holds."""
    out: list[dns.rrset.RRset] = []
    want_any = rdtype == dns.rdatatype.ANY
    if (want_any or rdtype == dns.rdatatype.A) and behaviour.a:
        out.append(dns.rrset.from_text_list(qname, behaviour.ttl, "IN", "A", list(behaviour.a)))
    if (want_any or rdtype == dns.rdatatype.AAAA) and behaviour.aaaa:
        out.append(
            dns.rrset.from_text_list(qname, behaviour.ttl, "IN", "AAAA", list(behaviour.aaaa))
        )
    if (want_any or rdtype == dns.rdatatype.TXT) and behaviour.txt:
        out.append(
            dns.rrset.from_rdata_list(qname, behaviour.ttl, [_txt_rdata(t) for t in behaviour.txt])
        )
    return out


def build_response(query: dns.message.Message, behaviour: Behaviour | None) -> dns.message.Message:
    """Response to ``query`` per ``behaviour`` (None = not in zone = NXDOMAIN).

    Ignores drop/garbage/delay, which are transport matters (see answer_wire).
    """
    response = dns.message.make_response(query)
    response.flags |= dns.flags.RA
    if not query.question:
        response.set_rcode(dns.rcode.FORMERR)
        return response
    if behaviour is None:
        response.set_rcode(dns.rcode.NXDOMAIN)
        return response
    if behaviour.rcode is not None:
        response.set_rcode(dns.rcode.from_text(behaviour.rcode.upper()))
        return response
    question = query.question[0]
    response.answer.extend(_records(question.name, question.rdtype, behaviour))
    return response


def _formerr(wire: bytes) -> bytes | None:
    """Minimal FORMERR header echoing the ID of an unparseable query (if it has one)."""
    if len(wire) < 12:
        return None
    (qid,) = struct.unpack("!H", wire[:2])
    return struct.pack("!HHHHHH", qid, 0x8000 | dns.rcode.FORMERR, 0, 0, 0, 0)


def answer_wire(
    wire: bytes,
    zone: Zone,
    default: Behaviour | None = None,
    *,
    udp: bool = False,
    find: Finder | None = None,
) -> Reply:
    """Answer one wire-format query from ``zone``: the single shared answering path.

    ``find`` (if given) replaces the zone lookup, for callers with their own name
    matching. With ``udp`` the reply is truncated (TC bit) if it exceeds the
    client's advertised size.
    """
    try:
        query = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError, IndexError, struct.error):
        return Reply(name="", rdtype="", wire=_formerr(wire), malformed=True)
    if query.question:
        question = query.question[0]
        name = normalise_name(question.name.to_text())
        rdtype = dns.rdatatype.to_text(question.rdtype)
    else:
        name, rdtype = "", ""
    behaviour: Behaviour | None = None
    if query.question:
        behaviour = find(name) if find is not None else lookup(zone, name, default)
    delay = behaviour.delay if behaviour is not None else 0.0
    if behaviour is not None and behaviour.drop:
        return Reply(name, rdtype, None, delay)
    if behaviour is not None and behaviour.garbage:
        return Reply(name, rdtype, GARBAGE, delay)
    response = build_response(query, behaviour)
    max_size = 65535
    if udp:
        max_size = max(512, query.payload) if query.edns >= 0 else 512
    try:
        out = response.to_wire(max_size=max_size)
    except dns.exception.TooBig:
        response.answer.clear()
        response.flags |= dns.flags.TC
        out = response.to_wire(max_size=max_size)
    return Reply(name, rdtype, out, delay)


Answerer = Callable[[bytes], Reply]
Spawner = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


class DNSDatagramProtocol(asyncio.DatagramProtocol):
    """UDP DNS: answers each datagram via ``answer``; delayed replies use call_later."""

    def __init__(self, answer: Answerer) -> None:
        self.answer = answer
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's UDP transport doesn't subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        transport = self.transport
        if transport is None:
            return
        reply = self.answer(data)
        if reply.wire is None:
            return
        if reply.delay > 0:
            asyncio.get_running_loop().call_later(
                reply.delay, _sendto_if_open, transport, reply.wire, addr
            )
        else:
            transport.sendto(reply.wire, addr)

    def error_received(self, exc: Exception) -> None:
        """ICMP errors from clients that went away are irrelevant here."""


def _sendto_if_open(
    transport: asyncio.DatagramTransport, wire: bytes, addr: tuple[Any, ...]
) -> None:
    if not transport.is_closing():
        transport.sendto(wire, addr)


async def serve_dns_stream(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    answer: Answerer,
    spawn: Spawner,
) -> None:
    """Serve length-prefixed DNS over TCP; delayed answers get their own task (they overlap).

    ``spawn`` creates those tasks, so the owner can cancel them at shutdown.
    """
    delayed: list[asyncio.Task[None]] = []
    try:
        while True:
            try:
                header = await reader.readexactly(2)
                (length,) = struct.unpack("!H", header)
                wire = await reader.readexactly(length)
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            reply = answer(wire)
            if reply.wire is None:
                continue
            if reply.delay > 0:
                delayed.append(spawn(_send_dns_later(writer, reply)))
            else:
                writer.write(struct.pack("!H", len(reply.wire)) + reply.wire)
        # Peer half-closed: still deliver answers that are waiting out a delay.
        if delayed:
            await asyncio.wait(delayed)
    finally:
        writer.close()


async def _send_dns_later(writer: asyncio.StreamWriter, reply: Reply) -> None:
    await asyncio.sleep(reply.delay)
    if reply.wire is not None and not writer.is_closing():
        writer.write(struct.pack("!H", len(reply.wire)) + reply.wire)


# -------------------------------------------------------------------------- HTTP

DNS_MESSAGE = "application/dns-message"
BLOCK_PAGE = (
    b"<!doctype html>\n<html><head><title>Access denied</title></head>\n"
    b"<body><h1>Access denied</h1>"
    b"<p>This site has been blocked by order of the authorities</p></body></html>\n"
)
"""The page a censor's blockpage server shows instead of the real site."""
BLOCK_SERVER_HEADER = "Protected by WireFilter"
PATTERN_CHUNK = bytes(range(256)) * 256
"""64 KiB of the deterministic body pattern: body byte i is i % 256."""
NO_BODY_STATUSES = frozenset({204, 304})


def pattern_body(size: int) -> bytes:
    """The first ``size`` bytes of the pattern ``stream_pattern`` sends, for comparisons."""
    return (PATTERN_CHUNK * (size // len(PATTERN_CHUNK) + 1))[:size]


class BadRequest(Exception):
    """Raised while parsing a request the server answers with 400 and closes."""


@dataclass
class Request:
    """A parsed request; ``headers`` keeps the order and case the client sent."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    @property
    def path(self) -> str:
        """Target without the query string."""
        return urlsplit(self.target).path or "/"

    @property
    def query(self) -> dict[str, str]:
        """Query parameters (first value of each)."""
        return {k: v[0] for k, v in parse_qs(urlsplit(self.target).query).items()}

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), or None."""
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

    @property
    def keep_alive(self) -> bool:
        """HTTP/1.1 keeps the connection unless "close"; HTTP/1.0 only with "keep-alive"."""
        tokens = {t.strip().lower() for t in (self.header("Connection") or "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens

    @property
    def host(self) -> str | None:
        """Host header without port, lower-case, or None if absent."""
        value = (self.header("Host") or "").strip().lower()
        if not value:
            return None
        if value.startswith("["):
            return value[1:].split("]", 1)[0]
        name, sep, port = value.rpartition(":")
        if sep and port.isdigit():
            return name.rstrip(".")
        return value.rstrip(".")


async def read_request(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    max_body: int | None = None,
) -> Request | None:
    """Read one request (head and body); None on clean EOF before a request starts."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise BadRequest("truncated request head") from None
        return None
    except asyncio.LimitOverrunError:
        raise BadRequest("request head too large") from None
    lines = head.decode("latin-1").lstrip("\r\n").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"bad request line {lines[0]!r}")
    request = Request(method=parts[0].upper(), target=parts[1], version=parts[2])
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise BadRequest(f"bad header line {line!r}")
        request.headers.append((name.strip(), value.strip()))
    if (request.header("Expect") or "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    transfer_encoding = (request.header("Transfer-Encoding") or "").lower()
    if "chunked" in transfer_encoding:
        request.body = await _read_chunked(reader, max_body)
    elif (length := request.header("Content-Length")) is not None:
        try:
            size = int(length)
        except ValueError:
            raise BadRequest("bad Content-Length") from None
        if size < 0:
            raise BadRequest("negative Content-Length")
        if max_body is not None and size > max_body:
            raise BadRequest("request body too large")
        request.body = await reader.readexactly(size)
    return request


async def _read_chunked(reader: asyncio.StreamReader, max_body: int | None = None) -> bytes:
    """Decode a chunked request body (trailers are read and discarded)."""
    body = bytearray()
    while True:
        line = await reader.readuntil(b"\r\n")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise BadRequest("bad chunk size") from None
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return bytes(body)
        if max_body is not None and len(body) + size > max_body:
            raise BadRequest("request body too large")
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise BadRequest("missing CRLF after chunk")


def reason(status: int) -> str:
    """Standard reason phrase for ``status`` ("Unknown" for unregistered codes)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def response_head(
    status: int,
    headers: list[tuple[str, str]],
    content_length: int | None,
    keep_alive: bool,
    server: str,
) -> bytes:
    """Status line and headers; Server/Content-Length/Connection added unless given."""
    names = {name.lower() for name, _ in headers}
    out = [f"HTTP/1.1 {status} {reason(status)}"]
    if "server" not in names:
        out.append(f"Server: {server}")
    out.extend(f"{name}: {value}" for name, value in headers)
    if content_length is not None:
        out.append(f"Content-Length: {content_length}")
    if not keep_alive:
        out.append("Connection: close")
    return ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")


async def send_response(
    writer: asyncio.StreamWriter,
    request: Request,
    status: int,
    body: bytes = b"",
    headers: list[tuple[str, str]] | None = None,
    content_type: str = "text/plain; charset=utf-8",
    *,
    server: str,
    send_body: bool = True,
) -> bool:
    """Send a complete response; return whether the connection stays open.

    ``send_body=False`` (for HEAD) keeps the headers, Content-Length included.
    """
    keep = request.keep_alive
    hdrs = list(headers or [])
    if status in NO_BODY_STATUSES or status < 200:
        writer.write(response_head(status, hdrs, None, keep, server))
    else:
        if body and content_type:
            hdrs.insert(0, ("Content-Type", content_type))
        head = response_head(status, hdrs, len(body), keep, server)
        writer.write(head + body if send_body else head)
    await writer.drain()
    return keep


async def stream_pattern(writer: asyncio.StreamWriter, size: int) -> None:
    """Send ``size`` pattern bytes in 64 KiB writes, never holding the whole body."""
    remaining = size
    while remaining > 0:
        n = min(remaining, len(PATTERN_CHUNK))
        writer.write(PATTERN_CHUNK if n == len(PATTERN_CHUNK) else PATTERN_CHUNK[:n])
        remaining -= n
        await writer.drain()
    await writer.drain()


Dispatch = Callable[[Request, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]
"""Answers one request; returns whether to keep the connection open."""


async def serve_http(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    dispatch: Dispatch,
    *,
    server: str,
    max_body: int | None = None,
    idle_timeout: float | None = None,
) -> None:
    """Serve HTTP/1.1 requests on one connection until close, error or ``dispatch`` says stop.

    A malformed request gets a 400 and the connection is closed; ``idle_timeout``
    bounds the wait for each request so idle keep-alive connections don't pile up.
    """
    try:
        while True:
            try:
                request = await asyncio.wait_for(
                    read_request(reader, writer, max_body), idle_timeout
                )
            except BadRequest as exc:
                body = f"bad request: {exc}\n".encode()
                writer.write(
                    response_head(400, [("Content-Type", "text/plain")], len(body), False, server)
                    + body
                )
                await writer.drain()
                return
            if request is None:
                return
            if not await dispatch(request, reader, writer):
                return
    except (
        ConnectionError,
        TimeoutError,
        asyncio.IncompleteReadError,
        asyncio.LimitOverrunError,
    ):
        pass
    except ssl.SSLError:
        pass
    finally:
        writer.close()


class DoHError(Exception):
    """A DNS-over-HTTPS request that can't carry a query; answered with ``status``."""

    def __init__(self, status: int, message: bytes) -> None:
        super().__init__(message.decode(errors="replace").strip())
        self.status = status
        self.message = message


def doh_query(request: Request) -> bytes:
    """The DNS query in an RFC 8484 request (GET ?dns=base64url or POST body).

    Raises DoHError for a missing or undecodable parameter or a wrong Content-Type.
    """
    if request.method == "GET":
        param = request.query.get("dns")
        if not param:
            raise DoHError(400, b"missing dns parameter\n")
        try:
            padded = param + "=" * (-len(param) % 4)
            return base64.b64decode(padded, altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise DoHError(400, b"bad base64url\n") from None
    ctype = (request.header("Content-Type") or "").split(";")[0].strip().lower()
    if ctype != DNS_MESSAGE:
        raise DoHError(415, b"expected application/dns-message\n")
    return request.body
