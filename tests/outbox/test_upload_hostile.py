"""One upload pass against a loopback stand-in collector: the protocol as sent, and
every way a collector can answer badly. The rule under test: nothing leaves the outbox
unless the answer acknowledged its uid."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Iterator

import pytest
from starlette.responses import JSONResponse, Response, StreamingResponse

from probe.config import ConfigError
from probe.outbox import Outcome, backlog, rejected_counts, upload_now
from probe.outbox.queue import rejection_mark
from probe.outbox.upload import MAX_RECEIPT
from probe.privacy import exit_scrub
from tests.fixtures import Certs
from tests.outbox.conftest import Probe, measurements, outbox_rows, vantage_cli, write
from tests.outbox.standin import Received, StandIn


@pytest.fixture
def enrolled(probe: Probe, standin: StandIn) -> Probe:
    probe.enroll_at(standin.url, standin.credential)
    return probe


def run(p: Probe, **kw):
    return asyncio.run(upload_now(p.cfg, p.store, **kw))


def test_a_pass_sends_batches_oldest_first_and_empties_the_outbox(
    enrolled: Probe, standin: StandIn
) -> None:
    p = enrolled.with_config(collector__batch_size="40")
    uids = p.queue(100)
    report = run(p)
    assert (report.outcome, report.accepted, report.left) == (Outcome.DRAINED, 100, 0)
    assert [len(r.uids) for r in standin.received] == [40, 40, 20]
    assert [u for r in standin.received for u in r.uids] == uids  # oldest first
    first = standin.received[0].headers
    assert first["authorization"] == f"Bearer {standin.credential}"
    assert first["content-encoding"] == "gzip" and first["content-type"] == "application/json"
    assert [r.headers["x-vantage-backlog"] for r in standin.received] == ["60", "20", "0"]
    assert backlog(p.store) == 0 and outbox_rows(p.store) == {}
    assert set(standin.stored) == set(uids)
    # What the collector got is what the store holds, scrubbed on the way out.
    held = p.store.documents([uids[0]])[0]
    assert standin.stored[uids[0]] == exit_scrub(p.cfg.data_dir()).document(held)


def test_duplicates_are_acknowledged_and_rejections_kept(enrolled: Probe, standin: StandIn) -> None:
    uids = enrolled.queue(10)
    standin.stored[uids[0]] = {}  # it has this one already (a batch re-sent after a crash)
    standin.reject = {uids[1]: "test_keys.queries[0].t: must be >= t0", uids[2]: "bad"}
    report = run(enrolled)
    assert (report.accepted, report.duplicate, report.rejected) == (7, 1, 2)
    assert report.outcome is Outcome.DRAINED and report.left == 0
    rows = outbox_rows(enrolled.store)
    assert set(rows) == {uids[1], uids[2]}
    assert rows[uids[1]]["last_error"] == rejection_mark("test_keys.queries[0].t: must be >= t0")
    assert sum(rejected_counts(enrolled.store).values()) == 2
    # Not sent again by the next pass...
    standin.received.clear()
    assert run(enrolled).outcome is Outcome.DRAINED and standin.received == []
    # ...until asked to (the collector was upgraded).
    standin.reject = {}
    report = run(enrolled, retry_rejected=True)
    assert report.accepted == 2 and outbox_rows(enrolled.store) == {}


def _hostile(answer: Response) -> object:
    return lambda rec: answer


def _huge() -> Response:
    async def body() -> AsyncIterator[bytes]:
        chunk = b"x" * 65536
        for _ in range(MAX_RECEIPT // len(chunk) * 4):
            yield chunk

    return StreamingResponse(body(), media_type="application/json")


def _bomb() -> Response:
    z = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip
    data = z.compress(b"[" * (MAX_RECEIPT * 4)) + z.flush()
    return Response(data, headers={"content-encoding": "gzip", "content-type": "application/json"})


@pytest.mark.parametrize(
    ("answer", "outcome", "message"),
    [
        (Response(b"<html>OK</html>"), Outcome.PROTOCOL, "malformed answer: not JSON"),
        (JSONResponse({"accepted": 3}), Outcome.PROTOCOL, "no results list"),
        (JSONResponse({"results": [{"measurement_uid": 5}]}), Outcome.PROTOCOL, "results"),
        (JSONResponse({"results": []}), Outcome.PROTOCOL, "have no result"),
        (_huge(), Outcome.PROTOCOL, "larger than"),
        (_bomb(), Outcome.PROTOCOL, "larger than"),
        (Response(b"garbage", headers={"content-encoding": "gzip"}), Outcome.PROTOCOL, "unreadable"),
        (JSONResponse({"error": "boom"}, 500), Outcome.UNREACHABLE, "HTTP 500: boom"),
        (JSONResponse({"error": "bad"}, 400), Outcome.PROTOCOL, "HTTP 400: bad"),
        (JSONResponse({"error": "not yours"}, 403), Outcome.PROTOCOL, "HTTP 403"),
        (Response(status_code=307, headers={"location": "https://x.test/"}), Outcome.PROTOCOL,
         "redirected"),
        (JSONResponse({"error": "revoked"}, 401), Outcome.REFUSED, "re-enroll"),
        (Response(status_code=429, headers={"retry-after": "3600"}), Outcome.BUSY,
         "retry after 3600"),
    ],
)  # fmt: skip
def test_a_bad_answer_acknowledges_nothing(
    enrolled: Probe, standin: StandIn, answer: Response, outcome: Outcome, message: str
) -> None:
    uids = enrolled.queue(5)
    standin.on_upload = _hostile(answer)
    report = run(enrolled, rate_limit_patience=0)
    assert report.outcome is outcome
    assert message in report.error
    assert report.left == 5 and set(outbox_rows(enrolled.store)) == set(uids)
    assert all(r["last_error"] is None for r in outbox_rows(enrolled.store).values())
    # The collector recovers: everything arrives, once.
    standin.on_upload = None
    assert run(enrolled).accepted == 5 and backlog(enrolled.store) == 0


def test_only_what_is_acknowledged_by_uid_leaves(enrolled: Probe, standin: StandIn) -> None:
    uids = enrolled.queue(6)

    def half(rec: Received) -> Response:
        results = [{"measurement_uid": u, "status": "accepted"} for u in rec.uids[:3]]
        results += [{"measurement_uid": "f" * 36, "status": "accepted"}]  # never sent
        return JSONResponse({"accepted": 6, "results": results})

    standin.on_upload = half
    report = run(enrolled)
    assert report.outcome is Outcome.PROTOCOL and "does not match the request" in report.error
    assert report.accepted == 3
    rows = outbox_rows(enrolled.store)
    assert set(rows) == set(uids[3:])
    assert all(r["attempts"] == 1 for r in rows.values())


def test_a_slow_drip_answer_is_cut_off(probe: Probe, standin: StandIn) -> None:
    p = probe.with_config(collector__timeout="0.5")
    p.enroll_at(standin.url, standin.credential)
    p.queue(2)

    async def drip() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b" "
            await asyncio.sleep(0.2)

    standin.on_upload = lambda rec: StreamingResponse(drip(), media_type="application/json")
    report = run(p)
    assert report.outcome is Outcome.UNREACHABLE and "took too long" in report.error
    assert backlog(p.store) == 2


def test_413_halves_the_requests(enrolled: Probe, standin: StandIn) -> None:
    p = enrolled.with_config(collector__batch_size="16")
    uids = p.queue(20)

    def small(rec: Received) -> Response | None:
        return Response(status_code=413) if len(rec.uids) > 3 else None

    standin.on_upload = small
    report = run(p)
    assert report.outcome is Outcome.DRAINED and report.accepted == 20
    assert set(standin.stored) == set(uids)
    accepted_sizes = [len(r.uids) for r in standin.received if len(r.uids) <= 3]
    assert sum(accepted_sizes) == 20


def test_413_for_a_single_measurement_rejects_it(enrolled: Probe, standin: StandIn) -> None:
    uids = enrolled.queue(3)
    standin.on_upload = lambda rec: Response(status_code=413) if uids[1] in rec.uids else None
    report = run(enrolled)
    assert report.outcome is Outcome.DRAINED and (report.accepted, report.rejected) == (2, 1)
    assert outbox_rows(enrolled.store)[uids[1]]["last_error"] == rejection_mark(
        "too large for the collector (HTTP 413)"
    )


def test_rate_limits_are_waited_out_by_the_command(enrolled: Probe, standin: StandIn) -> None:
    enrolled.queue(3)
    refusals = iter([Response(status_code=429, headers={"retry-after": "7"})] * 2)
    standin.on_upload = lambda rec: next(refusals, None)
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    report = run(enrolled, sleep=sleep)
    assert report.outcome is Outcome.DRAINED and report.accepted == 3 and waits == [7, 7]
    # A collector that keeps refusing exhausts the patience: the pass ends, nothing lost.
    enrolled.queue(2)
    standin.on_upload = lambda rec: Response(status_code=503, headers={"retry-after": "0"})
    waits.clear()
    report = run(enrolled, sleep=sleep, rate_limit_patience=5)
    assert report.outcome is Outcome.BUSY and report.left == 2 and waits == [1.0] * 5


def test_another_probes_measurements_are_kept_not_sent(enrolled: Probe, standin: StandIn) -> None:
    mine = enrolled.queue(2)
    other = write(enrolled.store, measurements("00000000-0000-4000-8000-00000000beef", 2))
    report = run(enrolled)
    assert report.outcome is Outcome.DRAINED and (report.accepted, report.rejected) == (2, 2)
    assert set(standin.stored) == set(mine)
    rows = outbox_rows(enrolled.store)
    assert set(rows) == set(other) and "enrolled as" in rows[other[0]]["last_error"]


@pytest.fixture
def cli_probe(probe: Probe, standin: StandIn) -> Iterator[Probe]:
    probe.enroll_at(standin.url, standin.credential)
    probe.queue(4)
    probe.store.close()  # the command opens it itself
    yield probe


def test_cli_upload_exit_codes(cli_probe: Probe, standin: StandIn) -> None:
    data = cli_probe.cfg.data_dir()
    standin.on_upload = _hostile(Response(b"nonsense"))
    proc = vantage_cli("upload", data_dir=data)
    assert proc.returncode == 76 and "malformed answer" in proc.stderr
    assert "0 accepted" in proc.stdout and "4 waiting" in proc.stdout
    standin.on_upload = _hostile(JSONResponse({"error": "revoked"}, 401))
    proc = vantage_cli("upload", data_dir=data)
    assert proc.returncode == 77 and "re-enroll" in proc.stderr
    standin.stop()
    proc = vantage_cli("upload", data_dir=data)
    assert proc.returncode == 75 and "cannot reach" in proc.stderr
    standin.start()  # same port
    standin.on_upload = None
    proc = vantage_cli("upload", data_dir=data)
    assert proc.returncode == 0, proc.stderr
    assert "4 accepted, 0 already there, 0 rejected; 0 waiting" in proc.stdout


def test_https_with_the_configured_ca_bundle(probe: Probe, certs: Certs, ca_file: str) -> None:
    with StandIn(tls=certs.leaf("127.0.0.1")) as tls_standin:
        uids = probe.queue(3)
        probe.enroll_at(tls_standin.url, tls_standin.credential)
        report = run(probe)  # the fixture CA is not among the system's
        assert report.outcome is Outcome.UNREACHABLE and "CERTIFICATE_VERIFY_FAILED" in report.error
        trusting = probe.with_config(collector__ca_bundle=ca_file)
        report = run(trusting)
        assert report.outcome is Outcome.DRAINED and set(tls_standin.stored) == set(uids)
    missing = probe.with_config(collector__ca_bundle=str(probe.cfg.data_dir() / "nope.pem"))
    with pytest.raises(ConfigError, match="collector.ca_bundle: cannot load"):
        run(missing)
