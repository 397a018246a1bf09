"""Datasets for operators and researchers: JSONL, CSV, Parquet and OONI format.

The same code exports from the probe's SQLite and the collector's PostgreSQL
(``vantage export``, ``vantage collector export``, ``GET /api/v1/export``), reading in
chunks and writing as it reads, so memory stays constant whatever the size. Modules,
by role: ``filters`` (what to export), ``reader`` (the filtered chunked reader),
``jsonl``, ``csv``, ``parquet``, ``ooni`` (one per format; ``flat`` holds the columns CSV
and Parquet share), ``stream`` (reader to encoder), ``writer`` (atomic output),
``pseudonym`` (keyed probe-id hashes), ``commands`` (the command line).
Every column and field is described in ``schema/DATA_DICTIONARY.md``.

>>> export = Export(engine, "jsonl", parse_filters(service=["telegram"]))
>>> export.count()
1200
>>> for data in export.stream():
...     sys.stdout.buffer.write(data)
"""

from probe.export.filters import FilterError, Filters, parse_filters
from probe.export.pseudonym import KeyFileError, Pseudonymizer
from probe.export.reader import Reader, ReadError, Record
from probe.export.stream import FORMATS, Export, ExportError, NothingToExport, UnknownFormat
from probe.export.writer import OutputError, atomic_directory, atomic_file

__all__ = [
    "FORMATS",
    "Export",
    "ExportError",
    "FilterError",
    "Filters",
    "KeyFileError",
    "NothingToExport",
    "OutputError",
    "Pseudonymizer",
    "ReadError",
    "Reader",
    "Record",
    "UnknownFormat",
    "atomic_directory",
    "atomic_file",
    "parse_filters",
]
