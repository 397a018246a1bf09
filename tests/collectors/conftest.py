"""Collector fixtures: the app on loopback in a thread, and a real ``vantage collector
serve`` process that tests can stop (SIGTERM), kill and start again on the same port.

For end-to-end tests (the probe's outbox against a real collector)::

    def test_upload(collector_process):
        token = collector_process.enroll_token()          # or enroll_token(max_uses=1)
        url = collector_process.url                       # http://127.0.0.1:PORT
        collector_process.stop()                          # SIGTERM, waits for exit 0
        collector_process.start()                         # same port, same database
        collector_process.count("measurements")           # what the collector stored

``collector_process`` runs on PostgreSQL (``pg_url``); ``sqlite_collector_process``
on a SQLite file, for the quick local trial path.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import uvicorn

from collectors import auth
from collectors.app import create_app, open_engine
from collectors.cli import server_config
from collectors.settings import CollectorSettings
from tests.fixtures.tcpserver import closed_port

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def serving_app(
    settings: CollectorSettings, engine: sa.Engine | None = None, apps: list[Any] | None = None
) -> Iterator[str]:
    """The collector app under uvicorn in a thread (lifespan on); yields its URL.
    ``apps``: the app is appended to it (for tests that look at its state)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(settings.replace(port=port), engine)
    if apps is not None:
        apps.append(app)
    server = uvicorn.Server(server_config(app, settings.replace(port=port)))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve([sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the collector did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


class Collector:
    """A collector app on loopback with its engine, for tests that look inside."""

    def __init__(
        self, url: str, engine: sa.Engine, settings: CollectorSettings, app: Any = None
    ) -> None:
        self.url = url
        self.app = app
        self.engine = engine
        self.settings = settings
        self.http = httpx.Client(base_url=url, trust_env=False, timeout=60)

    def enroll_token(self, **kw: Any) -> str:
        return auth.create_token(self.engine, **kw)[0]

    def enroll(self, probe_id: str, token: str | None = None) -> str:
        """Enroll ``probe_id`` (with a fresh token unless given); its credential."""
        r = self.http.post(
            "/api/v1/enroll", json={"token": token or self.enroll_token(), "probe_id": probe_id}
        )
        assert r.status_code == 201, r.text
        return str(r.json()["credential"])

    def count(self, table: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar() or 0)


@pytest.fixture
def make_collector(pg_url: str) -> Iterator[Callable[..., Collector]]:
    """Start collectors on the test's PostgreSQL database: ``make_collector(**settings)``."""
    engines: list[sa.Engine] = []
    stack: list[Any] = []

    def make(db: str | None = None, **kw: Any) -> Collector:
        settings = CollectorSettings(db=db or pg_url, **kw)
        engine = open_engine(settings)
        engines.append(engine)
        apps: list[Any] = []
        cm = serving_app(settings, engine, apps)
        url = cm.__enter__()
        stack.append(cm)
        collector = Collector(url, engine, settings, apps[0])
        stack.append(collector)
        return collector

    yield make
    for item in reversed(stack):
        if isinstance(item, Collector):
            item.http.close()
        else:
            item.__exit__(None, None, None)
    for engine in engines:
        engine.dispose()


@pytest.fixture
def collector(make_collector: Callable[..., Collector]) -> Collector:
    return make_collector()


# -- a real `vantage collector serve` process -------------------------------------------


class CollectorProcess:
    """``vantage collector serve`` on loopback, in a subprocess, on a fixed port."""

    def __init__(self, db: str, tmp: Path, extra: list[str] | None = None) -> None:
        self.db = db
        self.port = closed_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra = list(extra or [])
        self.log = tmp / "collector.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {**os.environ, "VANTAGE_COLLECTOR_DB": db, "PYTHONUNBUFFERED": "1"}
        self._engine: sa.Engine | None = None

    def start(self, timeout: float = 30) -> None:
        """Start (again) on the same port and database; returns once it answers."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "probe", "collector", "serve", "--port", str(self.port),
                 *self.extra],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.url + "/api/v1/health", trust_env=False, timeout=1).is_success:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the collector did not start:\n{self.output()}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send ``sig`` (SIGKILL for a crash) and wait; the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return int(self.proc.returncode)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @property
    def engine(self) -> sa.Engine:
        if self._engine is None:
            self._engine = sa.create_engine(self.db, poolclass=sa.pool.NullPool)
        return self._engine

    def enroll_token(self, **kw: Any) -> str:
        """A new enroll token (``label``, ``expires_at``, ``max_uses`` as in
        ``collectors.auth.create_token``); the server need not be running."""
        return auth.create_token(self.engine, **kw)[0]

    def enroll(self, probe_id: str) -> str:
        """Enroll ``probe_id`` over HTTP with a fresh token; its credential."""
        r = httpx.post(
            self.url + "/api/v1/enroll",
            json={"token": self.enroll_token(), "probe_id": probe_id},
            trust_env=False,
            timeout=30,
        )
        assert r.status_code == 201, r.text
        return str(r.json()["credential"])

    def count(self, table: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar() or 0)

    def close(self) -> None:
        if self.running:
            self.stop(signal.SIGKILL)
        if self._engine is not None:
            self._engine.dispose()


def _migrated(db: str) -> None:
    open_engine(CollectorSettings(db=db, pool_size=1)).dispose()


@pytest.fixture
def collector_process(pg_url: str, tmp_path: Path) -> Iterator[CollectorProcess]:
    """A running ``vantage collector serve`` on PostgreSQL (see the module docstring)."""
    _migrated(pg_url)
    proc = CollectorProcess(pg_url, tmp_path)
    proc.start()
    try:
        yield proc
    finally:
        proc.close()


@pytest.fixture
def sqlite_collector_process(tmp_path: Path) -> Iterator[CollectorProcess]:
    db = f"sqlite:///{tmp_path / 'collector.db'}"
    _migrated(db)
    proc = CollectorProcess(db, tmp_path)
    proc.start()
    try:
        yield proc
    finally:
        proc.close()
