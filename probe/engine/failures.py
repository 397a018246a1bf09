"""The one place where exceptions and errno values become failure strings.

Every step catches what the network throws at it and asks :func:`classify` for a
string from the closed vocabulary in REFERENCE.md section 3 (``schema.FAILURES``).
Anything not recognised becomes ``unknown_failure: <ExceptionType: message>`` so
that nothing is silently mislabelled; a new case is mapped here, nowhere else.

>>> classify(ConnectionRefusedError(111, "Connection refused"))
'connection_refused'
"""

from __future__ import annotations

import asyncio
import errno
import ssl

import dns.exception
import dns.message
import dns.rcode
import httpx

from schema.model import UNKNOWN_FAILURE_PREFIX

# OpenSSL X509_V_ERR_* codes that mean "I do not trust who signed this".
_UNKNOWN_AUTHORITY = {
    2,  # unable to get issuer certificate
    18,  # self-signed certificate
    19,  # self-signed certificate in certificate chain
    20,  # unable to get local issuer certificate
    21,  # unable to verify the first certificate
}
_HOSTNAME_MISMATCH = {62, 64}  # hostname mismatch, IP address mismatch

_ERRNO = {
    errno.ECONNREFUSED: "connection_refused",
    errno.ECONNRESET: "connection_reset",
    errno.EPIPE: "connection_reset",
    errno.ECONNABORTED: "connection_reset",
    errno.ETIMEDOUT: "generic_timeout_error",
    errno.EHOSTUNREACH: "host_unreachable",
    errno.EHOSTDOWN: "host_unreachable",
    errno.ENETUNREACH: "network_unreachable",
    errno.ENETDOWN: "network_unreachable",
}


class SetupError(ValueError):
    """A step could not be set up from what it was given (a CA file that holds no
    certificate, a name DNS cannot carry, a server name TLS refuses): the probe's
    input, not the network. Classified as ``unknown_failure: <message>``."""


_RCODES: dict[int, str] = {
    dns.rcode.NXDOMAIN: "dns_nxdomain_error",
    dns.rcode.SERVFAIL: "dns_servfail_error",
    dns.rcode.REFUSED: "dns_refused_error",
}


def rcode_failure(rcode: int) -> str | None:
    """The failure string for a DNS response code; ``None`` for NOERROR."""
    if rcode == dns.rcode.NOERROR:
        return None
    return _RCODES.get(rcode, "dns_server_misbehaving")


def _chain(exc: BaseException, *, implicit: bool = False) -> list[BaseException]:
    """The exception and what it was raised from (``raise ... from``), outermost first.

    With ``implicit``, also the exceptions being handled when each was raised
    (``__context__``): a weaker link, used only when the explicit chain says nothing.
    """
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or (cur.__context__ if implicit else None)
    return seen


def _classify_one(exc: BaseException) -> str | None:
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = getattr(exc, "verify_code", None)
        if code in _HOSTNAME_MISMATCH:
            return "ssl_invalid_hostname"
        if code in _UNKNOWN_AUTHORITY:
            return "ssl_unknown_authority"
        return "ssl_invalid_certificate"
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return "eof_error"
    if isinstance(exc, ssl.SSLError):
        return "ssl_failed_handshake"
    if isinstance(exc, TimeoutError | dns.exception.Timeout | httpx.TimeoutException):
        return "generic_timeout_error"
    if isinstance(exc, ConnectionRefusedError):
        return "connection_refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return "connection_reset"
    if isinstance(exc, EOFError | asyncio.IncompleteReadError):
        return "eof_error"
    if isinstance(exc, OSError) and exc.errno in _ERRNO:
        return _ERRNO[exc.errno]
    if isinstance(
        exc, dns.exception.FormError | dns.message.ShortHeader | dns.message.TrailingJunk
    ):
        return "dns_server_misbehaving"
    if isinstance(exc, dns.exception.DNSException):
        return "dns_server_misbehaving"
    if isinstance(exc, httpx.RemoteProtocolError):
        text = str(exc).lower()
        if "disconnected" in text or "closed" in text:
            return "eof_error"
        return "http_request_failed"
    if isinstance(exc, httpx.TooManyRedirects | httpx.DecodingError):
        return "http_request_failed"
    return None


def classify(exc: BaseException) -> str:
    """Map an exception (following ``raise ... from``) to a failure string."""
    if isinstance(exc, asyncio.CancelledError):
        return "interrupted"
    setup = next((e for e in _chain(exc) if isinstance(e, SetupError)), None)
    if setup is not None:  # not the network: never mapped to a network failure
        return UNKNOWN_FAILURE_PREFIX + (str(setup) or type(setup).__name__)
    # The innermost cause is the most specific (httpx wraps OSError and ssl errors);
    # a timeout is raised from the CancelledError that implemented it, which is skipped.
    for implicit in (False, True):
        chain = [
            e for e in _chain(exc, implicit=implicit) if not isinstance(e, asyncio.CancelledError)
        ]
        for item in reversed(chain):
            failure = _classify_one(item)
            if failure is not None:
                return failure
    detail = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
    return UNKNOWN_FAILURE_PREFIX + detail


def http_operation(exc: BaseException, default: str = "http_round_trip") -> str:
    """The failed operation of an httpx exception: connect, tls_handshake, read, write."""
    chain = _chain(exc, implicit=True)
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        if any(isinstance(e, ssl.SSLError) for e in chain):
            return "tls_handshake"
        return "connect"
    if isinstance(exc, httpx.ReadError | httpx.ReadTimeout):
        return "read"
    if isinstance(exc, httpx.WriteError | httpx.WriteTimeout):
        return "write"
    return default
