"""Token buckets per key (a probe id, or a caller's address), kept in memory.

A bucket holds up to ``burst`` tokens and refills at ``rate`` per second. A caller
first asks whether it may start (:meth:`RateLimiter.wait` is 0 while the bucket has a
token) and is then charged what its request cost (:meth:`RateLimiter.charge`, e.g. the
number of measurements in a batch), which may leave the bucket in debt: the next
request waits until the debt is paid back. So one request is never refused for its
size alone, yet a probe's sustained rate stays at ``rate``.

>>> limits = RateLimiter(rate=100, burst=1000)
>>> limits.wait("probe-1")
0.0
>>> limits.charge("probe-1", 1500)
>>> round(limits.wait("probe-1"), 1)  # 500 in debt + 1 token, at 100/s
5.0

Keys are hashed with a key made at start, so the memory never holds a caller's
address. Buckets full again are forgotten now and then: memory stays bounded by the
callers of the last ``burst / rate`` seconds.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import secrets
import threading
import time
from collections.abc import Callable

#: Forget full buckets once this many are kept.
PRUNE_AT = 10_000


class RateLimiter:
    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[bytes, tuple[float, float]] = {}  # key -> (tokens, at)
        self._salt = secrets.token_bytes(16)
        self._lock = threading.Lock()

    def _key(self, key: str) -> bytes:
        return hmac.digest(self._salt, key.encode("utf-8", "surrogatepass"), hashlib.sha256)[:16]

    def _level(self, k: bytes, now: float) -> float:
        tokens, at = self._buckets.get(k, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def wait(self, key: str) -> float:
        """Seconds until ``key`` may make a request (0.0: now)."""
        with self._lock:
            level = self._level(self._key(key), self._clock())
        return 0.0 if level >= 1 else (1 - level) / self.rate

    def charge(self, key: str, cost: float = 1.0) -> None:
        """Take ``cost`` tokens from ``key``'s bucket (it may go into debt)."""
        with self._lock:
            now = self._clock()
            k = self._key(key)
            self._buckets[k] = (self._level(k, now) - cost, now)
            if len(self._buckets) > PRUNE_AT:
                self._prune(now)

    def take(self, key: str, cost: float = 1.0) -> float:
        """:meth:`wait`, and when it is 0 also :meth:`charge`: one step for fixed costs."""
        with self._lock:
            now = self._clock()
            k = self._key(key)
            level = self._level(k, now)
            if level < 1:
                return (1 - level) / self.rate
            self._buckets[k] = (level - cost, now)
            if len(self._buckets) > PRUNE_AT:
                self._prune(now)
        return 0.0

    def reserve(self, key: str, cost: float) -> float:
        """Take ``cost`` tokens now if the bucket holds them all (a cost above ``burst``
        needs a full bucket), else take nothing and return the seconds until it would.

        Concurrent requests each reserve before their body is read, so they cannot all
        pass one check made before any was charged. Give back what a request did not
        use with :meth:`refund`.
        """
        need = min(cost, self.burst)
        with self._lock:
            now = self._clock()
            k = self._key(key)
            level = self._level(k, now)
            if level < need:
                return (need - level) / self.rate
            self._buckets[k] = (level - cost, now)
            if len(self._buckets) > PRUNE_AT:
                self._prune(now)
        return 0.0

    def refund(self, key: str, amount: float) -> None:
        """Give back ``amount`` tokens reserved and not used (never past ``burst``)."""
        if amount <= 0:
            return
        with self._lock:
            now = self._clock()
            k = self._key(key)
            self._buckets[k] = (min(self.burst, self._level(k, now) + amount), now)

    def _prune(self, now: float) -> None:
        full = [k for k in self._buckets if self._level(k, now) >= self.burst]
        for k in full:
            del self._buckets[k]

    def __len__(self) -> int:
        return len(self._buckets)


class Slots:
    """A count of things done at once, refused past ``size`` rather than queued (a
    queue would hold the caller's connection). The event loop's thread only."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.busy = 0

    def take(self) -> bool:
        if self.busy >= self.size:
            return False
        self.busy += 1
        return True

    def give(self) -> None:
        self.busy -= 1


def address_key(address: str) -> str:
    """The bucket of a caller's address: the address itself for IPv4, its /64 for
    IPv6 (one subscriber holds a whole /64, and would otherwise get 2^64 buckets)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
