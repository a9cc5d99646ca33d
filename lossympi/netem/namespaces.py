"""Network namespaces of a cluster: listing them, and removing them with every process inside."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Iterable

from .programs import _run, _which
from .registry import _process_start

__all__ = ["NETNS_DIR"]

NETNS_DIR = "/run/netns"


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
