"""Reliable, authenticated control messages between ranks: barrier, small broadcasts and gathers.

The lossy data path (UDP) carries tensors; this channel carries what must not be lost: barriers, the
metadata of a step, a decision to stop. It is a star over TCP through rank 0. Every rank ``r > 0``
connects to rank 0's control listener (the TCP port with the same number as rank 0's UDP port, see
:func:`lossympi.bootstrap.bind_udp_and_control`) and proves it holds the pair key of rank ``r`` by a
challenge-response (:func:`lossympi.handshake.prove`: HMAC-SHA256 over a fresh nonce). Every frame then
carries a sequence number and an HMAC-SHA256 under the pair key, so frames cannot be forged, replayed or
reordered. Payloads are bytes: nothing received is ever unpickled or executed.

Frame: ``u32 length | u64 sequence | payload | 32-byte HMAC(key, direction | sequence | payload)``.
Payload of an operation: ``u8 op | u64 op number | data``; every rank numbers its control operations, so
a rank that calls a different collective than the others gets a clear error instead of a deadlock. Every
operation starts with every rank ``r > 0`` sending its header to rank 0, so rank 0 always sees a mismatch;
it then sends an abort frame (op ``OP_ABORT``, the error as data) to every rank. A rank whose channel
failed (mismatch, abort, authentication, sequence, timeout) refuses further operations.

Elastic mode (:meth:`TCPControl.make_elastic`, used by training): ranks may die and come back, and rank 0 must
never block on, nor fail because of, a dead or slow rank. Rank 0 then only *announces* (:meth:`announce`: one
frame queued on every live link, never waiting for a peer) and the other ranks *listen* (:meth:`listen`); the
collectives above are refused. Each :meth:`listen` first tells rank 0 that the rank is ready for the next
announcement (an authenticated ``ready`` frame carrying how many frames it has received), so rank 0 can wait
for the ranks that are still busy, at most a given time (:meth:`wait_ready`): a bounded barrier, which keeps
the ranks in step without letting a slow one hold rank 0 more than once (a rank that missed a wait is not waited
for again until it has caught up). Every ready frame and every announcement of at most 1 KiB is also sent as
authenticated UDP copies (:mod:`lossympi.control_copies`; docs/protocol.md, "Control copies"), and the receiver takes
whichever comes first, so a lost TCP segment does not stall a training step.
Rank 0 keeps its listener open and reads every link: EOF, a reset, a frame
that fails authentication or is not a ``ready``, or a queue that does not drain, marks the link dead (counted in
:attr:`link_failures`; the rank is in :meth:`missing` until it reconnects). A rank whose link is dead may connect
again with the ordinary hello, under the pair key rank 0 holds for it at that moment (after a rejoin through the
rendezvous, the new one: see :mod:`lossympi.bootstrap`); a hello for a rank whose link is alive is refused. A
rank that reads EOF from rank 0 gets :class:`ControlClosed`.

Hostile connections to rank 0's listener (both modes): the hello is a fixed 36 bytes that must arrive within
``handshake_timeout`` seconds, at most ``max_handshakes`` handshakes are in progress at once, and every refused
connection is counted by reason in :attr:`TCPControl.rejects` (``auth``: bad MAC or rank; ``timeout``: silent or
half-open; ``eof``: closed mid-hello; ``rank_taken``: the rank's link is alive; ``overflow``). The length of every
frame is checked against ``max_bytes`` before its body is read.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import logging
import select
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence

from . import control_copies, handshake

__all__ = ["ControlClosed", "ControlError", "TCPControl"]

log = logging.getLogger(__name__)

_LEN = struct.Struct("<I")
_SEQ = struct.Struct("<Q")
_OP = struct.Struct("<BQ")
_HELLO = b"lossympi-control-hello-v1"
_NONCE_BYTES = 16
_MAC_BYTES = handshake.MAC_BYTES
OP_BARRIER = 1
OP_BCAST = 2
OP_GATHER = 3
OP_FORWARD = 4
OP_ABORT = 5
OP_ANNOUNCE = 6
OP_WELCOME = 7
OP_READY = 8
OP_NAMES = {OP_BARRIER: "Barrier", OP_BCAST: "bcast", OP_GATHER: "gather", OP_FORWARD: "forward",
            OP_ABORT: "abort", OP_ANNOUNCE: "announce", OP_WELCOME: "welcome", OP_READY: "ready"}


class ControlError(RuntimeError):
    """The control channel failed: authentication, framing, a mismatched collective or a lost peer."""


class ControlClosed(ControlError):
    """The peer closed or reset the control connection (it exited or crashed)."""


def _mac(key: bytes, direction: int, seq: int, payload: bytes) -> bytes:
    return hmac.new(key, bytes([direction]) + _SEQ.pack(seq) + payload, hashlib.sha256).digest()


#: ``TCP_RTO_MIN_US`` and ``TCP_DELACK_MAX_US`` (Linux >= 6.15; older kernels refuse them and keep their defaults).
_TCP_RTO_MIN_US = 45
_TCP_DELACK_MAX_US = 46
#: Lower bound of the control links' retransmission timeout and upper bound of their delayed ACKs, in µs.
CONTROL_RTO_MIN_US = 5000
CONTROL_DELACK_MAX_US = 1000


def low_latency(sock: socket.socket | None) -> dict[str, int]:
    """Tune a control-channel TCP socket for small messages on a lossy LAN; returns what was applied.

    A control message is usually one segment. When it is lost, nothing follows it to trigger fast retransmit,
    so Linux waits for its tail-loss probe, ``2 RTT + rto_min`` with ``rto_min`` = 200 ms by default, and a
    per-step message then costs a training step 200 ms at every loss. Here ``rto_min`` is 5 ms and delayed ACKs
    are capped at 1 ms (per socket, ``TCP_RTO_MIN_US`` / ``TCP_DELACK_MAX_US``), and Nagle is off. Options the
    kernel does not know are skipped: the channel stays correct, only slower to repair a loss.
    """
    applied: dict[str, int] = {}
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return applied
    for name, opt, value in (("nodelay", socket.TCP_NODELAY, 1), ("rto_min_us", _TCP_RTO_MIN_US, CONTROL_RTO_MIN_US),
                             ("delack_max_us", _TCP_DELACK_MAX_US, CONTROL_DELACK_MAX_US)):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, opt, value)
            applied[name] = sock.getsockopt(socket.IPPROTO_TCP, opt)
        except OSError:
            pass
    return applied


class _Link:
    """One authenticated, sequenced TCP connection (rank 0 <-> rank r)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: bytes, outbound: int,
                 max_bytes: int, nonce: bytes = b"") -> None:
        self.nonce = nonce  # rank 0's hello challenge: binds this link's UDP copies to it
        self.copy_addr: tuple | None = None  # rank 0: where this rank's copy socket is (its first ready copy)
        self.copy_seen = -1  # rank 0: the newest sequence number of an authentic copy from this rank
        self.ready_seen = 0  # rank 0: ready frames applied, by either path
        self.reader = reader
        self.writer = writer
        self.key = key
        self.out_dir = outbound
        self.in_dir = 1 - outbound
        self.send_seq = 0
        self.recv_seq = 0
        self.max_bytes = max_bytes
        self.tuning = low_latency(writer.get_extra_info("socket"))

    def write(self, payload: bytes) -> None:
        """Frame ``payload`` and queue it, without waiting for the socket to take it."""
        body = _SEQ.pack(self.send_seq) + payload
        mac = _mac(self.key, self.out_dir, self.send_seq, payload)
        self.writer.write(_LEN.pack(len(body) + _MAC_BYTES) + body + mac)
        self.send_seq += 1

    async def send(self, payload: bytes) -> None:
        self.write(payload)
        await self.writer.drain()

    async def recv(self) -> bytes:
        try:
            (n,) = _LEN.unpack(await self.reader.readexactly(_LEN.size))
            if not _SEQ.size + _MAC_BYTES <= n <= self.max_bytes + _SEQ.size + _MAC_BYTES:
                raise ControlError(f"control frame of {n} bytes is out of bounds (max {self.max_bytes} payload)")
            frame = await self.reader.readexactly(n)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise ControlClosed(f"control connection lost: {exc}") from exc
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
        Pair keys (rank 0 needs every rank's, other ranks need rank 0's). Rank 0 reads ``self.keys`` at each
        hello, so a rejoining rank's new key takes effect once stored there.
    listener : socket.socket, optional
        Rank 0's listening TCP socket (``World.control``).
    timeout : float
        Seconds to wait for the star to form, and for any one operation (in elastic mode: for a rank to hear
        the next announcement, and for rank 0 to hand one frame to a link).
    max_bytes : int
        Largest payload accepted in one frame.
    handshake_timeout : float
        Seconds a new connection to rank 0 has to complete its hello.
    max_handshakes : int
        Handshakes in progress at once on rank 0; connections beyond are closed at once (counted ``overflow``).
    send_timeout : float
        Rank 0, elastic: seconds a link may keep announcements queued (its peer not reading) before it is
        dropped; a link with more than ``2 * max_bytes + 1 MiB`` queued is dropped at once.
    copies : int
        Elastic mode: UDP copies of every ready frame and small announcement (:mod:`lossympi.control_copies`);
        0 sends none (rank 0's choice holds for every link: its welcome says whether it takes copies).
    copy_spacing : float
        Seconds between two copies of one frame.
    copy_port_range : tuple[int, int] or None
        Bind the copy socket in this inclusive UDP port range (``World.port_range``: ``LOSSYMPI_PORT_RANGE``) so
        a firewall that opens the range passes the copies; when no port of it is free, this rank sends and takes
        no copies (one warning line) and the control channel runs over TCP alone.

    Attributes
    ----------
    rejects : collections.Counter
        Rank 0: refused incoming connections by reason (see the module notes).
    link_failures : collections.Counter
        Rank 0, elastic mode: links lost after their hello, by reason (``eof``, ``reset``, ``bad_frame``,
        ``timeout``).
    rejoins : int
        Rank 0: hellos accepted for a rank that had a link before (a restarted rank).
    copy_counts : collections.Counter
        Elastic mode, UDP copies received: ``first`` (a frame a copy delivered before its TCP twin: rank 0's ready
        frames, a rank's announcements), ``duplicate``, and refused ones by reason (``malformed``, ``rank``,
        ``auth``: bad MAC or no live link, ``op``: not a ready frame).
    """

    def __init__(self, rank: int, size: int, addresses: Sequence[tuple[str, int]], keys: Mapping[int, bytes],
                 listener: socket.socket | None = None, *, timeout: float = 120.0, max_bytes: int = 1 << 20,
                 handshake_timeout: float = 5.0, max_handshakes: int = 64, send_timeout: float = 10.0,
                 copies: int = control_copies.DEFAULT_COPIES,
                 copy_spacing: float = control_copies.DEFAULT_SPACING,
                 copy_port_range: tuple[int, int] | None = None) -> None:
        if copies < 0 or copy_spacing < 0:
            raise ValueError(f"copies={copies!r} and copy_spacing={copy_spacing!r} must be >= 0 (0 copies: TCP only)")
        if rank == 0 and size > 1 and listener is None:
            raise ValueError("rank 0 needs its control listener (World.control) to serve the control channel")
        self.rank = rank
        self.size = size
        self.addresses = list(addresses)
        self.keys = dict(keys)
        self.listener = listener
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.handshake_timeout = handshake_timeout
        self.max_handshakes = max_handshakes
        self.send_timeout = send_timeout
        self.elastic = False
        self.links: dict[int, _Link] = {}
        self.rejects: collections.Counter[str] = collections.Counter()
        self.link_failures: collections.Counter[str] = collections.Counter()
        self.rejoins = 0
        self.copies = copies
        self.copy_spacing = copy_spacing
        self.copy_port_range = copy_port_range
        self.copy_counts: collections.Counter[str] = collections.Counter()
        self._copy_socket: control_copies.CopySocket | None = None
        self._copy_dest: tuple | None = None  # rank r > 0: rank 0's copy socket (from the welcome)
        self._inbox: control_copies.Inbox | None = None  # rank r > 0, elastic: announcements by TCP or copy
        self._tcp_read: asyncio.Task | None = None  # rank r > 0, elastic: the TCP read in progress
        self._seen: set[int] = set()
        self._watchers: dict[int, asyncio.Task] = {}
        self._draining: dict[int, asyncio.Task] = {}
        self._handshake_tasks: set[asyncio.Task] = set()
        self._ready_at: dict[int, int] = {}  # rank 0, elastic: the frame count in each rank's last ready frame
        self._lagging: set[int] = set()  # rank 0, elastic: ranks that missed a wait_ready, until they catch up
        self._ready_event: asyncio.Event | None = None
        self._handshakes = 0
        self._server: asyncio.AbstractServer | None = None
        self._opno = 0
        self._ready: asyncio.Future | None = None
        self._failed: str | None = None

    @property
    def rejected(self) -> int:
        """Rank 0: total refused incoming connections (the sum of :attr:`rejects`)."""
        return sum(self.rejects.values())

    def make_elastic(self) -> None:
        """Switch to elastic mode (see the module notes); call before the first operation."""
        if self._ready is not None:
            raise RuntimeError("make_elastic() must be called before the control channel is first used")
        self.elastic = True

    def missing(self) -> list[int]:
        """Rank 0: the ranks that have no live link now."""
        return [r for r in range(1, self.size) if r not in self.links]

    # ------------------------------------------------------------------ connection set-up
    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         done: asyncio.Future) -> None:
        """Rank 0: one incoming connection. Never raises; a refusal is counted and closes the connection."""
        if self._handshakes >= self.max_handshakes:
            self.rejects["overflow"] += 1
            writer.close()
            return
        self._handshakes += 1
        reason = None
        try:
            nonce = handshake.new_nonce(_NONCE_BYTES)
            writer.write(nonce)
            await asyncio.wait_for(writer.drain(), self.handshake_timeout)
            hello = await asyncio.wait_for(reader.readexactly(4 + _MAC_BYTES), self.handshake_timeout)
            (r,) = _LEN.unpack_from(hello)
            key = self.keys.get(r)
            if not 0 < r < self.size or not handshake.verify(key, _HELLO, (nonce,), _LEN.pack(r), hello[4:]):
                reason = "auth"
            elif r in self.links and not (self.elastic and not self.link_alive(r)):
                reason = "rank_taken"
                log.warning("control: refused a second connection for rank %d, whose link is alive", r)
            else:
                # elastic: the other ranks only send ready frames to rank 0, so a larger frame is refused unread
                link = _Link(reader, writer, key, 1, _OP.size if self.elastic else self.max_bytes, nonce)
                if self.elastic:  # the hello is accepted: tell the rank (its link is installed once told) and
                    # where rank 0 takes UDP copies (port 0: none)
                    port = self._copy_socket.port if self._copy_socket is not None else 0
                    await asyncio.wait_for(link.send(_OP.pack(OP_WELCOME, port)), self.handshake_timeout)
                if r in self.links:  # another hello for r won while this one was being welcomed
                    reason = "rank_taken"
                else:
                    self.links[r] = link
                    if r in self._seen:
                        self.rejoins += 1
                        log.warning("control: rank %d reconnected (rejoin #%d)", r, self.rejoins)
                    self._seen.add(r)
                    if self.elastic:
                        self._watchers[r] = asyncio.ensure_future(self._watch(r, link))
                    if len(self.links) == self.size - 1 and not done.done():
                        done.set_result(None)
        except TimeoutError:
            reason = "timeout"
        except (asyncio.IncompleteReadError, ConnectionError):
            reason = "eof"
        except asyncio.CancelledError:  # the channel closes
            writer.close()
            raise
        finally:
            self._handshakes -= 1
        if reason is not None:
            self.rejects[reason] += 1
            writer.close()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._handshake_tasks.add(task)
            try:
                await self._handshake(reader, writer, done)
            finally:
                self._handshake_tasks.discard(task)

        if self.elastic and self.copies:
            assert self.listener is not None
            self._copy_socket = await self._open_copies(self.listener, self._on_copy_at_root)
        server = await asyncio.start_server(handle, sock=self.listener)
        self._server = server
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout=self.timeout)
        except TimeoutError as exc:
            missing = self.missing()
            if not self.elastic or not self.links:
                server.close()
                raise ControlError(
                    f"control channel: ranks {missing} did not connect within {self.timeout} s") from exc
            log.warning("control: ranks %s did not connect within %g s; going on without them (they may join "
                        "later)", missing, self.timeout)
        if not self.elastic:
            server.close()

    # ------------------------------------------------------------------ elastic mode (rank 0)
    async def _watch(self, r: int, link: _Link) -> None:
        """Rank 0, elastic: read rank ``r``'s ready frames until its link ends (EOF, reset, bad frame)."""
        while True:
            try:
                payload = await link.recv()
            except ControlClosed as exc:
                reason = "reset" if isinstance(exc.__cause__, ConnectionResetError) else "eof"
                break
            except ControlError:  # authentication, sequence, size
                reason = "bad_frame"
                break
            except asyncio.CancelledError:
                return
            if len(payload) != _OP.size or payload[0] != OP_READY:
                reason = "bad_frame"
                break
            self._on_ready(r, link, link.recv_seq - 1, _OP.unpack(payload)[1])
        self._drop(r, link, reason)

    def _on_ready(self, r: int, link: _Link, seq: int, count: int) -> bool:
        """Rank 0: apply rank ``r``'s ready frame ``seq`` (by TCP or a copy) unless already applied."""
        if seq < link.ready_seen:
            return False
        link.ready_seen = seq + 1
        self._ready_at[r] = count
        if count == link.send_seq:
            self._lagging.discard(r)  # caught up
        if self._ready_event is not None:
            self._ready_event.set()
        return True

    def _authentic_copy(self, data: bytes, max_payload: int) -> tuple[_Link, int, int, bytes] | None:
        """``(link, rank, seq, payload)`` of a datagram on the copy socket when it parses and its MAC is that of a
        live link (rank 0: the sender's; rank r: its own link to rank 0), else None, counted by reason."""
        got = control_copies.open_copy(data, self.size, max_payload)
        if isinstance(got, str):
            self.copy_counts[got] += 1
            return None
        r, seq, payload, mac = got
        link = self.links.get(r if self.rank == 0 else 0)
        if link is None or self.rank not in (0, r) or \
                not control_copies.authentic(link.key, link.nonce, link.in_dir, r, seq, payload, mac):
            self.copy_counts["auth"] += 1
            return None
        return link, r, seq, payload

    def _on_copy_at_root(self, data: bytes, addr: tuple) -> None:
        """Rank 0: a datagram on the copy socket; only an authentic ready copy of a live link is used."""
        got = self._authentic_copy(data, _OP.size)
        if got is None:
            return
        link, r, seq, payload = got
        if len(payload) != _OP.size or payload[0] != OP_READY:
            self.copy_counts["op"] += 1
            return
        if seq > link.copy_seen:  # a fresh copy: its source is where this rank takes announcement copies
            link.copy_seen = seq
            link.copy_addr = addr
        self.copy_counts["first" if self._on_ready(r, link, seq, _OP.unpack(payload)[1]) else "duplicate"] += 1

    def _is_ready(self, r: int) -> bool:
        link = self.links.get(r)
        return link is None or r in self._lagging or self._ready_at.get(r) == link.send_seq

    async def wait_ready(self, timeout: float) -> list[int]:
        """Rank 0, elastic: wait, at most ``timeout`` seconds, until every live rank has asked for the next
        announcement; returns the ranks that have not, sorted: those that missed this wait and those still
        behind from an earlier one (neither is waited for again until it has caught up, i.e. asked for the
        next announcement after reading every earlier one)."""
        if self.rank != 0 or not self.elastic:
            raise ControlError("wait_ready() is rank 0's operation on an elastic control channel")
        await self.connect()
        end = time.monotonic() + timeout
        if self._ready_event is None:
            self._ready_event = asyncio.Event()
        while True:
            late = [r for r in sorted(self.links) if not self._is_ready(r)]
            left = end - time.monotonic()
            if not late or left <= 0:
                break
            self._ready_event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready_event.wait(), left)
        self._lagging.update(late)
        return sorted(r for r in self._lagging if r in self.links)

    def _drop(self, r: int, link: _Link, reason: str) -> None:
        if self.links.get(r) is not link:
            return  # already replaced or dropped
        del self.links[r]
        self.link_failures[reason] += 1
        log.warning("control: lost rank %d (%s); it counts as missing until it reconnects", r, reason)
        link.close()
        self._ready_at.pop(r, None)
        self._lagging.discard(r)
        if self._ready_event is not None:
            self._ready_event.set()
        for tasks in (self._watchers, self._draining):
            task = tasks.pop(r, None)
            if task is not None and task is not asyncio.current_task():
                task.cancel()

    def link_alive(self, r: int) -> bool:
        """Rank 0, elastic: whether rank ``r`` has a live link, looking at its socket now (a dead one is dropped).

        The event loop may not have read the end of a dead link yet (a restarted rank can rejoin while rank 0 is
        busy): the socket itself is asked whether the peer hung up or reset it.
        """
        link = self.links.get(r)
        if link is None:
            return False
        sock = link.writer.get_extra_info("socket")
        if link.writer.is_closing() or link.reader.at_eof() or sock is None or sock.fileno() < 0:
            self._drop(r, link, "eof")
            return False
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLERR | select.POLLHUP | select.POLLRDHUP)
        events = poller.poll(0)
        if events:
            self._drop(r, link, "reset" if events[0][1] & select.POLLERR else "eof")
            return False
        return True

    async def announce(self, data: bytes) -> list[int]:
        """Rank 0, elastic: send ``data`` to every rank with a live link; returns the ranks it was handed to.

        Never waits for a rank: the frame is queued on each link. A link whose peer does not read is dropped
        (``timeout``) once its queue stays above the high-water mark for ``send_timeout`` seconds, or holds more
        than ``2 * max_bytes + 1 MiB``; a send error drops it (``reset``).
        """
        if self.rank != 0 or not self.elastic:
            raise ControlError("announce() is rank 0's operation on an elastic control channel (make_elastic())")
        await self.connect()
        payload = _OP.pack(OP_ANNOUNCE, self._opno) + bytes(data)
        if len(payload) > self.max_bytes:
            raise ValueError(f"announcement of {len(payload)} bytes exceeds max_bytes={self.max_bytes}")
        self._opno += 1
        reached = []
        for r, link in sorted(self.links.items()):
            seq = link.send_seq
            try:
                link.write(payload)
                queued = link.writer.transport.get_write_buffer_size()
            except (ConnectionError, OSError, RuntimeError):
                self._drop(r, link, "reset")
                continue
            if queued > 2 * self.max_bytes + (1 << 20):
                self._drop(r, link, "timeout")
                continue
            if queued and r not in self._draining:
                self._draining[r] = asyncio.ensure_future(self._drain(r, link))
            reached.append(r)
            if self._copy_socket is not None and link.copy_addr is not None and \
                    len(payload) <= control_copies.MAX_COPY_PAYLOAD:
                self._copy_socket.send(control_copies.seal(link.key, link.nonce, link.out_dir, r, seq, payload),
                                       link.copy_addr)
        await asyncio.sleep(0)
        return reached

    async def flush(self) -> None:
        """Rank 0, elastic: wait, at most ``send_timeout`` seconds, until every link's queue is empty (before
        closing the channel after a last announcement)."""
        end = time.monotonic() + self.send_timeout
        while time.monotonic() < end and any(
                link.writer.transport.get_write_buffer_size() for link in self.links.values()):
            await asyncio.sleep(0.01)

    async def _drain(self, r: int, link: _Link) -> None:
        """Rank 0, elastic: wait for a link's queue to drain; drop the link after ``send_timeout`` seconds."""
        try:
            await asyncio.wait_for(link.writer.drain(), self.send_timeout)
        except TimeoutError:
            self._drop(r, link, "timeout")
        except (ConnectionError, OSError):
            self._drop(r, link, "reset")
        except asyncio.CancelledError:
            return
        finally:
            if self._draining.get(r) is asyncio.current_task():
                del self._draining[r]

    async def listen(self) -> bytes:
        """Rank ``r > 0``, elastic: the next announcement of rank 0.

        Raises :class:`ControlClosed` when rank 0 closed or reset the connection (it exited or crashed), and
        :class:`ControlError` when nothing came within ``timeout`` seconds or the frame is not an announcement.
        """
        if self.rank == 0 or not self.elastic:
            raise ControlError("listen() is for ranks > 0 on an elastic control channel (make_elastic())")
        await self.connect()
        if self._failed is not None:
            raise ControlError(f"control channel unusable after an earlier error: {self._failed}")
        link = self.links[0]
        inbox = self._inbox
        assert inbox is not None
        try:
            ready = _OP.pack(OP_READY, inbox.consumed)
            seq = link.send_seq
            try:  # tell rank 0 this rank waits for its next announcement
                link.write(ready)
            except (ConnectionError, OSError) as exc:
                raise ControlClosed(f"control connection lost: {exc}") from exc
            if self._copy_socket is not None and self._copy_dest is not None:
                self._copy_socket.send(control_copies.seal(link.key, link.nonce, link.out_dir, self.rank, seq, ready),
                                       self._copy_dest)
            try:
                payload = await asyncio.wait_for(self._next_announcement(link, inbox), self.timeout)
            except TimeoutError:
                raise ControlError(f"rank {self.rank}: rank 0 announced nothing within {self.timeout} s "
                                   "(control timeout)") from None
            if payload[:1] == bytes([OP_ABORT]):
                raise ControlError(payload[_OP.size:].decode("utf-8", "replace"))
            if payload[:1] != bytes([OP_ANNOUNCE]) or len(payload) < _OP.size:
                raise ControlError(f"rank {self.rank}: expected an announcement from rank 0")
        except ControlError as exc:
            self._failed = self._failed or str(exc)
            raise
        return payload[_OP.size:]

    async def _next_announcement(self, link: _Link, inbox: control_copies.Inbox) -> bytes:
        """Rank r > 0: the next frame in sequence, from the TCP stream or a UDP copy, whichever comes first.

        At most one TCP read is in progress, and it is never cancelled (a frame is read whole, even when its copy
        won; the next call then drops it as a duplicate), so a rank that stops listening stops reading, as
        without copies."""
        while True:
            got = inbox.pop()
            if got is not None:
                return got
            if self._tcp_read is None:
                self._tcp_read = asyncio.ensure_future(link.recv())
            inbox.changed.clear()
            changed = asyncio.ensure_future(inbox.changed.wait())
            try:
                await asyncio.wait((self._tcp_read, changed), return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
            if self._tcp_read.done():
                read, self._tcp_read = self._tcp_read, None
                inbox.offer(link.recv_seq - 1, read.result())  # raises what the read raised

    async def _open_copies(self, beside: socket.socket,
                           on_datagram: Callable[[bytes, tuple], None]) -> control_copies.CopySocket | None:
        """The UDP copy socket, on the address of ``beside`` (this rank's control socket); None, with one warning,
        when it cannot be bound (no free port in ``copy_port_range``): the channel then runs over TCP alone."""
        try:
            return await control_copies.CopySocket.open(beside.getsockname()[0], beside.family, on_datagram,
                                                        self.copies, self.copy_spacing, self.copy_port_range)
        except OSError as exc:
            log.warning("control: rank %d sends no UDP copies of its control frames (TCP only, slower to repair a "
                        "lost segment): %s", self.rank, exc)
            return None

    def _on_copy_at_rank(self, data: bytes, addr: tuple) -> None:
        """Rank r > 0: a datagram on the copy socket; only an authentic copy of this link's next frames is used."""
        got = self._authentic_copy(data, control_copies.MAX_COPY_PAYLOAD)
        if got is None:
            return
        _, _, seq, payload = got
        assert self._inbox is not None  # made before the copy socket (_join)
        self.copy_counts["first" if self._inbox.offer(seq, payload) else "duplicate"] += 1

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
            nonce = await asyncio.wait_for(reader.readexactly(_NONCE_BYTES), timeout=self.timeout)
        except TimeoutError as exc:
            raise ControlError(f"rank 0 sent no control handshake within {self.timeout} s") from exc
        except asyncio.IncompleteReadError as exc:
            raise ControlError("rank 0 closed the control channel during the handshake") from exc
        mac = handshake.prove(key, _HELLO, (nonce,), _LEN.pack(self.rank))
        writer.write(_LEN.pack(self.rank) + mac)
        await writer.drain()
        link = _Link(reader, writer, key, 0, self.max_bytes, nonce)
        if self.elastic:  # rank 0 confirms an accepted hello
            try:
                welcome = await asyncio.wait_for(link.recv(), self.timeout)
            except TimeoutError as exc:
                raise ControlError(f"rank 0 did not confirm rank {self.rank}'s control hello within "
                                   f"{self.timeout} s") from exc
            except ControlClosed as exc:
                raise ControlError(
                    f"rank 0 refused rank {self.rank}'s control hello: another live process holds rank "
                    f"{self.rank}, or this process's pair key is not the one rank 0 holds (a restarted rank must "
                    "rejoin through the rendezvous first)") from exc
            if welcome[:1] != bytes([OP_WELCOME]) or len(welcome) != _OP.size:
                raise ControlError(f"rank {self.rank}: expected rank 0's welcome on the control channel")
            self._inbox = control_copies.Inbox(link.recv_seq)
            port = _OP.unpack(welcome)[1]
            if self.copies and 0 < port < 65536:  # rank 0 takes copies there
                self._copy_socket = await self._open_copies(writer.get_extra_info("socket"), self._on_copy_at_rank)
                self._copy_dest = (host, port) if self._copy_socket is not None else None
        self.links[0] = link

    async def connect(self) -> None:
        """Form the star (idempotent; every collective calls it first)."""
        if self.size == 1:
            return
        if self._ready is None:
            self._ready = asyncio.ensure_future(self._serve() if self.rank == 0 else self._join())
        await asyncio.shield(self._ready)

    # ------------------------------------------------------------------ operations
    def _begin(self, op: int) -> bytes:
        if self.elastic:
            raise ControlError(f"{OP_NAMES[op]} is not available on an elastic control channel (ranks may come and "
                               "go): use announce() on rank 0 and listen() on the others")
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

    async def aclose(self) -> None:
        """Close the channel, and wait for its own tasks (handshakes, watchers) to end, so none is left pending."""
        tasks = [*self._watchers.values(), *self._draining.values(), *self._handshake_tasks,
                 *([self._tcp_read] if self._tcp_read is not None else [])]
        self.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        for task in [*self._watchers.values(), *self._draining.values(), *self._handshake_tasks]:
            task.cancel()
        if self._tcp_read is not None:
            self._tcp_read.cancel()
            self._tcp_read = None
        if self._copy_socket is not None:
            self._copy_socket.close()
            self._copy_socket = None
        self._watchers.clear()
        self._draining.clear()
        for link in self.links.values():
            link.close()
        self.links.clear()
        if self._server is not None:
            self._server.close()
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()
