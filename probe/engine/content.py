"""Bounded decoding of HTTP bodies (``Content-Encoding``).

A compressed body is decoded here, not by httpx, so that its decoded size is
bounded while it is decoded: a reply of a few kilobytes can otherwise expand to
gigabytes in memory before any limit is checked (a "compression bomb"). Each call
to :meth:`BodyDecoder.decode` returns at most the number of bytes asked for.

Only one ``gzip`` (``x-gzip``) or ``deflate`` coding is decoded. Anything else
(``br``, ``zstd``, unknown codings, or several codings stacked, e.g.
``gzip, gzip``) is passed through raw, and :attr:`BodyDecoder.note` says why.
"""

from __future__ import annotations

import zlib

_GZIP = zlib.MAX_WBITS | 16  # gzip header and trailer
_ZLIB = zlib.MAX_WBITS  # zlib header (what "deflate" means in HTTP)
_RAW_DEFLATE = -zlib.MAX_WBITS  # no header (what some servers send as "deflate")
_FALLBACK_WINDOW = 64  # input kept to retry "deflate" as raw deflate


#: The single codings the engine decodes as it reads (anything else is kept raw).
DECODED = ("gzip", "x-gzip", "deflate")


def codings(header: str | None) -> list[str]:
    """The content codings of a Content-Encoding value, in the order applied."""
    items = [c.strip().lower() for c in (header or "").split(",")]
    return [c for c in items if c and c != "identity"]


class BodyDecoder:
    """Decode one body incrementally with bounded output."""

    def __init__(self, content_encoding: str | None) -> None:
        applied = codings(content_encoding)
        self.note: str | None = None
        self._kind: str | None = None
        self._z: zlib._Decompress | None = None
        # Input consumed before any output, while "deflate" may yet prove to be raw
        # deflate (None once it cannot: too much input, or output was produced).
        self._head: bytes | None = b""
        self._produced = 0
        self._members = 0  # gzip members finished
        self._ended = False  # the stream ended: later bytes are trailing junk
        if len(applied) > 1:
            self.note = f"stacked content codings {content_encoding!r} not decoded; body kept raw"
        elif applied and applied[0] in ("gzip", "x-gzip"):
            self._kind, self._z = "gzip", zlib.decompressobj(_GZIP)
        elif applied and applied[0] == "deflate":
            self._kind, self._z = "deflate", zlib.decompressobj(_ZLIB)
        elif applied:
            self.note = f"content coding {applied[0]!r} not decoded; body kept raw"

    def decode(self, data: bytes, limit: int) -> bytes:
        """Decode ``data``; return at most ``limit`` bytes (the rest is not produced).

        Raises :class:`httpx.DecodingError` when the body is not validly encoded.
        """
        if limit <= 0:
            return b""
        if self._z is None:
            return data[:limit]
        out = bytearray()
        if self._ended:
            return b""
        while data and len(out) < limit:
            try:
                piece = self._z.decompress(data, limit - len(out))
            except zlib.error as exc:
                if self._kind == "deflate" and not self._produced and self._head is not None:
                    # No zlib header: raw deflate, as browsers also accept. Replay the
                    # input so far (only a few header bytes can have gone before).
                    self._kind, self._z = "raw deflate", zlib.decompressobj(_RAW_DEFLATE)
                    data, self._head = self._head + data, None
                    continue
                if self._kind == "gzip" and self._members:
                    self._ended = True  # junk after a complete gzip body is ignored
                    break
                import httpx  # here: the scrub (probe.privacy) uses this module too

                raise httpx.DecodingError(f"{self._kind} body: {exc}") from exc
            if self._kind == "deflate" and not piece and self._head is not None:
                used = data[: len(data) - len(self._z.unconsumed_tail)]
                grown = self._head + used
                self._head = grown if len(grown) <= _FALLBACK_WINDOW else None
            out += piece
            self._produced += len(piece)
            if self._z.eof:
                data = self._z.unused_data
                self._members += 1
                if self._kind == "gzip":
                    self._z = zlib.decompressobj(_GZIP)  # a multi-member gzip body
                    continue
                self._ended = True  # bytes after the end of the stream are ignored
                break
            data = self._z.unconsumed_tail
        return bytes(out)
