"""``vantage export``: datasets from the probe's database (and, through
``collectors.export``, ``vantage collector export`` from the collector's).

    vantage export --format jsonl|csv|parquet|ooni [--out PATH|-]
                   [--since T] [--until T] [--service S] [--cc CC] [--asn N] [--probe ID]
                   [--blocking KIND] [--db URL] [--force]
                   [--pseudonymize [--key-file F]] [--partition-by date,cc]

Exit codes: 0 written; 64 bad usage (unknown format, malformed date or filter, Parquet
to standard output); 65 nothing matches the filters, a stored measurement is malformed,
or the key file is; 73 the output
(or key file) cannot be created, or exists and ``--force`` was not given; 74 the
database cannot be read or the output cannot be written; 130 interrupted. Whatever
fails, no partial file is left where the output was asked for.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import sqlalchemy as sa

from probe.config import Config
from probe.export.filters import FilterError, parse_filters
from probe.export.ooni import AsnLookup
from probe.export.parquet import PARTITION_KEYS, PyArrowMissing
from probe.export.pseudonym import KeyFileError, Pseudonymizer
from probe.export.reader import ReadError, StoredDataError
from probe.export.stream import FORMATS, Export, ExportError, NothingToExport, UnknownFormat
from probe.export.writer import OutputError, atomic_directory, atomic_file, standard_output

EX_USAGE = 64
EX_DATAERR = 65
EX_CANTCREAT = 73
EX_UNAVAILABLE = 69  # a needed optional package is not installed (pyarrow)
EX_IOERR = 74
EX_INTERRUPTED = 130

KEY_FILE_NAME = "pseudonym.key"


class UsageError(ValueError):
    pass


def add_arguments(p: argparse.ArgumentParser, *, db_help: str) -> None:
    """The export options, shared by ``vantage export`` and ``vantage collector export``."""
    p.add_argument("--format", metavar="FORMAT",
                   help=f"one of {', '.join(FORMATS)}")  # fmt: skip
    p.add_argument("--out", metavar="PATH",
                   help="file to write, or - for standard output (default -; Parquet needs "
                        "a file, or a directory with --partition-by)")  # fmt: skip
    p.add_argument(
        "--since",
        metavar="TIME",
        help="from this ISO 8601 date or time, UTC unless it has an offset",
    )
    p.add_argument(
        "--until", metavar="TIME", help="before this time; a date alone includes that whole day"
    )
    for name, what in (("service", "service name"), ("cc", "two-letter country code"),
                       ("asn", "AS number (1234 or AS1234)"), ("probe", "probe id")):  # fmt: skip
        p.add_argument(f"--{name}", action="append", metavar=name.upper(),
                       help=f"only this {what} (repeatable, or comma-separated)")  # fmt: skip
    p.add_argument("--blocking", action="append", metavar="KIND",
                   help="only this verdict: a blocking kind (dns, tcp_ip, tls, http-failure, "
                        "http-diff, throttling), true (any kind), false (not blocked), "
                        "unknown (could not tell); repeatable")  # fmt: skip
    p.add_argument("--db", metavar="URL", help=db_help)
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument(
        "--pseudonymize",
        action="store_true",
        help="replace probe ids with keyed hashes (HMAC-SHA256), for publication",
    )
    p.add_argument("--key-file", type=Path, metavar="FILE",
                   help="the pseudonym key (created, mode 0600, if absent); the same key "
                        "gives the same pseudonyms in every export")  # fmt: skip
    p.add_argument("--partition-by", metavar="KEYS",
                   help="Parquet only: a Hive-style dataset directory partitioned by "
                        f"{' and/or '.join(PARTITION_KEYS)} (e.g. date,cc)")  # fmt: skip
    p.add_argument("--asn-db", metavar="FILE",
                   help="MaxMind-format ASN database for the AS of each DNS answer in OONI "
                        "format (default: the configured vantage.asn_db)")  # fmt: skip
    p.add_argument("--chunk-size", type=int, default=1000, help=argparse.SUPPRESS)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "export",
        help="export measurements as JSONL, CSV, Parquet or OONI data",
        description="Export stored measurements for researchers: JSONL in the wire format, "
        "CSV, Parquet or OONI's data format. Columns and fields: schema/DATA_DICTIONARY.md.",
    )
    add_arguments(p, db_help="SQLAlchemy database URL (default: the probe's database)")
    p.set_defaults(config_handler=cmd_export, overrides=_overrides)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"probe.db": args.db} if args.db else {}


def cmd_export(args: argparse.Namespace, cfg: Config) -> int:
    key_file = args.key_file or cfg.data_dir() / KEY_FILE_NAME
    return run_export(
        args,
        db_url=cfg.db_url(),
        key_file=key_file,
        asn_db=args.asn_db if args.asn_db is not None else cfg.vantage.asn_db,
        scrub_dir=cfg.data_dir(),
    )


# -- shared by the probe and the collector ------------------------------------------------------


def open_engine(url: str) -> sa.Engine:
    """An engine that only reads: SQLite's ``query_only``, PostgreSQL's read-only
    transactions. A SQLite file that does not exist is an error, not created empty."""
    try:
        sa_url = sa.make_url(url)
    except sa.exc.ArgumentError:
        raise UsageError(f"--db: not a database URL: {url!r}") from None
    if sa_url.get_backend_name() == "sqlite":
        database = sa_url.database
        if database in (None, "", ":memory:"):
            raise UsageError("--db: an in-memory SQLite database has nothing to export")
        if not Path(database).expanduser().is_file():
            raise ReadError(f"cannot open database {database}: no such file")
        engine = sa.create_engine(sa_url)

        def on_connect(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=10000")
            cur.execute("PRAGMA query_only=1")
            # 8 MiB of page cache: a chunk's observations are read once each (the
            # default 2 MiB re-reads pages while looking up a thousand measurements)
            cur.execute("PRAGMA cache_size=-8192")
            cur.close()

        sa.event.listen(engine, "connect", on_connect)
        return engine
    try:
        return sa.create_engine(sa_url)
    except (sa.exc.ArgumentError, ImportError) as exc:
        raise UsageError(f"--db: cannot use {sa_url.render_as_string()}: {exc}") from None


def asn_lookup(asn_db: str | None) -> AsnLookup | None:
    """``address -> (asn, name)`` from a MaxMind-format ASN database, if one is given."""
    if not asn_db:
        return None
    from probe.geoip import GeoIP, GeoIPError

    try:
        geo = GeoIP(asn_db=asn_db)
    except GeoIPError as exc:
        raise UsageError(f"ASN database (--asn-db, vantage.asn_db): {exc}") from None

    def lookup(address: str) -> tuple[int, str]:
        try:
            info = geo.lookup(address)
        except ValueError:
            return 0, ""
        return info.asn, info.network_name or ""

    return lookup


def _partition(args: argparse.Namespace) -> tuple[str, ...]:
    if not args.partition_by:
        return ()
    keys = tuple(k.strip() for k in args.partition_by.split(","))
    if args.format != "parquet":
        raise UsageError("--partition-by is for --format parquet only")
    bad = [k for k in keys if k not in PARTITION_KEYS]
    if bad or len(set(keys)) != len(keys):
        raise UsageError(
            f"--partition-by {args.partition_by!r}: use {' and/or '.join(PARTITION_KEYS)}, "
            "comma-separated, each once"
        )
    return keys


def _output(args: argparse.Namespace) -> Path | None:
    """The output path, or None for standard output."""
    out = args.out or "-"
    if out == "-":
        if args.format == "parquet":
            raise UsageError(
                "Parquet cannot go to standard output: use --out FILE "
                "(or --out DIR with --partition-by)"
            )
        return None
    return Path(out)


@contextmanager
def _interruptible() -> Iterator[Callable[[], None]]:
    """SIGINT and SIGTERM stop the export between chunks, so the temporary output is
    removed. The handler only records the signal: an exception raised from it could land
    in a finaliser or weakref callback, where Python prints it and carries on. The
    ``check`` it yields raises :class:`KeyboardInterrupt` once a signal came; a second
    signal raises at once (a stuck read)."""
    came: list[int] = []

    def stop(signum: int, _frame: FrameType | None) -> None:
        if came:
            raise KeyboardInterrupt
        came.append(signum)

    def check() -> None:
        if came:
            raise KeyboardInterrupt

    try:
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave signals alone
        yield check
        return
    try:
        yield check
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def _progress(total: int) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on standard error when it is a terminal."""
    from rich.console import Console

    err = Console(stderr=True)
    if not err.is_terminal:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("exporting"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=err,
                   transient=True)  # fmt: skip
    with bar:
        task = bar.add_task("export", total=total)
        yield lambda n: bar.advance(task, n)


def run_export(
    args: argparse.Namespace,
    *,
    db_url: str | None,
    key_file: Path | None,
    asn_db: str | None = None,
    scrub_dir: Path | None = None,
) -> int:
    """The export the flags ask for; returns the exit code (messages on stderr).

    ``scrub_dir``: the probe's data directory. The probe's own export passes it: every
    measurement is scrubbed on the way out with the addresses known there now
    (probe.privacy). The collector's export has no probe address to know (None)."""
    try:
        return _run(args, db_url=db_url, key_file=key_file, asn_db=asn_db, scrub_dir=scrub_dir)
    except (UsageError, FilterError, UnknownFormat) as exc:
        return _fail(exc, EX_USAGE)
    except NothingToExport as exc:
        return _fail(f"{exc}: nothing written", EX_DATAERR)
    except KeyFileError as exc:
        return _fail(exc, EX_CANTCREAT if "cannot create" in str(exc) else EX_DATAERR)
    except OutputError as exc:
        return _fail(exc, EX_CANTCREAT if exc.create else EX_IOERR)
    except StoredDataError as exc:
        return _fail(f"{exc}: nothing written", EX_DATAERR)
    except ReadError as exc:
        return _fail(f"database error: {exc}", EX_IOERR)
    except ExportError as exc:
        return _fail(exc, EX_USAGE)
    except PyArrowMissing as exc:
        return _fail(exc, EX_UNAVAILABLE)
    except KeyboardInterrupt:
        to_file = args.out not in (None, "-")
        return _fail("interrupted: nothing written" if to_file else "interrupted",
                     EX_INTERRUPTED)  # fmt: skip


def _fail(message: object, code: int) -> int:
    print(f"vantage: export: {message}", file=sys.stderr)
    return code


def _run(
    args: argparse.Namespace,
    *,
    db_url: str | None,
    key_file: Path | None,
    asn_db: str | None,
    scrub_dir: Path | None,
) -> int:
    # Everything the flags can get wrong is checked before the database is read.
    filters = parse_filters(
        since=args.since, until=args.until, service=args.service, cc=args.cc, asn=args.asn,
        probe=args.probe, blocking=args.blocking,
    )  # fmt: skip
    if args.format is None:
        raise UsageError(f"--format is needed: one of {', '.join(FORMATS)}")
    if args.format not in FORMATS:
        raise UnknownFormat(f"unknown format {args.format!r}: use one of {', '.join(FORMATS)}")
    partition = _partition(args)
    path = _output(args)
    if args.key_file is not None and not args.pseudonymize:
        raise UsageError("--key-file is for --pseudonymize")
    if args.pseudonymize and key_file is None:
        raise UsageError("--pseudonymize needs --key-file FILE")
    if args.chunk_size < 1:
        raise UsageError("--chunk-size must be at least 1")
    if not db_url:
        raise UsageError("--db URL is needed")
    lookup = asn_lookup(asn_db) if args.format == "ooni" else None
    if path is not None:
        from probe.export.writer import check_target

        check_target(path, force=args.force)

    engine = open_engine(db_url)
    try:
        pseudonym = None
        scrub = None
        if scrub_dir is not None:
            from probe.privacy import exit_scrub

            scrub = exit_scrub(scrub_dir)
        export = Export(engine, args.format, filters, asn_of=lookup, chunk_size=args.chunk_size,
                        scrub=scrub)  # fmt: skip
        total = export.count()
        if args.pseudonymize:
            assert key_file is not None
            pseudonym = Pseudonymizer.from_key_file(key_file)
            export.reader.probe_id = pseudonym
        started = time.monotonic()
        with _interruptible() as check, _progress(total) as bar:

            def progress(n: int) -> None:  # after each chunk
                check()
                if bar is not None:
                    bar(n)

            if partition:
                assert path is not None
                with atomic_directory(path, force=args.force) as tmp:
                    files = export.write_dataset(tmp, partition, progress)
                where = f"{path}/ ({files} files)"
            elif path is None:
                with standard_output() as out:
                    for data in export.stream(progress):
                        out.write(data)
                where = "standard output"
            else:
                with atomic_file(path, force=args.force) as out:
                    for data in export.stream(progress):
                        out.write(data)
                where = str(path)
    finally:
        engine.dispose()
    elapsed = time.monotonic() - started
    print(f"vantage: exported {total} measurements ({args.format}) to {where} "
          f"in {elapsed:.1f} s", file=sys.stderr)  # fmt: skip
    if pseudonym is not None:
        made = " (created now: keep it to get the same pseudonyms next time)"
        print(f"vantage: probe ids pseudonymised with the key in {key_file}"
              f"{made if pseudonym.created else ''}", file=sys.stderr)  # fmt: skip
        if pseudonym.loose:
            print(f"vantage: warning: {key_file} is readable by other users", file=sys.stderr)
    return 0
