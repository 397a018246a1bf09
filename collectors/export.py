"""Exports from the collector, with the probe's own exporter (``probe.export``).

    GET /api/v1/export?format=jsonl|csv|parquet|ooni&since&until&service&cc&asn&probe
                       &blocking&pseudonymize=true
    vantage collector export --format ... [the options of `vantage export`] --db URL

The response streams as the rows are read (constant memory on the server): JSON lines
and CSV as they are encoded, Parquet row group by row group (the footer comes last). A
filter may be repeated to match any of its values. Errors are ``{"error": "..."}``:
422 for a bad parameter (unknown format, malformed date, ``partition_by``, which needs
a directory), 404 when nothing matches, 503 when the database cannot answer. A
failure after the first bytes were sent cuts the response short (the client sees an
incomplete chunked body, never a clean end).

``pseudonymize=true`` needs the operator's key: ``pseudonym_key_file`` in the
collector's settings (created, mode 0600, if absent; the same key gives the same
pseudonyms in every export). DNS answers in OONI format get their AS from the
settings' ``asn_db``, when there is one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Message, Receive, Scope, Send

from collectors import access
from collectors.ratelimit import Slots, address_key, retry_after
from probe.export import commands
from probe.export.filters import FilterError, parse_filters
from probe.export.pseudonym import KeyFileError, Pseudonymizer
from probe.export.reader import ReadError
from probe.export.stream import (
    ENCODERS,
    Export,
    NothingToExport,
    UnknownFormat,
    check_format,
)

log = logging.getLogger("vantage.collector.export")

router = APIRouter(prefix="/api/v1", tags=["export"])

DB_ENV = "VANTAGE_COLLECTOR_DB"
FILTERS = ("since", "until", "service", "cc", "asn", "probe", "blocking")
SINGLE = ("format", "since", "until", "pseudonymize")


class BadParameter(ValueError):
    pass


class Forbidden(Exception):
    """The caller may not have this export (403)."""


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _parameters(request: Request) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for name, value in request.query_params.multi_items():
        if name not in (*FILTERS, "format", "pseudonymize"):
            known = ", ".join(sorted((*FILTERS, "format", "pseudonymize")))
            if name == "partition_by":
                raise BadParameter("partition_by: a dataset directory cannot be streamed; "
                                   "use `vantage collector export --partition-by`")  # fmt: skip
            raise BadParameter(f"{name}: unknown parameter (known: {known})")
        values.setdefault(name, []).append(value)
    for name in SINGLE:
        if len(values.get(name, ())) > 1:
            raise BadParameter(f"{name}: given more than once")
    if "format" not in values:
        raise BadParameter("format: needed (jsonl, csv, parquet or ooni)")
    return values


def _pseudonymizer(request: Request, values: dict[str, list[str]]) -> Pseudonymizer | None:
    """The operator chooses; the public always gets pseudonyms (403 otherwise)."""
    operator = access.is_operator(request)
    choice = values.get("pseudonymize", ["false" if operator else "true"])[0].strip().lower()
    if choice not in ("true", "false"):
        raise BadParameter(f"pseudonymize: must be true or false, not {choice!r}")
    if choice == "false":
        if not operator:
            raise Forbidden(
                "pseudonymize=false: real probe ids are exported only with the operator's "
                "token (Authorization: Bearer ...); public exports are pseudonymised"
            )
        return None
    try:
        p = access.pseudonymizer(request)
    except access.AccessError as exc:
        raise KeyFileError(str(exc)) from exc
    if p is None:
        if not operator:
            raise Forbidden("this collector has no pseudonym key: it publishes no exports")
        raise BadParameter(
            "pseudonymize: this collector has no pseudonym key (settings.pseudonym_key_file)"
        )
    return p


def _asn_lookup(request: Request) -> Any:
    settings = getattr(request.app.state, "settings", None)
    asn_db = getattr(settings, "asn_db", "") or ""
    try:
        return commands.asn_lookup(asn_db) if asn_db else None
    except commands.UsageError:
        return None  # whoami reports the same file's trouble; exports go on without it


@router.get("/export")
async def get_export(request: Request) -> Any:
    """The measurements matching the filters, streamed in the format asked for.

    Exports are read on an engine of their own (``app.state.export_engine``, a small
    pool apart from the ingest's), at most ``export_slots`` at once (503 past it); a
    public caller also has a per-address rate (429). A reader that takes no chunk for
    ``export_stall_timeout`` seconds is cut off and its connections are given back.
    """
    state = request.app.state
    settings = getattr(state, "settings", None)
    try:
        values = _parameters(request)
        fmt = check_format(values["format"][0])
        if "probe" in values and not access.is_operator(request):
            try:  # the public names probes by their pseudonyms
                values["probe"] = [
                    access.probe_filter(request, state.engine, name.strip())
                    for value in values["probe"]
                    for name in value.split(",")
                    if name.strip()
                ] or values["probe"]
            except ValueError as exc:
                raise BadParameter(f"probe: {exc}") from None
        filters = parse_filters(
            since=values.get("since", [None])[0], until=values.get("until", [None])[0],
            service=values.get("service"), cc=values.get("cc"), asn=values.get("asn"),
            probe=values.get("probe"), blocking=values.get("blocking"),
        )  # fmt: skip
        pseudonym = _pseudonymizer(request, values)
    except (BadParameter, FilterError, UnknownFormat) as exc:
        return _error(422, str(exc))
    except Forbidden as exc:
        return _error(403, str(exc))
    except (KeyFileError, access.AccessError) as exc:
        log.error("export: %s", exc)
        return _error(503, "the pseudonym key cannot be read")
    limits = getattr(state, "export_address_limits", None)
    if limits is not None and not access.is_operator(request):
        from collectors.whoami import AddressError, caller_address

        try:
            ip = caller_address(
                request.client.host if request.client else None,
                request.headers.getlist("x-forwarded-for"),
                getattr(settings, "trusted_proxies", ()),
            )
        except (AddressError, ValueError) as exc:
            return _error(400, str(exc))
        wait = limits.take(address_key(ip))
        if wait > 0:
            return JSONResponse(
                {"error": "too many exports from this address; try again later"},
                status_code=429,
                headers={"Retry-After": retry_after(wait)},
            )
    slots: Slots | None = getattr(state, "export_slots", None)
    if slots is not None and not slots.take():
        return JSONResponse(
            {"error": f"{slots.size} exports are streaming already; try again later"},
            status_code=503,
            headers={"Retry-After": "30"},
        )
    handed_over = False
    try:
        engine = getattr(state, "export_engine", None) or state.engine
        export = Export(
            engine, fmt, filters, chunk_size=CHUNK,
            probe_id=pseudonym, asn_of=_asn_lookup(request) if fmt == "ooni" else None,
        )  # fmt: skip
        try:
            total = await run_in_threadpool(export.count)
        except NothingToExport as exc:
            return _error(404, str(exc))
        except ReadError as exc:
            log.error("export: %s", exc)
            return _error(503, "the database cannot answer")
        encoder = ENCODERS[fmt]
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        name = f"vantage-{fmt}-{stamp}{encoder.suffix}"
        stall = float(getattr(settings, "export_stall_timeout", DEFAULT_STALL))
        response = ReaderPacedResponse(
            _in_thread(export),
            stall=stall,
            on_end=slots.give if slots is not None else None,
            media_type=encoder.media_type,
            headers={
                "Content-Disposition": f'attachment; filename="{name}"',
                "X-Vantage-Measurements": str(total),
            },
        )
        handed_over = True
        return response
    finally:
        if slots is not None and not handed_over:
            slots.give()


#: Measurements read and encoded at a time: a chunk is a few MB of JSON, and reading
#: and encoding it holds the interpreter for a while; smaller chunks let uploads
#: through in between (the bytes are the same whatever the chunk size).
CHUNK = 200

#: Seconds a reader may take no chunk (``settings.export_stall_timeout``).
DEFAULT_STALL = 30.0


class ReaderStalled(Exception):
    """The reader took no chunk in time: the export is cut short."""


class ReaderPacedResponse(StreamingResponse):
    """A streamed response whose every ``send`` must complete within ``stall``
    seconds (a reader that stops reading fills the socket's buffers, and uvicorn's
    ``send`` then waits); past it the export stops, its thread and database
    connections are released, and the connection is closed. ``on_end`` is called
    once when the response is over, however it ends."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        *,
        stall: float,
        on_end: Callable[[], None] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(content, **kw)
        self.stall = stall
        self.on_end = on_end

    async def stream_response(self, send: Send) -> None:
        async def paced(message: Message) -> None:
            try:
                await asyncio.wait_for(send(message), self.stall)
            except TimeoutError:
                raise ReaderStalled(
                    f"the reader took nothing for {self.stall:g} s: export cut short"
                ) from None

        try:
            await super().stream_response(paced)
        except ReaderStalled as exc:
            log.warning("%s", exc)
            raise
        finally:
            closing = getattr(self.body_iterator, "aclose", None)
            if closing is not None:
                await closing()  # stops the export's thread now, not when collected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.on_end is not None:
                self.on_end()
                self.on_end = None


_DONE = object()


async def _in_thread(export: Export) -> AsyncIterator[bytes]:
    """The export's bytes, encoded in one worker thread of its own (a database
    connection stays in the thread that opened it) and handed over through a short
    queue: the export runs no further ahead than a few chunks of what was sent. A
    client that goes away stops it; a failure midway is logged and cuts the response
    short."""
    handoff: queue.Queue[Any] = queue.Queue(maxsize=4)
    stop = threading.Event()

    def work() -> None:
        try:
            for data in export.stream():
                while not stop.is_set():
                    try:
                        handoff.put(data, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            handoff.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the response to raise
            handoff.put(exc)

    worker = threading.Thread(target=work, name="vantage-export", daemon=True)
    worker.start()
    try:
        while True:
            item = await run_in_threadpool(handoff.get)
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                log.error("export failed midway, the response is cut short: %s", item)
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a worker waiting to hand over more
            with contextlib.suppress(queue.Empty):
                handoff.get_nowait()
            await run_in_threadpool(worker.join, 0.1)


# -- vantage collector export ------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``export`` to ``vantage collector`` (``collectors.cli`` calls this)."""
    p = sub.add_parser(
        "export",
        help="export the collector's measurements as JSONL, CSV, Parquet or OONI data",
        description="The probe's `vantage export`, against the collector's database.",
    )
    commands.add_arguments(p, db_help=f"the collector's database, a SQLAlchemy URL "
                                      f"(or set {DB_ENV})")  # fmt: skip
    p.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """``vantage collector export``: the key file must be named (there is no data
    directory to keep one in); the OONI answers' AS come from ``--asn-db``."""
    return commands.run_export(
        args,
        db_url=args.db or os.environ.get(DB_ENV) or None,
        key_file=args.key_file,
        asn_db=args.asn_db or os.environ.get("VANTAGE_COLLECTOR_ASN_DB") or None,
    )
