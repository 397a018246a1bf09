"""The vantage point: who measures, from where.

The probe id is a random UUID made once and kept in the data directory; it says
nothing about the volunteer. The rest is discovered before each run
(:func:`discover`), each part from the first source that knows it:

- public ASN, country and network name: the config (``[vantage]``), then the
  collector's ``GET /api/v1/whoami`` (when the probe is enrolled or
  ``collector.url`` is set), then the offline MaxMind-format databases
  (``vantage.asn_db``/``country_db``) looked up with the public IP. The public IP is
  the address the collector saw, else a public address on a local interface;
- the resolver: the A answer for ``vantage.resolver_whoami`` asked through the
  system resolver is the address the resolver's queries come from; its ASN and
  name come from the ASN database;
- the network type: the config, else the kind of interface the default route
  leaves through (``/proc/net/route``, ``/sys/class/net``).

Discovery never fails a run: whatever cannot be found stays unknown (AS0, ``ZZ``,
``None``) and the reason is logged (logger ``vantage.discovery``) and kept in
:attr:`Discovered.notes`.

The public IP is only used for the lookup. It joins :attr:`Discovered.scrub`, so it
is removed from every stored string as this machine's own addresses are, and it is
stored (in ``vantage_points.public_ip``, never on the wire) only when
``privacy.store_ip = true``. A resolver whoami answer that is the probe's own
address (the probe or its router resolves recursively itself) is not kept as the
resolver's address either. Without a collector and without a public address on an
interface, the public IP is unknown and that case cannot be told.

>>> found = discover(cfg, "192.168.1.1")  # blocking: asyncio.to_thread(discover, ...)
>>> found.vantage.asn, found.vantage.network_type
(64500, 'wifi')
"""

from __future__ import annotations

import importlib
import ipaddress
import json
import logging
import os
import platform
import ssl
import sys
import types
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.exception
import dns.resolver
import httpx

from probe import __version__
from probe.config import Config
from probe.geoip import GeoIP, GeoIPError, NetworkInfo
from probe.privacy import OwnAddresses, local_addresses
from schema.model import VantagePoint

log = logging.getLogger("vantage.discovery")

PROBE_ID_FILE = "probe_id"
WHOAMI_PATH = "/api/v1/whoami"
#: Seconds for each of the lookups; discovery runs before every measurement run.
DNS_TIMEOUT = 2.0
DNS_LIFETIME = 4.0
HTTP_TIMEOUT = 10.0
WHOAMI_MAX_BYTES = 64 * 1024
NETWORK_NAME_MAX = 200
#: Interface name prefixes of mobile broadband modems (and USB tethering).
MOBILE_PREFIXES = ("wwan", "ppp", "usb", "rmnet")

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class DiscoveryError(Exception):
    """One source of the vantage point could not tell; the message says why."""


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
    try:
        tmp.write_text(value + "\n", "ascii")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written leftovers
        raise
    return value


def vantage_point(cfg: Config, resolver_ip: str | None) -> VantagePoint:
    """The vantage point from the configuration alone (no lookup)."""
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
    measurement (its public IP, once learnt). ``notes``: why a part is unknown."""

    vantage: VantagePoint
    scrub: frozenset[str] = frozenset()
    notes: tuple[str, ...] = ()
    #: False when this run could not learn the probe's public address (behind a NAT,
    #: the collector unreachable): its measurements are scrubbed again once it is.
    public_known: bool = True


@dataclass(frozen=True)
class Machine:
    """Where discovery reads this machine's state. Tests point it at a fake tree, a
    loopback DNS server's port, and addresses of their choosing."""

    proc: Path = Path("/proc")
    sys: Path = Path("/sys")
    dns_port: int = 53
    local_addresses: Callable[[], Iterable[str]] = local_addresses


# -- the collector's whoami ------------------------------------------------------


@dataclass(frozen=True)
class Whoami:
    """The collector's answer: the address it saw and what its database says of it."""

    ip: str | None
    info: NetworkInfo


def collector_url(cfg: Config) -> str:
    """The collector this probe talks to: its enrollment's, else ``collector.url``."""
    try:  # the outbox (issue 6) is optional here: without it, collector.url
        outbox = importlib.import_module("probe.outbox")
    except ImportError:
        return cfg.collector.url
    enrollment = getattr(outbox, "enrollment", None)
    if isinstance(enrollment, types.ModuleType):  # the submodule, not its function
        enrollment = getattr(enrollment, "enrollment", None)
    if not callable(enrollment):
        return cfg.collector.url
    try:
        found = enrollment(cfg)
    except Exception as exc:  # noqa: BLE001 - a damaged enrollment file must not stop a run
        log.warning("cannot read the collector enrollment: %s", exc)
        return cfg.collector.url
    url = getattr(found, "url", "") if found is not None else ""
    return url if isinstance(url, str) and url else cfg.collector.url


def collector_tls(ca_bundle: str) -> ssl.SSLContext:
    """The system's CAs, plus the collector's own CA when one is configured."""
    context = ssl.create_default_context()
    if ca_bundle:
        context.load_verify_locations(ca_bundle)
    return context


def collector_whoami(url: str, *, timeout: float = HTTP_TIMEOUT, ca_bundle: str = "") -> Whoami:
    """Ask the collector who we are (``GET /api/v1/whoami``, no credential).

    IPv4 is tried first: behind a NAT the IPv4 address the collector sees is not on
    any interface, so only this tells it (a public IPv6 address is on one already).
    Raises :class:`DiscoveryError`; a hostile answer gives unknown fields, never junk.
    """
    target = url.rstrip("/") + WHOAMI_PATH
    try:
        verify = collector_tls(ca_bundle)
    except (OSError, ssl.SSLError) as exc:
        raise DiscoveryError(f"collector.ca_bundle {ca_bundle}: {exc}") from exc
    last: Exception | None = None
    for local in ("0.0.0.0", None):  # IPv4 first, then whatever works
        transport = httpx.HTTPTransport(verify=verify, local_address=local)
        try:
            with httpx.Client(transport=transport, timeout=timeout) as client:
                with client.stream("GET", target, headers={"Accept": "application/json"}) as r:
                    if r.status_code != 200:
                        raise DiscoveryError(f"collector whoami {target}: HTTP {r.status_code}")
                    body = b""
                    for chunk in r.iter_bytes():
                        body += chunk
                        if len(body) > WHOAMI_MAX_BYTES:
                            raise DiscoveryError(f"collector whoami {target}: answer too large")
            return parse_whoami(body, f"collector whoami {target}")
        except httpx.ConnectError as exc:
            last = exc  # maybe no IPv4 route: try without choosing the family
        except httpx.HTTPError as exc:
            raise DiscoveryError(f"collector whoami {target}: {exc or type(exc).__name__}") from exc
    raise DiscoveryError(f"collector whoami {target}: {last or 'cannot connect'}")


def parse_whoami(body: bytes, where: str = "collector whoami") -> Whoami:
    """Read a whoami answer; fields that are absent or malformed are unknown."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise DiscoveryError(f"{where}: not JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise DiscoveryError(f"{where}: expected a JSON object")
    ip = doc.get("ip")
    address = _address(ip) if isinstance(ip, str) else None
    asn = doc.get("asn")
    if isinstance(asn, bool) or not isinstance(asn, int) or not 0 <= asn < 2**32:
        asn = 0
    cc = doc.get("cc")
    if not (isinstance(cc, str) and len(cc) == 2 and cc.isascii() and cc.isalpha()):
        cc = "ZZ"
    name = doc.get("network_name")
    return Whoami(
        ip=str(address) if address is not None else None,
        info=NetworkInfo(asn=asn, cc=cc.upper(), network_name=_name(name)),
    )


def _name(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    text = "".join(ch for ch in value if ch.isprintable()).strip()
    return text[:NETWORK_NAME_MAX] or None


def _address(text: str) -> _IPAddress | None:
    """The address, or None for non-addresses, loopback and unspecified."""
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if ip.is_loopback or ip.is_unspecified:
        return None
    return ip


# -- the resolver's whoami -------------------------------------------------------


def resolver_whoami(
    name: str, resolver: str, *, port: int = 53, timeout: float = DNS_TIMEOUT
) -> str:
    """The address the system resolver's queries come from: the A answer for a
    whoami name (``whoami.v4.powerdns.org`` answers with the asker's address).
    Raises :class:`DiscoveryError`."""
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = [resolver]
    r.port = port
    r.timeout = timeout
    r.lifetime = max(timeout, DNS_LIFETIME)
    r.cache = None
    try:
        answer = r.resolve(name, "A", search=False)
    except dns.exception.DNSException as exc:
        raise DiscoveryError(f"resolver whoami {name} via {resolver}: {exc}") from exc
    for rdata in answer:
        address = _address(str(rdata))
        if address is not None:
            return str(address)
    raise DiscoveryError(f"resolver whoami {name} via {resolver}: no usable address")


# -- the network type ------------------------------------------------------------

_RTF_UP = 0x1
_RTF_REJECT = 0x200


def default_route_interface(proc: Path = Path("/proc")) -> str | None:
    """The interface of the IPv4 default route with the lowest metric (else IPv6's)."""
    best: tuple[int, str] | None = None
    try:
        lines = (proc / "net" / "route").read_text().splitlines()[1:]
    except OSError:
        lines = []
    for line in lines:
        f = line.split()
        if len(f) < 8:
            continue
        try:
            dest, flags, metric, mask = int(f[1], 16), int(f[3], 16), int(f[6]), int(f[7], 16)
        except ValueError:
            continue
        if dest == 0 and mask == 0 and flags & _RTF_UP and not flags & _RTF_REJECT:
            if best is None or metric < best[0]:
                best = (metric, f[0])
    if best is not None:
        return best[1]
    try:
        lines = (proc / "net" / "ipv6_route").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        f = line.split()
        if len(f) < 10 or f[9] == "lo":
            continue
        try:
            dest, plen, metric, flags = int(f[0], 16), int(f[1], 16), int(f[5], 16), int(f[8], 16)
        except ValueError:
            continue
        if dest == 0 and plen == 0 and flags & _RTF_UP and not flags & _RTF_REJECT:
            if best is None or metric < best[0]:
                best = (metric, f[9])
    return best[1] if best is not None else None


def interface_type(name: str, sys_root: Path = Path("/sys")) -> str:
    """``wifi``, ``mobile`` or ``ethernet`` for a network interface."""
    iface = sys_root / "class" / "net" / name
    if (iface / "wireless").exists() or (iface / "phy80211").exists():
        return "wifi"
    if name.startswith(MOBILE_PREFIXES):
        return "mobile"
    try:
        if "DEVTYPE=wwan" in (iface / "uevent").read_text().split():
            return "mobile"
    except OSError:
        pass
    return "ethernet"


# -- putting it together ---------------------------------------------------------


@dataclass
class _Search:
    """What one discovery learns, and why parts stay unknown."""

    cfg: Config
    machine: Machine
    notes: list[str] = field(default_factory=list)
    _geoip: GeoIP | None = None
    _geoip_tried: bool = False
    _addresses: list[_IPAddress] | None = None

    def note(self, text: str, *, failure: bool = True) -> None:
        self.notes.append(text)
        (log.warning if failure else log.info)("vantage discovery: %s", text)

    def public_ranges(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        out = []
        for text in self.cfg.engine.public_ranges:
            try:
                out.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                continue  # the run itself reports it as a configuration error
        return out

    def is_public(self, ip: _IPAddress) -> bool:
        return ip.is_global or any(ip in net for net in self.public_ranges())

    def geoip(self) -> GeoIP | None:
        if not self._geoip_tried:
            self._geoip_tried = True
            v = self.cfg.vantage
            if not (v.asn_db or v.country_db):
                self.note("no offline IP database configured (vantage.asn_db)", failure=False)
                return None
            try:
                self._geoip = GeoIP(v.asn_db, v.country_db)
            except GeoIPError as exc:
                self.note(str(exc))
        return self._geoip

    def lookup(self, ip: str) -> NetworkInfo | None:
        geo = self.geoip()
        if geo is None:
            return None
        try:
            return geo.lookup(ip)
        except (ValueError, OSError) as exc:
            self.note(f"offline lookup of an address failed: {exc}")
            return None

    def close(self) -> None:
        if self._geoip is not None:
            self._geoip.close()

    def addresses(self) -> list[_IPAddress]:
        """This machine's interface addresses (read once)."""
        if self._addresses is None:
            try:
                found = [_address(a) for a in self.machine.local_addresses()]
            except OSError as exc:
                self.note(f"cannot read this machine's addresses: {exc}")
                found = []
            self._addresses = [ip for ip in found if ip is not None]
        return self._addresses

    def local_public_address(self) -> str | None:
        public = [ip for ip in self.addresses() if self.is_public(ip)]
        public.sort(key=lambda ip: (ip.version, str(ip)))  # IPv4 first: the NAT-able one
        return str(public[0]) if public else None


def _choose(cfg: Config, sources: list[NetworkInfo]) -> tuple[int, str, str | None]:
    """ASN, country and network name, each from the first source that knows it; the
    name is taken from a source that agrees with the chosen ASN."""
    v = cfg.vantage
    asn = v.asn or next((s.asn for s in sources if s.asn), 0)
    cc = v.cc if v.cc != "ZZ" else next((s.cc for s in sources if s.cc != "ZZ"), "ZZ")
    name: str | None = v.network_name or None
    if name is None:
        fitting = [s for s in sources if s.network_name and (s.asn == asn or not asn)]
        name = fitting[0].network_name if fitting else None
    return asn, cc, name


def discover(
    cfg: Config, system_resolver: str | None, *, machine: Machine | None = None
) -> Discovered:
    """Find the vantage point (blocking: call it in a worker thread from asyncio).

    ``system_resolver``: the address of the resolver the system uses (or None).
    Never raises for network errors: what cannot be found stays unknown, with a
    logged reason. The probe id is read (or made) in the data directory.
    """
    machine = machine or Machine()
    search = _Search(cfg, machine)
    v = cfg.vantage
    remembered = OwnAddresses(cfg.data_dir())
    try:
        # The public IP: the address the collector saw, else one on an interface.
        sources: list[NetworkInfo] = []
        # Every own address learnt before is scrubbed, whatever can be reached today.
        scrub: set[str] = remembered.addresses()
        public_ip: str | None = None
        origin = ""
        url = collector_url(cfg)
        if url:
            try:
                who = collector_whoami(
                    url, timeout=min(cfg.collector.timeout, HTTP_TIMEOUT),
                    ca_bundle=cfg.collector.ca_bundle,
                )  # fmt: skip
            except DiscoveryError as exc:
                search.note(str(exc))
            else:
                sources.append(who.info)
                seen = _address(who.ip) if who.ip else None
                if seen is not None:
                    scrub.add(str(seen))
                    if search.is_public(seen):
                        public_ip, origin = str(seen), "collector whoami"
                if seen is None:
                    search.note("the collector's whoami gave no address")
        else:
            search.note("no collector configured: no whoami", failure=False)
        if public_ip is None:
            public_ip, origin = search.local_public_address(), "interface address"
            if public_ip is None:
                search.note("public IP unknown (behind a NAT, and no collector told it)",
                            failure=bool(url))  # fmt: skip
        if public_ip is not None:
            scrub.add(public_ip)
            remembered.learn([public_ip], origin)
        # Known per address family: on a dual-stack line the interface's global IPv6
        # address says nothing of the NAT's public IPv4 one, which servers see and echo.
        # Only what this run learnt counts (an address remembered from another day may
        # have changed since).
        public = {ip for ip in search.addresses() if search.is_public(ip)}
        if public_ip is not None and (learnt := _address(public_ip)) is not None:
            public.add(learnt)
        known_families: set[int] = {ip.version for ip in public}
        # The families this machine speaks (IPv4 when its addresses cannot be read).
        behind: set[int] = {ip.version for ip in search.addresses() if not ip.is_link_local}
        unknown_families = (behind or {4}) - known_families
        asn, cc, name = _choose(cfg, sources)
        if public_ip is not None and (asn == 0 or cc == "ZZ" or name is None):
            found = search.lookup(public_ip)
            if found is not None:
                sources.append(found)
                asn, cc, name = _choose(cfg, sources)
        if asn == 0:
            search.note("public ASN unknown")
        if cc == "ZZ":
            search.note("country unknown")

        resolver_ip, resolver_info = _resolver(search, system_resolver, scrub, known_families)
        network_type = v.network_type or _network_type(search)
        vp = vantage_point(cfg, None)
        vantage = VantagePoint(
            probe_id=vp.probe_id,
            software_version=vp.software_version,
            platform=vp.platform,
            architecture=vp.architecture,
            asn=asn,
            cc=cc,
            network_name=name,
            network_type=network_type,
            resolver_ip=resolver_ip,
            resolver_asn=resolver_info.asn,
            resolver_network_name=resolver_info.network_name,
            public_ip=public_ip if cfg.privacy.store_ip else None,
        )
        return Discovered(vantage, frozenset(scrub), tuple(search.notes), not unknown_families)
    finally:
        search.close()


def _resolver(
    search: _Search, system_resolver: str | None, own: set[str], known_families: set[int]
) -> tuple[str | None, NetworkInfo]:
    """The resolver's egress address and what the ASN database says of it.

    While the probe's public address of the resolver address's family is unknown, an
    address learnt from the resolver whoami cannot be told from the probe's own (a home
    router that resolves recursively queries from the public address): it is not kept,
    its ASN is. An interface's global IPv6 address says nothing of the NAT's IPv4 one."""
    name = search.cfg.vantage.resolver_whoami
    address: str | None = None
    if not name:
        search.note("resolver lookup turned off (vantage.resolver_whoami)", failure=False)
    elif system_resolver is None:
        search.note("no system resolver to ask for the resolver's address", failure=False)
    else:
        try:
            address = resolver_whoami(name, system_resolver, port=search.machine.dns_port)
        except DiscoveryError as exc:
            search.note(str(exc))
        seen = _address(address) if address is not None else None
        if seen is not None and seen.version not in known_families and address not in own:
            info = search.lookup(str(seen)) or NetworkInfo()
            search.note("the resolver's address is not kept: the probe's public address is "
                        "unknown, and the resolver's may be it", failure=False)  # fmt: skip
            return None, info
    if address is None and system_resolver is not None:
        # A public resolver set directly (8.8.8.8) is itself the resolver seen outside;
        # a stub or a router on the LAN says nothing about it.
        direct = _address(system_resolver)
        if direct is not None and search.is_public(direct):
            address = str(direct)
    if address is None:
        return None, NetworkInfo()
    info = search.lookup(address) or NetworkInfo()
    if address in own or address in {str(ip) for ip in search.addresses()}:
        # The probe (or its router, behind the same NAT) resolves recursively: the
        # resolver's address is the probe's own and is not kept.
        search.note("the resolver's address is the probe's own: not kept", failure=False)
        own.add(address)
        return None, info
    return address, info


def _network_type(search: _Search) -> str | None:
    iface = default_route_interface(search.machine.proc)
    if iface is None:
        search.note("network type unknown: no default route")
        return None
    return interface_type(iface, search.machine.sys)


__all__ = [
    "Discovered",
    "DiscoveryError",
    "Machine",
    "Whoami",
    "collector_url",
    "collector_whoami",
    "default_route_interface",
    "discover",
    "interface_type",
    "parse_whoami",
    "probe_id",
    "resolver_whoami",
    "vantage_point",
]
