"""The control helper: measures a target from an uncensored place, with the probe's engine.

A probe that sees a failure cannot tell on its own whether its network blocked the
target or the target is down. It sends the target (and nothing about itself) to
this helper, which measures it once with the same engine (``probe.engine.measure``)
and answers with the measurement, so analysis can compare the two (OONI's
web_connectivity test helper idea).

    POST /api/v1/control   {"target": <schema.wire.target_to_wire(target)>}
                        -> {"measurement": <schema.wire.to_wire(measurement)>}
    GET  /api/v1/health -> {"ok": true}

Errors are ``{"detail": "..."}`` with 401 (token), 403 (non-public target), 413
(body over 64 KiB), 422 (not a target), 503 (every measuring slot busy) or 500.

A public service that connects wherever it is told is a server-side request
forgery tool, so the helper refuses targets that name non-public addresses (403),
the engine already refuses DNS answers that are non-public (``dns_bogon_error``),
and :func:`serve` runs the app on a :class:`GuardedEventLoop` that refuses every
outgoing TCP connection to a non-public address, which also covers HTTP redirects
to internal hosts. Refused connections are listed in the measurement's
``control_refused`` annotation. ``--allow-range`` makes a reserved range count as
public (the lab, loopback tests).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import datetime as dt
import hmac
import json
import logging
import platform
import re
import socket
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from probe import __version__
from probe.engine.context import EngineContext, IPNetwork, Timeouts
from probe.engine.dns import ResolverSpec, is_ip, system_resolvers
from probe.engine.measure import measure
from schema import wire
from schema.model import TARGET_KINDS, Measurement, Target, VantagePoint

log = logging.getLogger("vantage.control")

API_CONTROL = "/api/v1/control"
API_HEALTH = "/api/v1/health"
PROBE_ID = "control-helper"

MAX_BODY = 64 * 1024
MAX_CONCURRENT = 8
#: Seconds a request waits for a measuring slot before it is answered 503.
QUEUE_WAIT = 5.0
#: Seconds one measurement may take in all; what was measured by then is returned,
#: marked ``interrupted``. With QUEUE_WAIT it stays under the client's 30 s default.
DEADLINE = 20.0
MAX_PORTS = 8
MAX_ADDRESSES = 8
MAX_TEXT = 256
MAX_URL = 2048

_HOSTNAME = re.compile(r"^(?=.{1,253}$)(?:[A-Za-z0-9_-]{1,63}\.)*[A-Za-z0-9_-]{1,63}\.?$")
_METHOD = re.compile(r"^[A-Z]{1,16}$")


class BadTarget(ValueError):
    """The request does not carry a target the helper can measure (HTTP 422)."""


class EgressRefused(PermissionError):
    """The helper's policy forbids connecting to this address (not the network's doing)."""


@dataclass(frozen=True)
class ControlSettings:
    """How the helper measures and what it accepts; built from ``vantage control serve``."""

    resolvers: tuple[ResolverSpec, ...] = ()  # empty: the system's primary resolver
    ca_files: tuple[str, ...] = ()
    system_cas: bool = True
    allow_ranges: tuple[IPNetwork, ...] = ()
    token: str | None = None
    timeouts: Timeouts = dataclasses.field(default_factory=Timeouts)
    deadline: float = DEADLINE
    max_concurrent: int = MAX_CONCURRENT
    queue_wait: float = QUEUE_WAIT
    max_body: int = MAX_BODY
    resolv_conf: str = "/etc/resolv.conf"


# -- parsing and policy --------------------------------------------------------------


def _text(d: dict[str, Any], key: str, *, required: bool = True, limit: int = MAX_TEXT) -> None:
    value = d.get(key)
    if value is None and not required:
        return
    if not isinstance(value, str) or not value or len(value) > limit:
        raise BadTarget(f"target.{key} must be a non-empty string of at most {limit} characters")


def _ints(value: object, key: str) -> None:
    if value is None:
        return
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise BadTarget(f"target.{key} must be a list of integers")


def _hostname(value: str) -> bool:
    return is_ip(value) or bool(_HOSTNAME.match(value))


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise BadTarget(f"target.url must be an http:// or https:// URL, not {url!r}")
    try:
        port = parts.port
        host = parts.hostname or ""
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as exc:
        raise BadTarget(f"target.url {url!r} is not a valid URL: {exc}") from exc
    if not _hostname(host):
        raise BadTarget(f"target.url {url!r} has no valid host")
    if port == 0:
        raise BadTarget(f"target.url {url!r} has port 0")


def _check_doc(d: dict[str, Any]) -> None:
    """Type and range checks that ``schema.wire.target_from_wire`` leaves to its caller."""
    _text(d, "id")
    _text(d, "service")
    if d.get("kind") not in TARGET_KINDS:
        raise BadTarget(f"target.kind must be one of {', '.join(TARGET_KINDS)}")
    host = d.get("host")
    if not isinstance(host, str) or not _hostname(host):
        raise BadTarget("target.host must be a host name or an IP address")
    ports = d.get("ports") or []
    _ints(ports, "ports")
    if len(ports) > MAX_PORTS or not all(0 < p < 65536 for p in ports):
        raise BadTarget(f"target.ports must be at most {MAX_PORTS} ports in 1..65535")
    url = d.get("url")
    if url is not None:
        _text(d, "url", limit=MAX_URL)
        _check_url(url)
    elif d["kind"] == "http":
        raise BadTarget("an http target needs target.url")
    method = d.get("method") or "GET"
    if not isinstance(method, str) or not _METHOD.match(method):
        raise BadTarget("target.method must be an HTTP method such as GET or POST")
    if d.get("body") is not None and not isinstance(d["body"], str):
        raise BadTarget("target.body must be a string or null")
    addresses = d.get("addresses") or []
    if (
        not isinstance(addresses, list)
        or len(addresses) > MAX_ADDRESSES
        or not all(isinstance(a, str) and is_ip(a) for a in addresses)
    ):
        raise BadTarget(f"target.addresses must be at most {MAX_ADDRESSES} IP addresses")
    sni = d.get("sni")
    if sni is not None and not (isinstance(sni, str) and _HOSTNAME.match(sni)):
        raise BadTarget("target.sni must be a host name or null")
    if not isinstance(d.get("control", False), bool):
        raise BadTarget("target.control must be true or false")
    expect = d.get("expect") or {}
    if not isinstance(expect, dict):
        raise BadTarget("target.expect must be an object")
    _ints(expect.get("asns"), "expect.asns")
    _ints(expect.get("status"), "expect.status")
    names = expect.get("cert_names")
    if names is not None and not (
        isinstance(names, list) and all(isinstance(n, str) for n in names)
    ):
        raise BadTarget("target.expect.cert_names must be a list of strings")
    source = d.get("source")
    if source is not None and not (
        isinstance(source, dict)
        and isinstance(source.get("url"), str)
        and isinstance(source.get("checked"), str)
    ):
        raise BadTarget("target.source must be null or {url, checked}")


def parse_request(raw: bytes) -> Target:
    """The target of a request body, or :class:`BadTarget` saying what is wrong."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadTarget(f"the body is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("target"), dict):
        raise BadTarget('the body must be a JSON object {"target": {...}}')
    _check_doc(doc["target"])
    try:
        target = wire.target_from_wire(doc["target"])
    except KeyError as exc:
        raise BadTarget(f"target is missing {exc.args[0]!r}") from exc
    except (TypeError, ValueError, AttributeError) as exc:
        raise BadTarget(f"not a valid target: {exc}") from exc
    # A local file path never comes from a remote client (target_from_wire drops it).
    return dataclasses.replace(target, ca_file=None)


def refusal(target: Target, ctx: EngineContext) -> str | None:
    """Why the helper will not measure ``target`` (a non-public address), or None."""
    named = [target.host, *target.addresses]
    if target.url:
        named.append(urlsplit(target.url).hostname or "")
    for host in named:
        if is_ip(host) and ctx.is_bogon(host):
            return (
                f"the control helper does not measure non-public addresses ({host}); "
                "its operator can allow a range with --allow-range"
            )
    return None


# -- the egress guard ----------------------------------------------------------------

#: Addresses the guard refused during the current measurement (set per measurement task).
_REFUSED: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "vantage_control_refused", default=None
)


class GuardedEventLoop(asyncio.SelectorEventLoop):
    """An event loop whose outgoing TCP connections go only where ``permits(ip, port)`` says.

    The engine's TCP step, httpx/anyio (HTTP and its redirects, DoH) and TCP DNS all
    connect through ``loop.create_connection``; names are resolved here and the
    connection is made to the checked address, so a name cannot re-resolve elsewhere.
    """

    def __init__(self, permits: Callable[[str, int], bool]) -> None:
        super().__init__()
        self._permits = permits

    def _refuse(self, address: str) -> EgressRefused:
        refused = _REFUSED.get()
        if refused is not None:
            refused.append(address)
        return EgressRefused(f"control helper policy: no connections to non-public {address}")

    async def create_connection(  # type: ignore[override]
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        host: str | None = None,
        port: int | None = None,
        **kwargs: Any,
    ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        sock = kwargs.get("sock")
        if sock is not None:
            try:
                peer, peer_port = sock.getpeername()[:2]
            except OSError as exc:
                raise EgressRefused("control helper policy: unconnected socket") from exc
            if not self._permits(str(peer), int(peer_port)):
                raise self._refuse(str(peer))
            return await super().create_connection(protocol_factory, **kwargs)
        if host is None or port is None:
            raise EgressRefused("control helper policy: a connection needs a host and port")
        address = await self._checked_address(host, port, kwargs.get("family", 0))
        if kwargs.get("ssl") and kwargs.get("server_hostname") is None and not is_ip(host):
            kwargs["server_hostname"] = host
        return await super().create_connection(protocol_factory, address, port, **kwargs)

    async def _checked_address(self, host: str, port: int, family: int) -> str:
        if is_ip(host):
            if not self._permits(host, port):
                raise self._refuse(host)
            return host
        infos = await self.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
        addresses = [str(info[4][0]) for info in infos]
        for address in addresses:
            if self._permits(address, port):
                return address
        raise self._refuse(addresses[0] if addresses else host)


# -- the helper ----------------------------------------------------------------------


class Busy(Exception):
    """Every measuring slot stayed taken for ``queue_wait`` seconds (HTTP 503)."""


class ControlHelper:
    """The engine context, vantage point and limits shared by every request."""

    def __init__(self, settings: ControlSettings) -> None:
        self.settings = settings
        system = system_resolvers(settings.resolv_conf)[:1]
        resolvers = list(settings.resolvers) or system
        if not resolvers:
            raise ValueError("no resolver: the system has none; give --resolver")
        self.ctx = EngineContext(
            resolvers=resolvers,
            timeouts=settings.timeouts,
            ca_files=settings.ca_files,
            system_cas=settings.system_cas,
            public_ranges=settings.allow_ranges,
        )
        # Load the trust stores now: a bad --ca-bundle fails at start, not per request.
        self.ctx.ssl_context("tls")
        self.ctx.ssl_context("http")
        self.vantage = VantagePoint(
            probe_id=PROBE_ID,
            software_version=__version__,
            platform=sys.platform,
            architecture=platform.machine() or "unknown",
            resolver_ip=next((r.address for r in resolvers if r.system), None),
        )
        # TCP DNS goes through the guard too; a configured resolver may be local.
        self._resolvers = frozenset((r.address, r.port) for r in resolvers if r.engine == "tcp")
        self._needs_doh = any(r.engine == "doh" for r in resolvers)
        self._slots = asyncio.Semaphore(settings.max_concurrent)

    def permits(self, address: str, port: int) -> bool:
        """Whether the helper may connect to ``address`` (public, allowed, or a resolver)."""
        try:
            return (address, port) in self._resolvers or not self.ctx.is_bogon(address)
        except ValueError:
            return False

    def authorized(self, header: str | None) -> bool:
        token = self.settings.token
        if token is None:
            return True
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), token.encode()
        )

    async def _measure_once(self, target: Target) -> Measurement:
        run_id = str(uuid.uuid4())
        if not self._needs_doh:
            return await measure(target, self.vantage, run_id, self.ctx)
        async with httpx.AsyncClient(
            verify=self.ctx.ssl_context("http"), timeout=self.ctx.timeouts.dns, trust_env=False
        ) as doh:
            return await measure(target, self.vantage, run_id, self.ctx, doh)

    async def measure(self, target: Target) -> Measurement:
        """Measure ``target`` once, within the slot limit and the deadline."""
        try:
            async with asyncio.timeout(self.settings.queue_wait):
                await self._slots.acquire()
        except TimeoutError as exc:
            raise Busy from exc
        try:
            refused: list[str] = []
            context = contextvars.copy_context()
            context.run(_REFUSED.set, refused)
            task = asyncio.create_task(self._measure_once(target), context=context)
            try:
                m = await asyncio.wait_for(asyncio.shield(task), self.settings.deadline)
            except TimeoutError:
                task.cancel()  # the engine returns what it measured, marked interrupted
                m = await task
                m.annotations["interrupted_reason"] = "control_deadline"
            except asyncio.CancelledError:
                task.cancel()  # the request went away: stop measuring for nobody
                raise
            if refused:
                m.annotations["control_refused"] = " ".join(dict.fromkeys(refused))
            return m
        finally:
            self._slots.release()


# -- the HTTP API --------------------------------------------------------------------


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the request body is over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"the request body is over {limit} bytes")
    return bytes(body)


def create_app(helper: ControlHelper) -> FastAPI:
    """The FastAPI app around ``helper`` (run it with :func:`serve` for the egress guard)."""
    app = FastAPI(
        title="Vantage control helper", version=__version__, docs_url=None, redoc_url=None
    )
    app.state.helper = helper

    @app.get(API_HEALTH)
    async def health() -> dict[str, bool]:
        return {"ok": True}

    @app.post(API_CONTROL)
    async def control(request: Request) -> JSONResponse:
        if not helper.authorized(request.headers.get("authorization")):
            raise HTTPException(
                401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"}
            )
        try:
            raw = await _read_body(request, helper.settings.max_body)
        except ClientDisconnect:
            raise HTTPException(400, "the client went away") from None
        try:
            target = parse_request(raw)
        except BadTarget as exc:
            raise HTTPException(422, str(exc)) from None
        reason = refusal(target, helper.ctx)
        if reason is not None:
            raise HTTPException(403, reason)
        started = dt.datetime.now(dt.UTC)
        try:
            m = await helper.measure(target)
        except Busy:
            raise HTTPException(
                503, "the control helper is busy; try again", headers={"Retry-After": "5"}
            ) from None
        except Exception:  # noqa: BLE001 - one bad measurement must not take the server down
            log.exception("measuring %s failed", target.input)
            raise HTTPException(500, "the control helper could not measure this target") from None
        took = (dt.datetime.now(dt.UTC) - started).total_seconds()
        # The client's address is deliberately not logged (it is a volunteer's IP).
        log.info("measured %s in %.1f s: %s", target.input, took, m.failure() or "ok")
        return JSONResponse({"measurement": wire.to_wire(m)})

    return app


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8700) -> uvicorn.Server:
    """A uvicorn server that keeps no access log (the clients are volunteers' IPs)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        timeout_keep_alive=5,
        limit_concurrency=16 * MAX_CONCURRENT,
        lifespan="off",
    )
    return uvicorn.Server(config)


def serve(
    server: uvicorn.Server, helper: ControlHelper, sockets: list[socket.socket] | None = None
) -> None:
    """Run ``server`` until it exits, on an event loop that only connects where allowed."""
    with asyncio.Runner(loop_factory=lambda: GuardedEventLoop(helper.permits)) as runner:
        runner.run(server.serve(sockets))
