"""Enrollment and authentication: operator tokens, probe credentials, revocation.

An operator creates an enroll token (``vantage collector enroll-token create``) and
gives it to a volunteer; the volunteer's probe calls ``POST /api/v1/enroll`` with it
and its probe id once, and receives its own credential. Every later call carries
``Authorization: Bearer <credential>``; the probe id is the credential's, never the
request's.

Tokens and credentials are 256 random bits from :mod:`secrets`, shown once and stored
only as their SHA-256. A fast hash is right here: these are not passwords a person
chose, so there is nothing to guess and key stretching (bcrypt, scrypt) would only slow
every upload; a stolen table of hashes yields no usable credential. Hashes are looked
up by an index and then compared with :func:`hmac.compare_digest`.

>>> token, _ = create_token(engine, label="Berlin volunteers", max_uses=10)
>>> probe_id, credential = enroll(engine, token, "6d1e...")
>>> authenticate(engine, f"Bearer {credential}") == probe_id
True
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from collectors.ratelimit import address_key, retry_after
from schema import tables

log = logging.getLogger("vantage.collector.auth")

TOKEN_PREFIX = "vet_"  # a Vantage enroll token
CREDENTIAL_PREFIX = "vpc_"  # a Vantage probe credential
_t, _p = tables.enroll_tokens, tables.probes


class AuthError(Exception):
    """A request is not allowed: ``status`` is the HTTP status (401, 409, 422)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def digest(secret: str) -> str:
    """The SHA-256 (hex) a token or credential is stored as."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite returns stored times without their zone; every time stored is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.UTC)


# -- enroll tokens (the operator's side) -------------------------------------------------


def create_token(
    engine: sa.Engine,
    label: str = "",
    expires_at: dt.datetime | None = None,
    max_uses: int | None = None,
) -> tuple[str, int]:
    """A new enroll token and its id; the token itself is not kept and cannot be shown again."""
    if max_uses is not None and max_uses < 1:
        raise ValueError(f"max_uses must be at least 1, got {max_uses}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with engine.begin() as conn:
        inserted = conn.execute(
            _t.insert().values(
                token_hash=digest(token),
                label=label,
                created_at=_now(),
                expires_at=expires_at,
                max_uses=max_uses,
                uses=0,
            )
        ).inserted_primary_key
    assert inserted is not None
    return token, int(inserted[0])


def list_tokens(engine: sa.Engine) -> list[dict[str, Any]]:
    """Every token's id, label, limits, uses and state (never the token or its hash)."""
    query = sa.select(
        _t.c.id, _t.c.label, _t.c.created_at, _t.c.expires_at, _t.c.max_uses, _t.c.uses,
        _t.c.revoked_at,
    ).order_by(_t.c.id)  # fmt: skip
    now = _now()
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(query)]
    for row in rows:
        for key in ("created_at", "expires_at", "revoked_at"):
            row[key] = _utc(row[key])
        row["state"] = _token_state(row, now) or "usable"
    return rows


def revoke_token(engine: sa.Engine, token_id: int) -> bool:
    """Stop a token from enrolling more probes (probes it enrolled keep their
    credentials); False when there is no such token or it was revoked already."""
    with engine.begin() as conn:
        done = conn.execute(
            _t.update()
            .where(_t.c.id == token_id, _t.c.revoked_at.is_(None))
            .values(revoked_at=_now())
        )
    return done.rowcount == 1


def _token_state(row: Any, now: dt.datetime) -> str | None:
    """Why a token cannot enroll ("revoked", "expired", "used up"), or None."""
    get = row.get if isinstance(row, dict) else row._mapping.get
    if get("revoked_at") is not None:
        return "revoked"
    expires = _utc(get("expires_at"))
    if expires is not None and expires <= now:
        return "expired"
    max_uses = get("max_uses")
    if max_uses is not None and int(get("uses") or 0) >= max_uses:
        return "used up"
    return None


# -- enrollment (the probe's side) --------------------------------------------------------


@dataclass(frozen=True)
class Enrolled:
    probe_id: str
    credential: str


def parse_enroll_body(doc: Any) -> tuple[str, str]:
    """The token and probe id of an enroll request body; :class:`AuthError` 422 otherwise."""
    if not isinstance(doc, dict):
        raise AuthError(422, 'the body must be a JSON object {"token": ..., "probe_id": ...}')
    token, probe_id = doc.get("token"), doc.get("probe_id")
    if not isinstance(token, str) or not token or len(token) > 256:
        raise AuthError(422, "token: a non-empty string of at most 256 characters is needed")
    if not isinstance(probe_id, str):
        raise AuthError(422, "probe_id: a UUID string is needed")
    try:
        canonical = str(uuid.UUID(probe_id))
    except ValueError:
        raise AuthError(422, f"probe_id: not a UUID: {probe_id[:64]!r}") from None
    if canonical != probe_id.lower():
        raise AuthError(422, f"probe_id: not a UUID in its usual form: {probe_id[:64]!r}")
    return token, probe_id.lower()


def enroll(engine: sa.Engine, token: str, probe_id: str) -> Enrolled:
    """Register ``probe_id`` with ``token`` and return its new credential.

    401 when the token is unknown, revoked, expired or used up; 409 when the probe id
    is enrolled already, live or revoked: a revoked id stays revoked (the list of
    probes is public, and any enroll token would otherwise take over a revoked id and
    its earlier runs) until the operator restores it (:func:`restore_probe`). The
    token's use is counted only when the probe is enrolled.
    """
    wanted = digest(token)
    now = _now()
    credential = CREDENTIAL_PREFIX + secrets.token_urlsafe(32)
    try:
        with engine.begin() as conn:
            row = conn.execute(sa.select(_t).where(_t.c.token_hash == wanted)).first()
            if row is None or not hmac.compare_digest(row.token_hash, wanted):
                raise AuthError(401, "unknown enroll token")
            state = _token_state(row, now)
            if state is not None:
                raise AuthError(401, f"the enroll token is {state}")
            known = conn.execute(
                sa.select(_p.c.revoked_at).where(_p.c.probe_id == probe_id)
            ).first()
            if known is not None and known.revoked_at is None:
                raise AuthError(409, f"probe {probe_id} is enrolled already")
            if known is not None:
                raise AuthError(
                    409,
                    f"probe {probe_id} was revoked; it may enroll again only once the "
                    "collector's operator restores it (vantage collector probes restore)",
                )
            # Guarded: two enrollments racing for a token's last use cannot both win.
            used = conn.execute(
                _t.update()
                .where(
                    _t.c.id == row.id, sa.or_(_t.c.max_uses.is_(None), _t.c.uses < _t.c.max_uses)
                )
                .values(uses=_t.c.uses + 1)
            )
            if used.rowcount != 1:
                raise AuthError(401, "the enroll token is used up")
            values = {
                "credential_hash": digest(credential),
                "token_id": row.id,
                "enrolled_at": now,
                "revoked_at": None,
            }
            conn.execute(_p.insert().values(probe_id=probe_id, **values))
    except sa.exc.IntegrityError:  # the same probe id enrolled at the same moment
        raise AuthError(409, f"probe {probe_id} is enrolled already") from None
    return Enrolled(probe_id, credential)


# -- authentication -----------------------------------------------------------------------


def bearer(header: str | None) -> str | None:
    """The credential of an ``Authorization: Bearer ...`` header, or None."""
    scheme, _, value = (header or "").partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value or len(value) > 256:
        return None
    return value


def authenticate(engine: sa.Engine, header: str | None) -> str:
    """The probe id of the credential in ``header``; :class:`AuthError` 401 otherwise."""
    credential = bearer(header)
    if credential is None:
        raise AuthError(401, "a probe credential is needed: Authorization: Bearer <credential>")
    wanted = digest(credential)
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(_p.c.probe_id, _p.c.credential_hash, _p.c.revoked_at).where(
                _p.c.credential_hash == wanted
            )
        ).first()
    if row is None or not hmac.compare_digest(row.credential_hash, wanted):
        raise AuthError(401, "unknown probe credential")
    if row.revoked_at is not None:
        raise AuthError(401, "this probe's credential was revoked")
    return str(row.probe_id)


def touch(engine: sa.Engine, probe_id: str) -> None:
    """Note that ``probe_id`` was in touch just now (fleet health)."""
    with engine.begin() as conn:
        conn.execute(_p.update().where(_p.c.probe_id == probe_id).values(last_seen_at=_now()))


# -- probes (the operator's side) ---------------------------------------------------------


def list_probes(engine: sa.Engine) -> list[dict[str, Any]]:
    """Every enrolled probe with its fleet health (never its credential or hash)."""
    query = sa.select(
        _p.c.probe_id, _p.c.token_id, _p.c.enrolled_at, _p.c.revoked_at, _p.c.last_seen_at,
        _p.c.last_upload_at, _p.c.backlog, _p.c.asn, _p.c.cc,
    ).order_by(_p.c.enrolled_at, _p.c.probe_id)  # fmt: skip
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(query)]
    for row in rows:
        for key in ("enrolled_at", "revoked_at", "last_seen_at", "last_upload_at"):
            row[key] = _utc(row[key])
    return rows


def revoke_probe(engine: sa.Engine, probe_id: str) -> bool:
    """Revoke a probe's credential: its uploads are refused from now on (its stored
    measurements stay). False when there is no such live probe."""
    with engine.begin() as conn:
        done = conn.execute(
            _p.update()
            .where(_p.c.probe_id == probe_id, _p.c.revoked_at.is_(None))
            .values(revoked_at=_now())
        )
    return done.rowcount == 1


def restore_probe(engine: sa.Engine, probe_id: str) -> bool:
    """Let a revoked probe id enroll again (with a new token; its old credential stays
    dead): the operator's decision, never an enroll token's. The probe's row goes (its
    measurements and runs stay, and are its own again once it enrolls). False when
    there is no such revoked probe."""
    with engine.begin() as conn:
        done = conn.execute(
            _p.delete().where(_p.c.probe_id == probe_id, _p.c.revoked_at.is_not(None))
        )
    return done.rowcount == 1


# -- the HTTP endpoint --------------------------------------------------------------------

API_ENROLL = "/api/v1/enroll"
MAX_ENROLL_BODY = 4096

router = APIRouter()


@router.post(API_ENROLL)
async def enroll_endpoint(request: Request) -> JSONResponse:
    """``{"token", "probe_id"}`` -> 201 ``{"probe_id", "credential"}`` (see collectors/API.md)."""
    state = request.app.state
    from collectors.whoami import AddressError, caller_address

    try:
        ip = caller_address(
            request.client.host if request.client else None,
            request.headers.getlist("x-forwarded-for"),
            state.settings.trusted_proxies,
        )
    except (AddressError, ValueError) as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    wait = state.address_limits.take(address_key(ip))
    if wait > 0:
        return JSONResponse(
            {"error": "too many requests from this address; try again later"},
            status_code=429,
            headers={"Retry-After": retry_after(wait)},
        )
    try:
        body = await read_body(request, MAX_ENROLL_BODY)
    except BodyTooLarge:
        return JSONResponse({"error": f"the body is over {MAX_ENROLL_BODY} bytes"}, 413)
    except ClientDisconnect:
        return JSONResponse({"error": "the client went away"}, 400)
    try:
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            raise AuthError(422, "the body is not JSON") from None
        token, probe_id = parse_enroll_body(doc)
        enrolled = await run_in_threadpool(enroll, state.engine, token, probe_id)
    except AuthError as exc:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)
    log.info("probe %s enrolled", enrolled.probe_id)
    return JSONResponse(
        {"probe_id": enrolled.probe_id, "credential": enrolled.credential},
        status_code=201,
        headers={"Cache-Control": "no-store"},
    )


class BodyTooLarge(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (:class:`BodyTooLarge`) as soon as it passes ``limit``
    bytes: a client cannot make the collector hold more than that."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise BodyTooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge
    return bytes(body)
