"""Blockpage fingerprints: every shipped entry matches what it should, false
positives win, normal pages match nothing, malformed files fail naming entry and
key, and hostile answers cost bounded time."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest

from probe.analysis.fingerprints import (
    BODY_LIMIT,
    MAX_REGEX_TRIES,
    TITLE_LIMIT,
    FingerprintDB,
    FingerprintError,
    regex_prefix,
    regex_problem,
    title_of,
)

Headers = list[tuple[str, str]]

LAB_BLOCKPAGE = (
    b"<!doctype html>\n<html><head><title>Access denied</title></head>\n"
    b"<body><h1>Access denied</h1>"
    b"<p>This site has been blocked by order of the authorities</p></body></html>\n"
)
LAB_CHALLENGE = (
    b"<!doctype html>\n<html><head><title>Just a moment...</title></head>\n"
    b"<body><h1>Checking your browser</h1>"
    b'<form id="challenge-form" method="POST" action="/_lab/captcha">'
    b'<input type="submit" value="I am not a robot"></form></body></html>\n'
)
CLOUDFLARE_CHALLENGE = (
    b'<!DOCTYPE html><html lang="en-US"><head><title>Just a moment...</title>'
    b'<meta name="robots" content="noindex,nofollow"></head><body>checking</body></html>'
)
AKAMAI_DENIED = (
    b"<HTML><HEAD>\n<TITLE>Access Denied</TITLE>\n</HEAD><BODY>\n<H1>Access Denied</H1>\n"
    b"You do not have access to this page.<P>\nReference #18.1a2b3c4d.1700000000.5e6f7a8b\n"
    b"</BODY>\n</HTML>\n"
)
AKAMAI_DENIED_NEW = AKAMAI_DENIED.replace(
    b"</BODY>", b"https://errors.edgesuite.net/18.1a2b3c4d.1700000000.5e6f7a8b</BODY>"
)
NORMAL_PAGE = (
    b'<!doctype html><html><head><meta charset="utf-8"><title>Example Domain</title></head>'
    b"<body><h1>Example Domain</h1><p>This domain is for use in examples.</p></body></html>"
)
NORMAL_HEADERS: Headers = [
    ("Server", "nginx/1.25.3"),
    ("Content-Type", "text/html; charset=utf-8"),
    ("Location", "https://www.example.org/"),
]

# What each shipped HTTP fingerprint must recognise: (status, headers, body).
HTTP_SAMPLES: dict[str, tuple[int, Headers, bytes]] = {
    "fp-cloudflare-challenge-header": (
        403,
        [("Server", "cloudflare"), ("cf-mitigated", "challenge")],
        b"<html><head><title>Attention</title></head></html>",
    ),
    "fp-cloudflare-challenge-title": (503, [("Server", "cloudflare")], CLOUDFLARE_CHALLENGE),
    "fp-akamai-edge-server": (403, [("Server", "AkamaiGHost")], AKAMAI_DENIED),
    "fp-akamai-error-reference-link": (403, [("Server", "edge")], AKAMAI_DENIED_NEW),
    "header-id-internet-positif": (
        302,
        [("Location", "http://internet-positif.org/?site=example.com")],
        b"",
    ),
    "header-wirefilter": (
        403,
        [("Server", "Protected by WireFilter")],
        b"<html><body>Forbidden</body></html>",
    ),
}
DNS_SAMPLES = {
    "dns-ir-10.10.34.34": "10.10.34.34",
    "dns-ir-10.10.34.35": "10.10.34.35",
    "dns-ir-10.10.34.36": "10.10.34.36",
    "dns-tr-195.175.254.2": "195.175.254.2",
    "dns-ru-193.58.251.1": "193.58.251.1",
}
#: The lab's own pages and address: probe/lab/fingerprints.toml, not the shipped database.
LAB_FILE = Path(__file__).resolve().parents[2] / "probe" / "lab" / "fingerprints.toml"
LAB_SAMPLES: dict[str, tuple[int, Headers, bytes]] = {
    "fp-vantage-lab-challenge": (503, [("Server", "vantage-lab/1")], LAB_CHALLENGE),
    "lab-blockpage": (200, [("Server", "Protected by WireFilter")], LAB_BLOCKPAGE),
}
REQUIRED = {
    "dns-ir-10.10.34.34": ("dns", "national", "IR"),
    "dns-ir-10.10.34.35": ("dns", "national", "IR"),
    "dns-ir-10.10.34.36": ("dns", "national", "IR"),
    "dns-tr-195.175.254.2": ("dns", "national", "TR"),
    "dns-ru-193.58.251.1": ("dns", "national", "RU"),
    "header-wirefilter": ("header", "product", "ZZ"),
    "header-id-internet-positif": ("header", "national", "ID"),
    "fp-cloudflare-challenge-header": ("header", "false-positive", "ZZ"),
    "fp-cloudflare-challenge-title": ("title", "false-positive", "ZZ"),
    "fp-akamai-edge-server": ("header", "false-positive", "ZZ"),
}


@pytest.fixture(scope="module")
def db() -> FingerprintDB:
    return FingerprintDB.builtin()


@pytest.fixture(scope="module")
def lab_db() -> FingerprintDB:
    """The shipped database plus the lab's own file, as a scenario that names it loads."""
    return FingerprintDB.with_files([str(LAB_FILE)])


def entry(**fields: str) -> str:
    """One [[fingerprint]] table; ``fields`` override a valid body entry (value
    "DROP" removes a key)."""
    values = {
        "id": '"e"',
        "location": '"body"',
        "match": '"contains"',
        "pattern": '"censored"',
        "scope": '"isp"',
        "country": '"ZZ"',
        "description": '"test entry"',
        "source": '{ url = "https://example.org/", checked = 2026-11-28 }',
    }
    values.update(fields)
    lines = [f"{k} = {v}" for k, v in values.items() if v != "DROP"]
    return "[[fingerprint]]\n" + "\n".join(lines) + "\n"


def document(*entries: str) -> str:
    return "format = 1\n\n" + "\n".join(entries)


# ------------------------------------------------------------------ the database


def test_builtin_database_loads_once_and_has_the_required_entries(db: FingerprintDB) -> None:
    assert FingerprintDB.builtin() is db
    for fid, (location, scope, country) in REQUIRED.items():
        fp = db.get(fid)
        assert fp is not None, fid
        assert (fp.location, fp.scope, fp.country) == (location, scope, country), fid
    ids = [fp.id for fp in db.fingerprints]
    assert len(ids) == len(set(ids)) == len(db)
    for fp in db.fingerprints:
        assert fp.source.checked == dt.date(2026, 11, 28), fp.id
        assert fp.source.url and fp.description.strip(), fp.id
        assert fp.false_positive == (fp.scope == "false-positive")


def test_every_shipped_fingerprint_has_a_sample_here(db: FingerprintDB) -> None:
    # A new entry needs a sample in this file: the sample is its test.
    assert {fp.id for fp in db.fingerprints} == set(HTTP_SAMPLES) | set(DNS_SAMPLES)


@pytest.mark.parametrize("fid", sorted(DNS_SAMPLES))
def test_each_dns_fingerprint_matches_its_address(db: FingerprintDB, fid: str) -> None:
    fp = db.match_dns(DNS_SAMPLES[fid])
    assert fp is not None and fp.id == fid
    assert db.match_http(200, [], DNS_SAMPLES[fid].encode()) is None  # DNS entries only


@pytest.mark.parametrize("fid", sorted(HTTP_SAMPLES))
def test_each_http_fingerprint_matches_its_page(db: FingerprintDB, fid: str) -> None:
    status, headers, body = HTTP_SAMPLES[fid]
    fp = db.match_http(status, headers, body)
    assert fp is not None and fp.id == fid


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "10.10.34.33", "10.10.34.37", "195.175.254.3", "193.58.251.2", "2001:db8::1",
     "", "not-an-address", "10.10.34.34.5", "999.1.1.1", "1" * 100_000],
)  # fmt: skip
def test_other_dns_answers_match_nothing(db: FingerprintDB, address: str) -> None:
    assert db.match_dns(address) is None


def test_dns_address_forms(db: FingerprintDB) -> None:
    mapped = db.match_dns("::ffff:10.10.34.34")
    assert mapped is not None and mapped.id == "dns-ir-10.10.34.34"
    padded = db.match_dns(" 193.58.251.1 ")
    assert padded is not None and padded.country == "RU"


def test_cidr_entries_match_inside_the_network_only() -> None:
    db = FingerprintDB.load(
        document(
            entry(id='"net4"', location='"dns"', match='"cidr"', pattern='"198.51.100.0/24"'),
            entry(id='"net6"', location='"dns"', match='"cidr"', pattern='"2001:db8:5::/48"'),
        ),
        "cidr.toml",
    )
    assert getattr(db.match_dns("198.51.100.200"), "id", None) == "net4"
    assert getattr(db.match_dns("2001:db8:5::53"), "id", None) == "net6"
    assert db.match_dns("198.51.101.1") is None
    assert db.match_dns("2001:db8:6::1") is None


# --------------------------------------------------------------- false positives


def test_a_false_positive_wins_over_a_blockpage_on_the_same_page(db: FingerprintDB) -> None:
    # A blockpage body and WireFilter header, but Cloudflare says it challenged us.
    headers = [("Server", "Protected by WireFilter"), ("CF-Mitigated", "challenge")]
    fp = db.match_http(403, headers, LAB_BLOCKPAGE)
    assert fp is not None and fp.id == "fp-cloudflare-challenge-header"
    assert fp.scope == "false-positive"
    # The lab blockpage text served by Akamai's edge: Akamai's own page, not a censor's.
    fp = db.match_http(403, [("Server", "AkamaiGHost")], LAB_BLOCKPAGE)
    assert fp is not None and fp.id == "fp-akamai-edge-server"
    # A challenge title on a page that also names WireFilter.
    fp = db.match_http(503, [("Server", "Protected by WireFilter")], CLOUDFLARE_CHALLENGE)
    assert fp is not None and fp.false_positive


def test_false_positives_are_checked_first_wherever_they_are_in_the_file() -> None:
    text = document(
        entry(id='"block"', pattern='"censored"', scope='"national"', country='"XX"'),
        entry(id='"benign"', location='"title"', match='"exact"', pattern='"Just a check"',
              scope='"false-positive"'),
    )  # fmt: skip
    db = FingerprintDB.load(text, "order.toml")
    page = b"<title>Just  a CHECK</title> this page was censored"
    assert getattr(db.match_http(200, [], page), "id", None) == "benign"
    assert getattr(db.match_http(200, [], b"censored"), "id", None) == "block"


def test_the_lab_blockpage_needs_its_sentence_not_just_its_title(lab_db: FingerprintDB) -> None:
    titled = b"<html><head><title>Access denied</title></head><body>Sign in first.</body></html>"
    assert lab_db.match_http(403, [("Server", "nginx")], titled) is None
    wrapped = b"<p>This site has been blocked by\n   order of the\tauthorities</p>"
    assert getattr(lab_db.match_http(200, [], wrapped), "id", None) == "lab-blockpage"


def test_the_shipped_database_holds_nothing_of_the_lab(db: FingerprintDB) -> None:
    """Issue 11: real-world fingerprints only; the lab's pages pass through them."""
    assert not [fp.id for fp in db.fingerprints if fp.scope == "lab" or "lab" in fp.source.url]
    assert db.match_dns("198.19.0.80") is None
    from probe.lab.internet import CHALLENGE_PAGE
    from probe.lab.servers import BLOCK_PAGE, BLOCK_SERVER_HEADER

    # The lab imitates real products; the real products' entries recognise it.
    blockpage = db.match_http(200, [("Server", BLOCK_SERVER_HEADER)], BLOCK_PAGE)
    assert blockpage is not None and blockpage.id == "header-wirefilter"
    challenge = db.match_http(503, [("Server", "vantage-lab/1")], CHALLENGE_PAGE)
    assert challenge is not None and challenge.id == "fp-cloudflare-challenge-title"


@pytest.mark.parametrize("fid", sorted(LAB_SAMPLES))
def test_a_named_file_adds_its_entries_first(lab_db: FingerprintDB, fid: str) -> None:
    status, headers, body = LAB_SAMPLES[fid]
    fp = lab_db.match_http(status, headers, body)
    assert fp is not None and fp.id == fid
    address = lab_db.match_dns("198.19.0.80")
    assert address is not None and address.id == "dns-lab-blockpage"
    assert len(lab_db) == len(FingerprintDB.builtin()) + 3


def test_a_named_file_may_not_redefine_an_id(tmp_path: Path) -> None:
    twice = tmp_path / "twice.toml"
    twice.write_text(document(entry(id='"header-wirefilter"')))
    with pytest.raises(FingerprintError, match="header-wirefilter"):
        FingerprintDB.with_files([str(twice)])
    with pytest.raises(FingerprintError, match="cannot read"):
        FingerprintDB.with_files([str(tmp_path / "missing.toml")])
    assert FingerprintDB.with_files([]) is FingerprintDB.builtin()


# ------------------------------------------------------------------ normal pages


@pytest.mark.parametrize(
    ("status", "headers", "body"),
    [
        (200, NORMAL_HEADERS, NORMAL_PAGE),
        (301, [("Location", "https://positif.example/internet")], b""),
        (200, [("Server", "WireFilter-lookalike"), ("X-Note", "protected by wirefilter")], b""),
        (200, [("cf-mitigated", "block")], b"<title>Just a moment, please</title>"),
        (200, [("Server", "AkamaiNetStorage")], AKAMAI_DENIED.replace(b"#18", b"#")),
        (None, [], b""),
        (204, [], b"10.10.34.34 195.175.254.2"),
    ],
)
def test_normal_pages_match_nothing(
    db: FingerprintDB, status: int | None, headers: Headers, body: bytes
) -> None:
    assert db.match_http(status, headers, body) is None


# --------------------------------------------------------------- hostile input


def test_a_huge_body_is_cut_at_the_limit_quickly(lab_db: FingerprintDB) -> None:
    db = lab_db  # its body entry is the phrase below
    phrase = b"blocked by order of the authorities"
    start = time.perf_counter()
    late = db.match_http(200, [], b"x" * BODY_LIMIT + phrase + b"y" * (10 << 20))
    early = db.match_http(200, [], phrase + b"<" * (10 << 20))
    titles = db.match_http(200, [], b"<title " * (2 << 20))
    assert time.perf_counter() - start < 2.0
    assert late is None
    assert early is not None and early.id == "lab-blockpage"
    assert titles is None


def test_binary_garbage_is_decoded_leniently(db: FingerprintDB, lab_db: FingerprintDB) -> None:
    garbage = bytes(range(256)) * 4096 + b"\xff\xfe\x00<title>\xc3\x28Just a moment...</title>"
    assert db.match_http(200, [("Server", "\x00\xff")], garbage) is None
    assert title_of(garbage) is None  # the title is beyond the limit
    broken = b"\xff\xfe<TITLE>\xc3Just a moment...</TITLE>\x00\x01\x02"
    assert title_of(broken) == "\ufffdJust a moment..."
    fp = lab_db.match_http(200, [], b"\x80\x81blocked by order of the authorities\xfe")
    assert fp is not None and fp.id == "lab-blockpage"


def test_header_names_and_values_in_odd_case(db: FingerprintDB) -> None:
    fp = db.match_http(200, [("SERVER", "  protected BY   WireFilter  ")], b"")
    assert fp is not None and fp.id == "header-wirefilter"
    fp = db.match_http(302, [("lOcAtIoN", "HTTP://Internet-Positif.ORG/")], b"")
    assert fp is not None and fp.id == "header-id-internet-positif"
    fp = db.match_http(403, [("Cf-MITIGATED", "Challenge")], b"")
    assert fp is not None and fp.id == "fp-cloudflare-challenge-header"


def test_floods_of_headers_are_bounded(db: FingerprintDB) -> None:
    flood = [("X-Junk", "a" * 100_000)] * 5_000 + [("Server", "Protected by WireFilter")]
    start = time.perf_counter()
    assert db.match_http(200, flood, b"") is None  # past the header budget: not looked at
    assert time.perf_counter() - start < 2.0
    first = [("Server", "Protected by WireFilter")] + flood
    assert getattr(db.match_http(200, first, b""), "id", None) == "header-wirefilter"


def test_regex_work_does_not_grow_with_the_input() -> None:
    # The worst regex the rules allow, against input built to make it backtrack.
    pattern = "aaa" + "a{0,15}" + "a{0,15}" + "x"
    assert regex_problem(pattern) is None
    db = FingerprintDB.load(
        document(
            entry(id='"rb"', match='"regex"', pattern=f"'{pattern}'"),
            entry(id='"rh"', location='"header"', header='"X-A"', match='"regex"',
                  pattern=f"'{pattern}'"),
            entry(id='"rt"', location='"title"', match='"regex"', pattern=f"'{pattern}'"),
        ),
        "worst.toml",
    )  # fmt: skip
    start = time.perf_counter()
    body = b"<title>" + b"a" * 500 + b"</title>" + b"a" * (10 << 20)
    assert db.match_http(200, [("X-A", "a" * 100_000)] * 1000, body) is None
    assert time.perf_counter() - start < 2.0


# ---------------------------------------------------------------------- regexes


def test_regex_fingerprints_match_case_insensitively_where_their_start_is_found() -> None:
    db = FingerprintDB.load(
        document(
            entry(id='"body-re"', match='"regex"',
                  pattern=r"'blocked (?:by|under) (?:court|ministry) order \d{1,6}'"),
            entry(id='"title-re"', location='"title"', match='"regex"',
                  pattern=r"'^site blocked( - [a-z]{2})?$'"),
            entry(id='"header-re"', location='"header"', header='"Location"', match='"regex"',
                  pattern=r"'https?://block\.example/\?u='"),
        ),
        "re.toml",
    )  # fmt: skip
    hit = db.match_http(200, [], b"<p>Blocked UNDER ministry\n order 4711.</p>")
    assert getattr(hit, "id", None) == "body-re"
    titled = db.match_http(200, [], b"<title>Site Blocked - TR</title>")
    assert getattr(titled, "id", None) == "title-re"
    assert db.match_http(200, [], b"<title>This site blocked</title>") is None  # anchored
    moved = db.match_http(302, [("location", "HTTPS://BLOCK.example/?u=x")], b"")
    assert getattr(moved, "id", None) == "header-re"
    assert db.match_http(200, [], b"blocked by court order") is None


def test_a_regex_is_tried_at_a_bounded_number_of_places() -> None:
    db = FingerprintDB.load(
        document(entry(match='"regex"', pattern=r"'blocked \d{3}'")), "tries.toml"
    )
    near = b"blocked x " * (MAX_REGEX_TRIES - 1) + b"blocked 451"
    far = b"blocked x " * MAX_REGEX_TRIES + b"blocked 451"
    assert db.match_http(200, [], near) is not None
    assert db.match_http(200, [], far) is None


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("blocked.*here", "unbounded"),
        ("blocked.+here", "unbounded"),
        ("blocked.{2,}", "unbounded"),
        ("blocked(ab){0,3}", "group may not be repeated"),
        ("blocked(a|b){0,2}", "group may not be repeated"),
        ("blocked(a|b)+", "group may not be repeated"),
        ("blocked(a{0,9}|b{0,9})?(c{0,9})?", "too many ways"),
        (r"blocked(a)\1", "backreferences"),
        ("blocked(?=here)", "groups are allowed"),
        ("blocked(?i:x)", "groups are allowed"),
        ("blocked|denied", "top level"),
        ("ab?c", "literal characters"),
        (r"\d{3} blocked", "literal characters"),
        ("blo.{0,99}.{0,99}", "too many ways"),
        ("blocked" + "a?" * 9, "too many ways"),
        ("blocked" + "x" * 200, "longer than"),
    ],
)
def test_complex_regexes_are_refused(pattern: str, reason: str) -> None:
    problem = regex_problem(pattern)
    assert problem is not None and reason in problem
    with pytest.raises(FingerprintError, match=r"fingerprint\[0\]\.pattern \(id 'e'\): regex"):
        FingerprintDB.load(document(entry(match='"regex"', pattern=f"'{pattern}'")), "x.toml")


def test_regex_prefix() -> None:
    assert regex_prefix("^Just a moment") == "just a moment"
    assert regex_prefix(r"www\.block\.example/x?") == "www.block.example/"
    assert regex_prefix(r"abc\d") == "abc"
    assert regex_prefix("(?:abc)") == ""


# ------------------------------------------------------------------------ titles


@pytest.mark.parametrize(
    ("body", "title"),
    [
        (b"<html><head><title>Example</title></head></html>", "Example"),
        (b"<HEAD><TiTlE lang='en'>\n  Access\n\tDenied  </tItLe>", "Access Denied"),
        (b"<title>Caf&eacute; &amp; Bar&nbsp;Menu</title>", "Caf\u00e9 & Bar Menu"),
        (b"<title>Stra\xc3\x9fe</title>", "Stra\u00dfe"),
        (b"<title>never closed\n and more", "never closed and more"),
        (b"<title>   </title>", None),
        (b"<titles>not a title</titles>", None),
        (b"<html><body>no title here</body></html>", None),
        (b"", None),
        (b"<title>first</title><svg><title>second</title></svg>", "first"),
    ],
)
def test_title_of(body: bytes, title: str | None) -> None:
    assert title_of(body) == title


def test_title_of_is_bounded() -> None:
    long = title_of(b"<title>" + b"word " * 10_000 + b"</title>")
    assert long is not None and len(long) == TITLE_LIMIT and long.startswith("word word")
    assert title_of(b" " * BODY_LIMIT + b"<title>late</title>") is None
    start = time.perf_counter()
    assert title_of(b"<title " * (4 << 20)) is None
    assert title_of(b"<title>" + b"&amp;" * (4 << 20)) == "&" * TITLE_LIMIT
    assert time.perf_counter() - start < 2.0


# ------------------------------------------------------------------ bad files


def error_for(text: str) -> FingerprintError:
    with pytest.raises(FingerprintError) as info:
        FingerprintDB.load(text, "bad.toml")
    return info.value


@pytest.mark.parametrize(
    ("fields", "key", "fid", "reason"),
    [
        ({"location": '"url"'}, "location", "x", "not one of dns, body, header, title"),
        ({"location": '"dns"', "match": '"cidr"', "pattern": '"10.0.0.0/33"'}, "pattern", "x",
         "not a network"),
        ({"location": '"dns"', "match": '"cidr"', "pattern": '"10.10.34.34/24"'}, "pattern", "x",
         "host bits set"),
        ({"location": '"dns"', "match": '"exact"', "pattern": '"10.10.34"'}, "pattern", "x",
         "not an IP address"),
        ({"match": '"regex"', "pattern": "'blocked [a-'"}, "pattern", "x",
         "not a valid regular expression"),
        ({"id": "DROP"}, "id", None, "is required"),
        ({"id": '"Has Spaces"'}, "id", "Has Spaces", "not a lower-case id"),
        ({"location": '"dns"', "match": '"contains"'}, "match", "x", "does not apply to dns"),
        ({"match": '"cidr"'}, "match", "x", "does not apply to body"),
        ({"location": '"header"'}, "header", "x", "is required"),
        ({"location": '"header"', "header": '"Bad Name:"'}, "header", "x", "not a header name"),
        ({"header": '"Server"'}, "header", "x", 'only location = "header"'),
        ({"pattern": '"  \\t "'}, "pattern", "x", "must not be empty"),
        ({"pattern": '""'}, "pattern", "x", "must not be empty"),
        ({"scope": '"government"'}, "scope", "x", "not one of"),
        ({"country": '"Iran"'}, "country", "x", "two-letter"),
        ({"description": "DROP"}, "description", "x", "is required"),
        ({"source": "DROP"}, "source", "x", "is required"),
        ({"source": '{ url = "https://example.org/" }'}, "source.checked", "x", "is required"),
        ({"source": '{ url = "u", checked = "28 Nov" }'}, "source.checked", "x", "not a date"),
        ({"colour": '"red"'}, "colour", "x", "unknown key"),
    ],
)  # fmt: skip
def test_malformed_entries_name_the_entry_and_key(
    fields: dict[str, str], key: str, fid: str | None, reason: str
) -> None:
    if "id" not in fields:
        fields = {"id": '"x"', **fields}
    err = error_for(document(entry(id='"fine"'), entry(**fields)))
    assert err.origin == "bad.toml"
    assert err.index == 1 and err.fingerprint_id == fid
    assert err.key == f"fingerprint[1].{key}"
    assert reason in err.reason
    message = str(err)
    assert message.startswith("bad.toml: fingerprint[1].")
    assert f"{key}" in message and reason in message
    if fid:
        assert f"(id {fid!r})" in message


def test_duplicate_ids_name_both_entries() -> None:
    err = error_for(document(entry(id='"same"'), entry(id='"other"'), entry(id='"same"')))
    assert err.key == "fingerprint[2].id" and err.fingerprint_id == "same"
    assert "duplicate id 'same'" in str(err) and "fingerprint[0]" in str(err)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("format = 2\n", "format 1, not 2"),
        ("fingerprint = []\n", "format: is required"),
        ("format = 1\nfingerprint = 3\n", "fingerprint: expected a list"),
        ("format = 1\nfingerprint = [1]\n", "fingerprint[0]: expected a table"),
        ("format = 1\nextra = true\n", "extra: unknown key"),
        ("format = 1\n[[fingerprint]\n", "not valid TOML"),
    ],
)
def test_malformed_files(text: str, needle: str) -> None:
    err = error_for(text)
    assert str(err).startswith("bad.toml: ") and needle in str(err)


def test_an_empty_database_matches_nothing() -> None:
    db = FingerprintDB.load("format = 1\n", "empty.toml")
    assert len(db) == 0
    assert db.match_dns("10.10.34.34") is None
    assert db.match_http(200, [("Server", "Protected by WireFilter")], LAB_BLOCKPAGE) is None
