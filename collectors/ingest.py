"""``POST /api/v1/measurements``: probes upload batches of wire measurements.

What a batch goes through (collectors/API.md is the contract):

1. the request is charged to its address, its credential names its probe (401
   otherwise), and a whole batch is reserved from the probe's token bucket (429 when it
   cannot be; see :func:`upload`);
2. the body is read up to the size limit, gunzipped if ``Content-Encoding: gzip``
   (bounded: a small bomb cannot expand past the limit; 413), parsed as JSON (400)
   into at most ``max_items`` measurements (413);
3. any item naming another probe refuses the whole batch (403, nothing stored);
4. each item is checked on its own: the JSON Schema of the wire format (compiled once
   with ``fastjsonschema``), ``schema.wire.from_wire``, and what the SQL columns can
   hold (lengths, 32-bit integers, no NUL characters, which PostgreSQL refuses). A
   bad item is *rejected* with a reason naming the field; it never costs the others;
5. the valid items are stored in ONE transaction, in the probe's own tables
   (vantage_points, runs, measurements, observations; no outbox), rows identical to
   what the probe's ``Store`` writes for the same measurement: one code path reads
   both ends. A measurement already stored (a re-sent batch, or twice in one batch) is
   a *duplicate*, acknowledged and not stored again. A run is created on first sight
   of its ``report_id`` with status ``uploaded``.

On PostgreSQL rows go in with ``COPY`` after one query for the uids already stored;
a batch racing another for the same new row (uid, run, vantage point) fails its
unique constraint, rolls back whole and is simply done again. Other databases
(SQLite, for a trial) take the same path with ``executemany``.

>>> ingestor = Ingestor(engine)
>>> result = ingestor.ingest("6d1e...", items, backlog=120)
>>> result.counts()
{'accepted': 499, 'duplicate': 0, 'rejected': 1}
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import math
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import fastjsonschema
import orjson
import sqlalchemy as sa
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from collectors import auth
from collectors.analysis import note_arrivals
from collectors.ratelimit import address_key, retry_after
from probe.store import KIND_KEYS, observation_rows, vantage_fingerprint
from schema import tables, wire
from schema.model import VantagePoint

log = logging.getLogger("vantage.collector.ingest")

UPLOADED = "uploaded"  # the status of a run the collector created (collectors.analysis)
INT32 = 2**31
#: Times a batch is tried again after losing a race for a unique row.
RETRIES = 3
_MAX_REASON = 300
_VANTAGE_ANNOTATIONS = frozenset({"architecture", "platform", "network_type"})


class IngestError(Exception):
    """The whole batch is refused: ``status`` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


# -- the body ---------------------------------------------------------------------------


#: Gzip members one body may hold. A probe sends one; a few allow concatenated files.
#: Each member costs a decompressor and a header parse whatever its size, so a body of
#: thousands of empty members (20 bytes each) is refused rather than worked through.
MAX_GZIP_MEMBERS = 16
#: Compressed bytes handed to zlib at a time: what is left over at the end of a member
#: (``unused_data``, a copy) is never more than this.
_GZIP_CHUNK = 64 * 1024


def decode_body(raw: bytes, encoding: str | None, limit: int) -> bytes:
    """The body as sent, gunzipped when ``encoding`` says gzip; never more than ``limit``
    bytes are produced (413 past it), however small the compressed body.

    Linear in the size of the body: the compressed bytes are fed to zlib in chunks of
    :data:`_GZIP_CHUNK` through a view (nothing is copied but the last chunk's rest at
    the end of a member), and a body of more than :data:`MAX_GZIP_MEMBERS` members is
    400.
    """
    name = (encoding or "identity").strip().lower()
    if name == "identity" or name == "":
        return raw
    if name not in ("gzip", "x-gzip"):
        raise IngestError(415, f"Content-Encoding {encoding!r} is not supported (gzip is)")
    out = bytearray()
    view = memoryview(raw)
    offset = 0  # the first compressed byte not yet given to zlib
    members = 1
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    pending: bytes | memoryview = b""  # given to zlib, not yet consumed
    try:
        while True:
            if not pending:
                if offset >= len(view):
                    if inflater.eof:
                        return bytes(out)
                    raise IngestError(400, "the gzip body is truncated")
                pending = view[offset : offset + _GZIP_CHUNK]
                offset += len(pending)
            out += inflater.decompress(pending, limit + 1 - len(out))
            if len(out) > limit:
                raise IngestError(413, f"the body is over {limit} bytes once decompressed")
            if inflater.eof:
                pending = inflater.unused_data  # at most one chunk
                if not pending and offset >= len(view):
                    return bytes(out)
                members += 1
                if members > MAX_GZIP_MEMBERS:
                    raise IngestError(
                        400, f"the gzip body has more than {MAX_GZIP_MEMBERS} members"
                    )
                inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # next gzip member
                continue
            pending = inflater.unconsumed_tail
    except zlib.error as exc:
        raise IngestError(400, f"the body is not valid gzip: {exc}") from None


def parse_batch(body: bytes, max_items: int) -> list[Any]:
    """The items of ``{"measurements": [...]}``; 400 not JSON or not that shape, 413 too many."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise IngestError(400, f"the body is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("measurements"), list):
        raise IngestError(400, 'the body must be a JSON object {"measurements": [...]}')
    items: list[Any] = doc["measurements"]
    if len(items) > max_items:
        raise IngestError(413, f"{len(items)} measurements in one batch; at most {max_items}")
    return items


# -- checking one item --------------------------------------------------------------------


_NOTES = frozenset({"description", "title", "$comment"})


def _draft7(node: Any, names: bool = False) -> Any:
    """The wire schema (draft 2020-12) in the draft 7 words fastjsonschema knows: the
    only 2020-12 keyword it uses is ``prefixItems`` (tuple arrays). Descriptions go:
    the generated code builds a failing branch's definition into every exception it
    raises, and ``anyOf``/``oneOf`` raise for branches a valid document does not take.
    ``names``: ``node`` maps names to schemas (``properties``), none of them notes."""
    if isinstance(node, list):
        return [_draft7(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: _draft7(v, names=k in ("properties", "$defs") and not names)
        for k, v in node.items()
        if names or k not in _NOTES
    }
    if "prefixItems" in out and not names:
        rest = out.pop("items", True)
        out["items"] = out.pop("prefixItems")
        out["additionalItems"] = rest
    return out


def compile_validator() -> Callable[[Any], Any]:
    """The wire schema compiled to Python once (about 100x faster than ``jsonschema``;
    a test checks both agree)."""
    schema = _draft7(wire.json_schema())
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    return fastjsonschema.compile(schema, use_default=False)  # type: ignore[no-any-return]


def schema_reason(exc: fastjsonschema.JsonSchemaValueException) -> str:
    """``test_keys.queries[0].engine: must be one of [...]`` from fastjsonschema's words."""
    name = exc.name or "data"
    message = exc.message
    rest = message[len(name) :].strip() if message.startswith(name) else message
    path = name[len("data") :].lstrip(".")
    return f"{path}: {rest}" if path else f"the measurement {rest}"


class _Fit:
    """Makes a row's values what a table's columns hold (JSON as text, numbers in
    range), or raises ``ValueError`` naming the field that does not fit. Precomputed
    per table: it runs for every row of every batch."""

    def __init__(self, table: sa.Table, labels: dict[str, str] | None = None) -> None:
        labels = labels or {}
        self.strs: list[tuple[str, int, str]] = []
        self.ints: list[tuple[str, str]] = []
        self.floats: list[tuple[str, str]] = []
        self.jsons: list[str] = []
        for c in table.columns:
            if c.primary_key and c.autoincrement is True:
                continue
            label = labels.get(c.name, c.name)
            if isinstance(c.type, sa.String) and c.type.length is not None:
                self.strs.append((c.name, c.type.length, label))
            elif isinstance(c.type, sa.Integer):
                self.ints.append((c.name, label))
            elif isinstance(c.type, sa.Float):
                self.floats.append((c.name, label))
            elif isinstance(c.type, sa.JSON):
                self.jsons.append(c.name)
        self.names = [
            c.name for c in table.columns if not (c.primary_key and c.autoincrement is True)
        ]

    def __call__(self, row: dict[str, Any], where: str = "") -> None:
        for name, length, label in self.strs:
            value = row.get(name)
            if value is not None and (type(value) is not str or len(value) > length):
                if not isinstance(value, str):
                    raise ValueError(f"{where}{label}: not a string")
                raise ValueError(f"{where}{label}: longer than {length} characters")
        for name, label in self.ints:
            value = row.get(name)
            if value is None or (type(value) is int and -INT32 <= value < INT32):
                continue
            if isinstance(value, float) and value.is_integer():
                value = row[name] = int(value)
            if not isinstance(value, int) or isinstance(value, bool) or not -INT32 <= value < INT32:
                raise ValueError(f"{where}{label}: not a 32-bit integer: {value!r}")
        for name, label in self.floats:
            value = row.get(name)
            if value is not None:
                value = row[name] = float(value)
                if not math.isfinite(value):
                    raise ValueError(f"{where}{label}: not a finite number")
        for name in self.jsons:  # None too: SQLAlchemy's JSON type stores it as JSON null
            row[name] = orjson.dumps(row.get(name)).decode()


_FIT_MEASUREMENT = _Fit(tables.measurements, {
    "run_id": "report_id", "target_id": "target.id", "target_kind": "target.kind",
})  # fmt: skip
_FIT_VANTAGE = _Fit(tables.vantage_points, {
    "asn": "probe_asn", "network_type": "annotations.network_type",
    "platform": "annotations.platform", "architecture": "annotations.architecture",
})  # fmt: skip
_FIT_OBSERVATION = _Fit(tables.observations)
_VP_FIELDS = [n for n in _FIT_VANTAGE.names if n != "fingerprint"]


def _has_nul(value: Any) -> bool:
    """Whether a NUL character is anywhere in ``value`` (keys too)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


@dataclass
class Item:
    """One valid measurement, its rows ready (JSON columns as text)."""

    index: int
    uid: str
    run_id: str
    start_time: dt.datetime
    vantage: VantagePoint
    fingerprint: str
    vantage_row: dict[str, Any]
    measurement_row: dict[str, Any]  # vantage_point_id is filled in when stored
    observation_rows: list[dict[str, Any]]


@functools.lru_cache(maxsize=4096)
def _fingerprint(v: VantagePoint) -> str:
    """A probe's vantage point repeats in every measurement of a run: hash it once."""
    return vantage_fingerprint(v)


def _uid_of(doc: Any) -> str | None:
    uid = doc.get("measurement_uid") if isinstance(doc, dict) else None
    return uid if isinstance(uid, str) and len(uid) <= 128 else None


def prepare(index: int, doc: Any, validate: Callable[[Any], Any], check_nul: bool = True) -> Item:
    """Check one wire document and build its rows; ``ValueError`` says what is wrong."""
    if not isinstance(doc, dict):
        raise ValueError("a measurement must be a JSON object")
    try:
        validate(doc)
    except fastjsonschema.JsonSchemaValueException as exc:
        raise ValueError(schema_reason(exc)) from None
    if check_nul and _has_nul(doc):
        raise ValueError("a string holds a NUL character (\\u0000), which SQL text cannot store")
    try:
        m = wire.from_wire(doc)
    except wire.WireError as exc:
        raise ValueError(str(exc)) from None
    if not wire.MIN_YEAR <= m.start_time.year <= wire.MAX_YEAR:  # the schema says so too
        raise ValueError(
            f"measurement_start_time: year {m.start_time.year} is outside "
            f"{wire.MIN_YEAR}-{wire.MAX_YEAR} (the probe's clock is wrong)"
        )
    # The rows are those the probe's Store writes for ``m`` (it writes them from
    # ``to_wire(m)``): the summary fields are computed from ``m`` as there, and the
    # observations keep their wire records as received. Those passed the schema (no
    # unknown keys) and from_wire, so they are what ``to_wire(m)`` would give, without
    # the cost of building them again.
    keys = doc["test_keys"]
    verdict = m.verdict
    uid, run_id = m.measurement_uid, m.run_id
    m_row: dict[str, Any] = {
        "measurement_uid": uid,
        "run_id": run_id,
        "vantage_point_id": None,
        "data_format_version": wire.DATA_FORMAT_VERSION,
        "service": m.target.service,
        "target_id": m.target.id,
        "target_kind": m.target.kind,
        "input": m.target.input,
        "start_time": m.start_time,
        "test_runtime": m.test_runtime,
        "failure": m.failure(),
        "observation_count": m.observation_count(),
        "target": wire.target_to_wire(m.target),
        "annotations": dict(m.annotations),
        "accessible": verdict.accessible if verdict else None,
        "blocking": None if verdict is None or verdict.blocking is None
        else str(verdict.blocking).lower(),
        "verdict": wire.verdict_to_wire(verdict),
    }  # fmt: skip
    _FIT_MEASUREMENT(m_row)
    if not uid:
        raise ValueError("measurement_uid: empty")
    v = m.vantage
    vp_row = {name: getattr(v, name, None) for name in _VP_FIELDS}
    _FIT_VANTAGE(vp_row)
    o_rows = list(observation_rows(uid, keys))
    for row in o_rows:
        _FIT_OBSERVATION(row, f"test_keys.{KIND_KEYS[row['kind']]}[{row['seq']}].")
    return Item(index, uid, run_id, m.start_time, v, _fingerprint(v), vp_row, m_row, o_rows)


# -- the result ---------------------------------------------------------------------------


@dataclass
class BatchResult:
    results: list[dict[str, Any]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out = {"accepted": 0, "duplicate": 0, "rejected": 0}
        for r in self.results:
            out[r["status"]] += 1
        return out

    def answer(self) -> dict[str, Any]:
        return {**self.counts(), "results": self.results}


def _result(uid: str | None, status: str, reason: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"measurement_uid": uid, "status": status}
    if reason is not None:
        out["reason"] = reason if len(reason) <= _MAX_REASON else reason[: _MAX_REASON - 3] + "..."
    return out


class _Conflict(Exception):
    """A unique row appeared meanwhile (another batch won a race): do the batch again."""


class _DatabaseError(RuntimeError):
    """The database failed in a way not worth retrying now (down, full, ...)."""


# -- storing ------------------------------------------------------------------------------

_m, _o, _r, _vp, _p = (
    tables.measurements, tables.observations, tables.runs, tables.vantage_points, tables.probes
)  # fmt: skip


def _as_text(table: sa.Table) -> sa.Table:
    """``table`` with its JSON columns as plain text: the rows carry JSON already encoded
    (the same text SQLite's JSON type would store)."""
    columns = [
        sa.Column(c.name, sa.Text if isinstance(c.type, sa.JSON) else c.type)
        for c in table.columns
        if not (c.primary_key and c.autoincrement is True)
    ]
    return sa.Table(table.name, sa.MetaData(), *columns)


_M_TEXT, _O_TEXT = _as_text(_m), _as_text(_o)
_M_NAMES = _FIT_MEASUREMENT.names
_O_NAMES = _FIT_OBSERVATION.names


#: Vantage-point ids kept in memory (fingerprint -> id): a fleet's probes repeat a few
#: each; one varying a field at every batch only evicts its own old entries.
VANTAGE_CACHE = 10_000


class IdCache:
    """A bounded map of vantage-point fingerprints to row ids, least recently used
    evicted first. Thread-safe. A miss only costs a query: the table has the id."""

    def __init__(self, size: int = VANTAGE_CACHE) -> None:
        self.size = size
        self._ids: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, fingerprint: str) -> int | None:
        with self._lock:
            found = self._ids.get(fingerprint)
            if found is not None:
                self._ids.move_to_end(fingerprint)
            return found

    def update(self, ids: dict[str, int]) -> None:
        with self._lock:
            for fp, id_ in ids.items():
                self._ids[fp] = id_
                self._ids.move_to_end(fp)
            while len(self._ids) > self.size:
                self._ids.popitem(last=False)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, fingerprint: object) -> bool:
        return fingerprint in self._ids


class Ingestor:
    """Checks and stores batches for the collector's probes. Thread-safe: the app calls
    :meth:`ingest` from worker threads."""

    def __init__(
        self,
        engine: sa.Engine,
        validate: Callable[[Any], Any] | None = None,
        cache_size: int = VANTAGE_CACHE,
    ) -> None:
        self.engine = engine
        self.validate = validate or compile_validator()
        self._copy = engine.dialect.name == "postgresql"
        self._vantage_ids = IdCache(cache_size)

    def check_identity(self, probe_id: str, items: Sequence[Any]) -> None:
        """403 when any item says it is from another probe (the whole batch is refused)."""
        for i, doc in enumerate(items):
            claimed = doc.get("probe_id") if isinstance(doc, dict) else None
            if isinstance(claimed, str) and claimed != probe_id:
                raise IngestError(
                    403,
                    f"measurements[{i}].probe_id is not this credential's probe: a probe "
                    "uploads only its own measurements (nothing of this batch was stored)",
                )

    def ingest(
        self,
        probe_id: str,
        items: Sequence[Any],
        backlog: int | None = None,
        check_nul: bool = True,
    ) -> BatchResult:
        """Check and store one batch; per-item results in request order.

        ``check_nul``: look for NUL characters in the items (the caller may know there
        are none: JSON can only carry one as ``\\u0000``).
        """
        self.check_identity(probe_id, items)
        results: list[dict[str, Any] | None] = [None] * len(items)
        valid: list[Item] = []
        seen: set[str] = set()
        for i, doc in enumerate(items):
            uid = _uid_of(doc)
            try:
                item = prepare(i, doc, self.validate, check_nul)
            except ValueError as exc:
                results[i] = _result(uid, "rejected", str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - one odd item must not cost the batch
                results[i] = _result(uid, "rejected", f"malformed measurement: {exc!r}")
                continue
            if item.uid in seen:
                results[i] = _result(item.uid, "duplicate")
                continue
            seen.add(item.uid)
            valid.append(item)
        for attempt in range(RETRIES + 1):
            try:
                stored = self._store(probe_id, valid, backlog)
                break
            except _Conflict:
                log.info("a batch of probe %s met another for the same rows; again", probe_id)
                if attempt == RETRIES:
                    raise IngestError(
                        503, "the batch kept colliding with others; send it again",
                        {"Retry-After": "1"},
                    ) from None  # fmt: skip
        for item in valid:
            results[item.index] = stored[item.index]
        return BatchResult([r for r in results if r is not None])

    # The transaction: everything below runs inside one.

    def _store(
        self, probe_id: str, items: list[Item], backlog: int | None
    ) -> dict[int, dict[str, Any]]:
        now = dt.datetime.now(dt.UTC)
        out: dict[int, dict[str, Any]] = {}
        fresh: dict[str, int] = {}
        try:
            with self.engine.begin() as conn:
                known = self._stored_uids(conn, [i.uid for i in items])
                new = []
                for item in items:
                    if item.uid in known:
                        out[item.index] = _result(item.uid, "duplicate")
                    else:
                        new.append(item)
                new = self._runs(conn, probe_id, new, out, fresh, now)
                if new:
                    self._write(conn, new)
                    counts: dict[str, int] = {}
                    for item in new:
                        counts[item.run_id] = counts.get(item.run_id, 0) + 1
                        out[item.index] = _result(item.uid, "accepted")
                    note_arrivals(conn, counts, now)  # the run grew: judge it again
                self._probe_seen(conn, probe_id, items, backlog, now)
        except sa.exc.IntegrityError as exc:
            raise _Conflict from exc
        except _Conflict:
            raise
        except (sa.exc.SQLAlchemyError, _DatabaseError) as exc:
            reason = str(exc) if isinstance(exc, _DatabaseError) else _reason(exc)
            log.error("storing a batch of probe %s failed: %s", probe_id, reason)
            raise IngestError(
                503, "the collector's database is unavailable; try again later",
                {"Retry-After": "30"},
            ) from exc  # fmt: skip
        self._vantage_ids.update(fresh)  # only ids of a committed transaction
        return out

    def _stored_uids(self, conn: sa.Connection, uids: list[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(uids, 1000):
            query = sa.select(_m.c.measurement_uid).where(_m.c.measurement_uid.in_(chunk))
            found.update(conn.execute(query).scalars())
        return found

    def _vantage_point_ids(
        self, conn: sa.Connection, items: Iterable[Item], fresh: dict[str, int]
    ) -> None:
        """Fill ``fresh`` with the ids of the items' vantage points not cached (inserting
        those not stored yet)."""
        wanted = {}
        for i in items:
            if i.fingerprint in fresh or i.fingerprint in wanted:
                continue
            cached = self._vantage_ids.get(i.fingerprint)
            if cached is not None:
                fresh[i.fingerprint] = cached  # this batch's own copy: eviction cannot lose it
            else:
                wanted[i.fingerprint] = i
        if not wanted:
            return
        rows = conn.execute(
            sa.select(_vp.c.fingerprint, _vp.c.id).where(_vp.c.fingerprint.in_(list(wanted)))
        ).all()
        fresh.update({fp: int(id_) for fp, id_ in rows})
        for fp, item in wanted.items():
            if fp not in fresh:
                inserted = conn.execute(
                    _vp.insert().values(fingerprint=fp, **item.vantage_row)
                ).inserted_primary_key
                assert inserted is not None
                fresh[fp] = int(inserted[0])

    def _runs(
        self,
        conn: sa.Connection,
        probe_id: str,
        items: list[Item],
        out: dict[int, dict[str, Any]],
        fresh: dict[str, int],
        now: dt.datetime,
    ) -> list[Item]:
        """Create the runs seen first; the items of another probe's run are rejected."""
        if not items:
            return items
        run_ids = sorted({i.run_id for i in items})
        owners: dict[str, str] = {}
        for chunk in _chunks(run_ids, 1000):
            query = (
                sa.select(_r.c.run_id, _vp.c.probe_id)
                .join(_vp, _vp.c.id == _r.c.vantage_point_id)
                .where(_r.c.run_id.in_(chunk))
            )
            owners.update({rid: owner for rid, owner in conn.execute(query)})
        kept = []
        for item in items:
            owner = owners.get(item.run_id)
            if owner is not None and owner != probe_id:
                out[item.index] = _result(
                    item.uid, "rejected", "report_id: the run is another probe's"
                )
            else:
                kept.append(item)
        self._vantage_point_ids(conn, kept, fresh)
        ids = fresh
        for item in kept:
            item.measurement_row["vantage_point_id"] = ids[item.fingerprint]
        first: dict[str, Item] = {}
        for item in kept:
            if item.run_id not in owners:
                earliest = first.get(item.run_id)
                if earliest is None or item.start_time < earliest.start_time:
                    first[item.run_id] = item
        if first:
            conn.execute(
                _r.insert(),
                [
                    {
                        "run_id": rid,
                        "suite": "",  # the wire format does not carry the suite
                        "started_at": item.start_time,
                        "finished_at": now,
                        "status": UPLOADED,
                        "vantage_point_id": ids[item.fingerprint],
                        "measurement_count": 0,
                    }
                    for rid, item in first.items()
                ],
            )
        return kept

    def _write(self, conn: sa.Connection, items: list[Item]) -> None:
        m_rows = [i.measurement_row for i in items]
        o_rows = [row for i in items for row in i.observation_rows]
        if self._copy:
            self._copy_rows(conn, m_rows, o_rows)
        else:
            conn.execute(_M_TEXT.insert(), m_rows)
            if o_rows:
                conn.execute(_O_TEXT.insert(), o_rows)

    @staticmethod
    def _copy_rows(
        conn: sa.Connection, m_rows: list[dict[str, Any]], o_rows: list[dict[str, Any]]
    ) -> None:
        import psycopg

        raw = conn.connection.driver_connection
        assert isinstance(raw, psycopg.Connection)
        try:
            with raw.cursor() as cur:
                with cur.copy(f"COPY measurements ({', '.join(_M_NAMES)}) FROM STDIN") as copy:
                    for row in m_rows:
                        copy.write_row([row[n] for n in _M_NAMES])
                if o_rows:
                    with cur.copy(f"COPY observations ({', '.join(_O_NAMES)}) FROM STDIN") as copy:
                        for row in o_rows:
                            copy.write_row([row[n] for n in _O_NAMES])
        except psycopg.errors.UniqueViolation as exc:
            raise _Conflict from exc
        except psycopg.Error as exc:
            raise _DatabaseError(
                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            ) from exc

    @staticmethod
    def _probe_seen(
        conn: sa.Connection,
        probe_id: str,
        items: list[Item],
        backlog: int | None,
        now: dt.datetime,
    ) -> None:
        values: dict[str, Any] = {"last_seen_at": now, "last_upload_at": now}
        if backlog is not None:
            values["backlog"] = backlog
        if items:
            latest = max(items, key=lambda i: i.start_time).vantage
            values.update(asn=latest.asn, cc=latest.cc)
        conn.execute(_p.update().where(_p.c.probe_id == probe_id).values(**values))


def _chunks(values: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _reason(exc: sa.exc.SQLAlchemyError) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig) if orig is not None else str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def parse_backlog(value: str | None) -> int | None:
    """``X-Vantage-Backlog`` as a count, or None when absent or not a count."""
    text = "" if value is None else value.strip()
    if not (text.isascii() and text.isdigit()):  # "²".isdigit() is true
        return None
    if len(text) > 10:  # beyond any 32-bit count (and int() refuses 4300+ digits)
        return INT32 - 1
    n = int(text)
    return n if n < INT32 else INT32 - 1


# -- the HTTP endpoint --------------------------------------------------------------------

API_MEASUREMENTS = "/api/v1/measurements"

router = APIRouter()


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps({"error": message}),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


#: Tokens of the caller address's bucket an unknown or revoked credential costs (a
#: good request costs 1): guessing credentials is throttled long before it is cheap.
AUTH_FAILURE_COST = 10.0


class InFlight:
    """Upload bodies in flight (read, waiting for a slot, or being stored), per probe
    and in all. Used from the event loop's thread only."""

    def __init__(self, per_probe: int, total: int) -> None:
        self.per_probe = per_probe
        self.total = total
        self._probes: dict[str, int] = {}
        self._count = 0

    def enter(self, probe_id: str) -> str | None:
        """Admit one more body of ``probe_id``; None when admitted, otherwise which
        cap is reached ("probe" or "total"). Each admitted body MUST be passed to :meth:`leave`."""
        n = self._probes.get(probe_id, 0)
        if n >= self.per_probe:
            return "probe"
        if self._count >= self.total:
            return "total"
        self._probes[probe_id] = n + 1
        self._count += 1
        return None

    def leave(self, probe_id: str) -> None:
        n = self._probes.get(probe_id, 0) - 1
        if n > 0:
            self._probes[probe_id] = n
        else:
            self._probes.pop(probe_id, None)
        self._count -= 1

    def __len__(self) -> int:
        return self._count


MIB = 1 << 20


def _request_cost(request: Request, max_body: int) -> float:
    """What a request costs its address: 1, and 1 per MiB of its body (as declared by
    ``Content-Length``; a body without one counts as ``max_body``): a refused body is
    still read to its end (see :func:`_refuse`), so big bodies are charged as such."""
    declared = (request.headers.get("content-length") or "").strip()
    size = int(declared) if declared.isdigit() and len(declared) < 19 else max_body
    return 1.0 + min(size, max_body) / MIB


def _refuse(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """An answer given before the body was read. The connection is kept: uvicorn
    reads what is left of the body and drops it (bounded by ``body_timeout``). Closing
    at once would save reading it but the client, still sending, would then get a
    reset instead of this answer (and a probe would not see its 413 or 429)."""
    return _error(status, message, headers)


@router.post(API_MEASUREMENTS)
async def upload(request: Request) -> Response:
    """A probe's batch -> per-item results (see the module docstring and collectors/API.md).

    Every request is charged before anything costly is done for it: one token of its
    address's bucket before the credential is looked up (:data:`AUTH_FAILURE_COST` more
    when the credential is not good), then a whole batch's worth of its probe's bucket
    (1 for the request + ``max_items``) *reserved* before the body is read, so that
    concurrent uploads cannot all pass one check. What a stored batch did not use (1 +
    its items) is given back; a refused body (400, 403, 413, 415) keeps it all. At most
    ``uploads_per_probe`` bodies of one probe and ``bodies_in_flight`` in all are held
    at once.
    """
    from collectors.whoami import AddressError, caller_address

    state = request.app.state
    settings = state.settings
    try:
        ip = caller_address(
            request.client.host if request.client else None,
            request.headers.getlist("x-forwarded-for"),
            settings.trusted_proxies,
        )
    except (AddressError, ValueError) as exc:
        return _refuse(400, str(exc))
    where = address_key(ip)
    wait = state.ingest_address_limits.take(where, _request_cost(request, settings.max_body))
    if wait > 0:
        delay = min(wait, settings.refusal_delay)
        handled = getattr(state, "requests", None)
        if delay > 0 and handled is not None:
            async with handled.aside():  # held back: the flood slows, nobody else waits
                await asyncio.sleep(delay)
        return _refuse(
            429,
            "too many upload requests from this address; send again later",
            {"Retry-After": retry_after(wait)},
        )
    try:
        probe_id = await run_in_threadpool(
            auth.authenticate, state.engine, request.headers.get("authorization")
        )
    except auth.AuthError as exc:
        state.ingest_address_limits.charge(where, AUTH_FAILURE_COST)
        return _refuse(exc.status, str(exc), {"WWW-Authenticate": "Bearer"})
    except sa.exc.SQLAlchemyError as exc:
        log.error("authenticating an upload failed: %s", _reason(exc))
        return _refuse(503, "the collector's database is unavailable", {"Retry-After": "30"})
    reserved = 1.0 + settings.max_items
    wait = state.upload_limits.reserve(probe_id, reserved)
    if wait > 0:
        return _refuse(
            429,
            "this probe is over its upload rate; send again later",
            {"Retry-After": retry_after(wait)},
        )
    used = reserved  # a refused body keeps all it reserved
    full = state.uploads_in_flight.enter(probe_id)
    if full is not None:
        state.upload_limits.refund(probe_id, reserved - 1)
        if full == "probe":
            return _refuse(
                429,
                f"this probe has {settings.uploads_per_probe} uploads in flight already; "
                "send the next when one is answered",
                {"Retry-After": "1"},
            )
        return _refuse(503, "the collector is busy with other uploads", {"Retry-After": "5"})
    try:
        try:
            raw = await auth.read_body(request, settings.max_body)
        except auth.BodyTooLarge:
            return _refuse(413, f"the body is over {settings.max_body} bytes")
        except ClientDisconnect:
            return _refuse(400, "the client went away")
        try:
            async with state.ingest_slots:
                result, count = await run_in_threadpool(
                    _handle,
                    state,
                    probe_id,
                    raw,
                    request.headers.get("content-encoding"),
                    parse_backlog(request.headers.get("x-vantage-backlog")),
                )
        except IngestError as exc:
            if exc.status >= 500:
                used = 1.0  # the collector's trouble, not the probe's
            return _error(exc.status, str(exc), exc.headers)
        used = 1.0 + count
    finally:
        state.uploads_in_flight.leave(probe_id)
        state.upload_limits.refund(probe_id, reserved - used)
    return Response(orjson.dumps(result.answer()), media_type="application/json")


def _handle(
    state: Any, probe_id: str, raw: bytes, encoding: str | None, backlog: int | None
) -> tuple[BatchResult, int]:
    """The batch's result and how many items it held."""
    settings = state.settings
    body = decode_body(raw, encoding, settings.max_body)
    items = parse_batch(body, settings.max_items)
    result: BatchResult = state.ingestor.ingest(
        probe_id, items, backlog, check_nul=b"\\u0000" in body
    )
    c = result.counts()
    log.info(
        "probe %s: %d accepted, %d duplicate, %d rejected",
        probe_id, c["accepted"], c["duplicate"], c["rejected"],
    )  # fmt: skip
    return result, len(items)


__all__ = [
    "BatchResult",
    "InFlight",
    "IngestError",
    "Ingestor",
    "decode_body",
    "parse_backlog",
    "parse_batch",
    "prepare",
    "router",
]
