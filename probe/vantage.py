"""The vantage point: who measures, from where.

The probe id is a random UUID made once and kept in the data directory; it says
nothing about the volunteer. ASN, country and network come from the config for now
(lookup arrives with the daemon). The probe's public IP is never part of it.
"""

from __future__ import annotations

import os
import platform
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from probe import __version__
from probe.config import Config
from schema.model import VantagePoint

PROBE_ID_FILE = "probe_id"


def probe_id(data_dir: Path) -> str:
    """Read the probe id, creating it (atomically) on first use."""
    path = data_dir / PROBE_ID_FILE
    try:
        value = path.read_text("ascii").strip()
        return str(uuid.UUID(value))
    except FileNotFoundError:
        pass
    except ValueError:
        pass  # damaged file: replace it below
    data_dir.mkdir(parents=True, exist_ok=True)
    value = str(uuid.uuid4())
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(value + "\n", "ascii")
    os.replace(tmp, path)
    return value


def vantage_point(cfg: Config, resolver_ip: str | None) -> VantagePoint:
    v = cfg.vantage
    return VantagePoint(
        probe_id=probe_id(cfg.data_dir()),
        software_version=__version__,
        platform=sys.platform,
        architecture=platform.machine() or "unknown",
        asn=v.asn,
        cc=v.cc,
        network_name=v.network_name or None,
        network_type=v.network_type or None,
        resolver_ip=resolver_ip,
    )


@dataclass(frozen=True)
class Discovered:
    """The vantage point, and addresses of the probe that MUST be scrubbed from every
    measurement (its public IP, once learnt, unless the volunteer opted in)."""

    vantage: VantagePoint
    scrub: frozenset[str] = frozenset()


def discover(cfg: Config, system_resolver: str | None) -> Discovered:
    """Find the vantage point (blocking: call it in a worker thread from asyncio).

    For now from the configuration only; lookup comes with issue 5."""
    return Discovered(vantage_point(cfg, system_resolver))
