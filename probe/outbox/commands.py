"""``vantage enroll`` and ``vantage upload``.

    vantage enroll https://collector.example.org --token T [--force]
    vantage upload [--retry-rejected]

Exit codes: 0 done (upload: nothing is left to send); 64 enrolled already (use
--force) or a bad URL; 74 database error; 75 the collector could not be reached or
asks to wait (what it acknowledged is gone from the outbox; try again later);
76 the collector's answer makes no sense; 77 not enrolled, the token or the
credential was refused, or this probe is enrolled there already; 78 bad configuration;
130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys
from pathlib import Path
from typing import Any

import httpx

from probe.config import Config
from probe.outbox.enrollment import EnrollmentError, enroll, enrollment
from probe.outbox.queue import rejected_counts
from probe.outbox.upload import Outcome, upload_now
from probe.store import Store

EX_USAGE = 64
EX_TEMPFAIL = 75
EX_PROTOCOL = 76
EX_NOPERM = 77
EX_INTERRUPTED = 130

_ENROLL_EXIT = {
    "usage": EX_USAGE,
    "exists": EX_USAGE,
    "refused": EX_NOPERM,
    "conflict": EX_NOPERM,
    "unreachable": EX_TEMPFAIL,
    "protocol": EX_PROTOCOL,
}
_UPLOAD_EXIT = {
    Outcome.DRAINED: 0,
    Outcome.UNREACHABLE: EX_TEMPFAIL,
    Outcome.BUSY: EX_TEMPFAIL,
    Outcome.REFUSED: EX_NOPERM,
    Outcome.NOT_ENROLLED: EX_NOPERM,
    Outcome.PROTOCOL: EX_PROTOCOL,
}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    e = sub.add_parser(
        "enroll",
        help="register this probe with a collector (once), with a token from its operator",
        description="Register this probe with the collector at URL. The credential it "
        "answers with is kept in DATA_DIR/collector.json (readable by you only).",
    )
    e.add_argument("url", metavar="URL", help="the collector, e.g. https://collector.example.org")
    token = e.add_mutually_exclusive_group(required=True)
    token.add_argument("--token", help="the enrollment token the operator gave you")
    token.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="read the token from FILE ('-': standard input; keeps it out of `ps`)",
    )
    e.add_argument("--force", action="store_true", help="replace an existing enrollment")
    e.add_argument("--data-dir", help="where the probe id and the enrollment live")
    e.set_defaults(config_handler=cmd_enroll, overrides=_overrides)

    u = sub.add_parser(
        "upload",
        help="upload pending measurements to the collector now",
        description="Send what waits in the outbox, oldest first; a measurement leaves the "
        "outbox only once the collector acknowledged it.",
    )
    u.add_argument(
        "--retry-rejected",
        action="store_true",
        help="send again the measurements the collector rejected (after it was upgraded)",
    )
    u.add_argument("--db", help="SQLAlchemy database URL (default: SQLite in the data directory)")
    u.add_argument("--data-dir", help="where the probe id, enrollment and database live")
    u.set_defaults(config_handler=cmd_upload, overrides=_overrides)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    pairs = {"probe.data_dir": args.data_dir, "probe.db": getattr(args, "db", None)}
    return {k: v for k, v in pairs.items() if v is not None}


def _error(message: str) -> None:
    print(f"vantage: {message}", file=sys.stderr)


def _read_token(args: argparse.Namespace) -> str:
    if args.token is not None:
        return str(args.token).strip()
    if str(args.token_file) == "-":
        return sys.stdin.readline().strip()
    try:
        return args.token_file.read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise EnrollmentError(
            f"--token-file {args.token_file}: cannot read it: {exc}", "usage"
        ) from exc


def cmd_enroll(args: argparse.Namespace, cfg: Config) -> int:
    try:
        token = _read_token(args)
        if not token:
            raise EnrollmentError("the enrollment token is empty", "usage")
        e = enroll(cfg, args.url, token, force=args.force)
    except EnrollmentError as exc:
        _error(f"enroll: {exc}")
        return _ENROLL_EXIT.get(exc.reason, EX_USAGE)
    print(f"enrolled probe {e.probe_id} at {e.url}")
    if _cleartext(e.url):
        print(
            "warning: the collector's URL is not https://: the credential and measurements "
            "travel unencrypted",
            file=sys.stderr,
        )
    if cfg.collector.url and cfg.collector.url.rstrip("/") != e.url:
        print(f"note: collector.url ({cfg.collector.url}) overrides this URL", file=sys.stderr)
    print("the daemon uploads on its own; `vantage upload` sends what is pending now")
    return 0


def _cleartext(url: str) -> bool:
    parsed = httpx.URL(url)
    if parsed.scheme == "https":
        return False
    try:
        return not ipaddress.ip_address(parsed.host).is_loopback
    except ValueError:
        return parsed.host != "localhost"


def cmd_upload(args: argparse.Namespace, cfg: Config) -> int:
    try:
        if enrollment(cfg) is None:
            _error("upload: this probe is not enrolled: run `vantage enroll URL --token T` first")
            return EX_NOPERM
    except EnrollmentError as exc:
        _error(f"upload: {exc}")
        return EX_NOPERM
    store = Store.open(cfg.db_url())
    try:
        try:
            report = asyncio.run(upload_now(cfg, store, retry_rejected=args.retry_rejected))
        except KeyboardInterrupt:
            _error("upload: interrupted; what the collector acknowledged is gone from the outbox")
            return EX_INTERRUPTED
        kept = sum(rejected_counts(store).values())
    finally:
        store.close()
    line = (
        f"uploaded to {report.url}: {report.accepted} accepted, {report.duplicate} already "
        f"there, {report.rejected} rejected; {report.left} waiting"
    )
    print(line)
    for why in report.rejected_reasons:
        print(f"  rejected: {why}")
    if kept:
        print(
            f"{kept} rejected measurement(s) stay in the outbox, not sent again "
            "(`vantage upload --retry-rejected` sends them once more)"
        )
    if report.outcome is not Outcome.DRAINED:
        _error(f"upload: {report.error}")
    return _UPLOAD_EXIT.get(report.outcome, EX_TEMPFAIL)
