"""GET /api/v1/whoami with a test .mmdb; X-Forwarded-For only from trusted proxies;
the address never stored."""

from __future__ import annotations

import ipaddress
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from collectors import auth
from collectors.whoami import AddressError, caller_address
from schema import tables
from tests.collectors.conftest import Collector
from tests.fixtures.mmdb import write_asn_db, write_country_db

API = "/api/v1/whoami"
NET = ipaddress.ip_network


@pytest.fixture
def mmdb(tmp_path: Path) -> dict[str, str]:
    asn = write_asn_db(
        tmp_path / "asn.mmdb",
        {"127.0.0.0/8": (64500, "Loopback Net"), "198.51.100.0/24": (64511, "Doc Net")},
    )
    country = write_country_db(
        tmp_path / "country.mmdb", {"127.0.0.0/8": "XX", "198.51.100.0/24": "DE"}
    )
    return {"asn_db": str(asn), "country_db": str(country)}


def test_whoami_answers_from_the_databases(make_collector, mmdb) -> None:
    c = make_collector(**mmdb)
    r = c.http.get(API)
    assert r.status_code == 200
    assert r.json() == {"ip": "127.0.0.1", "asn": 64500, "cc": "XX", "network_name": "Loopback Net"}
    assert r.headers["Cache-Control"] == "no-store"


def test_whoami_without_databases_is_unknown(collector: Collector) -> None:
    assert collector.http.get(API).json() == {
        "ip": "127.0.0.1", "asn": 0, "cc": "ZZ", "network_name": None
    }  # fmt: skip


def test_forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy(make_collector, mmdb) -> None:
    plain = make_collector(**mmdb)
    spoofed = plain.http.get(API, headers={"X-Forwarded-For": "198.51.100.7"})
    assert spoofed.json()["ip"] == "127.0.0.1"

    proxied = make_collector(**mmdb, trusted_proxies=(NET("127.0.0.0/8"),))
    r = proxied.http.get(API, headers={"X-Forwarded-For": "203.0.113.5, 198.51.100.7"})
    # The rightmost hop the proxy saw, not what the client wrote on the left.
    assert r.json() == {"ip": "198.51.100.7", "asn": 64511, "cc": "DE", "network_name": "Doc Net"}
    bad = proxied.http.get(API, headers={"X-Forwarded-For": "not-an-address"})
    assert bad.status_code == 400


def test_the_address_is_never_stored(make_collector, mmdb) -> None:
    c = make_collector(**mmdb, trusted_proxies=(NET("127.0.0.0/8"),))
    probe_id = str(uuid.uuid4())
    credential = c.enroll(probe_id)
    r = c.http.get(
        API,
        headers={"X-Forwarded-For": "198.51.100.77", "Authorization": f"Bearer {credential}"},
    )
    assert r.json()["ip"] == "198.51.100.77"
    probe = auth.list_probes(c.engine)[0]
    assert probe["last_seen_at"] is not None  # the contact is noted, the address is not
    with c.engine.connect() as conn:
        everything = " ".join(
            str(tuple(row)) for table in tables.metadata.sorted_tables
            for row in conn.execute(sa.select(table))
        )  # fmt: skip
    assert "198.51.100.77" not in everything


def test_whoami_is_rate_limited_per_address(make_collector) -> None:
    c = make_collector(address_rate=0.01, address_burst=2)
    codes = [c.http.get(API).status_code for _ in range(3)]
    assert codes == [200, 200, 429]


@pytest.mark.parametrize(
    ("peer", "xff", "proxies", "expected"),
    [
        ("198.51.100.1", [], [], "198.51.100.1"),
        ("::ffff:198.51.100.1", [], [], "198.51.100.1"),
        ("10.0.0.2", ["203.0.113.9, 10.0.0.1"], ["10.0.0.0/8"], "203.0.113.9"),
        ("10.0.0.2", ["203.0.113.9", "10.0.0.1"], ["10.0.0.0/8"], "203.0.113.9"),
        ("10.0.0.2", ["10.0.0.5"], ["10.0.0.0/8"], "10.0.0.5"),
        ("10.0.0.2", ["[2001:db8::1]:4711"], ["10.0.0.0/8"], "2001:db8::1"),
        ("10.0.0.2", ["203.0.113.9:4711"], ["10.0.0.0/8"], "203.0.113.9"),
        ("10.0.0.2", [], ["10.0.0.0/8"], "10.0.0.2"),
        ("192.0.2.1", ["203.0.113.9"], ["10.0.0.0/8"], "192.0.2.1"),
    ],
)
def test_caller_address(peer, xff, proxies, expected) -> None:
    assert caller_address(peer, xff, [NET(p) for p in proxies]) == expected


def test_caller_address_refuses_garbage_from_a_proxy() -> None:
    with pytest.raises(AddressError):
        caller_address("10.0.0.2", ["<script>"], [NET("10.0.0.0/8")])
    with pytest.raises(ValueError):
        caller_address("testclient", [], [])
