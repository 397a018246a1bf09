"""Enrollment: the probe's identity at a collector, kept in ``<data_dir>/collector.json``.

A volunteer enrolls once with a token the collector's operator gave them; the
collector answers with a credential of this probe's own, shown only once. The file
holds the collector's URL, the probe id, that credential and when it was issued. It
MUST be readable by the probe's user only (mode 0600: the credential lets anyone
upload as this probe) and is replaced atomically (a power cut leaves the old or the
new file, never half of one).

>>> e = enroll(cfg, "https://collector.example.org", token="...")
>>> enrollment(cfg) == e
True
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import ssl
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from probe.config import Config, ConfigError
from probe.vantage import probe_id

ENROLLMENT_FILE = "collector.json"
ENROLL_PATH = "/api/v1/enroll"
MAX_CREDENTIAL = 1024  # characters; it travels in a header on every upload
MAX_ANSWER = 64 * 1024  # bytes of the collector's enrollment answer read at most


class EnrollmentError(ConfigError):
    """``collector.json`` is damaged, or enrolling failed.

    A :class:`~probe.config.ConfigError` so that the command line reports it like a
    configuration problem (exit 78) when nothing more specific applies.
    ``reason``: ``"file"`` (the stored file), ``"refused"`` (401: the token is unknown,
    expired, revoked or used up), ``"conflict"`` (409: this probe is enrolled there
    already), ``"unreachable"`` (no answer), ``"protocol"`` (an answer that makes no
    sense) or ``"exists"`` (enrolled already, locally).
    """

    def __init__(self, message: str, reason: str = "file") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Enrollment:
    """Where this probe uploads, and the credential it uploads with."""

    url: str  # the collector's base URL, without a trailing slash
    probe_id: str
    credential: str = field(repr=False)  # never in logs or tracebacks
    enrolled_at: dt.datetime

    def to_json(self) -> dict[str, str]:
        return {
            "url": self.url,
            "probe_id": self.probe_id,
            "credential": self.credential,
            "enrolled_at": self.enrolled_at.isoformat(),
        }


def enrollment_path(cfg: Config) -> Path:
    return cfg.data_dir() / ENROLLMENT_FILE


def enrollment(cfg: Config) -> Enrollment | None:
    """This probe's enrollment, or None when it has not enrolled.

    ``collector.url``, when set, overrides the URL stored at enrollment (the collector
    moved). Raises :class:`EnrollmentError` naming the file when it is damaged.
    """
    stored = read_enrollment(enrollment_path(cfg))
    if stored is None:
        return None
    if cfg.collector.url:
        return Enrollment(
            url=normalise_url(cfg.collector.url),
            probe_id=stored.probe_id,
            credential=stored.credential,
            enrolled_at=stored.enrolled_at,
        )
    return stored


def read_enrollment(path: Path) -> Enrollment | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise EnrollmentError(f"{path}: cannot read the enrollment: {exc.strerror}") from exc
    if len(raw) > MAX_ANSWER:
        raise EnrollmentError(f"{path}: not an enrollment (larger than {MAX_ANSWER} bytes)")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EnrollmentError(
            f"{path}: damaged enrollment ({exc}); enroll again with `vantage enroll --force`"
        ) from exc
    try:
        return _from_json(doc)
    except ValueError as exc:
        raise EnrollmentError(
            f"{path}: damaged enrollment ({exc}); enroll again with `vantage enroll --force`"
        ) from exc


def _from_json(doc: Any) -> Enrollment:
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    for key in ("url", "probe_id", "credential", "enrolled_at"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise ValueError(f"{key}: missing or not a string")
    enrolled_at = dt.datetime.fromisoformat(doc["enrolled_at"])
    if enrolled_at.tzinfo is None:
        enrolled_at = enrolled_at.replace(tzinfo=dt.UTC)
    return Enrollment(
        url=normalise_url(doc["url"]),
        probe_id=str(uuid.UUID(doc["probe_id"])),
        credential=_credential(doc["credential"]),
        enrolled_at=enrolled_at,
    )


def _credential(value: Any) -> str:
    """A credential that can travel in an HTTP header, or ValueError."""
    if not isinstance(value, str) or not value:
        raise ValueError("credential: missing or not a string")
    if len(value) > MAX_CREDENTIAL:
        raise ValueError(f"credential: longer than {MAX_CREDENTIAL} characters")
    if not all(0x21 <= ord(c) <= 0x7E for c in value):
        raise ValueError("credential: not printable ASCII")
    return value


def normalise_url(url: str) -> str:
    """The collector's base URL, checked: ``https://host[:port][/prefix]``, no trailing
    slash. ValueError when it is not an http(s) URL."""
    try:
        parsed = httpx.URL(url.strip())
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError(f"not a URL: {url!r}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"not an http:// or https:// URL: {url!r}")
    if parsed.query or parsed.fragment:
        raise ValueError(f"a collector URL has no query or fragment: {url!r}")
    return str(parsed).rstrip("/")


def write_enrollment(path: Path, e: Enrollment) -> None:
    """Replace ``path`` atomically with ``e``, readable by this user only.

    The new file is written beside the old one with mode 0600 from its creation (the
    credential is never readable by others, not even briefly), flushed to disk, then
    renamed over the old one; the directory is synced so the rename survives a power cut.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    data = (json.dumps(e.to_json(), indent=2) + "\n").encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # not every file system can sync a directory
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def ssl_context(cfg: Config) -> ssl.SSLContext:
    """The system's CAs, and ``collector.ca_bundle`` when set."""
    ctx = ssl.create_default_context()
    if cfg.collector.ca_bundle:
        try:
            ctx.load_verify_locations(cafile=cfg.collector.ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"collector.ca_bundle: cannot load {cfg.collector.ca_bundle}: {exc}"
            ) from exc
    return ctx


def enroll(cfg: Config, url: str, token: str, *, force: bool = False) -> Enrollment:
    """Register this probe at the collector at ``url`` with an operator's ``token`` and
    store the credential it answers with. Raises :class:`EnrollmentError` (its
    ``reason`` says why) and leaves any earlier enrollment as it was on failure.

    ``force``: replace an existing enrollment (another collector, or a credential the
    operator revoked); without it an existing enrollment is an error.
    """
    try:
        base = normalise_url(url)
    except ValueError as exc:
        raise EnrollmentError(f"collector URL: {exc}", "usage") from exc
    path = enrollment_path(cfg)
    if not force:
        try:
            existing = read_enrollment(path)
        except EnrollmentError:
            existing = None  # damaged: replacing it is what the volunteer wants
        if existing is not None:
            raise EnrollmentError(
                f"already enrolled at {existing.url} as probe {existing.probe_id} "
                f"(since {existing.enrolled_at:%Y-%m-%d}); use --force to replace it",
                "exists",
            )
    pid = probe_id(cfg.data_dir())
    endpoint = base + ENROLL_PATH
    try:
        with httpx.Client(
            timeout=cfg.collector.timeout, verify=ssl_context(cfg), follow_redirects=False
        ) as client:
            with client.stream("POST", endpoint, json={"token": token, "probe_id": pid}) as r:
                body = _read_limited(r)
                status = r.status_code
    except httpx.HTTPError as exc:
        raise EnrollmentError(
            f"cannot reach the collector at {endpoint}: {describe_error(exc)}", "unreachable"
        ) from exc
    if status == 401:
        raise EnrollmentError(
            f"the collector at {base} refused the token (unknown, expired, revoked or "
            f"used up): ask its operator for a new one{_said(body)}",
            "refused",
        )
    if status == 409:
        raise EnrollmentError(
            f"probe {pid} is already enrolled at {base}, or was revoked there: ask the "
            "operator to revoke it (`vantage collector probes revoke`) and to restore it "
            "(`vantage collector probes restore`), then enroll again"
            f"{_said(body)}",
            "conflict",
        )
    if status != 201:
        raise EnrollmentError(
            f"the collector at {endpoint} answered HTTP {status}{_said(body)}", "protocol"
        )
    try:
        doc = json.loads(body) if body is not None else None
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        if doc.get("probe_id") != pid:
            raise ValueError(f"it names probe {doc.get('probe_id')!r}, this is {pid}")
        credential = _credential(doc.get("credential"))
    except ValueError as exc:
        raise EnrollmentError(
            f"the collector at {endpoint} gave a malformed enrollment answer: {exc}", "protocol"
        ) from exc
    e = Enrollment(url=base, probe_id=pid, credential=credential, enrolled_at=_now())
    write_enrollment(path, e)
    return e


def _read_limited(r: httpx.Response) -> bytes | None:
    """The answer's body, or None when it is larger than :data:`MAX_ANSWER`."""
    out = bytearray()
    for chunk in r.iter_bytes():
        out += chunk
        if len(out) > MAX_ANSWER:
            return None
    return bytes(out)


def _said(body: bytes | None) -> str:
    """``: <the collector's error text>`` from a ``{"error": ...}`` body, if any."""
    if not body:
        return ""
    try:
        doc = json.loads(body)
    except ValueError:
        return ""
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, str) and error:
        return f" (it said: {printable(error, 300)})"
    return ""


def printable(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters with control characters escaped: what a
    remote server says goes into one log line, and must stay one line."""
    clean = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return clean[:limit] + ("..." if len(clean) > limit or len(text) > limit else "")


def describe_error(exc: BaseException) -> str:
    """A short, one-line reason for a network error (``ConnectError: [Errno 111] ...``)."""
    text = str(exc) or type(exc).__name__
    return printable(f"{type(exc).__name__}: {text}" if str(exc) else text, 200)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)
