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
import contextlib
import datetime as dt
import logging
import os
import queue
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from probe.export import commands
from probe.export.filters import FilterError, parse_filters
from probe.export.pseudonym import KeyFileError, Pseudonymizer
from probe.export.reader import ReadError
from probe.export.stream import ENCODERS, Export, NothingToExport, UnknownFormat

log = logging.getLogger("vantage.collector.export")

router = APIRouter(prefix="/api/v1", tags=["export"])

DB_ENV = "VANTAGE_COLLECTOR_DB"
FILTERS = ("since", "until", "service", "cc", "asn", "probe", "blocking")
SINGLE = ("format", "since", "until", "pseudonymize")


class BadParameter(ValueError):
    pass


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
    choice = values.get("pseudonymize", ["false"])[0].strip().lower()
    if choice not in ("true", "false"):
        raise BadParameter(f"pseudonymize: must be true or false, not {choice!r}")
    if choice == "false":
        return None
    settings = getattr(request.app.state, "settings", None)
    key_file = getattr(settings, "pseudonym_key_file", "") or ""
    if not key_file:
        raise BadParameter(
            "pseudonymize: this collector has no pseudonym key (settings.pseudonym_key_file)"
        )
    return Pseudonymizer.from_key_file(Path(key_file))


def _asn_lookup(request: Request) -> Any:
    settings = getattr(request.app.state, "settings", None)
    asn_db = getattr(settings, "asn_db", "") or ""
    try:
        return commands.asn_lookup(asn_db) if asn_db else None
    except commands.UsageError:
        return None  # whoami reports the same file's trouble; exports go on without it


@router.get("/export")
async def get_export(request: Request) -> Any:
    """The measurements matching the filters, streamed in the format asked for."""
    try:
        values = _parameters(request)
        fmt = values["format"][0]
        filters = parse_filters(
            since=values.get("since", [None])[0], until=values.get("until", [None])[0],
            service=values.get("service"), cc=values.get("cc"), asn=values.get("asn"),
            probe=values.get("probe"), blocking=values.get("blocking"),
        )  # fmt: skip
        pseudonym = _pseudonymizer(request, values)
        export = Export(
            request.app.state.engine, fmt, filters,
            probe_id=pseudonym, asn_of=_asn_lookup(request) if fmt == "ooni" else None,
        )  # fmt: skip
    except (BadParameter, FilterError, UnknownFormat) as exc:
        return _error(422, str(exc))
    except KeyFileError as exc:
        log.error("export: %s", exc)
        return _error(503, "the pseudonym key cannot be read")
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
    return StreamingResponse(
        _in_thread(export),
        media_type=encoder.media_type,
        headers={
            "Content-Disposition": f'attachment; filename="{name}"',
            "X-Vantage-Measurements": str(total),
        },
    )


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
