"""Reading the collector's answer to an upload: what it acknowledged, by uid.

Pure functions, no I/O. The rule that keeps measurements safe: a measurement leaves
the outbox only when the answer names its uid, that uid was in the request, and the
status is ``accepted`` or ``duplicate``. An answer that is not the documented shape
acknowledges nothing (:class:`ReceiptError`); results for uids that were not sent are
ignored; a sent uid the answer leaves out, or names twice with different statuses,
stays pending.

>>> r = parse_receipt(b'{"results": [{"measurement_uid": "a", "status": "accepted"}]}', ["a", "b"])
>>> r.acknowledged, r.unanswered
(['a'], ['b'])
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from probe.outbox.enrollment import printable

STATUSES = ("accepted", "duplicate", "rejected")
MAX_REASON = 500  # characters of a rejection reason kept in the outbox


class ReceiptError(ValueError):
    """The collector's answer is not a receipt: nothing in it is trusted."""


@dataclass
class Receipt:
    acknowledged: list[str] = field(default_factory=list)  # accepted or duplicate, sent
    accepted: int = 0
    duplicate: int = 0
    rejected: dict[str, str] = field(default_factory=dict)  # uid -> reason
    unanswered: list[str] = field(default_factory=list)  # sent, not (clearly) answered
    problems: list[str] = field(default_factory=list)  # where the answer disagrees with us


def parse_receipt(body: bytes, sent: Sequence[str]) -> Receipt:
    """Match the collector's 200 answer to the uids ``sent``, in request order."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ReceiptError(f"not JSON: {printable(str(exc), 120)}") from None
    if not isinstance(doc, dict):
        raise ReceiptError(f"not a JSON object but {type(doc).__name__}")
    results = doc.get("results")
    if not isinstance(results, list):
        raise ReceiptError("no results list")
    answers: dict[str, tuple[str, str] | None] = {}  # None: answered twice, differently
    for i, item in enumerate(results):
        uid, status, reason = _result(item, i)
        seen = answers.get(uid, (status, reason))
        answers[uid] = (status, reason) if seen is not None and seen[0] == status else None
    out = Receipt()
    wanted = set(sent)
    strangers = [uid for uid in answers if uid not in wanted]
    if strangers:
        out.problems.append(
            f"{len(strangers)} result(s) for measurements not in the request "
            f"(first: {printable(strangers[0], 60)})"
        )
    conflicting = missing = 0
    for uid in dict.fromkeys(sent):  # each uid once, in request order
        answer = answers.get(uid, ...)
        if answer is ...:
            missing += 1
            out.unanswered.append(uid)
        elif answer is None:
            conflicting += 1
            out.unanswered.append(uid)
        elif answer[0] == "rejected":
            out.rejected[uid] = answer[1]
        else:
            out.acknowledged.append(uid)
            if answer[0] == "accepted":
                out.accepted += 1
            else:
                out.duplicate += 1
    if missing:
        out.problems.append(f"{missing} measurement(s) of the request have no result")
    if conflicting:
        out.problems.append(f"{conflicting} measurement(s) have conflicting results")
    return out


def _result(item: Any, i: int) -> tuple[str, str, str]:
    where = f"results[{i}]"
    if not isinstance(item, dict):
        raise ReceiptError(f"{where}: not an object")
    uid, status = item.get("measurement_uid"), item.get("status")
    if not isinstance(uid, str) or not uid:
        raise ReceiptError(f"{where}.measurement_uid: missing or not a string")
    if status not in STATUSES:
        shown = printable(str(status), 40)
        raise ReceiptError(f"{where}.status: {shown!r} is not one of {', '.join(STATUSES)}")
    reason = ""
    if status == "rejected":
        given = item.get("reason")
        reason = printable(given, MAX_REASON) if isinstance(given, str) and given else "no reason"
    return uid, status, reason


def parse_retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or an HTTP date);
    None when absent or unreadable."""
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        seconds = (when - (now or dt.datetime.now(dt.UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)
