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

One module per job: :mod:`.spec` (:class:`LinkSpec`, :func:`parse_rate`), :mod:`.caps` (the probe,
:func:`capabilities`), :mod:`.plan` (impairment -> backend and arguments), :mod:`.commands` (``tc``/``nft``
command builders), :mod:`.links` (configuring one link), :mod:`.cluster` (:class:`Cluster`), :mod:`.registry`
(names, owners, the on-disk registry), :mod:`.namespaces` (listing and removing namespaces), :mod:`.reaper`
(the watchdog process), :mod:`.hooks` (cleanup at exit and on signals), :mod:`.subnet`, :mod:`.stale`
(:func:`list_clusters`, :func:`destroy`, :func:`cleanup_all`), :mod:`.programs`, :mod:`.errors`.

This package uses only the standard library and the ``ip``, ``tc``, ``bridge``, ``nft`` / ``iptables`` programs;
it needs root (``CAP_NET_ADMIN`` and ``CAP_SYS_ADMIN``). See ``docs/netem.md``.
"""

from __future__ import annotations

from .caps import capabilities, require_root_reason
from .cluster import SEGMENTATION_OFFLOADS, Cluster
from .commands import NETEM_LIMIT, TBF_BURST_SECONDS, TBF_LATENCY_SECONDS
from .errors import NetemError, NetemUnavailableError, NetemWarning
from .namespaces import NETNS_DIR
from .registry import DEFAULT_PREFIX, REGISTRY_DIR
from .spec import DIRECTIONS, IMPAIRMENTS, LinkSpec, parse_rate
from .stale import cleanup_all, destroy, list_clusters
from .subnet import SUBNET_BASE

__all__ = [
    "DEFAULT_PREFIX",
    "DIRECTIONS",
    "IMPAIRMENTS",
    "NETEM_LIMIT",
    "NETNS_DIR",
    "REGISTRY_DIR",
    "SEGMENTATION_OFFLOADS",
    "SUBNET_BASE",
    "TBF_BURST_SECONDS",
    "TBF_LATENCY_SECONDS",
    "Cluster",
    "LinkSpec",
    "NetemError",
    "NetemUnavailableError",
    "NetemWarning",
    "capabilities",
    "cleanup_all",
    "destroy",
    "list_clusters",
    "parse_rate",
    "require_root_reason",
]
