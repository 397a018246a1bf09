"""The probe's own address never reaches what is stored or exported (probe.privacy).

A loopback server plays a site that echoes the client's address (in a redirect, in
headers, in the page), as many "what is my IP" pages and some block pages do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from probe import privacy
from probe.privacy import ANNOTATION, SCRUBBED, local_addresses, scrub
from probe.store import Store, sqlite_url
from schema import wire
from schema.model import (
    DNSAnswer,
    DNSQuery,
    HTTPTransaction,
    Measurement,
    TCPConnect,
    TLSHandshake,
)
from tests.conftest import VANTAGE, http_target, run_measure
from tests.fixtures import DNSServer

ROOT = Path(__file__).resolve().parents[2]
# Stand-ins for a probe's public addresses (documentation ranges, never routed).
FAKE = ("203.0.113.7", "2001:db8:1::7")


class EchoServer:
    """Plain HTTP on 127.0.0.1 that tells the client "its" addresses: ``/`` redirects to
    ``/landing?client=<first>``, which sends them in headers and in the page."""

    def __init__(self, addresses: Sequence[str]) -> None:
        self.addresses = list(addresses)
        self.hits: list[str] = []
        echo = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                echo.hits.append(self.path)
                first = echo.addresses[0]
                if self.path == "/":
                    self.send_response(302)
                    self.send_header("Location", f"/landing?client={first}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                lines = [f"Your IP address is {a}" for a in echo.addresses]
                lines += [f"connection from [{a}]:54321" for a in echo.addresses if ":" in a]
                body = ("\n".join(lines) + "\n").encode()
                self.send_response(200)
                self.send_header("X-Client-IP", first)
                self.send_header("X-Forwarded-For", ", ".join(echo.addresses))
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> EchoServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    with EchoServer(FAKE) as server:
        yield server


def _everything(m: Measurement) -> str:
    return json.dumps(wire.to_wire(m))


def test_echoed_address_is_scrubbed_from_a_real_fetch(echo: EchoServer, ctx) -> None:
    m = run_measure(http_target(echo.url()), ctx)
    assert echo.hits == ["/", f"/landing?client={FAKE[0]}"]
    assert [tx.status for tx in m.requests] == [302, 200]
    original = _everything(m)
    assert all(a in original for a in FAKE)  # the leak is real before scrubbing
    body, sha, length = m.requests[-1].body, m.requests[-1].body_sha256, m.requests[-1].body_length

    clean = scrub(m, FAKE)
    text = _everything(clean)
    assert not any(a in text for a in FAKE), text
    last = clean.requests[-1]
    assert last.url == echo.url(f"/landing?client={SCRUBBED}")
    assert dict(last.response_headers)["X-Client-IP"] == SCRUBBED
    assert dict(last.response_headers)["X-Forwarded-For"] == f"{SCRUBBED}, {SCRUBBED}"
    assert (
        last.body
        == (
            f"Your IP address is {SCRUBBED}\nYour IP address is {SCRUBBED}\n"
            f"connection from {SCRUBBED}:54321\n"
        ).encode()
    )
    # The hash and length describe what the server sent; the annotation says so.
    assert (last.body_sha256, last.body_length) == (
        None,
        length,
    )  # the hash would give the address back
    assert sha == hashlib.sha256(body).hexdigest() != hashlib.sha256(last.body).hexdigest()
    assert clean.annotations[ANNOTATION] == "true"
    # The input is untouched.
    assert _everything(m) == original and ANNOTATION not in m.annotations
    assert m.requests[-1].body == body


def _literal(**kw: object) -> Measurement:
    import datetime as dt

    base = Measurement(measurement_uid=str(uuid.uuid4()), run_id="r",
                       target=http_target("http://example.test/"), vantage=VANTAGE,
                       start_time=dt.datetime(2024, 1, 1, tzinfo=dt.UTC))  # fmt: skip
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_scrub_covers_strings_and_leaves_evidence_alone() -> None:
    v4, v6 = "198.51.100.23", "2001:db8:aa::23"
    raw = bytes([1, 2]) + ipaddress.ip_address(v4).packed + v4.encode()
    m = _literal(
        queries=[DNSQuery("example.test", "A", "udp", "192.0.2.53:53", 0, 1, rcode="NOERROR",
                          answers=[DNSAnswer("A", v4, 60)], raw_response=raw),
                 DNSQuery("example.test", "AAAA", "udp", "192.0.2.53:53", 0, 1,
                          failure=f"unknown_failure: sendto {v6}: no route",
                          failed_operation="write")],
        tcp_connect=[TCPConnect("192.0.2.80", 443, 0, 1,
                                failure=f"unknown_failure: bind {v4}:40000 failed",
                                failed_operation="connect")],
        tls_handshakes=[TLSHandshake("192.0.2.80", 443, "example.test", 0, 1,
                                     peer_certificates=[v4.encode()],
                                     failure=f"unknown_failure: from [{v6.upper()}]:5 reset",
                                     failed_operation="tls_handshake")],
        requests=[
            HTTPTransaction("http://example.test/", "GET", 0, 1, status=302,
                            request_headers=[("X-Forwarded-For", v4), ("Host", "example.test")],
                            response_headers=[("Location", f"http://example.test/?ip={v4}")]),
            HTTPTransaction(f"http://example.test/?ip={v4}", "GET", 0, 1, status=200,
                            body=(f"{v4} 1{v4} {v4}0 {v4}.\n{ipaddress.ip_address(v6).exploded}"
                                  f" {v6}1 fe{v6} ip={v6.replace(':', '%3a')}").encode(),
                            body_length=7, body_sha256="ab" * 32),
        ],
    )  # fmt: skip
    before = _everything(m)
    clean = scrub(m, frozenset({v4, v6}))
    assert _everything(m) == before
    # A DNS answer that is the probe's own address is a placeholder, and the raw reply
    # holding it goes; TLS certificates are not text: unchanged.
    assert clean.queries[0].raw_response is None and m.queries[0].raw_response == raw
    assert clean.queries[0].addresses() == ["0.0.0.0"]
    assert clean.tls_handshakes[0].peer_certificates == [v4.encode()]
    # Failure strings stay in the vocabulary.
    assert clean.queries[1].failure == f"unknown_failure: sendto {SCRUBBED}: no route"
    assert clean.tcp_connect[0].failure == f"unknown_failure: bind {SCRUBBED}:40000 failed"
    assert clean.tls_handshakes[0].failure == f"unknown_failure: from {SCRUBBED}:5 reset"
    first, second = clean.requests
    assert first.url == "http://example.test/"  # the target's own URL
    assert first.request_headers == [("X-Forwarded-For", SCRUBBED), ("Host", "example.test")]
    assert first.response_headers == [("Location", f"http://example.test/?ip={SCRUBBED}")]
    assert second.url == f"http://example.test/?ip={SCRUBBED}"
    # Whole addresses only: 1<v4>, <v4>0, <v6>1 and fe<v6> are other addresses.
    assert second.body == (f"{SCRUBBED} 1{v4} {v4}0 {SCRUBBED}.\n{SCRUBBED} {v6}1 fe{v6}"
                           f" ip={SCRUBBED}").encode()  # fmt: skip
    # A scrubbed body loses its plain hash; without a key there is no keyed one either.
    assert (second.body_length, second.body_sha256, second.body_keyed_sha256) == (7, None, None)
    assert clean.annotations == {ANNOTATION: "true"}
    keyed = scrub(m, frozenset({v4, v6}), key=b"k" * 32).requests[1]
    assert keyed.body_sha256 is None and keyed.body_keyed_sha256 is not None
    assert keyed.body_keyed_sha256 != "ab" * 32 and len(keyed.body_keyed_sha256) == 64


def test_nothing_to_scrub() -> None:
    m = _literal(requests=[HTTPTransaction("http://example.test/", "GET", 0, 1, status=200,
                                           body=b"198.51.100.230")])  # fmt: skip
    for addresses in (frozenset(), {"198.51.100.23"}, ["not an address", ""]):
        clean = scrub(m, addresses)
        assert clean is not m and clean.requests == m.requests
        assert ANNOTATION not in clean.annotations


def test_local_addresses_are_this_machines_without_loopback() -> None:
    found = local_addresses()
    for text in found:
        ip = ipaddress.ip_address(text)
        assert not ip.is_loopback and str(ip) == text
    # The fallback without iproute2 reads the kernel through sockets; what it finds is
    # a subset of what `ip` lists (it sees only each interface's primary IPv4 address).
    if shutil.which("ip"):
        fallback = {a for a in map(privacy._normal, privacy._from_sockets()) if a is not None}
        assert fallback <= found
        assert {a for a in fallback if ":" in a} == {a for a in found if ":" in a}


def test_local_addresses_in_a_namespace_of_our_own() -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (ip netns)")
    ns = f"vt-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        code = "from probe.privacy import local_addresses as f; print(sorted(f()))"
        run = ["ip", "netns", "exec", ns, sys.executable, "-c", code]

        def seen() -> list[str]:
            out = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, check=True)
            return json.loads(out.stdout.replace("'", '"'))

        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        assert seen() == []  # loopback only
        subprocess.run(["ip", "-n", ns, "addr", "add", "198.51.100.9/32", "dev", "lo"], check=True)
        assert seen() == ["198.51.100.9"]
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_run_never_stores_or_prints_this_machines_addresses(tmp_path: Path) -> None:
    own = sorted(local_addresses())
    if not own:
        pytest.skip("this machine has no address besides loopback")
    catalog = tmp_path / "c.toml"
    with EchoServer(own) as echo, DNSServer() as dns:
        catalog.write_text(
            f'format = 1\n[service]\nname = "echo"\n[[target]]\nid = "myip"\nkind = "http"\n'
            f'url = "{echo.url()}"\n'
        )
        data = tmp_path / "d"
        proc = subprocess.run(
            [sys.executable, "-m", "probe", "run", "--json", "--no-builtin", "--targets",
             str(catalog), "--data-dir", str(data), "--no-system-resolver", "--resolver",
             f"udp://127.0.0.1:{dns.port}", "--public-range", "127.0.0.0/8"],
            capture_output=True, text=True, cwd=ROOT, timeout=120,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("VANTAGE_")},
                 "VANTAGE_PRIVACY_CONSENT": "true"},
        )  # fmt: skip
        hits = list(echo.hits)
    assert proc.returncode == 0, proc.stderr
    assert hits == ["/", f"/landing?client={own[0]}"]  # the server did echo them
    (doc,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert doc["annotations"][ANNOTATION] == "true"
    assert any(SCRUBBED in r["response"]["body"] for r in doc["test_keys"]["requests"])
    store = Store.open(sqlite_url(data / "vantage.db"))
    try:
        stored = [json.dumps(d) for d in store.iter_documents()]
    finally:
        store.close()
    assert len(stored) == 1
    files = b"".join(p.read_bytes() for p in data.iterdir() if p.is_file())
    for address in own:
        assert address not in proc.stdout
        assert address not in stored[0]
        assert address.encode() not in files
