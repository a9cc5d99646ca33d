"""The default step transport: lossympi's authenticated, deadline-bound UDP collectives."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Any

import numpy as np

from aggregathor.transport.base import GatherReport, ServerGone, decode_meta, encode_meta

__all__ = ["LossympiTransport"]


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

    def _counters(self) -> Any:
        return self.comm.endpoint.counters()

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
            await self.comm.control.announce(encode_meta({**meta, "_seq": self.comm.next_tag}))
            if meta.get("stop"):  # the last message: let it leave, then close the channel
                await self.comm.control.flush()
                await self.comm.control.aclose()
            return meta
        got = decode_meta(await self._listen())
        seq = got.pop("_seq", None)
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ValueError(f"the server's step message has no valid tag counter (_seq={seq!r})")
        self.comm.next_tag = seq
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
        window = now - self._seen
        self._seen = now
        return GatherReport(delivered, lost, chunks, time.monotonic() - t0, complete, window.rejected,
                            window.rejected_by_sender(), window.stale[1:], window.pool_drops[1:], duplicates, masks)

    def close(self) -> None:
        if self.rejoin_service is not None:
            self.rejoin_service.close()
        self.comm.close()
