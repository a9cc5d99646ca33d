"""The :class:`Cluster`: emulated hosts (network namespaces) on one bridge, with per-host link impairments."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from . import reaper as reaper_process
from .caps import capabilities, require_root_reason
from .commands import _BRIDGE_DEV, _HOST_DEV
from .errors import NetemError, NetemUnavailableError, NetemWarning
from .hooks import _LIVE, _LIVE_LOCK, _install_hooks
from .lines import _DelayLines, queue_stats
from .links import configure_link
from .namespaces import _cluster_namespaces, _destroy_namespaces
from .plan import _Plan, _plan
from .programs import _run, _tool, _user_stacklevel, _which
from .registry import (
    _NS_RE,
    _PREFIX_RE,
    REGISTRY_DIR,
    _next_prefix,
    _process_start,
    _read_registry,
    _remove_registry,
    _write_registry,
)
from .spec import IMPAIRMENTS, LinkSpec
from .subnet import _pick_subnet

__all__ = ["RECEIVE_OFFLOAD", "SEGMENTATION_OFFLOADS", "Cluster"]

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


#: Offloads switched off on every host's eth0 with ``Cluster(per_packet=True)`` (``ethtool -k`` names).
SEGMENTATION_OFFLOADS = ("tx-tcp-segmentation", "tx-tcp6-segmentation", "tx-tcp-ecn-segmentation",
                         "tx-tcp-mangleid-segmentation", "tx-tcp-accecn-segmentation", "tx-udp-segmentation")
#: Switched on with ``per_packet=True`` on every host's eth0 whose loss acts before it: the host merges what it
#: receives after the loss point, as a NIC does after the wire (UDP_GRO sockets then read 64 KB at a time).
RECEIVE_OFFLOAD = "rx-gro"


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
        doing TSO would. The loss rules drop on the bridge side of each veth, and each host's ``eth0`` does GRO
        (:data:`RECEIVE_OFFLOAD`) after them, as a NIC does after the wire, unless something per packet must act
        after it (iptables loss, a delay line that drops, jitters or reorders at the host's INPUT).
        ``False`` keeps the veth defaults (faster, burst-correlated loss).

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
        Host -> {segmentation offload, and ``rx-gro``: active} on its ``eth0`` after :meth:`up` (empty with
        ``per_packet=False``).

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
        self._lines = _DelayLines(prefix)

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
            "delay_lines": ((_read_registry(self.prefix) or {}).get("delay_lines") or {}),  # kept (lines.py)
        }
        try:
            _write_registry(self.prefix, data)
        except OSError as exc:
            warnings.warn(f"cannot record the cluster in {REGISTRY_DIR}: {exc}", NetemWarning,
                          stacklevel=_user_stacklevel())

    def _start_reaper(self) -> None:
        if self._use_reaper and self._reaper is None:
            self._reaper = reaper_process.start(self.prefix)

    def _stop_reaper(self) -> None:
        proc, self._reaper = self._reaper, None
        reaper_process.stop(proc)

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

    def _receive_offload(self, host: int, gro: bool) -> None:
        """GRO on host ``host``'s ``eth0`` where every per-packet impairment acts before it (see ``per_packet``);
        recorded as ``offloads[host]["rx-gro"]``. A veth merges only what its peer could not have segmented itself:
        the bridge-side ``h<host>`` gets the TCP segmentation offloads off too (it forwards single packets anyway)."""
        from lossympi._ethtool import set_features

        try:
            set_features(f"h{host}", dict.fromkeys(SEGMENTATION_OFFLOADS, False), netns=self.bridge)
            now = set_features(_HOST_DEV, {RECEIVE_OFFLOAD: gro}, netns=self.hosts[host])
        except OSError as exc:
            if gro:  # a host without GRO still works, only slower to receive
                warnings.warn(f"cannot switch GRO on for host {host}'s {_HOST_DEV}: {exc}", NetemWarning,
                              stacklevel=_user_stacklevel())
                return
            raise NetemError(f"cannot switch GRO off on host {host}'s {_HOST_DEV} ({exc}): its loss would drop "
                             "whole 64 KB buffers") from exc
        self.offloads.setdefault(host, {})[RECEIVE_OFFLOAD] = now.get(RECEIVE_OFFLOAD, False)

    def _apply(self, host: int, plan: _Plan, fresh: bool = False) -> None:
        """Configure ``host``'s link as ``plan`` says, replacing what was there (``fresh``: nothing was)."""
        gro = configure_link(self.hosts[host], self.bridge, host, plan, self.mtu, self._caps or {}, fresh=fresh)
        if self.per_packet:
            self._receive_offload(host, gro)
        if not fresh:  # the NFQUEUE delay line (lossympi.netem.lines): replaced, not reconfigured
            self._lines.stop(host, self.hosts[host], self._caps or {})
        if plan.line is not None:
            self._lines.start(host, self.hosts[host], plan.line, self._caps or {})
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
            self._lines.stop_all()
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

    def delay_line_pids(self) -> set[int]:
        """Process ids of this cluster's running delay lines (they live in the hosts' namespaces: leave them be)."""
        return self._lines.pids()

    def delay_line_stats(self) -> dict[int, dict[str, int]]:
        """Host -> the kernel's counters of its delay line's queues (see :func:`lossympi.netem.lines.queue_stats`):
        ``queue_dropped`` and ``user_dropped`` grow when the line saturates; ``id_sequence`` counts the packets."""
        return {i: queue_stats(self.hosts[i]) for i in range(self.n_hosts)
                if "nfqueue" in self.applied.get(i, {}).values()}

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
