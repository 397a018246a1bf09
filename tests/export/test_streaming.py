"""Constant memory: exporting a generated database of 100,000 measurements, each format
in a subprocess, stays under a memory ceiling and needs no more memory than exporting a
twentieth of it."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.export import dataset

ROOT = Path(__file__).resolve().parents[2]
ROWS = 100_000
CEILING_MB = 250
#: what a 20x larger export may add to the peak: buffers that do not depend on the size
GROWTH_MB = 40

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dataset.generate_database(tmp_path_factory.mktemp("stream") / "big.db", ROWS)


def _high_water_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM, reset by exec: unlike
    ru_maxrss, it does not count the parent's memory the child was forked with)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _export(db: Path, out: Path, fmt: str, *extra: str) -> float:
    """Run `vantage export` in a child process; its peak resident memory in MB."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "probe", "export", "--format", fmt, "--db", f"sqlite:///{db}",
         "--out", str(out), *extra],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE,
    )  # fmt: skip
    peak = 0.0
    while proc.poll() is None:
        try:
            peak = max(peak, _high_water_mb(proc.pid))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.01)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    return peak


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "ooni"])
def test_memory_does_not_grow_with_the_export(big: Path, tmp_path: Path, fmt: str) -> None:
    until = (dataset.T0.date() + dt.timedelta(days=5)).isoformat()  # six days: ~5,000 rows
    small = _export(big, tmp_path / f"small.{fmt}", fmt, "--until", until)
    full = _export(big, tmp_path / f"full.{fmt}", fmt)
    assert full < CEILING_MB, f"{fmt}: peak {full:.0f} MB"
    assert full - small < GROWTH_MB, f"{fmt}: {small:.0f} MB for a twentieth, {full:.0f} MB for all"
    out = tmp_path / f"full.{fmt}"
    if fmt == "parquet":
        meta = pq.ParquetFile(out).metadata
        assert meta.num_rows == ROWS and meta.num_row_groups == ROWS // 10_000
    else:
        with out.open("rb") as f:
            count = sum(1 for _ in f)
        assert count == ROWS + (1 if fmt == "csv" else 0)
        if fmt == "jsonl":
            with out.open("rb") as f:
                first = json.loads(f.readline())
            assert first["measurement_start_time"].startswith(str(dataset.T0.date()))
