"""The ``vantage`` command line.

    vantage run [--json] [--targets FILE] [--service NAME] [--db URL] ...
    vantage targets [--json] [--targets FILE]
    vantage --version

Exit codes: 0 done; 4 the run hit its deadline (what finished is stored);
65 bad catalog; 74 database error; 77 no consent recorded (`vantage consent`);
78 bad configuration; 130 interrupted (Ctrl-C, what finished is stored).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probe import __version__
from probe.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from probe.measuring import RunOptions, RunResult, SuiteRun
    from schema.model import Service

# Heavy modules (rich, the engine, the store, the lab) are imported where they are
# used: `vantage daemon` stays within its memory budget on a Raspberry Pi.

EX_DEADLINE = 4
EX_DATAERR = 65
EX_IOERR = 74
EX_NOPERM = 77  # no informed consent recorded (`vantage consent`)
EX_CONFIG = 78
EX_INTERRUPTED = 130

#: The probe's other commands, each module named after its role. A module's
#: ``add_parser(sub)`` adds its sub-commands and sets ``config_handler=fn(args, cfg)``
#: (and optionally ``overrides=fn(args) -> {"section.key": value}``): ``main`` then
#: merges the config and turns configuration, catalog and database errors into their
#: exit codes for it.
COMMAND_MODULES: tuple[str, ...] = (
    "probe.daemon.commands",  # daemon, consent, status
    "probe.doctor",  # doctor
    "probe.outbox.commands",  # enroll, upload
    "probe.export.commands",  # export
)


#: Commands parsed with only their own module: the other commands' modules (and what
#: they import) never load into the daemon's memory, and `status` starts fast.
LEAN_COMMANDS: dict[str, str] = {
    "daemon": "probe.daemon.commands",
    "status": "probe.daemon.commands",
    "consent": "probe.daemon.commands",
}


def _command(argv: Sequence[str] | None) -> str | None:
    """The sub-command named in ``argv`` (without parsing the rest)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("command", nargs="?")
    try:
        known, _ = pre.parse_known_args(argv)
    except SystemExit:  # let the real parser report the error
        return None
    return known.command


def _parser(lean: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vantage",
        description="Measure whether messaging services are reachable, and keep the evidence.",
    )
    p.add_argument("--version", action="version", version=f"vantage {__version__}")
    p.add_argument(
        "--config", type=Path, help="config file (default /etc/vantage/vantage.toml if present)"
    )
    sub = p.add_subparsers(dest="command", required=True)
    if lean is not None:
        importlib.import_module(LEAN_COMMANDS[lean]).add_parser(sub)
        return p

    def catalog_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--targets",
            type=Path,
            action="append",
            default=[],
            metavar="FILE",
            help="add a catalog file (repeatable)",
        )
        sp.add_argument("--no-builtin", action="store_true", help="leave out the built-in catalog")
        sp.add_argument(
            "--service",
            action="append",
            default=[],
            metavar="NAME",
            help="only this service (repeatable)",
        )
        sp.add_argument("--json", action="store_true", help="JSON lines on stdout")

    run = sub.add_parser("run", help="measure the catalog once, store and print the results")
    catalog_args(run)
    run.add_argument("--db", help="SQLAlchemy database URL (default: SQLite in the data directory)")
    run.add_argument("--data-dir", help="where the probe id and default database live")
    run.add_argument(
        "--ca-bundle",
        action="append",
        default=[],
        metavar="FILE",
        help="also trust the CAs in FILE (repeatable)",
    )
    run.add_argument(
        "--resolver",
        action="append",
        default=[],
        metavar="SPEC",
        help="also query udp://IP[:PORT], tcp://IP[:PORT] or an https:// DoH URL",
    )
    run.add_argument(
        "--no-system-resolver", action="store_true", help="do not query /etc/resolv.conf's resolver"
    )
    run.add_argument("--concurrency", type=int, help="measurements in flight (default 16)")
    run.add_argument("--deadline", type=float, help="seconds for the whole run (default 600)")
    run.add_argument(
        "--public-range",
        action="append",
        default=[],
        metavar="CIDR",
        help="treat this reserved range as public (lab and test networks)",
    )

    targets = sub.add_parser("targets", help="list the services and targets of the catalog")
    catalog_args(targets)
    from probe.lab import cli as lab_cli

    lab_cli.add_parser(sub)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    # Commands from other installed parts of Vantage (the collector's `control`),
    # found by name so the probe never imports them.
    # One function registered under two names (an install's metadata from another
    # version: "control" and "collector") is called once.
    loaded = set()
    for entry in entry_points(group="vantage.commands"):
        if entry.value not in loaded:
            loaded.add(entry.value)
            entry.load()(sub)
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    o: dict[str, Any] = {}
    pairs = {
        "probe.db": args.db, "probe.data_dir": args.data_dir,
        "engine.concurrency": args.concurrency, "engine.run_deadline": args.deadline,
    }  # fmt: skip
    o.update({k: v for k, v in pairs.items() if v is not None})
    if args.no_system_resolver:
        o["dns.system"] = "false"
    return o


def _services(args: argparse.Namespace) -> list[Service]:
    from probe.catalog import load_catalog, select

    return select(load_catalog(args.targets, builtin=not args.no_builtin), args.service)


def _run_options(args: argparse.Namespace) -> RunOptions:
    from probe.measuring import RunOptions

    return RunOptions(resolvers=tuple(args.resolver), ca_bundle=tuple(args.ca_bundle),
                      public_ranges=tuple(args.public_range))  # fmt: skip


async def _measure(suite_run: SuiteRun) -> RunResult:
    """The run, stopped by Ctrl-C or SIGTERM (what is in flight is kept, interrupted)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, suite_run.stop, "interrupted")
    try:
        return await suite_run.execute()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from probe.daemon.consent import has_consent, refusal
    from probe.measuring import SuiteRun, build_context, targets_of
    from probe.output import print_plain, print_services, print_table, services_plain
    from probe.store import Store
    from schema import wire
    from schema.model import Measurement

    if not has_consent(cfg):
        print(refusal(cfg), file=sys.stderr)
        return EX_NOPERM
    services = _services(args)
    ctx, system_resolver = build_context(cfg, _run_options(args))
    store = Store.open(cfg.db_url())
    err = Console(stderr=True)
    progress = None
    if err.is_terminal:
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=err, transient=True)  # fmt: skip
    task = progress.add_task("measuring", total=len(targets_of(services))) if progress else None

    def stored(m: Measurement) -> None:
        if args.json:
            sys.stdout.write(wire.dumps(m) + "\n")
            sys.stdout.flush()
        if progress is not None and task is not None:
            progress.advance(task)

    suite = "+".join(s.name for s in services) if len(services) < 4 else "catalog"
    suite_run = SuiteRun(cfg, services, store, suite=suite, ctx=ctx,
                         system_resolver=system_resolver, on_stored=stored)  # fmt: skip
    try:
        if progress is not None:
            with progress:
                result = asyncio.run(_measure(suite_run))
        else:
            result = asyncio.run(_measure(suite_run))
    finally:
        store.close()
    done, statuses = result.measurements, result.statuses
    out = Console()
    if not args.json and out.is_terminal:
        print_table(done, out)
        print_services(statuses, out)
    elif not args.json:
        print_plain(done, sys.stdout)
        services_plain(statuses, sys.stdout)
    else:
        services_plain(statuses, sys.stderr)
    summary = (
        f"run {result.run_id}: {len(done)} of {result.targets} targets measured "
        f"({result.status}), stored in {_safe_url(cfg.db_url())}"
    )
    print(summary, file=sys.stderr)
    return {"complete": 0, "deadline": EX_DEADLINE}.get(result.status, EX_INTERRUPTED)


def _safe_url(url: str) -> str:
    import sqlalchemy as sa

    return sa.make_url(url).render_as_string(hide_password=True)


def cmd_targets(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from schema import wire

    services = _services(args)
    if args.json:
        for s in services:
            for t in s.targets:
                sys.stdout.write(json.dumps(wire.target_to_wire(t)) + "\n")
        return 0
    out = Console()
    table = Table("service", "target", "kind", "input", "expect", "checked")
    for s in services:
        for t in s.targets:
            expect = []
            if t.expect.asns:
                expect.append("AS" + ",".join(map(str, t.expect.asns)))
            if t.expect.status:
                expect.append("status " + ",".join(map(str, t.expect.status)))
            checked = t.source.checked.isoformat() if t.source else "-"
            table.add_row(s.name + (" (control)" if t.control else ""), t.id, t.kind, t.input,
                          " ".join(expect) or "-", checked)  # fmt: skip
    out.print(table)
    return 0


def _is(exc: BaseException, module: str, name: str) -> bool:
    """``isinstance(exc, module.name)``, importing nothing: an exception of a module
    that was never imported cannot have been raised."""
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(exc, getattr(loaded, name))


def main(argv: Sequence[str] | None = None) -> int:
    command = _command(argv)
    args = _parser(command if command in LEAN_COMMANDS else None).parse_args(argv)
    if args.command == "lab":
        from probe.lab import cli as lab_cli

        return lab_cli.main(args)
    if hasattr(args, "handler"):
        return int(args.handler(args))
    try:
        config_path = args.config or (
            Path(os.environ["VANTAGE_CONFIG"]) if "VANTAGE_CONFIG" in os.environ else None
        )
        if args.command == "run":
            overrides = _overrides(args)
        elif hasattr(args, "overrides"):
            overrides = args.overrides(args)
        else:
            overrides = {}
        cfg = load_config(config_path, env=os.environ, overrides=overrides)
        if hasattr(args, "config_handler"):
            return int(args.config_handler(args, cfg))
        if args.command == "run":
            return cmd_run(args, cfg)
        return cmd_targets(args)
    except ConfigError as exc:
        print(f"vantage: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except BrokenPipeError:
        # The reader went away (`vantage run --json | head`): stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ValueError as exc:
        if _is(exc, "probe.engine.dns", "ResolverSpecError"):
            print(f"vantage: configuration error: {exc}", file=sys.stderr)
            return EX_CONFIG
        if _is(exc, "probe.catalog", "CatalogError"):
            print(f"vantage: catalog error: {exc}", file=sys.stderr)
            return EX_DATAERR
        raise
    except RuntimeError as exc:
        if _is(exc, "probe.store", "StoreError"):
            print(f"vantage: database error: {exc}", file=sys.stderr)
            return EX_IOERR
        raise
