"""A receiving host does GRO after the loss point, and the loss stays per datagram (issue 13, requirement 2).

``lossympi.netem.Cluster`` drops on the bridge side of each veth, where every packet is still one datagram (the
sending host cut its UDP GSO buffers in software), and switches GRO on in each host's ``eth0``: a ``UDP_GRO``
socket then reads many datagrams per ``recvmsg``, as behind a NIC, while each datagram was lost on its own.
Needs root, iproute2 and nftables (skipped otherwise).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from lossympi import netem
from lossympi.netem import Cluster, LinkSpec

PY = sys.executable
REASON = netem.require_root_reason()
needs_root = pytest.mark.skipif(REASON is not None, reason=f"netem clusters cannot be built here: {REASON}")

GRO_SINK = textwrap.dedent(r"""
    import json, socket, struct, sys
    host, port, idle, gro = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE: losses must come from the link only
    if gro:
        s.setsockopt(17, 104, 1)  # SOL_UDP, UDP_GRO
    s.bind((host, port))
    print("ready", flush=True)
    s.settimeout(20.0)
    seen, reads, datagrams = set(), 0, 0
    try:
        while True:
            data, anc, _, _ = s.recvmsg(65535, 64)
            seg = len(data)
            for level, kind, val in anc:
                if level == 17 and kind == 104:  # the GRO segment size
                    seg = struct.unpack("H", val[:2])[0] if len(val) == 2 else struct.unpack("i", val[:4])[0]
            for off in range(0, len(data), seg):
                seen.add(int.from_bytes(data[off:off + 4], "big"))
                datagrams += 1
            reads += 1
            s.settimeout(idle)
    except socket.timeout:
        pass
    print(json.dumps({"distinct": len(seen), "datagrams": datagrams, "reads": reads, "seen": sorted(seen)}))
""")

GSO_SOURCE = textwrap.dedent(r"""
    import socket, sys, time
    host, port, n, size, seg = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO: never fragment
    s.setsockopt(17, 103, size)  # SOL_UDP, UDP_SEGMENT: the kernel cuts each send into size-byte datagrams
    pad = bytes(size - 4)
    for b in range(0, n, seg):
        s.sendto(b"".join(i.to_bytes(4, "big") + pad for i in range(b, min(n, b + seg))), (host, port))
        time.sleep(0.0005)
""")

N = 4000
BURST = 40


def _gso_datagrams(cluster: Cluster, port: int, gro: bool = True) -> dict[str, Any]:
    """Host 1 sends ``N`` numbered 1400-byte datagrams to host 0 in UDP GSO sends of ``BURST``."""
    sink = cluster.popen(0, [PY, "-I", "-c", GRO_SINK, cluster.ips[0], port, 0.4, int(gro)], stdout=subprocess.PIPE,
                         text=True)
    assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
    cluster.run(1, [PY, "-I", "-c", GSO_SOURCE, cluster.ips[0], port, N, 1400, BURST], check=True, timeout=60)
    out, _ = sink.communicate(timeout=30)
    return json.loads(out)


def _all_or_nothing(seen: list[int]) -> float:
    counts = [0] * math.ceil(N / BURST)
    for i in seen:
        counts[i // BURST] += 1
    return sum(c in (0, BURST) for c in counts) / len(counts)


@needs_root
def test_receiver_merges_after_a_per_datagram_loss() -> None:
    """20 % loss on host 0's link: about 80 % of the datagrams arrive, each send of 40 loses its datagrams
    independently (all or nothing: 0.8^40 + 0.2^40 ~ 1e-4 per send), and the receiver reads several datagrams per
    ``recvmsg`` (GRO merged them). Fails if the loss moves after GRO (whole sends lost) or GRO is off (one
    datagram per read)."""
    with Cluster(2, per_host={0: LinkSpec(loss=0.2)}) as c:
        assert c.offloads[0]["rx-gro"] is True and c.offloads[1]["tx-udp-segmentation"] is False
        # the bridge side queues for the GRO veth's 256-packet ring, so a lagging host pushes back, not drops
        qdisc = subprocess.run(["ip", "netns", "exec", c.bridge, "tc", "qdisc", "show", "dev", "h0"],
                               capture_output=True, text=True, check=True).stdout
        assert "pfifo" in qdisc and f"limit {netem.links.GRO_QUEUE_PACKETS}p" in qdisc, qdisc
        got = _gso_datagrams(c, 9301)
    keep, sigma = 0.8 * N, math.sqrt(N * 0.8 * 0.2)
    whole = _all_or_nothing(got["seen"])
    print(f"\nGRO after the loss: {got['distinct']}/{N} arrived in {got['reads']} reads, all-or-nothing {whole:.3f}")
    assert got["datagrams"] == got["distinct"]
    assert abs(got["distinct"] - keep) <= 5 * sigma + 1, got["distinct"]
    assert whole <= 0.05
    assert got["reads"] * 2 <= got["distinct"], "GRO merged nothing: one datagram per read"


@needs_root
def test_per_packet_loss_after_the_host_turns_gro_off() -> None:
    """Where loss can only act after GRO (iptables in the host's INPUT), the host keeps GRO off."""
    caps = netem.capabilities()
    if not caps.get("iptables"):
        pytest.skip("no iptables here")
    with Cluster(2) as c:
        assert c.offloads[0]["rx-gro"] is True
        plan = netem.plan._plan(LinkSpec(loss=0.2), {**caps, "netem": False, "nft": False})
        c._apply(0, plan)
        assert c.offloads[0]["rx-gro"] is False
        got = _gso_datagrams(c, 9302)
    print(f"\niptables loss, GRO off: {got['distinct']}/{N} arrived in {got['reads']} reads")
    assert got["reads"] == got["datagrams"]
    assert _all_or_nothing(got["seen"]) <= 0.05
