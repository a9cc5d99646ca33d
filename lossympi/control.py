"""Reliable, authenticated control messages between ranks: barrier, small broadcasts and gathers.

The lossy data path (UDP) carries tensors; this channel carries what must not be lost: barriers, the
metadata of a step, a decision to stop. It is a star over TCP through rank 0. Every rank ``r > 0``
connects to rank 0's control listener (the TCP port with the same number as rank 0's UDP port, see
:func:`lossympi.bootstrap.bind_udp_and_control`) and proves it holds the pair key of rank ``r`` by a
challenge-response (HMAC-SHA256 over a fresh nonce). Every frame then carries a sequence number and an
HMAC-SHA256 under the pair key, so frames cannot be forged, replayed or reordered. Payloads are bytes:
nothing received is ever unpickled or executed.

Frame: ``u32 length | u64 sequence | payload | 32-byte HMAC(key, direction | sequence | payload)``.
Payload of an operation: ``u8 op | u64 op number | data``; every rank numbers its control operations, so
a rank that calls a different collective than the others gets a clear error instead of a deadlock. Every
operation starts with every rank ``r > 0`` sending its header to rank 0, so rank 0 always sees a mismatch;
it then sends an abort frame (op ``OP_ABORT``, the error as data) to every rank. A rank whose channel
failed (mismatch, abort, authentication, sequence, timeout) refuses further operations.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import socket
import struct
import time
from collections.abc import Mapping, Sequence

__all__ = ["ControlError", "TCPControl"]

_LEN = struct.Struct("<I")
_SEQ = struct.Struct("<Q")
_OP = struct.Struct("<BQ")
_HELLO = b"lossympi-control-hello-v1"
_MAC_BYTES = 32
OP_BARRIER = 1
OP_BCAST = 2
OP_GATHER = 3
OP_FORWARD = 4
OP_ABORT = 5
OP_NAMES = {OP_BARRIER: "Barrier", OP_BCAST: "bcast", OP_GATHER: "gather", OP_FORWARD: "forward",
            OP_ABORT: "abort"}


class ControlError(RuntimeError):
    """The control channel failed: authentication, framing, a mismatched collective or a lost peer."""


def _mac(key: bytes, direction: int, seq: int, payload: bytes) -> bytes:
    return hmac.new(key, bytes([direction]) + _SEQ.pack(seq) + payload, hashlib.sha256).digest()


class _Link:
    """One authenticated, sequenced TCP connection (rank 0 <-> rank r)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: bytes, outbound: int,
                 max_bytes: int) -> None:
        self.reader = reader
        self.writer = writer
        self.key = key
        self.out_dir = outbound
        self.in_dir = 1 - outbound
        self.send_seq = 0
        self.recv_seq = 0
        self.max_bytes = max_bytes

    async def send(self, payload: bytes) -> None:
        body = _SEQ.pack(self.send_seq) + payload
        mac = _mac(self.key, self.out_dir, self.send_seq, payload)
        self.writer.write(_LEN.pack(len(body) + _MAC_BYTES) + body + mac)
        self.send_seq += 1
        await self.writer.drain()

    async def recv(self) -> bytes:
        try:
            (n,) = _LEN.unpack(await self.reader.readexactly(_LEN.size))
            if not _SEQ.size + _MAC_BYTES <= n <= self.max_bytes + _SEQ.size + _MAC_BYTES:
                raise ControlError(f"control frame of {n} bytes is out of bounds (max {self.max_bytes} payload)")
            frame = await self.reader.readexactly(n)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise ControlError(f"control connection lost: {exc}") from exc
        (seq,) = _SEQ.unpack_from(frame)
        payload = frame[_SEQ.size:-_MAC_BYTES]
        if not hmac.compare_digest(frame[-_MAC_BYTES:], _mac(self.key, self.in_dir, seq, payload)):
            raise ControlError("control frame failed authentication")
        if seq != self.recv_seq:
            raise ControlError(f"control frame out of sequence (got {seq}, expected {self.recv_seq}): replay?")
        self.recv_seq += 1
        return payload

    def close(self) -> None:
        self.writer.close()


def _pack_list(items: Sequence[bytes]) -> bytes:
    return _LEN.pack(len(items)) + b"".join(_LEN.pack(len(b)) for b in items) + b"".join(items)


def _unpack_list(data: bytes, expect: int) -> list[bytes]:
    (n,) = _LEN.unpack_from(data)
    if n != expect or len(data) < _LEN.size * (n + 1):
        raise ControlError(f"malformed gathered list ({n} items, expected {expect})")
    lens = [_LEN.unpack_from(data, _LEN.size * (i + 1))[0] for i in range(n)]
    pos = _LEN.size * (n + 1)
    if pos + sum(lens) != len(data):
        raise ControlError("malformed gathered list (lengths do not add up)")
    out = []
    for ln in lens:
        out.append(data[pos:pos + ln])
        pos += ln
    return out


class TCPControl:
    """Reliable control channel of one rank (a star through rank 0 over TCP).

    Parameters
    ----------
    rank, size : int
        This rank and the world size.
    addresses : sequence of (host, port)
        Every rank's address; rank 0's TCP control listener has the same address as its UDP socket.
    keys : mapping rank -> bytes
        Pair keys (rank 0 needs every rank's, other ranks need rank 0's).
    listener : socket.socket, optional
        Rank 0's listening TCP socket (``World.control``).
    timeout : float
        Seconds to wait for the star to form, and for any one operation.
    max_bytes : int
        Largest payload accepted in one frame.
    """

    def __init__(self, rank: int, size: int, addresses: Sequence[tuple[str, int]], keys: Mapping[int, bytes],
                 listener: socket.socket | None = None, *, timeout: float = 120.0, max_bytes: int = 1 << 20) -> None:
        if rank == 0 and size > 1 and listener is None:
            raise ValueError("rank 0 needs its control listener (World.control) to serve the control channel")
        self.rank = rank
        self.size = size
        self.addresses = list(addresses)
        self.keys = dict(keys)
        self.listener = listener
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.links: dict[int, _Link] = {}
        self.rejected = 0
        self._opno = 0
        self._ready: asyncio.Future | None = None
        self._failed: str | None = None

    # ------------------------------------------------------------------ connection set-up
    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                nonce = os.urandom(16)
                writer.write(nonce)
                await writer.drain()
                hello = await asyncio.wait_for(reader.readexactly(4 + _MAC_BYTES), timeout=5.0)
                (r,) = _LEN.unpack_from(hello)
                key = self.keys.get(r)
                expect = hmac.new(key or b"\0", _HELLO + nonce + _LEN.pack(r), hashlib.sha256).digest()
                if not 0 < r < self.size or key is None or r in self.links or not hmac.compare_digest(
                        hello[4:], expect):
                    raise ControlError("bad control hello")
                self.links[r] = _Link(reader, writer, key, 1, self.max_bytes)
                if len(self.links) == self.size - 1 and not done.done():
                    done.set_result(None)
            except (TimeoutError, ControlError, asyncio.IncompleteReadError, ConnectionError):
                self.rejected += 1
                writer.close()

        server = await asyncio.start_server(handle, sock=self.listener)
        self._server = server
        try:
            await asyncio.wait_for(done, timeout=self.timeout)
        except TimeoutError as exc:
            missing = sorted(set(range(1, self.size)) - set(self.links))
            raise ControlError(f"control channel: ranks {missing} did not connect within {self.timeout} s") from exc
        finally:
            server.close()

    async def _join(self) -> None:
        host, port = self.addresses[0]
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                reader, writer = await asyncio.open_connection(host, port)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise ControlError(f"cannot reach rank 0's control channel at {host}:{port}: {exc}") from exc
                await asyncio.sleep(0.05)
        key = self.keys[0]
        try:
            nonce = await asyncio.wait_for(reader.readexactly(16), timeout=self.timeout)
        except TimeoutError as exc:
            raise ControlError(f"rank 0 sent no control handshake within {self.timeout} s") from exc
        except asyncio.IncompleteReadError as exc:
            raise ControlError("rank 0 closed the control channel during the handshake") from exc
        mac = hmac.new(key, _HELLO + nonce + _LEN.pack(self.rank), hashlib.sha256).digest()
        writer.write(_LEN.pack(self.rank) + mac)
        await writer.drain()
        self.links[0] = _Link(reader, writer, key, 0, self.max_bytes)

    async def connect(self) -> None:
        """Form the star (idempotent; every collective calls it first)."""
        if self.size == 1:
            return
        if self._ready is None:
            self._ready = asyncio.ensure_future(self._serve() if self.rank == 0 else self._join())
        await asyncio.shield(self._ready)

    # ------------------------------------------------------------------ operations
    def _begin(self, op: int) -> bytes:
        if self._failed is not None:
            raise ControlError(f"control channel unusable after an earlier error: {self._failed}")
        header = _OP.pack(op, self._opno)
        self._opno += 1
        return header

    def _check(self, payload: bytes, header: bytes, peer: int) -> bytes:
        if payload[:1] == bytes([OP_ABORT]):
            raise ControlError(payload[_OP.size:].decode("utf-8", "replace"))
        if payload[:_OP.size] != header:
            got = _OP.unpack_from(payload) if len(payload) >= _OP.size else (0, -1)
            raise ControlError(
                f"rank {peer} called {OP_NAMES.get(got[0], got[0])} #{got[1]} while rank {self.rank} called "
                f"{OP_NAMES[header[0]]} #{_OP.unpack(header)[1]}: every rank must call the same collectives "
                "in the same order")
        return payload[_OP.size:]

    async def _recv_from(self, peer: int, header: bytes) -> bytes:
        try:
            try:
                payload = await asyncio.wait_for(self.links[peer].recv(), self.timeout)
            except TimeoutError:
                raise ControlError(
                    f"rank {self.rank}: rank {peer} sent nothing for {OP_NAMES[header[0]]} "
                    f"#{_OP.unpack(header)[1]} within {self.timeout} s (control timeout)") from None
            return self._check(payload, header, peer)
        except ControlError as exc:
            self._failed = self._failed or str(exc)
            raise

    async def _collect(self, header: bytes) -> list[bytes]:
        """Rank 0: receive every other rank's frame of this operation; on any error, abort every rank."""
        tasks = [asyncio.ensure_future(self._recv_from(r, header)) for r in range(1, self.size)]
        try:
            return list(await asyncio.gather(*tasks))
        except ControlError as exc:
            for t in tasks:
                if not t.done():
                    t.cancel()
                elif not t.cancelled():
                    t.exception()  # retrieved: a second mismatch is not logged as unhandled
            abort = _OP.pack(OP_ABORT, 0) + str(exc).encode()
            await asyncio.gather(*(link.send(abort) for link in self.links.values()), return_exceptions=True)
            raise

    async def gather_bytes(self, data: bytes, root: int = 0) -> list[bytes] | None:
        """Gather one ``bytes`` per rank at ``root`` (reliable). Returns the list at ``root``, else None."""
        self._check_root(root)
        await self.connect()
        header = self._begin(OP_GATHER)
        if self.size == 1:
            return [bytes(data)]
        if self.rank != 0:
            await self.links[0].send(header + bytes(data))
            if self.rank == root:
                return _unpack_list(await self._recv_from(0, header), self.size)
            return None
        parts = await self._collect(header)
        items = [bytes(data), *parts]
        if root == 0:
            return items
        await self.links[root].send(header + _pack_list(items))
        return None

    async def bcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        """Broadcast ``data`` from ``root`` to every rank (reliable); returns it on every rank."""
        self._check_root(root)
        await self.connect()
        header = self._begin(OP_BCAST)
        if self.size == 1:
            return bytes(data or b"")
        if self.rank == root:
            if data is None:
                raise ValueError("the root of bcast_bytes must pass data")
            data = bytes(data)
        if self.rank != 0:
            # Every rank, not only the root, announces its call to rank 0 (see the module notes).
            await self.links[0].send(header + (data if self.rank == root else b""))
            if self.rank == root:
                return data
            return await self._recv_from(0, header)
        parts = await self._collect(header)
        if root != 0:
            data = parts[root - 1]
        assert data is not None
        await asyncio.gather(*(self.links[r].send(header + data) for r in range(1, self.size) if r != root))
        return data

    async def barrier(self) -> None:
        """Return once every rank has entered the barrier."""
        await self.connect()
        header = self._begin(OP_BARRIER)
        if self.size == 1:
            return
        if self.rank != 0:
            await self.links[0].send(header)
            await self._recv_from(0, header)
            return
        await self._collect(header)
        await asyncio.gather(*(self.links[r].send(header) for r in range(1, self.size)))

    def _check_root(self, root: int) -> None:
        if not 0 <= root < self.size:
            raise ValueError(f"root {root} is not a rank in [0, {self.size})")

    def close(self) -> None:
        for link in self.links.values():
            link.close()
        self.links.clear()
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()
