"""Fixtures for the outbox: a probe (config, data directory, store with queued
measurements of its own probe id) and a stand-in collector on loopback."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from probe.config import Config, load_config
from probe.outbox.enrollment import Enrollment, enrollment_path, write_enrollment
from probe.store import Store
from probe.vantage import probe_id
from schema.model import Measurement
from tests.outbox.standin import StandIn
from tests.schema.test_json_schema import rich_measurement

ROOT = Path(__file__).resolve().parents[2]
T0 = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)


def measurements(pid: str, n: int, run_id: str | None = None) -> list[Measurement]:
    """``n`` distinct measurements of probe ``pid``, one second apart, all observation
    kinds filled (each document is a few kB on the wire)."""
    base = rich_measurement()
    vantage = dataclasses.replace(base.vantage, probe_id=pid)
    run = run_id or str(uuid.uuid4())
    return [
        dataclasses.replace(
            base,
            measurement_uid=str(uuid.uuid4()),
            run_id=run,
            vantage=vantage,
            start_time=T0 + dt.timedelta(seconds=i),
        )
        for i in range(n)
    ]


def write(store: Store, ms: list[Measurement], chunk: int = 500) -> list[str]:
    """Store (and so queue) ``ms``; their uids in the order written."""
    seen: set[str] = set()
    for m in ms:
        if m.run_id not in seen:
            seen.add(m.run_id)
            store.begin_run(m.run_id, "test", m.vantage, m.start_time)
    for i in range(0, len(ms), chunk):
        store.write_measurements(ms[i : i + chunk])
    return [m.measurement_uid for m in ms]


def make_config(data_dir: Path, **overrides: Any) -> Config:
    values = {"probe.data_dir": str(data_dir)}
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(None, env={}, overrides=values)


@dataclasses.dataclass
class Probe:
    cfg: Config
    store: Store
    probe_id: str

    def queue(self, n: int) -> list[str]:
        return write(self.store, measurements(self.probe_id, n))

    def enroll_at(self, url: str, credential: str) -> Enrollment:
        e = Enrollment(url=url, probe_id=self.probe_id, credential=credential, enrolled_at=T0)
        write_enrollment(enrollment_path(self.cfg), e)
        return e

    def with_config(self, **overrides: Any) -> Probe:
        return Probe(make_config(self.cfg.data_dir(), **overrides), self.store, self.probe_id)


@pytest.fixture
def probe(tmp_path: Path) -> Iterator[Probe]:
    cfg = make_config(tmp_path / "data", collector__timeout="5")
    store = Store.open(cfg.db_url())
    yield Probe(cfg, store, probe_id(cfg.data_dir()))
    store.close()


@pytest.fixture
def standin() -> Iterator[StandIn]:
    with StandIn() as server:
        yield server


def vantage_cli(
    *args: str, data_dir: Path, timeout: float = 120, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Run ``vantage ARGS`` in a fresh interpreter with ``data_dir`` and no config file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VANTAGE_")}
    env["VANTAGE_PROBE_DATA_DIR"] = str(data_dir)
    env["VANTAGE_PRIVACY_CONSENT"] = "true"
    env.update(kw.pop("env", {}))
    return subprocess.run([sys.executable, "-m", "probe", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout, env=env, **kw)  # fmt: skip


def outbox_rows(store: Store) -> dict[str, dict[str, Any]]:
    import sqlalchemy as sa

    from schema import tables

    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(tables.outbox)).all()
    return {r.measurement_uid: dict(r._mapping) for r in rows}


def stored_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())
