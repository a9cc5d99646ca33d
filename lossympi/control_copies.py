"""UDP copies of the elastic control channel's small frames: a lost segment no longer stalls a training step.

The elastic control channel (:class:`lossympi.control.TCPControl` after ``make_elastic()``) carries, every step,
one *ready* frame from each rank to rank 0 and one *announcement* from rank 0 to each rank. Both are one TCP
segment. When a lossy link drops one, TCP can only repair it after a tail-loss probe or a retransmission timeout
(at least 2 RTT + ``rto_min``), and the whole step waits for the slowest rank. So each such frame of at most
:data:`MAX_COPY_PAYLOAD` bytes is also sent as :data:`DEFAULT_COPIES` UDP datagrams, :data:`DEFAULT_SPACING`
seconds apart; the receiver takes whichever copy arrives first, TCP or UDP, and drops the others. With independent
loss p per packet, a frame waits for TCP's repair with probability ``p ** (copies + 1)`` instead of ``p``.

Copy datagram (docs/protocol.md, "Control copies")::

    magic "LMC1" | u16 rank | u64 sequence | payload | 32-byte MAC

``rank`` is the link's rank r > 0 in both directions; ``sequence`` and ``payload`` are those of the TCP frame it
copies. ``MAC = HMAC-SHA256(pair key, "lossympi-control-copy-v1" || link nonce || direction || rank || sequence ||
payload)`` (:func:`lossympi.handshake.prove`), where the link nonce is the 16-byte challenge rank 0 sent in that
link's hello: a copy is bound to one TCP connection and one direction, so it cannot be replayed on a later link
(a restarted rank) or reflected. The receiver checks the length, the magic, the rank and the MAC before using
anything, delivers frames in sequence order exactly once (:class:`Inbox`), and counts what it refused.

Rank 0 binds one UDP socket next to its control listener and sends its port in each link's welcome (0: no
copies); a rank learns nothing else from the network. Rank 0 learns the address to which it copies its
announcements from the first authentic ready copy of each link (a copy whose sequence is newer than any seen).

Examples
--------
>>> from lossympi import control_copies as cc
>>> box = cc.Inbox()
>>> box.offer(1, b"second"), box.offer(0, b"first"), box.offer(0, b"first")   # out of order, then a duplicate
(True, True, False)
>>> box.pop(), box.pop(), box.pop()
(b'first', b'second', None)
"""

from __future__ import annotations

import asyncio
import collections
import socket
import struct
from collections.abc import Callable

from . import handshake
from .bootstrap import bind_udp

__all__ = ["DEFAULT_COPIES", "DEFAULT_SPACING", "MAX_COPY_PAYLOAD", "CopySocket", "Inbox", "open_copy", "seal"]

MAGIC = b"LMC1"
_HEADER = struct.Struct("<4sHQ")
_LABEL = b"lossympi-control-copy-v1"
#: Largest payload copied over UDP; larger frames (reliable parameters) travel over TCP only.
MAX_COPY_PAYLOAD = 1024
#: Copies of each small frame, and the seconds between two copies.
DEFAULT_COPIES = 3
DEFAULT_SPACING = 0.0005
#: Frames an :class:`Inbox` holds ahead of the next one in sequence (copies beyond wait for TCP).
HOLD_LIMIT = 16


def _body(direction: int, rank: int, seq: int, payload: bytes) -> bytes:
    return bytes([direction]) + _HEADER.pack(MAGIC, rank, seq) + payload


def seal(key: bytes, nonce: bytes, direction: int, rank: int, seq: int, payload: bytes) -> bytes:
    """The copy datagram of frame ``seq`` (``payload``) on rank ``rank``'s link, sent in ``direction``
    (1: rank 0 to rank r, 0: rank r to rank 0)."""
    mac = handshake.prove(key, _LABEL, (nonce,), _body(direction, rank, seq, payload))
    return _HEADER.pack(MAGIC, rank, seq) + payload + mac


def open_copy(data: bytes, size: int, max_payload: int = MAX_COPY_PAYLOAD) -> tuple[int, int, bytes, bytes] | str:
    """Parse a received copy datagram: ``(rank, seq, payload, mac)``, or the reason it is refused (``"malformed"``:
    length or magic; ``"rank"``: not a rank in [1, size)). The MAC is not checked here (:func:`authentic`)."""
    if not _HEADER.size + handshake.MAC_BYTES <= len(data) <= _HEADER.size + max_payload + handshake.MAC_BYTES:
        return "malformed"
    magic, rank, seq = _HEADER.unpack_from(data)
    if magic != MAGIC:
        return "malformed"
    if not 0 < rank < size:
        return "rank"
    return rank, seq, bytes(data[_HEADER.size:-handshake.MAC_BYTES]), bytes(data[-handshake.MAC_BYTES:])


def authentic(key: bytes | None, nonce: bytes, direction: int, rank: int, seq: int, payload: bytes,
              mac: bytes) -> bool:
    """Whether ``mac`` is :func:`seal`'s for these fields, compared in constant time."""
    return handshake.verify(key, _LABEL, (nonce,), _body(direction, rank, seq, payload), mac)


class Inbox:
    """Exactly-once, in-order delivery of one link's frames arriving by two paths (the TCP stream, UDP copies).

    :meth:`offer` takes frame ``seq`` from either path; :meth:`pop` returns the next frame in sequence once it is
    there. A frame already taken, or more than :data:`HOLD_LIMIT` ahead of the next one, is refused (False).

    Attributes
    ----------
    consumed : int
        Frames popped so far (the count a ready frame reports).
    """

    def __init__(self, start: int = 0, limit: int = HOLD_LIMIT) -> None:
        self.limit = limit
        self.consumed = start
        self._next = start  # the next sequence number not yet taken
        self._held: dict[int, bytes] = {}
        self._queue: collections.deque[bytes] = collections.deque()
        self.changed = asyncio.Event()  # set whenever a frame is taken

    def offer(self, seq: int, payload: bytes) -> bool:
        """Take frame ``seq``; returns whether it was new."""
        if seq < self._next or seq in self._held or seq - self._next >= self.limit:
            return False
        self._held[seq] = payload
        while self._next in self._held:
            self._queue.append(self._held.pop(self._next))
            self._next += 1
        self.changed.set()
        return True

    def pop(self) -> bytes | None:
        """The next frame in sequence, or None when it has not arrived."""
        if not self._queue:
            return None
        self.consumed += 1
        return self._queue.popleft()


class CopySocket(asyncio.DatagramProtocol):
    """One UDP socket for copies: sends a datagram ``copies`` times, ``spacing`` s apart, and hands every received
    datagram to ``on_datagram(data, address)`` (which validates it)."""

    def __init__(self, on_datagram: Callable[[bytes, tuple], None], copies: int = DEFAULT_COPIES,
                 spacing: float = DEFAULT_SPACING) -> None:
        self.on_datagram = on_datagram
        self.copies = copies
        self.spacing = spacing
        self.transport: asyncio.DatagramTransport | None = None
        self.sent = 0

    @classmethod
    async def open(cls, host: str, family: int, on_datagram: Callable[[bytes, tuple], None],
                   copies: int = DEFAULT_COPIES, spacing: float = DEFAULT_SPACING,
                   port_range: tuple[int, int] | None = None) -> CopySocket:
        """Bind a new copy socket on ``host``: the first free port of ``port_range`` when given (an ``OSError``
        when none is free), else any free port."""
        loop = asyncio.get_running_loop()
        if port_range is not None and family == socket.AF_INET:
            sock = bind_udp(host, port_range)
            _, proto = await loop.create_datagram_endpoint(lambda: cls(on_datagram, copies, spacing), sock=sock)
        else:
            _, proto = await loop.create_datagram_endpoint(lambda: cls(on_datagram, copies, spacing),
                                                           local_addr=(host, 0), family=family)
        return proto

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram transport (the loop's own class)

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable etc.: the TCP copy still goes
        pass

    def send(self, datagram: bytes, address: tuple) -> None:
        """Send ``datagram`` to ``address`` :attr:`copies` times, the first now."""
        if self.transport is None or self.transport.is_closing():
            return
        self._send_once(datagram, address)
        loop = asyncio.get_running_loop()
        for i in range(1, self.copies):
            loop.call_later(i * self.spacing, self._send_once, datagram, address)

    def _send_once(self, datagram: bytes, address: tuple) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(datagram, address)
            self.sent += 1

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
