"""The reliable control channel (lossympi.control.TCPControl): a star over TCP through rank 0.

Every rank lives in this process, on real TCP sockets on 127.0.0.1; their coroutines run concurrently.
Every wait is bounded (``asyncio.wait_for``), so a deadlock fails a test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from conftest import run, wait_until

from lossympi.bootstrap import World, local_worlds
from lossympi.comm import Comm
from lossympi.control import ControlError, TCPControl

WAIT = 10.0  # seconds any one test step may take before it counts as a deadlock


@contextlib.contextmanager
def controls(n: int, **kwargs: Any) -> Iterator[tuple[list[World], list[TCPControl]]]:
    worlds = local_worlds(n)
    ctls = [TCPControl(w.rank, w.size, w.addresses, w.keys, w.control, **kwargs) for w in worlds]
    try:
        yield worlds, ctls
    finally:
        for c in ctls:
            c.close()
        for w in worlds:
            w.close()


async def together(ctls: Sequence[Any], fn: Callable[[Any], Any], timeout: float = WAIT) -> list[Any]:
    """``fn(rank object)`` for every rank concurrently, exceptions returned, bounded by ``timeout``."""
    return list(await asyncio.wait_for(asyncio.gather(*(fn(c) for c in ctls), return_exceptions=True), timeout))


def no_errors(results: Sequence[Any]) -> None:
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]


# ====================================================================================== operations


def test_barrier_waits_for_the_last_rank():
    n, late, delay = 4, 2, 0.2

    async def main():
        with contextlib.ExitStack() as stack:
            comms = Comm.local(n)
            for c in comms:
                stack.callback(c.close)
            for rnd in range(3):
                entered, left = {}, {}

                async def rank(c, rnd=rnd, entered=entered, left=left):
                    if c.rank == (late + rnd) % n:
                        await asyncio.sleep(delay)
                    entered[c.rank] = time.monotonic()
                    await c.aio.Barrier()
                    left[c.rank] = time.monotonic()

                no_errors(await together(comms, rank))
                last = max(entered.values())
                assert max(entered, key=entered.get) == (late + rnd) % n
                assert min(left.values()) >= last, (rnd, entered, left)
                assert max(left.values()) - last < 0.15

    run(main())


def test_barrier_blocking_api_in_threads():
    n, late, delay = 3, 0, 0.2
    with contextlib.ExitStack() as stack:
        comms = Comm.local(n)
        for c in comms:
            stack.callback(c.close)
        entered, left = {}, {}

        def rank(c: Comm) -> None:
            if c.rank == late:
                time.sleep(delay)
            entered[c.rank] = time.monotonic()
            c.Barrier()
            left[c.rank] = time.monotonic()
            assert c.bcast_bytes(b"hi" if c.rank == 2 else None, root=2) == b"hi"
            got = c.gather_bytes(bytes([c.rank]) * 3, root=1)
            assert got == ([bytes([r]) * 3 for r in range(n)] if c.rank == 1 else None)

        with ThreadPoolExecutor(n) as pool:
            for f in [pool.submit(rank, c) for c in comms]:
                f.result(timeout=WAIT)
        assert min(left.values()) >= entered[late]


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_bcast_and_gather_bytes_any_root(n):
    async def main():
        with controls(n, timeout=WAIT) as (_, ctls):
            for root in range(n):
                for payload in (b"", b"x", os.urandom(100_000)):
                    data = payload + bytes([root])
                    got = await together(ctls, lambda c, root=root, data=data: c.bcast_bytes(
                        data if c.rank == root else None, root))
                    no_errors(got)
                    assert got == [data] * n
                    parts = [payload[: 1 + 37 * r] + bytes([r, root]) for r in range(n)]
                    got = await together(ctls, lambda c, root=root, parts=parts: c.gather_bytes(
                        parts[c.rank], root))
                    no_errors(got)
                    assert got == [parts if r == root else None for r in range(n)]
                    await together(ctls, lambda c: c.barrier())

    run(main())


def test_comm_wrappers_and_root_checks():
    async def main():
        comms = Comm.local(3)
        try:
            got = await together(comms, lambda c: c.aio.bcast_bytes(b"cfg" if c.rank == 1 else None, 1))
            assert got == [b"cfg"] * 3
            got = await together(comms, lambda c: c.aio.gather_bytes(str(c.rank).encode(), 2))
            assert got == [None, None, [b"0", b"1", b"2"]]
            for bad in (-1, 3, True, 1.5):
                with pytest.raises(ValueError, match="is not a rank"):
                    await comms[0].aio.bcast_bytes(b"x", bad)
                with pytest.raises(ValueError, match="is not a rank"):
                    await comms[0].aio.gather_bytes(b"x", bad)
            # The refused calls took no operation number: the ranks still agree.
            no_errors(await together(comms, lambda c: c.aio.Barrier()))
        finally:
            for c in comms:
                c.close()

    run(main())


# ====================================================================================== mismatched calls


CALLS: dict[str, Callable[[TCPControl], Any]] = {
    "Barrier": lambda c: c.barrier(),
    "bcast": lambda c: c.bcast_bytes(b"data" if c.rank == 0 else None, 0),
    "gather": lambda c: c.gather_bytes(b"part", 0),
}


@pytest.mark.parametrize("odd_rank", [0, 1, 2])
@pytest.mark.parametrize("majority,odd", [("Barrier", "bcast"), ("bcast", "Barrier"), ("Barrier", "gather"),
                                          ("gather", "bcast"), ("bcast", "gather")])
def test_mismatched_collectives_raise_naming_both(majority, odd, odd_rank):
    n = 3

    async def main():
        with controls(n, timeout=WAIT) as (_, ctls):
            no_errors(await together(ctls, lambda c: c.barrier()))  # the star is up
            t0 = time.monotonic()
            got = await together(ctls, lambda c: CALLS[odd if c.rank == odd_rank else majority](c))
            assert time.monotonic() - t0 < 2.0  # an error, not a timeout
            errors = {r: e for r, e in enumerate(got) if isinstance(e, BaseException)}
            # Rank 0 sees the mismatch first; every rank still waiting on it is told.
            assert 0 in errors
            for r, e in errors.items():
                assert isinstance(e, ControlError), (r, e)
                assert f"{majority} #1" in str(e) and f"{odd} #1" in str(e), (r, e)
            # Ranks that returned did so legitimately (a gather sender, the bcast root): nothing else.
            for r in set(range(n)) - set(errors):
                assert (odd if r == odd_rank else majority) == "gather" and r != 0
            # The channel refuses further operations where it failed.
            with pytest.raises(ControlError, match="unusable"):
                await ctls[0].barrier()

    run(main())


def test_mismatch_through_comm():
    async def main():
        comms = Comm.local(2)
        try:
            got = await together(comms, lambda c: c.aio.Barrier() if c.rank == 0 else c.aio.bcast_bytes(None, 0))
            for e in got:
                assert isinstance(e, ControlError) and "Barrier #0" in str(e) and "bcast #0" in str(e)
        finally:
            for c in comms:
                c.close()

    run(main())


# ====================================================================================== hostile clients


async def _wrong_key_client(addr: tuple[str, int], claim: int) -> None:
    """The real handshake, with a key that is not the pair key of the rank it claims."""
    reader, writer = await asyncio.open_connection(*addr)
    nonce = await reader.readexactly(16)
    mac = hmac.new(os.urandom(32), b"lossympi-control-hello-v1" + nonce + struct.pack("<I", claim),
                   hashlib.sha256).digest()
    writer.write(struct.pack("<I", claim) + mac)
    await writer.drain()
    assert await reader.read() == b""  # rank 0 hangs up
    writer.close()


def test_hostile_clients_do_not_stop_the_star():
    n = 3

    async def main():
        with controls(n, timeout=WAIT) as (worlds, ctls):
            addr = worlds[0].address
            # Connect before the real ranks: garbage, a half-open client, impostors with wrong keys.
            garbage_r, garbage_w = await asyncio.open_connection(*addr)
            garbage_w.write(os.urandom(64))
            half_r, half_w = await asyncio.open_connection(*addr)
            short_r, short_w = await asyncio.open_connection(*addr)
            short_w.write(b"GET / HTTP/1.0\r\n")
            short_w.write_eof()  # gives up mid-hello
            impostors = [asyncio.ensure_future(_wrong_key_client(addr, claim)) for claim in (1, 2, 0, 99)]

            async def rank(c: TCPControl) -> bytes:
                if c.rank != 0:
                    await asyncio.sleep(0.1)  # the hostile clients come first
                await c.barrier()
                return await c.bcast_bytes(b"ok" if c.rank == 0 else None, 0)

            got = await together(ctls, rank)
            no_errors(got)
            assert got == [b"ok"] * n
            await asyncio.wait_for(asyncio.gather(*impostors), WAIT)
            # The half-open client is still connected; it is counted when it gives up.
            half_w.close()
            await wait_until(lambda: ctls[0].rejected == 7, timeout=WAIT, what="7 rejected connections")
            for w in (garbage_w, short_w):
                w.close()
            assert sorted(ctls[0].links) == [1, 2]
            # The star works, and no hostile client slipped in.
            no_errors(await together(ctls, lambda c: c.gather_bytes(b"%d" % c.rank, 0)))
            del garbage_r, half_r, short_r

    run(main())


# ====================================================================================== tampering


class _Tamper:
    """Wraps a StreamWriter: ``edit(data)`` decides what goes on the wire for each write."""

    def __init__(self, writer: asyncio.StreamWriter, edit: Callable[[bytes], bytes]) -> None:
        self._writer = writer
        self._edit = edit

    def write(self, data: bytes) -> None:
        self._writer.write(self._edit(bytes(data)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)


def test_tampered_frame_is_detected():
    async def main():
        with controls(2, timeout=WAIT) as (_, ctls):
            no_errors(await together(ctls, lambda c: c.barrier()))
            link = ctls[1].links[0]

            def flip(data: bytes) -> bytes:
                b = bytearray(data)
                b[4 + 8] ^= 0x01  # first payload byte (the op code), after length and sequence
                return bytes(b)

            link.writer = _Tamper(link.writer, flip)
            got = await together(ctls, lambda c: c.barrier())
            assert isinstance(got[0], ControlError) and "authentication" in str(got[0])
            assert isinstance(got[1], ControlError) and "authentication" in str(got[1])  # told by rank 0

    run(main())


def test_tampered_sequence_number_is_detected():
    async def main():
        with controls(2, timeout=WAIT) as (_, ctls):
            no_errors(await together(ctls, lambda c: c.barrier()))
            link = ctls[0].links[1]

            def bump(data: bytes) -> bytes:
                b = bytearray(data)
                b[4] ^= 0x02  # the sequence number: the MAC covers it
                return bytes(b)

            link.writer = _Tamper(link.writer, bump)
            got = await together(ctls, lambda c: c.bcast_bytes(b"x" if c.rank == 0 else None, 0))
            assert got[0] == b"x"
            assert isinstance(got[1], ControlError) and "authentication" in str(got[1])

    run(main())


def test_replayed_frame_is_detected():
    async def main():
        with controls(2, timeout=WAIT) as (_, ctls):
            no_errors(await together(ctls, lambda c: c.barrier()))
            link = ctls[1].links[0]
            frames: list[bytes] = []

            def replay(data: bytes) -> bytes:
                frames.append(data)
                return data if len(frames) > 1 else data + data  # the first frame goes twice

            link.writer = _Tamper(link.writer, replay)
            no_errors(await together(ctls, lambda c: c.barrier()))
            got = await together(ctls, lambda c: c.gather_bytes(b"g", 0))
            assert isinstance(got[0], ControlError) and "out of sequence" in str(got[0])
            assert "replay" in str(got[0])

    run(main())


def test_oversize_frame_is_rejected():
    async def main():
        with controls(3, timeout=WAIT, max_bytes=1000) as (_, ctls):
            got = await together(ctls, lambda c: c.gather_bytes(b"y" * (2000 if c.rank == 2 else 10), 0))
            assert isinstance(got[0], ControlError) and "out of bounds" in str(got[0])
        with controls(2, timeout=WAIT, max_bytes=1000) as (_, ctls):
            no_errors(await together(ctls, lambda c: c.barrier()))
            # A forged length prefix is refused before anything is read or allocated.
            ctls[1].links[0].writer.write(struct.pack("<I", 1 << 31))
            got = await together(ctls, lambda c: c.barrier())
            assert isinstance(got[0], ControlError) and "out of bounds" in str(got[0])
            assert isinstance(got[1], ControlError)

    run(main())


# ====================================================================================== timeouts


def test_timeouts_give_clear_errors():
    async def main():
        # Rank 1 never connects.
        with controls(2, timeout=0.3) as (_, ctls):
            t0 = time.monotonic()
            with pytest.raises(ControlError, match=r"ranks \[1\] did not connect within 0.3 s"):
                await asyncio.wait_for(ctls[0].barrier(), WAIT)
            assert time.monotonic() - t0 < 2
        # Rank 0 accepts TCP (its listener's backlog) but never answers the handshake.
        with controls(2, timeout=0.3) as (_, ctls):
            with pytest.raises(ControlError, match="no control handshake within 0.3 s"):
                await asyncio.wait_for(ctls[1].barrier(), WAIT)
        # Rank 0 is gone.
        with controls(2, timeout=0.3) as (worlds, ctls):
            worlds[0].control.close()
            with pytest.raises(ControlError, match="cannot reach rank 0"):
                await asyncio.wait_for(ctls[1].barrier(), WAIT)
        # The star is up but one rank does not take part: both sides name the operation.
        with controls(3, timeout=0.3) as (_, ctls):
            no_errors(await together(ctls, lambda c: c.barrier()))
            got = await together(ctls[:2], lambda c: c.barrier())
            assert isinstance(got[0], ControlError) and "rank 2 sent nothing for Barrier #1 within 0.3 s" in str(
                got[0])
            assert isinstance(got[1], ControlError) and "Barrier #1" in str(got[1])
            with pytest.raises(ControlError, match="unusable"):
                await ctls[1].gather_bytes(b"", 0)

    run(main())


def _kernel_has_rto_min_option() -> bool:
    import socket

    from lossympi.control import _TCP_RTO_MIN_US

    with socket.socket() as s:
        try:
            return s.getsockopt(socket.IPPROTO_TCP, _TCP_RTO_MIN_US) > 0
        except OSError:
            return False


def test_links_repair_a_lost_message_in_milliseconds_not_200():
    """Every link has Nagle off and, where the kernel has the options (Linux >= 6.15), a 5 ms minimum RTO and
    1 ms delayed ACKs, so a lost one-segment step message is resent after ms, not TCP's default 200 ms."""
    from lossympi.control import CONTROL_RTO_MIN_US

    async def main():
        with controls(3, timeout=WAIT) as (_, ctls):
            await together(ctls, lambda c: c.barrier())
            links = [link for c in ctls for link in c.links.values()]
            assert len(links) == 4 and all(link.tuning.get("nodelay") for link in links)
            if _kernel_has_rto_min_option():
                # the kernel rounds up to its clock tick (4 ms at HZ=250)
                assert all(CONTROL_RTO_MIN_US <= link.tuning["rto_min_us"] < 20_000 for link in links)
            else:
                assert all("rto_min_us" not in link.tuning for link in links)

    run(main())
