"""The measurement store: SQL through SQLAlchemy Core, migrated on open.

SQLite on the probe (WAL journal, full fsync on commit: an SD card that loses power
keeps a consistent database), any SQLAlchemy URL otherwise. A batch of measurements
is one transaction, so each measurement with all its observations is either wholly
stored or not at all; ``observation_count`` lets a reader check that.

>>> store = Store.open("sqlite:///vantage.db")
>>> store.write_measurements([m])
>>> store.load_measurement(m.measurement_uid) == m
True
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import hashlib
import json
import re
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

import schema
from probe.analysis.events import Decision, RunStatus
from schema import tables, wire
from schema.model import Measurement, VantagePoint

if TYPE_CHECKING:  # alembic is imported only to migrate (the daemon's memory budget)
    from alembic.config import Config as AlembicConfig

MIGRATIONS = Path(schema.__file__).parent / "migrations"


class StoreError(RuntimeError):
    """The database could not be opened, migrated, read or written."""


def _reason(exc: sa.exc.SQLAlchemyError) -> str:
    """The driver's own message (``database is locked``), without SQL and parameters."""
    orig = getattr(exc, "orig", None)
    text = str(orig) if orig is not None else str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


@contextlib.contextmanager
def _failing(operation: str) -> Iterator[None]:
    """Turn a database error into a :class:`StoreError` naming ``operation``."""
    try:
        yield
    except sa.exc.SQLAlchemyError as exc:
        raise StoreError(f"cannot {operation}: {_reason(exc)}") from exc


def _alembic_config() -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


_REVISION = re.compile(r"^revision\s*(?::\s*str)?\s*=\s*[\"']([^\"']+)[\"']\s*$", re.M)
_DOWN_REVISION = re.compile(
    r"^down_revision\s*(?::[^=\n]+)?=\s*(?:None|[\"']([^\"']+)[\"'])\s*$", re.M
)


@functools.cache
def _script_head() -> str | None:
    """The head revision, read from the migration files without importing alembic
    (about 7 MB with mako and pygments); None when a file is not in the plain form
    ``revision = "0004"`` / ``down_revision = "0003"`` (alembic then decides)."""
    revisions: set[str] = set()
    downs: set[str] = set()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        text = path.read_text("utf-8")
        revision, down = _REVISION.findall(text), _DOWN_REVISION.findall(text)
        if len(revision) != 1 or len(down) != 1:
            return None
        revisions.add(revision[0])
        if down[0]:
            downs.add(down[0])
    heads = revisions - downs
    return heads.pop() if len(heads) == 1 else None


def _at_head(conn: sa.Connection) -> bool:
    """Whether the database is at the migrations' head (False when unsure)."""
    head = _script_head()
    if head is None or not sa.inspect(conn).has_table("alembic_version"):
        return False
    versions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
    return list(versions) == [head]


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def _sqlite_on_connect(busy_timeout: float) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        cur.close()

    return on_connect


def _transactional_ddl(engine: sa.Engine) -> sa.Engine:
    """The engine to migrate with: on SQLite, one whose every statement, DDL included,
    runs inside the transaction SQLAlchemy began, so that all pending migrations and
    their ``alembic_version`` row commit together or not at all (a power cut during
    the first migration leaves an empty database, never tables without a version).

    Python's sqlite3 module starts transactions only before DML and runs CREATE TABLE
    outside any; SQLAlchemy's documented remedy for pysqlite is to turn that off and
    emit BEGIN itself. Other databases already run DDL in the transaction.
    """
    if engine.dialect.name != "sqlite" or engine.url.database in (None, "", ":memory:"):
        return engine  # an in-memory database is not shared with a second engine
    ddl = sa.create_engine(engine.url, poolclass=sa.pool.NullPool)
    sa.event.listen(ddl, "connect", _sqlite_on_connect(10.0))

    def autocommit_driver(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None

    def begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    sa.event.listen(ddl, "connect", autocommit_driver)
    sa.event.listen(ddl, "begin", begin)
    return ddl


def vantage_fingerprint(v: VantagePoint) -> str:
    fields = [
        v.probe_id, v.asn, v.cc, v.network_name, v.network_type, v.resolver_ip, v.resolver_asn,
        v.resolver_network_name, v.software_name, v.software_version, v.platform, v.architecture,
    ]  # fmt: skip
    if v.public_ip is not None:  # only when stored (privacy.store_ip): older rows keep theirs
        fields.append(v.public_ip)
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


class Store:
    """Reads and writes measurements. The caller owns the engine's lifetime."""

    def __init__(self, engine: sa.Engine, *, outbox: bool = True) -> None:
        self.engine = engine
        self.outbox = outbox
        self._vantage_ids: dict[str, int] = {}

    @classmethod
    def open(cls, url: str, *, busy_timeout: float = 10.0, outbox: bool = True) -> Store:
        """Open (creating if needed) and migrate the database at ``url``.

        ``busy_timeout``: how long SQLite waits for another writer's lock (seconds)
        before a write fails with :class:`StoreError`. ``outbox``: queue every
        measurement written for upload, in the same transaction (the probe does; the
        collector, which receives them, does not).
        """
        try:
            sa_url = sa.make_url(url)
        except sa.exc.ArgumentError as exc:
            raise StoreError(f"not a database URL: {url!r}") from exc
        if sa_url.get_backend_name() == "sqlite" and sa_url.database not in (None, "", ":memory:"):
            Path(sa_url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(sa_url)
        if engine.dialect.name == "sqlite":
            sa.event.listen(engine, "connect", _sqlite_on_connect(busy_timeout))
        store = cls(engine, outbox=outbox)
        try:
            store._migrate()
        except sa.exc.SQLAlchemyError as exc:
            engine.dispose()
            raise StoreError(f"cannot open database {sa_url.render_as_string()}: {exc}") from exc
        return store

    def migrate(self) -> None:
        """Apply pending Alembic migrations (cheap when already at head)."""
        with _failing("migrate the database"):
            self._migrate()

    def _migrate(self) -> None:
        with self.engine.connect() as conn:
            if _at_head(conn):  # the usual case, decided without importing alembic
                return
        from alembic import command
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        cfg = _alembic_config()
        head = ScriptDirectory.from_config(cfg).get_current_head()
        engine = _transactional_ddl(self.engine)
        try:
            with engine.begin() as conn:
                current = MigrationContext.configure(conn).get_current_revision()
                if current == head:
                    return
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        finally:
            if engine is not self.engine:
                engine.dispose()

    def close(self) -> None:
        self.engine.dispose()

    # -- writing ---------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self, operation: str) -> Iterator[tuple[sa.Connection, dict[str, int]]]:
        """A write transaction and the vantage point ids it finds or inserts; those
        join the cache only once it committed (a rolled-back insert has no id)."""
        fresh: dict[str, int] = {}
        with _failing(operation), self.engine.begin() as conn:
            yield conn, fresh
        self._vantage_ids.update(fresh)

    def _vantage_point_id(self, conn: sa.Connection, v: VantagePoint, fresh: dict[str, int]) -> int:
        fp = vantage_fingerprint(v)
        known = self._vantage_ids.get(fp, fresh.get(fp))
        if known is not None:
            return known
        t = tables.vantage_points
        found = conn.execute(sa.select(t.c.id).where(t.c.fingerprint == fp)).scalar()
        if found is None:
            inserted = conn.execute(
                t.insert().values(
                    fingerprint=fp,
                    probe_id=v.probe_id,
                    asn=v.asn,
                    cc=v.cc,
                    network_name=v.network_name,
                    network_type=v.network_type,
                    resolver_ip=v.resolver_ip,
                    resolver_asn=v.resolver_asn,
                    resolver_network_name=v.resolver_network_name,
                    software_name=v.software_name,
                    software_version=v.software_version,
                    platform=v.platform,
                    architecture=v.architecture,
                    public_ip=v.public_ip,
                )
            ).inserted_primary_key
            assert inserted is not None
            found = inserted[0]
        fresh[fp] = int(found)
        return int(found)

    def begin_run(
        self, run_id: str, suite: str, vantage: VantagePoint, started: dt.datetime
    ) -> None:
        with self._transaction(f"begin run {run_id}") as (conn, fresh):
            vp = self._vantage_point_id(conn, vantage, fresh)
            conn.execute(
                tables.runs.insert().values(
                    run_id=run_id,
                    suite=suite,
                    started_at=started,
                    status="running",
                    vantage_point_id=vp,
                    measurement_count=0,
                )
            )

    def interrupt_stale_runs(self, probe_id: str, now: dt.datetime) -> int:
        """Mark this probe's runs still ``running`` as interrupted (call only when no
        run of it is alive: :class:`probe.measuring.RunLock`); how many were."""
        t, m, vp = tables.runs, tables.measurements, tables.vantage_points
        count = sa.select(sa.func.count()).where(m.c.run_id == t.c.run_id).scalar_subquery()
        mine = sa.select(vp.c.id).where(vp.c.probe_id == probe_id)
        with _failing("mark interrupted runs"), self.engine.begin() as conn:
            result = conn.execute(
                t.update()
                .where(t.c.status == "running", t.c.vantage_point_id.in_(mine))
                .values(status="interrupted", finished_at=now, measurement_count=count)
            )
            return int(result.rowcount or 0)

    def finish_run(self, run_id: str, status: str, finished: dt.datetime) -> None:
        t, m = tables.runs, tables.measurements
        count = sa.select(sa.func.count()).where(m.c.run_id == run_id).scalar_subquery()
        with _failing(f"finish run {run_id}"), self.engine.begin() as conn:
            conn.execute(
                t.update()
                .where(t.c.run_id == run_id)
                .values(status=status, finished_at=finished, measurement_count=count)
            )

    def write_measurements(self, batch: Sequence[Measurement]) -> None:
        """Store a batch in one transaction: all of it, or none of it."""
        if not batch:
            return
        m_rows: list[dict[str, Any]] = []
        o_rows: list[dict[str, Any]] = []
        with self._transaction(f"write {len(batch)} measurement(s)") as (conn, fresh):
            for m in batch:
                doc = wire.to_wire(m)
                keys = doc["test_keys"]
                m_rows.append(
                    {
                        "measurement_uid": m.measurement_uid,
                        "run_id": m.run_id,
                        "vantage_point_id": self._vantage_point_id(conn, m.vantage, fresh),
                        "data_format_version": doc["data_format_version"],
                        "service": m.target.service,
                        "target_id": m.target.id,
                        "target_kind": m.target.kind,
                        "input": doc["input"],
                        "start_time": m.start_time,
                        "test_runtime": m.test_runtime,
                        "failure": keys["failure"],
                        "observation_count": m.observation_count(),
                        "target": doc["target"],
                        "annotations": dict(m.annotations),
                        "accessible": keys["accessible"],
                        "blocking": None
                        if keys["blocking"] is None
                        else str(keys["blocking"]).lower(),
                        "verdict": keys["analysis"],
                    }
                )
                o_rows.extend(observation_rows(m.measurement_uid, keys))
            conn.execute(tables.measurements.insert(), m_rows)
            if o_rows:
                conn.execute(tables.observations.insert(), o_rows)
            if self.outbox:
                now = dt.datetime.now(dt.UTC)
                conn.execute(
                    tables.outbox.insert(),
                    [{"measurement_uid": r["measurement_uid"], "queued_at": now} for r in m_rows],
                )

    # -- reading ---------------------------------------------------------------

    def _vantage(self, conn: sa.Connection, vp_id: int) -> VantagePoint:
        row = conn.execute(
            sa.select(tables.vantage_points).where(tables.vantage_points.c.id == vp_id)
        ).one()
        return VantagePoint(
            probe_id=row.probe_id,
            software_version=row.software_version,
            platform=row.platform,
            architecture=row.architecture,
            asn=row.asn,
            cc=row.cc,
            network_name=row.network_name,
            network_type=row.network_type,
            resolver_ip=row.resolver_ip,
            resolver_asn=row.resolver_asn,
            resolver_network_name=row.resolver_network_name,
            software_name=row.software_name,
            public_ip=row.public_ip,
        )

    def _to_doc(
        self,
        conn: sa.Connection,
        row: Any,
        vantages: dict[int, VantagePoint],
        obs: Sequence[Any] | None = None,
    ) -> dict[str, Any]:
        """``obs``: the measurement's (kind, data) observations in (kind, seq) order,
        when the caller read them already (:meth:`documents` reads a batch's at once)."""
        if row.vantage_point_id not in vantages:
            vantages[row.vantage_point_id] = self._vantage(conn, row.vantage_point_id)
        o = tables.observations
        if obs is None:
            obs = conn.execute(
                sa.select(o.c.kind, o.c.data)
                .where(o.c.measurement_uid == row.measurement_uid)
                .order_by(o.c.kind, o.c.seq)
            ).all()
        by_kind: dict[str, list[Any]] = {k: [] for k in KIND_KEYS}
        for kind, data in obs:
            by_kind[kind].append(data)
        v = vantages[row.vantage_point_id]
        start = _utc(row.start_time)  # SQLite drops the zone; every time stored is UTC
        # Rebuild a wire document from the rows, then parse it: one code path.
        m = Measurement(
            measurement_uid=row.measurement_uid,
            run_id=row.run_id,
            target=wire.target_from_wire(row.target),
            vantage=v,
            start_time=start,
            test_runtime=row.test_runtime,
            annotations=dict(row.annotations),
        )
        doc = wire.to_wire(m)
        keys = doc["test_keys"]
        for kind, key in KIND_KEYS.items():
            keys[key] = by_kind[kind]
        keys["requests"] = list(reversed(by_kind["http"]))
        keys["failure"] = row.failure
        keys["accessible"] = row.accessible
        keys["blocking"] = False if row.blocking == "false" else row.blocking
        keys["analysis"] = row.verdict
        return doc

    def iter_documents(
        self, run_id: str | None = None, chunk: int = 500
    ) -> Iterator[dict[str, Any]]:
        """Stored measurements as wire documents, oldest first, read in chunks."""
        t = tables.measurements
        query = sa.select(t).order_by(t.c.start_time, t.c.measurement_uid)
        if run_id is not None:
            query = query.where(t.c.run_id == run_id)
        vantages: dict[int, VantagePoint] = {}
        with _failing("read measurements"), self.engine.connect() as conn:
            result = conn.execution_options(yield_per=chunk).execute(query)
            for row in result:
                yield self._to_doc(conn, row, vantages)

    def documents(self, measurement_uids: Sequence[str]) -> list[dict[str, Any]]:
        """The wire documents of these measurements, in the order given; a uid that is
        not stored (pruned meanwhile) is left out. Memory is that of the documents
        asked for: the outbox uploads a large backlog one batch at a time."""
        t = tables.measurements
        vantages: dict[int, VantagePoint] = {}
        query = sa.select(t).where(t.c.measurement_uid.in_(measurement_uids))
        o = tables.observations
        with _failing("read measurements"), self.engine.connect() as conn:
            rows = {row.measurement_uid: row for row in conn.execute(query)}
            # One query for the batch's observations, not one per measurement.
            obs: dict[str, list[Any]] = {u: [] for u in rows}
            for ob in conn.execute(
                sa.select(o.c.measurement_uid, o.c.kind, o.c.data)
                .where(o.c.measurement_uid.in_(list(rows)))
                .order_by(o.c.measurement_uid, o.c.kind, o.c.seq)
            ):
                obs[ob.measurement_uid].append((ob.kind, ob.data))
            return [self._to_doc(conn, rows[u], vantages, obs[u])
                    for u in measurement_uids if u in rows]  # fmt: skip

    def rescrub(self, scrub: Any, run_ids: Sequence[str]) -> int:
        """Scrub the stored measurements of ``run_ids`` again with ``scrub`` (a
        :class:`probe.privacy.Scrub` that knows an address learnt since they were
        stored), rewriting those that change; and drop a vantage point's resolver
        address that is one of the probe's. How many measurements changed.

        On SQLite the rewritten pages are overwritten (``secure_delete``) and the
        write-ahead log is truncated, so the old text does not linger in the file.
        """
        t, o, vp = tables.measurements, tables.observations, tables.vantage_points
        changed = 0
        with _failing("scrub stored measurements again"), self.engine.begin() as conn:
            sqlite = conn.dialect.name == "sqlite"
            if sqlite:
                conn.exec_driver_sql("PRAGMA secure_delete=ON")
            for row in conn.execute(sa.select(vp.c.id, vp.c.resolver_ip)).all():
                if scrub.resolver(row.resolver_ip) != row.resolver_ip:
                    # The fingerprint hashed the address: it goes too (a new row is made
                    # for the next run rather than matching a hash of it).
                    conn.execute(vp.update().where(vp.c.id == row.id).values(
                        resolver_ip=None, fingerprint=uuid.uuid4().hex))  # fmt: skip
            self._vantage_ids.clear()
            for start in range(0, len(run_ids), 200):
                part = list(run_ids[start : start + 200])
                rows = conn.execute(sa.select(t).where(t.c.run_id.in_(part))).all()
                vantages: dict[int, VantagePoint] = {}
                for row in rows:
                    doc = self._to_doc(conn, row, vantages)
                    clean = scrub.document(doc)
                    if not scrub.changed:
                        continue
                    changed += 1
                    uid = row.measurement_uid
                    keys = clean["test_keys"]
                    conn.execute(t.update().where(t.c.measurement_uid == uid).values(
                        failure=keys["failure"], verdict=keys["analysis"],
                        annotations={k: v for k, v in clean["annotations"].items()
                                     if k not in wire.VANTAGE_ANNOTATIONS},
                    ))  # fmt: skip
                    conn.execute(o.delete().where(o.c.measurement_uid == uid))
                    rows_out = list(observation_rows(uid, keys))
                    if rows_out:
                        conn.execute(o.insert(), rows_out)
            if sqlite:
                conn.exec_driver_sql("PRAGMA secure_delete=OFF")
        if self.engine.dialect.name == "sqlite":
            with contextlib.suppress(sa.exc.SQLAlchemyError), self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        return changed

    def load_measurement(self, measurement_uid: str) -> Measurement | None:
        t = tables.measurements
        with _failing(f"read measurement {measurement_uid}"), self.engine.connect() as conn:
            row = conn.execute(sa.select(t).where(t.c.measurement_uid == measurement_uid)).first()
            if row is None:
                return None
            return wire.from_wire(self._to_doc(conn, row, {}))

    # -- service statuses and blocking events ---------------------------------------

    def write_service_statuses(self, run_id: str, statuses: Sequence[Any]) -> None:
        """Store each service's status in a run (``probe.analysis.ServiceStatus``)."""
        rows = [{"run_id": run_id, "service": s.service, "status": s.status,
                 "blocking": list(s.blocking), "blocked_targets": list(s.blocked_targets),
                 "explanation": s.explanation} for s in statuses]  # fmt: skip
        if rows:
            with _failing(f"write service statuses of run {run_id}"), self.engine.begin() as conn:
                conn.execute(tables.run_services.insert(), rows)

    def service_history(self, probe_id: str, service: str, limit: int = 3) -> list[RunStatus]:
        """The service's last statuses from this probe, oldest first."""
        r, rs, vp = tables.runs, tables.run_services, tables.vantage_points
        query = (
            sa.select(r.c.run_id, r.c.started_at, rs.c.status, rs.c.blocking)
            .join(rs, rs.c.run_id == r.c.run_id)
            .join(vp, vp.c.id == r.c.vantage_point_id)
            .where(vp.c.probe_id == probe_id, rs.c.service == service)
            .order_by(r.c.started_at.desc())
            .limit(limit)
        )
        with _failing(f"read the history of {service}"), self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [RunStatus(row.run_id, _utc(row.started_at), row.status, tuple(row.blocking))
                for row in reversed(rows)]  # fmt: skip

    def open_event(self, probe_id: str, service: str) -> int | None:
        e = tables.events
        with _failing(f"read the open event of {service}"), self.engine.connect() as conn:
            return conn.execute(
                sa.select(e.c.id).where(
                    e.c.probe_id == probe_id, e.c.service == service, e.c.ended_at.is_(None)
                )  # fmt: skip
            ).scalar()

    def apply_decision(self, vantage: VantagePoint, service: str, decision: Decision) -> None:
        with _failing(f"record the {service} event"), self.engine.begin() as conn:
            record_decision(conn, vantage, service, decision)

    def events(self, probe_id: str | None = None) -> list[dict[str, Any]]:
        e = tables.events
        query = sa.select(e).order_by(e.c.started_at)
        if probe_id is not None:
            query = query.where(e.c.probe_id == probe_id)
        with _failing("read events"), self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def count(self, table: sa.Table = tables.measurements) -> int:
        with _failing(f"count {table.name}"), self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() or 0)


def record_decision(
    conn: sa.Connection, vantage: VantagePoint, service: str, decision: Decision
) -> None:
    """Start or end ``service``'s blocking event of ``vantage``'s probe, on the caller's
    transaction (the collector settles a run's statuses and events in one)."""
    e = tables.events
    if decision.action == "start":
        conn.execute(e.insert().values(
            probe_id=vantage.probe_id, asn=vantage.asn, cc=vantage.cc, service=service,
            status=decision.status, blocking=list(decision.blocking),
            started_at=decision.at, runs=list(decision.runs)))  # fmt: skip
    elif decision.action == "end":
        open_id = conn.execute(
            sa.select(e.c.id, e.c.runs).where(
                e.c.probe_id == vantage.probe_id,
                e.c.service == service,
                e.c.ended_at.is_(None),
            )  # fmt: skip
        ).first()
        if open_id is not None:
            conn.execute(e.update().where(e.c.id == open_id.id).values(
                ended_at=decision.at, runs=[*open_id.runs, *decision.runs]))  # fmt: skip


KIND_KEYS = {"dns": "queries", "tcp": "tcp_connect", "tls": "tls_handshakes", "http": "requests"}


def observation_rows(uid: str, keys: dict[str, Any]) -> Iterator[dict[str, Any]]:
    requests = list(reversed(keys["requests"]))  # store in request order
    for kind, items in (
        ("dns", keys["queries"]),
        ("tcp", keys["tcp_connect"]),
        ("tls", keys["tls_handshakes"]),
        ("http", requests),
    ):
        for seq, item in enumerate(items):
            failure = item["status"]["failure"] if kind == "tcp" else item.get("failure")
            yield {
                "measurement_uid": uid,
                "kind": kind,
                "seq": seq,
                "hostname": item.get("hostname") or item.get("server_name"),
                "address": item.get("ip") or item.get("address"),
                "port": item.get("port"),
                "failure": failure,
                "failed_operation": item.get("failed_operation"),
                "t0": item["t0"],
                "t": item["t"],
                "data": item,
            }


class BatchWriter:
    """Collects measurements and writes them in batches from a worker thread.

    ``on_stored`` is called (in the event loop) for each measurement only after its
    batch committed: a measurement is written before it is reported.

    A batch that cannot be written is never dropped: it goes back to the front of the
    pending measurements. A failure of the timed (background) flush is remembered and
    raised, as :class:`StoreError`, by the next :meth:`add` or :meth:`flush`;
    :meth:`flush` first tries to write everything again and raises only if that
    still fails.
    """

    def __init__(
        self,
        store: Store,
        on_stored: Callable[[Measurement], Awaitable[None] | None] | None = None,
        batch_size: int = 64,
        max_delay: float = 0.5,
    ) -> None:
        self.store = store
        self.on_stored = on_stored
        self.batch_size = batch_size
        self.max_delay = max_delay
        self._pending: list[Measurement] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._flush_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._write_lock = threading.Lock()
        # What the timed flush failed with, until add() or flush() raises it. A write
        # error is superseded by a later write that succeeds; any other error is not.
        self._error: BaseException | None = None
        self._error_is_write = False
        self.written = 0

    @property
    def pending(self) -> int:
        """Measurements not yet stored (including a batch that failed to write)."""
        return len(self._pending)

    async def add(self, m: Measurement) -> None:
        """Queue ``m``; raises the timed flush's failure, if any (``m`` stays queued)."""
        self._pending.append(m)
        error, self._error = self._error, None
        if error is not None:
            self._schedule()
            raise error
        if len(self._pending) >= self.batch_size:
            await self.flush()
        else:
            self._schedule()

    async def flush(self) -> None:
        """Write everything pending now; raises :class:`StoreError` if it cannot be
        written (the measurements stay pending for a later flush)."""
        await self._flush(background=False)

    def _schedule(self) -> None:
        if self._flush_handle is None and self._pending:
            loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_later(self.max_delay, self._start_timed_flush)

    def _start_timed_flush(self) -> None:
        self._flush_handle = None
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.ensure_future(self._flush(background=True))
        else:  # still writing: try again later rather than queue a second task
            self._schedule()

    async def _flush(self, *, background: bool) -> None:
        async with self._lock:
            if self._flush_handle is not None:
                self._flush_handle.cancel()
                self._flush_handle = None
            earlier, earlier_is_write = self._error, self._error_is_write
            if not background:
                self._error = None  # raised below, or superseded by this write
            batch, self._pending = self._pending, []
            try:
                if batch:
                    await self._write_batch(batch)
            except Exception as exc:  # a database error is a StoreError already
                if not background:
                    raise
                if self._error is None or self._error_is_write:
                    self._error, self._error_is_write = exc, True
                return
            if background and self._error_is_write:
                self._error = None  # what failed earlier has now been written
            try:
                await self._report(batch)
            except Exception as exc:
                if not background:
                    raise
                if self._error is None:
                    self._error, self._error_is_write = exc, False
                return
            if not background and earlier is not None and not earlier_is_write:
                raise earlier

    async def _write_batch(self, batch: list[Measurement]) -> None:
        """Write ``batch`` in a worker thread; unless it committed, it goes back to the
        front of the pending measurements."""
        write = asyncio.ensure_future(asyncio.to_thread(self._write, batch))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            # The thread cannot be stopped: its outcome decides whether the batch goes
            # back (it must be neither lost nor written twice).
            def settle(done: asyncio.Future[None]) -> None:
                if done.cancelled() or done.exception() is not None:
                    self._pending[:0] = batch

            write.add_done_callback(settle)
            raise
        except BaseException:
            self._pending[:0] = batch
            raise
        self.written += len(batch)

    async def _report(self, batch: list[Measurement]) -> None:
        if self.on_stored is not None:
            for m in batch:
                result = self.on_stored(m)
                if result is not None:
                    await result

    def _write(self, batch: list[Measurement]) -> None:
        with self._write_lock:
            self.store.write_measurements(batch)


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
