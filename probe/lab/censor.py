"""The censor's decisions, as pure functions: rules, name patterns, SNI and HTTP parsing.

The router agent (resolver, transparent proxy, DNS injector) reads what clients send
and asks this module what to do with it. Everything here is synchronous and free of
I/O so it can be tested on hostile bytes directly; nothing here may raise on
malformed input (only on a malformed *config*, at startup).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

DNS_ACTIONS = ("nxdomain", "servfail", "refused", "timeout", "empty", "answer")
TLS_ACTIONS = ("reset", "drop", "intercept")
HTTP_ACTIONS = ("reset", "drop", "blockpage")
PROXY_KINDS = ("tls", "http", "throttle")
DEFAULT_TTL = 300

MAX_INSPECT = 16384
"""How many client bytes the proxy buffers, at most, before deciding."""


class ConfigError(ValueError):
    """A router config that cannot be obeyed: refuse to start rather than half-censor."""


# -- names ---------------------------------------------------------------------------


def normalise_name(name: str) -> str:
    """Lower-case, stripped, without the trailing dot: the one form names are compared in."""
    return name.strip().lower().rstrip(".")


def name_matches(pattern: str, name: str) -> bool:
    """DESIGN.md patterns: ``*.example.org`` is any subdomain (not the apex);
    a plain ``example.org`` is that exact name only."""
    pattern = normalise_name(pattern)
    name = normalise_name(name)
    if not name:
        return False
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".example.org"
        return name.endswith(suffix) and len(name) > len(suffix)
    return name == pattern


def matches_any(patterns: Iterable[str], name: str | None) -> bool:
    """True if ``name`` matches one of ``patterns`` (None never matches)."""
    if name is None:
        return False
    return any(name_matches(p, name) for p in patterns)


# -- rules ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DNSRule:
    """One ISP-resolver rule: names it applies to and what the resolver says instead."""

    patterns: tuple[str, ...]
    action: str
    addresses: tuple[str, ...] = ()
    ttl: int = DEFAULT_TTL


@dataclass(frozen=True)
class ProxyRule:
    """One proxy rule (kind tls, http or throttle), as in DESIGN.md."""

    kind: str
    patterns: tuple[str, ...] = ()
    keyword: str | None = None
    action: str = ""
    residual: float = 0.0
    addresses: tuple[str, ...] = ()
    rate: float = 0.0


@dataclass(frozen=True)
class InjectRule:
    """One on-path injector rule: query names to answer and the forged A addresses."""

    patterns: tuple[str, ...]
    addresses: tuple[str, ...]
    ttl: int = DEFAULT_TTL


def _str_list(raw: Any, what: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise ConfigError(f"{what} must be a list of strings, not {raw!r}")
    return tuple(raw)


def _addresses(raw: Any, what: str, *, v4_only: bool = False) -> tuple[str, ...]:
    out = _str_list(raw, what)
    for a in out:
        try:
            ip = ipaddress.ip_address(a)
        except ValueError as exc:
            raise ConfigError(f"{what}: {a!r} is not an IP address") from exc
        if v4_only and ip.version != 4:
            raise ConfigError(f"{what}: {a!r} is not an IPv4 address")
    return out


def _number(raw: Any, what: str, default: float) -> float:
    if raw is None:
        return default
    if isinstance(raw, bool) or not isinstance(raw, int | float) or raw < 0:
        raise ConfigError(f"{what} must be a non-negative number, not {raw!r}")
    return float(raw)


def _mapping(raw: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{what} must be an object, not {raw!r}")
    return raw


def parse_dns_rules(raw: Any) -> tuple[DNSRule, ...]:
    """Validate the resolver's ``rules`` list."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("resolver.rules must be a list")
    out: list[DNSRule] = []
    for i, item in enumerate(raw):
        item = _mapping(item, f"resolver.rules[{i}]")
        action = item.get("action")
        if action not in DNS_ACTIONS:
            raise ConfigError(f"resolver.rules[{i}].action must be one of {DNS_ACTIONS}")
        addresses = _addresses(item.get("addresses"), f"resolver.rules[{i}].addresses")
        if action == "answer" and not addresses:
            raise ConfigError(f"resolver.rules[{i}]: action answer needs addresses")
        out.append(
            DNSRule(
                patterns=_str_list(item.get("match"), f"resolver.rules[{i}].match"),
                action=action,
                addresses=addresses,
                ttl=int(_number(item.get("ttl"), f"resolver.rules[{i}].ttl", DEFAULT_TTL)),
            )
        )
    return tuple(out)


def parse_proxy_rules(raw: Any) -> tuple[ProxyRule, ...]:
    """Validate the proxy's ``rules`` list."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("proxy.rules must be a list")
    out: list[ProxyRule] = []
    for i, item in enumerate(raw):
        where = f"proxy.rules[{i}]"
        item = _mapping(item, where)
        kind = item.get("kind")
        if kind not in PROXY_KINDS:
            raise ConfigError(f"{where}.kind must be one of {PROXY_KINDS}")
        patterns = _str_list(item.get("match"), f"{where}.match")
        keyword = item.get("keyword")
        if keyword is not None and (not isinstance(keyword, str) or not keyword):
            raise ConfigError(f"{where}.keyword must be a non-empty string")
        residual = _number(item.get("residual"), f"{where}.residual", 0.0)
        if kind == "throttle":
            rate = _number(item.get("rate"), f"{where}.rate", 0.0)
            if rate <= 0:
                raise ConfigError(f"{where}: throttle needs a positive rate")
            addresses = _addresses(item.get("addresses"), f"{where}.addresses")
            out.append(ProxyRule(kind="throttle", addresses=addresses, rate=rate))
            continue
        action = str(item.get("action"))
        allowed = TLS_ACTIONS if kind == "tls" else HTTP_ACTIONS
        if action not in allowed:
            raise ConfigError(f"{where}.action must be one of {allowed} for kind {kind}")
        if kind == "tls" and keyword is not None:
            raise ConfigError(f"{where}: keyword applies to http rules only")
        if not patterns and keyword is None:
            raise ConfigError(f"{where}: needs match (or keyword for http)")
        out.append(
            ProxyRule(
                kind=kind, patterns=patterns, keyword=keyword, action=action, residual=residual
            )  # fmt: skip
        )
    return tuple(out)


def parse_inject_rules(raw: Any) -> tuple[InjectRule, ...]:
    """Validate the top-level ``inject`` list."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("inject must be a list")
    out: list[InjectRule] = []
    for i, item in enumerate(raw):
        item = _mapping(item, f"inject[{i}]")
        addresses = _addresses(item.get("addresses"), f"inject[{i}].addresses", v4_only=True)
        if not addresses:
            raise ConfigError(f"inject[{i}] needs addresses")
        out.append(
            InjectRule(
                patterns=_str_list(item.get("match"), f"inject[{i}].match"),
                addresses=addresses,
                ttl=int(_number(item.get("ttl"), f"inject[{i}].ttl", DEFAULT_TTL)),
            )
        )
    return tuple(out)


def dns_rule_for(rules: Sequence[DNSRule], name: str | None) -> DNSRule | None:
    """The first resolver rule whose patterns match ``name``."""
    for rule in rules:
        if matches_any(rule.patterns, name):
            return rule
    return None


def inject_rule_for(rules: Sequence[InjectRule], name: str | None) -> InjectRule | None:
    """The first injector rule whose patterns match ``name``."""
    for rule in rules:
        if matches_any(rule.patterns, name):
            return rule
    return None


def tls_rule_for(rules: Sequence[ProxyRule], sni: str | None) -> ProxyRule | None:
    """The first tls rule matching the ClientHello's SNI."""
    for rule in rules:
        if rule.kind == "tls" and matches_any(rule.patterns, sni):
            return rule
    return None


def http_rule_for(rules: Sequence[ProxyRule], head: HTTPHead) -> ProxyRule | None:
    """The first http rule whose Host pattern or keyword matches the request head."""
    lowered = head.text.lower()
    for rule in rules:
        if rule.kind != "http":
            continue
        if matches_any(rule.patterns, head.host):
            return rule
        if rule.keyword is not None and rule.keyword.lower() in lowered:
            return rule
    return None


def throttle_rate(rules: Sequence[ProxyRule], address: str) -> float | None:
    """Bytes per second for server-to-client traffic from ``address`` (None = unlimited)."""
    for rule in rules:
        if rule.kind == "throttle" and address in rule.addresses:
            return rule.rate
    return None


# -- DNS -----------------------------------------------------------------------------


def first_question(wire: bytes) -> tuple[dns.message.Message, str, int] | None:
    """Parse a query: (message, first question's name, rdtype), or None if unusable."""
    try:
        msg = dns.message.from_wire(wire)
    except Exception:  # noqa: BLE001 - dnspython raises many types on hostile bytes
        return None
    if msg.flags & dns.flags.QR or not msg.question:
        return None
    q = msg.question[0]
    return msg, normalise_name(q.name.to_text()), int(q.rdtype)


_RCODES = {
    "nxdomain": dns.rcode.NXDOMAIN,
    "servfail": dns.rcode.SERVFAIL,
    "refused": dns.rcode.REFUSED,
    "empty": dns.rcode.NOERROR,
    "answer": dns.rcode.NOERROR,
}


def rule_reply(query: dns.message.Message, rule: DNSRule) -> bytes | None:
    """The wire reply the censoring resolver gives instead of the real one (None = silence).

    ``answer`` gives the rule's IPv4 addresses to A queries and IPv6 ones to AAAA
    queries; other types get an empty NOERROR, as a lying resolver typically does.
    """
    if rule.action == "timeout" or not query.question:
        return None
    response = dns.message.make_response(query)
    response.flags |= dns.flags.RA
    response.set_rcode(_RCODES[rule.action])
    if rule.action == "answer":
        q = query.question[0]
        want = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}.get(q.rdtype)
        addrs = [a for a in rule.addresses if ipaddress.ip_address(a).version == want]
        if addrs:
            rrset = dns.rrset.from_text_list(q.name, rule.ttl, dns.rdataclass.IN, q.rdtype, addrs)
            response.answer.append(rrset)
    try:
        return response.to_wire()
    except dns.exception.DNSException:
        return None


def dns_id(wire: bytes) -> int | None:
    """The query ID of a raw DNS message, if it is long enough to have one."""
    if len(wire) < 2:
        return None
    return int(struct.unpack("!H", wire[:2])[0])


# -- TLS ClientHello -----------------------------------------------------------------

HelloStatus = Literal["incomplete", "not_tls", "malformed", "ok"]


@dataclass(frozen=True)
class ClientHello:
    """Outcome of looking at a client's first bytes as TLS: status and SNI (if any)."""

    status: HelloStatus
    sni: str | None = None


class _NeedMore(Exception):
    pass


class _Malformed(Exception):
    pass


class _Cursor:
    """Bounded reader: running past ``end`` is malformed, past the data is 'need more'."""

    def __init__(self, buf: bytes, pos: int, end: int) -> None:
        self.buf, self.pos, self.end = buf, pos, end

    def take(self, n: int) -> bytes:
        if self.pos + n > self.end:
            raise _Malformed
        if self.pos + n > len(self.buf):
            raise _NeedMore
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u24(self) -> int:
        return int.from_bytes(self.take(3), "big")

    def sub(self, n: int) -> _Cursor:
        """A cursor over the next ``n`` bytes (which may not all have arrived yet)."""
        if self.pos + n > self.end:
            raise _Malformed
        child = _Cursor(self.buf, self.pos, self.pos + n)
        self.pos += n
        return child

    @property
    def remaining(self) -> int:
        return self.end - self.pos


_TLS_RECORD_MAX = 16384 + 2048
_HELLO_MAX = 65536


def _handshake_bytes(data: bytes) -> bytes:
    """Join the leading handshake records' payloads (a ClientHello may span records).

    Stops at the first record of another type (0-RTT data may follow the hello).
    Raises _Malformed on an impossible record header.
    """
    out = bytearray()
    pos = 0
    while pos < len(data):
        header = data[pos : pos + 5]
        if header[0] != 0x16 and pos > 0:
            break
        if header[0] != 0x16 or (len(header) >= 2 and header[1] != 0x03):
            raise _Malformed
        if len(header) < 5:
            break
        length = int.from_bytes(header[3:5], "big")
        if length == 0 or length > _TLS_RECORD_MAX:
            raise _Malformed
        out += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
    return bytes(out)


def _parse_hello(hs: bytes) -> str | None:
    """SNI host_name from a ClientHello handshake message (bytes may be partial)."""
    top = _Cursor(hs, 0, 1 << 30)
    if top.u8() != 0x01:  # client_hello
        raise _Malformed
    length = top.u24()
    if length > _HELLO_MAX:
        raise _Malformed
    body = top.sub(length)
    body.take(2 + 32)  # legacy_version, random
    body.take(body.u8())  # session id
    suites = body.u16()
    if suites % 2:
        raise _Malformed
    body.take(suites)
    body.take(body.u8())  # compression methods
    if body.remaining == 0:
        return None  # no extensions at all (SSLv3-style hello)
    exts = body.sub(body.u16())
    while exts.remaining > 0:
        ext_type = exts.u16()
        ext = exts.sub(exts.u16())
        if ext_type != 0:  # server_name
            continue
        names = ext.sub(ext.u16())
        while names.remaining > 0:
            kind = names.u8()
            raw = names.take(names.u16())
            if kind == 0:
                name = normalise_name(raw.decode("latin-1"))
                return name or None
        return None
    return None


def parse_client_hello(data: bytes) -> ClientHello:
    """Look at a client's first bytes as a TLS ClientHello; never raises.

    ``incomplete`` means more bytes could still decide (the caller stops waiting
    at :data:`MAX_INSPECT` bytes or its deadline); ``ok`` comes with the SNI or
    None when the hello has no server_name.
    """
    if not data:
        return ClientHello("incomplete")
    if data[0] != 0x16 or (len(data) >= 2 and data[1] != 0x03):
        return ClientHello("not_tls")
    try:
        hs = _handshake_bytes(data)
        try:
            return ClientHello("ok", _parse_hello(hs))
        except _NeedMore:
            return ClientHello("incomplete")
    except _Malformed:
        return ClientHello("malformed")
    except Exception:  # noqa: BLE001 - hostile input must never crash the proxy
        return ClientHello("malformed")


def extract_sni(data: bytes) -> str | None:
    """The SNI of a ClientHello in ``data``, or None (not TLS, no SNI, incomplete)."""
    return parse_client_hello(data).sni


# -- plaintext HTTP ------------------------------------------------------------------

HTTP_METHODS = (b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH",
                b"CONNECT", b"TRACE")  # fmt: skip

FirstBytes = Literal["tls", "http", "other", "unknown"]


def classify_first_bytes(data: bytes) -> FirstBytes:
    """What protocol the client's first bytes start: ``unknown`` = too few bytes to tell."""
    if not data:
        return "unknown"
    if data[0] == 0x16:
        if len(data) < 2:
            return "unknown"
        return "tls" if data[1] == 0x03 else "other"
    for method in HTTP_METHODS:
        token = method + b" "
        if data.startswith(token):
            return "http"
        if token.startswith(data):
            return "unknown"
    return "other"


@dataclass(frozen=True)
class HTTPHead:
    """A plaintext request's head (request line + headers) as far as it arrived."""

    text: str
    host: str | None
    complete: bool


def _strip_port(host: str) -> str:
    host = host.strip()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host[1:]
    if host.count(":") == 1:
        name, _, port = host.partition(":")
        if port.isdigit() or not port:
            return name
    return host


def parse_http_head(data: bytes) -> HTTPHead:
    """Request line and headers of a plaintext request; never raises.

    The Host header wins; an absolute-form target (``GET http://h/``) is used
    without one. Host is normalised (no port, lower case).
    """
    end = data.find(b"\r\n\r\n")
    complete = end >= 0
    raw = data[: end + 4] if complete else data
    text = raw.decode("latin-1")
    lines = text.split("\r\n") if "\r\n" in text else text.split("\n")
    host: str | None = None
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == "host":
            host = _strip_port(value)
            break
    if host is None and lines:
        parts = lines[0].split(" ")
        if len(parts) >= 2 and parts[1].lower().startswith(("http://", "https://")):
            authority = parts[1].split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
            host = _strip_port(authority)
    host = normalise_name(host) if host else None
    return HTTPHead(text=text, host=host or None, complete=complete)


# -- SO_ORIGINAL_DST -----------------------------------------------------------------

SO_ORIGINAL_DST = 80


def parse_sockaddr_in(raw: bytes) -> tuple[str, int]:
    """(IPv4, port) from a ``struct sockaddr_in`` as getsockopt(SO_ORIGINAL_DST) returns."""
    if len(raw) < 8:
        raise ValueError("sockaddr_in too short")
    port = int.from_bytes(raw[2:4], "big")
    return str(ipaddress.IPv4Address(raw[4:8])), port
