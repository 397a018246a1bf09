"""The router agent: resolver, proxy and injector, on loopback and in real namespaces.

The loopback tests run the resolver and the proxy in-process (the proxy is told the
"original destination" instead of asking nftables). The netns test builds
client -- router -- server namespaces with no link to the host, runs the real agent
in the router with nftables redirecting to it, and checks every censoring behaviour
from the client's side.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from probe.lab.censor import parse_dns_rules, parse_proxy_rules
from probe.lab.proxy import Proxy, ProxyConfig
from probe.lab.router import Resolver, ResolverConfig, RouterConfig
from tests.fixtures import DNSServer

ROOT = Path(__file__).resolve().parents[2]


def client_hello(name: str) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


# -- resolver on loopback ------------------------------------------------------------

RULES = [
    {"match": ["web.whatsapp.test", "*.whatsapp.net"], "action": "nxdomain"},
    {"match": ["fail.test"], "action": "servfail"},
    {"match": ["refuse.test"], "action": "refused"},
    {"match": ["empty.test"], "action": "empty"},
    {"match": ["silent.test"], "action": "timeout"},
    {"match": ["signal.test"], "action": "answer", "addresses": ["10.10.34.34", "2001:db8::1"]},
]


@asynccontextmanager
async def resolver(upstream: DNSServer, rules: list[Any] = RULES) -> AsyncIterator[Resolver]:
    config = ResolverConfig(
        listen="127.0.0.2", upstream=upstream.host, upstream_port=upstream.port,
        rules=parse_dns_rules(rules), port=0, timeout=2.0,
    )  # fmt: skip
    server = Resolver(config)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def upstream() -> Iterator[DNSServer]:
    with DNSServer() as server:
        server.set("ok.test", a=["192.0.2.7"], aaaa=["2001:db8::7"])
        server.set("web.whatsapp.test", a=["192.0.2.8"])
        server.set("slow.test", a=["192.0.2.9"], delay=5.0)
        yield server


async def ask(server: Resolver, name: str, rdtype: str = "A", *, tcp: bool = False,
              timeout: float = 2.0) -> dns.message.Message:  # fmt: skip
    q = dns.message.make_query(name, rdtype)
    if tcp:
        return await dns.asyncquery.tcp(q, "127.0.0.2", port=server.port, timeout=timeout)
    return await dns.asyncquery.udp(q, "127.0.0.2", port=server.port, timeout=timeout)


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_resolver_rules(upstream: DNSServer, tcp: bool) -> None:
    async def go() -> None:
        async with resolver(upstream) as r:
            assert (await ask(r, "web.whatsapp.test", tcp=tcp)).rcode() == dns.rcode.NXDOMAIN
            assert (await ask(r, "mmg.whatsapp.net", tcp=tcp)).rcode() == dns.rcode.NXDOMAIN
            assert (await ask(r, "fail.test", tcp=tcp)).rcode() == dns.rcode.SERVFAIL
            assert (await ask(r, "REFUSE.test", tcp=tcp)).rcode() == dns.rcode.REFUSED
            empty = await ask(r, "empty.test", tcp=tcp)
            assert empty.rcode() == dns.rcode.NOERROR and not empty.answer
            a = await ask(r, "signal.test", tcp=tcp)
            assert [x.address for x in a.answer[0]] == ["10.10.34.34"]
            aaaa = await ask(r, "signal.test", "AAAA", tcp=tcp)
            assert [x.address for x in aaaa.answer[0]] == ["2001:db8::1"]
            with pytest.raises(dns.exception.Timeout):
                await ask(r, "silent.test", tcp=tcp, timeout=0.7)
            # Forwarded: the upstream's answer.
            ok = await ask(r, "ok.test", tcp=tcp)
            assert [x.address for x in ok.answer[0]] == ["192.0.2.7"]
            assert (await ask(r, "nothere.test", tcp=tcp)).rcode() == dns.rcode.NXDOMAIN

    asyncio.run(go())
    # Rule-matched names never reach the upstream; forwarded ones do.
    asked = {name for name, _, _ in upstream.queries}
    assert asked == {"ok.test", "nothere.test"}


def test_resolver_relays_upstream_bytes_unchanged(upstream: DNSServer) -> None:
    q = dns.message.make_query("ok.test", "AAAA", use_edns=0, want_dnssec=True).to_wire()

    async def go() -> tuple[bytes, bytes, bytes]:
        direct = await asyncio.to_thread(_raw_udp, q, (upstream.host, upstream.port))
        async with resolver(upstream) as r:
            via_udp = await asyncio.to_thread(_raw_udp, q, ("127.0.0.2", r.port))
            via_tcp = await asyncio.to_thread(_raw_tcp, q, ("127.0.0.2", r.port))
        return direct, via_udp, via_tcp

    direct, via_udp, via_tcp = asyncio.run(go())
    assert direct == via_udp == via_tcp


def _raw_udp(wire: bytes, addr: tuple[str, int], timeout: float = 2.0) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(wire, addr)
        return s.recv(65535)


def _raw_tcp(wire: bytes, addr: tuple[str, int], timeout: float = 2.0) -> bytes:
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(len(wire).to_bytes(2, "big") + wire)
        length = int.from_bytes(_recv_exact(s, 2), "big")
        return _recv_exact(s, length)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("eof")
        out += chunk
    return out


def test_resolver_survives_garbage(upstream: DNSServer) -> None:
    async def go() -> None:
        async with resolver(upstream) as r:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for junk in (b"", b"\x00", b"\x12\x34garbage", os.urandom(600), b"\xff" * 12):
                    s.sendto(junk, ("127.0.0.2", r.port))
            # A TCP client announcing 64 KiB and then going away.
            _, w = await asyncio.open_connection("127.0.0.2", r.port)
            w.write(b"\xff\xff\x00\x01")
            w.close()
            # A pipelined pair over one TCP connection, answered independently.
            reader, writer = await asyncio.open_connection("127.0.0.2", r.port)
            for name in ("fail.test", "ok.test"):
                wire = dns.message.make_query(name, "A").to_wire()
                writer.write(len(wire).to_bytes(2, "big") + wire)
            rcodes = set()
            for _ in range(2):
                length = int.from_bytes(await reader.readexactly(2), "big")
                rcodes.add(dns.message.from_wire(await reader.readexactly(length)).rcode())
            writer.close()
            assert rcodes == {dns.rcode.SERVFAIL, dns.rcode.NOERROR}
            assert (await ask(r, "ok.test")).answer

    asyncio.run(go())


def test_resolver_upstream_silent_means_no_answer(upstream: DNSServer) -> None:
    async def go() -> None:
        async with resolver(upstream) as r:
            task = asyncio.create_task(ask(r, "slow.test", timeout=1.0))
            with pytest.raises(dns.exception.Timeout):
                await task
            assert (await ask(r, "ok.test")).answer  # not blocked by the slow one

    asyncio.run(go())


# -- proxy on loopback ---------------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def _page(text: str, size: int = 0) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            body = text.encode() + b"x" * size
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % len(body) + body)  # fmt: skip
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return handler


async def _banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"220 hello from the server\r\n")
    await _echo(reader, writer)


class Lab:
    """A proxy on 127.0.0.1 whose 'original destination' each test chooses."""

    def __init__(self) -> None:
        self.dst: tuple[str, int] = ("127.0.0.1", 9)
        self.residuals: list[tuple[str, str, int, float]] = []
        self.servers: list[asyncio.Server] = []
        self.proxy: Proxy | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def serve(self, handler: Handler) -> tuple[str, int]:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        self.servers.append(server)
        return ("127.0.0.1", server.sockets[0].getsockname()[1])

    async def start(self, rules: list[Any], **kw: Any) -> None:
        blockpage = await self.serve(_page("<title>Access denied</title>"))

        async def add_residual(src: str, dst: str, port: int, seconds: float) -> None:
            self.residuals.append((src, dst, port, seconds))

        kw.setdefault("inspect_timeout", 1.0)
        config = ProxyConfig(
            listen_port=0, listen_address="127.0.0.1", rules=parse_proxy_rules(rules),
            blockpage_address=blockpage[0], blockpage_port=blockpage[1], **kw,
        )  # fmt: skip
        self.proxy = Proxy(config, original_dst=lambda _sock: self.dst, add_residual=add_residual)
        await self.proxy.start()

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        assert self.proxy is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", self.proxy.port)
        self.writers.append(writer)
        return reader, writer

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        if self.proxy is not None:
            await self.proxy.stop()
        for server in self.servers:
            server.close()


def run_lab(rules: list[Any], body: Callable[[Lab], Awaitable[None]], **kw: Any) -> Lab:
    async def go() -> Lab:
        lab = Lab()
        await lab.start(rules, **kw)
        try:
            await asyncio.wait_for(body(lab), 20)
        finally:
            await lab.close()
        return lab

    return asyncio.run(go())


PROXY_RULES = [
    {"kind": "tls", "match": ["*.signal.test"], "action": "reset", "residual": 30},
    {"kind": "tls", "match": ["drop.test"], "action": "drop"},
    {"kind": "http", "match": ["web.telegram.test"], "action": "blockpage"},
    {"kind": "http", "keyword": "forbidden", "action": "reset", "residual": 5},
]


async def _read_all(reader: asyncio.StreamReader, timeout: float = 3.0) -> bytes:
    return await asyncio.wait_for(reader.read(-1), timeout)


def test_proxy_tls_reset_by_sni_with_residual() -> None:
    async def body(lab: Lab) -> None:
        lab.dst = await lab.serve(_echo)
        reader, writer = await lab.connect()
        writer.write(client_hello("chat.signal.test"))
        with pytest.raises(ConnectionResetError):
            await _read_all(reader)
        writer.close()

    lab = run_lab(PROXY_RULES, body)
    assert lab.residuals == [("127.0.0.1", "127.0.0.1", lab.dst[1], 30.0)]


def test_proxy_tls_allowed_sni_is_relayed_unchanged() -> None:
    async def body(lab: Lab) -> None:
        lab.dst = await lab.serve(_echo)
        reader, writer = await lab.connect()
        hello = client_hello("signal.test")  # the apex is not *.signal.test
        writer.write(hello)
        assert await asyncio.wait_for(reader.readexactly(len(hello)), 3) == hello
        writer.write_eof()
        assert await _read_all(reader) == b""

    assert run_lab(PROXY_RULES, body).residuals == []


def test_proxy_tls_drop_keeps_client_hanging() -> None:
    async def body(lab: Lab) -> None:
        lab.dst = await lab.serve(_echo)
        reader, writer = await lab.connect()
        writer.write(client_hello("drop.test"))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 1.5)
        writer.close()

    run_lab(PROXY_RULES, body)


def test_proxy_sni_in_slow_split_hello() -> None:
    """A ClientHello dribbled out in small pieces is still read before deciding."""

    async def body(lab: Lab) -> None:
        lab.dst = await lab.serve(_echo)
        reader, writer = await lab.connect()
        hello = client_hello("a.signal.test")
        with pytest.raises(ConnectionResetError):  # as soon as the SNI is in
            for i in range(0, len(hello), 40):
                writer.write(hello[i : i + 40])
                await writer.drain()
                await asyncio.sleep(0.01)
            await _read_all(reader)

    run_lab(PROXY_RULES, body)


def test_proxy_http_blockpage_and_keyword_reset() -> None:
    async def body(lab: Lab) -> None:
        lab.dst = await lab.serve(_page("the real page"))
        reader, writer = await lab.connect()
        writer.write(b"GET / HTTP/1.1\r\nHost: web.telegram.test\r\n\r\n")
        assert b"Access denied" in await _read_all(reader)
        reader, writer = await lab.connect()
        writer.write(b"GET /forbidden HTTP/1.1\r\nHost: ok.test\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            await _read_all(reader)
        reader, writer = await lab.connect()
        writer.write(b"GET / HTTP/1.1\r\nHost: ok.test\r\n\r\n")
        assert b"the real page" in await _read_all(reader)

    lab = run_lab(PROXY_RULES, body)
    assert [r[3] for r in lab.residuals] == [5.0]


def test_proxy_throttle_rate() -> None:
    size, rate = 60000, 40000

    async def body(lab: Lab) -> None:
        lab.dst = await lab.serve(_page("", size=size))
        reader, writer = await lab.connect()
        start = time.monotonic()
        writer.write(b"GET / HTTP/1.1\r\nHost: big.test\r\n\r\n")
        data = await _read_all(reader, 10)
        elapsed = time.monotonic() - start
        assert len(data) > size
        assert size / rate * 0.8 < elapsed < size / rate * 2 + 0.5, elapsed

    run_lab([{"kind": "throttle", "addresses": ["127.0.0.1"], "rate": rate}], body)


def test_proxy_server_speaks_first_and_silent_clients() -> None:
    async def body(lab: Lab) -> None:
        lab.dst = await lab.serve(_banner)
        reader, writer = await lab.connect()
        # The banner comes at once, not after the inspection deadline.
        line = await asyncio.wait_for(reader.readline(), 0.5)
        assert line == b"220 hello from the server\r\n"
        writer.write(b"EHLO x\r\n")
        assert await asyncio.wait_for(reader.readline(), 2) == b"EHLO x\r\n"
        writer.close()

    run_lab(PROXY_RULES, body, inspect_timeout=3.0)


def test_proxy_refused_upstream_resets_client() -> None:
    async def body(lab: Lab) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            lab.dst = s.getsockname()  # bound but not listening: refused
            reader, writer = await lab.connect()
            with pytest.raises(ConnectionResetError):
                await _read_all(reader)

    run_lab(PROXY_RULES, body)


def test_proxy_survives_hostile_clients() -> None:
    async def body(lab: Lab) -> None:
        lab.dst = await lab.serve(_echo)
        hello = client_hello("ok.test")
        junk = [
            b"\x16\x03\x01\xff\xff" + os.urandom(200),  # impossible record
            hello[:50],  # truncated hello, then EOF
            b"\x16\x03\x01\x00\x04\x01\xff\xff\xff",  # hello claiming 16 MiB
            os.urandom(3000),
            b"GET / HTTP/1.1\r\nHost: " + b"a" * 20000,  # endless head
        ]
        for data in junk:
            reader, writer = await lab.connect()
            writer.write(data)
            writer.write_eof()
            echoed = await _read_all(reader, 5)
            assert echoed == data  # not censored: relayed byte for byte
        # A client that resets mid-inspection.
        reader, writer = await lab.connect()
        writer.write(b"\x16\x03")
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()
        # Still serving.
        reader, writer = await lab.connect()
        writer.write(b"GET / HTTP/1.1\r\nHost: web.telegram.test\r\n\r\n")
        assert b"Access denied" in await _read_all(reader)

    run_lab(PROXY_RULES, body, inspect_timeout=0.5)


# -- the agent process ---------------------------------------------------------------


def _free_port(host: str) -> int:
    for _ in range(50):
        with socket.socket() as t:
            t.bind((host, 0))
            port = int(t.getsockname()[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind((host, port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


def _wait_ready(path: Path, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and json.loads(path.read_text()) == {"ready": True}:
            return
        if proc.poll() is not None:
            raise AssertionError(
                f"agent exited {proc.returncode}: {proc.stderr and proc.stderr.read()!r}"
            )
        time.sleep(0.05)
    raise AssertionError("agent never became ready")


def test_agent_process_resolves_then_exits_on_sigterm(upstream: DNSServer, tmp_path: Path) -> None:
    port = _free_port("127.0.0.3")
    ready = tmp_path / "ready"
    config = {
        "resolver": {"listen": "127.0.0.3", "port": port, "upstream": upstream.host,
                     "upstream_port": upstream.port, "rules": RULES},
        "ready_file": str(ready),
    }  # fmt: skip
    path = tmp_path / "router.json"
    path.write_text(json.dumps(config))
    proc = subprocess.Popen([sys.executable, "-m", "probe.lab.router", str(path)], cwd=ROOT,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        _wait_ready(ready, proc)
        q = dns.message.make_query("web.whatsapp.test", "A")
        assert dns.query.udp(q, "127.0.0.3", port=port, timeout=2).rcode() == dns.rcode.NXDOMAIN
        ok = dns.query.tcp(dns.message.make_query("ok.test", "A"), "127.0.0.3", port=port,
                           timeout=2)  # fmt: skip
        assert ok.answer
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def test_agent_refuses_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "router.json"
    path.write_text(json.dumps({"resolver": {"listen": "127.0.0.3", "upstream": "127.0.0.1",
                                             "rules": [{"match": ["a"], "action": "lie"}]}}))  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "probe.lab.router", str(path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode == 2
    assert "action" in out.stderr


def test_full_config_from_design_parses() -> None:
    config = RouterConfig.from_dict(
        {
            "resolver": {"listen": "198.18.0.1", "upstream": "198.19.0.53", "rules": [
                {"match": ["web.whatsapp.com", "*.whatsapp.net"], "action": "nxdomain"},
                {"match": ["signal.org"], "action": "answer", "addresses": ["10.10.34.34"]}]},
            "proxy": {"listen_port": 15001, "rules": [
                {"kind": "tls", "match": ["*.signal.org"], "action": "reset", "residual": 0},
                {"kind": "http", "match": ["web.telegram.org"], "action": "blockpage"},
                {"kind": "http", "keyword": "forbidden", "action": "reset"},
                {"kind": "throttle", "addresses": ["198.19.1.7"], "rate": 20000}]},
            "inject": [{"match": ["*.whatsapp.net"], "addresses": ["198.19.9.9"]}],
            "lan_interface": "lan",
            "blockpage_address": "198.19.0.80",
            "nft_table": "vlab",
            "ready_file": "/path/ready",
        }
    )  # fmt: skip
    assert config.resolver is not None and config.resolver.port == 53
    assert config.proxy is not None and config.proxy.blockpage_address == "198.19.0.80"
    assert config.proxy.listen_address == "0.0.0.0" and len(config.proxy.rules) == 4
    assert config.inject[0].addresses == ("198.19.9.9",)


# -- the real thing, in namespaces ---------------------------------------------------
#
# client (vt-X-c: eth0 198.18.0.2) -- (lan 198.18.0.1) router (wan 198.19.0.1) -- server
# (vt-X-s: eth0 198.19.0.2 + service /32s). The veth pairs are created directly inside
# the namespaces, so nothing touches the host's interfaces.

_SERVERS = r"""
import asyncio, json, ssl, sys
import dns.message, dns.rrset
cert, key, ready = sys.argv[1:4]

async def page(reader, writer, text, size=0):
    try:
        await reader.readuntil(b"\r\n\r\n")
        peer = writer.get_extra_info("peername")[0]
        body = (text + " for " + peer).encode() + b"x" * size
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                     % len(body) + body)
        await writer.drain()
    except Exception:
        pass
    writer.close()

async def hold(reader, writer):
    await reader.read(-1)
    writer.close()

class DNS(asyncio.DatagramProtocol):
    def connection_made(self, t):
        self.t = t
    def datagram_received(self, data, addr):
        q = dns.message.from_wire(data)
        r = dns.message.make_response(q)
        r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", "198.19.1.5"))
        asyncio.get_running_loop().call_later(0.02, self.t.sendto, r.to_wire(), addr)

async def main():
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(DNS, local_addr=("198.19.0.53", 53))
    servers = [
        await asyncio.start_server(lambda r, w: page(r, w, "real tls page"), "198.19.1.5", 443,
                                   ssl=ctx),
        await asyncio.start_server(lambda r, w: page(r, w, "real page"), "198.19.1.5", 80),
        await asyncio.start_server(hold, "198.19.1.5", 5222),
        await asyncio.start_server(lambda r, w: page(r, w, "<title>Access denied</title>"),
                                   "198.19.0.80", 80),
        await asyncio.start_server(lambda r, w: page(r, w, "big", 100000), "198.19.1.7", 80),
    ]
    open(ready, "w").write("ok")
    await asyncio.Event().wait()

asyncio.run(main())
"""

_CLIENT = r"""
import json, socket, ssl, sys, time
import dns.message
what, args = sys.argv[1], sys.argv[2:]

def outcome(fn):
    try:
        return fn()
    except ConnectionResetError:
        return "reset"
    except (socket.timeout, TimeoutError):
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    except (OSError, ssl.SSLError) as exc:
        return "error: %r" % exc

def read_all(s):
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out

def tls(host, sni):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, 443), timeout=2) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % sni.encode())
            return read_all(s).decode(errors="replace")

def http(host, name, path="/"):
    with socket.create_connection((host, 80), timeout=3) as s:
        s.sendall(b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path.encode(), name.encode()))
        start = time.monotonic()
        body = read_all(s)
        return {"elapsed": time.monotonic() - start, "size": len(body),
                "text": body[:300].decode(errors="replace")}

def connect(host, port):
    with socket.create_connection((host, int(port)), timeout=1.5):
        return "ok"

def dig(server, name):
    q = dns.message.make_query(name, "A")
    got = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        s.sendto(q.to_wire(), (server, 53))
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            try:
                data, addr = s.recvfrom(4096)
            except socket.timeout:
                continue
            r = dns.message.from_wire(data)
            got.append([addr[0], r.id == q.id, dns.rcode.to_text(r.rcode()),
                        [a.address for rr in r.answer for a in rr]])
    return got

import dns.rcode
print(json.dumps(outcome(lambda: globals()[what](*args))))
"""


def _can_netns() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("nft") is not None


def _sh(*cmd: str, input: str | None = None) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, input=input)
    if out.returncode:
        raise AssertionError(f"{' '.join(cmd)}: {out.stderr.strip()}")
    return out.stdout


class Namespaces:
    """Three fresh namespaces wired client -- router -- server; deleted in ``close``."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.client, self.router, self.server = (f"vt-{tag}-{r}" for r in "crs")
        self.made: list[str] = []

    def build(self) -> None:
        for ns in (self.client, self.router, self.server):
            _sh("ip", "netns", "add", ns)
            self.made.append(ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        c, r, s = self.client, self.router, self.server
        _sh("ip", "-n", r, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", c)
        _sh("ip", "-n", r, "link", "add", "wan", "type", "veth", "peer", "name", "eth0", "netns", s)
        for ns, dev, addrs in (
            (c, "eth0", ["198.18.0.2/24"]),
            (r, "lan", ["198.18.0.1/24"]),
            (r, "wan", ["198.19.0.1/16"]),
            (s, "eth0", ["198.19.0.2/16", "198.19.0.53/32", "198.19.0.80/32",
                         "198.19.1.5/32", "198.19.1.7/32"]),
        ):  # fmt: skip
            for addr in addrs:
                _sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
        _sh("ip", "-n", c, "route", "add", "default", "via", "198.18.0.1")
        _sh("ip", "-n", s, "route", "add", "default", "via", "198.19.0.1")
        _sh("ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # Nothing but our own interfaces exists in any of them.
        for ns, names in ((c, {"lo", "eth0"}), (r, {"lo", "lan", "wan"}), (s, {"lo", "eth0"})):
            links = _sh("ip", "-n", ns, "-o", "link").splitlines()
            assert {ln.split(":")[1].strip().split("@")[0] for ln in links} == names

    def nft(self, ruleset: str) -> None:
        _sh("ip", "netns", "exec", self.router, "nft", "-f", "-", input=ruleset)

    def run(self, ns: str, *cmd: str, timeout: float = 30) -> str:
        return _sh("ip", "netns", "exec", ns, *cmd)

    def spawn(self, ns: str, *cmd: str, log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as fh:
            return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], cwd=ROOT, stdout=fh,
                                    stderr=subprocess.STDOUT)  # fmt: skip

    def close(self) -> None:
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], check=False, timeout=30)


ROUTER_NFT = """
table inet vlab {
    set residual { type ipv4_addr . ipv4_addr . inet_service; flags timeout; }
    chain resid {
        type filter hook prerouting priority -150;
        iifname "lan" tcp flags & (syn | ack) == syn ip saddr . ip daddr . tcp dport @residual drop
    }
    chain pre {
        type nat hook prerouting priority dstnat;
        iifname "lan" meta l4proto tcp redirect to :15001
    }
}
"""


def _wait_file(path: Path, procs: list[subprocess.Popen[bytes]], logs: list[Path]) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        for proc, log in zip(procs, logs, strict=True):
            if proc.poll() is not None:
                raise AssertionError(f"exited {proc.returncode}: {log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.05)


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.parametrize("transparent", [False, True], ids=["proxied", "transparent"])
def test_router_agent_in_namespaces(tmp_path: Path, transparent: bool) -> None:
    if not _can_netns():
        pytest.skip("needs root, iproute2 and nftables")
    trustme = pytest.importorskip("trustme")
    leaf = trustme.CA().issue_cert("*.signal.test", "ok.test", "drop.test")
    cert, key = tmp_path / "site.pem", tmp_path / "site.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    server_py, client_py = tmp_path / "servers.py", tmp_path / "client.py"
    server_py.write_text(_SERVERS)
    client_py.write_text(_CLIENT)
    config = {
        "resolver": {"listen": "198.18.0.1", "upstream": "198.19.0.53",
                     "rules": [{"match": ["blocked.test"], "action": "nxdomain"}]},
        "proxy": {"listen_port": 15001, "transparent_source": transparent, "rules": [
            {"kind": "tls", "match": ["*.signal.test"], "action": "reset", "residual": 4},
            {"kind": "tls", "match": ["drop.test"], "action": "drop"},
            {"kind": "http", "match": ["web.telegram.test"], "action": "blockpage"},
            {"kind": "http", "keyword": "forbidden", "action": "reset"},
            {"kind": "throttle", "addresses": ["198.19.1.7"], "rate": 50000}]},
        "inject": [{"match": ["*.whatsapp.test"], "addresses": ["198.19.9.9"]}],
        "lan_interface": "lan",
        "blockpage_address": "198.19.0.80",
        "nft_table": "vlab",
        "ready_file": str(tmp_path / "router.ready"),
    }  # fmt: skip
    (tmp_path / "router.json").write_text(json.dumps(config))

    lab = Namespaces()
    procs: list[subprocess.Popen[bytes]] = []
    logs = [tmp_path / "servers.log", tmp_path / "router.log"]
    try:
        lab.build()
        lab.nft(ROUTER_NFT)
        if transparent:
            from probe.lab.proxy import transparent_setup

            for cmd in transparent_setup("vlab"):
                lab.run(lab.router, *cmd)
        procs.append(lab.spawn(lab.server, sys.executable, str(server_py), str(cert), str(key),
                               str(tmp_path / "servers.ready"), log=logs[0]))  # fmt: skip
        _wait_file(tmp_path / "servers.ready", procs, logs[:1])
        procs.append(lab.spawn(lab.router, sys.executable, "-m", "probe.lab.router",
                               str(tmp_path / "router.json"), log=logs[1]))  # fmt: skip
        _wait_file(tmp_path / "router.ready", procs, logs)

        def client(*args: str) -> Any:
            out = lab.run(lab.client, sys.executable, str(client_py), *args)
            return json.loads(out)

        try:
            _check_censorship(lab, client, transparent)
        except BaseException:
            print(logs[1].read_text())
            raise
        procs[1].send_signal(signal.SIGTERM)
        assert procs[1].wait(15) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        lab.close()
    remaining = _sh("ip", "netns", "list")
    assert not any(ns in remaining for ns in (lab.client, lab.router, lab.server))


def _check_censorship(lab: Namespaces, client: Callable[..., Any], transparent: bool) -> None:
    source = "198.18.0.2" if transparent else "198.19.0.1"
    # TLS by SNI: allowed, reset (with residual), dropped.
    assert client("tls", "198.19.1.5", "ok.test").endswith(f"real tls page for {source}")
    assert client("tls", "198.19.1.5", "chat.signal.test") == "reset"
    elements = lab.run(lab.router, "nft", "list", "set", "inet", "vlab", "residual")
    assert "198.18.0.2 . 198.19.1.5 . 443" in elements
    # Residual: the same client, server and port is now dropped at the SYN...
    assert client("connect", "198.19.1.5", "443") == "timeout"
    assert client("tls", "198.19.1.5", "ok.test") == "timeout"
    # ... but not another port, nor after the residual period.
    assert client("connect", "198.19.1.5", "5222") == "ok"
    time.sleep(4.5)
    assert client("connect", "198.19.1.5", "443") == "ok"
    assert client("tls", "198.19.1.5", "drop.test") == "timeout"
    # Plain HTTP: blockpage, keyword reset, allowed.
    page = client("http", "198.19.1.5", "web.telegram.test")
    assert "Access denied" in page["text"]
    assert client("http", "198.19.1.5", "ok.test", "/a/forbidden/path") == "reset"
    assert client("http", "198.19.1.5", "ok.test")["text"].endswith(f"real page for {source}")
    # Throttling: 100 kB at 50 kB/s.
    big = client("http", "198.19.1.7", "big.test")
    assert big["size"] > 100000
    assert 1.5 < big["elapsed"] < 4.0, big
    # The ISP resolver.
    assert client("dig", "198.18.0.1", "blocked.test") == [["198.18.0.1", True, "NXDOMAIN", []]]
    assert client("dig", "198.18.0.1", "ok.test") == [["198.18.0.1", True, "NOERROR",
                                                      ["198.19.1.5"]]]  # fmt: skip
    # On-path injection: an address with no DNS server answers...
    forged = ["198.19.0.111", True, "NOERROR", ["198.19.9.9"]]
    assert client("dig", "198.19.0.111", "mmg.whatsapp.test") == [forged]
    assert client("dig", "198.19.0.111", "ok.test") == []
    # ... and a real server's answer comes second.
    assert client("dig", "198.19.0.53", "mmg.whatsapp.test") == [
        ["198.19.0.53", True, "NOERROR", ["198.19.9.9"]],
        ["198.19.0.53", True, "NOERROR", ["198.19.1.5"]],
    ]


_TUN_PEER = r"""
import fcntl, json, os, select, struct, subprocess, sys, time
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import IP, UDP
tun_ready, agent_ready = sys.argv[1:3]
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", b"lan", 0x0001 | 0x1000))  # TUN, no PI
subprocess.run(["ip", "addr", "add", "198.18.0.1/24", "dev", "lan"], check=True)
subprocess.run(["ip", "link", "set", "lan", "up"], check=True)
open(tun_ready, "w").write("ok")
deadline = time.monotonic() + 30
while not os.path.exists(agent_ready) and time.monotonic() < deadline:
    time.sleep(0.05)
got = []
for name in ("mmg.whatsapp.test", "ok.test"):
    q = IP(src="198.18.0.2", dst="198.19.0.111") / UDP(sport=4444, dport=53) / DNS(
        id=99, rd=1, qd=DNSQR(qname=name))
    os.write(fd, bytes(q))
    end = time.monotonic() + 1.0
    while (left := end - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            continue
        p = IP(os.read(fd, 65535))
        if p.version == 4 and UDP in p and p[UDP].sport == 53 and DNS in p:
            got.append([name, p.src, p.dst, p[UDP].dport, p[DNS].id,
                        [str(r.rdata) for r in p[DNS].an]])
print(json.dumps(got))
"""


@pytest.mark.netns
def test_injector_on_a_tun_link(tmp_path: Path) -> None:
    """probe.lab.link makes ``lan`` a TUN device (raw IP): injection must work there too."""
    if not _can_netns():
        pytest.skip("needs root, iproute2 and nftables")
    ns = f"vt-{uuid.uuid4().hex[:8]}-r"
    peer_py = tmp_path / "peer.py"
    peer_py.write_text(_TUN_PEER)
    tun_ready, agent_ready = tmp_path / "tun.ready", tmp_path / "agent.ready"
    config = tmp_path / "router.json"
    config.write_text(json.dumps({
        "inject": [{"match": ["*.whatsapp.test"], "addresses": ["198.19.9.9"]}],
        "lan_interface": "lan", "ready_file": str(agent_ready),
    }))  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    _sh("ip", "netns", "add", ns)
    try:
        peer = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, str(peer_py), str(tun_ready),
             str(agent_ready)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        procs.append(peer)
        log = tmp_path / "router.log"
        deadline = time.monotonic() + 30
        while not tun_ready.exists():
            assert peer.poll() is None and time.monotonic() < deadline, peer.communicate()
            time.sleep(0.05)
        with log.open("wb") as fh:
            agent = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "probe.lab.router", str(config)],
                cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
            )  # fmt: skip
        procs.append(agent)
        out, err = peer.communicate(timeout=60)
        assert peer.returncode == 0, err
        got = json.loads(out)
        assert got == [
            ["mmg.whatsapp.test", "198.19.0.111", "198.18.0.2", 4444, 99, ["198.19.9.9"]]
        ], log.read_text()
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(15) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=30)
