"""Uploading the outbox to the collector: now (``vantage upload``) or forever (the daemon).

One pass (:func:`drain`) sends the pending measurements oldest first, one batch of
``collector.batch_size`` at a time, gzipped, with the probe's credential. Only the
uids of a batch are read from the outbox and only that batch's documents are built,
so a backlog of weeks costs disk, not memory. What the collector acknowledged by uid
(accepted or duplicate) leaves the outbox in one transaction per request, after the
answer; a crash anywhere before that re-sends the batch, which the collector then
acknowledges as duplicates: every measurement arrives exactly once.

:func:`upload_loop` runs passes every ``collector.interval`` seconds beside the
daemon's scheduler, backs off (exponentially, with full jitter, honouring
``Retry-After``) while the collector is unreachable, and logs one line per change of
state, not per retry.

Blocking work (the database, JSON, gzip) runs in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gzip
import json
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from probe import __version__
from probe.config import Config, ConfigError
from probe.outbox.backoff import Backoff
from probe.outbox.enrollment import (
    Enrollment,
    EnrollmentError,
    describe_error,
    enrollment,
    printable,
    ssl_context,
)
from probe.outbox.queue import backlog, next_batch, requeue_rejected, settle
from probe.outbox.receipt import Receipt, ReceiptError, parse_receipt, parse_retry_after
from probe.privacy import OwnAddresses, Scrub, exit_scrub
from probe.store import Store, StoreError

log = logging.getLogger("probe.outbox")

MEASUREMENTS_PATH = "/api/v1/measurements"
MAX_ITEMS = 1000  # per request (collectors/API.md)
MAX_BODY = 16 * 1024 * 1024  # bytes per request before gzip (collectors/API.md)
_ENVELOPE = len(b'{"measurements":[]}')
MAX_RECEIPT = 8 * 1024 * 1024  # bytes of a 200 answer read at most (after decoding)
MAX_ERROR_BODY = 64 * 1024  # bytes of an error answer read at most
BACKOFF_BASE = 10.0  # seconds: the longest wait after the first failure
START_DELAY = 10.0  # seconds: the first pass starts within this after the daemon
RATE_LIMIT_PATIENCE = 120.0  # seconds `vantage upload` waits out 429/503 in all

T = TypeVar("T")


class Outcome(enum.StrEnum):
    """How a pass ended."""

    DRAINED = "drained"  # nothing pending is left (rejected measurements aside)
    UNREACHABLE = "unreachable"  # no answer: connection, timeout, proxy error, 5xx
    BUSY = "busy"  # 429 or 503: the collector asks to wait (``retry_after``)
    REFUSED = "refused"  # 401: the credential is unknown or revoked
    NOT_ENROLLED = "not_enrolled"
    PROTOCOL = "protocol"  # an answer that makes no sense, or 4xx to our request
    ERROR = "error"  # the probe's own problem (database, configuration)


@dataclass
class UploadReport:
    outcome: Outcome = Outcome.DRAINED
    accepted: int = 0
    duplicate: int = 0  # the collector had them already (a re-sent batch)
    rejected: int = 0  # kept in the outbox, marked, not re-sent
    left: int = 0  # pending after the pass
    error: str = ""  # why the pass ended early, one line
    retry_after: float | None = None
    url: str = ""
    rejected_reasons: list[str] = field(default_factory=list)  # the first few

    @property
    def acknowledged(self) -> int:
        return self.accepted + self.duplicate


class _Failed(Exception):
    def __init__(self, outcome: Outcome, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.retry_after = retry_after


class _TooLarge(Exception):
    """413: the collector wants smaller requests."""


Item = tuple[str, bytes]  # (measurement_uid, its JSON document)


@dataclass
class _Batch:
    requests: list[list[Item]]
    rejected: dict[str, str]  # found unsendable here: uid -> why
    gone: list[str]  # queued, but the measurement is no longer stored


async def _thread(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """``fn`` in a worker thread. Cancelled, it still waits for the thread (a database
    call of milliseconds) so the store is never in use after the caller gave up."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kw))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        await asyncio.wait({fut})
        raise


def _prepare(store: Store, uids: list[str], probe_id: str, max_items: int, scrub: Scrub) -> _Batch:
    """Build, scrub and encode the documents of ``uids`` and pack them into requests
    within the collector's limits. Measurements that can never be sent (another
    probe's, too large, not JSON) are set aside with the reason."""
    docs = [scrub.document(doc) for doc in store.documents(uids)]
    found: set[str] = set()
    rejected: dict[str, str] = {}
    items: list[Item] = []
    for doc in docs:
        uid = str(doc["measurement_uid"])
        found.add(uid)
        if doc.get("probe_id") != probe_id:
            rejected[uid] = (
                f"measured as probe {doc.get('probe_id')}, but this probe is enrolled as "
                f"{probe_id}: a collector takes only the enrolled probe's measurements"
            )
            continue
        try:
            data = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            rejected[uid] = f"cannot be encoded as JSON: {exc}"
            continue
        if len(data) + _ENVELOPE > MAX_BODY:
            rejected[uid] = f"{len(data)} bytes: larger than the collector's {MAX_BODY} byte limit"
            continue
        items.append((uid, data))
    return _Batch(_pack(items, max_items), rejected, [u for u in uids if u not in found])


def _pack(items: list[Item], max_items: int) -> list[list[Item]]:
    requests: list[list[Item]] = []
    current: list[Item] = []
    size = _ENVELOPE
    for item in items:
        if current and (len(current) >= max_items or size + len(item[1]) + 1 > MAX_BODY):
            requests.append(current)
            current, size = [], _ENVELOPE
        current.append(item)
        size += len(item[1]) + 1
    if current:
        requests.append(current)
    return requests


def _body(items: list[Item]) -> bytes:
    raw = b'{"measurements":[' + b",".join(data for _, data in items) + b"]}"
    return gzip.compress(raw, compresslevel=6)


async def _read_limited(r: httpx.Response, limit: int) -> bytes | None:
    """The decoded body, or None when it is larger than ``limit`` bytes (a gzip bomb
    is cut off once ``limit`` bytes came out of it)."""
    out = bytearray()
    async for chunk in r.aiter_bytes():
        out += chunk
        if len(out) > limit:
            return None
    return bytes(out)


def _error_text(body: bytes | None) -> str:
    """The collector's ``{"error": ...}``, or the start of whatever it sent."""
    if not body:
        return ""
    try:
        doc = json.loads(body)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            return ": " + printable(doc["error"], 300)
    except ValueError:
        pass
    return ": " + printable(body[:200].decode("utf-8", "replace"), 200)


class _Session:
    """One pass's connection to the collector."""

    def __init__(self, cfg: Config, client: httpx.AsyncClient, e: Enrollment) -> None:
        self.cfg = cfg
        self.client = client
        self.enrollment = e
        self.url = e.url + MEASUREMENTS_PATH

    async def post(self, items: list[Item], backlog_after: int) -> Receipt:
        body = await _thread(_body, items)
        headers = {
            "Authorization": f"Bearer {self.enrollment.credential}",
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            "X-Vantage-Backlog": str(backlog_after),
        }
        try:
            async with self.client.stream("POST", self.url, content=body, headers=headers) as r:
                status = r.status_code
                limit = MAX_RECEIPT if status == 200 else MAX_ERROR_BODY
                # A slow drip must not hold a pass forever: the whole answer, not each
                # read, gets a deadline once the headers are in.
                async with asyncio.timeout(2 * self.cfg.collector.timeout):
                    data = await _read_limited(r, limit)
                retry_after = parse_retry_after(r.headers.get("retry-after"))
                location = r.headers.get("location", "")
        except TimeoutError:
            raise _Failed(Outcome.UNREACHABLE, f"{self.url}: the answer took too long") from None
        except httpx.TransportError as exc:
            raise _Failed(
                Outcome.UNREACHABLE, f"cannot reach {self.url}: {describe_error(exc)}"
            ) from exc
        except httpx.HTTPError as exc:  # e.g. an answer that does not decode
            raise _Failed(
                Outcome.PROTOCOL, f"{self.url}: unreadable answer: {describe_error(exc)}"
            ) from exc
        if status == 200:
            if data is None:
                raise _Failed(
                    Outcome.PROTOCOL, f"{self.url}: answer larger than {MAX_RECEIPT} bytes"
                )
            try:
                return parse_receipt(data, [uid for uid, _ in items])
            except ReceiptError as exc:
                raise _Failed(Outcome.PROTOCOL, f"{self.url}: malformed answer: {exc}") from exc
        said = _error_text(data)
        if status == 401:
            raise _Failed(
                Outcome.REFUSED,
                f"the collector refused this probe's credential (HTTP 401{said}): it was revoked "
                "or the collector forgot it; re-enroll with `vantage enroll URL --token T --force`",
            )
        if status == 413:
            raise _TooLarge()
        if status in (429, 503):
            wait = f", retry after {retry_after:g} s" if retry_after is not None else ""
            raise _Failed(Outcome.BUSY, f"{self.url}: HTTP {status}{said}{wait}", retry_after)
        if status == 408 or status >= 500:
            raise _Failed(Outcome.UNREACHABLE, f"{self.url}: HTTP {status}{said}", retry_after)
        if 300 <= status < 400:
            where = printable(location, 200)
            raise _Failed(
                Outcome.PROTOCOL,
                f"{self.url}: redirected (HTTP {status}) to {where}; if the collector moved, "
                "set collector.url",
            )
        raise _Failed(Outcome.PROTOCOL, f"{self.url}: HTTP {status}{said}")


async def drain(
    cfg: Config,
    store: Store,
    e: Enrollment,
    client: httpx.AsyncClient,
    *,
    rate_limit_patience: float = 0.0,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> UploadReport:
    """Upload pending measurements until none is left or the collector fails us.

    ``rate_limit_patience``: seconds to wait out ``Retry-After`` answers (429, 503)
    without progress before the pass gives up; each acknowledged request starts the
    count again, so a large backlog drains at the collector's rate limit (the daemon's
    loop does its own waiting: 0).
    """
    report = UploadReport(url=e.url)
    scrub = await _scrub_for_upload(cfg, store, client, e)
    await _drain(cfg, store, _Session(cfg, client, e), report, rate_limit_patience, sleep, scrub)
    report.left = await _thread(backlog, store)
    return report


async def _drain(
    cfg: Config,
    store: Store,
    s: _Session,
    report: UploadReport,
    rate_limit_patience: float,
    sleep: Callable[[float], Awaitable[None]],
    scrub: Scrub,
) -> None:
    max_items = min(cfg.collector.batch_size, MAX_ITEMS)
    pending = await _thread(backlog, store)
    sent = 0  # of the pending ones, to tell the collector what is left (X-Vantage-Backlog)
    waited = 0.0
    while uids := await _thread(next_batch, store, max_items):
        batch = await _thread(_prepare, store, uids, s.enrollment.probe_id, max_items, scrub)
        if batch.rejected or batch.gone:
            await _thread(settle, store, acknowledged=batch.gone, rejected=batch.rejected)
            _count_rejected(report, batch.rejected)
            sent += len(batch.rejected) + len(batch.gone)
        queue = deque(batch.requests)
        while queue:
            items = queue.popleft()
            try:
                receipt = await s.post(items, max(0, pending - sent - len(items)))
            except _TooLarge:
                if len(items) > 1:  # halve the request, and the batches from now on
                    half = len(items) // 2
                    queue.extendleft([items[half:], items[:half]])
                    max_items = max(1, min(max_items, half))
                    continue
                why = "too large for the collector (HTTP 413)"
                await _thread(settle, store, rejected={items[0][0]: why})
                _count_rejected(report, {items[0][0]: why})
                sent += 1
                continue
            except _Failed as f:
                wait = max(1.0, f.retry_after or 0.0)  # a Retry-After of 0 still costs patience
                if f.outcome is Outcome.BUSY and waited + wait <= rate_limit_patience:
                    log.info("%s: waiting %g s", f, wait)
                    await sleep(wait)
                    waited += wait
                    queue.appendleft(items)
                    continue
                if f.outcome is Outcome.PROTOCOL:  # answered, but nothing acknowledged
                    await _thread(settle, store, unanswered=[uid for uid, _ in items])
                report.outcome, report.error, report.retry_after = f.outcome, str(f), f.retry_after
                return
            await _thread(
                settle,
                store,
                acknowledged=receipt.acknowledged,
                rejected=receipt.rejected,
                unanswered=receipt.unanswered,
            )
            sent += len(items)
            waited = 0.0  # patience is for a collector that makes no progress
            report.accepted += receipt.accepted
            report.duplicate += receipt.duplicate
            _count_rejected(report, receipt.rejected)
            if receipt.problems:  # what it did acknowledge is settled; the rest waits
                report.outcome = Outcome.PROTOCOL
                report.error = f"{s.url}: the answer does not match the request: " + "; ".join(
                    receipt.problems
                )
                return


async def _scrub_for_upload(
    cfg: Config, store: Store, client: httpx.AsyncClient, e: Enrollment
) -> Scrub:
    """The scrub for this pass, with every own address known now.

    The collector's whoami is asked first: what it saw is the probe's public address,
    which a run measured while the collector was blocked could not know. A newly
    learnt address is remembered, and the measurements stored while the address was
    unknown are scrubbed again in the database (``Store.rescrub``) before any leaves.
    """
    from probe.vantage import WHOAMI_PATH, DiscoveryError, parse_whoami

    data_dir = cfg.data_dir()
    try:
        r = await client.get(e.url.rstrip("/") + WHOAMI_PATH)
        seen = parse_whoami(r.content).ip if r.status_code == 200 else None
    except (httpx.HTTPError, DiscoveryError) as exc:
        log.debug("upload: the collector's whoami did not answer (%s)", exc)
        seen = None
    remembered = OwnAddresses(data_dir)
    new = await _thread(remembered.learn, [seen] if seen else [], "collector whoami (upload)")
    scrub = await _thread(exit_scrub, data_dir)
    if new:
        changed = await _thread(store.rescrub, scrub, remembered.unsure_runs())
        log.info("upload: a new own address was learnt; %d stored measurement(s) scrubbed "
                 "again", changed)  # fmt: skip
    return scrub


def _count_rejected(report: UploadReport, rejected: dict[str, str]) -> None:
    report.rejected += len(rejected)
    for why in rejected.values():
        if len(report.rejected_reasons) < 5 and why not in report.rejected_reasons:
            report.rejected_reasons.append(why)


def client(cfg: Config) -> httpx.AsyncClient:
    """An HTTP client for the collector: ``collector.timeout`` per step, the system's CAs
    plus ``collector.ca_bundle``, no redirects followed (the credential stays with the
    collector it was issued by)."""
    return httpx.AsyncClient(
        timeout=cfg.collector.timeout,
        verify=ssl_context(cfg),
        follow_redirects=False,
        headers={"User-Agent": f"vantage/{__version__}"},
    )


async def upload_now(
    cfg: Config,
    store: Store,
    *,
    retry_rejected: bool = False,
    rate_limit_patience: float = RATE_LIMIT_PATIENCE,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> UploadReport:
    """One pass, as ``vantage upload`` runs it. Raises :class:`EnrollmentError` for a
    damaged enrollment, :class:`ConfigError` for an unreadable ``ca_bundle``,
    :class:`StoreError` for the database; the collector's failures are in the report."""
    e = enrollment(cfg)
    if e is None:
        return UploadReport(
            outcome=Outcome.NOT_ENROLLED,
            error="this probe is not enrolled: run `vantage enroll URL --token T` first",
            left=await _thread(backlog, store),
        )
    await _thread(requeue_rejected, store, every=retry_rejected)
    async with client(cfg) as c:
        return await drain(cfg, store, e, c, rate_limit_patience=rate_limit_patience, sleep=sleep)


async def _one_pass(cfg: Config, store: Store) -> UploadReport:
    """A pass of the daemon's loop; every failure is in the report, none raised."""
    try:
        e = await _thread(enrollment, cfg)
    except EnrollmentError as exc:
        return UploadReport(outcome=Outcome.NOT_ENROLLED, error=str(exc))
    if e is None:
        why = (
            f"collector.url is {cfg.collector.url} but this probe is not enrolled: "
            "run `vantage enroll URL --token T`"
            if cfg.collector.url
            else ""
        )
        return UploadReport(outcome=Outcome.NOT_ENROLLED, error=why)
    try:
        async with client(cfg) as c:
            return await drain(cfg, store, e, c)
    except (StoreError, ConfigError) as exc:
        return UploadReport(outcome=Outcome.ERROR, error=str(exc), url=e.url)


async def _first(work: asyncio.Future[T], stop: asyncio.Event) -> tuple[bool, T | None]:
    """Wait for ``work`` or ``stop``; ``(True, None)`` when stopped (``work`` is then
    cancelled and waited for)."""
    stopper: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not work.done():
            work.cancel()
            await asyncio.wait({work})
    if work.cancelled():
        return True, None
    if stop.is_set() and work.exception() is not None:
        return True, None
    return False, work.result()


async def upload_loop(
    cfg: Config,
    store: Store,
    stop: asyncio.Event,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rng: Callable[[], float] = random.random,
) -> None:
    """Upload pending measurements every ``collector.interval`` seconds (the first pass
    within :data:`START_DELAY` of the start) until ``stop`` is set; return soon after it
    is, cancelling a request in flight (what was not acknowledged stays queued).

    Never raises for network, collector, database or enrollment trouble: it logs one
    line when the state changes and tries again later. Quiet when the probe is not
    enrolled and ``collector.url`` is empty. ``sleep`` and ``rng`` are the seams for
    tests (a fake clock, a fixed jitter).
    """
    c = cfg.collector
    backoff = Backoff(BACKOFF_BASE, c.max_backoff, rng)
    state: Outcome | None = None
    delay = rng() * min(START_DELAY, c.interval)
    requeued = False
    while True:
        stopped, _ = await _first(asyncio.ensure_future(sleep(delay)), stop)
        if stopped or stop.is_set():
            return
        if not requeued:
            with contextlib.suppress(StoreError):
                n = await _thread(requeue_rejected, store)
                if n:
                    log.info("sending again %d measurement(s) rejected under an older version", n)
            requeued = True
        try:
            stopped, report = await _first(asyncio.ensure_future(_one_pass(cfg, store)), stop)
        except Exception as exc:  # a bug must not end the uploading of a probe left alone
            if state is not Outcome.ERROR:
                log.exception("uploading failed: %s", describe_error(exc))
            state = Outcome.ERROR
            delay = backoff.failed()
            continue
        if stopped or report is None:
            return
        if report.rejected:
            log.warning(
                "the collector rejected %d measurement(s); they stay in the outbox, not sent "
                "again (vantage status): %s",
                report.rejected,
                report.rejected_reasons[0],
            )
        if report.outcome is Outcome.DRAINED or report.outcome is Outcome.NOT_ENROLLED:
            backoff.succeeded()
            delay = c.interval
        else:
            if report.acknowledged:  # it made progress (then hit a rate limit, say)
                backoff.succeeded()
            delay = backoff.failed(report.retry_after)
        _log_state(state, report, delay)
        state = report.outcome


def _log_state(before: Outcome | None, report: UploadReport, delay: float) -> None:
    """One line when the state changes; successful passes after that only at debug."""
    now = report.outcome
    if now is Outcome.DRAINED:
        if before is not Outcome.DRAINED and (before is not None or report.acknowledged):
            log.info(
                "uploading to %s: %d measurement(s) acknowledged, %d pending",
                report.url,
                report.acknowledged,
                report.left,
            )
        else:
            log.debug("uploaded %d measurement(s) to %s", report.acknowledged, report.url)
        return
    if now is before:
        log.debug("upload still failing (%s), next attempt in %.0f s", report.error, delay)
        return
    if now is Outcome.NOT_ENROLLED:
        if report.error:
            log.warning("%s", report.error)
        return
    level = logging.WARNING if now in (Outcome.UNREACHABLE, Outcome.BUSY) else logging.ERROR
    log.log(
        level,
        "upload %s: %s; %d measurement(s) wait in the outbox, retrying with backoff",
        now.value,
        report.error,
        report.left,
    )
