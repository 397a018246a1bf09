"""Shared fixtures: loopback servers with real certificates, and an engine context
pointed at them. Nothing here sends a packet beyond 127.0.0.0/8."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from probe.engine.context import EngineContext, Timeouts
from probe.engine.dns import ResolverSpec
from probe.engine.measure import measure
from schema.model import Measurement, Target, VantagePoint
from tests.fixtures import Certs, DNSServer, WebServer

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
FAST = Timeouts(dns=1.0, tcp=1.0, tls=2.0, http=3.0)

# Names the shared web server presents certificates for, by behaviour.
VALID, WRONG, UNKNOWN, EXPIRED = "valid.test", "wrong.test", "unknown.test", "expired.test"


@pytest.fixture(scope="session")
def certs() -> Certs:
    return Certs()


@pytest.fixture(scope="session")
def ca_file(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(certs.ca_pem_path(tmp_path_factory.mktemp("ca")))


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    with DNSServer() as server:
        yield server


@pytest.fixture(scope="session")
def web(certs: Certs) -> Iterator[WebServer]:
    """One HTTPS server whose certificate depends on the SNI name."""
    contexts = {
        VALID: certs.valid(VALID),
        WRONG: certs.wrong_name(WRONG),
        UNKNOWN: certs.unknown_ca(UNKNOWN),
        EXPIRED: certs.expired(EXPIRED),
    }
    with WebServer(ssl_contexts=contexts, default_ssl=contexts[VALID]) as server:
        yield server


@pytest.fixture(scope="session")
def plain_web() -> Iterator[WebServer]:
    with WebServer() as server:
        yield server


@pytest.fixture
def make_ctx(dns_server: DNSServer, ca_file: str) -> Callable[..., EngineContext]:
    def make(**kw: Any) -> EngineContext:
        kw.setdefault(
            "resolvers", [ResolverSpec("udp", dns_server.host, dns_server.port, system=True)]
        )
        kw.setdefault("timeouts", FAST)
        kw.setdefault("ca_files", (ca_file,))
        kw.setdefault("system_cas", False)
        kw.setdefault("public_ranges", LOOPBACK)
        return EngineContext(**kw)

    return make


@pytest.fixture
def ctx(make_ctx: Callable[..., EngineContext]) -> EngineContext:
    return make_ctx()


VANTAGE = VantagePoint(probe_id="00000000-0000-4000-8000-000000000001", software_version="test",
                       platform="linux", architecture="x86_64")  # fmt: skip


def run_measure(target: Target, ctx: EngineContext) -> Measurement:
    return asyncio.run(measure(target, VANTAGE, "run-test", ctx))


def http_target(url: str, **kw: Any) -> Target:
    from urllib.parse import urlsplit

    return Target(
        id="t", service="test", kind="http", host=urlsplit(url).hostname or "", url=url, **kw
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture(autouse=True)
def _consent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test measures with consent given (as a fleet operator's config does);
    subprocesses inherit it. Consent tests take it away with
    ``monkeypatch.delenv("VANTAGE_PRIVACY_CONSENT")``."""
    monkeypatch.setenv("VANTAGE_PRIVACY_CONSENT", "true")


from tests.fixtures.postgres import pg_url  # noqa: E402,F401  (a fixture for every test)
