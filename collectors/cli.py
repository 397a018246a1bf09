"""``vantage control serve``: run the control helper (``collectors.control``) under uvicorn.

Registered through the ``vantage.commands`` entry point so the probe's command line
never imports ``collectors``. FastAPI and uvicorn are imported only when the command
runs: the ``vantage`` command stays fast and works where they are not installed.

Exit codes: 0 stopped (SIGINT/SIGTERM); 69 FastAPI or uvicorn missing; 78 bad flags.
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collectors.control import ControlSettings

EX_UNAVAILABLE = 69
EX_CONFIG = 78
TOKEN_ENV = "VANTAGE_CONTROL_TOKEN"
INSTALL_HINT = "pip install 'vantage-probe[collector]'"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``control serve`` to the ``vantage`` command line (entry-point contract)."""
    control = subparsers.add_parser(
        "control", help="the control helper: measure targets for probes, from here"
    )
    sub = control.add_subparsers(dest="control_command", required=True)
    serve = sub.add_parser("serve", help="serve the control helper API over HTTP")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=int, default=8700, help="port to listen on (8700)")
    serve.add_argument(
        "--resolver",
        action="append",
        default=[],
        metavar="SPEC",
        help="query udp://IP[:PORT], tcp://IP[:PORT] or an https:// DoH URL "
        "instead of the system resolver (repeatable)",
    )
    serve.add_argument(
        "--ca-bundle",
        action="append",
        default=[],
        metavar="FILE",
        help="also trust the CAs in FILE (repeatable)",
    )
    serve.add_argument(
        "--allow-range",
        action="append",
        default=[],
        metavar="CIDR",
        help="measure this reserved range as if public (lab and test networks; repeatable)",
    )
    serve.add_argument(
        "--token",
        help=f"require 'Authorization: Bearer TOKEN' (or set {TOKEN_ENV}, kept out of ps)",
    )
    serve.add_argument(
        "--no-system-cas", action="store_true", help="trust only the --ca-bundle CAs"
    )
    serve.set_defaults(handler=cmd_serve)


class _ConfigError(ValueError):
    pass


def settings_from_args(args: argparse.Namespace) -> ControlSettings:
    """The helper's settings from the flags; :class:`_ConfigError` names a bad one."""
    from collectors.control import ControlSettings
    from probe.engine.dns import ResolverSpec, ResolverSpecError

    try:
        resolvers = tuple(ResolverSpec.parse(s) for s in args.resolver)
    except ResolverSpecError as exc:
        raise _ConfigError(str(exc)) from exc
    ranges = []
    for text in args.allow_range:
        try:
            ranges.append(ipaddress.ip_network(text, strict=False))
        except ValueError as exc:
            raise _ConfigError(f"--allow-range: not a network: {text!r}") from exc
    for ca in args.ca_bundle:
        if not Path(ca).is_file():
            raise _ConfigError(f"--ca-bundle: no such file: {ca}")
    if not 0 < args.port < 65536:
        raise _ConfigError(f"--port: not a port: {args.port}")
    token = args.token or os.environ.get(TOKEN_ENV) or None
    return ControlSettings(
        resolvers=resolvers,
        ca_files=tuple(args.ca_bundle),
        system_cas=not args.no_system_cas,
        allow_ranges=tuple(ranges),
        token=token,
    )


def _missing_modules() -> list[str]:
    missing = []
    for name in ("fastapi", "uvicorn"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def cmd_serve(args: argparse.Namespace) -> int:
    missing = _missing_modules()
    if missing:
        print(
            f"vantage control serve needs {' and '.join(missing)}: {INSTALL_HINT}",
            file=sys.stderr,
        )
        return EX_UNAVAILABLE
    from collectors import control

    try:
        settings = settings_from_args(args)
        helper = control.ControlHelper(settings)
    except (_ConfigError, ValueError, OSError) as exc:  # ssl.SSLError is an OSError
        print(f"vantage: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    if settings.token is None and not ipaddress.ip_address(_bare(args.host)).is_loopback:
        print(
            f"vantage: warning: serving on {args.host} without --token: anyone who reaches "
            "it can make this machine measure public targets",
            file=sys.stderr,
        )
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    server = control.make_server(control.create_app(helper), args.host, args.port)
    try:
        control.serve(server, helper)
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the SIGINT it shut down for
    return 0


def _bare(host: str) -> str:
    """``host`` as an address for the warning check; names count as non-loopback."""
    text = host.strip("[]")
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return "0.0.0.0" if text != "localhost" else "127.0.0.1"
    return text
