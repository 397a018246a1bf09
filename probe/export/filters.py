"""Which measurements an export takes: time range, service, country, network, probe, verdict.

The same filters serve ``vantage export``, ``vantage collector export`` and
``GET /api/v1/export``, with the collector's read API semantics (``collectors/API.md``):
``since`` is inclusive and ``until`` exclusive; both are ISO 8601 dates or datetimes, UTC
unless they carry an offset, and a date-only ``until`` includes that whole day
(``--since 2024-05-01 --until 2024-05-01`` is that one day). Every other filter may be
given several times and then matches any of its values; different filters must all match.

>>> f = parse_filters(since="2024-05-01", until="2024-05-31", cc=["ir"], blocking=["dns"])
>>> f.cc
('IR',)
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from schema import tables
from schema.model import BLOCKING_KINDS

#: What ``--blocking`` accepts besides a blocking kind: ``false`` (judged not blocked),
#: ``true`` (blocked, any kind) and ``null`` or ``unknown`` (could not be told, or not
#: judged).
BLOCKING_VALUES: tuple[str, ...] = (*BLOCKING_KINDS, "false", "true", "null", "unknown")

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_CC = re.compile(r"[A-Za-z]{2}")
_ASN = re.compile(r"(?:AS|as)?([0-9]{1,10})")
MAX_TEXT = 200


class FilterError(ValueError):
    """A filter value that cannot be used; the message names the filter."""


@dataclass(frozen=True)
class Filters:
    """What to export; an empty tuple or ``None`` means "any"."""

    since: dt.datetime | None = None
    until: dt.datetime | None = None
    service: tuple[str, ...] = ()
    cc: tuple[str, ...] = ()
    asn: tuple[int, ...] = ()
    probe: tuple[str, ...] = ()
    #: blocking kinds, "false", "true" (any kind) and "null" (not told)
    blocking: tuple[str, ...] = ()

    def describe(self) -> str:
        """The filters in words, for "nothing matches ..." messages."""
        parts = []
        if self.since is not None:
            parts.append(f"since {self.since.isoformat()}")
        if self.until is not None:
            parts.append(f"until {self.until.isoformat()}")
        for name in ("service", "cc", "asn", "probe", "blocking"):
            values = getattr(self, name)
            if values:
                parts.append(f"{name} {'|'.join(map(str, values))}")
        return ", ".join(parts) if parts else "no filter"


#: AS numbers are stored as SQL INTEGER (32-bit signed): a larger one matches nothing
#: and some databases refuse to compare with it, so it is refused here.
MAX_STORED_ASN = 2**31 - 1


def parse_time(name: str, value: str, *, end: bool = False) -> dt.datetime:
    """An ISO 8601 date or datetime as an aware UTC datetime.

    A date alone is midnight UTC; as the end of a range (``end``) it is the next
    midnight, so the day itself is included.

    >>> parse_time("until", "2024-05-01", end=True)
    datetime.datetime(2024, 5, 2, 0, 0, tzinfo=datetime.timezone.utc)
    """
    text = value.strip()
    if _DATE.fullmatch(text):
        try:
            day = dt.date.fromisoformat(text)
        except ValueError as exc:
            raise FilterError(f"{name}: not a date: {value!r} ({exc})") from None
        if end:
            if day == dt.date.max:  # the end of 9999-12-31: the end of time
                return dt.datetime.max.replace(tzinfo=dt.UTC)
            day += dt.timedelta(days=1)
        return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise FilterError(
            f"{name}: not an ISO 8601 date or datetime: {value!r} "
            "(e.g. 2024-05-01 or 2024-05-01T12:00:00Z)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    try:
        return when.astimezone(dt.UTC)
    except OverflowError:  # 0001-01-01T00:00+01:00 is in year 0, which datetime lacks
        raise FilterError(f"{name}: out of range in UTC (years 1 to 9999): {value!r}") from None


def _values(name: str, given: str | Iterable[str] | None, *, split: bool = True) -> list[str]:
    """Repeated values, each a comma-separated list when ``split`` (``--cc IR,TR``)."""
    if given is None:
        return []
    items = [given] if isinstance(given, str) else list(given)
    out: list[str] = []
    for item in items:
        if "\x00" in item or len(item) > MAX_TEXT:
            raise FilterError(f"{name}: not a usable value: {item[:40]!r}")
        for part in item.split(",") if split else [item]:
            part = part.strip() if split else part
            if not part.strip():
                raise FilterError(f"{name}: empty value in {item!r}")
            if part not in out:
                out.append(part)
    return out


def parse_filters(
    *,
    since: str | None = None,
    until: str | None = None,
    service: str | Sequence[str] | None = None,
    cc: str | Sequence[str] | None = None,
    asn: str | Sequence[str] | None = None,
    probe: str | Sequence[str] | None = None,
    blocking: str | Sequence[str] | None = None,
) -> Filters:
    """Filters from text (flags or query parameters); :class:`FilterError` names a bad one."""
    start = parse_time("since", since) if since else None
    end = parse_time("until", until, end=True) if until else None
    if start is not None and end is not None and start >= end:
        raise FilterError(f"until: must be later than since ({until!r} <= {since!r})")
    ccs = []
    for value in _values("cc", cc):
        if not _CC.fullmatch(value):
            raise FilterError(f"cc: not a two-letter country code: {value!r}")
        ccs.append(value.upper())
    asns = []
    for value in _values("asn", asn):
        match = _ASN.fullmatch(value)
        if match is None or int(match.group(1)) > 2**32 - 1:
            raise FilterError(f"asn: not an AS number like 1234 or AS1234: {value!r}")
        if int(match.group(1)) > MAX_STORED_ASN:
            raise FilterError(
                f"asn: {value!r} is above AS{MAX_STORED_ASN}, the largest the tables hold"
            )
        asns.append(int(match.group(1)))
    kinds = []
    for value in _values("blocking", blocking):
        value = value.lower()
        if value not in BLOCKING_VALUES:
            raise FilterError(f"blocking: {value!r} is not one of {', '.join(BLOCKING_VALUES)}")
        kinds.append("null" if value == "unknown" else value)
    return Filters(
        since=start,
        until=end,
        service=tuple(_values("service", service, split=False)),
        cc=tuple(dict.fromkeys(ccs)),
        asn=tuple(dict.fromkeys(asns)),
        probe=tuple(_values("probe", probe, split=False)),
        blocking=tuple(dict.fromkeys(kinds)),
    )


def where(filters: Filters) -> list[sa.ColumnElement[bool]]:
    """The SQL conditions on ``measurements`` joined with ``vantage_points``; every value
    is a bound parameter."""
    m, vp = tables.measurements, tables.vantage_points
    conds: list[sa.ColumnElement[bool]] = []
    if filters.since is not None:
        conds.append(m.c.start_time >= filters.since)
    if filters.until is not None:
        conds.append(m.c.start_time < filters.until)
    if filters.service:
        conds.append(m.c.service.in_(filters.service))
    if filters.cc:
        conds.append(vp.c.cc.in_(filters.cc))
    if filters.asn:
        conds.append(vp.c.asn.in_(filters.asn))
    if filters.probe:
        conds.append(vp.c.probe_id.in_(filters.probe))
    if filters.blocking:
        either: list[sa.ColumnElement[bool]] = []
        kinds = [k for k in filters.blocking if k not in ("true", "null")]
        if kinds:
            either.append(m.c.blocking.in_(kinds))
        if "true" in filters.blocking:
            either.append(m.c.blocking.in_(BLOCKING_KINDS))
        if "null" in filters.blocking:
            either.append(m.c.blocking.is_(None))
        conds.append(sa.or_(*either))
    return conds
