"""The lab's Internet agent (``python -m probe.lab.internet``), run as a real subprocess.

Everything binds to and talks over 127.0.0.0/8 (the whole /8 is local on Linux), so
the agent's many addresses can be exercised without a namespace. Each run uses its
own 127.B.x.y block (B from the pid) so parallel runs don't collide.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.message
import dns.query
import dns.rcode
import httpx
import psutil
import pytest
import trustme

from probe.lab.internet import (
    CHALLENGE_TITLE,
    ConfigError,
    LabZone,
    parse_config,
)
from probe.lab.servers import BLOCK_PAGE, Behaviour, pattern_body

ROOT = Path(__file__).resolve().parents[2]
B = 100 + os.getpid() % 100
READY_TIMEOUT = 30.0
DNS_DELAY = 0.3
BIG = 32 << 20


def ip(x: int, y: int) -> str:
    """An address in this run's own 127.B.0.0/16 block."""
    return f"127.{B}.{x}.{y}"


DNS_A, DNS_B = ip(0, 53), ip(0, 99)
DOH = ip(0, 99)
BLOCKPAGE = ip(0, 80)
PAGE, REDIR, BIGSITE, CHALLENGE, DOWN, TELEGRAM = (
    ip(1, 1), ip(1, 2), ip(1, 3), ip(1, 4), ip(1, 5), ip(2, 1),
)  # fmt: skip
PROBE, OTHER = ip(9, 1), ip(9, 2)


def free_port(address: str, udp_too: bool = False, also: tuple[str, ...] = ()) -> int:
    """A port free for TCP (and UDP, if asked) on ``address`` and every address in ``also``."""
    kinds = (socket.SOCK_STREAM, socket.SOCK_DGRAM) if udp_too else (socket.SOCK_STREAM,)
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((address, 0))
            port: int = s.getsockname()[1]
        try:
            for host in (address, *also):
                for kind in kinds:
                    with socket.socket(socket.AF_INET, kind) as probe:
                        probe.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no free port on {address}")


def free_ports(address: str, count: int) -> list[int]:
    """``count`` distinct TCP ports free on ``address`` (all held open while choosing)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind((address, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


@dataclass
class Agent:
    """A running agent subprocess and what the test needs to talk to it."""

    proc: subprocess.Popen[bytes]
    ready_file: Path
    stderr_file: Path
    config: dict[str, Any]
    ca: str = ""
    ports: dict[str, int] = field(default_factory=dict)

    def stderr(self) -> str:
        return self.stderr_file.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise


def launch(config: dict[str, Any], workdir: Path, wait: bool = True) -> Agent:
    """Write ``config``, start the agent on it, and (by default) wait for its ready file."""
    workdir.mkdir(parents=True, exist_ok=True)
    ready = workdir / "ready"
    config = {**config, "ready_file": str(ready)}
    path = workdir / "internet.json"
    path.write_text(json.dumps(config))
    stderr_file = workdir / "stderr"
    with stderr_file.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "probe.lab.internet", str(path)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    agent = Agent(proc, ready, stderr_file, config)
    if wait:
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready.exists():
            if proc.poll() is not None:
                raise AssertionError(f"agent exited {proc.returncode}: {agent.stderr()}")
            if time.monotonic() > deadline:
                agent.stop()
                raise AssertionError("agent never became ready")
            time.sleep(0.02)
    return agent


def write_leaf(ca: trustme.CA, directory: Path, stem: str, *names: str) -> tuple[str, str]:
    """Issue a cert for ``names`` and write (cert chain PEM, key PEM) files."""
    leaf = ca.issue_cert(*names)
    cert, key = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return str(cert), str(key)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """One agent with every kind of server DESIGN.md lists."""
    work = tmp_path_factory.mktemp("internet")
    ca = trustme.CA()
    ca_path = work / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    certs = {
        "page": write_leaf(ca, work, "page", "www.page.test", "page.test"),
        "redir": write_leaf(ca, work, "redir", "redir.test"),
        "big": write_leaf(ca, work, "big", "big.test"),
        "cdn": write_leaf(ca, work, "cdn", "cdn.test"),
        "doh": write_leaf(ca, work, "doh", DOH),
    }
    ports = {"dns": free_port(DNS_A, udp_too=True, also=(DNS_B,)), "doh": free_port(DOH)}
    ports["blockpage"] = free_port(BLOCKPAGE)
    ports["down_tls"], ports["down_http"] = free_ports(DOWN, 2)
    ports["tg80"], ports["tg443"] = free_ports(TELEGRAM, 2)
    ports["page_tls"], ports["page_http"], ports["tcp"] = free_ports(PAGE, 3)
    for key, address in (("redir", REDIR), ("big", BIGSITE), ("cdn", CHALLENGE)):
        ports[f"{key}_tls"], ports[f"{key}_http"] = free_ports(address, 2)

    def site(address: str, key: str, names: list[str], behaviour: str, **kw: Any) -> dict[str, Any]:
        cert, pkey = certs[key]
        return {
            "address": address, "names": names, "behaviour": behaviour,
            "tls_ports": [ports[f"{key}_tls"]], "http_ports": [ports[f"{key}_http"]],
            "tcp_ports": [], "cert": cert, "key": pkey, **kw,
        }  # fmt: skip

    page = site(PAGE, "page", ["www.page.test", "page.test"], "page")
    page["tcp_ports"] = [ports["tcp"]]
    config = {
        "zone": {
            "www.page.test": {"a": [PAGE], "aaaa": ["2001:db8::1"], "ttl": 60},
            "Page.Test.": {"a": [PAGE], "aaaa": []},
            "redir.test": {"a": [REDIR], "aaaa": [], "ttl": 300},
            "*.wild.test": {"a": [ip(1, 9)], "aaaa": [], "ttl": 300},
        },
        "dns_listen": [DNS_A, DNS_B],
        "dns_port": ports["dns"],
        "dns_delay": DNS_DELAY,
        "doh": {"address": DOH, "cert": certs["doh"][0], "key": certs["doh"][1],
                "port": ports["doh"]},
        "blockpage": {"address": BLOCKPAGE, "port": ports["blockpage"]},
        "probe_address": PROBE,
        "sites": [
            page,
            site(REDIR, "redir", ["redir.test"], "redirect", redirects=3),
            site(BIGSITE, "big", ["big.test"], "big", size=BIG),
            site(CHALLENGE, "cdn", ["cdn.test"], "challenge"),
            {"address": DOWN, "names": ["down.test"], "behaviour": "down",
             "tls_ports": [ports["down_tls"]], "http_ports": [ports["down_http"]],
             "cert": certs["page"][0], "key": certs["page"][1]},
            {"address": TELEGRAM, "names": [], "behaviour": "page",
             "http_ports": [ports["tg80"], ports["tg443"]]},
        ],
    }  # fmt: skip
    running = launch(config, work)
    running.ca = str(ca_path)
    running.ports = ports
    try:
        yield running
    finally:
        rc = running.stop()
        assert rc == 0, running.stderr()


def client(agent: Agent, local: str | None = None) -> httpx.Client:
    """A verifying client (trusting the test CA only), optionally bound to ``local``."""
    verify = ssl.create_default_context(cafile=agent.ca)
    transport = httpx.HTTPTransport(verify=verify, local_address=local)
    return httpx.Client(transport=transport, timeout=10.0)


def fetch(
    c: httpx.Client,
    scheme: str,
    address: str,
    port: int,
    host: str,
    path: str = "/",
    method: str = "GET",
    **kw: Any,
) -> httpx.Response:
    """Request ``path`` from address:port as ``host`` (Host header and SNI)."""
    extensions = {"sni_hostname": host} if scheme == "https" else {}
    return c.request(
        method,
        f"{scheme}://{address}:{port}{path}",
        headers={"Host": host},
        extensions=extensions,
        **kw,
    )


def title(response: httpx.Response) -> str:
    text = response.text
    return text.split("<title>", 1)[1].split("</title>", 1)[0]


# ---------------------------------------------------------------------------- DNS


def dns_ask(agent: Agent, name: str, rdtype: str, server: str = DNS_A, tcp: bool = False
            ) -> tuple[dns.message.Message, float]:  # fmt: skip
    query = dns.message.make_query(name, rdtype)
    start = time.monotonic()
    ask = dns.query.tcp if tcp else dns.query.udp
    reply = ask(query, server, port=agent.ports["dns"], timeout=5)
    return reply, time.monotonic() - start


def addresses(reply: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in reply.answer for rd in rrset)


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize("server", [DNS_A, DNS_B])
def test_dns_answers_a_and_aaaa_from_the_zone_after_the_delay(
    agent: Agent, server: str, tcp: bool
) -> None:
    reply, elapsed = dns_ask(agent, "www.page.test", "A", server, tcp)
    assert reply.rcode() == dns.rcode.NOERROR
    assert addresses(reply) == [PAGE]
    assert reply.answer[0].ttl == 60
    assert elapsed >= DNS_DELAY - 0.01
    reply, _ = dns_ask(agent, "www.page.test", "AAAA", server, tcp)
    assert addresses(reply) == ["2001:db8::1"]


def test_dns_names_are_case_insensitive_and_missing_types_are_nodata(agent: Agent) -> None:
    reply, _ = dns_ask(agent, "WWW.PAGE.Test.", "A")
    assert addresses(reply) == [PAGE]
    reply, _ = dns_ask(agent, "page.test", "A")  # the zone key was "Page.Test."
    assert addresses(reply) == [PAGE]
    reply, _ = dns_ask(agent, "page.test", "AAAA")
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer == []


def test_dns_nxdomain_for_every_name_outside_the_zone(agent: Agent) -> None:
    reply, elapsed = dns_ask(agent, "nothing.page.test", "A")
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert elapsed >= DNS_DELAY - 0.01
    reply, _ = dns_ask(agent, "sub.redir.test", "AAAA", tcp=True)
    assert reply.rcode() == dns.rcode.NXDOMAIN
    reply, _ = dns_ask(agent, "gone.example", "A")
    assert reply.rcode() == dns.rcode.NXDOMAIN


def test_dns_wildcard_zone_keys(agent: Agent) -> None:
    reply, _ = dns_ask(agent, "a.b.wild.test", "A")
    assert addresses(reply) == [ip(1, 9)]
    reply, _ = dns_ask(agent, "wild.test", "A")
    assert reply.rcode() == dns.rcode.NXDOMAIN


def test_dns_delays_overlap(agent: Agent) -> None:
    """Answers are delayed, not serialised: 20 concurrent queries take about one delay."""

    async def many() -> list[dns.message.Message]:
        queries = [dns.message.make_query("www.page.test", "A") for _ in range(20)]
        return await asyncio.gather(
            *(dns.asyncquery.udp(q, DNS_A, port=agent.ports["dns"], timeout=5) for q in queries)
        )

    start = time.monotonic()
    replies = asyncio.run(many())
    assert all(addresses(r) == [PAGE] for r in replies)
    assert time.monotonic() - start < DNS_DELAY * 4


def test_lab_zone_matching() -> None:
    zone = LabZone(
        {
            "web.whatsapp.com": Behaviour(a=["198.19.1.5"]),
            "*.cdn.example": Behaviour(a=["1.2.3.4"]),
        },
        0.0,
    )
    assert zone.find("web.whatsapp.com") == Behaviour(a=["198.19.1.5"])
    assert zone.find("whatsapp.com") is None
    assert zone.find("x.whatsapp.com") is None
    assert zone.find("a.cdn.example") == Behaviour(a=["1.2.3.4"])
    assert zone.find("cdn.example") is None
    assert zone.find("signal.org") is None


# --------------------------------------------------------------------------- DoH


def test_doh_post_and_get(agent: Agent) -> None:
    url = f"https://{DOH}:{agent.ports['doh']}/dns-query"
    query = dns.message.make_query("www.page.test", "A")
    with client(agent) as c:
        start = time.monotonic()
        response = c.post(
            url,
            content=query.to_wire(),
            headers={
                "content-type": "application/dns-message",
                "accept": "application/dns-message",
            },
        )
        assert time.monotonic() - start >= DNS_DELAY - 0.01
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/dns-message"
        reply = dns.message.from_wire(response.content)
        assert reply.id == query.id and addresses(reply) == [PAGE]

        missing = dns.message.make_query("missing.page.test", "A")
        param = base64.urlsafe_b64encode(missing.to_wire()).rstrip(b"=").decode()
        response = c.get(url, params={"dns": param})
        assert response.status_code == 200
        assert dns.message.from_wire(response.content).rcode() == dns.rcode.NXDOMAIN

        wrong = c.post(url, content=query.to_wire(), headers={"content-type": "text/plain"})
        assert wrong.status_code == 415
        assert c.get(f"https://{DOH}:{agent.ports['doh']}/other").status_code == 404


# -------------------------------------------------------------------------- sites


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_page_is_titled_after_the_requested_name(agent: Agent, scheme: str) -> None:
    port = agent.ports[f"page_{scheme.replace('https', 'tls')}"]
    with client(agent) as c:
        for host in ("www.page.test", "page.test"):
            response = fetch(c, scheme, PAGE, port, host)
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/html")
            assert title(response) == host
        posted = fetch(c, scheme, PAGE, port, "page.test", method="POST", content=b"x" * 5000)
        assert posted.status_code == 200 and title(posted) == "page.test"
        head = fetch(c, scheme, PAGE, port, "page.test", method="HEAD")
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) > 0


def test_tls_presents_the_configured_certificate(agent: Agent) -> None:
    with client(agent) as c:
        # The page cert is not valid for redir.test: verification must fail.
        with pytest.raises(httpx.ConnectError):
            fetch(c, "https", PAGE, agent.ports["page_tls"], "redir.test")


def test_keep_alive_serves_many_requests_on_one_connection(agent: Agent) -> None:
    with client(agent) as c:
        for _ in range(5):
            assert fetch(c, "https", PAGE, agent.ports["page_tls"], "page.test").status_code == 200


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_redirect_hops_on_the_same_host_then_the_page(agent: Agent, scheme: str) -> None:
    port = agent.ports[f"redir_{scheme.replace('https', 'tls')}"]
    path = "/"
    hops = 0
    with client(agent) as c:
        while True:
            response = fetch(c, scheme, REDIR, port, "redir.test", path)
            if response.status_code != 302:
                break
            hops += 1
            location = httpx.URL(response.headers["location"])
            assert location.host == "redir.test" and location.scheme == scheme
            path = location.path
            assert hops <= 10
    assert hops == 3
    assert response.status_code == 200 and title(response) == "redir.test"


def test_big_streams_its_size_without_holding_it(agent: Agent) -> None:
    agent_process = psutil.Process(agent.proc.pid)
    before = agent_process.memory_info().rss
    peak = before
    received = 0
    first = b""
    with client(agent) as c:
        url = f"https://{BIGSITE}:{agent.ports['big_tls']}/"
        with c.stream("GET", url, headers={"Host": "big.test"},
                      extensions={"sni_hostname": "big.test"}) as response:  # fmt: skip
            assert response.status_code == 200
            assert int(response.headers["content-length"]) == BIG
            for chunk in response.iter_raw(1 << 16):
                if len(first) < 1 << 17:
                    first += chunk
                received += len(chunk)
                if received % (4 << 20) < len(chunk):
                    peak = max(peak, agent_process.memory_info().rss)
    assert received == BIG
    assert first[: 1 << 17] == pattern_body(1 << 17)
    assert peak - before < 16 << 20, f"agent grew by {(peak - before) >> 20} MiB"
    with client(agent) as c:
        plain = fetch(c, "http", BIGSITE, agent.ports["big_http"], "big.test")
        assert len(plain.content) == BIG
        head = fetch(c, "http", BIGSITE, agent.ports["big_http"], "big.test", method="HEAD")
        assert head.headers["content-length"] == str(BIG) and head.content == b""


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_challenge_only_for_the_probe_address(agent: Agent, scheme: str) -> None:
    port = agent.ports[f"cdn_{scheme.replace('https', 'tls')}"]
    with client(agent, local=PROBE) as c:
        response = fetch(c, scheme, CHALLENGE, port, "cdn.test")
        assert response.status_code == 503
        assert title(response) == CHALLENGE_TITLE and "CAPTCHA" in response.text
        posted = fetch(c, scheme, CHALLENGE, port, "cdn.test", method="POST", content=b"{}")
        assert posted.status_code == 503
    with client(agent, local=OTHER) as c:
        response = fetch(c, scheme, CHALLENGE, port, "cdn.test")
        assert response.status_code == 200 and title(response) == "cdn.test"


def test_down_site_listens_nowhere(agent: Agent) -> None:
    for port in (agent.ports["down_tls"], agent.ports["down_http"]):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((DOWN, port), timeout=2).close()


def test_http_on_several_ports_and_post_for_a_nameless_site(agent: Agent) -> None:
    with client(agent) as c:
        for port in (agent.ports["tg80"], agent.ports["tg443"]):
            response = c.post(f"http://{TELEGRAM}:{port}/api", content=b"\x00" * 64)
            assert response.status_code == 200 and title(response) == TELEGRAM


def test_tcp_ports_accept_and_hold(agent: Agent) -> None:
    with socket.create_connection((PAGE, agent.ports["tcp"]), timeout=2) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: page.test\r\n\r\n")
        s.settimeout(0.5)
        with pytest.raises(TimeoutError):
            s.recv(100)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(3)
        assert s.recv(100) == b""  # closed only once we closed our side


def test_blockpage_answers_everything(agent: Agent) -> None:
    port = agent.ports["blockpage"]
    with client(agent) as c:
        for method, path, host in (("GET", "/", "web.telegram.org"), ("POST", "/x?y=1", "a.b")):
            response = fetch(c, "http", BLOCKPAGE, port, host, path, method=method, content=b"")
            assert response.status_code == 200
            assert response.content == BLOCK_PAGE
            assert title(response) == "Access denied"
            assert "blocked by order of the authorities" in response.text


def test_ready_file(agent: Agent) -> None:
    assert json.loads(agent.ready_file.read_text()) == {"ready": True}
    assert not [p for p in agent.ready_file.parent.iterdir() if p.name.endswith(".tmp")]


def test_malformed_requests_get_400(agent: Agent) -> None:
    with socket.create_connection((PAGE, agent.ports["page_http"]), timeout=2) as s:
        s.sendall(b"NONSENSE\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400 ")


# --------------------------------------------------------------- lifecycle, scale


def test_sigterm_exits_cleanly_with_open_connections(tmp_path: Path) -> None:
    address = ip(4, 1)
    port, hold = free_port(address), free_port(address)
    config = {
        "zone": {"x.test": {"a": [address]}},
        "dns_listen": [address],
        "dns_port": free_port(address, udp_too=True),
        "sites": [{"address": address, "names": ["x.test"], "http_ports": [port],
                   "tcp_ports": [hold], "behaviour": "page"}],
    }  # fmt: skip
    agent = launch(config, tmp_path)
    held = socket.create_connection((address, hold), timeout=2)
    idle = socket.create_connection((address, port), timeout=2)
    idle.sendall(b"GET / HTTP/1.1\r\nHost: x.test\r\n\r\n")
    assert idle.recv(1000).startswith(b"HTTP/1.1 200 ")
    try:
        assert agent.stop() == 0
        assert agent.stderr() == ""
        held.settimeout(3)
        try:
            assert held.recv(10) == b""
        except ConnectionResetError:
            pass
    finally:
        held.close()
        idle.close()


def test_bad_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    config = {"sites": [{"address": ip(4, 2), "behaviour": "sideways"}]}
    agent = launch(config, tmp_path, wait=False)
    assert agent.proc.wait(20) == 2
    assert "config.sites[0].behaviour" in agent.stderr()
    assert not agent.ready_file.exists()


def test_unbindable_address_exits_1_without_ready(tmp_path: Path) -> None:
    # 192.0.2.1 (TEST-NET-1) is not on any interface: bind fails, nothing is sent.
    config = {"sites": [{"address": "192.0.2.1", "http_ports": [8080], "behaviour": "page"}]}
    agent = launch(config, tmp_path, wait=False)
    assert agent.proc.wait(20) == 1
    assert "192.0.2.1:8080" in agent.stderr()
    assert not agent.ready_file.exists()


def test_parse_config_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="ready_file"):
        parse_config({})
    with pytest.raises(ConfigError, match="tls_ports need cert and key"):
        parse_config({"ready_file": "r", "sites": [{"address": "10.0.0.1", "tls_ports": [443]}]})
    with pytest.raises(ConfigError, match=r"zone\['a.test'\].a"):
        parse_config({"ready_file": "r", "zone": {"a.test": {"a": ["::1"]}}})
    with pytest.raises(ConfigError, match="used twice"):
        site = {"address": "10.0.0.1", "http_ports": [80]}
        parse_config({"ready_file": "r", "sites": [site, site]})
    cfg = parse_config({"ready_file": "r", "doh": None, "sites": []})
    assert cfg.dns_port == 53 and cfg.doh is None and cfg.blockpage is None


def test_two_hundred_sites_serve_hundreds_of_requests_quickly(
    tmp_path: Path,
) -> None:
    """~200 addresses x 2 ports bind fast, and 400 fresh TLS/HTTP connections finish in seconds."""
    ca = trustme.CA()
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    cert, key = write_leaf(ca, tmp_path, "perf", "*.perf.test")
    n = 200
    sites = [ip(3, i) for i in range(1, n + 1)]
    tls_port, http_port = free_ports(sites[0], 2)
    config = {
        "zone": {f"s{i}.perf.test": {"a": [a]} for i, a in enumerate(sites)},
        "sites": [
            {"address": a, "names": [f"s{i}.perf.test"], "tls_ports": [tls_port],
             "http_ports": [http_port], "cert": cert, "key": key, "behaviour": "page"}
            for i, a in enumerate(sites)
        ],
    }  # fmt: skip
    start = time.monotonic()
    agent = launch(config, tmp_path / "run")
    bind_time = time.monotonic() - start

    verify = ssl.create_default_context(cafile=str(ca_path))

    async def hammer() -> list[int]:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        async with httpx.AsyncClient(verify=verify, limits=limits, timeout=20) as c:

            async def one(i: int, scheme: str) -> int:
                port = tls_port if scheme == "https" else http_port
                host = f"s{i}.perf.test"
                ext = {"sni_hostname": host} if scheme == "https" else {}
                r = await c.get(f"{scheme}://{sites[i]}:{port}/", headers={"Host": host},
                                extensions=ext)  # fmt: skip
                assert title(r) == host
                return r.status_code

            return await asyncio.gather(*(one(i, s) for i in range(n) for s in ("https", "http")))

    try:
        start = time.monotonic()
        statuses = asyncio.run(hammer())
        elapsed = time.monotonic() - start
    finally:
        assert agent.stop() == 0, agent.stderr()
    assert statuses == [200] * (2 * n)
    assert bind_time < 10, bind_time
    assert elapsed < 10, elapsed
