"""Configuration layers: defaults < file < environment < flags, with clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from probe.config import ConfigError, load_config


def test_layers_override_in_order(tmp_path: Path) -> None:
    path = tmp_path / "v.toml"
    path.write_text('[engine]\nconcurrency = 4\ntcp_timeout = 3\n[vantage]\ncc = "IR"\n'
                    '[dns]\nresolvers = ["udp://127.0.0.1:5353"]\n')  # fmt: skip
    cfg = load_config(path, env={}, overrides={})
    assert (cfg.engine.concurrency, cfg.engine.tcp_timeout, cfg.vantage.cc) == (4, 3.0, "IR")
    assert cfg.dns.resolvers == ("udp://127.0.0.1:5353",)
    assert cfg.engine.tls_timeout == 10.0  # default kept
    env = {"VANTAGE_ENGINE_CONCURRENCY": "8", "VANTAGE_DNS_RESOLVERS": "udp://127.0.0.2, tcp://127.0.0.3",
           "VANTAGE_DNS_SYSTEM": "no", "HOME": "/x"}  # fmt: skip
    cfg = load_config(path, env=env, overrides={})
    assert cfg.engine.concurrency == 8 and cfg.dns.system is False
    assert cfg.dns.resolvers == ("udp://127.0.0.2", "tcp://127.0.0.3")
    cfg = load_config(path, env=env, overrides={"engine.concurrency": 2})
    assert cfg.engine.concurrency == 2


def test_database_defaults_to_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    cfg = load_config(None, env={}, overrides={"probe.data_dir": str(tmp_path)})
    assert cfg.db_url() == f"sqlite:///{tmp_path / 'vantage.db'}"


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ('[engine]\nconcurrency = "many"\n', {}, "engine.concurrency: expected an integer"),
        ("[engine]\nconcurency = 3\n", {}, "unknown key engine.concurency"),
        ("[engin]\n", {}, "unknown section [engin]"),
        ('[vantage]\ncc = "iran"\n', {}, "vantage.cc"),
        ("[engine]\nconcurrency = 0\n", {}, "engine.concurrency: must be at least 1"),
        (
            "",
            {"VANTAGE_ENGINE_TCP_TIMEOUT": "soon"},
            "VANTAGE_ENGINE_TCP_TIMEOUT: engine.tcp_timeout",
        ),
        ("", {"VANTAGE_DNS_SYSTEM": "maybe"}, "expected true or false"),
        ("[engine\n", {}, "cannot read config"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, env: dict, message: str) -> None:
    path = tmp_path / "v.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config(path, env=env)


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.toml", env={})


def test_example_config_documents_every_key(tmp_path: Path) -> None:
    import dataclasses
    import re

    from probe.config import Config

    root = Path(__file__).resolve().parents[2]
    text = (root / "deploy" / "vantage.toml.example").read_text()
    # Uncomment every "# key = value" line: the result must load and set every key.
    lines = [re.sub(r"^# ([a-z_]+ = .*?)(\s+#.*)?$", r"\1", line) for line in text.splitlines()]
    path = tmp_path / "full.toml"
    path.write_text("\n".join(lines))
    load_config(path, env={})
    section, keys = "", set()
    for line in lines:
        if line.startswith("["):
            section = line.strip("[]")
            if section.startswith("suites."):
                section = "suites"
        elif m := re.match(r"^([a-z_]+) =", line):
            keys.add(f"{section}.{m.group(1)}")
    expected = {
        f"{f.name}.{g.name}"
        for f in dataclasses.fields(Config)
        if f.name != "suites"
        for g in dataclasses.fields(getattr(Config(), f.name))
    }
    expected |= {f"suites.{g.name}" for g in dataclasses.fields(Config().suites[0])}
    expected.discard("suites.name")  # the table's own name
    assert keys == expected


def test_a_config_the_user_may_not_read_names_the_group(tmp_path: Path) -> None:
    # As the volunteer's own account, outside the group the installer gives the file to.
    import grp
    import shutil
    import subprocess
    import sys
    import tempfile

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as another user")
    group = grp.getgrnam("daemon").gr_name if _has_group("daemon") else None
    if group is None:
        pytest.skip("no group to give the file to")
    place = Path(tempfile.mkdtemp(prefix="vantage-access-"))
    try:
        place.chmod(0o755)
        config = place / "vantage.toml"
        config.write_text("[probe]\n")
        config.chmod(0o640)
        shutil.chown(config, group=group)
        # The code as the other user can read it (the checkout may sit in a private
        # directory, as a fresh clone under mktemp -d does).
        root = Path(__file__).resolve().parents[2]
        code = place / "code"
        for package in ("probe", "schema"):
            shutil.copytree(root / package, code / package,
                            ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        for path in [code, *code.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        proc = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
             "-m", "probe", "--config", str(config), "targets"],
            capture_output=True, text=True, timeout=60, cwd=place,
            env={"PATH": os.environ["PATH"], "PYTHONPATH": str(code), "HOME": str(place)},
        )  # fmt: skip
    finally:
        shutil.rmtree(place)
    assert proc.returncode == 78, proc.stderr
    assert "permission denied" in proc.stderr and f"the group {group}" in proc.stderr
    assert f"usermod -aG {group}" in proc.stderr and "Traceback" not in proc.stderr


def _has_group(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True
