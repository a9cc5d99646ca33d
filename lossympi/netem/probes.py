"""Tiny programs that measure an emulated cluster from inside its hosts (run with ``python -I -c CODE ARGS``).

- :data:`UDP_ECHO` ``ADDRESS PORT``: a UDP echo server; prints ``ready`` once bound.
- :data:`UDP_PING` ``ADDRESS PORT COUNT [GAP_SECONDS]``: sends ``COUNT`` numbered datagrams to an echo, one at a
  time, and prints the JSON list of the user-to-user round-trip times (seconds) of those that came back within
  2 s (``ping`` stamps in the kernel, before a host's INPUT hook: it would miss that host's own ingress delay).

Tests and ``tools/netem_bench.py`` share them, so what the tests check is what the benchmark measures.
"""

from __future__ import annotations

import textwrap

__all__ = ["UDP_ECHO", "UDP_PING"]

UDP_ECHO = textwrap.dedent(r"""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], int(sys.argv[2])))
    print("ready", flush=True)
    while True:
        data, addr = s.recvfrom(65535)
        s.sendto(data, addr)
""")

UDP_PING = textwrap.dedent(r"""
    import json, socket, sys, time
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2.0)
    gap = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    rtts = []
    for i in range(int(sys.argv[3])):
        t0 = time.perf_counter()
        s.sendto(b"ping %d" % i, (sys.argv[1], int(sys.argv[2])))
        if s.recv(100) == b"ping %d" % i:
            rtts.append(time.perf_counter() - t0)
        time.sleep(gap)
    print(json.dumps(rtts))
""")
