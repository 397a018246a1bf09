"""Each suite on its own randomised schedule, kept in the database across restarts.

APScheduler 3 (``AsyncIOScheduler``) runs one job per ``[suites.NAME]`` entry, stored
by its ``SQLAlchemyJobStore`` in the probe's own database (table
:data:`JOBS_TABLE`), so a restart or a power cut does not reset when each suite
runs next. The rules:

- gaps are random so that probes never fire in lockstep: ``interval * (1 +- jitter)``
  uniformly, or exponential with mean ``interval`` (memoryless, as Murakami does);
  the first run after a suite is added comes within :data:`FIRST_SPREAD` seconds;
- a restart keeps the stored next run time; a suite's job is rescheduled only when
  its schedule (interval, jitter, spacing) changed, added when new, removed when gone;
- at most one run of a suite at a time (``max_instances=1``): a run due while the
  previous one still goes is skipped, and reported;
- runs missed while the probe was off, asleep or busy are coalesced into one run
  (``daemon.coalesce``) and reported (:class:`Missed`), with how many there were.

Gaps are drawn from a generator seeded with the suite and the previous run time, so
the schedule after a given run time is fixed: that is what lets the daemon count
exactly how many runs a coalesced catch-up stood for.

Only one :class:`Schedule` runs per process: the stored jobs name the module-level
:func:`run_suite_job`, which hands the suite to it.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_SUBMITTED, JobSubmissionEvent
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger

from probe.config import SuiteSection
from probe.daemon.state import JOB_PREFIX
from schema import tables

log = logging.getLogger("vantage.daemon")

JOBS_TABLE = tables.daemon_jobs.name  # APScheduler's job store (migration 0006)
FIRST_SPREAD = 300.0  # seconds: a new suite's first run comes within this
MIN_GAP = 0.001  # seconds: an exponential draw of 0 must still move time forward
MAX_REPLAY = 1_000_000  # run times counted at most when reporting missed runs


class SpacedTrigger(BaseTrigger):
    """Random gaps between runs: uniform ``interval * (1 +- jitter)`` or exponential.

    Stateless apart from its configuration (APScheduler pickles it into the job
    store). The gap after run time ``t`` depends only on ``seed`` and ``t``.

    >>> t = SpacedTrigger(3600, jitter=0.25, seed="probe-1:messaging")
    >>> 2700 <= t.gap(previous) <= 4500
    True
    """

    __slots__ = ("interval", "jitter", "spacing", "seed", "first_spread")

    def __init__(
        self,
        interval: float,
        jitter: float = 0.0,
        spacing: str = "jitter",
        seed: str = "",
        first_spread: float = FIRST_SPREAD,
    ) -> None:
        if not (math.isfinite(interval) and interval > 0):
            raise ValueError(f"interval must be positive, got {interval}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be at least 0 and below 1, got {jitter}")
        if spacing not in ("jitter", "exponential"):
            raise ValueError(f"spacing must be jitter or exponential, got {spacing!r}")
        self.interval = float(interval)
        self.jitter = float(jitter)
        self.spacing = spacing
        self.seed = seed
        self.first_spread = float(first_spread)

    def gap(self, previous: dt.datetime) -> float:
        """Seconds from run time ``previous`` to the next one."""
        rng = random.Random(f"{self.seed}|{previous.timestamp():.6f}")
        if self.spacing == "exponential":
            value = rng.expovariate(1.0 / self.interval)
        else:
            value = self.interval * (1.0 + rng.uniform(-self.jitter, self.jitter))
        return max(value, MIN_GAP)

    def get_next_fire_time(
        self, previous_fire_time: dt.datetime | None, now: dt.datetime
    ) -> dt.datetime:
        if previous_fire_time is None:  # a new (or changed) suite: soon, at random
            delay = random.uniform(0.0, min(self.interval, self.first_spread))
            return now + dt.timedelta(seconds=delay)
        return previous_fire_time + dt.timedelta(seconds=self.gap(previous_fire_time))

    def same_schedule(self, other: object) -> bool:
        return (
            isinstance(other, SpacedTrigger)
            and other.interval == self.interval
            and other.jitter == self.jitter
            and other.spacing == self.spacing
        )

    def __getstate__(self) -> dict[str, Any]:
        return {
            "version": 1,
            "interval": self.interval,
            "jitter": self.jitter,
            "spacing": self.spacing,
            "seed": self.seed,
            "first_spread": self.first_spread,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state.get("version", 1) > 1:
            raise ValueError(f"SpacedTrigger state version {state['version']} is newer than 1")
        self.interval = state["interval"]
        self.jitter = state["jitter"]
        self.spacing = state["spacing"]
        self.seed = state["seed"]
        self.first_spread = state.get("first_spread", FIRST_SPREAD)

    def __str__(self) -> str:
        if self.spacing == "exponential":
            return f"exponential gaps, mean {self.interval:g} s"
        return f"every {self.interval:g} s +- {self.jitter:.0%}"

    def __repr__(self) -> str:
        return (
            f"SpacedTrigger(interval={self.interval!r}, jitter={self.jitter!r}, "
            f"spacing={self.spacing!r})"
        )


@dataclass(frozen=True)
class Missed:
    """Runs of a suite that did not happen when due."""

    suite: str
    count: int
    first: dt.datetime  # the first run time missed
    last: dt.datetime  # the last one (the run that went ahead, when coalesced)
    reason: str  # "late" (off, asleep or blocked) | "overlap" (the previous run still went)

    def describe(self) -> str:
        runs = f"{self.count} run{'s' if self.count != 1 else ''}"
        span = f"due from {_hm(self.first)} to {_hm(self.last)}"
        if self.reason == "overlap":
            return f"suite {self.suite}: {runs} skipped ({span}): the previous run still went on"
        return (
            f"suite {self.suite}: {runs} missed ({span}) while the probe was off, asleep "
            "or busy; coalesced into one run now"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "first": self.first.isoformat(timespec="seconds"),
            "last": self.last.isoformat(timespec="seconds"),
            "reason": self.reason,
            "report": self.describe(),
        }


def _hm(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


Handler = Callable[[str], Awaitable[None]]
_ACTIVE: Schedule | None = None


async def run_suite_job(suite: str) -> None:
    """The job function the job store names: the suite is due."""
    schedule = _ACTIVE
    if schedule is None:
        raise RuntimeError(f"suite {suite} is due but no schedule runs in this process")
    await schedule.handler(suite)


class Schedule:
    """The suites' jobs in an APScheduler ``AsyncIOScheduler`` with a persistent store.

    ``handler(suite)`` is awaited when a suite is due; ``on_missed`` hears of runs that
    were coalesced away or skipped. ``seed`` (the probe id) makes each probe's gaps
    its own.
    """

    def __init__(
        self,
        engine: sa.Engine,
        handler: Handler,
        *,
        seed: str,
        coalesce: bool = True,
        on_missed: Callable[[Missed], None] | None = None,
        first_spread: float = FIRST_SPREAD,
    ) -> None:
        self.engine = engine
        self.handler = handler
        self.seed = seed
        self.coalesce = coalesce
        self.on_missed = on_missed
        self.first_spread = first_spread
        self.store = SQLAlchemyJobStore(engine=engine, tablename=JOBS_TABLE)
        self.scheduler = AsyncIOScheduler(
            jobstores={"default": self.store},
            timezone=dt.UTC,
            job_defaults=self._job_options(),
        )
        self.scheduler.add_listener(self._on_event, EVENT_JOB_SUBMITTED | EVENT_JOB_MAX_INSTANCES)
        self._expected: dict[str, dt.datetime | None] = {}

    def _job_options(self) -> dict[str, Any]:
        # misfire_grace_time None: a late run still runs (coalesced), however late.
        return {"coalesce": self.coalesce, "max_instances": 1, "misfire_grace_time": None}

    def trigger(self, suite: SuiteSection) -> SpacedTrigger:
        return SpacedTrigger(
            suite.interval,
            suite.jitter,
            suite.spacing,
            seed=f"{self.seed}:{suite.name}",
            first_spread=self.first_spread,
        )

    # -- running -----------------------------------------------------------------------

    def start(self, suites: Sequence[SuiteSection]) -> dict[str, str]:
        """Start (in the running event loop) with these suites; returns what
        :meth:`sync` did."""
        global _ACTIVE
        if _ACTIVE is not None and _ACTIVE is not self and _ACTIVE.scheduler.running:
            raise RuntimeError("another schedule is running in this process")
        _ACTIVE = self
        self.scheduler.start(paused=True)  # jobs are synced before any is due
        changes = self.sync(suites)
        self.scheduler.resume()
        return changes

    def pause(self) -> None:
        if self.scheduler.running:
            self.scheduler.pause()

    def shutdown(self) -> None:
        global _ACTIVE
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        if _ACTIVE is self:
            _ACTIVE = None

    def sync(self, suites: Sequence[SuiteSection], coalesce: bool | None = None) -> dict[str, str]:
        """Make the stored jobs match ``suites``: add new suites, reschedule those whose
        schedule changed, remove those gone, keep the rest untouched (their next run
        time included). Returns ``{suite: "added" | "rescheduled" | "kept" | "removed"}``.
        """
        if coalesce is not None and coalesce != self.coalesce:
            self.coalesce = coalesce
        changes: dict[str, str] = {}
        wanted = {JOB_PREFIX + s.name: s for s in suites}
        for job in self.scheduler.get_jobs():
            if job.id.startswith(JOB_PREFIX) and job.id not in wanted:
                self.scheduler.remove_job(job.id)
                self._expected.pop(job.id, None)
                changes[job.id[len(JOB_PREFIX) :]] = "removed"
        for job_id, suite in wanted.items():
            trigger = self.trigger(suite)
            job = self.scheduler.get_job(job_id)
            if job is None:
                job = self.scheduler.add_job(
                    run_suite_job,
                    trigger,
                    args=[suite.name],
                    id=job_id,
                    name=f"suite {suite.name}",
                    **self._job_options(),
                )
                changes[suite.name] = "added"
            elif not trigger.same_schedule(job.trigger):
                job = self.scheduler.reschedule_job(job_id, trigger=trigger)
                changes[suite.name] = "rescheduled"
            else:
                changes[suite.name] = "kept"
            if job.coalesce != self.coalesce or job.max_instances != 1:
                job = self.scheduler.modify_job(job_id, **self._job_options())
            self._expected[job_id] = self._next_run_time(job_id)
        return changes

    def next_runs(self) -> dict[str, dt.datetime | None]:
        """Each suite's next run time, from the job store."""
        return {
            job.id[len(JOB_PREFIX) :]: job.next_run_time
            for job in self.scheduler.get_jobs()
            if job.id.startswith(JOB_PREFIX)
        }

    def _next_run_time(self, job_id: str) -> dt.datetime | None:
        job = self.scheduler.get_job(job_id)
        return None if job is None else job.next_run_time

    # -- missed runs -------------------------------------------------------------------

    def _on_event(self, event: JobSubmissionEvent) -> None:
        if not event.job_id.startswith(JOB_PREFIX):
            return
        try:
            self._account(event)
        except Exception:  # reporting must never stop the scheduler
            log.exception("cannot account for the runs of %s", event.job_id)

    def _account(self, event: JobSubmissionEvent) -> None:
        job_id = event.job_id
        suite = job_id[len(JOB_PREFIX) :]
        expected = self._expected.get(job_id)
        times = sorted(event.scheduled_run_times)
        job = self.scheduler.get_job(job_id)
        self._expected[job_id] = None if job is None else job.next_run_time
        if not times or job is None:
            return
        last = times[-1]
        # Walk the (fixed) schedule from the run time expected to the last one due:
        # ``steps`` run times came before the last, of which ``len(times) - 1`` were
        # handed over too (coalescing hands over only the last).
        steps, t = 0, expected
        if expected is not None and expected < last and isinstance(job.trigger, SpacedTrigger):
            while t is not None and t < last and steps < MAX_REPLAY:
                steps += 1
                t = job.trigger.get_next_fire_time(t, last)
        first = expected if steps and expected is not None else times[0]
        if event.code == EVENT_JOB_MAX_INSTANCES:
            missed = Missed(suite, max(steps + 1, len(times)), first, last, "overlap")
        elif steps + 1 > len(times):
            missed = Missed(suite, steps + 1 - len(times), first, last, "late")
        else:
            return
        if self.on_missed is not None:
            self.on_missed(missed)
