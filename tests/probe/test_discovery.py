"""Vantage point discovery: offline databases, the resolver's whoami through a loopback
DNS server, the collector's whoami from a loopback HTTP server, config precedence, the
network type from a fake /proc and /sys, and what happens to the public IP."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from probe.config import Config, load_config
from probe.privacy import SCRUBBED, scrub
from probe.store import Store, sqlite_url
from probe.vantage import (
    Machine,
    default_route_interface,
    discover,
    interface_type,
    parse_whoami,
)
from schema import tables, wire
from schema.model import HTTPTransaction, Measurement, Target
from tests.fixtures.mmdb import write_asn_db, write_country_db

PUBLIC = "198.51.100.7"  # the probe's "public" address (documentation range)
RESOLVER = "203.0.113.53"  # the resolver's egress address
RANGES = "198.51.100.0/24,203.0.113.0/24"  # treated as public in these tests


@pytest.fixture(scope="module")
def mmdb(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("mmdb")
    asn = write_asn_db(d / "asn.mmdb", {"198.51.100.0/24": (64500, "Example Net"),
                                        "203.0.113.0/24": (64511, "Resolver Net")})  # fmt: skip
    country = write_country_db(d / "country.mmdb", {"198.51.100.0/24": "NL",
                                                    "203.0.113.0/24": "DE"})  # fmt: skip
    return str(asn), str(country)


def make_cfg(tmp_path: Path, **settings: Any) -> Config:
    """A config from an empty file plus ``section.key`` settings (as flags would)."""
    path = tmp_path / "vantage.toml"
    path.write_text("")
    overrides = {"probe.data_dir": str(tmp_path / "data"), "vantage.resolver_whoami": "",
                 "engine.public_ranges": RANGES}  # fmt: skip
    overrides.update({k.replace("__", "."): str(v) for k, v in settings.items()})
    return load_config(path, env={}, overrides=overrides)


def machine(tmp_path: Path, addresses: tuple[str, ...] = (), **kw: Any) -> Machine:
    """A machine with no default route (unless given) and these interface addresses."""
    kw.setdefault("proc", tmp_path / "proc")
    kw.setdefault("sys", tmp_path / "sys")
    return Machine(local_addresses=lambda: list(addresses), **kw)


class WhoamiServer:
    """A collector's whoami on 127.0.0.1: answers ``status`` with ``body``."""

    def __init__(self) -> None:
        self.status = 200
        self.body: bytes = b"{}"
        self.hits: list[str] = []
        this = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                this.hits.append(self.path)
                self.send_response(this.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(this.body)))
                self.end_headers()
                self.wfile.write(this.body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def answer(self, doc: Any, status: int = 200) -> None:
        self.body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        self.status = status

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def collector() -> Iterator[WhoamiServer]:
    server = WhoamiServer()
    yield server
    server.close()


# -- public ASN, country, network name -----------------------------------------------


def test_offline_databases_with_a_public_address_on_an_interface(tmp_path, mmdb) -> None:
    cfg = make_cfg(tmp_path, vantage__asn_db=mmdb[0], vantage__country_db=mmdb[1])
    found = discover(cfg, None, machine=machine(tmp_path, ("192.168.1.5", "fe80::1", PUBLIC)))
    v = found.vantage
    assert (v.asn, v.cc, v.network_name) == (64500, "NL", "Example Net")
    assert PUBLIC in found.scrub
    assert v.public_ip is None  # looked up, not stored
    assert (tmp_path / "data" / "probe_id").is_file() and v.probe_id


def test_private_addresses_alone_give_no_lookup(tmp_path, mmdb, caplog) -> None:
    cfg = make_cfg(tmp_path, vantage__asn_db=mmdb[0], vantage__country_db=mmdb[1])
    with caplog.at_level(logging.INFO, logger="vantage.discovery"):
        found = discover(cfg, None, machine=machine(tmp_path, ("192.168.1.5", "100.64.0.9")))
    assert (found.vantage.asn, found.vantage.cc, found.vantage.network_name) == (0, "ZZ", None)
    assert found.scrub == frozenset()
    assert any("public IP unknown" in n for n in found.notes)
    assert "public ASN unknown" in caplog.text


def test_collector_whoami_gives_network_and_public_ip(tmp_path, collector, mmdb) -> None:
    collector.answer({"ip": PUBLIC, "asn": 64496, "cc": "se", "network_name": "Collector Says"})
    cfg = make_cfg(tmp_path, collector__url=collector.url, vantage__asn_db=mmdb[0])
    found = discover(cfg, None, machine=machine(tmp_path, ("10.0.0.2",)))
    v = found.vantage
    assert collector.hits == ["/api/v1/whoami"]
    assert (v.asn, v.cc, v.network_name) == (64496, "SE", "Collector Says")
    assert found.scrub == {PUBLIC}  # learnt only from the collector: behind a NAT
    assert v.public_ip is None


def test_collector_that_does_not_know_leads_to_the_offline_lookup(tmp_path, collector, mmdb):
    collector.answer({"ip": PUBLIC, "asn": 0, "cc": "ZZ", "network_name": None})
    cfg = make_cfg(tmp_path, collector__url=collector.url, vantage__asn_db=mmdb[0],
                   vantage__country_db=mmdb[1])  # fmt: skip
    found = discover(cfg, None, machine=machine(tmp_path))
    assert (found.vantage.asn, found.vantage.cc, found.vantage.network_name) == (
        64500, "NL", "Example Net")  # fmt: skip


def test_config_wins_over_every_lookup(tmp_path, collector, mmdb) -> None:
    collector.answer({"ip": PUBLIC, "asn": 64496, "cc": "SE", "network_name": "Collector Says"})
    cfg = make_cfg(tmp_path, collector__url=collector.url, vantage__asn_db=mmdb[0],
                   vantage__country_db=mmdb[1], vantage__asn=65000, vantage__cc="FR",
                   vantage__network_name="Configured", vantage__network_type="mobile")  # fmt: skip
    found = discover(cfg, None, machine=machine(tmp_path, (PUBLIC,)))
    v = found.vantage
    assert (v.asn, v.cc, v.network_name, v.network_type) == (65000, "FR", "Configured", "mobile")
    assert PUBLIC in found.scrub  # the collector was still asked: its answer is scrubbed


def test_partial_config_takes_the_rest_from_the_lookup(tmp_path, collector) -> None:
    collector.answer({"ip": PUBLIC, "asn": 64496, "cc": "SE", "network_name": "Collector Says"})
    cfg = make_cfg(tmp_path, collector__url=collector.url, vantage__asn=65000)
    v = discover(cfg, None, machine=machine(tmp_path)).vantage
    # The country comes from the collector; its network name is that of another AS.
    assert (v.asn, v.cc, v.network_name) == (65000, "SE", None)


def test_enrollment_url_is_used_for_whoami(tmp_path, collector) -> None:
    outbox = pytest.importorskip("probe.outbox", reason="the outbox (helper C) is not built yet")
    if not callable(getattr(outbox, "enrollment", None)):
        pytest.skip("probe.outbox.enrollment is not there yet")
    collector.answer({"ip": PUBLIC, "asn": 64496, "cc": "SE", "network_name": "N"})
    cfg = make_cfg(tmp_path)  # no collector.url: only the enrollment knows it
    data = cfg.data_dir()
    data.mkdir(parents=True)
    from probe.vantage import probe_id

    doc = {"url": collector.url, "probe_id": probe_id(data), "credential": "secret",
           "enrolled_at": dt.datetime.now(dt.UTC).isoformat()}  # fmt: skip
    (data / "collector.json").write_text(json.dumps(doc))
    (data / "collector.json").chmod(0o600)
    found = discover(cfg, None, machine=machine(tmp_path))
    assert collector.hits == ["/api/v1/whoami"]
    assert found.vantage.asn == 64496


@pytest.mark.parametrize(
    "status,body",
    [
        (200, b"not json"),
        (200, b"[1, 2]"),
        (500, b'{"error": "down"}'),
        (200, b'{"ip": "' + b"9" * 70_000 + b'"}'),  # larger than an answer may be
    ],
    ids=["not-json", "not-an-object", "http-500", "too-large"],
)
def test_hostile_or_failing_collector_degrades_to_unknown(tmp_path, collector, status, body):
    collector.answer(body, status)
    cfg = make_cfg(tmp_path, collector__url=collector.url)
    found = discover(cfg, None, machine=machine(tmp_path))
    assert (found.vantage.asn, found.vantage.cc) == (0, "ZZ")
    assert any("collector whoami" in n for n in found.notes)
    assert found.scrub == frozenset()


def test_malformed_whoami_fields_are_unknown_not_junk() -> None:
    who = parse_whoami(json.dumps({"ip": "not-an-ip", "asn": "64500", "cc": "123",
                                   "network_name": "Bad\x00\x1b[31mNet" + "x" * 500}).encode())  # fmt: skip
    assert who.ip is None and who.info.asn == 0 and who.info.cc == "ZZ"
    assert who.info.network_name is not None
    assert who.info.network_name.startswith("Bad[31mNet") and len(who.info.network_name) == 200
    assert parse_whoami(b'{"ip": "127.0.0.1", "asn": true}').ip is None
    assert parse_whoami(b'{"asn": true}').info.asn == 0


def test_unreachable_collector_degrades_with_a_logged_reason(tmp_path, caplog) -> None:
    from tests.fixtures.tcpserver import closed_port

    cfg = make_cfg(tmp_path, collector__url=f"http://127.0.0.1:{closed_port()}")
    with caplog.at_level(logging.WARNING, logger="vantage.discovery"):
        found = discover(cfg, None, machine=machine(tmp_path))
    assert (found.vantage.asn, found.vantage.cc) == (0, "ZZ")
    assert "collector whoami" in caplog.text


def test_missing_database_file_degrades(tmp_path) -> None:
    cfg = make_cfg(tmp_path, vantage__asn_db=str(tmp_path / "absent.mmdb"))
    found = discover(cfg, None, machine=machine(tmp_path, (PUBLIC,)))
    assert found.vantage.asn == 0
    assert any("absent.mmdb" in n and "no such file" in n for n in found.notes)


# -- the resolver ---------------------------------------------------------------------


def test_resolver_whoami_through_the_system_resolver(tmp_path, dns_server, mmdb) -> None:
    dns_server.set("whoami.test", a=[RESOLVER])
    cfg = make_cfg(tmp_path, vantage__resolver_whoami="whoami.test", vantage__asn_db=mmdb[0])
    found = discover(cfg, dns_server.host,
                     machine=machine(tmp_path, (PUBLIC,), dns_port=dns_server.port))  # fmt: skip
    v = found.vantage
    assert ("whoami.test", "A", "udp") in dns_server.queries
    assert (v.resolver_ip, v.resolver_asn, v.resolver_network_name) == (
        RESOLVER, 64511, "Resolver Net")  # fmt: skip


def test_resolver_address_is_not_kept_while_the_public_address_is_unknown(
    tmp_path, dns_server, mmdb
) -> None:
    # Behind a NAT with no collector to say the public address, a router that resolves
    # recursively answers whoami with it: the address cannot be told apart, so it goes.
    dns_server.set("whoami.test", a=[RESOLVER])
    cfg = make_cfg(tmp_path, vantage__resolver_whoami="whoami.test", vantage__asn_db=mmdb[0])
    found = discover(cfg, dns_server.host, machine=machine(tmp_path, dns_port=dns_server.port))
    v = found.vantage
    assert (v.resolver_ip, v.resolver_asn, v.resolver_network_name) == (
        None, 64511, "Resolver Net")  # fmt: skip
    assert not found.public_known
    assert any("resolver's address is not kept" in n for n in found.notes)


def test_an_address_learnt_once_is_scrubbed_when_nothing_can_tell_it(
    tmp_path, dns_server, collector
) -> None:
    collector.answer({"ip": PUBLIC, "asn": 64496, "cc": "SE"})
    cfg = make_cfg(tmp_path, collector__url=collector.url)
    assert PUBLIC in discover(cfg, None, machine=machine(tmp_path)).scrub
    # The collector is blocked now: the address is still known, from the data directory.
    blocked = make_cfg(tmp_path, collector__url="http://127.0.0.1:9")
    found = discover(blocked, None, machine=machine(tmp_path))
    assert PUBLIC in found.scrub and not found.public_known


def test_resolver_lookup_failure_degrades(tmp_path, dns_server) -> None:
    cfg = make_cfg(tmp_path, vantage__resolver_whoami="nxdomain.test")  # not in the zone
    found = discover(cfg, dns_server.host, machine=machine(tmp_path, dns_port=dns_server.port))
    assert (found.vantage.resolver_ip, found.vantage.resolver_asn) == (None, 0)
    assert any("nxdomain.test" in n for n in found.notes)


def test_resolver_lookup_turned_off_sends_nothing(tmp_path, dns_server) -> None:
    cfg = make_cfg(tmp_path)  # resolver_whoami = ""
    found = discover(cfg, dns_server.host, machine=machine(tmp_path, dns_port=dns_server.port))
    assert dns_server.queries == []
    assert found.vantage.resolver_ip is None


def test_resolver_that_is_the_probe_itself_is_not_kept(tmp_path, dns_server, collector) -> None:
    # A probe (or its router) that resolves recursively: the whoami answer is its own IP.
    dns_server.set("whoami.test", a=[PUBLIC])
    collector.answer({"ip": PUBLIC, "asn": 64496, "cc": "SE"})
    cfg = make_cfg(tmp_path, vantage__resolver_whoami="whoami.test", collector__url=collector.url)
    found = discover(cfg, dns_server.host, machine=machine(tmp_path, dns_port=dns_server.port))
    assert found.vantage.resolver_ip is None
    assert PUBLIC in found.scrub


# -- the network type -----------------------------------------------------------------

ROUTE_HEADER = (
    "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
)


def fake_tree(tmp_path: Path, routes: list[tuple[str, str, int, str]], ifaces: dict[str, str]):
    """``routes``: (iface, destination hex, metric, mask hex); ``ifaces``: name -> marker
    file or directory under /sys/class/net/NAME ("" for none)."""
    proc, sys = tmp_path / "proc", tmp_path / "sys"
    (proc / "net").mkdir(parents=True)
    lines = [f"{i}\t{d}\t0101A8C0\t0003\t0\t0\t{m}\t{mask}\t0\t0\t0\n" for i, d, m, mask in routes]
    (proc / "net" / "route").write_text(ROUTE_HEADER + "".join(lines))
    for name, marker in ifaces.items():
        base = sys / "class" / "net" / name
        base.mkdir(parents=True)
        if marker == "wireless":
            (base / "wireless").mkdir()
        elif marker == "phy80211":
            (base / "phy80211").symlink_to(tmp_path)
        elif marker:
            (base / "uevent").write_text(marker)
    return proc, sys


@pytest.mark.parametrize(
    "ifaces,expected",
    [
        ({"eth0": "", "wlan0": "wireless"}, "wifi"),
        ({"eth0": "", "wlan0": "phy80211"}, "wifi"),
        ({"eth0": "", "wlan0": ""}, "ethernet"),  # a name alone does not make it wireless
        ({"eth0": "", "wwan0": ""}, "mobile"),
        ({"eth0": "", "ppp0": ""}, "mobile"),
        ({"eth0": "", "cdc0": "DEVTYPE=wwan\n"}, "mobile"),
    ],
)
def test_network_type_from_the_default_route(tmp_path, ifaces, expected) -> None:
    second = next(n for n in ifaces if n != "eth0")
    routes = [("eth0", "0000A8C0", 0, "00FFFFFF"),  # a LAN route, not the default
              ("eth0", "00000000", 600, "00000000"),  # default with a worse metric
              (second, "00000000", 100, "00000000")]  # fmt: skip
    proc, sys = fake_tree(tmp_path, routes, ifaces)
    assert default_route_interface(proc) == second
    cfg = make_cfg(tmp_path)
    found = discover(cfg, None, machine=machine(tmp_path, proc=proc, sys=sys))
    assert found.vantage.network_type == expected


def test_ipv6_only_default_route(tmp_path) -> None:
    proc, sys = fake_tree(tmp_path, [], {"wlan0": "wireless"})
    zero = "0" * 32
    (proc / "net" / "ipv6_route").write_text(
        f"{zero} 00 {zero} 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     lo\n"
        f"{zero} 00 {zero} 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003  wlan0\n"
        f"20010db8000000000000000000000000 40 {zero} 00 {zero} 00000100 00000001 00000000 00000001  eth9\n"
    )
    assert default_route_interface(proc) == "wlan0"
    assert interface_type("wlan0", sys) == "wifi"


def test_no_default_route_leaves_the_type_unknown(tmp_path) -> None:
    proc, sys = fake_tree(tmp_path, [("eth0", "0000A8C0", 0, "00FFFFFF")], {"eth0": ""})
    found = discover(make_cfg(tmp_path), None, machine=machine(tmp_path, proc=proc, sys=sys))
    assert found.vantage.network_type is None
    assert any("no default route" in n for n in found.notes)


def test_config_network_type_wins(tmp_path) -> None:
    proc, sys = fake_tree(tmp_path, [("wlan0", "00000000", 0, "00000000")], {"wlan0": "wireless"})
    cfg = make_cfg(tmp_path, vantage__network_type="ethernet")
    found = discover(cfg, None, machine=machine(tmp_path, proc=proc, sys=sys))
    assert found.vantage.network_type == "ethernet"


def test_everything_failing_gives_an_unknown_vantage_point(tmp_path, dns_server) -> None:
    from tests.fixtures.tcpserver import closed_port

    dns_server.set("whoami.test", rcode="SERVFAIL")
    cfg = make_cfg(tmp_path, collector__url=f"http://127.0.0.1:{closed_port()}",
                   vantage__asn_db=str(tmp_path / "nope.mmdb"),
                   vantage__resolver_whoami="whoami.test")  # fmt: skip
    m = machine(tmp_path, ("not an address", "::1"), dns_port=dns_server.port,
                proc=tmp_path / "missing", sys=tmp_path / "missing")  # fmt: skip
    v = discover(cfg, dns_server.host, machine=m).vantage
    assert (v.asn, v.cc, v.network_name, v.network_type, v.resolver_ip) == (0, "ZZ", None, None,
                                                                           None)  # fmt: skip


# -- the public IP: scrubbed, and stored only on request ------------------------------


def _measurement_echoing(vantage, address: str) -> Measurement:
    target = Target(id="t", service="s", kind="http", host="example.test",
                    url="http://example.test/")  # fmt: skip
    tx = HTTPTransaction(url="http://example.test/", method="GET", t0=0.0, t=0.1, status=200,
                         body=f"Your IP address is {address}".encode())  # fmt: skip
    return Measurement(measurement_uid="00000000-0000-4000-8000-0000000000aa", run_id="r1",
                       target=target, vantage=vantage, start_time=dt.datetime.now(dt.UTC),
                       test_runtime=0.1, requests=[tx])  # fmt: skip


def _stored_public_ips(url: str) -> list[str | None]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.select(tables.vantage_points.c.public_ip)).scalars())
    finally:
        engine.dispose()


@pytest.mark.parametrize("store_ip", [False, True])
def test_public_ip_is_scrubbed_and_stored_only_on_request(tmp_path, collector, store_ip) -> None:
    collector.answer({"ip": PUBLIC, "asn": 64496, "cc": "SE", "network_name": "N"})
    cfg = make_cfg(tmp_path, collector__url=collector.url, privacy__store_ip=str(store_ip).lower())
    found = discover(cfg, None, machine=machine(tmp_path))
    assert found.vantage.public_ip == (PUBLIC if store_ip else None)
    m = scrub(_measurement_echoing(found.vantage, PUBLIC), found.scrub)
    assert PUBLIC not in m.requests[0].body.decode() and SCRUBBED in m.requests[0].body.decode()
    url = sqlite_url(tmp_path / "v.db")
    store = Store.open(url)
    try:
        store.begin_run("r1", "s", m.vantage, m.start_time)
        store.write_measurements([m])
        back = store.load_measurement(m.measurement_uid)
    finally:
        store.close()
    assert _stored_public_ips(url) == [PUBLIC if store_ip else None]
    # What is read back for upload and export is the wire document: never the address.
    assert back is not None and back.vantage.public_ip is None
    on_wire = wire.dumps(m)
    assert PUBLIC not in on_wire  # never on the wire, even when stored
    assert json.loads(on_wire)["probe_ip"] == "127.0.0.1"


def test_store_ip_keeps_a_vantage_point_per_address(tmp_path) -> None:
    from tests.conftest import VANTAGE

    url = sqlite_url(tmp_path / "v.db")
    store = Store.open(url)
    try:
        now = dt.datetime.now(dt.UTC)
        store.begin_run("r1", "s", VANTAGE, now)
        store.begin_run("r2", "s", dataclasses.replace(VANTAGE, public_ip="198.51.100.7"), now)
        store.begin_run("r3", "s", dataclasses.replace(VANTAGE, public_ip="198.51.100.8"), now)
        store.begin_run("r4", "s", VANTAGE, now)
    finally:
        store.close()
    assert sorted(_stored_public_ips(url), key=str) == ["198.51.100.7", "198.51.100.8", None]


def test_migration_0004_adds_and_removes_the_column(tmp_path) -> None:
    from alembic import command

    from probe.store import _alembic_config

    url = sqlite_url(tmp_path / "m.db")
    Store.open(url).close()
    engine = sa.create_engine(url)
    try:
        cfg = _alembic_config()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0003")
        assert "public_ip" not in {
            c["name"] for c in sa.inspect(engine).get_columns("vantage_points")
        }
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0004")
        assert "public_ip" in {c["name"] for c in sa.inspect(engine).get_columns("vantage_points")}
    finally:
        engine.dispose()


def test_probe_id_write_failure_leaves_no_temporary_file(tmp_path, monkeypatch) -> None:
    import probe.vantage as vantage

    def broken(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(vantage.os, "replace", broken)
    with pytest.raises(OSError):
        vantage.probe_id(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_dual_stack_a_global_ipv6_address_says_nothing_of_the_nat_ipv4(
    tmp_path, dns_server
) -> None:
    # The Pi has a private IPv4 address behind a NAT and a global IPv6 one; the router's
    # recursive resolver answers whoami with the NAT's public IPv4 address.
    dns_server.set("whoami.test", a=["203.0.113.7"])
    cfg = make_cfg(tmp_path, vantage__resolver_whoami="whoami.test",
                   engine__public_ranges="203.0.113.0/24,2001:db8::/32")  # fmt: skip
    found = discover(cfg, dns_server.host, machine=machine(
        tmp_path, ("192.168.1.5", "2001:db8:1::7"), dns_port=dns_server.port))  # fmt: skip
    assert found.vantage.resolver_ip is None  # it may be the NAT's address: not kept
    assert not found.public_known  # the run is scrubbed again once IPv4's is learnt
