"""Lab scenario files: what the censor does, and what the probe must then observe.

A scenario is TOML a person can read (``probe/lab/scenarios/*.toml``; the format is
documented key by key in ``probe/lab/SCENARIOS.md``). Parsing validates everything and
fails with the file, the key and the reason (:class:`ScenarioError`).
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from probe.catalog import CatalogError, parse_catalog
from probe.tomltable import TableReader, to_toml
from schema.model import (
    BLOCKING_KINDS,
    FAILURES,
    OPERATIONS,
    SERVICE_STATUSES,
    Target,
    is_failure_string,
)

RULE_ACTIONS: dict[str, tuple[str, ...]] = {
    "dns": ("nxdomain", "servfail", "refused", "timeout", "empty", "answer"),
    "dns-inject": ("answer",),
    "tcp": ("drop", "reset"),
    "tls": ("reset", "drop", "intercept"),
    "http": ("blockpage", "reset"),
    "throttle": ("limit",),
    "outage": ("drop",),
}
SITE_BEHAVIOURS = ("page", "redirect", "big", "challenge", "down")
SITE_TLS = ("valid", "expired", "wrong-name", "unknown-ca", "none")
STEPS = ("dns", "tcp", "tls", "http")
SCENARIO_SERVICE = "scenario"
MAX_CONCURRENCY = 1024


class ScenarioError(ValueError):
    """A scenario file is malformed; the message names file, key and reason."""


@dataclass(frozen=True)
class Rule:
    kind: str
    action: str
    match: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    keyword: str = ""
    rate: int = 0
    residual: int = 0


@dataclass(frozen=True)
class Site:
    name: str
    behaviour: str = "page"
    tls: str = "valid"
    redirects: int = 0
    size: int = 0
    exists: bool = True


@dataclass(frozen=True)
class Expectation:
    service: str
    step: str | None = None
    failure: str | None = None  # a failure string, "none" (the step worked), "absent" (not run)
    target: str | None = None
    operation: str | None = None
    status: int | None = None
    body_contains: str | None = None
    answers: tuple[str, ...] = ()
    resolver: str | None = None  # dns: judge this resolver's queries ("IP:PORT" or a DoH URL)
    # The verdict: blocking is a kind, "false" or "unknown"; accessible "true", "false"
    # or "unknown"; service_status the statuses the service's run status may have.
    blocking: str | None = None
    accessible: str | None = None
    service_status: tuple[str, ...] = ()
    #: A reason code the verdict must give (``Verdict.reasons[].code``): which rule decided.
    reason: str | None = None


@dataclass(frozen=True)
class Path_:
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    origin: str
    services: tuple[str, ...] | None  # built-in services to measure; None = all
    path: Path_ = field(default_factory=Path_)
    rules: tuple[Rule, ...] = ()
    sites: tuple[Site, ...] = ()
    targets: tuple[Target, ...] = ()
    expectations: tuple[Expectation, ...] = ()
    probe_config: dict[str, Any] = field(default_factory=dict)
    concurrency: int | None = None


def _T(origin: str, table: Any, path: str, allowed: set[str]) -> TableReader:
    """A table of the scenario; errors read ``FILE: KEY: REASON``."""
    return TableReader(
        table, path, allowed, lambda key, why: ScenarioError(f"{origin}: {key}: {why}")
    )


def _rule(t: TableReader) -> Rule:
    kind = t.choice("kind", tuple(RULE_ACTIONS))
    actions = RULE_ACTIONS[kind]
    action = t.choice("action", actions, default=actions[0] if len(actions) == 1 else None)
    match = t.strings("match")
    addresses = t.strings("addresses")
    for i, a in enumerate(addresses):
        try:
            ipaddress.ip_address(a)
        except ValueError:
            raise t.fail(f"addresses[{i}]", f"not an IP address: {a!r}") from None
    ports = tuple(t.get("ports", list, []))
    if not all(isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in ports):
        raise t.fail("ports", "expected a list of port numbers (1-65535)")
    keyword = t.get("keyword", str, "")
    if kind not in ("outage",) and not match and not (kind == "http" and keyword):
        raise t.fail("match", f"a {kind} rule needs names or addresses to match")
    if action == "answer" and not addresses:
        raise t.fail("addresses", "an answer needs the addresses to answer with")
    rate = int(t.number("rate", 0))
    if kind == "throttle" and rate <= 0:
        raise t.fail("rate", "a throttle rule needs a rate in bytes per second")
    residual = int(t.number("residual", 0))
    if residual and kind not in ("tls", "http"):
        raise t.fail("residual", "only tls and http rules trigger residual blocking")
    return Rule(kind, action, match, addresses, ports, keyword, rate, residual)


def _site(t: TableReader) -> Site:
    name = t.get("name", str, required=True).lower().rstrip(".")
    return Site(
        name=name,
        behaviour=t.choice("behaviour", SITE_BEHAVIOURS, "page"),
        tls=t.choice("tls", SITE_TLS, "valid"),
        redirects=int(t.number("redirects", 0)),
        size=int(t.number("size", 0)),
        exists=bool(t.get("exists", bool, True)),
    )


def _tristate(t: TableReader, key: str, allowed: tuple[str, ...]) -> str | None:
    """A verdict value: a TOML boolean, or one of ``allowed`` strings."""
    value = t.get(key, (bool, str))
    if value is None:
        return None
    text = str(value).lower() if isinstance(value, bool) else value
    if text not in allowed:
        raise t.fail(key, f"{value!r} is not one of {', '.join(allowed)}")
    return text


def _expectation(t: TableReader) -> Expectation:
    failure = t.get("failure", str)
    if failure is not None and failure not in ("none", "absent") and not is_failure_string(failure):
        raise t.fail("failure", f"{failure!r} is not a failure string, 'none' or 'absent' "
                      f"(failure strings: {', '.join(sorted(FAILURES))})")  # fmt: skip
    operation = t.get("operation", str)
    if operation is not None and operation not in OPERATIONS:
        raise t.fail("operation", f"{operation!r} is not one of {', '.join(sorted(OPERATIONS))}")
    step = t.choice("step", STEPS) if "step" in t.table else None
    if (failure is None) != (step is None):
        raise t.fail("step" if step is None else "failure", "step and failure go together")
    blocking = _tristate(t, "blocking", ("false", "unknown", *BLOCKING_KINDS))
    accessible = _tristate(t, "accessible", ("true", "false", "unknown"))
    statuses = t.get("service_status", (str, list), None)
    statuses = (statuses,) if isinstance(statuses, str) else tuple(t.strings("service_status"))
    for i, st in enumerate(statuses):
        if st not in SERVICE_STATUSES:
            raise t.fail(
                f"service_status[{i}]", f"{st!r} is not one of {', '.join(SERVICE_STATUSES)}"
            )
    reason = t.get("reason", str)
    if reason is not None and not reason.replace("_", "").isalnum():
        raise t.fail("reason", f"{reason!r} is not a reason code (letters, digits and _)")
    if failure is None and blocking is None and accessible is None and not statuses and not reason:
        raise t.fail("failure", "an expectation needs a step and failure, a verdict "
                     "(blocking, accessible) or a service_status")  # fmt: skip
    return Expectation(
        service=t.get("service", str, required=True),
        target=t.get("target", str),
        step=step,
        failure=failure,
        operation=operation,
        status=t.get("status", int),
        body_contains=t.get("body_contains", str),
        answers=t.strings("answers"),
        resolver=t.get("resolver", str),
        blocking=blocking,
        accessible=accessible,
        service_status=statuses,
        reason=reason,
    )


_TOP = {"name", "description", "services", "path", "rule", "site", "target", "expect",
        "probe", "concurrency"}  # fmt: skip


def parse_scenario(text: str, origin: str) -> Scenario:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{origin}: not valid TOML: {exc}") from exc
    except RecursionError as exc:
        raise ScenarioError(
            f"{origin}: not valid TOML: arrays or tables nested too deeply"
        ) from exc
    top = _T(origin, doc, "", _TOP)
    path = _T(origin, doc.get("path", {}), "path", {"delay_ms", "jitter_ms", "loss_pct"})
    loss = path.number("loss_pct", 0.0)
    if loss > 100:
        raise path.fail("loss_pct", "a percentage (0-100)")
    services = top.strings("services") if "services" in doc else None

    def tables(key: str, allowed: set[str]) -> list[TableReader]:
        items = top.get(key, list, [])
        return [_T(origin, item, f"{key}[{i}]", allowed) for i, item in enumerate(items)]

    rules = tuple(_rule(t) for t in tables("rule", {"kind", "action", "match", "addresses", "ports",
                                                    "keyword", "rate", "residual"}))  # fmt: skip
    sites = tuple(
        _site(t)
        for t in tables("site", {"name", "behaviour", "tls", "redirects", "size", "exists"})
    )
    targets: tuple[Target, ...] = ()
    if doc.get("target"):
        catalog = {"format": 1, "service": {"name": SCENARIO_SERVICE}, "target": doc["target"]}
        try:
            targets = parse_catalog(to_toml(catalog), origin).targets
        except CatalogError as exc:
            raise ScenarioError(str(exc)) from exc
    expect_keys = {"service", "target", "step", "failure", "operation", "status", "body_contains",
                   "answers", "resolver", "blocking", "accessible", "service_status",
                   "reason"}  # fmt: skip
    expectations = tuple(_expectation(t) for t in tables("expect", expect_keys))
    if not expectations:
        raise ScenarioError(f"{origin}: expect: a scenario needs at least one [[expect]]")
    probe = top.get("probe", dict, {})
    concurrency = top.get("concurrency", int)
    if concurrency is not None and not 1 <= concurrency <= MAX_CONCURRENCY:
        raise top.fail("concurrency", f"must be 1-{MAX_CONCURRENCY}, got {concurrency}")
    scenario = Scenario(
        name=top.get("name", str, required=True),
        description=top.get("description", str, ""),
        origin=origin,
        services=services,
        path=Path_(path.number("delay_ms", 0.0), path.number("jitter_ms", 0.0), loss),
        rules=rules,
        sites=sites,
        targets=targets,
        expectations=expectations,
        probe_config=probe,
        concurrency=concurrency,
    )
    _check_references(scenario)
    return scenario


def _check_references(s: Scenario) -> None:
    from probe.catalog import builtin_services

    known = {svc.name: {t.id for t in svc.targets} for svc in builtin_services()}
    known[SCENARIO_SERVICE] = {t.id for t in s.targets}
    measured = set(s.services) if s.services is not None else set(known) - {SCENARIO_SERVICE}
    for name in s.services or ():
        if name not in known or name == SCENARIO_SERVICE:
            raise ScenarioError(f"{s.origin}: services: unknown built-in service {name!r}")
    if s.targets:
        measured.add(SCENARIO_SERVICE)
    for i, e in enumerate(s.expectations):
        if e.service not in measured:
            raise ScenarioError(f"{s.origin}: expect[{i}].service: {e.service!r} is not measured "
                                f"in this scenario ({', '.join(sorted(measured))})")  # fmt: skip
        if e.target is not None and e.target not in known[e.service]:
            raise ScenarioError(
                f"{s.origin}: expect[{i}].target: {e.service} has no target {e.target!r}"
            )


def load_scenario(path: Path) -> Scenario:
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: cannot read: {exc}") from exc
    return parse_scenario(text, str(path))


def shipped_scenarios() -> list[Path]:
    """The scenarios that ship with Vantage, by file name."""
    folder = resources.files("probe.lab").joinpath("scenarios")
    names = sorted(e.name for e in folder.iterdir() if e.name.endswith(".toml"))
    return [Path(str(folder)) / name for name in names]
