"""Point-to-point lossy transfers of numpy arrays: the asyncio :class:`Endpoint` and its blocking twins.

One endpoint is one rank's UDP socket. ``await ep.send(peer, array)`` transmits an array as datagrams
(paced, optionally through a fault injector); ``await ep.recv(peer, out=array, timeout=...)`` waits until
every chunk arrived or the deadline passed, fills what is missing and returns a :class:`RecvResult` that
says exactly what was lost. The datagram work happens in the Cython core without the GIL; the event loop
(uvloop when installed) only wakes up when the socket is readable and when a deadline fires.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lossympi import _core
from lossympi.fill import FillPolicy, apply_fill, check_policy
from lossympi.wire import DEFAULT_DATAGRAM_BYTES, REJECT_REASONS, chunk_count, dtype_code

if TYPE_CHECKING:
    from lossympi.bootstrap import World
    from lossympi.faults import FaultInjector

__all__ = ["Endpoint", "EndpointCounters", "RecvResult", "SendResult", "new_event_loop", "socket_capabilities"]

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
DEFAULT_BUFFER_BYTES = 32 << 20


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's when installed, else asyncio's default."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


@dataclass(frozen=True)
class EndpointCounters:
    """A snapshot of an endpoint's per-peer protocol counters (:meth:`Endpoint.counters`).

    Subtract an earlier snapshot to get what happened in between (``now - mark``), e.g. one training step.

    Attributes
    ----------
    rejects : ndarray of int64, shape (size + 1, len(REJECT_REASONS))
        Refused datagrams by the rank that really sent them (its registered address; for ``shape`` rejects,
        its MAC), then by reason (:data:`lossympi.wire.REJECT_REASONS`); the last row is ``unknown``: from an
        address that is no rank's.
    stale : ndarray of int64, shape (size,)
        Authentic datagrams of closed messages (replays, late chunks), by sender.
    pool_drops : ndarray of int64, shape (size,)
        Authentic early datagrams dropped because the sender's share of the unexpected pool was full.
    claimed : ndarray of int64, shape (size, len(REJECT_REASONS))
        Refused datagrams by the rank their header claims (``src``, read from any datagram of at least 32 bytes
        whose ``src`` is a rank, whatever check it failed), then by reason: what a receive's ``reject_reasons``
        counts. Unlike ``rejects``, a rank that forges another's ``src`` is charged to its victim here.
    """

    rejects: np.ndarray
    stale: np.ndarray
    pool_drops: np.ndarray
    claimed: np.ndarray

    def __sub__(self, mark: EndpointCounters) -> EndpointCounters:
        return EndpointCounters(self.rejects - mark.rejects, self.stale - mark.stale, self.pool_drops - mark.pool_drops,
                                self.claimed - mark.claimed)

    @property
    def rejected(self) -> int:
        """Every refused datagram."""
        return int(self.rejects.sum())

    def rejected_by_sender(self) -> dict[str, dict[str, int]]:
        """``{sender: {reason: count}}`` with only the non-zero counts; sender ``"unknown"`` for the last row."""
        size = self.rejects.shape[0] - 1
        out: dict[str, dict[str, int]] = {}
        for r, row in enumerate(self.rejects):
            counts = {reason: int(n) for reason, n in zip(REJECT_REASONS, row, strict=True) if n}
            if counts:
                out["unknown" if r == size else str(r)] = counts
        return out


@dataclass
class RecvResult:
    """What one receive delivered.

    Attributes
    ----------
    array : ndarray
        The ``out`` buffer, with missing chunks filled.
    chunk_mask : ndarray of bool
        One entry per chunk: True where the chunk arrived before the deadline.
    chunk_elements : int
        Elements per chunk (the last chunk may hold fewer).
    delivered : float
        Fraction of the message's bytes that arrived (1.0 for an empty message that arrived).
    received, duplicate : int
        Datagrams accepted into this message; duplicates of chunks already there.
    stale, rejected : int
        Datagrams whose header claims this peer as ``src`` and that were too old to use (``stale``) or failed
        validation (``rejected``) during the receive's window: from the post (datagrams of this message that
        waited in the unexpected pool included) until its last chunk arrived, or, when it did not complete, until
        it ended (deadline, or ``fin_grace`` after the FIN). Other messages of the same peer count too.
    reject_reasons : dict of str to int
        ``rejected`` by reason, one key per :data:`lossympi.wire.REJECT_REASONS` (zeros included).
    bytes_received : int
        Payload bytes written into ``array``.
    elapsed : float
        Seconds from posting the receive to its completion.
    complete : bool
        True when every chunk arrived.
    """

    array: np.ndarray
    chunk_mask: np.ndarray
    chunk_elements: int
    delivered: float
    received: int
    duplicate: int
    stale: int
    rejected: int
    bytes_received: int
    elapsed: float
    complete: bool
    peer: int
    tag: int
    tensor_id: int
    reject_reasons: dict[str, int] = field(default_factory=dict)

    def element_mask(self) -> np.ndarray:
        """Per-element mask (same shape as ``array``): True where the value arrived."""
        flat = np.repeat(self.chunk_mask, self.chunk_elements)[: self.array.size]
        return flat.reshape(self.array.shape)

    @property
    def lost_chunks(self) -> int:
        return int(self.chunk_mask.size - np.count_nonzero(self.chunk_mask))


@dataclass
class SendResult:
    """What one send transmitted (datagrams include duplicates made by a fault injector)."""

    peer: int
    tag: int
    tensor_id: int
    datagrams: int
    bytes: int
    elapsed: float
    chunks: int
    injected_drops: np.ndarray | None = field(default=None, repr=False)


@dataclass
class _Pending:
    future: asyncio.Future
    slot: int
    peer: int
    tag: int
    tensor_id: int
    out: np.ndarray
    flat: np.ndarray
    bitmap: np.ndarray
    count: int
    fill: FillPolicy
    started: float
    deadline: float = 0.0
    timer: asyncio.TimerHandle | None = None
    fin_arrivals: int = -1  # data datagrams seen when the sender's FIN came (-1: no FIN yet)


def socket_capabilities(sock: socket.socket) -> dict[str, Any]:
    """Probe what the kernel offers this UDP socket: GSO, GRO and buffer limits."""
    caps: dict[str, Any] = {}
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
        caps["gso"] = True
    except OSError:
        caps["gso"] = False
    try:
        sock.getsockopt(SOL_UDP, UDP_GRO)
        caps["gro"] = True
    except OSError:
        caps["gro"] = False
    for name in ("rmem_max", "wmem_max"):
        try:
            with open(f"/proc/sys/net/core/{name}") as fh:
                caps[name] = int(fh.read())
        except OSError:
            caps[name] = None
    return caps


def _grow_buffer(sock: socket.socket, opt: int, force_opt: int, want: int, sysctl: str) -> int:
    """Set a socket buffer as large as the kernel allows; warn, naming the sysctl, when capped."""
    for o in (force_opt, opt):
        try:
            sock.setsockopt(socket.SOL_SOCKET, o, want)
        except OSError:
            continue
        got = sock.getsockopt(socket.SOL_SOCKET, opt)
        if got >= want:
            return got
    got = sock.getsockopt(socket.SOL_SOCKET, opt)
    if got < want:
        warnings.warn(
            f"lossympi: the kernel capped a UDP socket buffer at {got} bytes (asked {want}); raise it "
            f"with `sysctl -w {sysctl}={want}` (or run as root) to avoid self-inflicted loss",
            RuntimeWarning,
            stacklevel=3,
        )
    return got


def _non_negative(name: str, value: float, unit: str = "") -> float:
    if not value >= 0:  # also refuses NaN
        raise ValueError(f"{name} must be >= 0{unit}, got {value}")
    return value


class Endpoint:
    """One rank's lossy UDP endpoint.

    The endpoint reads its socket only while its event loop runs: from the first async call on (it then watches
    the socket on that loop), or during a blocking call (``recv_blocking``, ``run``, ...) on its private loop.
    Until then datagrams wait in the kernel's socket buffer (``rcvbuf`` bytes), where what does not fit is
    dropped by the kernel, uncounted by lossympi (see docs/protocol.md, "When the endpoint reads").

    Parameters
    ----------
    rank, size : int
        This rank and the number of ranks.
    sock : socket.socket
        This rank's bound UDP (IPv4) socket; the endpoint makes it non-blocking and owns it.
    addresses : sequence of (host, port)
        UDP address of every rank, indexed by rank.
    keys : mapping rank -> bytes
        32-byte pair key shared with each peer (see :mod:`lossympi.keys`). Required when ``auth``.
    auth : bool
        Authenticate every datagram (16-byte MAC: AES-128 of GHASH, docs/protocol.md). Turn off only on a
        trusted network.
    datagram_bytes : int
        UDP payload size of one datagram; 1472 fits a 1500-byte MTU without fragmentation.
    gso, gro : bool or "auto"
        Use UDP GSO on send / GRO on receive; "auto" uses them where the kernel supports them.
    rate_bps : float or None
        Send rate in bits per second (token bucket); None: unpaced (bursts still bounded).
    burst_bytes : int or None
        Bytes a sender may run ahead of its rate; default an eighth of the socket's receive buffer, at least
        64 KiB (collectives give each of ``k`` senders to one receiver ``rcvbuf / (4 k)`` instead, see
        :class:`lossympi.comm.Comm`).
    fill : str or callable
        Default fill policy for missing chunks (see :mod:`lossympi.fill`).
    faults : FaultInjector or None
        Inject drops, duplicates, reordering, delays and corruption on the send side.
    unexpected_bytes : int
        Memory of the pool that holds authenticated datagrams arriving before their receive is posted: cut into
        entries of ``datagram_bytes`` bytes (one datagram each, whatever its length), of which each peer may hold
        ``1 / (size - 1)`` (at least 16).
    buffer_bytes : int
        Socket send and receive buffer to ask of the kernel.
    check_address : bool
        Also refuse (reason ``rank``) a datagram whose header claims rank ``r`` but that did not come from ``r``'s
        registered address. Off by default: the per-pair MAC already proves the origin, and NAT or multi-homed
        hosts may send from another address. Settable later through the :attr:`check_address` property.
    send_fin : bool
        After a message, send three FIN datagrams that tell the receiver nothing more is coming, so that a
        lossy receive ends ``fin_grace`` seconds after the last datagram instead of at its deadline.
    fin_grace : float
        Seconds a receive still waits after its sender's FIN (for datagrams reordered behind it).
    seed : int or None
        Seed of the generator that draws the ``random`` fill.
    inline_bytes : int
        A message of at most this many bytes, unpaced within its burst and its credit window and without injected
        faults, is sent from the calling thread (the event loop) instead of the sending thread: it leaves in tens
        of µs, where the hand-off to the thread and back costs up to milliseconds on a busy machine (twice per
        message, with its FIN). 0 sends every message from the thread.
    """

    def __init__(
        self,
        rank: int,
        size: int,
        sock: socket.socket,
        addresses: Sequence[tuple[str, int]],
        keys: Mapping[int, bytes] | None = None,
        *,
        auth: bool = True,
        datagram_bytes: int = DEFAULT_DATAGRAM_BYTES,
        gso: bool | str = "auto",
        gro: bool | str = "auto",
        rate_bps: float | None = None,
        burst_bytes: int | None = None,
        fill: FillPolicy = "random",
        faults: FaultInjector | None = None,
        unexpected_bytes: int = 64 << 20,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        check_address: bool = False,
        send_fin: bool = True,
        fin_grace: float = 0.002,
        seed: int | None = None,
        inline_bytes: int = 64 << 10,
    ) -> None:
        if sock.family != socket.AF_INET or sock.type != socket.SOCK_DGRAM:
            raise ValueError("lossympi needs an AF_INET SOCK_DGRAM socket")
        if len(addresses) != size:
            raise ValueError(f"addresses has {len(addresses)} entries for a world of size {size}")
        if auth and keys is None:
            raise ValueError("auth=True needs pair keys (keys=...); pass auth=False explicitly on a trusted network")
        check_policy(fill, np.dtype(np.float32))
        self.rank = rank
        self.size = size
        self.sock = sock
        sock.setblocking(False)
        caps = socket_capabilities(sock)
        self.rcvbuf = _grow_buffer(sock, socket.SO_RCVBUF, SO_RCVBUFFORCE, buffer_bytes, "net.core.rmem_max")
        self.sndbuf = _grow_buffer(sock, socket.SO_SNDBUF, SO_SNDBUFFORCE, buffer_bytes, "net.core.wmem_max")
        use_gso = caps["gso"] if gso == "auto" else bool(gso)
        use_gro = False
        if gro == "auto" or gro:
            try:
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                use_gro = True
            except OSError as exc:
                if gro is True:
                    raise OSError(exc.errno, "this kernel refuses UDP_GRO; use gro='auto' or False") from exc
        self.gro = use_gro
        self.core = _core.Core(
            sock.fileno(), rank, size, auth=auth, datagram_bytes=datagram_bytes, gso=use_gso,
            unexpected_bytes=unexpected_bytes, check_address=check_address,
        )
        self.auth = auth
        self.datagram_bytes = datagram_bytes
        self.stride = self.core.stride
        self.addresses = [(str(h), int(p)) for h, p in addresses]
        for peer, (host, port) in enumerate(self.addresses):
            self.core.set_peer(peer, socket.inet_aton(socket.gethostbyname(host)), port)
        if keys is not None:
            for peer, key in keys.items():
                self.core.set_key(int(peer), bytes(key))
        self.rate_bps = float(rate_bps) if rate_bps else 0.0
        self.burst_bytes = int(burst_bytes) if burst_bytes else max(64 << 10, self.rcvbuf // 8)
        self.fill = fill
        self.faults = faults
        self.send_fin = bool(send_fin)
        self.fin_grace = float(_non_negative("fin_grace", fin_grace, " seconds"))
        self.inline_bytes = int(_non_negative("inline_bytes", inline_bytes))
        self.inline_sends = 0  # messages sent from the calling thread (see ``inline_bytes``)
        self.rng = np.random.default_rng(seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._own_loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, _Pending] = {}
        self._send_tags: dict[tuple[int, int], int] = {}
        self._recv_tags: dict[tuple[int, int], int] = {}
        self._last: dict[tuple[int, int], np.ndarray] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lossympi-send-{rank}")
        self._closed = False

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_world(cls, world: World, **kwargs: Any) -> Endpoint:
        """Build the endpoint of a bootstrapped :class:`lossympi.bootstrap.World`."""
        return cls(world.rank, world.size, world.sock, world.addresses, world.keys, **kwargs)

    @classmethod
    def local(cls, size: int, **kwargs: Any) -> list[Endpoint]:
        """``size`` endpoints on 127.0.0.1 in this process, with fresh pair keys (tests, demos)."""
        from lossympi.bootstrap import local_worlds

        return [cls.from_world(w, **kwargs) for w in local_worlds(size)]

    @property
    def gso(self) -> bool:
        return bool(self.core.gso)

    @property
    def check_address(self) -> bool:
        """Whether a datagram must come from the registered address of the rank its header claims."""
        return bool(self.core.check_address)

    @check_address.setter
    def check_address(self, on: bool) -> None:
        self.core.check_address = bool(on)

    # ------------------------------------------------------------------ event loop plumbing
    def _attach(self) -> asyncio.AbstractEventLoop:
        if self._closed:
            raise RuntimeError("endpoint is closed")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            loop.add_reader(self.sock.fileno(), self._on_readable)
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("this endpoint is already bound to another event loop")
        return loop

    def _on_readable(self) -> None:
        self._drain()

    def _drain(self) -> None:
        """Process what the socket holds: complete receives end now, announced ones after ``fin_grace``."""
        for s in self.core.progress():
            self._finish(s)
        for s in self.core.take_fins():
            self._announced(s)

    def _announced(self, slot: int) -> None:
        """The sender of ``slot``'s message sent its FIN: what is still missing was lost, or is still in flight
        behind the FIN (datagrams can overtake each other, e.g. on different CPUs' backlogs). End the receive
        once ``fin_grace`` seconds pass with no new datagram for it, instead of at the deadline."""
        p = self._pending.get(slot)
        if p is None or self._loop is None or p.fin_arrivals >= 0:
            return
        p.fin_arrivals = self.core.slot_arrivals(slot)
        if p.timer is not None:
            p.timer.cancel()
        p.timer = self._loop.call_later(self.fin_grace, self._fin_check, slot)

    def _fin_check(self, slot: int) -> None:
        self._drain()
        p = self._pending.get(slot)
        if p is None or self._loop is None:
            return
        arrivals = self.core.slot_arrivals(slot)
        remaining = p.deadline - time.monotonic()
        if arrivals > p.fin_arrivals and remaining > self.fin_grace:
            p.fin_arrivals = arrivals  # still flowing: wait another quiet interval
            p.timer = self._loop.call_later(self.fin_grace, self._fin_check, slot)
        elif arrivals > p.fin_arrivals:
            p.timer = self._loop.call_later(max(0.0, remaining), self._on_deadline, slot)
        else:
            self._finish(slot)

    def _finish(self, slot: int) -> None:
        p = self._pending.pop(slot, None)
        if p is None:
            return
        if p.timer is not None:
            p.timer.cancel()
        received, duplicate, nbytes, stale, rejects = self.core.close(slot)
        chunk_mask = np.unpackbits(p.bitmap, bitorder="little")[: p.count].astype(bool)
        itemsize = p.out.dtype.itemsize
        chunk_elements = self.stride // itemsize
        complete = received == p.count
        result = RecvResult(
            array=p.out,
            chunk_mask=chunk_mask,
            chunk_elements=chunk_elements,
            delivered=(nbytes / p.out.nbytes) if p.out.nbytes else float(complete),
            received=received,
            duplicate=duplicate,
            stale=stale,
            rejected=sum(rejects),
            bytes_received=nbytes,
            elapsed=time.monotonic() - p.started,
            complete=complete,
            peer=p.peer,
            tag=p.tag,
            tensor_id=p.tensor_id,
            reject_reasons=dict(zip(REJECT_REASONS, rejects, strict=True)),
        )
        key = (p.peer, p.tensor_id)
        if not complete:
            emask = result.element_mask()
            last = self._last.get(key)
            if last is not None and (last.shape != p.out.shape or last.dtype != p.out.dtype):
                last = None  # the message changed shape: nothing was delivered at these positions
            try:
                apply_fill(p.fill, p.out, emask, last=last, rng=self.rng)
            except Exception as exc:  # a failing fill must fail the receive, not leave it hanging
                if not p.future.done():
                    p.future.set_exception(exc)
                return
        if isinstance(p.fill, str) and p.fill == "last":
            self._last[key] = p.out.copy()
        if not p.future.done():
            p.future.set_result(result)

    def _on_deadline(self, slot: int) -> None:
        p = self._pending.get(slot)
        if p is None:
            return
        remaining = p.deadline - time.monotonic()
        if remaining > 0 and self._loop is not None:
            # uvloop's timers have millisecond resolution and may fire early: never end a receive
            # before its deadline.
            p.timer = self._loop.call_later(remaining, self._on_deadline, slot)
            return
        # Take what is queued in the socket before declaring anything lost.
        self._drain()
        self._finish(slot)

    def _next_tag(self, table: dict[tuple[int, int], int], peer: int, tid: int, tag: int | None,
                  commit: bool = True) -> int:
        if tag is None:
            tag = table.get((peer, tid), 0)
        if tag < 0 or tag >= (1 << 64) - 1:  # 2**64 - 1 is reserved: the completed-tag map stores tag + 1
            raise ValueError(f"tag {tag} must be in [0, 2**64 - 1)")
        if commit:
            table[(peer, tid)] = tag + 1
        return tag

    def _check_peer(self, peer: int) -> None:
        if not isinstance(peer, int | np.integer) or not 0 <= peer < self.size:
            raise ValueError(f"peer {peer!r} is not a rank in [0, {self.size})")

    # ------------------------------------------------------------------ receive
    def irecv(
        self,
        peer: int,
        out: np.ndarray,
        *,
        tag: int | None = None,
        tensor_id: int = 0,
        deadline: float | None = None,
        timeout: float | None = None,
        fill: FillPolicy | None = None,
        credit_bytes: int | None = None,
    ) -> asyncio.Future:
        """Post a receive now and return a future of its :class:`RecvResult` (call from the loop).

        ``deadline`` is absolute, on the ``time.monotonic()`` clock; ``timeout`` is relative. One of
        them is required: a lossy receive always ends. ``credit_bytes``: the sender is credit-driven with this
        window (it passes the same to :meth:`send`), and this receive grants it more as it drains
        (docs/protocol.md, "Incast").
        """
        loop = self._attach()
        self._check_peer(peer)
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out must be a numpy array, not {type(out).__name__}")
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("out must be a writeable C-contiguous array (use np.ascontiguousarray)")
        code = dtype_code(out.dtype)
        policy = self.fill if fill is None else fill
        check_policy(policy, out.dtype)
        now = time.monotonic()
        if deadline is None:
            if timeout is None:
                raise ValueError("recv needs deadline= (time.monotonic() seconds) or timeout= (seconds)")
            deadline = now + float(timeout)
        if not 0 <= tensor_id < 1 << 32:
            raise ValueError(f"tensor_id {tensor_id} must be in [0, 2**32)")
        tag = self._next_tag(self._recv_tags, peer, tensor_id, tag, commit=False)
        flat = out.reshape(-1).view(np.uint8)
        count = chunk_count(flat.size, self.stride)
        bitmap = np.zeros((count + 7) // 8, np.uint8)
        slot = self.core.post(peer, tag, tensor_id, flat, bitmap, code, out, self._credit_chunks(credit_bytes))
        # Only a successful post consumes the tag (a refused one must not shift the auto numbering).
        self._recv_tags[(peer, tensor_id)] = tag + 1
        fut = loop.create_future()
        p = _Pending(fut, slot, peer, tag, tensor_id, out, flat, bitmap, count, policy, now, deadline)
        self._pending[slot] = p
        fut.add_done_callback(lambda f, s=slot: self._cancelled(s) if f.cancelled() else None)
        if self.core.is_complete(slot):
            self.core.take_done()
            self._finish(slot)
        else:
            p.timer = loop.call_at(loop.time() + max(0.0, deadline - now), self._on_deadline, slot)
            for s in self.core.take_fins():  # a FIN that waited in the pool
                self._announced(s)
        return fut

    def _cancelled(self, slot: int) -> None:
        p = self._pending.pop(slot, None)
        if p is not None:
            if p.timer is not None:
                p.timer.cancel()
            self.core.close(slot)

    async def recv(
        self,
        peer: int,
        out: np.ndarray,
        *,
        tag: int | None = None,
        tensor_id: int = 0,
        deadline: float | None = None,
        timeout: float | None = None,
        fill: FillPolicy | None = None,
    ) -> RecvResult:
        """Receive a message from ``peer`` into ``out`` until every chunk arrived or the deadline.

        ``tag`` identifies the message (default: the next number for this ``(peer, tensor_id)``);
        tags must increase. Missing chunks are filled with ``fill`` (default: the endpoint's).
        """
        return await self.irecv(peer, out, tag=tag, tensor_id=tensor_id, deadline=deadline,
                                timeout=timeout, fill=fill)

    # ------------------------------------------------------------------ send
    def _credit_chunks(self, credit_bytes: int | None) -> int:
        """A credit window in whole chunks (0: no credit); at least one chunk."""
        if not credit_bytes:
            return 0
        return int(min(0xFFFF_FFFF, max(1, int(credit_bytes) // self.stride)))

    def _inline(self, nbytes: int, count: int, rate: float, burst: int, credit: int) -> bool:
        """Whether a message is small enough to leave from the calling thread without waiting: within
        ``inline_bytes``, its pacing burst (when paced) and its credit window (when credit-driven)."""
        wire_bytes = nbytes + count * (_core.HEADER_SIZE + _core.MAC_SIZE)  # what the core paces: header + MAC each
        return nbytes <= self.inline_bytes and (not rate or wire_bytes <= burst) and \
            (not credit or count <= credit)

    def _send_now(self, peer: int, flat: np.ndarray, code: int, tag: int, tid: int,
                  indices: np.ndarray | None, corrupt: bool, rate: float, burst: int, credit: int = 0) -> int:
        return self.core.send(peer, flat, code, tag, tid, indices, corrupt, rate, burst, credit)

    def _send_plan(self, peer: int, flat: np.ndarray, code: int, tag: int, tid: int,
                   order: np.ndarray, corrupt: np.ndarray, rate: float, burst: int, credit: int = 0) -> int:
        """Send ``order`` in runs of equal corruption flag (vectorised run detection)."""
        if order.size == 0:
            return 0
        cuts = np.flatnonzero(np.diff(corrupt.astype(np.int8))) + 1
        starts = np.concatenate(([0], cuts))
        ends = np.concatenate((cuts, [order.size]))
        n = 0
        for a, b in zip(starts, ends, strict=True):
            n += self._send_now(peer, flat, code, tag, tid, np.ascontiguousarray(order[a:b], np.uint32),
                                bool(corrupt[a]), rate, burst, credit)
        return n

    def _prepare_send(self, peer: int, array: np.ndarray, tag: int | None, tensor_id: int):
        self._check_peer(peer)
        if self._closed:
            raise RuntimeError("endpoint is closed")
        arr = np.ascontiguousarray(array)
        code = dtype_code(arr.dtype)
        if not 0 <= tensor_id < 1 << 32:
            raise ValueError(f"tensor_id {tensor_id} must be in [0, 2**32)")
        tag = self._next_tag(self._send_tags, peer, tensor_id, tag)
        flat = arr.reshape(-1).view(np.uint8)
        count = chunk_count(flat.size, self.stride)
        plan = self.faults.plan(peer, count) if self.faults is not None else None
        return arr, flat, code, tag, count, plan

    async def send(self, peer: int, array: np.ndarray, *, tag: int | None = None, tensor_id: int = 0,
                   rate_bps: float | None = None, burst_bytes: int | None = None,
                   credit_bytes: int | None = None) -> SendResult:
        """Send ``array`` to ``peer`` as datagrams; returns once all are handed to the kernel.

        The array must not be modified until this returns. Transmission runs in a helper thread
        without the GIL, so the event loop keeps receiving meanwhile (and takes the receiver's credits).
        ``rate_bps`` overrides the endpoint's send rate for this message and ``burst_bytes`` its burst
        allowance; ``credit_bytes`` makes the send receiver-driven: at most that many bytes past the highest
        chunk the receiver reported, which must have posted its receive with the same ``credit_bytes``
        (collectives use these to share a receiver among senders; docs/protocol.md, "Incast").
        """
        loop = self._attach()
        arr, flat, code, tag, count, plan = self._prepare_send(peer, array, tag, tensor_id)
        rate = self.rate_bps if rate_bps is None else float(rate_bps)
        burst = self.burst_bytes if burst_bytes is None else max(1, int(burst_bytes))
        credit = self._credit_chunks(credit_bytes)
        t0 = time.monotonic()
        inline = plan is None and self._inline(flat.size, count, rate, burst, credit)
        self.inline_sends += inline

        async def call(fn: Any, *args: Any) -> Any:  # from this thread (inline) or from the sending thread
            return fn(*args) if inline else await loop.run_in_executor(self._executor, fn, *args)

        if plan is None:
            n = await call(self._send_now, peer, flat, code, tag, tensor_id, None, False, rate, burst, credit)
        else:
            n = await call(self._send_plan, peer, flat, code, tag, tensor_id, plan.order, plan.corrupt, rate, burst,
                           credit)
            if plan.delayed.size:
                await asyncio.sleep(plan.delay)
                n += await call(self._send_plan, peer, flat, code, tag, tensor_id, plan.delayed,
                                plan.delayed_corrupt, rate, burst, credit)
        if self.send_fin:
            # The end-of-message announcement, from the thread that sent the data (the same CPU's queue, so
            # it rarely overtakes them): the receiver stops waiting for chunks lost on the way.
            await call(self.core.send_fin, peer, code, tag, tensor_id, flat.size)
        return SendResult(peer, tag, tensor_id, n, flat.size, time.monotonic() - t0, count,
                          None if plan is None else plan.dropped)

    # ------------------------------------------------------------------ blocking API
    def _sync_loop(self) -> asyncio.AbstractEventLoop:
        if self._own_loop is None:
            if self._loop is not None:
                raise RuntimeError("this endpoint is used from an event loop: use the async methods")
            self._own_loop = new_event_loop()
        return self._own_loop

    def recv_blocking(self, peer: int, out: np.ndarray, **kwargs: Any) -> RecvResult:
        """Blocking :meth:`recv` (runs the endpoint's private event loop)."""
        return self._sync_loop().run_until_complete(self.recv(peer, out, **kwargs))

    def send_blocking(self, peer: int, array: np.ndarray, **kwargs: Any) -> SendResult:
        """Blocking :meth:`send`."""
        return self._sync_loop().run_until_complete(self.send(peer, array, **kwargs))

    def run(self, coro: Any) -> Any:
        """Run a coroutine that uses this endpoint on its private event loop."""
        return self._sync_loop().run_until_complete(coro)

    # ------------------------------------------------------------------ lifecycle
    def stats(self) -> dict[str, Any]:
        """Endpoint-wide counters since creation.

        Keys: ``datagrams`` read from the socket (each GRO segment counts one), ``accepted`` chunks, ``duplicates``,
        ``stale``, ``overflow`` (dropped, the unexpected pool or the sender's share being full), ``pooled`` (put in the
        pool), ``pool_in_use``, ``fins`` (valid FINs, of open, future or closed messages), ``rejected`` (by reason),
        ``rejected_by_sender`` (see :meth:`rejects_by_sender`), the receiver-driven ingest's ``credits_sent``,
        ``credits_received`` and ``credit_timeouts`` (waits for a grant that ended without one), and the socket's
        ``gso``, ``gro``, ``auth``, ``rcvbuf``, ``sndbuf`` and ``last_errno``.
        """
        c = self.core
        return {
            "datagrams": c.datagrams, "accepted": c.accepted, "duplicates": c.duplicates,
            "stale": c.stale, "overflow": c.overflow, "pooled": c.pooled, "pool_in_use": c.pool_in_use, "fins": c.fins,
            "credits_sent": c.credits_sent, "credits_received": c.credits_received,
            "credit_timeouts": c.credit_timeouts,
            "rejected": c.rejects_by_reason(),
            "rejected_by_sender": self.rejects_by_sender(), "gso": self.gso, "gro": self.gro, "auth": self.auth,
            "rcvbuf": self.rcvbuf, "sndbuf": self.sndbuf, "last_errno": errno.errorcode.get(c.last_errno),
        }

    def rejects_by_sender(self) -> dict[str, dict[str, int]]:
        """Rejected datagrams by the rank that really sent them (its registered address; for ``shape``
        rejects, its MAC), then by reason; only non-zero counts. Key ``"unknown"``: from an address that is
        no rank's. A rank that claims another's rank in its headers is charged here, not its victim.
        """
        return self.counters().rejected_by_sender()

    @property
    def accepted(self) -> int:
        """Datagrams accepted so far (authentic, valid, new): a cheap progress reading while a receive runs."""
        return int(self.core.accepted)

    def counters(self) -> EndpointCounters:
        """A snapshot of the per-peer protocol counters since creation; subtract an earlier one for a window.

        Examples
        --------
        >>> mark = ep.counters()                                   # doctest: +SKIP
        >>> ...                                                    # doctest: +SKIP
        >>> (ep.counters() - mark).rejected_by_sender()            # doctest: +SKIP
        """
        c = self.core
        return EndpointCounters(np.array(c.rejects_by_sender(), np.int64),
                                np.array([c.stale_from(r) for r in range(self.size)], np.int64),
                                np.array([c.overflow_from(r) for r in range(self.size)], np.int64),
                                np.array([c.rejects_from(r) for r in range(self.size)], np.int64))

    def readmit(self, rank: int, address: tuple[str, int], key: bytes | None) -> None:
        """Install a new UDP address and pair key for ``rank`` (a restarted peer that rejoined).

        From now on datagrams from ``rank`` must come from ``address`` and carry MACs under ``key``; what this
        endpoint sends to ``rank`` goes there. Call it from the endpoint's event-loop thread.
        """
        self._check_peer(rank)
        if self.auth and (key is None or len(key) != 32):
            raise ValueError(f"readmitting rank {rank} needs its new 32-byte pair key")
        host, port = str(address[0]), int(address[1])
        if key is not None:
            self.core.set_key(rank, bytes(key))
        self.core.set_peer(rank, socket.inet_aton(socket.gethostbyname(host)), port)
        self.addresses[rank] = (host, port)

    def close(self) -> None:
        """Cancel pending receives, stop reading the socket and close it."""
        if self._closed:
            return
        for p in list(self._pending.values()):
            if not p.future.done():
                p.future.cancel()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.sock.fileno())
        self._executor.shutdown(wait=True)
        self.sock.close()
        if self._own_loop is not None:
            self._own_loop.close()
        self._closed = True

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
