"""TLS handshake with SNI on an already connected socket, keeping the chain.

The handshake runs over :class:`ssl.MemoryBIO` on the measured TCP connection, so
what the TLS step sees is exactly what that connection carried, and the peer's
certificate chain is kept even when validation fails (interception evidence).
Validation uses the context's trust store: the system CAs plus any CA the target
or ``--ca-bundle`` adds.
"""

from __future__ import annotations

import _ssl
import ssl
from typing import TYPE_CHECKING

from probe.engine.connection import Session
from probe.engine.failures import SetupError
from probe.engine.tcp import Stream
from probe.engine.trace import Trace
from schema.model import TLSHandshake

if TYPE_CHECKING:
    from probe.engine.context import EngineContext

_ENCODING_DER = getattr(_ssl, "ENCODING_DER", 2)
_READ_SIZE = 65536


def _peer_chain(obj: ssl.SSLObject) -> list[bytes]:
    # Python 3.13 makes this public; 3.11 and 3.12 expose it on the C object.
    getter = getattr(obj, "get_unverified_chain", None) or getattr(
        getattr(obj, "_sslobj", None), "get_unverified_chain", None
    )
    if getter is None:
        return []
    try:
        chain = getter() or []
    except (ssl.SSLError, ValueError):
        return []
    out: list[bytes] = []
    for cert in chain:
        der = cert.public_bytes(_ENCODING_DER) if hasattr(cert, "public_bytes") else cert
        out.append(bytes(der))
    return out


async def _drive(
    obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, stream: Stream
) -> None:
    reader, writer = stream
    while True:
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        else:
            pending = outgoing.read()
            if pending:  # e.g. the client Finished of TLS 1.3
                writer.write(pending)
                await writer.drain()
            return
        pending = outgoing.read()
        if pending:
            writer.write(pending)
            await writer.drain()
        data = await reader.read(_READ_SIZE)
        if not data:
            incoming.write_eof()
        else:
            incoming.write(data)


async def handshake(
    stream: Stream,
    ip: str,
    port: int,
    server_name: str,
    ctx: EngineContext,
    trace: Trace,
    extra_ca: str | None = None,
    record: list[TLSHandshake] | None = None,
    *,
    purpose: str = "tls",
    sessions: list[Session] | None = None,
) -> TLSHandshake:
    """Handshake over ``stream`` with SNI ``server_name`` and validate the peer.

    ``purpose``: the context's ALPN (``ctx.ssl_context``): "tls" offers h2 and
    http/1.1 as a browser does; "tls-http" only http/1.1, for a session the HTTP
    request will then use. ``sessions``: a handshake that succeeded appends its
    session there, for the request to ride on (probe.engine.connection)."""
    obs = TLSHandshake(ip=ip, port=port, server_name=server_name, t0=trace.now(), t=0.0)
    if record is not None:
        record.append(obs)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj: ssl.SSLObject | None = None
    try:
        # The context and the SSL object are made inside the step: a CA file that
        # does not load or a name TLS refuses is a failure of this step, not a crash.
        async with trace.step(obs, "tls_handshake", ctx.timeouts.tls):
            obj = _wrap(ctx, extra_ca, server_name, incoming, outgoing, purpose)
            await _drive(obj, incoming, outgoing, stream)
            obs.tls_version = obj.version()
            cipher = obj.cipher()
            obs.cipher_suite = cipher[0] if cipher else None
            obs.negotiated_protocol = obj.selected_alpn_protocol()
    finally:  # the chain is evidence whether or not it validated
        obs.peer_certificates = _peer_chain(obj) if obj is not None else []
    if obs.failure is None and obj is not None and sessions is not None:
        sessions.append(Session(obj, incoming, outgoing))
    return obs


def _wrap(
    ctx: EngineContext,
    extra_ca: str | None,
    server_name: str,
    incoming: ssl.MemoryBIO,
    outgoing: ssl.MemoryBIO,
    purpose: str = "tls",
) -> ssl.SSLObject:
    context = ctx.ssl_context(purpose, extra_ca)  # raises SetupError itself
    try:
        return context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    except (UnicodeError, ValueError) as exc:  # e.g. ".example.com": an empty label
        raise SetupError(
            f"server name {server_name!r} cannot be sent: {type(exc).__name__}: {exc}"
        ) from exc
