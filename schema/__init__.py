"""Vantage's measurement model, wire format and SQL tables. Pure data: no I/O."""

from schema.model import (
    FAILURES,
    DNSAnswer,
    DNSQuery,
    Expectations,
    HTTPTransaction,
    Measurement,
    Service,
    Source,
    Target,
    TCPConnect,
    TLSHandshake,
    VantagePoint,
    is_failure_string,
)
from schema.wire import DATA_FORMAT_VERSION, WireError, from_wire, to_wire

__all__ = [
    "DATA_FORMAT_VERSION",
    "FAILURES",
    "DNSAnswer",
    "DNSQuery",
    "Expectations",
    "HTTPTransaction",
    "Measurement",
    "Service",
    "Source",
    "TCPConnect",
    "TLSHandshake",
    "Target",
    "VantagePoint",
    "WireError",
    "from_wire",
    "is_failure_string",
    "to_wire",
]
