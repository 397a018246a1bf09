"""``vantage doctor``: is this machine ready to measure, and if not, what to do.

Each check says ``ok``, ``warn`` (the probe runs, but something is worse than it
should be), ``fail`` (the probe cannot do its job) or ``skip`` (not configured), with
a detail and a hint. The exit status is 1 when any check fails, else 0.

    vantage doctor [--json] [--user NAME] [--query-name NAME]

Run as root (``sudo vantage doctor``) it checks what the service will see: the data
directory MUST belong to the service user (``--user``, default ``vantage`` when that
user exists), and whatever the checks create there (the database, the probe id) is
given to that user, so that they never leave files the service cannot write.

Nothing the checks print names the probe's public IP: doctor output is meant to be
pasted into a bug report.

>>> checks = run_checks(cfg, Inputs())
>>> [c.status for c in checks if c.name == "disk"]
['ok']
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import email.utils
import json
import logging
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import httpx
import maxminddb
import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

from probe.config import DEFAULT_CONFIG_PATHS, Config
from probe.engine.dns import system_resolvers
from probe.vantage import WHOAMI_PATH, Machine, collector_tls, collector_url, discover

#: The year this release came out: a clock before it is certainly wrong (a Pi
#: without a real-time clock boots in 1970 or at its last shutdown until NTP syncs).
RELEASE_YEAR = 2026
SERVICE_USER = "vantage"
OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
#: Clock skew against the collector, in seconds: warn beyond the first, fail beyond
#: the second (certificates and measurement times go wrong).
SKEW_WARN, SKEW_FAIL = 60.0, 600.0
DNS_TIMEOUT = 3.0
HTTP_TIMEOUT = 10.0
#: An offline database older than this many days is stale (DB-IP publishes monthly).
MMDB_STALE_DAYS = 400


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    status: str  # ok | warn | fail | skip
    detail: str
    hint: str = ""


def _timedatectl() -> str | None:
    """``yes``/``no`` from systemd's NTP state, or None when it cannot tell."""
    exe = shutil.which("timedatectl")
    if exe is None:
        return None
    try:
        proc = subprocess.run(
            [exe, "show", "-p", "NTPSynchronized", "--value"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    value = proc.stdout.strip().lower()
    return value if proc.returncode == 0 and value in ("yes", "no") else None


def _open_raw_socket() -> None:
    """Open (and close) a raw ICMP socket: creating it sends nothing."""
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Inputs:
    """Everything the checks take from outside the config; tests replace parts."""

    config_path: str | None = None
    user: str | None = None  # the service user whose view is checked (root only)
    query_name: str | None = None  # default: vantage.resolver_whoami, else example.com
    dns_port: int = 53
    dns_timeout: float = DNS_TIMEOUT
    now: Callable[[], dt.datetime] = _now
    ntp_synchronized: Callable[[], str | None] = _timedatectl
    raw_socket: Callable[[], None] = _open_raw_socket
    euid: Callable[[], int] = os.geteuid
    has_consent: Callable[[Config], bool] | None = None  # default: probe.daemon.consent
    machine: Machine = field(default_factory=Machine)


# -- the checks -----------------------------------------------------------------------


def check_config(cfg: Config, inputs: Inputs) -> Check:
    where = inputs.config_path or "no config file: defaults and environment"
    return Check("config", OK, f"valid ({where})")


def _service_user(inputs: Inputs) -> pwd.struct_passwd | None:
    """The user whose view is checked: --user when running as root."""
    if inputs.euid() != 0 or not inputs.user:
        return None
    return pwd.getpwnam(inputs.user)


def check_data_dir(cfg: Config, inputs: Inputs) -> Check:
    path = cfg.data_dir()
    fix = f"sudo install -d -o {inputs.user or SERVICE_USER} -m 0750 {path}"
    if not path.exists():
        return Check(
            "data directory",
            FAIL,
            f"{path} does not exist",
            f"create it ({fix}) or re-run deploy/install.sh",
        )
    if not path.is_dir():
        return Check(
            "data directory", FAIL, f"{path} is not a directory", "point probe.data_dir at one"
        )
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor-"):
            pass
    except OSError as exc:
        return Check(
            "data directory",
            FAIL,
            f"{path} is not writable: {exc.strerror or exc}",
            f"fix its permissions ({fix})",
        )
    if inputs.euid() == 0 and inputs.user:
        try:
            user = pwd.getpwnam(inputs.user)
        except KeyError:
            return Check(
                "data directory",
                FAIL,
                f"no such user {inputs.user!r}",
                "run deploy/install.sh, or pass --user with the service's user",
            )
        st = path.stat()
        if st.st_uid != user.pw_uid:
            owner = _user_name(st.st_uid)
            return Check(
                "data directory",
                FAIL,
                f"{path} belongs to {owner}, not the service user {user.pw_name}",
                f"sudo chown -R {user.pw_name}: {path}",
            )
        foreign = sorted(p.name for p in path.iterdir() if _owner(p) not in (user.pw_uid, None))
        if foreign:
            return Check(
                "data directory",
                FAIL,
                f"{path}: not the service user's: {', '.join(foreign[:5])}",
                f"sudo chown -R {user.pw_name}: {path}",
            )
        return Check("data directory", OK, f"{path}, writable, owned by {user.pw_name}")
    who = _user_name(inputs.euid())
    return Check("data directory", OK, f"{path}, writable by {who}")


def _owner(path: Path) -> int | None:
    try:
        return path.lstat().st_uid
    except OSError:
        return None


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def check_raw_socket(cfg: Config, inputs: Inputs) -> Check:
    try:
        inputs.raw_socket()
    except PermissionError:
        return Check(
            "raw sockets",
            WARN,
            "cannot open a raw socket (no CAP_NET_RAW): packet-level evidence is not collected",
            "the systemd unit grants CAP_NET_RAW; by hand: "
            "sudo setcap cap_net_raw+ep on the venv's python",
        )
    except OSError as exc:
        return Check("raw sockets", WARN, f"cannot open a raw socket: {exc}")
    if inputs.euid() == 0:
        return Check(
            "raw sockets",
            OK,
            "root can open raw sockets; the service gets "
            "CAP_NET_RAW from its unit (AmbientCapabilities)",
        )
    return Check("raw sockets", OK, "raw ICMP socket opens (CAP_NET_RAW)")


def check_clock(cfg: Config, inputs: Inputs) -> Check:
    now = inputs.now()
    stamp = now.strftime("%Y-%m-%d %H:%M UTC")
    if now.year < RELEASE_YEAR:
        return Check(
            "clock",
            FAIL,
            f"the clock says {stamp}, before this software existed",
            "set the time: sudo timedatectl set-ntp true (needs network), or sudo date -s ...",
        )
    synced = inputs.ntp_synchronized()
    if synced == "no":
        return Check(
            "clock",
            WARN,
            f"{stamp}, not synchronised by NTP",
            "sudo timedatectl set-ntp true; a Pi has no battery clock",
        )
    if synced is None:
        return Check("clock", OK, f"{stamp} (NTP state unknown: no timedatectl answer)")
    return Check("clock", OK, f"{stamp}, synchronised by NTP")


def check_disk(cfg: Config, inputs: Inputs) -> Check:
    path = cfg.data_dir()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free // (1024 * 1024)
    except OSError as exc:
        return Check("disk", FAIL, f"cannot read free space of {path}: {exc}")
    floor = cfg.retention.min_free_mb
    detail = f"{free} MB free on {path} (measuring pauses below {floor} MB)"
    hint = "free some space, or lower retention.days so old measurements are pruned"
    if free < floor:
        return Check("disk", FAIL, detail, hint)
    if free < 2 * floor:
        return Check("disk", WARN, detail, hint)
    return Check("disk", OK, detail)


def check_resolver(cfg: Config, inputs: Inputs) -> Check:
    found = system_resolvers(cfg.dns.resolv_conf)
    if not found:
        if not cfg.dns.system:
            return Check("resolver", SKIP, "dns.system is off: the system resolver is not used")
        return Check(
            "resolver",
            FAIL,
            f"no nameserver in {cfg.dns.resolv_conf}",
            "fix the network configuration (DHCP), or set dns.resolvers",
        )
    server = found[0].address
    name = inputs.query_name or cfg.vantage.resolver_whoami or "example.com"
    query = dns.message.make_query(name, dns.rdatatype.A)
    try:
        reply = dns.query.udp(query, server, timeout=inputs.dns_timeout, port=inputs.dns_port)
        if reply.flags & dns.flags.TC:
            reply = dns.query.tcp(query, server, timeout=inputs.dns_timeout, port=inputs.dns_port)
    except (dns.exception.DNSException, OSError) as exc:
        return Check(
            "resolver",
            FAIL,
            f"{server} ({cfg.dns.resolv_conf}) does not answer "
            f"a query for {name}: {exc or type(exc).__name__}",
            "check the network and the router's DNS",
        )
    rcode = dns.rcode.to_text(reply.rcode())
    if reply.rcode() != dns.rcode.NOERROR:
        return Check(
            "resolver",
            WARN,
            f"{server} answers {rcode} for {name}",
            "the resolver may be failing or filtering; --query-name NAME tries another name",
        )
    return Check("resolver", OK, f"{server} ({cfg.dns.resolv_conf}) answers for {name}")


def check_database(cfg: Config, inputs: Inputs) -> Check:
    from probe.store import Store, StoreError  # its import pulls in Alembic: only here

    url = cfg.db_url()
    parsed = sa.make_url(url)
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        folder = Path(parsed.database).expanduser().parent
        if not folder.is_dir():  # never create it here (maybe as the wrong user)
            return Check(
                "database",
                FAIL,
                f"{shown}: {folder} does not exist",
                "create the data directory first (see above)",
            )
    try:
        store = Store.open(url)
    except StoreError as exc:
        return Check("database", FAIL, str(exc), "check probe.db and the data directory")
    try:
        with store.engine.connect() as conn:
            if store.engine.dialect.name == "sqlite":
                rows = [r[0] for r in conn.execute(sa.text("PRAGMA quick_check"))]
            else:
                rows = ["ok"] if conn.execute(sa.text("SELECT 1")).scalar() == 1 else ["no"]
            version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    except sa.exc.SQLAlchemyError as exc:
        return Check(
            "database", FAIL, f"{shown}: {exc}", "restore it from a backup, or move it aside"
        )
    finally:
        store.close()
    if rows != ["ok"]:
        return Check(
            "database",
            FAIL,
            f"{shown}: integrity check says {'; '.join(rows[:3])}",
            "move the damaged file aside; the probe starts a new one",
        )
    return Check("database", OK, f"{shown}: opens, schema {version}, integrity ok")


def check_vantage(cfg: Config, inputs: Inputs) -> Check:
    """What measurements will say about where they come from (never the IP)."""
    if not cfg.data_dir().is_dir():
        return Check("vantage point", SKIP, "needs the data directory (the probe id lives there)")
    resolver = next(iter(system_resolvers(cfg.dns.resolv_conf)), None)
    quiet = logging.getLogger("vantage.discovery")
    was, quiet.disabled = quiet.disabled, True  # its reasons are shown in the detail
    try:
        found = discover(cfg, resolver.address if resolver else None, machine=inputs.machine)
    finally:
        quiet.disabled = was
    v = found.vantage
    parts = [
        f"AS{v.asn}",
        v.cc,
        v.network_name or "network name unknown",
        v.network_type or "network type unknown",
        f"resolver AS{v.resolver_asn}" if v.resolver_ip else "resolver unknown",
    ]
    detail = ", ".join(parts)
    if v.asn == 0 or v.cc == "ZZ":
        notes = "; ".join(n for n in found.notes if "unknown" in n or "whoami" in n)
        return Check(
            "vantage point",
            WARN,
            f"{detail} ({notes})" if notes else detail,
            "set vantage.asn and vantage.cc, add the offline databases "
            "(deploy/install.sh fetches them), or enroll with a collector",
        )
    return Check("vantage point", OK, detail)


def check_consent(cfg: Config, inputs: Inputs) -> Check:
    given = inputs.has_consent
    if given is None:
        try:
            from probe.daemon.consent import has_consent
        except ImportError as exc:
            return Check("consent", WARN, f"cannot tell: {exc}")
        given = has_consent
    if given(cfg):
        return Check("consent", OK, "the risk notice was accepted")
    who = f"sudo -u {inputs.user} " if inputs.euid() == 0 and inputs.user else ""
    return Check(
        "consent",
        FAIL,
        "not given: the probe will not measure",
        f"read the notice and accept it: {who}vantage consent",
    )


#: What the probe loses without an ASN database (said by ``vantage doctor``).
NO_ASN_DB_COST = (
    "without an ASN database the probe's network is unknown (AS0) and DNS answers cannot be "
    "placed in networks: a forged answer that accepts connections (bare-TCP targets such as "
    "WhatsApp's and Messenger's endpoints) reads as reachable, unverified"
)


def check_mmdb(cfg: Config, inputs: Inputs) -> Check:
    v = cfg.vantage
    hint = "re-run deploy/install.sh with Internet, or download DB-IP lite from db-ip.com"
    if not (v.asn_db or v.country_db):
        return Check(
            "ip databases",
            SKIP,
            f"none configured (vantage.asn_db, vantage.country_db); {NO_ASN_DB_COST}",
            hint,
        )
    problems: list[str] = []
    stale: list[str] = []
    good: list[str] = []
    for role, path, word in (("ASN", v.asn_db, "asn"), ("country", v.country_db, "country")):
        if not path:
            continue
        if not Path(path).is_file():
            problems.append(f"{role} database {path}: no such file")
            continue
        try:
            with maxminddb.open_database(path) as reader:
                meta = reader.metadata()
        except (maxminddb.InvalidDatabaseError, ValueError, OSError) as exc:
            problems.append(f"{role} database {path}: not a MaxMind-format database ({exc})")
            continue
        kind = str(meta.database_type)
        if word not in kind.lower() and not (word == "country" and "city" in kind.lower()):
            problems.append(f"{role} database {path} is a {kind} database")
            continue
        built = dt.datetime.fromtimestamp(meta.build_epoch, dt.UTC)
        if (inputs.now() - built).days > MMDB_STALE_DAYS:
            stale.append(f"{Path(path).name} built {built:%Y-%m-%d}")
        good.append(f"{Path(path).name} ({kind}, {built:%Y-%m-%d})")
    if problems:
        return Check("ip databases", FAIL, "; ".join(problems), hint)
    if stale:
        return Check("ip databases", WARN, "stale: " + "; ".join(stale), hint)
    if not v.asn_db:
        return Check("ip databases", WARN, "; ".join(good) + f"; no ASN database: {NO_ASN_DB_COST}",
                     hint)  # fmt: skip
    return Check("ip databases", OK, "; ".join(good))


def check_collector(cfg: Config, inputs: Inputs) -> list[Check]:
    """Reachable, and our clock against its ``Date`` header."""
    try:
        from probe.outbox import enrollment
    except ImportError:
        enrolled: Any = None
    else:
        try:
            enrolled = enrollment(cfg)
        except Exception as exc:  # noqa: BLE001 - a damaged file is this check's finding
            return [Check("collector", FAIL, f"enrollment: {exc}", "vantage enroll again")]
    url = collector_url(cfg)
    if not url:
        return [Check("collector", SKIP, "none configured: measurements stay on this machine")]
    target = url.rstrip("/") + WHOAMI_PATH
    try:
        verify = collector_tls(cfg.collector.ca_bundle)
        with httpx.Client(verify=verify, timeout=min(cfg.collector.timeout, HTTP_TIMEOUT)) as c:
            response = c.get(target)
    except (httpx.HTTPError, OSError) as exc:
        return [
            Check(
                "collector",
                FAIL,
                f"{url} unreachable: {exc or type(exc).__name__}",
                "check the network, collector.url and collector.ca_bundle",
            )
        ]
    checks: list[Check] = []
    if response.status_code != 200:
        checks.append(
            Check(
                "collector",
                FAIL,
                f"{target} answers HTTP {response.status_code}",
                "is collector.url the collector's base URL?",
            )
        )
    elif enrolled is None:
        checks.append(
            Check(
                "collector",
                WARN,
                f"{url} reachable, but this probe is not enrolled",
                "vantage enroll URL --token TOKEN (from the collector's operator)",
            )
        )
    else:
        checks.append(Check("collector", OK, f"{url} reachable, enrolled"))
    checks.append(_skew(response.headers.get("date"), inputs))
    return checks


def _skew(date: str | None, inputs: Inputs) -> Check:
    if not date:
        return Check("clock skew", SKIP, "the collector sent no Date header")
    try:
        theirs = email.utils.parsedate_to_datetime(date)
    except (TypeError, ValueError):
        return Check("clock skew", SKIP, f"unreadable Date header {date[:40]!r}")
    if theirs.tzinfo is None:
        theirs = theirs.replace(tzinfo=dt.UTC)
    skew = (inputs.now() - theirs).total_seconds()
    detail = f"{skew:+.0f} s against the collector"
    hint = "sudo timedatectl set-ntp true"
    if abs(skew) > SKEW_FAIL:
        return Check("clock skew", FAIL, detail, hint)
    if abs(skew) > SKEW_WARN:
        return Check("clock skew", WARN, detail, hint)
    return Check("clock skew", OK, detail)


# -- running them -----------------------------------------------------------------------

#: Checks that may create files in the data directory (the database, the probe id).
_WRITES_DATA = ("database", "vantage point")


def run_checks(cfg: Config, inputs: Inputs) -> list[Check]:
    """Every check, in order; one that crashes is reported as failed, not raised."""
    steps: list[tuple[str, Callable[[Config, Inputs], Check | list[Check]]]] = [
        ("config", check_config),
        ("data directory", check_data_dir),
        ("raw sockets", check_raw_socket),
        ("clock", check_clock),
        ("disk", check_disk),
        ("resolver", check_resolver),
        ("database", check_database),
        ("consent", check_consent),
        ("ip databases", check_mmdb),
        ("vantage point", check_vantage),
        ("collector", check_collector),
    ]
    try:
        user = _service_user(inputs)
    except KeyError:
        user = None  # check_data_dir reports it
    checks: list[Check] = []
    for name, step in steps:
        try:
            if name in _WRITES_DATA and user is not None:
                result = leaving_to(user, cfg.data_dir(), partial(step, cfg, inputs))
            else:
                result = step(cfg, inputs)
        except Exception as exc:  # noqa: BLE001 - a check that crashes is a finding
            result = Check(name, FAIL, f"the check itself failed: {type(exc).__name__}: {exc}")
        checks.extend(result if isinstance(result, list) else [result])
    return checks


def leaving_to(user: pwd.struct_passwd, folder: Path, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` (as root) and give what it created in ``folder`` to ``user``: a
    database or probe id made by ``sudo vantage doctor`` must stay writable by the
    service."""
    before = set(_entries(folder))
    try:
        return fn()
    finally:
        for path in _entries(folder):
            if path not in before:
                with contextlib.suppress(OSError):  # gone meanwhile (a -wal file)
                    os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


# -- the command --------------------------------------------------------------------------

_STYLE = {OK: "green", WARN: "yellow", FAIL: "bold red", SKIP: "dim"}


def report(checks: list[Check], out: Any, *, as_json: bool, terminal: bool) -> None:
    if as_json:
        doc = {
            "ok": not any(c.status == FAIL for c in checks),
            "checks": [asdict(c) for c in checks],
        }
        out.write(json.dumps(doc, indent=2) + "\n")
        return
    if terminal:
        table = Table("check", "status", "detail", "hint")
        for c in checks:
            table.add_row(c.name, f"[{_STYLE[c.status]}]{c.status}[/]", c.detail, c.hint)
        Console(file=out).print(table)
        return
    width = max(len(c.name) for c in checks)
    for c in checks:
        out.write(f"{c.status:<4}  {c.name:<{width}}  {c.detail}\n")
        if c.hint:
            out.write(f"{'':<4}  {'':<{width}}  hint: {c.hint}\n")


def _config_path(args: argparse.Namespace) -> str | None:
    if args.config is not None:
        return str(args.config)
    if "VANTAGE_CONFIG" in os.environ:
        return os.environ["VANTAGE_CONFIG"]
    return next((str(p) for p in DEFAULT_CONFIG_PATHS if p.is_file()), None)


def cmd_doctor(args: argparse.Namespace, cfg: Config) -> int:
    user = args.user
    if user is None and os.geteuid() == 0:
        try:  # sudo vantage doctor: check the installed service's view
            user = pwd.getpwnam(SERVICE_USER).pw_name
        except KeyError:
            user = None
    inputs = Inputs(config_path=_config_path(args), user=user, query_name=args.query_name)
    checks = run_checks(cfg, inputs)
    report(checks, sys.stdout, as_json=args.json, terminal=sys.stdout.isatty())
    return 1 if any(c.status == FAIL for c in checks) else 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "doctor",
        help="check permissions, raw sockets, clock, disk, resolver, database, consent",
        description="Check that this machine is ready to measure; exit 1 if a check fails.",
    )
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.add_argument("--user", help="as root: the service's user (default: vantage, if it exists)")
    p.add_argument(
        "--query-name",
        metavar="NAME",
        help="name to ask the system resolver (default: vantage.resolver_whoami)",
    )
    p.set_defaults(config_handler=cmd_doctor)


__all__ = ["Check", "Inputs", "add_parser", "leaving_to", "report", "run_checks"]
