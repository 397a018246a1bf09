"""One time base per measurement: ``t0``/``t`` are seconds since its start.

The clock is injected so tests can drive it; production uses ``time.monotonic``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]


class Trace:
    """Relative timestamps against one zero time taken at construction."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._zero = clock()

    def now(self) -> float:
        return round(self._clock() - self._zero, 6)
