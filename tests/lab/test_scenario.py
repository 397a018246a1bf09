"""Scenario files, lab planning, the router's firewall and expectation judging.
Pure: no namespaces needed."""

from __future__ import annotations

import datetime as dt

import pytest

from probe.catalog import parse_catalog
from probe.lab import addresses as A
from probe.lab.firewall import ruleset
from probe.lab.plan import catalog_toml, make_plan
from probe.lab.runner import evaluate, resolve_match
from probe.lab.scenario import ScenarioError, load_scenario, parse_scenario, shipped_scenarios
from schema.model import DNSAnswer, DNSQuery, HTTPTransaction, Measurement, Target, TCPConnect
from tests.conftest import VANTAGE

GOOD = """
name = "x"
services = ["signal"]
[[rule]]
kind = "tls"
match = ["*.signal.org"]
action = "reset"
[[expect]]
service = "signal"
target = "chat"
step = "tls"
failure = "connection_reset"
"""


def test_every_shipped_scenario_parses_and_covers_every_rule_kind() -> None:
    scenarios = [load_scenario(p) for p in shipped_scenarios()]
    assert len(scenarios) >= 20
    kinds = {r.kind for s in scenarios for r in s.rules}
    assert kinds == {"dns", "dns-inject", "tcp", "tls", "http", "throttle", "outage"}
    actions = {(r.kind, r.action) for s in scenarios for r in s.rules}
    assert {
        ("dns", a) for a in ("nxdomain", "servfail", "refused", "timeout", "empty", "answer")
    } <= actions
    assert {("tcp", "drop"), ("tcp", "reset"), ("tls", "reset"), ("tls", "drop"),
            ("http", "blockpage"), ("http", "reset")} <= actions  # fmt: skip
    assert any(r.residual for s in scenarios for r in s.rules)
    assert any(s.path.loss_pct for s in scenarios) and any(s.path.jitter_ms for s in scenarios)
    assert any(not s.rules for s in scenarios)  # clean runs that must find nothing
    names = [s.name for s in scenarios]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.replace('kind = "tls"', 'kind = "smtp"'), "rule[0].kind: 'smtp' is not one of"),
        (lambda s: s.replace('action = "reset"', 'action = "explode"'), "rule[0].action"),
        (lambda s: s.replace('failure = "connection_reset"', 'failure = "blocked"'),
         "expect[0].failure: 'blocked' is not a failure string"),
        (lambda s: s.replace('step = "tls"', 'step = "quic"'), "expect[0].step"),
        (lambda s: s.replace('target = "chat"', 'target = "nope"'), "expect[0].target: signal has no target"),
        (lambda s: s.replace('service = "signal"', 'service = "whatsapp"'),
         "expect[0].service: 'whatsapp' is not measured"),
        (lambda s: s.replace('services = ["signal"]', 'services = ["icq"]'), "unknown built-in service"),
        (lambda s: s.replace('match = ["*.signal.org"]', ""), "rule[0].match"),
        (lambda s: s + "\n[path]\nloss_pct = 120\n", "path.loss_pct"),
        (lambda s: s + "\n[path]\ndelay = 5\n", "path.delay: unknown key"),
        (lambda s: s + '\n[[site]]\nname = "a.example"\ntls = "maybe"\n', "site[0].tls"),
        (lambda s: s.replace('name = "x"', ""), "name: is required"),
        (lambda s: s.split("[[expect]]")[0], "at least one [[expect]]"),
        (lambda s: s + '\n[[target]]\nid = "t"\nkind = "http"\n', "target[0].url: is required"),
        (lambda s: s + "\n[[rule\n", "not valid TOML"),
    ],
)  # fmt: skip
def test_malformed_scenarios_name_file_key_and_reason(edit, message: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(edit(GOOD), "x.toml")
    assert str(info.value).startswith("x.toml: ") and message in str(info.value)


def test_plan_remaps_fixed_addresses_and_gives_every_host_a_site() -> None:
    s = parse_scenario(GOOD.replace('services = ["signal"]', 'services = ["telegram"]')
                       .replace('"signal"\ntarget = "chat"', '"telegram"\ntarget = "web"'), "t.toml")  # fmt: skip
    plan = make_plan(s)
    assert plan.remapped["149.154.175.50"] == "198.19.2.1"
    dc = {t.id: t for t in plan.services[0].targets}["dc1-443"]
    assert dc.url == "http://198.19.2.1:443/"
    site = plan.sites["198.19.2.1"]
    assert site.http_ports == {80, 443} and not site.tls_ports
    web = plan.sites[plan.names["web.telegram.org"]]
    assert web.tls_ports == {443}
    assert plan.zone["web.telegram.org"] == [plan.names["web.telegram.org"]]
    # The lab's copy of the catalog is a catalog a user could write.
    again = parse_catalog(catalog_toml(plan.services[0]), "lab")
    assert again.targets == plan.services[0].targets


def test_firewall_rules() -> None:
    s = parse_scenario(GOOD + '\n[[rule]]\nkind = "tcp"\nmatch = ["chat.signal.org"]\nports = [443]\n'
                       'action = "drop"\n[[rule]]\nkind = "tcp"\nmatch = ["cdsi.signal.org"]\n'
                       'action = "reset"\n', "f.toml")  # fmt: skip
    plan = make_plan(s)
    text = ruleset(
        s.rules, {f"rule{i}": resolve_match(plan, r.match) for i, r in enumerate(s.rules)}, []
    )
    chat, cdsi = plan.names["chat.signal.org"], plan.names["cdsi.signal.org"]
    assert f'iifname "lan" ip daddr {{ {chat} }} tcp dport {{ 443 }} drop' in text
    assert f'iifname "lan" ip daddr {{ {cdsi} }} meta l4proto tcp reject with tcp reset' in text
    signal_sites = resolve_match(plan, ("*.signal.org",))
    assert (
        f"ip daddr {{ {', '.join(sorted(signal_sites))} }} meta l4proto tcp redirect to :{A.PROXY_PORT}"
        in text
    )
    assert resolve_match(plan, ("*.signal.org",)) == sorted(
        {plan.names[n] for n in plan.names if n.endswith(".signal.org")}
    )


def _m(target_id: str, **kw) -> Measurement:
    t = Target(id=target_id, service="signal", kind="http", host="chat.signal.org",
               url="https://chat.signal.org/")  # fmt: skip
    return Measurement(
        "u-" + target_id, "r", t, VANTAGE, dt.datetime(2026, 1, 1, tzinfo=dt.UTC), **kw
    )


def test_evaluate_compares_each_step() -> None:
    s = parse_scenario(GOOD, "e.toml")
    from schema.model import TLSHandshake

    blocked = _m("chat", tls_handshakes=[TLSHandshake("1.1.1.1", 443, "chat.signal.org", 0, 1,
                                                       failure="connection_reset",
                                                       failed_operation="tls_handshake")])  # fmt: skip
    (r,) = evaluate(s.expectations, [blocked])
    assert r.match and r.observed == {"failure": "connection_reset"}
    fine = _m("chat", tls_handshakes=[TLSHandshake("1.1.1.1", 443, "chat.signal.org", 0, 1)])
    (r,) = evaluate(s.expectations, [fine])
    assert not r.match and r.observed == {"failure": "none"}
    (r,) = evaluate(s.expectations, [])
    assert not r.match and r.observed == {"error": "not measured"}


def test_evaluate_answers_status_and_body() -> None:
    text = GOOD.replace('step = "tls"\nfailure = "connection_reset"',
                        'step = "dns"\nfailure = "none"\nanswers = ["198.19.3.1"]')  # fmt: skip
    text += ('\n[[expect]]\nservice = "signal"\ntarget = "chat"\nstep = "http"\nfailure = "none"\n'
             'status = 200\nbody_contains = "blocked"\n')  # fmt: skip
    s = parse_scenario(text, "a.toml")
    q = DNSQuery("chat.signal.org", "A", "udp", "198.18.0.1:53", 0, 1, system_resolver=True,
                 answers=[DNSAnswer("A", "198.19.3.1", 60)])  # fmt: skip
    page = HTTPTransaction(
        "https://chat.signal.org/", "GET", 0, 1, status=200, body=b"you are blocked"
    )
    results = evaluate(s.expectations, [_m("chat", queries=[q], requests=[page],
                                           tcp_connect=[TCPConnect("198.19.3.1", 443, 0, 1)])])  # fmt: skip
    assert [r.match for r in results] == [True, True]
    page.body = b"welcome"
    assert [r.match for r in evaluate(s.expectations, [_m("chat", queries=[q], requests=[page])])] == [
        True, False]  # fmt: skip


def test_the_labs_asn_database_places_each_address_in_what_it_stands_for() -> None:
    """Catalog hosts in their service's network from the catalog, fixed addresses too;
    scenario sites, forged addresses and the blockpage server in other networks; bogons
    in none (issue 11)."""
    from probe.lab.plan import ISP_ASN, asn_networks

    s = parse_scenario(
        """
name = "asn"
services = ["whatsapp", "telegram", "signal"]
[[site]]
name = "unrelated.example"
[[rule]]
kind = "dns"
match = ["web.whatsapp.com"]
action = "answer"
addresses = ["198.19.9.9", "10.10.34.34"]
[[expect]]
service = "whatsapp"
blocking = "dns"
""",
        "asn.toml",
    )
    plan = make_plan(s)
    networks = asn_networks(plan, s)
    assert networks[plan.names["e1.whatsapp.net"]][0] == 32934
    assert networks[plan.names["web.whatsapp.com"]][0] == 32934
    assert networks[plan.remapped["149.154.175.50"]][0] == 62041  # Telegram's, remapped
    signal = {networks[plan.names[h]] for h in ("chat.signal.org", "uptime.signal.org")}
    assert len(signal) == 1 and next(iter(signal))[0] not in (32934, 62041)  # one of its own
    site, forged = networks[plan.names["unrelated.example"]], networks["198.19.9.9"]
    assert len({site[0], forged[0], 32934, 62041, next(iter(signal))[0]}) == 5
    assert networks[A.BLOCKPAGE] == ISP_ASN
    assert "10.10.34.34" not in networks


def test_a_scenario_may_expect_the_deciding_reason_and_name_fingerprint_files() -> None:
    from pathlib import Path

    from probe.lab.runner import _probe_config

    text = GOOD.replace('failure = "connection_reset"', 'failure = "connection_reset"\n'
                        'reason = "sni_filtering"') + (
        '[probe.analysis]\nfingerprints = ["../fingerprints.toml"]\n'
    )  # fmt: skip
    s = parse_scenario(text, str(Path("/somewhere/scenarios/x.toml")))
    assert s.expectations[0].reason == "sni_filtering"
    config = _probe_config(s, Path("/ca.pem"), Path("/lab-asn.mmdb"))
    assert 'fingerprints = ["/somewhere/scenarios/../fingerprints.toml"]' in config
    assert 'asn_db = "/lab-asn.mmdb"' in config
    with pytest.raises(ScenarioError, match="reason"):
        parse_scenario(GOOD.replace('step = "tls"', 'reason = "no such!"\nstep = "tls"'), "x")
