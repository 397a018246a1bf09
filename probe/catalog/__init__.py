"""The service catalog: TOML files describing services, targets and expectations.

The built-in catalog ships in ``probe/catalog/data``; ``--targets FILE`` adds a
user's own. Every file is validated completely before anything runs: an unknown
key, a wrong type, a bad port or URL fails with the file, the key path and the
reason (``CatalogError``). See ``deploy/targets.example.toml`` for the format.

>>> services = load_catalog(extra=[Path("my-sites.toml")])
>>> [t.id for t in services[0].targets]
"""

from __future__ import annotations

import datetime as dt
import encodings.idna
import ipaddress
import re
import ssl
import tomllib
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dns.exception
import dns.name

from probe.tomltable import TableReader
from schema.model import TARGET_KINDS, TARGET_ROLES, Expectations, Service, Source, Target

FORMAT_VERSION = 1

_SERVICE_KEYS = {"name", "title", "notes", "source", "control"}
_TARGET_KEYS = {
    "id", "kind", "host", "ports", "url", "method", "body", "addresses", "sni",
    "expect", "source", "control", "ca_file", "role",
}  # fmt: skip
_EXPECT_KEYS = {"asns", "cert_names", "status"}
_SOURCE_KEYS = {"url", "checked"}
_METHODS = {"GET", "HEAD", "POST", "PUT", "OPTIONS"}


class CatalogError(ValueError):
    """A catalog file is malformed; the message names file, key and reason."""

    def __init__(self, origin: str, key: str, reason: str) -> None:
        self.origin, self.key, self.reason = origin, key, reason
        where = f"{origin}: {key}: " if key else f"{origin}: "
        super().__init__(where + reason)


def _reader(origin: str, table: Any, path: str, allowed: set[str]) -> TableReader:
    return TableReader(table, path, allowed, lambda key, reason: CatalogError(origin, key, reason))


def read_source(c: TableReader, name: str, inherited: Source | None = None) -> Source | None:
    """A ``{url, checked}`` table: where a fact came from and when it was checked."""
    sub = c.sub(name, _SOURCE_KEYS)
    if sub is None:
        return inherited
    url = sub.text("url", required=True)
    checked = sub.get("checked", (dt.date, str), required=True)
    if isinstance(checked, dt.datetime):
        checked = checked.date()
    if isinstance(checked, str):
        try:
            checked = dt.date.fromisoformat(checked)
        except ValueError as exc:
            raise sub.fail("checked", f"not a date (YYYY-MM-DD): {checked!r}") from exc
    return Source(url=url, checked=checked)


_LABEL = re.compile(r"[A-Za-z0-9_-]+")


def _name_problem(name: str) -> str | None:
    """Why ``name`` is not a DNS name a probe can resolve and send as SNI, or None."""
    labels = name.removesuffix(".").split(".")
    if not name or name == ".":
        return "it is empty"
    if not all(labels):
        return "it has an empty label"
    ascii_labels = []
    for label in labels:
        try:
            ascii_labels.append(encodings.idna.ToASCII(label).decode("ascii"))
        except UnicodeError as exc:
            if "too long" in str(exc):
                return "a label is longer than 63 characters"
            return f"not IDNA-encodable ({exc})"
    ascii_name = ".".join(ascii_labels)
    if len(ascii_name) > 253:
        return "it is longer than 253 characters"
    for label in ascii_labels:
        if not _LABEL.fullmatch(label):
            return f"the label {label!r} holds characters other than letters, digits, - and _"
    try:
        dns.name.from_text(ascii_name)
    except dns.exception.DNSException as exc:  # pragma: no cover - caught above
        return str(exc)
    return None


def _check_name(c: TableReader, key: str, name: str, *, ip_ok: bool) -> None:
    """``name`` must be a DNS name (or an IP address, when ``ip_ok``)."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        if ip_ok:
            return
        raise c.fail(key, f"must be a DNS name, not an IP address: {name!r}")
    problem = _name_problem(name)
    if problem is not None:
        raise c.fail(key, f"not a valid DNS name, {problem}: {name!r}")


def _check_ca_file(c: TableReader, path: Path) -> None:
    """``path`` must hold at least one PEM certificate that OpenSSL loads."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # thrown away: only the load counts
    try:
        context.load_verify_locations(cafile=str(path))
    except (ssl.SSLError, ValueError) as exc:
        raise c.fail("ca_file", f"not a PEM certificate file: {path}") from exc
    except OSError as exc:
        raise c.fail("ca_file", f"cannot read {path}: {exc.strerror or exc}") from exc


def _port(c: TableReader, i: int, value: int) -> int:
    if not 0 < value < 65536:
        raise c.fail(f"ports[{i}]", f"{value} is not a port (1-65535)")
    return value


def _target(
    c: TableReader, service: str, inherited: Source | None, control: bool, base: Path | None
) -> Target:
    tid = c.text("id", required=True)
    kind = c.text("kind", required=True)
    if kind not in TARGET_KINDS:
        raise c.fail("kind", f"{kind!r} is not one of {', '.join(TARGET_KINDS)}")
    url = c.text("url")
    host = c.text("host")
    if kind == "http":
        if not url:
            raise c.fail("url", 'is required for kind = "http"')
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise c.fail("url", f"not an http:// or https:// URL with a host: {url!r}")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise c.fail("url", f"bad port in {url!r}") from exc
        _check_name(c, "url", parts.hostname, ip_ok=True)
        if host:
            _check_name(c, "host", host, ip_ok=True)
        host = host or parts.hostname
    elif url:
        raise c.fail("url", f'only kind = "http" targets take a URL (this one is {kind!r})')
    elif host:
        _check_name(c, "host", host, ip_ok=True)
    if not host:
        raise c.fail("host", "is required")
    sni = c.text("sni")
    if sni:
        _check_name(c, "sni", sni, ip_ok=False)
    ports = tuple(_port(c, i, p) for i, p in enumerate(c.items("ports", int)))
    if kind == "tcp" and not ports:
        raise c.fail("ports", "a tcp target needs at least one port")
    if kind == "dns" and ports:
        raise c.fail("ports", "a dns target has no ports")
    addresses = c.items("addresses", str)
    for i, a in enumerate(addresses):
        try:
            ipaddress.ip_address(a)
        except ValueError as exc:
            raise c.fail(f"addresses[{i}]", f"not an IP address: {a!r}") from exc
    method = c.text("method", default="GET").upper()
    if method not in _METHODS:
        raise c.fail("method", f"{method!r} is not one of {', '.join(sorted(_METHODS))}")
    expect = c.sub("expect", _EXPECT_KEYS)
    expectations = Expectations()
    if expect is not None:
        statuses = expect.items("status", int)
        for i, s in enumerate(statuses):
            if not 100 <= s <= 599:
                raise expect.fail(f"status[{i}]", f"{s} is not an HTTP status")
        expectations = Expectations(
            asns=tuple(expect.items("asns", int)),
            cert_names=tuple(expect.items("cert_names", str)),
            status=tuple(statuses),
        )
    role = c.text("role", default="essential")
    if role not in TARGET_ROLES:
        raise c.fail("role", f"{role!r} is not one of {', '.join(TARGET_ROLES)}")
    ca_file = c.text("ca_file")
    if ca_file:
        path = Path(ca_file)
        if not path.is_absolute() and base is not None:
            path = base / path
        if not path.is_file():
            raise c.fail("ca_file", f"no such file: {path}")
        _check_ca_file(c, path)
        ca_file = str(path)
    return Target(
        id=tid,
        service=service,
        kind=kind,
        host=host,
        ports=ports,
        url=url,
        method=method,
        body=c.text("body"),
        addresses=tuple(addresses),
        sni=sni,
        expect=expectations,
        source=read_source(c, "source", inherited),
        control=bool(c.get("control", bool, control)),
        ca_file=ca_file,
        role="diagnostic" if role == "diagnostic" else "essential",
    )


def parse_catalog(text: str, origin: str, base: Path | None = None) -> Service:
    """Parse one catalog document (one service). ``origin`` names it in errors."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(origin, "", f"not valid TOML: {exc}") from exc
    except RecursionError as exc:
        raise CatalogError(
            origin, "", "not valid TOML: arrays or tables nested too deeply"
        ) from exc
    top = _reader(origin, doc, "", {"format", "service", "target"})
    fmt = top.get("format", int, required=True)
    if fmt != FORMAT_VERSION:
        raise top.fail("format", f"this Vantage reads catalog format {FORMAT_VERSION}, not {fmt}")
    svc = top.sub("service", _SERVICE_KEYS)
    if svc is None:
        raise top.fail("service", "is required (a [service] table)")
    name = svc.text("name", required=True)
    source = read_source(svc, "source", None)
    control = bool(svc.get("control", bool, False))
    raw_targets = top.get("target", list, required=True)
    if not raw_targets:
        raise top.fail("target", "a service needs at least one [[target]]")
    targets: list[Target] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_targets):
        if not isinstance(raw, dict):
            raise CatalogError(origin, f"target[{i}]", "expected a table ([[target]])")
        t = _target(_reader(origin, raw, f"target[{i}]", _TARGET_KEYS), name, source, control, base)
        if t.id in seen:
            raise CatalogError(origin, f"target[{i}].id", f"duplicate target id {t.id!r}")
        seen.add(t.id)
        targets.append(t)
    return Service(
        name=name,
        title=svc.text("title", default=name),
        targets=tuple(targets),
        source=source,
        control=control,
        notes=svc.text("notes", default=""),
        origin=origin,
    )


def load_file(path: Path) -> Service:
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(str(path), "", f"cannot read: {exc}") from exc
    return parse_catalog(text, str(path), path.parent)


def builtin_services() -> list[Service]:
    """The catalog shipped with Vantage (messaging services and controls)."""
    services = []
    data = resources.files("probe.catalog").joinpath("data")
    for entry in sorted(data.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            services.append(parse_catalog(entry.read_text("utf-8"), f"builtin:{entry.name}"))
    return services


def load_catalog(extra: Iterable[Path] = (), *, builtin: bool = True) -> list[Service]:
    """The built-in catalog (unless ``builtin`` is false) plus the given files.

    A service name may appear only once across all files.
    """
    services = builtin_services() if builtin else []
    for path in extra:
        services.append(load_file(Path(path)))
    origins: dict[str, str] = {}
    for s in services:
        if s.name in origins:
            raise CatalogError(
                s.origin,
                "service.name",
                f"service {s.name!r} is already defined in {origins[s.name]}",
            )
        origins[s.name] = s.origin
    return services


def select(services: Sequence[Service], names: Sequence[str] = ()) -> list[Service]:
    """Only the named services (all when ``names`` is empty); unknown names fail."""
    if not names:
        return list(services)
    known = {s.name: s for s in services}
    missing = [n for n in names if n not in known]
    if missing:
        raise CatalogError(
            "--service", "", f"unknown service {missing[0]!r} (known: {', '.join(sorted(known))})"
        )
    return [known[n] for n in names]
