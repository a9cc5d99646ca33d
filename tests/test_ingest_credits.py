"""Receiver-driven incast (docs/protocol.md, "Incast"): the collectives' credits, and lost credits.

A many-to-one collective posts every receive with a credit window and sends with the same window: the root grants
more as it drains. Credits lost on the way (here: sent to an address where nobody listens) must not stall a send:
the sender grants itself a quarter window after each ``CREDIT_WAIT`` without a grant, so the message still ends.
"""

from __future__ import annotations

import asyncio
import math
import socket

import numpy as np
import pytest
from conftest import run, worlds_and_endpoints

from lossympi import wire
from lossympi.comm import Comm


def test_lost_credits_do_not_stall_a_send():
    """Every credit of the receiver goes to a black hole: the sender still sends all 1000 chunks, a quarter window
    (16 chunks) per wait past its first window of 64, and the receive completes."""
    async def main():
        hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        hole.bind(("127.0.0.1", 0))  # bound, never read: what the receiver sends there is lost to the sender
        try:
            with worlds_and_endpoints(2) as (worlds, (tx, rx)):
                rx.readmit(0, hole.getsockname(), worlds[1].keys[0])
                x = np.arange(rx.stride // 4 * 1000, dtype=np.float32)
                window = 64 * rx.stride
                fut = rx.irecv(0, np.zeros_like(x), tag=1, timeout=10, credit_bytes=window)
                sent = await asyncio.wait_for(tx.send(1, x, tag=1, credit_bytes=window), 5)
                r = await fut
                assert r.complete and sent.datagrams == 1000
                assert rx.stats()["credits_sent"] > 0 and tx.stats()["credits_received"] == 0
                assert tx.stats()["credit_timeouts"] == math.ceil((1000 - 64) / 16)
        finally:
            hole.close()

    run(main())


def test_a_credit_of_another_message_is_ignored(raw_sock):
    """A grant names its message: one for another tag (a late credit of an earlier gather) moves nothing."""
    async def main():
        with worlds_and_endpoints(2) as (worlds, (tx, _rx)):
            key = worlds[0].keys[1]
            tx.readmit(1, raw_sock.getsockname(), key)
            raw_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            raw_sock.setblocking(False)
            x = np.arange(tx.stride // 4 * 200, dtype=np.float32)
            stale = wire.pack_datagram(wire.Header.credit(1, 6, 0, 200, 200, tx.stride), b"", key)
            send = asyncio.ensure_future(tx.send(1, x, tag=7, credit_bytes=64 * tx.stride))
            loop = asyncio.get_running_loop()
            for _ in range(64):  # the first window: the sender now waits for a grant of tag 7
                await asyncio.wait_for(loop.sock_recv(raw_sock, 65536), 5)
            raw_sock.sendto(stale, tx.addresses[0])
            await asyncio.wait_for(send, 5)
            st = tx.stats()
            assert st["credits_received"] == 1 and st["credit_timeouts"] == math.ceil((200 - 64) / 16)

    run(main())


@pytest.mark.parametrize("collective", ["Gather", "Allgather"])
def test_collectives_are_receiver_driven(collective):
    """The root grants credit as it drains (CREDIT datagrams), every sender takes them, nothing is lost."""
    n, d = 4, 600_000

    async def main():
        comms = Comm.local(n)
        try:
            xs = [np.full(d, r, np.float32) for r in range(n)]
            outs = [np.zeros((n, d), np.float32) for _ in range(n)]
            for c in comms:  # a small window: several grants per row
                c.endpoint.rcvbuf = 1 << 20

            async def one(c: Comm):
                if collective == "Gather":
                    return await c.aio.Gather(xs[c.rank], outs[0] if c.rank == 0 else None, 0, timeout=20)
                return await c.aio.Allgather(xs[c.rank], outs[c.rank], timeout=20)

            res = await asyncio.gather(*(one(c) for c in comms))
            assert res[0].complete and all((outs[0][r] == r).all() for r in range(n))
            st = [c.endpoint.stats() for c in comms]
            assert st[0]["credits_sent"] > 0
            assert all(s["credits_received"] > 0 for s in st[1:])
            assert comms[0].incast(n - 1) == (None, max(16 << 10, (1 << 20) // (4 * (n - 1))))
        finally:
            for c in comms:
                c.close()

    run(main())
