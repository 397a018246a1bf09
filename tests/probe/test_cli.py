"""The ``vantage`` command: run, targets, exit codes, output formats."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema

from probe.privacy import local_addresses
from schema.wire import json_schema
from tests.conftest import VALID, WRONG
from tests.fixtures import DNSServer, WebServer

ROOT = Path(__file__).resolve().parents[2]


def vantage(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "probe", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env=env)  # fmt: skip


def _catalog(path: Path, web: WebServer) -> Path:
    path.write_text(f"""
format = 1
[service]
name = "lab"
[[target]]
id = "home"
kind = "http"
url = "https://{VALID}:{web.port}/"
[[target]]
id = "intercepted"
kind = "http"
url = "https://{WRONG}:{web.port}/"
[[target]]
id = "gone"
kind = "dns"
host = "gone.test"
""")
    return path


def _run_args(tmp_path: Path, dns: DNSServer, catalog: Path, ca_file: str) -> list[str]:
    return ["run", "--no-builtin", "--targets", str(catalog), "--data-dir", str(tmp_path / "d"),
            "--no-system-resolver", "--resolver", f"udp://127.0.0.1:{dns.port}",
            "--ca-bundle", ca_file, "--public-range", "127.0.0.0/8"]  # fmt: skip


def test_run_json_prints_the_wire_format(tmp_path: Path, web: WebServer, ca_file: str) -> None:
    with DNSServer() as dns:
        dns.set(VALID, a=["127.0.0.1"])
        dns.set(WRONG, a=["127.0.0.1"])
        proc = vantage(
            *_run_args(tmp_path, dns, _catalog(tmp_path / "c.toml", web), ca_file), "--json"
        )
    assert proc.returncode == 0, proc.stderr
    docs = {d["target"]["id"]: d for d in map(json.loads, proc.stdout.splitlines())}
    assert set(docs) == {"home", "intercepted", "gone"}
    validator = jsonschema.Draft202012Validator(json_schema())
    for doc in docs.values():
        validator.validate(doc)
        assert doc["probe_cc"] == "ZZ"
    # The probe's own addresses appear nowhere (probe_ip is a placeholder).
    own = local_addresses()
    assert not [a for a in own for line in proc.stdout.splitlines() if a in line]
    assert docs["home"]["test_keys"]["failure"] is None
    assert docs["intercepted"]["test_keys"]["failure"] == "ssl_invalid_hostname"
    assert docs["gone"]["test_keys"]["failure"] == "dns_nxdomain_error"
    assert "3 of 3 targets measured (complete)" in proc.stderr
    # The probe id is made once and kept.
    probe_id = (tmp_path / "d" / "probe_id").read_text().strip()
    assert {d["probe_id"] for d in docs.values()} == {probe_id}
    assert (tmp_path / "d" / "vantage.db").exists()


def test_run_plain_output_when_piped(tmp_path: Path, web: WebServer, ca_file: str) -> None:
    with DNSServer() as dns:
        dns.set(VALID, a=["127.0.0.1"])
        dns.set(WRONG, a=["127.0.0.1"])
        proc = vantage(*_run_args(tmp_path, dns, _catalog(tmp_path / "c.toml", web), ca_file))
    assert proc.returncode == 0, proc.stderr
    lines = [line.split("\t") for line in proc.stdout.splitlines()]
    assert lines[0] == ["service", "target", "dns", "tcp", "tls", "http", "time", "verdict"]
    rows = {r[1]: r for r in lines[1:] if r[0] != "service"}
    assert rows["home"][2:6] == ["ok", "ok", "ok", "200"] and rows["home"][7] == "ok"
    assert rows["intercepted"][4] == "ssl_invalid_hostname"
    # A user's own site, no control helper: a bad certificate or a missing name may be
    # the site's own problem, so the verdict says it cannot tell.
    assert rows["intercepted"][7] == "unknown" and rows["gone"][7] == "unknown"
    assert rows["gone"][2:6] == ["dns_nxdomain_error", "-", "-", "-"]
    (service,) = [r for r in lines[1:] if r[0] == "service"]
    assert service[1:3] == ["lab", "inconclusive"]


def test_exit_codes_for_bad_input(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'format = 1\n[service]\nname = "x"\n[[target]]\nid = "a"\nkind = "ftp"\nhost = "h"\n'
    )
    proc = vantage("targets", "--no-builtin", "--targets", str(bad))
    assert proc.returncode == 65
    assert f"{bad}: target[0].kind: 'ftp' is not one of" in proc.stderr
    conf = tmp_path / "v.toml"
    conf.write_text("[engine]\nconcurrency = -1\n")
    proc = vantage("--config", str(conf), "run", "--no-builtin", "--targets", str(bad))
    assert proc.returncode == 78 and "engine.concurrency" in proc.stderr
    proc = vantage("run", "--no-builtin", "--targets", str(tmp_path / "none.toml"))
    assert proc.returncode == 65 and "cannot read" in proc.stderr
    proc = vantage("run", "--resolver", "dns.example:53", "--service", "controls",
                   "--data-dir", str(tmp_path / "d"))  # fmt: skip
    assert proc.returncode == 78 and "not an IP address" in proc.stderr


def test_targets_and_version() -> None:
    proc = vantage("targets", "--json", "--service", "whatsapp")
    assert proc.returncode == 0
    targets = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(targets) == 18 and targets[0]["host"] == "e1.whatsapp.net"
    proc = vantage("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("vantage ")


def test_every_command_is_listed_with_its_modules_own_help() -> None:
    import argparse

    from probe.cli import COMMANDS, _parser

    def helps(command: str | None) -> dict[str, str | None]:
        p = _parser(command)
        sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        return {a.dest: a.help for a in sub._choices_actions}

    listed = helps(None)
    for name, (_, text) in COMMANDS.items():
        assert listed[name] == text
        assert helps(name)[name] == text, f"{name}: the module's help line differs"
    assert {"control", "collector"} <= set(listed)  # the collector's, by entry point name


def test_version_and_help_load_nothing_heavy() -> None:
    code = ("import sys\nfrom probe.cli import main\n"
            "for argv in (['--version'], ['--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "heavy = ('sqlalchemy', 'httpx', 'fastapi', 'rich', 'dns', 'asyncio', "
            "'collectors.cli', 'probe.store')\n"
            "print(' '.join(m for m in heavy if m in sys.modules), file=sys.stderr)\n")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)  # fmt: skip
    assert proc.stderr.strip() == "", proc.stderr


def test_run_records_each_answers_network_and_judges_by_it(
    tmp_path: Path, web: WebServer, ca_file: str
) -> None:
    """Issue 11: with vantage.asn_db every answer carries its AS; an answer that works
    but lies outside the catalog's network is a forged one. Without the database the
    verdict says what it could not check."""
    from tests.fixtures.mmdb import write_asn_db

    db = write_asn_db(tmp_path / "asn.mmdb", {"127.0.0.0/8": (64511, "Loopback Net")})
    catalog = tmp_path / "c.toml"
    catalog.write_text(f"""
format = 1
[service]
name = "lab"
[[target]]
id = "endpoint"
kind = "tcp"
host = "{VALID}"
ports = [{web.port}]
expect = {{ asns = [64500] }}
""")
    config = tmp_path / "v.toml"
    config.write_text(f'[vantage]\nasn_db = "{db}"\n')
    with DNSServer() as dns:
        dns.set(VALID, a=["127.0.0.1"])
        placed = vantage("--config", str(config), *_run_args(tmp_path, dns, catalog, ca_file),
                         "--json")  # fmt: skip
        (tmp_path / "d").rename(tmp_path / "d-placed")
        unplaced = vantage(*_run_args(tmp_path, dns, catalog, ca_file), "--json")
    assert placed.returncode == 0, placed.stderr
    doc = json.loads(placed.stdout.splitlines()[0])
    (query,) = [q for q in doc["test_keys"]["queries"] if q["answers"]]
    assert query["answers"][0]["asn"] == 64511
    assert query["answers"][0]["as_org_name"] == "Loopback Net"
    keys = doc["test_keys"]
    assert (keys["accessible"], keys["blocking"]) == (False, "dns")
    assert "dns_foreign_network" in [r["code"] for r in keys["analysis"]["reasons"]]
    assert unplaced.returncode == 0, unplaced.stderr
    doc = json.loads(unplaced.stdout.splitlines()[0])
    assert all("asn" not in a for q in doc["test_keys"]["queries"] for a in q["answers"])
    keys = doc["test_keys"]
    assert keys["blocking"] is False
    assert "no_asn_database" in [r["code"] for r in keys["analysis"]["reasons"]]
