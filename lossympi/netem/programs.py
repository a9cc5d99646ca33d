"""Running the system programs netem drives (``ip``, ``tc``, ``nft``, ``iptables``, ``bridge``) and the root check."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence

from .errors import NetemError

__all__: list[str] = []

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin", "/bin")
_CAP_NET_ADMIN = 12
_CAP_SYS_ADMIN = 21


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
    """``stacklevel`` for :func:`warnings.warn` called from this package: the first frame outside it."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.dirname(frame.f_code.co_filename) == _PACKAGE_DIR:
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
