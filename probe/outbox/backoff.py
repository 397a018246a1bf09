"""How long to wait after failed uploads: exponential backoff with full jitter.

After the n-th failure in a row the wait is uniform in [0, min(cap, base * 2**(n-1))]
(at least :data:`FLOOR`, or the cap if smaller): a fleet of probes that lost the
collector at the same moment does not come back at the same moment. A ``Retry-After``
from the collector (429, 503) is a lower bound, itself bounded by
:data:`MAX_RETRY_AFTER` so a broken or hostile answer cannot silence a probe for
years. Pure: the random source is injected.

>>> b = Backoff(base=10, cap=3600, rng=lambda: 1.0)
>>> [b.failed() for _ in range(3)]
[10.0, 20.0, 40.0]
"""

from __future__ import annotations

import random
from collections.abc import Callable

FLOOR = 1.0  # seconds: never retry in a tight loop
MAX_RETRY_AFTER = 86_400.0  # seconds: the longest Retry-After honoured
_MAX_EXPONENT = 60  # 2**60 * base is far above any cap; keeps the arithmetic finite


class Backoff:
    def __init__(self, base: float, cap: float, rng: Callable[[], float] = random.random) -> None:
        self.base = base
        self.cap = cap
        self.rng = rng
        self.failures = 0

    def ceiling(self) -> float:
        """The longest wait after the failures so far."""
        if self.failures == 0:
            return 0.0
        return min(self.cap, self.base * 2 ** min(self.failures - 1, _MAX_EXPONENT))

    def failed(self, retry_after: float | None = None) -> float:
        """Count a failure; the seconds to wait before the next attempt."""
        self.failures += 1
        wait = max(min(FLOOR, self.cap), self.rng() * self.ceiling())
        if retry_after is not None:
            wait = max(wait, min(retry_after, MAX_RETRY_AFTER))
        return wait

    def succeeded(self) -> None:
        self.failures = 0
