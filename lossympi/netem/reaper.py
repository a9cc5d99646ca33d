"""The reaper: a watchdog process that removes a cluster when its owner dies without cleaning up (SIGKILL).

The owner keeps the write end of the reaper's stdin; EOF without ``done`` means the owner is gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Sequence

from .errors import NetemWarning
from .lines import _kill_recorded
from .namespaces import _cluster_namespaces, _destroy_namespaces
from .programs import _user_stacklevel
from .registry import _read_registry, _remove_registry

__all__: list[str] = []

def main(argv: Sequence[str]) -> None:
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
    _kill_recorded(_read_registry(prefix))  # delay lines keep their namespace alive even once it is deleted
    _destroy_namespaces(_cluster_namespaces(prefix))
    _remove_registry(prefix)


def start(prefix: str) -> subprocess.Popen[bytes] | None:
    """Start the reaper of the cluster ``prefix``; None (with a :class:`NetemWarning`) if it cannot be started."""
    lossympi_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from lossympi.netem.reaper import main; main(sys.argv[2:])")
    try:
        return subprocess.Popen(
            [sys.executable, "-c", code, lossympi_parent, prefix], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    except OSError as exc:
        warnings.warn(f"no reaper process ({exc}): a SIGKILLed owner leaves the cluster behind "
                      "(`tools/netem cleanup --all` removes it)", NetemWarning, stacklevel=_user_stacklevel())
        return None


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    """Tell the reaper ``proc`` that its owner removed the cluster itself, and wait for it to exit."""
    if proc is None:
        return
    with contextlib.suppress(OSError, ValueError):
        assert proc.stdin is not None
        proc.stdin.write(b"done")
        proc.stdin.close()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover
        proc.kill()
        proc.wait()
