"""The delay-line processes of a cluster: one per host whose link has a :class:`~.delayline.LineParams`.

Each runs :func:`lossympi.netem.delayline.main` inside the host's namespace; once it has bound the queue, an
``iptables-legacy -I INPUT -i eth0 -j NFQUEUE`` rule sends the host's incoming packets to it. The processes are
recorded in the cluster's registry entry (``delay_lines``: host -> pid and start time), so that the reaper and
:func:`lossympi.netem.destroy` stop them even when their namespace is already gone (a process keeps its namespace
alive after ``ip netns delete``).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from .commands import _HOST_DEV
from .delayline import PROC_QUEUES, LineParams, parse_queue_stats
from .errors import NetemError
from .programs import _run, _tool
from .registry import _owner_alive, _process_start, _read_registry, _write_registry

__all__: list[str] = []

READY_TIMEOUT = 15.0
"""Seconds a delay line may take to start and bind its queue."""
_LOSSYMPI_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_MAIN = ("import sys; sys.path.insert(0, sys.argv[1]); "
         "from lossympi.netem.delayline import main; sys.exit(main(sys.argv[2:]))")


def _queue_args(queues: int) -> list[str]:
    return ["--queue-num", "0"] if queues == 1 else ["--queue-balance", f"0:{queues - 1}"]


def _rule(iptables: str, action: str, queues: int) -> list[str]:
    """``iptables`` arguments adding (``-I``) or deleting (``-D``) the rule sending ``eth0``'s input to the line."""
    return [iptables, "-w", action, "INPUT", "-i", _HOST_DEV, "-j", "NFQUEUE", *_queue_args(queues)]


def _delete_rules(ip: str, ns: str, iptables: str) -> None:
    """Delete every NFQUEUE rule of the INPUT chain in ``ns`` (whatever its queue numbers)."""
    listing = _run([ip, "netns", "exec", ns, iptables, "-w", "-S", "INPUT"], check=False).stdout
    for row in listing.splitlines():
        words = row.split()
        if words[:2] == ["-A", "INPUT"] and "NFQUEUE" in words:
            _run([ip, "netns", "exec", ns, iptables, "-w", "-D", *words[1:]], check=False)


def _line_command(ip: str, ns: str, line: LineParams, tag: str) -> list[str]:
    return [ip, "netns", "exec", ns, sys.executable, "-c", _MAIN, _LOSSYMPI_PARENT, *line.argv(), "--tag", tag]


def _terminate(pid: int, start: int | None, grace: float = 2.0) -> None:
    """SIGTERM ``pid`` (if it is still the process started at ``start``), then SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not _owner_alive(pid, start):
            return
        with contextlib.suppress(OSError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while _owner_alive(pid, start) and time.monotonic() < deadline:
            time.sleep(0.01)


def _kill_recorded(data: Mapping[str, Any] | None) -> int:
    """Stop the delay lines recorded in a cluster's registry entry ``data``; how many were running."""
    stopped = 0
    for entry in ((data or {}).get("delay_lines") or {}).values():
        pid, start = entry.get("pid"), entry.get("start")
        if pid and _owner_alive(pid, start):
            _terminate(int(pid), start)
            stopped += 1
    return stopped


def _wait_ready(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The first line the delay line prints (``ready`` or ``error: ...``), or why none came."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    out = b""
    while b"\n" not in out:
        left = deadline - time.monotonic()
        if left <= 0:
            return f"no answer within {timeout:.0f} s"
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                return f"exited with code {proc.wait()}"
            out += chunk
    return out.split(b"\n", 1)[0].decode(errors="replace").strip()


def _forward(stream: Any) -> None:
    """Copy a delay line's stderr (saturation warnings, its summary) to this process's stderr until EOF.

    A pipe, not the inherited stderr: a detached cluster's lines must not hold the caller's stderr open."""
    with contextlib.suppress(OSError, ValueError):
        for raw in iter(stream.readline, b""):
            sys.stderr.write(raw.decode(errors="replace"))
            sys.stderr.flush()


class _DelayLines:
    """The delay lines of one cluster (``prefix``), keyed by host index."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._forwarders: dict[int, threading.Thread] = {}

    def pids(self) -> set[int]:
        """Process ids of the delay lines this handle started and that still run."""
        return {p.pid for p in self._procs.values() if p.poll() is None}

    def _record(self, host: int, proc: subprocess.Popen[bytes] | None) -> None:
        with contextlib.suppress(OSError):
            data = _read_registry(self.prefix)
            if data is None:
                return
            lines = data.setdefault("delay_lines", {})
            if proc is None:
                lines.pop(str(host), None)
            else:
                lines[str(host)] = {"pid": proc.pid, "start": _process_start(proc.pid)}
            _write_registry(self.prefix, data)

    def start(self, host: int, ns: str, line: LineParams, caps: Mapping[str, Any]) -> None:
        """Start host ``host``'s delay line in namespace ``ns`` and send the host's input to it.

        Raises
        ------
        NetemError
            The line did not come up (its error is in the message), or the iptables rule failed.
        """
        iptables = caps.get("nfqueue_iptables")
        if not iptables:
            raise NetemError("no iptables that can feed a netfilter queue (apt-get install iptables)")
        ip = _tool("ip")
        proc = subprocess.Popen(_line_command(ip, ns, line, f"{ns}"), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                close_fds=True)
        self._procs[host] = proc
        self._forwarders[host] = threading.Thread(target=_forward, args=(proc.stderr,), daemon=True)
        self._forwarders[host].start()
        self._record(host, proc)
        answer = _wait_ready(proc, READY_TIMEOUT)
        if answer != "ready":
            raise NetemError(f"the delay line of host {host} ({ns}) did not start: {answer}")
        _run([ip, "netns", "exec", ns, *_rule(iptables, "-I", line.queues)])

    def stop(self, host: int, ns: str, caps: Mapping[str, Any]) -> None:
        """Remove host ``host``'s rules and stop its delay line (started here, or recorded by another process)."""
        iptables = caps.get("nfqueue_iptables")
        if iptables:
            _delete_rules(_tool("ip"), ns, iptables)
        proc = self._procs.pop(host, None)
        if proc is not None:
            self._end(host, proc)
        else:
            entry = ((_read_registry(self.prefix) or {}).get("delay_lines") or {}).get(str(host))
            if entry:
                _kill_recorded({"delay_lines": {str(host): entry}})
        self._record(host, None)

    def stop_all(self) -> None:
        """Stop every delay line this handle started (their namespaces are about to go: no rule to remove)."""
        for host in list(self._procs):
            self._end(host, self._procs.pop(host))

    def _end(self, host: int, proc: subprocess.Popen[bytes]) -> None:
        """Stop ``proc`` (host ``host``'s line), let its last words through, close its pipes."""
        _terminate(proc.pid, None)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        forwarder = self._forwarders.pop(host, None)
        if forwarder is not None:
            forwarder.join(timeout=2)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def queue_stats(ns: str) -> dict[str, int]:
    """Kernel counters of the netfilter queues in namespace ``ns``, summed over queues: ``queue_total`` (held
    now), ``queue_dropped`` (queue full), ``user_dropped`` (the line's socket overflowed), ``id_sequence``
    (packets queued so far); empty when no queue is bound there."""
    out = _run([_tool("ip"), "netns", "exec", ns, "cat", PROC_QUEUES], check=False).stdout
    totals: dict[str, int] = {}
    for row in parse_queue_stats(out).values():
        for key, value in row.items():
            totals[key] = totals.get(key, 0) + value
    return totals
