"""The daemon in process: the uploader beside the schedule (started, restarted when the
collector changes, stopped), crash-loop back-off before measuring."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

import probe.outbox
from probe.config import Config
from probe.daemon.lifecycle import ConfigSource, Daemon
from probe.daemon.notify import Notifier
from probe.daemon.runs import CatalogSource
from probe.daemon.state import CRASH_LIMIT
from probe.store import Store
from tests.daemon.harness import config_doc, write_catalog, write_config


def _daemon(tmp_path: Path, **sections: dict[str, Any]) -> tuple[Daemon, Path, dict]:
    catalog = write_catalog(tmp_path / "c.toml", [{"id": "a", "kind": "dns", "host": "a.test"}])
    doc = config_doc(tmp_path / "data", 9, suites={"s": {"interval": 3600.0}}, **sections)
    path = write_config(tmp_path / "v.toml", doc)
    source = ConfigSource(path, {})
    daemon = Daemon(source.load(), source, CatalogSource((catalog,), builtin=False),
                    notifier=Notifier(None))  # fmt: skip
    return daemon, path, doc


async def _until(test, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not test():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_the_uploader_runs_beside_the_schedule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loops: list[tuple[Config, Store, asyncio.Event]] = []

    async def upload_loop(cfg: Config, store: Store, stop: asyncio.Event) -> None:
        loops.append((cfg, store, stop))
        await stop.wait()

    monkeypatch.setattr(probe.outbox, "upload_loop", upload_loop)
    daemon, path, doc = _daemon(tmp_path)

    async def main() -> int:
        serving = asyncio.create_task(daemon.serve())
        await _until(lambda: len(loops) == 1)
        cfg, store, stop = loops[0]
        assert cfg.collector.url == "" and store is daemon.store and not stop.is_set()
        # A reload that leaves the collector alone keeps the uploader running.
        assert await daemon.reload()
        assert len(loops) == 1 and not stop.is_set()
        doc["collector"] = {"url": "http://127.0.0.1:9/"}
        write_config(path, doc)
        assert await daemon.reload()
        await _until(lambda: len(loops) == 2)
        assert stop.is_set() and loops[1][0].collector.url == "http://127.0.0.1:9/"
        daemon.request_stop("test")
        return await serving

    assert asyncio.run(main()) == 0
    assert all(stop.is_set() for _, _, stop in loops)


def test_repeated_crashes_back_off_before_measuring(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    daemon, _, _ = _daemon(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    recent = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=30)
    (data / "daemon.json").write_text(json.dumps({
        "running": True, "pid": 1, "updated_at": recent.isoformat(),
        "crashes": [recent.isoformat()] * (CRASH_LIMIT - 1),
    }))  # fmt: skip
    caplog.set_level(logging.INFO, logger="vantage.daemon")

    async def main() -> tuple[int, dict]:
        serving = asyncio.create_task(daemon.serve())
        state: dict = {}

        def backing_off() -> bool:
            nonlocal state
            try:
                state = json.loads((data / "daemon.json").read_text())
            except ValueError:
                return False
            return state.get("activity") == "backing off"

        await _until(backing_off)
        daemon.request_stop("test")
        return await asyncio.wait_for(serving, timeout=10), state

    code, state = asyncio.run(main())
    assert code == 0
    assert state["backoff_until"] is not None and len(state["crashes"]) == CRASH_LIMIT
    assert "crash-loop protection" in caplog.text and "waiting 60 s" in caplog.text
    assert not (data / "vantage.db").exists()  # nothing opened, nothing measured
    final = json.loads((data / "daemon.json").read_text())
    assert final["running"] is False and final["exit_code"] == 0
    # The clean stop is no crash: the next start does not count it.
    from probe.daemon.state import DaemonState

    assert DaemonState(data / "daemon.json").start(os.getpid()) == CRASH_LIMIT
