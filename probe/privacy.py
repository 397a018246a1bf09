"""Keep the probe's own address out of what it stores and exports.

The rule (ARCHITECTURE.md principle 6, REFERENCE.md section 4): the probe's IP address
never leaves the machine. ``probe_ip`` is always a placeholder in the wire format, but a
server may echo the client's address back (a header such as ``X-Client-IP: <addr>``, a
page saying "Your IP address is <addr>", an error message naming the local socket).
As OONI does, :func:`scrub` replaces the address wherever it appears as text in such
strings, with ``[scrubbed]``.

What is scrubbed, in a copy of the measurement (the input is not changed):

- HTTP response bodies (bytes), response and request header values, and the URLs of
  redirect hops (the first hop's URL is the target's own, chosen by the volunteer);
- every observation's failure string.

What is deliberately left alone:

- ``body_length`` stays as measured (the length of what the server sent). A body that
  had to be scrubbed loses its ``body_sha256``: the hash of a page that held the
  address would give the address back to anyone who hashes every candidate. The
  measurement then carries the annotation ``scrubbed = "true"``.
- DNS: answers and raw responses are not altered. A resolver answering with the probe's
  own address is evidence (and the raw wire is binary, not text).
- TLS certificates and parameters, TCP endpoints (they are the server's).

Which addresses: :func:`local_addresses` reads this machine's own interface addresses
(loopback excluded). Behind a NAT the public address is not among them; a caller that
knows it (from a lookup) must add it to the set.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
import re
import shutil
import socket
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

from schema.model import DNSQuery, HTTPTransaction, Measurement, TCPConnect, TLSHandshake

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


# -- scrubbing ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Patterns:
    text: re.Pattern[str]
    raw: re.Pattern[bytes]


def _forms(address: str) -> list[str]:
    """Regular expressions for the ways ``address`` is written in text."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0].strip())
    except ValueError:
        return []  # not an address: nothing to look for
    if isinstance(ip, ipaddress.IPv4Address):
        # Not part of a longer number: 192.0.2.2 is not in 192.0.2.20 or 1192.0.2.2.
        return [rf"(?<![0-9]){re.escape(str(ip))}(?![0-9])"]
    texts = {ip.compressed, ip.exploded}
    if ip.ipv4_mapped is not None:
        texts.add(f"::ffff:{ip.ipv4_mapped}")
    texts |= {t.replace(":", "%3A") for t in texts}  # inside URLs
    out = []
    for t in sorted(texts, key=len, reverse=True):
        escaped = re.escape(t)
        out.append(rf"\[{escaped}(?:%[0-9A-Za-z._~-]+)?\]")  # [addr] and [addr%zone], whole
        out.append(rf"(?<![0-9A-Fa-f:]){escaped}(?![0-9A-Fa-f])")
    return out


@functools.lru_cache(maxsize=16)
def _patterns(addresses: frozenset[str]) -> _Patterns | None:
    forms = [f for a in sorted(addresses) for f in _forms(a)]
    if not forms:
        return None
    source = "|".join(forms)
    return _Patterns(
        re.compile(source, re.IGNORECASE),
        re.compile(source.encode("ascii"), re.IGNORECASE),
    )


class _Scrubber:
    def __init__(self, patterns: _Patterns) -> None:
        self.p = patterns
        self.changed = False

    def text(self, value: str) -> str:
        new, n = self.p.text.subn(SCRUBBED, value)
        if n:
            self.changed = True
        return new

    def optional(self, value: str | None) -> str | None:
        return None if value is None else self.text(value)

    def raw(self, value: bytes) -> bytes:
        new, n = self.p.raw.subn(SCRUBBED_BYTES, value)
        if n:
            self.changed = True
        return new

    def headers(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(name, self.text(value)) for name, value in pairs]

    def transaction(self, tx: HTTPTransaction, hop: int) -> HTTPTransaction:
        body = self.raw(tx.body)
        # The hash of a body that held the address would give it back (hash every
        # IPv4 address and compare), so a scrubbed body loses its hash.
        digest = tx.body_sha256 if body == tx.body else None
        return dataclasses.replace(
            tx,
            url=self.text(tx.url) if hop > 0 else tx.url,
            request_headers=self.headers(tx.request_headers),
            response_headers=self.headers(tx.response_headers),
            body=body,
            body_sha256=digest,
            failure=self.optional(tx.failure),
        )


_Obs = TypeVar("_Obs", DNSQuery, TCPConnect, TLSHandshake)


def _failure(s: _Scrubber, obs: _Obs) -> _Obs:
    if obs.failure is None:
        return obs
    new = s.text(obs.failure)
    return obs if new == obs.failure else dataclasses.replace(obs, failure=new)


def scrub(m: Measurement, addresses: Iterable[str]) -> Measurement:
    """A copy of ``m`` with each of ``addresses`` replaced by ``[scrubbed]`` in its
    strings (see the module docstring for which). Pure: ``m`` is not changed.

    Pass the same set (a ``frozenset``, ideally) for every measurement of a run: the
    patterns are compiled once per distinct set.
    """
    key = addresses if isinstance(addresses, frozenset) else frozenset(addresses)
    patterns = _patterns(key)
    if patterns is None:
        return dataclasses.replace(m, queries=list(m.queries), tcp_connect=list(m.tcp_connect),
                                   tls_handshakes=list(m.tls_handshakes),
                                   requests=list(m.requests),
                                   annotations=dict(m.annotations))  # fmt: skip
    s = _Scrubber(patterns)
    requests = [s.transaction(tx, hop) for hop, tx in enumerate(m.requests)]
    queries = [_failure(s, q) for q in m.queries]
    tcp_connect = [_failure(s, c) for c in m.tcp_connect]
    tls_handshakes = [_failure(s, h) for h in m.tls_handshakes]
    annotations = dict(m.annotations)
    if s.changed:
        annotations[ANNOTATION] = "true"
    return dataclasses.replace(
        m,
        queries=queries,
        tcp_connect=tcp_connect,
        tls_handshakes=tls_handshakes,
        requests=requests,
        annotations=annotations,
    )


__all__ = ["ANNOTATION", "SCRUBBED", "local_addresses", "scrub"]
