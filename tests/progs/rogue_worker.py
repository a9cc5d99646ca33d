"""A rogue worker for tests/test_byzantine_protocol.py: a real worker rank that misbehaves at the datagram level.

It joins the job like any worker (the same env:// rendezvous, so it holds its own legitimate pair key with
the server), follows the step protocol (control messages, parameters, one gradient per step, computed honestly
from its shard), and on top of that, or instead of its gradient, sends what ``--mode`` says:

``wrong-length``
    gradients of ``d +- k`` floats (a short or long last chunk, another chunk count) and, crafted by hand,
    chunks of another stride; all signed with its own key.
``wrong-dtype``
    its gradient as float64 or int32 (another dtype code, and for float64 another chunk count).
``replay``
    its honest gradient, then byte-identical copies of its own datagrams of the previous steps, and of the
    parameter datagrams the server sent it (rebuilt with the pair key they share, so byte-identical), sent
    back to the server and to every other worker.
``spoof-rank``
    its honest gradient, then datagrams (and FINs) that claim the victim's rank (``--victim``) or the
    server's, signed with its own key, from its own address and from another UDP port; and its own datagrams
    from that other port (a different address for its own rank).
``flood``
    its gradient ten times per step, plus junk datagrams signed with its own key (far-future tags of its
    gradient, other tensor ids) paced at ten times its honest byte rate.
``nonfinite``
    well-formed gradients that are all NaN, its honest gradient with one NaN coordinate, +-Inf, or of a huge
    norm (Gaussian, standard deviation 1e6), in turn.

Everything else is the stock worker: it runs :func:`aggregathor.launch.run_rank` with this worker side in place of
:class:`~aggregathor.transport.LossympiWorker` (its ``build`` argument), so it follows the same bootstrap and
control protocol. At the
end it writes what it sent to ``--report`` (JSON), so that the test can compare with the server's counters.
Run as ``python tests/progs/rogue_worker.py CONFIG_JSON --mode MODE [--victim R] --report PATH`` with the
``LOSSYMPI_*`` variables of its rank.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import numpy as np

from aggregathor.config import TrainConfig
from aggregathor.launch import run_rank
from aggregathor.transport import LossympiWorker, lossympi_comm
from aggregathor.transport.lossympi import GRADS_TENSOR_ID, PARAMS_TENSOR_ID
from lossympi import wire
from lossympi.bootstrap import World
from lossympi.comm import COLLECTIVE_TENSOR_IDS, Comm

MODES = ("wrong-length", "wrong-dtype", "replay", "spoof-rank", "flood", "nonfinite")
PARAMS_TID = COLLECTIVE_TENSOR_IDS + PARAMS_TENSOR_ID  # the parameters' Bcast, as the wire numbers it
GRADS_TID = COLLECTIVE_TENSOR_IDS + GRADS_TENSOR_ID  # the gradients' Gather
F32 = wire.DTYPE_CODES["float32"]
FLOOD_COPIES = 10
FLOOD_FACTOR = 10.0
FAR_FUTURE = 1 << 40


class RogueWorker(LossympiWorker):
    """:class:`LossympiWorker` whose gradient exchange misbehaves per ``mode`` (the rest is honest).

    Built by :func:`main`'s ``build`` (run by :func:`aggregathor.launch.run_rank`) on the stock worker's
    communicator.
    """

    def __init__(self, comm: Comm, params_mode: str, *, world: World, mode: str, victim: int) -> None:
        super().__init__(comm, params_mode)
        self.mode = mode
        self.victim = victim
        if mode not in MODES:
            raise ValueError(f"unknown --mode {mode!r}; use one of {', '.join(MODES)}")
        if not 1 <= victim < comm.size or victim == comm.rank:
            raise ValueError(f"--victim {victim} must be another worker's rank in [1, {comm.size})")
        self.key = world.keys[0]  # the pair key this rank really shares with the server
        self.addresses = world.addresses
        self.ep = comm.endpoint
        self.stride = self.ep.stride
        self.other_port = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.other_port.bind((world.address[0], 0))
        self.sent: Counter[str] = Counter()  # datagrams sent, by kind
        # what the server should count, by its counter names: shape and mac refusals (charged to this rank; mac_unknown
        # to no rank), stale datagrams, and steps of a non-finite or huge row
        self.expected: Counter[str] = Counter()
        self.steps = 0
        self.grads_history: deque[tuple[int, bytes]] = deque(maxlen=3)  # (tag, gradient bytes) of past steps
        self.params_history: deque[tuple[int, bytes]] = deque(maxlen=3)  # (tag, parameters) as received
        self.last_grads = 0.0
        self.interval = 0.0  # seconds between two gradients (EWMA): the honest pace
        self.stop = threading.Event()
        self.flooder: threading.Thread | None = None

    # ------------------------------------------------------------------ crafting
    def datagrams(self, payload: bytes, *, src: int, tag: int, tid: int, key: bytes, dtype: int = F32,
                  stride: int | None = None, kind: int = wire.KIND_DATA) -> list[bytes]:
        """The datagrams of one message, byte for byte as a core with this key would send them."""
        stride = self.stride if stride is None else stride
        count = wire.chunk_count(len(payload), stride)
        if kind != wire.KIND_DATA:  # a FIN: header only, index 0 (protocol.md)
            h = wire.Header(src=src, tag=tag, tensor_id=tid, index=0, count=count, length=0, stride=stride,
                            dtype=dtype, kind=kind)
            return [wire.pack_datagram(h, b"", key)]
        out = []
        for i in range(count):
            chunk = payload[i * stride:(i + 1) * stride]
            h = wire.Header(src=src, tag=tag, tensor_id=tid, index=i, count=count, length=len(chunk), stride=stride,
                            dtype=dtype)
            out.append(wire.pack_datagram(h, chunk, key))
        return out

    def raw(self, kind: str, datagrams: list[bytes], dst: int = 0, sock: socket.socket | None = None) -> None:
        """Send crafted datagrams to rank ``dst`` (from this rank's own address unless ``sock``)."""
        s = self.ep.sock if sock is None else sock
        for d in datagrams:
            while True:
                try:
                    s.sendto(d, self.addresses[dst])
                    break
                except BlockingIOError:
                    time.sleep(0.0005)
            self.sent[kind] += 1

    async def send_array(self, kind: str, arr: np.ndarray, tag: int) -> int:
        """Send ``arr`` as this rank's gradient message through the real endpoint; returns the datagrams sent,
        FINs included."""
        res = await self.ep.send(0, arr, tag=tag, tensor_id=GRADS_TID)
        n = res.datagrams + (3 if self.ep.send_fin else 0)
        self.sent[kind] += n
        return n

    # ------------------------------------------------------------------ the step exchanges
    async def recv_params(self, theta: np.ndarray, timeout: float) -> float:
        delivered = await super().recv_params(theta, timeout)
        self.params_history.append((self.comm.next_tag - 1, theta.tobytes()))
        return delivered

    async def send_grad(self, grad: np.ndarray, deadline: float) -> None:
        now = time.monotonic()
        if self.last_grads:
            gap = now - self.last_grads
            self.interval = gap if not self.interval else 0.8 * self.interval + 0.2 * gap
        self.last_grads = now
        step = self.steps
        self.steps += 1
        tag = self.comm.next_tag  # the tag the Gather of this step uses on every rank
        self.comm.next_tag = tag + 1
        await getattr(self, "_" + self.mode.replace("-", "_"))(grad, tag, step)
        self.grads_history.append((tag, grad.tobytes()))

    async def _wrong_length(self, grad: np.ndarray, tag: int, step: int) -> None:
        d = grad.size
        variant = step % 5
        if variant == 4:  # right size, but chunks of another stride (crafted: the core always uses its own)
            bad = self.datagrams(grad.tobytes(), src=self.rank, tag=tag, tid=GRADS_TID, key=self.key,
                                 stride=self.stride - 16)
            self.raw("wrong_stride", bad)
            self.expected["shape"] += len(bad)
            return
        k = (3, -3, 600, -600)[variant]  # a longer/shorter last chunk; more/fewer chunks
        arr = np.concatenate([grad, grad[:k]]) if k > 0 else grad[:d + k]
        sent = await self.send_array("wrong_length", np.ascontiguousarray(arr), tag)
        same_count = wire.chunk_count(arr.nbytes, self.stride) == wire.chunk_count(grad.nbytes, self.stride)
        # same chunk count: only the last chunk has the wrong length (the FIN matches); else every datagram is wrong
        self.expected["shape"] += 1 if same_count else sent

    async def _wrong_dtype(self, grad: np.ndarray, tag: int, step: int) -> None:
        arr = grad.astype(np.float64) if step % 2 == 0 else (grad * 1e4).astype(np.int32)
        self.expected["shape"] += await self.send_array("wrong_dtype", arr, tag)

    async def _replay(self, grad: np.ndarray, tag: int, step: int) -> None:
        await self.send_array("gradient", grad, tag)
        for old_tag, old in self.grads_history:  # its own datagrams of the previous steps, verbatim
            copies = self.datagrams(old, src=self.rank, tag=old_tag, tid=GRADS_TID, key=self.key)
            self.raw("replay_own", copies)
            self.expected["stale"] += len(copies)
        for old_tag, old in self.params_history:  # the server's parameter datagrams, verbatim
            copies = self.datagrams(old, src=0, tag=old_tag, tid=PARAMS_TID, key=self.key)
            self.raw("replay_params_to_server", copies)  # the server holds no key for itself: a mac refusal
            self.expected["mac"] += len(copies)
            for w in range(1, self.size):
                if w != self.rank:
                    self.raw("replay_params_to_workers", copies, dst=w)

    async def _spoof_rank(self, grad: np.ndarray, tag: int, step: int) -> None:
        await self.send_array("gradient", grad, tag)
        forged = (-1000.0 * grad).astype(np.float32).tobytes()
        as_victim = self.datagrams(forged, src=self.victim, tag=tag, tid=GRADS_TID, key=self.key)
        self.raw("spoof_victim", as_victim)
        self.raw("spoof_victim_fin", self.datagrams(forged, src=self.victim, tag=tag, tid=GRADS_TID, key=self.key,
                                                    kind=2))
        self.raw("spoof_victim_other_port", as_victim, sock=self.other_port)
        self.raw("spoof_server", self.datagrams(forged, src=0, tag=tag, tid=GRADS_TID, key=self.key))
        self.expected["mac"] += 2 * len(as_victim) + 1
        self.expected["mac_unknown"] += len(as_victim)
        # its own rank from another port: authentic (its key), only the address differs
        self.raw("own_rank_other_port", self.datagrams(grad.tobytes(), src=self.rank, tag=tag, tid=GRADS_TID,
                                                       key=self.key), sock=self.other_port)

    async def _flood(self, grad: np.ndarray, tag: int, step: int) -> None:
        for _ in range(FLOOD_COPIES):
            await self.send_array("gradient_copies", grad, tag)
        if self.flooder is None and self.interval > 0:
            self.flooder = threading.Thread(target=self._junk, args=(grad.nbytes,), daemon=True)
            self.flooder.start()

    async def _nonfinite(self, grad: np.ndarray, tag: int, step: int) -> None:
        variant = step % 4
        bad = grad.copy()
        if variant == 0:
            bad[:] = np.nan
        elif variant == 1:
            bad[step % bad.size] = np.nan  # one coordinate of an otherwise honest gradient
        elif variant == 2:
            bad[:] = np.where(np.arange(bad.size) % 2 == 0, np.inf, -np.inf)
        else:
            bad[:] = 1e6 * np.random.default_rng(step).standard_normal(bad.size)
        await self.send_array("nonfinite" if variant < 3 else "huge", bad, tag)
        self.expected["nonfinite_steps" if variant < 3 else "huge_steps"] += 1

    def _junk(self, nbytes: int) -> None:
        """Signed junk at FLOOD_FACTOR times the honest byte rate (one gradient per step interval)."""
        rng = np.random.default_rng(self.rank)
        junk = rng.standard_normal(nbytes // 4).astype(np.float32)
        tids = (GRADS_TID, PARAMS_TID, COLLECTIVE_TENSOR_IDS + 7, 0, 12345)
        t0 = time.monotonic()
        sent_bytes = 0
        i = 0
        while not self.stop.is_set():
            rate = FLOOD_FACTOR * nbytes / max(self.interval, 1e-3)  # bytes per second
            due = t0 + sent_bytes / rate
            if due > time.monotonic():
                time.sleep(min(0.05, due - time.monotonic()))
                continue
            tid = tids[i % len(tids)]
            try:
                n = self.ep.core.send(0, junk.view(np.uint8), F32, FAR_FUTURE + i, tid)
            except OSError:
                return  # the endpoint is closing
            self.sent["junk"] += n
            sent_bytes += nbytes
            i += 1

    def close(self) -> None:
        self.stop.set()
        if self.flooder is not None:
            self.flooder.join(timeout=5)
        self.other_port.close()
        super().close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="the run's TrainConfig as JSON (as aggregathor._rank takes it)")
    ap.add_argument("--mode", required=True, choices=MODES)
    ap.add_argument("--victim", type=int, default=1, help="the rank that spoof-rank claims to be")
    ap.add_argument("--report", required=True, help="where to write what was sent (JSON)")
    args = ap.parse_args(argv)
    cfg = TrainConfig.from_dict(json.loads(args.config))
    if cfg.transport != "lossympi":
        raise SystemExit("the rogue worker attacks the lossympi transport: run the job with --transport lossympi")
    built: list[RogueWorker] = []

    def build(cfg: TrainConfig, world: World, *, mpi: bool) -> RogueWorker:
        if world.rank == 0:
            raise SystemExit("the rogue worker runs a worker rank, not rank 0")
        built.append(RogueWorker(lossympi_comm(cfg, world), cfg.params, world=world, mode=args.mode,
                                 victim=args.victim))
        return built[0]

    try:
        run_rank(cfg, method="env", progress=False, build=build)
    finally:
        report: dict[str, Any] = {"mode": args.mode, "victim": args.victim}
        if built:
            rogue = built[0]
            report |= {"rank": rogue.rank, "steps": rogue.steps, "sent": dict(rogue.sent),
                       "expected": dict(rogue.expected), "interval": rogue.interval}
        Path(args.report).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
