"""The lab's fixed addresses (see DESIGN.md). All inside 198.18.0.0/15, the range
reserved for benchmarking, which hosts do not use."""

from __future__ import annotations

import ipaddress

LAB_RANGE = ipaddress.ip_network("198.18.0.0/15")
LAN = ipaddress.ip_network("198.18.0.0/24")
WAN = ipaddress.ip_network("198.19.0.0/16")

PROBE = "198.18.0.2"
ROUTER_LAN = "198.18.0.1"
ROUTER_WAN = "198.19.0.1"
NET_MAIN = "198.19.0.2"
AUTHORITATIVE = "198.19.0.53"
PUBLIC_RESOLVER = "198.19.0.99"
BLOCKPAGE = "198.19.0.80"
CONTROL_HELPER = "198.19.0.70"
CONTROL_PORT = 8700
NO_DNS_SERVER = "198.19.0.111"
PROXY_PORT = 15001

_POOLS = {"catalog": 1, "fixed": 2, "site": 3}


def pool_address(pool: str, n: int) -> str:
    """The n-th address (1-based) of a pool: 198.19.<pool>.<n>, spilling into the next /24s."""
    if not 0 < n < 254 * 16:
        raise ValueError(f"too many lab addresses in pool {pool}: {n}")
    third = _POOLS[pool] + 16 * ((n - 1) // 254)
    return f"198.19.{third}.{(n - 1) % 254 + 1}"
