"""JSONL: byte for byte what `vantage run --json` prints, in order, filtered as asked."""

from __future__ import annotations

import datetime as dt
import json
import re

import jsonschema
import pytest

from probe.export import jsonl
from probe.store import Store
from schema import wire
from tests.export.conftest import export_bytes, lines


def test_each_line_is_byte_identical_to_run_json(engine, stored) -> None:
    got = lines(export_bytes(engine, "jsonl"))
    assert len(got) == len(stored) > 200
    for line, m in zip(got, stored, strict=True):
        assert line == wire.dumps(m).encode("utf-8"), m.measurement_uid
    # the awkward cases are really there: an exponent float, a base64 body, non-ASCII
    text = b"\n".join(got)
    assert re.search(rb'"t0":[0-9.]+e-0[0-9]', text)
    assert b'"body":{"format":"base64"' in text
    assert "Страница".encode() in text and b"\xe2\x80\xa8" in text  # raw UTF-8, U+2028 kept


def test_documents_round_trip_to_the_measurements(engine, stored) -> None:
    for line, m in zip(lines(export_bytes(engine, "jsonl")), stored, strict=True):
        assert wire.from_wire(json.loads(line)) == m


def test_same_documents_as_the_stores_own_reader(engine, db_url) -> None:
    store = Store(engine, outbox=False)
    mine = [json.loads(x) for x in lines(export_bytes(engine, "jsonl"))]
    assert mine == list(store.iter_documents())


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunk_size_does_not_change_the_bytes(engine, chunk) -> None:
    assert export_bytes(engine, "jsonl", chunk_size=chunk) == export_bytes(engine, "jsonl")


def test_every_line_is_valid_against_the_json_schema(engine) -> None:
    validator = jsonschema.Draft202012Validator(wire.json_schema())
    for line in lines(export_bytes(engine, "jsonl")):
        validator.validate(json.loads(line))


def _uids(engine, **filters) -> list[str]:
    return [
        json.loads(x)["measurement_uid"] for x in lines(export_bytes(engine, "jsonl", **filters))
    ]


def test_filters_select_exactly_the_matching_measurements(engine, stored) -> None:
    def expect(pred) -> list[str]:
        return [m.measurement_uid for m in stored if pred(m)]

    assert _uids(engine, service=["whatsapp", "signal"]) == expect(
        lambda m: m.target.service in ("whatsapp", "signal"))  # fmt: skip
    assert _uids(engine, cc=["ir"]) == expect(lambda m: m.vantage.cc == "IR")
    assert _uids(engine, asn=["AS9121", "3320"]) == expect(lambda m: m.vantage.asn in (9121, 3320))
    probe = stored[0].vantage.probe_id
    assert _uids(engine, probe=[probe]) == expect(lambda m: m.vantage.probe_id == probe)
    assert _uids(engine, blocking=["dns", "tls"]) == expect(
        lambda m: m.verdict is not None and m.verdict.blocking in ("dns", "tls"))  # fmt: skip
    assert _uids(engine, blocking=["true"]) == expect(
        lambda m: m.verdict is not None and isinstance(m.verdict.blocking, str))  # fmt: skip
    assert _uids(engine, blocking=["false"]) == expect(
        lambda m: m.verdict is not None and m.verdict.blocking is False)  # fmt: skip
    assert _uids(engine, blocking=["unknown"]) == expect(
        lambda m: m.verdict is None or m.verdict.blocking is None)  # fmt: skip
    # combined filters all apply
    assert _uids(engine, cc=["IR"], service=["telegram"]) == expect(
        lambda m: m.vantage.cc == "IR" and m.target.service == "telegram")  # fmt: skip


def test_time_range_since_inclusive_until_exclusive_date_includes_the_day(engine, stored) -> None:
    pivot = stored[len(stored) // 2].start_time
    since = pivot.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert _uids(engine, since=since) == [
        m.measurement_uid for m in stored if m.start_time >= pivot
    ]
    assert _uids(engine, until=since) == [m.measurement_uid for m in stored if m.start_time < pivot]
    day = stored[0].start_time.date()
    assert _uids(engine, since=day.isoformat(), until=day.isoformat()) == [
        m.measurement_uid for m in stored if m.start_time.date() == day
    ]
    # an offset is honoured: 02:00+02:00 is midnight UTC
    assert _uids(engine, since=f"{day}T02:00:00+02:00") == [
        m.measurement_uid for m in stored
        if m.start_time >= dt.datetime.combine(day, dt.time(), dt.UTC)
    ]  # fmt: skip


def test_encoder_falls_back_to_the_standard_library_for_exotic_floats() -> None:
    for value in (4.5e-05, 1e16, 1.5e300, -3e-07, 0.0001, 123.25, 0.0):
        doc = {"t0": value, "list": [value], "s": "1e5, 0.00001"}
        assert jsonl.dumps(doc) == json.dumps(doc, ensure_ascii=False,
                                              separators=(",", ":")).encode()  # fmt: skip
    nan = {"x": float("nan")}
    assert jsonl._stdlib(nan) == b'{"x":NaN}'


def test_same_bytes_without_orjson(engine, monkeypatch) -> None:
    from probe.export import reader

    with_orjson = export_bytes(engine, "jsonl")
    monkeypatch.setattr(jsonl, "orjson", None)
    monkeypatch.setattr(reader, "loads", reader._slow_loads)
    assert export_bytes(engine, "jsonl") == with_orjson
