"""One export, start to end: the filtered reader feeds a format's encoder, chunk by chunk.

The same :class:`Export` serves the probe's ``vantage export``, the collector's
``vantage collector export`` and ``GET /api/v1/export``: :meth:`Export.stream` yields
the encoded bytes as they come (a file, standard output or an HTTP response writes
them), :meth:`Export.write_dataset` writes a partitioned Parquet directory.

>>> export = Export(engine, "csv", parse_filters(cc=["IR"]))
>>> if export.count():
...     for data in export.stream():
...         out.write(data)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa

from probe.export.csv import CSVEncoder
from probe.export.filters import Filters
from probe.export.jsonl import JSONLEncoder
from probe.export.ooni import AsnLookup, OONIEncoder
from probe.export.parquet import ParquetEncoder, PartitionedWriter
from probe.export.reader import Reader, Record
from probe.privacy import Scrub

FORMATS: tuple[str, ...] = ("jsonl", "csv", "parquet", "ooni")
#: Each format's encoder class (its ``media_type``, ``suffix``, ``stdout_ok``).
ENCODERS: dict[str, type[Any]] = {
    "jsonl": JSONLEncoder,
    "csv": CSVEncoder,
    "parquet": ParquetEncoder,
    "ooni": OONIEncoder,
}


class ExportError(Exception):
    """An export that cannot be made as asked; the message says why."""


class UnknownFormat(ExportError):
    pass


class NothingToExport(ExportError):
    pass


class Encoder(Protocol):
    """A format: bytes before the first record, for each chunk, and after the last."""

    name: str
    suffix: str
    media_type: str
    stdout_ok: bool

    def begin(self) -> bytes: ...

    def encode(self, records: Sequence[Record]) -> bytes: ...

    def end(self) -> bytes: ...


def check_format(name: str) -> str:
    if name not in FORMATS:
        raise UnknownFormat(f"unknown format {name!r}: use one of {', '.join(FORMATS)}")
    return name


class Export:
    """The measurements matching ``filters``, in format ``fmt``.

    ``probe_id``: maps probe ids before they are written (``--pseudonymize``);
    ``asn_of``: the AS number and name of an address, for OONI's DNS answers.
    ``scrub``: the probe's own addresses are removed from every record on the way out
    (probe.privacy; the probe's exports always pass one).
    """

    def __init__(
        self,
        engine: sa.Engine,
        fmt: str,
        filters: Filters,
        *,
        probe_id: Callable[[str], str] | None = None,
        asn_of: AsnLookup | None = None,
        chunk_size: int = 1000,
        scrub: Scrub | None = None,
    ) -> None:
        self.format = check_format(fmt)
        self.filters = filters
        self.engine = engine
        self.asn_of = asn_of
        self.reader = Reader(
            engine,
            filters,
            chunk_size=chunk_size,
            probe_id=probe_id,
            with_peers=fmt == "ooni",
            scrub=scrub,
        )

    def encoder(self) -> Encoder:
        if self.format == "jsonl":
            # SQLite keeps the key order of JSON text; PostgreSQL's JSONB does not
            return JSONLEncoder(reorder=self.engine.dialect.name != "sqlite")
        if self.format == "csv":
            return CSVEncoder()
        if self.format == "parquet":
            return ParquetEncoder()
        return OONIEncoder(self.asn_of)

    def count(self) -> int:
        """Matching measurements; :class:`NothingToExport` when there are none."""
        n = self.reader.count()
        if n == 0:
            raise NothingToExport(f"no measurement matches ({self.filters.describe()})")
        return n

    def stream(self, progress: Callable[[int], None] | None = None) -> Iterator[bytes]:
        """The encoded export, piece by piece; ``progress(n)`` after each chunk of n."""
        encoder = self.encoder()
        head = encoder.begin()
        if head:
            yield head
        for chunk in self.reader.chunks():
            data = encoder.encode(chunk)
            if data:
                yield data
            if progress is not None:
                progress(len(chunk))
        tail = encoder.end()
        if tail:
            yield tail

    def write_dataset(
        self,
        directory: Path,
        keys: Sequence[str],
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Write a Hive-partitioned Parquet dataset under ``directory``; the file count."""
        if self.format != "parquet":
            raise ExportError("--partition-by is for --format parquet only")
        writer = PartitionedWriter(directory, keys)
        try:
            for chunk in self.reader.chunks():
                writer.write(chunk)
                if progress is not None:
                    progress(len(chunk))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        return writer.files
