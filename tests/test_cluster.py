"""docs/cluster.md, checked: one MPI rank per (emulated) host, started by ``mpiexec`` as on a real cluster.

A :class:`lossympi.netem.Cluster` of 4 hosts (network namespaces on one bridge, each with its own ``eth0`` and
address) stands for 4 machines. ``mpiexec`` (MPICH's Hydra, ``-launcher fork`` in MPMD mode, one section per
host) starts ``aggregathor train --launcher mpi`` inside each host's namespace, with the host's address in
``LOSSYMPI_HOST`` and a UDP port range in ``LOSSYMPI_PORT_RANGE``, as docs/cluster.md tells a user to do; MPICH
itself talks over libfabric's TCP provider on ``eth0`` with shared memory off (``lossympi.bench.gather.MPI_ENV``).
Rank 0 (the parameter server) is host 0, workers 1-3 are hosts 1-3, training digits for a few steps.

What is asserted is what the run measured, not what it was told: the server counted every worker's gradients,
the per-host traffic counters of each namespace's ``eth0`` grew by at least the gradient and parameter bytes that
host had to send and receive (so the training went over the emulated links, between the hosts' own addresses),
and every UDP socket the ranks bound on their host's address was in ``LOSSYMPI_PORT_RANGE``. Needs root; skipped
with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from lossympi import netem
from lossympi.bench.gather import MPI_ENV, mpiexec_path

ROOT = Path(__file__).resolve().parent.parent
HOSTS = 4  # rank 0 = the server, ranks 1-3 = the workers, one per host
STEPS = 20
#: digits' MLP: 4,810 float32 parameters.
PARAM_BYTES = 4810 * 4
PORTS = (29500, 29509)
ARGS = ["train", "--launcher", "mpi", "--experiment", "digits", "--workers", str(HOSTS - 1), "--f", "0",
        "--byzantine", "0", "--gar", "average", "--steps", str(STEPS), "--eval-every", str(STEPS),
        "--checkpoint-every", "0", "--loss", "0", "--deadline", "5", "--quiet"]

REASON = netem.require_root_reason()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=f"no emulated cluster here: {REASON}"),
              pytest.mark.timeout(900)]


def _counters(cluster: netem.Cluster) -> list[dict[str, int]]:
    """Each host's eth0 byte counters, read inside its namespace."""
    out = []
    for i in range(cluster.n_hosts):
        text = cluster.run(i, ["cat", "/sys/class/net/eth0/statistics/rx_bytes",
                               "/sys/class/net/eth0/statistics/tx_bytes"], capture_output=True, text=True,
                           check=True).stdout.split()
        out.append({"rx": int(text[0]), "tx": int(text[1])})
    return out


def _udp_ports(cluster: netem.Cluster, host: int) -> set[int]:
    """Local ports of the UDP sockets bound on the host's own address (``/proc/net/udp`` of its namespace)."""
    ip_hex = "".join(f"{int(b):02X}" for b in reversed(cluster.ips[host].split(".")))
    lines = cluster.run(host, ["cat", "/proc/net/udp"], capture_output=True, text=True, check=True).stdout
    ports = set()
    for line in lines.splitlines()[1:]:
        local = line.split()[1]
        addr, port = local.split(":")
        if addr == ip_hex:
            ports.add(int(port, 16))
    return ports


def _watch_ports(cluster: netem.Cluster, proc: subprocess.Popen[Any], seen: dict[int, set[int]]) -> None:
    """Collect the UDP ports bound on each host's address while ``proc`` runs."""
    while proc.poll() is None:
        for i in range(cluster.n_hosts):
            try:
                seen[i] |= _udp_ports(cluster, i)
            except (subprocess.CalledProcessError, netem.NetemError):
                return
        time.sleep(0.3)


def _kill(cluster: netem.Cluster, proc: subprocess.Popen[Any]) -> None:
    """Kill the mpiexec process group and anything left in the cluster's namespaces (all started here)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    for ns in cluster.hosts:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The run: its summary, each host's eth0 byte deltas, the UDP ports seen on each host's address."""
    pytest.importorskip("mpi4py", reason="mpi4py is not installed")
    mpiexec = mpiexec_path()
    cli = Path(sys.executable).parent / "aggregathor"
    command = [str(cli)] if cli.exists() else [sys.executable, "-m", "aggregathor"]
    tmp = tmp_path_factory.mktemp("cluster")
    summary_path = tmp / "summary.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOSSYMPI_", "PMI", "OMPI_", "PMIX", "HYDRA_"))}
    env |= MPI_ENV | {"LOSSYMPI_PORT_RANGE": f"{PORTS[0]}-{PORTS[1]}", "PYTHONUNBUFFERED": "1"}
    with netem.Cluster(HOSTS) as cluster:
        argv = [mpiexec, "-launcher", "fork"]
        for i in range(HOSTS):
            argv += [*([":"] if i else []), "-n", "1", "-env", "LOSSYMPI_HOST", cluster.ips[i],
                     *cluster.command(i, [*command, *ARGS, "--run-dir", str(tmp / "run"),
                                          "--json-out", str(summary_path)])]
        before = _counters(cluster)
        seen: dict[int, set[int]] = {i: set() for i in range(HOSTS)}
        with open(tmp / "mpiexec.log", "wb") as log:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            watcher = threading.Thread(target=_watch_ports, args=(cluster, proc, seen), daemon=True)
            watcher.start()
            try:
                rc = proc.wait(timeout=600)
            finally:
                _kill(cluster, proc)
                watcher.join(timeout=10)
        after = _counters(cluster)
    output = (tmp / "mpiexec.log").read_text(errors="replace")
    assert rc == 0, f"{' '.join(argv)}\nexit status {rc}\n{output[-4000:]}"
    return {"summary": json.loads(summary_path.read_text()), "ports": seen, "output": output,
            "traffic": [{k: a[k] - b[k] for k in a} for a, b in zip(after, before, strict=True)]}


def test_one_rank_per_host_trains_over_the_hosts_links(cluster_run: dict[str, Any]) -> None:
    summary, traffic = cluster_run["summary"], cluster_run["traffic"]
    assert summary["steps"] == STEPS, summary
    workers = HOSTS - 1
    arrived = STEPS * workers - summary["lost_gradients"] - summary["missing_workers"]
    assert arrived >= 0.9 * STEPS * workers, summary  # the server aggregated the workers' gradients
    assert summary["accuracy"] > 0.5, summary  # and learned from them (digits: 10 classes)
    # Every gradient that arrived crossed host 0's link inward; every worker's link carried its own gradients
    # out and the parameters in (one copy per step). Frame headers only add to these lower bounds.
    assert traffic[0]["rx"] >= arrived * PARAM_BYTES, traffic
    assert traffic[0]["tx"] >= STEPS * workers * PARAM_BYTES, traffic
    for host in range(1, HOSTS):
        assert traffic[host]["tx"] >= 0.9 * STEPS * PARAM_BYTES, (host, traffic)
        assert traffic[host]["rx"] >= 0.9 * STEPS * PARAM_BYTES, (host, traffic)


def test_ranks_bind_in_lossympi_port_range(cluster_run: dict[str, Any]) -> None:
    """docs/cluster.md: LOSSYMPI_PORT_RANGE pins every rank's UDP port, so a firewall can open just that range."""
    ports = cluster_run["ports"]
    assert all(ports[i] for i in range(HOSTS)), f"no UDP socket seen on some host's address: {ports}"
    outside = {i: sorted(p for p in ports[i] if not PORTS[0] <= p <= PORTS[1]) for i in range(HOSTS)}
    assert not any(outside.values()), f"UDP ports outside LOSSYMPI_PORT_RANGE={PORTS[0]}-{PORTS[1]}: {outside}"
