"""A userspace access link with delay, jitter and loss (what tc netem would do).

Some kernels (this project's build machines among them) lack the netem qdisc, so when
a scenario asks for path conditions the probe's link to the router is two TUN
devices joined by this process instead of a veth pair. It runs in the router's
namespace, creates ``lan`` there and ``plink`` which it moves into the probe's
namespace as ``eth0``, and forwards IP packets between them: each is dropped with
probability ``loss``, or delivered ``delay`` (+/- ``jitter``) seconds later, in order.

    python -m probe.lab.link --probe-ns NS --delay 0.05 --jitter 0.005 --loss 0.01 --ready FILE
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import random
import signal
import struct
import subprocess
from collections import deque
from pathlib import Path

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
MTU = 65535


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


class Direction:
    """One way of the link: a FIFO of (due time, packet)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, src: int, dst: int, delay: float,
                 jitter: float, loss: float, rng: random.Random) -> None:  # fmt: skip
        self.loop, self.src, self.dst = loop, src, dst
        self.delay, self.jitter, self.loss, self.rng = delay, jitter, loss, rng
        self.queue: deque[tuple[float, bytes]] = deque()
        self.last_due = 0.0
        self.timer: asyncio.TimerHandle | None = None
        loop.add_reader(src, self.readable)

    def readable(self) -> None:
        while True:
            try:
                packet = os.read(self.src, MTU)
            except BlockingIOError:
                return
            except OSError:
                return
            if self.loss and self.rng.random() < self.loss:
                continue
            due = self.loop.time() + max(
                0.0, self.delay + self.rng.uniform(-self.jitter, self.jitter)
            )
            due = max(due, self.last_due)  # keep order: TCP suffers from reordering
            self.last_due = due
            self.queue.append((due, packet))
            if self.timer is None:
                self.timer = self.loop.call_at(due, self.deliver)

    def deliver(self) -> None:
        self.timer = None
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now:
            _, packet = self.queue.popleft()
            try:
                os.write(self.dst, packet)
            except OSError:
                pass  # the device is going away with the lab
        if self.queue:
            self.timer = self.loop.call_at(self.queue[0][0], self.deliver)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--probe-ns", required=True)
    p.add_argument("--delay", type=float, default=0.0, help="one-way delay, seconds")
    p.add_argument("--jitter", type=float, default=0.0, help="one-way jitter, seconds")
    p.add_argument("--loss", type=float, default=0.0, help="one-way loss probability (0-1)")
    p.add_argument("--ready", type=Path, required=True)
    args = p.parse_args(argv)
    lan, plink = open_tun("lan"), open_tun("plink")
    subprocess.run(["ip", "link", "set", "plink", "netns", args.probe_ns], check=True)
    subprocess.run(["ip", "-n", args.probe_ns, "link", "set", "plink", "name", "eth0"], check=True)
    loop = asyncio.new_event_loop()
    rng = random.Random()
    Direction(loop, plink, lan, args.delay, args.jitter, args.loss, rng)
    Direction(loop, lan, plink, args.delay, args.jitter, args.loss, rng)
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    tmp = args.ready.with_suffix(".tmp")
    tmp.write_text("ready\n")
    os.replace(tmp, args.ready)
    loop.run_forever()


if __name__ == "__main__":
    main()
