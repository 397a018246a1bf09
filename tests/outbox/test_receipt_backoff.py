"""Pure parts: reading the collector's receipt, Retry-After, and the backoff bounds."""

from __future__ import annotations

import datetime as dt
import json
import random

import pytest

from probe.outbox.backoff import FLOOR, MAX_RETRY_AFTER, Backoff
from probe.outbox.receipt import ReceiptError, parse_receipt, parse_retry_after


def _body(*results: dict) -> bytes:
    return json.dumps({"results": list(results)}).encode()


def test_receipt_acknowledges_by_uid_only() -> None:
    r = parse_receipt(
        _body(
            {"measurement_uid": "b", "status": "duplicate"},
            {"measurement_uid": "a", "status": "accepted"},
            {"measurement_uid": "c", "status": "rejected", "reason": "test_keys: bad"},
            {"measurement_uid": "zz", "status": "accepted"},  # never sent
        ),
        ["a", "b", "c", "d"],
    )
    assert r.acknowledged == ["a", "b"] and (r.accepted, r.duplicate) == (1, 1)
    assert r.rejected == {"c": "test_keys: bad"}
    assert r.unanswered == ["d"]
    assert any("not in the request" in p for p in r.problems)
    assert any("no result" in p for p in r.problems)


def test_conflicting_results_acknowledge_nothing_for_that_uid() -> None:
    r = parse_receipt(
        _body(
            {"measurement_uid": "a", "status": "accepted"},
            {"measurement_uid": "a", "status": "rejected", "reason": "x"},
            {"measurement_uid": "b", "status": "accepted"},
            {"measurement_uid": "b", "status": "accepted"},
        ),
        ["a", "b"],
    )
    assert r.acknowledged == ["b"] and r.unanswered == ["a"] and r.rejected == {}


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"<html>oops</html>", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"accepted": 1}', "no results list"),
        (b'{"results": "all good"}', "no results list"),
        (b'{"results": [1]}', r"results\[0\]: not an object"),
        (b'{"results": [{"status": "accepted"}]}', "measurement_uid"),
        (b'{"results": [{"measurement_uid": "a", "status": "ok"}]}', "status"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
    ],
)
def test_malformed_receipts_are_refused_whole(body: bytes, match: str) -> None:
    with pytest.raises(ReceiptError, match=match):
        parse_receipt(body, ["a"])


def test_rejection_reason_is_one_bounded_line() -> None:
    r = parse_receipt(
        _body({"measurement_uid": "a", "status": "rejected", "reason": "x\n" * 1000}), ["a"]
    )
    assert "\n" not in r.rejected["a"] and len(r.rejected["a"]) < 600
    r = parse_receipt(_body({"measurement_uid": "a", "status": "rejected"}), ["a"])
    assert r.rejected["a"] == "no reason"


def test_retry_after() -> None:
    now = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("-5") == 0.0
    assert parse_retry_after("Sun, 01 Mar 2026 12:01:30 GMT", now) == 90.0
    for bad in (None, "", "soon", "nan", "inf"):
        assert parse_retry_after(bad) is None


def test_backoff_is_full_jitter_within_doubling_bounds() -> None:
    rng = random.Random(7)
    b = Backoff(base=10, cap=300, rng=rng.random)
    ceilings = []
    for _ in range(12):
        wait = b.failed()
        ceilings.append(b.ceiling())
        assert FLOOR <= wait <= b.ceiling()
    assert ceilings[:6] == [10, 20, 40, 80, 160, 300] and set(ceilings[5:]) == {300}
    high = Backoff(10, 300, rng=lambda: 1.0)
    assert [high.failed() for _ in range(3)] == [10, 20, 40]
    low = Backoff(10, 300, rng=lambda: 0.0)
    assert low.failed() == FLOOR  # never a tight loop
    b.succeeded()
    assert b.failures == 0 and b.failed() <= 10


def test_backoff_survives_days_of_failures() -> None:
    b = Backoff(10, 3600, rng=lambda: 1.0)
    for _ in range(100_000):
        wait = b.failed()
    assert wait == 3600


def test_retry_after_is_a_lower_bound_but_bounded() -> None:
    b = Backoff(10, 300, rng=lambda: 0.0)
    assert b.failed(retry_after=120) == 120
    assert b.failed(retry_after=1e12) == MAX_RETRY_AFTER
    assert Backoff(10, 0.2, rng=lambda: 0.0).failed() == 0.2  # a cap below the floor wins
