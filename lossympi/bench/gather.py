"""Gather head-to-head on an emulated cluster: lossympi vs gRPC vs MPI (MPICH over TCP) vs raw TCP.

For every ``n`` (senders) and ``d`` (float32 elements per sender), one :class:`lossympi.netem.Cluster` of
``n + 1`` hosts is built (network namespaces on one bridge; the root is host 0). The root's link drops each
packet *entering* the root with probability ``loss`` (nftables; :meth:`Cluster.set_link` between loss levels),
so every datagram or TCP segment of the gather is lost with probability ``loss``: TCP retransmits, lossympi
does not. With ``--delay-ms D,...`` every host's link also delays what the host receives by ``D`` ms (netem, or
the NFQUEUE delay line of :mod:`lossympi.netem.delayline` at each host's ingress), so the RTT between two hosts is
``2 D``; ``--jitter-ms`` adds a uniform +-J (``--no-reorder`` keeps the order). The configurations are the
product ``--n`` x ``--d`` x ``--delay-ms``, plus each ``--plus N:D:DELAY_MS``, every one at every ``--loss``: the
paper's regime in one invocation is ``--n 8 --d 1750000 --delay-ms 0,1,5 --plus 16:25000000:1``.
The same gather of ``n`` rows of ``d`` float32 into an ``(n + 1, d)`` buffer at the root is done by:

- **lossympi**: one process per host, bootstrapped with :func:`lossympi.bootstrap.from_env` (``LOSSYMPI_*``
  variables, rendezvous on the root), ``Comm.aio.Gather`` with a deadline and the root's credits (each sender
  runs a window past what the root drained; ``--ingest-gbps`` > 0 also caps each sender at ``ingest / n``);
- **mpi**: :mod:`lossympi.baselines.mpi` (``mpi4py`` ``Gather`` into the root's rows) under MPICH, ranks started
  by Hydra in MPMD mode, one per namespace (``mpiexec -launcher fork -n 1 ip netns exec H0 python ... : -n 1 ip
  netns exec H1 python ...``), with the libfabric TCP provider on ``eth0`` and shared memory disabled
  (:data:`MPI_ENV`);
- **grpc**: :mod:`lossympi.baselines.grpc`: each sender client-streams its row in 1 MiB chunks (raw bytes; the
  stream opens with a frame header under an HMAC, each chunk carries a Poly1305 tag) to a ``grpcio`` server on
  the root, which checks each chunk and copies it into the row;
- **tcp**: :mod:`lossympi.baselines.tcp`: each sender ``sendall``\\ s a frame (header and row) on its authenticated
  connection; the root's event loop ``recv_into``\\ s the preallocated rows once the header is checked.

TCP, gRPC and MPI run :mod:`lossympi.baselines`, the code of aggregathor's ``--transport tcp|grpc|mpi``, so the
head-to-head measures what trains. lossympi, TCP and gRPC bootstrap the same way (``from_env``: keys and an
authenticated control star, over which the root relays the commands).

The processes of one transport stay up across the loss levels (connections, TCP state and MPI connections
persist, as in a training job that gathers every step); every loss level starts with one unmeasured warm-up
gather, then ``--repeats`` measured ones (medians reported). A gather that runs past ``--cap`` seconds is
stopped (its processes are killed and restarted for the next level) and reported as a lower bound
(``"capped": true``); no more gathers of that transport are started at that level once ``--cap`` seconds were
spent on it. Timing is done by the root (see :mod:`lossympi.bench._gather_worker`); every gather is checked
against the values sent (a strided sample of every row).

So that the loss applies to packets and not to 64 KB GSO/TSO bursts, every host's ``eth0`` gets its TCP and UDP
segmentation offloads switched off (``lossympi.netem.Cluster(per_packet=True)``; ``--keep-gso`` leaves them
on). The root process of every transport runs at ``--root-nice`` (default -10): the ``n + 1`` emulated hosts
share this machine's CPUs.
Kernel drop counters (UDP receive-buffer errors in the root's namespace, ``softnet_stat`` drops) are recorded
per transport and loss level, and the share of the CPUs used by other processes per ``(n, d)``.

lossympi's time is the wall time of ``Gather`` at the root: when anything is lost it returns at its deadline
(lossympi has no end-of-message signal), so ``lossympi_data_s`` also reports when the last datagram was
accepted (the transfer itself). The deadline is ``max(--min-deadline, --deadline-factor x expected)`` where
``expected`` is the time of ``n x d x 4`` bytes (plus datagram headers and MACs) at ``--ingest-gbps`` (or
``--deadline-gbps`` without a cap).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lossympi.bench.common import CpuMeter, fmt, host_info, log, median, table

__all__ = ["HELP", "MPI_ENV", "TRANSPORTS", "add_arguments", "plot", "render", "run"]

HELP = "gather of n senders x d float32 to a root on an emulated cluster: lossympi vs gRPC vs MPI vs raw TCP"

TRANSPORTS = ("lossympi", "grpc", "mpi", "tcp")
DEFAULT_NS = "4,8,16"
DEFAULT_DS = "1750000,25000000"
DEFAULT_LOSSES = "0,0.01,0.05,0.1"
DEFAULT_INGEST_GBPS = 0.0  # no cap: the root's credits pace the senders
DEFAULT_DEADLINE_GBPS = 3.0
#: MPICH (ch4) over libfabric's TCP provider on the namespace's eth0, no shared memory between ranks.
MPI_ENV = {
    "MPIR_CVAR_CH4_NETMOD": "ofi",
    "FI_PROVIDER": "tcp",
    "FI_TCP_IFACE": "eth0",
    "FI_SOCKETS_IFACE": "eth0",
    "MPIR_CVAR_NOLOCAL": "1",
}
TARGET_SPEEDUP_VS_GRPC = 6.0
TARGET_SPEEDUP_VS_MPI = 3.0
TARGET_RATIO_VS_TCP = 1.5
TARGET_LOSS_FACTOR = 1.2
TARGET_SPEEDUP_VS_TCP_DELAYED = 2.0  # at 5% loss with a delay (issue 13: RTT 2 ms), lossympi vs raw TCP
_START_TIMEOUT_S = 180.0  # process start, bootstrap, connections
_READY_TIMEOUT_S = 120.0  # command -> "started" (small messages through the lossy link)
_ROOT = Path(__file__).resolve().parents[2]


def _ints(text: str) -> list[int]:
    return [int(float(t)) for t in text.split(",") if t.strip()]


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", default=DEFAULT_NS, metavar="N,...", help="numbers of senders (the root is one more host)")
    p.add_argument("--d", default=DEFAULT_DS, metavar="D,...", help="float32 elements per sender")
    p.add_argument("--loss", default=DEFAULT_LOSSES, metavar="P,...",
                   help="drop probability of every packet entering the root")
    p.add_argument("--transports", default=",".join(TRANSPORTS), help=f"comma list of {', '.join(TRANSPORTS)}")
    p.add_argument("--repeats", type=int, default=3, help="measured gathers per configuration (after a warm-up)")
    p.add_argument("--cap", type=float, default=40.0,
                   help="seconds: a gather running longer is stopped and reported as a lower bound; also the time "
                        "after which no further gather of that transport is started for a configuration")
    p.add_argument("--ingest-gbps", type=float, default=DEFAULT_INGEST_GBPS,
                   help="lossympi Comm(ingest_bps=...) in Gbit/s, a cap the senders share (each at ingest/n) on top "
                        "of the root's credits; 0: no cap, credits only")
    p.add_argument("--deadline-gbps", type=float, default=DEFAULT_DEADLINE_GBPS,
                   help="rate the lossympi deadline assumes when --ingest-gbps is 0")
    p.add_argument("--deadline-factor", type=float, default=4.0,
                   help="lossympi deadline = max(--min-deadline, factor x expected transfer time at the ingest rate)")
    p.add_argument("--min-deadline", type=float, default=1.0, help="lossympi deadline lower bound, seconds")
    p.add_argument("--delay-ms", default="0", metavar="D,...",
                   help="one-way delays of what every host receives, ms (RTT = 2 x D; netem or the NFQUEUE delay "
                        "line): one more dimension of the sweep")
    p.add_argument("--plus", action="append", default=[], metavar="N:D:DELAY_MS",
                   help="one more configuration outside the --n x --d x --delay-ms product, at the same --loss "
                        "levels (repeatable), e.g. --plus 16:25000000:1")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="uniform delay variation +-J ms on every link")
    p.add_argument("--no-reorder", action="store_true", help="jitter keeps the order (default: reorders, as netem)")
    p.add_argument("--rate", default=None,
                   help="tc rate of every link, e.g. 10gbit (default: none, the veths run at CPU speed)")
    p.add_argument("--keep-gso", action="store_true",
                   help="leave the veths' TSO / UDP segmentation offloads on: packets of up to 64 KB then cross the "
                        "link as one and are dropped as one (by default they are segmented in software on the "
                        "sending host, so the loss applies to each datagram / segment)")
    p.add_argument("--root-nice", type=int, default=-10,
                   help="nice value of the root process of every transport: the n + 1 emulated hosts share this "
                        "machine's CPUs, and a root starved by its own senders is not what a cluster looks like")
    p.add_argument("--mpi-provider", default="tcp", choices=["tcp", "sockets"], help="libfabric provider for MPICH")
    p.add_argument("--mpi-env", default="", metavar="KEY=VALUE,...",
                   help="extra environment for the MPI ranks, e.g. MPIR_CVAR_CH4_PROGRESS_THROTTLE=1")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a plot (seconds per gather vs loss)")
    p.add_argument("--save", default=None, metavar="JSON", help="also write the JSON here after every (n, d)")
    p.add_argument("--from-json", default=None, metavar="FILE,...",
                   help="do not measure: merge the records of earlier --json outputs (later files win), "
                        "then print / plot them")


# ----------------------------------------------------------------------------------------------------------
# one transport's processes on the cluster
# ----------------------------------------------------------------------------------------------------------


class GroupError(RuntimeError):
    """The worker processes of a transport failed or did not answer."""


class Group:
    """The ``n + 1`` worker processes of one transport, and the root's control connection."""

    _counter = itertools.count()

    def __init__(self, cluster: Any, transport: str, n: int, d: int, args: argparse.Namespace,
                 workdir: Path) -> None:
        self.c = cluster
        self.transport = transport
        self.n, self.d, self.args = n, d, args
        k = next(Group._counter)
        self.port = 20000 + 10 * (k % 4000)
        self.path = str(workdir / f"ctl{k}.sock")
        self.log_path = workdir / f"{transport}{k}.log"
        self.log = open(self.log_path, "wb")  # closed in close()
        self.procs: list[subprocess.Popen[Any]] = []
        self.mpiexec: subprocess.Popen[Any] | None = None
        self.conn: socket.socket | None = None
        self.buf = b""
        self.hello: dict[str, Any] = {}
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)

    # ---- start / stop
    def _argv(self) -> list[str]:
        a = self.args
        return [sys.executable, "-m", "lossympi.bench._gather_worker", "--transport", self.transport,
                "--d", str(self.d), "--ctl", self.path, "--ingest-bps", repr(a.ingest_gbps * 1e9),
                "--root-nice", str(a.root_nice)]

    def start(self) -> dict[str, Any]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(_ROOT), *filter(None, [env.get("PYTHONPATH")])])
        env.setdefault("PYTHONUNBUFFERED", "1")
        size = self.n + 1
        kw: dict[str, Any] = {"stdout": self.log, "stderr": subprocess.STDOUT, "stdin": subprocess.DEVNULL,
                              "cwd": str(_ROOT)}
        if self.transport == "mpi":
            env.update(mpi_env(self.args.mpi_provider, self.args.mpi_env))
            argv = [mpiexec_path(), "-launcher", "fork"]
            for i in range(size):
                if i:
                    argv.append(":")
                argv += ["-n", "1", *self.c.command(i, self._argv())]
            self.mpiexec = subprocess.Popen(argv, env=env, start_new_session=True, **kw)
            self.procs.append(self.mpiexec)
        else:
            secret = secrets.token_hex(16)
            for i in range(size):
                e = dict(env, LOSSYMPI_RANK=str(i), LOSSYMPI_WORLD_SIZE=str(size), LOSSYMPI_SECRET=secret,
                         LOSSYMPI_RENDEZVOUS=f"{self.c.ips[0]}:{self.port}", LOSSYMPI_HOST=self.c.ips[i])
                self.procs.append(self.c.popen(i, self._argv(), env=e, **kw))
        end = time.monotonic() + _START_TIMEOUT_S
        self.listener.settimeout(0.5)
        while self.conn is None:
            try:
                self.conn, _ = self.listener.accept()
            except TimeoutError:
                self._check_alive()
                if time.monotonic() > end:
                    raise GroupError(f"{self.transport}: the root did not connect within {_START_TIMEOUT_S} s"
                                     f"{self.log_tail()}") from None
        self.conn.settimeout(None)
        self.hello = self._recv(end)
        if self.hello.get("op") != "hello":
            raise GroupError(f"{self.transport}: unexpected first message {self.hello!r}")
        return self.hello

    def _check_alive(self) -> None:
        for p in self.procs:
            rc = p.poll()
            if rc is not None and (rc != 0 or self.conn is None):
                raise GroupError(f"{self.transport}: a worker exited with status {rc}{self.log_tail()}")

    def log_tail(self, nbytes: int = 3000) -> str:
        try:
            self.log.flush()
            data = self.log_path.read_bytes()[-nbytes:].decode("utf-8", "replace")
        except OSError:
            return ""
        return f"\n--- {self.log_path.name} (tail) ---\n{data}" if data.strip() else ""

    def _recv(self, deadline: float) -> dict[str, Any]:
        """Next JSON line from the root, until ``deadline`` (monotonic); raises TimeoutError."""
        assert self.conn is not None
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self.conn], [], [], min(left, 0.5))
            if not ready:
                self._check_alive()
                continue
            chunk = self.conn.recv(1 << 16)
            if not chunk:
                raise GroupError(f"{self.transport}: the root closed its connection{self.log_tail()}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def _send(self, obj: dict[str, Any]) -> None:
        assert self.conn is not None
        self.conn.sendall((json.dumps(obj) + "\n").encode())

    def gather(self, seq: int, cap: float, deadline: float) -> dict[str, Any]:
        """One gather; ``{"capped": True, "seconds": cap}`` if it was not over ``cap`` s after it started."""
        self._send({"op": "gather", "seq": seq, "cap": cap, "deadline": deadline})
        try:
            msg = self._recv(time.monotonic() + _READY_TIMEOUT_S)
        except TimeoutError:
            raise GroupError(f"{self.transport}: gather {seq} did not start within {_READY_TIMEOUT_S} s"
                             f"{self.log_tail()}") from None
        if msg.get("op") != "started":
            raise GroupError(f"{self.transport}: unexpected message {msg!r}")
        started = time.monotonic()
        try:
            msg = self._recv(started + cap)
        except TimeoutError:
            return {"capped": True, "seconds": cap}
        if msg.get("op") != "result":
            raise GroupError(f"{self.transport}: unexpected message {msg!r}")
        msg.pop("op")
        msg["capped"] = False
        return msg

    def close(self, timeout: float = 30.0) -> None:
        """Ask the workers to quit, wait for them; kill them if they do not."""
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self._send({"op": "quit"})
            end = time.monotonic() + timeout
            for p in self.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=max(0.1, end - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        """Kill every worker of this group (and anything left in the cluster's host namespaces)."""
        if self.mpiexec is not None and self.mpiexec.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.mpiexec.pid, signal.SIGKILL)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        # Workers and the delay lines are the only processes in the cluster's host namespaces (built by this run).
        ip = shutil.which("ip") or "/usr/sbin/ip"
        lines = {str(pid) for pid in self.c.delay_line_pids()} if self.c.hosts else set()
        for ns in self.c.hosts:
            out = subprocess.run([ip, "netns", "pids", ns], capture_output=True, text=True).stdout
            for tok in set(out.split()) - lines:
                with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
                    os.kill(int(tok), signal.SIGKILL)
        for s in (self.conn, self.listener):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()
        self.conn = None
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            self.log.close()


def mpiexec_path() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    found = str(here) if here.exists() else shutil.which("mpiexec")
    if not found:
        raise GroupError("mpiexec not found (pip install mpich mpi4py)")
    return found


def mpi_env(provider: str, extra: str = "") -> dict[str, str]:
    env = dict(MPI_ENV)
    env["FI_PROVIDER"] = provider
    for item in filter(None, (x.strip() for x in extra.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--mpi-env: expected KEY=VALUE, got {item!r}")
        env[key] = value
    return env


# ----------------------------------------------------------------------------------------------------------
# measuring one transport at one configuration
# ----------------------------------------------------------------------------------------------------------


def _expected_seconds(n: int, d: int, ingest_bps: float, stride: int = 1424, datagram: int = 1472) -> float:
    return n * d * 4 * (datagram / stride) * 8 / ingest_bps


def lossympi_deadline(n: int, d: int, args: argparse.Namespace) -> float:
    rate = (args.ingest_gbps or args.deadline_gbps) * 1e9
    return max(args.min_deadline, args.deadline_factor * _expected_seconds(n, d, rate))


def _measure(group: Group, transport: str, n: int, d: int, args: argparse.Namespace, seq: itertools.count,
             mem: dict[str, Any]) -> dict[str, Any]:
    deadline = lossympi_deadline(n, d, args)
    cap = deadline + 60.0 if transport == "lossympi" else args.cap
    budget = max(args.cap, 2 * deadline) if transport == "lossympi" else args.cap
    t_start = time.monotonic()
    warm = group.gather(next(seq), cap, deadline)
    _memory(mem)
    runs: list[dict[str, Any]] = []
    warmup_counted = False
    if warm["capped"] or warm["seconds"] > budget / (args.repeats + 1):
        runs.append(warm)  # slow enough that the warm-up is a measurement; no time for more
        warmup_counted = True
    last = warm["seconds"]
    while not runs or (len(runs) < args.repeats and not runs[-1]["capped"]):
        spent = time.monotonic() - t_start
        if runs and spent + last > budget:
            break
        r = group.gather(next(seq), cap, deadline)
        _memory(mem)
        runs.append(r)
        last = r["seconds"]
    out: dict[str, Any] = {
        "seconds": median(r["seconds"] for r in runs),
        "capped": any(r["capped"] for r in runs),
        "runs_s": [round(r["seconds"], 4) for r in runs],
        "warmup_s": round(warm["seconds"], 4),
        "warmup_counted": warmup_counted,
        "repeats_done": len(runs),
    }
    done = [r for r in runs if not r["capped"]]
    out["verified"] = all(r.get("verified", False) for r in done) if transport != "lossympi" else None
    if transport == "lossympi":
        out["deadline_s"] = round(deadline, 4)
        out["data_seconds"] = median(r["data_seconds"] for r in done)
        out["runs_data_s"] = [round(r["data_seconds"], 4) for r in done]
        out["delivered"] = sum(r["delivered"] for r in done) / len(done) if done else None
        out["runs_delivered"] = [round(r["delivered"], 6) for r in done]
        out["match_fraction"] = sum(r["match_fraction"] for r in done) / len(done) if done else None
        out["complete_runs"] = sum(bool(r["complete"]) for r in done)
        out["overflow"] = sum(r["overflow"] for r in done)
        out["credits_sent"] = sum(r.get("credits_sent", 0) for r in done)  # the root's grants (protocol.md, Incast)
        out["stale"] = sum(r.get("stale", 0) for r in done)  # arrived after their receive had ended
        out["rejected"] = sum(r["rejected"] for r in done)
        # A delivered value that differs from the one sent would be a transport bug: lost chunks are 0.
        out["verified"] = all(abs(r["match_fraction"] - r["delivered"]) < 0.02 for r in done)
    return out


def drop_counters(cluster: Any) -> dict[str, int]:
    """Kernel drop counters: UDP receive-buffer drops in the root's namespace, and the machine's
    ``softnet_stat`` drops (packets refused by a full per-CPU backlog, ``net.core.netdev_max_backlog``; veths
    deliver through it)."""
    out: dict[str, int] = {}
    res = cluster.run(0, ["cat", "/proc/net/snmp"], capture_output=True, text=True, timeout=30)
    lines = [ln.split() for ln in res.stdout.splitlines() if ln.startswith("Udp:")]
    if len(lines) >= 2:
        fields = dict(zip(lines[0][1:], lines[1][1:], strict=False))
        for k in ("RcvbufErrors", "InErrors", "InDatagrams"):
            if k in fields:
                out[f"udp_{k}"] = int(fields[k])
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/net/softnet_stat") as fh:
        out["softnet_dropped"] = sum(int(ln.split()[1], 16) for ln in fh if ln.strip())
    # The root's veth: with GRO on, packets wait in its NAPI ring (256), which drops when the root's softirq lags.
    links = (("root_eth0_rx_dropped", cluster.command(0, ["ip", "-s", "-j", "link", "show", "eth0"]), "rx"),
             ("bridge_h0_tx_dropped", ["ip", "-n", cluster.bridge, "-s", "-j", "link", "show", "h0"], "tx"))
    for key, argv, way in links:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        with contextlib.suppress(ValueError, IndexError, KeyError, TypeError):
            out[key] = int(json.loads(res.stdout)[0]["stats64"][way]["dropped"])
    return out


def _memory(mem: dict[str, Any]) -> None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    mem["min_available_bytes"] = min(mem.get("min_available_bytes", avail), avail)
                    return
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------------------
# records
# ----------------------------------------------------------------------------------------------------------


def _r(x: Any, digits: int = 4) -> Any:
    return round(x, digits) if isinstance(x, float) and math.isfinite(x) else x


def _div(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def make_record(n: int, d: int, loss: float, per: dict[str, dict[str, Any]], args: argparse.Namespace,
                delay_ms: float = 0.0) -> dict[str, Any]:
    def sec(t: str, key: str = "seconds") -> float | None:
        return _r(per[t].get(key)) if t in per and per[t].get(key) is not None else None

    def capped(t: str) -> bool | None:
        return per[t].get("capped") if t in per and "capped" in per[t] else None

    lm, lm_data = sec("lossympi"), sec("lossympi", "data_seconds")
    grpc_s, mpi_s, tcp_s = sec("grpc"), sec("mpi"), sec("tcp")
    delivered = per.get("lossympi", {}).get("delivered")
    total = n * d * 4
    rec: dict[str, Any] = {
        "n": n, "d": d, "loss": loss, "delay_ms": delay_ms, "rtt_ms": 2 * delay_ms, "bytes_per_sender": d * 4,
        "total_bytes": total,
        "lossympi_s": lm, "grpc_s": grpc_s, "mpi_s": mpi_s, "tcp_s": tcp_s,
        "lossympi_data_s": lm_data,
        "delivered_fraction": _r(delivered, 6),
        "deadline_s": _r(lossympi_deadline(n, d, args)),
        "capped": {t: capped(t) for t in TRANSPORTS if t in per},
        "speedup_vs_grpc": _div(grpc_s, lm), "speedup_vs_mpi": _div(mpi_s, lm), "ratio_vs_tcp": _div(lm, tcp_s),
        "speedup_vs_grpc_data": _div(grpc_s, lm_data), "speedup_vs_mpi_data": _div(mpi_s, lm_data),
        "ratio_vs_tcp_data": _div(lm_data, tcp_s),
        "goodput_gbps": {t: _div(total * 8 / 1e9 * (delivered if t == "lossympi" and delivered else 1.0), s)
                         for t, s in (("lossympi", lm), ("grpc", grpc_s), ("mpi", mpi_s), ("tcp", tcp_s))
                         if s is not None},
    }
    # A capped baseline is a lower bound on its time, hence on lossympi's speedup over it.
    rec["lower_bound"] = {"speedup_vs_grpc": bool(capped("grpc")), "speedup_vs_mpi": bool(capped("mpi")),
                          "ratio_vs_tcp": bool(capped("tcp"))}
    targets: dict[str, Any] = {}
    if math.isclose(loss, 0.05):
        targets["speedup_vs_grpc"] = _target(rec["speedup_vs_grpc"], TARGET_SPEEDUP_VS_GRPC, ">=")
        targets["speedup_vs_mpi"] = _target(rec["speedup_vs_mpi"], TARGET_SPEEDUP_VS_MPI, ">=")
        targets["speedup_vs_grpc_data"] = _target(rec["speedup_vs_grpc_data"], TARGET_SPEEDUP_VS_GRPC, ">=")
        targets["speedup_vs_mpi_data"] = _target(rec["speedup_vs_mpi_data"], TARGET_SPEEDUP_VS_MPI, ">=")
        if delay_ms > 0:
            targets["speedup_vs_tcp"] = _target(_div(tcp_s, lm), TARGET_SPEEDUP_VS_TCP_DELAYED, ">=")
    if loss > 0:
        targets["delivered_fraction"] = _target(rec["delivered_fraction"], 1 - TARGET_LOSS_FACTOR * loss, ">=")
    if loss == 0:
        targets["ratio_vs_tcp"] = _target(rec["ratio_vs_tcp"], TARGET_RATIO_VS_TCP, "<=")
    rec["targets"] = targets
    rec["transports"] = {t: {k: _r(v, 6) for k, v in per[t].items()} for t in TRANSPORTS if t in per}
    return rec


def _target(got: float | None, want: float, op: str) -> dict[str, Any]:
    met = None if got is None else (got >= want if op == ">=" else got <= want)
    return {"want": f"{op} {round(want, 4)}", "got": got, "met": met}


# ----------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "ingest_bps": args.ingest_gbps * 1e9,
        "ingest": "credits" + (f" + {args.ingest_gbps:g} Gbit/s cap" if args.ingest_gbps else " (no rate cap)"),
        "deadline_rule": f"max({args.min_deadline} s, {args.deadline_factor} x n*d*4*(1472/1424)*8/"
                         f"{(args.ingest_gbps or args.deadline_gbps):g} Gbit/s)",
        "cap_s": args.cap, "repeats": args.repeats, "rate": args.rate, "root_nice": args.root_nice,
        "delay_ms": _floats(args.delay_ms), "jitter_ms": args.jitter_ms,
        "plus": [list(c) for c in _plus(args)],
        "jitter_reorders": not args.no_reorder,
        "mpi_env": mpi_env(args.mpi_provider, args.mpi_env),
        "baselines": "lossympi.baselines (tcp, grpc, mpi): the code of aggregathor --transport tcp|grpc|mpi",
        "loss_applied": "nftables drop of packets entering the root (direction 'in' on host 0's link)",
        "per_packet_loss": not args.keep_gso,
    }


def _link(args: argparse.Namespace, loss: float = 0.0, delay_ms: float = 0.0) -> Any:
    """A host's link: ``loss`` (the root's), ``--rate``, and the delay of what the host receives."""
    from lossympi.netem import LinkSpec

    return LinkSpec(loss=loss, rate=args.rate, delay=delay_ms / 1e3, jitter=args.jitter_ms / 1e3,
                    jitter_reorders=not args.no_reorder)


def _load(files: str) -> dict[str, Any]:
    merged: dict[tuple[int, int, float, float], dict[str, Any]] = {}
    base: dict[str, Any] = {}
    sources = []
    for f in [x for x in files.split(",") if x.strip()]:
        data = json.loads(Path(f).read_text())
        base = base or data
        sources.append({"file": f, "command": data.get("command")})
        for rec in data.get("records", []):
            merged[(rec["n"], rec["d"], float(rec.get("delay_ms", 0.0)), float(rec["loss"]))] = rec
    out = dict(base)
    out["records"] = [merged[k] for k in sorted(merged)]
    out["sources"] = sources
    return out


def _plus(args: argparse.Namespace) -> list[tuple[int, int, float]]:
    """The ``--plus N:D:DELAY_MS`` configurations; SystemExit naming a malformed one."""
    out = []
    for spec in args.plus:
        parts = spec.split(":")
        try:
            n, d, delay = int(float(parts[0])), int(float(parts[1])), float(parts[2])
        except (ValueError, IndexError):
            raise SystemExit(f"--plus {spec!r}: expected N:D:DELAY_MS, e.g. 16:25000000:1") from None
        if len(parts) != 3 or n < 1 or d < 1 or not 0 <= delay < 1000:
            raise SystemExit(f"--plus {spec!r}: expected N:D:DELAY_MS with N, D >= 1 and 0 <= DELAY_MS < 1000")
        out.append((n, d, delay))
    return out


def configurations(args: argparse.Namespace) -> list[tuple[int, int, float]]:
    """Every ``(n, d, delay_ms)`` the run measures: the product of ``--n``, ``--d`` and ``--delay-ms``, then
    ``--plus`` (duplicates once)."""
    grid = itertools.product(_ints(args.n), _ints(args.d), _floats(args.delay_ms))
    return list(dict.fromkeys([*grid, *_plus(args)]))


def _check(args: argparse.Namespace) -> tuple[list[int], list[int], list[float], list[str]]:
    """The ``n``, ``d``, loss and transport lists of ``args``; SystemExit naming the first bad one."""
    ns, ds, losses = _ints(args.n), _ints(args.d), _floats(args.loss)
    delays = _floats(args.delay_ms)
    if not delays or not all(0 <= x < 1000 for x in delays):
        raise SystemExit("--delay-ms must be delays in ms in [0, 1000), e.g. 0,1,5")
    _plus(args)
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    bad = [t for t in transports if t not in TRANSPORTS]
    if bad or not transports:
        raise SystemExit(f"unknown transport(s) {bad}; choose among {', '.join(TRANSPORTS)}")
    if not ns or min(ns) < 1 or not ds or min(ds) < 1 or not losses or not all(0 <= p < 1 for p in losses):
        raise SystemExit("--n and --d must be positive integers and --loss probabilities in [0, 1)")
    if args.repeats < 1 or args.cap <= 0:
        raise SystemExit("--repeats must be >= 1 and --cap > 0")
    return ns, ds, losses, transports


class _Run:
    """One measuring invocation: its settings, what it gathered so far, and the result being built."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.t_start = time.monotonic()
        self.meter = CpuMeter()
        self.host = host_info()
        self.mem: dict[str, Any] = {}
        _memory(self.mem)
        self.mem["start_available_bytes"] = self.mem.get("min_available_bytes")
        self.seq = itertools.count()
        self.hellos: dict[str, Any] = {}
        self.errors: list[str] = []
        self.cluster_info: dict[str, Any] = {}
        self.records: list[dict[str, Any]] = []
        self.delay = 0.0  # ms, of the configuration being measured
        self.result: dict[str, Any] = {"benchmark": "gather", "settings": _settings(args), "records": self.records}

    def finish(self) -> dict[str, Any]:
        _finish(self.result, self.host, self.meter, self.mem, self.hellos, self.cluster_info, self.errors,
                self.t_start)
        return self.result

    def configuration(self, n: int, d: int, losses: list[float], transports: list[str], delay: float = 0.0
                      ) -> None:
        """Every transport at every loss level on one cluster of ``n + 1`` hosts whose links delay what they
        receive by ``delay`` ms."""
        from lossympi.netem import Cluster

        args = self.args
        t_nd = time.monotonic()
        meter_nd = CpuMeter()
        per: dict[float, dict[str, dict[str, Any]]] = {p: {} for p in losses}
        log(f"n={n} d={d}: building a cluster of {n + 1} hosts" + (f", RTT {2 * delay:g} ms" if delay else ""))
        self.delay = delay
        with Cluster(n + 1, link=_link(args, 0.0, delay), per_host={0: _link(args, losses[0], delay)},
                     per_packet=not args.keep_gso, strict=delay > 0) as c:
            self.cluster_info = c.describe()
            if not args.keep_gso:
                self.cluster_info["offloads_root"] = c.offloads[0]
            for t in transports:
                self.transport(c, t, n, d, losses, per)
            self.cluster_info["delay_lines"] = c.delay_line_stats()  # kernel queue counters: drops = saturation
        contention = meter_nd.stop()
        for p in losses:
            self.records.append({**make_record(n, d, p, per[p], args, delay), "contention": contention})
        if (contention.get("foreign_cpu_fraction") or 0) > 0.05:
            log(f"warning: other processes used {100 * contention['foreign_cpu_fraction']:.0f}% of the CPUs "
                f"during n={n} d={d}: rerun it on an idle machine")
        log(f"n={n} d={d}: done in {time.monotonic() - t_nd:.0f} s")
        if args.save:
            Path(args.save).write_text(json.dumps(self.finish(), indent=2) + "\n")

    def transport(self, c: Any, t: str, n: int, d: int, losses: list[float],
                  per: dict[float, dict[str, dict[str, Any]]]) -> None:
        """One transport's processes across the loss levels (restarted after a failure or a capped gather)."""
        group: Group | None = None
        start_failed: str | None = None
        try:
            for p in losses:
                if start_failed is not None:  # do not wait for a broken launch at every level
                    per[p][t] = {"seconds": None, "capped": None, "error": start_failed}
                    continue
                c.set_link(0, _link(self.args, p, self.delay))
                t0 = time.monotonic()
                try:
                    if group is None:
                        group = Group(c, t, n, d, self.args, self.workdir)
                        try:
                            self.hellos[t] = {k: v for k, v in group.start().items() if k != "op"}
                        except (GroupError, OSError) as exc:
                            start_failed = f"could not start: {str(exc).splitlines()[0]}"
                            raise
                    m = self.level(c, group, t, n, d)
                except (GroupError, OSError, ValueError) as exc:
                    self.errors.append(f"n={n} d={d} loss={p} {t}: {exc}")
                    log(f"error: {self.errors[-1]}")
                    m = {"seconds": None, "capped": None, "error": str(exc).splitlines()[0]}
                    if group is not None:
                        group.kill()
                        group = None
                m["wall_s"] = round(time.monotonic() - t0, 2)
                per[p][t] = m
                _log_level(n, d, p, t, m)
                if m.get("capped") and group is not None:
                    group.kill()  # a transfer is still in flight: start afresh at the next level
                    group = None
        finally:
            if group is not None:
                group.close()

    def level(self, c: Any, group: Group, t: str, n: int, d: int) -> dict[str, Any]:
        """The gathers of one transport at the current loss level, with the kernel's drop counters."""
        drops0 = drop_counters(c)
        m = _measure(group, t, n, d, self.args, self.seq, self.mem)
        drops1 = drop_counters(c)
        m["kernel_drops"] = {k: drops1[k] - drops0[k] for k in drops1 if k in drops0}
        return m


def _log_level(n: int, d: int, p: float, t: str, m: dict[str, Any]) -> None:
    extra = ""
    if t == "lossympi" and m.get("delivered") is not None:
        extra = (f" (data {fmt(m['data_seconds'], 3)} s, delivered {fmt(m['delivered'], 4)}, deadline "
                 f"{fmt(m['deadline_s'], 3)} s)")
    log(f"n={n} d={d} loss={p} {t}: {fmt(m['seconds'], 3)} s per gather"
        f"{' (capped: lower bound)' if m.get('capped') else ''}{extra} "
        f"[{m.get('repeats_done', 0)} runs, {m['wall_s']} s]")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.from_json:
        result = _load(args.from_json)
    else:
        from lossympi.netem import require_root_reason

        _, _, losses, transports = _check(args)
        reason = require_root_reason()
        if reason:
            raise SystemExit(f"cannot build an emulated cluster here: {reason}")
        workdir = Path(tempfile.mkdtemp(prefix="lmgather"))
        try:
            state = _Run(args, workdir)
            for n, d, delay in configurations(args):
                state.configuration(n, d, losses, transports, delay)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        result = state.finish()
    if args.plot:
        plot(result, args.plot)
        result["plot"] = args.plot
    if args.save and not args.from_json:
        Path(args.save).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _finish(result: dict[str, Any], host: dict[str, Any], meter: CpuMeter, mem: dict[str, Any],
            hellos: dict[str, Any], cluster_info: dict[str, Any], errors: list[str], t_start: float) -> None:
    result["host"] = host
    result["memory"] = {**mem, "total_bytes": _mem_total()}
    result["transport_info"] = hellos
    caps = cluster_info.get("capabilities", {})
    result["cluster"] = {"capabilities": caps, "mtu": cluster_info.get("mtu"),
                         "segmentation_offloads_root": cluster_info.get("offloads_root"),
                         "root_link_applied": (cluster_info.get("hosts") or [{}])[0].get("applied"),
                         "delay_lines": cluster_info.get("delay_lines")}
    result["errors"] = errors
    result["contention"] = meter.stop()
    result["elapsed_s"] = round(time.monotonic() - t_start, 1)


def _mem_total() -> int | None:
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


# ----------------------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------------------


def _human(d: int) -> str:
    return f"{d / 1e6:g}M" if d >= 1e6 else (f"{d / 1e3:g}k" if d >= 1e3 else str(d))


def _cell(rec: dict[str, Any], t: str) -> str:
    s = rec.get(f"{t}_s")
    if s is None:
        return "-"
    return (">" if rec.get("capped", {}).get(t) else "") + f"{s:.3f}"


def _x(v: float | None, lower: bool = False) -> str:
    return "-" if v is None else (">" if lower else "") + f"{v:.2f}x"


def render(res: dict[str, Any]) -> str:
    rows = []
    for rec in res["records"]:
        lb = rec.get("lower_bound", {})
        rows.append([rec["n"], _human(rec["d"]), f"{rec.get('rtt_ms', 0):g}", f"{100 * rec['loss']:g}%",
                     _cell(rec, "lossympi"),
                     "-" if rec.get("lossympi_data_s") is None else f"{rec['lossympi_data_s']:.3f}",
                     "-" if rec.get("delivered_fraction") is None else f"{rec['delivered_fraction']:.4f}",
                     _cell(rec, "grpc"), _cell(rec, "mpi"), _cell(rec, "tcp"),
                     _x(rec.get("speedup_vs_grpc"), lb.get("speedup_vs_grpc", False)),
                     _x(rec.get("speedup_vs_mpi"), lb.get("speedup_vs_mpi", False)),
                     _x(rec.get("ratio_vs_tcp")),
                     _x(rec.get("speedup_vs_grpc_data"), lb.get("speedup_vs_grpc", False)),
                     _x(rec.get("speedup_vs_mpi_data"), lb.get("speedup_vs_mpi", False)),
                     _x(rec.get("ratio_vs_tcp_data"))])
    s = res.get("settings", {})
    h = res.get("host", {})
    lines = [
        "gather of n senders x d float32 to one root; loss on packets entering the root; seconds per gather "
        "(median); '>' = capped (lower bound)",
        f"lossympi: ingest_bps {s.get('ingest_bps', 0) / 1e9:g} Gbit/s, deadline {s.get('deadline_rule')}; "
        f"cap {s.get('cap_s')} s; link rate {s.get('rate') or 'unlimited'}",
        f"host: nproc {h.get('nproc')}, {h.get('cpu_model')}, kernel {h.get('kernel')}",
        "",
        table(["n", "d", "rtt ms", "loss", "lossympi s", "lm data s", "delivered", "grpc s", "mpi s", "tcp s",
               "vs grpc", "vs mpi", "lm/tcp", "data vs grpc", "data vs mpi", "data/tcp"], rows),
        "",
        "vs grpc / vs mpi: their time / lossympi's Gather time; lm/tcp: lossympi's / TCP's; 'data' columns use "
        "lossympi's last-datagram time instead (what it would take with an end-of-transfer signal)",
    ]
    if res.get("errors"):
        lines += ["", "errors:", *(f"  {e}" for e in res["errors"])]
    if res.get("plot"):
        lines.append(f"plot: {res['plot']}")
    if res.get("command"):
        lines.append(f"reproduce: {res['command']}")
    return "\n".join(lines)


_STYLE = {"lossympi": ("tab:blue", "o"), "grpc": ("tab:red", "s"), "mpi": ("tab:green", "D"),
          "tcp": ("tab:gray", "v")}


def plot(res: dict[str, Any], path: str) -> None:
    """Seconds per gather vs loss, one line per transport, one panel per (n, d)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = res["records"]
    panels = sorted({(r["n"], r["d"], r.get("rtt_ms", 0)) for r in recs}, key=lambda k: (k[1], k[0], k[2]))
    if not panels:
        return
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.0 * nrows), squeeze=False)
    for ax, (n, d, rtt) in zip(axes.flat, panels, strict=False):
        rs = sorted((r for r in recs if (r["n"], r["d"], r.get("rtt_ms", 0)) == (n, d, rtt)),
                    key=lambda r: r["loss"])
        x = [100 * r["loss"] for r in rs]
        for t in TRANSPORTS:
            ys = [r.get(f"{t}_s") for r in rs]
            pts = [(xi, yi, bool(r.get("capped", {}).get(t))) for xi, yi, r in zip(x, ys, rs, strict=True)
                   if yi is not None]
            if not pts:
                continue
            color, marker = _STYLE[t]
            label = {"lossympi": "lossympi (Gather wall time)", "grpc": "gRPC", "mpi": "MPI (MPICH, TCP)",
                     "tcp": "raw TCP"}[t]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, marker=marker, label=label)
            capped = [p for p in pts if p[2]]
            if capped:
                ax.scatter([p[0] for p in capped], [p[1] for p in capped], marker="^", s=120, facecolors="none",
                           edgecolors=color, zorder=5, label=f"{t} capped (lower bound)")
        data = [(xi, r.get("lossympi_data_s")) for xi, r in zip(x, rs, strict=True) if r.get("lossympi_data_s")]
        if data:
            ax.plot([p[0] for p in data], [p[1] for p in data], color=_STYLE["lossympi"][0], linestyle="--",
                    marker=".", label="lossympi (last datagram in)")
        ax.set_yscale("log")
        ax.set_xlabel("loss on the root's link (%)")
        ax.set_ylabel("seconds per gather")
        ax.set_title(f"n={n} senders, d={_human(d)} float32 ({n * d * 4 / 1e6:.0f} MB), RTT {rtt:g} ms", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xticks(sorted(set(x)))
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = {}, {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
            labels[lab] = lab
    fig.legend(list(handles.values()), list(labels), loc="lower center", ncol=min(4, len(handles)), fontsize=8)
    s = res.get("settings", {})
    fig.suptitle(f"Gather to one root on an emulated cluster (lossympi ingest {s.get('ingest_bps', 0) / 1e9:g} "
                 f"Gbit/s, deadline {s.get('deadline_rule', '')})", fontsize=9)
    fig.tight_layout(rect=(0, 0.07 if nrows == 1 else 0.04, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
