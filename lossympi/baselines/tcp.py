"""Raw TCP baseline: a star of data connections at rank 0, length-prefixed frames, no retransmission of its own.

Every sender opens one data connection to a listener of rank 0, whose port rank 0 announces over the control
star; both ends prove they hold their data key (:mod:`lossympi.handshake`: a challenge-response over two fresh
nonces, rank 0's acknowledgement proves its side). Frames (:data:`~lossympi.baselines.frames.HEADER`) carry
their round: rank 0 ``sendall``-s the parameters from its buffer and a sender ``recv_into``-s them straight into
its own; the gradients are ``recv_into``-ed straight into rank 0's preallocated rows, once the frame's header
(kind, dtype, round, size) has been checked. A gradient that misses the deadline is not delivered; the stream
stays in sync: the rest of a late frame is read and discarded at the next round.

:class:`TCPRoot` is rank 0's end, :class:`TCPSender` a sender's. Used by aggregathor's ``--transport tcp`` and by
``python -m lossympi.bench gather``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from typing import Any

import numpy as np

from lossympi import handshake
from lossympi.baselines.frames import (
    HEADER,
    KIND_GRAD,
    KIND_PARAMS,
    BaselineError,
    Gathered,
    bytes_of,
    header,
    parse,
    recv_exact,
)
from lossympi.baselines.star import Star

__all__ = ["LABEL", "Peer", "TCPRoot", "TCPSender"]

log = logging.getLogger(__name__)

#: The label of the TCP baseline's data keys.
LABEL = b"tcp-data-v1"
_HELLO = b"lossympi-baseline-tcp-hello-v1"
_ACK = b"lossympi-baseline-tcp-ack-v1"
_NONCE = 16
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_DISCARD_BUDGET = 64 << 20  # bytes of late frames discarded per wake-up before yielding to the event loop


class Peer:
    """Rank 0's side of one sender's data connection, and where its incoming frame stands."""

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


class TCPRoot(Star):
    """Rank 0's end: accepts and authenticates the data connections, sends parameters, gathers gradients.

    Parameters are those of :class:`~lossympi.baselines.star.Star`, plus ``handshake_timeout`` (seconds for one
    data connection's handshake).
    """

    def __init__(self, world: Any, *, control_timeout: float = 120.0, stall_timeout: float = 60.0,
                 handshake_timeout: float = 10.0) -> None:
        super().__init__(world, LABEL, control_timeout=control_timeout, stall_timeout=stall_timeout)
        self.handshake_timeout = handshake_timeout
        self.data_port: int | None = None
        self.rejected = 0  # frames refused (wrong size or dtype), all rounds
        self.rejected_connections = 0  # data connections that failed the handshake
        self.peers: dict[int, Peer] = {}
        self._round = -1
        self._watched: set[int] = set()
        self._scratch = bytearray(1 << 16)

    # ------------------------------------------------------------------ set-up
    async def _setup(self) -> None:
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
                await self.control.bcast_bytes(_U16.pack(self.data_port))
                await asyncio.wait_for(done, self.control_timeout)
            except TimeoutError:
                missing = sorted(set(range(1, self.size)) - set(self.peers))
                raise BaselineError(f"tcp baseline: ranks {missing} did not open their data connection within "
                                    f"{self.control_timeout} s") from None
            finally:
                acceptor.cancel()
                for task in list(admitting):
                    task.cancel()
                await asyncio.gather(acceptor, *admitting, return_exceptions=True)
        finally:
            lst.close()

    async def _admit(self, conn: socket.socket, done: asyncio.Future) -> None:
        """Authenticate one data connection (challenge-response under the sender's data key)."""
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        rank = None
        try:
            sn = handshake.new_nonce(_NONCE)
            await asyncio.wait_for(loop.sock_sendall(conn, sn), self.handshake_timeout)
            hello = bytearray(_U32.size + _NONCE + handshake.MAC_BYTES)
            await asyncio.wait_for(recv_exact(loop, conn, memoryview(hello)), self.handshake_timeout)
            (r,) = _U32.unpack_from(hello)
            cn = bytes(hello[_U32.size:_U32.size + _NONCE])
            key = self.keys.get(r) if 0 < r < self.size else None
            if not handshake.verify(key, _HELLO, (sn, cn), _U32.pack(r), bytes(hello[-handshake.MAC_BYTES:])):
                raise BaselineError("a data connection failed authentication")
            assert key is not None
            if r in self.peers:
                raise BaselineError(f"a second data connection for rank {r}")
            rank = r
            self.peers[r] = Peer(r, conn)
            ack = handshake.prove(key, _ACK, (sn, cn), _U32.pack(r))
            await asyncio.wait_for(loop.sock_sendall(conn, ack), self.handshake_timeout)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if len(self.peers) == self.size - 1 and not done.done():
                done.set_result(None)
        except (BaselineError, TimeoutError, OSError) as exc:
            self.rejected_connections += 1
            log.warning("tcp baseline: refused a data connection: %s", exc)
            if rank is not None:
                self.peers.pop(rank, None)
            conn.close()
        except asyncio.CancelledError:
            if rank is None:
                conn.close()
            raise

    # ------------------------------------------------------------------ the exchanges
    async def bcast(self, theta: np.ndarray, rnd: int) -> None:
        """Send ``theta`` as the parameters of round ``rnd`` to every live sender (a stalled one is given up)."""
        await self.connect()
        self._round = rnd
        view = bytes_of(theta)
        head = header(KIND_PARAMS, theta.dtype, rnd, view.nbytes)
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(self._send_params(loop, p, head, view) for p in self.peers.values() if p.alive))

    async def _send_params(self, loop: asyncio.AbstractEventLoop, p: Peer, head: bytes, view: memoryview) -> None:
        async def send() -> None:
            await loop.sock_sendall(p.sock, head)
            await loop.sock_sendall(p.sock, view)

        try:
            await asyncio.wait_for(send(), self.stall_timeout)
        except (TimeoutError, OSError) as exc:
            self._drop(p, f"did not take its parameters ({exc!r})")

    async def gather(self, rows: np.ndarray, rnd: int, deadline: float) -> Gathered:
        """Read sender ``r``'s gradient of round ``rnd`` into ``rows[r]`` until ``deadline`` (monotonic)."""
        await self.connect()
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        if rows.shape[0] != self.size or rows.ndim != 2:
            raise ValueError(f"rows must be ({self.size}, d), got {rows.shape}")
        self._round = rnd
        nbytes = rows.shape[1] * rows.dtype.itemsize
        views = {r: bytes_of(rows[r]) for r in range(1, self.size)}
        delivered = np.zeros(self.size - 1)
        complete: list[float] = []
        rejected0 = self.rejected
        pending = {r: p for r, p in self.peers.items() if p.alive}
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
                    status = self._pump(pending[r], views[r], rows.dtype, nbytes)
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
            for p in self.peers.values():
                p.to_row = False  # the rest of a frame cut by the deadline will be discarded next round
        return Gathered(delivered, time.monotonic() - t0, complete, self.rejected - rejected0)

    def _unwatch(self, loop: asyncio.AbstractEventLoop, r: int) -> None:
        if r in self._watched:
            self._watched.discard(r)
            p = self.peers[r]
            if p.alive:
                loop.remove_reader(p.sock.fileno())

    def _pump(self, p: Peer, row: memoryview, dtype: np.dtype, nbytes: int) -> str:
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

    def _route(self, p: Peer, dtype: np.dtype, nbytes: int) -> str | None:
        """Check a header that just arrived from ``p``; say where its payload goes (or why to give up)."""
        try:
            kind, fdtype, rnd, size = parse(p.hdr)
        except BaselineError as exc:
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
            log.warning("tcp baseline: rank %d sent a gradient of %d bytes of %s for round %d (expected %d bytes of "
                        "%s): rejected", p.rank, size, fdtype, rnd, nbytes, dtype)
            return None
        p.to_row = True
        return None

    def _dead(self, p: Peer, why: str) -> str:
        self._drop(p, why)
        return "dead"

    def _drop(self, p: Peer, why: str) -> None:
        if not p.alive:
            return
        log.warning("tcp baseline: rank %d %s; its gradients are lost from now on", p.rank, why)
        if p.rank in self._watched:
            self._watched.discard(p.rank)
            asyncio.get_running_loop().remove_reader(p.sock.fileno())
        p.alive = False
        p.sock.close()

    def close(self) -> None:
        for p in self.peers.values():
            p.alive = False
            p.sock.close()
        super().close()


class TCPSender(Star):
    """A sender's end: one authenticated data connection to rank 0 (parameters in, gradients out)."""

    def __init__(self, world: Any, *, control_timeout: float = 120.0, stall_timeout: float = 60.0,
                 handshake_timeout: float = 10.0) -> None:
        super().__init__(world, LABEL, control_timeout=control_timeout, stall_timeout=stall_timeout)
        self.handshake_timeout = handshake_timeout
        self.data_port: int | None = None
        self.sock: socket.socket | None = None  # the data connection, once connected
        self._send: asyncio.Future | None = None  # a gradient on its way
        self._sent_round = -1

    async def _setup(self) -> None:
        data = await self.control.bcast_bytes(None)
        if len(data) != _U16.size:
            raise BaselineError("rank 0 announced a malformed data port")
        (port,) = _U16.unpack(data)
        self.data_port = port
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await self._authenticate(sock, port)
        except (TimeoutError, OSError) as exc:
            sock.close()
            raise BaselineError(f"rank {self.rank}: cannot open the data connection to rank 0 at "
                                f"{self.host}:{port}: {exc!r}") from exc
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock

    async def _authenticate(self, sock: socket.socket, port: int) -> None:
        loop = asyncio.get_running_loop()
        key = self.keys[0]
        await asyncio.wait_for(loop.sock_connect(sock, (self.host, port)), self.handshake_timeout)
        sn = bytearray(_NONCE)
        await asyncio.wait_for(recv_exact(loop, sock, memoryview(sn)), self.handshake_timeout)
        cn = handshake.new_nonce(_NONCE)
        me = _U32.pack(self.rank)
        await loop.sock_sendall(sock, me + cn + handshake.prove(key, _HELLO, (bytes(sn), cn), me))
        ack = bytearray(handshake.MAC_BYTES)
        await asyncio.wait_for(recv_exact(loop, sock, memoryview(ack)), self.handshake_timeout)
        if not handshake.verify(key, _ACK, (bytes(sn), cn), me, bytes(ack)):
            raise BaselineError("rank 0's data listener failed authentication")

    async def recv(self, theta: np.ndarray, rnd: int) -> None:
        """Receive the parameters of round ``rnd`` into ``theta`` (every byte; ``stall_timeout`` bounds a stall)."""
        await self.connect()
        assert self.sock is not None
        loop = asyncio.get_running_loop()
        view = bytes_of(theta)
        head_buf = bytearray(HEADER.size)
        try:
            await asyncio.wait_for(recv_exact(loop, self.sock, memoryview(head_buf)), self.stall_timeout)
            kind, dtype, got, nbytes = parse(head_buf)
            if kind != KIND_PARAMS or got != rnd or dtype != theta.dtype or nbytes != view.nbytes:
                raise BaselineError(f"rank {self.rank}: expected the parameters of round {rnd} ({view.nbytes} bytes "
                                    f"of {theta.dtype}), got kind {kind}, round {got}, {nbytes} bytes of {dtype}")
            await asyncio.wait_for(recv_exact(loop, self.sock, view), self.stall_timeout)
        except (TimeoutError, OSError) as exc:
            raise BaselineError(f"rank {self.rank}: the parameters of round {rnd} did not arrive: {exc!r}") from exc

    async def send(self, grad: np.ndarray, rnd: int) -> None:
        """Start sending ``grad`` as this sender's gradient of round ``rnd``; returns once it is on its way.

        The previous gradient must have left first (rank 0 drains late ones at its next gather). The caller
        must not rewrite ``grad`` before rank 0 has closed round ``rnd``: any byte still unsent by then belongs
        to a frame that rank 0 discards.
        """
        await self.connect()
        assert self.sock is not None
        if self._send is not None:
            try:
                await asyncio.wait_for(self._send, self.stall_timeout)
            except (TimeoutError, OSError) as exc:
                raise BaselineError(f"rank {self.rank}: the gradient of round {self._sent_round} could not be "
                                    f"sent: {exc!r}") from exc
        view = bytes_of(grad)
        head = header(KIND_GRAD, grad.dtype, rnd, view.nbytes)
        loop = asyncio.get_running_loop()
        sock = self.sock

        async def send() -> None:
            await loop.sock_sendall(sock, head)
            await loop.sock_sendall(sock, view)

        # in the background: a late gradient may only leave once rank 0 reads again (next round), and the sender
        # must not block on it meanwhile
        self._send = asyncio.ensure_future(send())
        self._sent_round = rnd

    async def cancel_send(self) -> None:
        """Give up a gradient still on its way (nobody will read it: the run stops)."""
        if self._send is not None:
            self._send.cancel()
            await asyncio.gather(self._send, return_exceptions=True)
            self._send = None

    def close(self) -> None:
        if self._send is not None and not self._send.done():
            self._send.cancel()
        if self.sock is not None:
            self.sock.close()
        super().close()
