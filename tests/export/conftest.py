"""Shared fixtures: a few catalog runs stored through the probe's store, and helpers that
export them in-process (``probe.export.Export``) or through ``vantage export``."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from probe.export import Export, parse_filters
from probe.export.commands import open_engine
from probe.privacy import Scrub
from schema.model import Measurement
from tests.export import dataset

Runs = list[tuple[str, object, dt.datetime, list[Measurement]]]


@pytest.fixture(scope="session")
def runs() -> Runs:
    """Five catalog runs (one cut short) from the dataset's vantage points."""
    return dataset.measurements(250, seed=3)  # type: ignore[return-value]


@pytest.fixture(scope="session")
def stored(runs: Runs) -> list[Measurement]:
    """Every measurement, in export order."""
    return dataset.all_measurements(runs)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def db_path(runs: Runs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("export") / "vantage.db"
    dataset.store(f"sqlite:///{path}", runs)  # type: ignore[arg-type]
    return path


@pytest.fixture(scope="session")
def db_url(db_path: Path) -> str:
    return f"sqlite:///{db_path}"


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    e = open_engine(db_url)
    yield e
    e.dispose()


def export_bytes(
    engine: sa.Engine,
    fmt: str,
    chunk_size: int = 1000,
    scrub: Scrub | None = None,
    **filters: object,
) -> bytes:
    """The whole export as bytes, in-process (``scrub``: as the probe's command does)."""
    ex = Export(engine, fmt, parse_filters(**filters), chunk_size=chunk_size,  # type: ignore[arg-type]
                scrub=scrub)  # fmt: skip
    return b"".join(ex.stream())


def lines(data: bytes) -> list[bytes]:
    """JSON lines (U+2028 inside a line is not a line break)."""
    assert data.endswith(b"\n")
    return data.split(b"\n")[:-1]
