"""schema/DATA_DICTIONARY.md documents every column and field, and its worked examples run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from probe.cli import main
from probe.export.flat import NAMES
from schema import wire
from tests.export.conftest import lines

DICTIONARY = Path(__file__).resolve().parents[2] / "schema" / "DATA_DICTIONARY.md"
TEXT = DICTIONARY.read_text(encoding="utf-8")


def _documented(name: str) -> bool:
    """``name`` appears as a field: in backticks, alone or as the last part of a path."""
    return re.search(r"`(?:[\w\[\]<>.]*\.)?" + re.escape(name) + r"(?:\[\])?`", TEXT) is not None


def test_every_flat_column_has_a_row() -> None:
    for name in NAMES:
        assert re.search(rf"^\| `{name}` \|", TEXT, re.M), name


def _schema_names(node: object, out: set[str]) -> set[str]:
    if isinstance(node, dict):
        for key, value in (node.get("properties") or {}).items():
            out.add(key)
            _schema_names(value, out)
        for key in ("items", "anyOf", "oneOf", "$defs"):
            sub = node.get(key)
            if isinstance(sub, list):
                for s in sub:
                    _schema_names(s, out)
            elif isinstance(sub, dict):
                if key == "$defs":
                    for s in sub.values():
                        _schema_names(s, out)
                else:
                    _schema_names(sub, out)
    return out


def test_every_wire_field_of_the_json_schema_is_described() -> None:
    missing = [n for n in sorted(_schema_names(wire.json_schema(), set())) if not _documented(n)]
    assert missing == []


FREE_FORM = {"annotations", "evidence", "headers"}


def _keys(value: object, out: set[str]) -> set[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            out.add(k)
            if k not in FREE_FORM:
                _keys(v, out)
    elif isinstance(value, list):
        for v in value:
            _keys(v, out)
    return out


def test_every_ooni_key_is_described(engine) -> None:
    from tests.export.conftest import export_bytes

    found: set[str] = set()
    for line in lines(export_bytes(engine, "ooni")):
        _keys(json.loads(line), found)
    found = {re.sub(r"^facebook_(?!dns_blocking|tcp_blocking)\w+?_(dns_consistent|reachable)$",
                    r"facebook_<ep>_\1", k) for k in found}  # fmt: skip
    missing = sorted(k for k in found if not _documented(k))
    assert missing == []


def _example(name: str) -> str:
    block = re.search(rf"<!-- example: {name}.*?-->\s*```python\n(.*?)```", TEXT, re.S)
    assert block, f"no {name} example"
    return block.group(1)


@pytest.fixture
def exports(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for args in (["--format", "parquet", "--out", "vantage.parquet"],
                 ["--format", "csv", "--out", "vantage.csv"],
                 ["--format", "jsonl", "--out", "vantage.jsonl"],
                 ["--format", "ooni", "--out", "vantage-ooni.jsonl"],
                 ["--format", "parquet", "--partition-by", "date,cc", "--out", "dataset"]):  # fmt: skip
        assert main(["export", "--db", db_url, *args]) == 0
    return tmp_path


def test_the_duckdb_example_runs(exports: Path, stored) -> None:
    scope: dict[str, object] = {}
    exec(compile(_example("duckdb"), "DATA_DICTIONARY.md (duckdb)", "exec"), scope)
    blocked = {(cc, svc): (n, b) for cc, svc, n, b in scope["blocked"]}  # type: ignore[attr-defined]
    for (cc, svc), (n, b) in blocked.items():
        ms = [m for m in stored if m.vantage.cc == cc and m.target.service == svc]
        assert n == len(ms)
        assert b == sum(1 for m in ms if m.verdict and isinstance(m.verdict.blocking, str))
    assert sum(n for _, n in scope["failures"]) == sum(1 for m in stored if m.failure())  # type: ignore[attr-defined]
    assert len(scope["queries"]) == len(stored)  # type: ignore[arg-type]
    runs = {m.run_id for m in stored if m.target.service == "whatsapp"}
    assert {str(r) for r, _ in scope["whatsapp"]} == runs  # type: ignore[attr-defined]
    assert sum(n for *_, n in scope["per_day"]) == len(stored)  # type: ignore[attr-defined]


def test_the_pandas_example_runs(exports: Path, stored) -> None:
    pytest.importorskip("pandas")
    scope: dict[str, object] = {}
    exec(compile(_example("pandas"), "DATA_DICTIONARY.md (pandas)", "exec"), scope)
    assert len(scope["df"]) == len(scope["flat"]) == len(scope["wire"]) == len(stored)  # type: ignore[arg-type]
    assert len(scope["dataset"]) == len(stored)  # type: ignore[arg-type]
