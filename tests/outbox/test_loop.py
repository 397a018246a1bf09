"""The daemon's uploader: timing with an injected sleep, one log line per state change,
the collector going away and coming back, and a prompt stop."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable

import pytest
from starlette.responses import JSONResponse, Response

from probe.outbox import backlog, upload_loop
from probe.outbox.upload import BACKOFF_BASE, START_DELAY
from tests.fixtures import closed_port
from tests.outbox.conftest import Probe, outbox_rows
from tests.outbox.standin import Received, StandIn


class FakeClock:
    """The loop's sleep: records each wait, returns at once, and runs ``on_wait`` (which
    can change the world: stop the collector, set stop) before the loop goes on."""

    def __init__(self, stop: asyncio.Event, waits: int) -> None:
        self.stop = stop
        self.waits: list[float] = []
        self.limit = waits
        self.on_wait: Callable[[int], None] = lambda n: None

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.on_wait(len(self.waits))
        if len(self.waits) >= self.limit:
            self.stop.set()
        await asyncio.sleep(0)


def loop(p: Probe, clock_waits: int, **kw) -> tuple[FakeClock, Callable[[], Awaitable[None]]]:
    stop = asyncio.Event()
    clock = FakeClock(stop, clock_waits)

    async def go() -> None:
        await upload_loop(p.cfg, p.store, stop, sleep=clock.sleep, **kw)

    return clock, go


def test_backoff_timing_while_the_collector_is_down(probe: Probe, standin: StandIn) -> None:
    p = probe.with_config(collector__max_backoff="100", collector__interval="300")
    p.enroll_at(standin.url, standin.credential)
    p.queue(3)
    standin.stop()
    clock, go = loop(p, clock_waits=12, rng=lambda: 1.0)  # the top of each jitter range

    def world(n: int) -> None:
        if n == 8:
            standin.start()  # back after seven failed passes

    clock.on_wait = world
    asyncio.run(go())
    first, *failures = clock.waits[:8]
    assert first == START_DELAY  # soon after the start
    assert failures == [BACKOFF_BASE * 2**i for i in range(4)] + [100, 100, 100]
    assert clock.waits[8:] == [300, 300, 300, 300]  # back: every interval
    assert backlog(p.store) == 0 and len(standin.stored) == 3


def test_full_jitter_stays_within_bounds(probe: Probe) -> None:
    p = probe.with_config(collector__max_backoff="50")
    p.enroll_at(f"http://127.0.0.1:{closed_port()}", "c")
    p.queue(1)
    rng = random.Random(3)
    clock, go = loop(p, clock_waits=30, rng=rng.random)
    asyncio.run(go())
    for n, wait in enumerate(clock.waits[1:], start=1):
        assert 1.0 <= wait <= min(50, BACKOFF_BASE * 2 ** (n - 1))
    assert len(set(clock.waits)) > 20  # jittered, not a fixed schedule


def test_retry_after_is_honoured(probe: Probe, standin: StandIn) -> None:
    probe.enroll_at(standin.url, standin.credential)
    probe.queue(1)
    standin.on_upload = lambda rec: Response(status_code=429, headers={"retry-after": "900"})
    clock, go = loop(probe, clock_waits=3, rng=lambda: 0.0)
    asyncio.run(go())
    assert clock.waits[1:] == [900, 900]
    assert backlog(probe.store) == 1


def test_one_log_line_per_state_change(
    probe: Probe, standin: StandIn, caplog: pytest.LogCaptureFixture
) -> None:
    probe.enroll_at(standin.url, standin.credential)
    probe.queue(2)
    standin.stop()
    clock, go = loop(probe, clock_waits=14, rng=lambda: 0.5)

    def world(n: int) -> None:
        if n == 6:
            standin.start()
        if n == 9:
            probe.queue(1)
            standin.on_upload = lambda rec: JSONResponse({"error": "revoked"}, 401)

    clock.on_wait = world
    with caplog.at_level(logging.INFO, logger="probe.outbox"):
        asyncio.run(go())
    lines = [r.getMessage() for r in caplog.records if r.name == "probe.outbox"]
    assert len(lines) == 3, lines
    assert "upload unreachable" in lines[0] and "cannot reach" in lines[0]
    assert "uploading to" in lines[1] and "2 measurement(s) acknowledged" in lines[1]
    assert "upload refused" in lines[2] and "re-enroll" in lines[2]


def test_quiet_when_not_enrolled_and_no_collector(
    probe: Probe, standin: StandIn, caplog: pytest.LogCaptureFixture
) -> None:
    probe.queue(2)
    clock, go = loop(probe, clock_waits=4)
    with caplog.at_level(logging.DEBUG, logger="probe.outbox"):
        asyncio.run(go())
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []
    assert clock.waits[1:] == [probe.cfg.collector.interval] * 3
    assert standin.received == [] and backlog(probe.store) == 2


def test_says_once_when_a_collector_is_set_but_not_enrolled(
    probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    p = probe.with_config(collector__url="https://collector.example.org")
    clock, go = loop(p, clock_waits=4)
    with caplog.at_level(logging.INFO, logger="probe.outbox"):
        asyncio.run(go())
    (line,) = [r.getMessage() for r in caplog.records]
    assert "not enrolled" in line and "vantage enroll" in line


def test_a_damaged_enrollment_does_not_end_the_loop(
    probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    path = probe.cfg.data_dir() / "collector.json"
    path.write_text("{")
    clock, go = loop(probe, clock_waits=3)
    with caplog.at_level(logging.INFO, logger="probe.outbox"):
        asyncio.run(go())
    assert len(clock.waits) == 3
    (line,) = [r.getMessage() for r in caplog.records]
    assert "damaged enrollment" in line


def test_stop_returns_promptly_with_a_request_in_flight(probe: Probe, standin: StandIn) -> None:
    p = probe.with_config(collector__timeout="60")
    p.enroll_at(standin.url, standin.credential)
    uids = p.queue(5)
    arrived = threading.Event()  # the stand-in runs in its own thread and loop

    async def hang(rec: Received) -> None:
        arrived.set()
        await asyncio.sleep(30)
        return None  # would then accept them all

    standin.on_upload = hang

    async def main() -> float:
        stop = asyncio.Event()

        async def no_wait(seconds: float) -> None:
            await asyncio.sleep(0)

        task = asyncio.create_task(upload_loop(p.cfg, p.store, stop, sleep=no_wait))
        assert await asyncio.to_thread(arrived.wait, 10)
        t0 = time.monotonic()
        stop.set()
        await asyncio.wait_for(task, 10)
        return time.monotonic() - t0

    assert asyncio.run(main()) < 1.0
    assert set(outbox_rows(p.store)) == set(uids)  # not acknowledged: all still queued
    assert standin.stored == {}


def test_stop_during_the_wait(probe: Probe) -> None:
    async def main() -> float:
        stop = asyncio.Event()
        task = asyncio.create_task(upload_loop(probe.cfg, probe.store, stop))
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        stop.set()
        await asyncio.wait_for(task, 5)
        return time.monotonic() - t0

    assert asyncio.run(main()) < 0.5


def test_the_collector_down_for_a_while_then_back(probe: Probe, standin: StandIn) -> None:
    """Real time, short intervals: measurements keep coming while the collector is
    away; once back, every one arrives, and none twice."""
    p = probe.with_config(collector__interval="0.2", collector__max_backoff="0.3")
    p.enroll_at(standin.url, standin.credential)
    uids = p.queue(50)
    standin.stop()

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(upload_loop(p.cfg, p.store, stop, rng=lambda: 0.0))
        await asyncio.sleep(1.5)  # several failed passes
        uids.extend(await asyncio.to_thread(p.queue, 30))
        standin.start()
        deadline = time.monotonic() + 30
        while await asyncio.to_thread(backlog, p.store) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.wait_for(task, 10)

    asyncio.run(main())
    assert backlog(p.store) == 0
    sent = [u for r in standin.received for u in r.uids]
    assert sorted(sent) == sorted(uids)  # each sent exactly once: none lost, none repeated
    assert set(standin.stored) == set(uids)


def test_progress_resets_the_backoff(probe: Probe, standin: StandIn) -> None:
    """A collector that takes a request, then rate-limits the next, is not 'down': the
    waits stay at the first step (or its Retry-After) instead of doubling."""
    p = probe.with_config(collector__batch_size="2")
    p.enroll_at(standin.url, standin.credential)
    p.queue(8)
    calls = {"n": 0}

    def every_other(rec: Received) -> Response | None:
        calls["n"] += 1
        return None if calls["n"] % 2 else Response(status_code=429, headers={"retry-after": "3"})

    standin.on_upload = every_other
    clock, go = loop(p, clock_waits=6, rng=lambda: 1.0)
    asyncio.run(go())
    assert clock.waits[1:5] == [BACKOFF_BASE] * 3 + [p.cfg.collector.interval]
    assert backlog(p.store) == 0 and len(standin.stored) == 8
