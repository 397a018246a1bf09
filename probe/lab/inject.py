"""On-path DNS injection: the censor races the real answer with a forged one.

A scapy sniffer on the router's LAN interface sees every UDP query to port 53 (to
any address, whether or not a server runs there) and, for names matching a rule,
sends back a forged A answer from the queried address straight away. The real
answer, if any, still arrives later: that pair of answers is the evidence the
probe must recognise. No BPF filter (no libpcap here): packets are picked in Python.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from probe.lab.censor import InjectRule, inject_rule_for

log = logging.getLogger("probe.lab.inject")

Sender = Callable[[Any], None]


def is_query(pkt: Any) -> bool:
    """The sniffer's filter: an IPv4/UDP packet to port 53 holding a DNS query.

    The LAN is Ethernet (veth) or raw IP (the TUN pair ``probe.lab.link`` uses
    for path conditions); both are handled.
    """
    from scapy.layers.dns import DNS
    from scapy.layers.inet import IP, UDP

    try:
        if IP not in pkt or UDP not in pkt or DNS not in pkt:
            return False
        return bool(pkt[UDP].dport == 53 and pkt[DNS].qr == 0 and pkt[DNS].qd)
    except Exception:  # noqa: BLE001 - a malformed packet is simply not a query
        return False


def query_name(pkt: Any) -> str | None:
    """The first question's name of a sniffed query, or None."""
    from scapy.layers.dns import DNS

    try:
        qd = pkt[DNS].qd
        first = qd[0] if isinstance(qd, list) else qd
        raw = first.qname
        return raw.decode("latin-1") if isinstance(raw, bytes) else str(raw)
    except Exception:  # noqa: BLE001 - hostile packets must never stop the sniffer
        return None


def forge_reply(pkt: Any, rules: Sequence[InjectRule]) -> Any | None:
    """The forged answer to a sniffed query, or None if no rule matches.

    Same DNS id and question, AA/QR/RA set, A records from the rule, sent from the
    address and port the query went to, back to the MAC it came from (on Ethernet;
    on a raw-IP link the reply is the bare IP packet).
    """
    from scapy.layers.dns import DNS, DNSRR
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    if not is_query(pkt):
        return None
    name = query_name(pkt)
    rule = inject_rule_for(rules, name)
    if rule is None:
        return None
    try:
        query = pkt[DNS]
        qd = query.qd if isinstance(query.qd, list) else [query.qd]
        qname = qd[0].qname
        answers = [
            DNSRR(rrname=qname, type="A", rclass="IN", ttl=rule.ttl, rdata=address)
            for address in rule.addresses
        ]
        dns = DNS(id=query.id, qr=1, opcode=query.opcode, aa=1, rd=query.rd, ra=1, rcode=0,
                  qd=list(qd), an=answers)  # fmt: skip
        reply = (
            IP(src=pkt[IP].dst, dst=pkt[IP].src, ttl=64)
            / UDP(sport=pkt[UDP].dport, dport=pkt[UDP].sport)
            / dns
        )
        if Ether in pkt:
            return Ether(src=pkt[Ether].dst, dst=pkt[Ether].src) / reply
        return reply
    except Exception:  # noqa: BLE001
        log.exception("inject: could not forge an answer")
        return None


class Injector:
    """Runs the sniffer thread; ``start`` returns once the capture socket is open."""

    def __init__(self, iface: str, rules: Sequence[InjectRule]) -> None:
        self.iface = iface
        self.rules = tuple(rules)
        self.injected = 0
        self._sniffer: Any = None
        self._send_socket: Any = None
        self._lock = threading.Lock()

    def start(self, timeout: float = 10.0) -> None:
        """Open the sending socket and start sniffing (blocking; run it in a thread)."""
        # The layers must be loaded before a socket is opened: importing them is what
        # registers Ethernet as the link type (else every packet decodes as Raw).
        import scapy.layers.dns
        import scapy.layers.inet
        import scapy.layers.l2  # noqa: F401
        from scapy.config import conf
        from scapy.sendrecv import AsyncSniffer

        self._send_socket = conf.L2socket(iface=self.iface)
        started = threading.Event()
        self._sniffer = AsyncSniffer(
            iface=self.iface, store=False, lfilter=is_query, prn=self._on_query,
            started_callback=started.set,
        )  # fmt: skip
        self._sniffer.start()
        if not started.wait(timeout):
            self.stop()
            raise RuntimeError(f"injector: sniffer on {self.iface} did not start")

    def _on_query(self, pkt: Any) -> None:
        try:
            reply = forge_reply(pkt, self.rules)
            if reply is None:
                return
            with self._lock:
                if self._send_socket is None:
                    return
                self._send_socket.send(reply)
            self.injected += 1
            log.info("inject: %s asked for %s: forged an answer", self.iface, query_name(pkt))
        except Exception:  # noqa: BLE001 - the sniffer thread must survive anything
            log.exception("inject: failed to answer a query")

    def stop(self) -> None:
        """Stop sniffing and close the sockets (blocking; run it in a thread)."""
        sniffer, self._sniffer = self._sniffer, None
        if sniffer is not None and getattr(sniffer, "running", False):
            try:
                sniffer.stop(join=True)
            except Exception:  # noqa: BLE001 - shutting down anyway
                log.exception("inject: stopping the sniffer")
        with self._lock:
            sock, self._send_socket = self._send_socket, None
        if sock is not None:
            sock.close()
