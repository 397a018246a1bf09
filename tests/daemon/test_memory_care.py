"""What keeps the daemon small: heavy modules stay out of it (the figures themselves
come from ``tests/bench/bench_daemon_memory.py``)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from probe.store import Store
from tests.daemon.harness import ROOT

HEAVY = ("rich", "scapy", "alembic", "mako", "pygments", "probe.lab", "probe.output",
         "probe.doctor", "probe.export", "collectors")  # fmt: skip


def test_the_daemon_path_imports_nothing_heavy(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'v.db'}"
    Store.open(url).close()  # migrated: opening it again needs no alembic
    code = f"""
import sys
from probe.cli import _parser
_parser("daemon").parse_args(["daemon"])
from probe.daemon import commands, lifecycle, runs, schedule, retention, status
from probe.store import Store
Store.open({url!r}).close()
print(" ".join(m for m in {HEAVY!r} if m in sys.modules))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == []


def test_an_older_database_is_still_migrated(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    Store.open(f"sqlite:///{path}").close()
    db = sqlite3.connect(path)
    head = db.execute("SELECT version_num FROM alembic_version").fetchall()
    db.execute("DROP TABLE daemon_jobs")  # as it was before migrations 0006 and 0007
    db.execute("DROP INDEX ix_measurements_time_uid")
    db.execute("UPDATE alembic_version SET version_num = '0005'")
    db.commit()
    db.close()
    Store.open(f"sqlite:///{path}").close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT version_num FROM alembic_version").fetchall() == head
    assert db.execute("SELECT count(*) FROM daemon_jobs").fetchone() == (0,)
    assert db.execute(
        "SELECT count(*) FROM sqlite_master WHERE name = 'ix_measurements_time_uid'"
    ).fetchone() == (1,)
