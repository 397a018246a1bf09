"""Pseudonymous probe ids for public datasets: ``--pseudonymize [--key-file F]``.

A probe id links every measurement of one volunteer; published as is, it lets anyone
follow that volunteer across networks and time. The pseudonym is an HMAC-SHA256 of the
probe id under a secret key, cut to 32 hex digits: the same probe gets the same
pseudonym in every export made with the same key (datasets released months apart still
line up), and without the key nobody can tell which probe it is (a plain hash of the
id could be reversed by hashing every probe id one knows).

The key file holds 32 random bytes, hex-encoded; it is created, mode 0600, the first
time it is needed. Keep it private, and keep it: a new key gives new pseudonyms.

>>> pseudonym = Pseudonymizer.from_key_file(Path("pseudonym.key"))
>>> pseudonym("00000000-0000-4000-8000-000000000001")
'3f5c...'
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path


class KeyFileError(OSError):
    """The key file cannot be created or read, or holds no usable key."""


KEY_BYTES = 32
MIN_KEY_BYTES = 16


class Pseudonymizer:
    """Maps a probe id to its keyed pseudonym."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"a pseudonym key needs at least {MIN_KEY_BYTES} bytes")
        self._key = key
        self.created = False  # set when from_key_file made a new key
        self.loose = False  # set when the key file is readable by others

    def __call__(self, probe_id: str) -> str:
        return hmac.new(self._key, probe_id.encode("utf-8"), hashlib.sha256).hexdigest()[:32]

    @classmethod
    def from_key_file(cls, path: Path) -> Pseudonymizer:
        """The key in ``path``, created (0600, 32 random bytes) if the file is absent."""
        key, created, loose = key_file(path)
        p = cls(key)
        p.created = created
        p.loose = loose
        return p


def key_file(path: Path) -> tuple[bytes, bool, bool]:
    """The secret key kept in ``path`` (hex), created (0600, 32 random bytes) if the
    file is absent: (key, whether it was created now, whether others may read it)."""
    created = False
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it meanwhile: use that one
        except OSError as exc:
            raise KeyFileError(f"cannot create key file {path}: {exc.strerror}") from exc
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(KEY_BYTES) + "\n")
            created = True
    try:
        text = path.read_text("ascii").strip()
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc}") from exc
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise KeyFileError(
            f"key file {path}: not a hex-encoded key (delete it to make a new one; "
            "earlier pseudonyms will then not match)"
        ) from None
    if len(key) < MIN_KEY_BYTES:
        raise KeyFileError(f"key file {path}: key shorter than {MIN_KEY_BYTES} bytes")
    return key, created, bool(mode & (stat.S_IRWXG | stat.S_IRWXO))
