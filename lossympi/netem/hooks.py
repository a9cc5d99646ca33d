"""Process-wide cleanup: the clusters this process owns are taken down at exit and on SIGTERM/SIGHUP."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cluster import Cluster

__all__: list[str] = []

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
