"""Tests of the NFQUEUE delay line (lossympi.netem.delayline, lossympi._nfqueue) and its place in a Cluster.

The first part drives the compiled loop through a Unix socket pair that stands in for the netfilter queue's netlink
socket: the test writes NFQNL_MSG_PACKET messages and reads back the verdicts, so ordering, batching, the delay and
the Gilbert-Elliott statistics are checked without root. The second part builds real clusters (root,
iptables-legacy, the compiled module) and is skipped with the reason otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterable
from typing import Any

import pytest

from lossympi import netem
from lossympi.netem import Cluster, LinkSpec, NetemError
from lossympi.netem import delayline as dl
from lossympi.netem.probes import UDP_ECHO, UDP_PING  # the echo and the timed client: user-to-user round trips

_nfqueue = pytest.importorskip("lossympi._nfqueue", reason="the compiled delay line is not built (pip install -e .)")

PY = sys.executable
_PACKET, _VERDICT, _BATCH = 0x300, 0x301, 0x303


# ------------------------------------------------------------------------------------------------------------------
# The compiled loop through a socket pair (no root needed)


def _packet_message(packet_id: int, queue: int = 0) -> bytes:
    """An NFQNL_MSG_PACKET as the kernel sends it in copy mode "meta" (just the packet header attribute)."""
    attr = struct.pack("=HH", 11, 1) + struct.pack("!IHB", packet_id, 0x0800, 1) + b"\0"
    body = struct.pack("=BBH", socket.AF_INET, 0, socket.htons(queue)) + attr
    return struct.pack("=IHHII", 16 + len(body), _PACKET, 0, 0, 0) + body


def _verdicts(data: bytes) -> list[tuple[int, int, int]]:
    """(message type, verdict, id) of every verdict message in ``data``."""
    out, off = [], 0
    while off + 32 <= len(data):
        length, kind = struct.unpack_from("=IH", data, off)
        verdict, packet_id = struct.unpack_from("!II", data, off + 24)
        out.append((kind, verdict, packet_id))
        off += length
    return out


class _FakeQueue:
    """A delay line serving one end of a socket pair; the test plays the kernel on the other end."""

    def __init__(self, **kw: Any) -> None:
        self.kernel, self.user = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.kernel.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.line = _nfqueue.DelayLine(self.user.fileno(), 0, kw.pop("delay", 0.0), **kw)
        self.stop = threading.Event()
        self.got: list[tuple[float, int, int, int]] = []  # (time, type, verdict, id)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        self.reader.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            self.line.run(0.02)

    def _read(self) -> None:
        while not self.stop.is_set():
            if not select.select([self.kernel], [], [], 0.05)[0]:
                continue
            data = self.kernel.recv(1 << 16)
            now = time.monotonic()
            self.got += [(now, *v) for v in _verdicts(data)]

    def send(self, ids: Iterable[int]) -> None:
        """Queue these packet ids, up to 60 netlink messages per datagram (the line reads 2 KB at a time)."""
        ids = list(ids)
        for k in range(0, len(ids), 60):
            self.kernel.send(b"".join(_packet_message(i) for i in ids[k:k + 60]))

    def settle(self, n: int, timeout: float = 10.0) -> None:
        """Wait until every one of the ``n`` packets has a verdict (batches count for every id up to theirs)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.line.stats()["accepted"] + self.line.stats()["dropped_ge"] < n:
            time.sleep(0.01)
        time.sleep(0.1)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.reader.join()
        self.kernel.close()
        self.user.close()


def _release_order(got: list[tuple[float, int, int, int]], ids: list[int]) -> list[int]:
    """The ids in the order the verdicts let them go (a batch releases every id up to its own, in id order)."""
    order, done = [], set()
    for _, kind, verdict, packet_id in got:
        if kind == _BATCH:
            batch = [i for i in ids if i <= packet_id and i not in done]
            order += batch
            done.update(batch)
        elif verdict == 1 and packet_id not in done:
            order.append(packet_id)
            done.add(packet_id)
    return order


def _inversions(order: list[int]) -> int:
    return sum(1 for a, b in zip(order, order[1:], strict=False) if b < a)


def test_constant_delay_holds_each_packet_and_batches_verdicts() -> None:
    q = _FakeQueue(delay=0.02)
    try:
        t0 = time.monotonic()
        q.send(range(1, 501))
        q.settle(500)
    finally:
        q.close()
    assert q.got, "no verdict came back"
    first = min(t for t, *_ in q.got)
    assert first - t0 >= 0.02, f"a packet left after {1e3 * (first - t0):.2f} ms, before its 20 ms delay"
    assert all(kind == _BATCH and verdict == 1 for _, kind, verdict, _ in q.got)  # accept every id up to it
    assert len(q.got) < 100 and q.got[-1][3] == 500  # batched: far fewer verdict messages than packets
    assert _release_order(q.got, list(range(1, 501))) == list(range(1, 501))


def test_jitter_reorders_as_netem_or_keeps_order() -> None:
    ids = list(range(1, 2001))
    orders = {}
    for reorders in (True, False):
        q = _FakeQueue(delay=0.005, jitter=0.004, jitter_reorders=reorders, seed=7)
        try:
            for k in range(0, len(ids), 100):  # spread over ~20 ms, so jitter can swap packets
                q.send(ids[k:k + 100])
                time.sleep(0.001)
            q.settle(len(ids))
        finally:
            q.close()
        orders[reorders] = _release_order(q.got, ids)
        assert sorted(orders[reorders]) == ids
    assert _inversions(orders[True]) > 50, "jitter with reordering left the packets in order"
    assert _inversions(orders[False]) == 0, "a packet left before the one ahead of it"


def test_netem_reorder_probability_passes_packets_at_once() -> None:
    q = _FakeQueue(delay=0.05, reorder=0.25, seed=3)
    try:
        q.send(range(1, 2001))
        time.sleep(0.02)  # well before the 50 ms delay
        early = [v for v in q.got if v[1] == _VERDICT and v[2] == 1]
        q.settle(2000)
    finally:
        q.close()
    assert 0.2 < len(early) / 2000 < 0.3, len(early)


@pytest.mark.parametrize(("p", "r", "loss_bad", "loss_good"), [(0.01, 0.25, 1.0, 0.0), (0.05, 0.2, 0.5, 0.01)])
def test_gilbert_elliott_loss_statistics(p: float, r: float, loss_bad: float, loss_good: float) -> None:
    n = 200_000
    q = _FakeQueue(gemodel=(p, r, loss_bad, loss_good), seed=11)
    try:
        q.send(range(1, n + 1))
        q.settle(n, timeout=30)
    finally:
        q.close()
    dropped = sorted(i for _, kind, verdict, i in q.got if kind == _VERDICT and verdict == 0)
    expected = (r * loss_good + p * loss_bad) / (p + r)  # stationary: pi_bad = p / (p + r)
    assert q.line.stats()["dropped_ge"] == len(dropped)
    assert abs(len(dropped) / n - expected) < 0.15 * expected, (len(dropped) / n, expected)
    runs, run = [], 1
    for a, b in zip(dropped, dropped[1:], strict=False):
        if b == a + 1:
            run += 1
        else:
            runs.append(run)
            run = 1
    mean_run = sum(runs) / len(runs)
    independent = 1 / (1 - expected)  # mean run of losses if they were independent
    if loss_good == 0.0 and loss_bad == 1.0:  # every bad packet lost: a run is a bad spell, 1/r on average
        assert abs(mean_run - 1 / r) < 0.15 / r, mean_run
    assert mean_run > 1.3 * independent, (mean_run, independent)  # bursty, unlike independent loss


def test_config_message_binds_in_meta_mode() -> None:
    msg = dl._config_message(3, 4096, fail_open=True)
    length, kind, flags = struct.unpack_from("=IHH", msg)
    assert length == len(msg) and kind == (3 << 8 | 2) and flags & 4  # NFQNL_MSG_CONFIG, acknowledged
    assert struct.unpack_from("!H", msg, 18)[0] == 3  # res_id: the queue
    attrs, off = {}, 20
    while off < len(msg):
        alen, atype = struct.unpack_from("=HH", msg, off)
        attrs[atype] = msg[off + 4:off + alen]
        off += (alen + 3) & ~3
    assert attrs[1] == struct.pack("!BxH", 1, socket.AF_INET)  # bind
    assert attrs[2] == struct.pack("!IB", 0, 1)  # copy mode meta, nothing copied
    assert struct.unpack("!I", attrs[3])[0] == 4096
    assert struct.unpack("!I", attrs[5])[0] & 1  # fail-open asked for


def test_plans_choose_the_delay_line_or_netem() -> None:
    base = {"netem": False, "nft": True, "iptables": True, "tbf": True, "nfqueue": True}
    plan = netem.plan._plan(LinkSpec(loss=0.05, delay=0.005, jitter=0.001, gemodel=(0.01, 0.3, 1, 0)), base)
    assert plan.line == dl.LineParams(delay=0.005, jitter=0.001, gemodel=(0.01, 0.3, 1.0, 0.0))
    assert plan.applied == {"loss": "nft", "delay": "nfqueue", "jitter": "nfqueue", "gemodel": "nfqueue"}
    assert plan.nft_loss == {"in": 0.05} and plan.netem == {}
    both = netem.plan._plan(LinkSpec(delay=0.005, direction="both"), base)
    assert both.line is not None and both.unavailable == ["delay(out)"]
    with_netem = dict(base, netem=True)
    plan = netem.plan._plan(LinkSpec(loss=0.05, delay=0.005, gemodel=(0.01, 0.3, 1, 0)), with_netem)
    assert plan.line is None and plan.netem["in"] == ["loss", "gemodel", "1%", "30%", "100%", "0%", "delay", "5000us"]
    assert plan.nft_loss == {"in": 0.05}  # netem has one loss model: the independent loss goes to nftables
    keep = netem.plan._plan(LinkSpec(delay=0.005, jitter=0.002, jitter_reorders=False), with_netem)
    assert keep.line is not None and keep.netem == {}  # netem's tfifo would reorder
    none = netem.plan._plan(LinkSpec(delay=0.005), dict(base, nfqueue=False))
    assert none.line is None and none.unavailable == ["delay"]


def test_linkspec_gemodel_and_line_argv() -> None:
    spec = LinkSpec(gemodel=[0.01, 0.3, 1, 0])
    assert spec.gemodel == (0.01, 0.3, 1.0, 0.0) and "gemodel" in spec.wanted()
    for bad in ((0.1, 0.2), (0.1, 0.2, 1.5, 0), "0.1"):
        with pytest.raises(ValueError, match="gemodel"):
            LinkSpec(gemodel=bad)
    with pytest.raises(ValueError, match="queues"):
        LinkSpec(queues=0)
    params = dl.LineParams(delay=0.001, jitter=0.0005, jitter_reorders=False, gemodel=(0.1, 0.2, 1.0, 0.0),
                           queues=2, fail_open=True)
    args = dl._parse(params.argv())
    assert (args.delay, args.jitter, args.keep_order, args.queues, args.fail_open) == (0.001, 0.0005, True, 2, True)
    assert args.gemodel == "0.1,0.2,1.0,0.0"


def test_cli_delay_options() -> None:
    from test_netem import _load_cli

    cli = _load_cli()
    assert cli.gemodel("1%,30%") == (0.01, 0.3, 1.0, 0.0)  # netem's defaults: 1-h = 1, 1-k = 0
    assert cli.gemodel("0.01") == (0.01, 0.99, 1.0, 0.0)  # r = 1 - p
    parser = argparse.ArgumentParser()
    cli._add_link_options(parser)
    args = parser.parse_args(["--delay-ms", "5", "--jitter-ms", "1", "--no-reorder", "--gemodel", "2%,20%,50%"])
    spec = cli._spec(netem, args)
    assert (spec.delay, spec.jitter, spec.jitter_reorders, spec.gemodel) == (0.005, 0.001, False,
                                                                             (0.02, 0.2, 0.5, 0.0))
    assert cli._spec(netem, parser.parse_args(["--reorder"])).reorder == 0.0  # alone: jitter reorders (default)
    assert cli._spec(netem, parser.parse_args(["--delay-ms", "1", "--reorder", "25%"])).reorder == 0.25
    with pytest.raises(SystemExit):
        parser.parse_args(["--delay", "5ms", "--delay-ms", "5"])


def test_gather_bench_delay_options() -> None:
    from lossympi.bench import gather

    parser = argparse.ArgumentParser()
    gather.add_arguments(parser)
    args = parser.parse_args(["--delay-ms", "2", "--jitter-ms", "0.5", "--no-reorder"])
    spec = gather._link(args, 0.05, 2.0)  # the root's link; every other host gets _link(args, 0, delay)
    assert (spec.delay, spec.jitter, spec.jitter_reorders, spec.loss) == (0.002, 0.0005, False, 0.05)
    assert gather._link(args, 0.0, 2.0).delay == 0.002
    settings = gather._settings(args)
    assert (settings["delay_ms"], settings["jitter_ms"]) == ([2.0], 0.5)
    assert gather._link(parser.parse_args([])).wanted() == ()  # no delay asked: no delay line


def test_gather_bench_sweeps_delays_and_extra_configurations() -> None:
    """--delay-ms is a dimension of the sweep; --plus adds configurations outside the product; each record says
    its RTT, and the >= 2x-vs-TCP target applies at 5% loss with a delay."""
    from lossympi.bench import gather

    parser = argparse.ArgumentParser()
    gather.add_arguments(parser)
    args = parser.parse_args(["--n", "8", "--d", "1750000", "--delay-ms", "0,1,5", "--plus", "16:25000000:1"])
    assert gather.configurations(args) == [(8, 1750000, 0.0), (8, 1750000, 1.0), (8, 1750000, 5.0),
                                           (16, 25000000, 1.0)]
    per = {"lossympi": {"seconds": 0.1, "delivered": 0.95}, "tcp": {"seconds": 0.3}}
    rec = gather.make_record(8, 1750000, 0.05, per, args, 1.0)
    assert (rec["rtt_ms"], rec["targets"]["speedup_vs_tcp"]["met"]) == (2.0, True)
    assert "speedup_vs_tcp" not in gather.make_record(8, 1750000, 0.05, per, args, 0.0)["targets"]
    for bad in (["--plus", "16:25000000"], ["--plus", "a:b:c"], ["--delay-ms", "-1"]):
        with pytest.raises(SystemExit):
            gather._check(parser.parse_args(bad))


# ------------------------------------------------------------------------------------------------------------------
# Real clusters (root, iptables-legacy)

REASON = netem.require_root_reason()
if REASON is None and not netem.capabilities()["nfqueue"]:
    REASON = "no NFQUEUE delay line here: " + "; ".join(n for n in netem.capabilities()["notes"] if "NFQUEUE" in n
                                                        or "nfqueue" in n or "iptables" in n)
needs_line = pytest.mark.skipif(REASON is not None, reason=f"delay-line clusters cannot be built here: {REASON}")

UDP_SINK = textwrap.dedent(r"""
    import json, socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)
    s.bind((sys.argv[1], int(sys.argv[2])))
    print("ready", flush=True)
    s.settimeout(1.0)
    order = []
    try:
        while True:
            order.append(int.from_bytes(s.recv(2048)[:4], "big"))
    except TimeoutError:
        pass
    print(json.dumps(order))
""")
UDP_SOURCE = textwrap.dedent(r"""
    import socket, sys, time
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(int(sys.argv[3])):
        s.sendto(i.to_bytes(4, "big") + bytes(60), (sys.argv[1], int(sys.argv[2])))
        if i % 20 == 19:
            time.sleep(0.0005)
""")


def _start(cluster: Cluster, host: int, code: str, *args: Any) -> subprocess.Popen[str]:
    proc = cluster.popen(host, [PY, "-I", "-c", code, *map(str, args)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _line_pids(tag: str) -> list[int]:
    """Running delay-line processes whose command line names ``tag`` (their namespace)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        if b"lossympi.netem.delayline" in b" ".join(argv) and tag.encode() in argv:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] != "Z":
                    pids.append(int(pid))
    return pids


def _nfqueue_rules(cluster: Cluster, host: int) -> list[str]:
    ipt = netem.capabilities()["nfqueue_iptables"]
    out = cluster.run(host, [ipt, "-w", "-S", "INPUT"], capture_output=True, text=True, check=True).stdout
    return [row for row in out.splitlines() if "NFQUEUE" in row]


def _rtts(cluster: Cluster, n: int = 20) -> list[float]:
    echo = _start(cluster, 1, UDP_ECHO, cluster.ips[1], 9300)
    try:
        out = cluster.run(0, [PY, "-I", "-c", UDP_PING, cluster.ips[1], 9300, n], capture_output=True, text=True,
                          check=True, timeout=60).stdout
    finally:
        echo.kill()
        echo.communicate()
    return sorted(json.loads(out))


@needs_line
def test_rtt_through_two_hosts_is_twice_the_delay() -> None:
    with Cluster(2, link=LinkSpec(delay=0.005), strict=True) as c:
        assert c.applied == {0: {"delay": "nfqueue"}, 1: {"delay": "nfqueue"}}
        rtts = _rtts(c)
        median = rtts[len(rtts) // 2]
        assert 0.0095 <= median <= 0.012, f"median RTT {1e3 * median:.2f} ms, expected 10 ms (2 x 5 ms)"
        if shutil.which("ping"):  # -U: user-to-user; the default reads the kernel's receive stamp, taken before
            out = c.run(0, ["ping", "-U", "-c", "5", "-i", "0.05", c.ips[1]], capture_output=True, text=True,
                        check=True).stdout  # the INPUT hook, so it misses the pinger's own ingress delay
            avg = float(out.strip().splitlines()[-1].split("=")[1].split("/")[1])
            assert 9.5 <= avg <= 12.0, out
        stats = c.delay_line_stats()
        assert set(stats) == {0, 1} and stats[1]["id_sequence"] >= 20 and stats[1]["queue_dropped"] == 0


@needs_line
def test_jitter_order_through_a_cluster_and_live_change() -> None:
    spec = LinkSpec(delay=0.003, jitter=0.002)
    with Cluster(2, per_host={1: spec}) as c:
        orders = {}
        for reorders in (True, False):
            c.set_link(1, LinkSpec(delay=0.003, jitter=0.002, jitter_reorders=reorders))
            assert len(_nfqueue_rules(c, 1)) == 1 and len(_line_pids(c.hosts[1])) == 1  # the old line replaced
            sink = _start(c, 1, UDP_SINK, c.ips[1], 9400)
            c.run(0, [PY, "-I", "-c", UDP_SOURCE, c.ips[1], 9400, 2000], check=True, timeout=60)
            out, _ = sink.communicate(timeout=30)
            orders[reorders] = json.loads(out)
        c.set_link(1, LinkSpec())
        assert _nfqueue_rules(c, 1) == [] and _line_pids(c.hosts[1]) == []
    assert len(orders[False]) > 1900 and _inversions(orders[False]) == 0
    assert len(orders[True]) > 1900 and _inversions(orders[True]) > 20


@needs_line
def test_gilbert_elliott_loss_through_a_cluster() -> None:
    with Cluster(2, per_host={1: LinkSpec(gemodel=(0.02, 0.2, 1.0, 0.0))}) as c:
        assert c.applied[1] == {"gemodel": "nfqueue"}
        sink = _start(c, 1, UDP_SINK, c.ips[1], 9500)
        c.run(0, [PY, "-I", "-c", UDP_SOURCE, c.ips[1], 9500, 5000], check=True, timeout=60)
        out, _ = sink.communicate(timeout=30)
    lost = 1 - len(set(json.loads(out))) / 5000
    assert 0.05 < lost < 0.14, lost  # p / (p + r) = 9.1 %


@needs_line
def test_failed_setup_and_down_leave_no_line_nor_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    real_start = netem.lines._DelayLines.start

    def start_then_fail(self: Any, host: int, ns: str, line: Any, caps: Any) -> None:
        real_start(self, host, ns, line, caps)
        if host == 1:
            raise NetemError("injected failure after the delay line of host 1 started")

    monkeypatch.setattr(netem.lines._DelayLines, "start", start_then_fail)
    c = Cluster(3, link=LinkSpec(delay=0.002), reaper=False)
    with pytest.raises(NetemError, match="injected"):
        c.up()
    assert [_line_pids(ns) for ns in c.hosts] == [[], [], []]
    assert netem.namespaces._cluster_namespaces(c.prefix) == []
    monkeypatch.undo()
    with Cluster(2, link=LinkSpec(delay=0.002), reaper=False) as c:
        pids = [_line_pids(ns) for ns in c.hosts]
        assert all(len(p) == 1 for p in pids) and all(len(_nfqueue_rules(c, i)) == 1 for i in range(2))
    assert [_line_pids(ns) for ns in c.hosts] == [[], []]
    assert netem.namespaces._cluster_namespaces(c.prefix) == []


@needs_line
def test_destroy_stops_a_line_whose_namespace_was_deleted() -> None:
    c = Cluster(2, per_host={1: LinkSpec(delay=0.002)}, reaper=False).up()
    try:
        c.detach()
        pid = _line_pids(c.hosts[1])
        assert len(pid) == 1
        subprocess.run(["ip", "netns", "delete", c.hosts[1]], check=True)  # the line keeps the namespace alive
        assert _line_pids(c.hosts[1]) == pid
        netem.destroy(c.prefix)
        assert _line_pids(c.hosts[1]) == []
    finally:
        netem.destroy(c.prefix)
        for p in _line_pids(c.hosts[1]):
            os.kill(p, 9)
