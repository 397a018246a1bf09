"""The ``vantage`` command line.

    vantage run [--json] [--targets FILE] [--service NAME] [--db URL] ...
    vantage targets [--json] [--targets FILE]
    vantage --version

Exit codes: 0 done; 4 the run hit its deadline (what finished is stored);
65 bad catalog; 74 database error; 78 bad configuration; 130 interrupted (Ctrl-C,
what finished is stored).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import ipaddress
import json
import os
import signal
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from probe import __version__
from probe.analysis import Decision, ServiceStatus, decide, service_status
from probe.catalog import CatalogError, load_catalog, select
from probe.config import Config, ConfigError, load_config
from probe.engine.context import EngineContext, Timeouts
from probe.engine.dns import ResolverSpec, ResolverSpecError, system_resolvers
from probe.engine.run import Run
from probe.lab import cli as lab_cli
from probe.output import print_plain, print_services, print_table, services_plain
from probe.privacy import local_addresses, scrub
from probe.store import BatchWriter, Store, StoreError
from probe.vantage import vantage_point
from probe.verdicts import Analyser
from schema import wire
from schema.model import Measurement, Service

EX_DEADLINE = 4
EX_DATAERR = 65
EX_IOERR = 74
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vantage",
        description="Measure whether messaging services are reachable, and keep the evidence.",
    )
    p.add_argument("--version", action="version", version=f"vantage {__version__}")
    p.add_argument(
        "--config", type=Path, help="config file (default /etc/vantage/vantage.toml if present)"
    )
    sub = p.add_subparsers(dest="command", required=True)

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
    lab_cli.add_parser(sub)
    for name in COMMAND_MODULES:
        try:  # TRANSITIONAL: removed once every module exists
            module = importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        module.add_parser(sub)
    # Commands from other installed parts of Vantage (the collector's `control`),
    # found by name so the probe never imports them.
    for entry in entry_points(group="vantage.commands"):
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
    return select(load_catalog(args.targets, builtin=not args.no_builtin), args.service)


def _build_context(cfg: Config, args: argparse.Namespace) -> tuple[EngineContext, str | None]:
    resolvers: list[ResolverSpec] = []
    if cfg.dns.system:
        resolvers += system_resolvers(cfg.dns.resolv_conf)[:1]  # the primary, as a stub uses it
    resolvers += [ResolverSpec.parse(s) for s in (*cfg.dns.resolvers, *args.resolver)]
    if not resolvers:
        raise ConfigError("dns: no resolver to query (the system has none and none is configured)")
    ranges = []
    for text in (*cfg.engine.public_ranges, *args.public_range):
        try:
            ranges.append(ipaddress.ip_network(text, strict=False))
        except ValueError as exc:
            raise ConfigError(f"engine.public_ranges: not a network: {text!r}") from exc
    cas = (*cfg.engine.ca_bundle, *args.ca_bundle)
    for ca in cas:
        if not Path(ca).is_file():
            raise ConfigError(f"engine.ca_bundle: no such file: {ca}")
    e = cfg.engine
    ctx = EngineContext(
        resolvers=resolvers,
        timeouts=Timeouts(
            dns=e.dns_timeout, tcp=e.tcp_timeout, tls=e.tls_timeout, http=e.http_timeout
        ),
        ca_files=tuple(cas),
        system_cas=e.system_cas,
        public_ranges=tuple(ranges),
        max_addresses=e.max_addresses,
        control_sni=e.control_sni or None,
    )
    system = next((r.address for r in resolvers if r.system), None)
    return ctx, system


async def _measure(
    run: Run,
    store: Store,
    suite: str,
    as_json: bool,
    progress: Progress | None,
    analyser: Analyser,
) -> list[Measurement]:
    done: list[Measurement] = []
    task = progress.add_task("measuring", total=len(run.targets)) if progress else None

    async def stored(m: Measurement) -> None:
        done.append(m)
        if as_json:
            sys.stdout.write(wire.dumps(m) + "\n")
            sys.stdout.flush()
        if progress is not None and task is not None:
            progress.advance(task)

    writer = BatchWriter(store, stored)
    own = frozenset(await asyncio.to_thread(local_addresses))  # once per run: never stored

    async def finished(m: Measurement) -> None:
        m = scrub(m, own)
        try:
            await analyser.analyse(m)  # judged before it is written, written before shown
        finally:
            await writer.add(m)  # a measurement is kept even if judging it failed

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, run.stop, "interrupted")
    run.on_stop(analyser.stop)
    started = run.ctx.now_utc()
    await asyncio.to_thread(store.begin_run, run.run_id, suite, run.vantage, started)
    try:
        await run.execute(finished, analyser.start)
    finally:
        analyser.stop()
        await analyser.aclose()
        await writer.flush()
        await asyncio.to_thread(store.finish_run, run.run_id, run.status, run.ctx.now_utc())
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return done


def _services_and_events(
    store: Store,
    run: Run,
    services: list[Service],
    done: list[Measurement],
    is_offline: bool | None,
) -> list[ServiceStatus]:
    """Each service's status in this run, stored; blocking events started or ended."""
    statuses = [service_status(s.name, done, is_offline) for s in services if not s.control]
    store.write_service_statuses(run.run_id, statuses)
    for status in statuses:
        history = store.service_history(run.vantage.probe_id, status.service)
        is_open = store.open_event(run.vantage.probe_id, status.service) is not None
        decision = decide(history, is_open) if not is_offline else Decision("none")
        store.apply_decision(run.vantage, status.service, decision)
    return statuses


def cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    services = _services(args)
    ctx, system_resolver = _build_context(cfg, args)
    # Control targets first: the other verdicts wait for them.
    targets = sorted((t for s in services for t in s.targets), key=lambda t: not t.control)
    vantage = vantage_point(cfg, system_resolver)
    store = Store.open(cfg.db_url())
    err = Console(stderr=True)
    run = Run(
        targets, vantage, ctx, concurrency=cfg.engine.concurrency, deadline=cfg.engine.run_deadline
    )
    suite = "+".join(s.name for s in services) if len(services) < 4 else "catalog"
    progress = None
    if err.is_terminal:
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=err, transient=True)  # fmt: skip
    analyser = Analyser(targets, cfg.control.url, cfg.control.token, cfg.control.timeout)
    try:
        if progress is not None:
            with progress:
                done = asyncio.run(_measure(run, store, suite, args.json, progress, analyser))
        else:
            done = asyncio.run(_measure(run, store, suite, args.json, None, analyser))
        statuses = _services_and_events(store, run, services, done, analyser.offline)
    finally:
        store.close()
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
        f"run {run.run_id}: {len(done)} of {len(targets)} targets measured ({run.status}), "
        f"stored in {_safe_url(cfg.db_url())}"
    )
    print(summary, file=sys.stderr)
    return {"complete": 0, "deadline": EX_DEADLINE}.get(run.status, EX_INTERRUPTED)


def _safe_url(url: str) -> str:
    return sa.make_url(url).render_as_string(hide_password=True)


def cmd_targets(args: argparse.Namespace) -> int:
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "lab":
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
    except (ConfigError, ResolverSpecError) as exc:
        print(f"vantage: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except CatalogError as exc:
        print(f"vantage: catalog error: {exc}", file=sys.stderr)
        return EX_DATAERR
    except StoreError as exc:
        print(f"vantage: database error: {exc}", file=sys.stderr)
        return EX_IOERR
    except BrokenPipeError:
        # The reader went away (`vantage run --json | head`): stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
