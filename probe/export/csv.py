"""CSV: the flat table (``probe.export.flat``), one row per measurement, for spreadsheets,
pandas and anything else that reads CSV.

RFC 4180 (comma-separated, ``"``-quoted when needed, CRLF line ends), UTF-8, a header
row. Empty cell: no value (null). Booleans are ``true``/``false``; times are ISO 8601 in
UTC (``2024-05-01T12:00:00Z``); list columns are joined with ``;`` (an
``unknown_failure: <detail>`` could itself contain ``;``: the Parquet and JSONL exports
keep exact lists).

Cells are neutralised against formula injection (``probe.export.flat.csv_text``): a
text cell beginning with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return (and each
such element of a list cell) is written with a leading ``'``. Strip one leading ``'``
from such a cell to get the value; the JSONL and Parquet exports keep values exact.

>>> import pandas as pd
>>> df = pd.read_csv("export.csv", parse_dates=["measurement_start_time"])
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from probe.export.flat import COLUMNS, NAMES, csv_text, csv_time, row
from probe.export.reader import Record

_BOOLS = tuple(i for i, c in enumerate(COLUMNS) if c.type == "bool")
_LISTS = tuple(i for i, c in enumerate(COLUMNS) if c.type == "list")
_TIMES = tuple(i for i, c in enumerate(COLUMNS) if c.type == "timestamp")
_TEXTS = tuple(i for i, c in enumerate(COLUMNS) if c.type == "string")


def cells(rec: Record) -> list[object]:
    """The CSV cells of ``rec`` (``None`` is written as an empty cell)."""
    values: list[object] = list(row(rec))
    for i in _BOOLS:
        v = values[i]
        if v is not None:
            values[i] = "true" if v else "false"
    for i in _TEXTS:
        v = values[i]
        if isinstance(v, str):
            values[i] = csv_text(v)
    for i in _LISTS:
        values[i] = ";".join(csv_text(v) for v in values[i])  # type: ignore[attr-defined]
    for i in _TIMES:
        values[i] = csv_time(values[i])  # type: ignore[arg-type]
    return values


class CSVEncoder:
    """Encodes chunks of records as CSV rows, after one header row."""

    name = "csv"
    suffix = ".csv"
    media_type = "text/csv; charset=utf-8"
    stdout_ok = True

    def _text(self, rows: Sequence[Sequence[object]]) -> bytes:
        buffer = io.StringIO()
        csv.writer(buffer).writerows(rows)
        return buffer.getvalue().encode("utf-8")

    def begin(self) -> bytes:
        return self._text([NAMES])

    def encode(self, records: Sequence[Record]) -> bytes:
        return self._text([cells(rec) for rec in records])

    def end(self) -> bytes:
        return b""
