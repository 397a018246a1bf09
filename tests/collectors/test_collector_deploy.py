"""deploy/collector/ agrees with the collector it deploys.

Docker is not available where this was written, so the compose file and Dockerfile
are checked, not run: the compose YAML parses, has the services it promises, and every
command and ``VANTAGE_COLLECTOR_*`` variable in it (and in the systemd unit and the
env example) is one the collector's command line and settings accept.
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import ipaddress
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from collectors.cli import add_collector_parser
from collectors.settings import ENV_PREFIX, CollectorSettings

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "deploy" / "collector"


def parse_command(argv: list[str]) -> argparse.Namespace:
    """``vantage collector ...`` through the collector's real argument parser."""
    assert argv[0].endswith("vantage"), argv
    parser = argparse.ArgumentParser(prog="vantage")
    add_collector_parser(parser.add_subparsers(dest="command", required=True))
    try:
        return parser.parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"the collector's CLI refuses {shlex.join(argv)}")


def setting_of(variable: str) -> str:
    """The CollectorSettings field a VANTAGE_COLLECTOR_* variable sets."""
    assert variable.startswith(ENV_PREFIX), variable
    name = variable[len(ENV_PREFIX) :].lower()
    fields = {f.name for f in dataclasses.fields(CollectorSettings)}
    assert name in fields, f"{variable}: the collector has no setting {name!r}"
    return name


def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse compose.yaml")
    data = yaml.safe_load((HERE / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_runs_postgresql_and_the_collector_with_names_the_cli_knows() -> None:
    data = compose()
    services = data["services"]
    assert {"db", "collector", "proxy"} <= set(services)
    db, collector, proxy = services["db"], services["collector"], services["proxy"]
    assert db["image"].startswith("postgres:")
    assert collector["depends_on"]["db"]["condition"] == "service_healthy"
    assert proxy["profiles"] == ["tls"]  # TLS is opt-in: `--profile tls`

    env = collector["environment"]
    assert {setting_of(name) for name in env} >= {"db", "trusted_proxies", "settle_after"}
    # The database URL names the db service, its user and database.
    url = sa.make_url(env["VANTAGE_COLLECTOR_DB"].replace("${VANTAGE_DB_PASSWORD}", "pw"))
    assert url.drivername == "postgresql+psycopg" and url.host == "db"
    assert url.username == db["environment"]["POSTGRES_USER"]
    assert url.database == db["environment"]["POSTGRES_DB"]
    # The trusted proxies are the network the proxy (and the host's bridge) come from.
    subnet = data["networks"]["backend"]["ipam"]["config"][0]["subnet"]
    assert env["VANTAGE_COLLECTOR_TRUSTED_PROXIES"] == subnet
    ipaddress.ip_network(subnet)

    # The command migrates, then serves, on the port published (loopback only).
    shell = collector["command"]
    assert shell[:2] == ["sh", "-c"]
    migrate, serve = (shlex.split(part) for part in shell[2].split("&&"))
    assert parse_command(migrate).collector_command == "migrate"
    assert serve[0] == "exec"
    args = parse_command(serve[1:])
    assert args.collector_command == "serve" and args.host == "0.0.0.0"
    assert collector["ports"] == [f"127.0.0.1:{args.port}:{args.port}"]
    assert proxy["environment"]["VANTAGE_UPSTREAM"] == f"collector:{args.port}"

    # The image is built from the Dockerfile next to it, from the repository root.
    assert (HERE / collector["build"]["context"]).resolve() == ROOT
    assert (ROOT / collector["build"]["dockerfile"]).resolve() == HERE / "Dockerfile"
    assert (HERE / proxy["volumes"][0].split(":")[0]).resolve() == HERE / "Caddyfile"


def test_the_dockerfile_installs_the_collector_extra_and_serves() -> None:
    text = (HERE / "Dockerfile").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert "collector" in extras
    assert re.search(r'pip install "\.\[collector\]"', text)
    for folder in ("probe", "schema", "collectors"):  # the packages pyproject.toml includes
        assert f"COPY {folder} ./{folder}" in text
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert cmd is not None
    import json

    args = parse_command(json.loads(cmd.group(1)))
    assert args.collector_command == "serve" and args.port == 8800
    assert re.search(r"^USER (?!root)\w+", text, re.M), "the collector must not run as root"


def unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((HERE / "vantage-collector.service").read_text())
    return parser


def test_the_systemd_unit_runs_commands_the_cli_accepts() -> None:
    u = unit()
    start = parse_command(shlex.split(u["Service"]["ExecStart"]))
    assert start.collector_command == "serve" and start.host == "127.0.0.1"
    assert parse_command(shlex.split(u["Service"]["ExecStartPre"])).collector_command == "migrate"
    assert u["Service"]["EnvironmentFile"] == "/etc/vantage/collector.env"
    for key in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "DynamicUser"):
        assert key in u["Service"], f"hardening: {key} is missing"
    assert u["Service"]["CapabilityBoundingSet"] == ""


def test_the_systemd_unit_verifies() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    done = subprocess.run(
        ["systemd-analyze", "verify", str(HERE / "vantage-collector.service")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    problems = [
        line
        for line in done.stderr.splitlines()
        # The venv it runs from exists only where the collector is installed.
        if line.strip() and "/opt/vantage/bin/vantage is not executable" not in line
    ]
    assert not problems, problems


def test_every_variable_of_the_env_example_is_a_setting() -> None:
    names = re.findall(
        r"^#?(VANTAGE_COLLECTOR_[A-Z_]+)=", (HERE / "collector.env.example").read_text(), re.M
    )
    assert "VANTAGE_COLLECTOR_DB" in names and "VANTAGE_COLLECTOR_TRUSTED_PROXIES" in names
    for name in names:
        setting_of(name)
    values = dict(
        line.split("=", 1)
        for line in (HERE / "collector.env.example").read_text().splitlines()
        if line.startswith("VANTAGE_COLLECTOR_")
    )
    settings = CollectorSettings.from_env(values)  # the example's values are valid
    assert [str(n) for n in settings.trusted_proxies] == ["127.0.0.1/32", "::1/128"]


def test_the_proxies_pass_the_client_address_to_the_collector_port() -> None:
    caddy = (HERE / "Caddyfile").read_text()
    assert "header_up X-Forwarded-For {remote_host}" in caddy
    assert "reverse_proxy {$VANTAGE_UPSTREAM:127.0.0.1:8800}" in caddy
    nginx = (HERE / "nginx.conf").read_text()
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in nginx
    assert "proxy_pass http://127.0.0.1:8800;" in nginx
    assert "$proxy_add_x_forwarded_for" not in nginx  # appending would pass a forged hop on
