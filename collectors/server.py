"""What stands in front of the collector's app: read timeouts per connection, a cap on
connections per address, and a cap on requests being handled.

uvicorn waits for a request's headers (and body) as long as the client likes, and its
``limit_concurrency`` counts *connections*: 128 idle or half-sent connections made
every other request answer 503. Here instead:

- :class:`GuardedH11Protocol` (uvicorn's h11 protocol, given to it as ``http=``) closes
  a connection that takes more than ``header_timeout`` seconds to send a request's
  headers (an idle keep-alive connection included) or more than ``body_timeout`` to
  send its body, and refuses more than ``connections_per_address`` connections from
  one peer address (trusted proxies excepted);
- :class:`ActiveRequests` (an ASGI middleware) answers 503 beyond
  ``max_active_requests`` requests being handled at once: only requests whose headers
  have arrived count, so idle and half-sent connections cost nothing.

>>> config = uvicorn.Config(ActiveRequests(app, RequestCount(128)), http=protocol_for(settings))
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import h11
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from collectors.settings import CollectorSettings, IPNetwork

log = logging.getLogger("vantage.collector.server")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with header and body read timeouts and a cap on
    connections per peer address. The limits are class attributes:
    :func:`protocol_for` makes a subclass holding a collector's settings."""

    header_timeout: ClassVar[float] = CollectorSettings.header_timeout
    body_timeout: ClassVar[float] = CollectorSettings.body_timeout
    per_address: ClassVar[int] = CollectorSettings.connections_per_address
    exempt: ClassVar[tuple[IPNetwork, ...]] = ()
    #: Open connections per peer address, shared by one server's connections.
    open_per_address: ClassVar[dict[str, int]] = {}

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._guard: asyncio.TimerHandle | None = None
        self._guarding: object = None
        self._peer = self.client[0] if self.client else None
        if self._peer is not None and not self._is_exempt(self._peer):
            n = self.open_per_address.get(self._peer, 0) + 1
            self.open_per_address[self._peer] = n
            if n > self.per_address:
                log.warning("an address holds %d connections already: one refused", n - 1)
                transport.close()
                return
        else:
            self._peer = None  # not counted
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._peer is not None:
            n = self.open_per_address.get(self._peer, 1) - 1
            if n > 0:
                self.open_per_address[self._peer] = n
            else:
                self.open_per_address.pop(self._peer, None)
            self._peer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def _is_exempt(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in net for net in self.exempt)

    def _watch(self) -> None:
        """Arm the timer the client's state calls for: waiting for headers (h11's IDLE:
        nothing or part of a request line and headers received), or for the body
        (SEND_BODY). A timer runs from when the state began, however the bytes trickle."""
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            self._arm(state, self.header_timeout)
        elif state is h11.SEND_BODY:
            self._arm(state, self.body_timeout)
        else:
            self._disarm()

    def _arm(self, state: object, seconds: float) -> None:
        if self._guarding is state:
            return
        self._disarm()
        self._guarding = state
        self._guard = self.loop.call_later(seconds, self._expired, state)

    def _disarm(self) -> None:
        if self._guard is not None:
            self._guard.cancel()
        self._guard = None
        self._guarding = None

    def _expired(self, state: object) -> None:
        self._guard = None
        self._guarding = None
        if self.transport.is_closing() or self.conn.their_state is not state:
            return
        what = "headers" if state is h11.IDLE else "body"
        log.info("a connection took too long to send its request's %s: closed", what)
        self.transport.close()


def protocol_for(settings: CollectorSettings) -> type[GuardedH11Protocol]:
    """A protocol class with ``settings``' limits (one per server: its own counts)."""
    return type(
        "CollectorProtocol",
        (GuardedH11Protocol,),
        {
            "header_timeout": settings.header_timeout,
            "body_timeout": settings.body_timeout,
            "per_address": settings.connections_per_address,
            "exempt": tuple(settings.trusted_proxies),
            "open_per_address": {},
        },
    )


class EnvironmentProtocol(GuardedH11Protocol):
    """The protocol of ``vantage collector serve --workers N``: each worker process
    imports it by name and takes its limits from ``VANTAGE_COLLECTOR_*``."""

    _loaded: ClassVar[bool] = False

    def __init__(self, *args: Any, **kw: Any) -> None:
        cls = type(self)
        if not cls._loaded:
            s = CollectorSettings.from_env(os.environ)
            cls.header_timeout, cls.body_timeout = s.header_timeout, s.body_timeout
            cls.per_address, cls.exempt = s.connections_per_address, tuple(s.trusted_proxies)
            cls.open_per_address = {}
            cls._loaded = True
        super().__init__(*args, **kw)


class RequestCount:
    """Requests being handled, against ``limit``; a request may step aside while it
    only waits (:meth:`aside`: a refusal held back, see collectors.ingest), so that
    waiting costs no one else a place. Used from the event loop's thread only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.aside_now = 0

    @contextlib.asynccontextmanager
    async def aside(self) -> AsyncIterator[None]:
        self.active -= 1
        self.aside_now += 1
        try:
            yield
        finally:
            self.aside_now -= 1
            self.active += 1


class ActiveRequests:
    """An ASGI middleware: at most ``count.limit`` HTTP requests handled at once;
    beyond it 503 ``{"error": ...}`` with ``Retry-After: 1``. Lifespan passes through."""

    def __init__(self, app: ASGIApp, count: RequestCount) -> None:
        self.app = app
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        count = self.count
        if count.active >= count.limit:
            body = b'{"error":"the collector is handling too many requests; try again soon"}'
            await send({
                "type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                            (b"content-length", str(len(body)).encode())],
            })  # fmt: skip
            await send({"type": "http.response.body", "body": body})
            return
        count.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            count.active -= 1
