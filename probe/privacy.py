"""Keep the probe's own address out of everything that leaves its store.

The rule (ARCHITECTURE.md principles 6 and 8, REFERENCE.md section 4): the probe's IP
address never leaves the machine. ``probe_ip`` is always a placeholder in the wire
format, but servers echo the client's address back (a header such as ``X-Client-IP``,
a page saying "Your IP address is ...", a redirect to ``...?seen=<addr>``, a reverse
DNS name ``203-0-113-7.dyn.example``), and behind a NAT the public address is not
among the machine's own. So:

- :class:`Scrub` owns the rule. It finds addresses in text in every common form
  (dotted, zero-padded, dash- or underscore-separated, reversed as in
  ``in-addr.arpa``, percent-encoded, as a 32-bit integer in decimal or hex, inet_aton's
  hex and octal parts; IPv6 in any valid spelling, with ``%3A`` or dashes, as
  ``ip6.arpa`` nibbles, and IPv4 inside IPv6: mapped, 6to4, Teredo, NAT64), after
  decoding what hides text (percent-encoding to any depth, HTML entities and markup,
  backslash escapes, base64, Unicode compatibility forms and other scripts' digits,
  invisible characters, content codings declared or not, UTF-16/32, UTF-7), and compares
  each with the probe's own addresses. It is applied when a measurement is stored
  and again on every path out of the store (upload, every export format, ``vantage
  run --json``), with the addresses known *then*: nothing leaves unscrubbed because
  it was stored before the address was learnt.
- :class:`OwnAddresses` remembers every own address learnt from any source (the
  collector's whoami, a public interface address, a stored vantage point) in the
  data directory (``own_addresses.json``, mode 0600, never uploaded), so the scrub
  does not depend on reaching anything.

What is scrubbed (a copy: the input is not changed): every string of a measurement
(HTTP bodies, header values, URLs of every hop, failure strings, annotations, the
verdict's reasons, the target) and the resolver fields of the vantage point. A
string that still holds the address once decoded is replaced whole. A body that holds
it and cannot be rewritten in place (kept compressed, UTF-16), or that cannot be
decoded at all, is dropped: its length stays, and its hash becomes a keyed hash.

Hashes: ``body_sha256`` covers the whole body received (up to the read limit) while
only its first part is kept, so for a truncated, scrubbed or dropped body the plain
hash could be tested against guesses of a page holding each candidate address. Those
bodies keep ``body_sha256 = null`` and a ``body_keyed_sha256``: HMAC-SHA256 of the
original hash under a secret that never leaves the probe (``scrub.key``), so equal
bodies of one probe still compare equal.

What is kept as measured (documented in deploy/README.md), with one exception:

- DNS answers and raw responses (what a resolver answered is the evidence of DNS
  tampering), TLS certificates, TCP and TLS endpoints and each HTTP hop's ``address``
  (the server's). The exception: an answer or endpoint that *is* one of the probe's
  addresses (a hostile resolver answering with the address it saw, as whoami services
  do) is written ``0.0.0.0`` (``::``), and the raw reply that holds it is dropped.

Which addresses: :func:`local_addresses` reads this machine's own interface addresses
(loopback excluded); :class:`OwnAddresses` adds what was learnt.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import dataclasses
import datetime as dt
import hashlib
import hmac
import html
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import unicodedata
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from probe.engine.content import DECODED, codings
from schema.model import Measurement
from schema.wire import body_from_wire, body_to_wire

log = logging.getLogger("vantage.privacy")

SCRUBBED = "[scrubbed]"
SCRUBBED_BYTES = SCRUBBED.encode("ascii")
ANNOTATION = "scrubbed"

_IP_TIMEOUT = 5.0
_IF_INET6 = Path("/proc/net/if_inet6")


# -- this machine's addresses -----------------------------------------------------


def local_addresses() -> set[str]:
    """This machine's own interface addresses, IPv4 and IPv6, without loopback.

    Read from ``ip -j addr`` when iproute2 is there, else from the kernel through
    sockets (interface ioctls, ``/proc/net/if_inet6``, and the source address the
    routing table would pick: ``connect()`` on a UDP socket sends nothing). No packet
    is sent either way. Addresses are in their normal text form (IPv6 compressed,
    lower case, without a zone).
    """
    found = _from_ip_command()
    if found is None:
        found = _from_sockets()
    return {a for a in map(_normal, found) if a is not None}


def _normal(text: str) -> str | None:
    """The address in normal form, or None for loopback, unspecified and non-addresses."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0].strip())
    except ValueError:
        return None
    if ip.is_loopback or ip.is_unspecified:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        if ip.ipv4_mapped.is_loopback:
            return None
    return str(ip)


def _from_ip_command() -> set[str] | None:
    ip = shutil.which("ip")
    if ip is None:
        return None
    try:
        proc = subprocess.run([ip, "-j", "addr", "show"], capture_output=True, text=True,
                              timeout=_IP_TIMEOUT, check=False)  # fmt: skip
        if proc.returncode != 0:
            return None
        links = json.loads(proc.stdout or "[]")
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    found: set[str] = set()
    for link in links if isinstance(links, list) else ():
        for info in link.get("addr_info", []) if isinstance(link, dict) else ():
            local = info.get("local") if isinstance(info, dict) else None
            if isinstance(local, str):
                found.add(local)
    return found


def _from_sockets() -> set[str]:
    found: set[str] = set()
    found |= _ipv4_by_ioctl()
    found |= _ipv6_from_proc()
    # The source address the kernel would use towards documentation addresses:
    # connect() on a UDP socket only looks up the route, it sends nothing.
    for family, peer in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((peer, 9))
                found.add(s.getsockname()[0])
        except OSError:
            pass
    return found


def _ipv4_by_ioctl() -> set[str]:
    """IPv4 addresses of each interface (Linux SIOCGIFADDR); empty elsewhere."""
    try:
        import fcntl
        import struct
    except ImportError:  # not a Unix
        return set()
    siocgifaddr = 0x8915
    found: set[str] = set()
    try:
        names = [name for _, name in socket.if_nameindex()]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for name in names:
                request = struct.pack("256s", name.encode()[:15])
                try:
                    reply = fcntl.ioctl(s.fileno(), siocgifaddr, request)
                except OSError:
                    continue  # no IPv4 address on this interface
                found.add(socket.inet_ntoa(reply[20:24]))
    except OSError:
        pass
    return found


def _ipv6_from_proc() -> set[str]:
    try:
        lines = _IF_INET6.read_text().splitlines()
    except OSError:
        return set()
    found: set[str] = set()
    for line in lines:
        fields = line.split()
        if fields and len(fields[0]) == 32:
            try:
                found.add(str(ipaddress.IPv6Address(bytes.fromhex(fields[0]))))
            except ValueError:
                continue
    return found


# -- finding an address in text, in any form -----------------------------------------

_SEP4 = r"(?:[.\-_ ,:/]|%2[eE])"
#: A run of four or more 1-3 digit groups: dotted, padded, dashed (reverse DNS names),
#: percent-encoded dots; every window of four is tried, forwards and reversed.
_V4_RUN = re.compile(rf"(?<![0-9])[0-9]{{1,3}}(?:{_SEP4}[0-9]{{1,3}}){{3,}}(?![0-9])")
_DIGITS = re.compile(r"[0-9]{1,3}")
#: The forms inet_aton accepts: dotted parts in hex (0xcb) or octal (0313).
_ATON_PART = r"(?:0[xX][0-9A-Fa-f]{1,2}|[0-9]{1,4})"
_V4_ATON = re.compile(rf"(?<![0-9A-Za-z.]){_ATON_PART}(?:\.{_ATON_PART}){{3}}(?![0-9A-Za-z])")
#: An address as one 32-bit number (decimal or hex), as some trackers and logs write it.
_V4_INT = re.compile(r"(?<![0-9A-Za-z.])(?:(?:0[xX])?[0-9A-Fa-f]{8}|[0-9]{8,10})(?![0-9A-Za-z])")
_SEP6 = r"(?::|%3[aA]|-)"
_V6_RUN = re.compile(
    rf"(?<![0-9A-Za-z])[0-9A-Fa-f]{{0,4}}(?:{_SEP6}[0-9A-Fa-f]{{0,4}}){{2,8}}"
    rf"(?:[0-9]{{1,3}}(?:\.[0-9]{{1,3}}){{3}})?(?![0-9A-Za-z])"
)
_SEP6_ANY = re.compile(r"%3[aA]|-")
_ARPA6 = re.compile(r"(?<![0-9A-Za-z])((?:[0-9A-Fa-f]\.){32})ip6\.arpa", re.IGNORECASE)
_ANY_DIGIT = re.compile(r"[0-9]")
_BRACKET_END = re.compile(r"(?:%[0-9A-Za-z._~-]+)?\]")
_ESCAPE = re.compile(r"\\(?:u([0-9A-Fa-f]{4})|x([0-9A-Fa-f]{2}))")


class _Own:
    """The addresses to find, as integers (IPv4-mapped IPv6 counts as its IPv4)."""

    def __init__(self, addresses: Iterable[str]) -> None:
        v4: set[int] = set()
        v6: set[int] = set()
        for text in addresses:
            try:
                ip = ipaddress.ip_address(str(text).split("%", 1)[0].strip())
            except ValueError:
                continue
            if isinstance(ip, ipaddress.IPv4Address):
                v4.add(int(ip))
            elif ip.ipv4_mapped is not None:
                v4.add(int(ip.ipv4_mapped))
            else:
                v6.add(int(ip))
        self.v4 = frozenset(v4)
        self.v6 = frozenset(v6)
        #: The addresses as raw bytes, as they appear in decoded base64 or binary data.
        self.packed = tuple(
            [ipaddress.IPv4Address(v).packed for v in v4]
            + [ipaddress.IPv6Address(v).packed for v in v6]
        )
        # Literal pieces that every spelling of an address holds: a quick test that
        # lets most text go without a regular expression. An IPv4 address is spelt
        # with its largest octet in decimal (dotted, padded, dashed, reversed, escaped
        # dots) unless it is one number (decimal or hex); an IPv6 address with its
        # longest group in hex, unless as ip6.arpa nibbles.
        digits: set[str] = set()
        v4_hexes: set[str] = set()
        v6_hexes: set[str] = {"arpa"} if v6 else set()
        for value in v4:
            octets = ipaddress.IPv4Address(value).packed
            digits |= {str(max(octets)), str(value), f"0{max(octets):o}"}
            # In hex: the whole (0xcb007107), an octet (0xcb.0x0...), and a 16-bit group
            # as IPv6 spells it when it embeds the address (::ffff:, 6to4, NAT64, Teredo).
            v4_hexes |= {f"{value:08x}", f"0x{max(octets):x}"}
            for v in (value, value ^ 0xFFFFFFFF):
                v6_hexes.add(max((f"{v >> 16:x}", f"{v & 0xFFFF:x}"), key=len))
        for value in v6:
            groups = ipaddress.IPv6Address(value).exploded.split(":")
            v6_hexes.add(max((g.lstrip("0") or "0" for g in groups), key=len))
        self._digits = tuple(sorted(digits, key=len, reverse=True))
        self._v4_hexes = tuple(sorted(v4_hexes, key=len, reverse=True))
        self._v6_hexes = tuple(sorted(v6_hexes, key=len, reverse=True))
        self._hexes = self._v4_hexes + self._v6_hexes
        # Every spelling of an IPv4 address has a digit, and so has every spelling of an
        # IPv6 one but its compressed form: a string without a digit is skipped unless
        # one of the addresses can be written with letters only.
        self.letters_only = any(
            not re.search(r"[0-9]", ipaddress.IPv6Address(a).compressed) for a in v6
        )

    def __bool__(self) -> bool:
        return bool(self.v4 or self.v6)

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Where ``text`` spells one of the addresses: (start, end) pairs. It makes the
        checks of :meth:`may_hold` itself, so a caller need not ask both."""
        found: list[tuple[int, int]] = []
        if not self.letters_only and _ANY_DIGIT.search(text) is None:
            return found
        low = text.lower()
        # Each family's scans run only where its literal pieces are (see __init__).
        v4_here = bool(self.v4) and (
            any(d in text for d in self._digits) or any(h in low for h in self._v4_hexes)
        )
        v6_here = any(h in low for h in self._v6_hexes)
        if v4_here:
            for run in _V4_RUN.finditer(text):
                groups = list(_DIGITS.finditer(text, run.start(), run.end()))
                for i in range(len(groups) - 3):
                    window = groups[i : i + 4]
                    octets = [int(g.group()) for g in window]
                    if max(octets) > 255:
                        continue
                    forward = int.from_bytes(bytes(octets), "big")
                    backward = int.from_bytes(bytes(reversed(octets)), "big")
                    if forward in self.v4 or backward in self.v4:
                        found.append((window[0].start(), window[3].end()))
            for number in _V4_INT.finditer(text):
                token = number.group()
                values = {int(token[2:] if token[:2].lower() == "0x" else token, 16)}
                if token.isdigit():
                    values.add(int(token))
                if values & self.v4:
                    found.append(number.span())
            for dotted in _V4_ATON.finditer(text):
                parts = dotted.group().split(".")
                if all(p.isdigit() and not (len(p) > 1 and p[0] == "0") for p in parts):
                    continue  # plain decimal: the runs above have it
                octets = [o for o in map(_aton_part, parts) if o is not None and o <= 255]
                if len(octets) == 4 and int.from_bytes(bytes(octets), "big") in self.v4:
                    found.append(dotted.span())
        for run in _V6_RUN.finditer(text) if v6_here else ():
            span = _v6_span(run.group())
            if span is None:
                continue
            ip, lead, trail = span
            if int(ip) in self.v6 or (_embedded_v4(ip) & self.v4):
                found.append((run.start() + lead, run.end() - trail))
        if self.v6 and "arpa" in low:
            for arpa in _ARPA6.finditer(text):
                nibbles = arpa.group(1).replace(".", "")[::-1]
                if int(nibbles, 16) in self.v6:
                    found.append(arpa.span())
        return found

    def may_hold(self, text: str) -> bool:
        """False when ``text`` certainly spells none of the addresses (before decoding)."""
        if not self.letters_only and _ANY_DIGIT.search(text) is None:
            return False
        if any(d in text for d in self._digits):
            return True
        if self._hexes:
            low = text.lower()
            return any(h in low for h in self._hexes)
        return False

    def replace(self, text: str) -> str:
        """``text`` with every spelling found replaced by ``[scrubbed]``."""
        spans = sorted(self.spans(text))
        if not spans:
            return text
        out: list[str] = []
        at = 0
        for start, end in spans:
            if end <= at:
                continue
            if start > 0 and text[start - 1] == "[":  # [addr] and [addr%zone], whole
                close = _BRACKET_END.match(text, end)
                if close is not None:
                    start, end = start - 1, close.end()
            out.append(text[at : max(start, at)])
            out.append(SCRUBBED)
            at = end
        out.append(text[at:])
        return "".join(out)

    def hidden(self, text: str) -> bool:
        """Whether ``text`` spells an address once decoded (percent-encoding, HTML
        entities, backslash escapes, up to three layers)."""
        seen = {text}
        layer = [text]
        for _ in range(MAX_LAYERS):
            nxt = []
            for t in layer:
                for decoded in _decodings(t, self.packed):
                    if decoded not in seen and len(seen) < MAX_VIEWS:
                        seen.add(decoded)
                        nxt.append(decoded)
            if not nxt:
                break
            layer = nxt
        return any(t == _FOUND or self.spans(t) for t in seen if t is not text)


def _aton_part(part: str) -> int | None:
    """One dotted part as inet_aton reads it (0x hex, 0 octal, else decimal)."""
    try:
        if part[:2].lower() == "0x":
            return int(part[2:], 16)
        if len(part) > 1 and part[0] == "0":
            return int(part, 8)
        return int(part)
    except ValueError:
        return None


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _embedded_v4(ip: ipaddress.IPv6Address) -> set[int]:
    """The IPv4 addresses an IPv6 address carries: mapped, compatible, 6to4, Teredo's
    client, NAT64's well-known prefix."""
    out: set[int] = set()
    if ip.ipv4_mapped is not None:
        out.add(int(ip.ipv4_mapped))
    if ip.sixtofour is not None:
        out.add(int(ip.sixtofour))
    if ip.teredo is not None:
        out.add(int(ip.teredo[1]))
    if ip in _NAT64 or int(ip) >> 32 == 0:
        out.add(int(ip) & 0xFFFFFFFF)
    return out


def _v6_span(token: str) -> tuple[ipaddress.IPv6Address, int, int] | None:
    """The IPv6 address a token spells, and how many characters before and after it
    are not part of it (a separator run on: ``sendto 2001:db8::23: no route``)."""
    normal = _SEP6_ANY.sub(":", token)  # %3A is three characters: offsets via the token
    # A valid address has eight groups, or an empty one ("::"), or an IPv4 tail: most
    # tokens (dates, pieces of UUIDs) are none of these and cost no parse.
    if not ("::" in normal or normal.count(":") >= 7 or "." in normal):
        return None
    if not re.search(r"[0-9A-Fa-f]", token):
        return None
    for lead, trail in ((0, 0), (0, 1), (1, 0), (1, 1)):
        if lead and not token.startswith((":", "-")):
            continue
        if trail and not token.endswith((":", "-")):
            continue
        if lead or trail:
            if "%" in token.lower():
                continue  # percent-encoded tokens are whole or not at all
            candidate = normal[lead : len(normal) - trail]
        else:
            candidate = normal
        try:
            return ipaddress.IPv6Address(candidate), lead, trail
        except ValueError:
            continue
    return None


#: Layers of encoding undone, and views of one string looked at, at most.
MAX_LAYERS = 8
MAX_VIEWS = 64
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]{16,}={0,2}")
_TAG = re.compile(r"<[^<>]{0,200}>")
_FOUND = "\x00own address\x00"  # a view that stands for "the bytes hold an address"


def _hints(text: str) -> bool:
    """Whether ``text`` has what may hide an address from a plain search: encodings
    (percent, entities, escapes, base64), markup, or characters beyond ASCII (other
    digits, invisible ones)."""
    return (
        "%" in text
        or "&" in text
        or "\\" in text
        or "<" in text
        or not text.isascii()
        or _BASE64.search(text) is not None
    )


def _decodings(text: str, packed: tuple[bytes, ...] = ()) -> Iterable[str]:
    if "%" in text:
        yield unquote(text)
    if "&" in text:
        yield html.unescape(text)
    if "\\" in text:
        yield _ESCAPE.sub(lambda m: chr(int(m.group(1) or m.group(2), 16)), text)
    if "<" in text:
        yield _TAG.sub("", text)
    if not text.isascii():
        yield _plain_unicode(text)
    tried = 0
    for run in _BASE64.finditer(text):
        # The run, and its pieces between - and _ (a base64 token inside a host name).
        for token in {run.group(), *re.split(r"[-_]", run.group())}:
            if len(token) < 16 or tried >= 256:
                continue
            tried += 1
            raw = _unbase64(token)
            if raw is None:
                continue
            if any(p in raw for p in packed):
                yield _FOUND
            yield raw.decode("latin-1")


#: Format characters that render as nothing (soft hyphen, zero-width ones, marks and
#: isolates of direction, word joiners, the BOM) and decimal digits other than ASCII's.
_INVISIBLE = re.compile("[\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_OTHER_DIGIT = re.compile(r"(?![0-9])\d")


def _plain_unicode(text: str) -> str:
    """Compatibility forms folded (fullwidth digits and dots), every decimal digit of any
    script as ASCII, invisible formatting characters (zero-width space, soft hyphen)
    removed."""
    folded = _INVISIBLE.sub("", unicodedata.normalize("NFKC", text))
    return _OTHER_DIGIT.sub(lambda m: str(unicodedata.digit(m.group(), 0)), folded)


def _unbase64(token: str) -> bytes | None:
    body = token.rstrip("=")
    padded = body + "=" * (-len(body) % 4)
    for alphabet in (None, b"-_"):
        try:
            return base64.b64decode(padded, altchars=alphabet, validate=True)
        except (binascii.Error, ValueError):
            continue
    return None


# -- bodies ------------------------------------------------------------------------------

#: Decoded output considered at most: a stored body is at most 64 KiB, but a
#: compressed one could expand without bound.
DECODE_LIMIT = 8 * 1024 * 1024


class _Undecodable(Exception):
    pass


def _unzip(data: bytes, wbits: int, multi: bool) -> bytes:
    out = bytearray()
    while data:
        z = zlib.decompressobj(wbits)
        try:
            out += z.decompress(data, DECODE_LIMIT - len(out) + 1)
        except zlib.error as exc:
            if out and multi:
                break  # junk after a complete member
            raise _Undecodable(str(exc)) from exc
        if len(out) > DECODE_LIMIT:
            raise _Undecodable("decodes to more than the limit")
        if not (multi and z.eof):
            break  # one stream, or a truncated member: what it gave is the content
        data = z.unused_data
    return bytes(out)


def _decode_one(data: bytes, coding: str) -> bytes:
    if coding in ("gzip", "x-gzip"):
        return _unzip(data, zlib.MAX_WBITS | 16, multi=True)
    if coding == "deflate":
        try:
            return _unzip(data, zlib.MAX_WBITS, multi=False)
        except _Undecodable:
            return _unzip(data, -zlib.MAX_WBITS, multi=False)
    # br and zstd are not decoded: the engine never asks for them, and their decoders
    # cannot bound their output here (a small body could expand without limit). A body
    # kept in either is dropped when scrubbing, as any body that cannot be read.
    raise _Undecodable(f"content coding {coding!r}")


def _header(pairs: Any, name: str) -> str | None:
    for pair in pairs or ():
        if isinstance(pair, list | tuple) and len(pair) == 2 and str(pair[0]).lower() == name:
            return str(pair[1])
    return None


def _content(raw: bytes, content_encoding: str | None) -> tuple[bytes, bool]:
    """The body's content and whether it is kept encoded (raises :class:`_Undecodable`).

    The engine decodes one gzip or deflate coding as it reads (probe.engine.content);
    any other coding, or several, is kept raw and is decoded here, last applied first.
    """
    applied = codings(content_encoding)
    encoded = bool(applied)
    if len(applied) == 1 and applied[0] in DECODED:
        data, encoded = raw, False  # decoded by the engine
    else:
        data = raw
        for coding in reversed(applied):
            data = _decode_one(data, coding)
    # Whatever the headers say, a body that is still compressed (sent compressed twice,
    # or with no Content-Encoding) is decoded too, or it cannot be read.
    for _ in range(MAX_LAYERS):
        if data[:2] == b"\x1f\x8b":
            data, encoded = _decode_one(data, "gzip"), True
        elif len(data) > 2 and data[0] == 0x78 and (data[0] << 8 | data[1]) % 31 == 0:
            try:
                data, encoded = _unzip(data, zlib.MAX_WBITS, multi=False), True
            except _Undecodable:
                break  # not zlib after all: text that starts with "x"
        elif data[:4] == b"\x28\xb5\x2f\xfd":
            raise _Undecodable("a zstd stream")
        else:
            break
    return data, encoded


def _wide_texts(content: bytes, content_type: str | None) -> list[str]:
    """The body read as UTF-16 or UTF-32 when its BOM, its charset or its NUL bytes say
    it may be: text that bytewise search would not see."""
    charset = ""
    match = _CHARSET.search(content_type or "")
    if match:
        charset = match.group(1).lower()
    candidates: list[str] = []
    if content[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff") or "32" in charset:
        candidates += ["utf-32", "utf-32-le", "utf-32-be"]
    if content[:2] in (b"\xff\xfe", b"\xfe\xff") or "16" in charset or "ucs-2" in charset:
        candidates += ["utf-16", "utf-16-le", "utf-16-be"]
    if not candidates and content.count(0) * 4 > len(content) > 0:
        candidates += ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"]
    declared = _codec(charset)
    if declared is not None and declared not in candidates:
        candidates.append(declared)  # UTF-7, EBCDIC, ...: not ASCII where digits are
    if b"\x00" in content and not any("16" in c or "32" in c for c in candidates):
        candidates += ["utf-16-le", "utf-16-be"]  # wide text inside an ASCII body
    texts = []
    for codec in candidates:
        texts.append(content.decode(codec, errors="replace"))
        # An odd start (a body cut mid-character) shifts every character: try both.
        texts.append(content[1:].decode(codec, errors="replace"))
    return texts


_CHARSET = re.compile(r"charset\s*=\s*\"?([A-Za-z0-9_.:-]+)", re.IGNORECASE)


def _codec(charset: str) -> str | None:
    """A declared charset that Python knows and that does not spell digits and dots as
    ASCII does (so a bytewise search would miss them); None otherwise."""
    if not charset:
        return None
    try:
        probe = "0123456789.:%".encode(charset)
        name = codecs.lookup(charset).name
    except (LookupError, UnicodeError, ValueError):
        return None
    # UTF-7 writes these as ASCII but may also shift them ("+AC4-" is a dot).
    return None if probe == b"0123456789.:%" and name != "utf-7" else charset


def _body_bytes(value: Any) -> bytes:
    """A wire body's bytes (``schema.wire``); a damaged base64 body reads as empty."""
    try:
        return body_from_wire(value if isinstance(value, dict) else str(value or ""))
    except (binascii.Error, ValueError, KeyError, TypeError):
        return b""


def _json_text(value: Any) -> str:
    try:
        import orjson
    except ImportError:  # pragma: no cover (orjson is a core dependency; stdlib fallback)
        return json.dumps(value, ensure_ascii=False, default=str)
    return orjson.dumps(value, default=str).decode("utf-8")


def _plain(item: dict[str, Any], kind: str) -> bool:
    """Whether an observation's only text is its JSON strings: no response body kept
    encoded, as base64 or truncated (those are decoded, or their hash keyed)."""
    if kind != "requests":
        return True
    response = item.get("response")
    if not isinstance(response, dict):
        return True
    if response.get("body_is_truncated") or not isinstance(response.get("body", ""), str):
        return False
    headers = response.get("headers_list")
    encoding = _header(headers, "content-encoding")
    applied = codings(encoding)
    if applied and not (len(applied) == 1 and applied[0] in DECODED):
        return False
    match = re.search(
        r"charset\s*=\s*\"?([A-Za-z0-9_.:-]+)", _header(headers, "content-type") or ""
    )
    return match is None or _codec(match.group(1).lower()) is None  # text as ASCII spells it


# -- the scrub --------------------------------------------------------------------------

#: Keys whose values are kept as measured (see the module docstring), by observation list.
_KEPT = {
    "queries": frozenset({"answers", "raw_response"}),
    "tcp_connect": frozenset({"ip"}),
    "tls_handshakes": frozenset({"address", "ip", "peer_certificates"}),
    "requests": frozenset({"address"}),
}
#: The endpoint fields of each observation (the server's address, or the probe's own
#: when a hostile answer pointed it there).
_ENDPOINT_KEYS = {
    "tcp_connect": ("ip",),
    "tls_handshakes": ("address", "ip"),
    "requests": ("address",),
}
_PLACEHOLDER = {"ipv4": "0.0.0.0", "ipv6": "::"}


def _placeholder_endpoint(value: str) -> str:
    """``value`` (an address, ``ip:port`` or ``[ip]:port``) with the address part
    replaced by the unspecified address of its family."""
    port = ""
    host = value
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest
    elif value.count(":") == 1:
        host, _, tail = value.partition(":")
        port = ":" + tail
    if ":" in host:
        return f"[::]{port}" if port else "::"
    return f"0.0.0.0{port}"


OBSERVATION_KEYS = tuple(_KEPT)


class Scrub:
    """Removes the probe's own addresses from what leaves the store.

    ``addresses``: every address of the probe known now (its interfaces' and those
    learnt, :func:`own_addresses`). ``key``: the secret for keyed body hashes (None:
    such hashes are dropped instead).

    >>> s = Scrub({"203.0.113.7"})
    >>> s.text("seen from 203-0-113-7.dyn.example")
    'seen from [scrubbed].dyn.example'
    """

    def __init__(self, addresses: Iterable[str], key: bytes | None = None) -> None:
        self.addresses = frozenset(a for a in addresses if _normal(a) is not None)
        self._own = _Own(self.addresses)
        self._key = key
        self.changed = False

    def is_own(self, address: str | None) -> bool:
        """Whether ``address`` (text, maybe with a port or zone) is one of the probe's."""
        if not address:
            return False
        return bool(self._own.spans(address))

    # -- strings and trees --

    def text(self, value: str) -> str:
        """``value`` with the addresses replaced; wholly ``[scrubbed]`` when an address
        is still there once the text is decoded."""
        if not self._own or not (self._own.may_hold(value) or _hints(value)):
            return value
        new = self._own.replace(value)
        if self._own.hidden(new):
            new = SCRUBBED
        if new != value:
            self.changed = True
        return new

    def tree(self, value: Any, kept: frozenset[str] = frozenset()) -> Any:
        """A copy of a JSON-like ``value`` with every string scrubbed, keys included,
        except the values of the dict keys in ``kept`` (top level only)."""
        if isinstance(value, dict | list) and not kept and self.clean(value):
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {
                (self.text(k) if isinstance(k, str) else k): (v if k in kept else self.tree(v))
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.tree(v) for v in value]
        return value

    def keyed(self, digest: str | None, body: bytes) -> str | None:
        """The keyed hash that stands for a body's plain hash (None without a key)."""
        if self._key is None:
            return None
        what = f"sha256:{digest}" if digest else "kept:" + hashlib.sha256(body).hexdigest()
        return hmac.new(self._key, what.encode("ascii"), hashlib.sha256).hexdigest()

    def response(self, response: dict[str, Any]) -> dict[str, Any]:
        """A wire response with its headers and body scrubbed (see the module docstring);
        keys keep their order."""
        raw = _body_bytes(response.get("body", ""))
        headers = response.get("headers_list")
        body, state = self._body(raw, _header(headers, "content-encoding"),
                                 _header(headers, "content-type"))  # fmt: skip
        digest = response.get("body_sha256")
        rekey = state != "kept" or (bool(response.get("body_is_truncated")) and digest is not None)
        out: dict[str, Any] = {}
        for k, v in response.items():
            if k == "body":
                out[k] = v if state == "kept" else body_to_wire(body)
            elif k == "body_sha256" and rekey:
                out[k] = None
                keyed = self.keyed(digest, raw)
                if keyed is not None:
                    out["body_keyed_sha256"] = keyed
            elif k == "body_keyed_sha256" and rekey:
                continue  # made again just above
            else:
                out[self.text(k)] = self.tree(v)
        if state != "kept":
            self.changed = True
        return out

    def _body(self, raw: bytes, encoding: str | None, content_type: str | None
              ) -> tuple[bytes, str]:  # fmt: skip
        """(body, "kept" | "scrubbed" | "dropped")."""
        if not raw:
            return raw, "kept"
        try:
            content, encoded = _content(raw, encoding)
        except _Undecodable:
            return b"", "dropped"  # what cannot be read cannot be checked
        latin = content.decode("latin-1")  # one char per byte: positions line up
        wide = _wide_texts(content, content_type)
        if encoded or wide:
            # Kept as sent (compressed, or text two or four bytes a character): it
            # cannot be edited in place, so a body holding an address goes.
            for text in [latin, *wide]:
                if self._own.spans(text) or self._own.hidden(text):
                    return b"", "dropped"
            return raw, "kept"
        new = self._own.replace(latin)
        if self._own.hidden(new):
            return b"", "dropped"
        if new == latin:
            return raw, "kept"
        return new.encode("latin-1"), "scrubbed"

    # -- measurements --

    def clean(self, value: Any) -> bool:
        """True when ``value`` (JSON-like) certainly holds nothing to scrub: one search
        of its JSON text, which holds every string of it verbatim. Bodies kept encoded
        or as base64 are not text there: :meth:`observations` never takes this way
        for a response with a body that is not plain."""
        if not self._own:
            return True
        text = _json_text(value)
        if "%" in text or "&" in text or r"\\" in text:  # JSON spells a backslash \\
            return False  # may hide an address: each string is decoded on its own
        return not self._own.spans(text)

    def evidence(self, kind: str, item: dict[str, Any]) -> dict[str, Any]:
        """An observation with the probe's own address taken out of the evidence that is
        otherwise kept as measured: a DNS answer that is the probe's address (a
        resolver that answers with the address it saw, as whoami services do) becomes
        ``0.0.0.0`` or ``::`` and the raw reply, which holds it too, is dropped; an
        endpoint that is the probe's own is written with the same placeholder."""
        if not self._own:
            return item
        out = item
        if kind == "queries":
            answers, hit = [], False
            for a in item.get("answers") or ():
                for key in ("ipv4", "ipv6"):
                    value = a.get(key) if isinstance(a, dict) else None
                    if isinstance(value, str) and self.is_own(value):
                        a, hit = {**a, key: _PLACEHOLDER[key]}, True
                answers.append(a)
            raw = item.get("raw_response")
            if not hit and isinstance(raw, str) and self._own.packed:
                try:
                    wire_bytes = base64.b64decode(raw)
                except (binascii.Error, ValueError):
                    wire_bytes = b""
                hit = any(p in wire_bytes for p in self._own.packed)
            if hit:
                out = {**item, "answers": answers, "raw_response": None}
        else:
            for key in _ENDPOINT_KEYS[kind]:
                value = out.get(key)
                if isinstance(value, str) and self.is_own(value):
                    out = {**out, key: _placeholder_endpoint(value)}
        if out is not item:
            self.changed = True
        return out

    def observations(self, kind: str, items: list[Any]) -> list[Any]:
        """A wire observation list (``queries``, ``tcp_connect``, ...) scrubbed."""
        kept = _KEPT[kind]
        out = []
        for item in items:
            if isinstance(item, dict):
                item = self.evidence(kind, item)
            if isinstance(item, dict) and _plain(item, kind) and self.clean(item):
                out.append(item)
                continue
            if not isinstance(item, dict):
                out.append(self.tree(item))
                continue
            new: dict[str, Any] = {}
            for k, v in item.items():
                if k in kept:
                    new[k] = v
                elif k == "response" and kind == "requests":
                    new[k] = self.response(v) if isinstance(v, dict) else v
                else:
                    new[self.text(k)] = self.tree(v)
            out.append(new)
        return out

    def resolver(self, address: str | None) -> str | None:
        """The resolver's address, or None when it is the probe's own (the probe or its
        router resolves recursively: the resolver's egress is the probe's address)."""
        if address is not None and self.is_own(address):
            self.changed = True
            return None
        return address

    def document(self, doc: dict[str, Any]) -> dict[str, Any]:
        """A wire document (schema.wire) scrubbed: a copy. The target and ``input`` are
        the volunteer's own catalog and stay as written."""
        self.changed = False
        out = dict(doc)
        out["resolver_ip"] = self.resolver(doc.get("resolver_ip"))
        for key in ("probe_network_name", "resolver_network_name"):
            if isinstance(doc.get(key), str):
                out[key] = self.text(doc[key])
        annotations = self.tree(doc.get("annotations") or {})
        keys = dict(doc.get("test_keys") or {})
        for kind in OBSERVATION_KEYS:
            keys[kind] = self.observations(kind, list(keys.get(kind) or ()))
        if isinstance(keys.get("failure"), str):
            keys["failure"] = self.text(keys["failure"])
        keys["analysis"] = self.tree(keys.get("analysis"))
        if self.changed:
            annotations[ANNOTATION] = "true"
        out["annotations"] = annotations
        out["test_keys"] = keys
        return out

    def measurement(self, m: Measurement) -> Measurement:
        """A measurement scrubbed: a copy (by way of its wire document)."""
        from schema import wire

        doc = self.document(wire.to_wire(m))
        new = wire.from_wire(doc)
        # The vantage point keeps what is not on the wire (public_ip with store_ip).
        new.vantage = dataclasses.replace(m.vantage, resolver_ip=new.vantage.resolver_ip)
        return new


def scrub(m: Measurement, addresses: Iterable[str], key: bytes | None = None) -> Measurement:
    """A copy of ``m`` with each of ``addresses`` removed (see :class:`Scrub`)."""
    return Scrub(addresses, key).measurement(m)


# -- what the probe knows of its own addresses -------------------------------------------

OWN_FILE = "own_addresses.json"
KEY_FILE = "scrub.key"
#: Runs whose public address was unknown when they were measured, remembered so that
#: their stored measurements are scrubbed again once an address is learnt.
MAX_UNSURE_RUNS = 100_000


class OwnAddresses:
    """The probe's own addresses learnt from any source, kept in the data directory.

    The file (mode 0600) is never uploaded or exported; it is what lets the probe scrub
    an address it learnt once even when, later, nothing can tell it (the collector is
    blocked). Every change is written to a temporary file and renamed into place.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / OWN_FILE

    def _read(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text("utf-8"))
        except FileNotFoundError:
            return {"addresses": {}, "unsure_runs": []}
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s (%s): starting it again", self.path, exc)
            return {"addresses": {}, "unsure_runs": []}
        if not isinstance(doc, dict):
            return {"addresses": {}, "unsure_runs": []}
        addresses = doc.get("addresses")
        runs = doc.get("unsure_runs")
        return {
            "addresses": addresses if isinstance(addresses, dict) else {},
            "unsure_runs": [r for r in runs if isinstance(r, str)] if isinstance(runs, list)
            else [],
        }  # fmt: skip

    def _write(self, doc: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def addresses(self) -> set[str]:
        return {a for a in self._read()["addresses"] if _normal(a) is not None}

    def learn(self, addresses: Iterable[str], source: str) -> set[str]:
        """Remember ``addresses`` (those that are not loopback or unspecified); the
        ones not known before are returned."""
        doc = self._read()
        known: dict[str, Any] = doc["addresses"]
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        new: set[str] = set()
        changed = False
        for a in addresses:
            normal = _normal(a)
            if normal is None:
                continue
            entry = known.get(normal)
            if entry is None:
                known[normal] = {"source": source, "first_seen": now, "last_seen": now}
                new.add(normal)
                changed = True
            elif isinstance(entry, dict) and entry.get("last_seen", "")[:10] != now[:10]:
                entry["last_seen"] = now  # once a day at most: an SD card is not rewritten
                changed = True
        if changed:
            self._write(doc)
        return new

    def unsure(self, run_id: str) -> None:
        """Note a run measured while the public address was unknown."""
        doc = self._read()
        runs: list[str] = doc["unsure_runs"]
        if run_id not in runs:
            runs.append(run_id)
            del runs[:-MAX_UNSURE_RUNS]
            self._write(doc)

    def unsure_runs(self) -> list[str]:
        return list(self._read()["unsure_runs"])


def scrub_key(data_dir: Path) -> bytes | None:
    """The probe's secret for keyed hashes (created on first use); None if it cannot
    be read or made (keyed hashes are then dropped, never left plain)."""
    from probe.export.pseudonym import KeyFileError, key_file

    if not data_dir.is_dir():
        return None  # nothing measured here yet: an export does not create the directory
    try:
        return key_file(data_dir / KEY_FILE)[0]
    except KeyFileError as exc:
        log.warning("%s: keyed body hashes are dropped", exc)
        return None


def own_addresses(data_dir: Path, extra: Iterable[str] = ()) -> frozenset[str]:
    """Every address of the probe known now: its interfaces', those learnt, ``extra``."""
    found = set(local_addresses()) | OwnAddresses(data_dir).addresses()
    found |= {a for a in map(_normal, extra) if a is not None}
    return frozenset(found)


def exit_scrub(data_dir: Path, extra: Iterable[str] = ()) -> Scrub:
    """The scrub for a path out of the store, with what is known now."""
    return Scrub(own_addresses(data_dir, extra), scrub_key(data_dir))


__all__ = [
    "ANNOTATION",
    "OWN_FILE",
    "SCRUBBED",
    "OwnAddresses",
    "Scrub",
    "exit_scrub",
    "local_addresses",
    "own_addresses",
    "scrub",
    "scrub_key",
]
