"""Every verdict rule, with literal observations (no network): including the false
positives OONI users filed (CDN answers, a 403, a new CA, a site that is down)."""

from __future__ import annotations

import datetime as dt

import pytest

from probe.analysis import Controls, judge
from schema.model import (
    DNSAnswer,
    DNSQuery,
    Expectations,
    HTTPTransaction,
    Measurement,
    Target,
    TCPConnect,
    TLSHandshake,
)
from tests.conftest import VANTAGE

NAME = "chat.example.org"
REAL, FORGED = "203.0.113.10", "203.0.113.66"  # documentation addresses: literal data only
KNOWN = Expectations(cert_names=(NAME,))


def target(known: bool = True, kind: str = "http") -> Target:
    url = f"https://{NAME}/" if kind == "http" else None
    return Target(id="t", service="svc", kind=kind, host=NAME, url=url, ports=() if url else (443,),
                  expect=KNOWN if known else Expectations())  # fmt: skip


def q(
    *addresses: str, failure: str | None = None, system: bool = True, rtype: str = "A"
) -> DNSQuery:
    return DNSQuery(NAME, rtype, "udp", "192.0.2.53:53" if system else "198.51.100.9:53", 0.0, 0.05,
                    answers=[DNSAnswer(rtype, a, 60) for a in addresses], failure=failure,
                    system_resolver=system)  # fmt: skip


def tcp(ip: str = REAL, failure: str | None = None, port: int = 443) -> TCPConnect:
    return TCPConnect(ip, port, 0.05, 0.1, failure=failure)


def tls(
    ip: str = REAL, failure: str | None = None, sni: str = NAME, purpose: str = "target"
) -> TLSHandshake:
    return TLSHandshake(ip, 443, sni, 0.1, 0.2, failure=failure, purpose=purpose,
                        tls_version=None if failure else "TLSv1.3")  # fmt: skip


def http(status: int | None = 200, body: bytes = b"<title>Example chat</title>hello", failure: str | None = None,
         headers: list[tuple[str, str]] | None = None, t: float = 0.4) -> HTTPTransaction:  # fmt: skip
    return HTTPTransaction(f"https://{NAME}/", "GET", 0.2, t, status=status, body=body, failure=failure,
                           body_length=len(body), response_headers=headers or [])  # fmt: skip


def m(t: Target | None = None, **steps: object) -> Measurement:
    return Measurement("u", "r", t or target(), VANTAGE, dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
                       **steps)  # type: ignore[arg-type]  # fmt: skip


def fine() -> dict[str, object]:
    return {
        "queries": [q(REAL)],
        "tcp_connect": [tcp()],
        "tls_handshakes": [tls()],
        "requests": [http()],
    }


def helper(**overrides: object) -> Measurement:
    steps = fine()
    steps.update(overrides)
    return m(**steps)


def test_reachable() -> None:
    v = judge(m(**fine()), Controls(offline=False))
    assert (v.accessible, v.blocking, v.confidence) == (True, False, "high")
    assert "control_targets" in v.controls and "catalog" in v.controls


def test_offline_vantage_point_blocks_nothing() -> None:
    v = judge(m(queries=[q(failure="generic_timeout_error")]), Controls(offline=True))
    assert (v.accessible, v.blocking) == (None, None)
    assert v.reasons[0].code == "vantage_offline"


# -- DNS -------------------------------------------------------------------------


def test_bogon_blockpage_address_is_strong() -> None:
    v = judge(m(queries=[q("10.10.34.34", failure="dns_bogon_error")]))
    assert (v.blocking, v.confidence) == ("dns", "high")
    assert v.reasons[0].evidence["fingerprint"] == "dns-ir-10.10.34.34"


def test_blockpage_address_that_is_public() -> None:
    v = judge(m(queries=[q("195.175.254.2")], tcp_connect=[tcp("195.175.254.2")]))
    assert (v.blocking, v.reasons[0].code) == ("dns", "dns_blockpage_address")


@pytest.mark.parametrize(
    "failure", ["dns_nxdomain_error", "dns_refused_error", "dns_servfail_error", "dns_no_answer"]
)
def test_resolver_lie_against_the_control_helper(failure: str) -> None:
    v = judge(m(queries=[q(failure=failure)]), Controls(helper=helper()))
    assert (v.accessible, v.blocking, v.confidence) == (False, "dns", "high")


def test_a_single_dns_timeout_is_weak() -> None:
    v = judge(m(queries=[q(failure="generic_timeout_error")]), Controls(helper=helper()))
    assert (v.blocking, v.confidence) == ("dns", "low")


def test_trusted_resolver_contradicts_system_resolver() -> None:
    v = judge(m(queries=[q(failure="dns_nxdomain_error"), q(REAL, system=False)]))
    assert (v.blocking, v.confidence) == ("dns", "medium")
    assert "trusted_dns" in v.controls


def test_domain_gone_everywhere_is_not_blocking() -> None:
    gone = [q(failure="dns_nxdomain_error")]
    v = judge(
        m(queries=gone),
        Controls(helper=helper(queries=gone, tcp_connect=[], tls_handshakes=[], requests=[])),
    )
    assert (v.accessible, v.blocking) == (False, False)
    assert v.reasons[0].code == "domain_gone"


def test_nxdomain_without_controls() -> None:
    assert judge(m(queries=[q(failure="dns_nxdomain_error")])).blocking == "dns"  # a known service
    v = judge(m(target(known=False), queries=[q(failure="dns_nxdomain_error")]))
    assert (v.blocking, v.confidence) == (None, "low")  # someone's own site: cannot tell


def test_forged_routable_address_caught_by_tls() -> None:
    v = judge(m(queries=[q(FORGED)], tcp_connect=[tcp(FORGED)],
                tls_handshakes=[tls(FORGED, "ssl_invalid_hostname")]), Controls(helper=helper()))  # fmt: skip
    assert (v.blocking, v.confidence) == ("dns", "high")
    assert v.reasons[0].code == "dns_forged_address"


def test_cdn_answers_differ_but_work_is_not_blocking() -> None:
    """OONI's classic false positive: a CDN gives each place different addresses."""
    v = judge(m(queries=[q(FORGED)], tcp_connect=[tcp(FORGED)], tls_handshakes=[tls(FORGED)],
                requests=[http()]), Controls(helper=helper()))  # fmt: skip
    assert (v.accessible, v.blocking) == (True, False)


def test_answers_differ_then_connection_fails_blames_dns() -> None:
    v = judge(m(queries=[q(FORGED)], tcp_connect=[tcp(FORGED, "connection_refused")]),
              Controls(helper=helper()))  # fmt: skip
    assert (v.blocking, v.confidence) == ("dns", "medium")


# -- TCP -------------------------------------------------------------------------


def test_reset_at_connect_while_control_connects() -> None:
    v = judge(
        m(queries=[q(REAL)], tcp_connect=[tcp(failure="connection_refused")]),
        Controls(helper=helper()),
    )
    assert (v.blocking, v.confidence) == ("tcp_ip", "high")


def test_one_timeout_is_weak_unless_the_helper_connected_there() -> None:
    """Issue 11, class 4: one timeout to the only address while the control helper
    connects to that very endpoint is the server up and this path dropping (OONI's
    tcp_ip); when the helper connected elsewhere (a CDN), one lost SYN run is noise."""
    one = judge(
        m(queries=[q(REAL)], tcp_connect=[tcp(failure="generic_timeout_error")]),
        Controls(helper=helper()),
    )
    assert (one.blocking, one.confidence) == ("tcp_ip", "medium")
    assert "same endpoint" in one.explanation
    elsewhere = judge(
        m(queries=[q(REAL)], tcp_connect=[tcp(failure="generic_timeout_error")]),
        Controls(helper=helper(tcp_connect=[tcp(port=8443)])),
    )
    assert (elsewhere.blocking, elsewhere.confidence) == ("tcp_ip", "low")
    alone = judge(m(queries=[q(REAL)], tcp_connect=[tcp(failure="generic_timeout_error")]))
    assert (alone.blocking, alone.confidence) == ("tcp_ip", "low")
    many = [tcp(failure="generic_timeout_error"), tcp(failure="generic_timeout_error", port=5222)]
    two = judge(m(queries=[q(REAL)], tcp_connect=many), Controls(helper=helper()))
    assert (two.blocking, two.confidence) == ("tcp_ip", "medium")


def test_server_down_is_not_blocking() -> None:
    down = [tcp(failure="connection_refused")]
    v = judge(
        m(queries=[q(REAL)], tcp_connect=down),
        Controls(helper=helper(tcp_connect=down, tls_handshakes=[], requests=[])),
    )
    assert (v.accessible, v.blocking, v.reasons[0].code) == (False, False, "server_down")


# -- TLS -------------------------------------------------------------------------


def test_sni_ab_test_proves_sni_filtering() -> None:
    hs = [
        tls(failure="connection_reset"),
        tls(failure="ssl_invalid_hostname", sni="example.com", purpose="control_sni"),
    ]
    v = judge(m(queries=[q(REAL)], tcp_connect=[tcp()], tls_handshakes=hs))
    assert (v.blocking, v.confidence) == ("tls", "high")
    assert "sni_ab" in v.controls


def test_cut_handshake_both_names_then_helper_decides() -> None:
    hs = [
        tls(failure="connection_reset"),
        tls(failure="connection_reset", sni="example.com", purpose="control_sni"),
    ]
    assert judge(m(queries=[q(REAL)], tcp_connect=[tcp()], tls_handshakes=hs)).blocking is None
    v = judge(
        m(queries=[q(REAL)], tcp_connect=[tcp()], tls_handshakes=hs), Controls(helper=helper())
    )
    assert (v.blocking, v.confidence) == ("tls", "medium")


def test_interception_by_an_unknown_ca() -> None:
    hs = [tls(failure="ssl_unknown_authority")]
    v = judge(
        m(queries=[q(REAL)], tcp_connect=[tcp()], tls_handshakes=hs), Controls(helper=helper())
    )
    assert (v.blocking, v.confidence) == ("tls", "high")


def test_site_with_its_own_bad_certificate_is_not_blocking() -> None:
    """A new CA or an expired certificate that everybody sees is the site's problem."""
    for failure in ("ssl_invalid_certificate", "ssl_unknown_authority"):
        hs = [tls(failure=failure)]
        v = judge(m(queries=[q(REAL)], tcp_connect=[tcp()], tls_handshakes=hs),
                  Controls(helper=helper(tls_handshakes=hs, requests=[])))  # fmt: skip
        assert (v.accessible, v.blocking) == (False, False), failure


# -- HTTP ------------------------------------------------------------------------


def test_blockpage_fingerprint() -> None:
    page = http(
        body=b"<title>Access denied</title>blocked", headers=[("Server", "Protected by WireFilter")]
    )
    v = judge(m(queries=[q(REAL)], tcp_connect=[tcp()], tls_handshakes=[tls()], requests=[page]))
    assert (v.blocking, v.confidence, v.reasons[0].code) == ("http-diff", "high", "blockpage")


def test_blockpage_by_header() -> None:
    page = http(status=302, body=b"", headers=[("Location", "http://internet-positif.org/")])
    assert judge(m(queries=[q(REAL)], tcp_connect=[tcp()], requests=[page])).blocking == "http-diff"


def test_cdn_challenge_page_is_a_known_false_positive() -> None:
    page = http(
        status=503, body=b"<title>Just a moment...</title>", headers=[("cf-mitigated", "challenge")]
    )
    v = judge(m(queries=[q(REAL)], tcp_connect=[tcp()], tls_handshakes=[tls()], requests=[page]),
              Controls(helper=helper()))  # fmt: skip
    # Not blocked by the network; whether the content is reachable, the site decides.
    assert (v.accessible, v.blocking, v.reasons[0].code) == (None, False, "known_false_positive")


def test_a_403_the_control_sees_too_is_not_blocking() -> None:
    forbidden = http(status=403, body=b"<title>Forbidden</title>")
    v = judge(m(queries=[q(REAL)], tcp_connect=[tcp()], tls_handshakes=[tls()], requests=[forbidden]),
              Controls(helper=helper(requests=[forbidden])))  # fmt: skip
    assert (v.accessible, v.blocking) == (True, False)


def test_page_differs_from_control() -> None:
    other = http(status=200, body=b"<title>Notice from your provider</title>" + b"x" * 10)
    control = http(status=200, body=b"<title>Example chat</title>" + b"y" * 5000)
    v = judge(m(queries=[q(REAL)], tcp_connect=[tcp()], tls_handshakes=[tls()], requests=[other]),
              Controls(helper=helper(requests=[control])))  # fmt: skip
    assert (v.blocking, v.confidence) == ("http-diff", "low")


def test_reset_during_http_while_control_works() -> None:
    v = judge(m(queries=[q(REAL)], tcp_connect=[tcp()], tls_handshakes=[tls()],
                requests=[http(status=None, body=b"", failure="connection_reset")]), Controls(helper=helper()))  # fmt: skip
    assert (v.blocking, v.confidence) == ("http-failure", "high")


def test_throttling() -> None:
    slow = http(status=200, body=b"x" * 60_000, failure="generic_timeout_error", t=6.2)
    v = judge(m(queries=[q(REAL)], tcp_connect=[tcp()], tls_handshakes=[tls()], requests=[slow]),
              Controls(helper=helper()))  # fmt: skip
    assert (v.blocking, v.reasons[0].code) == ("throttling", "throttling")
    assert v.reasons[0].evidence["rate"] < 100_000


def test_blocking_is_false_whenever_accessible() -> None:
    cases = [
        m(**fine()),
        m(
            queries=[q(FORGED)],
            tcp_connect=[tcp(FORGED)],
            tls_handshakes=[tls(FORGED)],
            requests=[http()],
        ),
    ]
    for case in cases:
        v = judge(case, Controls(helper=helper()))
        assert v.accessible is True and v.blocking is False


def test_interrupted_steps_are_not_evidence() -> None:
    cut = m(queries=[q(REAL)], tcp_connect=[tcp()], tls_handshakes=[tls(failure="interrupted")])
    cut.annotations["interrupted"] = "true"
    v = judge(cut, Controls(helper=helper()))
    assert (v.accessible, v.blocking, v.reasons[0].code) == (None, None, "interrupted")


def test_a_helper_cut_short_is_no_control() -> None:
    down = [tcp(failure="generic_timeout_error")]
    cut = helper(tcp_connect=[tcp(failure="interrupted")], tls_handshakes=[], requests=[])
    cut.annotations["interrupted"] = "true"
    v = judge(m(queries=[q(REAL)], tcp_connect=down), Controls(helper=cut))
    assert v.blocking != False and "control_helper" not in v.controls  # noqa: E712


def test_non_certificate_tls_failure_is_not_interception() -> None:
    v = judge(m(queries=[q(REAL)], tcp_connect=[tcp()], tls_handshakes=[tls(failure="host_unreachable")]),
              Controls(helper=helper()))  # fmt: skip
    assert (v.blocking, v.confidence) == (None, "low")


def test_sni_reset_that_the_helper_sees_too_is_the_server() -> None:
    hs = [
        tls(failure="connection_reset"),
        tls(failure="ssl_invalid_hostname", sni="example.com", purpose="control_sni"),
    ]
    v = judge(m(queries=[q(REAL)], tcp_connect=[tcp()], tls_handshakes=hs),
              Controls(helper=helper(tls_handshakes=[tls(failure="connection_reset")], requests=[])))  # fmt: skip
    assert (v.accessible, v.blocking) == (False, False)


def test_two_timeouts_are_not_a_domain_gone() -> None:
    timeout = [q(failure="generic_timeout_error")]
    v = judge(
        m(queries=timeout),
        Controls(helper=helper(queries=timeout, tcp_connect=[], tls_handshakes=[], requests=[])),
    )
    assert v.blocking is not False


def test_unverified_answers_that_work_are_low_confidence() -> None:
    v = judge(
        m(target(kind="tcp"), queries=[q(FORGED)], tcp_connect=[tcp(FORGED)]),
        Controls(helper=helper()),
    )
    assert (v.accessible, v.blocking, v.confidence, v.reasons[-2].code) == (
        True,
        False,
        "low",
        "reachable_unverified",
    )
    assert "nothing could verify" in v.explanation
    # Without an ASN database the verdict says what it could not check.
    assert v.reasons[-1].code == "no_asn_database"


def test_unexpected_status_without_a_helper() -> None:
    t = Target(
        id="t",
        service="svc",
        kind="http",
        host=NAME,
        url=f"http://{NAME}/",
        expect=Expectations(status=(200,)),
    )
    v = judge(m(t, queries=[q(REAL)], tcp_connect=[tcp(port=80)], requests=[http(status=403)]))
    assert (v.blocking, v.confidence) == ("http-diff", "low")


def test_trailing_dot_host_and_empty_measurement() -> None:
    dotted = Target(id="t", service="svc", kind="dns", host=NAME + ".", expect=KNOWN)
    assert judge(m(dotted, queries=[q(failure="dns_nxdomain_error")])).blocking == "dns"
    assert judge(m()).accessible is None
