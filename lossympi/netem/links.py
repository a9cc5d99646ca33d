"""Configuring one host's link on a running cluster: ``tc`` qdiscs, nftables and iptables loss rules, from a plan.

A host ``i``'s link is its veth ``eth0`` (in the host's namespace) and the peer ``h<i>`` (in the bridge's
namespace). Direction ``"out"`` (host -> bridge) is the egress of ``eth0`` and the ingress of ``h<i>``;
direction ``"in"`` (bridge -> host) is the egress of ``h<i>`` and the ingress of ``eth0``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .commands import _HOST_DEV, _IPT_CHAIN, _NFT_TABLE, _nft_table_script, _qdisc_commands
from .plan import _Plan
from .programs import _run, _tool, _which

__all__: list[str] = []


def _egress_devices(host_ns: str, bridge_ns: str, host: int) -> dict[str, tuple[str, str]]:
    """direction -> (namespace, device whose egress carries that direction)."""
    return {"out": (host_ns, _HOST_DEV), "in": (bridge_ns, f"h{host}")}


def _configure_nft(ip: str, host_ns: str, bridge_ns: str, host: int, plan: _Plan, fresh: bool) -> None:
    nft = _which("nft")
    if nft is None:
        return
    # "in": ingress of the host's eth0; "out": ingress of the bridge-side veth (after the packet left the
    # host, so the sender never sees an error).
    for direction, ns, dev, table in (("in", host_ns, _HOST_DEV, _NFT_TABLE),
                                      ("out", bridge_ns, f"h{host}", f"{_NFT_TABLE}_h{host}")):
        loss = plan.nft_loss.get(direction, 0.0)
        if loss > 0 or not fresh:
            _run([ip, "netns", "exec", ns, nft, "-f", "-"], input=_nft_table_script(dev, loss, table))


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
                   fresh: bool = False) -> None:
    """Configure host ``host``'s link as ``plan`` says, replacing what was there (``fresh``: nothing was).

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
    if caps.get("nft"):
        _configure_nft(ip, host_ns, bridge_ns, host, plan, fresh)
    if caps.get("iptables"):
        _configure_iptables(ip, host_ns, plan, fresh)
    if tc is not None:
        for direction, (ns, dev) in devices.items():
            for argv in _qdisc_commands(dev, plan.netem.get(direction), plan.rate_bps, plan.rate_backend, mtu):
                _run([tc, "-n", ns, *argv])
