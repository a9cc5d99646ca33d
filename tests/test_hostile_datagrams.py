"""Hostile datagrams (docs/protocol.md, "Validation on receive") aimed at a receiver with a posted receive.

Rank 0 receives from rank 1 into a buffer pre-filled with a sentinel; an attacker sends crafted datagrams
from a plain UDP socket (and, for the "other rank" cases, signs them with the pair key that rank 2 really
shares with rank 0). Every datagram must be dropped before a byte is written, counted under the right
reason, and a legitimate message sent right after must still arrive intact.

The receiver runs its private event loop (``Endpoint.run``) only while we wait for it to read, so the
test is synchronous and hypothesis can drive it directly.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import numpy as np
import pytest
from conftest import bits, wait_until, worlds_and_endpoints
from hypothesis import given, settings
from hypothesis import strategies as st

from lossympi import wire
from lossympi.wire import Header

F32 = wire.DTYPE_CODES["float32"]
REASONS = wire.REJECT_REASONS


class Harness:
    """Receiver rank 0, legitimate sender rank 1, attacker holding rank 2's keys."""

    def __init__(self, raw: socket.socket, **kwargs) -> None:
        self._cm = worlds_and_endpoints(3, **kwargs)
        worlds, (self.rx, self.tx, self.other) = self._cm.__enter__()
        self.key = worlds[0].keys[1]  # shared by 0 and 1
        self.other_key = worlds[2].keys[0]  # shared by 0 and 2: the attacker's own pair key
        self.raw = raw
        self.addr = self.rx.addresses[0]
        self.stride = self.rx.stride
        self.fut = None

    def close(self) -> None:
        self._cm.__exit__(None, None, None)

    # ---------------------------------------------------------------- messages
    def exchange(self, x: np.ndarray, tag: int, tensor_id: int = 0) -> None:
        """A legitimate message 1 -> 0 that completes (and makes older tags stale)."""
        self.tx.send_blocking(0, x, tag=tag, tensor_id=tensor_id)
        r = self.rx.recv_blocking(1, np.zeros_like(x), tag=tag, tensor_id=tensor_id, timeout=5)
        assert r.complete

    def post(self, n: int, tag: int, dtype=np.float32) -> None:
        self.sentinel = np.full(n, -12345, dtype)
        self.out = self.sentinel.copy()
        self.tag = tag
        self.count = wire.chunk_count(self.out.nbytes, self.stride)

        async def _post():
            return self.rx.irecv(1, self.out, tag=tag, timeout=60, fill="zero")

        self.fut = self.rx.run(_post())

    def finish(self, x: np.ndarray) -> None:
        """Send the legitimate message of the posted receive; it must arrive intact."""
        self.assert_untouched()
        self.tx.send_blocking(0, x, tag=self.tag)
        r = self.rx.run(self.fut)
        assert r.complete and r.duplicate == 0 and r.received == self.count
        assert np.array_equal(bits(self.out), bits(x))

    # ---------------------------------------------------------------- datagrams
    def header(self, index: int = 0, **fields) -> Header:
        length = self.stride if index + 1 < self.count else self.out.nbytes - self.stride * (self.count - 1)
        base = dict(src=1, tag=self.tag, tensor_id=0, index=index, count=self.count, length=length,
                    stride=self.stride, dtype=F32)
        base.update(fields)
        return Header(**base)

    def payload(self, h: Header) -> bytes:
        return os.urandom(h.length)

    def signed(self, key: bytes | None = None, payload: bytes | None = None, **fields) -> bytes:
        h = self.header(**fields)
        return wire.pack_datagram(h, self.payload(h) if payload is None else payload,
                                  self.key if key is None else key)

    def inject(self, datagrams: list[bytes]) -> None:
        """Send raw datagrams and wait until the receiver has read every one of them."""
        n0 = self.read()
        for d in datagrams:
            self.raw.sendto(d, self.addr)
        self.rx.run(wait_until(lambda: self.read() >= n0 + len(datagrams), what="datagrams"))
        assert self.read() == n0 + len(datagrams)

    def read(self) -> int:
        """Datagrams the receiver has read from its socket."""
        return self.rx.stats()["datagrams"]

    def counters(self) -> dict[str, int]:
        st = self.rx.stats()
        c = dict(st["rejected"])
        c.update(stale=st["stale"], pooled=st["pooled"], accepted=st["accepted"], duplicates=st["duplicates"])
        c["from1"] = int(self.rx.counters().claimed[1].sum())  # rejects whose header claims rank 1
        return c

    def assert_untouched(self) -> None:
        assert np.array_equal(bits(self.out), bits(self.sentinel)), "a hostile datagram wrote the buffer"
        assert self.fut is not None and not self.fut.done()


@pytest.fixture
def harness(raw_sock):
    h = Harness(raw_sock)
    yield h
    h.close()


def legit(h: Harness, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.standard_normal(h.out.size).astype(dtype)


# ------------------------------------------------------------------------------------------ named cases


def patch(d: bytes, offset: int, new: bytes) -> bytes:
    return d[:offset] + new + d[offset + len(new):]


def cases(h: Harness, replay: bytes) -> list[tuple[str, Callable[[], bytes], str, bool]]:
    """(name, datagram factory, expected counter, attributed to rank 1)."""
    last = h.count - 1
    full = h.signed()
    random_key = os.urandom(32)

    def with_header(**fields) -> bytes:  # valid MAC over a bad header: an attacker cannot do better
        return h.signed(**fields)

    def raw_header(**fields) -> bytes:
        hd = h.header(**fields)
        return hd.pack() + os.urandom(hd.length) + os.urandom(16)

    return [
        ("empty", lambda: b"", "short", False),
        ("one byte", lambda: b"\x01", "short", False),
        ("31 bytes", lambda: full[:31], "short", False),
        ("version 0", lambda: with_header(version=0), "header", True),
        ("version 1 (the BLAKE2b MAC of old peers)", lambda: with_header(version=1), "header", True),
        ("kind 0", lambda: with_header(kind=0), "header", True),
        ("kind 2", lambda: with_header(kind=2), "header", True),
        ("flag bit 1", lambda: with_header(flags=3), "header", True),
        ("flags 0xff", lambda: with_header(flags=0xFF), "header", True),
        ("flag bit 7 only", lambda: with_header(flags=0x80), "header", True),
        ("reserved tag 2**64-1", lambda: with_header(tag=wire.RESERVED_TAG), "header", True),
        ("FIN with index 1", lambda: with_header(kind=wire.KIND_FIN, index=1, length=0), "header", True),
        ("bad version, no rank", lambda: with_header(version=1, src=7), "header", False),
        ("unknown rank 3", lambda: with_header(src=3), "rank", False),
        ("unknown rank 2**32-1", lambda: with_header(src=0xFFFFFFFF), "rank", False),
        ("shorter than header says", lambda: full[:32 + 100], "size", True),
        ("header only, says full chunk", lambda: full[:32], "size", True),
        ("MAC flag but no MAC", lambda: full[:-16], "size", True),
        ("trailing garbage", lambda: full + b"\x00", "size", True),
        ("length field lies (smaller)", lambda: patch(full, 28, (10).to_bytes(2, "little")), "size", True),
        ("length field lies (bigger)", lambda: patch(full, 28, (h.stride + 16).to_bytes(2, "little")),
         "size", True),
        ("length 0xffff", lambda: patch(full, 28, b"\xff\xff"), "size", True),
        ("random header, random MAC", lambda: raw_header(), "mac", True),
        ("forged MAC", lambda: full[:-16] + os.urandom(16), "mac", True),
        ("zero MAC", lambda: full[:-16] + bytes(16), "mac", True),
        ("payload bit flipped", lambda: full[:40] + bytes([full[40] ^ 1]) + full[41:], "mac", True),
        ("header bit flipped (tag)", lambda: full[:8] + bytes([full[8] ^ 2]) + full[9:], "mac", True),
        ("wrong key", lambda: h.signed(key=random_key), "mac", True),
        ("other rank's key, src=1", lambda: h.signed(key=h.other_key), "mac", True),
        ("claims the receiver's own rank", lambda: h.signed(key=h.other_key, src=0), "mac", False),
        ("auth-off datagram", lambda: wire.pack_datagram(h.header(flags=0), os.urandom(h.stride), None),
         "mac", True),
        ("index == count", lambda: with_header(index=h.count, length=h.stride), "shape", True),
        ("index 2**32-1", lambda: with_header(index=0xFFFFFFFF, length=h.stride), "shape", True),
        ("count + 1", lambda: with_header(count=h.count + 1), "shape", True),
        ("count 1", lambda: with_header(count=1), "shape", True),
        ("stride - 16", lambda: with_header(stride=h.stride - 16), "shape", True),
        ("stride 0", lambda: with_header(stride=0), "shape", True),
        ("dtype float64", lambda: with_header(dtype=wire.DTYPE_CODES["float64"]), "shape", True),
        ("dtype int32", lambda: with_header(dtype=wire.DTYPE_CODES["int32"]), "shape", True),
        ("dtype 0", lambda: with_header(dtype=0), "shape", True),
        ("short first chunk", lambda: with_header(length=h.stride - 4), "shape", True),
        ("empty first chunk", lambda: with_header(length=0), "shape", True),
        ("full-length last chunk", lambda: with_header(index=last, length=h.stride), "shape", True),
        ("bigger than a datagram", lambda: with_header(length=2000), "shape", True),
        ("replayed old tag", lambda: replay, "stale", False),
        ("completed tag, fresh chunk", lambda: with_header(tag=h.tag - 1), "stale", False),
    ]


def test_named_hostile_datagrams(harness: Harness):
    h = harness
    n = 3 * (h.stride // 4) + 5  # 4 chunks, the last one short
    old = np.arange(n, dtype=np.float32)
    h.exchange(old, tag=0)
    # the datagram of chunk 1 of the completed message, exactly as the sender built it
    hdr = Header(src=1, tag=0, tensor_id=0, index=1, count=4, length=h.stride, stride=h.stride, dtype=F32)
    replay = wire.pack_datagram(hdr, old.view(np.uint8)[h.stride:2 * h.stride].tobytes(), h.key)
    h.post(n, tag=1)
    assert h.count == 4
    for name, make, reason, attributed in cases(h, replay):
        before = h.counters()
        h.inject([make()])
        after = h.counters()
        delta = {k: after[k] - before[k] for k in after}
        want = {k: 0 for k in delta}
        want[reason] = 1
        want["from1"] = int(attributed and reason in REASONS)
        assert delta == want, name
        h.assert_untouched()
    h.finish(legit(h))


def test_other_rank_with_its_own_key_is_not_rank_1(harness: Harness):
    """Rank 2 may talk to rank 0 with its own key, but never into a receive posted for rank 1."""
    h = harness
    h.post(1000, tag=0)
    before = h.counters()
    h.inject([h.signed(key=h.other_key, src=2, index=i) for i in range(h.count)])
    after = h.counters()
    assert after["pooled"] - before["pooled"] == h.count  # authentic, just not for this receive
    assert sum(after[r] for r in REASONS) == sum(before[r] for r in REASONS)
    h.finish(legit(h))


def test_pooled_datagrams_are_checked_before_delivery(harness: Harness):
    """Authentic datagrams of a future tag with a bad shape wait in the pool, then fail step 7."""
    h = harness
    h.post(10, tag=0)  # a dummy receive, only to fix the geometry used by h.header
    x = legit(h)
    h.fut.cancel()
    h.rx.run(wait_until(lambda: not h.rx._pending, what="cancel"))
    bad = [
        h.signed(tag=5, count=2),
        h.signed(tag=5, dtype=wire.DTYPE_CODES["int32"]),
        h.signed(tag=5, stride=16),
        h.signed(tag=5, length=8),
        h.signed(tag=5, index=1),
    ]
    h.inject(bad)
    assert h.rx.stats()["pool_in_use"] == len(bad)
    before = h.counters()
    h.post(10, tag=5)
    after = h.counters()
    assert after["shape"] - before["shape"] == len(bad) and after["accepted"] == before["accepted"]
    assert h.rx.stats()["pool_in_use"] == 0
    h.finish(x)


def test_address_check_rejects_spoofed_source(raw_sock):
    h = Harness(raw_sock, check_address=True)
    try:
        h.post(5000, tag=0)
        before = h.counters()
        h.inject([h.signed(index=i) for i in range(h.count)])  # right key, wrong address
        after = h.counters()
        assert after["rank"] - before["rank"] == h.count and after["from1"] - before["from1"] == h.count
        h.finish(legit(h))
    finally:
        h.close()


def test_auth_off_endpoint_still_validates_the_header(raw_sock):
    h = Harness(raw_sock, auth=False)
    try:
        h.post(5000, tag=0)
        before = h.counters()
        unsigned = [
            wire.pack_datagram(h.header(flags=0, version=1), b"\0" * h.stride, None),
            wire.pack_datagram(h.header(flags=0, src=9), b"\0" * h.stride, None),
            wire.pack_datagram(h.header(flags=0), b"\0" * 100, None),
            wire.pack_datagram(h.header(flags=0, index=h.count, length=h.stride), b"\0" * h.stride, None),
        ]
        h.inject(unsigned)
        after = h.counters()
        assert [after[r] - before[r] for r in ("header", "rank", "size", "shape")] == [1, 1, 1, 1]
        h.finish(legit(h))
    finally:
        h.close()


# ------------------------------------------------------------------------------------------ hypothesis

random_datagrams = st.one_of(
    st.binary(max_size=1600),
    # a plausible header (version 1, DATA) with random fields, then random bytes
    st.tuples(
        st.integers(0, 1), st.integers(0, 5), st.integers(0, 0xFFFFFFFFFFFFFFFF), st.integers(0, 3),
        st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
        st.integers(0, 255), st.binary(max_size=1500),
    ).map(lambda t: Header(src=t[1], tag=t[2], tensor_id=t[3], index=t[4], count=t[5], length=t[6],
                           stride=t[7], dtype=t[8], flags=t[0]).pack() + t[9]),
)


def test_random_datagrams(harness: Harness):
    h = harness
    h.exchange(np.ones(10, np.float32), tag=0)
    h.post(3 * (h.stride // 4) + 1, tag=1)

    seen = []

    @settings(max_examples=300, deadline=None, database=None)
    @given(random_datagrams)
    def one(d: bytes):
        seen.append(len(d))
        before = h.counters()
        h.inject([d])
        after = h.counters()
        assert sum(after[r] - before[r] for r in REASONS) == 1
        assert after["accepted"] == before["accepted"] and after["pooled"] == before["pooled"]
        h.assert_untouched()

    one()
    assert len(seen) >= 300 and h.read() >= 300
    h.finish(legit(h))


def test_mutated_datagrams(harness: Harness):
    h = harness
    h.exchange(np.ones(10, np.float32), tag=0)
    h.post(3 * (h.stride // 4) + 1, tag=1)
    # one valid datagram per chunk, never sent as is
    valid = [h.signed(index=i) for i in range(h.count)]
    seen: list[str] = []

    @settings(max_examples=200, deadline=None, database=None)
    @given(st.integers(0, h.count - 1), st.data())
    def unsigned_mutation(index: int, data):
        """Bytes changed after signing: the attacker does not know the key."""
        seen.append("unsigned")
        d = bytearray(valid[index])
        positions = data.draw(st.lists(st.integers(0, len(d) - 1), min_size=1, max_size=4, unique=True))
        for p in positions:
            d[p] ^= data.draw(st.integers(1, 255))
        before = h.counters()
        h.inject([bytes(d)])
        after = h.counters()
        assert sum(after[r] - before[r] for r in REASONS) == 1
        assert after["accepted"] == before["accepted"] and after["pooled"] == before["pooled"]
        h.assert_untouched()

    @settings(max_examples=200, deadline=None, database=None)
    @given(
        st.integers(0, h.count - 1),
        st.fixed_dictionaries({}, optional={
            "dtype": st.integers(0, 255).filter(lambda v: v != F32),
            "count": st.integers(0, 0xFFFFFFFF).filter(lambda v: v != h.count),
            "stride": st.integers(0, 0xFFFF).filter(lambda v: v != h.stride),
            "length": st.integers(0, 4000),
            "index_past_end": st.integers(h.count, 0xFFFFFFFF),
        }).filter(bool),
    )
    def signed_mutation(index: int, fields: dict):
        """A key holder's malformed datagrams for the posted message: step 7 rejects them."""
        if "index_past_end" in fields:
            index = fields.pop("index_past_end")
            fields.setdefault("length", h.stride)
        hd = h.header(index=index, **fields)
        good = h.header(index=index) if index < h.count else None
        if hd == good:  # the mutation happened to produce a valid datagram: nothing to test
            return
        seen.append("signed")
        d = wire.pack_datagram(hd, os.urandom(hd.length), h.key)
        before = h.counters()
        h.inject([d])
        after = h.counters()
        assert after["shape"] - before["shape"] == 1
        assert after["accepted"] == before["accepted"]
        h.assert_untouched()

    unsigned_mutation()
    signed_mutation()
    assert seen.count("unsigned") >= 200 and seen.count("signed") >= 150
    h.finish(legit(h))
