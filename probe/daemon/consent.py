"""Informed consent: the probe explains itself and the risks before it measures.

People have been punished for using messaging apps and for measuring censorship. A
volunteer must read what Vantage does, keeps, shares and risks, and accept it, before
the first measurement (ARCHITECTURE.md principle 6, REFERENCE.md section 4).
Acceptance is recorded in ``<data_dir>/consent.json`` with the version of the notice
that was read; when the notice changes in substance :data:`NOTICE_VERSION` goes up and
consent must be given again. ``privacy.consent = true`` accepts it for fleets whose
operator has informed each volunteer themselves.

>>> has_consent(cfg)
False
>>> record_consent(cfg)  # after the volunteer typed "yes"
>>> has_consent(cfg)
True
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from probe.config import Config

CONSENT_FILE = "consent.json"
#: Bump when the notice changes in substance: everyone is asked again.
NOTICE_VERSION = 1

NOTICE = """\
Vantage: what it does, what it keeps, what it shares, and the risks
(notice version {version})

WHAT IT DOES
  On a schedule (every hour by default, at random times), Vantage connects from this
  network to messaging services (WhatsApp, Telegram, Signal, Facebook Messenger,
  Snapchat, and any you add) and to a few harmless control sites: DNS lookups, TCP
  connections, TLS handshakes and HTTPS requests, as the apps themselves would. It
  uses no account and sends nothing you write or read.

WHAT IT KEEPS (on this machine: {db})
  Every measurement: what was asked, what answered, timings, certificates, the start
  of each page, and a verdict (reachable or blocked, and how). With it: a random probe
  id, your network's AS number, name and country, your DNS resolver's address, and the
  network type (wifi, ethernet, mobile). Your public IP address is never stored (unless
  you set privacy.store_ip = true) and is scrubbed from answers that echo it back.
  {retention}

WHAT IT SHARES
  Nothing, unless you enroll this probe with a collector (vantage enroll) or set
  collector.url: then the measurements above are uploaded to it and may be published
  as open data, with your network and country. Your IP address is never uploaded. A
  control helper, if you configure one, is told which targets are measured and
  nothing about you.

THE RISKS
  - Your network operator, and anyone who watches your line, can see that this machine
    connects to these services, and can recognise the pattern of a measurement tool.
    Where a service is blocked, the attempts to reach it are visible too.
  - In some countries people have been punished (questioned, fined, detained, cut off)
    for using these apps, for getting around blocks, or for measuring censorship.
    Running Vantage may draw that attention to you.
  - Published measurements name your network and country; on a small network they may
    point to the few people who run probes there.
  - Riskier techniques (locating the censor, repeating triggers) stay off unless you
    turn them on.

Run Vantage only if you understand and accept these risks. You can stop at any time
(systemctl disable --now vantage, or stop `vantage daemon`) and delete {data_dir}.
"""


@dataclass(frozen=True)
class ConsentState:
    """Whether measuring is allowed, and why."""

    given: bool
    how: str  # "file" | "config" | "outdated" | "missing" | "unreadable"
    accepted_at: str | None = None
    notice_version: int | None = None
    path: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "given": self.given,
            "how": self.how,
            "accepted_at": self.accepted_at,
            "notice_version": self.notice_version,
            "current_notice_version": NOTICE_VERSION,
            "path": self.path,
        }


def consent_path(cfg: Config) -> Path:
    return cfg.data_dir() / CONSENT_FILE


def notice(cfg: Config) -> str:
    """The notice, with this probe's database, data directory and retention."""
    retention = (
        f"Measurements older than {cfg.retention.days} days are deleted."
        if cfg.retention.days
        else "Measurements are kept until you delete them (retention.days = 0)."
    )
    return NOTICE.format(
        version=NOTICE_VERSION,
        db=_safe_url(cfg.db_url()),
        retention=retention,
        data_dir=cfg.data_dir(),
    )


def _safe_url(url: str) -> str:
    if "@" not in url:
        return url.removeprefix("sqlite:///")
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


def consent_state(cfg: Config) -> ConsentState:
    """Read the recorded consent (never raises: a damaged file is no consent)."""
    path = consent_path(cfg)
    if cfg.privacy.consent:
        return ConsentState(True, "config", path=str(path))
    try:
        doc = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return ConsentState(False, "missing", path=str(path))
    except (OSError, ValueError):
        return ConsentState(False, "unreadable", path=str(path))
    if not isinstance(doc, dict) or doc.get("accepted") is not True:
        return ConsentState(False, "unreadable", path=str(path))
    version = doc.get("notice_version")
    at = doc.get("accepted_at") if isinstance(doc.get("accepted_at"), str) else None
    if not isinstance(version, int) or isinstance(version, bool) or version < NOTICE_VERSION:
        return ConsentState(
            False, "outdated", at, version if isinstance(version, int) else None, str(path)
        )
    return ConsentState(True, "file", at, version, str(path))


def has_consent(cfg: Config) -> bool:
    """Whether the volunteer accepted the current notice (or ``privacy.consent``)."""
    return consent_state(cfg).given


def record_consent(cfg: Config, now: dt.datetime | None = None) -> Path:
    """Record acceptance of the current notice, atomically; returns the file's path."""
    path = consent_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    at = (now or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds")
    doc = {"accepted": True, "notice_version": NOTICE_VERSION, "accepted_at": at}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", "utf-8")
    os.chmod(tmp, 0o644)  # the daemon's user reads what an administrator recorded
    os.replace(tmp, path)
    return path


def refusal(cfg: Config) -> str:
    """What the probe says when it refuses to measure without consent."""
    state = consent_state(cfg)
    why = {
        "outdated": "the risk notice changed since consent was given",
        "unreadable": f"{state.path} is damaged",
    }.get(state.how, "no consent is recorded")
    return (
        f"vantage: not measuring: {why}. Read what the probe does and the risks, and "
        f"accept them, with `vantage consent` (it records acceptance in {state.path}); "
        "operators who informed their volunteers themselves may set privacy.consent = true."
    )


__all__ = [
    "NOTICE_VERSION",
    "ConsentState",
    "consent_state",
    "has_consent",
    "notice",
    "record_consent",
    "refusal",
]
