"""``vantage control serve`` and ``vantage collector ...``: the server side's commands.

Registered through the ``vantage.commands`` entry point so the probe's command line
never imports ``collectors``. FastAPI, uvicorn and the collector's modules are imported
only when a command runs: the ``vantage`` command stays fast and works where they are
not installed.

    vantage control serve [--host --port --token ...]      the control helper alone
    vantage collector serve --db URL [--host --port ...]   the collector (FastAPI, uvicorn)
    vantage collector migrate --db URL
    vantage collector enroll-token create [--label L] [--expires 7d] [--max-uses N]
    vantage collector enroll-token list | revoke ID
    vantage collector probes list | revoke PROBE_ID | restore PROBE_ID
    vantage collector export ...                            (collectors.export)

``--db`` defaults to ``$VANTAGE_COLLECTOR_DB`` (a password in a URL stays out of ``ps``).

Exit codes: 0 done (serve: stopped by SIGINT/SIGTERM); 1 no such token or probe;
69 FastAPI or uvicorn missing; 74 the database cannot be reached or migrated;
78 bad flags or settings.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import ipaddress
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collectors.control import ControlSettings

EX_NOTFOUND = 1
EX_UNAVAILABLE = 69
EX_IOERR = 74
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
    add_collector_parser(subparsers)


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


# -- vantage collector ----------------------------------------------------------------

DB_ENV = "VANTAGE_COLLECTOR_DB"


def _db_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db", help=f"the collector's database, a SQLAlchemy URL (or set {DB_ENV})"
    )


def add_collector_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``collector serve|migrate|enroll-token|probes`` (and ``export``, when there)."""
    collector = subparsers.add_parser(
        "collector", help="the collector: receive, store and serve a fleet's measurements"
    )
    sub = collector.add_subparsers(dest="collector_command", required=True)

    serve = sub.add_parser("serve", help="serve the collector's API and dashboard over HTTP")
    _db_arg(serve)
    serve.add_argument("--host", default=None, help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port to listen on (8800)")
    serve.add_argument("--asn-db", help="an ASN .mmdb for whoami (DB-IP lite or GeoLite2)")
    serve.add_argument("--country-db", help="a country .mmdb for whoami")
    serve.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        metavar="CIDR",
        help="believe X-Forwarded-For from this reverse proxy (repeatable)",
    )
    serve.add_argument(
        "--pseudonym-key-file",
        help="the key exports pseudonymise probe ids with (GET /api/v1/export?pseudonymize=true)",
    )
    serve.add_argument(
        "--upload-rate", type=float, help="measurements per second a probe may upload (200)"
    )
    serve.add_argument(
        "--upload-burst", type=float, help="measurements a probe may upload at once (2000)"
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes (1); each has its own rate-limit buckets and database pool",
    )
    serve.add_argument(
        "--control",
        action="store_true",
        help="also serve the control helper (POST /api/v1/control): this machine then "
        "measures targets probes send it",
    )
    serve.add_argument(
        "--control-resolver",
        action="append",
        default=[],
        metavar="SPEC",
        help="the control helper's resolver, as `vantage control serve --resolver` (repeatable)",
    )
    serve.add_argument(
        "--control-allow-range",
        action="append",
        default=[],
        metavar="CIDR",
        help="a reserved range the control helper may measure (lab networks; repeatable)",
    )
    serve.add_argument(
        "--control-ca-bundle",
        action="append",
        default=[],
        metavar="FILE",
        help="CAs the control helper also trusts (repeatable)",
    )
    serve.add_argument(
        "--control-token",
        help=f"require this bearer token for the control helper (or set {TOKEN_ENV})",
    )
    serve.set_defaults(handler=cmd_collector_serve)

    migrate = sub.add_parser("migrate", help="create or upgrade the collector's tables")
    _db_arg(migrate)
    migrate.set_defaults(handler=cmd_migrate)

    tokens = sub.add_parser("enroll-token", help="tokens volunteers enroll their probes with")
    tsub = tokens.add_subparsers(dest="token_command", required=True)
    create = tsub.add_parser("create", help="make a token (printed once; stored hashed)")
    _db_arg(create)
    create.add_argument("--label", default="", help="what the token is for (who got it)")
    create.add_argument(
        "--expires", help="when it stops working: a duration (30d, 12h, 90m) or an ISO date"
    )
    create.add_argument("--max-uses", type=int, help="how many probes it may enroll")
    create.set_defaults(handler=cmd_token_create)
    tlist = tsub.add_parser("list", help="list tokens (never the tokens themselves)")
    _db_arg(tlist)
    tlist.add_argument("--json", action="store_true", help="one JSON object per line")
    tlist.set_defaults(handler=cmd_token_list)
    trevoke = tsub.add_parser("revoke", help="stop a token from enrolling more probes")
    _db_arg(trevoke)
    trevoke.add_argument("token_id", type=int, metavar="ID")
    trevoke.set_defaults(handler=cmd_token_revoke)

    probes = sub.add_parser("probes", help="the enrolled probes")
    psub = probes.add_subparsers(dest="probes_command", required=True)
    plist = psub.add_parser("list", help="list probes with their last contact and backlog")
    _db_arg(plist)
    plist.add_argument("--json", action="store_true", help="one JSON object per line")
    plist.set_defaults(handler=cmd_probes_list)
    prevoke = psub.add_parser("revoke", help="revoke a probe's credential")
    _db_arg(prevoke)
    prevoke.add_argument("probe_id", metavar="PROBE_ID")
    prevoke.set_defaults(handler=cmd_probes_revoke)
    prestore = psub.add_parser(
        "restore", help="let a revoked probe id enroll again (with a new enroll token)"
    )
    _db_arg(prestore)
    prestore.add_argument("probe_id", metavar="PROBE_ID")
    prestore.set_defaults(handler=cmd_probes_restore)

    try:  # TRANSITIONAL: collectors.export arrives with the export work
        export = importlib.import_module("collectors.export")
    except ModuleNotFoundError as exc:
        if exc.name not in ("collectors.export", "fastapi", "uvicorn", "pyarrow"):
            raise
    else:
        export.add_parser(sub)


def _db_url(args: argparse.Namespace) -> str:
    url = args.db or os.environ.get(DB_ENV) or ""
    if not url:
        raise _ConfigError(f"--db: the collector's database URL is needed (or set {DB_ENV})")
    return str(url)


def _engine(args: argparse.Namespace) -> Any:
    """The migrated engine of ``--db`` (the CLI's short jobs need no pool)."""
    from collectors.app import open_engine
    from collectors.settings import CollectorSettings

    return open_engine(CollectorSettings(db=_db_url(args), pool_size=1))


def _database_command(fn: Callable[[argparse.Namespace, Any], int]) -> Callable[..., int]:
    """Run ``fn(args, engine)`` mapping bad flags to 78 and database failures to 74."""

    def run(args: argparse.Namespace) -> int:
        missing = _missing_modules()
        if missing:
            print(
                f"vantage collector needs {' and '.join(missing)}: {INSTALL_HINT}",
                file=sys.stderr,
            )
            return EX_UNAVAILABLE
        import sqlalchemy as sa

        from probe.store import StoreError

        try:
            engine = _engine(args)
        except (_ConfigError, sa.exc.ArgumentError) as exc:
            print(f"vantage: configuration error: {exc}", file=sys.stderr)
            return EX_CONFIG
        except (StoreError, sa.exc.SQLAlchemyError) as exc:
            print(f"vantage: {_short(exc)}", file=sys.stderr)
            return EX_IOERR
        try:
            return fn(args, engine)
        except _ConfigError as exc:
            print(f"vantage: configuration error: {exc}", file=sys.stderr)
            return EX_CONFIG
        except sa.exc.SQLAlchemyError as exc:
            print(f"vantage: database error: {_short(exc)}", file=sys.stderr)
            return EX_IOERR
        finally:
            engine.dispose()

    return run


def _short(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@_database_command
def cmd_migrate(args: argparse.Namespace, engine: Any) -> int:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        revision = MigrationContext.configure(conn).get_current_revision()
    print(f"the collector's database is at revision {revision}")
    return 0


def parse_expiry(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """``30d``, ``12h``, ``90m`` from now, or an ISO date or time (UTC unless it says)."""
    now = now or dt.datetime.now(dt.UTC)
    value = text.strip()
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    if value[-1:] in units and value[:-1].isdigit():
        return now + dt.timedelta(seconds=int(value[:-1]) * units[value[-1]])
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise _ConfigError(
            f"--expires: not a duration (30d, 12h, 90m) or an ISO date: {text!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    if when <= now:
        raise _ConfigError(f"--expires: {text!r} is in the past")
    return when.astimezone(dt.UTC)


@_database_command
def cmd_token_create(args: argparse.Namespace, engine: Any) -> int:
    from collectors import auth

    expires = parse_expiry(args.expires) if args.expires else None
    if args.max_uses is not None and args.max_uses < 1:
        raise _ConfigError(f"--max-uses: must be at least 1, got {args.max_uses}")
    token, token_id = auth.create_token(engine, args.label, expires, args.max_uses)
    limits = [f"expires {expires:%Y-%m-%d %H:%M} UTC" if expires else "never expires"]
    limits.append(f"{args.max_uses} use(s)" if args.max_uses else "unlimited uses")
    print(
        f"enroll token {token_id} ({', '.join(limits)}); it is shown only now:",
        file=sys.stderr,
    )
    print(token)
    return 0


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value is not None else "-"


def _json_line(row: dict[str, Any]) -> str:
    return json.dumps(
        {k: v.isoformat() if isinstance(v, dt.datetime) else v for k, v in row.items()}
    )


@_database_command
def cmd_token_list(args: argparse.Namespace, engine: Any) -> int:
    from collectors import auth

    rows = auth.list_tokens(engine)
    if args.json:
        for row in rows:
            print(_json_line(row))
        return 0
    print(f"{'ID':>4}  {'STATE':<8} {'USES':>9}  {'CREATED':<16}  {'EXPIRES':<16}  LABEL")
    for r in rows:
        uses = f"{r['uses']}/{r['max_uses']}" if r["max_uses"] is not None else str(r["uses"])
        print(
            f"{r['id']:>4}  {r['state']:<8} {uses:>9}  {_when(r['created_at']):<16}  "
            f"{_when(r['expires_at']):<16}  {r['label']}"
        )
    return 0


@_database_command
def cmd_token_revoke(args: argparse.Namespace, engine: Any) -> int:
    from collectors import auth

    if not auth.revoke_token(engine, args.token_id):
        print(f"vantage: no usable enroll token {args.token_id}", file=sys.stderr)
        return EX_NOTFOUND
    print(f"enroll token {args.token_id} revoked")
    return 0


@_database_command
def cmd_probes_list(args: argparse.Namespace, engine: Any) -> int:
    from collectors import auth

    rows = auth.list_probes(engine)
    if args.json:
        for row in rows:
            print(_json_line(row))
        return 0
    print(f"{'PROBE':<36}  {'STATE':<7} {'LAST SEEN':<16}  {'LAST UPLOAD':<16}  BACKLOG  NETWORK")
    for r in rows:
        state = "revoked" if r["revoked_at"] else "live"
        network = f"AS{r['asn']} {r['cc']}" if r["asn"] is not None else "-"
        backlog = "-" if r["backlog"] is None else str(r["backlog"])
        print(
            f"{r['probe_id']:<36}  {state:<7} {_when(r['last_seen_at']):<16}  "
            f"{_when(r['last_upload_at']):<16}  {backlog:>7}  {network}"
        )
    return 0


@_database_command
def cmd_probes_revoke(args: argparse.Namespace, engine: Any) -> int:
    from collectors import auth

    if not auth.revoke_probe(engine, args.probe_id):
        print(f"vantage: no live probe {args.probe_id!r}", file=sys.stderr)
        return EX_NOTFOUND
    print(f"probe {args.probe_id} revoked: its uploads are refused from now on")
    return 0


@_database_command
def cmd_probes_restore(args: argparse.Namespace, engine: Any) -> int:
    from collectors import auth

    if not auth.restore_probe(engine, args.probe_id):
        print(f"vantage: no revoked probe {args.probe_id!r}", file=sys.stderr)
        return EX_NOTFOUND
    print(f"probe {args.probe_id} restored: it may enroll again with a new enroll token")
    return 0


def collector_settings(args: argparse.Namespace) -> Any:
    """The :class:`CollectorSettings` of ``collector serve``'s flags and environment."""
    from collectors.settings import CollectorSettings, SettingsError, parse_networks

    control = None
    if args.control:
        control_args = argparse.Namespace(
            resolver=args.control_resolver,
            ca_bundle=args.control_ca_bundle,
            allow_range=args.control_allow_range,
            token=args.control_token,
            no_system_cas=False,
            port=args.port or 8800,
        )
        control = settings_from_args(control_args)
    try:
        proxies = parse_networks("--trusted-proxy", " ".join(args.trusted_proxy))
        return CollectorSettings.from_env(
            os.environ,
            db=args.db,
            host=args.host,
            port=args.port,
            asn_db=args.asn_db,
            country_db=args.country_db,
            trusted_proxies=proxies or None,
            pseudonym_key_file=args.pseudonym_key_file,
            upload_rate=args.upload_rate,
            upload_burst=args.upload_burst,
            control=control,
        )
    except SettingsError as exc:
        raise _ConfigError(str(exc)) from exc


def cmd_collector_serve(args: argparse.Namespace) -> int:
    missing = _missing_modules()
    if missing:
        print(
            f"vantage collector serve needs {' and '.join(missing)}: {INSTALL_HINT}",
            file=sys.stderr,
        )
        return EX_UNAVAILABLE
    import sqlalchemy as sa
    import uvicorn

    from collectors import app as collector_app
    from probe.geoip import GeoIPError
    from probe.store import StoreError

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = collector_settings(args)
        if args.workers < 1:
            raise _ConfigError(f"--workers: at least 1, got {args.workers}")
        if args.workers > 1:
            if settings.control is not None:
                raise _ConfigError("--control needs a single worker (drop --workers)")
            collector_app.open_engine(settings).dispose()  # migrate once, before the workers
            return _serve_workers(settings, args.workers)
        app = collector_app.create_app(settings)
    except (_ConfigError, GeoIPError, ValueError, OSError) as exc:
        # ValueError: a bad control resolver; sa.exc.ArgumentError: not a database URL
        print(f"vantage: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except (StoreError, sa.exc.SQLAlchemyError) as exc:
        print(f"vantage: {_short(exc)}", file=sys.stderr)
        return EX_IOERR
    server = uvicorn.Server(server_config(app, settings))
    helper = app.state.control_helper
    tune_gc()
    # uvicorn stops gracefully on SIGTERM, then raises it again for the handler it found:
    # a no-op one makes that orderly stop exit 0 (systemd's and the tests' expectation).
    signal.signal(signal.SIGTERM, lambda _sig, _frame: None)
    try:
        if helper is not None:
            from collectors import control

            control.serve(server, helper)  # on the loop that refuses internal addresses
        else:
            server.run()
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the SIGINT it shut down for
    return 0


def _serve_workers(settings: Any, workers: int) -> int:
    """Serve with ``workers`` processes (uvicorn's supervisor; each builds its app from
    the environment). Returns when SIGTERM or SIGINT stopped them all."""
    import uvicorn

    os.environ.update(settings.to_env())
    uvicorn.run(
        "collectors.app:app_from_env",
        factory=True,
        workers=workers,
        host=settings.host,
        port=settings.port,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=20,
        limit_concurrency=None,  # the app counts requests; connections: collectors.server
        http="collectors.server:EnvironmentProtocol",
        lifespan="on",
        log_config=None,
    )
    return 0


def tune_gc() -> None:
    """Collect garbage less often: a batch parses into some 100,000 short-lived objects
    without cycles (reference counting frees them), and the default thresholds made
    the collector scan them again and again (a third of the ingest's CPU). What exists
    at start (modules, the schema validator) is frozen out of every collection."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


def server_config(app: Any, settings: Any) -> Any:
    """uvicorn's settings for the collector: no access log (a volunteer's address would
    be in every line), X-Forwarded-For handled by the app for trusted proxies only."""
    import uvicorn

    from collectors.server import protocol_for

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        date_header=True,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=20,
        # Requests are counted by the app (collectors.server.ActiveRequests), never
        # connections; the protocol times out slow headers and bodies.
        limit_concurrency=None,
        http=protocol_for(settings),
        lifespan="on",
        log_config=None,  # logging as set up above, without uvicorn's access formatter
    )
