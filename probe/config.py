"""Configuration, merged once: defaults < file < ``VANTAGE_*`` environment < flags.

The result is one frozen :class:`Config`. A bad value fails with the key and the
reason (:class:`ConfigError`), before anything is measured. ``deploy/vantage.toml.example``
documents every key.

>>> cfg = load_config(Path("vantage.toml"), env={"VANTAGE_ENGINE_CONCURRENCY": "4"})
>>> cfg.engine.concurrency
4
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("vantage.config")

ENV_PREFIX = "VANTAGE_"
DEFAULT_CONFIG_PATHS = (Path("/etc/vantage/vantage.toml"),)
MAX_NUMBER = 1e12  # no count, size or duration in the configuration is larger
MAX_CONCURRENCY = 1024


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


@dataclass(frozen=True)
class ProbeSection:
    data_dir: str = ""  # default: $XDG_DATA_HOME/vantage
    db: str = ""  # SQLAlchemy URL; default: SQLite in data_dir


@dataclass(frozen=True)
class VantageSection:
    asn: int = 0
    cc: str = "ZZ"
    network_name: str = ""
    network_type: str = ""  # wifi | ethernet | mobile | "" (= from the default route)
    asn_db: str = ""  # MaxMind-format .mmdb with ASN and network name (DB-IP lite ASN)
    country_db: str = ""  # MaxMind-format .mmdb with the country (DB-IP lite country)
    resolver_whoami: str = "whoami.v4.powerdns.org"  # "" = do not look the resolver up


@dataclass(frozen=True)
class DNSSection:
    system: bool = True  # query the resolvers of /etc/resolv.conf
    resolv_conf: str = "/etc/resolv.conf"
    resolvers: tuple[str, ...] = ()  # udp://IP[:PORT], tcp://IP[:PORT], https://.../dns-query


@dataclass(frozen=True)
class EngineSection:
    concurrency: int = 16
    run_deadline: float = 600.0
    dns_timeout: float = 5.0
    tcp_timeout: float = 15.0
    tls_timeout: float = 10.0
    http_timeout: float = 20.0
    max_addresses: int = 8
    ca_bundle: tuple[str, ...] = ()
    system_cas: bool = True
    public_ranges: tuple[str, ...] = ()  # reserved ranges to treat as public (lab, tests)
    control_sni: str = "example.com"  # harmless name for the SNI A/B test; "" turns it off


@dataclass(frozen=True)
class ControlSection:
    url: str = ""  # the control helper (vantage control serve); "" = none
    token: str = ""  # its bearer token, if it requires one
    timeout: float = 30.0


@dataclass(frozen=True)
class AnalysisSection:
    #: Extra blockpage fingerprint files (the format of probe/analysis/fingerprints.toml),
    #: tried before the shipped ones: a network's own knowledge.
    fingerprints: tuple[str, ...] = ()


@dataclass(frozen=True)
class DaemonSection:
    stop_timeout: float = 20.0  # SIGTERM: seconds to finish what is in flight, then cancel
    residual_gap: float = 180.0  # no endpoint is re-tested sooner (residual blocking)
    coalesce: bool = True  # missed runs (probe off, asleep) become one run, reported


@dataclass(frozen=True)
class SuiteSection:
    """One ``[suites.NAME]`` table: services run together on one schedule."""

    name: str = "messaging"
    services: tuple[str, ...] = ()  # () = every service of the catalog
    interval: float = 3600.0  # seconds between runs, on average
    jitter: float = 0.25  # each gap is interval * (1 +- jitter), uniformly at random
    spacing: str = "jitter"  # jitter | exponential (memoryless gaps with mean interval)


@dataclass(frozen=True)
class PrivacySection:
    consent: bool = False  # accept the risk notice without `vantage consent` (fleets)
    store_ip: bool = False  # store the probe's public IP with its vantage point


@dataclass(frozen=True)
class RetentionSection:
    days: int = 90  # measurements older than this are pruned; 0 keeps everything
    min_free_mb: int = 256  # measuring pauses when the data disk has less free space


@dataclass(frozen=True)
class CollectorSection:
    url: str = ""  # overrides the URL `vantage enroll` stored in <data_dir>/collector.json
    timeout: float = 30.0
    batch_size: int = 500  # measurements per upload request
    interval: float = 300.0  # seconds between uploads of the outbox
    max_backoff: float = 3600.0  # longest wait after failed uploads
    ca_bundle: str = ""  # extra CA (PEM) to trust for the collector's certificate


@dataclass(frozen=True)
class Config:
    probe: ProbeSection = field(default_factory=ProbeSection)
    vantage: VantageSection = field(default_factory=VantageSection)
    dns: DNSSection = field(default_factory=DNSSection)
    engine: EngineSection = field(default_factory=EngineSection)
    control: ControlSection = field(default_factory=ControlSection)
    analysis: AnalysisSection = field(default_factory=AnalysisSection)
    daemon: DaemonSection = field(default_factory=DaemonSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    retention: RetentionSection = field(default_factory=RetentionSection)
    collector: CollectorSection = field(default_factory=CollectorSection)
    #: The daemon's schedule; one suite of every service, hourly, by default.
    suites: tuple[SuiteSection, ...] = (SuiteSection(),)

    def data_dir(self) -> Path:
        if self.probe.data_dir:
            return Path(self.probe.data_dir).expanduser()
        base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        return Path(base) / "vantage"

    def db_url(self) -> str:
        return self.probe.db or f"sqlite:///{self.data_dir() / 'vantage.db'}"


_SECTIONS: dict[str, type] = {
    "probe": ProbeSection,
    "vantage": VantageSection,
    "dns": DNSSection,
    "engine": EngineSection,
    "control": ControlSection,
    "analysis": AnalysisSection,
    "daemon": DaemonSection,
    "privacy": PrivacySection,
    "retention": RetentionSection,
    "collector": CollectorSection,
}
SUITES = "suites"  # [suites.NAME] tables (file only)
SUITE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


def _coerce(key: str, value: Any, kind: Any, *, from_text: bool) -> Any:
    """Check (file) or convert (environment, flags) ``value`` to the field's type."""
    try:
        if kind == "bool":
            if from_text and isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind == "int":
            if isinstance(value, bool) or not (from_text or isinstance(value, int)):
                raise TypeError
            return _bounded(key, int(value))
        if kind == "float":
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, int | float) or from_text:
                return _bounded(key, float(value))
            raise TypeError
        if kind == "str":
            if not isinstance(value, str):
                raise TypeError
            return value
        if kind == "tuple[str, ...]":
            if from_text and isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return tuple(value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {_KIND_TEXT[kind]}, got {value!r}") from None
    raise ConfigError(f"{key}: unsupported type {kind}")  # pragma: no cover - programming error


def _bounded(key: str, value: float) -> Any:
    """``value`` if it is finite and at most :data:`MAX_NUMBER` in size."""
    if not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value}")
    if abs(value) > MAX_NUMBER:
        raise ConfigError(f"{key}: must be at most {MAX_NUMBER:g} in size, got {value:g}")
    return value


_KIND_TEXT = {
    "bool": "true or false",
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "tuple[str, ...]": "a list of strings",
}


_COLLECTOR_KEYS = frozenset(f.name for f in dataclasses.fields(CollectorSection))


def _apply(
    sections: dict[str, dict[str, Any]],
    section: str,
    key: str,
    value: Any,
    origin: str,
    *,
    from_text: bool,
) -> None:
    cls = _SECTIONS.get(section)
    if cls is None:
        raise ConfigError(f"{origin}: unknown section [{section}] (known: {', '.join(_SECTIONS)})")
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    if key not in fields:
        raise ConfigError(f"{origin}: unknown key {section}.{key} (known: {', '.join(fields)})")
    sections[section][key] = _coerce(
        f"{origin}: {section}.{key}", value, fields[key], from_text=from_text
    )


def load_config(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Merge the layers into one :class:`Config`.

    ``path``: a TOML file (an explicit path must exist; otherwise the first of
    ``DEFAULT_CONFIG_PATHS`` that exists is read). ``env``: the environment
    (``VANTAGE_ENGINE_CONCURRENCY=4`` sets ``engine.concurrency``). ``overrides``:
    ``{"engine.concurrency": 4}`` from command-line flags.
    """
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    suites: tuple[SuiteSection, ...] = Config().suites
    if path is None:
        path = next((p for p in DEFAULT_CONFIG_PATHS if p.is_file()), None)
    elif not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    if path is not None:
        try:
            doc = tomllib.loads(path.read_text("utf-8"))
        except PermissionError as exc:
            from probe.access import access_hint

            hint = access_hint(path) or "run it with sudo"
            raise ConfigError(f"{path}: cannot read config: permission denied; {hint}") from exc
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read config: {exc}") from exc
        except RecursionError as exc:
            raise ConfigError(
                f"{path}: cannot read config: arrays or tables nested too deeply"
            ) from exc
        for section, table in doc.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: {section}: expected a [section] table")
            if section == SUITES:
                suites = _suites(table, str(path))
                continue
            if section not in _SECTIONS:
                known = ", ".join(_SECTIONS)
                raise ConfigError(f"{path}: unknown section [{section}] (known: {known})")
            for key, value in table.items():
                _apply(sections, section, key, value, str(path), from_text=False)
    for name, value in (env or {}).items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        if section == "collector" and key not in _COLLECTOR_KEYS:
            # The collector server's own settings (VANTAGE_SERVER_*, formerly
            # VANTAGE_COLLECTOR_*) are not the probe's: an operator may run both on one
            # machine with one environment.
            log.info("environment %s: not a probe setting (the collector server's), ignored",
                     name)  # fmt: skip
            continue
        if section in _SECTIONS:
            _apply(sections, section, key, value, f"environment {name}", from_text=True)
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        _apply(sections, section, key, value, "command line", from_text=True)
    cfg = Config(
        **{name: _SECTIONS[name](**values) for name, values in sections.items()}, suites=suites
    )
    _validate(cfg)
    return cfg


def _suites(doc: dict[str, Any], origin: str) -> tuple[SuiteSection, ...]:
    """The ``[suites.NAME]`` tables; none at all keeps the default suite."""
    fields = {f.name: f.type for f in dataclasses.fields(SuiteSection) if f.name != "name"}
    out = []
    for name, table in doc.items():
        where = f"{origin}: suites.{name}"
        if not name or not set(name) <= SUITE_NAME_CHARS or len(name) > 64:
            raise ConfigError(f"{where}: a suite name is 1-64 of a-z, 0-9, - and _")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a [suites.{name}] table")
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key not in fields:
                raise ConfigError(f"{where}: unknown key {key} (known: {', '.join(fields)})")
            values[key] = _coerce(f"{where}.{key}", value, fields[key], from_text=False)
        out.append(SuiteSection(name=name, **values))
    if not out:
        raise ConfigError(f"{origin}: [suites] has no suite")
    return tuple(out)


def _validate(cfg: Config) -> None:
    e = cfg.engine
    if e.concurrency < 1:
        raise ConfigError(f"engine.concurrency: must be at least 1, got {e.concurrency}")
    if e.concurrency > MAX_CONCURRENCY:
        raise ConfigError(
            f"engine.concurrency: must be at most {MAX_CONCURRENCY}, got {e.concurrency}"
        )
    for name in ("run_deadline", "dns_timeout", "tcp_timeout", "tls_timeout", "http_timeout"):
        value = getattr(e, name)
        if not (math.isfinite(value) and value > 0):  # the defaults are checked here too
            raise ConfigError(f"engine.{name}: must be positive, got {value}")
    if not (math.isfinite(cfg.control.timeout) and cfg.control.timeout > 0):
        raise ConfigError(f"control.timeout: must be positive, got {cfg.control.timeout}")
    if e.max_addresses < 1:
        raise ConfigError(f"engine.max_addresses: must be at least 1, got {e.max_addresses}")
    v = cfg.vantage
    if not (len(v.cc) == 2 and v.cc.isalpha() and v.cc.isupper()):
        raise ConfigError(f"vantage.cc: a two-letter upper-case country code, got {v.cc!r}")
    if v.asn < 0:
        raise ConfigError(f"vantage.asn: must not be negative, got {v.asn}")
    if cfg.control.url and not cfg.control.url.startswith(("http://", "https://")):
        raise ConfigError(f"control.url: an http:// or https:// URL, got {cfg.control.url!r}")
    if v.network_type not in ("", "wifi", "ethernet", "mobile"):
        raise ConfigError(f"vantage.network_type: wifi, ethernet or mobile, got {v.network_type!r}")
    for path in cfg.analysis.fingerprints:
        if not Path(path).expanduser().is_file():
            raise ConfigError(f"analysis.fingerprints: no such file: {path}")
    d = cfg.daemon
    for name in ("stop_timeout", "residual_gap"):
        value = getattr(d, name)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"daemon.{name}: must not be negative, got {value}")
    for suite in cfg.suites:
        where = f"suites.{suite.name}"
        if not suite.interval > 0:
            raise ConfigError(f"{where}.interval: must be positive, got {suite.interval}")
        if not 0 <= suite.jitter < 1:
            raise ConfigError(f"{where}.jitter: must be at least 0 and below 1, got {suite.jitter}")
        if suite.spacing not in ("jitter", "exponential"):
            raise ConfigError(f"{where}.spacing: jitter or exponential, got {suite.spacing!r}")
    r = cfg.retention
    if r.days < 0:
        raise ConfigError(f"retention.days: must not be negative (0 keeps all), got {r.days}")
    if r.min_free_mb < 0:
        raise ConfigError(f"retention.min_free_mb: must not be negative, got {r.min_free_mb}")
    c = cfg.collector
    if c.url and not c.url.startswith(("http://", "https://")):
        raise ConfigError(f"collector.url: an http:// or https:// URL, got {c.url!r}")
    for name in ("timeout", "interval", "max_backoff"):
        value = getattr(c, name)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"collector.{name}: must be positive, got {value}")
    if not 1 <= c.batch_size <= 1000:  # the collector's API takes at most 1000 per request
        raise ConfigError(f"collector.batch_size: must be 1 to 1000, got {c.batch_size}")
