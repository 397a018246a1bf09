"""The far side of the NAT test (tests/probe/test_nat_privacy.py), run inside the
"world" namespace that test creates: servers that echo the client's address back in
every form a real server was seen to, a resolver whose whoami answers with it (a home
router resolving recursively), and, with ``--collector``, a collector stand-in.

    ip netns exec NS python -m tests.probe.natworld --address 198.51.100.10 --dir D

Every client address seen is written to ``D/seen.txt`` (the test checks it is the
probe's public one); uploads go to ``D/uploads.jsonl``.
"""

from __future__ import annotations

import argparse
import gzip
import ipaddress
import json
import socket
import threading
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dns.message
import dns.rcode
import dns.rrset

ZONE = "nat.test."


def forms(ip: str) -> list[str]:
    """The spellings of an IPv4 address the echo servers use."""
    a = ipaddress.IPv4Address(ip)
    o = ip.split(".")
    return [
        ip, "-".join(o), "_".join(o), ".".join(reversed(o)) + ".in-addr.arpa",
        "%2E".join(o), ".".join(f"{int(x):03d}" for x in o), str(int(a)),
        f"::ffff:{ip}", "&#" + ";&#".join(str(ord(c)) for c in ip) + ";",
    ]  # fmt: skip


def page(ip: str) -> bytes:
    return ("<html><body>Your address: " + " | ".join(forms(ip)) + "</body></html>").encode()


class Echo(BaseHTTPRequestHandler):
    out: Path

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, code: int, body: bytes, headers: list[tuple[str, str]]) -> None:
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        ip = self.client_address[0]
        with open(self.out / "seen.txt", "a") as f:
            f.write(ip + "\n")
        rdns = "-".join(ip.split(".")) + ".dyn.isp.test"
        common = [("X-Client-IP", ip), ("X-Rdns", rdns), ("Set-Cookie", f"seen={ip}")]
        path = self.path.split("?", 1)[0]
        if path == "/":
            self._send(302, b"", [*common, ("Location", f"/page?seen={ip}&via={rdns}")])
        elif path == "/page":
            self._send(200, page(ip), [*common, ("Content-Type", "text/html")])
        elif path == "/gz":
            body = gzip.compress(gzip.compress(page(ip)))
            self._send(200, body, [*common, ("Content-Encoding", "gzip, gzip")])
        elif path == "/deflate":
            body = gzip.compress(zlib.compress(page(ip)))
            self._send(200, body, [*common, ("Content-Encoding", "deflate, gzip")])
        elif path == "/enc":
            self._send(200, page(ip), [*common, ("Content-Encoding", f"x-{ip}")])
        elif path == "/u16":
            body = page(ip).decode().encode("utf-16")
            self._send(200, body, [*common, ("Content-Type", "text/html; charset=utf-16")])
        elif path == "/big":  # the address after the part of the body that is kept
            body = b"x" * 100_000 + page(ip)
            self._send(200, body, [*common, ("Content-Type", "text/plain")])
        elif path == "/api/v1/whoami" and self.server.server_port != 80:
            who = {"ip": ip, "asn": 64500, "cc": "ZZ", "network_name": "NAT test ISP"}
            self._send(200, json.dumps(who).encode(), [("Content-Type", "application/json")])
        else:
            self._send(404, b"no", [])

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        if self.headers.get("Content-Encoding") == "gzip":
            raw = gzip.decompress(raw)
        if self.path == "/api/v1/enroll":
            probe_id = json.loads(raw)["probe_id"]
            answer = {"probe_id": probe_id, "credential": "cred-" + uuid.uuid4().hex}
            self._send(201, json.dumps(answer).encode(), [("Content-Type", "application/json")])
            return
        if self.path == "/api/v1/measurements":
            with open(self.out / "uploads.jsonl", "ab") as f:
                f.write(raw + b"\n")
            docs = json.loads(raw)["measurements"]
            results = [{"measurement_uid": d["measurement_uid"], "status": "accepted"}
                       for d in docs]  # fmt: skip
            answer = {"accepted": len(docs), "duplicate": 0, "rejected": 0, "results": results}
            self._send(200, json.dumps(answer).encode(), [("Content-Type", "application/json")])
            return
        self._send(404, b"no", [])


def serve_dns(address: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, 53))
    while True:
        data, peer = sock.recvfrom(4096)
        try:
            q = dns.message.from_wire(data)
        except Exception:  # noqa: BLE001 (a test server ignores what it cannot read)
            continue
        r = dns.message.make_response(q)
        name = q.question[0].name.to_text().lower()
        if name == "whoami." + ZONE:  # what a recursive resolver's egress looks like
            r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", peer[0]))
        elif name.endswith(ZONE) and q.question[0].rdtype == 1:
            r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", address))
        elif not name.endswith(ZONE):
            r.set_rcode(dns.rcode.NXDOMAIN)
        sock.sendto(r.to_wire(), peer)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--dir", required=True, type=Path)
    ap.add_argument("--collector", action="store_true", help="serve the collector on :8080")
    args = ap.parse_args()
    Echo.out = args.dir
    servers = [] if args.collector else [(args.address, 80)]
    if args.collector:
        servers.append((args.address, 8080))
    else:
        threading.Thread(target=serve_dns, args=(args.address,), daemon=True).start()
    threads = []
    for host, port in servers:
        httpd = ThreadingHTTPServer((host, port), Echo)
        t = threading.Thread(target=httpd.serve_forever, daemon=True)
        t.start()
        threads.append(t)
    (args.dir / ("collector.ready" if args.collector else "world.ready")).write_text("ok")
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
