"""Clusters left behind: listing them (:func:`list_clusters`), removing them (:func:`destroy`, :func:`cleanup_all`)."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from .lines import _kill_recorded
from .namespaces import _cluster_namespaces, _destroy_namespaces, _list_netns
from .registry import (
    _DEFAULT_CLUSTER_RE,
    _NS_RE,
    DEFAULT_PREFIX,
    REGISTRY_DIR,
    _owner_alive,
    _read_registry,
    _remove_registry,
)

__all__ = ["cleanup_all", "destroy", "list_clusters"]

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
    """Remove the cluster ``prefix`` (its namespaces, processes, delay lines and registry entry), whoever owns it.

    Returns
    -------
    int
        Number of namespaces removed.
    """
    _kill_recorded(_read_registry(prefix))  # delay lines keep their namespace alive even once it is deleted
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
