"""Builders of the ``tc`` and ``nft`` commands that emulate one link (pure functions: nothing is run here)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["NETEM_LIMIT", "TBF_BURST_SECONDS", "TBF_LATENCY_SECONDS"]

TBF_BURST_SECONDS = 0.001
"""tbf bucket size, in seconds of traffic at the configured rate (at least two full frames)."""
TBF_LATENCY_SECONDS = 0.05
"""tbf queue length, in seconds of traffic at the configured rate; packets beyond it are dropped (congestion)."""
NETEM_LIMIT = 100_000
"""netem queue length in packets (netem's default, 1000, is too short for delay x rate at Gbit/s)."""
_LOSS_SCALE = 1_000_000  # resolution of the nftables random drop
_HOST_DEV = "eth0"
_BRIDGE_DEV = "br0"
_NFT_TABLE = "lmnetem"
_IPT_CHAIN = "LMNETEM"


def _pct(p: float) -> str:
    return f"{p * 100:.6g}%"


def _usec(seconds: float) -> str:
    return f"{round(seconds * 1e6)}us"


def _tbf_args(rate_bps: float, mtu: int) -> list[str]:
    rate_bytes = rate_bps / 8
    burst = max(int(rate_bytes * TBF_BURST_SECONDS), 2 * (mtu + 14))
    return ["tbf", "rate", f"{int(rate_bps)}bit", "burst", str(burst), "latency", _usec(TBF_LATENCY_SECONDS)]


def _qdisc_commands(dev: str, netem: Sequence[str] | None, rate_bps: float | None, rate_backend: str | None,
                    mtu: int) -> list[list[str]]:
    """``tc`` argument lists (without ``tc -n NS``) configuring the egress of ``dev``."""
    netem = list(netem or ())
    if rate_bps is not None and rate_backend == "netem":
        netem += ["rate", f"{int(rate_bps)}bit"]
        rate_bps = None
    tbf = _tbf_args(rate_bps, mtu) if rate_bps is not None and rate_backend == "tbf" else None
    netem_cmd = ["netem", "limit", str(NETEM_LIMIT), *netem]
    if netem and tbf:
        return [["qdisc", "add", "dev", dev, "root", "handle", "1:", *netem_cmd],
                ["qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", *tbf]]
    if netem:
        return [["qdisc", "add", "dev", dev, "root", "handle", "1:", *netem_cmd]]
    if tbf:
        return [["qdisc", "add", "dev", dev, "root", "handle", "1:", *tbf]]
    return []


def _nft_table_script(dev: str, loss: float, table: str = _NFT_TABLE, hook: str = "ingress") -> str:
    """An nft script replacing table ``netdev <table>`` by one dropping ``loss`` of the IP packets entering ``dev``
    (``hook="egress"``: leaving it).

    ``loss == 0`` only removes the table. The ``add``/``delete`` pair makes the delete succeed when the table does not
    exist; the whole script is one atomic transaction.
    """
    lines = [f"add table netdev {table}", f"delete table netdev {table}"]
    if loss > 0:
        threshold = round(loss * _LOSS_SCALE)
        lines += [
            f"table netdev {table} {{",
            f'  chain drop_{hook} {{ type filter hook {hook} device "{dev}" priority 0; policy accept;',
            f"    meta protocol {{ ip, ip6 }} numgen random mod {_LOSS_SCALE} < {threshold} counter drop",
            "  }",
            "}",
        ]
    return "\n".join(lines) + "\n"
