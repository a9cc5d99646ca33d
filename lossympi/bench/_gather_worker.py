"""One rank of ``python -m lossympi.bench gather``, run inside a host namespace of the emulated cluster.

Started by :mod:`lossympi.bench.gather` (never by hand) as::

    python -m lossympi.bench._gather_worker --transport T --d D --ctl PATH ...

with the ``LOSSYMPI_*`` variables of its rank (lossympi, tcp, grpc: they bootstrap with
:func:`lossympi.bootstrap.from_env`, which gives them their pair keys and the control star); for ``mpi`` the rank
and size come from ``mpiexec``. Rank 0 is the root: it connects to the orchestrator's Unix socket (``--ctl``; a
path in the file system, so it crosses network namespaces without any network traffic), says hello, then runs
one gather per ``{"op": "gather"}`` command and answers with its result; it relays every command to the senders
through the transport's own reliable channel (lossympi's and the baselines' authenticated control star; MPI's
byte broadcast). Senders build their row once: ``row[i] = 1000 * rank + i % 997`` (float32, exact), so the root
can check where every value landed.

TCP, gRPC and MPI move the rows with :mod:`lossympi.baselines`, the very code of aggregathor's ``--transport
tcp|grpc|mpi``: authenticated data links, frames checked before a byte reaches a row, gathers into preallocated
rows.

Timing, on the root: ``t0`` is taken once every sender said it is ready, just before the root tells them to
go (for MPI: right after a ``Barrier``); the gather ends when the last byte is in the root's buffer (TCP,
gRPC, MPI) or when ``Comm.aio.Gather`` returns (lossympi: every chunk arrived, or the deadline passed). The
root sends ``{"op": "started"}`` to the orchestrator at ``t0``, so the orchestrator can cap a gather that
takes too long (it then kills the whole group).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np

from lossympi.bench.common import last_arrival

TRANSPORTS = ("lossympi", "grpc", "mpi", "tcp")
_CONNECT_TIMEOUT_S = 120.0
_POLL_S = 0.002
_SAMPLE = 1 << 20  # elements of each row checked after a gather


def row_values(rank: int, d: int) -> np.ndarray:
    """The row that ``rank`` sends: ``1000 * rank + i % 997`` as float32 (exact integers)."""
    out = np.arange(d, dtype=np.int64)
    np.remainder(out, 997, out=out)
    out += 1000 * rank
    return out.astype(np.float32)


def check_rows(rows: np.ndarray, root: int = 0) -> dict[str, Any]:
    """Compare a strided sample of every received row with what its sender sent.

    Returns ``match_fraction`` (sampled values equal to the sent ones; lossympi fills lost chunks with 0,
    never a valid value) and ``verified`` (every sampled value matches).
    """
    n_rows, d = rows.shape
    step = max(1, d // _SAMPLE)
    idx = np.arange(0, d, step, dtype=np.int64)
    expect_base = (idx % 997).astype(np.float32)
    good = total = 0
    for r in range(n_rows):
        if r == root:
            continue
        got = rows[r, ::step]
        good += int(np.count_nonzero(got == expect_base + np.float32(1000 * r)))
        total += got.size
    frac = good / total if total else 1.0
    return {"match_fraction": frac, "verified": good == total}


def _touched(shape: tuple[int, int]) -> np.ndarray:
    """A zeroed float32 array whose pages are already mapped (no page faults during the first gather)."""
    out = np.empty(shape, np.float32)
    out.fill(0)
    return out


def _log(msg: str) -> None:
    print(f"[gather-worker {os.getpid()}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# channel to the orchestrator (root only)
# ----------------------------------------------------------------------------------------------------------


class Orchestrator:
    """JSON lines over the orchestrator's Unix socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.rfile = self.sock.makefile("rb")
        self.lock = threading.Lock()

    def send(self, obj: dict[str, Any]) -> None:
        data = (json.dumps(obj) + "\n").encode()
        with self.lock:
            self.sock.sendall(data)

    def recv(self) -> dict[str, Any]:
        line = self.rfile.readline()
        if not line:
            return {"op": "quit"}
        return json.loads(line)


# ----------------------------------------------------------------------------------------------------------
# the loops every transport with an event loop shares (tcp, grpc, lossympi)
# ----------------------------------------------------------------------------------------------------------

#: ``gather_once(cmd, go)``: one timed gather; ``go()`` tells the senders to start. Returns the result's fields.
GatherOnce = Callable[[dict[str, Any], Callable[[], Awaitable[Any]]], Awaitable[dict[str, Any]]]


async def _root_loop(orch: Orchestrator, control: Any, rows: np.ndarray, gather_once: GatherOnce) -> None:
    """The root: relay each orchestrator command to the senders over ``control`` (anything with lossympi's
    ``bcast_bytes``/``gather_bytes``), wait until they are ready, gather, check the rows, answer."""
    loop = asyncio.get_running_loop()
    while True:
        cmd = await loop.run_in_executor(None, orch.recv)
        await control.bcast_bytes(json.dumps(cmd).encode())
        if cmd["op"] != "gather":
            return
        await control.gather_bytes(b"ready")
        res = await gather_once(cmd, lambda: control.bcast_bytes(b"go"))
        res.update(check_rows(rows))
        orch.send({"op": "result", **res})
        rows.fill(0)


async def _sender_gathers(control: Any) -> AsyncIterator[dict[str, Any]]:
    """A sender's side of :func:`_root_loop`: each gather's command, once the root said go; ends at ``quit``."""
    while True:
        cmd = json.loads(await control.bcast_bytes(None))
        if cmd["op"] != "gather":
            return
        await control.gather_bytes(b"ready")
        await control.bcast_bytes(None)  # go
        yield cmd


def _run(main: Callable[[], Awaitable[None]]) -> None:
    from lossympi.endpoint import new_event_loop

    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


# ---- raw TCP and gRPC: lossympi.baselines, the code that aggregathor trains with


def baseline_main(args: argparse.Namespace) -> None:
    """``tcp`` or ``grpc``: every rank bootstraps with ``from_env`` (its keys and the control star), then the
    baseline's root (:class:`~lossympi.baselines.tcp.TCPRoot`, :class:`~lossympi.baselines.grpc.GrpcRoot`) gathers
    what its senders send, as in training."""
    from lossympi.baselines import GrpcRoot, GrpcSender, TCPRoot, TCPSender
    from lossympi.bootstrap import from_env

    world = from_env(timeout=_CONNECT_TIMEOUT_S)
    kw: dict[str, Any] = {"control_timeout": 3600.0, "stall_timeout": 3600.0}
    if args.transport == "grpc":
        kw["max_message_bytes"] = max(256 << 20, 4 * args.d + (1 << 16))
    root_cls, sender_cls = {"tcp": (TCPRoot, TCPSender), "grpc": (GrpcRoot, GrpcSender)}[args.transport]
    end = root_cls(world, **kw) if world.rank == 0 else sender_cls(world, **kw)
    try:
        _run(lambda: _baseline_root(args, end) if world.rank == 0 else _baseline_sender(args, end))
    finally:
        end.close()
        world.close()


async def _baseline_root(args: argparse.Namespace, root: Any) -> None:
    d, grpc = args.d, args.transport == "grpc"
    await root.connect()
    orch = Orchestrator(args.ctl)
    rows = _touched((root.size, d))
    own = row_values(0, d)
    hello: dict[str, Any] = {"transport": args.transport, "baseline": type(root).__module__}
    if grpc:
        hello["grpc"] = __import__("grpc").__version__
    orch.send({"op": "hello", **hello})

    async def gather_once(cmd: dict[str, Any], go: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
        rnd = int(cmd["seq"])
        if grpc:
            root.expect(rnd, np.float32, 4 * d)
        t0 = time.monotonic()
        orch.send({"op": "started"})
        task = asyncio.ensure_future(root.gather(rows, rnd, t0 + float(cmd["cap"]) + 60.0))
        await asyncio.sleep(0)  # the gather is listening
        await go()
        rows[0] = own
        got = await task
        t1 = time.monotonic()
        return {"seconds": t1 - t0, "delivered": float(np.mean(got.delivered)), "rejected": got.rejected}

    await _root_loop(orch, root.control, rows, gather_once)


async def _baseline_sender(args: argparse.Namespace, sender: Any) -> None:
    row = row_values(sender.rank, args.d)
    await sender.connect()
    send = sender.send if args.transport == "tcp" else sender.push
    async for cmd in _sender_gathers(sender.control):
        await send(row, int(cmd["seq"]))


# ---- MPI: lossympi.baselines.mpi


def mpi_main(args: argparse.Namespace) -> None:
    """Ranks from ``mpiexec``; commands travel as fixed-size byte broadcasts, then a ``Barrier`` and the
    baseline's blocking ``Gather``."""
    from lossympi.baselines import MPIRoot, MPISender
    from lossympi.baselines.mpi import import_mpi

    if import_mpi().COMM_WORLD.Get_rank() != 0:
        sender = MPISender()
        row = row_values(sender.rank, args.d)
        while json.loads(sender.recv_bytes())["op"] == "gather":
            sender.barrier()
            sender.send(row)
        return
    root = MPIRoot()
    orch = Orchestrator(args.ctl)
    rows = _touched((root.size, args.d))
    own = row_values(0, args.d)
    orch.send({"op": "hello", "transport": "mpi", **root.library(), "size": root.size})
    while True:
        cmd = orch.recv()
        root.bcast_bytes(json.dumps(cmd).encode())
        if cmd["op"] != "gather":
            return
        root.barrier()
        t0 = time.monotonic()
        orch.send({"op": "started"})
        root.gather(rows)
        rows[0] = own
        t1 = time.monotonic()
        orch.send({"op": "result", "seconds": t1 - t0, "delivered": 1.0, **check_rows(rows)})
        rows.fill(0)


# ---- lossympi


def lossympi_main(args: argparse.Namespace) -> None:
    from lossympi.bootstrap import from_env
    from lossympi.comm import Comm

    world = from_env(timeout=_CONNECT_TIMEOUT_S)
    comm = Comm.from_world(world, ingest_bps=args.ingest_bps or None, control_timeout=3600.0, fill="zero")
    row = row_values(comm.rank, args.d)

    async def sender() -> None:
        async for cmd in _sender_gathers(comm.aio):
            await comm.aio.Gather(row, None, 0, timeout=float(cmd["deadline"]))

    try:
        _run(lambda: _lossympi_root(args, comm, row) if comm.rank == 0 else sender())
    finally:
        comm.close()


async def _lossympi_root(args: argparse.Namespace, comm: Any, row: np.ndarray) -> None:
    orch = Orchestrator(args.ctl)
    rows = _touched((comm.size, args.d))
    ep = comm.endpoint
    orch.send({"op": "hello", "transport": "lossympi", "ingest_bps": comm.ingest_bps, "gso": ep.gso,
               "gro": ep.gro, "auth": ep.auth, "rcvbuf": ep.rcvbuf, "sndbuf": ep.sndbuf,
               "datagram_bytes": ep.datagram_bytes, "stride": ep.stride,
               "incast": dict(zip(("rate_bps", "window_bytes"), comm.incast(comm.size - 1), strict=True))})

    async def gather_once(cmd: dict[str, Any], go: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
        before = ep.stats()
        t0 = time.monotonic()
        orch.send({"op": "started"})
        task = asyncio.ensure_future(comm.aio.Gather(row, rows, 0, deadline=t0 + float(cmd["deadline"]),
                                                     fill="zero"))
        await asyncio.sleep(0)  # the receives are posted
        await go()
        last_t = await last_arrival(ep, task, t0, _POLL_S)
        res = task.result()
        t1 = time.monotonic()
        after = ep.stats()
        st = res.stats()
        return {"seconds": t1 - t0, "data_seconds": (t1 - t0) if res.complete else last_t - t0,
                "delivered": float(res.delivered), "complete": bool(res.complete),
                "lost_chunks": int(st["lost_chunks"]), "received": int(st["received"]),
                "duplicate": int(st["duplicate"]), "rejected": int(st["rejected"]),
                "overflow": int(after["overflow"] - before["overflow"]),
                "credits_sent": int(after["credits_sent"] - before["credits_sent"]),
                "stale": int(after["stale"] - before["stale"]),  # datagrams of closed receives (late, or resent)
                "datagrams": int(after["datagrams"] - before["datagrams"])}

    await _root_loop(orch, comm.aio, rows, gather_once)


# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lossympi.bench._gather_worker")
    p.add_argument("--transport", choices=TRANSPORTS, required=True)
    p.add_argument("--d", type=int, required=True)
    p.add_argument("--ctl", default=None, help="orchestrator's Unix socket (root only)")
    p.add_argument("--ingest-bps", type=float, default=0.0, help="0: no cap (the root's credits pace the senders)")
    p.add_argument("--root-nice", type=int, default=0,
                   help="nice value of the root (rank 0), set before any thread starts so that all inherit it")
    args = p.parse_args(argv)
    rank = int(os.environ.get("PMI_RANK" if args.transport == "mpi" else "LOSSYMPI_RANK", "0"))
    if rank == 0 and args.root_nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.root_nice)
    fn = {"lossympi": lossympi_main, "grpc": baseline_main, "mpi": mpi_main, "tcp": baseline_main}[args.transport]
    try:
        fn(args)
    except BaseException:
        _log(f"{args.transport} rank {rank} failed:\n{traceback.format_exc()}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
