"""Emulated multi-host networks on one Linux machine, with per-link impairments.

A :class:`Cluster` builds ``n_hosts`` network namespaces (``<prefix>h0``, ``<prefix>h1``, ...), each with one
veth interface ``eth0`` whose peer ``h<i>`` is a port of the bridge ``br0`` living in its own namespace
``<prefix>br``. Nothing is created in the root namespace: the hosts' private addresses (``10.213.X.0/24``) exist
only inside the namespaces, so programs run with :meth:`Cluster.popen` can only reach each other (and their own
loopback).

Impairments (:class:`LinkSpec`) are applied per host link:

=========  ========================================================================================
loss       ``tc netem loss`` where the kernel has ``sch_netem``; otherwise nftables
           (``numgen random mod 1000000 < K drop`` in a netdev ingress hook), otherwise iptables
           (``-m statistic --mode random --probability P -j DROP``, direction ``"in"`` only)
rate       ``tc tbf`` on the host's veth (host -> bridge) and on the bridge-side veth (bridge -> host)
delay      ``tc netem delay`` (netem only)
jitter     ``tc netem delay D J`` (netem only)
reorder    ``tc netem reorder`` (netem only, needs ``delay > 0``)
duplicate  ``tc netem duplicate`` (netem only)
=========  ========================================================================================

What the running kernel offers is probed once (:func:`capabilities`): a scratch namespace with a veth pair is
created and a netem qdisc, a tbf qdisc, an nftables netdev table and an iptables rule are tried on it. When an
impairment has no backend, :class:`Cluster` warns (:class:`NetemWarning`) and carries on without it, or raises
:class:`NetemUnavailableError` with ``strict=True``.

Everything a cluster creates is removed by :meth:`Cluster.down` (also called by the context manager, at interpreter
exit, and on SIGTERM/SIGHUP); a small reaper process removes it too if the owner dies by SIGKILL. Stale clusters
left by anything else are removed by :func:`cleanup_all` (``tools/netem cleanup --all``).

This module uses only the standard library and the ``ip``, ``tc``, ``bridge``, ``nft`` / ``iptables`` programs; it
needs root (``CAP_NET_ADMIN`` and ``CAP_SYS_ADMIN``). See ``docs/netem.md``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DIRECTIONS",
    "IMPAIRMENTS",
    "Cluster",
    "LinkSpec",
    "NetemError",
    "NetemUnavailableError",
    "NetemWarning",
    "SEGMENTATION_OFFLOADS",
    "capabilities",
    "cleanup_all",
    "destroy",
    "list_clusters",
    "parse_rate",
    "require_root_reason",
]

IMPAIRMENTS = ("loss", "rate", "delay", "jitter", "reorder", "duplicate")
"""Impairment names, as used in :func:`capabilities` ``["unavailable"]`` and :attr:`Cluster.applied`."""
DIRECTIONS = ("in", "out", "both")
"""Accepted values of :attr:`LinkSpec.direction`."""

DEFAULT_PREFIX = "lm"
NETNS_DIR = "/run/netns"
REGISTRY_DIR = "/run/lossympi-netem"
SUBNET_BASE = "10.213"
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
_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin", "/bin")
_CAP_NET_ADMIN = 12
_CAP_SYS_ADMIN = 21


class NetemError(RuntimeError):
    """A cluster could not be built, changed or removed."""


class NetemUnavailableError(NetemError):
    """``strict=True`` and an impairment asked for has no backend on this machine (e.g. no ``sch_netem``)."""


class NetemWarning(UserWarning):
    """Some asked-for impairments are not emulated on this machine; the cluster runs without them."""


# ----------------------------------------------------------------------------------------------------------------
# Link specification


_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(i?))?(bit|bps)?\s*$", re.IGNORECASE)
_RATE_MULT = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_RATE_MULT_I = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_rate(rate: str | float) -> float:
    """Parse a ``tc``-style rate into bits per second.

    Parameters
    ----------
    rate : str or float
        ``"10gbit"``, ``"200mbit"``, ``"500kbit"``, ``"1kibit"`` (powers of 1024), ``"100mbps"`` (bytes per second,
        as in ``tc``), or a bare number of bits per second.

    Returns
    -------
    float
        The rate in bits per second (> 0).

    Raises
    ------
    ValueError
        The rate cannot be parsed or is not positive.
    """
    if isinstance(rate, bool):
        raise ValueError(f"invalid rate {rate!r}")
    if isinstance(rate, int | float):
        bps = float(rate)
    else:
        m = _RATE_RE.match(str(rate))
        if m is None:
            raise ValueError(f"invalid rate {rate!r}: expected e.g. '10gbit', '200mbit', '500kbit', '100mbps'")
        number, prefix, binary, unit = m.groups()
        prefix = (prefix or "").lower()
        mult = (_RATE_MULT_I if binary else _RATE_MULT)[prefix]
        bps = float(number) * mult * (8 if (unit or "bit").lower() == "bps" else 1)
    if not bps > 0 or bps != bps or bps == float("inf"):
        raise ValueError(f"rate must be positive and finite, got {rate!r}")
    return bps


def _check_probability(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def _check_seconds(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 3600.0:
        raise ValueError(f"{name} must be a duration in seconds in [0, 3600), got {value!r}")


@dataclass(frozen=True)
class LinkSpec:
    """Impairments of one host's link to the bridge.

    Parameters
    ----------
    loss : float
        Probability that a packet is dropped, independently per packet and per direction it applies to. With the
        default ``direction="in"`` it is applied to packets entering the host, so in a gather to one root with loss
        on the root's link exactly a fraction ``loss`` of the datagrams is lost (in expectation). With nftables or
        iptables only IPv4/IPv6 packets are dropped (never ARP); netem drops any frame.
    rate : str or None
        Bandwidth of the link, a ``tc`` rate such as ``"10gbit"`` or ``"200mbit"`` (see :func:`parse_rate`).
        Emulated with ``tbf`` in *both* directions whatever ``direction`` says (a full-duplex link): on the host's
        veth (traffic the host sends) and on the bridge-side veth (traffic the host receives). Packets beyond
        :data:`TBF_LATENCY_SECONDS` of queue are dropped, as on a congested switch port.
    delay : float
        One-way delay in seconds added to each packet (netem only).
    jitter : float
        Random variation of the delay in seconds, ``delay +- jitter`` (netem only). netem sends packets in the order
        of their delayed send time, so jitter reorders packets.
    reorder : float
        Probability that a packet is sent immediately instead of being delayed, which reorders it (netem only;
        requires ``delay > 0``).
    duplicate : float
        Probability that a packet is duplicated (netem only).
    direction : {"in", "out", "both"}
        Which packets ``loss``, ``delay``, ``jitter``, ``reorder`` and ``duplicate`` apply to: ``"in"`` packets
        entering the host (bridge -> host), ``"out"`` packets leaving it (host -> bridge), ``"both"`` each of them
        independently (so a packet between two hosts with ``loss=p`` on both links and ``direction="both"`` crosses
        four lossy hops).

    Raises
    ------
    ValueError
        A value is out of range, or ``reorder > 0`` with ``delay == 0``.
    """

    loss: float = 0.0
    rate: str | None = None
    delay: float = 0.0
    jitter: float = 0.0
    reorder: float = 0.0
    duplicate: float = 0.0
    direction: str = "in"

    def __post_init__(self) -> None:
        _check_probability("loss", self.loss)
        _check_probability("reorder", self.reorder)
        _check_probability("duplicate", self.duplicate)
        _check_seconds("delay", self.delay)
        _check_seconds("jitter", self.jitter)
        if self.rate is not None:
            parse_rate(self.rate)
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.reorder > 0 and self.delay <= 0:
            raise ValueError("reorder needs delay > 0: netem reorders by sending some packets without the delay")

    @property
    def rate_bps(self) -> float | None:
        """The rate in bits per second, or None when unlimited."""
        return None if self.rate is None else parse_rate(self.rate)

    @property
    def directions(self) -> tuple[str, ...]:
        """``("in",)``, ``("out",)`` or ``("in", "out")``."""
        return ("in", "out") if self.direction == "both" else (self.direction,)

    def wanted(self) -> tuple[str, ...]:
        """The impairments this spec asks for (non-zero / non-None), in :data:`IMPAIRMENTS` order."""
        return tuple(name for name in IMPAIRMENTS if getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-friendly dict."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# Running programs


def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in _SBIN_DIRS:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _run(argv: Sequence[str], *, input: str | None = None, check: bool = True, timeout: float = 30.0,
         ) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        if check:
            raise NetemError(f"{shlex.join(argv)}: {exc}") from exc
        return subprocess.CompletedProcess(list(argv), -1, "", str(exc))
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise NetemError(f"command failed (exit {result.returncode}): {shlex.join(argv)}: {detail}")
    return result


def _user_stacklevel() -> int:
    """``stacklevel`` for :func:`warnings.warn` called from this module: the first frame outside it."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    return level


def _tool(name: str) -> str:
    path = _which(name)
    if path is None:
        raise NetemError(f"'{name}' not found (looked on PATH and in {', '.join(_SBIN_DIRS)})")
    return path


def _has_admin_caps() -> bool:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    eff = int(line.split()[1], 16)
                    return bool(eff >> _CAP_NET_ADMIN & 1) and bool(eff >> _CAP_SYS_ADMIN & 1)
    except (OSError, ValueError):
        pass
    return hasattr(os, "geteuid") and os.geteuid() == 0


# ----------------------------------------------------------------------------------------------------------------
# Names, owners, registry

_COUNTER_LOCK = threading.Lock()
_COUNTER = [0]
_NS_RE = re.compile(r"^(?P<cluster>.+?)(?P<role>h\d+|br|pr)$")
_DEFAULT_CLUSTER_RE = re.compile(r"^" + DEFAULT_PREFIX + r"(?P<pid>\d+)c\d+$")
_PREFIX_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,47}$")


def _next_prefix() -> str:
    with _COUNTER_LOCK:
        n = _COUNTER[0]
        _COUNTER[0] += 1
    return f"{DEFAULT_PREFIX}{os.getpid()}c{n}"


def _process_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (to tell a reused pid apart), None if it is not running."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            data = fh.read()
    except OSError:
        return None
    fields = data[data.rfind(")") + 2:].split()
    try:
        if fields[0] == "Z":
            return None
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _owner_alive(pid: int | None, start: int | None) -> bool:
    if not pid:
        return False
    now = _process_start(int(pid))
    return now is not None and (start is None or now == start)


def _registry_path(prefix: str) -> str:
    return os.path.join(REGISTRY_DIR, f"{prefix}.json")


def _read_registry(prefix: str) -> dict[str, Any] | None:
    try:
        with open(_registry_path(prefix), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_registry(prefix: str, data: Mapping[str, Any]) -> None:
    os.makedirs(REGISTRY_DIR, mode=0o755, exist_ok=True)
    tmp = _registry_path(prefix) + f".{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, _registry_path(prefix))


def _remove_registry(prefix: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(_registry_path(prefix))


def _list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except OSError:
        return []


def _cluster_namespaces(prefix: str) -> list[str]:
    """Existing namespaces belonging to the cluster ``prefix`` (``<prefix>h<i>``, ``<prefix>br``, ``<prefix>pr``)."""
    pattern = re.compile(re.escape(prefix) + r"(?:h\d+|br|pr)$")
    return [name for name in _list_netns() if pattern.match(name)]


def _netns_pids(ip: str, name: str) -> list[int]:
    out = _run([ip, "netns", "pids", name], check=False).stdout
    return [int(tok) for tok in out.split() if tok.isdigit()]


def _destroy_namespaces(names: Iterable[str], *, grace: float = 1.0) -> int:
    """Kill every process inside the namespaces ``names`` and delete them; returns how many were deleted.

    Deleting a namespace deletes its veth ends (and so their peers), its bridge, qdiscs and nftables tables.
    """
    names = [n for n in names if os.path.exists(os.path.join(NETNS_DIR, n))]
    if not names:
        return 0
    ip = _which("ip")
    if ip is None:
        return 0
    pids = {pid for name in names for pid in _netns_pids(ip, name) if pid != os.getpid()}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = set()
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
                alive.add(pid)
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while alive and time.monotonic() < deadline:
            alive = {pid for pid in alive if _process_start(pid) is not None}
            if alive:
                time.sleep(0.02)
        pids = alive
        if not pids:
            break
    removed = 0
    for name in names:
        if _run([ip, "netns", "delete", name], check=False).returncode == 0:
            removed += 1
    return removed


def _reaper_main(argv: Sequence[str]) -> None:
    """Entry point of the reaper process: wait for EOF on stdin; unless told "done", destroy the cluster."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    prefix = argv[0]
    data = b""
    while True:
        try:
            chunk = os.read(0, 64)
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            continue
        except OSError:
            break
        if not chunk:
            break
        data += chunk
        if b"done" in data:  # the owner removed the cluster itself (forked children may keep the pipe open)
            return
    _destroy_namespaces(_cluster_namespaces(prefix))
    _remove_registry(prefix)


# ----------------------------------------------------------------------------------------------------------------
# Capability probe

_CAPS: dict[str, Any] | None = None
_CAPS_LOCK = threading.Lock()


def _unavailable(caps: Mapping[str, Any]) -> list[str]:
    missing = []
    if not (caps["netem"] or caps["nft"] or caps["iptables"]):
        missing.append("loss")
    if not (caps["tbf"] or caps["netem"]):
        missing.append("rate")
    if not caps["netem"]:
        missing += ["delay", "jitter", "reorder", "duplicate"]
    return [name for name in IMPAIRMENTS if name in missing]


def _probe() -> dict[str, Any]:
    caps: dict[str, Any] = {
        "netem": False, "nft": False, "iptables": False, "tbf": False,
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
    finally:
        _destroy_namespaces([ns])
    caps["unavailable"] = _unavailable(caps)
    backends = caps["backends"]
    backends["loss"] = "netem" if caps["netem"] else "nft" if caps["nft"] else "iptables" if caps["iptables"] else None
    backends["rate"] = "tbf" if caps["tbf"] else "netem" if caps["netem"] else None
    for name in ("delay", "jitter", "reorder", "duplicate"):
        backends[name] = "netem" if caps["netem"] else None
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
        ``netem``, ``nft``, ``iptables``, ``tbf`` (bool: the backend works here); ``unavailable`` (impairment names
        with no backend, e.g. ``["delay", "jitter", "reorder", "duplicate"]`` without ``sch_netem``);
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


# ----------------------------------------------------------------------------------------------------------------
# Plans: what to configure for one host's link


@dataclass
class _Plan:
    netem: dict[str, list[str]] = field(default_factory=dict)  # direction -> netem arguments
    rate_bps: float | None = None
    rate_backend: str | None = None  # "tbf" or "netem"
    nft_loss: dict[str, float] = field(default_factory=dict)  # direction -> probability
    ipt_loss: float = 0.0  # direction "in" only
    applied: dict[str, str] = field(default_factory=dict)  # impairment -> backend
    unavailable: list[str] = field(default_factory=list)


def _pct(p: float) -> str:
    return f"{p * 100:.6g}%"


def _usec(seconds: float) -> str:
    return f"{round(seconds * 1e6)}us"


def _plan(spec: LinkSpec, caps: Mapping[str, Any]) -> _Plan:
    plan = _Plan()
    dirs = spec.directions
    netem: list[str] = []
    if spec.loss > 0:
        if caps["netem"]:
            netem += ["loss", _pct(spec.loss)]
            plan.applied["loss"] = "netem"
        elif caps["nft"]:
            plan.nft_loss = dict.fromkeys(dirs, spec.loss)
            plan.applied["loss"] = "nft"
        elif caps["iptables"]:
            if "in" in dirs:
                plan.ipt_loss = spec.loss
                plan.applied["loss"] = "iptables"
            if "out" in dirs:
                plan.unavailable.append("loss(out)" if "in" in dirs else "loss")
        else:
            plan.unavailable.append("loss")
    if spec.delay > 0 or spec.jitter > 0:
        if caps["netem"]:
            netem += ["delay", _usec(spec.delay)] + ([_usec(spec.jitter)] if spec.jitter > 0 else [])
    for name in ("delay", "jitter", "reorder", "duplicate"):
        if getattr(spec, name) > 0:
            if caps["netem"]:
                plan.applied[name] = "netem"
            else:
                plan.unavailable.append(name)
    if caps["netem"]:
        if spec.reorder > 0:
            netem += ["reorder", _pct(spec.reorder)]
        if spec.duplicate > 0:
            netem += ["duplicate", _pct(spec.duplicate)]
    if netem:
        plan.netem = {d: list(netem) for d in dirs}
    if spec.rate is not None:
        plan.rate_bps = parse_rate(spec.rate)
        if caps["tbf"]:
            plan.rate_backend = plan.applied["rate"] = "tbf"
        elif caps["netem"]:
            plan.rate_backend = plan.applied["rate"] = "netem"
        else:
            plan.unavailable.append("rate")
    order = {name: k for k, name in enumerate(IMPAIRMENTS)}
    plan.unavailable.sort(key=lambda s: order.get(s.split("(")[0], 99))
    return plan


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


def _nft_table_script(dev: str, loss: float, table: str = _NFT_TABLE) -> str:
    """An nft script replacing table ``netdev <table>`` by one dropping ``loss`` of the IP packets entering ``dev``.

    ``loss == 0`` only removes the table. The ``add``/``delete`` pair makes the delete succeed when the table does not
    exist; the whole script is one atomic transaction.
    """
    lines = [f"add table netdev {table}", f"delete table netdev {table}"]
    if loss > 0:
        threshold = round(loss * _LOSS_SCALE)
        lines += [
            f"table netdev {table} {{",
            f'  chain drop_in {{ type filter hook ingress device "{dev}" priority 0; policy accept;',
            f"    meta protocol {{ ip, ip6 }} numgen random mod {_LOSS_SCALE} < {threshold} counter drop",
            "  }",
            "}",
        ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Process-wide cleanup: atexit, SIGTERM/SIGHUP

_LIVE: dict[int, Cluster] = {}
_LIVE_LOCK = threading.RLock()
_PREV_HANDLERS: dict[int, Any] = {}
_HOOKS_INSTALLED = [False]


def _cleanup_live() -> None:
    """Take down every cluster this process owns (not those inherited by a forked child)."""
    with _LIVE_LOCK:
        clusters = [c for c in _LIVE.values() if c._owner_pid == os.getpid()]
    for cluster in clusters:
        with contextlib.suppress(Exception):
            cluster.down()


def _on_signal(signum: int, frame: Any) -> None:
    _cleanup_live()
    prev = _PREV_HANDLERS.get(signum, signal.SIG_DFL)
    if callable(prev):
        prev(signum, frame)
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_hooks() -> None:
    with _LIVE_LOCK:
        if not _HOOKS_INSTALLED[0]:
            atexit.register(_cleanup_live)
            _HOOKS_INSTALLED[0] = True
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            current = signal.getsignal(sig)
            if current is _on_signal or current is None or current == signal.SIG_IGN:
                continue
            _PREV_HANDLERS[sig] = current
            signal.signal(sig, _on_signal)


# ----------------------------------------------------------------------------------------------------------------
# The cluster


def _hosts_text(hosts: Sequence[int], n_hosts: int) -> str:
    """[0, 1, 2, 5] -> 'hosts 0-2, 5'; every host -> 'every host'."""
    if len(hosts) == n_hosts:
        return "every host"
    runs: list[list[int]] = []
    for h in sorted(hosts):
        if runs and h == runs[-1][1] + 1:
            runs[-1][1] = h
        else:
            runs.append([h, h])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    return ("host " if len(hosts) == 1 else "hosts ") + text


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


#: Offloads switched off on every host's eth0 with ``Cluster(per_packet=True)`` (``ethtool -k`` names).
SEGMENTATION_OFFLOADS = ("tx-tcp-segmentation", "tx-tcp6-segmentation", "tx-tcp-ecn-segmentation",
                         "tx-tcp-mangleid-segmentation", "tx-tcp-accecn-segmentation", "tx-udp-segmentation")


class Cluster:
    """``n_hosts`` emulated hosts (network namespaces) on one bridge, with per-host link impairments.

    Parameters
    ----------
    n_hosts : int
        Number of hosts, 1 to 253. Host ``i`` is the namespace ``hosts[i]`` with address ``ips[i]`` on ``eth0``.
    link : LinkSpec, optional
        Impairments of every host's link (default: none).
    per_host : Mapping[int, LinkSpec], optional
        Impairments of some hosts' links, replacing ``link`` for them.
    mtu : int
        MTU of every veth and of the bridge (1500 by default; e.g. 9000 for jumbo frames).
    strict : bool
        Raise :class:`NetemUnavailableError` instead of warning when an asked-for impairment cannot be emulated.
    prefix : str, optional
        Name prefix of the namespaces (default ``lm<pid>c<n>``, unique per process and cluster). Namespaces are
        ``<prefix>h<i>`` and ``<prefix>br`` (the bridge).
    subnet : str, optional
        The hosts' IPv4 network (default ``10.213.X.0/24``, X derived from the prefix and chosen not to overlap any
        network of the root namespace). It exists only inside the cluster's namespaces.
    reaper : bool
        Start a small watchdog process that removes the cluster if this process dies without cleaning up (SIGKILL).
    per_packet : bool
        Switch the TCP and UDP segmentation offloads off on every host's ``eth0`` (default), so that the loss
        applies to each packet as on a wire. A veth hands a GSO "super-packet" (a TSO burst of TCP, or up to 44
        datagrams of one UDP GSO send, up to 64 KB) through the bridge as one buffer, and a loss rule drops
        buffers: with the offloads on, one draw of ``loss`` drops up to 44 packets at once (a 2 x 80 KB gather
        at 5 % loss delivered 100 %, where per-packet loss gives 89-96 %). Generic segmentation stays on, so
        the stacks still build 64 KB buffers and the sending host cuts them into MTU-sized packets, as a NIC
        doing TSO would. ``False`` keeps the veth defaults (faster, burst-correlated loss).

    Attributes
    ----------
    hosts : list of str
        Namespace names, ``ip netns exec hosts[i] ...`` runs a program on host ``i``.
    ips : list of str
        IPv4 address of each host.
    bridge : str
        Name of the bridge's namespace.
    applied : dict
        Host -> {impairment: backend} of what is actually emulated on its link.
    unavailable : dict
        Host -> list of asked-for impairments that are not emulated on its link.
    offloads : dict
        Host -> {segmentation offload: active} on its ``eth0`` after :meth:`up` (empty with ``per_packet=False``).

    Examples
    --------
    >>> with Cluster(3, link=LinkSpec(loss=0.05, rate="1gbit")) as c:  # doctest: +SKIP
    ...     server = c.popen(0, ["python3", "-m", "http.server", "--bind", c.ips[0]])
    ...     c.run(1, ["curl", f"http://{c.ips[0]}:8000/"], check=True)
    ...     c.set_link(0, LinkSpec(loss=0.2))
    """

    def __init__(self, n_hosts: int, link: LinkSpec | None = None, per_host: Mapping[int, LinkSpec] | None = None,
                 mtu: int = 1500, strict: bool = False, prefix: str | None = None, *, subnet: str | None = None,
                 reaper: bool = True, per_packet: bool = True) -> None:
        if isinstance(n_hosts, bool) or not isinstance(n_hosts, int) or not 1 <= n_hosts <= 253:
            raise ValueError(f"n_hosts must be an integer in [1, 253], got {n_hosts!r}")
        if isinstance(mtu, bool) or not isinstance(mtu, int) or not 68 <= mtu <= 65535:
            raise ValueError(f"mtu must be an integer in [68, 65535], got {mtu!r}")
        link = LinkSpec() if link is None else link
        per_host = dict(per_host or {})
        for spec in (link, *per_host.values()):
            if not isinstance(spec, LinkSpec):
                raise TypeError(f"link specs must be LinkSpec instances, got {type(spec).__name__}")
        bad = [k for k in per_host if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < n_hosts]
        if bad:
            raise ValueError(f"per_host keys must be host indices in [0, {n_hosts}), got {bad}")
        if prefix is None:
            prefix = _next_prefix()
        elif not _PREFIX_RE.match(prefix) or _NS_RE.match(prefix + "h0").group("cluster") != prefix:
            raise ValueError(f"invalid prefix {prefix!r}: use a letter then letters, digits, '_', '.', '-'")
        self.prefix: str = prefix
        self.n_hosts: int = n_hosts
        self.mtu: int = mtu
        self.strict: bool = strict
        self.hosts: list[str] = [f"{prefix}h{i}" for i in range(n_hosts)]
        self.bridge: str = f"{prefix}br"
        net = ipaddress.IPv4Network(subnet) if subnet is not None else _pick_subnet(prefix)
        if net.num_addresses < n_hosts + 2:
            raise ValueError(f"subnet {net} is too small for {n_hosts} hosts")
        self.subnet: str = str(net)
        self.ips: list[str] = [str(net.network_address + i + 1) for i in range(n_hosts)]
        tag = int(net.network_address) >> 8 & 0xFF
        self.macs: list[str] = [f"02:6c:6d:{tag:02x}:{(i + 1) >> 8:02x}:{(i + 1) & 0xFF:02x}" for i in range(n_hosts)]
        self._specs: dict[int, LinkSpec] = {i: per_host.get(i, link) for i in range(n_hosts)}
        self.applied: dict[int, dict[str, str]] = {}
        self.unavailable: dict[int, list[str]] = {}
        self.per_packet: bool = bool(per_packet)
        self.offloads: dict[int, dict[str, bool]] = {}
        self._use_reaper = reaper
        self._reaper: subprocess.Popen[bytes] | None = None
        self._procs: list[subprocess.Popen[Any]] = []
        self._lock = threading.RLock()
        self._started = False  # something may have been created: down() must look
        self._up = False
        self._owned = True
        self._owner_pid = os.getpid()
        self._caps: dict[str, Any] | None = None

    # -- context manager -------------------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def __repr__(self) -> str:
        state = "up" if self._up else "down"
        return f"<Cluster {self.prefix} {self.n_hosts} hosts {self.subnet} mtu={self.mtu} {state}>"

    @property
    def is_up(self) -> bool:
        """Whether the cluster is built."""
        return self._up

    def link(self, host: int) -> LinkSpec:
        """The impairments currently asked for on ``host``'s link."""
        return self._specs[self._index(host)]

    # -- build / tear down -----------------------------------------------------------------------------------

    def capabilities(self) -> dict[str, Any]:
        """What this machine can emulate; see :func:`capabilities`."""
        return capabilities()

    def _check_plans(self, specs: Mapping[int, LinkSpec]) -> dict[int, _Plan]:
        caps = self._caps if self._caps is not None else capabilities()
        plans = {i: _plan(spec, caps) for i, spec in specs.items()}
        missing = {i: p.unavailable for i, p in plans.items() if p.unavailable}
        if missing:
            by_names: dict[tuple[str, ...], list[int]] = {}
            for i, names in sorted(missing.items()):
                by_names.setdefault(tuple(names), []).append(i)
            names = sorted({n for v in missing.values() for n in v}, key=lambda s: (s not in IMPAIRMENTS, s))
            hosts = "; ".join(f"{', '.join(v)} on {_hosts_text(h, self.n_hosts)}" for v, h in by_names.items())
            why = "this kernel has no sch_netem (tc netem)" if not caps["netem"] else "no backend for them here"
            msg = (f"cannot emulate {', '.join(names)} ({hosts}): {why}; available here: "
                   f"{', '.join(n for n in IMPAIRMENTS if n not in caps['unavailable']) or 'nothing'}")
            if self.strict:
                raise NetemUnavailableError(msg)
            warnings.warn(msg + " -- continuing without them", NetemWarning, stacklevel=_user_stacklevel())
        return plans

    def up(self) -> Cluster:
        """Build the namespaces, veths, bridge and impairments. Idempotent.

        Returns
        -------
        Cluster
            ``self``.

        Raises
        ------
        NetemError
            Clusters cannot be built here (see :func:`require_root_reason`), the prefix is in use, or a command
            failed (everything created so far is removed first).
        NetemUnavailableError
            ``strict=True`` and an impairment cannot be emulated; nothing was created.
        """
        with self._lock:
            if self._up:
                return self
            if not self._owned:
                raise NetemError("an attached cluster cannot be rebuilt; build a new Cluster")
            reason = require_root_reason()
            if reason is not None:
                raise NetemError(f"cannot build a network-namespace cluster: {reason}")
            self._caps = capabilities()
            plans = self._check_plans(self._specs)
            existing = _cluster_namespaces(self.prefix)
            if existing:
                raise NetemError(f"namespaces {existing} already exist: prefix {self.prefix!r} is in use "
                                 f"(remove stale ones with `tools/netem cleanup {self.prefix}`)")
            self._owner_pid = os.getpid()
            with _LIVE_LOCK:
                _LIVE[id(self)] = self
                _install_hooks()
            self._started = True
            try:
                self._write_registry()
                self._start_reaper()
                self._build()
                if self.per_packet:
                    self._segment_in_software()
                for i, plan in plans.items():
                    self._apply(i, plan, fresh=True)
            except BaseException:
                self.down()
                raise
            self._up = True
            return self

    def _write_registry(self) -> None:
        data = {
            "prefix": self.prefix, "pid": os.getpid() if self._owned else None,
            "start": _process_start(os.getpid()) if self._owned else None, "detached": not self._owned,
            "hosts": self.hosts, "bridge": self.bridge, "ips": self.ips, "macs": self.macs, "subnet": self.subnet,
            "mtu": self.mtu, "links": {str(i): s.to_dict() for i, s in self._specs.items()},
            "created": time.time(),
        }
        try:
            _write_registry(self.prefix, data)
        except OSError as exc:
            warnings.warn(f"cannot record the cluster in {REGISTRY_DIR}: {exc}", NetemWarning,
                          stacklevel=_user_stacklevel())

    def _start_reaper(self) -> None:
        if not self._use_reaper or self._reaper is not None:
            return
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = ("import sys; sys.path.insert(0, sys.argv[1]); "
                "from lossympi.netem import _reaper_main; _reaper_main(sys.argv[2:])")
        try:
            self._reaper = subprocess.Popen(
                [sys.executable, "-c", code, package_parent, self.prefix], stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        except OSError as exc:
            warnings.warn(f"no reaper process ({exc}): a SIGKILLed owner leaves the cluster behind "
                          "(`tools/netem cleanup --all` removes it)", NetemWarning, stacklevel=_user_stacklevel())

    def _stop_reaper(self) -> None:
        reaper, self._reaper = self._reaper, None
        if reaper is None:
            return
        with contextlib.suppress(OSError, ValueError):
            assert reaper.stdin is not None
            reaper.stdin.write(b"done")
            reaper.stdin.close()
        try:
            reaper.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            reaper.kill()
            reaper.wait()

    def _build(self) -> None:
        ip = _tool("ip")
        br = self.bridge
        _run([ip, "netns", "add", br])
        _run([ip, "-n", br, "link", "add", _BRIDGE_DEV, "mtu", str(self.mtu), "type", "bridge"])
        bridge_batch = [f"link set dev {_BRIDGE_DEV} addrgenmode none", f"link set dev {_BRIDGE_DEV} up"]
        fdb_batch = []
        prefixlen = ipaddress.IPv4Network(self.subnet).prefixlen
        for i, (ns, addr, mac) in enumerate(zip(self.hosts, self.ips, self.macs, strict=True)):
            _run([ip, "netns", "add", ns])
            _run([ip, "-n", ns, "link", "add", _HOST_DEV, "mtu", str(self.mtu), "address", mac, "type", "veth",
                  "peer", "name", f"h{i}", "mtu", str(self.mtu), "netns", br])
            host_batch = [
                f"link set dev {_HOST_DEV} addrgenmode none",  # no IPv6 link-local: no DAD/MLD/RS chatter
                f"addr add {addr}/{prefixlen} dev {_HOST_DEV}",
                f"link set dev {_HOST_DEV} up",
                "link set dev lo up",
            ]
            host_batch += [f"neigh replace {other} lladdr {omac} dev {_HOST_DEV} nud permanent"
                           for j, (other, omac) in enumerate(zip(self.ips, self.macs, strict=True)) if j != i]
            _run([ip, "-n", ns, "-batch", "-"], input="\n".join(host_batch) + "\n")
            bridge_batch += [f"link set dev h{i} addrgenmode none", f"link set dev h{i} master {_BRIDGE_DEV} up"]
            fdb_batch.append(f"fdb replace {mac} dev h{i} master static")
        _run([ip, "-n", br, "-batch", "-"], input="\n".join(bridge_batch) + "\n")
        bridge_tool = _which("bridge")
        if bridge_tool is not None:  # static forwarding entries: no flooding of unicast to hosts that never send
            _run([bridge_tool, "-n", br, "-batch", "-"], input="\n".join(fdb_batch) + "\n", check=False)

    def _segment_in_software(self) -> None:
        """Switch :data:`SEGMENTATION_OFFLOADS` off on every host's ``eth0`` (see ``per_packet``)."""
        from lossympi._ethtool import set_features

        for i, ns in enumerate(self.hosts):
            try:
                now = set_features(_HOST_DEV, dict.fromkeys(SEGMENTATION_OFFLOADS, False), netns=ns)
            except OSError as exc:
                raise NetemError(f"cannot switch the segmentation offloads of host {i}'s {_HOST_DEV} off ({exc}); "
                                 "pass per_packet=False (tools/netem --keep-offloads) to keep them, and with them "
                                 "loss that drops whole 64 KB bursts") from exc
            still = [name for name, on in now.items() if on]
            if still:
                raise NetemError(f"host {i}: segmentation offloads {still} still on after switching them off")
            self.offloads[i] = now

    def _devices(self, host: int) -> dict[str, tuple[str, str]]:
        """direction -> (namespace, device whose egress carries that direction)."""
        return {"out": (self.hosts[host], _HOST_DEV), "in": (self.bridge, f"h{host}")}

    def _apply(self, host: int, plan: _Plan, fresh: bool = False) -> None:
        """Configure ``host``'s link as ``plan`` says, replacing what was there (``fresh``: nothing was)."""
        ip = _tool("ip")
        tc = _which("tc")
        devices = self._devices(host)
        if tc is not None and not fresh:
            for ns, dev in devices.values():
                _run([tc, "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
        nft = _which("nft")
        if nft is not None and (self._caps or {}).get("nft"):
            # "in": ingress of the host's eth0; "out": ingress of the bridge-side veth (after the packet left the
            # host, so the sender never sees an error).
            for direction, ns, dev, table in (("in", self.hosts[host], _HOST_DEV, _NFT_TABLE),
                                              ("out", self.bridge, f"h{host}", f"{_NFT_TABLE}_h{host}")):
                loss = plan.nft_loss.get(direction, 0.0)
                if loss > 0 or not fresh:
                    _run([ip, "netns", "exec", ns, nft, "-f", "-"], input=_nft_table_script(dev, loss, table))
        ipt = _which("iptables")
        if ipt is not None and (self._caps or {}).get("iptables") and (plan.ipt_loss > 0 or not fresh):
            ns = self.hosts[host]
            base = [ip, "netns", "exec", ns, ipt, "-w"]
            if _run([*base, "-F", _IPT_CHAIN], check=False).returncode != 0 and plan.ipt_loss > 0:
                _run([*base, "-N", _IPT_CHAIN])
            if plan.ipt_loss > 0:
                if _run([*base, "-C", "INPUT", "-j", _IPT_CHAIN], check=False).returncode != 0:
                    _run([*base, "-I", "INPUT", "-j", _IPT_CHAIN])
                _run([*base, "-A", _IPT_CHAIN, "-m", "statistic", "--mode", "random", "--probability",
                      f"{plan.ipt_loss:.6g}", "-j", "DROP"])
        if tc is not None:
            for direction, (ns, dev) in devices.items():
                for argv in _qdisc_commands(dev, plan.netem.get(direction), plan.rate_bps, plan.rate_backend,
                                            self.mtu):
                    _run([tc, "-n", ns, *argv])
        self.applied[host] = dict(plan.applied)
        self.unavailable[host] = list(plan.unavailable)

    def set_link(self, host: int, spec: LinkSpec) -> None:
        """Change the impairments of ``host``'s link while the cluster runs (programs keep running).

        Packets queued in the link's old qdiscs are dropped.

        Parameters
        ----------
        host : int
            Host index.
        spec : LinkSpec
            The new impairments (replacing the old ones entirely).

        Raises
        ------
        NetemUnavailableError
            ``strict=True`` and ``spec`` asks for something this machine cannot emulate (nothing was changed).
        NetemError
            The cluster is not up, or a command failed.
        """
        host = self._index(host)
        if not isinstance(spec, LinkSpec):
            raise TypeError(f"spec must be a LinkSpec, got {type(spec).__name__}")
        with self._lock:
            if not self._up:
                raise NetemError("the cluster is not up")
            plan = self._check_plans({host: spec})[host]
            self._specs[host] = spec
            self._apply(host, plan)
            with contextlib.suppress(OSError):
                data = _read_registry(self.prefix)
                if data is not None:
                    data.setdefault("links", {})[str(host)] = spec.to_dict()
                    _write_registry(self.prefix, data)

    def down(self) -> None:
        """Kill the programs started in the cluster and remove its namespaces (with their veths, bridge, qdiscs
        and nftables tables). Idempotent; safe to call from a signal handler or after a failed :meth:`up`."""
        with self._lock:
            if not self._started:
                return
            for proc in self._procs:
                if proc.poll() is None:
                    with contextlib.suppress(OSError):
                        proc.terminate()
            deadline = time.monotonic() + 1.0
            for proc in self._procs:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(OSError):
                        proc.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=5)
            self._procs.clear()
            _destroy_namespaces(self.hosts + [self.bridge] + _cluster_namespaces(self.prefix))
            leftover = _cluster_namespaces(self.prefix)
            if leftover:  # pragma: no cover - only if `ip netns delete` fails
                warnings.warn(f"could not remove namespaces {leftover}", NetemWarning, stacklevel=_user_stacklevel())
            else:
                _remove_registry(self.prefix)
            self._stop_reaper()
            self._up = False
            self._started = False
            with _LIVE_LOCK:
                _LIVE.pop(id(self), None)

    def detach(self) -> None:
        """Leave the cluster up after this process exits (no cleanup at exit, on SIGTERM, or by the reaper).

        ``tools/netem cleanup PREFIX`` (or ``cleanup --all``, which removes clusters whose owner is gone) removes it.
        """
        with self._lock:
            if not self._up:
                raise NetemError("the cluster is not up")
            self._owned = False
            self._stop_reaper()
            with _LIVE_LOCK:
                _LIVE.pop(id(self), None)
            self._write_registry()

    @classmethod
    def attach(cls, prefix: str) -> Cluster:
        """A handle on a running cluster built by another process (e.g. ``tools/netem up --hold``).

        The handle can :meth:`set_link`, :meth:`popen` and :meth:`run`; :meth:`down` removes the cluster. It is not
        cleaned up when this process exits.

        Raises
        ------
        NetemError
            No such running cluster.
        """
        data = _read_registry(prefix)
        if data is None or not _cluster_namespaces(prefix):
            raise NetemError(f"no running cluster with prefix {prefix!r}")
        links = {int(k): LinkSpec(**v) for k, v in data.get("links", {}).items()}
        self = cls(len(data["hosts"]), per_host=links, mtu=int(data["mtu"]), prefix=prefix, subnet=data["subnet"],
                   reaper=False)
        self._owned = False
        self._started = self._up = True
        self._caps = capabilities()
        for i, spec in links.items():
            plan = _plan(spec, self._caps)
            self.applied[i], self.unavailable[i] = plan.applied, plan.unavailable
        return self

    # -- running programs ------------------------------------------------------------------------------------

    def _index(self, host: int) -> int:
        if isinstance(host, bool) or not isinstance(host, int) or not -self.n_hosts <= host < self.n_hosts:
            raise IndexError(f"host must be an index in [0, {self.n_hosts}), got {host!r}")
        return host % self.n_hosts

    def command(self, host: int, argv: Sequence[str]) -> list[str]:
        """The argument list running ``argv`` on ``host`` (``ip netns exec <namespace> argv...``); numbers in
        ``argv`` are converted with :func:`str`."""
        if isinstance(argv, str | bytes):
            raise TypeError("argv must be a sequence of arguments, not a string")
        args = [a if isinstance(a, str | bytes | os.PathLike) else str(a) for a in argv]  # numbers: str()
        return [_tool("ip"), "netns", "exec", self.hosts[self._index(host)], *map(os.fsdecode, args)]

    def popen(self, host: int, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside host ``host``'s namespace; ``kw`` goes to :class:`subprocess.Popen`.

        The environment is passed through (``env=`` replaces it as usual). The process is terminated by
        :meth:`down` if still running.
        """
        with self._lock:
            if not self._up:
                raise NetemError("the cluster is not up")
            proc = subprocess.Popen(self.command(host, argv), **kw)
            self._procs = [p for p in self._procs if p.poll() is None]
            self._procs.append(proc)
            return proc

    def run(self, host: int, argv: Sequence[str], *, input: Any = None, capture_output: bool = False,
            timeout: float | None = None, check: bool = False, **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside host ``host``'s namespace and wait for it, like :func:`subprocess.run`."""
        if input is not None:
            if "stdin" in kw:
                raise ValueError("stdin and input arguments may not both be used")
            kw["stdin"] = subprocess.PIPE
        if capture_output:
            if "stdout" in kw or "stderr" in kw:
                raise ValueError("stdout and stderr arguments may not be used with capture_output")
            kw["stdout"] = kw["stderr"] = subprocess.PIPE
        with self.popen(host, argv, **kw) as proc:
            try:
                out, err = proc.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                proc.kill()
                out, err = proc.communicate()
                raise subprocess.TimeoutExpired(proc.args, exc.timeout, output=out, stderr=err) from None
            except BaseException:
                proc.kill()
                raise
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            result.check_returncode()
        return result

    # -- reporting -------------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly description: prefix, subnet, mtu, ``per_packet``, and per host its namespace, address,
        MAC, asked-for link, applied impairments (impairment -> backend), unavailable ones and the segmentation
        offloads switched off."""
        caps = self._caps if self._caps is not None else capabilities()
        return {
            "prefix": self.prefix, "bridge": self.bridge, "subnet": self.subnet, "mtu": self.mtu, "up": self._up,
            "per_packet": self.per_packet,
            "hosts": [{"index": i, "netns": ns, "ip": addr, "mac": mac, "link": self._specs[i].to_dict(),
                       "applied": self.applied.get(i, {}), "unavailable": self.unavailable.get(i, []),
                       "offloads": self.offloads.get(i, {})}
                      for i, (ns, addr, mac) in enumerate(zip(self.hosts, self.ips, self.macs, strict=True))],
            "capabilities": {k: caps[k] for k in ("netem", "nft", "iptables", "tbf", "unavailable", "backends")},
        }


# ----------------------------------------------------------------------------------------------------------------
# Stale clusters


def list_clusters(prefix: str = DEFAULT_PREFIX) -> list[dict[str, Any]]:
    """Clusters (built by this module) whose prefix starts with ``prefix``, running or stale.

    Returns
    -------
    list of dict
        ``prefix``, ``namespaces`` (existing ones), ``pid`` (owner or None), ``alive`` (owner running),
        ``detached``, ``registered`` (has a registry entry).
    """
    groups: dict[str, list[str]] = {}
    for name in _list_netns():
        m = _NS_RE.match(name)
        if m and m.group("cluster").startswith(prefix):
            groups.setdefault(m.group("cluster"), []).append(name)
    with contextlib.suppress(OSError):
        for entry in os.listdir(REGISTRY_DIR):
            if entry.endswith(".json") and entry.startswith(prefix):
                groups.setdefault(entry[: -len(".json")], [])
    clusters = []
    for cluster, names in sorted(groups.items()):
        data = _read_registry(cluster)
        if data is not None:
            pid, start, detached = data.get("pid"), data.get("start"), bool(data.get("detached"))
        else:
            m = _DEFAULT_CLUSTER_RE.match(cluster)
            if m is None:
                continue  # not created by this module: leave it alone
            pid, start, detached = int(m.group("pid")), None, False
        clusters.append({"prefix": cluster, "namespaces": names, "pid": pid, "detached": detached,
                         "alive": _owner_alive(pid, start), "registered": data is not None})
    return clusters


def destroy(prefix: str) -> int:
    """Remove the cluster ``prefix`` (its namespaces, processes and registry entry), whoever owns it.

    Returns
    -------
    int
        Number of namespaces removed.
    """
    removed = _destroy_namespaces(_cluster_namespaces(prefix))
    if not _cluster_namespaces(prefix):
        _remove_registry(prefix)
    return removed


def cleanup_all(prefix: str = DEFAULT_PREFIX, *, include_live: bool = False) -> int:
    """Remove stale clusters: those whose prefix starts with ``prefix`` and whose owner process is gone.

    A cluster's owner is recorded in ``/run/lossympi-netem/<prefix>.json`` (or, for default prefixes, is the pid in
    ``lm<pid>c<n>``); detached clusters have no owner and are removed too. Namespaces not created by this module
    are never touched. Nothing is ever created in the root namespace, so there is nothing to remove there.

    Parameters
    ----------
    prefix : str
        Only clusters whose prefix starts with this.
    include_live : bool
        Also remove clusters whose owner is still running.

    Returns
    -------
    int
        Number of namespaces removed.
    """
    removed = 0
    for info in list_clusters(prefix):
        if info["alive"] and not include_live:
            continue
        removed += destroy(info["prefix"])
    return removed
