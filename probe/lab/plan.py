"""From a scenario and the catalog to a concrete lab: addresses, DNS zone, sites,
certificates and the lab's copy of the catalog. Pure planning; no I/O here except
what :func:`write_certificates` writes."""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from probe.catalog import builtin_services
from probe.engine.dns import is_ip
from probe.engine.measure import target_ports, uses_tls
from probe.lab import addresses as A
from probe.lab.scenario import SCENARIO_SERVICE, Scenario
from probe.tomltable import to_toml
from schema.model import Service
from schema.wire import target_to_wire

#: Seconds the lab's DNS servers take to answer: a resolver's recursion time. It also
#: lets an on-path injector's forged answer arrive first, as it does in the wild.
LAB_DNS_DELAY = 0.15


@dataclass
class SitePlan:
    address: str
    names: list[str]
    tls_ports: set[int] = field(default_factory=set)
    http_ports: set[int] = field(default_factory=set)
    tcp_ports: set[int] = field(default_factory=set)
    tls: str = "valid"
    behaviour: str = "page"
    redirects: int = 0
    size: int = 0


@dataclass
class LabPlan:
    services: list[Service]
    sites: dict[str, SitePlan]  # by address
    zone: dict[str, list[str]]  # name -> A addresses
    remapped: dict[str, str]  # public fixed address -> lab address
    names: dict[str, str]  # catalog/scenario name -> lab address

    def address_of(self, name_or_address: str) -> str | None:
        key = name_or_address.lower().rstrip(".")
        return self.names.get(key) or self.remapped.get(key) or (key if is_ip(key) else None)


def _remap_url(url: str, remapped: dict[str, str]) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host in remapped:
        netloc = remapped[host] + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def make_plan(scenario: Scenario) -> LabPlan:
    services = [
        s for s in builtin_services() if scenario.services is None or s.name in scenario.services
    ]
    if scenario.targets:
        services.append(
            Service(name=SCENARIO_SERVICE, title="Scenario targets", targets=scenario.targets)
        )
    names: dict[str, str] = {}
    remapped: dict[str, str] = {}
    sites: dict[str, SitePlan] = {}
    counters = {"catalog": 0, "fixed": 0, "site": 0}

    def site_for_name(name: str, pool: str = "catalog") -> SitePlan:
        name = name.lower()
        if name not in names:
            counters[pool] += 1
            names[name] = A.pool_address(pool, counters[pool])
        address = names[name]
        return sites.setdefault(address, SitePlan(address, [name]))

    def site_for_ip(ip: str) -> SitePlan:
        if ipaddress.ip_address(ip) in A.LAB_RANGE:  # already a lab address (a scenario's own)
            return sites.setdefault(ip, SitePlan(ip, []))
        if ip not in remapped:
            counters["fixed"] += 1
            remapped[ip] = A.pool_address("fixed", counters["fixed"])
        address = remapped[ip]
        return sites.setdefault(address, SitePlan(address, []))

    for site in scenario.sites:  # scenario sites first: they set behaviour and TLS
        plan = site_for_name(site.name, "site")
        plan.http_ports.add(80)  # a web property answers on the usual ports
        if site.tls != "none":
            plan.tls_ports.add(443)
        plan.tls, plan.behaviour = site.tls, site.behaviour
        plan.redirects, plan.size = site.redirects, site.size
    lab_services = []
    for service in services:
        lab_targets = []
        for t in service.targets:
            hosts = [] if is_ip(t.host) else [t.host]
            plans = [site_for_name(h) for h in hosts]
            plans += [
                site_for_ip(ip) for ip in (*t.addresses, *([t.host] if is_ip(t.host) else []))
            ]
            for plan in plans:
                for port in target_ports(t) if t.kind != "dns" else ():
                    if uses_tls(t) or (t.kind == "tcp" and port == 443):
                        plan.tls_ports.add(port)
                    elif t.kind == "http":
                        plan.http_ports.add(port)
                    else:
                        plan.tcp_ports.add(port)
            new = dataclasses.replace(
                t,
                host=remapped.get(t.host, t.host),
                addresses=tuple(remapped.get(a, a) for a in t.addresses),
                url=_remap_url(t.url, remapped) if t.url else None,
            )
            lab_targets.append(new)
        lab_services.append(dataclasses.replace(service, targets=tuple(lab_targets)))
    existing = {s.name for s in scenario.sites if not s.exists}
    zone = {name: [address] for name, address in names.items() if name not in existing}
    return LabPlan(lab_services, sites, zone, remapped, names)


#: The lab's networks (documentation ASNs, RFC 5398, and private-use ones, RFC 6996)
#: for what is not a catalog service: the ISP that censors, the public resolver, and
#: one network per scenario site or forged address (each an unrelated company).
ISP_ASN = (64496, "Lab ISP (the censor's own network)")
RESOLVER_ASN = (64497, "Lab public resolver")
CONTROL_ASN = (64498, "Lab control helper")
SITE_ASN_BASE = 4_200_000_000
#: Catalog services that name no network of their own get one of these.
SERVICE_ASN_BASE = 4_200_100_000


def asn_networks(plan: LabPlan, scenario: Scenario) -> dict[str, tuple[int, str]]:
    """What the lab's ASN database says of each lab address (pure).

    Each catalog host and fixed address stands for its service and gets the service's
    real network from the catalog (``expect.asns``, the first one); a service that names
    none gets a network of its own. Scenario sites and the addresses a rule forges get
    unrelated networks, one each; the blockpage server is the ISP's. So the probe's
    ASN checks run in the lab as they would outside, with nothing lab-specific in them.
    """
    service_of: dict[str, tuple[int, str]] = {}
    own = 0
    for service in plan.services:
        if service.name == SCENARIO_SERVICE:
            continue
        asns = next((t.expect.asns for t in service.targets if t.expect.asns), ())
        if asns:
            network = (asns[0], f"{service.title} (as the catalog says)")
        else:
            own += 1
            network = (SERVICE_ASN_BASE + own, f"{service.title} (lab network)")
        for t in service.targets:
            service_of[t.host.lower()] = network
            for a in t.addresses:
                service_of[a] = network
    out: dict[str, tuple[int, str]] = {
        A.BLOCKPAGE: ISP_ASN,
        A.ROUTER_WAN: ISP_ASN,
        A.PUBLIC_RESOLVER: RESOLVER_ASN,
        A.AUTHORITATIVE: RESOLVER_ASN,
        A.CONTROL_HELPER: CONTROL_ASN,
    }
    sites = 0
    for name, address in sorted(plan.names.items(), key=lambda kv: ipaddress.ip_address(kv[1])):
        if name in service_of:
            out[address] = service_of[name]
        elif address not in out:
            sites += 1
            out[address] = (SITE_ASN_BASE + sites, f"Lab site {name}")
    for address in plan.remapped.values():  # the lab's copy of the catalog names them
        if address in service_of:
            out[address] = service_of[address]
    for rule in scenario.rules:
        for address in rule.addresses:
            ip = ipaddress.ip_address(address)
            if ip.is_private and ip not in A.LAB_RANGE:
                continue  # a bogon: no network announces it
            if address not in out:
                sites += 1
                out[address] = (SITE_ASN_BASE + sites, f"Lab unrelated server {address}")
    return out


def write_asn_database(networks: dict[str, tuple[int, str]], path: Path) -> Path:
    """The lab's ASN database (DB-IP lite's format) with one /32 per address."""
    try:
        from mmdb_writer import MMDBWriter
        from netaddr import IPSet
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("the lab needs mmdb-writer: pip install 'vantage-probe[lab]'") from exc
    writer = MMDBWriter(ip_version=6, database_type="DBIP-ASN-Lite", ipv4_compatible=True)
    for address, (asn, org) in sorted(networks.items()):
        writer.insert_network(
            IPSet([f"{address}/32"]),
            {"autonomous_system_number": asn, "autonomous_system_organization": org},
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    writer.to_db_file(str(path))
    return path


def catalog_toml(service: Service) -> str:
    """The lab's copy of one service, in the catalog format a user writes."""
    targets = []
    for t in service.targets:
        doc = target_to_wire(t)
        item: dict[str, Any] = {"id": t.id, "kind": t.kind, "host": t.host}
        for key in ("url", "sni", "body"):
            if doc[key] is not None:
                item[key] = doc[key]
        if t.method != "GET":
            item["method"] = t.method
        if t.ports:
            item["ports"] = list(t.ports)
        if t.addresses:
            item["addresses"] = list(t.addresses)
        if t.control:
            item["control"] = True
        if t.role != "essential":
            item["role"] = t.role
        item["expect"] = dict(doc["expect"])
        if doc["source"] is not None:
            item["source"] = dict(doc["source"])
        targets.append(item)
    return to_toml({"format": 1, "service": {"name": service.name, "title": service.title},
                     "target": targets})  # fmt: skip


def write_certificates(plan: LabPlan, folder: Path) -> tuple[Path, dict[str, tuple[Path, Path]]]:
    """A lab CA (trusted by the probe) and one certificate per TLS site.

    Returns the CA's PEM path and, per site address, (certificate chain, key) paths.
    ``tls`` picks the kind: valid, expired, for the wrong name, or from an unknown CA.
    """
    import datetime as dt

    try:
        import trustme
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("the lab needs trustme: pip install 'vantage-probe[lab]'") from exc
    ca, unknown = (
        trustme.CA(organization_name="Vantage lab CA"),
        trustme.CA(organization_name="Rogue CA"),
    )
    folder.mkdir(parents=True, exist_ok=True)
    ca_path = folder / "lab-ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    out: dict[str, tuple[Path, Path]] = {}
    now = dt.datetime.now(dt.UTC)
    for address, site in list(plan.sites.items()) + [(A.PUBLIC_RESOLVER, None)]:
        if site is not None and (not site.tls_ports or site.tls == "none"):
            continue
        names = site.names if site is not None else []
        identities = names or [address]
        if site is not None and site.tls == "wrong-name":
            leaf = ca.issue_cert("wrong-name.lab.invalid")
        elif site is not None and site.tls == "unknown-ca":
            leaf = unknown.issue_cert(*identities)
        elif site is not None and site.tls == "expired":
            leaf = ca.issue_cert(*identities, not_before=now - dt.timedelta(days=60),
                                 not_after=now - dt.timedelta(days=1))  # fmt: skip
        else:
            leaf = (
                ca.issue_cert(*identities, address) if site is None else ca.issue_cert(*identities)
            )
        cert, key = folder / f"{address}.pem", folder / f"{address}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        out[address] = (cert, key)
    return ca_path, out


def internet_config(
    plan: LabPlan, certs: dict[str, tuple[Path, Path]], ready: Path
) -> dict[str, Any]:
    sites = []
    for address, s in sorted(plan.sites.items(), key=lambda kv: ipaddress.ip_address(kv[0])):
        site: dict[str, Any] = {
            "address": address, "names": s.names, "tls_ports": sorted(s.tls_ports),
            "http_ports": sorted(s.http_ports), "tcp_ports": sorted(s.tcp_ports),
            "behaviour": s.behaviour, "redirects": s.redirects, "size": s.size,
        }  # fmt: skip
        if address in certs:
            site["cert"], site["key"] = (str(p) for p in certs[address])
        elif s.tls == "none" and s.tls_ports:  # TLS asked of a site that has none: plain TCP
            site["tcp_ports"] = sorted(s.tcp_ports | s.tls_ports)
            site["tls_ports"] = []
        sites.append(site)
    doh_cert, doh_key = certs[A.PUBLIC_RESOLVER]
    return {
        "zone": {name: {"a": addrs, "aaaa": [], "ttl": 300} for name, addrs in plan.zone.items()},
        "dns_listen": [A.AUTHORITATIVE, A.PUBLIC_RESOLVER],
        "dns_delay": LAB_DNS_DELAY,
        "doh": {"address": A.PUBLIC_RESOLVER, "cert": str(doh_cert), "key": str(doh_key)},
        "blockpage": {"address": A.BLOCKPAGE},
        "probe_address": A.PROBE,
        "sites": sites,
        "ready_file": str(ready),
    }


def site_addresses(plan: LabPlan) -> list[str]:
    return sorted(plan.sites, key=ipaddress.ip_address)


__all__ = ["LabPlan", "SitePlan", "asn_networks", "catalog_toml", "internet_config", "make_plan",
           "site_addresses", "write_asn_database", "write_certificates"]  # fmt: skip
