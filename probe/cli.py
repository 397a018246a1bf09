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

#: Every command of the probe: the module that adds it (``add_parser(sub)``, which sets
#: ``config_handler=fn(args, cfg)`` and optionally ``overrides=fn(args) -> {"section.key":
#: value}``; ``main`` then merges the config and turns configuration, catalog and
#: database errors into exit codes) and its help line. ``vantage --help`` lists them from
#: here, and a command loads only its own module: `--version`, `--help` and `status`
#: answer at once on a Raspberry Pi, and the daemon never loads what it does not use.
#: A test checks each help line against the module's own.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("probe.cli", "measure the catalog once, store and print the results"),
    "targets": ("probe.cli", "list the services and targets of the catalog"),
    "lab": ("probe.lab.cli", "the censorship lab: run the probe against a simulated censor"),
    "daemon": ("probe.daemon.commands",
               "measure on the schedule of [suites] until stopped (what systemd runs)"),
    "consent": ("probe.daemon.commands",
                "read what the probe does, keeps, shares and risks; record acceptance"),
    "status": ("probe.daemon.commands",
               "last and next run per suite, blocking events, storage, upload backlog"),
    "doctor": ("probe.doctor",
               "check permissions, raw sockets, clock, disk, resolver, database, consent"),
    "enroll": ("probe.outbox.commands",
               "register this probe with a collector (once), with a token from its operator"),
    "upload": ("probe.outbox.commands", "upload pending measurements to the collector now"),
    "export": ("probe.export.commands", "export measurements as JSONL, CSV, Parquet or OONI data"),
}  # fmt: skip
#: Entry-point group of commands from other installed parts of Vantage (the collector's
#: ``control`` and ``collector``): each entry point is named after the command it adds,
#: so the probe never imports one unless that command is asked for.
PLUGIN_GROUP = "vantage.commands"


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


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line, with only ``command``'s own options parsed in full (see
    :data:`COMMANDS`)."""
    p = argparse.ArgumentParser(
        prog="vantage",
        description="Measure whether messaging services are reachable, and keep the evidence.",
    )
    p.add_argument("--version", action="version", version=f"vantage {__version__}")
    p.add_argument(
        "--config", type=Path, help="config file (default /etc/vantage/vantage.toml if present)"
    )
    sub = p.add_subparsers(dest="command", required=True)
    module = COMMANDS[command][0] if command in COMMANDS else None
    if module == "probe.cli":
        _add_run_and_targets(sub)
    elif module is not None:
        importlib.import_module(module).add_parser(sub)
    plugins = {entry.name: entry for entry in entry_points(group=PLUGIN_GROUP)}
    if module is None and command is not None:
        # A command of another installed part (or a mistake, which argparse then names
        # with every choice): its registration is loaded, and run at most once each.
        wanted = [plugins[command]] if command in plugins else list(plugins.values())
        done: set[str] = set()
        for entry in wanted:
            if entry.value not in done:
                done.add(entry.value)
                entry.load()(sub)
    added = set(sub.choices)
    for name, (_, text) in COMMANDS.items():
        if name not in added:  # listed by --help, parsed only when it is the command
            sub.add_parser(name, help=text)
    for name, entry in plugins.items():
        if name not in sub.choices:
            sub.add_parser(name, help=f"installed with {entry.value.split('.')[0]}: "
                                      f"`vantage {name} --help`")  # fmt: skip
    return p


def _add_run_and_targets(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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

    run = sub.add_parser("run", help=COMMANDS["run"][1])
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
    targets = sub.add_parser("targets", help=COMMANDS["targets"][1])
    catalog_args(targets)


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
    import asyncio

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, suite_run.stop, "interrupted")
    try:
        return await suite_run.execute()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    import asyncio

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


def _database_hint(cfg: Config | None) -> str | None:
    """Why the probe's SQLite file could not be opened, when it is access."""
    if cfg is None or not cfg.db_url().startswith("sqlite:///"):
        return None
    from probe.access import access_hint

    return access_hint(Path(cfg.db_url()[len("sqlite:///") :]))


def _is(exc: BaseException, module: str, name: str) -> bool:
    """``isinstance(exc, module.name)``, importing nothing: an exception of a module
    that was never imported cannot have been raised."""
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(exc, getattr(loaded, name))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser(_command(argv)).parse_args(argv)
    if args.command == "lab":
        from probe.lab import cli as lab_cli

        return lab_cli.main(args)
    if hasattr(args, "handler"):
        return int(args.handler(args))
    cfg: Config | None = None
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
            hint = _database_hint(cfg)
            if hint:
                print(f"vantage: {hint}", file=sys.stderr)
            return EX_IOERR
        raise
