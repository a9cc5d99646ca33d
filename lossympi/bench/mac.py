"""``python -m lossympi.bench mac``: how fast this machine computes the datagram MAC, per implementation.

Every datagram is authenticated on both ends, so the MAC's speed bounds lossympi's authenticated throughput per
core (docs/benchmarks.md). This times the core's own code (:func:`lossympi.wire.mac_seconds`, a loop without the
GIL over one datagram, each MAC folded into the next datagram) for each implementation:

- ``clmul``: protocol version 2's MAC, ``AES-128(K2, GHASH_H(m))``, on PCLMULQDQ + AES-NI (what the core uses where
  the CPU has them);
- ``portable``: the same MAC in portable C (the core's fallback);
- ``blake2b``: protocol version 1's keyed BLAKE2b-128 in scalar C from a prepared key state, for comparison.

Reported: the median over ``--repeats`` timings of ``--seconds`` each, in GB/s of authenticated bytes and
nanoseconds per datagram.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from lossympi import wire
from lossympi.bench.common import CpuMeter, host_info, log, table

HELP = "MAC speed per implementation (GB/s of authenticated bytes, ns per datagram)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bytes", type=int, default=wire.DEFAULT_DATAGRAM_BYTES - wire.MAC_SIZE,
                   help="bytes authenticated per datagram (header + payload; the default datagram's)")
    p.add_argument("--seconds", type=float, default=0.5, help="length of one timing")
    p.add_argument("--repeats", type=int, default=5, help="timings per implementation (the median is reported)")


def check_arguments(args: argparse.Namespace) -> None:
    if not wire.HEADER_SIZE <= args.bytes <= wire.MAX_DATAGRAM_BYTES:
        raise ValueError(f"--bytes must be {wire.HEADER_SIZE}..{wire.MAX_DATAGRAM_BYTES}")
    if args.seconds <= 0 or args.repeats < 1:
        raise ValueError("--seconds must be > 0 and --repeats >= 1")


def _time(impl: str, nbytes: int, seconds: float, repeats: int) -> list[float]:
    """``repeats`` timings of ``impl``, each about ``seconds`` long: seconds per MAC."""
    reps = 1000
    while (t := wire.mac_seconds(nbytes, reps, impl)) < seconds / 10:  # calibrate
        reps *= 4
    reps = max(1, int(reps * seconds / t))
    return [wire.mac_seconds(nbytes, reps, impl) / reps for _ in range(repeats)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    meter = CpuMeter()
    impls = [i for i in wire.MAC_IMPLS if i != "clmul" or wire.HAVE_CLMUL]
    results: dict[str, dict[str, Any]] = {}
    for impl in impls:
        per_mac = _time(impl, args.bytes, args.seconds, args.repeats)
        med = statistics.median(per_mac)
        results[impl] = {"gbytes_per_s": round(args.bytes / med / 1e9, 3), "ns_per_datagram": round(med * 1e9, 1),
                         "ns_per_datagram_all": [round(x * 1e9, 1) for x in per_mac]}
        log(f"{impl}: {results[impl]['gbytes_per_s']} GB/s")
    return {"benchmark": "mac", "bytes": args.bytes, "seconds": args.seconds, "repeats": args.repeats,
            "core_uses": "clmul" if wire.HAVE_CLMUL else "portable", "results": results,
            "host": host_info(), "contention": meter.stop()}


def render(res: dict[str, Any]) -> str:
    rows = [[impl, r["gbytes_per_s"], r["ns_per_datagram"], "yes" if impl == res["core_uses"] else ""]
            for impl, r in res["results"].items()]
    head = f"MAC of one {res['bytes']}-byte datagram, median of {res['repeats']} timings of {res['seconds']} s"
    return head + "\n" + table(["implementation", "GB/s", "ns/datagram", "used by the core"], rows)
