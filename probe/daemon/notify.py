"""systemd's notification protocol: READY, WATCHDOG, STATUS, RELOADING, STOPPING.

The protocol is one datagram of ``KEY=VALUE`` lines sent to the ``AF_UNIX`` socket
named in ``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace). It is
written here by hand rather than with a library: it is a dozen lines, and the
libraries either need libsystemd's headers to build (systemd-python, a burden on a
Raspberry Pi) or add a dependency for what ``socket.sendto`` does. Outside systemd
(no ``$NOTIFY_SOCKET``) every call does nothing.

>>> notifier = Notifier.from_env()
>>> notifier.ready("measuring 2 suites")
>>> notifier.watchdog_interval()  # seconds between WATCHDOG=1 pings, or None
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("vantage.daemon")


class Notifier:
    """Sends notifications to systemd (when started by it)."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET") or None
        watchdog: int | None = None
        pid = env.get("WATCHDOG_PID")
        if env.get("WATCHDOG_USEC") and (not pid or pid == str(os.getpid())):
            try:
                watchdog = int(env["WATCHDOG_USEC"])
            except ValueError:
                watchdog = None
            if watchdog is not None and watchdog <= 0:
                watchdog = None
        return cls(address, watchdog)

    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half the watchdog timeout, as systemd advises."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def send(self, **fields: str) -> None:
        """Send ``KEY=VALUE`` fields (``send(READY="1", STATUS="...")``)."""
        if not self.address or not fields:
            return
        message = "\n".join(f"{k}={v}" for k, v in fields.items()).encode("utf-8", "replace")
        target = self.address
        if target.startswith("@"):
            target = "\0" + target[1:]
        try:
            if self._sock is None:
                # Non-blocking: a reader that does not keep up must never stall the daemon.
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message, target)
        except OSError as exc:
            if not self._warned:  # once: a missing socket must not flood the journal
                log.warning("cannot notify systemd at %s: %s", self.address, exc)
                self._warned = True

    def ready(self, status: str) -> None:
        self.send(READY="1", STATUS=status)

    def status(self, text: str) -> None:
        self.send(STATUS=text)

    def watchdog(self) -> None:
        self.send(WATCHDOG="1")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd (253+) tell this reload from an earlier one.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send(RELOADING="1", MONOTONIC_USEC=str(usec), STATUS="reloading the configuration")

    def stopping(self, status: str = "stopping") -> None:
        self.send(STOPPING="1", STATUS=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
