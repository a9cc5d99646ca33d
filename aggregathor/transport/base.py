"""What every step transport shares: the server-side and worker-side interfaces, the gather report, the
protocol-event tally and the step-message codec.

A synchronous step is three exchanges, all rooted at rank 0 (the parameter server):

1. ``announce(meta)`` / ``next_message()``: reliable broadcast of a small JSON message (the step number, or
   ``stop``);
2. ``send_params(theta)`` / ``recv_params(theta)``: the parameters, from the server to every worker (lossy with
   ``last`` fill, or reliable);
3. ``gather(rows, deadline)`` / ``send_grad(grad)``: every worker's gradient into row ``rank`` of the server's
   ``(1 + n, d)`` buffer, until the deadline.

:class:`ServerTransport` is rank 0's side, :class:`WorkerTransport` a worker's; optional abilities are declared
in ``capabilities`` (:class:`Capability`). The lossympi backend (:mod:`aggregathor.transport.lossympi`) is the
default (authenticated UDP, deadline-bound, what is missing is filled and reported); the reliable baselines of
the paper's comparison implement the same interfaces.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = ["Capability", "FaultCounters", "GatherReport", "HUGE_NORM_FACTOR", "META_LIMIT", "ParamsReport",
           "ProtocolEvents", "ServerGone", "ServerTransport", "WorkerTransport", "decode_meta", "encode_meta",
           "row_health"]

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

    def arrived(self) -> np.ndarray:
        """``(n,)`` bool: the rows of which at least one chunk arrived (``delivered > 0``; the rest of such a row
        was filled). A row of which nothing arrived (a dead link, a gradient that missed the deadline entirely,
        every chunk lost) is missing: its whole row is the fill (``lost_row_fill``)."""
        return np.asarray(self.delivered) > 0


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


class Capability(enum.StrEnum):
    """Optional abilities a backend declares in its ``capabilities`` (never probed with ``hasattr``)."""

    #: workers may die and come back; :meth:`ServerTransport.missing_workers` says which are gone now
    ELASTIC = "elastic"
    #: restarted workers rejoin through the rendezvous (the server side has ``enable_rejoin(loop)``)
    REJOIN = "rejoin"
    #: Byzantine workers get the step's honest gradients (:meth:`WorkerTransport.honest_gradients`); simulated
    HONEST_GRADIENTS = "honest_gradients"
    #: the gather report carries per-sender protocol counters (rejects by reason, stale, pool drops)
    PROTOCOL_COUNTERS = "protocol_counters"


@dataclass
class FaultCounters:
    """The server's crash-fault counters of a run (elastic backends; zero elsewhere)."""

    control_rejects: dict[str, int] = field(default_factory=dict)  # refused control connections by reason
    control_link_failures: dict[str, int] = field(default_factory=dict)  # lost worker links by reason
    rejoins: int = 0  # workers that reconnected after their link died
    rendezvous_rejects: dict[str, int] = field(default_factory=dict)  # refused rendezvous connections by reason
    control_copies: dict[str, int] = field(default_factory=dict)  # UDP copies of ready frames received, by outcome


@dataclass
class ParamsReport:
    """What the server's parameter message cost on the wire in one step (:meth:`ServerTransport.send_params`).

    ``chunks`` counts the datagram chunks sent to all workers (0 when the parameters went over a reliable stream:
    ``--params reliable`` or a TCP/gRPC/MPI backend), ``lost_chunks`` those the sender knows were dropped (the
    emulated ``--loss``; losses on the network are only seen by the workers, which keep their last values).
    """

    chunks: int = 0
    lost_chunks: int = 0


class ServerTransport(Protocol):
    """Rank 0's side of the step exchanges.

    A step is ``announce({"step": k})``, ``send_params(theta)``, then ``gather(rows, deadline)``; the run ends
    with ``announce({"stop": True})`` and ``close()``.
    """

    size: int
    capabilities: frozenset[Capability]

    async def announce(self, meta: dict[str, Any]) -> None:
        """Send the step message (a JSON object of scalars) to every live worker, reliably."""
        ...

    async def send_params(self, theta: np.ndarray, timeout: float) -> ParamsReport:
        """Send the flat float32 parameters to every worker; what it cost on the wire."""
        ...

    async def gather(self, rows: np.ndarray, deadline: float) -> GatherReport:
        """Receive worker ``r``'s gradient into ``rows[r]`` until ``deadline`` (``time.monotonic()``)."""
        ...

    def missing_workers(self) -> list[int]:
        """The workers with no live link now (:attr:`Capability.ELASTIC`; else always empty)."""
        ...

    def fault_counters(self) -> FaultCounters:
        """Refused connections, lost links and rejoins so far."""
        ...

    def close(self) -> None: ...


class WorkerTransport(Protocol):
    """A worker's side of the step exchanges: ``next_message()``, ``recv_params(theta)``, ``send_grad(grad)``."""

    rank: int
    size: int
    capabilities: frozenset[Capability]

    async def next_message(self) -> dict[str, Any]:
        """The server's next step message (``{"step": k}``, ``{"stop": True}``, ``{"ready": True}``, or
        ``{"skip": k}`` for a step this worker is already too late for); raises :class:`ServerGone` when the
        server is gone."""
        ...

    async def recv_params(self, theta: np.ndarray, timeout: float) -> float:
        """Receive the parameters into ``theta`` (what is missing keeps its last value); the delivered fraction."""
        ...

    async def send_grad(self, grad: np.ndarray, deadline: float) -> None:
        """Send this worker's flat float32 gradient to the server."""
        ...

    async def honest_gradients(self) -> np.ndarray:
        """The step's honest gradients, ``(n - byzantine, d)`` (:attr:`Capability.HONEST_GRADIENTS` only)."""
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


