"""The ISP agent: ``python -m probe.lab.router CONFIG.json`` in the router namespace.

One asyncio process runs the three censoring parts of DESIGN.md: the ISP resolver
(a forwarder that lies for listed names), the transparent TCP proxy (tls / http /
throttle / residual rules) and the on-path DNS injector (a scapy sniffer thread).
It writes ``{"ready": true}`` to ``ready_file`` once every socket is bound and runs
until SIGTERM. Bad client input is logged and survived; a bad config stops it at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import dns.rdatatype

from probe.lab.censor import (
    ConfigError,
    DNSRule,
    InjectRule,
    dns_rule_for,
    first_question,
    parse_dns_rules,
    parse_inject_rules,
    rule_reply,
)
from probe.lab.proxy import Proxy, ProxyConfig

log = logging.getLogger("probe.lab.router")

UPSTREAM_TIMEOUT = 10.0
TCP_IDLE_TIMEOUT = 60.0


# -- config --------------------------------------------------------------------------


def _port(raw: Any, what: str, default: int) -> int:
    if raw is None:
        return default
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw < 65536:
        raise ConfigError(f"{what} must be a port number, not {raw!r}")
    return raw


@dataclass(frozen=True)
class ResolverConfig:
    """The ``resolver`` section; ``port``/``upstream_port`` exist for loopback tests."""

    listen: str
    upstream: str
    rules: tuple[DNSRule, ...] = ()
    port: int = 53
    upstream_port: int = 53
    timeout: float = UPSTREAM_TIMEOUT

    @classmethod
    def from_dict(cls, raw: Any) -> ResolverConfig:
        """Validate the config's ``resolver`` object."""
        if not isinstance(raw, dict):
            raise ConfigError("resolver must be an object")
        listen, upstream = raw.get("listen"), raw.get("upstream")
        if not isinstance(listen, str) or not isinstance(upstream, str):
            raise ConfigError("resolver needs listen and upstream addresses")
        return cls(
            listen=listen,
            upstream=upstream,
            rules=parse_dns_rules(raw.get("rules")),
            port=_port(raw.get("port"), "resolver.port", 53),
            upstream_port=_port(raw.get("upstream_port"), "resolver.upstream_port", 53),
        )


@dataclass(frozen=True)
class RouterConfig:
    """The whole agent config (DESIGN.md); absent sections are simply not run."""

    resolver: ResolverConfig | None = None
    proxy: ProxyConfig | None = None
    inject: tuple[InjectRule, ...] = ()
    lan_interface: str = "lan"
    blockpage_address: str | None = None
    nft_table: str = "vlab"
    ready_file: str | None = None

    @classmethod
    def from_dict(cls, raw: Any) -> RouterConfig:
        """Validate a parsed config file."""
        if not isinstance(raw, dict):
            raise ConfigError("config must be a JSON object")
        blockpage = raw.get("blockpage_address")
        table = raw.get("nft_table", "vlab")
        iface = raw.get("lan_interface", "lan")
        ready = raw.get("ready_file")
        for key, value in (("blockpage_address", blockpage), ("ready_file", ready)):
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{key} must be a string")
        if not isinstance(table, str) or not table.isidentifier():
            raise ConfigError("nft_table must be a plain name")
        if not isinstance(iface, str) or not iface:
            raise ConfigError("lan_interface must be an interface name")
        return cls(
            resolver=ResolverConfig.from_dict(raw["resolver"]) if raw.get("resolver") else None,
            proxy=(
                ProxyConfig.from_dict(raw["proxy"], blockpage_address=blockpage, nft_table=table)
                if raw.get("proxy")
                else None
            ),
            inject=parse_inject_rules(raw.get("inject")),
            lan_interface=iface,
            blockpage_address=blockpage,
            nft_table=table,
            ready_file=ready,
        )

    @classmethod
    def load(cls, path: str | Path) -> RouterConfig:
        """Read and validate a config file."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
        return cls.from_dict(raw)


def write_ready(path: str | Path) -> None:
    """Write ``{"ready": true}`` atomically: the builder never sees a half-written file."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".ready-")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump({"ready": True}, fh)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# -- resolver ------------------------------------------------------------------------


class _OneReply(asyncio.DatagramProtocol):
    """Collects the first datagram an upstream sends back on a connected socket."""

    def __init__(self, future: asyncio.Future[bytes]) -> None:
        self.future = future

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.future.done():
            self.future.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class _ListenUDP(asyncio.DatagramProtocol):
    """Hands each query datagram to the resolver in a task of its own."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.transport is not None:
            self.resolver._spawn(self.resolver._serve_udp(self.transport, data, addr))

    def error_received(self, exc: Exception) -> None:
        """ICMP errors about clients that left do not concern the resolver."""


class Resolver:
    """The ISP's censoring forwarder on UDP and TCP (one port)."""

    def __init__(self, config: ResolverConfig) -> None:
        self.config = config
        self.port = config.port
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def start(self) -> None:
        """Bind UDP and TCP on the same port (port 0 picks a free one for both)."""
        loop = asyncio.get_running_loop()
        attempts = 1 if self.config.port else 50
        for attempt in range(attempts):
            tcp = await asyncio.start_server(
                self._serve_tcp, self.config.listen, self.config.port, reuse_address=True
            )
            port = tcp.sockets[0].getsockname()[1]
            try:
                udp, _ = await loop.create_datagram_endpoint(
                    lambda: _ListenUDP(self), local_addr=(self.config.listen, port)
                )
            except OSError:
                tcp.close()
                if attempt == attempts - 1:
                    raise
                continue
            self._tcp, self._udp, self.port = tcp, udp, port
            return

    async def stop(self) -> None:
        """Close the listeners and drop queries in flight."""
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def decide(self, wire: bytes) -> tuple[str, bytes | None]:
        """("rule", reply or None for silence) or ("forward", None) for one query."""
        parsed = first_question(wire)
        if parsed is None:
            return "forward", None
        query, name, rdtype = parsed
        rule = dns_rule_for(self.config.rules, name)
        if rule is None:
            return "forward", None
        log.info(
            "resolver: %s %s -> %s",
            name,
            dns.rdatatype.to_text(dns.rdatatype.RdataType.make(rdtype)),
            rule.action,
        )
        return "rule", rule_reply(query, rule)

    async def _serve_udp(
        self, transport: asyncio.DatagramTransport, wire: bytes, addr: Any
    ) -> None:
        try:
            how, reply = self.decide(wire)
            if how == "forward":
                reply = await self._forward_udp(wire)
            if reply is not None and not transport.is_closing():
                transport.sendto(reply, addr)
        except Exception:  # noqa: BLE001 - one query must never stop the resolver
            log.exception("resolver: UDP query from %s failed", addr)

    async def _forward_udp(self, wire: bytes) -> bytes | None:
        """Send the query upstream from a fresh port and return its reply bytes unchanged."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _OneReply(future),
            remote_addr=(self.config.upstream, self.config.upstream_port),
        )
        try:
            transport.sendto(wire)
            return await asyncio.wait_for(future, self.config.timeout)
        except (TimeoutError, OSError) as exc:
            log.info("resolver: upstream UDP gave no answer: %r", exc)
            return None
        finally:
            transport.close()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Length-prefixed queries, possibly pipelined; each answered when ready."""
        pending: set[asyncio.Task[Any]] = set()
        try:
            while True:
                try:
                    async with asyncio.timeout(TCP_IDLE_TIMEOUT):
                        (length,) = struct.unpack("!H", await reader.readexactly(2))
                        wire = await reader.readexactly(length)
                except (asyncio.IncompleteReadError, OSError, TimeoutError):
                    break
                task = self._spawn(self._answer_tcp(wire, writer))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.wait(pending, timeout=self.config.timeout + 1)
        except asyncio.CancelledError:
            pass
        except Exception:  # noqa: BLE001
            log.exception("resolver: TCP client failed")
        finally:
            for task in pending:
                task.cancel()
            writer.close()

    async def _answer_tcp(self, wire: bytes, writer: asyncio.StreamWriter) -> None:
        try:
            how, reply = self.decide(wire)
            if how == "forward":
                reply = await self._forward_tcp(wire)
            if reply is not None and not writer.is_closing():
                writer.write(struct.pack("!H", len(reply)) + reply)
        except Exception:  # noqa: BLE001
            log.exception("resolver: TCP query failed")

    async def _forward_tcp(self, wire: bytes) -> bytes | None:
        """One upstream TCP connection per query; the reply message is relayed unchanged."""
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.config.timeout):
                reader, writer = await asyncio.open_connection(
                    self.config.upstream, self.config.upstream_port
                )
                writer.write(struct.pack("!H", len(wire)) + wire)
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                return await reader.readexactly(length)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            log.info("resolver: upstream TCP gave no answer: %r", exc)
            return None
        finally:
            if writer is not None:
                writer.close()


# -- the agent -----------------------------------------------------------------------


async def run(config: RouterConfig, stop: asyncio.Event | None = None) -> None:
    """Start every configured part, say ready, and serve until SIGTERM (or ``stop``)."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    resolver = Resolver(config.resolver) if config.resolver else None
    proxy = Proxy(config.proxy) if config.proxy else None
    injector = None
    if config.inject:
        from probe.lab.inject import Injector

        injector = Injector(config.lan_interface, config.inject)
    try:
        if resolver is not None:
            await resolver.start()
            log.info("resolver on %s:%d (udp, tcp)", config.resolver and config.resolver.listen,
                     resolver.port)  # fmt: skip
        if proxy is not None:
            await proxy.start()
            log.info("proxy on port %d", proxy.port)
        if injector is not None:
            await loop.run_in_executor(None, injector.start)
            log.info("injector sniffing on %s", config.lan_interface)
        if config.ready_file:
            write_ready(config.ready_file)
        await stop.wait()
        log.info("stopping")
    finally:
        if proxy is not None:
            await proxy.stop()
        if resolver is not None:
            await resolver.stop()
        if injector is not None:
            await loop.run_in_executor(None, injector.stop)
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 after SIGTERM, 2 for a bad config, 1 if a socket cannot be opened."""
    parser = argparse.ArgumentParser(prog="python -m probe.lab.router", description=__doc__)
    parser.add_argument("config", help="JSON config file (see probe/lab/DESIGN.md)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format="%(asctime)s router %(levelname)s %(message)s",
    )  # fmt: skip
    try:
        config = RouterConfig.load(args.config)
    except ConfigError as exc:
        log.error("bad config: %s", exc)
        return 2
    try:
        asyncio.run(run(config))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
