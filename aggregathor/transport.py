"""How the parameter server and the workers exchange a step: one interface, several transports.

A synchronous step is three exchanges, all rooted at rank 0 (the parameter server):

1. ``control(meta)``: reliable broadcast of a small JSON message (the step number, or ``stop``);
2. ``params(theta)``: the parameters, from the server to every worker (lossy with ``last`` fill, or
   reliable);
3. ``grads(grad, rows, deadline)``: every worker's gradient into row ``rank`` of the server's
   ``(1 + n, d)`` buffer, until the deadline.

:class:`LossympiTransport` is the default (authenticated UDP, deadline-bound, what is missing is filled and
reported). The reliable baselines of the paper's comparison implement the same interface.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from lossympi._core import REJECT_REASONS

__all__ = ["GatherReport", "HUGE_NORM_FACTOR", "LossympiTransport", "ProtocolEvents", "ServerGone", "StepTransport",
           "decode_meta", "encode_meta", "row_health"]

META_LIMIT = 4096
#: A gradient row whose L2 norm exceeds this many times the step's median row norm is counted as ``huge``.
HUGE_NORM_FACTOR = 100.0


@dataclass
class GatherReport:
    """What the server got from the workers in one step.

    The protocol counters (``rejected_by_sender``, ``stale``, ``pool_drops``, ``duplicates``) cover what the
    server's endpoint saw since the previous report, so every event is counted in exactly one step. Transports
    that do not track one leave it empty (or None).
    """

    delivered: np.ndarray  # (n,) fraction of each worker's gradient that arrived
    lost_chunks: int = 0
    chunks: int = 0
    elapsed: float = 0.0
    complete_elapsed: list[float] = field(default_factory=list)  # arrival time of complete gradients
    rejected: int = 0  # datagrams (or frames) refused
    #: refused datagrams by the rank that really sent them ("unknown": no rank's address), then by reason
    rejected_by_sender: dict[str, dict[str, int]] = field(default_factory=dict)
    stale: np.ndarray | None = None  # (n,) authentic datagrams of closed messages (replays, late chunks)
    pool_drops: np.ndarray | None = None  # (n,) authentic early datagrams dropped: the sender's pool share was full
    duplicates: np.ndarray | None = None  # (n,) datagrams of a chunk already received, this step's messages
    #: worker rank -> element mask, for the rows that arrived in part (what is not in the mask was filled)
    masks: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def lost_fraction(self) -> float:
        return self.lost_chunks / self.chunks if self.chunks else 0.0


def row_health(rows: np.ndarray, report: GatherReport) -> tuple[np.ndarray, np.ndarray]:
    """Which gathered gradients are not finite, and every row's L2 norm, counting only what arrived.

    Parameters
    ----------
    rows : ndarray
        The ``(n, d)`` float rows of the workers (rank ``r`` in row ``r - 1``), after the fill.
    report : GatherReport
        The step's report: rows with ``delivered == 0`` are not judged; for a partial row, only the
        elements of ``report.masks`` (when the transport gives them, else every element, NaN aside: the fill
        may have written it) are.

    Returns
    -------
    nonfinite : ndarray of bool, shape (n,)
        True where an element that arrived is NaN or infinite.
    norms : ndarray of float64, shape (n,)
        L2 norm of the finite rows that arrived (in float64, so huge finite values do not overflow); NaN for
        the others.
    """
    n = rows.shape[0]
    nonfinite = np.zeros(n, bool)
    norms = np.full(n, np.nan)
    with np.errstate(all="ignore"):
        sq = [float(np.dot(r, r)) for r in rows]  # fast float32 BLAS pass; anything suspicious is redone below
    for i in range(n):
        got = float(report.delivered[i])
        if got <= 0.0:
            continue
        row = rows[i]
        if got < 1.0:
            mask = report.masks.get(i + 1)
            row = row[mask] if mask is not None else row[~np.isnan(row)]
        elif np.isfinite(sq[i]):
            norms[i] = float(np.sqrt(sq[i]))
            continue
        if not np.all(np.isfinite(row)):
            nonfinite[i] = True
        else:
            norms[i] = float(np.linalg.norm(row.astype(np.float64)))
    return nonfinite, norms


class ProtocolEvents:
    """The server's tally of what the workers did at the protocol level, per step and for the whole run.

    Per worker rank: rows that were not complete, rows with non-finite values, rows of a huge norm
    (:data:`HUGE_NORM_FACTOR` times the step's median), replayed or late datagrams (``stale``), early
    datagrams dropped for a full pool share, duplicates; and the refused datagrams by sender and reason.
    """

    def __init__(self, workers: int) -> None:
        self.n = workers
        zeros = dict.fromkeys((str(r) for r in range(1, workers + 1)), 0)
        self.incomplete = dict(zeros)
        self.nonfinite = dict(zeros)
        self.huge = dict(zeros)
        self.stale = dict(zeros)
        self.pool_drops = dict(zeros)
        self.duplicates = dict(zeros)
        self.rejected_by_rank: dict[str, dict[str, int]] = {}
        self.rejected_by_reason: dict[str, int] = {}

    def observe(self, report: GatherReport, rows: np.ndarray) -> dict[str, Any]:
        """Count one step (``rows``: the ``(n, d)`` worker rows, before aggregation); returns the step's
        events, only the non-zero ones (for a per-step log)."""
        nonfinite, norms = row_health(rows, report)
        finite = norms[np.isfinite(norms)]
        median = float(np.median(finite)) if finite.size else 0.0
        huge = np.isfinite(norms) & (norms > HUGE_NORM_FACTOR * median) if median > 0 else np.zeros(self.n, bool)
        step: dict[str, Any] = {}

        def ranks(flags: np.ndarray, total: dict[str, int], key: str) -> None:
            hit = [int(r) + 1 for r in np.flatnonzero(flags)]
            for r in hit:
                total[str(r)] += 1
            if hit:
                step[key] = hit

        def counts(values: np.ndarray | None, total: dict[str, int], key: str) -> None:
            if values is None:
                return
            hit = {str(r + 1): int(v) for r, v in enumerate(values) if v}
            for r, v in hit.items():
                total[r] += v
            if hit:
                step[key] = hit

        ranks(np.asarray(report.delivered) < 1.0, self.incomplete, "incomplete")
        ranks(nonfinite, self.nonfinite, "nonfinite")
        ranks(huge, self.huge, "huge")
        counts(report.stale, self.stale, "stale")
        counts(report.pool_drops, self.pool_drops, "pool_drops")
        counts(report.duplicates, self.duplicates, "duplicates")
        if report.rejected_by_sender:
            step["rejected"] = report.rejected_by_sender
            for sender, by_reason in report.rejected_by_sender.items():
                mine = self.rejected_by_rank.setdefault(sender, {})
                for reason, k in by_reason.items():
                    mine[reason] = mine.get(reason, 0) + k
                    self.rejected_by_reason[reason] = self.rejected_by_reason.get(reason, 0) + k
        return step

    def totals(self) -> dict[str, Any]:
        """The run's totals, as the extra fields of the run summary."""
        return {"rejected_by_reason": dict(self.rejected_by_reason),
                "rejected_by_rank": {k: dict(v) for k, v in self.rejected_by_rank.items()},
                "incomplete_rows": dict(self.incomplete), "nonfinite_rows": dict(self.nonfinite),
                "huge_rows": dict(self.huge), "stale_by_rank": dict(self.stale),
                "pool_drops_by_rank": dict(self.pool_drops), "duplicates_by_rank": dict(self.duplicates)}


class StepTransport(Protocol):
    rank: int
    size: int

    async def control(self, meta: dict[str, Any] | None) -> dict[str, Any]: ...

    async def params(self, theta: np.ndarray, timeout: float) -> float: ...

    async def grads(self, grad: np.ndarray | None, rows: np.ndarray | None, deadline: float) -> GatherReport | None:
        ...

    def close(self) -> None: ...


def encode_meta(meta: dict[str, Any]) -> bytes:
    data = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    if len(data) > META_LIMIT:
        raise ValueError(f"step metadata of {len(data)} bytes exceeds {META_LIMIT}")
    return data


def decode_meta(data: bytes) -> dict[str, Any]:
    """Parse step metadata (JSON object of scalars only; nothing is ever unpickled or executed)."""
    if len(data) > META_LIMIT:
        raise ValueError("step metadata too large")
    meta = json.loads(data.decode())
    if not isinstance(meta, dict) or not all(isinstance(v, int | float | str | bool | None) for v in meta.values()):
        raise ValueError("step metadata must be a JSON object of scalars")
    return meta


class ServerGone(RuntimeError):
    """A worker's control link to the server ended: the server exited or crashed."""


class LossympiTransport:
    """The step exchanges over a :class:`lossympi.comm.Comm`.

    Parameters
    ----------
    comm : lossympi.comm.Comm
        The communicator (rank 0 is the server).
    params_mode : {"lossy", "reliable"}
        ``lossy``: parameters travel as datagrams; a worker fills what is missing with the value it last
        received (``last``). ``reliable``: over the authenticated TCP control channel.
    fill : str
        Fill policy for the missing chunks of a gradient.
    lost_row_fill : float
        Value of a gradient that missed the deadline entirely (NaN marks it lost for NaN-robust rules).
    elastic : bool
        Workers may die and come back (crash faults): the control channel runs in elastic mode
        (:meth:`lossympi.control.TCPControl.make_elastic`). The server announces each step without waiting for
        the workers; a worker whose link is dead is missing (:meth:`missing_workers`) and its gradient is lost
        until it reconnects. Every step message carries the communicator's tag counter (``_seq``), so a
        restarted worker's collectives line up with the server's from the next step on. A worker that reads EOF
        from the server raises :class:`ServerGone`. With :meth:`enable_rejoin`, a restarted worker rejoins
        through the rendezvous (:class:`lossympi.bootstrap.RejoinService`).
    ready_timeout : float
        Elastic server: before each step message, wait at most this long for the live workers to be ready for
        it (:meth:`lossympi.control.TCPControl.wait_ready`), so that a worker a little behind starts the step
        with the others; one that misses the wait is not waited for again until it has caught up.
    """

    def __init__(self, comm: Any, params_mode: str = "lossy", fill: str = "zero",
                 lost_row_fill: float = 0.0, *, elastic: bool = False, ready_timeout: float = 2.0) -> None:
        self.comm = comm
        self.rank = comm.rank
        self.size = comm.size
        self.params_mode = params_mode
        self.fill = fill
        self.lost_row_fill = lost_row_fill
        self.elastic = elastic
        self.ready_timeout = ready_timeout
        self.rejoin_service: Any = None
        if elastic:
            comm.control.make_elastic()
        self._seen = self._counters() if self.rank == 0 else None  # the server's endpoint counters at the last report

    def _counters(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        core = self.comm.endpoint.core
        peers = range(1, self.size)
        return (np.array(core.rejects_by_sender(), np.int64),
                np.array([core.stale_from(r) for r in peers], np.int64),
                np.array([core.overflow_from(r) for r in peers], np.int64))

    async def control(self, meta: dict[str, Any] | None) -> dict[str, Any]:
        if self.elastic:
            return await self._elastic_control(meta)
        data = await self.comm.aio.bcast_bytes(encode_meta(meta) if self.rank == 0 and meta is not None else None)
        return decode_meta(data)

    async def _elastic_control(self, meta: dict[str, Any] | None) -> dict[str, Any]:
        if self.rank == 0:
            if meta is None:
                raise ValueError("the server must pass the step metadata")
            await self.comm.control.wait_ready(self.ready_timeout)
            # the tag counter of the next collectives (lossympi.comm.Comm numbers its collectives in _seq)
            await self.comm.control.announce(encode_meta({**meta, "_seq": self.comm._seq}))
            if meta.get("stop"):  # the last message: let it leave, then close the channel
                await self.comm.control.flush()
                await self.comm.control.aclose()
            return meta
        got = decode_meta(await self._listen())
        seq = got.pop("_seq", None)
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ValueError(f"the server's step message has no valid tag counter (_seq={seq!r})")
        self.comm._seq = seq
        return got

    async def _listen(self) -> bytes:
        from lossympi.control import ControlClosed

        try:
            return await self.comm.control.listen()
        except ControlClosed as exc:
            raise ServerGone(f"rank {self.rank}: the parameter server closed the control channel (it exited or "
                             f"crashed): {exc}") from exc

    def missing_workers(self) -> list[int]:
        """Server: the workers whose control link is dead now (elastic mode; always empty otherwise)."""
        return self.comm.control.missing() if self.elastic and self.rank == 0 else []

    def fault_counters(self) -> dict[str, Any]:
        """Server: refused control/rendezvous connections by reason, lost control links, rejoins."""
        ctl = self.comm.control
        out: dict[str, Any] = {"control_rejects": dict(ctl.rejects), "control_link_failures": dict(ctl.link_failures),
                               "rejoins": ctl.rejoins}
        if self.rejoin_service is not None:
            out["rendezvous_rejects"] = self.rejoin_service.rejected
            out["rendezvous_rejoins"] = self.rejoin_service.rejoins
        return out

    def enable_rejoin(self, service: Any, loop: asyncio.AbstractEventLoop, timeout: float = 5.0) -> None:
        """Server: admit restarted workers through ``service`` (a :class:`lossympi.bootstrap.RejoinService`).

        A rejoining rank is admitted only when its control link is dead (:meth:`TCPControl.link_alive`); its new
        pair key and UDP address are then installed in the endpoint's core and in the control channel, on
        ``loop``'s thread (the training loop), before the rendezvous answers it.
        """
        if not self.elastic or self.rank != 0:
            raise RuntimeError("enable_rejoin() is for the server of an elastic transport")
        ctl = self.comm.control
        ep = self.comm.endpoint

        async def install(rank: int, address: tuple[str, int], key: bytes) -> bool:
            if ctl.link_alive(rank):
                return False
            ctl.keys[rank] = key
            ep.core.set_key(rank, key)
            ep.core.set_peer(rank, socket.inet_aton(address[0]), int(address[1]))
            ep.addresses[rank] = (address[0], int(address[1]))
            return True

        def admit(rank: int, address: tuple[str, int], key: bytes) -> bool:
            fut = asyncio.run_coroutine_threadsafe(install(rank, address, key), loop)
            try:
                return fut.result(timeout)
            except concurrent.futures.TimeoutError:
                fut.cancel()
                raise TimeoutError(f"the training loop did not admit rank {rank} within {timeout} s") from None

        service.start(admit)
        self.rejoin_service = service

    async def params(self, theta: np.ndarray, timeout: float) -> float:
        if self.params_mode == "reliable" and self.elastic:
            if self.rank == 0:
                await self.comm.control.announce(theta.tobytes())
                return 1.0
            data = await self._listen()
            if len(data) != theta.nbytes:
                raise ValueError(f"parameters of {len(data)} bytes, expected {theta.nbytes}")
            theta[...] = np.frombuffer(data, theta.dtype).reshape(theta.shape)
            return 1.0
        if self.params_mode == "reliable":
            data = await self.comm.aio.bcast_bytes(theta.tobytes() if self.rank == 0 else None)
            if self.rank != 0:
                if len(data) != theta.nbytes:
                    raise ValueError(f"parameters of {len(data)} bytes, expected {theta.nbytes}")
                theta[...] = np.frombuffer(data, theta.dtype).reshape(theta.shape)
            return 1.0
        res = await self.comm.aio.Bcast(theta, 0, timeout=timeout, fill="last", tensor_id=1)
        return res.delivered

    async def grads(self, grad: np.ndarray | None, rows: np.ndarray | None, deadline: float) -> GatherReport | None:
        t0 = time.monotonic()
        if self.rank != 0:
            assert grad is not None
            await self.comm.aio.Gather(grad, None, 0, deadline=deadline, tensor_id=2)
            return None
        assert rows is not None
        res = await self.comm.aio.Gather(rows[0], rows, 0, deadline=deadline, fill=self.fill, tensor_id=2)
        n = self.size - 1
        delivered = np.ones(n)
        duplicates = np.zeros(n, np.int64)
        masks: dict[int, np.ndarray] = {}
        lost = chunks = 0
        complete: list[float] = []
        for r, rr in res.results.items():
            delivered[r - 1] = rr.delivered
            duplicates[r - 1] = rr.duplicate
            lost += rr.lost_chunks
            chunks += rr.chunk_mask.size
            if rr.complete:
                complete.append(rr.elapsed)
            elif rr.received == 0:
                rows[r] = self.lost_row_fill  # missed the deadline entirely: a lost gradient
            else:
                masks[r] = rr.element_mask()
        now = self._counters()
        assert self._seen is not None
        rej, stale, drops = (b - a for a, b in zip(self._seen, now, strict=True))
        self._seen = now
        by_sender: dict[str, dict[str, int]] = {}
        for sender, row in enumerate(rej):
            if row.any():
                by_sender["unknown" if sender == self.size else str(sender)] = {
                    reason: int(k) for reason, k in zip(REJECT_REASONS, row, strict=True) if k}
        return GatherReport(delivered, lost, chunks, time.monotonic() - t0, complete, int(rej.sum()), by_sender,
                            stale, drops, duplicates, masks)

    def close(self) -> None:
        if self.rejoin_service is not None:
            self.rejoin_service.close()
        self.comm.close()
