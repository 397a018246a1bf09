"""``GET /api/v1/whoami``: the caller's address, network and country, as the collector sees it.

A probe asks before each run (``probe.vantage``) so its measurements carry the ASN and
country of the network it measures from, without an IP database of its own:

    GET /api/v1/whoami -> {"ip": "198.51.100.7", "asn": 64500, "cc": "DE",
                           "network_name": "Example Net"}

``asn`` 0 and ``cc`` "ZZ" when the collector's databases do not know (or it has none).
The address is looked up and answered, never stored or logged: uvicorn's access log
is off (``collectors.cli``), and the per-address rate limit keys its buckets by a keyed
hash (``collectors.ratelimit``).

Behind a reverse proxy the peer is the proxy: ``X-Forwarded-For`` is believed only
when the peer is one of ``trusted_proxies``, walking the list from the right past
every trusted hop (what a client writes on the left is never taken on trust).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence

import sqlalchemy as sa
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from collectors import auth
from collectors.ratelimit import address_key, retry_after
from collectors.settings import IPNetwork

API_WHOAMI = "/api/v1/whoami"
log = logging.getLogger("vantage.collector.whoami")

router = APIRouter()


class AddressError(ValueError):
    """The caller's address cannot be told (a proxy's header names no address)."""


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address from a peer or ``X-Forwarded-For`` entry (``[v6]:port``, ``v4:port``
    and IPv4-mapped IPv6 accepted); ``ValueError`` otherwise."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.index("]")] if "]" in text else text
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, proxies: Sequence[IPNetwork]
) -> bool:
    return any(address.version == net.version and address in net for net in proxies)


def caller_address(
    peer: str | None, forwarded_for: Sequence[str], proxies: Sequence[IPNetwork]
) -> str:
    """The caller's address: ``peer``, or when the peer is a trusted proxy the rightmost
    ``X-Forwarded-For`` hop that is not a trusted proxy (the leftmost when all are).

    >>> caller_address("10.0.0.2", ["203.0.113.9, 10.0.0.1"], [ip_network("10.0.0.0/8")])
    '203.0.113.9'
    """
    if peer is None:
        raise AddressError("the connection has no peer address")
    address = _address(peer)
    if not proxies or not _trusted(address, proxies):
        return str(address)
    hops = [h for value in forwarded_for for h in value.split(",") if h.strip()]
    for hop in reversed(hops):
        try:
            address = _address(hop)
        except ValueError:
            raise AddressError(
                "X-Forwarded-For from a trusted proxy holds something that is not an address"
            ) from None
        if not _trusted(address, proxies):
            break
    return str(address)


@router.get(API_WHOAMI)
async def whoami(request: Request) -> JSONResponse:
    state = request.app.state
    settings = state.settings
    peer = request.client.host if request.client else None
    try:
        ip = caller_address(
            peer, request.headers.getlist("x-forwarded-for"), settings.trusted_proxies
        )
    except (AddressError, ValueError) as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    wait = state.address_limits.take(address_key(ip))
    if wait > 0:
        return JSONResponse(
            {"error": "too many whoami requests from this address; try again later"},
            status_code=429,
            headers={"Retry-After": retry_after(wait)},
        )
    info = state.geoip.lookup(ip)
    header = request.headers.get("authorization")
    if header is not None:  # an enrolled probe asking: fleet health notes the contact
        await run_in_threadpool(_note_contact, state.engine, header)
    return JSONResponse(
        {"ip": ip, "asn": info.asn, "cc": info.cc, "network_name": info.network_name},
        headers={"Cache-Control": "no-store"},
    )


def _note_contact(engine: sa.Engine, header: str) -> None:
    """Touch the probe's ``last_seen_at`` when ``header`` holds a live credential; whoami
    needs none, so a bad one is ignored (and a database hiccup costs nothing)."""
    try:
        auth.touch(engine, auth.authenticate(engine, header))
    except auth.AuthError:
        pass
    except Exception:  # noqa: BLE001 - fleet health is not worth a failed whoami
        log.warning("could not note a probe's contact", exc_info=True)
