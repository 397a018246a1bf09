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
import datetime as dt
import hashlib
import json
import os
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

import schema
from schema import tables, wire
from schema.model import Measurement, VantagePoint

MIGRATIONS = Path(schema.__file__).parent / "migrations"


class StoreError(RuntimeError):
    """The database could not be opened, migrated or written."""


def _alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def _on_sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def vantage_fingerprint(v: VantagePoint) -> str:
    fields = [
        v.probe_id, v.asn, v.cc, v.network_name, v.network_type, v.resolver_ip, v.resolver_asn,
        v.resolver_network_name, v.software_name, v.software_version, v.platform, v.architecture,
    ]  # fmt: skip
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


class Store:
    """Reads and writes measurements. The caller owns the engine's lifetime."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._vantage_ids: dict[str, int] = {}

    @classmethod
    def open(cls, url: str) -> Store:
        """Open (creating if needed) and migrate the database at ``url``."""
        try:
            sa_url = sa.make_url(url)
        except sa.exc.ArgumentError as exc:
            raise StoreError(f"not a database URL: {url!r}") from exc
        if sa_url.get_backend_name() == "sqlite" and sa_url.database not in (None, "", ":memory:"):
            Path(sa_url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(sa_url)
        if engine.dialect.name == "sqlite":
            sa.event.listen(engine, "connect", _on_sqlite_connect)
        store = cls(engine)
        try:
            store.migrate()
        except sa.exc.SQLAlchemyError as exc:
            engine.dispose()
            raise StoreError(f"cannot open database {sa_url.render_as_string()}: {exc}") from exc
        return store

    def migrate(self) -> None:
        """Apply pending Alembic migrations (cheap when already at head)."""
        cfg = _alembic_config()
        head = ScriptDirectory.from_config(cfg).get_current_head()
        with self.engine.begin() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
            if current == head:
                return
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def close(self) -> None:
        self.engine.dispose()

    # -- writing ---------------------------------------------------------------

    def _vantage_point_id(self, conn: sa.Connection, v: VantagePoint) -> int:
        fp = vantage_fingerprint(v)
        if fp in self._vantage_ids:
            return self._vantage_ids[fp]
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
                )
            ).inserted_primary_key
            assert inserted is not None
            found = inserted[0]
        self._vantage_ids[fp] = int(found)
        return int(found)

    def begin_run(
        self, run_id: str, suite: str, vantage: VantagePoint, started: dt.datetime
    ) -> None:
        with self.engine.begin() as conn:
            vp = self._vantage_point_id(conn, vantage)
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

    def finish_run(self, run_id: str, status: str, finished: dt.datetime) -> None:
        t, m = tables.runs, tables.measurements
        count = sa.select(sa.func.count()).where(m.c.run_id == run_id).scalar_subquery()
        with self.engine.begin() as conn:
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
        with self.engine.begin() as conn:
            for m in batch:
                doc = wire.to_wire(m)
                keys = doc["test_keys"]
                m_rows.append(
                    {
                        "measurement_uid": m.measurement_uid,
                        "run_id": m.run_id,
                        "vantage_point_id": self._vantage_point_id(conn, m.vantage),
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
                    }
                )
                o_rows.extend(_observation_rows(m.measurement_uid, keys))
            conn.execute(tables.measurements.insert(), m_rows)
            if o_rows:
                conn.execute(tables.observations.insert(), o_rows)

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
        )

    def _to_doc(
        self, conn: sa.Connection, row: Any, vantages: dict[int, VantagePoint]
    ) -> dict[str, Any]:
        if row.vantage_point_id not in vantages:
            vantages[row.vantage_point_id] = self._vantage(conn, row.vantage_point_id)
        o = tables.observations
        obs = conn.execute(
            sa.select(o.c.kind, o.c.data)
            .where(o.c.measurement_uid == row.measurement_uid)
            .order_by(o.c.kind, o.c.seq)
        ).all()
        by_kind: dict[str, list[Any]] = {k: [] for k in _KIND_KEYS}
        for kind, data in obs:
            by_kind[kind].append(data)
        v = vantages[row.vantage_point_id]
        start = row.start_time
        if start.tzinfo is None:  # SQLite drops the zone; every time stored is UTC
            start = start.replace(tzinfo=dt.UTC)
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
        for kind, key in _KIND_KEYS.items():
            keys[key] = by_kind[kind]
        keys["requests"] = list(reversed(by_kind["http"]))
        keys["failure"] = row.failure
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
        with self.engine.connect() as conn:
            result = conn.execution_options(yield_per=chunk).execute(query)
            for row in result:
                yield self._to_doc(conn, row, vantages)

    def load_measurement(self, measurement_uid: str) -> Measurement | None:
        t = tables.measurements
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(t).where(t.c.measurement_uid == measurement_uid)).first()
            if row is None:
                return None
            return wire.from_wire(self._to_doc(conn, row, {}))

    def count(self, table: sa.Table = tables.measurements) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() or 0)


_KIND_KEYS = {"dns": "queries", "tcp": "tcp_connect", "tls": "tls_handshakes", "http": "requests"}


def _observation_rows(uid: str, keys: dict[str, Any]) -> Iterator[dict[str, Any]]:
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
        self._lock = asyncio.Lock()
        self._write_lock = threading.Lock()
        self.written = 0

    async def add(self, m: Measurement) -> None:
        self._pending.append(m)
        if len(self._pending) >= self.batch_size:
            await self.flush()
        elif self._flush_handle is None:
            loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_later(
                self.max_delay, lambda: asyncio.ensure_future(self.flush())
            )

    async def flush(self) -> None:
        async with self._lock:
            if self._flush_handle is not None:
                self._flush_handle.cancel()
                self._flush_handle = None
            batch, self._pending = self._pending, []
            if not batch:
                return
            await asyncio.to_thread(self._write, batch)
            self.written += len(batch)
            if self.on_stored is not None:
                for m in batch:
                    result = self.on_stored(m)
                    if result is not None:
                        await result

    def _write(self, batch: list[Measurement]) -> None:
        with self._write_lock:
            self.store.write_measurements(batch)


def default_db_path() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "vantage" / "vantage.db"
