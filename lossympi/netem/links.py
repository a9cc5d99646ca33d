"""Configuring one host's link on a running cluster: ``tc`` qdiscs, nftables and iptables loss rules, from a plan.

A host ``i``'s link is its veth ``eth0`` (in the host's namespace) and the peer ``h<i>`` (in the bridge's
namespace). Direction ``"out"`` (host -> bridge) is the egress of ``eth0`` and the ingress of ``h<i>``;
direction ``"in"`` (bridge -> host) is the egress of ``h<i>`` and the ingress of ``eth0``. Loss rules sit on
``h<i>``, before the receiving host's GRO (see :func:`gro_safe`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .commands import _HOST_DEV, _IPT_CHAIN, _NFT_TABLE, _nft_table_script, _qdisc_commands
from .plan import _Plan
from .programs import _run, _tool, _which

__all__: list[str] = []

GRO_QUEUE_PACKETS = 10_000
"""Length of the fifo on the bridge side of a host doing GRO (its veth pushes back into it when its ring is full)."""


def _egress_devices(host_ns: str, bridge_ns: str, host: int) -> dict[str, tuple[str, str]]:
    """direction -> (namespace, device whose egress carries that direction)."""
    return {"out": (host_ns, _HOST_DEV), "in": (bridge_ns, f"h{host}")}


def _configure_nft(ip: str, host_ns: str, bridge_ns: str, host: int, plan: _Plan, fresh: bool) -> bool:
    """Both directions drop on the bridge side of the host's veth ``h<host>``, where every packet is still one
    datagram or segment (the sending host cut its GSO buffers in software) and before the receiving host's GRO merges
    them, as a NIC merges after the wire: "in" at the egress of ``h<host>`` (netdev egress hook), "out" at its
    ingress (after the packet left the host, so the sender never sees an error).

    Returns False when this kernel has no netdev egress hook and "in" loss had to sit at the ingress of the host's
    ``eth0`` instead, which comes after its GRO (the host must then not do GRO).
    """
    nft = _which("nft")
    if nft is None:
        return True
    loss_out = plan.nft_loss.get("out", 0.0)
    if loss_out > 0 or not fresh:
        _run([ip, "netns", "exec", bridge_ns, nft, "-f", "-"],
             input=_nft_table_script(f"h{host}", loss_out, f"{_NFT_TABLE}_h{host}"))
    loss_in = plan.nft_loss.get("in", 0.0)
    if not (loss_in > 0 or not fresh):
        return True
    egress = _run([ip, "netns", "exec", bridge_ns, nft, "-f", "-"], check=False,
                  input=_nft_table_script(f"h{host}", loss_in, f"{_NFT_TABLE}_in_h{host}", hook="egress"))
    at_bridge = egress.returncode == 0
    # The host-side table holds the "in" loss only where the bridge side cannot (else it is removed).
    _run([ip, "netns", "exec", host_ns, nft, "-f", "-"],
         input=_nft_table_script(_HOST_DEV, 0.0 if at_bridge else loss_in, _NFT_TABLE))
    return at_bridge or loss_in == 0


def gro_safe(plan: _Plan, nft_before_gro: bool = True) -> bool:
    """Whether every per-packet impairment of ``plan`` on the host's receive side acts before the host's GRO.

    GRO merges the datagrams of one flow into 64 KB buffers once they reach the host's ``eth0``: loss applied
    after it (iptables in the host's INPUT, nft loss where the bridge side has no egress hook, or a delay line at
    INPUT that drops, jitters or reorders) would act on whole buffers. A constant delay treats every packet alike
    and may come after GRO.
    """
    line = getattr(plan, "line", None)  # the NFQUEUE delay line at the host's INPUT, when the plan has one
    per_packet_line = line is not None and bool(line.jitter or line.reorder or line.gemodel)
    return nft_before_gro and plan.ipt_loss == 0 and not per_packet_line


def _configure_iptables(ip: str, host_ns: str, plan: _Plan, fresh: bool) -> None:
    ipt = _which("iptables")
    if ipt is None or not (plan.ipt_loss > 0 or not fresh):
        return
    base = [ip, "netns", "exec", host_ns, ipt, "-w"]
    if _run([*base, "-F", _IPT_CHAIN], check=False).returncode != 0 and plan.ipt_loss > 0:
        _run([*base, "-N", _IPT_CHAIN])
    if plan.ipt_loss > 0:
        if _run([*base, "-C", "INPUT", "-j", _IPT_CHAIN], check=False).returncode != 0:
            _run([*base, "-I", "INPUT", "-j", _IPT_CHAIN])
        _run([*base, "-A", _IPT_CHAIN, "-m", "statistic", "--mode", "random", "--probability",
              f"{plan.ipt_loss:.6g}", "-j", "DROP"])


def configure_link(host_ns: str, bridge_ns: str, host: int, plan: _Plan, mtu: int, caps: Mapping[str, Any], *,
                   fresh: bool = False) -> bool:
    """Configure host ``host``'s link as ``plan`` says, replacing what was there (``fresh``: nothing was).

    Returns :func:`gro_safe`: whether the host may do GRO on its ``eth0`` (every per-packet impairment of its
    receive side acts before it).

    Parameters
    ----------
    host_ns, bridge_ns : str
        The host's and the bridge's namespaces.
    host : int
        Host index (names the bridge-side veth ``h<host>``).
    plan : _Plan
        What to configure (:func:`lossympi.netem.plan._plan`).
    mtu : int
        The link's MTU (sizes the tbf bucket).
    caps : Mapping
        :func:`lossympi.netem.capabilities`: only the working loss backends are touched.
    fresh : bool
        The link has no qdisc or rule yet (nothing to remove first).
    """
    ip = _tool("ip")
    tc = _which("tc")
    devices = _egress_devices(host_ns, bridge_ns, host)
    if tc is not None and not fresh:
        for ns, dev in devices.values():
            _run([tc, "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
    nft_before_gro = True
    if caps.get("nft"):
        nft_before_gro = _configure_nft(ip, host_ns, bridge_ns, host, plan, fresh)
    if caps.get("iptables"):
        _configure_iptables(ip, host_ns, plan, fresh)
    queued = False  # a qdisc on the bridge side of the host's receive direction
    if tc is not None:
        for direction, (ns, dev) in devices.items():
            for argv in _qdisc_commands(dev, plan.netem.get(direction), plan.rate_bps, plan.rate_backend, mtu):
                _run([tc, "-n", ns, *argv])
                queued = queued or direction == "in"
    gro = gro_safe(plan, nft_before_gro)
    if tc is not None and gro and not queued:
        # A veth doing GRO takes what it receives into a 256-packet NAPI ring, dropped from when full (the host's
        # softirq lags, as a NIC's rx ring overflows); with a qdisc on its peer the veth pushes back instead.
        ns, dev = devices["in"]
        _run([tc, "-n", ns, "qdisc", "replace", "dev", dev, "root", "pfifo", "limit", str(GRO_QUEUE_PACKETS)])
    return gro
