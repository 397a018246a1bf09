"""HTTP(S) with httpx, sent to the address that was measured.

The request goes to the address chosen by the engine (the one whose connect and
handshake were measured) while Host and SNI carry the name, through httpcore's
network-backend seam. Redirects are followed here, not by httpx, so that every hop
is kept with its own timings, headers and (truncated) body. Bodies are read to the
end (up to ``body_read_limit``) to record their full length and SHA-256; only the
first ``body_keep`` bytes are stored.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import httpcore
import httpx

from probe.engine.failures import http_operation
from probe.engine.trace import Trace
from schema.model import HTTPTransaction

if TYPE_CHECKING:
    from probe.engine.context import EngineContext

_REDIRECTS = {301, 302, 303, 307, 308}


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """Connect to a fixed address for the names in ``pins``; others resolve normally."""

    def __init__(self, pins: dict[str, str]) -> None:
        self._pins = {k.lower(): v for k, v in pins.items()}
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        address = self._pins.get(host.lower(), host)
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

    def __init__(self, pins: dict[str, str], ssl_context: Any) -> None:
        super().__init__(verify=ssl_context)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=4,
            http1=True,
            http2=False,
            network_backend=PinnedBackend(pins),
        )


def _decode_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]


def _server_address(response: httpx.Response) -> str | None:
    stream = response.extensions.get("network_stream")
    if stream is None:
        return None
    peer = stream.get_extra_info("server_addr")
    return str(peer[0]) if peer else None


async def _read_body(response: httpx.Response, tx: HTTPTransaction, ctx: EngineContext) -> None:
    digest = hashlib.sha256()
    kept = bytearray()
    length = 0
    async for chunk in response.aiter_bytes():
        length += len(chunk)
        digest.update(chunk)
        if len(kept) < ctx.body_keep:
            kept += chunk[: ctx.body_keep - len(kept)]
        if length >= ctx.body_read_limit:
            break  # enough read: the length is then a lower bound
        tx.body_length = length  # keep partial figures if the transfer fails
    tx.body = bytes(kept)
    tx.body_length = length
    tx.body_is_truncated = length > len(kept) or length >= ctx.body_read_limit
    tx.body_sha256 = digest.hexdigest()


async def fetch(
    url: str,
    ctx: EngineContext,
    trace: Trace,
    *,
    pins: dict[str, str] | None = None,
    method: str = "GET",
    body: str | None = None,
    extra_ca: str | None = None,
    record: list[HTTPTransaction] | None = None,
) -> list[HTTPTransaction]:
    """Fetch ``url`` following at most ``ctx.max_redirects`` redirects."""
    hops: list[HTTPTransaction] = record if record is not None else []
    transport = PinnedTransport(pins or {}, ctx.ssl_context("http", extra_ca))
    headers = {
        "User-Agent": ctx.user_agent,
        "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        "Accept-Language": "en-US,en;q=0.9",
    }
    timeout = httpx.Timeout(ctx.timeouts.http)
    async with httpx.AsyncClient(transport=transport, timeout=timeout, headers=headers) as client:
        current = httpx.URL(url)
        content = body.encode("utf-8") if body is not None else None
        for hop in range(ctx.max_redirects + 1):
            request = client.build_request(method, current, content=content)
            tx = HTTPTransaction(
                url=str(current),
                method=method,
                request_headers=_decode_headers(request.headers.raw),
                address=(pins or {}).get(current.host) or current.host,
                t0=trace.now(),
                t=0.0,
            )
            hops.append(tx)
            response = None

            def failed_operation(exc: BaseException, tx: HTTPTransaction = tx) -> str:
                return http_operation(exc, "read" if tx.status else "http_round_trip")

            try:
                async with trace.step(tx, failed_operation, ctx.timeouts.http):
                    response = await client.send(request, stream=True)
                    tx.status = response.status_code
                    tx.response_headers = _decode_headers(response.headers.raw)
                    tx.address = _server_address(response) or tx.address
                    await _read_body(response, tx, ctx)
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
            current = current.join(location)
            if tx.status == 303 or (tx.status in (301, 302) and method == "POST"):
                method, content = "GET", None
    return hops
