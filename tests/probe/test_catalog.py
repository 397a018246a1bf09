"""The catalog loader: the built-in catalog is valid; malformed files fail with
file, key and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from probe.catalog import CatalogError, load_catalog, load_file, parse_catalog, select

GOOD = """
format = 1
[service]
name = "mine"
source = { url = "https://example.org/notes", checked = 2026-01-02 }

[[target]]
id = "site"
kind = "http"
url = "https://example.org/"
expect = { asns = [64500], status = [200] }
"""


def test_builtin_catalog_covers_the_messaging_services() -> None:
    services = {s.name: s for s in load_catalog()}
    assert set(services) == {"whatsapp", "telegram", "signal", "facebook_messenger",
                             "snapchat", "controls"}  # fmt: skip
    whatsapp = {t.id: t for t in services["whatsapp"].targets}
    assert whatsapp["endpoint-e16"].host == "e16.whatsapp.net"
    assert whatsapp["endpoint-e1"].ports == (443, 5222)
    assert whatsapp["registration"].url == "https://v.whatsapp.net/v2/register"
    telegram = services["telegram"].targets
    assert {t.url for t in telegram if t.method == "POST"} >= {
        "http://149.154.175.50/",
        "http://149.154.175.50:443/",
        "http://95.161.76.100/",
    }
    assert all(t.control for t in services["controls"].targets)
    # Diagnostic targets (issue 11): they explain, they do not decide the service.
    diagnostic = {(s.name, t.id) for s in services.values() for t in s.targets
                  if t.role == "diagnostic"}  # fmt: skip
    assert diagnostic == {("signal", "uptime"), ("facebook_messenger", "stun")}
    for s in services.values():
        for t in s.targets:
            assert t.source is not None and t.source.checked.year >= 2026, (s.name, t.id)


def test_user_catalog_is_added(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(GOOD)
    services = load_catalog([path])
    mine = select(services, ["mine"])[0]
    (t,) = mine.targets
    assert (t.host, t.kind, t.expect.asns, t.expect.status) == (
        "example.org",
        "http",
        (64500,),
        (200,),
    )
    assert t.source is not None and t.source.url == "https://example.org/notes"


@pytest.mark.parametrize(
    ("edit", "key", "reason"),
    [
        (lambda s: s.replace("format = 1", "format = 2"), "format", "catalog format 1"),
        (lambda s: s.replace('kind = "http"', 'kind = "ftp"'), "target[0].kind", "not one of"),
        (lambda s: s.replace('url = "https://example.org/"', 'url = "ftp://x/"'), "target[0].url",
         "not an http"),
        (lambda s: s.replace("asns = [64500]", 'asns = ["AS64500"]'), "target[0].expect.asns[0]",
         "expected an integer"),
        (lambda s: s.replace("status = [200]", "status = [99]"), "target[0].expect.status[0]",
         "not an HTTP status"),
        (lambda s: s.replace('id = "site"', 'id = "site"\ncolour = "red"'), "target[0].colour",
         "unknown key"),
        (lambda s: s.replace("checked = 2026-01-02", 'checked = "yesterday"'),
         "service.source.checked", "not a date"),
        (lambda s: s + '\n[[target]]\nid = "site"\nkind = "dns"\nhost = "x.org"\n', "target[1].id",
         "duplicate"),
        (lambda s: s + '\n[[target]]\nid = "p"\nkind = "tcp"\nhost = "x.org"\nports = [70000]\n',
         "target[1].ports[0]", "not a port"),
        (lambda s: s + '\n[[target]]\nid = "p"\nkind = "tcp"\nhost = "x.org"\n', "target[1].ports",
         "at least one port"),
        (lambda s: s + '\n[[target]]\nid = "a"\nkind = "tcp"\nhost = "x"\nports = [1]\n'
         'addresses = ["1.2.3"]\n', "target[1].addresses[0]", "not an IP address"),
        (lambda s: s.replace('name = "mine"', ""), "service.name", "is required"),
        (lambda s: s.replace("[service]", "[service]\ncontrol = 1"), "service.control",
         "expected true or false"),
        (lambda s: s + "\n[[target]\n", "", "not valid TOML"),
        (lambda s: s.replace('id = "site"', 'id = "site"\nrole = "optional"'), "target[0].role",
         "not one of essential, diagnostic"),
    ],
)  # fmt: skip
def test_malformed_catalog_names_file_key_and_reason(edit, key: str, reason: str) -> None:
    with pytest.raises(CatalogError) as info:
        parse_catalog(edit(GOOD), "mine.toml")
    err = info.value
    assert err.origin == "mine.toml" and err.key == key and reason in err.reason
    assert str(err).startswith("mine.toml: ")


def test_duplicate_service_names_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text(GOOD.replace('"mine"', '"whatsapp"'))
    with pytest.raises(CatalogError, match="already defined in builtin:whatsapp.toml"):
        load_catalog([tmp_path / "a.toml"])


def test_unreadable_file_and_unknown_service(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read"):
        load_file(tmp_path / "missing.toml")
    with pytest.raises(CatalogError, match="unknown service 'nope'"):
        select(load_catalog(), ["nope"])


def test_ca_file_is_resolved_next_to_the_catalog(tmp_path: Path, ca_file: str) -> None:
    (tmp_path / "root.pem").write_bytes(Path(ca_file).read_bytes())
    text = GOOD.replace('id = "site"', 'id = "site"\nca_file = "root.pem"')
    (tmp_path / "c.toml").write_text(text)
    (t,) = load_file(tmp_path / "c.toml").targets
    assert t.ca_file == str(tmp_path / "root.pem")
    (tmp_path / "d.toml").write_text(text.replace("root.pem", "none.pem"))
    with pytest.raises(CatalogError, match="no such file"):
        load_file(tmp_path / "d.toml")


def test_the_example_catalog_loads_with_every_key_it_documents() -> None:
    root = Path(__file__).resolve().parents[2]
    service = load_file(root / "deploy" / "targets.example.toml")
    roles = {t.id: t.role for t in service.targets}
    assert roles["name"] == "diagnostic" and roles["home"] == "essential"
