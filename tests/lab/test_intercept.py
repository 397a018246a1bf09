"""TLS interception by the lab's transparent proxy (tls rule ``action = "intercept"``).

The proxy runs in-process on loopback and is told the "original destination"
instead of asking nftables. Intercepted clients must get a certificate for the very
name they asked for, issued by the router's rogue CA: it validates only against that
CA, and the probe reads the failure as ``ssl_unknown_authority``. The real server is
never contacted for an intercepted connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from probe.engine.failures import classify
from probe.lab.censor import ConfigError, parse_proxy_rules
from probe.lab.proxy import ROGUE_CA_ORGANIZATION, Proxy, ProxyConfig
from probe.lab.scenario import RULE_ACTIONS

x509 = pytest.importorskip("cryptography.x509")
pytest.importorskip("trustme")
from cryptography.x509.oid import ExtensionOID, NameOID  # noqa: E402

RULES = [
    {"kind": "tls", "match": ["web.whatsapp.test"], "action": "intercept"},
    {"kind": "tls", "match": ["*.intercept.test"], "action": "intercept"},
    {"kind": "tls", "match": ["reset.test"], "action": "reset"},
]


class Upstream:
    """The real server: counts connections and echoes (it must see no intercepted one)."""

    def __init__(self) -> None:
        self.connections = 0
        self.received: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return ("127.0.0.1", self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            data = await asyncio.wait_for(reader.read(65536), 3)
            self.received.append(data)
            writer.write(data)
            await writer.drain()
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()


def run_proxy(body: Callable[[Proxy, Upstream], Awaitable[None]]) -> None:
    async def go() -> None:
        upstream = Upstream()
        dst = await upstream.start()
        config = ProxyConfig(
            listen_port=0, listen_address="127.0.0.1", rules=parse_proxy_rules(RULES),
            inspect_timeout=1.0,
        )  # fmt: skip
        proxy = Proxy(config, original_dst=lambda _sock: dst)
        await proxy.start()
        try:
            await asyncio.wait_for(body(proxy, upstream), 30)
        finally:
            await proxy.stop()
            assert upstream.server is not None
            upstream.server.close()

    asyncio.run(go())


def _handshake(port: int, name: str, ctx: ssl.SSLContext, request: bool = True) -> Any:
    """Blocking client: (DER certificate, response bytes) or the exception raised."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname=name) as tls:
                der = tls.getpeercert(binary_form=True)
                response = b""
                if request:
                    tls.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % name.encode())
                    while chunk := tls.recv(65536):
                        response += chunk
                return der, response
    except (OSError, ssl.SSLError) as exc:
        return exc


def _rogue_context(proxy: Proxy) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    assert proxy.interceptor is not None
    proxy.interceptor.ca.configure_trust(ctx)
    return ctx


def _dns_names(cert: Any) -> list[str]:
    san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    return list(san.get_values_for_type(x509.DNSName))


def test_intercept_presents_rogue_certificate_for_the_sni_name() -> None:
    async def body(proxy: Proxy, upstream: Upstream) -> None:
        assert proxy.interceptor is not None  # made at start
        ca_cert = x509.load_pem_x509_certificate(proxy.interceptor.ca.cert_pem.bytes())
        ca_org = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        assert [a.value for a in ca_org] == [ROGUE_CA_ORGANIZATION]

        # A client trusting the rogue CA completes the handshake and gets the page.
        for name in ("web.whatsapp.test", "chat.intercept.test"):
            got = await asyncio.to_thread(_handshake, proxy.port, name, _rogue_context(proxy))
            assert not isinstance(got, BaseException), got
            der, response = got
            cert = x509.load_der_x509_certificate(der)
            assert _dns_names(cert) == [name]
            assert cert.issuer == ca_cert.subject
            assert cert.subject != ca_cert.subject
            assert response.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"<title>Intercepted</title>" in response

        # A default client (system trust) refuses it: unknown authority.
        default = ssl.create_default_context()
        got = await asyncio.to_thread(_handshake, proxy.port, "web.whatsapp.test", default)
        assert isinstance(got, ssl.SSLCertVerificationError), got
        assert classify(got) == "ssl_unknown_authority"

        # One leaf (one server context) per name, reused.
        interceptor = proxy.interceptor
        assert interceptor.context_for("web.whatsapp.test") is interceptor.context_for(
            "WEB.whatsapp.test."
        )
        assert interceptor.context_for("web.whatsapp.test") is not interceptor.context_for(
            "chat.intercept.test"
        )
        # The real server never saw an intercepted connection.
        await asyncio.sleep(0.5)
        assert upstream.connections == 0

    run_proxy(body)


def test_intercept_leaves_other_traffic_alone_and_survives_bad_clients() -> None:
    async def body(proxy: Proxy, upstream: Upstream) -> None:
        port = proxy.port
        # A hello that is intercepted, then the client vanishes mid-handshake.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(incoming, outgoing, server_hostname="web.whatsapp.test")
        with pytest.raises(ssl.SSLWantReadError):
            obj.do_handshake()
        hello = outgoing.read()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(hello)
        await writer.drain()
        assert (await asyncio.wait_for(reader.read(5), 5))[:1] == b"\x16"  # ServerHello
        writer.transport.abort()
        # The hello followed by garbage instead of the client's next flight.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(hello)
        await writer.drain()
        await asyncio.wait_for(reader.read(65536), 5)
        writer.write(b"\x17\x03\x03\x00\x05hello" + bytes(range(256)))
        with contextlib.suppress(ConnectionError):  # closed (FIN or RST), never hung
            while await asyncio.wait_for(reader.read(65536), 5):
                pass
        writer.close()
        # Just the hello and EOF.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(hello)
        writer.write_eof()
        await asyncio.wait_for(reader.read(-1), 5)
        writer.close()
        assert upstream.connections == 0

        # Other names: reset by their rule, or relayed to the real server untouched.
        got = await asyncio.to_thread(_handshake, port, "reset.test", ctx)
        assert isinstance(got, ConnectionResetError), got
        other = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        other.check_hostname, other.verify_mode = False, ssl.CERT_NONE
        await asyncio.to_thread(_handshake, port, "ok.test", other)
        assert upstream.connections == 1
        assert upstream.received and upstream.received[0][:1] == b"\x16"

        # Still intercepting after all that.
        got = await asyncio.to_thread(_handshake, port, "x.intercept.test", _rogue_context(proxy))
        assert not isinstance(got, BaseException), got
        assert b"Intercepted" in got[1]

    run_proxy(body)


def test_intercept_is_a_tls_action() -> None:
    assert "intercept" in RULE_ACTIONS["tls"]
    (rule,) = parse_proxy_rules([{"kind": "tls", "match": ["a.test"], "action": "intercept"}])
    assert rule.action == "intercept"
    with pytest.raises(ConfigError):
        parse_proxy_rules([{"kind": "http", "match": ["a.test"], "action": "intercept"}])


def test_no_rogue_ca_without_intercept_rules() -> None:
    async def go() -> None:
        rules = parse_proxy_rules([{"kind": "tls", "match": ["a.test"], "action": "reset"}])
        proxy = Proxy(ProxyConfig(listen_port=0, listen_address="127.0.0.1", rules=rules))
        await proxy.start()
        try:
            assert proxy.interceptor is None
        finally:
            await proxy.stop()

    asyncio.run(go())
