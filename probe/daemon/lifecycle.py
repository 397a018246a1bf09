"""The daemon process: start, run the schedule beside the uploader, reload, stop.

Start: consent (exit 77 without it), the catalog and every suite's services checked
(exit 65/78 naming the key), one daemon per data directory (a lock), crash-loop
back-off, the database opened, then the schedule, the uploader, retention and the
systemd watchdog run until a signal:

- SIGTERM or SIGINT: stop. The run in flight is drained for ``daemon.stop_timeout``
  seconds, then what is still in flight is cancelled (kept, marked interrupted);
  everything finished is stored; exit 0. A second signal cancels at once.
- SIGHUP: reload the configuration from the same file (and the catalog). A new
  configuration that fails to load or names an unknown service is rejected with the
  reason (naming the key) in the log, and the running one is kept; a good one
  reschedules the suites whose schedule changed. ``probe.data_dir`` and ``probe.db``
  need a restart.

systemd (Type=notify): READY=1 once running, WATCHDOG=1 every half
``WatchdogSec``, STATUS= what it does, RELOADING=1 and STOPPING=1. Logs go to stderr
in plain lines (journald adds the time and, from the ``<N>`` prefix, the priority).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import fcntl
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from probe.config import Config, ConfigError, load_config
from probe.daemon.consent import has_consent, refusal
from probe.daemon.disk import DiskFree, disk_free
from probe.daemon.notify import Notifier
from probe.daemon.runs import CatalogSource, SuiteRunner, suite_services
from probe.daemon.state import LOCK_FILE, STATE_FILE, DaemonState, backoff_seconds, iso

if TYPE_CHECKING:
    from probe.daemon.schedule import Missed, Schedule
    from probe.store import Store
    from schema.model import Service

log = logging.getLogger("vantage.daemon")

EX_OK = 0
EX_SOFTWARE = 70
EX_IOERR = 74
EX_TEMPFAIL = 75  # another daemon uses this data directory
EX_NOPERM = 77
RETENTION_FIRST = 10.0  # seconds after start
RETENTION_EVERY = 6 * 3600.0
UPLOADER_RESTART = 60.0  # seconds before an uploader that failed is started again


def setup_logging(stream: IO[str] | None = None, level: int = logging.INFO) -> None:
    """Plain lines on stderr; with a ``<N>`` syslog priority prefix under journald."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


class _JournalFormatter(logging.Formatter):
    _PRIORITY = {
        logging.DEBUG: 7,
        logging.INFO: 6,
        logging.WARNING: 4,
        logging.ERROR: 3,
        logging.CRITICAL: 2,
    }

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{self._PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in text.splitlines())


class ConfigSource:
    """Where the configuration was read from, so that SIGHUP reads it the same way."""

    def __init__(
        self, path: Path | None, overrides: Mapping[str, Any], env: Mapping[str, str] | None = None
    ) -> None:
        self.path = path
        self.overrides = dict(overrides)
        self.env = env

    def load(self) -> Config:
        return load_config(
            self.path, env=os.environ if self.env is None else self.env, overrides=self.overrides
        )


def check(cfg: Config, catalog: list[Service]) -> None:
    """What must hold before a configuration is used (raises ConfigError naming the key)."""
    from probe.engine.dns import ResolverSpec

    for suite in cfg.suites:
        suite_services(catalog, suite)
    for spec in cfg.dns.resolvers:
        ResolverSpec.parse(spec)  # ResolverSpecError (a ValueError) names the spec
    for text in cfg.engine.public_ranges:
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError as exc:
            raise ConfigError(f"engine.public_ranges: not a network: {text!r}") from exc
    for ca in cfg.engine.ca_bundle:
        if not Path(ca).is_file():
            raise ConfigError(f"engine.ca_bundle: no such file: {ca}")


class Daemon:
    """``vantage daemon``. ``disk_free`` is injectable (tests simulate a full disk)."""

    def __init__(
        self,
        cfg: Config,
        config: ConfigSource,
        catalog: CatalogSource,
        *,
        disk_free: DiskFree = disk_free,
        notifier: Notifier | None = None,
    ) -> None:
        self.cfg = cfg
        self.config = config
        self.catalog_source = catalog
        self.disk_free = disk_free
        self.notifier = notifier or Notifier.from_env()
        self.state = DaemonState(cfg.data_dir() / STATE_FILE)
        self.stop_event = asyncio.Event()
        self._signals = 0
        self._lock_fh: IO[bytes] | None = None
        self.store: Store | None = None
        self.schedule: Schedule | None = None
        self.runner: SuiteRunner | None = None
        self._uploader: asyncio.Task[None] | None = None
        self._upload_stop: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._reloading = asyncio.Lock()

    # -- start -------------------------------------------------------------------------

    async def serve(self) -> int:
        """Run until stopped; returns the exit code."""
        cfg = self.cfg
        if not has_consent(cfg):
            log.error("%s", refusal(cfg).removeprefix("vantage: "))
            return EX_NOPERM
        catalog = await asyncio.to_thread(self.catalog_source.load)  # CatalogError: exit 65
        check(cfg, catalog)  # ConfigError: exit 78
        try:
            locked = self._lock(cfg.data_dir())
        except OSError as exc:
            log.error("cannot use the data directory %s: %s", cfg.data_dir(), exc)
            return EX_IOERR
        if not locked:
            return EX_TEMPFAIL
        crashes = self.state.start(os.getpid())
        code = EX_SOFTWARE
        try:
            code = await self._serve(cfg, catalog, crashes)
        finally:
            self.state.end(code)
            self.notifier.close()
        return code

    def _lock(self, data_dir: Path) -> bool:
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / LOCK_FILE
        fh = open(path, "ab+")  # noqa: SIM115  (held open for the daemon's lifetime)
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            log.error(
                "another vantage daemon is using %s (lock %s held): not starting", data_dir, path
            )
            return False
        self._lock_fh = fh
        return True

    async def _serve(self, cfg: Config, catalog: list[Service], crashes: int) -> int:
        from probe.store import Store, StoreError

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        self._tasks.append(asyncio.create_task(self._watchdog()))
        try:
            wait = backoff_seconds(crashes)
            if wait:
                until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=wait)
                log.warning(
                    "%d crashes in the last minutes: waiting %.0f s before measuring "
                    "(crash-loop protection)",
                    crashes,
                    wait,
                )
                self.state.activity("backing off", f"{crashes} recent crashes")
                self.state.backoff(until)
                self.notifier.ready(f"backing off {wait:.0f} s after {crashes} crashes")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(), timeout=wait)
                self.state.backoff(None)
                if self.stop_event.is_set():
                    return EX_OK
            try:
                self.store = await asyncio.to_thread(Store.open, cfg.db_url())
            except StoreError as exc:
                log.error("cannot open the database: %s", exc)
                return EX_IOERR
            return await self._measure(cfg, catalog)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self.store is not None:
                self.store.close()

    async def _measure(self, cfg: Config, catalog: list[Service]) -> int:
        from probe.daemon.schedule import Schedule
        from probe.vantage import probe_id

        assert self.store is not None
        store = self.store
        runner = SuiteRunner(cfg, catalog, store, self.state, disk_free=self.disk_free)
        runner.on_activity = self.notifier.status
        self.runner = runner
        lookback = cfg.daemon.residual_gap + cfg.engine.run_deadline
        await asyncio.to_thread(runner.ledger.seed, store, runner.clock(), lookback)
        seed = await asyncio.to_thread(probe_id, cfg.data_dir())
        schedule = Schedule(
            store.engine,
            runner.due,
            seed=seed,
            coalesce=cfg.daemon.coalesce,
            on_missed=self._missed,
        )
        self.schedule = schedule
        changes = schedule.start(cfg.suites)
        self._log_changes(changes)
        for name in runner.pending_runs():
            since = runner.state.suite(name).get("pending")
            log.info("suite %s: the run due since %s (the daemon stopped while it waited out "
                     "the residual gap) is made now", name, since)  # fmt: skip
            self._tasks.append(asyncio.create_task(runner.due(name)))
        self._start_uploader(cfg)
        self._tasks.append(asyncio.create_task(self._retention()))
        self.state.activity("idle")
        status = f"measuring {len(cfg.suites)} suite(s)"
        self.notifier.ready(status)
        log.info("vantage daemon running: %s; data in %s", self._describe_next(), cfg.data_dir())
        await self.stop_event.wait()
        # -- stop ---------------------------------------------------------------------
        self.notifier.stopping("stopping: finishing the measurements in flight")
        self.state.activity("stopping")
        schedule.pause()
        log.info(
            "stopping: measurements in flight have %g s to finish", self.cfg.daemon.stop_timeout
        )
        await runner.stop(self.cfg.daemon.stop_timeout)
        await self._stop_uploader()
        schedule.shutdown()
        log.info("stopped; everything measured is stored")
        return EX_OK

    # -- signals -------------------------------------------------------------------------

    def request_stop(self, why: str = "SIGTERM") -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("%s: stopping", why)
            self.stop_event.set()
        elif self.runner is not None:
            log.info("%s again: cancelling what is in flight now", why)
            self.runner.stop_now()

    def _on_hup(self) -> None:
        if not self.stop_event.is_set():
            self._tasks.append(asyncio.create_task(self.reload()))

    async def reload(self) -> bool:
        """Reload the configuration and catalog; keep the running ones if either is bad."""
        from probe.catalog import CatalogError

        async with self._reloading:
            self.notifier.reloading()
            where = self.config.path or "the default locations"
            try:
                cfg = await asyncio.to_thread(self.config.load)
                catalog = await asyncio.to_thread(self.catalog_source.load)
                check(cfg, catalog)
            except (ConfigError, CatalogError, ValueError) as exc:
                log.error(
                    "reload of %s rejected, keeping the running configuration: %s", where, exc
                )
                self.notifier.ready(f"reload rejected: {exc}"[:200])
                return False
            if cfg.probe != self.cfg.probe:
                log.warning(
                    "probe.data_dir and probe.db change only on restart: keeping %s",
                    self.cfg.db_url(),
                )
                cfg = dataclasses.replace(cfg, probe=self.cfg.probe)
            old = self.cfg
            self.cfg = cfg
            if self.runner is not None:
                self.runner.configure(cfg, catalog)
            if self.schedule is not None:
                changes = self.schedule.sync(cfg.suites, coalesce=cfg.daemon.coalesce)
                self._log_changes(changes)
            if cfg.collector != old.collector:
                await self._stop_uploader()
                self._start_uploader(cfg)
            log.info("configuration reloaded from %s", where)
            self.notifier.ready(f"measuring {len(cfg.suites)} suite(s)")
            return True

    # -- beside the schedule -------------------------------------------------------------

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    def _start_uploader(self, cfg: Config) -> None:
        try:
            from probe.outbox import upload_loop
        except ImportError:
            log.info("uploads: probe.outbox is not available; measurements stay on the probe")
            return
        except Exception:  # noqa: BLE001  (a broken uploader must not stop the measuring)
            log.exception("uploads: probe.outbox cannot be loaded; measurements stay queued")
            return
        assert self.store is not None
        stop = asyncio.Event()
        self._upload_stop = stop
        store = self.store

        async def supervised() -> None:
            while not stop.is_set():
                try:
                    await upload_loop(cfg, store, stop)
                    return
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001  (a failed uploader must not end the daemon)
                    log.exception("uploads failed; trying again in %g s", UPLOADER_RESTART)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=UPLOADER_RESTART)

        self._uploader = asyncio.create_task(supervised())

    async def _stop_uploader(self) -> None:
        task, stop = self._uploader, self._upload_stop
        self._uploader = self._upload_stop = None
        if task is None or stop is None:
            return
        stop.set()
        done, _ = await asyncio.wait({task}, timeout=10.0)
        if not done:
            log.warning("uploads did not stop within 10 s: cancelled")
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _retention(self) -> None:
        from probe.daemon.retention import retain

        await asyncio.sleep(RETENTION_FIRST)
        while not self.stop_event.is_set():
            cfg, store, runner = self.cfg, self.store, self.runner
            if store is not None and runner is not None and cfg.retention.days:
                async with runner.lock:  # never while a run writes
                    try:
                        free = await asyncio.to_thread(self.disk_free, cfg.data_dir())
                        result = await asyncio.to_thread(
                            retain,
                            store,
                            cfg,
                            dt.datetime.now(dt.UTC),
                            free,
                            self.stop_event.is_set,
                        )
                    except Exception:  # noqa: BLE001  (retried at the next pass)
                        log.exception("retention failed")
                        result = None
                if result is not None:
                    if result.measurements or result.runs or result.events:
                        log.info(
                            "retention: pruned %d measurements, %d runs, %d events older than "
                            "%d days%s",
                            result.measurements,
                            result.runs,
                            result.events,
                            cfg.retention.days,
                            ", then compacted" if result.vacuumed else "",
                        )
                    self.state.retention({"at": iso(dt.datetime.now(dt.UTC)), **result.to_json()})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), timeout=RETENTION_EVERY)

    # -- reporting -----------------------------------------------------------------------

    def _missed(self, missed: Missed) -> None:
        log.warning("%s", missed.describe())
        self.state.missed(missed.suite, missed.count, missed.to_json())

    def _log_changes(self, changes: Mapping[str, str]) -> None:
        for suite, change in sorted(changes.items()):
            if change != "kept":
                log.info("suite %s: %s", suite, change)

    def _describe_next(self) -> str:
        if self.schedule is None:
            return ""
        parts = []
        for suite, at in sorted(self.schedule.next_runs().items()):
            parts.append(f"{suite} next at {iso(at) if at else 'never'}")
        return ", ".join(parts)
