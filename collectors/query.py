"""The collector's read API: measurements, aggregates, blocking events, the probe fleet.

Readers (operators, journalists, the dashboard) ask questions of the whole dataset:

    GET /api/v1/measurements?since&until&service&cc&asn&probe&blocking&limit&after
        -> {"measurements": [<wire document>, ...], "next": "<cursor>" | null}
    GET /api/v1/aggregates?since&until&service&cc&asn&probe&blocking
        -> {"aggregates": [{"day", "service", "cc", "asn", "blocking", "count"}, ...]}
    GET /api/v1/events?open=true|false&since&until&service&cc&asn&probe&limit
        -> {"events": [{"id", "probe_id", "asn", "cc", "service", "status", "blocking",
                        "started_at", "ended_at", "runs"}, ...]}
    GET /api/v1/probes
        -> {"probes": [{"probe_id", "enrolled_at", "last_seen_at", "last_upload_at",
                        "backlog", "asn", "cc", "revoked", "revoked_at"}, ...]}

Filters: ``since`` (inclusive) and ``until`` (exclusive) are ISO 8601 dates or
datetimes, UTC unless they carry an offset; a date-only ``until`` includes that whole
day (``since=2024-05-01&until=2024-05-01`` is that one day). ``service`` and ``probe``
are compared exactly; ``cc`` is a two-letter country code; ``asn`` is ``1234`` or
``AS1234``; ``blocking`` is a kind (``dns``, ``tcp_ip``, ...), ``false`` (judged not
blocked), ``true`` (any kind), or ``null``/``unknown`` (could not be told or not
judged). Every value reaches the database as a bound parameter, never as SQL text;
LIKE is never used, so ``%`` and ``_`` mean themselves. For events, ``since`` and
``until`` select the events that were going on at some time in between; ``open=true``
the current ones, ``false`` the ended ones. Aggregates count by UTC day; ``blocking``
there is ``false``, a kind, or ``null``.

Measurements are ordered by (``start_time``, ``measurement_uid``) and paged by keyset:
``next`` is an opaque cursor to pass back as ``after`` with the same filters; a page
stays stable while new measurements arrive (nothing is skipped or repeated that was
there when paging started). ``limit`` is 1 to :data:`MAX_LIMIT` (default 100).

Errors are ``{"error": "<parameter>: <what is wrong>"}``: 422 for a bad or unknown
parameter, 503 when the database cannot answer.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import QueryParams

from collectors import access
from probe.export import filters
from probe.store import Store
from schema import tables
from schema.model import BLOCKING_KINDS

log = logging.getLogger("vantage.collector.query")

router = APIRouter(prefix="/api/v1", tags=["read"])

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
EVENTS_DEFAULT_LIMIT = 500
EVENTS_MAX_LIMIT = 5000
#: Longest text accepted in a filter; nothing we store is longer.
MAX_TEXT = 200


class BadParameter(ValueError):
    """A query parameter that cannot be used; the message starts with its name."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name


# -- parsing -------------------------------------------------------------------------

FILTERS = ("since", "until", "service", "cc", "asn", "probe", "blocking")
_CC = re.compile(r"[A-Za-z]{2}")
_ASN = re.compile(r"(?:AS|as)?([0-9]{1,10})")


@dataclass(frozen=True)
class Filters:
    """What a reader asked for; ``None`` means "any"."""

    since: dt.datetime | None = None
    until: dt.datetime | None = None
    service: str | None = None
    cc: str | None = None
    asn: int | None = None
    probe: str | None = None
    #: a blocking kind, "false", "true" (any kind) or "null" (not told)
    blocking: str | None = None


def _single(params: QueryParams, allowed: Iterable[str]) -> dict[str, str]:
    """The parameters as one value each; unknown or repeated names are errors."""
    allowed = set(allowed)
    values: dict[str, str] = {}
    for name, value in params.multi_items():
        if name not in allowed:
            raise BadParameter(name, f"unknown parameter (known: {', '.join(sorted(allowed))})")
        if name in values:
            raise BadParameter(name, "given more than once")
        if "\x00" in value:
            raise BadParameter(name, "contains a NUL character")
        if len(value) > MAX_TEXT:
            raise BadParameter(name, f"longer than {MAX_TEXT} characters")
        values[name] = value
    return values


def parse_time(name: str, value: str, *, end: bool = False) -> dt.datetime:
    """An ISO 8601 date or datetime as an aware UTC datetime, read as the exporter reads
    it (``probe.export.filters.parse_time``: a date alone is midnight UTC, or the next
    midnight as the end of a range)."""
    try:
        return filters.parse_time(name, value, end=end)
    except filters.FilterError as exc:
        raise BadParameter(name, str(exc).removeprefix(f"{name}: ")) from None


def _text(name: str, value: str) -> str:
    if not value.strip():
        raise BadParameter(name, "empty")
    return value


def parse_filters(values: dict[str, str]) -> Filters:
    since = parse_time("since", values["since"]) if "since" in values else None
    until = parse_time("until", values["until"], end=True) if "until" in values else None
    if since is not None and until is not None and since >= until:
        raise BadParameter("until", "must be later than since")
    cc = values.get("cc")
    if cc is not None:
        if not _CC.fullmatch(cc):
            raise BadParameter("cc", f"not a two-letter country code: {cc!r}")
        cc = cc.upper()
    asn = None
    if "asn" in values:
        match = _ASN.fullmatch(values["asn"].strip())
        if match is None or int(match.group(1)) > 2**32 - 1:
            raise BadParameter("asn", f"not an AS number like 1234 or AS1234: {values['asn']!r}")
        asn = int(match.group(1))
        if asn > filters.MAX_STORED_ASN:
            raise BadParameter(
                "asn", f"{values['asn']!r} is above AS{filters.MAX_STORED_ASN}, the largest stored"
            )
    blocking = values.get("blocking")
    if blocking is not None:
        blocking = blocking.strip().lower()
        if blocking == "unknown":
            blocking = "null"
        accepted = (*BLOCKING_KINDS, "false", "true", "null")
        if blocking not in accepted:
            raise BadParameter(
                "blocking", f"{values['blocking']!r} is not one of {', '.join(accepted)}, unknown"
            )
    return Filters(
        since=since,
        until=until,
        service=_text("service", values["service"]) if "service" in values else None,
        cc=cc,
        asn=asn,
        probe=_text("probe", values["probe"]) if "probe" in values else None,
        blocking=blocking,
    )


def _limit(values: dict[str, str], default: int, maximum: int) -> int:
    if "limit" not in values:
        return default
    text = values["limit"].strip()
    if not re.fullmatch(r"[0-9]{1,9}", text) or not 1 <= int(text) <= maximum:
        raise BadParameter("limit", f"must be a whole number from 1 to {maximum}")
    return int(text)


def encode_cursor(start_time: dt.datetime, measurement_uid: str) -> str:
    """An opaque cursor: the last item's place in (start_time, measurement_uid) order."""
    raw = json.dumps([_utc(start_time).isoformat(), measurement_uid], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(value: str) -> tuple[dt.datetime, str]:
    problem = "not a cursor from this API (pass back the 'next' of an answer)"
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        when, uid = json.loads(raw)
        start = dt.datetime.fromisoformat(when)
        if not isinstance(uid, str) or len(uid) > MAX_TEXT or start.tzinfo is None:
            raise ValueError(problem)
        return start.astimezone(dt.UTC), uid
    except (binascii.Error, ValueError, TypeError, OverflowError, RecursionError):
        raise BadParameter("after", problem) from None


# -- SQL ------------------------------------------------------------------------------

m_t, vp_t = tables.measurements, tables.vantage_points


def _conditions(f: Filters) -> list[sa.ColumnElement[bool]]:
    where: list[sa.ColumnElement[bool]] = []
    if f.since is not None:
        where.append(m_t.c.start_time >= f.since)
    if f.until is not None:
        where.append(m_t.c.start_time < f.until)
    if f.service is not None:
        where.append(m_t.c.service == f.service)
    if f.cc is not None:
        where.append(vp_t.c.cc == f.cc)
    if f.asn is not None:
        where.append(vp_t.c.asn == f.asn)
    if f.probe is not None:
        where.append(vp_t.c.probe_id == f.probe)
    if f.blocking == "null":
        where.append(m_t.c.blocking.is_(None))
    elif f.blocking == "true":
        where.append(m_t.c.blocking.is_not(None))
        where.append(m_t.c.blocking != "false")
    elif f.blocking is not None:
        where.append(m_t.c.blocking == f.blocking)
    return where


def _joined() -> sa.Join:
    return m_t.join(vp_t, vp_t.c.id == m_t.c.vantage_point_id)


def _day(engine: sa.Engine) -> sa.ColumnElement[str]:
    """The UTC day of a measurement as YYYY-MM-DD, in the database's own dialect."""
    if engine.dialect.name == "postgresql":
        return sa.func.to_char(sa.func.timezone("UTC", m_t.c.start_time), "YYYY-MM-DD")
    # SQLite keeps UTC times as "YYYY-MM-DD HH:MM:SS.ffffff" text.
    return sa.func.substr(sa.cast(m_t.c.start_time, sa.String), 1, 10)


def page_of_measurements(
    engine: sa.Engine, f: Filters, limit: int, after: tuple[dt.datetime, str] | None
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of wire documents and the cursor of the next page (None: the last)."""
    query = sa.select(m_t.c.measurement_uid, m_t.c.start_time).select_from(_joined())
    where = _conditions(f)
    if after is not None:
        start, uid = after
        where.append(
            sa.or_(
                m_t.c.start_time > start,
                sa.and_(m_t.c.start_time == start, m_t.c.measurement_uid > uid),
            )
        )
    query = (
        query.where(*where)
        .order_by(m_t.c.start_time, m_t.c.measurement_uid)
        .limit(limit + 1)  # one more tells whether there is a next page
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    more = len(rows) > limit
    rows = rows[:limit]
    docs = Store(engine, outbox=False).documents([r.measurement_uid for r in rows])
    cursor = encode_cursor(rows[-1].start_time, rows[-1].measurement_uid) if more else None
    return docs, cursor


def aggregates(engine: sa.Engine, f: Filters) -> list[dict[str, Any]]:
    """Counts of measurements by UTC day x service x country x ASN x blocking."""
    day = _day(engine).label("day")
    keys = (day, m_t.c.service, vp_t.c.cc, vp_t.c.asn, m_t.c.blocking)
    query = (
        sa.select(*keys, sa.func.count().label("n"))
        .select_from(_joined())
        .where(*_conditions(f))
        .group_by(*keys)
        .order_by(*keys[:-1], m_t.c.blocking.nulls_last())  # one order on every database
    )
    with engine.connect() as conn:
        return [
            {
                "day": row.day,
                "service": row.service,
                "cc": row.cc,
                "asn": row.asn,
                "blocking": _blocking(row.blocking),
                "count": int(row.n),
            }
            for row in conn.execute(query)
        ]


def events(engine: sa.Engine, f: Filters, is_open: bool | None, limit: int) -> list[dict[str, Any]]:
    """Blocking events across probes, newest first."""
    e = tables.events
    where: list[sa.ColumnElement[bool]] = []
    if is_open is True:
        where.append(e.c.ended_at.is_(None))
    elif is_open is False:
        where.append(e.c.ended_at.is_not(None))
    for column, value in ((e.c.service, f.service), (e.c.cc, f.cc), (e.c.asn, f.asn),
                          (e.c.probe_id, f.probe)):  # fmt: skip
        if value is not None:
            where.append(column == value)
    if f.since is not None:  # events still going at or after since
        where.append(sa.or_(e.c.ended_at.is_(None), e.c.ended_at >= f.since))
    if f.until is not None:
        where.append(e.c.started_at < f.until)
    query = sa.select(e).where(*where).order_by(e.c.started_at.desc(), e.c.id.desc()).limit(limit)
    with engine.connect() as conn:
        return [
            {
                "id": row.id,
                "probe_id": row.probe_id,
                "asn": row.asn,
                "cc": row.cc,
                "service": row.service,
                "status": row.status,
                "blocking": list(row.blocking),
                "started_at": _iso(row.started_at),
                "ended_at": _iso(row.ended_at),
                "runs": list(row.runs),
            }
            for row in conn.execute(query)
        ]


def fleet(engine: sa.Engine) -> list[dict[str, Any]]:
    """Every enrolled probe's health, most recently seen first (never seen last)."""
    p = tables.probes.c  # the columns named here only: never the credential hash
    query = sa.select(
        p.probe_id, p.enrolled_at, p.revoked_at, p.last_seen_at, p.last_upload_at, p.backlog,
        p.asn, p.cc,
    ).order_by(p.last_seen_at.desc().nulls_last(), p.probe_id)  # fmt: skip
    with engine.connect() as conn:
        return [
            {
                "probe_id": row.probe_id,
                "enrolled_at": _iso(row.enrolled_at),
                "last_seen_at": _iso(row.last_seen_at),
                "last_upload_at": _iso(row.last_upload_at),
                "backlog": row.backlog,
                "asn": row.asn,
                "cc": row.cc,
                "revoked": row.revoked_at is not None,
                "revoked_at": _iso(row.revoked_at),
            }
            for row in conn.execute(query)
        ]


def _blocking(value: str | None) -> str | bool | None:
    return False if value == "false" else value


def _utc(value: dt.datetime) -> dt.datetime:
    """SQLite drops the zone; every time the collector stores is UTC."""
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return _utc(value).isoformat().replace("+00:00", "Z")


# -- the routes -------------------------------------------------------------------------


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _as_seen(request: Request, engine: sa.Engine, f: Filters) -> Filters:
    """``f`` with its ``probe`` the real id the caller's value names (a pseudonym, for
    the public: collectors.access)."""
    if f.probe is None:
        return f
    try:
        return dataclasses.replace(f, probe=access.probe_filter(request, engine, f.probe))
    except ValueError as exc:
        raise BadParameter("probe", str(exc)) from None


def _answer(request: Request, compute: Callable[[sa.Engine], dict[str, Any]]) -> JSONResponse:
    """Run ``compute`` on the app's engine; a bad parameter is a 422 naming it, a
    database failure a 503 (logged with its cause, answered without SQL)."""
    try:
        return JSONResponse(compute(request.app.state.engine))
    except BadParameter as exc:
        return _error(422, str(exc))
    except access.AccessError as exc:
        log.error("read API: %s", exc)
        return _error(503, "the collector's pseudonym key cannot be read")
    except sa.exc.DataError as exc:
        # A value the database cannot take as its column's type: a parameter's fault,
        # not the database's (each parameter is checked; this is the net below them).
        log.warning("read API: a parameter the database refused: %s", exc.orig)
        return _error(422, "a parameter is out of the range the database holds")
    except sa.exc.SQLAlchemyError as exc:
        log.error("read API: database error: %s", exc)
        orig = getattr(exc, "orig", None)
        reason = (str(orig) if orig is not None else type(exc).__name__).strip().splitlines()
        return _error(503, f"the database cannot answer: {reason[0] if reason else 'error'}")


@router.get("/measurements")
def get_measurements(request: Request) -> JSONResponse:
    """Measurements as wire documents, oldest first, a page at a time (keyset)."""

    def compute(engine: sa.Engine) -> dict[str, Any]:
        values = _single(request.query_params, (*FILTERS, "limit", "after"))
        f = parse_filters(values)
        limit = _limit(values, DEFAULT_LIMIT, MAX_LIMIT)
        after = decode_cursor(values["after"]) if "after" in values else None
        docs, cursor = page_of_measurements(engine, _as_seen(request, engine, f), limit, after)
        shown = access.public_probe_id(request)
        for d in docs:
            d["probe_id"] = shown(d["probe_id"])
        return {"measurements": docs, "next": cursor}

    return _answer(request, compute)


@router.get("/aggregates")
def get_aggregates(request: Request) -> JSONResponse:
    """Counts by UTC day x service x country x ASN x blocking, with the same filters."""

    def compute(engine: sa.Engine) -> dict[str, Any]:
        f = parse_filters(_single(request.query_params, FILTERS))
        return {"aggregates": aggregates(engine, _as_seen(request, engine, f))}

    return _answer(request, compute)


@router.get("/events")
def get_events(request: Request) -> JSONResponse:
    """Blocking events across probes; ``open=true`` the current ones, ``false`` the past."""

    def compute(engine: sa.Engine) -> dict[str, Any]:
        values = _single(request.query_params, (*FILTERS, "open", "limit"))
        if "blocking" in values:
            raise BadParameter("blocking", "events are filtered by open, not by blocking")
        f = parse_filters(values)
        is_open: bool | None = None
        if "open" in values:
            choice = values["open"].strip().lower()
            if choice not in ("true", "false"):
                raise BadParameter("open", f"must be true or false, not {values['open']!r}")
            is_open = choice == "true"
        limit = _limit(values, EVENTS_DEFAULT_LIMIT, EVENTS_MAX_LIMIT)
        found = events(engine, _as_seen(request, engine, f), is_open, limit)
        shown = access.public_probe_id(request)
        for e in found:
            e["probe_id"] = shown(e["probe_id"])
        return {"events": found}

    return _answer(request, compute)


@router.get("/probes")
def get_probes(request: Request) -> JSONResponse:
    """Fleet health: each probe's last contact, outbox backlog, network and state."""

    def compute(engine: sa.Engine) -> dict[str, Any]:
        _single(request.query_params, ())
        probes = fleet(engine)
        shown = access.public_probe_id(request)
        for p in probes:
            p["probe_id"] = shown(p["probe_id"])
        return {"probes": probes}

    return _answer(request, compute)
