"""A real ``vantage daemon`` subprocess against loopback fixtures, and its files.

Only 127.0.0.0/8 is ever contacted: the catalog holds loopback test names, the
resolver is a fixture DNS server, the system resolver and the resolver lookup are off.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from probe.tomltable import to_toml

ROOT = Path(__file__).resolve().parents[2]


def write_catalog(path: Path, targets: list[dict[str, Any]], name: str = "lab") -> Path:
    path.write_text(to_toml({"format": 1, "service": {"name": name}, "target": targets}))
    return path


def config_doc(
    data_dir: Path,
    dns_port: int,
    *,
    suites: dict[str, dict[str, Any]] | None = None,
    **sections: dict[str, Any],
) -> dict[str, Any]:
    """A daemon configuration for loopback tests; ``sections`` add or replace keys."""
    doc: dict[str, Any] = {
        "probe": {"data_dir": str(data_dir)},
        "vantage": {"resolver_whoami": "", "cc": "ZZ"},
        "dns": {"system": False, "resolvers": [f"udp://127.0.0.1:{dns_port}"]},
        "engine": {
            "public_ranges": ["127.0.0.0/8"],
            "system_cas": False,
            "concurrency": 4,
            "dns_timeout": 1.0,
            "tcp_timeout": 30.0,
            "control_sni": "",
        },  # fmt: skip
        "daemon": {"residual_gap": 0, "stop_timeout": 1.0},
        "retention": {"min_free_mb": 0},
        "suites": suites or {"s": {"interval": 0.5, "jitter": 0.0}},
    }
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    return doc


def write_config(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(to_toml(doc))
    return path


def vantage(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
    return subprocess.run([sys.executable, "-m", "probe", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env=env)  # fmt: skip


class DaemonProcess:
    """``vantage --config CONFIG daemon --no-builtin --targets CATALOG`` with its stderr
    read in a thread (lines kept in :attr:`lines`)."""

    def __init__(
        self,
        config: Path,
        catalog: Path,
        data_dir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        cmd = [sys.executable, "-m", "probe", "--config", str(config), "daemon", "--no-builtin",
               "--targets", str(catalog)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)  # fmt: skip
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def _drain(self) -> None:
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return
            if line is not None:
                self.lines.append(line)

    def log(self) -> str:
        self._drain()
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 30.0, start: int = 0) -> str:
        """The first stderr line (from line ``start`` on) matching ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            self._drain()
            for line in self.lines[start:]:
                if regex.search(line):
                    return line
            if self.proc.poll() is not None and self._queue.empty():
                self._reader.join(timeout=2)
                self._drain()
                if not any(regex.search(line) for line in self.lines[start:]):
                    raise AssertionError(
                        f"daemon exited ({self.proc.returncode}) before {pattern!r}:\n{self.log()}"
                    )
            if time.monotonic() > deadline:
                raise AssertionError(f"no line matching {pattern!r} in {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def state(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.data_dir / "daemon.json").read_text()))
        except (OSError, ValueError):
            return {}

    def wait_state(self, test: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state()
            if state and test(state):
                return state
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}):\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"state not reached in {timeout} s: {self.state()}\n{self.log()}")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        self._drain()
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._reader.join(timeout=5)

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def env_without_consent() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "VANTAGE_PRIVACY_CONSENT"}
