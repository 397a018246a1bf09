"""Verdicts: was the target reachable, and if not, how was it blocked?

Pure functions of a measurement and its controls (no I/O), so every rule can be
tested with literal observations. The order follows REFERENCE.md section 2: a step is
judged only when the steps before it got through; DNS answers are judged by
Censored Planet's ladder (errors, empty answers, bogons, blockpage addresses,
agreement with the controls' answers, a validating TLS handshake on the address, a
name that has no address anywhere else (ghost DNS), a certificate for another name,
and last the answer's network: the catalog's ``expect.asns`` or the control answers'
ASNs); TLS failures by the SNI A/B test; HTTP by blockpage fingerprints (known false
positives first) and by comparison with the control helper's view, as OONI's
web_connectivity does.

The user's resolver decides what the user gets: connects and handshakes are judged at
the addresses the system resolver gave (an app on this network uses those), not at a
trusted resolver's. When the answers were not genuine, what went wrong after them is
blamed on DNS (the cause), not on the step that showed it (a failed connect, a
blockpage). Without a control view a cleartext page proves nothing. Without an ASN
database the network check is skipped and the verdict says so.

The controls, strongest first:
- the control helper's measurement of the same target from an uncensored place;
- the SNI A/B handshake the engine makes after a cut-off handshake;
- trusted resolvers (DoH, a public resolver) queried besides the system's;
- catalog expectations (a target with expectations is a service known to exist);
- control targets: when those fail too, the vantage point is offline and nothing
  may be called blocked.

>>> verdict = judge(measurement, Controls(offline=False))
>>> verdict.blocking, verdict.confidence
('tls', 'high')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

from probe.analysis.fingerprints import Fingerprint, FingerprintDB, title_of
from schema.model import (
    DNSAnswer,
    DNSQuery,
    HTTPTransaction,
    Measurement,
    Reason,
    TCPConnect,
    TLSHandshake,
    Verdict,
)

#: Failures that an on-path device produces by cutting a connection short.
INTERFERENCE = frozenset(
    {"connection_reset", "eof_error", "generic_timeout_error", "ssl_failed_handshake"}
)
#: Certificate validation failures: interception, or the server's own mistake.
CERTIFICATE_FAILURES = frozenset(
    {"ssl_invalid_hostname", "ssl_unknown_authority", "ssl_invalid_certificate"}
)
#: DNS failures that a lying resolver produces (a timeout is weaker: see the rules).
DNS_LIES = frozenset(
    {"dns_nxdomain_error", "dns_servfail_error", "dns_refused_error", "dns_no_answer"}
)
#: DNS failures that say "this name has no address" (not "I could not find out").
NO_SUCH_NAME = frozenset({"dns_nxdomain_error", "dns_no_answer"})
#: Below this transfer rate (bytes/s) a download cut by a timeout looks throttled; a
#: bad link can be this slow too, so it is weak evidence unless the rate collapsed
#: below ``COLLAPSED_RATE`` (Russia's 2021 throttling left a few kB/s).
THROTTLE_RATE = 100_000
COLLAPSED_RATE = 25_000


@dataclass(frozen=True)
class Controls:
    """What the answer should have been, as far as this run knows."""

    #: True: the control targets failed too (the vantage point is offline); False:
    #: they worked; None: they were not measured.
    offline: bool | None = None
    #: The control helper's measurement of the same target, if one was asked.
    helper: Measurement | None = None
    helper_error: str | None = None
    fingerprints: FingerprintDB = field(default_factory=FingerprintDB.builtin)
    #: True when an ASN database placed the answers in their networks (answers then
    #: carry ``asn``); answers that carry an ``asn`` count as placed either way.
    asn_db: bool = False


# -- small readers over observations ------------------------------------------------


def _own_queries(m: Measurement) -> list[DNSQuery]:
    """The target name's own lookups (a redirect's lookups of other names are not)."""
    host = m.target.host.rstrip(".").lower()
    return [q for q in m.queries if q.hostname.rstrip(".").lower() == host]


def system_queries(m: Measurement) -> list[DNSQuery]:
    own = _own_queries(m)
    return [q for q in own if q.system_resolver] or own


def _trusted_queries(m: Measurement) -> list[DNSQuery]:
    system = system_queries(m)
    return [q for q in _own_queries(m) if q not in system]


def _answers(queries: Sequence[DNSQuery]) -> set[str]:
    return {a for q in queries if q.failure is None for a in q.addresses()}


def _answer_records(queries: Sequence[DNSQuery]) -> list[DNSAnswer]:
    return [
        a for q in queries if q.failure is None for a in q.answers if a.answer_type in ("A", "AAAA")
    ]


def _networks(queries: Sequence[DNSQuery]) -> set[int]:
    """The AS numbers the ASN database placed these answers in (unknown ones left out)."""
    return {a.asn for a in _answer_records(queries) if a.asn}


def _placed(queries: Sequence[DNSQuery]) -> bool:
    """True when the answers were looked up in an ASN database."""
    return any(a.asn is not None for a in _answer_records(queries))


def _all_failed(observations: Sequence[TCPConnect | TLSHandshake | DNSQuery]) -> bool:
    return bool(observations) and all(o.failure is not None for o in observations)


def target_handshakes(m: Measurement) -> list[TLSHandshake]:
    return [h for h in m.tls_handshakes if h.purpose == "target"]


def _sni_controls(m: Measurement) -> list[TLSHandshake]:
    return [h for h in m.tls_handshakes if h.purpose == "control_sni"]


def _answered(h: TLSHandshake) -> bool:
    """The server answered the handshake (a certificate error is still an answer)."""
    return h.failure is None or h.failure.startswith("ssl_") and h.failure != "ssl_failed_handshake"


def users_addresses(m: Measurement) -> set[str] | None:
    """The addresses an app on this network would use: the target's fixed addresses
    and the system resolver's answers. None when the probe did not ask the system
    resolver (only trusted resolvers were configured): then every address counts."""
    if not any(q.system_resolver for q in _own_queries(m)):
        return None
    return set(m.target.addresses) | _answers(system_queries(m))


def _first_failure(observations: Sequence[TCPConnect | TLSHandshake | DNSQuery]) -> str:
    return next((o.failure for o in observations if o.failure), "")


def _known(m: Measurement) -> bool:
    """A target with catalog expectations belongs to a service known to exist."""
    e = m.target.expect
    return bool(e.asns or e.cert_names or e.status)


class _Judge:
    """Collects reasons while the rules run; ``verdict()`` assembles the result."""

    def __init__(self, m: Measurement, controls: Controls) -> None:
        if controls.helper is not None and controls.helper.annotations.get("interrupted") == "true":
            # A view cut short by the helper's own deadline proves nothing.
            controls = replace(
                controls, helper=None, helper_error="the control helper was cut short"
            )
        self.m, self.c = m, controls
        # The user's resolver decides what the user gets: connects and handshakes are
        # judged at the addresses it gave (a trusted resolver's working address does
        # not make the target reachable for an app on this network). When none of those
        # was tried (nothing but trusted answers), every address counts.
        users = users_addresses(m)
        tcp = [c for c in m.tcp_connect if users is None or c.ip in users]
        self.tcp = tcp or list(m.tcp_connect)
        tls = [h for h in target_handshakes(m) if users is None or h.ip in users]
        self.tls = tls or target_handshakes(m)
        #: Addresses other than the user's that got through (a trusted resolver's).
        self.elsewhere: list[str] = []
        if users is not None and tcp:
            shaken = target_handshakes(m)
            worked = (
                {h.ip for h in shaken if h.failure is None}
                if shaken
                else {c.ip for c in m.tcp_connect if c.failure is None}
            )
            self.elsewhere = sorted(worked - users)
        self.reasons: list[Reason] = []
        self.used: list[str] = []
        #: The control answers, when the system resolver's answers differ from them.
        self.inconsistent: list[str] = []
        #: The confidence of a "forged: outside the genuine networks" conclusion that
        #: waits for the next steps (they may show more), or None.
        self.foreign: str | None = None
        #: The page matched the control helper's (OONI's comparisons).
        self.content_matches = False
        if _known(m):
            self.used.append("catalog")
        if controls.offline is not None:
            self.used.append("control_targets")
        if controls.helper is not None:
            self.used.append("control_helper")
        if _trusted_queries(m):
            self.used.append("trusted_dns")
        #: The answers could be placed in their networks (an ASN database was used).
        self.asn_known = controls.asn_db or _placed(system_queries(m))
        if self.asn_known and _answers(system_queries(m)):
            self.used.append("asn_database")

    def unlike(self) -> str:
        """How the system resolver's answers are unlike genuine ones, for a reason."""
        if self.inconsistent:
            return f"differ from the controls' ({', '.join(self.inconsistent)})"
        return "are outside the networks a genuine answer comes from"

    def why(self, code: str, detail: str, **evidence: object) -> None:
        self.reasons.append(Reason(code, detail, dict(evidence)))

    def verdict(
        self, accessible: bool | None, blocking: str | bool | None, confidence: str
    ) -> Verdict:
        # The deciding reason is the last one a rule gave; earlier ones are context.
        explanation = self.reasons[-1].detail if self.reasons else "every step worked"
        if self.c.helper is None and self.c.helper_error:
            self.why(
                "no_control_helper", f"the control helper could not be asked: {self.c.helper_error}"
            )
        elif self.c.helper is None:
            self.why("no_control_helper", "no control helper: judged from the probe's own controls")
        if not self.asn_known and _answers(system_queries(self.m)):
            self.why(
                "no_asn_database",
                "no ASN database (vantage.asn_db): the answers were not placed in their "
                "networks, so the last DNS check (is the answer in a genuine answer's network?) "
                "was skipped",
            )
        return Verdict(
            accessible, blocking, confidence, explanation, self.reasons, sorted(set(self.used))
        )

    # -- the helper's view ------------------------------------------------------------

    @property
    def helper(self) -> Measurement | None:
        return self.c.helper

    def helper_answers(self) -> set[str]:
        return _answers(_own_queries(self.helper)) if self.helper else set()

    def helper_no_such_name(self) -> str | None:
        """The helper's failure when it found that the name has no address, else None."""
        own = _own_queries(self.helper) if self.helper else []
        failure = _first_failure(own) if _all_failed(own) else None
        return failure if failure in NO_SUCH_NAME else None

    def control_queries(self) -> list[DNSQuery]:
        """The queries whose answers count as genuine: the control helper's (from an
        uncensored place) when it answered, else the trusted resolvers'.

        An on-path injector answers every plaintext query on the path, to any
        resolver: a trusted resolver's UDP or TCP answer placed outside the networks
        the catalog expects is the injector's, not a control, and is left out.
        DoH answers cross the path encrypted and always count.
        """
        helper = [q for q in _own_queries(self.helper) if q.failure is None] if self.helper else []
        if _answers(helper):
            return helper
        expected = set(self.m.target.expect.asns)
        kept = []
        for q in _trusted_queries(self.m):
            if q.failure is not None:
                continue
            asns = {a.asn for a in _answer_records([q]) if a.asn}
            if q.engine != "doh" and expected and asns and not asns & expected:
                continue
            kept.append(q)
        return kept

    def helper_connects(self) -> bool | None:
        if self.helper is None or not self.helper.tcp_connect:
            return None
        return any(c.failure is None for c in self.helper.tcp_connect)

    def helper_endpoints(self) -> set[tuple[str, int]]:
        """The endpoints the control helper connected to."""
        if self.helper is None:
            return set()
        return {(c.ip, c.port) for c in self.helper.tcp_connect if c.failure is None}

    def helper_tls(self) -> TLSHandshake | None:
        if self.helper is None:
            return None
        hs = target_handshakes(self.helper)
        return next((h for h in hs if h.failure is None), hs[0] if hs else None)

    def helper_http(self) -> HTTPTransaction | None:
        return self.helper.requests[-1] if self.helper and self.helper.requests else None


def judge(m: Measurement, controls: Controls | None = None) -> Verdict:
    """The verdict on one measurement. Never raises on odd observations."""
    c = controls or Controls()
    j = _Judge(m, c)
    if c.offline:
        j.why(
            "vantage_offline",
            "the control targets failed too: this network was offline, "
            "so nothing in this run can be called blocked",
        )
        return j.verdict(None, None, "low")
    if m.annotations.get("interrupted") == "true" or not m.observation_count():
        # A step cut off by Ctrl-C or the deadline failed because we stopped it.
        j.why("interrupted", "the measurement was cut short before it could tell")
        return j.verdict(None, None, "low")
    for rule in (_dns, _tcp, _tls, _http):
        result = rule(j)
        if result is not None:
            return result
    validated = any(h.failure is None for h in j.tls)
    if j.foreign is not None and j.content_matches:
        # As OONI's web_connectivity: inconsistent DNS, but the page is the genuine one.
        j.why(
            "dns_foreign_page_matches",
            "the answer is outside the genuine networks, but the page it gave is the control "
            "helper's: the site was reached (a CDN, or a proxy passing it through)",
        )
        return j.verdict(True, False, "low")
    if j.foreign is not None:
        return j.verdict(False, "dns", j.foreign)  # the answer was forged; it worked
    if j.inconsistent and not validated:
        j.why(
            "reachable_unverified",
            "it worked, but at addresses the controls did not give and nothing could "
            "verify (a CDN answers differently by place; so would a forgery)",
        )
        return j.verdict(True, False, "low")
    compared = j.helper_http() is not None and bool(m.requests)
    j.why("reachable", "every step worked")
    return j.verdict(True, False, "high" if validated or compared else "medium")


# -- DNS -------------------------------------------------------------------------


def _dns(j: _Judge) -> Verdict | None:
    m = j.m
    system = system_queries(m)
    if not system:
        return None  # an address target: nothing to resolve
    helper_ok = j.helper_answers()
    # An on-path injector answers queries to any resolver, so the control helper's
    # answers (from an uncensored place) are preferred to other resolvers' here.
    genuine = _answers(j.control_queries())
    if _all_failed(system):
        failure = _first_failure(system)
        answers = sorted({a for q in system for a in q.addresses()})
        if failure == "dns_bogon_error":
            fp = next((f for a in answers if (f := j.c.fingerprints.match_dns(a))), None)
            if fp is not None:
                j.why(
                    "dns_blockpage_address",
                    f"the resolver answered {', '.join(answers)}, "
                    f"a known blockpage address ({fp.description})",
                    answers=answers,
                    fingerprint=fp.id,
                )
                return j.verdict(False, "dns", "high")
            j.why(
                "dns_bogon",
                f"the resolver answered a private or reserved address ({', '.join(answers)})",
                answers=answers,
                control_answers=sorted(genuine),
            )
            return j.verdict(False, "dns", "high" if genuine or _known(m) else "medium")
        helper_own = _own_queries(j.helper) if j.helper else []
        helper_failure = _first_failure(helper_own) if _all_failed(helper_own) else None
        if genuine:
            confidence = (
                "low" if failure == "generic_timeout_error" else ("high" if helper_ok else "medium")
            )
            j.why(
                "dns_failure_vs_control",
                f"the system resolver failed ({failure}) where the "
                f"controls resolved the name ({', '.join(sorted(genuine))})",
                failure=failure,
                control_answers=sorted(genuine),
            )
            return j.verdict(False, "dns", confidence)
        if (
            helper_failure in DNS_LIES and failure in DNS_LIES
        ):  # both got an answer saying the name does not resolve (not two timeouts)
            j.why(
                "domain_gone",
                f"the control helper fails to resolve the name too ({helper_failure}): "
                "the domain does not resolve anywhere, not a block",
                failure=failure,
            )
            return j.verdict(False, False, "high")
        if failure in DNS_LIES and _known(m):
            j.why(
                "dns_failure_known_service",
                f"the system resolver says {failure} for a name of a service known to exist",
                failure=failure,
            )
            return j.verdict(False, "dns", "medium")
        j.why(
            "dns_failure_unconfirmed",
            f"resolution failed ({failure}) and no control can tell a block from a failure",
            failure=failure,
        )
        return j.verdict(False, None, "low")
    return _dns_answers(j, system, genuine)


def _dns_answers(j: _Judge, system: list[DNSQuery], genuine: set[str]) -> Verdict | None:
    """Answers came back: are they genuine? Censored Planet's ladder, in its order:
    a known blockpage address; agreement with the controls' answers (ok); a validating
    handshake at the address (ok); the name has no address anywhere else (ghost); a
    certificate for another name; the answers' network (ok when it is the catalog's or
    the controls', forged when it is neither); otherwise the next steps decide."""
    m = j.m
    answers = sorted(_answers(system))
    fp = next((f for a in answers if (f := j.c.fingerprints.match_dns(a))), None)
    if fp is not None:
        j.why(
            "dns_blockpage_address",
            f"the resolver answered {', '.join(answers)}, a known "
            f"blockpage address ({fp.description})",
            answers=answers,
            fingerprint=fp.id,
        )
        return j.verdict(False, "dns", "high")
    validated = {h.ip for h in target_handshakes(m) if h.failure is None}
    if set(answers) & (genuine | validated):
        return None  # consistent: judge the next steps
    nowhere = _no_such_name_elsewhere(j)
    if nowhere is not None:
        who, failure = nowhere
        j.why(
            "dns_ghost_answer",
            f"the system resolver answered {', '.join(answers)} for a name that has no "
            f"address for {who} ({failure}): the name resolves only on this network",
            answers=answers,
            control_failure=failure,
        )
        return j.verdict(False, "dns", "high" if who == "the control helper" else "medium")
    wrong_name = [
        h for h in target_handshakes(m) if h.failure == "ssl_invalid_hostname" and h.ip in answers
    ]
    helper_tls = j.helper_tls()
    helper_validates = helper_tls is not None and helper_tls.failure is None
    if wrong_name and (genuine or helper_validates):
        where = ", ".join(sorted(genuine)) or "the name"
        j.why(
            "dns_forged_address",
            f"the system resolver's answer ({', '.join(answers)}) serves a certificate "
            f"for another name, while the controls resolve {where} and validate it there",
            answers=answers,
            control_answers=sorted(genuine),
        )
        return j.verdict(False, "dns", "high")
    network = _dns_network(j, system, genuine)
    if network is True:
        return None  # a CDN in the genuine network: consistent
    if j.foreign is not None:
        # Forged; the next steps may show more (what the address did, a blockpage or
        # the genuine page there); if they show nothing, this conclusion stands.
        j.inconsistent = sorted(genuine)
        return None
    if genuine:
        j.inconsistent = sorted(genuine)
        j.why(
            "dns_answers_differ",
            f"the system resolver's answers ({', '.join(answers)}) differ from the "
            f"controls' ({', '.join(sorted(genuine))}); CDNs do that too: the next steps decide",
            answers=answers,
            control_answers=sorted(genuine),
        )
    return None


def _no_such_name_elsewhere(j: _Judge) -> tuple[str, str] | None:
    """(who, failure) when an uncensored view found that the name has no address: the
    control helper, or (without a helper answer) every trusted resolver."""
    helper = j.helper_no_such_name()
    if helper is not None:
        return "the control helper", helper
    if j.helper_answers():
        return None
    trusted = _trusted_queries(j.m)
    if trusted and all(q.failure in NO_SUCH_NAME for q in trusted):
        return "the trusted resolvers", _first_failure(trusted)
    return None


def _dns_network(j: _Judge, system: list[DNSQuery], genuine: set[str]) -> bool | None:
    """Censored Planet's last check: the networks the answers are in.

    True when an answer is in a network a genuine answer comes from (the catalog's
    ``expect.asns`` or the control answers'): a CDN answering differently by place.
    None when every placed answer is outside all of them: the conclusion "forged" is
    recorded (``j.foreign``, with its confidence: high when the catalog and the control
    helper agree) and stands unless the next steps show more: the failure or blockpage
    it led to, or a page identical to the helper's (then the site was reached). None
    as well when it cannot be told (no ASN database, unplaced answers, nothing to
    compare with).
    """
    m = j.m
    if not j.asn_known:
        return None
    expected = set(m.target.expect.asns)
    control_networks = _networks(j.control_queries()) if genuine else set()
    reference = expected | control_networks
    ours = _networks(system)
    if not ours or not reference:
        return None
    answers = sorted(_answers(system))
    if ours & reference:
        j.why(
            "dns_same_network",
            f"the system resolver's answers ({', '.join(answers)}) differ from the controls' "
            f"but are in a network a genuine answer comes from "
            f"(AS{', AS'.join(map(str, sorted(ours & reference)))})",
            answers=answers,
            answer_asns=sorted(ours),
        )
        return True
    if expected and j.helper is not None:
        confidence = "high"  # the catalog and an uncensored view agree on the network
    elif expected or (control_networks and j.helper is not None):
        confidence = "medium"
    else:
        confidence = "low"  # only a trusted resolver's view: CDNs answer by place
    names = sorted(
        {a.as_org_name for a in _answer_records(system) if a.asn in ours and a.as_org_name}
    )
    j.why(
        "dns_foreign_network",
        f"the system resolver's answers ({', '.join(answers)}) are in "
        f"AS{', AS'.join(map(str, sorted(ours)))}"
        + (f" ({', '.join(names)})" if names else "")
        + f", not in the networks a genuine answer comes from "
        f"(AS{', AS'.join(map(str, sorted(reference)))}): a forged answer",
        answers=answers,
        answer_asns=sorted(ours),
        expected_asns=sorted(reference),
        control_answers=sorted(genuine),
    )
    j.foreign = confidence  # stands unless the next steps show more (see _dns_answers)
    return None


def _blame_dns(j: _Judge, step: str, failure: str) -> Verdict | None:
    """Answers unlike the controls', and then the connection to them failed: the
    answers were the block (a forged address), not the later step."""
    if not j.inconsistent and j.foreign is None:
        return None
    if j.inconsistent and j.elsewhere:
        # The genuine addresses work from here: only the answer stands in the way.
        j.why(
            "dns_system_answer_fails",
            f"the system resolver's answers differ from the controls' "
            f"({', '.join(j.inconsistent)}) and the {step} to them failed ({failure}), while "
            f"the controls' addresses ({', '.join(j.elsewhere)}) got through: an app using "
            "this network's resolver cannot reach it",
            control_answers=j.inconsistent,
            failure=failure,
            working=j.elsewhere,
        )
        return j.verdict(False, "dns", "high")
    j.why(
        "dns_inconsistent_then_failed",
        f"the system resolver's answers {j.unlike()} and the {step} to them failed ({failure})",
        control_answers=j.inconsistent,
        failure=failure,
    )
    return j.verdict(False, "dns", _stronger("medium", j.foreign))


def _stronger(a: str, b: str | None) -> str:
    """The higher of two confidences (``b`` may be None)."""
    order = ("low", "medium", "high")
    return a if b is None or order.index(a) >= order.index(b) else b


# -- TCP -------------------------------------------------------------------------


def _tcp(j: _Judge) -> Verdict | None:
    m = j.m
    if not _all_failed(j.tcp):
        return None
    failure = _first_failure(j.tcp)
    endpoints = [f"{c.ip}:{c.port}" for c in j.tcp]
    blamed = _blame_dns(j, "connect", failure)
    if blamed is not None:
        return blamed
    helper = j.helper_connects()
    if helper is True:
        # A RST is an answer someone sent. A timeout is every SYN of the attempt lost:
        # it counts when the control helper connected to the very same endpoint (the
        # server is up and takes connections: OONI's tcp_ip rule), or when several
        # endpoints all timed out; to another endpoint only, one timeout may be the link.
        same = j.helper_endpoints() & {(c.ip, c.port) for c in j.tcp}
        if failure == "connection_refused":
            confidence = "high"
        else:
            several = len({(c.ip, c.port) for c in j.tcp}) > 1
            confidence = "medium" if same or several else "low"
        j.why(
            "tcp_failure_vs_control",
            f"every connect failed ({failure}) while the control helper connected"
            + (
                f" to the same endpoint ({', '.join(f'{ip}:{p}' for ip, p in sorted(same))})"
                if same
                else ""
            ),
            failure=failure,
            endpoints=endpoints,
        )
        return j.verdict(False, "tcp_ip", confidence)
    if helper is False:
        j.why(
            "server_down",
            f"every connect failed ({failure}), and from the control helper too: "
            "the server is down, not blocked",
            failure=failure,
        )
        return j.verdict(False, False, "high")
    if _known(m):
        j.why(
            "tcp_failure_known_service",
            f"every connect to the service failed ({failure})",
            failure=failure,
            endpoints=endpoints,
        )
        return j.verdict(False, "tcp_ip", "medium" if failure == "connection_refused" else "low")
    j.why(
        "tcp_failure_unconfirmed",
        f"every connect failed ({failure}); without a control a down server looks the same",
        failure=failure,
    )
    return j.verdict(False, None, "low")


# -- TLS -------------------------------------------------------------------------


def _tls(j: _Judge) -> Verdict | None:
    m = j.m
    targets = j.tls
    if not _all_failed(targets):
        return None
    failure = _first_failure(targets)
    helper = j.helper_tls()
    helper_ok = helper is not None and helper.failure is None
    blamed = _blame_dns(j, "TLS handshake", failure)
    if blamed is not None:
        return blamed
    if helper is not None and helper.failure == failure:
        j.why(
            "server_tls_broken",
            f"the control helper's handshake fails the same way ({failure}): "
            "the server's problem, not a block",
            failure=failure,
        )
        return j.verdict(False, False, "high" if failure in CERTIFICATE_FAILURES else "medium")
    if failure in INTERFERENCE:
        controls = _sni_controls(m)
        if any(_answered(h) for h in controls):
            j.used.append("sni_ab")
            j.why(
                "sni_filtering",
                f"the handshake naming {targets[0].server_name} was cut off "
                f"({failure}) while the same address answered a handshake naming "
                f"{controls[0].server_name}",
                failure=failure,
                control_sni=controls[0].server_name,
            )
            return j.verdict(False, "tls", "high")
        if controls:
            j.used.append("sni_ab")
        if helper_ok:
            j.why(
                "tls_failure_vs_control",
                f"the handshake was cut off ({failure}) while the control helper's succeeded",
                failure=failure,
            )
            return j.verdict(False, "tls", "medium")
        j.why(
            "tls_failure_unconfirmed",
            f"the handshake was cut off ({failure}) and the address "
            "did not answer a harmless name either",
            failure=failure,
        )
        return j.verdict(False, None, "low")
    if failure not in CERTIFICATE_FAILURES:
        j.why("tls_failure_other", f"the handshake failed ({failure})", failure=failure)
        return j.verdict(False, None, "low")
    # A certificate problem: interception, or the server's own misconfiguration?
    if helper_ok or (
        _known(m) and failure == "ssl_unknown_authority" and m.target.expect.cert_names
    ):
        strength = "high" if helper_ok else "medium"
        j.why(
            "tls_interception",
            f"the certificate presented fails validation ({failure}) where "
            "the genuine server's validates",
            failure=failure,
        )
        return j.verdict(False, "tls", strength)
    j.why(
        "certificate_unconfirmed",
        f"the certificate fails validation ({failure}); without a "
        "control this may be the site's own problem",
        failure=failure,
    )
    return j.verdict(False, None, "low")


# -- HTTP ------------------------------------------------------------------------


def _http(j: _Judge) -> Verdict | None:
    m = j.m
    if not m.requests:
        return None
    last = m.requests[-1]
    if last.status is not None:
        fp = j.c.fingerprints.match_http(last.status, last.response_headers, last.body or b"")
        if fp is not None and fp.scope == "false-positive":
            j.why(
                "known_false_positive",
                f"the site answered with a known false positive, not a blockpage: {fp.description}",
                fingerprint=fp.id,
                status=last.status,
            )
            # The network let the site answer; what the site shows is its own choice.
            return j.verdict(None, False, "medium")
        if fp is not None and (j.inconsistent or j.foreign):
            # The blockpage is the symptom; the answer that led there is the cause.
            j.why(
                "dns_to_blockpage",
                f"the system resolver's answers {j.unlike()} and lead to a blockpage "
                f"(fingerprint {fp.id}: {fp.description})",
                fingerprint=fp.id,
                control_answers=j.inconsistent,
                url=last.url,
            )
            return j.verdict(False, "dns", "high")
        if fp is not None:
            j.why(
                "blockpage",
                f"the page matches the blockpage fingerprint {fp.id} ({fp.description})",
                fingerprint=fp.id,
                status=last.status,
                url=last.url,
            )
            return j.verdict(False, "http-diff", "high")
    control = j.helper_http()
    if last.failure is not None and j.foreign is not None:
        # The answer was forged (its network says so): what failed there is its doing.
        blamed = _blame_dns(j, "HTTP exchange", last.failure)
        if blamed is not None:
            return blamed
    if last.failure is not None:
        return _http_failure(j, last, control)
    if control is None or control.status is None or control.failure is not None:
        if j.foreign is not None:
            return None  # the answer was forged, whatever page it gave: DNS decides
        expected = m.target.expect.status
        if expected and last.status not in expected:
            j.why(
                "unexpected_status",
                f"the final status is {last.status}, "
                f"not the expected {', '.join(map(str, expected))}",
                status=last.status,
                expected=list(expected),
            )
            return j.verdict(False, "http-diff", "low")
        if urlsplit(last.url).scheme == "http" and not m.target.control:
            # Anyone on the path can answer a cleartext request; with nothing to compare
            # with, a page that loaded may be a blockpage no fingerprint knows. (A control
            # target is judged for connectivity only: it says whether the network works.)
            j.why(
                "cleartext_unverified",
                f"the page loaded over plain HTTP (status {last.status}) but there is no "
                "control view to compare it with: its content proves nothing",
                status=last.status,
                url=last.url,
            )
            return j.verdict(None, None, "low")
        return None
    # OONI web_connectivity's comparisons with the control's view.
    same_status = control.status == last.status
    longer, shorter = (
        max(control.body_length, last.body_length),
        min(control.body_length, last.body_length),
    )
    proportion = shorter / longer if longer else 1.0
    ours, theirs = title_of(last.body or b""), title_of(control.body or b"")
    same_title = (
        ours is not None and theirs is not None and _title_words(ours) == _title_words(theirs)
    )
    if same_status and (proportion > 0.7 or same_title):
        j.content_matches = True
        return None
    if j.inconsistent or j.foreign:
        j.why(
            "dns_inconsistent_then_differs",
            f"the system resolver's answers {j.unlike()} and the page there differs from "
            f"the control helper's (status {last.status} vs {control.status}, body length "
            f"proportion {proportion:.2f}): another server answered",
            control_answers=j.inconsistent,
            status=last.status,
            control_status=control.status,
            proportion=round(proportion, 3),
        )
        return j.verdict(False, "dns", _stronger("medium", j.foreign))
    j.why(
        "http_differs",
        f"the page differs from the control helper's (status {last.status} vs {control.status}, "
        f"body length proportion {proportion:.2f}, titles {ours!r} vs {theirs!r})",
        status=last.status,
        control_status=control.status,
        proportion=round(proportion, 3),
    )
    return j.verdict(False, "http-diff", "low")


def _title_words(title: str) -> set[str]:
    return {w.lower() for w in title.split() if len(w) >= 5}


def _http_failure(j: _Judge, last: HTTPTransaction, control: HTTPTransaction | None) -> Verdict:
    failure = last.failure or ""
    control_ok = control is not None and control.failure is None and control.status is not None
    seconds = max(last.t - last.t0, 1e-6)
    rate = last.body_length / seconds
    if (
        failure == "generic_timeout_error"
        and last.status is not None
        and 200 <= last.status < 300
        and last.body_length
    ):
        if rate < THROTTLE_RATE:
            strong = control_ok and rate < COLLAPSED_RATE
            j.why(
                "throttling",
                f"the download stalled at {rate / 1000:.1f} kB/s after {last.body_length} "
                "bytes" + (" while the control helper fetched it whole" if control_ok else ""),
                rate=round(rate),
                bytes=last.body_length,
                seconds=round(seconds, 3),
            )
            return j.verdict(False, "throttling", "medium" if strong else "low")
        j.why(
            "slow_transfer",
            f"the download was moving ({rate / 1000:.0f} kB/s) when the time ran out: a slow "
            "link, not evidence of a block",
            rate=round(rate),
            bytes=last.body_length,
        )
        return j.verdict(None, None, "low")
    if control is not None and control.failure == failure:
        j.why(
            "server_http_broken",
            f"the control helper's request fails the same way ({failure})",
            failure=failure,
        )
        return j.verdict(False, False, "medium")
    if control_ok or _known(j.m):
        # A reset or a cut connection is something someone did; a timeout may be the link.
        if failure == "generic_timeout_error":
            strength = "low"
        else:
            strength = "high" if control_ok and failure in INTERFERENCE else "medium"
        j.why(
            "http_failure",
            f"the HTTP exchange failed ({failure} in {last.failed_operation})"
            + (" while the control helper's worked" if control_ok else ""),
            failure=failure,
        )
        return j.verdict(False, "http-failure", strength)
    j.why(
        "http_failure_unconfirmed",
        f"the HTTP exchange failed ({failure}); without a control a failing server looks the same",
        failure=failure,
    )
    return j.verdict(False, None, "low")


__all__ = ["Controls", "Fingerprint", "judge"]
