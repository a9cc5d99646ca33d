"""One rank of ``python -m lossympi.bench gather``, run inside a host namespace of the emulated cluster.

Started by :mod:`lossympi.bench.gather` (never by hand) as::

    python -m lossympi.bench._gather_worker --transport T --rank R --size N --d D --root-ip IP --port P ...

(for ``mpi`` the rank and size come from ``mpiexec``). Rank 0 is the root: it connects to the orchestrator's
Unix socket (``--ctl``; a path in the file system, so it crosses network namespaces without any network
traffic), says hello, then runs one gather per ``{"op": "gather"}`` command and answers with its result; it
relays every command to the senders through the transport's own reliable channel. Senders build their row
once: ``row[i] = 1000 * rank + i % 997`` (float32, exact), so the root can check where every value landed.

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
import selectors
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

TRANSPORTS = ("lossympi", "grpc", "mpi", "tcp")
GRPC_METHOD = "/lmgather.Gather/Push"
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
# a small star of TCP connections for commands (tcp and grpc transports)
# ----------------------------------------------------------------------------------------------------------

_LEN = struct.Struct(">I")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("peer closed the connection")
        got += k
    return bytes(buf)


def _send_msg(sock: socket.socket, obj: Any) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_msg(sock: socket.socket) -> Any:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    return json.loads(_recv_exact(sock, n))


def _connect(ip: str, port: int, timeout: float = _CONNECT_TIMEOUT_S) -> socket.socket:
    end = time.monotonic() + timeout
    while True:
        try:
            s = socket.create_connection((ip, port), timeout=5)
            s.settimeout(None)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


def _listen(ip: str, port: int, backlog: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port))
    s.listen(backlog)
    return s


def _accept_ranked(lst: socket.socket, count: int) -> dict[int, socket.socket]:
    """Accept ``count`` connections, each starting with its rank (u32)."""
    out: dict[int, socket.socket] = {}
    lst.settimeout(_CONNECT_TIMEOUT_S)
    while len(out) < count:
        s, _ = lst.accept()
        s.settimeout(None)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        (rank,) = _LEN.unpack(_recv_exact(s, _LEN.size))
        out[rank] = s
    return out


class Star:
    """Root <-> senders command channel over TCP (reliable; its packets to the root cross the lossy link)."""

    def __init__(self, rank: int, size: int, ip: str, port: int) -> None:
        self.rank, self.size = rank, size
        if rank == 0:
            lst = _listen(ip, port, size)
            try:
                self.peers = _accept_ranked(lst, size - 1)
            finally:
                lst.close()
        else:
            self.sock = _connect(ip, port)
            self.sock.sendall(_LEN.pack(rank))

    def bcast(self, obj: Any = None) -> Any:
        if self.rank == 0:
            for s in self.peers.values():
                _send_msg(s, obj)
            return obj
        return _recv_msg(self.sock)

    def gather(self, obj: Any) -> list[Any] | None:
        if self.rank == 0:
            return [obj] + [_recv_msg(self.peers[r]) for r in range(1, self.size)]
        _send_msg(self.sock, obj)
        return None

    def close(self) -> None:
        socks = list(self.peers.values()) if self.rank == 0 else [self.sock]
        for s in socks:
            s.close()


# ----------------------------------------------------------------------------------------------------------
# generic root / sender loops for the socket-based transports
# ----------------------------------------------------------------------------------------------------------


def _sender_gathers(star: Star) -> Iterator[dict[str, Any]]:
    """A sender's side of :func:`_root_loop`: each gather's command, once the root said go; ends at ``stop``."""
    while True:
        cmd = star.bcast()
        if cmd["op"] != "gather":
            return
        star.gather("ready")
        star.bcast()  # go
        yield cmd


def _root_loop(orch: Orchestrator, star: Star, rows: np.ndarray, own: np.ndarray,
               gather_once: Callable[[dict[str, Any], Callable[[], None]], dict[str, Any]],
               hello: dict[str, Any]) -> None:
    orch.send({"op": "hello", **hello})
    while True:
        cmd = orch.recv()
        star.bcast(cmd)
        if cmd["op"] != "gather":
            break
        star.gather("ready")

        def go() -> None:
            star.bcast("go")

        res = gather_once(cmd, go)
        rows[0] = own
        res.update(check_rows(rows))
        orch.send({"op": "result", **res})
        rows.fill(0)


# ---- raw TCP


def tcp_main(args: argparse.Namespace) -> None:
    rank, size, d = args.rank, args.size, args.d
    star = Star(rank, size, args.root_ip, args.port)
    if rank == 0:
        orch = Orchestrator(args.ctl)
        lst = _listen(args.root_ip, args.port + 1, size)
        conns = _accept_ranked(lst, size - 1)
        lst.close()
        rows = _touched((size, d))
        own = row_values(0, d)

        def gather_once(cmd: dict[str, Any], go: Callable[[], None]) -> dict[str, Any]:
            sel = selectors.DefaultSelector()
            views = {}
            for r, s in conns.items():
                s.setblocking(False)
                views[r] = memoryview(rows[r]).cast("B")
                sel.register(s, selectors.EVENT_READ, r)
            got = dict.fromkeys(conns, 0)
            nbytes = d * 4
            left = len(conns)
            t0 = time.monotonic()
            orch.send({"op": "started"})
            go()
            rows[0] = own
            while left:
                for key, _ in sel.select():
                    r = key.data
                    try:
                        k = key.fileobj.recv_into(views[r][got[r]:])  # type: ignore[union-attr]
                    except BlockingIOError:
                        continue
                    if k == 0:
                        raise ConnectionError(f"sender {r} closed after {got[r]} of {nbytes} bytes")
                    got[r] += k
                    if got[r] == nbytes:
                        sel.unregister(key.fileobj)
                        left -= 1
            t1 = time.monotonic()
            sel.close()
            for s in conns.values():
                s.setblocking(True)
            return {"seconds": t1 - t0, "delivered": 1.0}

        _root_loop(orch, star, rows, own, gather_once, {"transport": "tcp"})
        for s in conns.values():
            s.close()
    else:
        data = _connect(args.root_ip, args.port + 1)
        data.sendall(_LEN.pack(rank))
        row = row_values(rank, d)
        view = memoryview(row).cast("B")
        for _ in _sender_gathers(star):
            data.sendall(view)
        data.close()
    star.close()


# ---- gRPC


def grpc_main(args: argparse.Namespace) -> None:
    import grpc

    rank, size, d = args.rank, args.size, args.d
    nbytes = d * 4
    chunk = max(1, int(args.grpc_chunk))
    opts = [("grpc.max_receive_message_length", chunk + (1 << 16)),
            ("grpc.max_send_message_length", chunk + (1 << 16))]
    star = Star(rank, size, args.root_ip, args.port)
    if rank == 0:
        from concurrent.futures import ThreadPoolExecutor

        orch = Orchestrator(args.ctl)
        rows = _touched((size, d))
        views = [memoryview(rows[r]).cast("B") for r in range(size)]
        own = row_values(0, d)
        cond = threading.Condition()
        state: dict[str, Any] = {"seq": -1, "done": 0, "errors": []}

        def push(request_iterator: Any, context: Any) -> bytes:
            md = dict(context.invocation_metadata())
            r, seq = int(md["rank"]), int(md["seq"])
            view = views[r]
            off = 0
            for msg in request_iterator:
                k = len(msg)
                view[off:off + k] = msg
                off += k
            with cond:
                if seq == state["seq"]:
                    if off != nbytes:
                        state["errors"].append(f"rank {r}: {off} of {nbytes} bytes")
                    state["done"] += 1
                    cond.notify_all()
            return b"ok"

        handler = grpc.method_handlers_generic_handler(
            "lmgather.Gather", {"Push": grpc.stream_unary_rpc_method_handler(push)})
        server = grpc.server(ThreadPoolExecutor(max_workers=size + 4), handlers=[handler], options=opts,
                             maximum_concurrent_rpcs=None)
        server.add_insecure_port(f"{args.root_ip}:{args.port + 1}")
        server.start()

        def gather_once(cmd: dict[str, Any], go: Callable[[], None]) -> dict[str, Any]:
            with cond:
                state.update(seq=int(cmd["seq"]), done=0, errors=[])
            t0 = time.monotonic()
            orch.send({"op": "started"})
            go()
            rows[0] = own
            with cond:
                while state["done"] < size - 1:
                    cond.wait()
                errors = list(state["errors"])
            t1 = time.monotonic()
            if errors:
                raise RuntimeError("; ".join(errors))
            return {"seconds": t1 - t0, "delivered": 1.0}

        _root_loop(orch, star, rows, own, gather_once, {"transport": "grpc", "grpc": grpc.__version__})
        server.stop(grace=None)
    else:
        row = row_values(rank, d)
        view = memoryview(row).cast("B")
        channel = grpc.insecure_channel(f"{args.root_ip}:{args.port + 1}", options=opts)
        grpc.channel_ready_future(channel).result(timeout=_CONNECT_TIMEOUT_S)
        call = channel.stream_unary(GRPC_METHOD)

        def chunks() -> Any:
            for off in range(0, nbytes, chunk):
                yield bytes(view[off:off + chunk])

        for cmd in _sender_gathers(star):
            call(chunks(), metadata=(("rank", str(rank)), ("seq", str(cmd["seq"]))), timeout=float(cmd["cap"]) + 60)
        channel.close()
    star.close()


# ---- MPI


def mpi_main(args: argparse.Namespace) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size, d = comm.Get_rank(), comm.Get_size(), args.d
    row = row_values(rank, d)
    if rank == 0:
        orch = Orchestrator(args.ctl)
        rows = _touched((size, d))
        orch.send({"op": "hello", "transport": "mpi", "library": MPI.Get_library_version().splitlines()[0],
                   "mpi4py": __import__("mpi4py").__version__, "size": size})
    else:
        orch, rows = None, None
    while True:
        cmd = orch.recv() if orch is not None else None
        cmd = comm.bcast(cmd, root=0)
        if cmd["op"] != "gather":
            break
        comm.Barrier()
        t0 = time.monotonic()
        if orch is not None:
            orch.send({"op": "started"})
        comm.Gather(row, rows, root=0)
        t1 = time.monotonic()
        if orch is not None:
            assert rows is not None
            res = {"seconds": t1 - t0, "delivered": 1.0, **check_rows(rows)}
            orch.send({"op": "result", **res})
            rows.fill(0)


# ---- lossympi


def lossympi_main(args: argparse.Namespace) -> None:
    from lossympi.bootstrap import from_env
    from lossympi.comm import Comm
    from lossympi.endpoint import new_event_loop

    world = from_env(timeout=_CONNECT_TIMEOUT_S)
    comm = Comm.from_world(world, ingest_bps=args.ingest_bps, control_timeout=3600.0, fill="zero")
    rank, size, d = comm.rank, comm.size, args.d
    row = row_values(rank, d)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)

    async def root() -> None:
        orch = Orchestrator(args.ctl)
        rows = _touched((size, d))
        ep = comm.endpoint
        orch.send({"op": "hello", "transport": "lossympi", "ingest_bps": comm.ingest_bps, "gso": ep.gso,
                   "gro": ep.gro, "auth": ep.auth, "rcvbuf": ep.rcvbuf, "sndbuf": ep.sndbuf,
                   "datagram_bytes": ep.datagram_bytes, "stride": ep.stride,
                   "incast": dict(zip(("rate_bps", "burst_bytes"), comm._incast(size - 1), strict=True))})
        while True:
            cmd = await loop.run_in_executor(None, orch.recv)
            await comm.aio.bcast_bytes(json.dumps(cmd).encode())
            if cmd["op"] != "gather":
                break
            await comm.aio.gather_bytes(b"ready")
            before = ep.stats()
            core = ep.core
            t0 = time.monotonic()
            orch.send({"op": "started"})
            task = asyncio.ensure_future(comm.aio.Gather(row, rows, 0, deadline=t0 + float(cmd["deadline"]),
                                                         fill="zero"))
            await asyncio.sleep(0)  # the receives are posted
            await comm.aio.bcast_bytes(b"go")
            last_t, last_n = t0, core.accepted
            while not task.done():
                await asyncio.wait({task}, timeout=_POLL_S)
                k = core.accepted
                if k != last_n:
                    last_t, last_n = time.monotonic(), k
            res = task.result()
            t1 = time.monotonic()
            after = ep.stats()
            st = res.stats()
            out = {"seconds": t1 - t0, "data_seconds": (t1 - t0) if res.complete else last_t - t0,
                   "delivered": float(res.delivered), "complete": bool(res.complete),
                   "lost_chunks": int(st["lost_chunks"]), "received": int(st["received"]),
                   "duplicate": int(st["duplicate"]), "rejected": int(st["rejected"]),
                   "overflow": int(after["overflow"] - before["overflow"]),
                   "datagrams": int(after["datagrams"] - before["datagrams"])}
            out.update(check_rows(rows))
            orch.send({"op": "result", **out})
            rows.fill(0)

    async def sender() -> None:
        while True:
            cmd = json.loads(await comm.aio.bcast_bytes(None))
            if cmd["op"] != "gather":
                break
            await comm.aio.gather_bytes(b"ready")
            await comm.aio.bcast_bytes(None)  # go
            await comm.aio.Gather(row, None, 0, timeout=float(cmd["deadline"]))

    try:
        loop.run_until_complete(root() if rank == 0 else sender())
    finally:
        comm.close()
        loop.close()


# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lossympi.bench._gather_worker")
    p.add_argument("--transport", choices=TRANSPORTS, required=True)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--size", type=int, default=0)
    p.add_argument("--d", type=int, required=True)
    p.add_argument("--root-ip", default="127.0.0.1")
    p.add_argument("--port", type=int, default=29500)
    p.add_argument("--ctl", default=None, help="orchestrator's Unix socket (root only)")
    p.add_argument("--ingest-bps", type=float, default=4e9)
    p.add_argument("--grpc-chunk", type=int, default=1 << 20)
    p.add_argument("--root-nice", type=int, default=0,
                   help="nice value of the root (rank 0), set before any thread starts so that all inherit it")
    args = p.parse_args(argv)
    rank = int(os.environ.get("PMI_RANK", args.rank)) if args.transport == "mpi" else args.rank
    if rank == 0 and args.root_nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.root_nice)
    fn = {"lossympi": lossympi_main, "grpc": grpc_main, "mpi": mpi_main, "tcp": tcp_main}[args.transport]
    try:
        fn(args)
    except BaseException:
        _log(f"{args.transport} rank {args.rank} failed:\n{traceback.format_exc()}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
