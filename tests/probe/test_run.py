"""A run: every address and port, bounded concurrency, the deadline, stopping."""

from __future__ import annotations

import asyncio

from probe.engine.context import Timeouts
from probe.engine.run import Run
from schema.model import Measurement, Target
from tests.conftest import VALID, VANTAGE, run_measure
from tests.fixtures import DNSServer, TCPServer, WebServer, closed_port


def test_every_address_and_port_is_connected(dns_server: DNSServer, ctx) -> None:
    with TCPServer("accept", host="127.0.0.2") as a, TCPServer("accept", host="127.0.0.3") as b:
        # One port open on each address, the other closed: four connects, two succeed.
        dns_server.set("multi.test", a=["127.0.0.2", "127.0.0.3"])
        t = Target(id="m", service="s", kind="tcp", host="multi.test", ports=(a.port, b.port))
        m = run_measure(t, ctx)
    got = {(c.ip, c.port): c.failure for c in m.tcp_connect}
    assert got[("127.0.0.2", a.port)] is None and got[("127.0.0.3", b.port)] is None
    assert got[("127.0.0.2", b.port)] == "connection_refused"
    assert got[("127.0.0.3", a.port)] == "connection_refused"
    assert m.failure() is None  # some endpoint works


def test_fixed_addresses_are_measured_besides_dns(dns_server: DNSServer, ctx) -> None:
    with TCPServer("accept", host="127.0.0.4") as srv:
        dns_server.set("fixed.test", rcode="NXDOMAIN")
        t = Target(id="f", service="s", kind="tcp", host="fixed.test", ports=(srv.port,),
                   addresses=("127.0.0.4",))  # fmt: skip
        m = run_measure(t, ctx)
    assert {q.failure for q in m.queries} == {"dns_nxdomain_error"}
    assert [(c.ip, c.failure) for c in m.tcp_connect] == [("127.0.0.4", None)]


def test_no_http_when_nothing_got_through(dns_server: DNSServer, ctx) -> None:
    from tests.conftest import http_target

    dns_server.set(VALID, a=["127.0.0.1"])
    m = run_measure(http_target(f"https://{VALID}:{closed_port()}/"), ctx)
    assert m.tcp_connect[0].failure == "connection_refused"
    assert m.tls_handshakes == [] and m.requests == []
    assert m.failure() == "connection_refused"


def _targets(n: int, port: int) -> list[Target]:
    return [Target(id=f"t{i}", service="s", kind="tcp", host="127.0.0.1", ports=(port,))
            for i in range(n)]  # fmt: skip


def test_concurrency_is_bounded(dns_server: DNSServer, make_ctx) -> None:
    with TCPServer("blackhole") as hole:
        ctx = make_ctx(timeouts=Timeouts(dns=1, tcp=0.3, tls=1, http=1))
        run = Run(_targets(12, hole.port), VANTAGE, ctx, concurrency=4)
        done: list[Measurement] = []
        peak = 0

        async def sink(m: Measurement) -> None:
            nonlocal peak
            done.append(m)

        async def go() -> None:
            nonlocal peak

            async def watch() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, len(run._in_flight))
                    await asyncio.sleep(0.01)

            watcher = asyncio.create_task(watch())
            await run.execute(sink)
            watcher.cancel()

        asyncio.run(go())
    assert len(done) == 12
    assert peak == 4
    assert {m.tcp_connect[0].failure for m in done} == {"generic_timeout_error"}


def test_deadline_keeps_in_flight_as_interrupted_and_skips_the_rest(make_ctx) -> None:
    with TCPServer("blackhole") as hole:
        ctx = make_ctx(timeouts=Timeouts(dns=1, tcp=30, tls=1, http=1))
        run = Run(_targets(10, hole.port), VANTAGE, ctx, concurrency=3, deadline=0.5)
        done: list[Measurement] = []

        async def sink(m: Measurement) -> None:
            done.append(m)

        outcome = asyncio.run(run.execute(sink))
    assert outcome.status == "deadline"
    assert outcome.measured == 3 and outcome.skipped == 7
    assert [m.tcp_connect[0].failure for m in done] == ["interrupted"] * 3
    assert all(m.annotations["interrupted"] == "true" for m in done)
    assert all(m.test_runtime < 5 for m in done)


def test_stop_from_a_signal_handler(make_ctx, web: WebServer) -> None:
    with TCPServer("blackhole") as hole:
        ctx = make_ctx(timeouts=Timeouts(dns=1, tcp=30, tls=1, http=1))
        run = Run(_targets(5, hole.port), VANTAGE, ctx, concurrency=2, deadline=None)

        async def go():
            asyncio.get_running_loop().call_later(0.3, run.stop)
            done: list[Measurement] = []

            async def sink(m: Measurement) -> None:
                done.append(m)

            return await run.execute(sink), done

        outcome, done = asyncio.run(go())
    assert outcome.status == "interrupted" and len(done) == 2 and outcome.skipped == 3
