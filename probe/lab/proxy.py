"""The ISP's transparent TCP proxy: every LAN connection passes through it.

nftables in the router redirects each TCP connection from the LAN here; the proxy
reads where the client meant to go (``SO_ORIGINAL_DST``), looks at the first bytes
the client sends (TLS ClientHello SNI or plaintext HTTP head), and then resets,
drops, answers with the blockpage server, throttles, intercepts TLS with a rogue
CA's certificate, or relays unchanged - the behaviours of real DPI boxes the probe
must tell apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from probe.lab.censor import (
    MAX_INSPECT,
    SO_ORIGINAL_DST,
    ConfigError,
    ProxyRule,
    classify_first_bytes,
    http_rule_for,
    normalise_name,
    parse_client_hello,
    parse_http_head,
    parse_proxy_rules,
    parse_sockaddr_in,
    throttle_rate,
    tls_rule_for,
)

log = logging.getLogger("probe.lab.proxy")

IP_TRANSPARENT = 19
_CHUNK = 65536

ROGUE_CA_ORGANIZATION = "Rogue interception CA"
INTERCEPT_TIMEOUT = 30.0
"""How long an intercepted client may take for its handshake and one request."""
_GATE_GRACE = 0.25
"""With intercept rules, how long a silent client waits before its upstream connects."""
_MAX_LEAVES = 256
_INTERCEPT_BODY = (
    "<!DOCTYPE html>\n<html><head><title>Intercepted</title></head>\n"
    "<body><h1>Intercepted</h1><p>This connection to {name} was intercepted.</p>"
    "</body></html>\n"
)

OriginalDst = Callable[[socket.socket], tuple[str, int]]
ResidualAdder = Callable[[str, str, int, float], Awaitable[None]]


@dataclass(frozen=True)
class ProxyConfig:
    """The ``proxy`` section of the router config, plus knobs tests and the builder may set.

    ``transparent_source`` makes upstream connections come from the client's own
    address (IP_TRANSPARENT), so servers see the probe and not the router; it needs
    the usual TPROXY routing in the router namespace (see :func:`transparent_setup`).
    """

    listen_port: int
    rules: tuple[ProxyRule, ...] = ()
    listen_address: str = "0.0.0.0"
    blockpage_address: str | None = None
    blockpage_port: int = 80
    nft_table: str = "vlab"
    inspect_timeout: float = 2.0
    connect_timeout: float = 30.0
    drop_hold: float = 600.0
    transparent_source: bool = False

    @classmethod
    def from_dict(
        cls, raw: Any, *, blockpage_address: str | None = None, nft_table: str = "vlab"
    ) -> ProxyConfig:
        """Validate the config's ``proxy`` object (top-level keys passed in)."""
        if not isinstance(raw, dict):
            raise ConfigError("proxy must be an object")
        port = raw.get("listen_port")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
            raise ConfigError("proxy.listen_port must be a port number")
        kw: dict[str, Any] = {}
        for key in ("inspect_timeout", "connect_timeout", "drop_hold"):
            if key in raw:
                value = raw[key]
                if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                    raise ConfigError(f"proxy.{key} must be a non-negative number")
                kw[key] = float(value)
        if "blockpage_port" in raw:
            bp = raw["blockpage_port"]
            if isinstance(bp, bool) or not isinstance(bp, int) or not 0 < bp < 65536:
                raise ConfigError("proxy.blockpage_port must be a port number")
            kw["blockpage_port"] = bp
        return cls(
            listen_port=port,
            rules=parse_proxy_rules(raw.get("rules")),
            listen_address=str(raw.get("listen", "0.0.0.0")),
            blockpage_address=blockpage_address,
            nft_table=nft_table,
            transparent_source=bool(raw.get("transparent_source", False)),
            **kw,
        )


def transparent_setup(
    table: str = "vlab", mark: int = 1, route_table: int = 100
) -> list[list[str]]:
    """Commands (for the router namespace) that deliver replies to transparent sockets.

    Upstream sockets bound to the client's address get their replies routed back
    out of ``lan`` unless the kernel is told those packets are local: mark packets
    that belong to a transparent socket and route marked packets to ``lo``.
    """
    return [
        ["nft", "add", "chain", "inet", table, "tproxy_mark",
         "{ type filter hook prerouting priority mangle; }"],
        ["nft", "add", "rule", "inet", table, "tproxy_mark",
         "meta", "l4proto", "tcp", "socket", "transparent", "1", "meta", "mark", "set", str(mark)],
        ["ip", "rule", "add", "fwmark", str(mark), "lookup", str(route_table)],
        ["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", str(route_table)],
    ]  # fmt: skip


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """Where an nftables-redirected connection was going (IPv4)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    return parse_sockaddr_in(raw)


async def nft_add_residual(table: str, src: str, dst: str, port: int, seconds: float) -> None:
    """Add (client, server, port) to the nftables set ``residual`` for ``seconds``."""
    millis = max(1, int(seconds * 1000))
    element = f"{{ {src} . {dst} . {port} timeout {millis}ms }}"
    cmd = ["nft", "add", "element", "inet", table, "residual", element]
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(proc.communicate(), 5.0)
    except (OSError, TimeoutError) as exc:
        log.warning("residual: %s failed: %s", " ".join(cmd), exc)
        return
    if proc.returncode:
        log.warning("residual: %s: %s", " ".join(cmd), err.decode(errors="replace").strip())


def set_linger_zero(sock: socket.socket | None) -> None:
    """Make the next close() send RST instead of FIN."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def abort_with_rst(writer: asyncio.StreamWriter | None) -> None:
    """Close a stream with an RST: what a DPI box's injected reset looks like to the peer."""
    if writer is None:
        return
    set_linger_zero(writer.get_extra_info("socket"))
    writer.transport.abort()


@dataclass
class _Conn:
    """One client connection's state while the proxy decides what to do with it."""

    client: tuple[str, int]
    dst: tuple[str, int]
    buf: bytearray = field(default_factory=bytearray)
    client_eof: bool = False
    server_first: bytes = b""
    gate: asyncio.Event | None = None
    """Set when the upstream may connect (only with intercept rules; None = at once)."""


Upstream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Interceptor:
    """A rogue CA and, per intercepted SNI name, a server context with a leaf for it.

    State-level interception: the censor answers the handshake itself with a
    certificate for exactly the name asked for, issued by a CA the client does
    not trust. ``ca`` is a ``trustme.CA`` (made here unless given).
    """

    def __init__(self, ca: Any | None = None) -> None:
        if ca is None:
            try:
                import trustme
            except ImportError as exc:  # pragma: no cover - depends on the install
                raise ConfigError(
                    "tls action intercept needs trustme: pip install 'vantage-probe[lab]'"
                ) from exc
            ca = trustme.CA(organization_name=ROGUE_CA_ORGANIZATION)
        self.ca = ca
        self._contexts: dict[str, ssl.SSLContext] = {}

    def context_for(self, name: str) -> ssl.SSLContext:
        """The server context presenting a rogue leaf for ``name`` (made once per name)."""
        name = normalise_name(name)
        context = self._contexts.get(name)
        if context is None:
            leaf = self.ca.issue_cert(name)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.set_alpn_protocols(["http/1.1"])
            leaf.configure_cert(context)
            if len(self._contexts) >= _MAX_LEAVES:
                self._contexts.pop(next(iter(self._contexts)))
            self._contexts[name] = context
        return context


class Proxy:
    """The transparent proxy server; ``original_dst``/``add_residual`` are injectable for tests."""

    def __init__(
        self,
        config: ProxyConfig,
        *,
        original_dst: OriginalDst = original_dst,
        add_residual: ResidualAdder | None = None,
        interceptor: Interceptor | None = None,
    ) -> None:
        self.config = config
        self._original_dst = original_dst
        self._add_residual = add_residual or self._nft_residual
        self._intercepts = any(r.kind == "tls" and r.action == "intercept" for r in config.rules)
        self.interceptor = interceptor
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = config.listen_port

    async def _nft_residual(self, src: str, dst: str, port: int, seconds: float) -> None:
        await nft_add_residual(self.config.nft_table, src, dst, port, seconds)

    async def start(self) -> None:
        """Make the rogue CA if needed and bind the listening socket (before ready)."""
        if self._intercepts and self.interceptor is None:
            self.interceptor = Interceptor()
            log.info("proxy: rogue CA %r ready for tls interception", ROGUE_CA_ORGANIZATION)
        self._server = await asyncio.start_server(
            self._handle, self.config.listen_address, self.config.listen_port,
            reuse_address=True, limit=MAX_INSPECT * 4,
        )  # fmt: skip
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop accepting, then end every connection still open."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    # -- per connection ------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()
        except Exception:  # noqa: BLE001 - one client's failure must not end the proxy
            log.exception("proxy: connection failed")
            writer.transport.abort()
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock: socket.socket = writer.get_extra_info("socket")
        peer = writer.get_extra_info("peername")
        try:
            dst = self._original_dst(sock)
            here = sock.getsockname()[:2]
        except (OSError, ValueError) as exc:
            log.warning("proxy: no original destination for %s: %s", peer, exc)
            writer.transport.abort()
            return
        if dst == tuple(here):
            log.warning("proxy: direct connection from %s to the proxy port, closing", peer)
            writer.transport.abort()
            return
        conn = _Conn(client=(peer[0], peer[1]), dst=dst)
        if self._intercepts:  # an intercepted connection must never reach its server
            conn.gate = asyncio.Event()
        upstream = asyncio.create_task(self._connect(dst, conn.client[0], conn))
        try:
            await self._serve_conn(conn, reader, writer, upstream)
        finally:
            if not upstream.done():
                upstream.cancel()
                await asyncio.wait({upstream})
            if not upstream.cancelled() and upstream.exception() is None:
                u_writer = upstream.result()[1]
                if not u_writer.is_closing():
                    u_writer.transport.abort()

    async def _serve_conn(
        self,
        conn: _Conn,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: asyncio.Task[Upstream],
    ) -> None:
        failed = await self._inspect(conn, reader, upstream)
        if failed is not None:
            self._upstream_failed(conn, writer, failed)
            if isinstance(failed, TimeoutError):
                await self._hold(reader, writer)
            return
        rule = self._verdict(conn)
        if rule is not None and rule.residual > 0:
            await self._add_residual(conn.client[0], conn.dst[0], conn.dst[1], rule.residual)
        action = rule.action if rule is not None else "relay"
        if action == "intercept":
            upstream.cancel()
            await self._intercept(conn, reader, writer)
            return
        if conn.gate is not None and action not in ("reset", "drop", "blockpage"):
            conn.gate.set()
        if action == "reset":
            abort_with_rst(writer)
            return
        if action == "drop":
            await self._hold(reader, writer)
            return
        if action == "blockpage":
            await self._blockpage(conn, reader, writer)
            return
        try:
            u_reader, u_writer = await upstream
        except (OSError, TimeoutError) as exc:
            self._upstream_failed(conn, writer, exc)
            if isinstance(exc, TimeoutError):
                await self._hold(reader, writer)
            return
        rate = throttle_rate(self.config.rules, conn.dst[0])
        if rate is not None:
            log.info("proxy: %s -> %s:%d throttled to %.0f B/s", conn.client[0], *conn.dst, rate)
        if conn.server_first:
            writer.write(conn.server_first)
        await self._relay(conn, reader, writer, u_reader, u_writer, rate)

    async def _connect(
        self, dst: tuple[str, int], client_ip: str, conn: _Conn | None = None
    ) -> Upstream:
        """Open the upstream connection (from the client's address if transparent).

        With a gate (intercept rules configured) it waits for the verdict first,
        unless the client stays silent (a protocol where the server speaks first).
        """
        if conn is not None and conn.gate is not None:
            try:
                async with asyncio.timeout(_GATE_GRACE):
                    await conn.gate.wait()
            except TimeoutError:
                if conn.buf:
                    await conn.gate.wait()
        async with asyncio.timeout(self.config.connect_timeout):
            if not self.config.transparent_source:
                return await asyncio.open_connection(dst[0], dst[1], limit=_CHUNK * 2)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                sock.bind((client_ip, 0))
                sock.setblocking(False)
                await asyncio.get_running_loop().sock_connect(sock, dst)
            except BaseException:
                sock.close()
                raise
            return await asyncio.open_connection(sock=sock, limit=_CHUNK * 2)

    def _upstream_failed(
        self, conn: _Conn, writer: asyncio.StreamWriter, exc: BaseException
    ) -> None:
        log.info("proxy: upstream %s:%d failed: %r", *conn.dst, exc)
        if not isinstance(exc, TimeoutError):
            abort_with_rst(writer)  # refused/unreachable: the client sees a reset

    async def _inspect(
        self, conn: _Conn, reader: asyncio.StreamReader, upstream: asyncio.Task[Upstream]
    ) -> BaseException | None:
        """Read the client's first bytes until a verdict is possible.

        Stops when the ClientHello or HTTP head is complete, the bytes are neither,
        :data:`MAX_INSPECT` bytes or ``inspect_timeout`` have passed, the client
        half-closes, or the server speaks first. Returns the upstream's error if
        it failed meanwhile (nothing can be relayed then).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.inspect_timeout
        read: asyncio.Task[bytes] | None = None
        server_read: asyncio.Task[bytes] | None = None
        try:
            while not self._decided(conn) and len(conn.buf) < MAX_INSPECT:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                if read is None:
                    read = asyncio.create_task(reader.read(MAX_INSPECT - len(conn.buf)))
                waiting: set[asyncio.Future[Any]] = {read}
                if not upstream.done():
                    waiting.add(upstream)
                elif upstream.exception() is None and server_read is None:
                    server_read = asyncio.create_task(upstream.result()[0].read(_CHUNK))
                if server_read is not None:
                    waiting.add(server_read)
                done, _ = await asyncio.wait(
                    waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                if upstream in done and upstream.exception() is not None:
                    return upstream.exception()
                if server_read is not None and server_read in done:
                    conn.server_first = self._result(server_read)
                    server_read = None
                    break
                if read in done:
                    chunk = self._result(read)
                    read = None
                    if not chunk:
                        conn.client_eof = True
                        break
                    conn.buf += chunk
        finally:
            if read is not None:
                conn.buf += await self._cancel_read(read)
            if server_read is not None:
                conn.server_first += await self._cancel_read(server_read)
        return None

    @staticmethod
    def _result(task: asyncio.Task[bytes]) -> bytes:
        try:
            return task.result()
        except (OSError, asyncio.IncompleteReadError):
            return b""

    @staticmethod
    async def _cancel_read(task: asyncio.Task[bytes]) -> bytes:
        """Cancel a pending read, keeping its bytes if it finished meanwhile."""
        task.cancel()
        try:
            return await task
        except (asyncio.CancelledError, OSError):
            return b""

    @staticmethod
    def _decided(conn: _Conn) -> bool:
        kind = classify_first_bytes(bytes(conn.buf))
        if kind == "tls":
            return parse_client_hello(bytes(conn.buf)).status != "incomplete"
        if kind == "http":
            return parse_http_head(bytes(conn.buf)).complete
        return kind == "other"

    def _verdict(self, conn: _Conn) -> ProxyRule | None:
        data = bytes(conn.buf)
        kind = classify_first_bytes(data)
        rule: ProxyRule | None = None
        what = ""
        if kind == "tls":
            hello = parse_client_hello(data)
            rule = tls_rule_for(self.config.rules, hello.sni)
            what = f"tls sni={hello.sni!r} ({hello.status})"
        elif kind == "http":
            head = parse_http_head(data)
            rule = http_rule_for(self.config.rules, head)
            what = f"http host={head.host!r}"
        else:
            what = f"{kind} ({len(data)} bytes)"
        log.info(
            "proxy: %s -> %s:%d %s: %s",
            conn.client[0], conn.dst[0], conn.dst[1], what, rule.action if rule else "relay",
        )  # fmt: skip
        return rule

    async def _intercept(
        self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Terminate the client's TLS with a rogue certificate for its SNI name.

        The ClientHello was already read (``conn.buf``), so the server side runs on
        memory BIOs fed with those bytes first, then with what the socket brings.
        A client that accepts the certificate gets one small "Intercepted" page.
        """
        name = parse_client_hello(bytes(conn.buf)).sni
        if self.interceptor is None or name is None:
            abort_with_rst(writer)
            return
        try:
            context = self.interceptor.context_for(name)
        except Exception:  # noqa: BLE001 - e.g. a name no certificate can carry
            log.exception("proxy: no rogue certificate for %r", name)
            abort_with_rst(writer)
            return
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        where = f"{conn.client[0]} -> {conn.dst[0]}:{conn.dst[1]} sni={name!r}"
        try:
            obj = context.wrap_bio(incoming, outgoing, server_side=True)
            incoming.write(bytes(conn.buf))
            if conn.client_eof:
                incoming.write_eof()
            async with asyncio.timeout(INTERCEPT_TIMEOUT):
                await _tls_handshake(obj, incoming, outgoing, reader, writer)
                log.info("proxy: %s intercepted, client accepted the rogue certificate", where)
                head = await _tls_read_head(obj, incoming, outgoing, reader, writer)
                if head:
                    body = _INTERCEPT_BODY.format(name=name).encode()
                    obj.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
                        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
                    )
                with contextlib.suppress(ssl.SSLError):
                    obj.unwrap()  # close_notify
                await _flush(outgoing, writer)
        except ssl.SSLError as exc:
            log.info("proxy: %s intercepted, handshake ended: %s", where, exc)
            with contextlib.suppress(OSError):
                await _flush(outgoing, writer)  # e.g. our alert
        except (OSError, TimeoutError) as exc:
            log.info("proxy: %s intercepted, connection ended: %r", where, exc)
        if not writer.is_closing():
            writer.close()

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Keep the client's connection open and answer nothing, until it gives up."""
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(self.config.drop_hold):
                while await reader.read(_CHUNK):
                    pass
        writer.transport.abort()

    async def _blockpage(
        self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Hand the request to the blockpage server and relay its answer instead."""
        address = self.config.blockpage_address
        if address is None:
            abort_with_rst(writer)
            return
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                u_reader, u_writer = await asyncio.open_connection(
                    address, self.config.blockpage_port, limit=_CHUNK * 2
                )
        except (OSError, TimeoutError) as exc:
            log.warning("proxy: blockpage server %s unreachable: %r", address, exc)
            abort_with_rst(writer)
            return
        await self._relay(conn, reader, writer, u_reader, u_writer, None)

    async def _relay(
        self,
        conn: _Conn,
        c_reader: asyncio.StreamReader,
        c_writer: asyncio.StreamWriter,
        u_reader: asyncio.StreamReader,
        u_writer: asyncio.StreamWriter,
        rate: float | None,
    ) -> None:
        """Copy both ways; an error on either side resets both (as a real path would)."""
        if conn.buf:
            u_writer.write(bytes(conn.buf))
        if conn.client_eof and u_writer.can_write_eof():
            with contextlib.suppress(OSError):
                u_writer.write_eof()
        pumps: set[asyncio.Task[None]] = set()
        if not conn.client_eof:
            pumps.add(asyncio.create_task(_pump(c_reader, u_writer, None)))
        pumps.add(asyncio.create_task(_pump(u_reader, c_writer, rate)))
        try:
            while pumps:
                done, pumps = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
                if any(t.exception() is not None for t in done):
                    abort_with_rst(c_writer)
                    abort_with_rst(u_writer)
                    return
        finally:
            for task in pumps:
                task.cancel()
            if pumps:
                await asyncio.gather(*pumps, return_exceptions=True)
            for w in (c_writer, u_writer):
                if not w.is_closing():
                    w.close()


async def _flush(outgoing: ssl.MemoryBIO, writer: asyncio.StreamWriter) -> None:
    """Send whatever TLS produced (records, alerts) to the client."""
    pending = outgoing.read()
    if pending and not writer.is_closing():
        writer.write(pending)
        await writer.drain()


async def _feed(incoming: ssl.MemoryBIO, reader: asyncio.StreamReader) -> None:
    """Move the client's next bytes into the TLS object (EOF included)."""
    if incoming.eof:
        raise ConnectionAbortedError("the client closed the connection")
    data = await reader.read(_CHUNK)
    if data:
        incoming.write(data)
    else:
        incoming.write_eof()


async def _tls_handshake(
    obj: ssl.SSLObject,
    incoming: ssl.MemoryBIO,
    outgoing: ssl.MemoryBIO,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """Drive a memory-BIO handshake over the client's stream until it completes."""
    while True:
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            await _flush(outgoing, writer)
            await _feed(incoming, reader)
            continue
        await _flush(outgoing, writer)
        return


async def _tls_read_head(
    obj: ssl.SSLObject,
    incoming: ssl.MemoryBIO,
    outgoing: ssl.MemoryBIO,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> bytes:
    """Decrypt the client's first request head (up to MAX_INSPECT bytes; b"" if none)."""
    data = b""
    while b"\r\n\r\n" not in data and len(data) < MAX_INSPECT:
        try:
            chunk = obj.read(_CHUNK)
        except ssl.SSLWantReadError:
            await _flush(outgoing, writer)
            await _feed(incoming, reader)
            continue
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            break
        if not chunk:
            break
        data += chunk
    return data


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, rate: float | None) -> None:
    """Copy until EOF, at most ``rate`` bytes per second if set, then half-close ``dst``."""
    loop = asyncio.get_running_loop()
    size = _CHUNK if rate is None else max(1, min(_CHUNK, int(rate / 20)))
    start = loop.time()
    sent = 0
    while True:
        data = await src.read(size)
        if not data:
            break
        dst.write(data)
        await dst.drain()
        if rate is not None:
            sent += len(data)
            delay = start + sent / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
    if dst.can_write_eof() and not dst.is_closing():
        with contextlib.suppress(OSError):
            dst.write_eof()
