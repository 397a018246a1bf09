"""Who may run what: when the volunteer's own account cannot read the probe's files,
say which group opens them (deploy/README.md, "Who may run what").

The installer makes the configuration ``root:vantage`` 0640 and the data directory
``vantage:vantage`` 0750 (files in it 0640, the daemon's umask): members of the
``vantage`` group may read status and export; only root and the service measure and
change things. A command refused access names the group instead of a bare
"Permission denied".

For example, as the user ``pi`` outside the group, ``access_hint(Path(
"/etc/vantage/vantage.toml"))`` says: readable by root and the group vantage: run it
with sudo, or join the group (sudo usermod -aG vantage pi, then log in again).
"""

from __future__ import annotations

import getpass
import grp
import os
from pathlib import Path


def _blocking(path: Path) -> Path | None:
    """The first of ``path`` and its parents this process cannot get through."""
    chain = [*reversed(path.parents), path]
    for i, p in enumerate(chain):
        last = i == len(chain) - 1
        try:
            if not p.exists():
                return None
        except PermissionError:
            return p
        if not os.access(p, os.R_OK if last else os.X_OK):
            return p
    return None


def access_hint(path: Path) -> str | None:
    """How to get access to ``path``, or None when access is not what is missing."""
    where = _blocking(path)
    if where is None:
        return None
    try:
        st = where.stat()
        group = grp.getgrgid(st.st_gid).gr_name
    except (OSError, KeyError):
        return f"{where} cannot be read by this user: run it with sudo"
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = "$USER"
    if group == "root":
        return f"{where} is root's only: run it with sudo"
    return (
        f"readable by root and the group {group}: run it with sudo, or join the group "
        f"(sudo usermod -aG {group} {user}, then log in again)"
    )


__all__ = ["access_hint"]
