"""Every DNS answer placed in its network from the offline ASN database (issue 11), and
the run wiring that does it: recorded in the measurement, used by the verdict."""

from __future__ import annotations

from pathlib import Path

from probe.geoip import GeoIP, annotate_answers
from schema import wire
from schema.model import DNSAnswer, DNSQuery
from tests.fixtures.mmdb import write_asn_db, write_country_db


def query(*answers: DNSAnswer) -> DNSQuery:
    return DNSQuery("e1.example", "A", "udp", "192.0.2.53:53", 0.0, 0.1, answers=list(answers))


def test_answers_get_their_network_and_keep_it_on_the_wire(tmp_path: Path) -> None:
    db = write_asn_db(tmp_path / "asn.mmdb", {"157.240.0.0/16": (32934, "Facebook, Inc."),
                                              "2001:db8::/32": (64500, "Example Net")})  # fmt: skip
    q = query(
        DNSAnswer("A", "157.240.1.53", 60),
        DNSAnswer("A", "198.51.100.7", 60),  # not in the database
        DNSAnswer("AAAA", "2001:db8::1", 60),
        DNSAnswer("CNAME", "edge.example.", 60),
    )
    geo = GeoIP(asn_db=str(db))
    try:
        annotate_answers([q], geo)
    finally:
        geo.close()
    assert [(a.asn, a.as_org_name) for a in q.answers] == [
        (32934, "Facebook, Inc."),
        (0, None),
        (64500, "Example Net"),
        (None, None),  # a name has no network
    ]
    doc = wire.query_to_wire(q)
    assert doc["answers"][0] == {"answer_type": "A", "ipv4": "157.240.1.53", "asn": 32934,
                                 "as_org_name": "Facebook, Inc.", "ttl": 60}  # fmt: skip
    assert "asn" not in doc["answers"][3]
    assert wire.query_from_wire(doc) == q


def test_without_an_asn_database_nothing_is_recorded(tmp_path: Path) -> None:
    q = query(DNSAnswer("A", "157.240.1.53", 60))
    annotate_answers([q], None)
    country_only = GeoIP(country_db=str(write_country_db(tmp_path / "cc.mmdb",
                                                         {"157.240.0.0/16": "US"})))  # fmt: skip
    try:
        annotate_answers([q], country_only)
    finally:
        country_only.close()
    assert q.answers[0].asn is None
    assert "asn" not in wire.query_to_wire(q)["answers"][0]


def test_a_recorded_network_is_not_looked_up_again(tmp_path: Path) -> None:
    """The network an answer had when it came in is the evidence; a later database
    (re-judging years on) must not overwrite it."""
    db = write_asn_db(tmp_path / "asn.mmdb", {"157.240.0.0/16": (32934, "Facebook, Inc.")})
    q = query(DNSAnswer("A", "157.240.1.53", 60, 64999, "Then Net"))
    geo = GeoIP(asn_db=str(db))
    try:
        annotate_answers([q], geo)
    finally:
        geo.close()
    assert (q.answers[0].asn, q.answers[0].as_org_name) == (64999, "Then Net")
