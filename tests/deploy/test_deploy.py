"""deploy/: the installer (shellcheck, --dry-run, a real install into a temporary root,
again, then uninstalled) and the systemd unit (systemd-analyze verify). Nothing here
touches the real /etc, /opt, /var/lib or systemd: the real-path dry run only prints,
and the test checks that nothing appeared."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from probe.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
INSTALL = DEPLOY / "install.sh"
UNIT = DEPLOY / "vantage.service"
REAL_PATHS = [Path(p) for p in ("/opt/vantage", "/etc/vantage", "/var/lib/vantage",
                                "/usr/local/bin/vantage", "/etc/systemd/system/vantage.service")]  # fmt: skip


def run_install(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("VANTAGE_")}
    full["PYTHON"] = sys.executable  # the interpreter running the tests (not a shim)
    full.update(env or {})
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True,
                          timeout=300, env=full, check=False)  # fmt: skip


def can_build_offline() -> bool:
    """pip --no-build-isolation needs setuptools with bdist_wheel (or the wheel package)."""
    code = ("import setuptools, sys\n"
            "try:\n    import wheel\nexcept ImportError:\n"
            "    sys.exit(tuple(map(int, setuptools.__version__.split('.')[:2])) < (70, 1))\n")  # fmt: skip
    return subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# -- the unit --------------------------------------------------------------------------------


def unit_settings() -> dict[str, dict[str, list[str]]]:
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(section, {}).setdefault(key, []).append(value)
    return out


def test_unit_is_hardened_as_promised() -> None:
    s = unit_settings()["Service"]
    expect = {
        "Type": "notify", "WatchdogSec": "120", "ExecStart": "/opt/vantage/bin/vantage daemon",
        "ExecReload": "/bin/kill -HUP $MAINPID", "User": "vantage", "Restart": "on-failure",
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "StateDirectory": "vantage", "ConfigurationDirectory": "vantage",
        "AmbientCapabilities": "CAP_NET_RAW", "CapabilityBoundingSet": "CAP_NET_RAW",
    }  # fmt: skip
    for key, value in expect.items():
        assert s.get(key) == [value], key
    assert "VANTAGE_PROBE_DATA_DIR=/var/lib/vantage" in s["Environment"]
    assert s["MemoryMax"][0].endswith("M") and int(s["MemoryMax"][0][:-1]) >= 120
    assert "RestartSec" in s
    u = unit_settings()["Unit"]
    assert "StartLimitIntervalSec" in u and "StartLimitBurst" in u
    # /proc/net must stay readable: discovery finds the default route there.
    assert "ProcSubset" not in s


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is missing")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    true = shutil.which("true")
    assert true is not None

    def verify(text: str) -> subprocess.CompletedProcess[str]:
        copy = tmp_path / "vantage.service"
        copy.write_text(text.replace("ExecStart=/opt/vantage/bin/vantage", f"ExecStart={true}"))
        return subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                              text=True, timeout=60, check=False)  # fmt: skip

    result = verify(UNIT.read_text())
    assert result.returncode == 0, result.stderr
    assert "vantage.service" not in result.stderr, result.stderr  # no warning about it
    # The check can fail: a misspelt key is reported.
    bad = verify(UNIT.read_text().replace("ProtectHome=", "ProtectHmoe="))
    assert "ProtectHmoe" in bad.stderr


# -- the installer -----------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is missing")
def test_install_sh_passes_shellcheck() -> None:
    result = subprocess.run(["shellcheck", "--severity=style", str(INSTALL)], capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout


def test_install_sh_is_strict_bash() -> None:
    text = INSTALL.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert os.access(INSTALL, os.X_OK)


def test_help_and_bad_arguments() -> None:
    help_ = run_install("--help")
    assert help_.returncode == 0 and "--uninstall" in help_.stdout and "--offline" in help_.stdout
    for args, words in [(["--bogus"], "unknown option"), (["--purge", "--dry-run"], "--purge"),
                        (["--dry-run", "--from", "/nonexistent/x"], "not a checkout")]:  # fmt: skip
        result = run_install(*args)
        assert result.returncode == 1 and words in result.stderr, (args, result.stderr)


def test_dry_run_prints_every_action_and_does_nothing(tmp_path: Path) -> None:
    before = {p: p.exists() for p in REAL_PATHS}
    result = run_install("--dry-run", "--no-download")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert {p: p.exists() for p in REAL_PATHS} == before  # nothing appeared, nothing went
    assert "dry run: nothing was done" in out or "nothing changed" in out
    if not any(before.values()):  # a machine without Vantage: every step is announced
        for words in ("-m venv /opt/vantage", "pip install", "/etc/vantage/vantage.toml",
                      "install -m 0644", "/etc/systemd/system/vantage.service",
                      "ln -sfn /opt/vantage/bin/vantage /usr/local/bin/vantage"):  # fmt: skip
            assert words in out, words
        assert "would: " in out and "done: " not in out
    # Into a staging root, a dry run leaves it empty.
    stage = tmp_path / "stage"
    stage.mkdir()
    staged = run_install("--dry-run", "--root", str(stage), "--offline")
    assert staged.returncode == 0, staged.stderr
    assert "skipped: useradd" in staged.stdout and f"{stage}/etc/vantage" in staged.stdout
    assert list(stage.iterdir()) == []


def snapshot_source(dest: Path) -> Path:
    """A copy of the package sources (others may edit the checkout while we test)."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("probe", "schema", "collectors"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def tree(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file and link under root: (mode, mtime, content hash or link target)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if "__pycache__" in path.parts:
            continue
        st = path.lstat()
        if path.is_symlink():
            what = "-> " + os.readlink(path)
        elif path.is_file():
            what = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            what = "dir"
        out[str(path.relative_to(root))] = (st.st_mode, st.st_mtime_ns, what)
    return out


@pytest.mark.slow
@pytest.mark.skipif(not can_build_offline(), reason="offline build needs the wheel package")
def test_install_into_a_root_again_and_uninstall(tmp_path: Path) -> None:
    source = snapshot_source(tmp_path / "src")
    stage = tmp_path / "stage"
    first = run_install("--root", str(stage), "--from", str(source), "--offline")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "change(s) made" in first.stdout
    for skipped in ("useradd", "chown", "systemctl"):
        assert f"skipped: {skipped}" in first.stdout, skipped

    # What was installed works, and is where the unit and the config say.
    vantage = stage / "opt/vantage/bin/vantage"
    version = subprocess.run([str(vantage), "--version"], capture_output=True, text=True,
                             timeout=60, check=False)  # fmt: skip
    assert version.returncode == 0 and version.stdout.startswith("vantage "), version.stderr
    assert (stage / "usr/local/bin/vantage").readlink() == Path("/opt/vantage/bin/vantage")
    assert (stage / "etc/systemd/system/vantage.service").read_bytes() == UNIT.read_bytes()
    assert (stage / "var/lib/vantage").stat().st_mode & 0o777 == 0o750
    config = stage / "etc/vantage/vantage.toml"
    cfg = load_config(config, env={})
    assert cfg.data_dir() == Path("/var/lib/vantage")
    assert cfg.vantage.asn_db == ""  # no databases were fetched: none configured
    assert config.stat().st_mode & 0o777 == 0o640

    # Again (the environment variable this time): nothing changes.
    before = tree(stage)
    second = run_install("--root", str(stage), "--from", str(source),
                         env={"VANTAGE_INSTALL_OFFLINE": "1"})  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert "nothing changed" in second.stdout and "done: " not in second.stdout
    assert "never overwritten" in second.stdout
    assert tree(stage) == before

    # A changed source is installed again; an edited config is kept.
    (source / "probe" / "added_module.py").write_text("X = 1\n")
    config.write_text(config.read_text() + "\n# my change\n")
    third = run_install("--root", str(stage), "--from", str(source), "--offline")
    assert third.returncode == 0 and "done: install Vantage" in third.stdout
    assert "# my change" in config.read_text()
    (stage / "var/lib/vantage/vantage.db").write_text("measurements")

    gone = run_install("--uninstall", "--root", str(stage))
    assert gone.returncode == 0, gone.stderr
    assert not (stage / "opt/vantage").exists()
    assert not (stage / "usr/local/bin/vantage").is_symlink()
    assert not (stage / "etc/systemd/system/vantage.service").exists()
    assert "# my change" in config.read_text()  # the volunteer's edits stay
    assert (stage / "var/lib/vantage/vantage.db").read_text() == "measurements"
    assert "kept: " in gone.stdout

    purged = run_install("--uninstall", "--purge", "--root", str(stage))
    assert purged.returncode == 0, purged.stderr
    assert not (stage / "var/lib/vantage").exists() and not (stage / "etc/vantage").exists()
    again = run_install("--uninstall", "--root", str(stage))
    assert again.returncode == 0 and "nothing changed" in again.stdout


@pytest.mark.slow
@pytest.mark.skipif(not can_build_offline(), reason="offline build needs the wheel package")
def test_install_from_a_wheel_removes_an_unchanged_config(tmp_path: Path) -> None:
    source = snapshot_source(tmp_path / "src")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                            "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"),
                            str(source)], capture_output=True, text=True, timeout=300,
                           check=False)  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("vantage_probe-*.whl")
    stage = tmp_path / "stage"
    first = run_install("--root", str(stage), "--from", str(wheel), "--offline")
    assert first.returncode == 0, first.stdout + first.stderr
    assert (stage / "opt/vantage/bin/vantage").is_file()
    assert "nothing changed" in run_install("--root", str(stage), "--from", str(wheel),
                                            "--offline").stdout  # fmt: skip
    gone = run_install("--uninstall", "--root", str(stage))
    assert gone.returncode == 0
    assert not (stage / "etc/vantage/vantage.toml").exists()  # as installed: removed
    assert (stage / "var/lib/vantage").is_dir()  # data kept


def test_example_config_has_the_lines_the_installer_switches_on() -> None:
    text = (DEPLOY / "vantage.toml.example").read_text().splitlines()
    assert '# data_dir = "/var/lib/vantage"' in text
    assert any(line.startswith("# asn_db = ") for line in text)
    assert any(line.startswith("# country_db = ") for line in text)


class Mirror:
    """A loopback stand-in for DB-IP's download site, serving a folder."""

    def __init__(self, folder: Path) -> None:
        import functools
        import threading
        from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

        class Quiet(SimpleHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        handler = functools.partial(Quiet, directory=str(folder))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)  # fmt: skip
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
@pytest.mark.skipif(not can_build_offline(), reason="offline build needs the wheel package")
def test_ip_databases_fetched_from_a_mirror_and_configured(tmp_path: Path) -> None:
    import datetime as dt
    import gzip

    from tests.fixtures.mmdb import write_asn_db, write_country_db

    folder = tmp_path / "mirror"
    folder.mkdir()
    this = dt.date.today().replace(day=1)
    last = (this - dt.timedelta(days=1)).replace(day=1)
    asn = write_asn_db(tmp_path / "a.mmdb", {"198.51.100.0/24": (64500, "Example Net")})
    country = write_country_db(tmp_path / "c.mmdb", {"198.51.100.0/24": "NL"})
    # This month's ASN file is not out yet: last month's is taken.
    (folder / f"dbip-asn-lite-{last:%Y-%m}.mmdb.gz").write_bytes(gzip.compress(asn.read_bytes()))
    (folder / f"dbip-country-lite-{this:%Y-%m}.mmdb.gz").write_bytes(
        gzip.compress(country.read_bytes()))  # fmt: skip
    source = snapshot_source(tmp_path / "src")
    mirror = Mirror(folder)
    try:
        stage = tmp_path / "stage"
        args = (
            "--root",
            str(stage),
            "--from",
            str(source),
            "--offline",
            "--geoip-from",
            mirror.url,
        )
        first = run_install(*args)
        assert first.returncode == 0, first.stdout + first.stderr
        data = stage / "var/lib/vantage"
        assert (data / "dbip-asn-lite.mmdb").read_bytes() == asn.read_bytes()
        assert (data / "dbip-country-lite.mmdb").read_bytes() == country.read_bytes()
        cfg = load_config(stage / "etc/vantage/vantage.toml", env={})
        assert cfg.vantage.asn_db == "/var/lib/vantage/dbip-asn-lite.mmdb"
        assert cfg.vantage.country_db == "/var/lib/vantage/dbip-country-lite.mmdb"
        assert "nothing changed" in run_install(*args).stdout
    finally:
        mirror.close()
    # A mirror that does not answer: skipped, and nothing configured that is not there.
    from tests.fixtures.tcpserver import closed_port

    stage = tmp_path / "stage2"
    down = run_install("--root", str(stage), "--from", str(source), "--offline",
                       "--geoip-from", f"http://127.0.0.1:{closed_port()}")  # fmt: skip
    assert down.returncode == 0, down.stderr
    assert "skipped: IP database" in down.stdout
    assert not list((stage / "var/lib/vantage").iterdir())
    assert load_config(stage / "etc/vantage/vantage.toml", env={}).vantage.asn_db == ""


# -- the installer's fallbacks (issue 16) ---------------------------------------------------


def _fake_python(directory: Path, name: str, minor: int, venv: bool = True) -> Path:
    """A stand-in interpreter that says it is Python 3.MINOR (and whether it can make
    virtualenvs): the installer asks only those questions before it uses one."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(f"""#!/bin/sh
case "$*" in
  *"version_info < (3, 11)"*) [ {minor} -ge 11 ] && exit 0 || exit 1 ;;
  *"import ensurepip, venv"*) exit {0 if venv else 1} ;;
  *"version_info[1]"*) echo {minor} ;;
  -V) echo "Python 3.{minor}.2" ;;
esac
exit 0
""")
    path.chmod(0o755)
    return path


def test_an_old_python_is_passed_over_for_a_recent_one(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    old = _fake_python(bin_dir, "python3", 9)
    (bin_dir / "python3.11").symlink_to(sys.executable)
    env = {"PYTHON": str(old), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = run_install("--dry-run", "--no-download", "--root", str(tmp_path / "s"), env=env)
    assert result.returncode == 0, result.stderr
    assert "is Python 3.9.2: using python3.11" in result.stdout


def test_no_recent_python_says_the_way_forward(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    old = _fake_python(bin_dir, "python3", 9)
    path = f"{bin_dir}:/usr/bin:/bin"  # no python3.11+ there (a fresh bullseye)
    if any(Path(d, f"python3.{m}").exists() for d in ("/usr/bin", "/bin") for m in (11, 12, 13)):
        pytest.skip("this machine has a system python3.11+ in /usr/bin")
    result = run_install("--dry-run", "--no-download", env={"PYTHON": str(old), "PATH": path})
    assert result.returncode != 0
    assert "Python 3.11 or newer" in result.stderr and "bookworm" in result.stderr
    assert "PYTHON=/path/to/python3.11" in result.stderr


def test_missing_venv_is_installed_after_an_apt_update(tmp_path: Path) -> None:
    fake = _fake_python(tmp_path / "bin", "python3", 11, venv=False)
    result = run_install("--dry-run", "--no-download", env={"PYTHON": str(fake)})
    assert result.returncode == 0, result.stderr
    update = result.stdout.find("$ apt-get update")
    install = result.stdout.find("$ apt-get install -y python3-venv python3.11-venv")
    assert 0 <= update < install, result.stdout


def test_the_invoking_user_joins_the_group_and_next_steps_fit_the_system(tmp_path: Path) -> None:
    source = snapshot_source(tmp_path / "src")
    stage = tmp_path / "stage"
    result = run_install("--root", str(stage), "--from", str(source), "--offline",
                         env={"SUDO_USER": "pi"})  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped: usermod -aG vantage pi (--root)" in result.stdout
    steps = result.stdout[result.stdout.index("Next steps:") :]
    assert "vantage status   # as pi" in steps
    if not Path("/run/systemd/system").is_dir():  # no systemd: no systemctl or journalctl
        assert "systemctl" not in steps and "journalctl" not in steps
        assert "daemon" in steps
    nobody = run_install("--dry-run", "--no-download", "--no-add-user",
                         env={"SUDO_USER": "pi"})  # fmt: skip
    assert "usermod" not in nobody.stdout
