"""The outbox table: what waits for upload, and settling a batch once the collector answered.

Every measurement the probe stores is queued in ``outbox`` in the same transaction
(``probe.store``). A row is *pending* while ``last_error`` is NULL; the collector's
acknowledgement (accepted or duplicate) deletes it; a rejection keeps it, with the
reason in ``last_error``, and it is not sent again until the probe's software
changes (or ``vantage upload --retry-rejected``). These functions block: call them
in a worker thread from asyncio.

>>> uids = next_batch(store, 500)
>>> settle(store, acknowledged=uids[:499], rejected={uids[499]: "test_keys: ..."})
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import sqlalchemy as sa

from probe import __version__
from probe.store import Store, _failing
from schema import tables

_REJECTED = "rejected (vantage "  # last_error of a rejected item: "rejected (vantage 1.2): why"


def rejection_mark(reason: str, version: str = __version__) -> str:
    """What ``last_error`` says of an item the collector rejected under ``version``."""
    return f"{_REJECTED}{version}): {reason}"


def _pending() -> sa.ColumnElement[bool]:
    return tables.outbox.c.last_error.is_(None)


def backlog(store: Store) -> int:
    """Measurements waiting for upload (rejected ones are not waiting: see
    :func:`rejected_counts`)."""
    o = tables.outbox
    query = sa.select(sa.func.count()).select_from(o).where(_pending())
    with _failing("count the outbox"), store.engine.connect() as conn:
        return int(conn.execute(query).scalar() or 0)


def rejected_counts(store: Store, limit: int | None = None) -> dict[str, int]:
    """Measurements the collector rejected and the probe keeps, by reason, the most
    common first: ``{"rejected (vantage 0.3): test_keys.queries[0]: ...": 2}``.
    ``sum(rejected_counts(store).values())`` is how many there are."""
    o = tables.outbox
    n = sa.func.count().label("n")
    query = (
        sa.select(o.c.last_error, n)
        .where(o.c.last_error.is_not(None))
        .group_by(o.c.last_error)
        .order_by(n.desc(), o.c.last_error)
    )
    if limit is not None:
        query = query.limit(limit)
    with _failing("read the outbox"), store.engine.connect() as conn:
        return {str(row.last_error): int(row.n) for row in conn.execute(query)}


def next_batch(store: Store, limit: int) -> list[str]:
    """The uids of the ``limit`` oldest pending measurements.

    Oldest first: on SQLite by rowid, which is insertion order and needs no sort (a
    backlog of millions costs one batch's worth of reading, not a scan, per batch);
    elsewhere by ``queued_at``. Only uids: the caller builds the documents of this
    batch alone, so memory does not grow with the backlog.
    """
    o = tables.outbox
    if store.engine.dialect.name == "sqlite":
        order: tuple[sa.ColumnElement[object], ...] = (sa.literal_column("outbox.rowid"),)
    else:
        order = (o.c.queued_at, o.c.measurement_uid)
    query = sa.select(o.c.measurement_uid).where(_pending()).order_by(*order).limit(limit)
    with _failing("read the outbox"), store.engine.connect() as conn:
        return [str(uid) for uid in conn.execute(query).scalars()]


def settle(
    store: Store,
    *,
    acknowledged: Collection[str] = (),
    rejected: Mapping[str, str] | None = None,
    unanswered: Collection[str] = (),
) -> None:
    """Record the collector's answer to one request, in one transaction.

    ``acknowledged`` (accepted or duplicate) leave the outbox; ``rejected`` (uid ->
    reason) stay, marked, and are not sent again; ``unanswered`` (sent, but the answer
    did not cover them) stay pending with one more attempt counted.
    """
    o = tables.outbox
    rejected = rejected or {}
    with _failing("update the outbox"), store.engine.begin() as conn:
        for chunk in _chunks(list(acknowledged)):
            conn.execute(o.delete().where(o.c.measurement_uid.in_(chunk)))
        if rejected:
            conn.execute(
                o.update()
                .where(o.c.measurement_uid == sa.bindparam("uid"))
                .values(last_error=sa.bindparam("mark"), attempts=o.c.attempts + 1),
                [{"uid": uid, "mark": rejection_mark(why)} for uid, why in rejected.items()],
            )
        for chunk in _chunks(list(unanswered)):
            conn.execute(
                o.update().where(o.c.measurement_uid.in_(chunk)).values(attempts=o.c.attempts + 1)
            )


def requeue_rejected(store: Store, *, every: bool = False, version: str = __version__) -> int:
    """Make rejected measurements pending again; returns how many.

    By default those rejected under another software version than ``version``: the
    probe changed since, so the collector may take them now. ``every``: all of them
    (the collector changed: ``vantage upload --retry-rejected``).
    """
    o = tables.outbox
    err = o.c.last_error
    where = err.startswith(_REJECTED, autoescape=True)
    if not every:
        where = where & ~err.startswith(rejection_mark("", version), autoescape=True)
    with _failing("update the outbox"), store.engine.begin() as conn:
        return conn.execute(o.update().where(where).values(last_error=None)).rowcount or 0


def _chunks(items: Sequence[str], size: int = 500) -> list[Sequence[str]]:
    """Bounded IN lists (SQLite limits the number of parameters of a statement)."""
    return [items[i : i + size] for i in range(0, len(items), size)]
