"""What happens when a suite is due: the checks, the wait, the run.

In order, one suite at a time (runs are serialised: a Raspberry Pi measures one
suite at a time, within its memory budget, and suites sharing endpoints do not
collide):

1. consent (``vantage consent``) must be recorded, or the run is skipped;
2. the low-disk guard: below ``retention.min_free_mb`` the run is skipped and the
   daemon shows "paused: low disk";
3. residual blocking (REFERENCE.md section 2): no endpoint is measured again sooner
   than ``daemon.residual_gap`` after it was last measured, by any suite; the run
   waits until its endpoints are clear (control targets, harmless by design, are
   exempt: they run with every suite);
4. the run itself (``probe.measuring.SuiteRun``), its measurements written in one
   transaction.

A stop request drains the run in flight (nothing new starts, what is in flight
finishes) and, after ``daemon.stop_timeout``, cancels what is left: those
measurements are kept, marked interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

from probe.config import Config, ConfigError, SuiteSection
from probe.daemon.consent import has_consent
from probe.daemon.disk import DiskFree, check_disk
from probe.daemon.state import DaemonState, iso
from schema import tables

if TYPE_CHECKING:
    from probe.measuring import RunResult, SuiteRun
    from probe.store import Store
    from schema.model import Service, Target

log = logging.getLogger("vantage.daemon")


@dataclass(frozen=True)
class CatalogSource:
    """Where the daemon's catalog comes from (re-read on SIGHUP)."""

    paths: tuple[Path, ...] = ()
    builtin: bool = True

    def load(self) -> list[Service]:
        from probe.catalog import load_catalog

        return load_catalog(self.paths, builtin=self.builtin)


def suite_services(catalog: Sequence[Service], suite: SuiteSection) -> list[Service]:
    """The services a suite measures, control services added (they run with every
    suite). Raises :class:`ConfigError` naming ``suites.NAME.services`` for a service
    the catalog does not have."""
    by_name = {s.name: s for s in catalog}
    missing = [n for n in suite.services if n not in by_name]
    if missing:
        raise ConfigError(
            f"suites.{suite.name}.services: unknown service {missing[0]!r} "
            f"(known: {', '.join(sorted(by_name))})"
        )
    if suite.services:
        chosen = [by_name[n] for n in dict.fromkeys(suite.services)]
    else:
        chosen = [s for s in catalog if not s.control]
    return chosen + [s for s in catalog if s.control and s not in chosen]


def endpoint(target: Target) -> str:
    """What residual blocking is keyed on: the host (a name or an address), any port."""
    return target.host.lower().rstrip(".")


class Ledger:
    """When each endpoint was last measured (wall-clock seconds), for the residual gap."""

    def __init__(self, gap: float) -> None:
        self.gap = gap
        self.last: dict[str, float] = {}

    def record(self, targets: Iterable[Target], at: float) -> None:
        for t in targets:
            if not t.control:
                key = endpoint(t)
                self.last[key] = max(self.last.get(key, 0.0), at)

    def wait(self, targets: Iterable[Target], now: float) -> tuple[float, list[str]]:
        """Seconds to wait before ``targets`` may be measured, and the endpoints why."""
        longest, why = 0.0, []
        for t in targets:
            if t.control:
                continue
            key = endpoint(t)
            seen = self.last.get(key)
            if seen is not None and seen + self.gap > now:
                if seen + self.gap - now > longest:
                    longest = seen + self.gap - now
                why.append(key)
        return longest, sorted(set(why))

    def seed(self, store: Store, now: float, lookback: float) -> None:
        """Learn from the database what was measured lately (before a restart)."""
        m, r = tables.measurements, tables.runs
        since = dt.datetime.fromtimestamp(now - lookback, dt.UTC)
        recent = sa.select(r.c.run_id).where(r.c.started_at >= since)  # few runs, indexed rows
        query = sa.select(m.c.target, m.c.start_time, m.c.test_runtime).where(
            m.c.run_id.in_(recent), m.c.start_time >= since
        )
        with store.engine.connect() as conn:
            for target, start, runtime in conn.execute(query):
                host = target.get("host") if isinstance(target, dict) else None
                if not isinstance(host, str) or (
                    isinstance(target, dict) and target.get("control")
                ):
                    continue
                start = start if start.tzinfo else start.replace(tzinfo=dt.UTC)
                at = start.timestamp() + float(runtime or 0.0)
                key = host.lower().rstrip(".")
                self.last[key] = max(self.last.get(key, 0.0), at)


class SuiteRunner:
    """Runs due suites one at a time (see the module docstring)."""

    def __init__(
        self,
        cfg: Config,
        catalog: Sequence[Service],
        store: Store,
        state: DaemonState,
        *,
        disk_free: DiskFree,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.catalog = list(catalog)
        self.store = store
        self.state = state
        self.disk_free = disk_free
        self.clock = clock
        self.ledger = Ledger(cfg.daemon.residual_gap)
        self.lock = asyncio.Lock()
        self.stopping = asyncio.Event()
        self.current: SuiteRun | None = None
        self.current_task: asyncio.Task[RunResult] | None = None
        #: Told what the runner does ("measuring suite s"), for systemd's STATUS.
        self.on_activity: Callable[[str], None] = lambda text: None

    def _activity(self, what: str, detail: str = "") -> None:
        self.state.activity(what, detail)
        self.on_activity(f"{what}: {detail}" if detail else what)

    def configure(self, cfg: Config, catalog: Sequence[Service]) -> None:
        """A reloaded configuration; the run in flight keeps the one it started with."""
        self.cfg, self.catalog = cfg, list(catalog)
        self.ledger.gap = cfg.daemon.residual_gap

    async def _pause_for(self, seconds: float) -> bool:
        """Sleep, or return early (False) when the daemon stops."""
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)
        except TimeoutError:
            return True
        return False

    async def due(self, name: str) -> None:
        """The scheduler says suite ``name`` is due. Never raises: a failed run is
        logged and recorded, and the daemon goes on."""
        try:
            await self._due(name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001  (a bug in one run must not end the daemon)
            log.exception("suite %s: the run failed", name)
            self.state.suite_result(name, last_error=f"{type(exc).__name__}: {exc}")

    async def _due(self, name: str) -> None:
        if self.stopping.is_set():
            return
        async with self.lock:
            if self.stopping.is_set():
                return
            cfg = self.cfg
            suite = next((s for s in cfg.suites if s.name == name), None)
            if suite is None:
                log.info("suite %s is no longer configured: not measured", name)
                return
            if not has_consent(cfg):
                log.warning("suite %s: not measured: no consent recorded (`vantage consent`)", name)
                self.state.suite_result(name, last_skipped=iso(_now()), last_skip="no consent")
                return
            disk = await asyncio.to_thread(
                check_disk, cfg.data_dir(), cfg.retention.min_free_mb, self.disk_free
            )
            if not disk.ok:
                log.warning("suite %s: not measured: paused: low disk (%s)", name, disk.describe())
                self.state.pause("low disk", disk.describe())
                self.state.suite_result(name, last_skipped=iso(_now()), last_skip="low disk")
                return
            if self.state.doc.get("paused"):
                log.info("disk space is back (%d MB free): measuring again", disk.free >> 20)
                self.state.unpause()
            services = suite_services(self.catalog, suite)
            targets = [t for s in services for t in s.targets]
            wait, why = self.ledger.wait(targets, self.clock())
            if wait > 0:
                shown = ", ".join(why[:3]) + (f" and {len(why) - 3} more" if len(why) > 3 else "")
                log.info(
                    "suite %s waits %.0f s: %s measured less than daemon.residual_gap = "
                    "%g s ago (residual blocking)",
                    name,
                    wait,
                    shown,
                    cfg.daemon.residual_gap,
                )
                self._activity("waiting", f"suite {name}: residual gap, {wait:.0f} s")
                # Kept across a stop: a daemon stopped while the run waits makes the run
                # when it comes back (``pending_runs``), never drops it.
                self.state.suite_result(name, pending=self.state.suite(name).get("pending")
                                        or iso(_now()))  # fmt: skip
                if not await self._pause_for(wait):
                    log.info("suite %s: stopped while waiting out the residual gap: the run "
                             "is made when the daemon starts again", name)  # fmt: skip
                    return
            await self._run(cfg, suite, services, targets)

    async def _run(
        self, cfg: Config, suite: SuiteSection, services: list[Service], targets: list[Target]
    ) -> None:
        from probe.measuring import SuiteRun, build_context

        try:
            ctx, system_resolver = build_context(cfg)
        except (ConfigError, ValueError) as exc:  # e.g. no resolver while the network is down
            log.error("suite %s: not measured: %s", suite.name, exc)
            self.state.suite_result(suite.name, last_error=str(exc), last_skipped=iso(_now()))
            return
        # One transaction for the whole run: the batch is the run (SD card writes).
        hold = cfg.engine.run_deadline + cfg.daemon.stop_timeout + 60.0
        run = SuiteRun(
            cfg,
            services,
            self.store,
            suite=suite.name,
            ctx=ctx,
            system_resolver=system_resolver,
            batch_size=max(1, len(targets)),
            max_delay=hold,
        )
        self.current = run
        log.info("suite %s: measuring %d targets", suite.name, len(run.targets))
        self.state.suite_result(suite.name, last_started=iso(_now()), pending=None)
        self._activity("measuring", f"suite {suite.name}: {len(run.targets)} targets")
        task = asyncio.ensure_future(run.execute())
        self.current_task = task
        try:
            # Shielded: the scheduler cancelling its job must not cut the run short;
            # stopping goes through drain() and stop() instead.
            result = await asyncio.shield(task)
        finally:
            self.ledger.record(targets, self.clock())
            self.current = None
            self.current_task = None
            self._activity("idle")
            self.store.engine.dispose()  # pooled connections' page caches, until next time
            release_memory()
        blocked = [f"{s.service} {s.status}" for s in result.statuses if s.status != "ok"]
        log.info(
            "suite %s: run %s %s: %d of %d targets measured%s",
            suite.name,
            result.run_id,
            result.status,
            len(result.measurements),
            result.targets,
            f"; {', '.join(blocked)}" if blocked else "",
        )
        self.state.suite_result(
            suite.name,
            last_run=result.run_id,
            last_status=result.status,
            last_measured=len(result.measurements),
            last_finished=iso(_now()),
            last_error=None,
        )

    def pending_runs(self) -> list[str]:
        """Suites whose due run waited out the residual gap when the daemon stopped:
        made as soon as it starts again."""
        suites = self.state.doc.get("suites") or {}
        configured = {s.name for s in self.cfg.suites}
        return sorted(
            name
            for name, entry in suites.items()
            if isinstance(entry, dict) and entry.get("pending") and name in configured
        )

    async def stop(self, grace: float) -> None:
        """Stop: nothing new starts; the run in flight has ``grace`` seconds to finish,
        then what is in flight is cancelled (kept, marked interrupted) and written."""
        self.stopping.set()
        run, task = self.current, self.current_task
        if run is None or task is None:
            return
        run.drain("interrupted")
        done, _ = await asyncio.wait({task}, timeout=grace)
        if not done:
            log.info("stop: cancelling the measurements still in flight after %g s", grace)
            run.stop("interrupted")
            await asyncio.wait({task})

    def stop_now(self) -> None:
        """A second signal: cancel what is in flight at once."""
        self.stopping.set()
        if self.current is not None:
            self.current.stop("interrupted")


_M_ARENA_MAX = -8  # glibc's mallopt() parameter


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas (call before any thread starts). By default each thread
    (the database writes and lookups run in worker threads) may get an arena of its own
    that keeps its pages after a run: about 9 MB of a Pi's memory for nothing.
    Elsewhere a no-op."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    with contextlib.suppress(AttributeError):
        libc.mallopt(_M_ARENA_MAX, arenas)


def release_memory() -> None:
    """Hand the memory a run used back to the system between runs: collect cycles, then
    ask glibc to return free heap pages (``malloc_trim``); elsewhere a no-op. Without
    it a long-lived process keeps its peak run's pages for good."""
    import gc

    gc.collect()
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    with contextlib.suppress(AttributeError):
        libc.malloc_trim(0)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
