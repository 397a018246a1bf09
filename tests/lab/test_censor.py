"""The censor's pure decisions: name patterns, rule parsing, SNI and HTTP parsing, forged DNS.

Hostile bytes (truncated, mutated, random) are fed straight to the parsers: a
crash there would take the whole ISP down in the middle of a lab run.
"""

from __future__ import annotations

import random
import socket
import ssl
import struct

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from probe.lab.censor import (
    MAX_INSPECT,
    ConfigError,
    DNSRule,
    InjectRule,
    ProxyRule,
    classify_first_bytes,
    dns_rule_for,
    extract_sni,
    first_question,
    http_rule_for,
    inject_rule_for,
    name_matches,
    parse_client_hello,
    parse_dns_rules,
    parse_http_head,
    parse_inject_rules,
    parse_proxy_rules,
    parse_sockaddr_in,
    rule_reply,
    throttle_rate,
    tls_rule_for,
)


def client_hello(server_hostname: str | None, *, tls13_only: bool = False) -> bytes:
    """The bytes a real Python/OpenSSL client sends first."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if tls13_only:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def split_records(hello: bytes, at: int) -> bytes:
    """The same ClientHello carried in two TLS records (legal, and used to evade DPI)."""
    hs = hello[5:]
    head = hello[:3]
    return head + struct.pack("!H", at) + hs[:at] + head + struct.pack("!H", len(hs) - at) + hs[at:]


# -- names and rules -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("signal.org", "signal.org", True),
        ("signal.org", "SIGNAL.org.", True),
        ("signal.org", "www.signal.org", False),
        ("signal.org", "notsignal.org", False),
        ("*.signal.org", "www.signal.org", True),
        ("*.signal.org", "a.b.signal.org", True),
        ("*.signal.org", "signal.org", False),
        ("*.signal.org", "evilsignal.org", False),
        ("*.signal.org", ".signal.org", False),
        ("web.whatsapp.com", "", False),
    ],
)
def test_name_matches(pattern: str, name: str, expected: bool) -> None:
    assert name_matches(pattern, name) is expected


def test_dns_rules_first_match_wins() -> None:
    rules = parse_dns_rules(
        [
            {"match": ["web.whatsapp.com", "*.whatsapp.net"], "action": "nxdomain"},
            {"match": ["signal.org"], "action": "answer", "addresses": ["10.10.34.34"]},
            {"match": ["*.whatsapp.net"], "action": "servfail"},
        ]
    )
    assert dns_rule_for(rules, "mmg.whatsapp.net") is rules[0]
    assert dns_rule_for(rules, "signal.org") is rules[1]
    assert dns_rule_for(rules, "www.signal.org") is None
    assert dns_rule_for(rules, None) is None


@pytest.mark.parametrize(
    "bad",
    [
        "x",
        [{"match": ["a"], "action": "explode"}],
        [{"match": ["a"], "action": "answer"}],
        [{"match": ["a"], "action": "answer", "addresses": ["not-an-ip"]}],
        [{"match": "a", "action": "nxdomain", "ttl": -1}],
        [17],
    ],
)
def test_bad_dns_rules_refused(bad: object) -> None:
    with pytest.raises(ConfigError):
        parse_dns_rules(bad)


def test_proxy_rules_parse_and_match() -> None:
    rules = parse_proxy_rules(
        [
            {"kind": "tls", "match": ["*.signal.org"], "action": "reset", "residual": 0},
            {"kind": "tls", "match": ["drop.test"], "action": "drop", "residual": 30},
            {"kind": "http", "match": ["web.telegram.org"], "action": "blockpage"},
            {"kind": "http", "keyword": "Forbidden", "action": "reset"},
            {"kind": "throttle", "addresses": ["198.19.1.7"], "rate": 20000},
        ]
    )
    assert tls_rule_for(rules, "chat.signal.org") is rules[0]
    assert tls_rule_for(rules, "drop.test") == ProxyRule(
        kind="tls", patterns=("drop.test",), action="drop", residual=30.0
    )
    assert tls_rule_for(rules, "web.telegram.org") is None  # http rules are not tls rules
    assert tls_rule_for(rules, None) is None
    head = parse_http_head(b"GET / HTTP/1.1\r\nHost: WEB.telegram.org\r\n\r\n")
    assert http_rule_for(rules, head) is rules[2]
    head = parse_http_head(b"GET /very/forbidden/page HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert http_rule_for(rules, head) is rules[3]
    head = parse_http_head(b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Note: FORBIDDEN\r\n\r\n")
    assert http_rule_for(rules, head) is rules[3]
    assert http_rule_for(rules, parse_http_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")) is None
    assert throttle_rate(rules, "198.19.1.7") == 20000.0
    assert throttle_rate(rules, "198.19.1.8") is None


@pytest.mark.parametrize(
    "bad",
    [
        [{"kind": "dpi", "match": ["a"], "action": "reset"}],
        [{"kind": "tls", "match": ["a"], "action": "blockpage"}],
        [{"kind": "tls", "keyword": "x", "action": "reset"}],
        [{"kind": "http", "action": "reset"}],
        [{"kind": "throttle", "addresses": ["198.19.1.7"]}],
        [{"kind": "throttle", "addresses": ["198.19.1.7"], "rate": True}],
        [{"kind": "tls", "match": ["a"], "action": "reset", "residual": "long"}],
    ],
)
def test_bad_proxy_rules_refused(bad: object) -> None:
    with pytest.raises(ConfigError):
        parse_proxy_rules(bad)


def test_inject_rules() -> None:
    rules = parse_inject_rules([{"match": ["*.whatsapp.net"], "addresses": ["198.19.9.9"]}])
    assert inject_rule_for(rules, "mmg.whatsapp.net.") == InjectRule(
        patterns=("*.whatsapp.net",), addresses=("198.19.9.9",)
    )
    assert inject_rule_for(rules, "whatsapp.net") is None
    with pytest.raises(ConfigError):
        parse_inject_rules([{"match": ["a"], "addresses": ["2001:db8::1"]}])
    with pytest.raises(ConfigError):
        parse_inject_rules([{"match": ["a"], "addresses": []}])


# -- TLS ClientHello -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["www.signal.org", "Web.WhatsApp.com", "a.b.c.d.example.test"])
def test_sni_from_real_client_hello(name: str) -> None:
    hello = client_hello(name)
    assert parse_client_hello(hello).status == "ok"
    assert extract_sni(hello) == name.lower()
    assert extract_sni(client_hello(name, tls13_only=True)) == name.lower()


def test_hello_without_sni() -> None:
    # An IP literal as server_hostname sends no SNI extension.
    result = parse_client_hello(client_hello("198.19.1.5"))
    assert result.status == "ok" and result.sni is None


def test_every_truncation_is_incomplete_until_sni_arrives() -> None:
    hello = client_hello("chat.signal.org")
    first_ok = None
    for n in range(len(hello)):
        result = parse_client_hello(hello[:n])
        assert result.status in ("incomplete", "ok"), (n, result)
        if result.status == "ok":
            assert result.sni == "chat.signal.org"
            first_ok = first_ok or n
    assert first_ok is not None  # SNI found before the whole hello arrived


def test_hello_split_over_records_and_followed_by_data() -> None:
    hello = client_hello("chat.signal.org")
    for at in (1, 10, 60, len(hello) - 6):
        assert extract_sni(split_records(hello, at)) == "chat.signal.org"
    # Early data after the hello does not hide it.
    assert extract_sni(hello + b"\x17\x03\x03\x00\x05hello") == "chat.signal.org"
    # The first record alone (of a split hello) is not enough yet.
    two = split_records(hello, 20)
    assert parse_client_hello(two[: 5 + 20]).status == "incomplete"


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"", "incomplete"),
        (b"\x16", "incomplete"),
        (b"\x16\x03", "incomplete"),
        (b"\x16\x03\x01\x02", "incomplete"),
        (b"GET / HTTP/1.1\r\n", "not_tls"),
        (b"\x16\x02\x00", "not_tls"),
        (b"\x16\x03\x01\x00\x00", "malformed"),  # empty record
        (b"\x16\x03\x01\xff\xff" + b"\x01" * 10, "malformed"),  # record too long
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "malformed"),  # a ServerHello
        (b"\x16\x03\x01\x00\x04\x01\xff\xff\xff", "malformed"),  # 16 MiB hello
        (b"\x16\x03\x01\x00\x04\x01\x00\x00\x00", "malformed"),  # empty hello body
        (b"\x17\x03\x03\x00\x01\x00", "not_tls"),
    ],
)
def test_hostile_hello_headers(data: bytes, status: str) -> None:
    assert parse_client_hello(data).status == status


def test_lengths_that_overrun_their_parent_are_malformed() -> None:
    hello = bytearray(client_hello("chat.signal.org"))
    # A handshake length shorter than its own cipher-suite list.
    hello[6:9] = (50).to_bytes(3, "big")
    assert parse_client_hello(bytes(hello)).status == "malformed"


def test_fuzzed_hellos_never_raise() -> None:
    rng = random.Random(1234)
    base = client_hello("chat.signal.org")
    for _ in range(3000):
        data = bytearray(base)
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        cut = bytes(data[: rng.randrange(len(data) + 1)])
        result = parse_client_hello(cut)
        assert result.status in ("incomplete", "not_tls", "malformed", "ok")
    for _ in range(2000):
        junk = bytes([0x16, 0x03]) + rng.randbytes(rng.randrange(0, 300))
        parse_client_hello(junk)
        parse_http_head(junk)
    parse_client_hello(b"\x16\x03\x01" + b"\xff" * MAX_INSPECT)


# -- plaintext HTTP ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"", "unknown"),
        (b"G", "unknown"),
        (b"GET", "unknown"),
        (b"GET ", "http"),
        (b"POST /x HTTP/1.1", "http"),
        (b"\x16\x03\x01", "tls"),
        (b"\x16", "unknown"),
        (b"\x16\x04", "other"),
        (b"SSH-2.0-OpenSSH\r\n", "other"),
        (b"GETX", "other"),
        (b"\x00\x00", "other"),
    ],
)
def test_classify_first_bytes(data: bytes, kind: str) -> None:
    assert classify_first_bytes(data) == kind


@pytest.mark.parametrize(
    ("data", "host", "complete"),
    [
        (b"GET / HTTP/1.1\r\nHost: Web.Telegram.org\r\n\r\n", "web.telegram.org", True),
        (b"GET / HTTP/1.1\r\nhost:web.telegram.org:8080\r\n\r\nbody", "web.telegram.org", True),
        (b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n", "2001:db8::1", True),
        (b"GET / HTTP/1.1\r\nHost: 198.19.1.5\r\n", "198.19.1.5", False),
        (b"GET http://a.test:81/x HTTP/1.1\r\n\r\n", "a.test", True),
        (b"GET / HTTP/1.0\r\n\r\n", None, True),
        (b"GET / HTTP/1.1\r\nHost: \r\n\r\n", None, True),
        (b"GET / HTTP/1.1\nHost: lf.test\n\n", "lf.test", False),
    ],
)
def test_http_head(data: bytes, host: str | None, complete: bool) -> None:
    head = parse_http_head(data)
    assert head.host == host
    assert head.complete is complete


# -- DNS replies the resolver forges -------------------------------------------------


def _query(name: str, rdtype: str = "A") -> dns.message.Message:
    return dns.message.make_query(name, rdtype)


def test_first_question() -> None:
    q = _query("Web.WhatsApp.com.")
    parsed = first_question(q.to_wire())
    assert parsed is not None
    assert parsed[1:] == ("web.whatsapp.com", dns.rdatatype.A)
    assert first_question(b"\x00\x01garbage") is None
    assert first_question(b"") is None
    response = dns.message.make_response(q)
    assert first_question(response.to_wire()) is None  # an answer is not a query


@pytest.mark.parametrize(
    ("action", "rcode"),
    [
        ("nxdomain", dns.rcode.NXDOMAIN),
        ("servfail", dns.rcode.SERVFAIL),
        ("refused", dns.rcode.REFUSED),
        ("empty", dns.rcode.NOERROR),
    ],
)
def test_rule_reply_rcodes(action: str, rcode: int) -> None:
    q = _query("web.whatsapp.com")
    wire = rule_reply(q, DNSRule(patterns=("web.whatsapp.com",), action=action))
    assert wire is not None
    reply = dns.message.from_wire(wire)
    assert reply.id == q.id
    assert reply.rcode() == rcode
    assert reply.flags & dns.flags.QR and reply.flags & dns.flags.RA
    assert reply.question == q.question
    assert not reply.answer


def test_rule_reply_answer_by_type() -> None:
    rule = DNSRule(patterns=("signal.org",), action="answer",
                   addresses=("10.10.34.34", "10.10.34.35", "2001:db8::34"), ttl=60)  # fmt: skip
    a = dns.message.from_wire(rule_reply(_query("signal.org"), rule) or b"")
    assert sorted(r.address for r in a.answer[0]) == ["10.10.34.34", "10.10.34.35"]
    assert a.answer[0].ttl == 60
    aaaa = dns.message.from_wire(rule_reply(_query("signal.org", "AAAA"), rule) or b"")
    assert [r.address for r in aaaa.answer[0]] == ["2001:db8::34"]
    txt = dns.message.from_wire(rule_reply(_query("signal.org", "TXT"), rule) or b"")
    assert txt.rcode() == dns.rcode.NOERROR and not txt.answer


def test_rule_reply_timeout_is_silence() -> None:
    assert rule_reply(_query("a.test"), DNSRule(patterns=("a.test",), action="timeout")) is None


def test_sockaddr_in() -> None:
    raw = struct.pack("!HH4s8x", socket.AF_INET, 443, socket.inet_aton("198.19.1.5"))
    assert parse_sockaddr_in(raw) == ("198.19.1.5", 443)
    with pytest.raises(ValueError):
        parse_sockaddr_in(b"\x02\x00")


# -- the injector's forged packet (built, never sent) --------------------------------


def test_forge_reply_swaps_addresses_and_keeps_the_question() -> None:
    from scapy.layers.dns import DNS, DNSQR
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    from probe.lab.inject import forge_reply, is_query

    rules = (InjectRule(patterns=("*.whatsapp.net",), addresses=("198.19.9.9", "198.19.9.10")),)
    query = (
        Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01")
        / IP(src="198.18.0.2", dst="198.19.0.111")
        / UDP(sport=40000, dport=53)
        / DNS(id=4242, rd=1, qd=DNSQR(qname="mmg.whatsapp.net", qtype="A"))
    )
    query = Ether(bytes(query))  # as the sniffer would see it
    assert is_query(query)
    reply = forge_reply(query, rules)
    assert reply is not None
    reply = Ether(bytes(reply))
    assert (reply[Ether].src, reply[Ether].dst) == ("02:00:00:00:00:01", "02:00:00:00:00:02")
    assert (reply[IP].src, reply[IP].dst) == ("198.19.0.111", "198.18.0.2")
    assert (reply[UDP].sport, reply[UDP].dport) == (53, 40000)
    answer = dns.message.from_wire(bytes(reply[DNS]))
    assert answer.id == 4242
    assert answer.flags & dns.flags.QR and answer.flags & dns.flags.AA
    assert answer.flags & dns.flags.RD
    assert str(answer.question[0].name) == "mmg.whatsapp.net."
    assert sorted(r.address for r in answer.answer[0]) == ["198.19.9.10", "198.19.9.9"]

    other = query.copy()
    other[DNS].qd = DNSQR(qname="whatsapp.net")
    assert forge_reply(Ether(bytes(other)), rules) is None  # apex not matched
    assert not is_query(reply)  # our own answers are never answered
    assert not is_query(Ether(bytes(query)[:40]))  # truncated garbage
    assert forge_reply(Ether(b"\x00" * 14 + b"\x45" + b"\xff" * 60), rules) is None


def test_forge_reply_on_a_raw_ip_link() -> None:
    """On the TUN access link there is no Ethernet header: the reply is bare IP."""
    from scapy.layers.dns import DNS, DNSQR
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    from probe.lab.inject import forge_reply

    rules = (InjectRule(patterns=("a.test",), addresses=("198.19.9.9",)),)
    query = IP(
        bytes(
            IP(src="198.18.0.2", dst="198.19.0.53")
            / UDP(sport=5353, dport=53)
            / DNS(id=7, qd=DNSQR(qname="A.test."))
        )
    )
    reply = forge_reply(query, rules)
    assert reply is not None and Ether not in reply
    reply = IP(bytes(reply))
    assert (reply[IP].src, reply[IP].dst, reply[UDP].dport) == ("198.19.0.53", "198.18.0.2", 5353)
    answer = dns.message.from_wire(bytes(reply[DNS]))
    assert answer.id == 7 and [r.address for r in answer.answer[0]] == ["198.19.9.9"]
