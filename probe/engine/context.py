"""What every step is given: resolvers, TLS trust, timeouts and the clocks.

The network is injected through this object (ARCHITECTURE.md principle 3): tests
build one pointing at loopback fixture servers; the command line builds one from
the configuration. It is created once per run; TLS contexts are built once and
shared because loading the system CA store costs milliseconds per call.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from probe.engine.dns import ResolverSpec
from probe.engine.failures import SetupError
from probe.engine.trace import Clock

BROWSER_USER_AGENT = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Timeouts:
    """Per-step timeouts in seconds (OONI uses DNS 5, TCP 15, TLS 10)."""

    dns: float = 5.0
    tcp: float = 15.0
    tls: float = 10.0
    http: float = 20.0


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_ssl_context(
    ca_files: tuple[str, ...] = (), *, system: bool = True, alpn: tuple[str, ...] = ()
) -> ssl.SSLContext:
    """A validating client context: the system CA store plus ``ca_files``."""
    ctx = ssl.create_default_context() if system else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    for path in ca_files:
        ctx.load_verify_locations(cafile=path)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


@dataclass
class EngineContext:
    """Everything the steps need from outside. One per run."""

    resolvers: list[ResolverSpec]
    timeouts: Timeouts = field(default_factory=Timeouts)
    ca_files: tuple[str, ...] = ()
    system_cas: bool = True
    user_agent: str = BROWSER_USER_AGENT
    #: Networks counted as public although they are reserved (the lab, loopback tests).
    public_ranges: tuple[IPNetwork, ...] = ()
    max_addresses: int = 8
    max_redirects: int = 10
    #: A harmless name for the SNI A/B test (None: no A/B test).
    control_sni: str | None = "example.com"
    body_keep: int = 64 * 1024
    body_read_limit: int = 8 * 1024 * 1024
    clock: Clock = time.monotonic
    wallclock: Callable[[], dt.datetime] = utcnow
    _contexts: dict[tuple[str, tuple[str, ...]], ssl.SSLContext] = field(default_factory=dict)

    def now_utc(self) -> dt.datetime:
        return self.wallclock()

    def ssl_context(self, purpose: str, extra_ca: str | None = None) -> ssl.SSLContext:
        """A cached validating context; ``purpose`` is "tls" (the handshake step,
        offering h2 and http/1.1 like a browser), "tls-http" (the handshake of an
        HTTPS target, whose session the request then uses: http/1.1 only) or "http"
        (httpcore sets ALPN).

        Raises :class:`~probe.engine.failures.SetupError` when a CA file cannot be
        loaded; steps call this inside ``trace.step`` so that becomes a failure string.
        """
        cas = self.ca_files + ((extra_ca,) if extra_ca else ())
        key = (purpose, cas)
        ctx = self._contexts.get(key)
        if ctx is None:
            alpn = {"tls": ("h2", "http/1.1"), "tls-http": ("http/1.1",)}.get(purpose, ())
            try:
                ctx = make_ssl_context(cas, system=self.system_cas, alpn=alpn)
            except (ssl.SSLError, OSError, ValueError) as exc:
                # A CA file that is missing or holds no certificate: the probe's input,
                # not the network, so not a TLS failure (see failures.SetupError).
                files = ", ".join(cas) or "the system store"
                raise SetupError(
                    f"cannot load CA certificates from {files}: {type(exc).__name__}: {exc}"
                ) from exc
            self._contexts[key] = ctx
        return ctx

    def is_bogon(self, address: str) -> bool:
        """A private, loopback, reserved or otherwise non-public address."""
        ip = ipaddress.ip_address(address)
        if any(ip in net for net in self.public_ranges):
            return False
        return not ip.is_global or ip.is_multicast
