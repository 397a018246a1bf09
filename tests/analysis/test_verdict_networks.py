"""Issue 11's rules, with literal observations: forged answers told by their network,
ghost DNS, the user's own resolver deciding, cleartext pages without a control, and
DNS as the cause of the blockpage it led to. Each rule is tried with and without the
control helper and with and without an ASN database (answers with and without
``asn``)."""

from __future__ import annotations

import datetime as dt

from probe.analysis import Controls, judge, service_status
from schema.model import (
    DNSAnswer,
    DNSQuery,
    Expectations,
    HTTPTransaction,
    Measurement,
    Target,
    TCPConnect,
    TLSHandshake,
    Verdict,
)
from tests.conftest import VANTAGE

NAME = "e1.chat.example"
REAL, FORGED, OTHER_REAL = "203.0.113.10", "198.51.100.66", "203.0.113.11"
META, UNRELATED, ISP = 32934, 64500, 64511  # the service's network, another, the ISP's
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
SYSTEM, PUBLIC, DOH = "192.0.2.53:53", "198.51.100.9:53", "https://dns.example/dns-query"
NETWORK_OF = {REAL: META, OTHER_REAL: META, FORGED: UNRELATED}


def tcp_target(asns: tuple[int, ...] = (META,)) -> Target:
    return Target(id="e1", service="svc", kind="tcp", host=NAME, ports=(443,),
                  expect=Expectations(asns=asns))  # fmt: skip


def web_target(scheme: str = "https", known: bool = True) -> Target:
    port = 443 if scheme == "https" else 80
    return Target(id="web", service="svc", kind="http", host=NAME, url=f"{scheme}://{NAME}/",
                  ports=(port,), expect=Expectations(cert_names=(NAME,) if known else ()))  # fmt: skip


def q(*addresses: str, resolver: str = SYSTEM, failure: str | None = None,
      placed: bool = True) -> DNSQuery:  # fmt: skip
    """A query; ``placed``: its answers were looked up in an ASN database."""
    answers = [DNSAnswer("A", a, 60, NETWORK_OF.get(a, 0) if placed else None,
                         "Example Org" if placed and a in NETWORK_OF else None)
               for a in addresses]  # fmt: skip
    engine = "doh" if resolver.startswith("https") else "udp"
    return DNSQuery(NAME, "A", engine, resolver, 0.0, 0.05, answers=answers, failure=failure,
                    system_resolver=resolver == SYSTEM)  # fmt: skip


def tcp(ip: str, failure: str | None = None, port: int = 443) -> TCPConnect:
    return TCPConnect(ip, port, 0.05, 0.1, failure=failure)


def tls(ip: str, failure: str | None = None) -> TLSHandshake:
    return TLSHandshake(ip, 443, NAME, 0.1, 0.2, failure=failure)


def page(scheme: str = "https", body: bytes = b"<title>Example chat</title>hello",
         headers: list[tuple[str, str]] | None = None, status: int = 200) -> HTTPTransaction:  # fmt: skip
    return HTTPTransaction(f"{scheme}://{NAME}/", "GET", 0.2, 0.4, status=status, body=body,
                           body_length=len(body), response_headers=headers or [])  # fmt: skip


def m(t: Target, **steps: object) -> Measurement:
    return Measurement("u", "r", t, VANTAGE, T0, **steps)  # type: ignore[arg-type]


def genuine_helper(t: Target, *, placed: bool = True) -> Measurement:
    """The control helper's view from an uncensored place: the real address works."""
    steps: dict[str, object] = {"queries": [q(REAL, placed=placed)], "tcp_connect": [tcp(REAL)]}
    if t.kind == "http":
        steps["tls_handshakes"] = [tls(REAL)] if t.url and t.url.startswith("https") else []
        steps["requests"] = [page("https" if t.url and t.url.startswith("https") else "http")]
    return m(t, **steps)


def codes(v: Verdict) -> list[str]:
    return [r.code for r in v.reasons]


# -- class 1: a forged answer that works, told by its network ------------------------


def test_forged_working_answer_outside_the_catalog_network_is_dns_blocking() -> None:
    t = tcp_target()
    v = judge(m(t, queries=[q(FORGED)], tcp_connect=[tcp(FORGED)]),
              Controls(helper=genuine_helper(t), asn_db=True))  # fmt: skip
    assert (v.accessible, v.blocking, v.confidence) == (False, "dns", "high")
    reason = next(r for r in v.reasons if r.code == "dns_foreign_network")
    assert reason.evidence["answer_asns"] == [UNRELATED]
    assert reason.evidence["expected_asns"] == [META]
    assert "asn_database" in v.controls


def test_forged_working_answer_without_a_helper_rests_on_the_catalog() -> None:
    t = tcp_target()
    v = judge(m(t, queries=[q(FORGED)], tcp_connect=[tcp(FORGED)]), Controls(asn_db=True))
    assert (v.blocking, v.confidence) == ("dns", "medium")
    assert "dns_foreign_network" in codes(v) and "no_control_helper" in codes(v)


def test_forged_working_answer_without_catalog_networks_rests_on_the_helper() -> None:
    t = tcp_target(asns=())
    v = judge(m(t, queries=[q(FORGED)], tcp_connect=[tcp(FORGED)]),
              Controls(helper=genuine_helper(t), asn_db=True))  # fmt: skip
    assert (v.blocking, v.confidence) == ("dns", "medium")
    # Nothing to compare the network with: the next steps decide (it worked).
    alone = judge(m(t, queries=[q(FORGED)], tcp_connect=[tcp(FORGED)]), Controls(asn_db=True))
    assert (alone.accessible, alone.blocking) == (True, False)


def test_without_an_asn_database_the_verdict_falls_back_and_says_so() -> None:
    t = tcp_target()
    steps = {"queries": [q(FORGED, placed=False)], "tcp_connect": [tcp(FORGED)]}
    v = judge(m(t, **steps), Controls(helper=genuine_helper(t, placed=False)))
    assert (v.accessible, v.blocking, v.confidence) == (True, False, "low")
    assert "reachable_unverified" in codes(v) and codes(v)[-1] == "no_asn_database"
    alone = judge(m(t, **steps), Controls())
    assert alone.blocking is False and "no_asn_database" in codes(alone)
    assert "asn_database" not in alone.controls


def test_a_cdn_answer_in_the_genuine_network_is_not_forged() -> None:
    """Answers differ by place (a CDN), but the network is the service's own."""
    t = tcp_target()
    v = judge(m(t, queries=[q(OTHER_REAL)], tcp_connect=[tcp(OTHER_REAL)]),
              Controls(helper=genuine_helper(t), asn_db=True))  # fmt: skip
    assert (v.accessible, v.blocking) == (True, False)
    assert v.confidence != "low" and "dns_same_network" in codes(v)
    # The same network as the control answers counts too, without catalog networks.
    t2 = tcp_target(asns=())
    v2 = judge(m(t2, queries=[q(OTHER_REAL)], tcp_connect=[tcp(OTHER_REAL)]),
               Controls(helper=genuine_helper(t2), asn_db=True))  # fmt: skip
    assert (v2.accessible, v2.blocking) == (True, False) and "dns_same_network" in codes(v2)


def test_an_address_the_database_does_not_know_is_not_called_forged() -> None:
    t = tcp_target()
    unknown = "192.0.2.200"  # asn 0: looked up, not found
    v = judge(m(t, queries=[q(unknown)], tcp_connect=[tcp(unknown)]),
              Controls(helper=genuine_helper(t), asn_db=True))  # fmt: skip
    assert v.blocking is False and "dns_foreign_network" not in codes(v)


def test_an_injected_public_resolver_answer_is_no_control() -> None:
    """An on-path injector answers the public resolver's plaintext query the same way:
    that agreement proves nothing. A DoH answer crossed the path encrypted and counts."""
    t = tcp_target()
    injected = judge(m(t, queries=[q(FORGED), q(FORGED, resolver=PUBLIC)],
                       tcp_connect=[tcp(FORGED)]), Controls(asn_db=True))  # fmt: skip
    assert (injected.blocking, injected.confidence) == ("dns", "medium")
    by_doh = judge(m(t, queries=[q(REAL), q(REAL, resolver=DOH)], tcp_connect=[tcp(REAL)]),
                   Controls(asn_db=True))  # fmt: skip
    assert (by_doh.accessible, by_doh.blocking) == (True, False)


def test_a_validating_handshake_outranks_the_network() -> None:
    """Censored Planet's order: a valid certificate for the name at the address is
    genuine whatever network the database puts it in."""
    t = web_target()
    v = judge(m(t, queries=[q(FORGED)], tcp_connect=[tcp(FORGED)], tls_handshakes=[tls(FORGED)],
                requests=[page()]), Controls(helper=genuine_helper(t), asn_db=True))  # fmt: skip
    assert (v.accessible, v.blocking) == (True, False)


# -- class 2: ghost DNS -----------------------------------------------------------


def ghost_helper(t: Target, failure: str = "dns_nxdomain_error") -> Measurement:
    return m(t, queries=[q(failure=failure)])


def test_an_answer_for_a_name_that_does_not_exist_elsewhere_is_dns_blocking() -> None:
    t = web_target("http", known=False)
    steps = {"queries": [q(FORGED)], "tcp_connect": [tcp(FORGED, port=80)],
             "requests": [page("http", b"<title>Notice</title>not here")]}  # fmt: skip
    v = judge(m(t, **steps), Controls(helper=ghost_helper(t)))
    assert (v.accessible, v.blocking, v.confidence) == (False, "dns", "high")
    assert "dns_ghost_answer" in codes(v)
    # The answered address refusing connections is the same pattern.
    refused = judge(m(t, queries=[q(FORGED)], tcp_connect=[tcp(FORGED, "connection_refused", 80)]),
                    Controls(helper=ghost_helper(t)))  # fmt: skip
    assert (refused.blocking, refused.confidence) == ("dns", "high")
    # No answer at all (NOERROR, empty) from the helper says the same.
    empty = judge(m(t, **steps), Controls(helper=ghost_helper(t, "dns_no_answer")))
    assert empty.blocking == "dns"


def test_ghost_dns_without_a_helper_rests_on_trusted_resolvers() -> None:
    t = web_target("http", known=False)
    steps = {"queries": [q(FORGED), q(resolver=DOH, failure="dns_nxdomain_error")],
             "tcp_connect": [tcp(FORGED, port=80)], "requests": [page("http")]}  # fmt: skip
    v = judge(m(t, **steps), Controls())
    assert (v.blocking, v.confidence) == ("dns", "medium")


def test_a_helper_that_could_not_resolve_is_no_ghost_evidence() -> None:
    t = web_target("http", known=False)
    steps = {"queries": [q(FORGED)], "tcp_connect": [tcp(FORGED, port=80)],
             "requests": [page("http")]}  # fmt: skip
    v = judge(m(t, **steps), Controls(helper=ghost_helper(t, "dns_servfail_error")))
    assert "dns_ghost_answer" not in codes(v)


def test_a_validating_handshake_is_no_ghost() -> None:
    t = web_target()
    v = judge(m(t, queries=[q(REAL)], tcp_connect=[tcp(REAL)], tls_handshakes=[tls(REAL)],
                requests=[page()]), Controls(helper=ghost_helper(t)))  # fmt: skip
    assert (v.accessible, v.blocking) == (True, False)


# -- class 3: the user's resolver decides what the user gets -------------------------


def test_dead_system_answer_while_doh_is_honest_is_dns_blocking() -> None:
    t = web_target()
    steps = {
        "queries": [q(FORGED, placed=False), q(REAL, resolver=DOH, placed=False)],
        "tcp_connect": [tcp(FORGED, "generic_timeout_error"), tcp(REAL)],
        "tls_handshakes": [tls(REAL)],
        "requests": [page()],
    }
    v = judge(m(t, **steps), Controls())  # no helper, no ASN database
    assert (v.accessible, v.blocking, v.confidence) == (False, "dns", "high")
    reason = next(r for r in v.reasons if r.code == "dns_system_answer_fails")
    assert reason.evidence["working"] == [REAL]
    with_helper = judge(m(t, **steps), Controls(helper=genuine_helper(t, placed=False)))
    assert (with_helper.blocking, with_helper.confidence) == ("dns", "high")


def test_forged_system_answer_failing_tls_while_doh_is_honest() -> None:
    t = web_target()
    steps = {
        "queries": [q(FORGED), q(REAL, resolver=DOH)],
        "tcp_connect": [tcp(FORGED), tcp(REAL)],
        "tls_handshakes": [tls(FORGED, "connection_reset"), tls(REAL)],
        "requests": [page()],
    }
    v = judge(m(t, **steps), Controls(asn_db=True))
    assert (v.accessible, v.blocking) == (False, "dns")


def test_the_system_address_blocked_at_tcp_is_not_rescued_by_a_trusted_one() -> None:
    """Both resolvers agree on one address, a trusted one also gave another (a CDN):
    the user's address is dropped, so the user cannot connect."""
    t = tcp_target(asns=())
    steps = {
        "queries": [q(REAL, placed=False), q(REAL, OTHER_REAL, resolver=DOH, placed=False)],
        "tcp_connect": [tcp(REAL, "connection_refused"), tcp(OTHER_REAL)],
    }
    v = judge(m(t, **steps), Controls(helper=genuine_helper(t, placed=False)))
    assert (v.accessible, v.blocking, v.confidence) == (False, "tcp_ip", "high")


def test_only_trusted_resolvers_configured_every_address_counts() -> None:
    t = tcp_target(asns=())
    steps = {"queries": [q(REAL, resolver=DOH, placed=False)], "tcp_connect": [tcp(REAL)]}
    v = judge(m(t, **steps), Controls())
    assert (v.accessible, v.blocking) == (True, False)


# -- class 6: cleartext HTTP without a control ---------------------------------------


def test_cleartext_page_without_a_control_is_unknown() -> None:
    t = web_target("http", known=False)
    steps = {"queries": [q(REAL)], "tcp_connect": [tcp(REAL, port=80)], "requests": [page("http")]}
    for controls in (Controls(), Controls(helper_error="connection refused")):
        v = judge(m(t, **steps), controls)
        assert (v.accessible, v.blocking, v.confidence) == (None, None, "low")
        assert "cleartext_unverified" in codes(v)
    with_helper = judge(m(t, **steps), Controls(helper=genuine_helper(t)))
    assert (with_helper.accessible, with_helper.blocking) == (True, False)


def test_validated_https_without_a_control_is_still_accessible() -> None:
    t = web_target()
    v = judge(m(t, queries=[q(REAL)], tcp_connect=[tcp(REAL)], tls_handshakes=[tls(REAL)],
                requests=[page()]), Controls(helper_error="timed out"))  # fmt: skip
    assert (v.accessible, v.blocking, v.confidence) == (True, False, "high")


def test_a_cleartext_control_target_is_judged_for_connectivity() -> None:
    t = Target(id="captive", service="controls", kind="http", host=NAME, url=f"http://{NAME}/",
               control=True, expect=Expectations(status=(200,)))  # fmt: skip
    v = judge(m(t, queries=[q(REAL)], tcp_connect=[tcp(REAL, port=80)], requests=[page("http")]))
    assert (v.accessible, v.blocking) == (True, False)


# -- class 7: the cause wins over the symptom ----------------------------------------

BLOCKPAGE = page("http", b"<title>Access denied</title>", [("Server", "Protected by WireFilter")])


def test_forged_answer_leading_to_a_blockpage_is_dns() -> None:
    t = web_target("http", known=False)
    steps = {"queries": [q(FORGED, placed=False)], "tcp_connect": [tcp(FORGED, port=80)],
             "requests": [BLOCKPAGE]}  # fmt: skip
    v = judge(m(t, **steps), Controls(helper=genuine_helper(t, placed=False)))
    assert (v.accessible, v.blocking, v.confidence) == (False, "dns", "high")
    assert "dns_to_blockpage" in codes(v)


def test_a_blockpage_at_the_genuine_address_is_http_diff() -> None:
    t = web_target("http", known=False)
    steps = {"queries": [q(REAL)], "tcp_connect": [tcp(REAL, port=80)], "requests": [BLOCKPAGE]}
    for controls in (Controls(helper=genuine_helper(t)), Controls()):
        v = judge(m(t, **steps), controls)
        assert (v.blocking, v.confidence) == ("http-diff", "high")


def test_forged_answer_and_a_different_page_is_dns() -> None:
    t = web_target("http", known=False)
    steps = {"queries": [q(FORGED, placed=False)], "tcp_connect": [tcp(FORGED, port=80)],
             "requests": [page("http", b"<title>Welcome to nginx</title>" + b"x" * 900)]}  # fmt: skip
    v = judge(m(t, **steps), Controls(helper=genuine_helper(t, placed=False)))
    assert (v.accessible, v.blocking) == (False, "dns")
    assert "dns_inconsistent_then_differs" in codes(v)


# -- class 5: diagnostic targets do not dilute a service -----------------------------


def judged(tid: str, blocking: str | bool, role: str = "essential") -> Measurement:
    kind = "dns" if role == "diagnostic" else "http"
    t = Target(id=tid, service="signal", kind=kind, host=f"{tid}.signal.example",  # type: ignore[arg-type]
               url=None if kind == "dns" else f"https://{tid}.signal.example/", role=role)  # type: ignore[arg-type]  # fmt: skip
    out = m(t)
    out.verdict = Verdict(blocking is False, blocking, "high", "x")
    return out


def test_a_diagnostic_target_that_resolves_does_not_keep_a_blocked_service_partial() -> None:
    essential = [judged(x, "tls") for x in ("cdsi", "chat", "sfu", "storage")]
    ms = [*essential, judged("uptime", False, "diagnostic")]
    s = service_status("signal", ms, False)
    assert (s.status, s.blocked_targets) == ("blocked", ("cdsi", "chat", "sfu", "storage"))
    assert len(s.measurements) == 5  # measured and kept, just not deciding
    # Were uptime essential, the service would read partial (the complaint).
    as_before = [*essential, judged("uptime", False)]
    assert service_status("signal", as_before, False).status == "partial"


def test_a_service_of_diagnostic_targets_only_is_judged_by_them() -> None:
    s = service_status("signal", [judged("uptime", "dns", "diagnostic")], False)
    assert s.status == "blocked"


# -- the network check is last: later steps may say more -----------------------------


def test_a_forged_answer_that_then_fails_is_dns_not_tcp() -> None:
    """Only the catalog says the answer is forged (no controls): the failed connect to
    it is the forgery's doing, not a TCP block."""
    t = tcp_target()
    v = judge(m(t, queries=[q(FORGED)], tcp_connect=[tcp(FORGED, "generic_timeout_error")]),
              Controls(asn_db=True))  # fmt: skip
    assert (v.accessible, v.blocking) == (False, "dns")
    assert {"dns_foreign_network", "dns_inconsistent_then_failed"} <= set(codes(v))


def test_the_network_check_is_strengthened_by_what_the_address_did() -> None:
    t = web_target(known=False)
    steps = {
        "queries": [q(FORGED), q(REAL, resolver=DOH)],
        "tcp_connect": [tcp(FORGED, "generic_timeout_error"), tcp(REAL)],
        "tls_handshakes": [tls(REAL)],
        "requests": [page()],
    }
    v = judge(m(t, **steps), Controls(asn_db=True))  # network alone: low (DoH's view only)
    assert (v.blocking, v.confidence) == ("dns", "high")
    assert codes(v).index("dns_foreign_network") < codes(v).index("dns_system_answer_fails")


def test_a_blockpage_at_a_foreign_answer_is_dns_with_both_reasons() -> None:
    t = web_target("http", known=False)
    steps = {"queries": [q(FORGED)], "tcp_connect": [tcp(FORGED, port=80)],
             "requests": [BLOCKPAGE]}  # fmt: skip
    v = judge(m(t, **steps), Controls(helper=genuine_helper(t), asn_db=True))
    assert (v.accessible, v.blocking, v.confidence) == (False, "dns", "high")
    assert {"dns_foreign_network", "dns_to_blockpage"} <= set(codes(v))


def test_a_foreign_answer_serving_the_helpers_page_was_the_site() -> None:
    """OONI's web_connectivity rule: DNS inconsistent, but the page is the control's."""
    t = web_target("http", known=False)
    steps = {"queries": [q(FORGED)], "tcp_connect": [tcp(FORGED, port=80)],
             "requests": [page("http")]}  # fmt: skip
    v = judge(m(t, **steps), Controls(helper=genuine_helper(t), asn_db=True))
    assert (v.accessible, v.blocking, v.confidence) == (True, False, "low")
    assert codes(v)[-1] == "dns_foreign_page_matches"
    # A bare-TCP target has no page to compare: the forged answer stands.
    tt = tcp_target()
    bare = judge(m(tt, queries=[q(FORGED)], tcp_connect=[tcp(FORGED)]),
                 Controls(helper=genuine_helper(tt), asn_db=True))  # fmt: skip
    assert (bare.blocking, bare.confidence) == ("dns", "high")


def test_an_http_failure_at_a_forged_answer_is_dns() -> None:
    t = web_target("http", known=False)
    reset = HTTPTransaction(f"http://{NAME}/", "GET", 0.2, 0.3, failure="connection_reset",
                            failed_operation="read")  # fmt: skip
    steps = {"queries": [q(FORGED)], "tcp_connect": [tcp(FORGED, port=80)], "requests": [reset]}
    v = judge(m(t, **steps), Controls(helper=genuine_helper(t), asn_db=True))
    assert (v.accessible, v.blocking) == (False, "dns")
    # Only unlike the helper's answers (no database): a CDN may differ; the reset decides.
    unplaced = {**steps, "queries": [q(FORGED, placed=False)]}
    v2 = judge(m(t, **unplaced), Controls(helper=genuine_helper(t, placed=False)))
    assert v2.blocking == "http-failure"


def test_a_cleartext_page_at_a_forged_answer_is_dns_even_without_a_helper() -> None:
    t = Target(id="dc", service="svc", kind="http", host=NAME, url=f"http://{NAME}/",
               expect=Expectations(asns=(META,)))  # fmt: skip
    steps = {"queries": [q(FORGED)], "tcp_connect": [tcp(FORGED, port=80)],
             "requests": [page("http")]}  # fmt: skip
    v = judge(m(t, **steps), Controls(helper_error="refused", asn_db=True))
    assert (v.accessible, v.blocking, v.confidence) == (False, "dns", "medium")
    genuine = judge(m(t, **{**steps, "queries": [q(REAL)], "tcp_connect": [tcp(REAL, port=80)]}),
                    Controls(helper_error="refused", asn_db=True))  # fmt: skip
    assert (genuine.accessible, genuine.blocking) == (None, None)  # cleartext, no control
