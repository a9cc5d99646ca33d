"""What this machine can emulate: a probe in a scratch namespace, run once per process (:func:`capabilities`)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
from collections.abc import Mapping
from typing import Any

from .commands import _nft_table_script
from .namespaces import _destroy_namespaces
from .programs import _has_admin_caps, _run, _which
from .registry import _next_prefix
from .spec import IMPAIRMENTS

__all__ = ["capabilities", "require_root_reason"]

_CAPS: dict[str, Any] | None = None
_CAPS_LOCK = threading.Lock()


def _unavailable(caps: Mapping[str, Any]) -> list[str]:
    missing = []
    if not (caps["netem"] or caps["nft"] or caps["iptables"]):
        missing.append("loss")
    if not (caps["tbf"] or caps["netem"]):
        missing.append("rate")
    if not caps["netem"]:
        missing += ["duplicate"] if caps.get("nfqueue") else ["delay", "jitter", "reorder", "duplicate", "gemodel"]
    return [name for name in IMPAIRMENTS if name in missing]


def _probe_backends(ip: str, ns: str, tools: Mapping[str, str | None], caps: dict[str, Any]) -> None:
    """Try netem, tbf, an nftables table and an iptables rule on the veth ``p0`` of the scratch namespace ``ns``."""
    _run([ip, "-n", ns, "link", "set", "p0", "up"], check=False)
    tc = tools["tc"]
    if tc is not None:
        netem = _run([tc, "-n", ns, "qdisc", "add", "dev", "p0", "root", "netem", "delay", "1ms"], check=False)
        caps["netem"] = netem.returncode == 0
        if not caps["netem"]:
            caps["notes"].append(f"tc netem: {netem.stderr.strip() or 'failed'} (kernel lacks sch_netem?)")
        _run([tc, "-n", ns, "qdisc", "del", "dev", "p0", "root"], check=False)
        tbf = _run([tc, "-n", ns, "qdisc", "add", "dev", "p0", "root", "tbf", "rate", "1gbit",
                    "burst", "64kb", "latency", "50ms"], check=False)
        caps["tbf"] = tbf.returncode == 0
        if not caps["tbf"]:
            caps["notes"].append(f"tc tbf: {tbf.stderr.strip() or 'failed'}")
        _run([tc, "-n", ns, "qdisc", "del", "dev", "p0", "root"], check=False)
    else:
        caps["notes"].append("tc (iproute2) not installed: no netem, no tbf")
    if tools["nft"] is not None:
        script = _nft_table_script("p0", 0.5, "probe")
        nft = _run([ip, "netns", "exec", ns, tools["nft"], "-f", "-"], input=script, check=False)
        caps["nft"] = nft.returncode == 0
        if not caps["nft"]:
            caps["notes"].append(f"nft: {nft.stderr.strip() or 'failed'}")
    if tools["iptables"] is not None:
        ipt = _run([ip, "netns", "exec", ns, tools["iptables"], "-w", "-A", "INPUT", "-m", "statistic",
                    "--mode", "random", "--probability", "0.5", "-j", "DROP"], check=False)
        caps["iptables"] = ipt.returncode == 0
        if not caps["iptables"]:
            caps["notes"].append(f"iptables: {ipt.stderr.strip() or 'failed'}")
    _probe_nfqueue(ip, ns, caps)


def _probe_nfqueue(ip: str, ns: str, caps: dict[str, Any]) -> None:
    """Can the NFQUEUE delay line run here: an iptables that sends packets to a queue, and the compiled loop?"""
    for name in ("iptables-legacy", "iptables"):  # nftables' `queue` is often not built in: legacy first
        path = _which(name)
        if path is None:
            continue
        rule = _run([ip, "netns", "exec", ns, path, "-w", "-A", "INPUT", "-i", "p0", "-j", "NFQUEUE",
                     "--queue-num", "0"], check=False)
        if rule.returncode == 0:
            caps["nfqueue_iptables"] = path
            break
        caps["notes"].append(f"{name} -j NFQUEUE: {rule.stderr.strip() or 'failed'}")
    else:
        caps["notes"].append("no iptables-legacy: no NFQUEUE delay line (apt-get install iptables)")
    if caps["nfqueue_iptables"] is not None and importlib.util.find_spec("lossympi._nfqueue") is None:
        caps["notes"].append("lossympi._nfqueue is not built: no NFQUEUE delay line (pip install -e .)")
    caps["nfqueue"] = caps["nfqueue_iptables"] is not None and importlib.util.find_spec("lossympi._nfqueue") is not None


def _probe() -> dict[str, Any]:
    caps: dict[str, Any] = {
        "netem": False, "nft": False, "iptables": False, "tbf": False, "nfqueue": False, "nfqueue_iptables": None,
        "unavailable": list(IMPAIRMENTS), "backends": dict.fromkeys(IMPAIRMENTS), "notes": [],
        "root": _has_admin_caps(), "netns": False, "veth": False, "bridge": False,
        "kernel": os.uname().release, "reason": None,
    }
    tools = {name: _which(name) for name in ("ip", "tc", "nft", "iptables", "bridge")}
    caps["tools"] = tools
    if not sys.platform.startswith("linux"):
        caps["reason"] = f"network namespaces need Linux, this is {sys.platform}"
        return caps
    if not caps["root"]:
        caps["reason"] = "not root: building namespaces needs CAP_SYS_ADMIN and CAP_NET_ADMIN (run as root)"
        return caps
    ip = tools["ip"]
    if ip is None:
        caps["reason"] = "the 'ip' program (iproute2) is not installed"
        return caps
    ns = _next_prefix() + "pr"
    add = _run([ip, "netns", "add", ns], check=False)
    if add.returncode != 0:
        caps["reason"] = f"cannot create a network namespace: {add.stderr.strip()}"
        return caps
    try:
        caps["netns"] = True
        veth = _run([ip, "-n", ns, "link", "add", "p0", "type", "veth", "peer", "name", "p1"], check=False)
        caps["veth"] = veth.returncode == 0
        bridge = _run([ip, "-n", ns, "link", "add", "b0", "type", "bridge"], check=False)
        caps["bridge"] = bridge.returncode == 0
        if not caps["veth"]:
            caps["reason"] = f"cannot create veth pairs: {veth.stderr.strip()}"
        elif not caps["bridge"]:
            caps["reason"] = f"cannot create a bridge: {bridge.stderr.strip()}"
        if caps["veth"]:
            _probe_backends(ip, ns, tools, caps)
    finally:
        _destroy_namespaces([ns])
    caps["unavailable"] = _unavailable(caps)
    backends = caps["backends"]
    backends["loss"] = "netem" if caps["netem"] else "nft" if caps["nft"] else "iptables" if caps["iptables"] else None
    backends["rate"] = "tbf" if caps["tbf"] else "netem" if caps["netem"] else None
    for name in ("delay", "jitter", "reorder", "gemodel"):
        backends[name] = "netem" if caps["netem"] else "nfqueue" if caps["nfqueue"] else None
    backends["duplicate"] = "netem" if caps["netem"] else None
    if backends["loss"] == "iptables":
        caps["notes"].append("loss via iptables works for direction 'in' only")
    if caps["reason"] is None and backends["loss"] is None:
        caps["reason"] = "no way to drop packets: no sch_netem in the kernel and neither nft nor iptables works"
    return caps


def capabilities(refresh: bool = False) -> dict[str, Any]:
    """Probe (once per process) which impairments this machine can emulate, without building a cluster.

    Parameters
    ----------
    refresh : bool
        Probe again instead of returning the cached result.

    Returns
    -------
    dict
        ``netem``, ``nft``, ``iptables``, ``tbf``, ``nfqueue`` (bool: the backend works here; ``nfqueue`` is the
        delay line, with the iptables program that feeds it in ``nfqueue_iptables``); ``unavailable`` (impairment
        names with no backend, e.g. ``["duplicate"]`` without ``sch_netem``);
        ``backends`` (impairment -> backend used, or None); ``root``, ``netns``, ``veth``, ``bridge`` (bool);
        ``kernel``; ``tools`` (program -> path or None); ``notes`` (why a backend failed); ``reason`` (why clusters
        cannot be built here, or None).
    """
    global _CAPS
    with _CAPS_LOCK:
        if _CAPS is None or refresh:
            _CAPS = _probe()
        return json.loads(json.dumps(_CAPS))


def require_root_reason() -> str | None:
    """Why clusters cannot be built here (not root, no ``ip``, no namespaces, no way to drop packets...), or None.

    Returns
    -------
    str or None
        A human-readable reason, or None when :class:`Cluster` can be used.
    """
    return capabilities()["reason"]
