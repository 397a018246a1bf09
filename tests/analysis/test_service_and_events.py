"""Service status per run and blocking events over runs, with literal verdicts."""

from __future__ import annotations

import datetime as dt

from probe.analysis import RunStatus, decide, offline, service_status
from schema.model import Measurement, Target, TCPConnect, Verdict
from tests.conftest import VANTAGE

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def judged(tid: str, accessible: bool | None, blocking: str | bool | None, confidence: str = "high",
           service: str = "whatsapp") -> Measurement:  # fmt: skip
    t = Target(id=tid, service=service, kind="tcp", host=f"{tid}.example", ports=(443,))
    m = Measurement(tid, "r", t, VANTAGE, T0)
    m.verdict = Verdict(accessible, blocking, confidence, "x")
    return m


def test_partial_blocking_is_not_ok() -> None:
    """OONI reads some WhatsApp endpoints blocked as OK; Vantage says partial."""
    ms = [judged("e1", False, "tcp_ip"), judged("e2", True, False), judged("e3", True, False)]
    s = service_status("whatsapp", ms, False)
    assert (s.status, s.blocking, s.blocked_targets) == ("partial", ("tcp_ip",), ("e1",))


def test_blocked_ok_down_inconclusive() -> None:
    assert (
        service_status(
            "whatsapp", [judged("a", False, "dns"), judged("b", False, "dns")], False
        ).status
        == "blocked"
    )
    assert (
        service_status(
            "whatsapp", [judged("a", True, False), judged("b", None, None, "low")], False
        ).status
        == "ok"
    )
    assert (
        service_status(
            "whatsapp", [judged("a", False, False), judged("b", False, False)], False
        ).status
        == "down"
    )
    assert (
        service_status("whatsapp", [judged("a", None, None, "low")], False).status == "inconclusive"
    )
    assert (
        service_status("whatsapp", [judged("a", False, "dns")], True).status == "inconclusive"
    )  # offline


def test_one_weak_block_is_noise_three_are_a_pattern() -> None:
    one = [judged("a", False, "tcp_ip", "low"), judged("b", True, False)]
    assert service_status("whatsapp", one, False).status == "ok"
    three = [judged(x, False, "tcp_ip", "low") for x in "abc"] + [judged("d", True, False)]
    assert service_status("whatsapp", three, False).status == "partial"


def test_offline_from_control_targets() -> None:
    def control(failure: str | None) -> Measurement:
        t = Target(
            id="c", service="controls", kind="tcp", host="192.0.2.1", ports=(443,), control=True
        )
        return Measurement(
            "c", "r", t, VANTAGE, T0, tcp_connect=[TCPConnect("192.0.2.1", 443, 0, 1, failure)]
        )

    assert offline([]) is None
    assert offline([control("generic_timeout_error"), control("network_unreachable")]) is True
    assert offline([control("generic_timeout_error"), control(None)]) is False


def run(i: int, status: str, minutes: float) -> RunStatus:
    return RunStatus(
        f"r{i}", T0 + dt.timedelta(minutes=minutes), status, ("dns",) if status != "ok" else ()
    )


def test_a_block_must_repeat_past_residual_blocking() -> None:
    assert decide([run(1, "blocked", 0)], False).action == "none"
    # Two blocked runs one minute apart: the second may be residual blocking.
    assert decide([run(1, "blocked", 0), run(2, "blocked", 1)], False).action == "none"
    d = decide([run(1, "blocked", 0), run(2, "ok", 10), run(3, "blocked", 20)], False)
    assert (d.action, d.runs, d.status, d.blocking, d.at) == (
        "start",
        ("r1", "r3"),
        "blocked",
        ("dns",),
        T0,
    )
    assert decide([run(1, "partial", 0), run(2, "blocked", 10)], False).status == "partial"


def test_event_ends_when_reachable_again() -> None:
    assert decide([run(1, "blocked", 0), run(2, "inconclusive", 10)], True).action == "none"
    d = decide([run(1, "blocked", 0), run(2, "ok", 10)], True)
    assert (d.action, d.runs) == ("end", ("r2",))
