"""The collector: one FastAPI app for a fleet of probes.

    POST /api/v1/enroll          a probe registers with an operator's token (collectors.auth)
    POST /api/v1/measurements    a probe uploads a batch (collectors.ingest)
    GET  /api/v1/whoami          the caller's network and country (collectors.whoami)
    POST /api/v1/control         the control helper, when the operator turns it on
    GET  /api/v1/health          {"ok": true}
    and the readers' API and dashboard: collectors.query, collectors.dashboard,
    collectors.export (each included when installed).

``app.state.engine`` is the SQLAlchemy engine of the collector's database, migrated
with the probe's own Alembic migrations (the same tables, plus ``enroll_tokens`` and
``probes``); ``app.state.settings`` the :class:`CollectorSettings`.

>>> app = create_app(CollectorSettings(db="postgresql+psycopg://collector@/vantage"))
>>> uvicorn.run(app, access_log=False)  # what `vantage collector serve` does
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from collectors import access, auth, ingest, whoami
from collectors.ratelimit import RateLimiter, Slots
from collectors.server import ActiveRequests, RequestCount
from collectors.settings import CollectorSettings
from probe import __version__
from probe.geoip import GeoIP
from probe.store import Store

log = logging.getLogger("vantage.collector")

API_HEALTH = "/api/v1/health"
API_CONTROL = "/api/v1/control"
#: Routers of the readers' side, included when their module is there.
OPTIONAL_ROUTERS = ("collectors.query", "collectors.dashboard", "collectors.export")


def open_engine(settings: CollectorSettings) -> sa.Engine:
    """The engine of ``settings.db``, migrated to the newest schema.

    Raises ``probe.store.StoreError`` when the database cannot be reached or migrated.
    """
    url = sa.make_url(settings.db)  # ArgumentError: not a URL
    if url.get_backend_name() == "sqlite":
        # The probe's store knows SQLite's pragmas (WAL, busy timeout): a local trial.
        return Store.open(settings.db, outbox=False).engine
    engine = sa.create_engine(
        url,
        pool_size=settings.pool_size,
        max_overflow=settings.pool_size,
        pool_pre_ping=True,  # a restarted PostgreSQL costs one failed check, not a request
    )
    store = Store(engine, outbox=False)
    try:
        store.migrate()
    except Exception:
        engine.dispose()
        raise
    return engine


def open_export_engine(engine: sa.Engine, settings: CollectorSettings) -> sa.Engine:
    """The engine exports read on: the same database, a pool of its own of two
    connections per export slot (an export reads with two) and no overflow, so that
    exports never take the connections uploads and the read API need. SQLite (a
    trial) shares the one engine."""
    if engine.dialect.name == "sqlite":
        return engine
    return sa.create_engine(
        engine.url,
        pool_size=2 * settings.export_slots,
        max_overflow=0,
        pool_timeout=10,
        pool_pre_ping=True,
    )


def missing_routers() -> list[str]:
    """The optional router modules that are not installed (yet)."""
    missing = []
    for name in OPTIONAL_ROUTERS:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise  # the module is there but something it imports is not: say so
            missing.append(name)
    return missing


def create_app(settings: CollectorSettings, engine: sa.Engine | None = None) -> FastAPI:
    """The collector app. ``engine``: an engine already migrated (tests share one);
    otherwise one is opened from ``settings.db`` and disposed of when the app stops."""
    own_engine = engine is None
    engine = engine if engine is not None else open_engine(settings)
    geoip = GeoIP(settings.asn_db, settings.country_db)  # GeoIPError: a bad path, now
    if settings.operator_token_file:  # made now, so the operator can read it at once
        access.operator_token(Path(settings.operator_token_file))  # AccessError: now
    export_engine = open_export_engine(engine, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        tasks = []
        settle = _settle_loop()
        if settle is not None and settings.settle_after > 0:
            tasks.append(asyncio.create_task(settle(engine, stop, settings.settle_after)))
        try:
            yield
        finally:
            stop.set()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait_for(task, 10)
            geoip.close()
            if export_engine is not engine:
                export_engine.dispose()
            if own_engine:
                engine.dispose()

    app = FastAPI(
        title="Vantage collector",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.geoip = geoip
    app.state.ingestor = ingest.Ingestor(engine)
    app.state.ingest_slots = asyncio.Semaphore(settings.ingest_slots)
    app.state.upload_limits = RateLimiter(settings.upload_rate, settings.upload_burst)
    app.state.address_limits = RateLimiter(settings.address_rate, settings.address_burst)
    app.state.ingest_address_limits = RateLimiter(
        settings.ingest_address_rate, settings.ingest_address_burst
    )
    app.state.uploads_in_flight = ingest.InFlight(
        settings.uploads_per_probe, settings.bodies_in_flight
    )
    app.state.export_engine = export_engine
    app.state.export_slots = Slots(settings.export_slots)
    app.state.export_address_limits = RateLimiter(
        settings.export_address_rate, settings.export_address_burst
    )
    app.state.control_helper = None

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # The collector's errors are {"error": ...}; the control helper's stay
        # {"detail": ...}, as its clients (probe.control) read them.
        key = "detail" if request.url.path == API_CONTROL else "error"
        return JSONResponse({key: exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.get(API_HEALTH)
    async def health() -> dict[str, bool]:
        return {"ok": True}

    # Only requests being handled count (idle and half-sent connections are the
    # protocol's business: collectors.server).
    app.state.requests = RequestCount(settings.max_active_requests)
    app.add_middleware(ActiveRequests, count=app.state.requests)
    app.include_router(auth.router)
    app.include_router(ingest.router)
    app.include_router(whoami.router)
    if settings.control is not None:
        _add_control(app, settings)
    for name in OPTIONAL_ROUTERS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            log.warning("%s is not installed: its endpoints are missing", name)
            continue
        app.include_router(module.router)
    return app


def app_from_env() -> FastAPI:
    """The app of one worker process of ``vantage collector serve --workers N``: its
    settings come from ``VANTAGE_COLLECTOR_*`` (set by the command from its flags)."""
    from collectors.cli import tune_gc

    app = create_app(CollectorSettings.from_env(os.environ))
    tune_gc()
    return app


def _add_control(app: FastAPI, settings: CollectorSettings) -> None:
    """Serve ``collectors.control``'s endpoint from this app (its own app holds it)."""
    from collectors import control

    assert settings.control is not None
    helper = control.ControlHelper(settings.control)
    for route in control.create_app(helper).router.routes:
        if getattr(route, "path", None) == control.API_CONTROL:
            app.router.routes.append(route)
    app.state.control_helper = helper


def _settle_loop() -> Any:
    """``collectors.analysis.settle_loop`` (judging uploaded runs), or None without it."""
    try:
        from collectors.analysis import settle_loop
    except ImportError:
        return None
    return settle_loop
