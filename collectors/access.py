"""Who is asking: the operator (holder of the operator token) or the public.

The collector serves two audiences. The *operator* runs it and may see everything,
including real probe ids; everyone else is the *public*, who sees the fleet's data
with each probe named only by its pseudonym (``probe.export.pseudonym``, under the
collector's ``pseudonym_key_file``), or not named at all when the collector has no
pseudonym key. collectors/API.md says which endpoint needs what.

The operator token is the content of ``operator_token_file`` (created, mode 0600, with
256 random bits the first time it is needed); a request is the operator's when it
carries ``Authorization: Bearer <that token>``. It is compared by its SHA-256 with
:func:`hmac.compare_digest`. No file configured: nobody is the operator over HTTP
(the operator still has ``vantage collector export`` on the database).

>>> if is_operator(request): ...
>>> name = public_probe_id(request)  # maps a real probe id to what the caller may see
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from probe.export.pseudonym import KeyFileError, Pseudonymizer

OPERATOR_PREFIX = "vop_"  # a Vantage operator token


class AccessError(OSError):
    """The operator token or the pseudonym key cannot be read."""


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def operator_token(path: Path) -> str:
    """The operator token kept in ``path``, created (0600) when the file is absent."""
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        except OSError as exc:
            raise AccessError(f"cannot create {path}: {exc.strerror}") from exc
        else:
            with os.fdopen(fd, "w") as f:
                f.write(OPERATOR_PREFIX + secrets.token_urlsafe(32) + "\n")
    try:
        token = path.read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AccessError(f"cannot read {path}: {exc}") from exc
    if len(token) < 16:
        raise AccessError(f"{path}: the operator token is shorter than 16 characters")
    return token


def _state_cache(request: Any, name: str, make: Callable[[], Any]) -> Any:
    state = request.app.state
    cache = getattr(state, "access_cache", None)
    if cache is None:
        cache = {}
        state.access_cache = cache
    if name not in cache:
        cache[name] = make()
    return cache[name]


def is_operator(request: Any) -> bool:
    """Whether ``request`` carries the operator token."""
    settings = getattr(request.app.state, "settings", None)
    path = getattr(settings, "operator_token_file", "") or ""
    header = request.headers.get("authorization") or ""
    scheme, _, given = header.partition(" ")
    if not path or scheme.lower() != "bearer" or not given.strip():
        return False
    wanted = _state_cache(request, "operator", lambda: _digest(operator_token(Path(path))))
    return hmac.compare_digest(_digest(given.strip()), wanted)


def pseudonymizer(request: Any) -> Pseudonymizer | None:
    """The collector's pseudonymizer, or None without a ``pseudonym_key_file``."""
    settings = getattr(request.app.state, "settings", None)
    path = getattr(settings, "pseudonym_key_file", "") or ""
    if not path:
        return None
    try:
        return _state_cache(request, "pseudonym", lambda: Pseudonymizer.from_key_file(Path(path)))  # type: ignore[no-any-return]
    except KeyFileError as exc:
        raise AccessError(str(exc)) from exc


def public_probe_id(request: Any) -> Callable[[str], str | None]:
    """How a probe id is shown to this caller: as it is to the operator, its pseudonym
    to the public (None when there is no pseudonym key: not shown at all)."""
    if is_operator(request):
        return lambda probe_id: probe_id
    p = pseudonymizer(request)
    if p is None:
        return lambda probe_id: None
    return p


#: What a public ``probe`` filter becomes when it names no probe: matches nothing.
NO_PROBE = "-"


def probe_filter(request: Any, engine: Any, given: str) -> str:
    """The real probe id a caller's ``probe`` filter means: as given for the operator;
    for the public, the probe whose pseudonym it is (:data:`NO_PROBE` when none is;
    a real id given by the public is not looked up, so it cannot be used to confirm a
    guess). :class:`ValueError` when the public cannot name probes here (no key)."""
    import sqlalchemy as sa

    from schema import tables

    if is_operator(request):
        return given
    p = pseudonymizer(request)
    if p is None:
        raise ValueError("probes are not named to the public on this collector")
    vp = tables.vantage_points
    with engine.connect() as conn:
        for probe_id in conn.execute(sa.select(vp.c.probe_id).distinct()).scalars():
            if hmac.compare_digest(p(probe_id), given):
                return str(probe_id)
    return NO_PROBE


__all__ = [
    "NO_PROBE",
    "probe_filter",
    "AccessError",
    "is_operator",
    "operator_token",
    "pseudonymizer",
    "public_probe_id",
]
