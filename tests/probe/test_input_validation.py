"""Malformed input fails with the file, the key and the reason, never a traceback:
non-finite and absurd numbers, TOML nested too deeply, host names that are not DNS
names, CA files that hold no certificate."""

from __future__ import annotations

from pathlib import Path

import pytest

from probe.catalog import CatalogError, load_file, parse_catalog
from probe.config import ConfigError, load_config
from probe.lab.scenario import ScenarioError, parse_scenario
from probe.tomltable import TableReader
from tests.lab.test_scenario import GOOD as SCENARIO

DEEP = "x = " + "[" * 5000 + "]" * 5000 + "\n"


def _reader(table: dict) -> TableReader:
    return TableReader(table, "t", set(table), lambda key, why: ValueError(f"{key}: {why}"))


# -- numbers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (float("nan"), "t.n: must be a finite number, got nan"),
        (float("inf"), "t.n: must be a finite number, got inf"),
        (float("-inf"), "t.n: must be a finite number, got -inf"),
        (1e308, "t.n: must be at most 1e+12, got 1e+308"),
        (10**30, "t.n: must be at most 1e+12, got 1e+30"),
        (-1, "t.n: must be at least 0, got -1"),
    ],
)
def test_numbers_must_be_finite_and_sane(value: float, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        _reader({"n": value}).number("n", 0)


def test_a_sane_number_is_read() -> None:
    assert _reader({"n": 1e12}).number("n", 0) == 1e12
    assert _reader({"n": 3}).number("n", 0) == 3.0
    assert _reader({}).number("n", 2.5) == 2.5


THROTTLE = '\n[[rule]]\nkind = "throttle"\nmatch = ["chat.signal.org"]\nrate = {}\n'
SITE = '\n[[site]]\nname = "a.example"\n{} = {}\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (SCENARIO + THROTTLE.format("nan"), "rule[1].rate: must be a finite number, got nan"),
        (SCENARIO + THROTTLE.format("inf"), "rule[1].rate: must be a finite number, got inf"),
        (SCENARIO + THROTTLE.format("1e308"), "rule[1].rate: must be at most 1e+12"),
        (SCENARIO.replace('action = "reset"', 'action = "reset"\nresidual = nan'),
         "rule[0].residual: must be a finite number"),
        (SCENARIO + SITE.format("size", "inf"), "site[0].size: must be a finite number, got inf"),
        (SCENARIO + SITE.format("size", "1e300"), "site[0].size: must be at most 1e+12"),
        (SCENARIO + SITE.format("redirects", "nan"), "site[0].redirects: must be a finite number"),
        (SCENARIO + "\n[path]\ndelay_ms = nan\n", "path.delay_ms: must be a finite number"),
        (SCENARIO + "\n[path]\njitter_ms = inf\n", "path.jitter_ms: must be a finite number"),
        (SCENARIO + "\n[path]\nloss_pct = nan\n", "path.loss_pct: must be a finite number"),
        ("concurrency = 0\n" + SCENARIO, "concurrency: must be 1-1024, got 0"),
        ("concurrency = 1025\n" + SCENARIO, "concurrency: must be 1-1024, got 1025"),
        (DEEP + SCENARIO, "not valid TOML: arrays or tables nested too deeply"),
    ],
)  # fmt: skip
def test_bad_scenario_numbers_and_nesting(text: str, message: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, "x.toml")
    assert str(info.value).startswith("x.toml: ") and message in str(info.value)


def test_scenario_concurrency_in_range_is_kept() -> None:
    assert parse_scenario("concurrency = 1024\n" + SCENARIO, "x.toml").concurrency == 1024
    assert parse_scenario(SCENARIO + THROTTLE.format("1e6"), "x.toml").rules[1].rate == 1_000_000


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[engine]\nrun_deadline = nan\n", {}, "engine.run_deadline: must be a finite number, got nan"),
        ("[engine]\ndns_timeout = inf\n", {}, "engine.dns_timeout: must be a finite number, got inf"),
        ("[engine]\nhttp_timeout = -inf\n", {}, "engine.http_timeout: must be a finite number"),
        ("[engine]\ntcp_timeout = 1e300\n", {}, "engine.tcp_timeout: must be at most 1e+12"),
        ("[control]\ntimeout = nan\n", {}, "control.timeout: must be a finite number"),
        ("", {"VANTAGE_ENGINE_RUN_DEADLINE": "nan"},
         "environment VANTAGE_ENGINE_RUN_DEADLINE: engine.run_deadline: must be a finite number"),
        ("", {"VANTAGE_ENGINE_TLS_TIMEOUT": "1e999"}, "engine.tls_timeout: must be a finite number"),
        ("[engine]\nconcurrency = 100000\n", {}, "engine.concurrency: must be at most 1024"),
        ("[vantage]\nasn = 10000000000000\n", {}, "vantage.asn: must be at most 1e+12"),
        ("[engine]\nrun_deadline = 0\n", {}, "engine.run_deadline: must be positive"),
        (DEEP, {}, "cannot read config: arrays or tables nested too deeply"),
    ],
)  # fmt: skip
def test_bad_config_numbers_and_nesting(tmp_path: Path, text: str, env: dict, message: str) -> None:
    path = tmp_path / "v.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env)
    assert message in str(info.value)


def test_config_overrides_are_checked_too() -> None:
    with pytest.raises(ConfigError, match="command line: engine.run_deadline: must be a finite"):
        load_config(None, env={}, overrides={"engine.run_deadline": "nan"})
    cfg = load_config(None, env={}, overrides={"engine.run_deadline": "1e12"})
    assert cfg.engine.run_deadline == 1e12


# -- catalogs --------------------------------------------------------------------------

HEAD = """format = 1
[service]
name = "mine"
[[target]]
id = "t"
"""

LONG_NAME = ".".join(["a" * 60] * 4) + ".example.org"  # 255 characters


@pytest.mark.parametrize(
    ("target", "key", "reason"),
    [
        ('kind = "dns"\nhost = "' + "a" * 64 + '.example"', "target[0].host",
         "a label is longer than 63 characters"),
        ('kind = "dns"\nhost = ".example.com"', "target[0].host", "it has an empty label"),
        ('kind = "dns"\nhost = "a..example.com"', "target[0].host", "it has an empty label"),
        (f'kind = "dns"\nhost = "{LONG_NAME}"', "target[0].host", "longer than 253 characters"),
        ('kind = "dns"\nhost = "bad\\u200ename.example"', "target[0].host", "not IDNA-encodable"),
        ('kind = "dns"\nhost = "exa mple.com"', "target[0].host", "other than letters, digits"),
        ('kind = "tls"\nhost = "127.0.0.1"\nports = [443]\nsni = ".example.com"', "target[0].sni",
         "it has an empty label"),
        ('kind = "tls"\nhost = "127.0.0.1"\nports = [443]\nsni = "' + "b" * 70 + '.org"',
         "target[0].sni", "longer than 63"),
        ('kind = "tls"\nhost = "example.com"\nports = [443]\nsni = "192.0.2.1"', "target[0].sni",
         "must be a DNS name, not an IP address"),
        ('kind = "http"\nurl = "http://exa mple.com:8080/"', "target[0].url",
         "other than letters, digits"),
        ('kind = "http"\nurl = "https://' + "c" * 64 + '.example/"', "target[0].url",
         "longer than 63"),
        ('kind = "http"\nurl = "https://example.com/"\nhost = "x..y"', "target[0].host",
         "empty label"),
    ],
)  # fmt: skip
def test_hosts_and_snis_must_be_dns_names(target: str, key: str, reason: str) -> None:
    with pytest.raises(CatalogError) as info:
        parse_catalog(HEAD + target + "\n", "mine.toml")
    err = info.value
    assert (err.origin, err.key) == ("mine.toml", key) and reason in err.reason, str(err)
    assert "not a valid DNS name" in err.reason or "not an IP address" in err.reason


@pytest.mark.parametrize(
    ("target", "host"),
    [
        ('kind = "dns"\nhost = "e1.whatsapp.net."', "e1.whatsapp.net."),
        ('kind = "dns"\nhost = "_dmarc.example.com"', "_dmarc.example.com"),
        ('kind = "tcp"\nhost = "149.154.175.50"\nports = [443]', "149.154.175.50"),
        ('kind = "tcp"\nhost = "2001:db8::1"\nports = [443]', "2001:db8::1"),
        ('kind = "http"\nurl = "http://[2001:db8::1]:8080/"', "2001:db8::1"),
        ('kind = "http"\nurl = "http://b\u00fccher.example/"', "b\u00fccher.example"),
        ('kind = "tls"\nhost = "127.0.0.1"\nports = [443]\nsni = "chat.signal.org"', "127.0.0.1"),
    ],
)  # fmt: skip
def test_good_hosts_are_accepted(target: str, host: str) -> None:
    (t,) = parse_catalog(HEAD + target + "\n", "mine.toml").targets
    assert t.host == host


def test_deeply_nested_catalog_is_a_catalog_error() -> None:
    with pytest.raises(CatalogError, match="mine.toml: not valid TOML: .*nested too deeply"):
        parse_catalog("format = 1\n" + DEEP, "mine.toml")


def test_scenario_targets_are_checked_like_catalog_targets() -> None:
    text = SCENARIO + '\n[[target]]\nid = "t"\nkind = "dns"\nhost = ".bad.example"\n'
    with pytest.raises(ScenarioError, match=r"x.toml: target\[0\].host: not a valid DNS name"):
        parse_scenario(text, "x.toml")


def test_ca_file_must_hold_a_pem_certificate(tmp_path: Path, ca_file: str) -> None:
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    (tmp_path / "c.toml").write_text(
        HEAD + 'kind = "tls"\nhost = "127.0.0.1"\nports = [443]\nca_file = "bad.pem"\n'
    )
    with pytest.raises(CatalogError) as info:
        load_file(tmp_path / "c.toml")
    assert info.value.key == "target[0].ca_file"
    assert info.value.reason == f"not a PEM certificate file: {tmp_path / 'bad.pem'}"
    # A real CA certificate (the fixtures' own) is accepted.
    (tmp_path / "d.toml").write_text(
        HEAD + f'kind = "tls"\nhost = "127.0.0.1"\nports = [443]\nca_file = "{ca_file}"\n'
    )
    (t,) = load_file(tmp_path / "d.toml").targets
    assert t.ca_file == ca_file
