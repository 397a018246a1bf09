"""The schedule: random gaps within bounds, persistence across restarts, no overlap,
missed runs coalesced and reported."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import pickle
import statistics
from pathlib import Path

import pytest

from probe.config import SuiteSection
from probe.daemon.schedule import Missed, Schedule, SpacedTrigger
from probe.store import Store

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
N = 4000
# Kolmogorov-Smirnov: the largest CDF gap a true sample of N exceeds with p = 0.001.
KS_CRITICAL = 1.95 / math.sqrt(N)


def _gaps(trigger: SpacedTrigger, n: int = N) -> list[float]:
    """Gaps after n distinct run times (each draw is seeded by its run time)."""
    return [trigger.gap(T0 + dt.timedelta(seconds=7.3 * i)) for i in range(n)]


def _ks(sample: list[float], cdf) -> float:
    xs = sorted(sample)
    n = len(xs)
    return max(max(abs(cdf(x) - i / n), abs(cdf(x) - (i + 1) / n)) for i, x in enumerate(xs))


def test_jitter_gaps_stay_within_bounds_and_are_uniform() -> None:
    trigger = SpacedTrigger(100.0, jitter=0.25, seed="probe-a:messaging")
    gaps = _gaps(trigger)
    assert min(gaps) >= 75.0 and max(gaps) <= 125.0
    assert min(gaps) < 76.0 and max(gaps) > 124.0  # the whole range is used
    # Uniform on [75, 125]: mean 100, standard error 14.4 / sqrt(N) = 0.23.
    assert abs(statistics.fmean(gaps) - 100.0) < 1.5
    assert _ks(gaps, lambda x: (x - 75.0) / 50.0) < KS_CRITICAL


def test_no_jitter_means_exact_interval() -> None:
    assert set(_gaps(SpacedTrigger(30.0, jitter=0.0, seed="x"), 50)) == {30.0}


def test_exponential_gaps_are_memoryless_with_the_mean_interval() -> None:
    trigger = SpacedTrigger(60.0, spacing="exponential", seed="probe-b:messaging")
    gaps = _gaps(trigger)
    assert min(gaps) > 0
    mean = statistics.fmean(gaps)
    assert abs(mean - 60.0) < 60.0 * 0.06  # standard error is 1.6 % of the mean
    assert 0.9 < statistics.pstdev(gaps) / mean < 1.1  # coefficient of variation 1
    assert _ks(gaps, lambda x: 1 - math.exp(-x / 60.0)) < KS_CRITICAL
    # Memoryless: among gaps longer than 60 s, the excess is again exponential(60).
    excess = [g - 60.0 for g in gaps if g > 60.0]
    assert abs(statistics.fmean(excess) - 60.0) < 60.0 * 0.12


def test_gaps_are_fixed_by_seed_and_time_and_differ_between_probes() -> None:
    a = SpacedTrigger(100.0, jitter=0.25, seed="probe-a:s")
    again = SpacedTrigger(100.0, jitter=0.25, seed="probe-a:s")
    other = SpacedTrigger(100.0, jitter=0.25, seed="probe-b:s")
    assert _gaps(a, 20) == _gaps(again, 20)
    assert _gaps(a, 20) != _gaps(other, 20)
    # Chained: each next time is the previous plus its own gap.
    t1 = a.get_next_fire_time(T0, T0)
    assert t1 == T0 + dt.timedelta(seconds=a.gap(T0))


def test_first_run_comes_soon_at_random() -> None:
    trigger = SpacedTrigger(3600.0, jitter=0.1, seed="s", first_spread=300.0)
    firsts = [(trigger.get_next_fire_time(None, T0) - T0).total_seconds() for _ in range(200)]
    assert all(0 <= f <= 300.0 for f in firsts)
    assert len(set(firsts)) > 150  # random, not one fixed offset
    short = SpacedTrigger(2.0, seed="s")
    assert all(0 <= (short.get_next_fire_time(None, T0) - T0).total_seconds() <= 2.0
               for _ in range(50))  # fmt: skip


def test_trigger_survives_pickling_and_rejects_bad_values() -> None:
    trigger = SpacedTrigger(10.0, jitter=0.5, spacing="jitter", seed="p:s")
    back = pickle.loads(pickle.dumps(trigger))
    assert back.same_schedule(trigger) and back.seed == "p:s"
    assert back.gap(T0) == trigger.gap(T0)
    for bad in ({"interval": 0}, {"interval": 1, "jitter": 1.0}, {"interval": 1, "spacing": "x"}):
        with pytest.raises(ValueError):
            SpacedTrigger(**bad)


# -- with the scheduler ----------------------------------------------------------------------


def _store(tmp_path: Path) -> Store:
    return Store.open(f"sqlite:///{tmp_path / 'sched.db'}")


async def _idle(*_: object) -> None:
    return None


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The probe's SQLite, and PostgreSQL (a probe may point ``probe.db`` at one)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sched.db'}"
    return str(request.getfixturevalue("pg_url"))


def test_next_run_time_survives_a_restart_and_changes_only_with_the_schedule(
    db_url: str,
) -> None:
    store = Store.open(db_url)
    with store.engine.connect() as conn:  # the job store's table comes from migration 0006
        from alembic.autogenerate import compare_metadata
        from alembic.runtime.migration import MigrationContext

        from schema import tables

        assert compare_metadata(MigrationContext.configure(conn), tables.metadata) == []
    hourly = SuiteSection(name="messaging", interval=3600.0, jitter=0.25)
    daily = SuiteSection(name="daily", interval=86400.0, jitter=0.1)

    async def session(suites: list[SuiteSection]) -> tuple[dict, dict]:
        schedule = Schedule(store.engine, _idle, seed="probe-1")
        changes = schedule.start(suites)
        try:
            return changes, schedule.next_runs()
        finally:
            schedule.shutdown()

    changes, first = asyncio.run(session([hourly, daily]))
    assert changes == {"messaging": "added", "daily": "added"}
    # A second scheduler on the same database (a restart) keeps both times.
    changes, second = asyncio.run(session([hourly, daily]))
    assert changes == {"messaging": "kept", "daily": "kept"}
    assert second == first
    # Only the suite whose schedule changed gets a new time; a suite gone is removed.
    faster = SuiteSection(name="messaging", interval=600.0, jitter=0.25)
    changes, third = asyncio.run(session([faster]))
    assert changes == {"messaging": "rescheduled", "daily": "removed"}
    assert set(third) == {"messaging"} and third["messaging"] != first["messaging"]
    # A change of services alone (not of the schedule) keeps the time.
    same = SuiteSection(name="messaging", services=("signal",), interval=600.0, jitter=0.25)
    changes, fourth = asyncio.run(session([same]))
    assert changes == {"messaging": "kept"} and fourth == third
    store.close()


def test_no_two_runs_of_a_suite_overlap_and_skips_are_reported(tmp_path: Path) -> None:
    store = _store(tmp_path)
    running = 0
    most = 0
    runs = 0
    missed: list[Missed] = []

    async def slow(suite: str) -> None:
        nonlocal running, most, runs
        running += 1
        runs += 1
        most = max(most, running)
        await asyncio.sleep(0.7)  # much longer than the interval
        running -= 1

    async def main() -> None:
        schedule = Schedule(store.engine, slow, seed="p", first_spread=0.05,
                            on_missed=missed.append)  # fmt: skip
        schedule.start([SuiteSection(name="s", interval=0.1, jitter=0.0)])
        await asyncio.sleep(1.6)
        schedule.shutdown()

    asyncio.run(main())
    assert most == 1  # never two at once
    assert 2 <= runs <= 3  # 0.7 s each in 1.6 s
    assert missed and all(m.reason == "overlap" and m.suite == "s" for m in missed)
    assert "skipped" in missed[0].describe() and "still went on" in missed[0].describe()
    store.close()


def test_runs_missed_while_off_are_coalesced_into_one_and_counted(tmp_path: Path) -> None:
    store = _store(tmp_path)
    suite = SuiteSection(name="s", interval=0.2, jitter=0.3)
    calls: list[dt.datetime] = []
    missed: list[Missed] = []

    async def record(name: str) -> None:
        calls.append(dt.datetime.now(dt.UTC))

    async def first_session() -> dt.datetime:
        schedule = Schedule(store.engine, record, seed="p", first_spread=0.5)
        schedule.start([suite])
        due = schedule.next_runs()["s"]
        schedule.shutdown()  # the probe goes off before the suite is due
        assert due is not None
        return due

    due = asyncio.run(first_session())
    off_until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2.0)
    while dt.datetime.now(dt.UTC) < off_until:
        asyncio.run(asyncio.sleep(0.1))

    async def second_session() -> dt.datetime:
        schedule = Schedule(store.engine, record, seed="p", on_missed=missed.append)
        started = dt.datetime.now(dt.UTC)
        schedule.start([suite])
        await asyncio.sleep(0.3)
        schedule.shutdown()
        return started

    started = asyncio.run(second_session())
    (report,) = missed[:1]
    # The fixed schedule from the stored time: the run times that passed while off,
    # up to the one that ran (the last due when the scheduler looked).
    trigger = Schedule(store.engine, _idle, seed="p").trigger(suite)
    times = [due]
    while times[-1] < report.last:
        times.append(trigger.get_next_fire_time(times[-1], report.last))
    assert times[-1] == report.last <= calls[0]
    assert report.count == len(times) - 1 >= 5  # ~2 s of 0.14-0.26 s gaps, all but one
    assert due < started <= calls[0]
    # One run for all of them (the next regular one, at the following time, may follow).
    following = trigger.get_next_fire_time(report.last, report.last)
    assert calls and len([c for c in calls if c < following]) <= 1
    assert report.reason == "late" and report.first == due
    assert "coalesced into one run" in report.describe()
    store.close()


def test_without_coalescing_every_missed_run_is_run(tmp_path: Path) -> None:
    store = _store(tmp_path)
    suite = SuiteSection(name="s", interval=0.2, jitter=0.0)
    calls = 0

    async def record(name: str) -> None:
        nonlocal calls
        calls += 1

    async def session(wait: float) -> None:
        schedule = Schedule(store.engine, record, seed="p", coalesce=False, first_spread=0.01)
        schedule.start([suite])
        await asyncio.sleep(wait)
        schedule.shutdown()

    asyncio.run(session(0.0))
    asyncio.run(asyncio.sleep(1.0))  # off for five intervals
    asyncio.run(session(0.1))
    assert calls >= 4
