"""A measured connection handed to httpx: the HTTP request rides on the very TCP
connection (and TLS session) whose connect and handshake were recorded.

OONI's experiments send the request over the measured connection; so does Vantage.
Without this, an HTTPS target cost two connections and two handshakes: twice the
traffic a censor sees from the volunteer, and a response that did not come over the
connection whose certificate was kept.

:class:`MeasuredStream` is an ``httpcore.AsyncNetworkStream`` over the asyncio stream
of the TCP step and, for HTTPS, the ``ssl.SSLObject`` (memory BIOs) the TLS step
handshook: ``start_tls`` returns the stream itself, already TLS with the measured SNI.
:class:`probe.engine.http.PinnedBackend` hands it out once, for the host and port it
was measured for; every other connection is dialled as before (and measured by the
redirect's own steps). Each observation carries the connection's number
(``connection``), so an analyst can tie a response to its connect and handshake.

Errors are raised as httpcore's own network backend raises them: timeouts as
``httpcore.ReadTimeout``/``WriteTimeout``, an ``OSError`` (a reset, ``ssl.SSLError``)
as it is, since httpcore's pool drops the cause of the errors it re-raises. The one
failure mapping (:mod:`probe.engine.failures`) then classifies them as before.
"""

from __future__ import annotations

import asyncio
import select
import ssl
from dataclasses import dataclass
from typing import Any

import httpcore

from probe.engine.tcp import Stream, close

_READ_SIZE = 65536


@dataclass
class Session:
    """A TLS session made by the TLS step over memory BIOs."""

    obj: ssl.SSLObject
    incoming: ssl.MemoryBIO
    outgoing: ssl.MemoryBIO


class MeasuredStream(httpcore.AsyncNetworkStream):
    """The measured TCP connection (and TLS session) as an httpcore network stream."""

    def __init__(
        self, stream: Stream, number: int, host: str, port: int, session: Session | None = None
    ) -> None:
        self.reader, self.writer = stream
        self.number = number
        self.host = host
        self.port = port
        self.session = session
        self.closed = False

    # -- httpcore's interface --

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            return await asyncio.wait_for(self._read(max_bytes), timeout)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(f"no data for {timeout} s") from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            await asyncio.wait_for(self._write(buffer), timeout)
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(f"could not send for {timeout} s") from exc

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.session is not None:
            try:  # close_notify, best effort: the peer may be gone
                self.session.obj.unwrap()
            except (ssl.SSLError, ValueError):
                pass
            pending = self.session.outgoing.read()
            if pending and not self.writer.is_closing():
                self.writer.write(pending)
        await close((self.reader, self.writer))

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if self.session is None:
            raise httpcore.ConnectError("a plain measured connection cannot be upgraded to TLS")
        return self  # handshook already, with the measured name, by the TLS step

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self.session.obj if self.session is not None else None
        if info == "server_addr":
            return self.writer.get_extra_info("peername")
        if info == "client_addr":
            return self.writer.get_extra_info("sockname")
        if info == "socket":
            return self.writer.get_extra_info("socket")
        if info == "is_readable":
            return self._is_readable()
        if info == "measured_connection":
            return self.number
        return None

    # -- the bytes --

    async def _read(self, max_bytes: int) -> bytes:
        if self.session is None:
            return await self.reader.read(max_bytes)
        s = self.session
        while True:
            try:
                return s.obj.read(max_bytes)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                return b""  # close_notify: the end of the stream
            await self._flush()  # e.g. a key update answered
            data = await self.reader.read(_READ_SIZE)
            if data:
                s.incoming.write(data)
            else:
                s.incoming.write_eof()

    async def _write(self, buffer: bytes) -> None:
        if self.session is None:
            self.writer.write(buffer)
            await self.writer.drain()
            return
        self.session.obj.write(buffer)
        await self._flush()

    async def _flush(self) -> None:
        if self.session is None:
            return
        pending = self.session.outgoing.read()
        if pending:
            self.writer.write(pending)
            await self.writer.drain()

    def _is_readable(self) -> bool:
        """True when the idle connection has something to read (the peer closed it or
        sent data unasked): httpcore then does not reuse it."""
        if self.session is not None and self.session.obj.pending():
            return True
        if self.reader.at_eof() or len(getattr(self.reader, "_buffer", b"")):
            return True
        sock = self.writer.get_extra_info("socket")
        if sock is None:
            return True
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)


__all__ = ["MeasuredStream", "Session"]
