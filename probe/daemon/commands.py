"""``vantage daemon``, ``vantage consent``, ``vantage status``.

    vantage consent [--yes] [--show]   # read the notice; record acceptance
    vantage daemon [--targets FILE]    # measure on the [suites] schedule until stopped
    vantage status [--json]            # last and next runs, events, storage, backlog

Exit codes: ``daemon`` 0 after a clean stop, 65 bad catalog, 74 database, 75 another
daemon uses the data directory, 77 no consent, 78 bad configuration; ``consent`` 0
recorded (or shown), 1 not accepted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from probe.config import Config

EX_NOT_ACCEPTED = 1


def add_parser(sub: Any) -> None:
    daemon = sub.add_parser(
        "daemon", help="measure on the schedule of [suites] until stopped (what systemd runs)"
    )
    daemon.add_argument(
        "--targets",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="add a catalog file (repeatable; re-read on SIGHUP)",
    )
    daemon.add_argument("--no-builtin", action="store_true", help="leave out the built-in catalog")
    _store_args(daemon)
    daemon.set_defaults(config_handler=cmd_daemon, overrides=_overrides)

    consent = sub.add_parser(
        "consent", help="read what the probe does, keeps, shares and risks; record acceptance"
    )
    consent.add_argument(
        "--yes", action="store_true", help="accept without the prompt (you have read the notice)"
    )
    consent.add_argument(
        "--show",
        action="store_true",
        help="show the notice and whether consent is recorded; change nothing",
    )
    consent.add_argument(
        "--data-dir", help="where consent is recorded (the daemon's data directory)"
    )
    consent.set_defaults(config_handler=cmd_consent, overrides=_overrides)

    status = sub.add_parser(
        "status", help="last and next run per suite, blocking events, storage, upload backlog"
    )
    status.add_argument("--json", action="store_true", help="one JSON document")
    _store_args(status)
    status.set_defaults(config_handler=cmd_status, overrides=_overrides)


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="where the probe id, state and default database live")
    p.add_argument("--db", help="SQLAlchemy database URL (default: SQLite in the data directory)")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    pairs = {
        "probe.data_dir": getattr(args, "data_dir", None),
        "probe.db": getattr(args, "db", None),
    }
    return {k: v for k, v in pairs.items() if v is not None}


def _config_path(args: argparse.Namespace) -> Path | None:
    """The file ``main`` read the configuration from (SIGHUP reads it again)."""
    if args.config is not None:
        return Path(args.config)
    if "VANTAGE_CONFIG" in os.environ:
        return Path(os.environ["VANTAGE_CONFIG"])
    return None


def cmd_daemon(args: argparse.Namespace, cfg: Config) -> int:
    import asyncio

    # The daemon runs on asyncio alone and speaks HTTP/1.1 (the engine turns HTTP/2
    # off). httpcore imports trio and h2, and httpx its command line (click, rich,
    # pygments), merely because they are installed (a development or collector
    # install, not a probe's dependencies): about 10 MB the daemon would carry for
    # nothing.
    for unused in ("trio", "click", "h2"):
        sys.modules.setdefault(unused, None)  # type: ignore[arg-type]

    from probe.daemon.lifecycle import ConfigSource, Daemon, setup_logging
    from probe.daemon.runs import CatalogSource, limit_malloc_arenas

    limit_malloc_arenas()
    setup_logging()
    daemon = Daemon(
        cfg,
        ConfigSource(_config_path(args), _overrides(args)),
        CatalogSource(tuple(args.targets), builtin=not args.no_builtin),
    )
    return asyncio.run(daemon.serve())


def cmd_consent(args: argparse.Namespace, cfg: Config) -> int:
    from probe.daemon.consent import consent_state, notice, record_consent

    sys.stdout.write(notice(cfg) + "\n")
    state = consent_state(cfg)
    if args.show:
        if state.how == "config":
            print("Consent: given by the configuration (privacy.consent = true).")
        elif state.given:
            print(f"Consent: recorded {state.accepted_at} in {state.path}.")
        else:
            print(f"Consent: not given ({state.how}). Nothing is measured until it is.")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            print(
                "vantage: consent not recorded: answer on a terminal, or run "
                "`vantage consent --yes` once you have read the notice",
                file=sys.stderr,
            )
            return EX_NOT_ACCEPTED
        try:
            answer = input('Type "yes" if you understand and accept this: ')
        except EOFError:
            answer = ""
        if answer.strip().lower() != "yes":
            print(
                "vantage: not accepted: nothing recorded, and Vantage will not measure.",
                file=sys.stderr,
            )
            return EX_NOT_ACCEPTED
    path = record_consent(cfg)
    print(f"Consent recorded in {path}. Thank you. Withdraw it by deleting that file.")
    return 0


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    from probe.daemon.status import gather, render

    doc = gather(cfg)
    if args.json:
        sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    else:
        render(doc, sys.stdout)
    return 0
