"""The JSON Schema in ``schema/measurement.schema.json`` against what ``schema.wire`` emits.

Measurements are built literally (no engine, no network) so every observation type
appears both failed and successful, and the wire round trip can be compared exactly.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from jsonschema import Draft202012Validator, ValidationError

from schema import wire
from schema.model import (
    FAILURES,
    OPERATIONS,
    TARGET_KINDS,
    DNSAnswer,
    DNSQuery,
    Expectations,
    HTTPTransaction,
    Measurement,
    Source,
    Target,
    TCPConnect,
    TLSHandshake,
    VantagePoint,
)

START = dt.datetime(2024, 5, 1, 12, 30, 45, tzinfo=dt.UTC)
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x80"  # not valid UTF-8
LEAF_DER = b"\x30\x82\x01\x0a\x02\x82\x01\x01\x00\xc3\xff"
ROOT_DER = b"\x30\x82\x02\x0b\x02\x82\x02\x01\x00\xa7\x00"
UNKNOWN = "unknown_failure: resolver returned YXDOMAIN"


def rich_measurement() -> Measurement:
    """An http target with every observation type, each once failed and once not."""
    target = Target(
        id="example-web",
        service="example",
        kind="http",
        host="www.example.test",
        ports=(443,),
        url="http://www.example.test/",
        method="GET",
        addresses=("192.0.2.10",),
        sni="example.test",
        expect=Expectations(asns=(64500,), cert_names=("example.test",), status=(200,)),
        source=Source("https://example.test/about", dt.date(2024, 4, 2)),
        role="diagnostic",
    )
    vantage = VantagePoint(
        probe_id="probe-7",
        software_version="0.3.1",
        platform="linux",
        architecture="x86_64",
        asn=64496,
        cc="DE",
        network_name="Example Net",
        network_type="wifi",
        resolver_ip="198.51.100.53",
        resolver_asn=64497,
        resolver_network_name="Example Resolver",
    )
    queries = [
        DNSQuery(
            hostname="www.example.test",
            query_type="A",
            engine="udp",
            resolver_address="198.51.100.53:53",
            t0=0.001,
            t=0.0213,
            rcode="NOERROR",
            answers=[
                DNSAnswer("CNAME", "example.test.", 300),
                DNSAnswer("A", "192.0.2.10", 60, 64500, "Example Net"),
                DNSAnswer("TXT", '"v=spf1 -all"', 60),
            ],
            raw_response=b"\x12\x34\x81\x80\x00\x01\x00\x02",
            system_resolver=True,
        ),
        DNSQuery(
            hostname="www.example.test",
            query_type="AAAA",
            engine="doh",
            resolver_address="https://dns.example.test/dns-query",
            t0=0.002,
            t=1.5,
            rcode="NXDOMAIN",
            failure="dns_nxdomain_error",
            failed_operation="resolve",
        ),
    ]
    tcp = [
        TCPConnect("192.0.2.10", 443, t0=0.03, t=0.05),
        TCPConnect(
            "2001:db8::10",
            443,
            t0=0.03,
            t=0.04,
            failure="connection_refused",
            failed_operation="connect",
        ),
    ]
    tls = [
        TLSHandshake(
            ip="192.0.2.10",
            port=443,
            server_name="example.test",
            t0=0.05,
            t=0.12,
            tls_version="TLSv1.3",
            cipher_suite="TLS_AES_128_GCM_SHA256",
            negotiated_protocol="h2",
            peer_certificates=[LEAF_DER, ROOT_DER],
        ),
        TLSHandshake(
            ip="2001:db8::10",
            port=443,
            server_name="example.test",
            t0=0.05,
            t=0.09,
            no_tls_verify=True,
            failure="ssl_unknown_authority",
            failed_operation="tls_handshake",
        ),
    ]
    requests = [  # a redirect chain of two hops, in request order
        HTTPTransaction(
            url="http://www.example.test/",
            method="GET",
            t0=0.13,
            t=0.2,
            request_headers=[("Host", "www.example.test"), ("Accept", "*/*")],
            address="192.0.2.10:80",
            status=301,
            response_headers=[
                ("Location", "https://www.example.test/logo.png"),
                ("Set-Cookie", "a=1"),
                ("Set-Cookie", "b=2"),
            ],
            body="Moved — see <a href=/logo.png>here</a>\n".encode(),
            body_length=46,
            body_sha256="ab" * 32,
        ),
        HTTPTransaction(
            url="https://www.example.test/logo.png",
            method="GET",
            t0=0.21,
            t=0.4,
            request_headers=[("Host", "www.example.test")],
            address="192.0.2.10:443",
            status=200,
            response_headers=[("Content-Type", "image/png")],
            body=PNG,
            body_is_truncated=True,
            body_length=70000,
            body_sha256="cd" * 32,
        ),
    ]
    return Measurement(
        measurement_uid="01HX0000000000000000000001",
        run_id="run-2024-05-01",
        target=target,
        vantage=vantage,
        start_time=START,
        test_runtime=0.41,
        queries=queries,
        tcp_connect=tcp,
        tls_handshakes=tls,
        requests=requests,
        annotations={"catalog": "default.toml", "origin": "scheduler"},
    )


def blocked_measurement() -> Measurement:
    """Everything fails: DNS with an open-ended failure, HTTP with no response at all."""
    target = Target(
        id="blocked-web",
        service="blocked",
        kind="http",
        host="blocked.example.test",
        url="https://blocked.example.test/",
        method="POST",
        body="ping",
        control=True,
    )
    vantage = VantagePoint(
        probe_id="probe-8",
        software_version="0.3.1",
        platform="darwin",
        architecture="arm64",
    )
    return Measurement(
        measurement_uid="01HX0000000000000000000002",
        run_id="run-2024-05-01",
        target=target,
        vantage=vantage,
        start_time=START,
        test_runtime=10.0,
        queries=[
            DNSQuery(
                hostname="blocked.example.test",
                query_type="A",
                engine="tcp",
                resolver_address="[2001:db8::53]:53",
                t0=0.0,
                t=0.7,
                rcode="YXDOMAIN",
                failure=UNKNOWN,
                failed_operation="resolve",
            )
        ],
        tcp_connect=[
            TCPConnect(
                "203.0.113.7",
                443,
                t0=0.8,
                t=5.8,
                failure="generic_timeout_error",
                failed_operation="connect",
            )
        ],
        requests=[
            HTTPTransaction(
                url="https://blocked.example.test/",
                method="POST",
                t0=5.9,
                t=10.0,
                failure="http_request_failed",
                failed_operation="http_round_trip",
            )
        ],
    )


def dns_only_measurement() -> Measurement:
    """A dns target with no observations at all (every list empty, nothing nullable set)."""
    return Measurement(
        measurement_uid="01HX0000000000000000000003",
        run_id="run-2024-05-02",
        target=Target(id="name", service="names", kind="dns", host="name.example.test"),
        vantage=VantagePoint(
            probe_id="probe-9", software_version="0.3.1", platform="", architecture=""
        ),
        start_time=START,
    )


MEASUREMENTS: dict[str, Callable[[], Measurement]] = {
    "rich": rich_measurement,
    "blocked": blocked_measurement,
    "dns_only": dns_only_measurement,
}


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    return Draft202012Validator(wire.json_schema())


@pytest.fixture(params=sorted(MEASUREMENTS))
def measurement(request: pytest.FixtureRequest) -> Measurement:
    return MEASUREMENTS[request.param]()


def on_the_wire(m: Measurement) -> dict[str, Any]:
    """What a reader gets: the JSONL line parsed back."""
    return json.loads(wire.dumps(m))  # type: ignore[no-any-return]


def error_list(validator: Draft202012Validator, doc: Any) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


# -- the schema itself ----------------------------------------------------------------


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    schema = wire.json_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == "https://vantage.invalid/schema/measurement-1.0.0.json"
    assert schema["title"]
    assert schema["properties"]["data_format_version"]["const"] == wire.DATA_FORMAT_VERSION


def _properties(node: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        for name, sub in (node.get("properties") or {}).items():
            yield f"{where}/{name}", sub
        for key, sub in node.items():
            yield from _properties(sub, f"{where}/{key}")
    elif isinstance(node, list):
        for i, sub in enumerate(node):
            yield from _properties(sub, f"{where}/{i}")


def test_every_property_is_described() -> None:
    schema = wire.json_schema()
    undescribed = [
        where
        for where, sub in _properties(schema)
        # Conditional subschemas (if/then, oneOf branches) only restate a property.
        if "/if/" not in where and "/oneOf/" not in where and not sub.get("description")
    ]
    assert undescribed == []
    for name in ("t0", "t"):
        assert (
            "seconds since the measurement start"
            in schema["$defs"]["query"]["properties"][name]["description"]
        )
    assert "UTC" in schema["properties"]["measurement_start_time"]["description"]


def test_vocabularies_match_the_model() -> None:
    defs = wire.json_schema()["$defs"]
    failure_branches = defs["failure"]["anyOf"]
    enums = [set(b["enum"]) for b in failure_branches if "enum" in b]
    assert enums == [set(FAILURES)]
    operation_enums = [set(b["enum"]) for b in defs["failed_operation"]["anyOf"] if "enum" in b]
    assert operation_enums == [set(OPERATIONS)]
    assert defs["target"]["properties"]["kind"]["enum"] == list(TARGET_KINDS)


# -- what to_wire emits validates, and comes back equal ---------------------------------


def test_fixtures_exercise_every_branch() -> None:
    """Guard against the fixtures silently losing the cases the schema tests rely on."""
    doc = on_the_wire(rich_measurement())
    keys = doc["test_keys"]
    assert [q["failure"] for q in keys["queries"]] == [None, "dns_nxdomain_error"]
    assert [c["status"]["success"] for c in keys["tcp_connect"]] == [True, False]
    assert [h["failure"] for h in keys["tls_handshakes"]] == [None, "ssl_unknown_authority"]
    assert keys["tls_handshakes"][1]["address"] == "[2001:db8::10]:443"
    assert len(keys["tls_handshakes"][0]["peer_certificates"]) == 2
    assert {k for a in keys["queries"][0]["answers"] for k in a} >= {
        "ipv4",
        "hostname",
        "value",
        "asn",
        "as_org_name",
    }
    assert doc["test_keys"]["queries"][0]["answers"][1]["asn"] == 64500
    assert "asn" not in doc["test_keys"]["queries"][0]["answers"][0]  # not an address
    assert doc["target"]["role"] == "diagnostic"
    # Newest hop first: the binary final response, then the text redirect.
    final, redirect = keys["requests"]
    assert final["response"]["body"]["format"] == "base64"
    assert redirect["response"]["code"] == 301
    assert isinstance(redirect["response"]["body"], str)
    assert keys["failure"] is None

    blocked = on_the_wire(blocked_measurement())
    assert blocked["test_keys"]["failure"] == UNKNOWN
    assert blocked["test_keys"]["requests"][0]["response"] is None
    assert "network_type" not in blocked["annotations"]


def test_wire_output_validates(validator: Draft202012Validator, measurement: Measurement) -> None:
    assert error_list(validator, wire.to_wire(measurement)) == []
    assert error_list(validator, on_the_wire(measurement)) == []


def test_round_trip_is_exact(measurement: Measurement) -> None:
    assert wire.from_wire(on_the_wire(measurement)) == measurement


def test_round_trip_keeps_binary_body_and_certificates() -> None:
    back = wire.from_wire(on_the_wire(rich_measurement()))
    assert back.requests[1].body == PNG
    assert back.tls_handshakes[0].peer_certificates == [LEAF_DER, ROOT_DER]
    assert [r.url for r in back.requests] == [
        "http://www.example.test/",
        "https://www.example.test/logo.png",
    ]


# -- the schema rejects wrong documents ----------------------------------------------


def _set(path: tuple[str | int, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        node: Any = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def _delete(key: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        del doc[key]

    return mutate


# (mutation, the path where the error must be reported)
WRONG: dict[str, tuple[Callable[[dict[str, Any]], None], tuple[str | int, ...]]] = {
    "failure outside the vocabulary": (
        _set(("test_keys", "queries", 1, "failure"), "dns_lookup_failed"),
        ("test_keys", "queries", 1, "failure"),
    ),
    "unknown_failure without detail": (
        _set(("test_keys", "tls_handshakes", 1, "failure"), "unknown_failure: "),
        ("test_keys", "tls_handshakes", 1, "failure"),
    ),
    "summary failure outside the vocabulary": (
        _set(("test_keys", "failure"), "blocked"),
        ("test_keys", "failure"),
    ),
    "failed_operation outside the vocabulary": (
        _set(("test_keys", "tcp_connect", 1, "failed_operation"), "dial"),
        ("test_keys", "tcp_connect", 1, "failed_operation"),
    ),
    "tcp success with a failure": (
        _set(("test_keys", "tcp_connect", 1, "status", "success"), True),
        ("test_keys", "tcp_connect", 1, "status"),
    ),
    "probe_asn without AS": (_set(("probe_asn",), "1234"), ("probe_asn",)),
    "resolver_asn without AS": (_set(("resolver_asn",), "as64497"), ("resolver_asn",)),
    "probe_cc lower case": (_set(("probe_cc",), "de"), ("probe_cc",)),
    "missing test_keys": (_delete("test_keys"), ()),
    "probe_ip not 127.0.0.1": (_set(("probe_ip",), "192.0.2.99"), ("probe_ip",)),
    "data_format_version 0.9": (_set(("data_format_version",), "0.9"), ("data_format_version",)),
    "ISO start time": (
        _set(("measurement_start_time",), "2024-05-01T12:30:45Z"),
        ("measurement_start_time",),
    ),
    "unexpected top-level key": (_set(("probe_email",), "x@example.test"), ()),
    "non-string annotation": (_set(("annotations", "retries"), 3), ("annotations", "retries")),
    "header triple": (
        _set(("test_keys", "requests", 0, "request", "headers_list", 0), ["Host", "a", "b"]),
        ("test_keys", "requests", 0, "request", "headers_list", 0),
    ),
    "body in an unknown encoding": (
        _set(("test_keys", "requests", 0, "response", "body"), {"format": "hex", "data": "00"}),
        ("test_keys", "requests", 0, "response", "body"),
    ),
    "A answer without ipv4": (
        _set(
            ("test_keys", "queries", 0, "answers", 1), {"answer_type": "A", "value": "x", "ttl": 1}
        ),
        ("test_keys", "queries", 0, "answers", 1),
    ),
}


@pytest.mark.parametrize("case", sorted(WRONG))
def test_schema_rejects_wrong_documents(validator: Draft202012Validator, case: str) -> None:
    mutate, where = WRONG[case]
    doc = on_the_wire(rich_measurement())
    assert error_list(validator, doc) == []  # the unmutated document is fine
    bad = copy.deepcopy(doc)
    mutate(bad)
    assert bad != doc
    errors = list(validator.iter_errors(bad))
    assert errors, f"schema accepted a document with {case}"
    # Rejected because of the mutated field: every error sits on the way to it (an
    # enclosing anyOf reports at its own level), and some error, maybe nested, at it.
    assert all(where[: len(e.absolute_path)] == tuple(e.absolute_path) for e in errors)
    assert where in set(_paths(errors))


def _paths(errors: Iterable[ValidationError]) -> Iterator[tuple[str | int, ...]]:
    for e in errors:
        yield tuple(e.absolute_path)
        yield from _paths(e.context)


def test_missing_test_keys_is_reported_as_required(validator: Draft202012Validator) -> None:
    doc = on_the_wire(rich_measurement())
    del doc["test_keys"]
    [error] = validator.iter_errors(doc)
    assert error.validator == "required"
    assert "'test_keys'" in error.message


# -- from_wire names the bad field ----------------------------------------------------


def test_from_wire_names_a_missing_measurement_uid() -> None:
    doc = on_the_wire(rich_measurement())
    del doc["measurement_uid"]
    with pytest.raises(wire.WireError, match="measurement_uid"):
        wire.from_wire(doc)


@pytest.mark.parametrize("version", ["0.9", None, 1])
def test_from_wire_names_a_wrong_data_format_version(version: Any) -> None:
    doc = on_the_wire(rich_measurement())
    doc["data_format_version"] = version
    with pytest.raises(wire.WireError, match="data_format_version"):
        wire.from_wire(doc)


def test_from_wire_accepts_the_document_it_rejects_only_for_the_field() -> None:
    """Control for the two tests above: the same document, unmutated, parses."""
    doc = on_the_wire(rich_measurement())
    assert wire.from_wire(doc).measurement_uid == "01HX0000000000000000000001"
