"""The hosts' private IPv4 network: one ``10.213.X.0/24`` per cluster that no root-namespace network overlaps."""

from __future__ import annotations

import ipaddress
import zlib

from .programs import _run, _which

__all__ = ["SUBNET_BASE"]

SUBNET_BASE = "10.213"


def _root_networks() -> list[ipaddress.IPv4Network]:
    ip = _which("ip")
    if ip is None:
        return []
    nets = []
    for argv in ([ip, "-4", "-o", "addr", "show"], [ip, "-4", "route", "show", "table", "all"]):
        for line in _run(argv, check=False).stdout.splitlines():
            for token in line.split():
                if "." not in token:
                    continue
                try:
                    net = ipaddress.ip_network(token, strict=False)
                except ValueError:
                    continue
                if isinstance(net, ipaddress.IPv4Network) and net.prefixlen > 0:
                    nets.append(net)
                break
    return nets


def _pick_subnet(prefix: str) -> ipaddress.IPv4Network:
    """A ``10.213.X.0/24`` for ``prefix``: X from a hash of the prefix, skipping networks the root namespace uses."""
    used = _root_networks()
    start = zlib.crc32(prefix.encode()) % 254
    for k in range(254):
        net = ipaddress.IPv4Network(f"{SUBNET_BASE}.{(start + k) % 254 + 1}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    return ipaddress.IPv4Network(f"{SUBNET_BASE}.{start + 1}.0/24")  # the namespaces are isolated anyway
