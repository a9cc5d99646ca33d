"""``python -m lossympi`` / ``lossympi``: selftest, info and benchmarks."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from typing import Any

import numpy as np


def _selftest(args: argparse.Namespace) -> int:
    from lossympi.endpoint import Endpoint
    from lossympi.faults import FaultInjector, FaultSpec

    faults = FaultInjector(FaultSpec(drop=args.loss), seed=args.seed)
    sender, receiver = Endpoint.local(2, fill=args.fill)
    try:
        x = np.random.default_rng(args.seed).standard_normal(args.elements).astype(np.float32)
        out = np.empty_like(x)
        sender.faults = faults

        async def go() -> Any:
            fut = receiver.irecv(0, out, timeout=args.timeout)
            sent = await sender.send(1, x)
            return sent, await fut

        t0 = time.perf_counter()
        sent, res = _run_pair(go)
        wall = time.perf_counter() - t0
        injected = sent.injected_drops
        mask_ok = injected is not None and np.array_equal(res.chunk_mask, ~injected)
        emask = res.element_mask()
        exact_ok = bool(np.array_equal(out[emask], x[emask]))
        report = {
            "elements": int(x.size),
            "dtype": "float32",
            "chunks": int(res.chunk_mask.size),
            "chunks_lost": res.lost_chunks,
            "chunks_dropped_by_injector": int(injected.sum()) if injected is not None else 0,
            "mask_matches_injector": bool(mask_ok),
            "received_values_exact": exact_ok,
            "delivered_fraction": round(res.delivered, 6),
            "fill": args.fill,
            "elapsed_s": round(res.elapsed, 4),
            "wall_s": round(wall, 4),
            "auth": receiver.auth,
            "gso": sender.gso,
            "gro": receiver.gro,
            "rejected": receiver.stats()["rejected"],
        }
    finally:
        sender.close()
        receiver.close()
    if args.json:
        print(json.dumps(report))
    else:
        print(f"lossympi selftest: sent {report['elements']:,} float32 over loopback UDP "
              f"({report['chunks']:,} datagrams) with {args.loss:.0%} injected loss")
        print(f"  lost {report['chunks_lost']:,} chunks; the injector dropped "
              f"{report['chunks_dropped_by_injector']:,}; masks agree: {report['mask_matches_injector']}")
        print(f"  delivered fraction {report['delivered_fraction']:.4f}; received values bit-exact: {exact_ok}; "
              f"missing chunks filled with '{args.fill}'")
        print(f"  receive took {report['elapsed_s'] * 1e3:.1f} ms (auth={report['auth']}, gso={report['gso']}, "
              f"gro={report['gro']})")
    ok = mask_ok and exact_ok
    print("selftest: OK" if ok else "selftest: FAILED", file=sys.stderr)
    return 0 if ok else 1


def _run_pair(go: Any) -> Any:
    from lossympi.endpoint import new_event_loop

    loop = new_event_loop()
    try:
        return loop.run_until_complete(go())
    finally:
        loop.close()


def _netem_available() -> bool:
    try:
        with open("/proc/modules") as fh:
            if any(line.startswith("sch_netem ") for line in fh):
                return True
    except OSError:
        pass
    release = platform.release()
    for root in (f"/lib/modules/{release}", f"/usr/lib/modules/{release}"):
        if os.path.isdir(root):
            for _dirpath, _dirs, files in os.walk(root):
                if any(f.startswith("sch_netem.ko") for f in files):
                    return True
    return False


def _info(args: argparse.Namespace) -> int:
    import socket

    from lossympi import _core
    from lossympi.endpoint import socket_capabilities

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        caps = socket_capabilities(s)
    finally:
        s.close()
    info = {
        "lossympi": _core.__version__,
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "root": os.geteuid() == 0,
        "udp_gso": caps["gso"],
        "udp_gro": caps["gro"],
        "rmem_max": caps["rmem_max"],
        "wmem_max": caps["wmem_max"],
        "sch_netem": _netem_available(),
        "nft": shutil.which("nft") is not None,
        "iptables": shutil.which("iptables") is not None,
        "tc": shutil.which("tc") is not None,
        "iperf3": shutil.which("iperf3") is not None,
    }
    if args.json:
        print(json.dumps(info))
        return 0
    for k, v in info.items():
        print(f"{k:>10}: {v}")
    print()
    print("what it means:")
    gso = "on: one message carries up to 64 datagrams" if info["udp_gso"] else "missing: one datagram per send"
    gro = "on: the receiver reads coalesced 64 KB buffers" if info["udp_gro"] else "missing: one datagram per read"
    print(f"  GSO {gso}")
    print(f"  GRO {gro}")
    rmem = info["rmem_max"] or 0
    if not info["root"] and rmem < 32 << 20:
        print(f"  receive buffers are capped at {rmem * 2} bytes: raise net.core.rmem_max "
              "(sysctl -w net.core.rmem_max=33554432) or pace senders (rate_bps) to avoid self-inflicted loss")
    else:
        print("  receive buffers can grow to 32 MiB (root uses SO_RCVBUFFORCE)")
    if not info["sch_netem"]:
        print("  no sch_netem: emulated loss uses nftables/iptables drops, rates use tbf; delay/jitter/"
              "reorder/duplicate must come from lossympi's own fault injector")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lossympi", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("selftest", help="send an array over loopback UDP with injected loss; report what was lost")
    st.add_argument("--elements", type=int, default=1_000_000)
    st.add_argument("--loss", type=float, default=0.05, help="injected datagram loss probability")
    st.add_argument("--fill", default="random", choices=["random", "zero", "nan", "last"])
    st.add_argument("--timeout", type=float, default=0.5, help="receive deadline in seconds")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--json", action="store_true")
    inf = sub.add_parser("info", help="what this kernel supports and what it means for speed")
    inf.add_argument("--json", action="store_true")
    sub.add_parser("bench", help="benchmarks (see `lossympi bench -h`)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "bench":
        from lossympi.bench.__main__ import main as bench_main

        return bench_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return _selftest(args) if args.cmd == "selftest" else _info(args)


if __name__ == "__main__":
    sys.exit(main())
