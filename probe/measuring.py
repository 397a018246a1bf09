"""One run of a list of services: measure, judge, store, and settle the services.

``vantage run`` and the daemon both go through :class:`SuiteRun`, so a measurement is
taken, scrubbed, judged and written the same way whoever asked for it:

1. the vantage point is discovered (``probe.vantage.discover``, in a worker thread:
   it may look things up);
2. the engine measures the targets, control targets first;
3. each measurement is judged (``probe.verdicts.Analyser``), scrubbed
   (``probe.privacy.Scrub``, with every own address known: the machine's, those learnt
   before, the public IP) and handed to a :class:`~probe.store.BatchWriter`, which
   reports it only once it is committed. A run that starts while no other holds the
   data directory's run lock marks runs left ``running`` (killed) as interrupted;
4. each service's status in the run is stored and blocking events start or end.

>>> result = await SuiteRun(cfg, services, store, suite="messaging").execute()
>>> result.status, len(result.measurements)
('complete', 63)

A caller that must stop a run (a signal) calls :meth:`SuiteRun.stop` (cancel what is
in flight: those measurements are kept, marked interrupted) or :meth:`SuiteRun.drain`
(start nothing more, let what is in flight finish).
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from probe.config import Config, ConfigError

if TYPE_CHECKING:  # the engine is imported when a run starts, not before (daemon memory)
    from probe.analysis import ServiceStatus
    from probe.analysis.fingerprints import FingerprintDB
    from probe.engine.context import EngineContext
    from probe.engine.run import Run
    from probe.geoip import GeoIP
    from probe.store import Store
    from schema.model import Measurement, Service, Target

OnStored = Callable[["Measurement"], Awaitable[None] | None]


@dataclass(frozen=True)
class RunOptions:
    """What the command line adds to the configuration for one run."""

    resolvers: tuple[str, ...] = ()  # udp://IP[:PORT], tcp://..., https://... (--resolver)
    ca_bundle: tuple[str, ...] = ()  # extra CA files (--ca-bundle)
    public_ranges: tuple[str, ...] = ()  # reserved ranges treated as public (--public-range)


@dataclass
class RunResult:
    """What a run did: its id and status, what was measured and each service's status."""

    run_id: str
    suite: str
    status: str  # complete | interrupted | deadline
    targets: int
    measurements: list[Measurement] = field(default_factory=list)
    statuses: list[ServiceStatus] = field(default_factory=list)
    offline: bool | None = None  # the control targets failed: nothing was called blocked


def targets_of(services: Sequence[Service]) -> list[Target]:
    """The targets of ``services``, control targets first (the other verdicts wait for
    them)."""
    return sorted((t for s in services for t in s.targets), key=lambda t: not t.control)


def build_context(
    cfg: Config, options: RunOptions = RunOptions()
) -> tuple[EngineContext, str | None]:
    """The engine's context from the configuration (and flags), and the address of the
    system's resolver (None when it is not queried). Raises :class:`ConfigError`
    (or ``ResolverSpecError``) naming what is wrong."""
    from probe.engine.context import EngineContext, Timeouts
    from probe.engine.dns import ResolverSpec, system_resolvers

    resolvers: list[ResolverSpec] = []
    if cfg.dns.system:
        resolvers += system_resolvers(cfg.dns.resolv_conf)[:1]  # the primary, as a stub uses it
    resolvers += [ResolverSpec.parse(s) for s in (*cfg.dns.resolvers, *options.resolvers)]
    if not resolvers:
        raise ConfigError("dns: no resolver to query (the system has none and none is configured)")
    ranges = []
    for text in (*cfg.engine.public_ranges, *options.public_ranges):
        try:
            ranges.append(ipaddress.ip_network(text, strict=False))
        except ValueError as exc:
            raise ConfigError(f"engine.public_ranges: not a network: {text!r}") from exc
    cas = (*cfg.engine.ca_bundle, *options.ca_bundle)
    for ca in cas:
        if not Path(ca).is_file():
            raise ConfigError(f"engine.ca_bundle: no such file: {ca}")
    e = cfg.engine
    ctx = EngineContext(
        resolvers=resolvers,
        timeouts=Timeouts(
            dns=e.dns_timeout, tcp=e.tcp_timeout, tls=e.tls_timeout, http=e.http_timeout
        ),
        ca_files=tuple(cas),
        system_cas=e.system_cas,
        public_ranges=tuple(ranges),
        max_addresses=e.max_addresses,
        control_sni=e.control_sni or None,
    )
    system = next((r.address for r in resolvers if r.system), None)
    return ctx, system


class SuiteRun:
    """One run of ``services``: measured, scrubbed, judged, stored, settled.

    ``on_stored`` is called for each measurement once it is committed (``vantage run``
    prints it then). ``batch_size``/``max_delay``: how the :class:`BatchWriter` groups
    writes; the daemon sizes the batch to the run so that a run is one transaction
    (an SD card is written once per run, not once per measurement). ``ctx`` and
    ``system_resolver`` come from :func:`build_context` (call it first: a bad
    configuration then fails before anything is measured).
    """

    def __init__(
        self,
        cfg: Config,
        services: Sequence[Service],
        store: Store,
        *,
        suite: str,
        ctx: EngineContext,
        system_resolver: str | None,
        on_stored: OnStored | None = None,
        batch_size: int = 64,
        max_delay: float = 0.5,
    ) -> None:
        self.cfg = cfg
        self.services = list(services)
        self.store = store
        self.suite = suite
        self.ctx = ctx
        self.system_resolver = system_resolver
        self.on_stored = on_stored
        self.batch_size = batch_size
        self.max_delay = max_delay
        self.targets = targets_of(self.services)
        self.run: Run | None = None
        self._started_controls = 0
        self._stop_reason: str | None = None  # stop() before the engine run exists
        self._drain_reason: str | None = None
        self._analyser_stop: Callable[[], None] | None = None

    def stop(self, reason: str = "interrupted") -> None:
        """Cancel what is in flight (kept, marked interrupted); start nothing more."""
        self._stop_reason = self._stop_reason or reason
        if self.run is not None:
            self.run.stop(reason)

    def drain(self, reason: str = "interrupted") -> None:
        """Start no more targets; let those in flight finish."""
        self._drain_reason = self._drain_reason or reason
        if self.run is not None:
            self.run.drain(reason)
            controls = sum(1 for t in self.targets if t.control)
            if self._started_controls < controls and self._analyser_stop is not None:
                # Control targets that will never start: judge with those that came in
                # rather than wait for the rest until the run is stopped.
                self._analyser_stop()

    async def execute(self) -> RunResult:
        from probe.engine.run import Run
        from probe.geoip import annotate_answers
        from probe.privacy import OwnAddresses, Scrub, own_addresses, scrub_key
        from probe.store import BatchWriter
        from probe.vantage import discover
        from probe.verdicts import Analyser

        cfg = self.cfg
        discovered = await asyncio.to_thread(discover, cfg, self.system_resolver)
        # Once per run: this machine's addresses, those learnt before and what discovery
        # learnt are never stored (and every path out of the store scrubs again).
        data_dir = cfg.data_dir()
        own = await asyncio.to_thread(own_addresses, data_dir, discovered.scrub)
        scrubber = Scrub(own, await asyncio.to_thread(scrub_key, data_dir))
        run = Run(self.targets, discovered.vantage, self.ctx, concurrency=cfg.engine.concurrency,
                  deadline=cfg.engine.run_deadline)  # fmt: skip
        fingerprints = await asyncio.to_thread(_fingerprints, cfg)
        geo = await asyncio.to_thread(_asn_database, cfg)
        analyser = Analyser(self.targets, cfg.control.url, cfg.control.token, cfg.control.timeout,
                            geo=geo, fingerprints=fingerprints)  # fmt: skip
        self._analyser_stop = analyser.stop
        done: list[Measurement] = []

        async def stored(m: Measurement) -> None:
            done.append(m)
            if self.on_stored is not None:
                result = self.on_stored(m)
                if result is not None:
                    await result

        writer = BatchWriter(self.store, stored, batch_size=self.batch_size,
                             max_delay=self.max_delay)  # fmt: skip

        async def finished(m: Measurement) -> None:
            annotate_answers(m.queries, geo)  # the network of every answer, kept as evidence
            try:
                await analyser.analyse(m)  # judged before it is written, written before shown
            finally:
                # Scrubbed after judging (the verdict's reasons quote what was seen), and
                # kept even if judging failed.
                await writer.add(scrubber.measurement(m))

        def starting(target: Target) -> None:
            if target.control:
                self._started_controls += 1
            analyser.start(target)

        run.on_stop(analyser.stop)
        self.run = run
        if self._stop_reason is not None:
            run.stop(self._stop_reason)
        elif self._drain_reason is not None:
            self.drain(self._drain_reason)
        lock = await asyncio.to_thread(RunLock.acquire, data_dir)
        try:
            if lock.alone:
                # No other run holds the lock: a run still marked running was killed
                # (a power cut, SIGKILL) and is marked interrupted.
                await asyncio.to_thread(self.store.interrupt_stale_runs,
                                        run.vantage.probe_id, run.ctx.now_utc())  # fmt: skip
                await asyncio.to_thread(lock.share)
            started = run.ctx.now_utc()
            await asyncio.to_thread(self.store.begin_run, run.run_id, self.suite, run.vantage,
                                    started)  # fmt: skip
            if not discovered.public_known:
                await asyncio.to_thread(OwnAddresses(data_dir).unsure, run.run_id)
            try:
                await run.execute(finished, starting)
            finally:
                analyser.stop()
                await analyser.aclose()
                await writer.flush()
                await asyncio.to_thread(self.store.finish_run, run.run_id, run.status,
                                        run.ctx.now_utc())  # fmt: skip
        finally:
            lock.release()
            if geo is not None:
                geo.close()
        statuses = await asyncio.to_thread(
            services_and_events, self.store, run, self.services, done, analyser.offline
        )
        return RunResult(run.run_id, self.suite, run.status, len(self.targets), done, statuses,
                         analyser.offline)  # fmt: skip


RUN_LOCK_FILE = "runs.lock"


class RunLock:
    """Held (shared) by every run in progress on a data directory, so that a run starting
    can tell a row left ``running`` by a killed process from one still measuring: only
    when it gets the lock exclusively is no other run alive."""

    def __init__(self, fh: IO[str], alone: bool) -> None:
        self._fh = fh
        self.alone = alone

    @classmethod
    def acquire(cls, data_dir: Path) -> RunLock:
        data_dir.mkdir(parents=True, exist_ok=True)
        fh = open(data_dir / RUN_LOCK_FILE, "a+")  # noqa: SIM115 (held for the run)
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
            return cls(fh, alone=False)
        except OSError:
            fh.close()
            raise
        return cls(fh, alone=True)

    def share(self) -> None:
        """From exclusive (clean-up done) to shared, for the run itself."""
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_SH)

    def release(self) -> None:
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
        finally:
            self._fh.close()


def _fingerprints(cfg: Config) -> FingerprintDB:
    """The shipped fingerprints plus the configured files; a bad file fails the run
    before anything is measured, naming the file, entry and key."""
    from probe.analysis.fingerprints import FingerprintDB, FingerprintError

    try:
        return FingerprintDB.with_files(cfg.analysis.fingerprints)
    except FingerprintError as exc:
        raise ConfigError(f"analysis.fingerprints: {exc}") from exc


def _asn_database(cfg: Config) -> GeoIP | None:
    """The ASN database that places each DNS answer in its network, or None when none
    is configured or it cannot be read (discovery and ``vantage doctor`` say why; the
    verdicts then say that the ASN checks were skipped)."""
    from probe.geoip import GeoIP, GeoIPError

    if not cfg.vantage.asn_db:
        return None
    try:
        return GeoIP(asn_db=cfg.vantage.asn_db)
    except GeoIPError:
        return None


def services_and_events(
    store: Store,
    run: Run,
    services: Sequence[Service],
    done: list[Measurement],
    is_offline: bool | None,
) -> list[ServiceStatus]:
    """Each service's status in this run, stored; blocking events started or ended."""
    from probe.analysis import Decision, decide, service_status

    statuses = [service_status(s.name, done, is_offline) for s in services if not s.control]
    store.write_service_statuses(run.run_id, statuses)
    for status in statuses:
        history = store.service_history(run.vantage.probe_id, status.service)
        is_open = store.open_event(run.vantage.probe_id, status.service) is not None
        decision = decide(history, is_open) if not is_offline else Decision("none")
        store.apply_decision(run.vantage, status.service, decision)
    return statuses


__all__ = ["RunOptions", "RunResult", "SuiteRun", "build_context", "services_and_events",
           "targets_of"]  # fmt: skip
