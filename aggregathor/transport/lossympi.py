"""The default backend: lossympi's authenticated, deadline-bound UDP collectives.

Both sides run lossympi's control channel in elastic mode (:meth:`lossympi.control.TCPControl.make_elastic`):
workers may die and come back (crash faults). The server announces each step without waiting for the workers;
a worker whose link is dead is missing (:meth:`LossympiServer.missing_workers`) and its gradient is lost until it
reconnects. Every step message carries the communicator's tag counter (``_seq``: :attr:`lossympi.comm.Comm.next_tag`),
so a restarted worker's collectives line up with the server's from the next step on. A worker that reads EOF
from the server raises :class:`~aggregathor.transport.base.ServerGone`. With
:meth:`LossympiServer.enable_rejoin`, a restarted worker rejoins through the rendezvous
(:class:`lossympi.bootstrap.RejoinService`).

Parameters travel as datagrams (``params_mode="lossy"``: a worker fills what is missing with the value it last
received) or over the control channel (``"reliable"``). Gradients are gathered with the step's deadline; what
is missing is filled (``fill``) and reported.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Any

import numpy as np

from aggregathor.transport._shared import NoHonestGradients
from aggregathor.transport.base import (
    Capability,
    FaultCounters,
    GatherReport,
    ParamsReport,
    ServerGone,
    decode_meta,
    encode_meta,
)
from lossympi.control import ControlClosed

__all__ = ["CAPABILITIES", "PARAMS_TENSOR_ID", "GRADS_TENSOR_ID", "LossympiServer", "LossympiWorker"]

#: What the lossympi backend offers (both sides declare it).
CAPABILITIES = frozenset({Capability.ELASTIC, Capability.REJOIN, Capability.PROTOCOL_COUNTERS})
#: The tensor ids of the parameters' ``Bcast`` and the gradients' ``Gather``.
PARAMS_TENSOR_ID = 1
GRADS_TENSOR_ID = 2
_PARAMS_MODES = ("lossy", "reliable")


class _Side:
    """What both sides share: the communicator (elastic control channel) and the parameters' mode."""

    capabilities = CAPABILITIES

    def __init__(self, comm: Any, params_mode: str) -> None:
        if params_mode not in _PARAMS_MODES:
            raise ValueError(f"unknown params_mode {params_mode!r}; use one of {_PARAMS_MODES}")
        self.comm = comm
        self.rank = comm.rank
        self.size = comm.size
        self.params_mode = params_mode
        comm.control.make_elastic()

    def close(self) -> None:
        self.comm.close()


class LossympiServer(_Side):
    """Rank 0's side over a :class:`lossympi.comm.Comm`.

    Parameters
    ----------
    comm : lossympi.comm.Comm
        The communicator (this is rank 0).
    params_mode : {"lossy", "reliable"}
        How the parameters travel (see the module notes).
    fill : str
        Fill policy for the missing chunks of a gradient.
    lost_row_fill : float
        Value of a gradient that missed the deadline entirely (NaN marks it lost for NaN-robust rules).
    ready_timeout : float
        Before each step message, wait at most this long for the live workers to be ready for it
        (:meth:`lossympi.control.TCPControl.wait_ready`), so that a worker a little behind starts the step with
        the others; one that misses the wait is not waited for again until it has caught up.
    rejoin : lossympi.bootstrap.RejoinService or None
        The rendezvous kept open for restarted workers (:meth:`enable_rejoin` starts it).
    """

    def __init__(self, comm: Any, params_mode: str = "lossy", fill: str = "zero", lost_row_fill: float = 0.0, *,
                 ready_timeout: float = 2.0, rejoin: Any = None) -> None:
        super().__init__(comm, params_mode)
        self.fill = fill
        self.lost_row_fill = lost_row_fill
        self.ready_timeout = ready_timeout
        self.rejoin_service = rejoin
        if rejoin is None:
            self.capabilities = CAPABILITIES - {Capability.REJOIN}
        self._seen = comm.endpoint.counters()  # the endpoint's counters at the last report

    async def announce(self, meta: dict[str, Any]) -> None:
        ctl = self.comm.control
        late = await ctl.wait_ready(self.ready_timeout)
        if late and "step" in meta:  # still busy with an earlier step: they skip this one (LossympiWorker)
            meta = {**meta, "_late": ",".join(map(str, late))}  # step messages hold scalars only
        await ctl.announce(encode_meta({**meta, "_seq": self.comm.next_tag}))  # the next collectives' tag
        if meta.get("stop"):  # the last message: let it leave, then close the channel
            await ctl.flush()
            await ctl.aclose()

    async def send_params(self, theta: np.ndarray, timeout: float) -> ParamsReport:
        if self.params_mode == "reliable":
            await self.comm.control.announce(theta.tobytes())
            return ParamsReport()
        res = await self.comm.aio.Bcast(theta, 0, timeout=timeout, fill="last", tensor_id=PARAMS_TENSOR_ID)
        return ParamsReport(sum(s.chunks for s in res.sent.values()),
                            sum(int(s.injected_drops.sum()) for s in res.sent.values() if s.injected_drops is not None))

    async def gather(self, rows: np.ndarray, deadline: float) -> GatherReport:
        t0 = time.monotonic()
        res = await self.comm.aio.Gather(rows[0], rows, 0, deadline=deadline, fill=self.fill,
                                         tensor_id=GRADS_TENSOR_ID)
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
        now = self.comm.endpoint.counters()
        window = now - self._seen
        self._seen = now
        return GatherReport(delivered, lost, chunks, time.monotonic() - t0, complete, window.rejected,
                            window.rejected_by_sender(), window.stale[1:], window.pool_drops[1:], duplicates, masks)

    def missing_workers(self) -> list[int]:
        """The workers whose control link is dead now."""
        return self.comm.control.missing()

    def fault_counters(self) -> FaultCounters:
        """Refused control/rendezvous connections by reason, lost control links, rejoins, control copies received."""
        ctl = self.comm.control
        service = self.rejoin_service
        return FaultCounters(dict(ctl.rejects), dict(ctl.link_failures), ctl.rejoins,
                             dict(service.rejected) if service is not None else {}, dict(ctl.copy_counts))

    def enable_rejoin(self, loop: asyncio.AbstractEventLoop, timeout: float = 5.0) -> None:
        """Admit restarted workers through the rendezvous (:attr:`Capability.REJOIN`).

        A rejoining rank is admitted only when its control link is dead (:meth:`TCPControl.link_alive`); its new
        pair key and UDP address are then installed (:meth:`lossympi.comm.Comm.readmit`) on ``loop``'s thread (the
        training loop), before the rendezvous answers it.
        """
        if self.rejoin_service is None:
            raise RuntimeError("enable_rejoin() needs the rendezvous kept open (lossympi.bootstrap.from_env("
                               "rejoin=True)); this server has none")
        ctl = self.comm.control

        async def install(rank: int, address: tuple[str, int], key: bytes) -> bool:
            if ctl.link_alive(rank):
                return False
            self.comm.readmit(rank, address, key)
            return True

        def admit(rank: int, address: tuple[str, int], key: bytes) -> bool:
            fut = asyncio.run_coroutine_threadsafe(install(rank, address, key), loop)
            try:
                return fut.result(timeout)
            except concurrent.futures.TimeoutError:
                fut.cancel()
                raise TimeoutError(f"the training loop did not admit rank {rank} within {timeout} s") from None

        self.rejoin_service.start(admit)

    def close(self) -> None:
        if self.rejoin_service is not None:
            self.rejoin_service.close()
        super().close()


class LossympiWorker(NoHonestGradients, _Side):
    """A worker's side over a :class:`lossympi.comm.Comm` (``params_mode`` as the server's)."""

    async def next_message(self) -> dict[str, Any]:
        """The next step message, or ``{"skip": k}`` for a step ``k`` the server announced while this worker was
        still busy with an earlier one (it did not wait for this rank's ready frame): its gradient would arrive
        after that step's gather, and the worker would stay one step behind for good. Skipping the step (and its
        parameters) makes the worker ready for the next announcement on time, so it is back in step."""
        got = decode_meta(await self._listen())
        seq = got.pop("_seq", None)
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ValueError(f"the server's step message has no valid tag counter (_seq={seq!r})")
        self.comm.next_tag = seq
        late = got.pop("_late", "")
        if isinstance(late, str) and str(self.rank) in late.split(",") and "step" in got:
            if self.params_mode == "reliable":
                await self._listen()  # that step's parameters: not used
            return {"skip": got["step"]}
        return got

    async def _listen(self) -> bytes:
        try:
            return await self.comm.control.listen()
        except ControlClosed as exc:
            raise ServerGone(f"rank {self.rank}: the parameter server closed the control channel (it exited or "
                             f"crashed): {exc}") from exc

    async def recv_params(self, theta: np.ndarray, timeout: float) -> float:
        if self.params_mode == "reliable":
            data = await self._listen()
            if len(data) != theta.nbytes:
                raise ValueError(f"parameters of {len(data)} bytes, expected {theta.nbytes}")
            theta[...] = np.frombuffer(data, theta.dtype).reshape(theta.shape)
            return 1.0
        res = await self.comm.aio.Bcast(theta, 0, timeout=timeout, fill="last", tensor_id=PARAMS_TENSOR_ID)
        return res.delivered

    async def send_grad(self, grad: np.ndarray, deadline: float) -> None:
        await self.comm.aio.Gather(grad, None, 0, deadline=deadline, tensor_id=GRADS_TENSOR_ID)

