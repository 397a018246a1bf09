"""`vantage export`: bad input, overwriting, standard output, pseudonyms, privacy, and
atomicity (a failed or interrupted export leaves neither a file nor a temporary)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import hmac
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from probe.cli import main
from probe.export import reader as reader_module
from probe.export.reader import ReadError
from probe.privacy import exit_scrub
from schema.model import VantagePoint
from tests.export import dataset
from tests.export.conftest import export_bytes, lines

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    data = tmp_path / "data"
    monkeypatch.setenv("VANTAGE_PROBE_DATA_DIR", str(data))
    monkeypatch.delenv("VANTAGE_CONFIG", raising=False)
    return data


def _export(*args: str) -> int:
    return main(["export", *args])


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("args,code,message", [
    (["--format", "xml"], 64, "unknown format 'xml'"),
    ([], 64, "--format is needed"),
    (["--format", "csv", "--since", "2024-13-01"], 64, "since: not a date"),
    (["--format", "csv", "--until", "yesterday"], 64, "until: not an ISO 8601"),
    (["--format", "csv", "--since", "2024-05-02", "--until", "2024-05-01"], 64,
     "until: must be later than since"),
    (["--format", "csv", "--cc", "IRN"], 64, "cc: not a two-letter country code"),
    (["--format", "csv", "--asn", "ASX"], 64, "asn: not an AS number"),
    (["--format", "csv", "--blocking", "maybe"], 64, "blocking: 'maybe' is not one of"),
    (["--format", "parquet"], 64, "Parquet cannot go to standard output"),
    (["--format", "csv", "--partition-by", "date"], 64, "--partition-by is for --format parquet"),
    (["--format", "parquet", "--partition-by", "date,city", "--out", "x"], 64,
     "--partition-by 'date,city'"),
    (["--format", "csv", "--key-file", "k"], 64, "--key-file is for --pseudonymize"),
])  # fmt: skip
def test_bad_usage_is_64_and_writes_nothing(
    db_url, tmp_path: Path, capsys, monkeypatch, args, code, message
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    assert _export(*args, "--db", db_url) == code
    assert message in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_a_filter_that_matches_nothing_is_65_and_no_file(db_url, tmp_path: Path, capsys) -> None:
    target = tmp_path / "none.csv"
    assert _export("--format", "csv", "--cc", "FR", "--db", db_url, "--out", str(target)) == 65
    err = capsys.readouterr().err
    assert "no measurement matches (cc FR)" in err and "nothing written" in err
    assert not target.exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["/proc/vantage-export.csv", "/dev/null/export.csv",
                                   "{tmp}/missing/dir/export.csv"])  # fmt: skip
def test_an_unwritable_path_is_73(db_url, tmp_path: Path, capsys, where: str) -> None:
    target = Path(where.format(tmp=tmp_path))
    assert _export("--format", "csv", "--db", db_url, "--out", str(target)) == 73
    assert "cannot create" in capsys.readouterr().err
    assert not target.exists()


def test_missing_or_foreign_database_is_74(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope.db"
    assert _export("--format", "csv", "--db", f"sqlite:///{missing}") == 74
    assert "no such file" in capsys.readouterr().err
    assert not missing.exists()  # not created empty
    foreign = tmp_path / "foreign.db"
    import sqlite3

    sqlite3.connect(foreign).execute("CREATE TABLE t (x)").connection.commit()
    assert _export("--format", "csv", "--db", f"sqlite:///{foreign}") == 74
    assert "no such table" in capsys.readouterr().err


def test_existing_file_needs_force(db_url, tmp_path: Path, capsys, engine, _data_dir) -> None:
    target = tmp_path / "e.csv"
    target.write_text("keep me")
    assert _export("--format", "csv", "--db", db_url, "--out", str(target)) == 73
    assert "exists: use --force" in capsys.readouterr().err
    assert target.read_text() == "keep me"
    assert _export("--format", "csv", "--db", db_url, "--out", str(target), "--force") == 0
    # The probe's export scrubs on the way out (truncated bodies lose their plain hash).
    assert target.read_bytes() == export_bytes(engine, "csv", scrub=exit_scrub(_data_dir))
    assert target.read_bytes() != export_bytes(engine, "csv")
    assert _leftovers(tmp_path) == []


def test_standard_output(db_url, capsysbinary, engine, _data_dir) -> None:
    assert _export("--format", "jsonl", "--db", db_url, "--out", "-") == 0
    captured = capsysbinary.readouterr()
    assert captured.out == export_bytes(engine, "jsonl", scrub=exit_scrub(_data_dir))
    assert b"exported 250 measurements (jsonl) to standard output" in captured.err


def test_files_and_datasets(db_url, tmp_path: Path, engine, stored) -> None:
    f = tmp_path / "m.parquet"
    assert _export("--format", "parquet", "--db", db_url, "--out", str(f)) == 0
    assert pq.read_table(f).num_rows == len(stored)
    assert oct(f.stat().st_mode & 0o777) != oct(0o600)  # a normal file, not mkstemp's mode
    d = tmp_path / "ds"
    assert _export("--format", "parquet", "--db", db_url, "--out", str(d),
                   "--partition-by", "date,cc") == 0  # fmt: skip
    assert {p.parent.parent.name for p in d.rglob("*.parquet")} == {
        f"date={m.start_time.date()}" for m in stored}  # fmt: skip
    # a dataset is replaced only with --force, whole
    assert _export("--format", "parquet", "--db", db_url, "--out", str(d),
                   "--partition-by", "cc") == 73  # fmt: skip
    assert _export("--format", "parquet", "--db", db_url, "--out", str(d),
                   "--partition-by", "cc", "--force") == 0  # fmt: skip
    assert {p.name for p in d.iterdir()} == {f"probe_cc={m.vantage.cc}" for m in stored}
    assert _leftovers(tmp_path) == []


# -- pseudonyms --------------------------------------------------------------------------------


def test_pseudonyms_are_keyed_and_consistent(db_url, tmp_path: Path, capsys, _data_dir,
                                             stored) -> None:  # fmt: skip
    a, b = tmp_path / "a.jsonl", tmp_path / "b.csv"
    assert _export("--format", "jsonl", "--db", db_url, "--out", str(a), "--pseudonymize") == 0
    key_file = _data_dir / "pseudonym.key"
    assert "created now" in capsys.readouterr().err
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = bytes.fromhex(key_file.read_text().strip())
    assert len(key) == 32
    assert _export("--format", "csv", "--db", db_url, "--out", str(b), "--pseudonymize") == 0
    assert "created now" not in capsys.readouterr().err
    docs = [json.loads(x) for x in lines(a.read_bytes())]
    ids = {m.vantage.probe_id for m in stored}
    for d, m in zip(docs, stored, strict=True):
        expected = hmac.new(key, m.vantage.probe_id.encode(), hashlib.sha256).hexdigest()[:32]
        assert d["probe_id"] == expected
    assert len({d["probe_id"] for d in docs}) == len(ids)
    for data in (a.read_bytes(), b.read_bytes()):
        assert not any(i.encode() in data for i in ids)  # no real probe id anywhere
    rows = csv.DictReader(io.StringIO(b.read_text(), newline=""))
    assert [r["probe_id"] for r in rows] == [d["probe_id"] for d in docs]  # same key, same ids
    # another key: other pseudonyms
    other = tmp_path / "other.key"
    c = tmp_path / "c.jsonl"
    assert _export("--format", "jsonl", "--db", db_url, "--out", str(c), "--pseudonymize",
                   "--key-file", str(other)) == 0  # fmt: skip
    assert other.stat().st_mode & 0o777 == 0o600
    assert json.loads(lines(c.read_bytes())[0])["probe_id"] != docs[0]["probe_id"]


def test_a_bad_key_file_is_refused(db_url, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not hex")
    out = tmp_path / "x.csv"
    assert _export("--format", "csv", "--db", db_url, "--out", str(out), "--pseudonymize",
                   "--key-file", str(bad)) == 65  # fmt: skip
    assert "not a hex-encoded key" in capsys.readouterr().err
    assert not out.exists()


def test_the_probes_ip_never_appears(tmp_path: Path) -> None:
    if "public_ip" not in {f.name for f in dataclasses.fields(VantagePoint)}:
        pytest.skip("this tree does not store the probe's IP")
    ip = "203.0.113.77"
    runs = dataset.measurements(60, seed=5)
    runs = [(r, dataclasses.replace(v, public_ip=ip), s,
             [dataclasses.replace(m, vantage=dataclasses.replace(m.vantage, public_ip=ip))
              for m in ms]) for r, v, s, ms in runs]  # fmt: skip
    url = f"sqlite:///{tmp_path / 'ip.db'}"
    dataset.store(url, runs)
    import sqlite3

    stored_ips = sqlite3.connect(tmp_path / "ip.db").execute(
        "SELECT DISTINCT public_ip FROM vantage_points").fetchall()  # fmt: skip
    assert stored_ips == [(ip,)]  # it is in the database ...
    from probe.export.commands import open_engine

    engine = open_engine(url)
    for fmt in ("jsonl", "csv", "parquet", "ooni"):
        data = export_bytes(engine, fmt)
        assert ip.encode() not in data, fmt  # ... and in no export
        if fmt == "parquet":
            assert ip not in str(pq.read_table(io.BytesIO(data)).to_pylist())
    engine.dispose()


# -- atomicity ---------------------------------------------------------------------------------


def test_a_failure_midway_leaves_no_file_and_no_temporary(
    db_url, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    real = reader_module.Reader._fetch
    calls = {"n": 0}

    def failing(self, conn, uids):
        calls["n"] += 1
        if calls["n"] == 3:
            raise ReadError("cannot read measurements: disk I/O error")
        return real(self, conn, uids)

    monkeypatch.setattr(reader_module.Reader, "_fetch", failing)
    for fmt in ("jsonl", "parquet"):
        calls["n"] = 0
        target = tmp_path / f"half.{fmt}"
        assert _export("--format", fmt, "--db", db_url, "--out", str(target),
                       "--chunk-size", "20") == 74  # fmt: skip
        assert "disk I/O error" in capsys.readouterr().err
        assert not target.exists()
    d = tmp_path / "ds"
    calls["n"] = 0
    assert _export("--format", "parquet", "--db", db_url, "--out", str(d), "--partition-by",
                   "date", "--chunk-size", "20") == 74  # fmt: skip
    assert not d.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "data"] == []


@pytest.fixture(scope="module")
def big_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dataset.generate_database(tmp_path_factory.mktemp("big") / "big.db", 20000)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_export_leaves_nothing(big_db: Path, tmp_path: Path, sig) -> None:
    target = tmp_path / "big.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "probe", "export", "--format", "jsonl", "--db",
         f"sqlite:///{big_db}", "--out", str(target), "--chunk-size", "50"],
        cwd=ROOT, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until a good part is written
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".big.jsonl.")]
        if temps and temps[0].stat().st_size > 200_000:
            break
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    else:
        pytest.fail("the export wrote nothing")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"interrupted: nothing written" in err
    assert list(tmp_path.iterdir()) == []  # neither the file nor the temporary


# -- the collector's command -------------------------------------------------------------------


def test_collector_export_is_the_same_export(db_url, tmp_path: Path, engine, capsys,
                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    out = tmp_path / "c.csv"
    assert main(["collector", "export", "--format", "csv", "--db", db_url, "--out", str(out)]) == 0
    assert out.read_bytes() == export_bytes(engine, "csv")
    # the database from the environment, as the collector's other commands take it
    monkeypatch.setenv("VANTAGE_COLLECTOR_DB", db_url)
    other = tmp_path / "d.jsonl"
    assert main(["collector", "export", "--format", "jsonl", "--out", str(other)]) == 0
    assert other.read_bytes() == export_bytes(engine, "jsonl")
    # there is no data directory for a default key: it must be named
    assert main(["collector", "export", "--format", "csv", "--pseudonymize"]) == 64
    assert "--pseudonymize needs --key-file" in capsys.readouterr().err


def test_a_malformed_stored_measurement_is_65_and_named(db_path: Path, tmp_path: Path,
                                                        capsys) -> None:  # fmt: skip
    import shutil
    import sqlite3

    copy = tmp_path / "damaged.db"
    shutil.copy(db_path, copy)
    con = sqlite3.connect(copy)
    uid = con.execute("SELECT measurement_uid FROM observations LIMIT 1").fetchone()[0]
    con.execute("UPDATE observations SET data = '{\"broken' WHERE measurement_uid = ?", (uid,))
    con.commit()
    con.close()
    out = tmp_path / "x.jsonl"
    assert _export("--format", "jsonl", "--db", f"sqlite:///{copy}", "--out", str(out)) == 65
    assert f"measurement {uid}: a " in capsys.readouterr().err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_parquet_without_pyarrow_says_what_to_do(db_url, tmp_path: Path) -> None:
    # As on 32-bit Raspberry Pi OS, where pyarrow has no wheel: no traceback, exit 69.
    code = ("import sys; sys.modules['pyarrow'] = None; from probe.cli import main; "
            "sys.exit(main(sys.argv[1:]))")  # fmt: skip
    out = tmp_path / "m.parquet"
    proc = subprocess.run(
        [sys.executable, "-c", code, "export", "--format", "parquet", "--db", db_url,
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), "VANTAGE_PROBE_DATA_DIR": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 69, proc.stderr
    assert "Traceback" not in proc.stderr and "pyarrow" in proc.stderr
    assert "vantage-probe[parquet]" in proc.stderr and not out.exists()
    assert _leftovers(tmp_path) == []
