"""Lossy collectives with deadlines: the :class:`Comm` communicator.

Shaped like mpi4py's ``Comm``: ``comm.rank``, ``comm.size``, ``comm.Gather(sendbuf, recvbuf, root)``,
``comm.Bcast(buf, root)``, ``comm.Scatter``, ``comm.Allgather``, ``comm.Allreduce`` and ``comm.Barrier``.
Each lossy collective also takes ``timeout=`` (seconds) or ``deadline=`` (``time.monotonic()`` seconds)
and ``fill=``, and returns a :class:`CollectiveResult` with a per-rank mask of what arrived. The async
versions, with the same names and arguments, live on ``comm.aio`` (``await comm.aio.Gather(...)``).

Every rank must call the same collectives in the same order, as with MPI: each call takes the next
number of a per-communicator sequence, which becomes the message tag, so a late datagram of one
collective can never land in another. Collectives use tensor ids at and above ``COLLECTIVE_TENSOR_IDS``;
point-to-point traffic on the same endpoint should stay below it.

Incast control: in a many-to-one pattern (Gather, Allreduce, Allgather) the receiver drives its senders with
credits: each sender may run a window of ``rcvbuf / (4 k)`` bytes past the highest chunk the receiver has drained,
and the receiver grants more as it drains, so ``k`` senders never hold more than a quarter of its socket buffer in
flight whatever its speed (see docs/protocol.md, "Incast"). ``ingest_bps``, when set, also caps the sum of
their rates.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lossympi.control import TCPControl
from lossympi.endpoint import Endpoint, RecvResult, SendResult
from lossympi.fill import FillPolicy, check_policy
from lossympi.wire import dtype_code

if TYPE_CHECKING:
    from lossympi.bootstrap import World

__all__ = ["COLLECTIVE_TENSOR_IDS", "CollectiveResult", "Comm", "DEFAULT_INGEST_BPS", "REDUCE_OPS"]

COLLECTIVE_TENSOR_IDS = 0x8000_0000
DEFAULT_INGEST_BPS: float | None = None
REDUCE_OPS = ("sum", "mean", "max", "min")


@dataclass
class CollectiveResult:
    """What one lossy collective delivered to this rank.

    Attributes
    ----------
    results : dict[int, RecvResult]
        One entry per message this rank received, keyed by the sending rank.
    elapsed : float
        Seconds this rank spent in the collective.
    contributions : ndarray or None
        Allreduce only: per element of this rank's reduced shard, how many ranks' values arrived
        (including its own).
    sent : dict[int, SendResult]
        Bcast's root, Scatter's root and Gather's senders: what this rank sent to each rank (datagrams, chunks,
        and the chunks a fault injector dropped).
    """

    results: dict[int, RecvResult] = field(default_factory=dict)
    sent: dict[int, SendResult] = field(default_factory=dict)
    elapsed: float = 0.0
    contributions: np.ndarray | None = None

    @property
    def delivered(self) -> float:
        """Fraction of the received bytes that arrived (1.0 when this rank received nothing)."""
        total = sum(r.array.nbytes for r in self.results.values())
        got = sum(r.bytes_received for r in self.results.values())
        return got / total if total else 1.0

    @property
    def complete(self) -> bool:
        return all(r.complete for r in self.results.values())

    def element_mask(self, rank: int) -> np.ndarray:
        """Per-element mask of the message received from ``rank``."""
        return self.results[rank].element_mask()

    def stats(self) -> dict[str, Any]:
        """Counters summed over the received messages."""
        keys = ("received", "duplicate", "stale", "rejected", "bytes_received")
        out: dict[str, Any] = {k: sum(getattr(r, k) for r in self.results.values()) for k in keys}
        out["lost_chunks"] = sum(r.lost_chunks for r in self.results.values())
        out["delivered"] = self.delivered
        out["elapsed"] = self.elapsed
        return out


def _contiguous(buf: Any, name: str, writeable: bool = False) -> np.ndarray:
    if not isinstance(buf, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, not {type(buf).__name__}")
    if not buf.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use np.ascontiguousarray)")
    if writeable and not buf.flags.writeable:
        raise ValueError(f"{name} must be writeable")
    dtype_code(buf.dtype)  # an unsendable dtype fails here, before any tag is taken or datagram sent
    return buf


class _Async:
    """The async collectives of a :class:`Comm` (``comm.aio``)."""

    def __init__(self, comm: Comm) -> None:
        self.c = comm

    # ------------------------------------------------------------------ helpers
    def _deadline(self, deadline: float | None, timeout: float | None) -> float:
        if deadline is not None:
            return float(deadline)
        if timeout is None:
            raise ValueError("lossy collectives need deadline= (time.monotonic() seconds) or timeout= (seconds)")
        return time.monotonic() + float(timeout)

    def _fill(self, fill: FillPolicy | None, dtype: np.dtype) -> None:
        """Check the fill policy a receive will use (``fill`` or the endpoint's) before anything is sent."""
        check_policy(self.c.endpoint.fill if fill is None else fill, dtype)

    def _tag(self, tag: int | None) -> int:
        """``tag`` (an explicit message tag, e.g. a training step), or the communicator's next sequence number.

        Every rank of a collective must use the same tag, and tags must increase per ``(peer, tensor_id)``
        (docs/protocol.md). Explicit tags let ranks that skip a collective (a late worker, a restarted one) stay
        in step: the sequence numbers line up only while every rank calls every collective.
        """
        if tag is None:
            return self.c._next()
        if isinstance(tag, bool) or not isinstance(tag, int | np.integer) or not 0 <= tag < 2**63:
            raise ValueError(f"tag {tag!r} must be an integer in [0, 2**63)")
        return int(tag)

    def _root(self, root: int) -> int:
        if isinstance(root, bool) or not isinstance(root, int | np.integer) or not 0 <= root < self.c.size:
            raise ValueError(f"root {root!r} is not a rank in [0, {self.c.size})")
        return int(root)

    def _rows(self, recvbuf: Any, sendbuf: np.ndarray, name: str) -> np.ndarray:
        recvbuf = _contiguous(recvbuf, name, writeable=True)
        want = (self.c.size, *sendbuf.shape)
        if recvbuf.shape != want or recvbuf.dtype != sendbuf.dtype:
            raise ValueError(
                f"{name} must have shape {want} and dtype {sendbuf.dtype} (one row per rank), "
                f"got shape {recvbuf.shape} and dtype {recvbuf.dtype}")
        return recvbuf

    async def _gather_rows(self, rows: np.ndarray, sources: Sequence[int], tag: int, tid: int, deadline: float,
                           fill: FillPolicy | None) -> dict[int, RecvResult]:
        """Receive ``rows[r]`` from every ``r`` of ``sources``, granting each the credit of an incast of that many."""
        ep = self.c.endpoint
        _, window = self.c.incast(len(sources))
        futs = {r: ep.irecv(r, rows[r], tag=tag, tensor_id=tid, deadline=deadline, fill=fill, credit_bytes=window)
                for r in sources}
        done = await asyncio.gather(*futs.values())
        return dict(zip(futs, done, strict=True))

    async def _send_all(self, targets: Sequence[int], bufs: Sequence[np.ndarray], tag: int, tid: int,
                        senders: int | None) -> dict[int, SendResult]:
        """Send ``bufs[i]`` to ``targets[i]``; ``senders`` > 0: each receiver is shared by that many, and grants
        credit (see :meth:`Comm.incast`). Returns what was sent to each target."""
        ep = self.c.endpoint
        if senders is None:
            return {dst: await ep.send(dst, buf, tag=tag, tensor_id=tid)
                    for dst, buf in zip(targets, bufs, strict=True)}
        rate, window = self.c.incast(senders)
        return {dst: await ep.send(dst, buf, tag=tag, tensor_id=tid, rate_bps=rate or 0.0, burst_bytes=window,
                                   credit_bytes=window)
                for dst, buf in zip(targets, bufs, strict=True)}

    def _others(self) -> list[int]:
        """Other ranks, starting after this one (so no rank is always served last)."""
        n, r = self.c.size, self.c.rank
        return [(r + k) % n for k in range(1, n)]

    # ------------------------------------------------------------------ collectives
    async def Gather(self, sendbuf: np.ndarray, recvbuf: np.ndarray | None = None, root: int = 0, *,
                     deadline: float | None = None, timeout: float | None = None, fill: FillPolicy | None = None,
                     tensor_id: int = 0, tag: int | None = None) -> CollectiveResult:
        """Gather ``sendbuf`` of every rank into ``recvbuf[rank]`` at ``root`` (lossy).

        ``recvbuf`` (root only) has shape ``(size, *sendbuf.shape)``; rows arrive in place.
        """
        c = self.c
        root = self._root(root)
        sendbuf = _contiguous(sendbuf, "sendbuf")
        if c.rank == root:
            recvbuf = self._rows(recvbuf, sendbuf, "recvbuf")
            self._fill(fill, sendbuf.dtype)
        end = self._deadline(deadline, timeout)
        tid = c._tid(tensor_id)
        tag = self._tag(tag)
        t0 = time.monotonic()
        res = CollectiveResult()
        if c.rank == root:
            recvbuf[root] = sendbuf
            res.results = await self._gather_rows(recvbuf, [r for r in range(c.size) if r != root], tag, tid, end,
                                                  fill)
        else:
            res.sent = await self._send_all([root], [sendbuf], tag, tid, c.size - 1)
        res.elapsed = time.monotonic() - t0
        return res

    async def Bcast(self, buf: np.ndarray, root: int = 0, *, deadline: float | None = None,
                    timeout: float | None = None, fill: FillPolicy | None = None,
                    tensor_id: int = 0, tag: int | None = None) -> CollectiveResult:
        """Send ``buf`` of ``root`` into ``buf`` of every other rank (lossy)."""
        c = self.c
        root = self._root(root)
        buf = _contiguous(buf, "buf", writeable=c.rank != root)
        if c.rank != root:
            self._fill(fill, buf.dtype)
        end = self._deadline(deadline, timeout)
        tid = c._tid(tensor_id)
        tag = self._tag(tag)
        t0 = time.monotonic()
        res = CollectiveResult()
        if c.rank == root:
            others = self._others()
            res.sent = await self._send_all(others, [buf] * len(others), tag, tid, None)
        else:
            res.results = {root: await c.endpoint.irecv(root, buf, tag=tag, tensor_id=tid, deadline=end, fill=fill)}
        res.elapsed = time.monotonic() - t0
        return res

    async def Scatter(self, sendbuf: np.ndarray | None, recvbuf: np.ndarray, root: int = 0, *,
                      deadline: float | None = None, timeout: float | None = None, fill: FillPolicy | None = None,
                      tensor_id: int = 0, tag: int | None = None) -> CollectiveResult:
        """Send row ``r`` of ``sendbuf`` (root only, shape ``(size, *recvbuf.shape)``) to rank ``r``."""
        c = self.c
        root = self._root(root)
        recvbuf = _contiguous(recvbuf, "recvbuf", writeable=True)
        if c.rank == root:
            sendbuf = _contiguous(sendbuf, "sendbuf")
            want = (c.size, *recvbuf.shape)
            if sendbuf.shape != want or sendbuf.dtype != recvbuf.dtype:
                raise ValueError(f"sendbuf must have shape {want} and dtype {recvbuf.dtype}, "
                                 f"got {sendbuf.shape} {sendbuf.dtype}")
        else:
            self._fill(fill, recvbuf.dtype)
        end = self._deadline(deadline, timeout)
        tid = c._tid(tensor_id)
        tag = self._tag(tag)
        t0 = time.monotonic()
        res = CollectiveResult()
        if c.rank == root:
            assert sendbuf is not None
            recvbuf[...] = sendbuf[root]
            others = self._others()
            res.sent = await self._send_all(others, [sendbuf[r] for r in others], tag, tid, None)
        else:
            res.results = {root: await c.endpoint.irecv(root, recvbuf, tag=tag, tensor_id=tid, deadline=end,
                                                        fill=fill)}
        res.elapsed = time.monotonic() - t0
        return res

    async def Allgather(self, sendbuf: np.ndarray, recvbuf: np.ndarray, *, deadline: float | None = None,
                        timeout: float | None = None, fill: FillPolicy | None = None,
                        tensor_id: int = 0, tag: int | None = None) -> CollectiveResult:
        """Every rank gets every rank's ``sendbuf`` in ``recvbuf[rank]`` (lossy)."""
        c = self.c
        sendbuf = _contiguous(sendbuf, "sendbuf")
        recvbuf = self._rows(recvbuf, sendbuf, "recvbuf")
        self._fill(fill, sendbuf.dtype)
        end = self._deadline(deadline, timeout)
        tid = c._tid(tensor_id)
        tag = self._tag(tag)
        t0 = time.monotonic()
        recvbuf[c.rank] = sendbuf
        others = self._others()
        recv = asyncio.ensure_future(self._gather_rows(recvbuf, others, tag, tid, end, fill))
        await self._send_all(others, [sendbuf] * len(others), tag, tid, c.size - 1)
        res = CollectiveResult(results=await recv)
        res.elapsed = time.monotonic() - t0
        return res

    async def Allreduce(self, sendbuf: np.ndarray, recvbuf: np.ndarray, op: str = "sum", *,
                        deadline: float | None = None, timeout: float | None = None,
                        tensor_id: int = 0) -> CollectiveResult:
        """Lossy allreduce by reduce-scatter then allgather (OptiReduce's "transpose" allreduce).

        The flat array is cut into ``size`` shards; rank ``j`` owns shard ``j``.

        1. Reduce-scatter: every rank sends shard ``j`` to rank ``j``, which reduces the values that
           arrived. Missing values are left out: ``mean`` is the mean of the values that arrived, ``sum``
           is that mean times ``size`` (an unbiased estimate of the sum), ``max``/``min`` over what arrived.
           ``contributions`` counts, per element of the owned shard, the ranks whose value arrived.
        2. Allgather: every owner sends its reduced shard to every rank. A chunk that misses the deadline
           is filled with this rank's own estimate (its value, times ``size`` for ``sum``).

        The deadline is split evenly between the two phases.
        """
        c = self.c
        if op not in REDUCE_OPS:
            raise ValueError(f"unknown op {op!r}: use one of {', '.join(REDUCE_OPS)}")
        sendbuf = _contiguous(sendbuf, "sendbuf")
        recvbuf = _contiguous(recvbuf, "recvbuf", writeable=True)
        if recvbuf.shape != sendbuf.shape or recvbuf.dtype != sendbuf.dtype:
            raise ValueError(f"recvbuf must match sendbuf: shape {sendbuf.shape} dtype {sendbuf.dtype}, "
                             f"got {recvbuf.shape} {recvbuf.dtype}")
        if not np.issubdtype(sendbuf.dtype, np.floating):
            raise ValueError(f"lossy Allreduce needs a float dtype, got {sendbuf.dtype}")
        end = self._deadline(deadline, timeout)
        t0 = time.monotonic()
        mid = t0 + (end - t0) / 2
        tid = c._tid(tensor_id)
        tag1, tag2 = c._next(), c._next()
        n, me = c.size, c.rank
        flat_in = sendbuf.reshape(-1)
        flat_out = recvbuf.reshape(-1)
        bounds = np.linspace(0, flat_in.size, n + 1).astype(np.int64)
        shard = [slice(int(bounds[i]), int(bounds[i + 1])) for i in range(n)]
        own = flat_in[shard[me]]
        others = self._others()
        # Phase 1: reduce-scatter into a (size, shard) staging buffer.
        stage = np.empty((n, own.size), sendbuf.dtype)
        stage[me] = own
        recv1 = asyncio.ensure_future(self._gather_rows(stage, others, tag1, tid, mid, "zero"))
        await self._send_all(others, [flat_in[shard[j]] for j in others], tag1, tid, n - 1)
        got = await recv1
        present = np.ones((n, own.size), bool)
        for r, rr in got.items():
            present[r] = rr.element_mask()
        count = present.sum(axis=0)
        if op in ("sum", "mean"):
            total = np.where(present, stage, 0).sum(axis=0, dtype=np.float64)
            reduced = total / count * (n if op == "sum" else 1)
        else:
            neutral = np.where(present, stage, own)
            reduced = neutral.max(axis=0) if op == "max" else neutral.min(axis=0)
        flat_out[shard[me]] = reduced.astype(sendbuf.dtype, copy=False)
        # Phase 2: allgather of the reduced shards, straight into recvbuf.
        scale = n if op == "sum" else 1
        res = CollectiveResult(contributions=count)

        def local_estimate(j: int) -> Any:
            def fill(out: np.ndarray, mask: np.ndarray) -> None:
                out[~mask] = (flat_in[shard[j]][~mask] * scale).astype(out.dtype, copy=False)
            return fill

        ep = c.endpoint
        _, window = c.incast(n - 1)
        futs = {j: ep.irecv(j, flat_out[shard[j]], tag=tag2, tensor_id=tid, deadline=end, fill=local_estimate(j),
                            credit_bytes=window) for j in others}
        mine = flat_out[shard[me]].copy()
        await self._send_all(others, [mine] * len(others), tag2, tid, n - 1)
        res.results = dict(zip(futs, await asyncio.gather(*futs.values()), strict=True))
        res.elapsed = time.monotonic() - t0
        return res

    async def Barrier(self) -> None:
        """Return once every rank has entered the barrier (reliable)."""
        await self.c.control.barrier()

    async def bcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        """Reliable broadcast of a small ``bytes`` message."""
        return await self.c.control.bcast_bytes(data, self._root(root))

    async def gather_bytes(self, data: bytes, root: int = 0) -> list[bytes] | None:
        """Reliable gather of small ``bytes`` messages at ``root``."""
        return await self.c.control.gather_bytes(data, self._root(root))


class Comm:
    """A communicator over a lossympi :class:`Endpoint` plus a reliable control channel.

    Parameters
    ----------
    endpoint : Endpoint
        This rank's endpoint.
    control : TCPControl
        The reliable control channel.
    ingest_bps : float or None
        Optional cap, in bits per second, on what many-to-one senders send to one receiver in total (each paces
        itself at its share). None (the default): no cap, the receiver's credits alone set the pace.
    """

    def __init__(self, endpoint: Endpoint, control: TCPControl, *,
                 ingest_bps: float | None = DEFAULT_INGEST_BPS) -> None:
        if control.rank != endpoint.rank or control.size != endpoint.size:
            raise ValueError("endpoint and control channel disagree on rank or size")
        self.endpoint = endpoint
        self.control = control
        if ingest_bps is not None and not ingest_bps > 0:
            raise ValueError(f"ingest_bps must be > 0 bits per second, or None for no cap; got {ingest_bps!r}")
        self.ingest_bps = None if ingest_bps is None else float(ingest_bps)
        self.aio = _Async(self)
        self._seq = 0

    @property
    def rank(self) -> int:
        return self.endpoint.rank

    @property
    def next_tag(self) -> int:
        """The tag the next collective without an explicit ``tag=`` will use (a per-communicator counter).

        A rank that missed collectives (it restarted, or skipped a step) sets it to the value a peer announced,
        so that its collectives line up again: ``comm.next_tag = announced``.
        """
        return self._seq

    @next_tag.setter
    def next_tag(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < (1 << 64) - 1:
            raise ValueError(f"a collective tag must be an integer in [0, 2**64 - 1), got {value!r}")
        self._seq = value

    def readmit(self, rank: int, address: tuple[str, int], key: bytes) -> None:
        """Take back a restarted ``rank`` under its new UDP ``address`` and pair ``key``: the endpoint's and the
        control channel's (rank 0 checks the key at the rank's next hello). Call it on the event-loop thread."""
        self.endpoint.readmit(rank, address, key)
        self.control.keys[rank] = bytes(key)

    @property
    def size(self) -> int:
        return self.endpoint.size

    def Get_rank(self) -> int:
        return self.rank

    def Get_size(self) -> int:
        return self.size

    @classmethod
    def from_world(cls, world: World, *, ingest_bps: float | None = DEFAULT_INGEST_BPS, control_timeout: float = 120.0,
                   control_max_bytes: int = 1 << 20, **endpoint_kwargs: Any) -> Comm:
        """Build the communicator of a bootstrapped world (``lossympi.bootstrap.init()``).

        ``control_max_bytes`` is the largest control-channel payload (e.g. parameters sent reliably);
        ``endpoint_kwargs`` go to :class:`Endpoint` (``fill=``, ``faults=``, ``rate_bps=`` ...).
        """
        ep = Endpoint.from_world(world, **endpoint_kwargs)
        ctl = TCPControl(world.rank, world.size, world.addresses, world.keys, world.control,
                         timeout=control_timeout, max_bytes=control_max_bytes, copy_port_range=world.port_range)
        return cls(ep, ctl, ingest_bps=ingest_bps)

    @classmethod
    def local(cls, size: int, **kwargs: Any) -> list[Comm]:
        """``size`` communicators on 127.0.0.1 in this process (run their collectives concurrently)."""
        from lossympi.bootstrap import local_worlds

        return [cls.from_world(w, **kwargs) for w in local_worlds(size)]

    def _next(self) -> int:
        tag = self._seq
        self._seq += 1
        return tag

    @staticmethod
    def _tid(tensor_id: int) -> int:
        if not 0 <= tensor_id < COLLECTIVE_TENSOR_IDS:
            raise ValueError(f"tensor_id {tensor_id} must be in [0, 2**31)")
        return COLLECTIVE_TENSOR_IDS + tensor_id

    def incast(self, senders: int) -> tuple[float | None, int]:
        """Rate and window of one of ``senders`` ranks sending to the same receiver at the same time.

        The window is both the credit window (the receiver posts its receives with it, the sender sends with it)
        and the burst allowance of a capped rate; the windows add up to a quarter of the receive buffer (peers are
        configured alike, so this rank's buffer stands for the receiver's). The rates add up to ``ingest_bps``
        (None: no cap).
        """
        k = max(1, senders)
        rate = None if self.ingest_bps is None else self.ingest_bps / k
        return rate, max(16 << 10, self.endpoint.rcvbuf // (4 * k))

    # ------------------------------------------------------------------ blocking API (mpi4py names)
    def Gather(self, sendbuf: np.ndarray, recvbuf: np.ndarray | None = None, root: int = 0,
               **kw: Any) -> CollectiveResult:
        return self.endpoint.run(self.aio.Gather(sendbuf, recvbuf, root, **kw))

    def Bcast(self, buf: np.ndarray, root: int = 0, **kw: Any) -> CollectiveResult:
        return self.endpoint.run(self.aio.Bcast(buf, root, **kw))

    def Scatter(self, sendbuf: np.ndarray | None, recvbuf: np.ndarray, root: int = 0, **kw: Any) -> CollectiveResult:
        return self.endpoint.run(self.aio.Scatter(sendbuf, recvbuf, root, **kw))

    def Allgather(self, sendbuf: np.ndarray, recvbuf: np.ndarray, **kw: Any) -> CollectiveResult:
        return self.endpoint.run(self.aio.Allgather(sendbuf, recvbuf, **kw))

    def Allreduce(self, sendbuf: np.ndarray, recvbuf: np.ndarray, op: str = "sum", **kw: Any) -> CollectiveResult:
        return self.endpoint.run(self.aio.Allreduce(sendbuf, recvbuf, op, **kw))

    def Barrier(self) -> None:
        self.endpoint.run(self.aio.Barrier())

    def bcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        return self.endpoint.run(self.aio.bcast_bytes(data, root))

    def gather_bytes(self, data: bytes, root: int = 0) -> list[bytes] | None:
        return self.endpoint.run(self.aio.gather_bytes(data, root))

    def close(self) -> None:
        self.control.close()
        self.endpoint.close()

    def __enter__(self) -> Comm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
