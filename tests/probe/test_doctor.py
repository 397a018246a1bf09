"""``vantage doctor``: each check's passing and failing path, with injected inputs,
temporary directories and loopback servers only."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import os
import pwd
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from probe import doctor
from probe.config import Config, load_config
from probe.doctor import FAIL, OK, SKIP, WARN, Check, Inputs, run_checks
from probe.vantage import Machine, probe_id
from tests.fixtures.mmdb import write_asn_db, write_country_db

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (to drop to another user)")
NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)


def make_cfg(tmp_path: Path, **settings: Any) -> Config:
    path = tmp_path / "vantage.toml"
    path.write_text("")
    overrides = {"probe.data_dir": str(tmp_path / "data"), "vantage.resolver_whoami": "",
                 "dns.resolv_conf": str(tmp_path / "resolv.conf")}  # fmt: skip
    overrides.update({k.replace("__", "."): str(v) for k, v in settings.items()})
    return load_config(path, env={}, overrides=overrides)


def inputs(tmp_path: Path, **kw: Any) -> Inputs:
    kw.setdefault("now", lambda: NOW)
    kw.setdefault("ntp_synchronized", lambda: "yes")
    kw.setdefault("dns_timeout", 0.5)
    kw.setdefault("machine", Machine(proc=tmp_path / "proc", sys=tmp_path / "sys",
                                     local_addresses=lambda: []))  # fmt: skip
    return Inputs(**kw)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can enter (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="vantage-doctor-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


NOBODY = pwd.getpwnam("nobody")


def as_user(user: pwd.struct_passwd, fn: Callable[[], Check]) -> Check:
    """Run a check in a child process that dropped from root to ``user``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            result = dataclasses.asdict(fn())
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            result = {"name": "child", "status": "crashed", "detail": repr(exc)}
        with os.fdopen(write_end, "w") as pipe:
            json.dump(result, pipe)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    return Check(**json.loads(text))


# -- config, data directory -------------------------------------------------------------


def test_config_names_its_file(tmp_path) -> None:
    c = doctor.check_config(make_cfg(tmp_path), inputs(tmp_path, config_path="/x/v.toml"))
    assert c.status == OK and "/x/v.toml" in c.detail


def test_data_dir_missing(tmp_path) -> None:
    c = doctor.check_data_dir(make_cfg(tmp_path), inputs(tmp_path))
    assert c.status == FAIL and "does not exist" in c.detail
    assert not (tmp_path / "data").exists()  # the check does not create it


def test_data_dir_writable(tmp_path) -> None:
    (tmp_path / "data").mkdir()
    c = doctor.check_data_dir(make_cfg(tmp_path), inputs(tmp_path))
    assert c.status == OK and "writable" in c.detail
    assert list((tmp_path / "data").iterdir()) == []  # its probe file is gone


@needs_root
def test_data_dir_not_writable_by_the_user(shared_dir) -> None:
    (shared_dir / "data").mkdir(mode=0o755)  # root's
    cfg = make_cfg(shared_dir)
    c = as_user(NOBODY, partial(doctor.check_data_dir, cfg, inputs(shared_dir)))
    assert c.status == FAIL and "not writable" in c.detail


@needs_root
def test_data_dir_must_belong_to_the_service_user(shared_dir) -> None:
    data = shared_dir / "data"
    data.mkdir()
    cfg = make_cfg(shared_dir)
    as_service = inputs(shared_dir, user="nobody")
    c = doctor.check_data_dir(cfg, as_service)
    assert c.status == FAIL and "belongs to root" in c.detail and "chown" in c.hint
    os.chown(data, NOBODY.pw_uid, NOBODY.pw_gid)
    assert doctor.check_data_dir(cfg, as_service).status == OK
    (data / "vantage.db").write_bytes(b"")  # left behind by a command run as root
    c = doctor.check_data_dir(cfg, as_service)
    assert c.status == FAIL and "vantage.db" in c.detail
    assert doctor.check_data_dir(cfg, inputs(shared_dir, user="no-such-user")).status == FAIL


# -- raw sockets, clock, disk -----------------------------------------------------------


def test_raw_socket_denied_is_a_warning(tmp_path) -> None:
    def denied() -> None:
        raise PermissionError(1, "Operation not permitted")

    c = doctor.check_raw_socket(make_cfg(tmp_path), inputs(tmp_path, raw_socket=denied))
    assert c.status == WARN and "CAP_NET_RAW" in c.detail


def test_raw_socket_allowed(tmp_path) -> None:
    c = doctor.check_raw_socket(make_cfg(tmp_path), inputs(tmp_path, raw_socket=lambda: None,
                                                          euid=lambda: 1000))  # fmt: skip
    assert c.status == OK


@needs_root
def test_raw_socket_for_real_as_root_and_as_nobody(tmp_path) -> None:
    cfg = make_cfg(tmp_path)
    assert doctor.check_raw_socket(cfg, Inputs()).status == OK  # root may
    c = as_user(NOBODY, partial(doctor.check_raw_socket, cfg, Inputs()))
    assert c.status == WARN  # a user without CAP_NET_RAW may not


@pytest.mark.parametrize(
    "now,ntp,status",
    [
        (dt.datetime(1970, 1, 1, tzinfo=dt.UTC), "yes", FAIL),  # a Pi without a clock
        (NOW, "no", WARN),
        (NOW, "yes", OK),
        (NOW, None, OK),  # no timedatectl: cannot tell
    ],
)
def test_clock(tmp_path, now, ntp, status) -> None:
    c = doctor.check_clock(make_cfg(tmp_path), inputs(tmp_path, now=lambda: now,
                                                      ntp_synchronized=lambda: ntp))  # fmt: skip
    assert c.status == status


def test_disk(tmp_path) -> None:
    (tmp_path / "data").mkdir()
    free = shutil.disk_usage(tmp_path).free // (1024 * 1024)
    assert (
        doctor.check_disk(make_cfg(tmp_path, retention__min_free_mb=0), inputs(tmp_path)).status
        == OK
    )
    warn = make_cfg(tmp_path, retention__min_free_mb=int(free * 0.75))
    assert doctor.check_disk(warn, inputs(tmp_path)).status == WARN
    fail = make_cfg(tmp_path, retention__min_free_mb=free + 1000)
    c = doctor.check_disk(fail, inputs(tmp_path))
    assert c.status == FAIL and "pauses" in c.detail


# -- the resolver -------------------------------------------------------------------------


def test_resolver_answers(tmp_path, dns_server) -> None:
    dns_server.set("harmless.test", a=["192.0.2.1"])
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    cfg = make_cfg(tmp_path)
    c = doctor.check_resolver(cfg, inputs(tmp_path, dns_port=dns_server.port,
                                          query_name="harmless.test"))  # fmt: skip
    assert c.status == OK
    assert ("harmless.test", "A", "udp") in dns_server.queries


def test_resolver_default_name_is_the_whoami_name(tmp_path, dns_server) -> None:
    dns_server.set("whoami.test", a=["192.0.2.1"])
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    cfg = make_cfg(tmp_path, vantage__resolver_whoami="whoami.test")
    assert doctor.check_resolver(cfg, inputs(tmp_path, dns_port=dns_server.port)).status == OK
    assert dns_server.queries[0][0] == "whoami.test"


def test_resolver_nxdomain_is_a_warning(tmp_path, dns_server) -> None:
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    c = doctor.check_resolver(make_cfg(tmp_path), inputs(tmp_path, dns_port=dns_server.port,
                                                         query_name="absent.test"))  # fmt: skip
    assert c.status == WARN and "NXDOMAIN" in c.detail


def test_resolver_silent_fails(tmp_path, dns_server) -> None:
    dns_server.set("harmless.test", drop=True)
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    c = doctor.check_resolver(make_cfg(tmp_path), inputs(tmp_path, dns_port=dns_server.port,
                                                         query_name="harmless.test"))  # fmt: skip
    assert c.status == FAIL and "does not answer" in c.detail


def test_resolver_missing_from_resolv_conf(tmp_path) -> None:
    (tmp_path / "resolv.conf").write_text("# nothing\n")
    assert doctor.check_resolver(make_cfg(tmp_path), inputs(tmp_path)).status == FAIL
    off = make_cfg(tmp_path, dns__system="false")
    assert doctor.check_resolver(off, inputs(tmp_path)).status == SKIP


# -- database, consent ----------------------------------------------------------------------


def test_database_opens_and_checks(tmp_path) -> None:
    (tmp_path / "data").mkdir()
    c = doctor.check_database(make_cfg(tmp_path), inputs(tmp_path))
    assert c.status == OK and "integrity ok" in c.detail and "schema 0" in c.detail
    assert (tmp_path / "data" / "vantage.db").is_file()


def test_database_damaged(tmp_path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "vantage.db").write_bytes(b"this is not a database" * 100)
    c = doctor.check_database(make_cfg(tmp_path), inputs(tmp_path))
    assert c.status == FAIL


def test_database_damaged_inside(tmp_path) -> None:
    (tmp_path / "data").mkdir()
    cfg = make_cfg(tmp_path)
    assert doctor.check_database(cfg, inputs(tmp_path)).status == OK
    db = tmp_path / "data" / "vantage.db"
    raw = bytearray(db.read_bytes())
    page = 4096
    assert len(raw) > 4 * page
    raw[2 * page + 8 : 3 * page] = b"\xa5" * (page - 8)  # scribble over a b-tree page
    db.write_bytes(bytes(raw))
    for extra in ("vantage.db-wal", "vantage.db-shm"):
        (tmp_path / "data" / extra).unlink(missing_ok=True)
    assert doctor.check_database(cfg, inputs(tmp_path)).status == FAIL


def test_database_without_its_directory_is_not_created(tmp_path) -> None:
    c = doctor.check_database(make_cfg(tmp_path), inputs(tmp_path))
    assert c.status == FAIL and not (tmp_path / "data").exists()


def test_consent_injected(tmp_path) -> None:
    cfg = make_cfg(tmp_path)
    assert doctor.check_consent(cfg, inputs(tmp_path, has_consent=lambda c: True)).status == OK
    c = doctor.check_consent(cfg, inputs(tmp_path, has_consent=lambda c: False))
    assert c.status == FAIL and "vantage consent" in c.hint


def test_consent_from_the_daemon_module(tmp_path) -> None:
    pytest.importorskip("probe.daemon.consent", reason="the consent module (helper A1)")
    assert doctor.check_consent(make_cfg(tmp_path), inputs(tmp_path)).status == FAIL
    given = make_cfg(tmp_path, privacy__consent="true")
    assert doctor.check_consent(given, inputs(tmp_path)).status == OK


# -- offline databases, vantage point -----------------------------------------------------


@pytest.fixture
def mmdb(tmp_path) -> tuple[str, str]:
    asn = write_asn_db(tmp_path / "asn.mmdb", {"198.51.100.0/24": (64500, "Example Net")})
    country = write_country_db(tmp_path / "country.mmdb", {"198.51.100.0/24": "NL"})
    return str(asn), str(country)


def test_mmdb(tmp_path, mmdb) -> None:
    none = doctor.check_mmdb(make_cfg(tmp_path), inputs(tmp_path))
    assert none.status == SKIP and "forged answer" in none.detail  # what it costs
    country_only = doctor.check_mmdb(make_cfg(tmp_path, vantage__country_db=mmdb[1]),
                                     inputs(tmp_path))  # fmt: skip
    assert country_only.status == WARN and "no ASN database" in country_only.detail
    good = make_cfg(tmp_path, vantage__asn_db=mmdb[0], vantage__country_db=mmdb[1])
    c = doctor.check_mmdb(good, inputs(tmp_path))
    assert c.status == OK and "DBIP-ASN-Lite" in c.detail
    later = NOW + dt.timedelta(days=800)
    assert doctor.check_mmdb(good, inputs(tmp_path, now=lambda: later)).status == WARN


@pytest.mark.parametrize("problem", ["missing", "garbage", "swapped"])
def test_mmdb_invalid(tmp_path, mmdb, problem) -> None:
    asn, country = mmdb
    if problem == "missing":
        asn = str(tmp_path / "nope.mmdb")
    elif problem == "garbage":
        Path(asn).write_bytes(b"\x00garbage" * 1000)
    else:
        asn, country = country, asn
    c = doctor.check_mmdb(make_cfg(tmp_path, vantage__asn_db=asn, vantage__country_db=country),
                          inputs(tmp_path))  # fmt: skip
    assert c.status == FAIL


def test_vantage_point(tmp_path, mmdb) -> None:
    cfg = make_cfg(tmp_path, vantage__asn_db=mmdb[0], vantage__country_db=mmdb[1],
                   engine__public_ranges="198.51.100.0/24")  # fmt: skip
    assert doctor.check_vantage(cfg, inputs(tmp_path)).status == SKIP  # no data dir yet
    (tmp_path / "data").mkdir()
    assert doctor.check_vantage(cfg, inputs(tmp_path)).status == WARN  # no public address
    public = Machine(proc=tmp_path / "proc", sys=tmp_path / "sys",
                     local_addresses=lambda: ["198.51.100.7"])  # fmt: skip
    c = doctor.check_vantage(cfg, inputs(tmp_path, machine=public))
    assert c.status == OK and "AS64500" in c.detail and "NL" in c.detail
    assert "198.51.100.7" not in c.detail  # never the address


# -- the collector ------------------------------------------------------------------------


class Collector:
    def __init__(self) -> None:
        self.status = 200
        this = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                body = b'{"ip": "198.51.100.7", "asn": 0, "cc": "ZZ"}'
                self.send_response(this.status)  # sends a Date header of now
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)  # fmt: skip
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.close()


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_collector_not_configured(tmp_path) -> None:
    (c,) = doctor.check_collector(make_cfg(tmp_path), inputs(tmp_path))
    assert c.status == SKIP


def test_collector_reachable_but_not_enrolled(tmp_path, collector) -> None:
    cfg = make_cfg(tmp_path, collector__url=collector.url)
    now = dt.datetime.now(dt.UTC)
    found = _by_name(doctor.check_collector(cfg, inputs(tmp_path, now=lambda: now)))
    assert found["collector"].status == WARN and "not enrolled" in found["collector"].detail
    assert found["clock skew"].status == OK
    assert "198.51.100.7" not in found["collector"].detail


def test_collector_enrolled(tmp_path, collector) -> None:
    pytest.importorskip("probe.outbox", reason="the outbox (helper C)")
    cfg = make_cfg(tmp_path)
    data = cfg.data_dir()
    data.mkdir()
    doc = {"url": collector.url, "probe_id": probe_id(data), "credential": "secret",
           "enrolled_at": NOW.isoformat()}  # fmt: skip
    (data / "collector.json").write_text(json.dumps(doc))
    (data / "collector.json").chmod(0o600)
    now = dt.datetime.now(dt.UTC)
    found = _by_name(doctor.check_collector(cfg, inputs(tmp_path, now=lambda: now)))
    assert found["collector"].status == OK, found["collector"]


@pytest.mark.parametrize("offset,status", [(120, WARN), (-7200, FAIL), (7200, FAIL)])
def test_clock_skew_against_the_collector(tmp_path, collector, offset, status) -> None:
    cfg = make_cfg(tmp_path, collector__url=collector.url)
    skewed = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=offset)
    found = _by_name(doctor.check_collector(cfg, inputs(tmp_path, now=lambda: skewed)))
    assert found["clock skew"].status == status


def test_collector_errors(tmp_path, collector) -> None:
    from tests.fixtures.tcpserver import closed_port

    collector.status = 404
    found = _by_name(doctor.check_collector(make_cfg(tmp_path, collector__url=collector.url),
                                            inputs(tmp_path)))  # fmt: skip
    assert found["collector"].status == FAIL and "404" in found["collector"].detail
    gone = make_cfg(tmp_path, collector__url=f"http://127.0.0.1:{closed_port()}")
    (c,) = doctor.check_collector(gone, inputs(tmp_path))
    assert c.status == FAIL and "unreachable" in c.detail


# -- all of it ------------------------------------------------------------------------------


def test_run_checks_reports_a_crashing_check(tmp_path, monkeypatch) -> None:
    def boom(cfg: Config, inputs: Inputs) -> Check:
        raise RuntimeError("kaput")

    monkeypatch.setattr(doctor, "check_disk", boom)
    (tmp_path / "resolv.conf").write_text("")
    checks = _by_name(run_checks(make_cfg(tmp_path, dns__system="false"), inputs(tmp_path)))
    assert checks["disk"].status == FAIL and "kaput" in checks["disk"].detail
    assert "config" in checks and "collector" in checks  # the others still ran


@needs_root
def test_run_as_root_leaves_new_files_to_the_service_user(tmp_path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, NOBODY.pw_uid, NOBODY.pw_gid)
    (tmp_path / "resolv.conf").write_text("")
    cfg = make_cfg(tmp_path, dns__system="false")
    checks = _by_name(run_checks(cfg, inputs(tmp_path, user="nobody",
                                             has_consent=lambda c: True)))  # fmt: skip
    assert checks["data directory"].status == OK
    assert checks["database"].status == OK, checks["database"]
    made = {p.name: p.stat().st_uid for p in data.iterdir()}
    assert {"vantage.db", "probe_id"} <= set(made)
    assert set(made.values()) == {NOBODY.pw_uid}, made
    # Run again: the data directory check is still happy (nothing of root's left).
    assert _by_name(run_checks(cfg, inputs(tmp_path, user="nobody")))["data directory"].status == OK


def test_report_formats(tmp_path) -> None:
    checks = [Check("clock", OK, "fine"), Check("disk", FAIL, "full", "free space")]
    out = io.StringIO()
    doctor.report(checks, out, as_json=True, terminal=False)
    doc = json.loads(out.getvalue())
    assert doc["ok"] is False and doc["checks"][1] == dataclasses.asdict(checks[1])
    out = io.StringIO()
    doctor.report(checks, out, as_json=False, terminal=False)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["ok", "clock", "fine"]
    assert lines[1].startswith("fail") and lines[2].strip() == "hint: free space"
    out = io.StringIO()
    doctor.report(checks, out, as_json=False, terminal=True)
    table = out.getvalue()
    assert "free space" in table and "fail" in table and "\n" in table.strip()


def test_command_line(tmp_path, monkeypatch, capsys) -> None:
    from probe.cli import main

    (tmp_path / "data").mkdir()
    (tmp_path / "resolv.conf").write_text("")
    config = tmp_path / "vantage.toml"
    config.write_text(f'[probe]\ndata_dir = "{tmp_path / "data"}"\n'
                      f'[dns]\nsystem = false\nresolv_conf = "{tmp_path / "resolv.conf"}"\n'
                      '[vantage]\nresolver_whoami = ""\n[privacy]\nconsent = true\n')  # fmt: skip
    monkeypatch.setenv("VANTAGE_CONFIG", str(config))
    code = main(["doctor", "--json", "--user", "nobody"] if ROOT else ["doctor", "--json"])
    doc = json.loads(capsys.readouterr().out)
    names = [c["name"] for c in doc["checks"]]
    assert names[:4] == ["config", "data directory", "raw sockets", "clock"]
    assert str(config) in doc["checks"][0]["detail"]
    failed = [c for c in doc["checks"] if c["status"] == FAIL]
    assert code == (1 if failed else 0) and doc["ok"] is (not failed)
    if ROOT:  # the data directory is root's, not nobody's: a failure, exit 1
        assert code == 1 and any(c["name"] == "data directory" for c in failed)
    monkeypatch.setenv("VANTAGE_RETENTION_MIN_FREE_MB", "0")
    assert main(["doctor"]) in (0, 1)
    plain = capsys.readouterr().out
    assert plain.splitlines()[0].split()[:2] == ["ok", "config"]
