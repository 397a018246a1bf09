"""Parquet: typed columns, one row group per chunk, and Hive-partitioned datasets; read
back with pyarrow and compared with the CSV export (itself checked against the database)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from probe.export import Reader, parse_filters
from probe.export.flat import NAMES
from probe.export.parquet import ParquetEncoder, PartitionedWriter
from tests.export.conftest import export_bytes
from tests.export.test_csv import _cell


def _table(engine, **kw) -> pa.Table:
    return pq.read_table(io.BytesIO(export_bytes(engine, "parquet", **kw)))


def test_schema_keeps_types(engine) -> None:
    schema = _table(engine).schema
    assert schema.names == list(NAMES)
    assert schema.field("measurement_start_time").type == pa.timestamp("us", tz="UTC")
    assert schema.field("test_runtime").type == pa.float64()
    assert schema.field("probe_asn").type == pa.int64()
    assert schema.field("http_body_length").type == pa.int64()
    assert schema.field("tcp_connects").type == pa.int32()
    assert schema.field("http_status").type == pa.int32()
    assert schema.field("accessible").type == pa.bool_()
    assert schema.field("dns_addresses").type == pa.list_(pa.string())
    assert not schema.field("measurement_uid").nullable
    assert schema.field("accessible").nullable and schema.field("http_status").nullable


def test_values_match_the_csv_export_and_the_measurements(engine, stored) -> None:
    table = _table(engine)
    rows = list(csv.DictReader(io.StringIO(export_bytes(engine, "csv").decode(), newline="")))
    assert table.num_rows == len(rows) == len(stored)
    for prow, crow, m in zip(table.to_pylist(), rows, stored, strict=True):
        assert prow["measurement_start_time"] == m.start_time  # aware, UTC
        assert prow["measurement_start_time"].tzinfo is not None
        for name in NAMES:
            value = prow[name]
            if name == "measurement_start_time":
                continue
            if name == "test_runtime":
                assert math.isclose(value, float(crow[name]), rel_tol=0, abs_tol=0)
                continue
            assert _cell(value) == crow[name], (m.measurement_uid, name)


def test_row_groups_of_the_size_asked_for(engine, stored) -> None:
    encoder = ParquetEncoder(rows_per_group=40)
    data = encoder.begin()
    for chunk in Reader(engine, parse_filters(), chunk_size=20).chunks():
        data += encoder.encode(chunk)
        assert encoder._rows < 40  # written as soon as a group is full
    data += encoder.end()
    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [40] * (
        len(stored) // 40) + ([len(stored) % 40] if len(stored) % 40 else [])  # fmt: skip
    assert pq.read_table(io.BytesIO(data)).equals(_table(engine))


def test_filtered_parquet_has_only_the_matching_rows(engine, stored) -> None:
    table = _table(engine, cc=["TR"], blocking=["true"])
    expected = [m.measurement_uid for m in stored if m.vantage.cc == "TR" and m.verdict
                and isinstance(m.verdict.blocking, str)]  # fmt: skip
    assert table.column("measurement_uid").to_pylist() == expected


def test_partitioned_dataset_by_date_and_country(engine, stored, tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    reader = Reader(engine, parse_filters(), chunk_size=30)
    # small buffers: rows are flushed by size, by the budget and when the day changes
    writer = PartitionedWriter(out, ["date", "cc"], rows_per_group=20, budget=45)
    for chunk in reader.chunks():
        writer.write(chunk)
    writer.close()
    parts = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet"))
    expected_parts = sorted({f"date={m.start_time.date()}/probe_cc={m.vantage.cc}/part-0.parquet"
                             for m in stored})  # fmt: skip
    assert parts == expected_parts
    table = ds.dataset(out, format="parquet", partitioning="hive").to_table()
    assert table.num_rows == len(stored)
    by_uid = {r["measurement_uid"]: r for r in table.to_pylist()}
    for m in stored:
        row = by_uid[m.measurement_uid]
        assert row["probe_cc"] == m.vantage.cc
        assert str(row["date"]) == m.start_time.date().isoformat()
        assert row["measurement_start_time"] == m.start_time
    # inside a file the partition column is not repeated
    one = pq.read_table(next(out.rglob("*.parquet")))
    assert "probe_cc" not in one.schema.names and "date" not in one.schema.names


def test_partition_by_country_only(engine, stored, tmp_path: Path) -> None:
    out = tmp_path / "by-cc"
    reader = Reader(engine, parse_filters(), chunk_size=100)
    writer = PartitionedWriter(out, ["cc"])
    for chunk in reader.chunks():
        writer.write(chunk)
    writer.close()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        {f"probe_cc={m.vantage.cc}" for m in stored})  # fmt: skip
    table = ds.dataset(out, format="parquet", partitioning="hive").to_table()
    assert sorted(table.column("measurement_uid").to_pylist()) == sorted(
        m.measurement_uid for m in stored)  # fmt: skip
    first = min(m.start_time for m in stored)
    assert min(table.column("measurement_start_time").to_pylist()) == first.astimezone(dt.UTC)
