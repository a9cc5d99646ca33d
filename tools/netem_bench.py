#!/usr/bin/env python3
"""Validate and measure the NFQUEUE delay line (lossympi.netem) on this machine; prints one JSON document.

  tools/netem_bench.py --parts rtt,tcp,pps [--delays-ms 0.5,1,5,10] [--seconds 5]

- rtt: a 2-host cluster with every host delaying what it receives by D ms; ``ping -U`` (user-to-user: plain ping
  reads the kernel's receive stamp, taken before the INPUT hook, so it misses the pinger's own delay) and a UDP
  echo timed in Python; the RTT should be 2 D (within 10 %).
- tcp: iperf3 TCP through a 2-host cluster at D = 5 ms (RTT 10 ms), without loss and with 5 % independent loss
  (nftables, per packet) on the receiver's link, and with Gilbert-Elliott loss of the same mean.
- pps: a UDP flood (1472-byte datagrams, sent with UDP GSO and segmented in software, so 1500-byte packets reach
  the receiver one by one) through the receiver's delay line (D = 1 ms), for 1 and 2 queues (2 flows); reports
  the packets that went through per second, the kernel's queue drops (saturation) and the line's CPU time per
  packet (so its capacity on one free core).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lossympi.netem import Cluster, LinkSpec  # noqa: E402
from lossympi.netem.probes import UDP_ECHO, UDP_PING  # noqa: E402

PY = sys.executable
FLOOD = textwrap.dedent(r"""
    import json, os, socket, sys, time
    host, port, seconds, flows = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    socks = []
    for k in range(flows):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(17, 103, 1472)  # UDP_SEGMENT: 44 datagrams per send, cut in software (offloads off)
        s.connect((host, port + k))
        socks.append(s)
    buf = bytes(1472 * 44)
    sent = errors = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for s in socks:
            try:
                s.send(buf)
                sent += 44
            except OSError:
                errors += 1
    cpu = os.times()
    print(json.dumps({"datagrams": sent, "errors": errors, "cpu_user_s": cpu.user, "cpu_sys_s": cpu.system,
                      "cpu_us_per_datagram": round(1e6 * (cpu.user + cpu.system) / max(sent, 1), 3)}))
""")
SINK = textwrap.dedent(r"""
    import socket, sys, time
    socks = []
    for k in range(int(sys.argv[3])):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((sys.argv[1], int(sys.argv[2]) + k))
        socks.append(s)
    print("ready", flush=True)
    time.sleep(3600)  # never reads: the packets are counted by the delay line's queue, then dropped here
""")


def _start(c: Cluster, host: int, code: str, *args: Any) -> subprocess.Popen[str]:
    proc = c.popen(host, [PY, "-I", "-c", code, *map(str, args)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def _ping(c: Cluster, n: int) -> dict[str, Any]:
    if shutil.which("ping") is None:
        return {"error": "ping not installed (apt-get install iputils-ping)"}
    cmd = ["ping", "-U", "-c", str(n), "-i", "0.02", c.ips[1]]
    out = c.run(0, cmd, capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", out)
    times = sorted(float(t) for t in re.findall(r"time=([\d.]+) ms", out))
    if m is None or not times:
        return {"error": out.strip()[-200:]}
    values = dict(zip(("min_ms", "avg_ms", "max_ms", "mdev_ms"), map(float, m.groups()), strict=True))
    return {"command": " ".join(cmd), **values, "median_ms": times[len(times) // 2]}


def part_rtt(delays_ms: list[float], n: int) -> list[dict[str, Any]]:
    """D = 0 first: no delay line, the stack's own round trip (the baseline, in the same run)."""
    rows = []
    for d in [0.0, *delays_ms]:
        with Cluster(2, link=LinkSpec(delay=d / 1e3), strict=d > 0) as c:
            ping = _ping(c, n)
            echo = _start(c, 1, UDP_ECHO, c.ips[1], 9300)
            out = c.run(0, [PY, "-I", "-c", UDP_PING, c.ips[1], 9300, n, 0.02], capture_output=True, text=True,
                        check=True, timeout=120).stdout
            echo.kill()
            echo.communicate()
            applied = c.applied[0]
        udp = sorted(1e3 * x for x in json.loads(out))
        median = udp[len(udp) // 2]
        rows.append({"delay_ms": d, "expected_rtt_ms": 2 * d, "backend": applied.get("delay"), "ping_U": ping,
                     "udp_echo_median_ms": round(median, 4), "udp_echo_p90_ms": round(udp[int(0.9 * len(udp))], 4),
                     "within_10pct": {"ping_median": "median_ms" in ping and abs(ping["median_ms"] - 2 * d) <= 0.2 * d,
                                      "ping_avg": "avg_ms" in ping and abs(ping["avg_ms"] - 2 * d) <= 0.2 * d,
                                      "udp_median": abs(median - 2 * d) <= 0.2 * d}})
    return rows


def _iperf_tcp(c: Cluster, seconds: float) -> dict[str, Any]:
    server = c.popen(1, ["iperf3", "-s", "-1", "-B", c.ips[1]], stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    cmd = ["iperf3", "-c", c.ips[1], "-t", str(seconds), "-J"]
    out = c.run(0, cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    server.wait(timeout=10)
    end = json.loads(out)["end"]
    return {"command": " ".join(cmd), "gbps": round(end["sum_received"]["bits_per_second"] / 1e9, 3),
            "retransmits": end["sum_sent"].get("retransmits")}


def part_tcp(seconds: float, delay_ms: float) -> list[dict[str, Any]]:
    rows = []
    cases = [("no loss", LinkSpec(delay=delay_ms / 1e3)),
             ("5% independent loss (nftables)", LinkSpec(delay=delay_ms / 1e3, loss=0.05)),
             ("5% Gilbert-Elliott loss (p=1.3%, r=25%, bad state loses all)",
              LinkSpec(delay=delay_ms / 1e3, gemodel=(0.0132, 0.25, 1.0, 0.0)))]
    for name, receiver in cases:
        with Cluster(2, link=LinkSpec(delay=delay_ms / 1e3), per_host={1: receiver}, strict=True) as c:
            res = _iperf_tcp(c, seconds)
            res.update(case=name, delay_ms=delay_ms, rtt_ms=2 * delay_ms, receiver_link=c.applied[1],
                       line_counters=c.delay_line_stats())
        rows.append(res)
    return rows


def _line_cpu_seconds(pids: set[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of the delay-line processes, all threads."""
    user = system = 0
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):
            fields = Path(f"/proc/{pid}/task/{task}/stat").read_text().rsplit(")", 1)[1].split()
            user, system = user + int(fields[11]), system + int(fields[12])
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def _udp_in(c: Cluster, host: int) -> int:
    """Datagrams that reached host ``host``'s UDP layer (read or dropped at a full socket)."""
    rows = [r.split() for r in c.run(host, ["cat", "/proc/net/snmp"], capture_output=True, text=True).stdout
            .splitlines() if r.startswith("Udp:")]
    udp = dict(zip(rows[0][1:], map(int, rows[1][1:]), strict=True))
    return udp["InDatagrams"] + udp["InErrors"]  # InErrors counts RcvbufErrors too


class _Tee:
    """Copy what the delay lines print (forwarded to sys.stderr) into a list as well."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.err = sys.stderr

    def write(self, text: str) -> int:
        self.lines += [x for x in text.splitlines() if x.strip()]
        return self.err.write(text)

    def flush(self) -> None:
        self.err.flush()


def _flood(c: Cluster, seconds: float, flows: int) -> dict[str, Any]:
    sink = _start(c, 1, SINK, c.ips[1], 9600, flows)
    lines = 1 in c.delay_line_stats()
    before = c.delay_line_stats().get(1, {})
    cpu0, udp0 = _line_cpu_seconds(c.delay_line_pids()), _udp_in(c, 1)
    t0 = time.monotonic()
    out = c.run(0, [PY, "-I", "-c", FLOOD, c.ips[1], 9600, seconds, flows], capture_output=True, text=True,
                check=True, timeout=seconds + 30).stdout
    elapsed = time.monotonic() - t0
    time.sleep(0.05 if not lines else 0.05 + c.link(1).delay)
    after = c.delay_line_stats().get(1, {})
    cpu1 = _line_cpu_seconds(c.delay_line_pids())
    user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    cpu, udp = user + system, _udp_in(c, 1) - udp0
    sink.kill()
    sink.communicate()
    row: dict[str, Any] = {"flows": flows, "seconds": round(elapsed, 3), "sender": json.loads(out),
                           "kpps_delivered": round(udp / elapsed / 1e3, 1)}
    if lines:
        delta = {k: after[k] - before[k] for k in ("id_sequence", "queue_dropped", "user_dropped")}
        through = delta["id_sequence"] - delta["queue_dropped"] - delta["user_dropped"]
        row.update(kernel_counters=delta, kpps_through_line=round(through / elapsed / 1e3, 1),
                   saturated=bool(delta["queue_dropped"] or delta["user_dropped"]), line_cpu_s=round(cpu, 3),
                   line_cpu_user_s=round(user, 3), line_cpu_sys_s=round(system, 3),
                   line_cpu_us_per_packet=round(1e6 * cpu / max(through, 1), 3),
                   kpps_per_line_core=round(through / max(cpu, 1e-9) / 1e3, 1))
    return row


def part_pps(seconds: float, queues_list: list[int]) -> list[dict[str, Any]]:
    """No delay line (the baseline, same run), then the line at D = 1 ms, then one held 2 s (its queue fills)."""
    cases = [("no delay line (baseline)", LinkSpec(), 1)]
    cases += [(f"D = 1 ms, {q} queue(s)", LinkSpec(delay=0.001, queues=q), q) for q in queues_list]
    cases += [("D = 2 s: more than the queue holds (saturation report)", LinkSpec(delay=2.0), 1)]
    rows = []
    for name, spec, flows in cases:
        tee = _Tee()
        sys.stderr = tee
        try:
            with Cluster(2, per_host={1: spec}, strict=True) as c:
                row = _flood(c, seconds, flows)
        finally:
            sys.stderr = tee.err
        rows.append({"case": name, "queues": spec.queues, **row, "line_warnings": tee.lines})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="rtt,tcp,pps")
    p.add_argument("--delays-ms", default="0.5,1,5,10")
    p.add_argument("--pings", type=int, default=50)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--tcp-delay-ms", type=float, default=5.0)
    p.add_argument("--queues", default="1,2")
    args = p.parse_args()
    parts = args.parts.split(",")
    out: dict[str, Any] = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                           "kernel": os.uname().release, "cpus": os.cpu_count(), "loadavg_before": _loadavg()}
    if "rtt" in parts:
        out["rtt"] = part_rtt([float(x) for x in args.delays_ms.split(",")], args.pings)
    if "tcp" in parts:
        out["tcp"] = part_tcp(args.seconds, args.tcp_delay_ms)
    if "pps" in parts:
        out["pps"] = part_pps(args.seconds, [int(x) for x in args.queues.split(",")])
    out["loadavg_after"] = _loadavg()
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
