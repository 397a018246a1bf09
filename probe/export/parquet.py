"""Parquet: the flat table (``probe.export.flat``) with an explicit, typed schema.

Times are ``timestamp[us, tz=UTC]``, counts ``int32``, AS numbers and lengths ``int64``,
verdict flags nullable ``bool``, evidence summaries ``list<string>``. Each chunk read
becomes Arrow columns as it comes, written as a row group every 10,000 rows (constant
memory); files are Snappy-compressed, as DuckDB and Spark write them by default.

``--partition-by date,cc`` writes a Hive-style dataset directory instead of one file::

    out/date=2024-05-01/probe_cc=IR/part-0.parquet

The partition values live in the paths (``date`` is the measurement's UTC day), not in
the files; ``pyarrow.dataset.dataset(out, partitioning="hive")``, pandas'
``read_parquet(out)`` and DuckDB's ``read_parquet('out/**/*.parquet',
hive_partitioning = true)`` give them back as columns.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from probe.export.flat import COLUMNS, row
from probe.export.reader import Record

#: Partition keys ``--partition-by`` accepts, and the column each one becomes.
PARTITION_KEYS: dict[str, str] = {"date": "date", "cc": "probe_cc"}

#: Columns that always have a value (the rest are nullable).
REQUIRED = frozenset(
    {
        "measurement_uid", "report_id", "measurement_start_time", "test_runtime", "service",
        "target_id", "target_kind", "input", "control", "probe_id", "probe_asn", "probe_cc",
        "resolver_asn", "software_version", "reasons", "observation_count", "dns_queries",
        "dns_rcodes", "dns_failures", "dns_addresses", "tcp_connects", "tcp_successes",
        "tcp_failures", "tls_handshakes", "tls_failures", "http_requests",
    }
)  # fmt: skip


class PyArrowMissing(RuntimeError):
    """pyarrow is not installed (it has no wheels for 32-bit Raspberry Pi OS)."""


MISSING = (
    "Parquet export needs pyarrow, which is not installed: pip install "
    "'vantage-probe[parquet]' (there are no pyarrow wheels for 32-bit Raspberry Pi OS: "
    "export --format csv or jsonl there, and convert on another machine)"
)


def _pa() -> Any:
    try:
        import pyarrow
    except ImportError as exc:  # pyarrow is an optional dependency
        raise PyArrowMissing(MISSING) from exc
    return pyarrow


def _pq() -> Any:
    _pa()
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise PyArrowMissing(MISSING) from exc
    return pq


def schema() -> Any:
    """The Arrow schema of the flat table."""
    pa = _pa()
    types = {
        "string": pa.string(),
        "timestamp": pa.timestamp("us", tz="UTC"),
        "float": pa.float64(),
        "int32": pa.int32(),
        "int64": pa.int64(),
        "bool": pa.bool_(),
        "list": pa.list_(pa.string()),
    }
    return pa.schema(
        [pa.field(c.name, types[c.type], nullable=c.name not in REQUIRED) for c in COLUMNS]
    )


def table(records: Sequence[Record], drop: Sequence[str] = ()) -> Any:
    """One Arrow table of ``records`` (``drop``: partition columns, kept in paths)."""
    pa = _pa()
    full = schema()
    columns = list(zip(*(row(r) for r in records), strict=True)) if records else []
    arrays, fields = [], []
    for i, f in enumerate(full):
        if f.name in drop:
            continue
        arrays.append(pa.array(columns[i] if columns else [], type=f.type))
        fields.append(f)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


class _Drain:
    """A write-only file for pyarrow that hands back what was written since last asked:
    Parquet streams out row group by row group (the footer comes last)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._parts.append(chunk)
        self._size += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


#: Rows per row group: large enough that the footer (statistics of every column of
#: every row group, held in memory until the file is closed) stays small for a million
#: rows, small enough to stream; DuckDB and Spark write larger ones still.
ROWS_PER_GROUP = 10_000


class ParquetEncoder:
    """Encodes chunks of records as row groups of one Parquet file, streamed: each chunk
    becomes Arrow columns at once, and every :data:`ROWS_PER_GROUP` rows are written as
    one row group (whose bytes are then handed on)."""

    name = "parquet"
    suffix = ".parquet"
    media_type = "application/vnd.apache.parquet"
    stdout_ok = False

    def __init__(self, rows_per_group: int = ROWS_PER_GROUP) -> None:
        pq = _pq()
        self.rows_per_group = rows_per_group
        self._drain = _Drain()
        self._writer = pq.ParquetWriter(self._drain, schema(), compression="snappy")
        self._waiting: list[Any] = []
        self._rows = 0

    def begin(self) -> bytes:
        return self._drain.take()

    def encode(self, records: Sequence[Record]) -> bytes:
        if records:
            self._waiting.append(table(records))
            self._rows += len(records)
            if self._rows >= self.rows_per_group:
                self._flush()
        return self._drain.take()

    def _flush(self) -> None:
        if self._waiting:
            pa = _pa()
            t = pa.concat_tables(self._waiting)
            self._writer.write_table(t, row_group_size=t.num_rows)
            self._waiting, self._rows = [], 0

    def end(self) -> bytes:
        self._flush()
        self._writer.close()
        return self._drain.take()


class PartitionedWriter:
    """Writes a Hive-style dataset under ``directory``, one file per partition.

    Rows wait, as Arrow columns, in per-partition buffers so that row groups are not
    tiny; at most ``budget`` rows wait in all (the largest buffer is written first when
    it is exceeded), and a day's files are closed once measurements of a later day
    arrive (they come oldest first): memory stays bounded whatever the export's size.
    """

    def __init__(self, directory: Path, keys: Sequence[str], *,
                 rows_per_group: int = ROWS_PER_GROUP, budget: int = 50_000) -> None:  # fmt: skip
        unknown = [k for k in keys if k not in PARTITION_KEYS]
        if unknown or not keys or len(set(keys)) != len(keys):
            raise ValueError(
                f"partition by {','.join(keys)}: use one or more of "
                f"{', '.join(PARTITION_KEYS)} (each once)"
            )
        self.directory = directory
        self.keys = tuple(keys)
        self.drop = tuple(PARTITION_KEYS[k] for k in self.keys if k != "date")
        self.rows_per_group = rows_per_group
        self.budget = budget
        self._buffers: dict[tuple[str, ...], list[Any]] = {}
        self._counts: dict[tuple[str, ...], int] = {}
        self._writers: dict[tuple[str, ...], Any] = {}
        self._waiting = 0
        self._day: str | None = None
        self.files = 0

    def _key(self, rec: Record) -> tuple[str, ...]:
        values = []
        for k in self.keys:
            values.append(rec.start.astimezone(dt.UTC).date().isoformat() if k == "date"
                          else rec.vantage.cc)  # fmt: skip
        return tuple(values)

    def write(self, records: Sequence[Record]) -> None:
        groups: dict[tuple[str, ...], list[Record]] = {}
        for rec in records:  # oldest first: a new day closes the days before it
            key = self._key(rec)
            if "date" in self.keys:
                day = key[self.keys.index("date")]
                if self._day is not None and day != self._day:
                    self._add(groups)
                    groups = {}
                    self._close_day(self._day)
                self._day = day
            groups.setdefault(key, []).append(rec)
        self._add(groups)
        while self._waiting > self.budget:
            self._flush(max(self._counts, key=lambda k: self._counts[k]))

    def _add(self, groups: dict[tuple[str, ...], list[Record]]) -> None:
        for key, recs in groups.items():
            self._buffers.setdefault(key, []).append(table(recs, drop=self.drop))
            self._counts[key] = self._counts.get(key, 0) + len(recs)
            self._waiting += len(recs)
            if self._counts[key] >= self.rows_per_group:
                self._flush(key)

    def _path(self, key: tuple[str, ...]) -> Path:
        parts = [f"{PARTITION_KEYS[k]}={v}" for k, v in zip(self.keys, key, strict=True)]
        return self.directory.joinpath(*parts, "part-0.parquet")

    def _flush(self, key: tuple[str, ...]) -> None:
        pq = _pq()
        tables = self._buffers.pop(key, [])
        rows = self._counts.pop(key, 0)
        if not tables:
            return
        self._waiting -= rows
        t = _pa().concat_tables(tables)
        writer = self._writers.get(key)
        if writer is None:
            path = self._path(key)
            if path.exists():  # a day seen again out of order: a further part file
                n = len(list(path.parent.glob("part-*.parquet")))
                path = path.with_name(f"part-{n}.parquet")
            path.parent.mkdir(parents=True, exist_ok=True)
            writer = self._writers[key] = pq.ParquetWriter(path, t.schema, compression="snappy")
            self.files += 1
        writer.write_table(t, row_group_size=max(1, t.num_rows))

    def _close_day(self, day: str) -> None:
        i = self.keys.index("date")
        for key in [k for k in {*self._buffers, *self._writers} if k[i] == day]:
            self._flush(key)
            writer = self._writers.pop(key, None)
            if writer is not None:
                writer.close()

    def close(self) -> None:
        for key in list(self._buffers):
            self._flush(key)
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()

    def abort(self) -> None:
        """Close open files after a failure (the caller removes the directory)."""
        self._buffers.clear()
        self._counts.clear()
        for writer in self._writers.values():
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - the export already failed; cleanup goes on
                pass
        self._writers.clear()
