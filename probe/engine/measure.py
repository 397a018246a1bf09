"""One target, measured once: DNS, then TCP, TLS and HTTP as the target asks.

Steps record observations as they start, so a measurement cut short (the run's
deadline, Ctrl-C) still says what it was doing: the step in progress is recorded
as ``interrupted`` and the measurement is returned, not lost.
"""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import urlsplit

import httpx

from probe.engine import dns, http, tcp, tls
from probe.engine.connection import MeasuredStream, Session
from probe.engine.context import EngineContext
from probe.engine.dns import is_ip
from probe.engine.trace import Trace
from schema.model import Measurement, Target, VantagePoint


def target_ports(target: Target) -> tuple[int, ...]:
    """The ports a target is measured on: its own, or the URL's."""
    if target.ports:
        return target.ports
    if target.url:
        parts = urlsplit(target.url)
        return (parts.port or (443 if parts.scheme == "https" else 80),)
    return (443,) if target.kind == "tls" else ()


def uses_tls(target: Target) -> bool:
    if target.kind == "tls":
        return True
    return target.kind == "http" and urlsplit(target.url or "").scheme == "https"


#: Handshake failures that may be SNI filtering, which the A/B test can tell apart.
_INTERFERENCE = {"connection_reset", "eof_error", "generic_timeout_error", "ssl_failed_handshake"}


async def _endpoint(
    m: Measurement,
    ip: str,
    port: int,
    ctx: EngineContext,
    trace: Trace,
    want_tls: bool,
    keep: bool = False,
) -> tuple[bool, MeasuredStream | None]:
    """Connect (and handshake); True when the endpoint got through every step, and,
    with ``keep``, the connection itself for the HTTP request to use (the caller then
    owns it and must close it).

    When the handshake with the target's name is cut off, the same address is asked
    again with a harmless name (``ctx.control_sni``): if that one gets an answer,
    the name was filtered (the SNI A/B test); the second handshake is recorded with
    ``purpose = "control_sni"``.
    """
    conn, stream = await tcp.connect(ip, port, ctx, trace, m.tcp_connect)
    if conn.failure == "generic_timeout_error":
        # Every SYN of the attempt was lost. Once more, as a second observation: on a
        # lossy link a second run of SYNs gets through, while a censor drops it too
        # (two timeouts in a row are what the verdict can call a drop).
        conn, stream = await tcp.connect(ip, port, ctx, trace, m.tcp_connect)
    number = conn.connection or 0
    if stream is None:
        return False, None
    handed: MeasuredStream | None = None
    try:
        if not want_tls:
            if keep and conn.success:
                handed = MeasuredStream(stream, number, ip, port)
            return conn.success, handed
        sessions: list[Session] = []
        hs = await tls.handshake(
            stream, ip, port, m.target.server_name, ctx, trace, m.target.ca_file,
            m.tls_handshakes, purpose="tls-http" if keep else "tls", sessions=sessions,
        )  # fmt: skip
        hs.connection = number
        if keep and sessions and hs.negotiated_protocol in (None, "http/1.1"):
            handed = MeasuredStream(stream, number, ip, port, sessions[0])
    finally:
        if handed is None:
            await tcp.close(stream)
    if hs.failure in _INTERFERENCE and ctx.control_sni and ctx.control_sni != hs.server_name:
        await _control_sni(m, ip, port, ctx, trace)
    return hs.failure is None, handed


async def _control_sni(
    m: Measurement, ip: str, port: int, ctx: EngineContext, trace: Trace
) -> None:
    assert ctx.control_sni is not None
    _, stream = await tcp.connect(ip, port, ctx, trace)  # not a target connect: not recorded
    if stream is None:
        return
    try:
        control = await tls.handshake(stream, ip, port, ctx.control_sni, ctx, trace)
        control.purpose = "control_sni"
        m.tls_handshakes.append(control)
    finally:
        await tcp.close(stream)


async def _measure_steps(
    m: Measurement, ctx: EngineContext, trace: Trace, doh_client: httpx.AsyncClient | None
) -> None:
    target = m.target
    addresses = list(target.addresses)
    if not is_ip(target.host):
        queries = await dns.resolve(target.host, ctx, trace, doh_client, record=m.queries)
        addresses += dns.usable_addresses(queries)
    elif target.host not in addresses:
        addresses.insert(0, target.host)
    if target.kind == "dns":
        return
    addresses = list(dict.fromkeys(addresses))[: ctx.max_addresses]
    ports = target_ports(target)
    want_tls = uses_tls(target)
    endpoints = [(ip, port) for ip in addresses for port in ports]
    keep = target.kind == "http" and bool(target.url)
    kept: list[MeasuredStream] = []
    try:
        await _connect_and_fetch(m, ctx, trace, doh_client, endpoints, want_tls, keep, kept)
    finally:  # whatever the request did not use, or left open, an interruption included
        for stream in kept:
            await stream.aclose()


async def _connect_and_fetch(
    m: Measurement,
    ctx: EngineContext,
    trace: Trace,
    doh_client: httpx.AsyncClient | None,
    endpoints: list[tuple[str, int]],
    want_tls: bool,
    keep: bool,
    kept: list[MeasuredStream],
) -> None:
    target = m.target

    async def endpoint(ip: str, port: int) -> tuple[bool, MeasuredStream | None]:
        ok, stream = await _endpoint(m, ip, port, ctx, trace, want_tls, keep)
        if stream is not None:
            kept.append(stream)
        return ok, stream

    outcomes = await asyncio.gather(*(endpoint(ip, port) for ip, port in endpoints))
    handover = next((s for ok, s in outcomes if ok and s is not None), None)
    for _, s in outcomes:  # the connections the request will not use
        if s is not None and s is not handover:
            await s.aclose()
    if not keep or target.url is None:
        return
    reachable = [ep for ep, (ok, _) in zip(endpoints, outcomes, strict=True) if ok]
    if handover is not None:  # the request goes over the first measured connection
        reachable.remove((handover.host, handover.port))
        reachable.insert(0, (handover.host, handover.port))
    if not reachable:
        return  # nothing got through: the TCP/TLS observations already say why
    # Pinned by the name as httpx sends it (an IDN by its ASCII form), so the request
    # goes to the measured address; an IP literal is pinned to itself by fetch.
    host = http.url_host_key(target.url) or urlsplit(target.url).hostname or target.host
    pins = {} if is_ip(host) else {host: reachable[0][0]}
    await http.fetch(
        target.url,
        ctx,
        trace,
        pins=pins,
        handover=handover,
        method=target.method,
        body=target.body,
        extra_ca=target.ca_file,
        record=m.requests,
        queries=m.queries,
        doh_client=doh_client,
        annotations=m.annotations,
    )


async def measure(
    target: Target,
    vantage: VantagePoint,
    run_id: str,
    ctx: EngineContext,
    doh_client: httpx.AsyncClient | None = None,
) -> Measurement:
    """Measure ``target``. Cancelling the task returns what was measured so far.

    A failed step is data (an observation with a failure string). Anything else a
    step raises (a bug, or input the steps did not expect) is recorded as
    ``annotations["error"]`` and the measurement is returned: one target never
    stops a run.
    """
    trace = Trace(ctx.clock)
    m = Measurement(
        measurement_uid=str(uuid.uuid4()),
        run_id=run_id,
        target=target,
        vantage=vantage,
        start_time=ctx.now_utc().replace(microsecond=0),
    )
    try:
        await _measure_steps(m, ctx, trace, doh_client)
    except asyncio.CancelledError:
        # Deliberately absorbed: the run cancels in-flight measurements to stop them
        # and wants what they measured; each step recorded "interrupted".
        m.annotations["interrupted"] = "true"
    except Exception as exc:  # noqa: BLE001 - kept as data, the run goes on
        m.annotations["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        m.test_runtime = trace.now()
    return m
