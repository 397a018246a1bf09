"""The router's nftables ruleset for a scenario's TCP-level rules and outages.

Connect-time blocking must happen before any proxy accepts the connection, so it is
done here, in the kernel: ``drop`` discards the SYN (the probe times out), ``reset``
answers it with a RST (the probe sees connection_refused). Everything else TCP from
the LAN is redirected to the router agent's proxy, which applies TLS/HTTP rules.
"""

from __future__ import annotations

from collections.abc import Iterable

from probe.lab import addresses as A
from probe.lab.scenario import Rule

TABLE = "vlab"


def _set(items: Iterable[str]) -> str:
    return "{ " + ", ".join(sorted(set(items))) + " }"


def ruleset(rules: Iterable[Rule], resolve: dict[str, list[str]], everything: list[str]) -> str:
    """nftables text; ``resolve`` maps each rule's match entries to lab addresses.

    Only connections to addresses that a tls, http or throttle rule watches go through
    the proxy (it must accept them to read the first bytes); everything else is routed
    untouched, so a server that is down still refuses the connection itself.
    ``everything`` is what a rule with no names (an http keyword rule) watches.
    """
    watched: set[str] = set()
    raw: list[str] = [
        'iifname "lan" ip saddr . ip daddr . tcp dport @residual drop',
    ]
    for i, rule in enumerate(rules):
        if rule.kind in ("tls", "http", "throttle"):
            watched.update(resolve[f"rule{i}"] if rule.match else everything)
        if rule.kind == "outage":
            raw.append('iifname "lan" drop')
            continue
        if rule.kind != "tcp":
            continue
        addresses = resolve[f"rule{i}"]
        if not addresses:
            continue
        ports = f" tcp dport {_set(map(str, rule.ports))}" if rule.ports else " meta l4proto tcp"
        verdict = "drop" if rule.action == "drop" else "reject with tcp reset"
        raw.append(f'iifname "lan" ip daddr {_set(addresses)}{ports} {verdict}')
    redirect = (
        [f'    iifname "lan" ip daddr {_set(watched)} meta l4proto tcp redirect to :{A.PROXY_PORT}']
        if watched
        else []
    )
    lines = [
        f"table inet {TABLE} {{",
        "  set residual { type ipv4_addr . ipv4_addr . inet_service; flags timeout; }",
        "  chain raw { type filter hook prerouting priority raw; policy accept;",
        *(f"    {r}" for r in raw),
        "  }",
        "  chain nat { type nat hook prerouting priority dstnat; policy accept;",
        *redirect,
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"
