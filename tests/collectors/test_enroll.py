"""POST /api/v1/enroll: tokens good, expired, used up, revoked; 409; secrets stored hashed."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
import sqlalchemy as sa

from collectors import auth
from schema import tables
from tests.collectors.conftest import Collector

API = "/api/v1/enroll"


def enroll(c: Collector, token: str, probe_id: str | None = None):  # noqa: ANN201
    return c.http.post(API, json={"token": token, "probe_id": probe_id or str(uuid.uuid4())})


def test_a_good_token_enrolls_and_the_credential_authenticates(collector: Collector) -> None:
    token = collector.enroll_token(label="Berlin")
    probe_id = str(uuid.uuid4())
    r = enroll(collector, token, probe_id)
    assert r.status_code == 201, r.text
    answer = r.json()
    assert answer["probe_id"] == probe_id
    assert answer["credential"].startswith(auth.CREDENTIAL_PREFIX)
    assert auth.authenticate(collector.engine, f"Bearer {answer['credential']}") == probe_id
    assert auth.list_tokens(collector.engine)[0]["uses"] == 1


def test_only_hashes_are_stored(collector: Collector) -> None:
    token = collector.enroll_token()
    credential = enroll(collector, token).json()["credential"]
    with collector.engine.connect() as conn:
        stored = [
            str(tuple(row))
            for table in (tables.enroll_tokens, tables.probes)
            for row in conn.execute(sa.select(table))
        ]
    text = " ".join(stored)
    assert token not in text and credential not in text
    assert auth.digest(token) in text and auth.digest(credential) in text


def test_an_expired_token_is_401(collector: Collector) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    r = enroll(collector, collector.enroll_token(expires_at=past))
    assert r.status_code == 401
    assert r.json()["error"] == "the enroll token is expired"


def test_a_used_up_token_is_401_and_a_refused_enrollment_costs_no_use(
    collector: Collector,
) -> None:
    token = collector.enroll_token(max_uses=2)
    first = str(uuid.uuid4())
    assert enroll(collector, token, first).status_code == 201
    assert enroll(collector, token, first).status_code == 409  # enrolled already: no use taken
    assert enroll(collector, token).status_code == 201
    r = enroll(collector, token)
    assert r.status_code == 401
    assert r.json()["error"] == "the enroll token is used up"
    assert auth.list_tokens(collector.engine)[0]["uses"] == 2
    assert collector.count("probes") == 2


def test_a_revoked_token_is_401_but_its_probes_stay(collector: Collector) -> None:
    token, token_id = auth.create_token(collector.engine)
    probe_id = str(uuid.uuid4())
    credential = enroll(collector, token, probe_id).json()["credential"]
    assert auth.revoke_token(collector.engine, token_id)
    assert not auth.revoke_token(collector.engine, token_id)  # once
    r = enroll(collector, token)
    assert r.status_code == 401
    assert r.json()["error"] == "the enroll token is revoked"
    assert auth.authenticate(collector.engine, f"Bearer {credential}") == probe_id


def test_an_unknown_token_is_401(collector: Collector) -> None:
    r = enroll(collector, "vet_not-a-token")
    assert r.status_code == 401
    assert r.json()["error"] == "unknown enroll token"


def test_an_enrolled_probe_is_409_until_revoked_and_restored(collector: Collector) -> None:
    probe_id = str(uuid.uuid4())
    old = enroll(collector, collector.enroll_token(), probe_id).json()["credential"]
    r = enroll(collector, collector.enroll_token(), probe_id)
    assert r.status_code == 409
    assert probe_id in r.json()["error"]
    assert auth.revoke_probe(collector.engine, probe_id)
    # Revoked stays revoked: any enroll token cannot take the id over (issue 18, 11).
    taken = enroll(collector, collector.enroll_token(), probe_id)
    assert taken.status_code == 409
    assert "restores it" in taken.json()["error"]
    assert not auth.restore_probe(collector.engine, str(uuid.uuid4()))
    assert auth.restore_probe(collector.engine, probe_id)  # the operator's decision
    again = enroll(collector, collector.enroll_token(), probe_id)
    assert again.status_code == 201
    with pytest.raises(auth.AuthError, match="unknown"):
        auth.authenticate(collector.engine, f"Bearer {old}")


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"not json", "not JSON"),
        (b"[]", "JSON object"),
        (b'{"probe_id": "6d1e1c55-0d7a-4e0e-8a57-3c1f0a4b3e21"}', "token"),
        (b'{"token": "t", "probe_id": "probe-7"}', "probe_id: not a UUID"),
        (b'{"token": "t", "probe_id": 7}', "probe_id"),
        (b'{"token": "t", "probe_id": "6d1e1c550d7a4e0e8a573c1f0a4b3e21"}', "usual form"),
    ],
)
def test_malformed_bodies_are_422(collector: Collector, body: bytes, words: str) -> None:
    r = collector.http.post(API, content=body)
    assert r.status_code == 422, r.text
    assert words in r.json()["error"]


def test_enrollment_is_rate_limited_per_address(make_collector) -> None:
    c = make_collector(address_rate=0.01, address_burst=3)
    codes = [enroll(c, "vet_guess").status_code for _ in range(4)]
    assert codes == [401, 401, 401, 429]


def test_the_health_endpoint_and_unknown_paths(collector: Collector) -> None:
    assert collector.http.get("/api/v1/health").json() == {"ok": True}
    r = collector.http.get("/api/v1/nothing-here")
    assert r.status_code == 404
    assert "error" in r.json()
