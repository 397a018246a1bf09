"""One time base per measurement, and the one primitive that runs a step.

``t0``/``t`` are seconds since the measurement started, from an injected monotonic
clock (tests can drive it). :meth:`Trace.step` wraps every network step the same
way: it applies the step's timeout, stamps ``t`` when the step ends, and turns any
failure into the observation's failure string, so a failed step is data.

>>> obs = TCPConnect(ip, port, t0=trace.now(), t=0.0)
>>> async with trace.step(obs, "connect", timeout=15):
...     stream = await asyncio.open_connection(ip, port)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Protocol

from probe.engine.failures import classify

Clock = Callable[[], float]


class Observation(Protocol):
    t: float
    failure: str | None
    failed_operation: str | None


class Trace:
    """Relative timestamps against one zero time taken at construction."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._zero = clock()

    def now(self) -> float:
        return round(self._clock() - self._zero, 6)

    @asynccontextmanager
    async def step(
        self,
        obs: Observation,
        operation: str | Callable[[BaseException], str],
        timeout: float | None,
    ) -> AsyncIterator[None]:
        """Run the body as one step of ``obs``: failures are recorded, not raised.

        Cancellation is recorded as ``interrupted`` and re-raised, so whoever
        cancelled still sees it. ``operation`` may be a function of the exception
        when the failed operation depends on where it happened (HTTP).
        """

        def op(exc: BaseException) -> str:
            return operation if isinstance(operation, str) else operation(exc)

        try:
            async with asyncio.timeout(timeout):
                yield
        except asyncio.CancelledError as exc:
            obs.failure, obs.failed_operation = "interrupted", op(exc)
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes data
            obs.failure, obs.failed_operation = classify(exc), op(exc)
        finally:
            obs.t = self.now()
