"""The filtered, chunked reader: measurements as :class:`Record` chunks, in constant memory.

One code path reads the probe's SQLite and the collector's PostgreSQL through
SQLAlchemy Core. Reading is two-phase, so that neither database sorts whole rows:

1. one streamed query (``stream_results``: a server-side cursor on PostgreSQL, a
   stepped statement on SQLite) yields the matching measurement ids in
   (``start_time``, ``measurement_uid``) order, ``chunk_size`` at a time;
2. for each chunk, one query reads those measurements (with their run's start) and one
   reads all their observations; vantage points are read once each.

JSON columns are read as text and parsed with :mod:`orjson` (when installed): the
exporters never build model objects, which is what makes export fast. A measurement
deleted between the two phases (retention) is skipped.

>>> reader = Reader(engine, parse_filters(service=["whatsapp"]))
>>> for chunk in reader.chunks():
...     print(len(chunk), chunk[0].uid)
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa

from probe.export.filters import Filters, where
from probe.privacy import ANNOTATION, Scrub
from schema import tables, wire


class NonFinite(float):
    """NaN or an infinity read from stored JSON (``json.dumps`` writes them): a type of
    its own, so that an encoder that cannot spell them exactly refuses it rather than
    writing ``null``."""


def _float(text: str) -> float:
    value = float(text)
    return value if math.isfinite(value) else NonFinite(value)


def _slow_loads(text: str | bytes) -> Any:
    return json.loads(text, parse_float=_float, parse_constant=_float)


try:  # orjson parses JSON several times faster; the standard library is the fallback
    import orjson

    def loads(text: str) -> Any:
        """Parse stored JSON as :func:`json.loads` would. (orjson reads an integer beyond
        64 bits as a float: the wire format has none, its integers are ports, TTLs, AS
        numbers, status codes and lengths.)"""
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:  # NaN, Infinity: what json.dumps may write
            return _slow_loads(text)

except ImportError:  # pragma: no cover - exercised where orjson is missing
    loads = _slow_loads

Doc = dict[str, Any]
#: One chunk's rows as fetched: (measurements, observations).
Fetched = tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]

#: The services whose OONI test keys the OONI exporter derives from a run's
#: measurements (``probe.export.ooni``); their facts are read per run.
MESSAGING_SERVICES: tuple[str, ...] = ("whatsapp", "telegram", "signal", "facebook_messenger")


class ReadError(RuntimeError):
    """The database could not be read (message from the driver, without SQL)."""


class StoredDataError(ReadError):
    """A stored measurement cannot be exported as it is (malformed JSON or target);
    the message names it."""


@dataclass(frozen=True)
class Vantage:
    """A vantage point as exported: never the probe's IP (``public_ip`` is not read)."""

    probe_id: str
    asn: int
    cc: str
    network_name: str | None
    network_type: str | None
    resolver_ip: str | None
    resolver_asn: int
    resolver_network_name: str | None
    software_name: str
    software_version: str
    platform: str
    architecture: str


@dataclass(frozen=True)
class TargetInfo:
    """A stored target, normalised once however many measurements share it: ``doc`` is
    what :func:`schema.wire.target_to_wire` emits (as the store's reader does), with the
    ``input`` and ``service`` the wire format derives from it."""

    doc: Doc
    input: str
    service: str
    control: bool
    host: str


@functools.lru_cache(maxsize=4096)
def target_info(text: str) -> TargetInfo:
    """The target stored as ``text`` (JSON); cached: a catalog has few targets."""
    target = wire.target_from_wire(loads(text))
    return TargetInfo(
        wire.target_to_wire(target), target.input, target.service, target.control, target.host
    )


@dataclass(frozen=True)
class TargetFacts:
    """What a per-service summary needs of one measurement of a run."""

    uid: str
    target_id: str
    target_kind: str
    host: str
    failure: str | None
    accessible: bool | None
    blocking: str | None  # as stored: "false", a kind, or None
    tcp_ok: int  # successful TCP connects
    http_ok: int  # HTTP transactions without failure


class Record:
    """One measurement as read: columns, parsed JSON, and observations by kind.

    ``requests`` are in request order (as stored); the wire format lists them newest
    first. ``peers`` are the facts of every measurement of the same run and service,
    read only when asked for (the OONI exporter's service-level keys).
    """

    __slots__ = (
        "uid", "run_id", "start", "test_runtime", "service", "target_id", "target_kind",
        "input", "failure", "observation_count", "target", "annotations", "accessible",
        "blocking", "verdict", "run_started", "vantage", "queries", "tcp_connect",
        "tls_handshakes", "requests", "peers", "plain",
    )  # fmt: skip

    def __init__(self) -> None:
        self.queries: list[Doc] = []
        self.tcp_connect: list[Doc] = []
        self.tls_handshakes: list[Doc] = []
        self.requests: list[Doc] = []
        self.peers: tuple[TargetFacts, ...] = ()
        self.plain = False

    uid: str
    run_id: str
    #: False when the verdict or annotations may hold a float under 1e-4 or from 1e16
    #: (see ``probe.export.jsonl``): found from their text, without walking them.
    plain: bool
    start: dt.datetime
    test_runtime: float
    service: str
    target_id: str
    target_kind: str
    input: str
    failure: str | None
    observation_count: int
    target: TargetInfo
    annotations: Doc
    accessible: bool | None
    blocking: str | bool | None  # False, a kind, or None, as in the wire format
    verdict: Doc | None
    run_started: dt.datetime | None
    vantage: Vantage


#: A number Python writes with an exponent (``4.5e-05``: SQLite keeps ``json.dumps``'s
#: spelling), or a small one as PostgreSQL writes it (``0.000045``).
_EXOTIC = re.compile(r"\de[-+]\d|0\.0000")


def _may_be_exotic(text: str | None) -> bool:
    """Whether stored JSON text may hold a float that orjson and Python spell
    differently; a false alarm (the pattern inside a string) only costs a closer look."""
    return text is not None and _EXOTIC.search(text) is not None


def utc(value: Any) -> dt.datetime:
    """A stored time as an aware UTC datetime: SQLite keeps text without the zone (every
    time stored is UTC); PostgreSQL's driver gives an aware datetime."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)  # type: ignore[no-any-return]
    return value.astimezone(dt.UTC)  # type: ignore[no-any-return]


def _text(column: sa.ColumnElement[Any]) -> sa.ColumnElement[str]:
    """A JSON column as its text: parsed here, not by the driver or SQLAlchemy."""
    return sa.cast(column, sa.Text)


def _raw_time(column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """A time column without SQLAlchemy's per-row parsing (see :func:`utc`)."""
    return sa.type_coerce(column, sa.String)


def _reason(exc: sa.exc.SQLAlchemyError) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def scrubbed(s: Scrub, rec: Record) -> None:
    """Scrub one record in place, as :meth:`probe.privacy.Scrub.document` does a wire
    document (the same rules, on the same observation dicts)."""
    s.changed = False
    rec.queries = s.observations("queries", rec.queries)
    rec.tcp_connect = s.observations("tcp_connect", rec.tcp_connect)
    rec.tls_handshakes = s.observations("tls_handshakes", rec.tls_handshakes)
    rec.requests = s.observations("requests", rec.requests)
    if rec.failure is not None:
        rec.failure = s.text(rec.failure)
    rec.verdict = s.tree(rec.verdict)
    annotations = s.tree(rec.annotations)
    if s.changed:
        annotations[ANNOTATION] = "true"
    rec.annotations = annotations
    if rec.peers:
        rec.peers = tuple(
            replace(p, failure=s.text(p.failure)) if p.failure is not None else p for p in rec.peers
        )


class Reader:
    """Reads the measurements that match ``filters``, ``chunk_size`` at a time.

    ``probe_id``: maps each probe id to what is exported (pseudonymisation).
    ``with_peers``: also read, per run and messaging service, the facts every OONI
    service-level key is derived from (:attr:`Record.peers`).
    """

    def __init__(
        self,
        engine: sa.Engine,
        filters: Filters,
        *,
        chunk_size: int = 1000,
        probe_id: Callable[[str], str] | None = None,
        with_peers: bool = False,
        peer_cache: int = 512,
        scrub: Scrub | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        self.engine = engine
        self.filters = filters
        self.chunk_size = chunk_size
        self.probe_id = probe_id
        self.with_peers = with_peers
        self.scrub = scrub
        self._vantages: dict[int, Vantage] = {}
        self._peer_cache: OrderedDict[tuple[str, str], tuple[TargetFacts, ...]] = OrderedDict()
        self._peer_cache_size = peer_cache

    def _matching(self) -> sa.Select[Any]:
        m, vp = tables.measurements, tables.vantage_points
        query = sa.select(m.c.measurement_uid).select_from(
            m.join(vp, vp.c.id == m.c.vantage_point_id)
        )
        conds = where(self.filters)
        return query.where(*conds) if conds else query

    def count(self) -> int:
        """How many measurements match (for the progress bar, and to refuse an empty
        export before any file is created)."""
        query = sa.select(sa.func.count()).select_from(self._matching().subquery())
        try:
            with self.engine.connect() as conn:
                return int(conn.execute(query).scalar() or 0)
        except sa.exc.SQLAlchemyError as exc:
            raise ReadError(f"cannot read measurements: {_reason(exc)}") from exc

    def chunks(self) -> Iterator[list[Record]]:
        """Matching measurements, oldest first, as lists of at most ``chunk_size``.

        The rows of the next chunk are fetched in a worker thread (on a connection of
        its own) while the caller encodes this one: the driver waits for PostgreSQL, or
        steps SQLite's B-trees, without holding the GIL. One chunk is read ahead, no more.
        """
        m = tables.measurements
        ids = self._matching().order_by(m.c.start_time, m.c.measurement_uid)
        try:
            with (
                self.engine.connect() as conn,
                self.engine.connect() as fetch_conn,
                ThreadPoolExecutor(1, thread_name_prefix="vantage-export") as ahead,
            ):
                if conn.dialect.name == "postgresql":
                    conn = conn.execution_options(postgresql_readonly=True)
                    fetch_conn = fetch_conn.execution_options(postgresql_readonly=True)
                result = conn.execution_options(
                    stream_results=True, yield_per=self.chunk_size
                ).execute(ids)
                pending: tuple[list[str], Future[Fetched]] | None = None
                for part in result.partitions(self.chunk_size):
                    uids = [row[0] for row in part]
                    fetching = ahead.submit(self._fetch, fetch_conn, uids)
                    if pending is not None:
                        yield self._build(conn, pending[0], pending[1].result())
                    pending = (uids, fetching)
                if pending is not None:
                    yield self._build(conn, pending[0], pending[1].result())
        except sa.exc.SQLAlchemyError as exc:
            raise ReadError(f"cannot read measurements: {_reason(exc)}") from exc

    # -- one chunk -------------------------------------------------------------------

    @staticmethod
    def _rows(conn: sa.Connection, statement: sa.Select[Any]) -> list[tuple[Any, ...]]:
        """Run a Core statement on the driver's own cursor: plain tuples, without
        SQLAlchemy's per-row work (a chunk has thousands of observation rows). Only
        statements whose columns need no type processing come here."""
        compiled = statement.compile(
            dialect=conn.dialect, compile_kwargs={"render_postcompile": True}
        )
        params = compiled.construct_params()
        positions = compiled.positiontup or []
        args: Any = [params[k] for k in positions] if compiled.positional else params
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(str(compiled), args)
            return cursor.fetchall()  # type: ignore[no-any-return]
        except conn.dialect.loaded_dbapi.Error as exc:
            raise ReadError(f"cannot read measurements: {exc}") from exc
        finally:
            cursor.close()

    def _fetch(self, conn: sa.Connection, uids: Sequence[str]) -> Fetched:
        """The raw rows of one chunk: its measurements (with their run's start) and all
        their observations, in two queries."""
        m, r, o = tables.measurements, tables.runs, tables.observations
        query = sa.select(
            m.c.measurement_uid, m.c.run_id, m.c.vantage_point_id, _raw_time(m.c.start_time),
            m.c.test_runtime, m.c.service, m.c.target_id, m.c.target_kind, m.c.input,
            m.c.failure, m.c.observation_count, _text(m.c.target), _text(m.c.annotations),
            m.c.accessible, m.c.blocking, _text(m.c.verdict), _raw_time(r.c.started_at),
        ).select_from(m.join(r, r.c.run_id == m.c.run_id, isouter=True)).where(
            m.c.measurement_uid.in_(uids)
        )  # fmt: skip
        obs = sa.select(o.c.measurement_uid, o.c.kind, _text(o.c.data)).where(
            o.c.measurement_uid.in_(uids)
        ).order_by(o.c.measurement_uid, o.c.kind, o.c.seq)  # fmt: skip
        return self._rows(conn, query), self._rows(conn, obs)

    def _build(self, conn: sa.Connection, uids: Sequence[str], fetched: Fetched) -> list[Record]:
        """Records from one chunk's rows, in the order of ``uids``."""
        measurement_rows, observation_rows = fetched
        by_uid: dict[str, Record] = {}
        for row in measurement_rows:
            try:
                rec = self._record(conn, row)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise StoredDataError(f"measurement {row[0]}: cannot be read: {exc}") from exc
            by_uid[rec.uid] = rec
        current: str | None = None
        lists: dict[str, list[Doc]] = {}
        for uid, kind, data in observation_rows:
            if uid != current:
                current = uid
                owner = by_uid.get(uid)
                if owner is None:  # deleted between the two queries: skipped
                    lists = {"dns": [], "tcp": [], "tls": [], "http": []}
                else:
                    lists = {"dns": owner.queries, "tcp": owner.tcp_connect,
                             "tls": owner.tls_handshakes, "http": owner.requests}  # fmt: skip
            try:
                lists[kind].append(loads(data))
            except (ValueError, KeyError) as exc:
                raise StoredDataError(f"measurement {uid}: a {kind!r} observation cannot be "
                                      f"read: {exc}") from exc  # fmt: skip
        records = [by_uid[u] for u in uids if u in by_uid]
        if self.with_peers:
            self._attach_peers(conn, records)
        if self.scrub is not None:
            for rec in records:
                scrubbed(self.scrub, rec)
        return records

    def _record(self, conn: sa.Connection, row: tuple[Any, ...]) -> Record:
        """One measurement row (see :meth:`_fetch` for the columns) as a record."""
        rec = Record()
        (uid, rec.run_id, vp_id, start, runtime, rec.service, rec.target_id,
         rec.target_kind, rec.input, rec.failure, rec.observation_count, target,
         annotations, accessible, blocking, verdict, run_started) = row  # fmt: skip
        rec.uid = uid
        rec.start = utc(start)
        rec.test_runtime = runtime if math.isfinite(runtime) else NonFinite(runtime)
        rec.run_started = utc(run_started) if run_started is not None else None
        rec.target = target_info(target)
        rec.annotations = loads(annotations) if annotations != "{}" else {}
        rec.accessible = None if accessible is None else bool(accessible)  # SQLite: 0/1
        rec.verdict = loads(verdict) if verdict is not None else None
        rec.plain = not (_may_be_exotic(annotations) or _may_be_exotic(verdict))
        rec.blocking = False if blocking == "false" else blocking
        vantage = self._vantages.get(vp_id)
        rec.vantage = vantage if vantage is not None else self._vantage(conn, vp_id)
        return rec

    def _vantage(self, conn: sa.Connection, vp_id: int) -> Vantage:
        known = self._vantages.get(vp_id)
        if known is not None:
            return known
        vp = tables.vantage_points
        row = conn.execute(
            sa.select(
                vp.c.probe_id, vp.c.asn, vp.c.cc, vp.c.network_name, vp.c.network_type,
                vp.c.resolver_ip, vp.c.resolver_asn, vp.c.resolver_network_name,
                vp.c.software_name, vp.c.software_version, vp.c.platform, vp.c.architecture,
            ).where(vp.c.id == vp_id)  # public_ip is deliberately never selected
        ).one()  # fmt: skip
        v = Vantage(**row._mapping)
        if self.scrub is not None:
            v = replace(v, resolver_ip=self.scrub.resolver(v.resolver_ip))
        if self.probe_id is not None:
            v = replace(v, probe_id=self.probe_id(v.probe_id))
        self._vantages[vp_id] = v
        return v

    # -- per-run facts of the messaging services (OONI service keys) -----------------------

    def _attach_peers(self, conn: sa.Connection, records: list[Record]) -> None:
        wanted = {(r.run_id, r.service) for r in records if r.service in MESSAGING_SERVICES}
        found = {key: self._peer_cache[key] for key in wanted if key in self._peer_cache}
        missing = [key for key in wanted if key not in found]
        if missing:
            found.update(self._read_peers(conn, missing))
        for r in records:
            r.peers = found.get((r.run_id, r.service), ())
        for key, facts in found.items():  # most recently used last; the oldest go first
            self._peer_cache[key] = facts
            self._peer_cache.move_to_end(key)
        while len(self._peer_cache) > self._peer_cache_size:
            self._peer_cache.popitem(last=False)

    def _read_peers(
        self, conn: sa.Connection, keys: list[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[TargetFacts, ...]]:
        """Facts of every measurement of these (run, service) pairs: two queries."""
        m, o = tables.measurements, tables.observations
        runs = sorted({run for run, _ in keys})
        # By run only: a condition on the service lets SQLite prefer the (service, time)
        # index and scan every measurement of the service; other services' rows of these
        # runs are few and dropped below.
        scope = [m.c.run_id.in_(runs)]
        ok: dict[tuple[str, str], int] = {}
        counted = (
            sa.select(o.c.measurement_uid, o.c.kind, sa.func.count())
            .select_from(o.join(m, m.c.measurement_uid == o.c.measurement_uid))
            .where(*scope, o.c.kind.in_(("tcp", "http")), o.c.failure.is_(None))
            .group_by(o.c.measurement_uid, o.c.kind)
        )
        for uid, kind, n in conn.execute(counted):
            ok[(uid, kind)] = int(n)
        facts: dict[tuple[str, str], list[TargetFacts]] = {key: [] for key in keys}
        rows = conn.execute(
            sa.select(
                m.c.run_id, m.c.service, m.c.measurement_uid, m.c.target_id, m.c.target_kind,
                _text(m.c.target), m.c.failure, m.c.accessible, m.c.blocking,
            ).where(*scope).order_by(m.c.start_time, m.c.measurement_uid)
        )  # fmt: skip
        for run, service, uid, target_id, kind, target, failure, accessible, blocking in rows:
            bucket = facts.get((run, service))
            if bucket is None:
                continue  # another pairing of the runs and services asked for
            host = target_info(target).host
            tcp_ok, http_ok = ok.get((uid, "tcp"), 0), ok.get((uid, "http"), 0)
            bucket.append(TargetFacts(uid, target_id, kind, host, failure, accessible, blocking,
                                      tcp_ok, http_ok))  # fmt: skip
        return {key: tuple(items) for key, items in facts.items()}
