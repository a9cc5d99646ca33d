"""End-of-message announcements (FIN datagrams): a lossy receive ends soon after its sender is done."""

from __future__ import annotations

import socket
import time

import numpy as np
from conftest import endpoints, run, worlds_and_endpoints

from lossympi import wire
from lossympi.faults import FaultInjector, FaultSpec


def lossy(seed: int = 1) -> FaultInjector:
    return FaultInjector(FaultSpec(drop=0.1), seed=seed)


def test_lossy_receive_ends_after_the_fin_not_at_the_deadline():
    async def main():
        with endpoints(2, per_rank={0: {"faults": lossy()}}) as (a, b):
            x = np.arange(300_000, dtype=np.float32)
            out = np.zeros_like(x)
            fut = b.irecv(0, out, timeout=5.0)
            sent = await a.send(1, x)
            r = await fut
            assert sent.injected_drops.any() and not r.complete
            assert r.elapsed < 1.0  # far from the 5 s deadline
            np.testing.assert_array_equal(r.chunk_mask, ~sent.injected_drops)
            assert b.stats()["fins"] >= 1

    run(main())


def test_without_fins_a_lossy_receive_waits_for_its_deadline():
    async def main():
        with endpoints(2, send_fin=False, per_rank={0: {"faults": lossy()}}) as (a, b):
            x = np.arange(50_000, dtype=np.float32)
            fut = b.irecv(0, np.zeros_like(x), timeout=0.3)
            await a.send(1, x)
            r = await fut
            assert not r.complete and r.elapsed >= 0.29

    run(main())


def test_a_fin_that_arrives_before_the_receive_is_posted_still_counts():
    async def main():
        with endpoints(2, per_rank={0: {"faults": lossy(2)}}) as (a, b):
            await b.recv(0, np.zeros(1, np.float32), tensor_id=9, timeout=0.001)  # b reads its socket
            x = np.arange(100_000, dtype=np.float32)
            sent = await a.send(1, x)
            time.sleep(0.05)
            t0 = time.monotonic()
            r = await b.recv(0, np.zeros_like(x), timeout=5.0)
            assert time.monotonic() - t0 < 1.0 and not r.complete
            np.testing.assert_array_equal(r.chunk_mask, ~sent.injected_drops)

    run(main())


def _fin(key: bytes | None, src: int, tag: int, count: int, length: int = 0, mac_ok: bool = True,
         index: int = 0) -> bytes:
    h = wire.Header(src=src, tag=tag, tensor_id=0, index=index, count=count, length=length,
                    stride=wire.stride_for(wire.DEFAULT_DATAGRAM_BYTES), kind=wire.KIND_FIN)
    data = wire.pack_datagram(h, b"\0" * length, key)
    return data if mac_ok else data[:-1] + bytes([data[-1] ^ 1])


def test_forged_or_malformed_fins_do_not_end_a_receive_early():
    async def main():
        with worlds_and_endpoints(3) as (worlds, (a, b, c)):
            x = np.arange(50_000, dtype=np.float32)
            count = wire.chunk_count(x.nbytes, b.stride)
            fut = b.irecv(0, np.zeros_like(x), tag=0, timeout=0.3)
            raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            dest = worlds[1].addresses[1]
            forged = [
                _fin(worlds[1].keys[0], 0, 0, count, mac_ok=False),  # bad MAC
                _fin(worlds[2].keys[1], 0, 0, count),  # rank 2's key, claiming rank 0
                _fin(worlds[1].keys[0], 0, 0, count, length=8),  # a FIN carries no payload
                _fin(worlds[1].keys[0], 0, 0, count + 1),  # wrong chunk count
                _fin(worlds[1].keys[0], 0, 0, count, index=count),  # a FIN's index must be 0
            ]
            for d in forged:
                raw.sendto(d, dest)
            raw.close()
            r = await fut
            assert r.elapsed >= 0.29 and r.received == 0  # nothing ended it early
            rej = b.stats()["rejected"]
            assert rej["mac"] == 2 and rej["header"] == 2 and rej["shape"] == 1
            assert r.reject_reasons == {**dict.fromkeys(wire.REJECT_REASONS, 0), "mac": 2, "header": 2, "shape": 1}
            assert b.stats()["fins"] == 0

    run(main())
