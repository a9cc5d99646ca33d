"""UDP copies of the elastic control channel's small frames (lossympi.control_copies): a frame whose TCP segment is
held back still arrives, exactly once and in order; hostile or replayed copies change nothing."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import pytest
from conftest import elastic_controls, run, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from lossympi import control_copies as cc
from lossympi.control import OP_READY, TCPControl

WAIT = 10.0


@contextlib.contextmanager
def elastic(n: int, **kwargs: Any):
    with elastic_controls(n, timeout=WAIT, **kwargs) as (_, ctls, _):
        yield ctls


class Held:
    """Holds what a link writes to its TCP socket (a segment the network lost) until :meth:`release`."""

    def __init__(self, link: Any) -> None:
        self.link = link
        self.write = link.writer.write
        self.bytes: list[bytes] = []
        link.writer.write = self.bytes.append

    def release(self) -> None:
        self.link.writer.write = self.write
        self.write(b"".join(self.bytes))


async def step_with_held_segment(ctls: list[TCPControl], rank: int,
                                 peer: int) -> tuple[Held, list[asyncio.Future]]:
    """After a first step, hold the TCP writes of ``rank``'s link to ``peer`` and start every rank's wait for the
    next announcement."""
    await first_step(ctls)
    held = Held(ctls[rank].links[peer])
    return held, [asyncio.ensure_future(c.listen()) for c in ctls[1:]]


async def first_step(ctls: list[TCPControl]) -> None:
    """One announcement to every rank: rank 0 learns where each rank takes copies from its first ready copy."""
    listens = [asyncio.ensure_future(c.listen()) for c in ctls[1:]]
    await asyncio.wait_for(ctls[0].wait_ready(WAIT), WAIT)
    await ctls[0].announce(b"0")
    assert await asyncio.wait_for(asyncio.gather(*listens), WAIT) == [b"0"] * (len(ctls) - 1)


@pytest.mark.parametrize("copies", [3, 0])
def test_an_announcement_whose_tcp_segment_is_held_arrives_by_copy(copies):
    async def main():
        with elastic(3, copies=copies) as ctls:
            c0, c1, c2 = ctls
            held, listens = await step_with_held_segment(ctls, 0, 1)  # rank 0's frames to rank 1 are lost
            await asyncio.wait_for(c0.wait_ready(WAIT), WAIT)
            await c0.announce(b"step 1")
            done, _ = await asyncio.wait(listens, timeout=1.0)
            if copies:
                assert [t.result() for t in listens] == [b"step 1", b"step 1"]
                assert c1.copy_counts["first"] >= 1
            else:  # TCP only: rank 1 waits for the lost segment
                assert listens[0] not in done and listens[1].result() == b"step 1"
            held.release()  # TCP delivers late: the copy's twin is dropped, the next frame is the next step
            if not copies:
                assert await asyncio.wait_for(listens[0], WAIT) == b"step 1"
            listens = [asyncio.ensure_future(c.listen()) for c in (c1, c2)]
            assert await asyncio.wait_for(c0.wait_ready(WAIT), WAIT) == []
            await c0.announce(b"step 2")
            assert await asyncio.wait_for(asyncio.gather(*listens), WAIT) == [b"step 2", b"step 2"]

    run(main())


@pytest.mark.parametrize("copies", [3, 0])
def test_a_ready_frame_whose_tcp_segment_is_held_arrives_by_copy(copies):
    async def main():
        with elastic(3, copies=copies) as ctls:
            c0, c1, c2 = ctls
            held, listens = await step_with_held_segment(ctls, 1, 0)  # rank 1's ready frame is lost
            late = await asyncio.wait_for(c0.wait_ready(1.0), WAIT)
            assert late == ([] if copies else [1])
            assert c0.copy_counts["first"] >= (2 if copies else 0)
            held.release()
            await c0.announce(b"step 1")
            assert await asyncio.wait_for(asyncio.gather(*listens), WAIT) == [b"step 1", b"step 1"]

    run(main())


def test_hostile_and_replayed_copies_change_nothing():
    async def main():
        with elastic(2) as ctls:
            c0, c1 = ctls
            await first_step(ctls)
            link = c0.links[1]
            port = c0._copy_socket.port
            good_addr = link.copy_addr
            assert good_addr is not None
            ready = bytes([OP_READY]) + (1).to_bytes(8, "little")
            wrong_nonce = cc.seal(link.key, b"\x01" * 16, 0, 1, 5, ready)  # an earlier link's copy
            wrong_key = cc.seal(b"k" * 32, link.nonce, 0, 1, 5, ready)
            reflected = cc.seal(link.key, link.nonce, 1, 1, 5, ready)  # rank 0's own direction
            not_ready = cc.seal(link.key, link.nonce, 0, 1, 5, b"\x06" + bytes(8))
            old = cc.seal(link.key, link.nonce, 0, 1, 0, ready)  # the first step's ready frame, replayed
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for data in (b"", b"x" * 10, b"LMC2" + bytes(60), wrong_nonce[:-1], wrong_nonce, wrong_key,
                             reflected, not_ready, cc.seal(link.key, link.nonce, 0, 7, 5, ready), old):
                    s.sendto(data, ("127.0.0.1", port))
                await wait_until(lambda: sum(c0.copy_counts.values()) >= 3 + 10, WAIT, "copies counted")
            counts = c0.copy_counts
            assert (counts["malformed"], counts["auth"], counts["op"], counts["rank"]) == (3, 4, 1, 1)
            assert link.copy_addr == good_addr  # a replay from elsewhere does not redirect the copies
            assert c0._ready_at[1] == 1  # the ready count is the real one
            assert c0.missing() == []
            listens = asyncio.ensure_future(c1.listen())
            assert await asyncio.wait_for(c0.wait_ready(WAIT), WAIT) == []
            await c0.announce(b"step 1")
            assert await asyncio.wait_for(listens, WAIT) == b"step 1"

    run(main())


def test_a_copy_is_bound_to_its_link_direction_and_fields():
    key, nonce = b"k" * 32, b"n" * 16
    data = cc.seal(key, nonce, 1, 3, 42, b"payload")
    got = cc.open_copy(data, size=4)
    assert not isinstance(got, str)
    rank, seq, payload, mac = got
    assert (rank, seq, payload) == (3, 42, b"payload")
    assert cc.authentic(key, nonce, 1, rank, seq, payload, mac)
    assert not cc.authentic(key, nonce, 0, rank, seq, payload, mac)
    assert not cc.authentic(key, b"m" * 16, 1, rank, seq, payload, mac)
    assert not cc.authentic(None, nonce, 1, rank, seq, payload, mac)
    for i in range(len(data)):  # any flipped byte is refused, by the parser or by the MAC
        bad = bytearray(data)
        bad[i] ^= 0x10
        got = cc.open_copy(bytes(bad), size=8)
        assert isinstance(got, str) or not cc.authentic(key, nonce, 1, *got)
    assert cc.open_copy(data, size=3) == "rank"
    assert cc.open_copy(cc.seal(key, nonce, 1, 3, 0, b"x" * (cc.MAX_COPY_PAYLOAD + 1)), size=4) == "malformed"


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 30), data=st.data())
def test_inbox_delivers_each_frame_once_in_order(n, data):
    """Reference: the TCP stream alone. Copies of any frames, duplicated, in any order, interleaved with the
    stream, change neither what is delivered nor its order; pops between offers never run ahead."""
    copies = data.draw(st.lists(st.integers(0, n - 1), max_size=3 * n))
    events = [("tcp", s) for s in range(n)] + [("udp", s) for s in copies]
    order = data.draw(st.permutations(range(len(events))))
    tcp_next = 0
    box = cc.Inbox()
    out: list[bytes] = []
    for i in order:  # the TCP events are re-sequenced: the stream delivers in order
        kind, seq = events[i]
        if kind == "tcp":
            seq, tcp_next = tcp_next, tcp_next + 1
        box.offer(seq, f"frame {seq}".encode())
        if data.draw(st.booleans()):
            got = box.pop()
            if got is not None:
                out.append(got)
    while (got := box.pop()) is not None:
        out.append(got)
    assert out == [f"frame {s}".encode() for s in range(n)]
    assert box.consumed == n


def test_copies_bind_in_the_port_range_or_are_off_with_a_warning(caplog):
    """A firewall opens LOSSYMPI_PORT_RANGE: the copy sockets bind in it; with no free port there, the channel
    runs over TCP alone and says so once per rank."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s1, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s2:
        s1.bind(("127.0.0.1", 0))
        s2.bind(("127.0.0.1", 0))
        free = [s1.getsockname()[1], s2.getsockname()[1]]
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    full = (taken.getsockname()[1],) * 2

    async def main(port_range, expect_copies):
        with elastic(2) as ctls:
            for c, r in zip(ctls, port_range, strict=True):
                c.copy_port_range = r
            await first_step(ctls)
            for c, r in zip(ctls, port_range, strict=True):
                if expect_copies:
                    assert c._copy_socket is not None and c._copy_socket.port == r[0]
                else:
                    assert c._copy_socket is None
            assert (ctls[0].copy_counts["first"] + ctls[0].copy_counts["duplicate"] > 0) == expect_copies

    try:
        run(main([(p, p) for p in free], True))
        with caplog.at_level("WARNING", logger="lossympi.control"):
            run(main([full, full], False))
        lines = [r.getMessage() for r in caplog.records if "sends no UDP copies" in r.getMessage()]
        assert len(lines) == 1 and "widen LOSSYMPI_PORT_RANGE" in lines[0]  # rank 0 (rank 1 is told: port 0)
    finally:
        taken.close()
