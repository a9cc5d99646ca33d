"""Helpers shared by the benchmarks: the command line, host description, statistics, tables, progress messages."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
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
    "run_cli",
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


def command_line(argv: Sequence[str], package: str = "lossympi.bench") -> str:
    """The shell command that reproduces a run of ``python -m <package>`` with ``argv``."""
    return " ".join(["python", "-m", package, *(shlex.quote(a) for a in argv)])


def run_cli(package: str, description: str, subcommands: Mapping[str, str], argv: Sequence[str] | None = None) -> int:
    """The ``python -m <package>`` command of a benchmark package (``lossympi.bench``, ``aggregathor.bench``).

    Each subcommand is a module (``subcommands``: name -> module, imported to build the parser) that defines
    ``HELP`` (one line), ``add_arguments(parser)``, optionally ``check_arguments(args)`` (raises ``ValueError``:
    reported as a usage error, status 2, before anything runs), ``run(args) -> dict`` (JSON-serialisable) and
    ``render(result) -> str`` (the table printed without ``--json``). ``--json`` and ``--quiet`` are added to
    every one. The result gets ``command`` (the shell command that reproduces it) and ``argv``.

    Returns the exit status: 0, or 1 when the result lists ``failed`` measurements (printed anyway) or stdout
    was closed early.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=f"python -m {package}", description=description)
    sub = parser.add_subparsers(dest="bench", required=True, metavar="SUBCOMMAND")
    parsers: dict[str, argparse.ArgumentParser] = {}
    modules = {name: importlib.import_module(module) for name, module in subcommands.items()}
    for name, mod in modules.items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        mod.add_arguments(p)
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a table")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
        parsers[name] = p
    args = parser.parse_args(argv)
    set_quiet(args.quiet)
    mod = modules[args.bench]
    check = getattr(mod, "check_arguments", None)
    if check is not None:
        try:
            check(args)
        except ValueError as exc:
            parsers[args.bench].error(str(exc))  # exits with status 2
    result = mod.run(args)
    result["command"] = command_line(argv, package)
    result["argv"] = argv
    text = json.dumps(result, indent=2) if args.json else mod.render(result)
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into `head`
        return 1
    return 1 if result.get("failed") else 0


async def last_arrival(ep: Any, task: Any, t0: float, poll: float = 0.002) -> float:
    """Wait for ``task`` (a receive or collective on endpoint ``ep``); return when ``ep`` last accepted a datagram
    (``time.monotonic()``, polled every ``poll`` seconds; ``t0`` if none came): the end of the data when a lossy
    receive runs on to its deadline."""
    last_t, last_n = t0, ep.accepted
    while not task.done():
        await asyncio.wait({task}, timeout=poll)
        n = ep.accepted
        if n != last_n:
            last_t, last_n = time.monotonic(), n
    return last_t


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
