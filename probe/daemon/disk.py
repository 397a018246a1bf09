"""The low-disk guard: stop measuring before the SD card fills.

A full card corrupts more than the measurement being written (the journal, other
programs' files), so before each run the daemon checks the free space of the data
directory's file system against ``retention.min_free_mb``; below it, the run is
skipped, logged, and ``vantage status`` shows "paused: low disk" until space is back.

The function that reads the free space is injected (:data:`DiskFree`), so a test can
simulate a full disk without filling one:

>>> check_disk(Path("/var/lib/vantage"), 256, disk_free=lambda path: 10 * MB).ok
False
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MB = 1024 * 1024

#: Free bytes on the file system holding a path.
DiskFree = Callable[[Path], int]


def disk_free(path: Path) -> int:
    """Free bytes for this user on the file system of ``path`` (its nearest existing
    parent, when it does not exist yet)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


@dataclass(frozen=True)
class DiskCheck:
    free: int  # bytes
    minimum: int  # bytes

    @property
    def ok(self) -> bool:
        return self.free >= self.minimum

    def describe(self) -> str:
        return (
            f"{self.free / MB:.0f} MB free on the data disk, below retention.min_free_mb = "
            f"{self.minimum // MB}"
        )


def check_disk(path: Path, min_free_mb: int, disk_free: DiskFree = disk_free) -> DiskCheck:
    return DiskCheck(free=int(disk_free(path)), minimum=min_free_mb * MB)
