"""DNS resolution over UDP, TCP and DNS-over-HTTPS, keeping the raw answers.

dnspython builds and parses the messages; the exchange itself is done here so the
exact bytes the resolver sent back are kept as evidence (``raw_response``), and so
a reply that does not parse is recorded as ``dns_server_misbehaving`` rather than
dropped. Each resolver gets one A and one AAAA query, in parallel.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.rrset
import httpx

from probe.engine.content import BodyDecoder
from probe.engine.failures import SetupError, rcode_failure
from probe.engine.trace import Trace
from schema.model import DNSAnswer, DNSQuery

if TYPE_CHECKING:
    from probe.engine.context import EngineContext

Engine = Literal["udp", "tcp", "doh"]
QUERY_TYPES = ("A", "AAAA")
#: UDP queries are sent up to this many times within the DNS timeout.
DNS_TRIES = 3


class ResolverSpecError(ValueError):
    """A resolver specification could not be understood."""


@dataclass(frozen=True)
class ResolverSpec:
    """Where to send queries: ``udp://9.9.9.9:53``, ``tcp://[::1]:53``,
    ``https://dns.example/dns-query`` (DoH), or a bare address (UDP port 53)."""

    engine: Engine
    address: str  # an IP address, or the DoH URL
    port: int = 53
    system: bool = False

    @classmethod
    def parse(cls, spec: str, *, system: bool = False) -> ResolverSpec:
        text = spec.strip()
        if text.startswith("https://"):
            if not urlsplit(text).hostname:
                raise ResolverSpecError(f"DoH URL without a host: {spec!r}")
            return cls("doh", text, 443, system)
        engine: Engine = "udp"
        for prefix, eng in (("udp://", "udp"), ("tcp://", "tcp")):
            if text.startswith(prefix):
                engine, text = eng, text[len(prefix) :]  # type: ignore[assignment]
                break
        host, port = text, 53
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            if rest.startswith(":"):
                port = _port(rest[1:], spec)
        elif text.count(":") == 1:
            host, _, p = text.partition(":")
            port = _port(p, spec)
        try:
            ipaddress.ip_address(host)
        except ValueError as exc:
            raise ResolverSpecError(
                f"resolver {spec!r}: {host!r} is not an IP address "
                "(use udp://IP[:PORT], tcp://IP[:PORT] or an https:// DoH URL)"
            ) from exc
        return cls(engine, host, port, system)

    @property
    def label(self) -> str:
        if self.engine == "doh":
            return self.address
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ResolverSpecError(f"resolver {spec!r}: bad port {text!r}")
    return int(text)


def is_ip(host: str) -> bool:
    """Whether ``host`` is already an address (nothing to resolve)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def system_resolvers(path: str = "/etc/resolv.conf") -> list[ResolverSpec]:
    """The system's nameservers, read by dnspython's resolv.conf parser."""
    try:
        conf = dns.resolver.Resolver(filename=path, configure=True)
    except (OSError, dns.resolver.NoResolverConfiguration):
        return []
    specs = []
    for ns in conf.nameservers:
        address = str(ns)
        try:
            ipaddress.ip_address(address)
        except ValueError:
            continue
        specs.append(ResolverSpec("udp", address, conf.port, system=True))
    return specs


class _UDPExchange(asyncio.DatagramProtocol):
    def __init__(self, query_id: int) -> None:
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.query_id = query_id

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if self.reply.done():
            return
        # Skip well-formed answers to other queries (late replies, as a stub resolver
        # would), but keep anything that does not parse: that is a misbehaving server.
        try:
            other = dns.message.from_wire(data).id != self.query_id
        except Exception:  # noqa: BLE001 - judged later, in _read_reply
            other = False
        if not other:
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and not self.reply.done():
            self.reply.set_exception(exc)


async def _exchange_udp(
    wire: bytes, query_id: int, spec: ResolverSpec, retry_after: float | None = None
) -> bytes:
    """Send the query, resending it every ``retry_after`` seconds until a reply
    comes (the caller's timeout ends it), as every stub resolver does: one lost
    datagram is the network, not the resolver."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: _UDPExchange(query_id), remote_addr=(spec.address, spec.port)
    )
    try:
        while True:
            transport.sendto(wire)
            if retry_after is None:
                return await proto.reply
            done, _ = await asyncio.wait({proto.reply}, timeout=retry_after)
            if done:
                return proto.reply.result()
    finally:
        transport.close()


async def _exchange_tcp(wire: bytes, spec: ResolverSpec) -> bytes:
    reader, writer = await asyncio.open_connection(spec.address, spec.port)
    try:
        writer.write(struct.pack("!H", len(wire)) + wire)
        await writer.drain()
        (length,) = struct.unpack("!H", await reader.readexactly(2))
        return await reader.readexactly(length)
    finally:
        writer.close()


#: The largest DoH reply read (a DNS message is at most 65535 bytes).
DOH_MAX_REPLY = 64 * 1024


async def _exchange_doh(wire: bytes, spec: ResolverSpec, client: httpx.AsyncClient) -> bytes:
    """POST the query; the reply is read raw and bounded (at most ``DOH_MAX_REPLY``
    bytes read and decoded), so a hostile server cannot make the probe swallow more."""
    headers = {
        "content-type": "application/dns-message",
        "accept": "application/dns-message",
        "accept-encoding": "identity",
    }
    async with client.stream("POST", spec.address, content=wire, headers=headers) as response:
        if response.status_code != 200:
            raise dns.exception.DNSException(f"DoH server answered HTTP {response.status_code}")
        decoder = BodyDecoder(response.headers.get("content-encoding"))
        if decoder.note is not None:
            raise dns.exception.DNSException(f"DoH reply: {decoder.note}")
        body = bytearray()
        read = 0
        async for chunk in response.aiter_raw():
            read += len(chunk)
            body += decoder.decode(chunk, DOH_MAX_REPLY + 1 - len(body))
            if read > DOH_MAX_REPLY or len(body) > DOH_MAX_REPLY:
                raise dns.exception.DNSException(
                    f"DoH reply larger than {DOH_MAX_REPLY} bytes: not a DNS message"
                )
    return bytes(body)


async def query(
    name: str,
    qtype: str,
    spec: ResolverSpec,
    ctx: EngineContext,
    trace: Trace,
    doh_client: httpx.AsyncClient | None = None,
    record: list[DNSQuery] | None = None,
) -> DNSQuery:
    """Send one query and record what came back (or why nothing usable did).

    The observation is appended to ``record`` as soon as it starts, so a query cut
    short by cancellation is still kept (as ``interrupted``).
    """
    obs = DNSQuery(
        hostname=name,
        query_type=qtype,
        engine=spec.engine,
        resolver_address=spec.label,
        system_resolver=spec.system,
        t0=trace.now(),
        t=0.0,
    )
    if record is not None:
        record.append(obs)
    async with trace.step(obs, "resolve", ctx.timeouts.dns):
        q, wire = _make_query(name, qtype)
        if spec.engine == "udp":
            raw = await _exchange_udp(wire, q.id, spec, ctx.timeouts.dns / DNS_TRIES)
            if _truncated(raw):
                # "Too big for UDP": ask the same resolver over TCP, as a stub resolver
                # does. One observation (engine "udp"); the TCP reply is the evidence.
                raw = await _exchange_tcp(wire, spec)
        elif spec.engine == "tcp":
            raw = await _exchange_tcp(wire, spec)
        else:
            if doh_client is None:
                raise RuntimeError("DoH resolver used without an HTTP client")
            raw = await _exchange_doh(wire, spec, doh_client)
        obs.raw_response = raw
        _read_reply(obs, q, raw, ctx)
    return obs


def _make_query(name: str, qtype: str) -> tuple[dns.message.Message, bytes]:
    """The query and its wire form; a name DNS cannot carry is a SetupError."""
    try:
        q = dns.message.make_query(name, qtype)
        q.flags |= dns.flags.RD
        return q, q.to_wire()
    except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
        raise SetupError(
            f"cannot make a DNS query for {name!r}: {type(exc).__name__}: {exc}"
        ) from exc


def _truncated(raw: bytes) -> bool:
    """The TC flag of a reply's header (byte 2, bit 0x02)."""
    return len(raw) >= 4 and bool(raw[2] & 0x02)


#: The longest CNAME chain followed from the queried name.
MAX_CNAME_CHAIN = 8


def _read_reply(obs: DNSQuery, q: dns.message.Message, raw: bytes, ctx: EngineContext) -> None:
    """Keep the answers that answer the question: the CNAME chain that starts at the
    queried name (at most ``MAX_CNAME_CHAIN`` links) and the records of the queried
    type owned by a name on it. Other records are ignored (``raw_response`` keeps
    them as evidence)."""
    reply = dns.message.from_wire(raw)  # malformed -> dns_server_misbehaving via classify
    if not q.is_response(reply):
        raise dns.exception.FormError("the reply does not answer the question that was asked")
    obs.rcode = dns.rcode.to_text(reply.rcode())
    qtype = q.question[0].rdtype
    chain = [q.question[0].name]
    cnames: list[dns.rrset.RRset] = []
    for _ in range(MAX_CNAME_CHAIN):
        link = next(
            (
                rrset
                for rrset in reply.answer
                if rrset.rdtype == dns.rdatatype.CNAME and rrset.name == chain[-1]
            ),
            None,
        )
        if link is None or len(link) == 0:
            break
        cnames.append(link)
        target = next(iter(link)).target
        if target in chain:
            break  # a CNAME loop
        chain.append(target)
    followed = {id(rrset) for rrset in cnames}
    for rrset in reply.answer:
        if id(rrset) in followed:
            obs.answers.append(
                DNSAnswer("CNAME", next(iter(rrset)).target.to_text().rstrip("."), rrset.ttl)
            )
        elif rrset.rdtype == qtype and rrset.name in chain:
            rtype = dns.rdatatype.to_text(rrset.rdtype)
            obs.answers.extend(DNSAnswer(rtype, rdata.to_text(), rrset.ttl) for rdata in rrset)
    failure = rcode_failure(reply.rcode())
    if failure is None and not any(a.answer_type == obs.query_type for a in obs.answers):
        failure = "dns_no_answer"
    if failure is None and any(ctx.is_bogon(a) for a in obs.addresses()):
        failure = "dns_bogon_error"
    if failure is not None:
        obs.failure, obs.failed_operation = failure, "resolve"


async def resolve(
    name: str,
    ctx: EngineContext,
    trace: Trace,
    doh_client: httpx.AsyncClient | None = None,
    query_types: tuple[str, ...] = QUERY_TYPES,
    record: list[DNSQuery] | None = None,
) -> list[DNSQuery]:
    """Ask every configured resolver for every query type, in parallel."""
    jobs = [
        query(name, qtype, spec, ctx, trace, doh_client, record)
        for spec in ctx.resolvers
        for qtype in query_types
    ]
    return list(await asyncio.gather(*jobs))


def usable_addresses(queries: list[DNSQuery]) -> list[str]:
    """Addresses from successful answers, deduplicated, in answer order."""
    seen: dict[str, None] = {}
    for q in queries:
        if q.failure is None:
            for address in q.addresses():
                seen.setdefault(address, None)
    return list(seen)
