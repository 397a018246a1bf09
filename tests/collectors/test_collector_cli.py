"""``vantage collector ...``: the commands, and a real ``serve`` process on loopback
(PostgreSQL, and SQLite for the quick local trial) started, stopped and started again."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from collectors.cli import _ConfigError, parse_expiry
from collectors.control import ControlSettings
from collectors.ratelimit import RateLimiter, retry_after
from probe.engine.context import Timeouts
from probe.engine.dns import ResolverSpec
from schema import wire
from schema.model import Target
from tests.collectors.conftest import Collector, CollectorProcess
from tests.collectors.samples import doc
from tests.fixtures import closed_port

ROOT = Path(__file__).resolve().parents[2]


def vantage(
    *args: str, db: str | None = None, code: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "VANTAGE_COLLECTOR_DB"}
    if db is not None:
        env["VANTAGE_COLLECTOR_DB"] = db
    prog = code or "from probe.cli import main; import sys; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", prog, *args],
        capture_output=True, text=True, cwd=ROOT, timeout=120, env=env,
    )  # fmt: skip


def upload(url: str, credential: str, items: list, compress: bool = True) -> httpx.Response:
    body = json.dumps({"measurements": items}).encode()
    headers = {"Authorization": f"Bearer {credential}", "Content-Type": "application/json"}
    if compress:
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    return httpx.post(url + "/api/v1/measurements", content=body, headers=headers,
                      trust_env=False, timeout=60)  # fmt: skip


# -- the commands ---------------------------------------------------------------------


def test_tokens_and_probes_from_the_command_line(pg_url: str) -> None:
    migrated = vantage("collector", "migrate", "--db", pg_url)
    assert migrated.returncode == 0, migrated.stderr
    assert "revision" in migrated.stdout
    made = vantage("collector", "enroll-token", "create", "--label", "Berlin 'volunteers'",
                   "--max-uses", "3", "--expires", "7d", db=pg_url)  # fmt: skip
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("vet_") and "\n" not in token  # the token alone on stdout
    assert "shown only now" in made.stderr

    listed = vantage("collector", "enroll-token", "list", "--json", db=pg_url)
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["id"], r["label"], r["max_uses"], r["uses"], r["state"]) for r in rows] == [
        (1, "Berlin 'volunteers'", 3, 0, "usable")
    ]
    assert token not in listed.stdout
    table = vantage("collector", "enroll-token", "list", db=pg_url)
    assert "Berlin 'volunteers'" in table.stdout and "0/3" in table.stdout

    from collectors import auth
    from collectors.app import open_engine
    from collectors.settings import CollectorSettings

    engine = open_engine(CollectorSettings(db=pg_url, pool_size=1))
    probe_id = str(uuid.uuid4())
    try:
        auth.enroll(engine, token, probe_id)
    finally:
        engine.dispose()
    probes = vantage("collector", "probes", "list", "--json", db=pg_url)
    assert [json.loads(line)["probe_id"] for line in probes.stdout.splitlines()] == [probe_id]
    assert vantage("collector", "probes", "list", db=pg_url).stdout.count("live") == 1

    revoked = vantage("collector", "probes", "revoke", probe_id, db=pg_url)
    assert revoked.returncode == 0, revoked.stderr
    again = vantage("collector", "probes", "revoke", probe_id, db=pg_url)
    assert again.returncode == 1 and "no live probe" in again.stderr
    restored = vantage("collector", "probes", "restore", probe_id, db=pg_url)
    assert restored.returncode == 0 and "may enroll again" in restored.stdout, restored.stderr
    twice = vantage("collector", "probes", "restore", probe_id, db=pg_url)
    assert twice.returncode == 1 and "no revoked probe" in twice.stderr
    assert vantage("collector", "enroll-token", "revoke", "1", db=pg_url).returncode == 0
    gone = vantage("collector", "enroll-token", "revoke", "1", db=pg_url)
    assert gone.returncode == 1
    state = vantage("collector", "enroll-token", "list", "--json", db=pg_url).stdout
    assert json.loads(state)["state"] == "revoked"


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["collector", "migrate"], 78, "--db"),
        (["collector", "migrate", "--db", "not a url"], 78, "configuration error"),
        (["collector", "migrate", "--db", "postgresql+psycopg://nobody@127.0.0.1:1/x"], 74, ""),
        (["collector", "enroll-token", "create", "--db", "sqlite://", "--expires", "soon"], 78,
         "--expires"),
        (["collector", "enroll-token", "create", "--db", "sqlite://", "--max-uses", "0"], 78,
         "--max-uses"),
        (["collector", "serve", "--db", "sqlite://", "--port", "0"], 78, "port"),
        (["collector", "serve", "--db", "sqlite://", "--asn-db", "/nonexistent.mmdb"], 78,
         "no such file"),
        (["collector", "serve", "--db", "sqlite://", "--trusted-proxy", "nope"], 78,
         "--trusted-proxy"),
    ],
)  # fmt: skip
def test_bad_flags_and_databases(args: list[str], code: int, words: str) -> None:
    proc = vantage(*args)
    assert proc.returncode == code, proc.stderr
    assert words in proc.stderr


def test_serve_without_fastapi_exits_69() -> None:
    code = (
        "import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None; "
        "from probe.cli import main; sys.exit(main(['collector', 'serve', '--db', 'sqlite://']))"
    )
    proc = vantage(code=code)
    assert proc.returncode == 69, proc.stderr
    assert "pip install 'vantage-probe[collector]'" in proc.stderr


def test_parse_expiry() -> None:
    now = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)
    assert parse_expiry("30d", now) == now + dt.timedelta(days=30)
    assert parse_expiry("90m", now) == now + dt.timedelta(minutes=90)
    assert parse_expiry("2024-06-01", now) == dt.datetime(2024, 6, 1, tzinfo=dt.UTC)
    assert parse_expiry("2024-06-01T02:00+02:00", now) == dt.datetime(2024, 6, 1, tzinfo=dt.UTC)
    for bad in ("2023-01-01", "tomorrow", "5w"):
        with pytest.raises(_ConfigError):
            parse_expiry(bad, now)


# -- a real server --------------------------------------------------------------------


def test_serve_stores_uploads_stops_on_sigterm_and_starts_again(
    collector_process: CollectorProcess,
) -> None:
    c = collector_process
    probe_id = str(uuid.uuid4())
    credential = c.enroll(probe_id)
    run = str(uuid.uuid4())
    items = [doc(probe_id, run, i) for i in range(20)]
    r = upload(c.url, credential, items)
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 20

    assert c.stop() == 0  # SIGTERM: a clean exit
    with pytest.raises(httpx.TransportError):
        httpx.get(c.url + "/api/v1/health", trust_env=False, timeout=1)
    c.start()  # same port, same database
    again = upload(c.url, credential, items[15:] + [doc(probe_id, run, 20)])
    assert [x["status"] for x in again.json()["results"]] == ["duplicate"] * 5 + ["accepted"]
    assert c.count("measurements") == 21
    assert c.stop(signal.SIGINT) == 0
    log = c.output()
    assert "POST /api/v1/measurements" not in log  # no access log: clients are volunteers
    assert f"probe {probe_id}: 20 accepted" in log


def test_the_quick_local_trial_on_sqlite(sqlite_collector_process: CollectorProcess) -> None:
    c = sqlite_collector_process
    probe_id = str(uuid.uuid4())
    credential = c.enroll(probe_id)
    run = str(uuid.uuid4())
    good = [doc(probe_id, run, i) for i in range(3)]
    bad = doc(probe_id, run, 3)
    del bad["test_keys"]
    r = upload(c.url, credential, [*good, bad, good[0]])
    assert r.status_code == 200, r.text
    assert [x["status"] for x in r.json()["results"]] == ["accepted"] * 3 + [
        "rejected",
        "duplicate",
    ]
    assert c.count("measurements") == 3
    assert c.count("observations") == 3 * wire.from_wire(good[0]).observation_count()
    assert upload(c.url, "wrong", good).status_code == 401
    forged = doc(str(uuid.uuid4()), run, 9)
    assert upload(c.url, credential, [forged]).status_code == 403
    assert c.stop() == 0


# -- the control helper endpoint, when turned on --------------------------------------


def test_the_control_endpoint_is_off_unless_turned_on(make_collector) -> None:
    target = Target(id="c", service="s", kind="tcp", host="127.0.0.1", ports=(closed_port(),))
    body = {"target": wire.target_to_wire(target)}
    off: Collector = make_collector()
    assert off.http.post("/api/v1/control", json=body).status_code in (404, 405)

    on: Collector = make_collector(
        control=ControlSettings(
            resolvers=(ResolverSpec("udp", "127.0.0.1", closed_port()),),
            system_cas=False,
            allow_ranges=(__import__("ipaddress").ip_network("127.0.0.0/8"),),
            timeouts=Timeouts(dns=1, tcp=1, tls=1, http=1),
            token="s3cret",
        )
    )
    refused = on.http.post("/api/v1/control", json=body)
    assert refused.status_code == 401
    assert "detail" in refused.json()  # the control helper's own error shape, as before
    r = on.http.post("/api/v1/control", json=body, headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200, r.text
    m = wire.from_wire(r.json()["measurement"])
    assert [c.failure for c in m.tcp_connect] == ["connection_refused"]


# -- rate limits ----------------------------------------------------------------------


def test_token_bucket() -> None:
    now = [0.0]
    limits = RateLimiter(rate=10, burst=20, clock=lambda: now[0])
    assert limits.wait("a") == 0
    limits.charge("a", 25)  # one big batch: allowed, leaves a debt of 5
    assert limits.wait("a") == pytest.approx(0.6)  # 5 of debt + 1 token at 10/s
    assert limits.wait("b") == 0  # another key, another bucket
    now[0] = 0.6
    assert limits.wait("a") == pytest.approx(0.0)
    assert limits.take("a") == 0 and limits.take("a") > 0
    now[0] = 100.0
    assert limits.wait("a") == 0  # refilled, never beyond the burst
    limits.charge("a", 20)
    assert limits.wait("a") > 0
    assert retry_after(0.01) == "1" and retry_after(2.2) == "3"


def test_buckets_keep_no_address_and_are_pruned() -> None:
    import collectors.ratelimit as rl

    now = [0.0]
    limits = RateLimiter(rate=1, burst=1, clock=lambda: now[0])
    for i in range(rl.PRUNE_AT + 5):
        limits.take(f"198.51.100.{i % 250}.{i}")
    assert "198.51.100" not in repr(limits._buckets)
    now[0] = 10.0
    limits.take("one more")
    assert len(limits) == 1


def test_serve_with_worker_processes(pg_url: str, tmp_path: Path) -> None:
    from tests.collectors.conftest import _migrated

    _migrated(pg_url)
    c = CollectorProcess(
        pg_url, tmp_path, extra=["--workers", "2", "--trusted-proxy", "127.0.0.0/8"]
    )
    c.start()
    try:
        probe_id = str(uuid.uuid4())
        credential = c.enroll(probe_id)
        for i in range(4):  # several connections: both workers answer
            r = upload(c.url, credential, [doc(probe_id, str(uuid.uuid4()), i)])
            assert r.json()["accepted"] == 1
        seen = httpx.get(c.url + "/api/v1/whoami", headers={"X-Forwarded-For": "198.51.100.7"},
                         trust_env=False, timeout=10)  # fmt: skip
        assert seen.json()["ip"] == "198.51.100.7"  # the workers got the flags
        assert c.count("measurements") == 4
        assert c.stop() == 0
    finally:
        c.close()
