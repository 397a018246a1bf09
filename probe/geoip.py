"""Offline IP-to-network lookup in MaxMind-format databases (``.mmdb``).

DB-IP's free "lite" databases (and MaxMind's GeoLite2) come as two files: one maps an
address to its AS number and organisation, one to its country. Either may be missing;
what it would have said is then unknown (ASN 0, country "ZZ"), as OONI records it.

>>> geo = GeoIP(asn_db="dbip-asn-lite.mmdb", country_db="dbip-country-lite.mmdb")
>>> geo.lookup("192.0.2.1")
NetworkInfo(asn=64500, cc='ZZ', network_name='Example Net')
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import maxminddb

if TYPE_CHECKING:
    from schema.model import DNSQuery


class GeoIPError(RuntimeError):
    """A database file is missing or is not a MaxMind-format database."""


@dataclass(frozen=True)
class NetworkInfo:
    asn: int = 0
    cc: str = "ZZ"
    network_name: str | None = None


def _open(path: str, what: str) -> Any:
    if not Path(path).is_file():
        raise GeoIPError(f"{what} database {path}: no such file")
    try:
        return maxminddb.open_database(path)
    except (maxminddb.InvalidDatabaseError, ValueError, OSError) as exc:
        raise GeoIPError(f"{what} database {path}: not a MaxMind-format database ({exc})") from exc


class GeoIP:
    """Readers for an ASN database and a country database (either may be ``""``)."""

    def __init__(self, asn_db: str = "", country_db: str = "") -> None:
        self._asn = _open(asn_db, "ASN") if asn_db else None
        self._country = _open(country_db, "country") if country_db else None

    @property
    def empty(self) -> bool:
        return self._asn is None and self._country is None

    @property
    def has_asn(self) -> bool:
        """True when an ASN database is open (addresses can be placed in networks)."""
        return self._asn is not None

    def lookup(self, ip: str) -> NetworkInfo:
        """What the databases say of ``ip``; unknown parts stay unknown. Raises
        ``ValueError`` when ``ip`` is not an address."""
        address = ipaddress.ip_address(ip)
        asn, name, cc = 0, None, "ZZ"
        if self._asn is not None:
            rec = self._record(self._asn, address)
            number = rec.get("autonomous_system_number")
            if isinstance(number, int) and 0 < number < 2**32:
                asn = number
            org = rec.get("autonomous_system_organization")
            if isinstance(org, str) and org.strip():
                name = org.strip()[:200]
        if self._country is not None:
            rec = self._record(self._country, address)
            country = rec.get("country")
            code = country.get("iso_code") if isinstance(country, dict) else None
            if isinstance(code, str) and len(code) == 2 and code.isalpha():
                cc = code.upper()
        return NetworkInfo(asn=asn, cc=cc, network_name=name)

    @staticmethod
    def _record(reader: Any, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> dict:
        try:
            rec = reader.get(address)
        except (ValueError, maxminddb.InvalidDatabaseError):
            return {}  # an IPv6 address in an IPv4-only database; a damaged record
        return rec if isinstance(rec, dict) else {}

    def close(self) -> None:
        for reader in (self._asn, self._country):
            if reader is not None:
                reader.close()


def annotate_answers(queries: Iterable[DNSQuery], geo: GeoIP | None) -> None:
    """Record on each A/AAAA answer the AS number and organisation the ASN database
    gives its address (0 and None when the database does not know it), as OONI
    records ``asn`` and ``as_org_name`` on answers: the evidence an analyst needs to
    re-judge a forged answer years later, when the database has changed.

    Without an ASN database nothing is recorded (``asn`` stays None: not looked up).
    """
    if geo is None or not geo.has_asn:
        return
    for q in queries:
        for a in q.answers:
            if a.answer_type not in ("A", "AAAA") or a.asn is not None:
                continue
            try:
                info = geo.lookup(a.value)
            except ValueError:
                continue  # not an address: nothing to place
            a.asn, a.as_org_name = info.asn, info.network_name
