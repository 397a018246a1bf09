"""Blockpage fingerprints: a small database of what censors' answers look like, and
the matchers that recognise them in a DNS answer or an HTTP response.

The database ships as ``probe/analysis/fingerprints.toml`` (format 1, one
``[[fingerprint]]`` table per entry; see that file for the keys). Each entry says
*where* to look (``location``: a DNS answer address, the HTTP body, one header,
the page title), *how* to compare (``match``: exact, contains, prefix, cidr,
regex), what it means (``scope``: national, isp, product, institution, lab, or
false-positive) and where the fact came from (``source``).

Matching rules, chosen so that hostile answers cost bounded work:

* Only the first :data:`BODY_LIMIT` bytes of a body are read; they are decoded as
  UTF-8 with replacement characters, never rejected.
* Text is compared case-insensitively with runs of whitespace collapsed to one
  space (patterns are normalised the same way when the file is loaded), so a
  phrase wrapped over two lines of HTML still matches.
* ``false-positive`` entries (CDN and bot challenges: the *site* refusing, not the
  network) are checked before everything else and returned like any other match;
  the caller tells them apart by ``fingerprint.scope == "false-positive"``. Then
  the remaining entries are tried in file order: put specific entries before
  generic ones.
* Regexes must be simple: they start with a literal of at least
  :data:`MIN_REGEX_PREFIX` characters (after an optional ``^``); repetition is
  only ``?`` or a bounded ``{m,n}`` on one character, escape or class, and a
  group may only be made optional (``(...)?``); no ``*``, ``+`` or ``{m,}``, no
  backreferences or lookaround; at most :data:`MAX_REGEX_CHOICES` ways to try a
  match (the product of every ``{m,n}`` range and ``|`` alternative). The matcher
  finds the literal start with a plain substring search and tries the regex only
  there, at most :data:`MAX_REGEX_TRIES` times per response, so its cost does not
  grow with the input. Prefer ``contains``: it is faster and needs no escaping.

>>> db = FingerprintDB.builtin()
>>> db.match_dns("10.10.34.35").country
'IR'
>>> fp = db.match_http(200, [("Server", "Protected by WireFilter")], b"<html></html>")
>>> fp.scope
'product'
"""

from __future__ import annotations

import functools
import html
import ipaddress
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from probe.catalog import read_source
from probe.tomltable import ErrorFactory, TableReader
from schema.model import Source

FORMAT_VERSION = 1

LOCATIONS: tuple[str, ...] = ("dns", "body", "header", "title")
MATCHES: tuple[str, ...] = ("exact", "contains", "prefix", "cidr", "regex")
SCOPES: tuple[str, ...] = ("national", "isp", "product", "institution", "false-positive", "lab")
FALSE_POSITIVE = "false-positive"

#: Which comparisons make sense where.
ALLOWED_MATCHES: dict[str, tuple[str, ...]] = {
    "dns": ("exact", "cidr"),
    "body": ("exact", "contains", "prefix", "regex"),
    "header": ("exact", "contains", "prefix", "regex"),
    "title": ("exact", "contains", "prefix", "regex"),
}

BODY_LIMIT = 64 * 1024
"""Bytes of an HTTP body that are looked at; the rest is ignored."""
TITLE_LIMIT = 200
"""Characters of a title kept by :func:`title_of` (after collapsing whitespace)."""
HEADER_LIMIT = 200
"""Response headers looked at; later ones are ignored."""
HEADER_VALUE_LIMIT = 8 * 1024
"""Characters of one header value looked at."""
HEADER_BYTES_LIMIT = 64 * 1024
"""Characters of header values looked at in total, over all headers."""
MAX_REGEX_LENGTH = 200
MAX_REGEX_CHOICES = 256
"""Upper bound on the ways a fingerprint regex may try to match at one position."""
MIN_REGEX_PREFIX = 3
"""Literal characters a fingerprint regex must start with."""
MAX_REGEX_TRIES = 64
"""Positions (occurrences of its literal start) where one regex is tried per response."""
MAX_PATTERN_LENGTH = 1024

_ENTRY_KEYS = {
    "id", "location", "match", "pattern", "header", "scope", "country", "description", "source",
}  # fmt: skip
_SOURCE_KEYS = {"url", "checked"}
_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,99}")
_COUNTRY = re.compile(r"[A-Z]{2}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}")
_REPEAT = re.compile(r"\{(\d*)(,?)(\d*)\}")
_REGEX_SPECIAL = frozenset(".^$*+?{}[]\\|()")
_TITLE_OPEN = re.compile(r"<title(?:\s[^>]{0,256})?>", re.IGNORECASE)
_TITLE_CLOSE = re.compile(r"</title", re.IGNORECASE)
_TITLE_SCAN = 16 * 1024  # characters between <title> and </title> looked at


class FingerprintError(ValueError):
    """A fingerprint file is malformed; the message names the file, the entry (index
    and id), the key and the reason."""

    def __init__(
        self,
        origin: str,
        key: str,
        reason: str,
        *,
        index: int | None = None,
        fingerprint_id: str | None = None,
    ) -> None:
        self.origin, self.key, self.reason = origin, key, reason
        self.index, self.fingerprint_id = index, fingerprint_id
        where = key
        if fingerprint_id:
            where += f" (id {fingerprint_id!r})"
        super().__init__(f"{origin}: {where}: {reason}" if where else f"{origin}: {reason}")


@dataclass(frozen=True)
class Fingerprint:
    """One known answer: where to look, how to compare, what it means, who said so.

    ``pattern`` is kept as written in the file; ``header`` is the header name for
    ``location == "header"`` entries and None otherwise.
    """

    id: str
    location: str
    match: str
    pattern: str
    header: str | None
    scope: str
    country: str
    description: str
    source: Source

    @property
    def false_positive(self) -> bool:
        """True for a page that looks like blocking but is the site's own doing."""
        return self.scope == FALSE_POSITIVE


# ------------------------------------------------------------------ text helpers


def _normalise(text: str) -> str:
    """Lower-case ``text`` and collapse every run of whitespace to one space."""
    return " ".join(text.split()).lower()


def _decode(body: bytes) -> str:
    return bytes(body[:BODY_LIMIT]).decode("utf-8", "replace")


def _title(text: str) -> str | None:
    opening = _TITLE_OPEN.search(text)
    if opening is None:
        return None
    closing = _TITLE_CLOSE.search(text, opening.end())
    raw = text[opening.end() : closing.start() if closing else len(text)][:_TITLE_SCAN]
    title = " ".join(html.unescape(raw).split())[:TITLE_LIMIT]
    return title or None


def title_of(body: bytes) -> str | None:
    """The page title: the text of the first ``<title>`` element (tag matched
    case-insensitively), HTML entities decoded, whitespace collapsed, at most
    :data:`TITLE_LIMIT` characters. None when there is no title or it is empty.

    Only the first :data:`BODY_LIMIT` bytes are read; a title that is never closed
    runs to the end of what was read.
    """
    return _title(_decode(body))


def regex_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not simple enough for a fingerprint, or None if it is.

    ``pattern`` must already compile. It must start with a literal of
    :data:`MIN_REGEX_PREFIX` characters or more (after an optional ``^``).
    Repetition is allowed only as ``?`` or a bounded ``{m,n}`` on a single
    character, escape or class, plus ``?`` on a group; the product of all repetition ranges and
    alternatives must stay within :data:`MAX_REGEX_CHOICES`.
    """
    if len(pattern) > MAX_REGEX_LENGTH:
        return f"longer than {MAX_REGEX_LENGTH} characters"
    if len(regex_prefix(pattern)) < MIN_REGEX_PREFIX:
        return (
            f"must start with at least {MIN_REGEX_PREFIX} literal characters "
            "(after an optional ^), so that a plain search can find where to try it"
        )
    choices = 1
    branches = [1]  # alternatives of each open group; [0] is the whole pattern
    repeatable = False  # the previous token was a single character, escape or class
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            nxt = pattern[i + 1 : i + 2]
            if nxt and nxt in "123456789":
                return "backreferences are not allowed"
            i += 2
            if nxt == "N" and pattern.startswith("{", i):
                i = pattern.index("}", i) + 1
            repeatable = True
        elif c == "[":
            j = i + 1
            if pattern.startswith("^", j):
                j += 1
            if pattern.startswith("]", j):
                j += 1
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            i, repeatable = j + 1, True
        elif c == "(":
            if pattern.startswith("(?:", i):
                i += 3
            elif pattern.startswith("(?P<", i):
                i = pattern.index(">", i) + 1
            elif pattern.startswith("(?", i):
                return "only (...), (?:...) and (?P<name>...) groups are allowed"
            else:
                i += 1
            branches.append(1)
            repeatable = False
        elif c == ")":
            choices *= branches.pop()
            i += 1
            if i < n and (pattern[i] in "*+" or _repeat_at(pattern, i) is not None):
                return "a group may not be repeated, only made optional with ?"
            repeatable = True  # "(...)?" is one more choice
        elif c == "|":
            branches[-1] += 1
            i, repeatable = i + 1, False
        elif c in "*+":
            return f"{c!r} is unbounded; use a bounded {{m,n}}"
        elif c == "?":
            if repeatable:  # otherwise it makes the previous repetition lazy
                choices *= 2
            i, repeatable = i + 1, False
        elif c == "{" and (span := _repeat_at(pattern, i)) is not None:
            low, high, end = span
            if high is None:
                return "open repetition {m,} is unbounded; give a maximum"
            choices *= max(high - low, 0) + 1
            i, repeatable = end, False
        else:
            i, repeatable = i + 1, c not in "^$"
    if branches[0] > 1:
        return "alternatives at the top level: put them in a group after a literal start"
    if choices > MAX_REGEX_CHOICES:
        return (
            f"too many ways to match ({choices} > {MAX_REGEX_CHOICES}): "
            "narrow the {m,n} ranges or split the alternatives into entries"
        )
    return None


def regex_prefix(pattern: str) -> str:
    """The lower-cased literal text every match of ``pattern`` starts with
    (after an optional leading ``^``); empty if there is none."""
    i = 1 if pattern.startswith("^") else 0
    chars: list[str] = []
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            nxt = pattern[i + 1 : i + 2]
            if not nxt or nxt.isalnum() or nxt == "_":
                break  # a class (\d), an assertion (\b) or a code (\x41): stop
            chars.append(nxt)
            i += 2
        elif c in _REGEX_SPECIAL:
            break
        else:
            chars.append(c)
            i += 1
    if chars and i < len(pattern) and pattern[i] in "?*+{":
        chars.pop()  # the last character is repeated, so it is not certain
    return "".join(chars).lower()


def _repeat_at(pattern: str, i: int) -> tuple[int, int | None, int] | None:
    """``(low, high, end)`` of a ``{m,n}`` repetition at ``i`` (high None if open)."""
    m = _REPEAT.match(pattern, i)
    if m is None:
        return None
    low, comma, high = m.groups()
    if not comma:
        return None if not low else (int(low), int(low), m.end())
    return int(low or 0), int(high) if high else None, m.end()


# ----------------------------------------------------------------------- matching


class _Test:
    """One compiled comparison of normalised texts against a pattern.

    For a regex, ``needle`` is its literal start: the regex is tried only where a
    plain search finds it, at most :data:`MAX_REGEX_TRIES` times per call.
    """

    __slots__ = ("kind", "needle", "regex", "anchored")

    def __init__(self, kind: str, pattern: str) -> None:
        self.kind = kind
        self.regex: re.Pattern[str] | None = None
        self.anchored = False
        if kind == "regex":
            self.regex = re.compile(pattern, re.IGNORECASE)
            self.needle = regex_prefix(pattern)
            self.anchored = pattern.startswith("^")
        else:
            self.needle = _normalise(pattern)

    def any(self, texts: Iterable[str]) -> bool:
        """True if one of ``texts`` (already normalised) matches."""
        if self.regex is None:
            return any(self._plain(text) for text in texts)
        tries = MAX_REGEX_TRIES
        for text in texts:
            at = text.find(self.needle)
            while at >= 0:
                if tries <= 0:
                    return False
                tries -= 1
                if self.regex.match(text, at) is not None:
                    return True
                if self.anchored:
                    break
                at = text.find(self.needle, at + 1)
        return False

    def _plain(self, text: str) -> bool:
        if self.kind == "exact":
            return text == self.needle
        if self.kind == "prefix":
            return text.startswith(self.needle)
        return self.needle in text


@dataclass(frozen=True)
class _Page:
    """The parts of an HTTP response fingerprints look at, normalised and bounded."""

    body: str
    title: str | None
    headers: dict[str, list[str]]


@dataclass(frozen=True)
class _HTTPRule:
    fingerprint: Fingerprint
    test: _Test
    header: str | None  # lower-case header name for header entries

    def matches(self, page: _Page) -> bool:
        location = self.fingerprint.location
        if location == "body":
            return self.test.any((page.body,))
        if location == "title":
            return page.title is not None and self.test.any((page.title,))
        return self.test.any(page.headers.get(self.header or "", ()))


_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _page(headers: Iterable[tuple[str, str]], body: bytes) -> _Page:
    text = _decode(body)
    title = _title(text)
    found: dict[str, list[str]] = {}
    budget = HEADER_BYTES_LIMIT
    for count, (name, value) in enumerate(headers):
        if count >= HEADER_LIMIT or budget <= 0:
            break
        value = value[: min(HEADER_VALUE_LIMIT, budget)]
        budget -= len(value)
        found.setdefault(name.strip().lower(), []).append(_normalise(value))
    return _Page(
        body=_normalise(text),
        title=None if title is None else _normalise(title),
        headers=found,
    )


class FingerprintDB:
    """A validated, compiled set of fingerprints. Build one with :meth:`load` or
    :meth:`builtin`; matching is pure and safe to share between threads."""

    def __init__(self, fingerprints: tuple[Fingerprint, ...], origin: str) -> None:
        """Compile already-validated fingerprints (use :meth:`load` for a file)."""
        self.fingerprints = fingerprints
        self.origin = origin
        self._by_id = {fp.id: fp for fp in fingerprints}
        dns: list[tuple[Fingerprint, _Network]] = []
        http: list[_HTTPRule] = []
        for fp in fingerprints:
            if fp.location == "dns":
                dns.append((fp, ipaddress.ip_network(fp.pattern, strict=fp.match == "cidr")))
            else:
                header = fp.header.lower() if fp.header else None
                http.append(_HTTPRule(fp, _Test(fp.match, fp.pattern), header))
        # False positives first, then file order (sorted() is stable).
        self._dns = sorted(dns, key=lambda rule: not rule[0].false_positive)
        self._http = sorted(http, key=lambda rule: not rule.fingerprint.false_positive)

    @classmethod
    def load(cls, text: str | None = None, origin: str = "builtin") -> FingerprintDB:
        """Parse and validate a fingerprint file (the packaged one when ``text`` is
        None). Raises :class:`FingerprintError` naming ``origin``, the entry and key."""
        if text is None:
            text = (
                resources.files("probe.analysis").joinpath("fingerprints.toml").read_text("utf-8")
            )
        return cls(parse_fingerprints(text, origin), origin)

    @classmethod
    def builtin(cls) -> FingerprintDB:
        """The packaged database, loaded once per process."""
        return _builtin()

    @classmethod
    def with_files(cls, paths: Iterable[str]) -> FingerprintDB:
        """The packaged database plus the fingerprint files at ``paths`` (the same
        format; ``analysis.fingerprints`` in the configuration): a network's own
        knowledge, or a lab scenario testing the mechanism. The files' entries are
        tried before the packaged ones (they are the more specific); false positives
        still come first. An id may appear only once over all of them.

        Raises :class:`FingerprintError` naming the file (a missing or unreadable
        file too)."""
        builtin = cls.builtin()
        extra: list[Fingerprint] = []
        origins = [builtin.origin]
        for path in paths:
            try:
                text = Path(path).read_text("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise FingerprintError(path, "", f"cannot read: {exc}") from exc
            for fp in parse_fingerprints(text, path):
                if fp.id in builtin._by_id or any(e.id == fp.id for e in extra):
                    raise FingerprintError(
                        path,
                        "id",
                        "defined twice (ids are unique over every file)",
                        fingerprint_id=fp.id,
                    )
                extra.append(fp)
            origins.append(path)
        if not extra and len(origins) == 1:
            return builtin
        return cls((*extra, *builtin.fingerprints), " + ".join(origins))

    def __len__(self) -> int:
        return len(self.fingerprints)

    def get(self, fingerprint_id: str) -> Fingerprint | None:
        """The fingerprint with this id, if any."""
        return self._by_id.get(fingerprint_id)

    def match_dns(self, address: str) -> Fingerprint | None:
        """The first fingerprint matching a DNS answer address (IPv4-mapped IPv6
        addresses count as their IPv4 address); None for no match or a non-address."""
        if len(address) > 64:
            return None
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        for fp, network in self._dns:
            if ip.version == network.version and ip in network:
                return fp
        return None

    def match_http(
        self, status: int | None, headers: list[tuple[str, str]], body: bytes
    ) -> Fingerprint | None:
        """The first fingerprint matching an HTTP response, false positives first.

        ``status`` is accepted so callers hand over the whole response; no
        fingerprint depends on it yet. ``headers`` are (name, value) pairs in any
        case; ``body`` is the (possibly truncated) body as received.
        """
        if not self._http:
            return None
        page = _page(headers, body)
        for rule in self._http:
            if rule.matches(page):
                return rule.fingerprint
        return None


@functools.cache
def _builtin() -> FingerprintDB:
    return FingerprintDB.load()


# ------------------------------------------------------------------------ parsing


def _source(entry: TableReader) -> Source:
    source = read_source(entry, "source")
    if source is None:
        raise entry.fail("source", "is required (a table with url and checked)")
    return source


def _pattern(entry: TableReader, location: str, match: str) -> str:
    pattern: str = entry.text("pattern", required=True)
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise entry.fail("pattern", f"longer than {MAX_PATTERN_LENGTH} characters")
    if location == "dns":
        try:
            if match == "exact":
                ipaddress.ip_address(pattern)
            else:
                ipaddress.ip_network(pattern, strict=True)
        except ValueError as exc:
            what = "an IP address" if match == "exact" else "a network (address/prefix)"
            raise entry.fail("pattern", f"not {what}: {exc}") from exc
    elif match == "regex":
        try:
            re.compile(pattern, re.IGNORECASE)
        except re.error as exc:
            raise entry.fail("pattern", f"not a valid regular expression: {exc}") from exc
        problem = regex_problem(pattern)
        if problem:
            raise entry.fail("pattern", f"regex too complex for untrusted input: {problem}")
    return pattern


def _entry(entry: TableReader) -> Fingerprint:
    fid: str = entry.text("id", required=True)
    if not _ID.fullmatch(fid):
        raise entry.fail("id", f"{fid!r} is not a lower-case id (a-z, 0-9, '.', '_', '-')")
    location = entry.choice("location", LOCATIONS)
    match = entry.choice("match", MATCHES)
    if match not in ALLOWED_MATCHES[location]:
        allowed = ", ".join(ALLOWED_MATCHES[location])
        raise entry.fail("match", f"{match!r} does not apply to {location} ({allowed})")
    pattern = _pattern(entry, location, match)
    header: str | None = entry.text("header")
    if location == "header":
        if header is None:
            raise entry.fail("header", 'is required for location = "header"')
        if not _HEADER_NAME.fullmatch(header):
            raise entry.fail("header", f"not a header name: {header!r}")
    elif header is not None:
        raise entry.fail("header", f'only location = "header" entries take one ({location})')
    country: str = entry.text("country", required=True)
    if not _COUNTRY.fullmatch(country):
        raise entry.fail("country", f"not a two-letter upper-case ISO code or ZZ: {country!r}")
    return Fingerprint(
        id=fid,
        location=location,
        match=match,
        pattern=pattern,
        header=header,
        scope=entry.choice("scope", SCOPES),
        country=country,
        description=entry.text("description", required=True),
        source=_source(entry),
    )


def parse_fingerprints(text: str, origin: str) -> tuple[Fingerprint, ...]:
    """Validate a whole fingerprint document; ``origin`` names it in errors."""

    def error(index: int | None, fid: str | None) -> ErrorFactory:
        return lambda key, reason: FingerprintError(
            origin, key, reason, index=index, fingerprint_id=fid
        )

    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FingerprintError(origin, "", f"not valid TOML: {exc}") from exc
    top = TableReader(doc, "", {"format", "fingerprint"}, error(None, None))
    fmt = top.get("format", int, required=True)
    if fmt != FORMAT_VERSION:
        raise top.fail(
            "format", f"this Vantage reads fingerprint format {FORMAT_VERSION}, not {fmt}"
        )
    raw_entries = top.get("fingerprint", list, [])
    found: list[Fingerprint] = []
    first_index: dict[str, int] = {}
    for i, raw in enumerate(raw_entries):
        path = f"fingerprint[{i}]"
        raw_id = raw.get("id") if isinstance(raw, dict) else None
        fid = raw_id if isinstance(raw_id, str) and raw_id else None
        if not isinstance(raw, dict):
            raise FingerprintError(origin, path, "expected a table ([[fingerprint]])", index=i)
        fp = _entry(TableReader(raw, path, _ENTRY_KEYS, error(i, fid)))
        if fp.id in first_index:
            raise FingerprintError(
                origin,
                f"{path}.id",
                f"duplicate id {fp.id!r} (first used by fingerprint[{first_index[fp.id]}])",
                index=i,
                fingerprint_id=fp.id,
            )
        first_index[fp.id] = i
        found.append(fp)
    return tuple(found)
