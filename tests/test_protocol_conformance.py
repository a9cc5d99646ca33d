"""Receiver-side conformance to docs/protocol.md, point by point (issue 12, requirement 6).

Each test reads one promise of the document and checks it against a live :class:`Endpoint` on 127.0.0.1: datagrams
are crafted with :mod:`lossympi.wire` (``Header``, ``pack_datagram``) and sent from a plain UDP socket, then the
endpoint's counters, reject reasons and receive results are compared with what the document says. The points:

1. a receive reports ``reject_reasons`` for its window (post .. completion);
2. ``header`` drops are charged to the rank the header claims;
3. a FIN's ``index`` is 0 (the sender writes 0, the receiver refuses anything else);
4. the reserved tag 2^64 - 1 is refused on receive, and never pooled;
5. the unexpected pool is a byte budget cut into datagram-sized entries, shared among the peers;
6. the endpoint reads nothing before its first call, and only while its loop runs;
7. every ``Endpoint`` parameter (``check_address`` included) is documented, and ``check_address`` does what it says;
8. the default burst is what the document and the docstrings say (an eighth; a quarter split among incast senders);
9. incast credits: the receiver grants ``min(count, hi + window)`` a quarter window at a time in CREDIT datagrams of
   the documented layout, and a sender out of credit waits for a grant, or ``CREDIT_WAIT``, then grants itself a
   quarter window.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import re
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import run, wait_until, worlds_and_endpoints

from lossympi import wire
from lossympi.comm import Comm
from lossympi.endpoint import Endpoint

DOC = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
F32 = wire.DTYPE_CODES["float32"]
NONE = dict.fromkeys(wire.REJECT_REASONS, 0)


def section(title: str) -> str:
    """The text of the docs/protocol.md section whose heading is ``title`` (up to the next heading)."""
    m = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#)", DOC + "\n#", re.S | re.M)
    assert m, f"docs/protocol.md has no section {title!r}"
    return " ".join(m.group(1).split())


def chunk(ep: Endpoint, x: np.ndarray, index: int, key: bytes | None, src: int = 1, tag: int = 0, **fields) -> bytes:
    """Chunk ``index`` of message ``x`` as rank ``src`` sends it to ``ep`` (``fields`` override the header)."""
    count = wire.chunk_count(x.nbytes, ep.stride)
    data = x.view(np.uint8)[index * ep.stride:(index + 1) * ep.stride].tobytes()
    h = dict(src=src, tag=tag, tensor_id=0, index=index, count=count, length=len(data), stride=ep.stride, dtype=F32)
    h.update(fields)
    return wire.pack_datagram(wire.Header(**h), data[: h["length"]].ljust(h["length"], b"\0"), key)


def fin(ep: Endpoint, x: np.ndarray, key: bytes, src: int = 1, tag: int = 0, **fields) -> bytes:
    """The FIN of message ``x`` as rank ``src`` sends it to ``ep`` (``fields`` override the header)."""
    h = wire.Header.fin(src, tag, 0, wire.chunk_count(x.nbytes, ep.stride), ep.stride, F32)
    return wire.pack_datagram(dataclasses.replace(h, **fields), b"", key)


def bad_mac(d: bytes) -> bytes:
    return d[:-1] + bytes([d[-1] ^ 1])


async def inject(ep: Endpoint, raw: socket.socket, datagrams: list[bytes]) -> None:
    """Send ``datagrams`` to ``ep`` and wait until it has read every one."""
    n0 = ep.stats()["datagrams"]
    for d in datagrams:
        raw.sendto(d, ep.addresses[ep.rank])
    await wait_until(lambda: ep.stats()["datagrams"] >= n0 + len(datagrams), what="datagrams read")


async def attach(ep: Endpoint) -> None:
    """Make ``ep`` watch its socket on the running loop (a receive that times out at once)."""
    await ep.recv(1, np.zeros(1, np.float32), tensor_id=77, timeout=0.001)


# ------------------------------------------------------------------------------------------ 1. reject_reasons


def test_1_a_receive_reports_reject_reasons_of_its_window(raw_sock):
    async def main():
        with worlds_and_endpoints(2) as (worlds, (rx, tx)):
            key = worlds[0].keys[1]
            x = np.arange(1000, dtype=np.float32)
            await attach(rx)
            await inject(rx, raw_sock, [bad_mac(chunk(rx, x, 0, key))])  # before the post: not this receive's
            # a datagram of tag 1 with a wrong dtype waits in the pool, and fails step 7 when tag 1 is posted
            await inject(rx, raw_sock, [chunk(rx, x, 0, key, tag=1, dtype=wire.DTYPE_CODES["int32"])])
            fut = rx.irecv(1, np.zeros_like(x), tag=0, timeout=5)
            await inject(rx, raw_sock, [
                chunk(rx, x, 0, key, version=1),  # header
                chunk(rx, x, 0, key)[:-3],  # size
                bad_mac(chunk(rx, x, 0, key)),  # mac
                chunk(rx, x, 0, key, stride=16),  # shape
                chunk(rx, x, 0, key, src=9),  # rank, claimed by nobody
            ])
            await tx.send(0, x, tag=0)
            r = await fut
            assert r.complete
            assert r.reject_reasons == {**NONE, "header": 1, "size": 1, "mac": 1, "shape": 1}
            assert r.rejected == 4
            await inject(rx, raw_sock, [chunk(rx, x, 0, key, version=1)])  # after completion: in no receive
            fut = rx.irecv(1, np.zeros_like(x), tag=1, timeout=5)
            await tx.send(0, x, tag=1)
            r1 = await fut
            assert r1.reject_reasons == {**NONE, "shape": 1} and r1.rejected == 1  # the pooled one

    run(main())


# ------------------------------------------------------------------------------------------ 2. header drops


def test_2_header_drops_are_charged_to_the_claimed_rank(raw_sock):
    async def main():
        with worlds_and_endpoints(3) as (worlds, (rx, _a, _b)):
            key = worlds[0].keys[1]
            x = np.arange(100, dtype=np.float32)
            await attach(rx)
            mark = rx.counters()
            bad = [chunk(rx, x, 0, key, version=0), chunk(rx, x, 0, key, kind=7), chunk(rx, x, 0, key, flags=2)]
            await inject(rx, raw_sock, bad + [chunk(rx, x, 0, key, version=0, src=3)])  # src 3 is no rank
            window = rx.counters() - mark
            header = wire.REJECT_REASONS.index("header")
            assert window.claimed[:, header].tolist() == [0, 3, 0]
            assert window.claimed.sum() == 3 and rx.stats()["rejected"]["header"] == 4
            assert window.rejects[3, header] == 4  # all sent from an address that is no rank's

    run(main())


# ------------------------------------------------------------------------------------------ 3. FIN index


def test_3_the_sender_writes_fin_index_0(raw_sock):
    """The FIN of a real send, captured: the message's header with kind FIN, index 0, no payload, a valid MAC."""
    async def main():
        with worlds_and_endpoints(2) as (worlds, (tx, _rx)):
            key = worlds[0].keys[1]
            tx.readmit(1, raw_sock.getsockname(), key)  # rank 1 is now our spy socket
            x = np.arange(3000, dtype=np.float32)
            sent = await tx.send(1, x, tag=5)
            raw_sock.settimeout(2)
            got = [raw_sock.recv(65536) for _ in range(sent.datagrams + 3)]
            fins = [d for d in got if wire.Header.unpack(d).kind == wire.KIND_FIN]
            assert len(fins) == 3
            for d in fins:
                h = wire.Header.unpack(d)
                assert (h.index, h.length, h.tag, h.count, h.stride) == (0, 0, 5, sent.chunks, tx.stride)
                assert len(d) == wire.HEADER_SIZE + wire.MAC_SIZE and d[-16:] == wire.mac(key, d[:-16])

    run(main())


def test_3_a_fin_with_a_nonzero_index_is_a_header_reject(raw_sock):
    async def main():
        with worlds_and_endpoints(2) as (worlds, (rx, _tx)):
            key = worlds[0].keys[1]
            x = np.arange(2000, dtype=np.float32)
            count = wire.chunk_count(x.nbytes, rx.stride)
            fut = rx.irecv(1, np.zeros_like(x), tag=0, timeout=3)
            await inject(rx, raw_sock, [chunk(rx, x, i, key) for i in range(count - 1)])  # the last one is lost
            await inject(rx, raw_sock, [fin(rx, x, key, index=i) for i in (1, count, 0xFFFFFFFF)])
            await asyncio.sleep(0.1)
            assert not fut.done()  # no FIN ended it
            assert rx.stats()["rejected"]["header"] == 3 and rx.stats()["fins"] == 0
            t0 = time.monotonic()
            await inject(rx, raw_sock, [fin(rx, x, key)])  # index 0: the end of the message
            r = await fut
            assert time.monotonic() - t0 < 1.0 and not r.complete and r.lost_chunks == 1
            assert r.reject_reasons == {**NONE, "header": 3}

    run(main())


# ------------------------------------------------------------------------------------------ 4. reserved tag


def test_4_the_reserved_tag_is_refused_on_receive(raw_sock):
    async def main():
        with worlds_and_endpoints(2) as (worlds, (rx, tx)):
            key = worlds[0].keys[1]
            x = np.arange(10, dtype=np.float32)
            await attach(rx)
            await inject(rx, raw_sock, [chunk(rx, x, 0, key, tag=wire.RESERVED_TAG),
                                        fin(rx, x, key, tag=wire.RESERVED_TAG)])
            st = rx.stats()
            assert st["rejected"]["header"] == 2 and st["pooled"] == 0 and st["pool_in_use"] == 0
            assert rx.counters().claimed[1].tolist() == [2 if r == "header" else 0 for r in wire.REJECT_REASONS]
            with pytest.raises(ValueError, match="2\\*\\*64 - 1"):
                rx.irecv(1, np.zeros_like(x), tag=wire.RESERVED_TAG, timeout=1)
            with pytest.raises(ValueError, match="2\\*\\*64 - 1"):
                await tx.send(0, x, tag=wire.RESERVED_TAG)

    run(main())


# ------------------------------------------------------------------------------------------ 5. pool share


def test_5_the_pool_is_a_byte_budget_cut_into_entries_shared_by_peers(raw_sock):
    unexpected = 64 << 10
    text = section("Datagrams of a future tag (not yet posted)")
    assert "max(16, unexpected_bytes // datagram_bytes)" in text and "max(16, entries // (size - 1))" in text
    entries = max(16, unexpected // wire.DEFAULT_DATAGRAM_BYTES)
    share = max(16, entries // (3 - 1))
    assert share < entries and share * 48 < unexpected // 2  # the tiny datagrams would fit by their bytes

    async def main():
        with worlds_and_endpoints(3, unexpected_bytes=unexpected) as (worlds, (rx, _a, _b)):
            empty = np.zeros(0, np.float32)
            await attach(rx)
            flood = [chunk(rx, empty, 0, worlds[0].keys[1], tag=100 + i) for i in range(share + 8)]
            assert all(len(d) == 48 for d in flood)
            await inject(rx, raw_sock, flood)
            st = rx.stats()
            assert st["pooled"] == share and st["overflow"] == 8 and rx.counters().pool_drops.tolist() == [0, 8, 0]
            await inject(rx, raw_sock, [chunk(rx, empty, 0, worlds[0].keys[2], src=2, tag=100 + i) for i in range(5)])
            assert rx.stats()["pooled"] == share + 5  # rank 1's flood left rank 2 its share
            big = np.zeros(500, np.float32)  # 2000 bytes in one datagram: longer than an entry
            await inject(rx, raw_sock, [chunk(rx, big, 0, worlds[0].keys[2], src=2, tag=500, length=2000)])
            assert rx.stats()["overflow"] == 9 and rx.stats()["pool_in_use"] == share + 5

    run(main())


# ------------------------------------------------------------------------------------------ 6. reading


def test_6_the_endpoint_reads_only_while_its_loop_runs(raw_sock):
    text = section("When the endpoint reads")
    assert "Construction reads nothing" in text
    with worlds_and_endpoints(2) as (worlds, (rx, _tx)):
        key = worlds[0].keys[1]
        x = np.arange(500, dtype=np.float32)
        count = wire.chunk_count(x.nbytes, rx.stride)
        for i in range(count):
            raw_sock.sendto(chunk(rx, x, i, key, tag=3), rx.addresses[0])
        time.sleep(0.05)
        assert rx.stats()["datagrams"] == 0  # nothing read since construction: they wait in the kernel
        r = rx.recv_blocking(1, np.zeros_like(x), tag=3, timeout=2)
        assert r.complete and np.array_equal(r.array, x) and rx.stats()["datagrams"] == count
        raw_sock.sendto(chunk(rx, x, 0, key, tag=4), rx.addresses[0])
        time.sleep(0.05)
        assert rx.stats()["datagrams"] == count  # between blocking calls nothing reads either
        rx.run(asyncio.sleep(0.02))
        assert rx.stats()["datagrams"] == count + 1


# ------------------------------------------------------------------------------------------ 7. check_address


def documented_parameters(doc: str) -> set[str]:
    """Names in the numpydoc ``Parameters`` section of ``doc`` (``a, b : type`` lines)."""
    body = doc.split("Parameters\n    ----------\n", 1)[1]
    body = re.split(r"\n    \S[^\n]*\n    -{3,}\n", body)[0]
    names: set[str] = set()
    for line in body.splitlines():
        m = re.match(r"^    (\w[\w, ]*) :", line)
        if m:
            names.update(n.strip() for n in m.group(1).split(","))
    return names


def test_7_every_endpoint_parameter_is_documented():
    params = set(inspect.signature(Endpoint.__init__).parameters) - {"self"}
    assert "check_address" in params
    assert params <= documented_parameters(Endpoint.__doc__), params - documented_parameters(Endpoint.__doc__)


def test_7_check_address_refuses_a_valid_datagram_from_another_address(raw_sock):
    async def main():
        with worlds_and_endpoints(2, check_address=True) as (worlds, (rx, _tx)):
            x = np.arange(10, dtype=np.float32)
            await attach(rx)
            assert rx.check_address
            d = chunk(rx, x, 0, worlds[0].keys[1], tag=9)
            await inject(rx, raw_sock, [d])
            assert rx.stats()["rejected"]["rank"] == 1 and rx.counters().claimed[1].sum() == 1
            rx.check_address = False
            await inject(rx, raw_sock, [d])
            assert rx.stats()["rejected"]["rank"] == 1 and rx.stats()["pooled"] == 1

    run(main())


# ------------------------------------------------------------------------------------------ 8. burst


FRACTIONS = {"a half": 2, "a quarter": 4, "an eighth": 8}
FRACTION = "(" + "|".join(FRACTIONS) + ")"


def test_8_the_default_burst_is_what_the_documents_say():
    pacing, incast = section("Pacing"), section("Incast (many senders, one receiver)")
    m = re.search(rf"default burst of an endpoint .*? is {FRACTION} of the socket's receive buffer", pacing)
    assert m, pacing
    divisor = FRACTIONS[m.group(1)]
    doc = " ".join(Endpoint.__doc__.split())
    m2 = re.search(rf"burst_bytes : int or None Bytes a sender may run ahead of its rate; default {FRACTION} of", doc)
    assert m2 and FRACTIONS[m2.group(1)] == divisor, doc
    m3 = re.search(rf"window of `rcvbuf / \((\d) k\)`.*? windows add up to {FRACTION} of the receiver's buffer", incast)
    assert m3 and int(m3.group(1)) == FRACTIONS[m3.group(2)], incast
    with worlds_and_endpoints(2, buffer_bytes=4 << 20) as (_w, (ep, _other)):
        assert ep.burst_bytes == max(64 << 10, ep.rcvbuf // divisor)
        comm = Comm(ep, SimpleNamespace(rank=ep.rank, size=ep.size))  # the control channel is not used here
        for k in (1, 3, 16):
            rate, burst = comm.incast(k)  # what every many-to-one collective passes to Endpoint.send
            assert rate is None and burst == max(16 << 10, ep.rcvbuf // (int(m3.group(1)) * k))
            capped = Comm(ep, SimpleNamespace(rank=ep.rank, size=ep.size), ingest_bps=3e9)
            assert capped.incast(k) == (3e9 / k, burst)


# ------------------------------------------------------------------------------------------ 9. credits


def test_9_the_credit_constants_are_the_documents():
    incast = section("Incast (many senders, one receiver)")
    m = re.search(r"`CREDIT_WAIT` = (\d+(?:\.\d+)?) ms", incast)
    assert m and float(m.group(1)) / 1e3 == wire._core.CREDIT_WAIT_SECONDS, incast
    assert "grant is `min(count, hi + window)`" in incast and "a quarter window past the last grant" in incast
    assert "`kind = 3`, `index` = the grant, `length = 0`" in incast and wire.KIND_CREDIT == 3


def credits_from(raw: socket.socket, expect: int) -> list[bytes]:
    raw.settimeout(2)
    return [raw.recv(65536) for _ in range(expect)]


def test_9_the_receiver_grants_a_quarter_window_at_a_time(raw_sock):
    """Chunks 0..99 of a 1000-chunk message, window 64: grants 80, 96, ..., 160 (each a quarter window past the last,
    the first window being implicit), then 565 for a lone chunk 500 (indices, not arrivals), then 1000 (the end)."""
    async def main():
        with worlds_and_endpoints(2) as (worlds, (rx, _tx)):
            key = worlds[0].keys[1]
            rx.readmit(1, raw_sock.getsockname(), key)  # rank 1 is now our spy socket: rx's credits come here
            x = np.arange(rx.stride // 4 * 1000, dtype=np.float32)
            count = wire.chunk_count(x.nbytes, rx.stride)
            fut = rx.irecv(1, np.zeros_like(x), tag=3, timeout=5, credit_bytes=64 * rx.stride)
            await inject(rx, raw_sock, [chunk(rx, x, i, key, tag=3) for i in range(100)])
            await inject(rx, raw_sock, [chunk(rx, x, 500, key, tag=3), chunk(rx, x, 999, key, tag=3)])
            got = credits_from(raw_sock, 8)
            heads = [wire.Header.unpack(d) for d in got]
            assert [h.index for h in heads] == [80, 96, 112, 128, 144, 160, 565, 1000]
            for d, h in zip(got, heads, strict=True):
                assert (h.kind, h.src, h.tag, h.tensor_id, h.count, h.length, h.stride, h.dtype) == (
                    wire.KIND_CREDIT, 0, 3, 0, count, 0, rx.stride, F32)
                assert len(d) == wire.HEADER_SIZE + wire.MAC_SIZE and d[-16:] == wire.mac(key, d[:-16])
            assert rx.stats()["credits_sent"] == 8
            fut.cancel()

    run(main())


def test_9_a_sender_waits_for_its_grant_or_grants_itself_a_quarter_window(raw_sock):
    """Window 64 of 1000 chunks to a spy that grants 200 once: the sender stops at its grant each time, and, with no
    further credit, goes on a quarter window (16 chunks) per ``CREDIT_WAIT``: every chunk is sent, in order."""
    async def main():
        with worlds_and_endpoints(2) as (worlds, (tx, _rx)):
            key = worlds[0].keys[1]
            tx.readmit(1, raw_sock.getsockname(), key)
            x = np.arange(tx.stride // 4 * 1000, dtype=np.float32)
            raw_sock.setblocking(False)
            raw_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            loop = asyncio.get_running_loop()
            seen: list[int] = []

            async def spy() -> None:
                while len(seen) < 1000:
                    h = wire.Header.unpack(await loop.sock_recv(raw_sock, 65536))
                    if h.kind == wire.KIND_DATA:
                        seen.append(h.index)

            reader = asyncio.ensure_future(spy())
            send = asyncio.ensure_future(tx.send(1, x, tag=4, credit_bytes=64 * tx.stride))
            await wait_until(lambda: len(seen) >= 64, what="the first window")
            stopped = len(seen)
            # the sender stopped at its grant (a loaded machine may have waited out CREDIT_WAIT already)
            assert stopped <= 64 + 16 * tx.stats()["credit_timeouts"]
            grant = wire.pack_datagram(wire.Header.credit(1, 4, 0, 200, 1000, tx.stride), b"", key)
            raw_sock.sendto(grant, tx.addresses[0])
            sent = await asyncio.wait_for(send, 10)
            await asyncio.wait_for(reader, 10)
            assert seen == list(range(1000)) and sent.datagrams == 1000
            st = tx.stats()
            assert st["credits_received"] == 1
            # the 800 chunks after the grant of 200 are self-granted 16 at a time; waits before it count too
            assert 50 <= st["credit_timeouts"] <= 50 + (200 - 64) // 16

    run(main())
