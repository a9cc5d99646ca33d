"""Tests of lossympi.netem (emulated hosts in network namespaces) and tools/netem.

The first part (plans, parsing, validation) runs anywhere. The cluster tests need root, iproute2 and nftables /
iptables / sch_netem; they are skipped with the reason from ``require_root_reason()`` otherwise. Traffic is only
ever sent to the clusters' namespace addresses.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

from lossympi import netem
from lossympi.netem import Cluster, LinkSpec, NetemError, NetemUnavailableError, NetemWarning

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

NO_NETEM = {"netem": False, "nft": True, "iptables": False, "tbf": True}
ALL = {"netem": True, "nft": True, "iptables": True, "tbf": True}
IPT_ONLY = {"netem": False, "nft": False, "iptables": True, "tbf": True}
NOTHING = {"netem": False, "nft": False, "iptables": False, "tbf": False}


def _caps(**flags: bool) -> dict[str, Any]:
    caps: dict[str, Any] = dict(flags)
    caps["unavailable"] = netem.caps._unavailable(caps)
    return caps


# ------------------------------------------------------------------------------------------------------------------
# No root needed


@pytest.mark.parametrize(("text", "bps"), [
    ("10gbit", 10e9), ("200mbit", 200e6), ("500kbit", 500e3), ("1kibit", 1024), ("100mbps", 800e6),
    ("1.5Gbit", 1.5e9), ("64000", 64000), (1e9, 1e9),
])
def test_parse_rate(text: str | float, bps: float) -> None:
    assert netem.parse_rate(text) == pytest.approx(bps)


@pytest.mark.parametrize("text", ["", "fast", "-1mbit", "0mbit", "10 xbit", True])
def test_parse_rate_rejects(text: Any) -> None:
    with pytest.raises(ValueError):
        netem.parse_rate(text)


@pytest.mark.parametrize("kwargs", [
    {"loss": 1.5}, {"loss": -0.1}, {"duplicate": 2}, {"delay": -1}, {"jitter": float("nan")}, {"rate": "quick"},
    {"direction": "sideways"}, {"reorder": 0.1},
])
def test_linkspec_rejects(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        LinkSpec(**kwargs)


def test_linkspec_basics() -> None:
    spec = LinkSpec(loss=0.1, rate="1gbit", delay=0.01, reorder=0.2, direction="both")
    assert spec.directions == ("in", "out")
    assert spec.rate_bps == 1e9
    assert spec.wanted() == ("loss", "rate", "delay", "reorder")
    assert LinkSpec().wanted() == () and LinkSpec().directions == ("in",)
    assert spec.to_dict()["direction"] == "both"


def test_plan_without_netem_uses_nft_and_tbf() -> None:
    plan = netem.plan._plan(LinkSpec(loss=0.2, rate="200mbit", delay=0.01, jitter=0.001, direction="both"),
                       _caps(**NO_NETEM))
    assert plan.nft_loss == {"in": 0.2, "out": 0.2}
    assert plan.netem == {}
    assert plan.applied == {"loss": "nft", "rate": "tbf"}
    assert plan.unavailable == ["delay", "jitter"]
    assert plan.rate_bps == 200e6


def test_plan_with_netem() -> None:
    spec = LinkSpec(loss=0.05, rate="1gbit", delay=0.01, jitter=0.002, reorder=0.25, duplicate=0.01)
    plan = netem.plan._plan(spec, _caps(**ALL))
    assert plan.unavailable == [] and plan.nft_loss == {}
    assert set(plan.netem) == {"in"}
    assert plan.netem["in"] == ["loss", "5%", "delay", "10000us", "2000us", "reorder", "25%", "duplicate", "1%"]
    cmds = netem.commands._qdisc_commands("h0", plan.netem["in"], plan.rate_bps, plan.rate_backend, 1500)
    assert cmds[0][:7] == ["qdisc", "add", "dev", "h0", "root", "handle", "1:"] and "netem" in cmds[0]
    assert cmds[1][:7] == ["qdisc", "add", "dev", "h0", "parent", "1:1", "handle"] and "tbf" in cmds[1]
    assert netem.commands._qdisc_commands("eth0", None, None, None, 1500) == []


def test_plan_iptables_only_and_nothing() -> None:
    plan = netem.plan._plan(LinkSpec(loss=0.1, direction="both"), _caps(**IPT_ONLY))
    assert plan.ipt_loss == 0.1 and plan.unavailable == ["loss(out)"]
    assert netem.plan._plan(LinkSpec(loss=0.1, direction="out"), _caps(**IPT_ONLY)).unavailable == ["loss"]
    plan = netem.plan._plan(LinkSpec(loss=0.1, rate="1gbit"), _caps(**NOTHING))
    assert plan.unavailable == ["loss", "rate"] and plan.applied == {}


def test_tbf_burst_covers_frames() -> None:
    args = netem.commands._tbf_args(1e6, 9000)
    assert int(args[args.index("burst") + 1]) >= 2 * 9014
    args = netem.commands._tbf_args(10e9, 1500)
    assert int(args[args.index("burst") + 1]) == int(10e9 / 8 * netem.TBF_BURST_SECONDS)


def test_nft_script() -> None:
    script = netem.commands._nft_table_script("eth0", 0.2)
    assert "hook ingress device \"eth0\"" in script and "numgen random mod 1000000 < 200000" in script
    assert "meta protocol { ip, ip6 }" in script  # never drop ARP
    assert netem.commands._nft_table_script("eth0", 0.0).count("\n") == 2  # only removes the table


def test_cluster_validation_and_names() -> None:
    with pytest.raises(ValueError):
        Cluster(0)
    with pytest.raises(ValueError):
        Cluster(2, per_host={2: LinkSpec()})
    with pytest.raises(ValueError):
        Cluster(2, mtu=10)
    with pytest.raises(ValueError):
        Cluster(2, prefix="bad name")
    with pytest.raises(TypeError):
        Cluster(2, link={"loss": 0.1})  # type: ignore[arg-type]
    c = Cluster(3, prefix="lmtestnames", subnet="10.213.7.0/24")
    assert c.hosts == ["lmtestnamesh0", "lmtestnamesh1", "lmtestnamesh2"] and c.bridge == "lmtestnamesbr"
    assert c.ips == ["10.213.7.1", "10.213.7.2", "10.213.7.3"]
    c.down()  # never built: a no-op that must not touch anything
    a, b = Cluster(2), Cluster(2)
    assert a.prefix != b.prefix and a.prefix.startswith(f"lm{os.getpid()}c")
    assert a.subnet.startswith("10.213.") and a.subnet.endswith(".0/24")
    with pytest.raises(NetemError):
        a.set_link(0, LinkSpec(loss=0.1))
    with pytest.raises(NetemError):
        a.popen(0, ["true"])


def test_strict_check_is_done_before_building() -> None:
    c = Cluster(2, link=LinkSpec(delay=0.01), strict=True)
    c._caps = _caps(**NO_NETEM)
    with pytest.raises(NetemUnavailableError, match="sch_netem"):
        c._check_plans(c._specs)
    c.strict = False
    with pytest.warns(NetemWarning, match="delay on every host"):
        c._check_plans(c._specs)


def _load_cli() -> Any:
    loader = importlib.machinery.SourceFileLoader("netem_cli", str(ROOT / "tools" / "netem"))
    spec = importlib.util.spec_from_loader("netem_cli", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_cli_parsers() -> None:
    cli = _load_cli()
    assert cli.duration("10ms") == pytest.approx(0.01) and cli.duration("250us") == pytest.approx(250e-6)
    assert cli.duration("2") == 2.0
    assert cli.probability("5%") == pytest.approx(0.05) and cli.probability("0.2") == 0.2
    assert cli.host_spec("2:loss=0.1,rate=1gbit,delay=5ms") == (2, {"loss": 0.1, "rate": "1gbit", "delay": 0.005})
    for bad in ("x:loss=1", "1:speed=3", "1"):
        with pytest.raises(Exception):  # noqa: B017 - argparse.ArgumentTypeError
            cli.host_spec(bad)


# ------------------------------------------------------------------------------------------------------------------
# Real clusters (root)

REASON = netem.require_root_reason()
needs_root = pytest.mark.skipif(REASON is not None, reason=f"netem clusters cannot be built here: {REASON}")

UDP_SINK = textwrap.dedent(r"""
    import json, socket, sys
    host, port, idle = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE: losses must come from the link only
    s.bind((host, port))
    print("ready", flush=True)
    s.settimeout(20.0)
    seen, total = set(), 0
    try:
        while True:
            data = s.recv(65535)
            seen.add(int.from_bytes(data[:4], "big"))
            total += 1
            s.settimeout(idle)
    except socket.timeout:
        pass
    print(json.dumps({"distinct": len(seen), "total": total, "seen": sorted(seen)}), flush=True)
""")

UDP_SOURCE = textwrap.dedent(r"""
    import socket, sys, time
    host, port, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    seg = int(sys.argv[5]) if len(sys.argv) > 5 else 0  # > 0: UDP GSO, seg datagrams per send
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO: never fragment
    pad = bytes(size - 4)
    if seg:
        s.setsockopt(17, 103, size)  # SOL_UDP, UDP_SEGMENT: the kernel cuts each send into size-byte datagrams
        for b in range(0, n, seg):
            s.sendto(b"".join(i.to_bytes(4, "big") + pad for i in range(b, min(n, b + seg))), (host, port))
            time.sleep(0.0005)
    for i in range(0 if seg else n):
        s.sendto(i.to_bytes(4, "big") + pad, (host, port))
        if i % 200 == 199:
            time.sleep(0.001)
""")

from lossympi.netem.probes import UDP_ECHO, UDP_PING  # noqa: E402 (shared with tools/netem_bench.py)

TCP_SINK = textwrap.dedent(r"""
    import json, socket, sys, time
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((sys.argv[1], int(sys.argv[2])))
    srv.listen(1)
    print("ready", flush=True)
    conn, _ = srv.accept()
    buf, n, t0 = bytearray(1 << 20), 0, None
    while True:
        k = conn.recv_into(buf)
        if not k:
            break
        if t0 is None:
            t0 = time.perf_counter()
        n += k
    print(json.dumps({"bytes": n, "seconds": time.perf_counter() - t0}), flush=True)
""")

TCP_SOURCE = textwrap.dedent(r"""
    import socket, sys
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
    chunk, left = bytes(1 << 16), int(sys.argv[3])
    while left > 0:
        left -= s.send(chunk[:left])
    s.close()
""")

N_DATAGRAMS = 5000
RATE = "200mbit"


def _start(cluster: Cluster, host: int, code: str, *args: Any) -> subprocess.Popen[str]:
    proc = cluster.popen(host, [PY, "-I", "-c", code, *map(str, args)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _datagrams(cluster: Cluster, src: int, dst: int, n: int = N_DATAGRAMS, size: int = 64, port: int = 9100,
               gso: int = 0) -> dict[str, Any]:
    """Send ``n`` numbered datagrams from host ``src`` to host ``dst`` (``gso`` > 0: that many per UDP GSO send);
    how many distinct ones arrived, and which."""
    sink = _start(cluster, dst, UDP_SINK, cluster.ips[dst], port, 0.4)
    cluster.run(src, [PY, "-I", "-c", UDP_SOURCE, cluster.ips[dst], port, n, size, gso], check=True, timeout=60)
    out, _ = sink.communicate(timeout=30)
    return json.loads(out)


def _within_5_sigma(received: int, n: int, keep: float) -> bool:
    sigma = math.sqrt(n * keep * (1 - keep))
    return abs(received - n * keep) <= 5 * sigma + 1


def _gone(prefix: str) -> list[str]:
    """What is left of the cluster ``prefix``: namespaces, root links, nft tables, registry entry."""
    left = [n for n in netem.namespaces._list_netns() if n.startswith(prefix)]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    left += [line.split(":")[1].strip() for line in links.splitlines() if prefix in line]
    nft = netem.programs._which("nft")
    if nft:
        tables = subprocess.run([nft, "list", "tables"], capture_output=True, text=True).stdout
        left += [line for line in tables.splitlines() if prefix in line]
    if os.path.exists(netem.registry._registry_path(prefix)):
        left.append(netem.registry._registry_path(prefix))
    return left


def _wait_gone(prefix: str, timeout: float = 15.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := _gone(prefix)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture(scope="module")
def cluster() -> Any:
    per_host = {0: LinkSpec(loss=0.2), 2: LinkSpec(rate=RATE)}
    with Cluster(3, per_host=per_host) as c:
        yield c
    assert _gone(c.prefix) == []


@needs_root
def test_hosts_reach_each_other_and_nothing_else(cluster: Cluster) -> None:
    echo = _start(cluster, 2, UDP_ECHO, cluster.ips[2], 9200)
    out = cluster.run(1, [PY, "-I", "-c", UDP_PING, cluster.ips[2], 9200, 20], capture_output=True, text=True,
                      check=True, timeout=30).stdout
    echo.kill()
    echo.communicate()
    assert len(json.loads(out)) == 20
    for host in range(3):
        routes = cluster.run(host, ["ip", "-4", "route", "show"], capture_output=True, text=True, check=True).stdout
        assert "default" not in routes and cluster.subnet in routes
    env = {**os.environ, "LM_NETEM_PROBE": "passed"}
    out = cluster.run(0, [PY, "-I", "-c", "import os; print(os.environ['LM_NETEM_PROBE'])"], env=env,
                      capture_output=True, text=True, check=True).stdout
    assert out.strip() == "passed"


@needs_root
def test_loss_on_receiver_link(cluster: Cluster) -> None:
    got = _datagrams(cluster, 1, 0)
    print(f"\nnetem loss=0.2 direction=in: received {got['distinct']}/{N_DATAGRAMS} "
          f"(loss {1 - got['distinct'] / N_DATAGRAMS:.4f})")
    assert got["total"] == got["distinct"]
    assert _within_5_sigma(got["distinct"], N_DATAGRAMS, 0.8), got


def _all_or_nothing(seen: list[int], n: int, burst: int) -> float:
    """Fraction of the ``burst``-datagram sends that arrived entirely or not at all."""
    counts = [0] * math.ceil(n / burst)
    for i in seen:
        counts[i // burst] += 1
    return sum(c in (0, burst) for c in counts) / len(counts)


@needs_root
def test_loss_is_per_datagram_under_udp_gso(cluster: Cluster) -> None:
    """With the default ``per_packet=True`` a 40-datagram GSO send loses each datagram independently (all-or-
    nothing has probability 0.8^40 + 0.2^40 ~ 1e-4 per send), not the whole 64 KB burst at once."""
    assert cluster.per_packet and cluster.offloads[1]["tx-udp-segmentation"] is False
    got = _datagrams(cluster, 1, 0, n=4000, size=1400, gso=40, port=9101)
    whole = _all_or_nothing(got["seen"], 4000, 40)
    print(f"\nper-packet: received {got['distinct']}/4000, all-or-nothing sends {whole:.3f}")
    assert _within_5_sigma(got["distinct"], 4000, 0.8), got["distinct"]
    assert whole <= 0.05


@needs_root
def test_keeping_offloads_drops_whole_gso_bursts() -> None:
    """The control: with ``per_packet=False`` the loss rule sees one 40-datagram buffer per send."""
    with Cluster(2, per_host={0: LinkSpec(loss=0.2)}, per_packet=False) as c:
        assert c.offloads == {} and c.describe()["per_packet"] is False
        got = _datagrams(c, 1, 0, n=4000, size=1400, gso=40, port=9102)
    whole = _all_or_nothing(got["seen"], 4000, 40)
    print(f"\noffloads kept: received {got['distinct']}/4000, all-or-nothing sends {whole:.3f}")
    assert whole >= 0.9


@needs_root
@pytest.mark.parametrize(("spec", "keep"), [
    (LinkSpec(loss=0.5), 0.5),
    (LinkSpec(), 1.0),
    (LinkSpec(loss=0.2, direction="out"), 0.8),  # on the sender's link
    (LinkSpec(loss=0.2, direction="both"), 0.8),  # on the sender's link: only its "out" half is crossed
])
def test_set_link_changes_loss_live(cluster: Cluster, spec: LinkSpec, keep: float) -> None:
    target = 1 if spec.direction in ("out", "both") else 0
    old = cluster.link(target)
    other = cluster.link(1 - target)
    try:
        cluster.set_link(target, spec)
        if target == 1:
            cluster.set_link(0, LinkSpec())
        got = _datagrams(cluster, 1, 0)
    finally:
        cluster.set_link(target, old)
        cluster.set_link(1 - target, other)
    print(f"\nnetem set_link {spec.loss=} {spec.direction=}: received {got['distinct']}/{N_DATAGRAMS}")
    if keep == 1.0:
        assert got["distinct"] == N_DATAGRAMS
    else:
        assert _within_5_sigma(got["distinct"], N_DATAGRAMS, keep), got
    assert cluster.applied[0] == {"loss": cluster.capabilities()["backends"]["loss"]}


@needs_root
def test_both_directions_compose(cluster: Cluster) -> None:
    try:
        cluster.set_link(0, LinkSpec(loss=0.2, direction="both"))
        cluster.set_link(1, LinkSpec(loss=0.2, direction="both"))
        got = _datagrams(cluster, 1, 0)
    finally:
        cluster.set_link(0, LinkSpec(loss=0.2))
        cluster.set_link(1, LinkSpec())
    print(f"\nnetem loss=0.2 both ways on both links: received {got['distinct']}/{N_DATAGRAMS}")
    assert _within_5_sigma(got["distinct"], N_DATAGRAMS, 0.8 * 0.8), got


@needs_root
def test_rate_limit(cluster: Cluster) -> None:
    rate = netem.parse_rate(RATE)
    nbytes = int(rate / 8 * 0.8)  # ~0.8 s at the nominal rate
    results = {}
    for label, src, dst in (("in", 0, 2), ("out", 2, 1)):
        sink = _start(cluster, dst, TCP_SINK, cluster.ips[dst], 9300)
        cluster.run(src, [PY, "-I", "-c", TCP_SOURCE, cluster.ips[dst], 9300, nbytes], check=True, timeout=60)
        out, _ = sink.communicate(timeout=60)
        got = json.loads(out)
        assert got["bytes"] == nbytes
        results[label] = got["bytes"] * 8 / got["seconds"]
    print(f"\nnetem rate={RATE}: TCP goodput into host {results['in'] / 1e6:.1f} Mbit/s, "
          f"out of host {results['out'] / 1e6:.1f} Mbit/s")
    for bps in results.values():
        assert 0.7 * rate <= bps <= 1.3 * rate, results


@needs_root
def test_capabilities_report() -> None:
    caps = netem.capabilities()
    for key in ("netem", "nft", "iptables", "tbf"):
        assert isinstance(caps[key], bool)
    assert caps["reason"] is None
    if not caps["netem"]:  # delay through the NFQUEUE delay line where iptables-legacy works (test_delay_line.py)
        delay = ["delay", "jitter", "reorder"] if not caps["nfqueue"] else []
        assert {*delay, "duplicate"} <= set(caps["unavailable"])
        assert caps["backends"]["delay"] == ("nfqueue" if caps["nfqueue"] else None)
        assert any("netem" in note for note in caps["notes"])
    else:
        assert caps["unavailable"] == []
    assert caps["backends"]["loss"] in ("netem", "nft", "iptables")
    print(f"\nnetem capabilities: netem={caps['netem']} nft={caps['nft']} iptables={caps['iptables']} "
          f"tbf={caps['tbf']} unavailable={caps['unavailable']}")


@needs_root
def test_strict_delay_without_netem() -> None:
    spec = LinkSpec(delay=0.02)
    if netem.capabilities()["netem"] or netem.capabilities()["nfqueue"]:
        with Cluster(2, link=spec, strict=True) as c:
            echo = _start(c, 1, UDP_ECHO, c.ips[1], 9200)
            out = c.run(0, [PY, "-I", "-c", UDP_PING, c.ips[1], 9200, 3], capture_output=True, text=True,
                        check=True).stdout
            echo.kill()
            echo.communicate()
            assert min(json.loads(out)) >= 0.04  # delay on both hosts' inbound side
        return
    c = Cluster(2, link=spec, strict=True)
    with pytest.raises(NetemUnavailableError, match="delay") as info:
        c.up()
    assert "sch_netem" in str(info.value)
    assert _gone(c.prefix) == []  # refused before building anything
    with pytest.warns(NetemWarning, match="delay"), Cluster(2, link=spec) as c:
        assert c.unavailable == {0: ["delay"], 1: ["delay"]} and c.applied == {0: {}, 1: {}}
    with pytest.raises(NetemUnavailableError):
        with Cluster(2, strict=True) as c:
            c.set_link(0, LinkSpec(loss=0.1, duplicate=0.1))
    assert _gone(c.prefix) == []


@needs_root
def test_mtu_9000() -> None:
    with Cluster(2, mtu=9000) as c:
        out = c.run(0, ["ip", "link", "show", "eth0"], capture_output=True, text=True, check=True).stdout
        assert "mtu 9000" in out
        got = _datagrams(c, 0, 1, n=50, size=8900)
        assert got["distinct"] == 50


@needs_root
def test_down_removes_everything_and_kills_programs() -> None:
    c = Cluster(2, link=LinkSpec(loss=0.1, rate="1gbit", direction="both")).up()
    assert len(netem.namespaces._cluster_namespaces(c.prefix)) == 3
    assert os.path.exists(netem.registry._registry_path(c.prefix))
    sleeper = c.popen(1, ["sleep", "60"])
    c.down()
    assert sleeper.poll() is not None
    assert _gone(c.prefix) == []
    c.down()  # idempotent
    assert c.up() is c and c.is_up  # can be rebuilt
    c.down()
    assert _gone(c.prefix) == []


@needs_root
def test_exception_inside_with_cleans_up() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with Cluster(2, link=LinkSpec(loss=0.1)) as c:
            c.popen(0, ["sleep", "60"])
            raise RuntimeError("boom")
    assert _gone(c.prefix) == []


CHILD = textwrap.dedent(r"""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from lossympi.netem import Cluster, LinkSpec
    c = Cluster(2, link=LinkSpec(loss=0.1, rate="1gbit"), reaper=sys.argv[2] == "reaper").up()
    sleeper = c.popen(0, ["sleep", "60"])
    print(c.prefix, sleeper.pid, flush=True)
    time.sleep(60)
""")


def _child_cluster(reaper: bool) -> tuple[subprocess.Popen[str], str, int]:
    child = subprocess.Popen([PY, "-c", CHILD, str(ROOT), "reaper" if reaper else "no"], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout is not None
    prefix, sleeper = child.stdout.readline().split()
    assert len(netem.namespaces._cluster_namespaces(prefix)) == 3
    return child, prefix, int(sleeper)


@needs_root
def test_sigterm_cleans_up() -> None:
    child, prefix, sleeper = _child_cluster(reaper=False)
    child.send_signal(signal.SIGTERM)
    child.communicate(timeout=20)
    assert child.returncode == -signal.SIGTERM
    assert _gone(prefix) == []
    assert netem.registry._process_start(sleeper) is None


@needs_root
def test_sigkill_reaper_cleans_up() -> None:
    child, prefix, sleeper = _child_cluster(reaper=True)
    child.kill()
    child.communicate(timeout=20)
    assert _wait_gone(prefix) == []
    deadline = time.monotonic() + 5
    while netem.registry._process_start(sleeper) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert netem.registry._process_start(sleeper) is None


@needs_root
def test_cleanup_all_removes_only_stale_clusters() -> None:
    child, stale, sleeper = _child_cluster(reaper=False)
    child.kill()  # no handler, no reaper: the cluster is left behind
    child.wait(timeout=20)
    assert child.stdout is not None
    child.stdout.close()  # the orphaned sleeper still holds the pipe's write end
    assert len(netem.namespaces._cluster_namespaces(stale)) == 3
    with Cluster(2) as live:
        infos = {c["prefix"]: c for c in netem.list_clusters()}
        assert infos[stale]["alive"] is False and infos[live.prefix]["alive"] is True
        removed = netem.cleanup_all()
        assert removed >= 3
        assert _gone(stale) == []
        assert len(netem.namespaces._cluster_namespaces(live.prefix)) == 3  # its owner (this process) is alive
    assert _gone(live.prefix) == []
    deadline = time.monotonic() + 5
    while netem.registry._process_start(sleeper) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert netem.registry._process_start(sleeper) is None


@needs_root
def test_cli_up_and_cleanup() -> None:
    tool = [PY, str(ROOT / "tools" / "netem")]
    caps = json.loads(subprocess.run([*tool, "caps"], capture_output=True, text=True, check=True).stdout)
    assert caps["reason"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prefix = f"lmcli{os.getpid()}x"
        run = subprocess.run([*tool, "up", "--hosts", "2", "--loss", "0.05", "--rate", "1gbit", "--delay", "1ms",
                              "--prefix", prefix, "--detach"], capture_output=True, text=True, check=True)
    info = json.loads(run.stdout)
    assert info["prefix"] == prefix and len(info["hosts"]) == 2 and info["hosts"][0]["applied"]["rate"] == "tbf"
    if not caps["netem"] and not caps["nfqueue"]:
        assert info["hosts"][0]["unavailable"] == ["delay"] and "sch_netem" in run.stderr
    out = subprocess.run([*tool, "exec", "--prefix", prefix, "1", "--", "ip", "-4", "-o", "addr", "show", "eth0"],
                         capture_output=True, text=True, check=True).stdout
    assert info["hosts"][1]["ip"] in out
    subprocess.run([*tool, "set", "--prefix", prefix, "0", "--loss", "0.3"], capture_output=True, check=True)
    assert Cluster.attach(prefix).link(0).loss == 0.3
    subprocess.run([*tool, "cleanup", "--all", "--prefix", prefix], capture_output=True, check=True)
    assert _gone(prefix) == []


@needs_root
def test_forked_child_does_not_tear_down_the_parents_cluster() -> None:
    with Cluster(2) as c:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child: SIGTERM runs the inherited handler, which must leave c alone
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            finally:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
        assert len(netem.namespaces._cluster_namespaces(c.prefix)) == 3
        assert _datagrams(c, 0, 1, n=100)["distinct"] == 100
    assert _gone(c.prefix) == []
