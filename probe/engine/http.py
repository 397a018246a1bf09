"""HTTP(S) with httpx, sent to the address that was measured.

The request goes to the address chosen by the engine (the one whose connect and
handshake were measured) while Host and SNI carry the name, through httpcore's
network-backend seam. Nothing here is resolved by the system: the backend refuses
any host it has no pinned address for.

Redirects are followed here, not by httpx, so that every hop is kept with its own
timings, headers and (truncated) body, and so that a redirect cannot take the probe
off the measured path: a new host is resolved with the engine's own resolvers (the
queries are recorded with the measurement), and a redirect to a non-public address
(by name or as an IP literal) is refused with ``dns_bogon_error``. A Location that
is not a usable http(s) URL ends the chain with ``http_request_failed``, keeping the
hop's status and headers.

Bodies are read raw and decoded here with bounded output (:mod:`probe.engine.content`),
to the end or up to ``body_read_limit`` (raw bytes read and decoded bytes kept alike),
to record their length and SHA-256; only the first ``body_keep`` bytes are stored.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import httpcore
import httpx

from probe.engine import dns
from probe.engine.connection import MeasuredStream
from probe.engine.content import BodyDecoder
from probe.engine.dns import is_ip
from probe.engine.failures import http_operation
from probe.engine.trace import Trace
from schema.model import DNSQuery, HTTPTransaction

if TYPE_CHECKING:
    from probe.engine.context import EngineContext

_REDIRECTS = {301, 302, 303, 307, 308}
_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
#: The measurement annotation that lists bodies kept raw (not decoded), per URL.
BODY_ENCODING_NOTE = "http_body_encoding"


def host_key(host: str) -> str:
    """A host as httpcore connects to it: IDNA (ASCII) form, lower case, IPv6 bare."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if bare.isascii():
        return bare.lower()
    try:
        raw = httpx.URL(scheme="http", host=bare, path="/").raw_host
        return raw.decode("ascii").lower()
    except (httpx.InvalidURL, UnicodeError, ValueError):
        return bare.lower()


def url_host_key(url: str) -> str | None:
    """The :func:`host_key` of a URL's host as httpx will send it (None: no usable URL)."""
    try:
        return httpx.URL(url).raw_host.decode("ascii").lower() or None
    except (httpx.InvalidURL, UnicodeError, ValueError):
        return None


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """Connect to the address pinned for each host; refuse hosts without a pin.

    Pins are keyed by :func:`host_key` (what httpcore passes to ``connect_tcp``).
    An IP-literal host must be pinned too (to itself): nothing is dialled that the
    engine did not choose.
    """

    def __init__(self, pins: dict[str, str], handover: MeasuredStream | None = None) -> None:
        self._pins = {host_key(k): v for k, v in pins.items()}
        self._inner = httpcore.AnyIOBackend()
        self._handover = handover

    def pin(self, host: str, address: str) -> None:
        self._pins[host_key(host)] = address

    def address_for(self, host: str) -> str | None:
        return self._pins.get(host_key(host))

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        address = self._pins.get(host.lower())
        if address is None:
            raise httpcore.ConnectError(
                f"no measured address for {host!r}: not connecting (never resolved by the system)"
            )
        measured = self._handover
        if measured is not None and (measured.host, measured.port) == (address, port):
            # The connection the TCP and TLS steps measured: the request rides on it.
            self._handover = None
            if not measured.closed:
                return measured
        return await self._inner.connect_tcp(
            address,
            port,
            timeout=timeout,
            local_address=local_address,
            socket_options=socket_options,
        )

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not measured")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class PinnedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with its connection pool built on :class:`PinnedBackend`.

    httpx has no public argument for a network backend, so the pool it built is
    replaced by an identical one that has it (httpcore's documented seam).
    """

    def __init__(self, pins: dict[str, str] | PinnedBackend, ssl_context: Any) -> None:
        super().__init__(verify=ssl_context)
        self.backend = pins if isinstance(pins, PinnedBackend) else PinnedBackend(pins)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=4,
            http1=True,
            http2=False,
            network_backend=self.backend,
        )


def _decode_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]


def _measured_connection(response: httpx.Response) -> int | None:
    stream = response.extensions.get("network_stream")
    number = stream.get_extra_info("measured_connection") if stream is not None else None
    return number if isinstance(number, int) else None


def _server_address(response: httpx.Response) -> str | None:
    stream = response.extensions.get("network_stream")
    if stream is None:
        return None
    peer = stream.get_extra_info("server_addr")
    return str(peer[0]) if peer else None


async def _read_body(
    response: httpx.Response, tx: HTTPTransaction, ctx: EngineContext, notes: list[str]
) -> None:
    """Read the body raw, decode it with bounded output, and record length and hash.

    At most ``body_read_limit`` raw bytes are read and at most ``body_read_limit``
    decoded bytes are counted; when either cap is hit the body is truncated and
    its length and hash are those of the decoded bytes up to the cap.
    """
    decoder = BodyDecoder(response.headers.get("content-encoding"))
    if decoder.note is not None:
        notes.append(f"{tx.url}: {decoder.note}")
    limit = ctx.body_read_limit
    digest = hashlib.sha256()
    kept = bytearray()
    length = read = 0
    capped = False
    async for chunk in response.aiter_raw():
        if read + len(chunk) >= limit:
            chunk, capped = chunk[: limit - read], True
        read += len(chunk)
        piece = decoder.decode(chunk, limit - length)
        length += len(piece)
        digest.update(piece)
        if len(kept) < ctx.body_keep:
            kept += piece[: ctx.body_keep - len(kept)]
        tx.body_length = length  # keep partial figures if the transfer fails
        if capped or length >= limit:
            capped = True
            break  # enough read: the length is then a lower bound
    tx.body = bytes(kept)
    tx.body_length = length
    tx.body_is_truncated = capped or length > len(kept)
    tx.body_sha256 = digest.hexdigest()


def _redirect_target(current: httpx.URL, location: str) -> httpx.URL | None:
    """The URL a Location header points to, or None when it is not a usable http(s) URL."""
    try:
        target = current.join(location)
        port = target.port
        host = target.raw_host.decode("ascii")
    except (httpx.InvalidURL, UnicodeError, ValueError):
        return None
    if target.scheme not in ("http", "https") or not host:
        return None
    if port is not None and not 0 < port < 65536:
        return None
    return target


async def _route(
    current: httpx.URL,
    first: bool,
    backend: PinnedBackend,
    ctx: EngineContext,
    trace: Trace,
    queries: list[DNSQuery] | None,
    doh_client: httpx.AsyncClient | None,
) -> str | None:
    """Pin ``current``'s host to an address; return a failure string when refused.

    A pinned host keeps its pin (the measured address). An IP literal is its own
    address; after a redirect it must be public. A name is resolved with the
    engine's resolvers (recorded in ``queries``) and pinned to the first public
    address; bogon answers are refused.
    """
    host = current.raw_host.decode("ascii").lower()
    if backend.address_for(host) is not None:
        return None
    if is_ip(host):
        if not first and ctx.is_bogon(host):
            return "dns_bogon_error"
        backend.pin(host, host)
        return None
    found = await dns.resolve(host, ctx, trace, doh_client, record=queries)
    usable = [a for a in dns.usable_addresses(found) if not ctx.is_bogon(a)]
    if usable:
        backend.pin(host, usable[0])
        return None
    failures = [q.failure for q in found if q.failure is not None]
    if "dns_bogon_error" in failures or any(ctx.is_bogon(a) for q in found for a in q.addresses()):
        return "dns_bogon_error"
    return failures[0] if failures else "dns_no_answer"


async def fetch(
    url: str,
    ctx: EngineContext,
    trace: Trace,
    *,
    pins: dict[str, str] | None = None,
    handover: MeasuredStream | None = None,
    method: str = "GET",
    body: str | None = None,
    extra_ca: str | None = None,
    record: list[HTTPTransaction] | None = None,
    queries: list[DNSQuery] | None = None,
    doh_client: httpx.AsyncClient | None = None,
    annotations: dict[str, str] | None = None,
) -> list[HTTPTransaction]:
    """Fetch ``url`` following at most ``ctx.max_redirects`` redirects.

    ``pins`` maps host names (any form; IDNs are keyed by their ASCII form) to the
    measured address to use. Hosts reached by redirect are resolved with the
    engine's resolvers; those DNS observations are appended to ``queries``. Bodies
    kept raw (an encoding not decoded) are listed in
    ``annotations[BODY_ENCODING_NOTE]``. ``handover``: the connection the TCP and TLS
    steps measured, used for the first request to its address and port (each hop
    records the number of the measured connection it went over, if any).
    """
    hops: list[HTTPTransaction] = record if record is not None else []
    backend = PinnedBackend(pins or {}, handover)
    transport: PinnedTransport | None = None
    cookies = httpx.Cookies()
    headers = [
        ("Accept-Encoding", "gzip, deflate"),
        ("Connection", "keep-alive"),
        ("User-Agent", ctx.user_agent),
        ("Accept", _ACCEPT),
        ("Accept-Language", "en-US,en;q=0.9"),
    ]
    timeout = {"timeout": httpx.Timeout(ctx.timeouts.http).as_dict()}
    content = body.encode("utf-8") if body is not None else None
    notes: list[str] = []
    target: str | httpx.URL = url
    try:
        for hop in range(ctx.max_redirects + 1):
            tx = HTTPTransaction(url=str(target), method=method, t0=trace.now(), t=0.0)
            hops.append(tx)
            request: httpx.Request | None = None
            async with trace.step(tx, "http_round_trip", None):
                current = httpx.URL(target)  # a redirect target is already a checked URL
                tx.url = str(current)
                request = httpx.Request(
                    method, current, headers=headers, content=content, cookies=cookies,
                    extensions=timeout,
                )  # fmt: skip
                tx.request_headers = _decode_headers(request.headers.raw)
            if request is None:
                return hops
            refused: str | None = None
            async with trace.step(tx, "resolve", None):
                refused = await _route(
                    request.url, hop == 0, backend, ctx, trace, queries, doh_client
                )
            if tx.failure is not None or refused is not None:
                # Nothing was sent: the host could not be resolved or is not public.
                if tx.failure is None:
                    tx.failure, tx.failed_operation = refused, "resolve"
                return hops
            tx.address = backend.address_for(request.url.raw_host.decode("ascii"))
            response = None

            def failed_operation(exc: BaseException, tx: HTTPTransaction = tx) -> str:
                return http_operation(exc, "read" if tx.status else "http_round_trip")

            try:
                async with trace.step(tx, failed_operation, ctx.timeouts.http):
                    if transport is None:  # the trust store is loaded inside a step
                        transport = PinnedTransport(backend, ctx.ssl_context("http", extra_ca))
                    # Sent through the transport, not httpx's client, whose redirect
                    # handling raises on a bad Location and loses the response.
                    response = await transport.handle_async_request(request)
                    response.request = request
                    cookies.extract_cookies(response)
                    tx.status = response.status_code
                    tx.response_headers = _decode_headers(response.headers.raw)
                    tx.address = _server_address(response) or tx.address
                    tx.connection = _measured_connection(response)
                    await _read_body(response, tx, ctx, notes)
            finally:
                if response is not None:
                    await response.aclose()
            if tx.failure is not None or response is None:
                return hops
            location = response.headers.get("location")
            if tx.status not in _REDIRECTS or not location:
                return hops
            if hop == ctx.max_redirects:
                # The chain did not end within the limit: the fetch as a whole failed.
                tx.failure, tx.failed_operation = "http_request_failed", "http_round_trip"
                return hops
            following = _redirect_target(request.url, location)
            if following is None:
                # A Location that is no usable http(s) URL: the chain fails here, and
                # this hop keeps its status and headers as evidence.
                tx.failure, tx.failed_operation = "http_request_failed", "http_round_trip"
                return hops
            target = following
            if tx.status == 303 or (tx.status in (301, 302) and method == "POST"):
                method, content = "GET", None
    finally:
        if transport is not None:
            await transport.aclose()
        if notes and annotations is not None:
            previous = annotations.get(BODY_ENCODING_NOTE)
            annotations[BODY_ENCODING_NOTE] = "; ".join(([previous] if previous else []) + notes)
    return hops
