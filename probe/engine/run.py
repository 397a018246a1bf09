"""A run: many targets measured with bounded concurrency and one deadline.

Measurements are handed to ``on_measurement`` as they finish (the store writes
them before anything reports them). :meth:`Run.stop` (Ctrl-C, SIGTERM) and the
deadline cancel what is in flight: those measurements come back marked
``interrupted`` and are kept; targets not yet started are skipped.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import httpx

from probe.engine.context import EngineContext
from probe.engine.measure import measure
from schema.model import Measurement, Target, VantagePoint

Sink = Callable[[Measurement], Awaitable[None]]


@dataclass
class RunOutcome:
    run_id: str
    status: str  # complete | interrupted | deadline
    measured: int
    skipped: int


class Run:
    """One execution of a list of targets."""

    def __init__(
        self,
        targets: Iterable[Target],
        vantage: VantagePoint,
        ctx: EngineContext,
        *,
        concurrency: int = 16,
        deadline: float | None = 600.0,
        run_id: str | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.targets = list(targets)
        self.vantage = vantage
        self.ctx = ctx
        self.concurrency = concurrency
        self.deadline = deadline
        self.run_id = run_id or str(uuid.uuid4())
        self.status = "complete"
        self._stopping = False
        self._draining = False
        self._drain_reason = "interrupted"
        self._in_flight: set[asyncio.Task[Measurement]] = set()
        self._on_stop: list[Callable[[], None]] = []

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the run is stopped (signal or deadline)."""
        self._on_stop.append(callback)

    def stop(self, reason: str = "interrupted") -> None:
        """Stop starting targets and cancel those in flight (idempotent)."""
        if self._stopping:
            return
        self._stopping = True
        self.status = reason
        for task in list(self._in_flight):
            task.cancel()
        for callback in self._on_stop:
            callback()

    def drain(self, reason: str = "interrupted") -> None:
        """Start no more targets; those in flight finish (:meth:`stop` still cancels
        them). A daemon told to stop drains first, then stops after its grace time.
        The run ends ``reason`` if targets were left unmeasured, else complete."""
        if not self._draining:
            self._draining, self._drain_reason = True, reason

    async def execute(
        self, on_measurement: Sink, on_start: Callable[[Target], None] | None = None
    ) -> RunOutcome:
        queue: asyncio.Queue[Target] = asyncio.Queue()
        for target in self.targets:
            queue.put_nowait(target)
        measured = 0
        unstarted = 0  # taken from the queue but cancelled before they began
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.deadline, self.stop, "deadline") if self.deadline else None
        needs_doh = any(r.engine == "doh" for r in self.ctx.resolvers)
        doh_client = (
            httpx.AsyncClient(verify=self.ctx.ssl_context("http"), timeout=self.ctx.timeouts.dns)
            if needs_doh
            else None
        )

        async def worker() -> None:
            nonlocal measured, unstarted
            me = asyncio.current_task()
            while not self._stopping and not self._draining:
                try:
                    target = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                if on_start is not None:
                    on_start(target)
                task = asyncio.create_task(
                    measure(target, self.vantage, self.run_id, self.ctx, doh_client)
                )
                self._in_flight.add(task)
                try:
                    m = await asyncio.shield(task)
                except asyncio.CancelledError:
                    if me is None or not me.cancelling():
                        # Not this worker: the measurement was cancelled (stop, deadline)
                        # before it began, so there is nothing measured to keep.
                        if not task.cancelled():
                            raise
                        unstarted += 1
                        continue
                    # The worker itself was cancelled: stop the measurement and keep it.
                    task.cancel()
                    self.stop()
                    try:
                        m = await task
                    except asyncio.CancelledError:
                        if task.cancelled():  # it had not begun: nothing to keep
                            unstarted += 1
                        raise
                finally:
                    self._in_flight.discard(task)
                measured += 1
                await on_measurement(m)

        try:
            workers = [asyncio.create_task(worker()) for _ in range(self.concurrency)]
            await asyncio.gather(*workers)
        finally:
            if timer is not None:
                timer.cancel()
            if doh_client is not None:
                await doh_client.aclose()
        skipped = queue.qsize() + unstarted
        if self._draining and skipped and self.status == "complete":
            self.status = self._drain_reason
        return RunOutcome(self.run_id, self.status, measured, skipped)
