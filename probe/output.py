"""What a person sees: a table per service and target, a progress bar on a terminal,
plain text when piped. Pure formatting of stored measurements; no measuring here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Protocol

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from probe.analysis.service import ServiceStatus
from schema.model import DNSQuery, Measurement

STEPS = ("dns", "tcp", "tls", "http")


class _Step(Protocol):
    failure: str | None


def _step(observations: Sequence[_Step]) -> str:
    if not observations:
        return "-"
    ok = sum(1 for o in observations if o.failure is None)
    if ok == len(observations):
        return "ok" if ok == 1 else f"ok {ok}/{ok}"
    if ok == 0:
        first = observations[0].failure or ""
        return first if len(observations) == 1 else f"{first} 0/{len(observations)}"
    failures = sorted({o.failure for o in observations if o.failure})
    return f"{ok}/{len(observations)} ok; {', '.join(failures)}"


@dataclass
class _Outcome:
    failure: str | None


def _dns(queries: Sequence[DNSQuery]) -> list[_Outcome]:
    """One outcome per resolver: fine when any of its query types found addresses
    (a name with an A record and no AAAA is normal, not a partial failure)."""
    by_resolver: dict[str, list[DNSQuery]] = {}
    for q in queries:
        by_resolver.setdefault(q.resolver_address, []).append(q)
    return [
        _Outcome(None if any(q.failure is None for q in qs) else qs[0].failure)
        for qs in by_resolver.values()
    ]


def summarise(m: Measurement) -> dict[str, str]:
    """One row: each step's outcome and the measurement's runtime."""
    if m.requests:
        last = m.requests[-1]
        hops = f" after {len(m.requests) - 1} redirects" if len(m.requests) > 1 else ""
        http = last.failure or f"{last.status}{hops}"
    else:
        http = "-"
    return {
        "verdict": verdict_text(m),
        "service": m.target.service,
        "target": m.target.id,
        "input": m.target.input,
        "dns": _step(_dns(m.queries)),
        "tcp": _step(m.tcp_connect),
        "tls": _step(m.tls_handshakes),
        "http": http,
        "time": f"{m.test_runtime:.2f}s",
    }


def verdict_text(m: Measurement) -> str:
    v = m.verdict
    if v is None:
        return "-"
    if v.accessible:
        return "ok"
    if isinstance(v.blocking, str):
        return f"blocked: {v.blocking} ({v.confidence})"
    if v.blocking is False:
        return "not blocked (server side)" if v.accessible is False else "not blocked"
    return "unknown"


def _style(cell: str) -> str:
    if cell == "-" or cell.startswith("ok") or cell[:3].isdigit() and "ok;" not in cell:
        return escape(cell)
    colour = "yellow" if "ok;" in cell else "red"
    return f"[{colour}]{escape(cell)}[/{colour}]"


def _ordered(measurements: Sequence[Measurement]) -> list[Measurement]:
    return sorted(measurements, key=lambda m: (m.target.service, m.target.id))


def print_table(measurements: Sequence[Measurement], console: Console) -> None:
    """A rich table per service (for a terminal)."""
    by_service: dict[str, list[Measurement]] = {}
    for m in _ordered(measurements):
        by_service.setdefault(m.target.service, []).append(m)
    for service, items in by_service.items():
        table = Table(title=service, title_justify="left")
        for col in ("target", "input", *STEPS, "time", "verdict"):
            table.add_column(col, overflow="fold")
        for m in items:
            row = summarise(m)
            cells = [row[c] for c in ("target", "input", *STEPS, "time")]
            verdict = row["verdict"]
            styled = (
                f"[red]{escape(verdict)}[/red]"
                if verdict.startswith("blocked")
                else escape(verdict)
            )
            table.add_row(
                *(escape(c) for c in cells[:2]), *map(_style, cells[2:6]), cells[6], styled
            )
        console.print(table)


def print_plain(measurements: Sequence[Measurement], out: IO[str]) -> None:
    """Tab-separated lines with a header (for pipes and logs)."""
    cols = ("service", "target", *STEPS, "time", "verdict")
    out.write("\t".join(cols) + "\n")
    for m in _ordered(measurements):
        row = summarise(m)
        out.write("\t".join(row[c] for c in cols) + "\n")


def print_services(statuses: Sequence[ServiceStatus], console: Console) -> None:
    table = Table("service", "status", "why", title="services", title_justify="left")
    colours = {"blocked": "red", "partial": "yellow", "ok": "green"}
    for s in statuses:
        colour = colours.get(s.status)
        status = f"[{colour}]{s.status}[/{colour}]" if colour else s.status
        table.add_row(s.service, status, escape(s.explanation))
    console.print(table)


def services_plain(statuses: Sequence[ServiceStatus], out: IO[str]) -> None:
    for s in statuses:
        out.write(f"service\t{s.service}\t{s.status}\t{s.explanation}\n")
