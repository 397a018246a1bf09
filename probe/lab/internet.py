"""The lab's "Internet" agent: every server the probe can reach, in one asyncio process.

Run as ``python -m probe.lab.internet CONFIG.json`` inside the lab's Internet
namespace (see DESIGN.md). It answers DNS for the lab zone (UDP and TCP, after a
fixed delay that stands in for recursion time), DNS-over-HTTPS, a censor's
blockpage, and each site's HTTPS/HTTP/raw-TCP ports with the configured behaviour.
One process keeps startup fast and memory small for a few hundred addresses;
bodies are streamed so a ``big`` site costs no memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import html
import ipaddress
import json
import os
import resource
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from probe.lab.servers import (
    BLOCK_PAGE,
    BLOCK_SERVER_HEADER,
    DNS_MESSAGE,
    Behaviour,
    DNSDatagramProtocol,
    DoHError,
    Reply,
    Request,
    answer_wire,
    doh_query,
    normalise_name,
    response_head,
    send_response,
    serve_dns_stream,
    serve_http,
    stream_pattern,
)

PROG = "probe.lab.internet"
DEFAULT_DNS_PORT = 53
DEFAULT_DOH_PORT = 443
DEFAULT_BLOCKPAGE_PORT = 80
BEHAVIOURS = ("page", "redirect", "big", "challenge", "down")
SITE_SERVER = "vantage-lab/1"
DOH_SERVER = "vantage-lab-doh/1"
HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 120.0
"""Idle keep-alive connections are closed after this long (a lab run is short)."""
MAX_REQUEST_BODY = 1 << 20
STREAM_LIMIT = 1 << 16
BACKLOG = 1024
HOP_PREFIX = "/_lab/hop/"
"""Path of the k-th redirect hop: ``/_lab/hop/k``; any other path is hop 0."""
STOP_TIMEOUT = 5.0

CHALLENGE_TITLE = "Just a moment..."
CHALLENGE_PAGE = (
    b"<!doctype html>\n<html><head><title>Just a moment...</title></head>\n"
    b"<body><h1>Checking your browser before accessing the site</h1>"
    b"<p>Unusual traffic was detected from your network. "
    b"Please complete the CAPTCHA below to continue.</p>"
    b'<form id="challenge-form" method="POST" action="/_lab/captcha">'
    b'<div class="captcha" data-sitekey="lab"></div>'
    b'<input type="submit" value="I am not a robot"></form></body></html>\n'
)


class ConfigError(ValueError):
    """The config file is not what DESIGN.md specifies; the message says where."""


# ------------------------------------------------------------------------ config


@dataclass(frozen=True)
class Site:
    """One server address with its ports, certificate and behaviour."""

    address: str
    names: tuple[str, ...]
    tls_ports: tuple[int, ...]
    http_ports: tuple[int, ...]
    tcp_ports: tuple[int, ...]
    cert: str | None
    key: str | None
    behaviour: str
    redirects: int = 0
    size: int = 0

    @property
    def title(self) -> str:
        """Name the page is titled after when the request's Host is not one of ours."""
        return self.names[0] if self.names else self.address


@dataclass(frozen=True)
class DoHConfig:
    """The DNS-over-HTTPS endpoint (https://address:port/dns-query)."""

    address: str
    cert: str
    key: str
    port: int = DEFAULT_DOH_PORT


@dataclass(frozen=True)
class BlockpageConfig:
    """The censor's blockpage server (plain HTTP)."""

    address: str
    port: int = DEFAULT_BLOCKPAGE_PORT


@dataclass(frozen=True)
class Config:
    """The agent's whole config, validated (see DESIGN.md for the JSON form)."""

    zone: dict[str, Behaviour]
    dns_listen: tuple[str, ...]
    dns_delay: float
    dns_port: int
    doh: DoHConfig | None
    blockpage: BlockpageConfig | None
    probe_address: str | None
    sites: tuple[Site, ...]
    ready_file: str


class _Checker:
    """Typed access to one JSON object, with error messages naming the field's path."""

    def __init__(self, raw: object, where: str) -> None:
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected an object")
        self.raw: dict[str, Any] = raw
        self.where = where

    def get(self, key: str, required: bool) -> Any:
        """The raw value of ``key`` (None if absent or null, an error if ``required``)."""
        if key not in self.raw or self.raw[key] is None:
            if required:
                raise ConfigError(f"{self.where}.{key}: missing")
            return None
        return self.raw[key]

    def text(self, key: str, required: bool = True) -> str | None:
        value = self.get(key, required)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{self.where}.{key}: expected a string")
        return value

    def texts(self, key: str) -> list[str]:
        value = self.get(key, False) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self.where}.{key}: expected a list of strings")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.get(key, False)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"{self.where}.{key}: expected a non-negative number")
        return float(value)

    def integer(self, key: str, default: int) -> int:
        value = self.get(key, False)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{self.where}.{key}: expected a non-negative integer")
        return value

    def port(self, key: str, default: int) -> int:
        value = self.integer(key, default)
        if not 0 < value < 65536:
            raise ConfigError(f"{self.where}.{key}: {value} is not a port number")
        return value

    def ports(self, key: str) -> tuple[int, ...]:
        value = self.get(key, False) or []
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 < v < 65536 for v in value
        ):
            raise ConfigError(f"{self.where}.{key}: expected a list of port numbers")
        return tuple(value)

    def address(self, key: str, required: bool = True) -> str | None:
        value = self.text(key, required)
        return None if value is None else _address(value, f"{self.where}.{key}")


def _address(value: str, where: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not an IP address") from None


def _zone_entry(raw: object, where: str) -> Behaviour:
    c = _Checker(raw, where)
    a = [_address(v, f"{where}.a") for v in c.texts("a")]
    aaaa = [_address(v, f"{where}.aaaa") for v in c.texts("aaaa")]
    if any(ipaddress.ip_address(v).version != 4 for v in a):
        raise ConfigError(f"{where}.a: IPv4 addresses only")
    if any(ipaddress.ip_address(v).version != 6 for v in aaaa):
        raise ConfigError(f"{where}.aaaa: IPv6 addresses only")
    return Behaviour(a=a, aaaa=aaaa, ttl=c.integer("ttl", 300))


def _site(raw: object, where: str) -> Site:
    c = _Checker(raw, where)
    behaviour = c.text("behaviour", False) or "page"
    if behaviour not in BEHAVIOURS:
        raise ConfigError(f"{where}.behaviour: {behaviour!r} is not one of {', '.join(BEHAVIOURS)}")
    site = Site(
        address=str(c.address("address")),
        names=tuple(normalise_name(n) for n in c.texts("names")),
        tls_ports=c.ports("tls_ports"),
        http_ports=c.ports("http_ports"),
        tcp_ports=c.ports("tcp_ports"),
        cert=c.text("cert", False),
        key=c.text("key", False),
        behaviour=behaviour,
        redirects=c.integer("redirects", 0),
        size=c.integer("size", 0),
    )
    if site.tls_ports and behaviour != "down" and not (site.cert and site.key):
        raise ConfigError(f"{where}: tls_ports need cert and key")
    ports = site.tls_ports + site.http_ports + site.tcp_ports
    if len(set(ports)) != len(ports):
        raise ConfigError(f"{where}: a port is listed twice")
    return site


def parse_config(raw: object) -> Config:
    """Validate the decoded JSON config; raises ConfigError naming the bad field."""
    c = _Checker(raw, "config")
    zone_raw = c.get("zone", False) or {}
    if not isinstance(zone_raw, dict):
        raise ConfigError("config.zone: expected an object")
    zone = {normalise_name(k): _zone_entry(v, f"config.zone[{k!r}]") for k, v in zone_raw.items()}
    doh = None
    if c.get("doh", False) is not None:
        d = _Checker(c.raw["doh"], "config.doh")
        doh = DoHConfig(
            address=str(d.address("address")),
            cert=str(d.text("cert")),
            key=str(d.text("key")),
            port=d.port("port", DEFAULT_DOH_PORT),
        )
    blockpage = None
    if c.get("blockpage", False) is not None:
        b = _Checker(c.raw["blockpage"], "config.blockpage")
        blockpage = BlockpageConfig(
            address=str(b.address("address")), port=b.port("port", DEFAULT_BLOCKPAGE_PORT)
        )
    sites_raw = c.get("sites", False) or []
    if not isinstance(sites_raw, list):
        raise ConfigError("config.sites: expected a list")
    sites = tuple(_site(s, f"config.sites[{i}]") for i, s in enumerate(sites_raw))
    seen: set[tuple[str, int]] = set()
    for site in sites:
        if site.behaviour == "down":
            continue
        for port in site.tls_ports + site.http_ports + site.tcp_ports:
            if (site.address, port) in seen:
                raise ConfigError(f"config.sites: {site.address}:{port} is used twice")
            seen.add((site.address, port))
    return Config(
        zone=zone,
        dns_listen=tuple(_address(a, "config.dns_listen") for a in c.texts("dns_listen")),
        dns_delay=c.number("dns_delay", 0.0),
        dns_port=c.port("dns_port", DEFAULT_DNS_PORT),
        doh=doh,
        blockpage=blockpage,
        probe_address=c.address("probe_address", False),
        sites=sites,
        ready_file=str(c.text("ready_file")),
    )


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return parse_config(raw)


# --------------------------------------------------------------------------- DNS


class LabZone:
    """Answers queries from the lab zone, every answer after ``delay`` seconds.

    Names in the zone get their A/AAAA records (NODATA for a missing type); keys
    may be ``*.domain`` wildcards, used when no exact name matches. Every other
    name gets NXDOMAIN: the lab zone is the whole DNS of the lab's Internet.
    """

    def __init__(self, zone: dict[str, Behaviour], delay: float) -> None:
        self.delay = delay
        self.names = {normalise_name(k): v for k, v in zone.items()}

    def find(self, name: str) -> Behaviour | None:
        """Behaviour for a normalised name, or None (NXDOMAIN)."""
        found = self.names.get(name)
        if found is not None:
            return found
        labels = name.split(".")
        for i in range(1, len(labels)):
            found = self.names.get("*." + ".".join(labels[i:]))
            if found is not None:
                return found
        return None

    def answer(self, wire: bytes, udp: bool) -> Reply:
        """The reply to one wire query, to be sent after the zone's delay."""
        reply = answer_wire(wire, {}, udp=udp, find=self.find)
        return dataclasses.replace(reply, delay=self.delay)

    def answer_udp(self, wire: bytes) -> Reply:
        """UDP answer (truncated to the client's advertised size)."""
        return self.answer(wire, True)

    def answer_tcp(self, wire: bytes) -> Reply:
        """TCP/DoH answer (no truncation)."""
        return self.answer(wire, False)


# -------------------------------------------------------------------------- HTTP


def page_html(name: str) -> bytes:
    """The small page a ``page`` site serves, titled after ``name``."""
    n = html.escape(name)
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{n}</title></head>\n'
        f"<body><h1>{n}</h1><p>Welcome to {n}. This page is served by the Vantage lab."
        f"</p></body></html>\n"
    ).encode()


class SiteHandler:
    """Answers the HTTP requests one site receives on one port (see DESIGN.md behaviours)."""

    def __init__(self, site: Site, scheme: str, probe_address: str | None) -> None:
        self.site = site
        self.scheme = scheme
        self.probe_address = probe_address
        self._pages = {name: page_html(name) for name in site.names}
        self._default_page = page_html(site.title)

    def _page(self, request: Request) -> bytes:
        host = request.host
        page = self._pages.get(host) if host is not None else None
        return page if page is not None else self._default_page

    def _from_probe(self, writer: asyncio.StreamWriter) -> bool:
        peer = writer.get_extra_info("peername")
        if not peer or self.probe_address is None:
            return False
        try:
            return str(ipaddress.ip_address(peer[0])) == self.probe_address
        except ValueError:
            return False

    def _location(self, request: Request, hop: int) -> str:
        """Absolute URL of the next hop on the same host (relative if no Host header)."""
        path = f"{HOP_PREFIX}{hop}"
        host = request.header("Host")
        return f"{self.scheme}://{host}{path}" if host else path

    async def __call__(
        self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Route one request per the site's behaviour; return whether to keep the connection."""
        site = self.site
        send_body = request.method != "HEAD"

        async def send(
            status: int, body: bytes = b"", headers: list[tuple[str, str]] | None = None
        ) -> bool:
            return await send_response(
                writer,
                request,
                status,
                body,
                headers,
                "text/html; charset=utf-8",
                server=SITE_SERVER,
                send_body=send_body,
            )

        if site.behaviour == "challenge" and self._from_probe(writer):
            return await send(503, CHALLENGE_PAGE, [("Cache-Control", "no-store")])
        if request.method == "POST":
            return await send(200, self._page(request))
        if request.method not in ("GET", "HEAD"):
            return await send(405, b"", [("Allow", "GET, HEAD, POST")])
        if site.behaviour == "redirect":
            hop = _hop(request.path)
            if hop < site.redirects:
                return await send(302, b"", [("Location", self._location(request, hop + 1))])
        if site.behaviour == "big":
            keep = request.keep_alive
            headers = [("Content-Type", "application/octet-stream")]
            writer.write(response_head(200, headers, site.size, keep, SITE_SERVER))
            if send_body:
                await stream_pattern(writer, site.size)
            await writer.drain()
            return keep
        return await send(200, self._page(request))


def _hop(path: str) -> int:
    if path.startswith(HOP_PREFIX):
        rest = path.removeprefix(HOP_PREFIX)
        if rest.isdigit():
            return int(rest)
    return 0


async def blockpage_handler(
    request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    """Every request, whatever its Host or path, gets the "Access denied" page."""
    return await send_response(
        writer,
        request,
        200,
        BLOCK_PAGE,
        [("Server", BLOCK_SERVER_HEADER)],
        "text/html; charset=utf-8",
        server=BLOCK_SERVER_HEADER,
        send_body=request.method != "HEAD",
    )


class DoHHandler:
    """RFC 8484 DNS-over-HTTPS at /dns-query, answered from the lab zone after its delay."""

    def __init__(self, zone: LabZone) -> None:
        self.zone = zone

    async def __call__(
        self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one DoH request (GET ?dns= or POST application/dns-message)."""
        if request.path != "/dns-query" or request.method not in ("GET", "POST"):
            return await send_response(writer, request, 404, b"not found\n", server=DOH_SERVER)
        try:
            wire = doh_query(request)
        except DoHError as exc:
            return await send_response(writer, request, exc.status, exc.message, server=DOH_SERVER)
        reply = self.zone.answer_tcp(wire)
        if reply.malformed or reply.wire is None:
            return await send_response(
                writer, request, 400, b"malformed DNS message\n", server=DOH_SERVER
            )
        if reply.delay > 0:
            await asyncio.sleep(reply.delay)
        return await send_response(
            writer, request, 200, reply.wire, content_type=DNS_MESSAGE, server=DOH_SERVER
        )


# ------------------------------------------------------------------------ agent


class _Hold(asyncio.Protocol):
    """A ``tcp_ports`` connection: accepted, read and discarded, never answered."""

    def __init__(self, live: set[asyncio.Transport]) -> None:
        self.live = live
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.live.add(self.transport)

    def data_received(self, data: bytes) -> None:
        """Swallow whatever the client sends."""

    def eof_received(self) -> bool:
        return False  # the client is done: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.live.discard(self.transport)


StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Internet:
    """All the Internet namespace's listeners; ``start()`` binds them, ``close()`` stops."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.zone = LabZone(config.zone, config.dns_delay)
        self._servers: list[asyncio.Server] = []
        self._udp: list[asyncio.BaseTransport] = []
        self._held: set[asyncio.Transport] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._contexts: dict[tuple[str, str], ssl.SSLContext] = {}

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        """A task we hold a reference to and cancel at close()."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _tracked(self, handler: StreamHandler) -> StreamHandler:
        """Wrap a connection handler so close() can cancel it, quietly."""

        async def wrapper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if task is not None:
                self._tasks.add(task)
            try:
                await handler(reader, writer)
            except asyncio.CancelledError:
                writer.transport.abort()
            finally:
                if task is not None:
                    self._tasks.discard(task)

        return wrapper

    def _context(self, cert: str, key: str) -> ssl.SSLContext:
        """Server TLS context for a cert/key pair (shared by the sites that use the same files)."""
        ctx = self._contexts.get((cert, key))
        if ctx is None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                ctx.load_cert_chain(cert, key)
            except OSError as exc:
                message = f"cannot load certificate {cert} / key {key}: {exc}"
                raise OSError(exc.errno, message) from exc
            ctx.set_alpn_protocols(["http/1.1"])
            self._contexts[(cert, key)] = ctx
        return ctx

    async def _listen_http(
        self,
        address: str,
        port: int,
        dispatch: Callable[[Request, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]],
        server: str,
        ctx: ssl.SSLContext | None,
    ) -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await serve_http(
                reader,
                writer,
                dispatch,
                server=server,
                max_body=MAX_REQUEST_BODY,
                idle_timeout=IDLE_TIMEOUT,
            )

        self._servers.append(
            await _bind(
                address,
                port,
                asyncio.start_server(
                    self._tracked(handle),
                    address,
                    port,
                    ssl=ctx,
                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT if ctx is not None else None,
                    backlog=BACKLOG,
                    limit=STREAM_LIMIT,
                ),
            )
        )

    async def _listen_dns(self, address: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        zone = self.zone

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await serve_dns_stream(reader, writer, zone.answer_tcp, self._spawn)

        self._servers.append(
            await _bind(
                address,
                port,
                asyncio.start_server(self._tracked(handle), address, port, backlog=BACKLOG),
            )
        )
        udp, _ = await _bind(
            address,
            port,
            loop.create_datagram_endpoint(
                lambda: DNSDatagramProtocol(zone.answer_udp), local_addr=(address, port)
            ),
            "udp",
        )
        self._udp.append(udp)

    async def _listen_hold(self, address: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        held = self._held
        self._servers.append(
            await _bind(
                address,
                port,
                loop.create_server(lambda: _Hold(held), address, port, backlog=BACKLOG),
            )
        )

    async def start(self) -> None:
        """Bind every listener; raises OSError (naming address and port) if one can't be."""
        cfg = self.config
        try:
            for address in cfg.dns_listen:
                await self._listen_dns(address, cfg.dns_port)
            if cfg.doh is not None:
                ctx = self._context(cfg.doh.cert, cfg.doh.key)
                await self._listen_http(
                    cfg.doh.address, cfg.doh.port, DoHHandler(self.zone), DOH_SERVER, ctx
                )
            if cfg.blockpage is not None:
                await self._listen_http(
                    cfg.blockpage.address,
                    cfg.blockpage.port,
                    blockpage_handler,
                    BLOCK_SERVER_HEADER,
                    None,
                )
            for site in cfg.sites:
                await self._start_site(site)
        except BaseException:
            await self.close()
            raise

    async def _start_site(self, site: Site) -> None:
        if site.behaviour == "down":
            return
        if site.tls_ports:
            assert site.cert is not None and site.key is not None  # checked by parse_config
            ctx = self._context(site.cert, site.key)
            https = SiteHandler(site, "https", self.config.probe_address)
            for port in site.tls_ports:
                await self._listen_http(site.address, port, https, SITE_SERVER, ctx)
        http = SiteHandler(site, "http", self.config.probe_address)
        for port in site.http_ports:
            await self._listen_http(site.address, port, http, SITE_SERVER, None)
        for port in site.tcp_ports:
            await self._listen_hold(site.address, port)

    @property
    def listeners(self) -> int:
        """How many sockets are bound (TCP listeners plus UDP DNS sockets)."""
        return len(self._servers) + len(self._udp)

    async def close(self) -> None:
        """Stop listening, drop every open connection and wait for handlers to end."""
        for server in self._servers:
            server.close()
        for udp in self._udp:
            udp.close()
        for transport in list(self._held):
            transport.abort()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
        self._servers.clear()
        self._udp.clear()
        self._held.clear()


async def _bind(address: str, port: int, opening: Awaitable[Any], proto: str = "tcp") -> Any:
    """Await a listener's creation, naming what failed to bind in the error."""
    try:
        return await opening
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {address}:{port}/{proto}: {exc}") from exc


# ------------------------------------------------------------------------ main


def write_ready(path: str | os.PathLike[str]) -> None:
    """Publish readiness atomically (write a temporary file, then rename it)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"ready": True}))
    os.replace(tmp, target)


def _raise_fd_limit() -> None:
    """Hundreds of listeners plus connections exceed the usual soft limit of 1024 fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass


_QUIET_ERRORS = (ConnectionError, TimeoutError, ssl.SSLError, EOFError)


def _quiet_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Clients that vanish mid-handshake or mid-body are normal in a censorship lab."""
    if isinstance(context.get("exception"), _QUIET_ERRORS):
        return
    loop.default_exception_handler(context)


async def serve(config: Config, stop: asyncio.Event | None = None) -> None:
    """Run the agent until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None)."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_quiet_exception_handler)
    handle_signals = stop is None
    stop = stop if stop is not None else asyncio.Event()
    if handle_signals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    agent = Internet(config)
    await agent.start()
    try:
        write_ready(config.ready_file)
        await stop.wait()
    finally:
        await agent.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m probe.lab.internet CONFIG.json``; exit status 0 on SIGTERM."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print(f"usage: python -m {PROG} CONFIG.json", file=sys.stderr)
        return 2
    try:
        config = load_config(args[0])
    except ConfigError as exc:
        print(f"{PROG}: bad config: {exc}", file=sys.stderr)
        return 2
    _raise_fd_limit()
    try:
        asyncio.run(serve(config))
    except OSError as exc:  # ssl.SSLError included
        print(f"{PROG}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
