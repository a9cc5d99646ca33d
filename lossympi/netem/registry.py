"""Names and owners of clusters: namespace prefixes, owner processes, and the on-disk registry.

Every cluster is recorded in ``REGISTRY_DIR/<prefix>.json`` (owner pid and start time, hosts, links), so that
another process (``tools/netem``, :func:`lossympi.netem.cleanup_all`) can attach to it or tell it is stale.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from collections.abc import Mapping
from typing import Any

__all__ = ["DEFAULT_PREFIX", "REGISTRY_DIR"]

DEFAULT_PREFIX = "lm"
REGISTRY_DIR = "/run/lossympi-netem"
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
