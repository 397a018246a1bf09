"""The collector's settings: one frozen object built from flags and environment.

``vantage collector serve`` builds it from its flags, which fall back to
``VANTAGE_COLLECTOR_*`` variables (a database URL with a password stays out of ``ps``):

>>> settings = CollectorSettings.from_env({"VANTAGE_COLLECTOR_DB": "sqlite:///c.db"})
>>> settings.max_items
1000
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collectors.control import ControlSettings

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ENV_PREFIX = "VANTAGE_COLLECTOR_"
DEFAULT_PORT = 8800
#: The API contract's limits (collectors/API.md): 16 MiB after decompression, 1000 items.
MAX_BODY = 16 * 1024 * 1024
MAX_ITEMS = 1000


class SettingsError(ValueError):
    """A setting is malformed; the message names it."""


@dataclass(frozen=True)
class CollectorSettings:
    """Everything the collector app needs; ``db`` is a SQLAlchemy URL."""

    db: str
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    #: MaxMind-format databases whoami answers from ("" = unknown: AS0, ZZ).
    asn_db: str = ""
    country_db: str = ""
    #: Reverse proxies whose X-Forwarded-For is believed (their own address is not
    #: the caller's). Empty: the peer address is the caller's.
    trusted_proxies: tuple[IPNetwork, ...] = ()
    max_body: int = MAX_BODY
    max_items: int = MAX_ITEMS
    #: Per probe: measurements per second uploaded, and the burst a full bucket allows.
    upload_rate: float = 200.0
    upload_burst: float = 2000.0
    #: Per caller address, for the unauthenticated calls (enroll, whoami).
    address_rate: float = 2.0
    address_burst: float = 30.0
    #: Per caller address, every upload request, whatever its outcome (an unknown
    #: credential costs :data:`collectors.ingest.AUTH_FAILURE_COST`): a client cannot
    #: make the collector look up credentials or read bodies faster than this.
    ingest_address_rate: float = 20.0
    ingest_address_burst: float = 200.0
    #: Seconds at most an address over that rate waits for its 429 (not counted as an
    #: active request meanwhile): a client that does not wait is slowed to about
    #: ``connections_per_address`` requests per this many seconds.
    refusal_delay: float = 1.0
    #: Upload bodies one probe may have in flight (being read, waiting or stored).
    uploads_per_probe: int = 2
    #: Upload bodies in flight in all (each may be ``max_body`` bytes); past it 503.
    bodies_in_flight: int = 16
    #: Database connections kept open (the ingest's worker threads share them).
    pool_size: int = 8
    #: Exports streamed at once, each on its own connection of a pool of this size
    #: apart from the ingest's (an export never takes an upload's connection); past it 503.
    export_slots: int = 2
    #: Per caller address, public exports (the operator's are not limited).
    export_address_rate: float = 0.05
    export_address_burst: float = 3.0
    #: The operator's token (collectors.access): it may export real probe ids and sees
    #: them in the read API. Created, mode 0600, when absent. "": no operator over HTTP.
    operator_token_file: str = ""
    #: Seconds an export may wait for its reader to take the next chunk before it is
    #: cut short and its connection given back (a reader that stops reading).
    export_stall_timeout: float = 30.0
    #: Seconds a connection may take to send a request's headers, and a request its
    #: body; past them the connection is closed (collectors.server).
    header_timeout: float = 10.0
    body_timeout: float = 120.0
    #: Requests handled at once (idle and half-sent connections do not count); past it 503.
    max_active_requests: int = 128
    #: Connections one address may hold open (trusted proxies excepted).
    connections_per_address: int = 32
    #: Batches checked and stored at once; more wait their turn. A 16 MiB batch is some
    #: 200 MB of Python objects while it is checked: this bounds the memory.
    ingest_slots: int = 4
    #: The key that pseudonymises probe ids in exports on request (collectors.export).
    pseudonym_key_file: str = ""
    #: Seconds without a new measurement before a run is judged (collectors.analysis).
    settle_after: float = 900.0
    #: The control helper endpoint (POST /api/v1/control) when not None: it makes the
    #: collector measure targets, so it is off unless the operator turns it on.
    control: ControlSettings | None = None

    def replace(self, **changes: Any) -> CollectorSettings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str], **given: Any) -> CollectorSettings:
        """Settings from ``given`` (flags; None = not given), then ``env``, then defaults."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name == "control":
                continue
            value = given.get(field.name)
            if value is None:
                text = env.get(ENV_PREFIX + field.name.upper())
                if text is None or text == "":
                    continue
                value = _parse(field.name, text)
            values[field.name] = value
        if given.get("control") is not None:
            values["control"] = given["control"]
        if not values.get("db"):
            raise SettingsError(f"--db: a database URL is needed (or set {ENV_PREFIX}DB)")
        settings = cls(**values)
        settings.check()
        return settings

    def to_env(self) -> dict[str, str]:
        """The settings as ``VANTAGE_COLLECTOR_*`` variables (for worker processes, which
        rebuild them with :meth:`from_env`); the control helper is not carried."""
        out = {}
        for field in dataclasses.fields(self):
            if field.name == "control":
                continue
            value = getattr(self, field.name)
            if field.name == "trusted_proxies":
                value = ",".join(str(net) for net in value)
            out[ENV_PREFIX + field.name.upper()] = str(value)
        return out

    def check(self) -> None:
        """Raise :class:`SettingsError` naming the first value out of range."""
        if not 0 < self.port < 65536:
            raise SettingsError(f"port: not a port: {self.port}")
        for name in (
            "max_body", "max_items", "pool_size", "ingest_slots", "uploads_per_probe",
            "bodies_in_flight", "export_slots", "max_active_requests", "connections_per_address",
        ):  # fmt: skip
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in (
            "upload_rate", "upload_burst", "address_rate", "address_burst",
            "ingest_address_rate", "ingest_address_burst", "export_stall_timeout",
            "header_timeout", "body_timeout", "export_address_rate", "export_address_burst",
        ):  # fmt: skip
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.refusal_delay < 0:
            raise SettingsError(f"refusal_delay: must not be negative, got {self.refusal_delay}")
        if self.settle_after < 0:
            raise SettingsError(f"settle_after: must not be negative, got {self.settle_after}")


def parse_networks(name: str, text: str) -> tuple[IPNetwork, ...]:
    """Comma- or space-separated CIDRs (``10.0.0.0/8, ::1``)."""
    out = []
    for part in text.replace(",", " ").split():
        try:
            out.append(ipaddress.ip_network(part, strict=False))
        except ValueError as exc:
            raise SettingsError(f"{name}: not a network: {part!r}") from exc
    return tuple(out)


def _parse(name: str, text: str) -> Any:
    kind = {f.name: f.type for f in dataclasses.fields(CollectorSettings)}[name]
    key = ENV_PREFIX + name.upper()
    if name == "trusted_proxies":
        return parse_networks(key, text)
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError as exc:
        raise SettingsError(f"{key}: not a number: {text!r}") from exc
    return text
