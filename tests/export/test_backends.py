"""The same measurements exported from the probe's SQLite and from PostgreSQL (the
collector's database) give the same output, with the same code."""

from __future__ import annotations

import json
from typing import Any

import pytest

from probe.export import Export, parse_filters
from probe.export.commands import open_engine
from tests.export import dataset
from tests.export.conftest import export_bytes, lines

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_engine(pg_url: str, runs):
    dataset.store(pg_url, runs)
    engine = open_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.mark.parametrize("fmt", ["csv", "parquet", "ooni"])
def test_byte_identical(engine, pg_engine, fmt: str) -> None:
    sqlite_out = export_bytes(engine, fmt)
    assert export_bytes(pg_engine, fmt) == sqlite_out
    filters: dict[str, Any] = {"cc": ["IR", "TR"], "since": "2026-03-01T02:00:00Z",
                               "blocking": ["true", "false"]}  # fmt: skip
    filtered = export_bytes(pg_engine, fmt, chunk_size=17, **filters)
    assert filtered == export_bytes(engine, fmt, chunk_size=17, **filters)
    assert len(filtered) < len(sqlite_out)


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def _free_form_sorted(line: bytes) -> bytes:
    """The line with only its free-form mappings' keys sorted (PostgreSQL's JSONB does
    not keep their order); every other object keeps the order it was written in."""
    doc = json.loads(line)
    doc["annotations"] = _sorted(doc["annotations"])
    analysis = doc["test_keys"]["analysis"]
    if analysis is not None:
        for reason in analysis["reasons"]:
            reason["evidence"] = _sorted(reason["evidence"])
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def test_jsonl_same_documents_in_wire_key_order(engine, pg_engine, stored) -> None:
    mine, theirs = lines(export_bytes(engine, "jsonl")), lines(export_bytes(pg_engine, "jsonl"))
    assert len(mine) == len(theirs) == len(stored)
    for a, b in zip(mine, theirs, strict=True):
        assert json.loads(a) == json.loads(b)
        # every object of the wire format has its keys back in wire order
        assert _free_form_sorted(a) == _free_form_sorted(b)
    # where the free-form mappings' order agrees, the lines are byte-identical
    same = [a == b for a, b in zip(mine, theirs, strict=True)]
    assert sum(same) > len(same) // 2


def test_pseudonyms_agree_across_backends(engine, pg_engine) -> None:
    from probe.export.pseudonym import Pseudonymizer

    p = Pseudonymizer(b"k" * 32)
    a = b"".join(Export(engine, "csv", parse_filters(), probe_id=p).stream())
    b = b"".join(Export(pg_engine, "csv", parse_filters(), probe_id=p).stream())
    assert a == b
