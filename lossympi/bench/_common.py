"""Helpers shared by the benchmarks: host description, statistics, tables, progress messages."""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "CpuMeter",
    "command_line",
    "fmt",
    "free_port",
    "host_info",
    "log",
    "median",
    "parse_rates",
    "set_quiet",
    "table",
]

_QUIET = False


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = bool(quiet)


def log(msg: str) -> None:
    """Progress message on stderr (stdout stays clean for ``--json``)."""
    if not _QUIET:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


def command_line(argv: Sequence[str]) -> str:
    """The shell command that reproduces a run of ``python -m lossympi.bench`` with ``argv``."""
    return " ".join(["python", "-m", "lossympi.bench", *(shlex.quote(a) for a in argv)])


def median(values: Iterable[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return statistics.median(vals) if vals else None


def parse_rates(text: str) -> list[float]:
    """``"2,4,8"`` -> ``[2.0, 4.0, 8.0]`` (Gbit/s); ``""`` or ``"none"`` -> ``[]``."""
    text = text.strip().lower()
    if text in ("", "none", "off"):
        return []
    try:
        rates = [float(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        msg = f"rates must be a comma-separated list of Gbit/s, e.g. '2,4,8'; got {text!r}"
        raise ValueError(msg) from exc
    if any(r <= 0 for r in rates):
        raise ValueError(f"rates must be positive Gbit/s, got {text!r}")
    return rates


def free_port() -> int:
    """A TCP and UDP port that is free on 127.0.0.1 right now (small race, fine for benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    return port


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def _cpu_model() -> str | None:
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or None


def host_info() -> dict[str, Any]:
    """Where the benchmark ran: CPUs, kernel, Python, socket buffer limits, iperf3 version."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - Linux has it
        usable = os.cpu_count()
    iperf3 = shutil.which("iperf3")
    iperf3_version = None
    if iperf3:
        try:
            out = subprocess.run([iperf3, "--version"], capture_output=True, text=True, timeout=5).stdout
            iperf3_version = out.splitlines()[0].strip() if out else None
        except (OSError, subprocess.SubprocessError):
            iperf3_version = None
    rmem = _read("/proc/sys/net/core/rmem_max")
    wmem = _read("/proc/sys/net/core/wmem_max")
    return {
        "nproc": usable,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "system": platform.system(),
        "machine": platform.machine(),
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "root": hasattr(os, "geteuid") and os.geteuid() == 0,
        "rmem_max": int(rmem) if rmem and rmem.isdigit() else None,
        "wmem_max": int(wmem) if wmem and wmem.isdigit() else None,
        "iperf3": iperf3_version,
    }


class CpuMeter:
    """How much CPU other processes used while a benchmark ran (they skew its numbers).

    ``foreign`` = (user + nice + system time of the whole machine, from ``/proc/stat``) minus the CPU time of
    this process and of its waited-for children (``os.times``), as a fraction of ``elapsed × nproc``.
    Interrupt and softirq time are left out of both sides: the kernel does not charge it to a task.
    """

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float, float]:
        t = os.times()
        busy = steal = 0.0
        text = _read("/proc/stat")
        if text:
            f = [float(x) for x in text.splitlines()[0].split()[1:]]
            busy = (f[0] + f[1] + f[2]) / self.hz  # user, nice, system
            steal = (f[7] if len(f) > 7 else 0.0) / self.hz
        ours = t.user + t.system + t.children_user + t.children_system
        return t.elapsed, busy, steal, ours

    def stop(self) -> dict[str, float | None]:
        e1, b1, s1, o1 = self._sample()
        e0, b0, s0, o0 = self._start
        wall = max(e1 - e0, 1e-9)
        if b1 == 0.0:
            return {"foreign_cpu_fraction": None, "steal_fraction": None,
                    "own_cpu_seconds": round(o1 - o0, 2)}
        return {
            "foreign_cpu_fraction": round(max(0.0, (b1 - b0) - (o1 - o0)) / (wall * self.ncpu), 4),
            "steal_fraction": round((s1 - s0) / (wall * self.ncpu), 4),
            "own_cpu_seconds": round(o1 - o0, 2),
        }


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: floats rounded, None as a dash, bools as yes/no."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with aligned columns."""
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if n and _numeric(c) else c.ljust(w) for c, w in zip(row, widths,
                                                                                              strict=True)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _numeric(cell: str) -> bool:
    try:
        float(cell.rstrip("%x"))
    except ValueError:
        return False
    return True
