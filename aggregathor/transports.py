"""The reliable baselines of the paper's comparison, behind :class:`aggregathor.transport.StepTransport`.

``aggregathor train --transport tcp|grpc|mpi`` runs the same server and worker loops as the default
:class:`~aggregathor.transport.LossympiTransport`; only the step exchanges change:

- :class:`TCPTransport` (``tcp``): raw TCP sockets, a star at rank 0. Control messages go over lossympi's
  authenticated :class:`~lossympi.control.TCPControl` (the same reliable channel as the default transport, so the
  comparison measures the data path). Every worker opens one data connection to a listener of rank 0, announced
  over the control channel, and both ends prove they hold their pair key (HMAC-SHA256 challenge-response over two
  fresh nonces, as :mod:`lossympi.control` does). Frames are length-prefixed (:data:`HEADER`); the parameters
  are ``sendall``-ed from the server's buffer and ``recv_into``-ed straight into the worker's, the gradients
  ``recv_into``-ed straight into the server's preallocated row, once the frame's header (kind, dtype, round,
  size) has been checked. A gradient that misses the deadline is lost (its row is set to ``lost_row_fill``);
  the stream stays in sync: every frame carries its round, and the rest of a late frame is read and discarded
  at the next round.
- :class:`GrpcTransport` (``grpc``): ``grpcio``, a server on rank 0 with two unary RPCs carrying raw bytes
  (identity serializers, no protobuf): workers pull the parameters (``Params``) and push their gradients
  (``Push``). Control messages and the port announcement go over :class:`~lossympi.control.TCPControl` as
  for ``tcp``. The channel is insecure (no TLS); every call carries the caller's rank and an HMAC-SHA256
  under the pair key over the whole request, and every ``Params`` reply a MAC over the digest of the reply,
  so neither side accepts bytes from anyone else. Message-size limits are set on both ends
  (``max_message_bytes``).
- :class:`MPITransport` (``mpi``): ``mpi4py`` buffer collectives under ``mpiexec``: control messages with
  ``Bcast`` of a fixed-size byte buffer, parameters with ``Bcast``, gradients with ``Gather``. Blocking MPI
  collectives have no deadline: **every step waits for the slowest worker** (a crashed or stalled worker
  stalls the run). That is the baseline's weakness that lossympi addresses.

All three only ever move bytes: nothing received is unpickled or executed; the size, dtype and round of every
frame are checked before a byte reaches a row; every :class:`~aggregathor.transport.GatherReport` gives
``delivered`` 1.0 for the gradients that arrived (whole) and 0.0 for the missing ones (one "chunk" per gradient).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aggregathor.transport import META_LIMIT, GatherReport, decode_meta, encode_meta

__all__ = ["HEADER", "GrpcTransport", "MPITransport", "TCPTransport", "TransportError", "build_transport"]

log = logging.getLogger(__name__)

#: Frame header: magic, kind, dtype code, reserved (0), round, payload bytes.
HEADER = struct.Struct("<4sBBHQQ")
MAGIC = b"AGT1"
KIND_PARAMS = 1
KIND_GRAD = 2
_DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<f8"), 3: np.dtype("<f2")}
_CODES = {dt: code for code, dt in _DTYPES.items()}
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_NONCE = 16
_MAC = 32
_DISCARD_BUDGET = 64 << 20  # bytes of late frames discarded per wake-up before yielding to the event loop


class TransportError(RuntimeError):
    """A baseline transport failed: authentication, a malformed frame from the trusted side, a lost peer."""


# ----------------------------------------------------------------------------------------------------------
# frames and keys
# ----------------------------------------------------------------------------------------------------------


def _code(dtype: Any) -> int:
    code = _CODES.get(np.dtype(dtype))
    if code is None:
        raise TypeError(f"dtype {np.dtype(dtype)} cannot travel (use float32, float64 or float16)")
    return code


def _header(kind: int, dtype: Any, rnd: int, nbytes: int) -> bytes:
    return HEADER.pack(MAGIC, kind, _code(dtype), 0, rnd, nbytes)


def _parse(data: bytes | bytearray | memoryview) -> tuple[int, np.dtype | None, int, int]:
    """``(kind, dtype or None when unknown, round, payload bytes)`` of a header; TransportError if not one."""
    if len(data) < HEADER.size:
        raise TransportError(f"a frame of {len(data)} bytes is shorter than its {HEADER.size}-byte header")
    magic, kind, code, reserved, rnd, nbytes = HEADER.unpack_from(data)
    if magic != MAGIC or reserved != 0:
        raise TransportError("not an aggregathor frame (bad magic)")
    return kind, _DTYPES.get(code), rnd, nbytes


def _bytes_of(a: np.ndarray) -> memoryview:
    """A flat byte view of a C-contiguous array (no copy)."""
    if not a.flags.c_contiguous:
        raise ValueError("the transports send and receive C-contiguous arrays only")
    return memoryview(a.reshape(-1).view(np.uint8))


def _subkey(key: bytes, label: bytes) -> bytes:
    """A key of its own for each protocol, derived from the pair key (domain separation)."""
    return hmac.new(key, b"aggregathor-subkey\0" + label, hashlib.sha256).digest()


async def _recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        k = await loop.sock_recv_into(sock, view[got:])
        if k == 0:
            raise ConnectionError(f"the peer closed the connection after {got} of {n} bytes")
        got += k


def _lost_fill(rows: np.ndarray, delivered: np.ndarray, value: float) -> None:
    for r in np.flatnonzero(delivered == 0):
        rows[r + 1] = value


# ----------------------------------------------------------------------------------------------------------
# raw TCP
# ----------------------------------------------------------------------------------------------------------

_TCP_KEY = b"tcp-data-v1"
_TCP_HELLO = b"aggregathor-tcp-hello-v1"
_TCP_ACK = b"aggregathor-tcp-ack-v1"


class _Peer:
    """Rank 0's side of one worker's data connection, and where its incoming frame stands."""

    __slots__ = ("rank", "sock", "alive", "hdr", "hdr_got", "left", "off", "to_row")

    def __init__(self, rank: int, sock: socket.socket) -> None:
        self.rank = rank
        self.sock = sock
        self.alive = True
        self.hdr = bytearray(HEADER.size)
        self.hdr_got = 0
        self.left = 0  # payload bytes of the current frame not read yet (0: next comes a header)
        self.off = 0  # payload bytes of the current frame already written to the row
        self.to_row = False  # the current frame's payload goes to the row (else it is read and discarded)


class _ControlStar:
    """What the TCP and gRPC baselines share: rank 0's star of authenticated control links
    (:class:`~lossympi.control.TCPControl`), data keys derived from the pair keys under ``label``, the step
    messages, and a set-up (:meth:`_serve` on rank 0, :meth:`_join` on a worker) run once by :meth:`connect`."""

    def __init__(self, world: Any, label: bytes, *, lost_row_fill: float, control_timeout: float,
                 stall_timeout: float) -> None:
        from lossympi.control import TCPControl

        self.rank = world.rank
        self.size = world.size
        self.host = world.addresses[0][0]
        self.keys = {r: _subkey(k, label) for r, k in world.keys.items()}
        self.ctl = TCPControl(world.rank, world.size, world.addresses, world.keys, world.control,
                              timeout=control_timeout)
        self.lost_row_fill = lost_row_fill
        self.control_timeout = control_timeout
        self.stall_timeout = stall_timeout
        self.rejected = 0
        self._round = -1
        self._ready: asyncio.Future | None = None

    async def connect(self) -> None:
        """Form the control star and the data connections (idempotent; every exchange calls it)."""
        if self.size == 1:
            return
        if self._ready is None:
            self._ready = asyncio.ensure_future(self._serve() if self.rank == 0 else self._join())
        await asyncio.shield(self._ready)

    async def _serve(self) -> None:
        raise NotImplementedError

    async def _join(self) -> None:
        raise NotImplementedError

    async def control(self, meta: dict[str, Any] | None) -> dict[str, Any]:
        await self.connect()
        data = await self.ctl.bcast_bytes(encode_meta(meta) if self.rank == 0 and meta is not None else None)
        return decode_meta(data)


class TCPTransport(_ControlStar):
    """Raw TCP star at rank 0 (see the module notes).

    Parameters
    ----------
    world : lossympi.bootstrap.World
        Addresses, pair keys and (rank 0) the control listener.
    lost_row_fill : float
        Value of the row of a gradient that missed the deadline (NaN marks it lost for NaN-robust rules).
    control_timeout : float
        Seconds for the star to form and for any control operation.
    stall_timeout : float
        Seconds a reliable transfer may stall (a worker not reading its parameters, a server not sending
        them) before the connection is given up.
    """

    def __init__(self, world: Any, *, lost_row_fill: float = 0.0, control_timeout: float = 120.0,
                 stall_timeout: float = 60.0, handshake_timeout: float = 10.0) -> None:
        super().__init__(world, _TCP_KEY, lost_row_fill=lost_row_fill, control_timeout=control_timeout,
                         stall_timeout=stall_timeout)
        self.handshake_timeout = handshake_timeout
        self.data_port: int | None = None
        # self.rejected: frames refused (wrong size, dtype or kind), all rounds
        self.rejected_connections = 0  # data connections that failed the handshake
        self._peers: dict[int, _Peer] = {}
        self._watched: set[int] = set()
        self._sock: socket.socket | None = None  # a worker's data connection
        self._send: asyncio.Future | None = None  # a worker's gradient on its way
        self._scratch = bytearray(1 << 16)

    # ------------------------------------------------------------------ set-up
    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            lst.bind((self.host, 0))
            lst.listen(max(64, self.size))
            lst.setblocking(False)
            self.data_port = int(lst.getsockname()[1])
            done = loop.create_future()
            admitting: set[asyncio.Task] = set()

            async def accept() -> None:
                while True:
                    conn, _ = await loop.sock_accept(lst)
                    task = asyncio.ensure_future(self._admit(conn, done))
                    admitting.add(task)
                    task.add_done_callback(admitting.discard)

            acceptor = asyncio.ensure_future(accept())
            try:
                await self.ctl.bcast_bytes(_U16.pack(self.data_port))
                await asyncio.wait_for(done, self.control_timeout)
            except TimeoutError:
                missing = sorted(set(range(1, self.size)) - set(self._peers))
                raise TransportError(f"tcp transport: ranks {missing} did not open their data connection within "
                                     f"{self.control_timeout} s") from None
            finally:
                acceptor.cancel()
                for task in list(admitting):
                    task.cancel()
                await asyncio.gather(acceptor, *admitting, return_exceptions=True)
        finally:
            lst.close()

    async def _admit(self, conn: socket.socket, done: asyncio.Future) -> None:
        """Rank 0: authenticate one data connection (challenge-response under the pair key)."""
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        rank = None
        try:
            sn = os.urandom(_NONCE)
            await asyncio.wait_for(loop.sock_sendall(conn, sn), self.handshake_timeout)
            hello = bytearray(_U32.size + _NONCE + _MAC)
            await asyncio.wait_for(_recv_exact(loop, conn, memoryview(hello)), self.handshake_timeout)
            (r,) = _U32.unpack_from(hello)
            cn = bytes(hello[_U32.size:_U32.size + _NONCE])
            key = self.keys.get(r) if 0 < r < self.size else None
            expect = hmac.new(key or bytes(_MAC), _TCP_HELLO + sn + cn + _U32.pack(r), hashlib.sha256).digest()
            if key is None or not hmac.compare_digest(bytes(hello[-_MAC:]), expect):
                raise TransportError("a data connection failed authentication")
            if r in self._peers:
                raise TransportError(f"a second data connection for rank {r}")
            rank = r
            self._peers[r] = _Peer(r, conn)
            ack = hmac.new(key, _TCP_ACK + sn + cn + _U32.pack(r), hashlib.sha256).digest()
            await asyncio.wait_for(loop.sock_sendall(conn, ack), self.handshake_timeout)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if len(self._peers) == self.size - 1 and not done.done():
                done.set_result(None)
        except (TransportError, TimeoutError, OSError) as exc:
            self.rejected_connections += 1
            log.warning("tcp transport: refused a data connection: %s", exc)
            if rank is not None:
                self._peers.pop(rank, None)
            conn.close()
        except asyncio.CancelledError:
            if rank is None:
                conn.close()
            raise

    async def _join(self) -> None:
        loop = asyncio.get_running_loop()
        data = await self.ctl.bcast_bytes(None)
        if len(data) != _U16.size:
            raise TransportError("rank 0 announced a malformed data port")
        (port,) = _U16.unpack(data)
        self.data_port = port
        key = self.keys[0]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (self.host, port)), self.handshake_timeout)
            sn = bytearray(_NONCE)
            await asyncio.wait_for(_recv_exact(loop, sock, memoryview(sn)), self.handshake_timeout)
            cn = os.urandom(_NONCE)
            me = _U32.pack(self.rank)
            mac = hmac.new(key, _TCP_HELLO + bytes(sn) + cn + me, hashlib.sha256).digest()
            await loop.sock_sendall(sock, me + cn + mac)
            ack = bytearray(_MAC)
            await asyncio.wait_for(_recv_exact(loop, sock, memoryview(ack)), self.handshake_timeout)
            expect = hmac.new(key, _TCP_ACK + bytes(sn) + cn + me, hashlib.sha256).digest()
            if not hmac.compare_digest(bytes(ack), expect):
                raise TransportError("rank 0's data listener failed authentication")
        except (TimeoutError, OSError) as exc:
            sock.close()
            raise TransportError(f"rank {self.rank}: cannot open the data connection to rank 0 at "
                                 f"{self.host}:{port}: {exc!r}") from exc
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock

    # ------------------------------------------------------------------ the step
    async def control(self, meta: dict[str, Any] | None) -> dict[str, Any]:
        out = await super().control(meta)
        if self.rank != 0 and out.get("stop") and self._send is not None:
            self._send.cancel()  # a last gradient that nobody will read
            await asyncio.gather(self._send, return_exceptions=True)
            self._send = None
        return out

    async def params(self, theta: np.ndarray, timeout: float) -> float:
        """Reliable: every worker gets every byte (``timeout`` is not used; see ``stall_timeout``)."""
        await self.connect()
        self._round += 1
        view = _bytes_of(theta)
        loop = asyncio.get_running_loop()
        if self.rank == 0:
            head = _header(KIND_PARAMS, theta.dtype, self._round, view.nbytes)
            await asyncio.gather(*(self._send_params(loop, p, head, view) for p in self._peers.values() if p.alive))
            return 1.0
        assert self._sock is not None
        head_buf = bytearray(HEADER.size)
        try:
            await asyncio.wait_for(_recv_exact(loop, self._sock, memoryview(head_buf)), self.stall_timeout)
            kind, dtype, rnd, nbytes = _parse(head_buf)
            if kind != KIND_PARAMS or rnd != self._round or dtype != theta.dtype or nbytes != view.nbytes:
                raise TransportError(f"rank {self.rank}: expected the parameters of round {self._round} "
                                     f"({view.nbytes} bytes of {theta.dtype}), got kind {kind}, round {rnd}, "
                                     f"{nbytes} bytes of {dtype}")
            await asyncio.wait_for(_recv_exact(loop, self._sock, view), self.stall_timeout)
        except (TimeoutError, OSError) as exc:
            raise TransportError(f"rank {self.rank}: the parameters of round {self._round} did not arrive: "
                                 f"{exc!r}") from exc
        return 1.0

    async def _send_params(self, loop: asyncio.AbstractEventLoop, p: _Peer, head: bytes, view: memoryview) -> None:
        async def send() -> None:
            await loop.sock_sendall(p.sock, head)
            await loop.sock_sendall(p.sock, view)

        try:
            await asyncio.wait_for(send(), self.stall_timeout)
        except (TimeoutError, OSError) as exc:
            self._drop(p, f"did not take its parameters ({exc!r})")

    async def grads(self, grad: np.ndarray | None, rows: np.ndarray | None, deadline: float) -> GatherReport | None:
        await self.connect()
        if self.rank != 0:
            assert grad is not None and self._sock is not None
            if self._send is not None:  # the previous gradient is still going out (rank 0 drains late ones)
                try:
                    await asyncio.wait_for(self._send, self.stall_timeout)
                except (TimeoutError, OSError) as exc:
                    raise TransportError(f"rank {self.rank}: the gradient of round {self._round - 1} could not "
                                         f"be sent: {exc!r}") from exc
            view = _bytes_of(grad)
            head = _header(KIND_GRAD, grad.dtype, self._round, view.nbytes)
            loop = asyncio.get_running_loop()
            sock = self._sock

            async def send() -> None:
                await loop.sock_sendall(sock, head)
                await loop.sock_sendall(sock, view)

            # Sent in the background: a late gradient may only leave once rank 0 reads again (next round), and
            # the worker must not block on it meanwhile. ``grad`` is only rewritten after rank 0 has closed this
            # round, so any byte still unsent belongs to a frame rank 0 discards.
            self._send = asyncio.ensure_future(send())
            return None
        assert rows is not None
        return await self._gather(rows, deadline)

    async def _gather(self, rows: np.ndarray, deadline: float) -> GatherReport:
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        n = self.size - 1
        if rows.shape[0] != self.size or rows.ndim != 2:
            raise ValueError(f"rows must be ({self.size}, d), got {rows.shape}")
        dtype = rows.dtype
        nbytes = rows.shape[1] * dtype.itemsize
        views = {r: _bytes_of(rows[r]) for r in range(1, self.size)}
        delivered = np.zeros(n)
        complete: list[float] = []
        rejected0 = self.rejected
        pending = {r: p for r, p in self._peers.items() if p.alive}
        ready = set(pending)  # what is already buffered is read first
        waiter: asyncio.Future | None = None

        def readable(r: int) -> None:
            ready.add(r)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

        for r, p in pending.items():
            loop.add_reader(p.sock.fileno(), readable, r)
            self._watched.add(r)
        try:
            while pending:
                for r in [r for r in ready if r in pending]:
                    status = self._pump(pending[r], views[r], dtype, nbytes)
                    if status == "wait":
                        continue
                    self._unwatch(loop, r)
                    if status == "done":
                        delivered[r - 1] = 1.0
                        complete.append(time.monotonic() - t0)
                    del pending[r]
                ready.clear()
                left = deadline - time.monotonic()
                if not pending or left <= 0:
                    break
                waiter = loop.create_future()
                try:
                    await asyncio.wait_for(waiter, left)
                except TimeoutError:
                    pass
                waiter = None
        finally:
            for r in list(self._watched):
                self._unwatch(loop, r)
            for p in self._peers.values():
                p.to_row = False  # the rest of a frame cut by the deadline will be discarded next round
        _lost_fill(rows, delivered, self.lost_row_fill)
        lost = int(n - delivered.sum())
        return GatherReport(delivered, lost, n, time.monotonic() - t0, complete, self.rejected - rejected0)

    def _unwatch(self, loop: asyncio.AbstractEventLoop, r: int) -> None:
        if r in self._watched:
            self._watched.discard(r)
            p = self._peers[r]
            if p.alive:
                loop.remove_reader(p.sock.fileno())

    def _pump(self, p: _Peer, row: memoryview, dtype: np.dtype, nbytes: int) -> str:
        """Read what ``p`` has buffered, without blocking: ``done`` (this round's gradient is in its row),
        ``wait`` (nothing more to read now) or ``dead`` (the connection is given up)."""
        discarded = 0
        try:
            while True:
                if p.left == 0:
                    k = p.sock.recv_into(memoryview(p.hdr)[p.hdr_got:])
                    if k == 0:
                        return self._dead(p, "closed its data connection")
                    p.hdr_got += k
                    if p.hdr_got < HEADER.size:
                        continue
                    p.hdr_got = 0
                    why = self._route(p, dtype, nbytes)
                    if why is not None:
                        return self._dead(p, why)
                    if p.left == 0 and p.to_row:  # an empty gradient (d = 0)
                        p.to_row = False
                        return "done"
                    continue
                if p.to_row:
                    k = p.sock.recv_into(row[p.off:p.off + p.left])
                else:
                    k = p.sock.recv_into(self._scratch, min(p.left, len(self._scratch)))
                    discarded += k
                if k == 0:
                    return self._dead(p, "closed its data connection in the middle of a frame")
                p.left -= k
                p.off += k
                if p.left == 0 and p.to_row:
                    p.to_row = False
                    return "done"
                if discarded > _DISCARD_BUDGET:
                    return "wait"  # let the event loop run; the socket is still readable
        except BlockingIOError:
            return "wait"
        except OSError as exc:
            return self._dead(p, f"data connection failed: {exc!r}")

    def _route(self, p: _Peer, dtype: np.dtype, nbytes: int) -> str | None:
        """Check a header that just arrived from ``p``; say where its payload goes (or why to give up)."""
        try:
            kind, fdtype, rnd, size = _parse(p.hdr)
        except TransportError as exc:
            return f"sent a malformed frame header ({exc})"
        if kind != KIND_GRAD:
            return f"sent a frame of kind {kind} instead of a gradient"
        if rnd > self._round:
            return f"sent a gradient for round {rnd} during round {self._round}"
        if size > max(4 * nbytes, 1 << 20):
            return f"announced a frame of {size} bytes (a gradient is {nbytes})"
        p.left, p.off, p.to_row = size, 0, False
        if rnd < self._round:
            return None  # late: read and discarded
        if fdtype != dtype or size != nbytes:
            self.rejected += 1
            log.warning("tcp transport: rank %d sent a gradient of %d bytes of %s for round %d (expected %d bytes of "
                        "%s): rejected", p.rank, size, fdtype, rnd, nbytes, dtype)
            return None
        p.to_row = True
        return None

    def _dead(self, p: _Peer, why: str) -> str:
        self._drop(p, why)
        return "dead"

    def _drop(self, p: _Peer, why: str) -> None:
        if not p.alive:
            return
        log.warning("tcp transport: rank %d %s; its gradients are lost from now on", p.rank, why)
        if p.rank in self._watched:
            self._watched.discard(p.rank)
            asyncio.get_running_loop().remove_reader(p.sock.fileno())
        p.alive = False
        p.sock.close()

    def close(self) -> None:
        if self._send is not None and not self._send.done():
            self._send.cancel()
        for p in self._peers.values():
            p.alive = False
            p.sock.close()
        if self._sock is not None:
            self._sock.close()
        self.ctl.close()
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()


# ----------------------------------------------------------------------------------------------------------
# gRPC
# ----------------------------------------------------------------------------------------------------------

_GRPC_SERVICE = "aggregathor.Step"
_GRPC_KEY = b"grpc-v1"
_GRPC_PARAMS = b"aggregathor-grpc-params-v1"
_GRPC_PUSH = b"aggregathor-grpc-push-v1"
_GRPC_REPLY = b"aggregathor-grpc-reply-v1"


def _aio(call: Any) -> asyncio.Future:
    """An asyncio future settled by a ``grpc.Future`` (completed on a gRPC thread)."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle() -> None:
        if fut.done():
            return
        if call.cancelled():
            fut.cancel()
            return
        exc = call.exception()
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(call.result())

    def done(_: Any) -> None:
        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop is closed: nobody waits any more
            pass

    call.add_done_callback(done)
    fut.add_done_callback(lambda f: call.cancel() if f.cancelled() else None)
    return fut


@dataclass
class _Window:
    """Rank 0: the gradients of one round being gathered (guarded by the transport's condition)."""

    rnd: int
    rows: np.ndarray
    t0: float
    loop: asyncio.AbstractEventLoop
    event: asyncio.Event
    open: bool = True
    got: dict[int, float] = field(default_factory=dict)


class GrpcTransport(_ControlStar):
    """gRPC baseline: rank 0 serves ``Params`` and ``Push`` (see the module notes).

    Parameters are those of :class:`TCPTransport`, plus ``max_message_bytes``: the largest message either end
    accepts (a frame header plus the parameters or one gradient must fit).
    """

    def __init__(self, world: Any, *, lost_row_fill: float = 0.0, control_timeout: float = 120.0,
                 stall_timeout: float = 60.0, max_message_bytes: int = 256 << 20) -> None:
        super().__init__(world, _GRPC_KEY, lost_row_fill=lost_row_fill, control_timeout=control_timeout,
                         stall_timeout=stall_timeout)
        self.max_message_bytes = int(max_message_bytes)
        self.port: int | None = None
        # self.rejected: calls refused (authentication, size, dtype, round), all rounds
        # rank 0's state, shared with the gRPC handler threads
        self._cond = threading.Condition()
        self._published = -1
        self._snapshot = b""
        self._digest = b""
        self._expect: tuple[int, np.dtype, int] | None = None  # round, dtype, payload bytes of a gradient
        self._window: _Window | None = None
        self._early: dict[int, bytes] = {}
        self._closing = False
        self._reported_rejected = 0
        self._server: Any = None
        self._pool: Any = None
        self._channel: Any = None
        self._params_rpc: Any = None
        self._push_rpc: Any = None

    def _options(self) -> list[tuple[str, Any]]:
        return [("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.enable_http_proxy", 0)]

    # ------------------------------------------------------------------ set-up
    async def _serve(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import grpc

        handler = grpc.method_handlers_generic_handler(_GRPC_SERVICE, {
            "Params": grpc.unary_unary_rpc_method_handler(self._serve_params),
            "Push": grpc.unary_unary_rpc_method_handler(self._serve_push),
        })
        self._pool = ThreadPoolExecutor(max_workers=2 * self.size + 4, thread_name_prefix="aggregathor-grpc")
        server = grpc.server(self._pool, handlers=[handler], options=self._options())
        try:
            port = server.add_insecure_port(f"{self.host}:0")
        except RuntimeError as exc:
            raise TransportError(f"grpc transport: cannot listen on {self.host}: {exc}") from exc
        if not port:
            raise TransportError(f"grpc transport: cannot listen on {self.host}")
        server.start()
        self._server = server
        self.port = int(port)
        await self.ctl.bcast_bytes(_U16.pack(self.port))

    async def _join(self) -> None:
        import grpc

        data = await self.ctl.bcast_bytes(None)
        if len(data) != _U16.size:
            raise TransportError("rank 0 announced a malformed gRPC port")
        (self.port,) = _U16.unpack(data)
        self._channel = grpc.insecure_channel(f"{self.host}:{self.port}", options=self._options())
        try:
            await asyncio.wait_for(_aio(grpc.channel_ready_future(self._channel)), self.control_timeout)
        except TimeoutError:
            raise TransportError(f"rank {self.rank}: rank 0's gRPC server at {self.host}:{self.port} is not "
                                 f"reachable within {self.control_timeout} s") from None
        self._params_rpc = self._channel.unary_unary(f"/{_GRPC_SERVICE}/Params")
        self._push_rpc = self._channel.unary_unary(f"/{_GRPC_SERVICE}/Push")

    # ------------------------------------------------------------------ rank 0's handlers (gRPC threads)
    def _refuse(self, context: Any, code: Any, msg: str) -> None:
        with self._cond:
            self.rejected += 1
        log.warning("grpc transport: refused a call: %s", msg)
        context.abort(code, msg)

    def _caller(self, context: Any, label: bytes, request: bytes) -> int:
        """The authenticated rank of a call (aborts the call otherwise)."""
        import grpc

        md = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        try:
            r = int(md.get("agt-rank", ""))
            mac = bytes.fromhex(md.get("agt-mac", ""))
        except ValueError:
            r, mac = -1, b""
        key = self.keys.get(r) if 0 < r < self.size else None
        if key is not None:
            h = hmac.new(key, label + _U32.pack(r), hashlib.sha256)
            h.update(request)
            if hmac.compare_digest(mac, h.digest()):
                return r
        self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, "the call failed authentication")
        raise AssertionError("unreachable")  # context.abort raises

    def _serve_params(self, request: bytes, context: Any) -> bytes:
        import grpc

        r = self._caller(context, _GRPC_PARAMS, request)
        if len(request) != _U64.size:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "malformed parameter request")
        (rnd,) = _U64.unpack(request)
        with self._cond:
            ok = self._cond.wait_for(lambda: self._closing or self._published >= rnd, self.stall_timeout)
            closing, published, snap, digest = self._closing, self._published, self._snapshot, self._digest
        if closing:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is stopping")
        if not ok:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"round {rnd} was not published in time")
        if published != rnd:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"parameters of round {rnd} asked for while serving round {published}")
        mac = hmac.new(self.keys[r], _GRPC_REPLY + _U32.pack(r) + digest, hashlib.sha256).hexdigest()
        context.set_trailing_metadata((("agt-mac", mac),))
        return snap

    def _serve_push(self, request: bytes, context: Any) -> bytes:
        import grpc

        r = self._caller(context, _GRPC_PUSH, request)
        try:
            kind, dtype, rnd, size = _parse(request)
        except TransportError as exc:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        with self._cond:
            expect = self._expect
            if kind != KIND_GRAD or expect is None or rnd > expect[0]:
                self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"rank {r}: no gradient of round {rnd} "
                             "is expected now")
            assert expect is not None
            if rnd < expect[0]:
                return b"late"
            if dtype != expect[1] or size != expect[2] or len(request) != HEADER.size + size:
                self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                             f"rank {r}: gradient of {len(request) - HEADER.size} bytes of {dtype} (header says "
                             f"{size}); expected {expect[2]} bytes of {expect[1]}")
            w = self._window
            if w is None or w.rnd != rnd:  # rank 0 has not started gathering this round yet: keep it
                self._early.setdefault(r, request)
                return b"ok"
            if not w.open or r in w.got:
                return b"late"
            w.rows[r] = np.frombuffer(request, expect[1], offset=HEADER.size)
            w.got[r] = time.monotonic() - w.t0
            if len(w.got) == self.size - 1:
                try:
                    w.loop.call_soon_threadsafe(w.event.set)
                except RuntimeError:
                    pass
            return b"ok"

    # ------------------------------------------------------------------ the step
    def _mac(self, label: bytes, request: bytes) -> str:
        h = hmac.new(self.keys[0], label + _U32.pack(self.rank), hashlib.sha256)
        h.update(request)
        return h.hexdigest()

    async def params(self, theta: np.ndarray, timeout: float) -> float:
        """Reliable: every worker pulls every byte (``timeout`` is not used; see ``stall_timeout``)."""
        import grpc

        await self.connect()
        self._round += 1
        view = _bytes_of(theta)
        if self.rank == 0:
            snap = b"".join((_header(KIND_PARAMS, theta.dtype, self._round, view.nbytes), view))
            digest = hashlib.sha256(snap).digest()
            with self._cond:
                self._snapshot, self._digest, self._published = snap, digest, self._round
                self._expect = (self._round, np.dtype(theta.dtype), view.nbytes)
                self._window = None
                self._early.clear()
                self._cond.notify_all()
            return 1.0
        request = _U64.pack(self._round)
        md = (("agt-rank", str(self.rank)), ("agt-mac", self._mac(_GRPC_PARAMS, request)))
        call = self._params_rpc.future(request, metadata=md, timeout=self.stall_timeout)
        try:
            reply = await _aio(call)
        except grpc.RpcError as exc:
            raise TransportError(f"rank {self.rank}: Params of round {self._round} failed: {exc}") from exc
        trailing = {k: v for k, v in (call.trailing_metadata() or ()) if isinstance(v, str)}
        digest = hashlib.sha256(reply).digest()
        expect = hmac.new(self.keys[0], _GRPC_REPLY + _U32.pack(self.rank) + digest, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(trailing.get("agt-mac", ""), expect):
            raise TransportError(f"rank {self.rank}: the parameters of round {self._round} failed authentication")
        kind, dtype, rnd, size = _parse(reply)
        if (kind != KIND_PARAMS or rnd != self._round or dtype != theta.dtype or size != view.nbytes
                or len(reply) != HEADER.size + size):
            raise TransportError(f"rank {self.rank}: expected the parameters of round {self._round} ({view.nbytes} "
                                 f"bytes of {theta.dtype}), got kind {kind}, round {rnd}, {size} bytes of {dtype}")
        theta.reshape(-1)[...] = np.frombuffer(reply, theta.dtype, offset=HEADER.size)
        return 1.0

    async def grads(self, grad: np.ndarray | None, rows: np.ndarray | None, deadline: float) -> GatherReport | None:
        import grpc

        await self.connect()
        if self.rank != 0:
            assert grad is not None
            view = _bytes_of(grad)
            request = b"".join((_header(KIND_GRAD, grad.dtype, self._round, view.nbytes), view))
            md = (("agt-rank", str(self.rank)), ("agt-mac", self._mac(_GRPC_PUSH, request)))
            try:
                await _aio(self._push_rpc.future(request, metadata=md, timeout=self.stall_timeout))
            except grpc.RpcError as exc:
                raise TransportError(f"rank {self.rank}: Push of round {self._round} failed: {exc}") from exc
            return None
        assert rows is not None
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        n = self.size - 1
        event = asyncio.Event()
        with self._cond:
            expect = self._expect
            if expect is None or expect[0] != self._round:
                raise TransportError("grads() before params() in this round")
            if rows.shape[0] != self.size or rows.dtype != expect[1] or rows[0].nbytes != expect[2]:
                raise ValueError(f"rows must be ({self.size}, d) of {expect[1]} like the parameters, got "
                                 f"{rows.shape} of {rows.dtype}")
            if not rows.flags.c_contiguous:
                raise ValueError("rows must be C-contiguous")
            w = _Window(self._round, rows, t0, loop, event)
            for r, request in self._early.items():
                rows[r] = np.frombuffer(request, expect[1], offset=HEADER.size)
                w.got[r] = 0.0
            self._early.clear()
            self._window = w
            if len(w.got) == n:
                event.set()
        try:
            await asyncio.wait_for(event.wait(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            pass
        with self._cond:
            w.open = False
            got = dict(w.got)
            rejected = self.rejected - self._reported_rejected
            self._reported_rejected = self.rejected
        delivered = np.zeros(n)
        for r in got:
            delivered[r - 1] = 1.0
        _lost_fill(rows, delivered, self.lost_row_fill)
        return GatherReport(delivered, n - len(got), n, time.monotonic() - t0, sorted(got.values()), rejected)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._server is not None:
            self._server.stop(None)
            self._server = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        self.ctl.close()
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()


# ----------------------------------------------------------------------------------------------------------
# MPI
# ----------------------------------------------------------------------------------------------------------


class MPITransport:
    """Blocking mpi4py buffer collectives (``Bcast``, ``Gather``) under ``mpiexec``.

    No deadline: a blocking collective returns once every rank took part, so every step waits for the slowest
    worker, and a stalled worker stalls the run. ``timeout`` and ``deadline`` are accepted and ignored.
    The event loop is blocked during a collective (nothing else runs on it meanwhile).
    """

    def __init__(self, comm: Any = None, *, lost_row_fill: float = 0.0) -> None:
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = int(self.comm.Get_rank())
        self.size = int(self.comm.Get_size())
        self.lost_row_fill = lost_row_fill  # never used: nothing is ever lost
        self._meta = np.zeros(_U64.size + META_LIMIT, np.uint8)

    async def control(self, meta: dict[str, Any] | None) -> dict[str, Any]:
        buf = self._meta
        if self.rank == 0:
            if meta is None:
                raise ValueError("rank 0 must pass the control message")
            data = encode_meta(meta)
            buf[:_U64.size] = np.frombuffer(_U64.pack(len(data)), np.uint8)
            buf[_U64.size:_U64.size + len(data)] = np.frombuffer(data, np.uint8)
        self.comm.Bcast([buf, self.MPI.BYTE], root=0)
        (n,) = _U64.unpack(buf[:_U64.size].tobytes())
        if n > META_LIMIT:
            raise TransportError(f"a control message of {n} bytes (limit {META_LIMIT})")
        return decode_meta(buf[_U64.size:_U64.size + n].tobytes())

    async def params(self, theta: np.ndarray, timeout: float) -> float:
        _bytes_of(theta)  # C-contiguous
        self.comm.Bcast(theta, root=0)
        return 1.0

    async def grads(self, grad: np.ndarray | None, rows: np.ndarray | None, deadline: float) -> GatherReport | None:
        t0 = time.monotonic()
        if self.rank != 0:
            assert grad is not None
            _bytes_of(grad)
            self.comm.Gather(grad, None, root=0)
            return None
        assert rows is not None
        if rows.ndim != 2 or rows.shape[0] != self.size:
            raise ValueError(f"rows must be ({self.size}, d), got {rows.shape}")
        _bytes_of(rows)
        self.comm.Gather(self.MPI.IN_PLACE, rows, root=0)
        elapsed = time.monotonic() - t0
        n = self.size - 1
        return GatherReport(np.ones(n), 0, n, elapsed, [elapsed] * n, 0)

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------------------


def build_transport(name: str, world: Any, *, mpi: bool = False, lost_row_fill: float = 0.0,
                    **kwargs: Any) -> Any:
    """The transport ``name`` (``tcp``, ``grpc`` or ``mpi``) of this rank of ``world``.

    ``mpi`` says whether the world came from MPI (``--launcher mpi`` under ``mpiexec``); ``--transport mpi``
    needs it.
    """
    if name == "tcp":
        return TCPTransport(world, lost_row_fill=lost_row_fill, **kwargs)
    if name == "grpc":
        return GrpcTransport(world, lost_row_fill=lost_row_fill, **kwargs)
    if name == "mpi":
        if not mpi:
            raise TransportError("--transport mpi needs ranks started by mpiexec: run "
                                 "'mpiexec -n N+1 python -m aggregathor train --launcher mpi --transport mpi ...'")
        t = MPITransport(lost_row_fill=lost_row_fill, **kwargs)
        if (t.rank, t.size) != (world.rank, world.size):
            raise TransportError(f"MPI says rank {t.rank} of {t.size}, the world rank {world.rank} of {world.size}")
        return t
    raise ValueError(f"unknown transport {name!r}; use lossympi, tcp, grpc or mpi")
