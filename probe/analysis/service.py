"""From verdicts to what a person asks: is this service blocked here, in this run?

A service is ``ok``, ``blocked``, ``partial`` (some essential targets blocked, others
fine: the case OONI reads as OK), ``down`` (it fails from the control helper too),
or ``inconclusive``. Only essential targets decide (``role = "diagnostic"`` in the
catalog marks the others). Only blocking judged with medium or high confidence counts: a
single timeout never makes a service blocked.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from schema.model import Measurement, Verdict


@dataclass(frozen=True)
class ServiceStatus:
    service: str
    status: str  # ok | blocked | partial | down | inconclusive
    blocking: tuple[str, ...] = ()  # the kinds of blocking seen
    blocked_targets: tuple[str, ...] = ()
    explanation: str = ""
    measurements: tuple[str, ...] = field(default=(), compare=False)


#: Weak (low-confidence) blocks of one kind count once this many targets show them:
#: one lost packet is noise, the same failure on several targets is a pattern.
CORROBORATION = 3


def _firm(v: Verdict | None) -> bool:
    return v is not None and isinstance(v.blocking, str) and v.confidence in ("high", "medium")


def _blocked(items: list[Measurement]) -> list[Measurement]:
    """Targets judged blocked firmly, or weakly but corroborated by other targets."""
    weak: dict[str, list[Measurement]] = {}
    for m in items:
        v = m.verdict
        if v is not None and isinstance(v.blocking, str) and not _firm(v):
            weak.setdefault(v.blocking, []).append(m)
    corroborated = [m for ms in weak.values() if len(ms) >= CORROBORATION for m in ms]
    return [m for m in items if _firm(m.verdict)] + corroborated


def offline(controls: Sequence[Measurement]) -> bool | None:
    """True when every control target failed: the vantage point itself is offline.

    None when no control target finished (a control cut short by Ctrl-C or the
    deadline says nothing about the network). A control "works" when it got through
    every step it has (its own verdict is not needed for that).
    """
    finished = [m for m in controls if m.annotations.get("interrupted") != "true"]
    if not finished:
        return None
    return all(m.failure() is not None for m in finished)


def service_status(
    service: str, measurements: Iterable[Measurement], is_offline: bool | None
) -> ServiceStatus:
    measured = [m for m in measurements if m.target.service == service]
    uids = tuple(m.measurement_uid for m in measured)
    # The service is what its essential targets are: a diagnostic target (a DNS check,
    # a status name such as Signal's uptime) is judged, but does not decide. Only
    # diagnostic targets measured: they are all there is to go by.
    items = [m for m in measured if m.target.role != "diagnostic"] or measured
    if is_offline:
        return ServiceStatus(
            service, "inconclusive", explanation="the vantage point was offline", measurements=uids
        )
    blocked = _blocked(items)
    reachable = [m for m in items if m.verdict is not None and m.verdict.accessible]
    server_side = [
        m
        for m in items
        if m.verdict is not None and m.verdict.blocking is False and m.verdict.accessible is False
    ]
    kinds = tuple(sorted({str(m.verdict.blocking) for m in blocked if m.verdict}))
    names = tuple(sorted(m.target.id for m in blocked))
    if blocked and reachable:
        return ServiceStatus(
            service,
            "partial",
            kinds,
            names,
            f"{len(blocked)} of {len(items)} targets blocked ({', '.join(kinds)}): "
            f"{', '.join(names)}",
            uids,
        )
    if blocked:
        return ServiceStatus(
            service,
            "blocked",
            kinds,
            names,
            f"blocked ({', '.join(kinds)}): {', '.join(names)}",
            uids,
        )
    unsure = len(items) - len(reachable) - len(server_side)
    if reachable and unsure <= len(reachable):
        note = f"; {unsure} could not be judged" if unsure else ""
        return ServiceStatus(
            service,
            "ok",
            explanation=f"{len(reachable)} of {len(items)} targets reachable{note}",
            measurements=uids,
        )
    if server_side and not unsure:
        return ServiceStatus(
            service, "down", explanation="it fails from the control helper too", measurements=uids
        )
    return ServiceStatus(
        service,
        "inconclusive",
        measurements=uids,
        explanation=f"{unsure} of {len(items)} targets could not be judged",
    )
