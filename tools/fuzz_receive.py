#!/usr/bin/env python3
"""Fuzz lossympi's receive path with hostile datagrams (issue #7, item 2).

  python tools/fuzz_receive.py --datagrams 1000000 --seed 1 --json-out docs/reliability/fuzz.json
  python tools/fuzz_receive.py --sanitize --datagrams 1000000 --seed 2 --json-out docs/reliability/fuzz-sanitized.json

The target is live: three real :class:`lossympi.endpoint.Endpoint` objects on 127.0.0.1 (rank 0 receives, ranks 1
and 2 are its legitimate peers), with receives posted into buffers that start as a sentinel pattern. The fuzzer
sends datagrams over real UDP sockets: from the peers' own sockets (so that they pass the address check and reach
the deeper checks), and from attacker sockets on other addresses. Classes (counted in the report):

- ``random``: uniformly random bytes of a random length in 0..65507 (half of them under 2 KiB, some behind a
  plausible version/kind/flags prefix so that they reach the later checks);
- ``mutated``: valid authenticated datagrams with bits flipped or bytes overwritten anywhere (header, payload,
  MAC), or spliced from two datagrams, never re-signed;
- ``header_fields``: one header field (version, kind, dtype, flags, src, tag, tensor id, index, count, length,
  stride) overwritten with a boundary value; half re-signed with the right pair key (what a Byzantine peer can
  send), half with a stale MAC; for ``length`` also with the payload resized to match;
- ``truncated``: every prefix of a valid datagram (DATA, short last chunk, FIN): header only, shorter than a
  header, MAC cut;
- ``oversized``: a payload longer than the stride, up to 65507 bytes in all, consistent length field, MAC
  valid or not, for the open, a stale or a future tag;
- ``spoofed``: a valid MAC under a different pair's key with a claimed source, the right key with a wrong
  claimed source, a random key, and exact valid datagrams (and re-signed ones) from an address that is not the
  peer's (the receiver's address check is switched on and off between rounds);
- ``replay``: exact datagrams (DATA and FIN) of messages already completed;
- ``fin``: FIN variants: with a payload, a non-zero length field, no MAC, a flipped MAC, a wrong shape, stale,
  for a future tag, and valid ones for open and future receives;
- ``gso``: several datagrams in one UDP GSO send (the receiver, with UDP GRO, gets them as one buffer that the
  core splits), mixing valid chunks, mutations, random bytes and tiny segments;
- ``valid``: real valid datagrams interleaved with the rest: chunks of the open receives (with duplicates), early
  chunks of the next round's messages (they wait in the unexpected-datagram pool), FINs.

Every round also completes each posted receive with a real ``Endpoint.send`` from its peer.

The oracle is a reference receiver written from docs/protocol.md ("Validation on receive"): every datagram is
classified before it is sent (reject reason, stale, duplicate, accepted, pooled, overflow, FIN) and the model
applies it to its own copy of the receiver state (posted buffers, bitmaps, completed tags, unexpected pool with
the core's entry order and per-peer quota). After every batch the fuzzer waits until the receiver has read all of
it and checks: every counter of the live core equals the model's (per reason, per peer), every posted buffer is
byte-identical to the model's (the sentinel everywhere no accepted datagram wrote; there, that datagram's
payload, which with authentication on is always the sent message), and after every round each receive completes
with exactly the sent bytes. Datagrams that the model says would be *valid* writes of other data (a re-signed
header that happens to be a well-formed chunk of another index, say: what a key holder may legitimately send)
or would complete a receive mid-batch are not sent, and counted as ``skipped_valid``. A second target runs with
authentication off (``--auth-off-share``), where only the header checks protect the buffers, so that random
headers reach the copy into user memory (the interesting part for the sanitizers).

``--sanitize`` builds ``cython_src/_core.pyx`` with AddressSanitizer and UndefinedBehaviorSanitizer into
``out/sanitize/`` (see ``tools/sanitize_build.py``; the installed ``lossympi/_core*.so`` is never touched), checks
that the sanitizers are live, then runs this fuzzer against that build in a subprocess and fails on any
sanitizer report. Exit status 0 when every invariant held, 1 otherwise; the JSON report names the first
violations and, on a mismatch, the batch that caused it (``failure_batch``).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import platform
import random
import select
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lossympi import wire
from lossympi.bootstrap import local_worlds
from lossympi.endpoint import SOL_UDP, UDP_SEGMENT, Endpoint, RecvResult

__all__ = [
    "CLASSES",
    "Fuzzer",
    "Target",
    "new_report",
    "FIELDS",
    "Model",
    "Outcome",
    "field_value",
    "mutate",
    "run_fuzz",
    "set_field",
]

HDR = wire.HEADER
HEADER_BYTES = wire.HEADER_SIZE
MAC_BYTES = wire.MAC_SIZE
KIND_DATA = wire.KIND_DATA
KIND_FIN = wire.KIND_FIN
KIND_CREDIT = wire.KIND_CREDIT
MAX_UDP = wire.MAX_DATAGRAM_BYTES
REASONS = wire.REJECT_REASONS
#: Counters of the live core that the model predicts exactly.
COUNTERS = REASONS + ("stale", "duplicate", "accepted", "pooled", "overflow", "fin", "credit")
CLASSES = ("random", "mutated", "header_fields", "truncated", "oversized", "spoofed", "replay", "fin", "gso", "valid")
#: Share of the fuzzed datagrams per class (the generator keeps the running mix close to it).
CLASS_SHARE = {
    "random": 0.10, "mutated": 0.18, "header_fields": 0.20, "truncated": 0.08, "oversized": 0.05,
    "spoofed": 0.10, "replay": 0.05, "fin": 0.08, "gso": 0.06, "valid": 0.10,
}
#: Header fields: name -> (byte offset, struct format).
FIELDS: dict[str, tuple[int, str]] = wire.FIELDS
#: Tags of the messages the fuzzer posts are multiples of this; the tags in between are never posted.
TAG_STEP = 16
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- datagram bytes


def field_value(d: bytes, name: str) -> int:
    """Header field ``name`` of datagram ``d`` (which must hold a whole header)."""
    off, fmt = FIELDS[name]
    return struct.unpack_from(fmt, d, off)[0]


def set_field(d: bytes, name: str, value: int) -> bytes:
    """``d`` with header field ``name`` set to ``value`` (truncated to the field's width); MAC untouched."""
    off, fmt = FIELDS[name]
    width = struct.calcsize(fmt)
    if len(d) < off + width:
        return d
    return d[:off] + struct.pack(fmt, value & ((1 << (8 * width)) - 1)) + d[off + width:]


def mutate(d: bytes, ops: Iterable[tuple]) -> bytes:
    """Apply mutation operations to a datagram, in order, without re-signing it.

    Operations: ``("flip", pos, mask)`` xors byte ``pos % len`` with ``mask``; ``("set", pos, byte)`` overwrites a
    byte; ``("field", name, value)`` overwrites a header field (see :data:`FIELDS`); ``("truncate", n)`` keeps the
    first ``n`` bytes; ``("append", data)`` adds bytes at the end; ``("splice", pos, other)`` keeps ``d[:pos]``
    followed by ``other[pos:]``.
    """
    b = bytearray(d)
    for op in ops:
        kind = op[0]
        if kind == "flip":
            if b:
                b[op[1] % len(b)] ^= op[2] & 0xFF
        elif kind == "set":
            if b:
                b[op[1] % len(b)] = op[2] & 0xFF
        elif kind == "field":
            b = bytearray(set_field(bytes(b), op[1], op[2]))
        elif kind == "truncate":
            del b[max(0, op[1]):]
        elif kind == "append":
            b += op[1]
        elif kind == "splice":
            b = b[: op[1]] + bytearray(op[2][op[1]:])
        else:
            raise ValueError(f"unknown mutation {kind!r}: use flip, set, field, truncate, append or splice")
    return bytes(b)


def resign(d: bytes, key: bytes) -> bytes:
    """Recompute the MAC trailer of ``d`` (its last 16 bytes) with ``key``: what a holder of the key can send."""
    return d[:-MAC_BYTES] + wire.mac(key, d[:-MAC_BYTES])


# ---------------------------------------------------------------------------------------------- reference model


@dataclass
class SlotModel:
    """One posted receive (or one planned for a later round), as the reference receiver sees it."""

    src: int
    tag: int
    tid: int
    dtype: int
    nbytes: int
    count: int
    stride: int
    truth: bytes  # what the legitimate sender sends
    sentinel: bytes  # what the buffer holds before any datagram
    buf: bytearray = field(init=False)
    bits: bytearray = field(init=False)
    nrecv: int = 0
    fin: bool = False
    out: np.ndarray | None = None  # the live buffer (posted receives only)
    future: Any = None
    rejects0: list[int] = field(default_factory=list)  # the sender's claimed rejects by reason at the post

    def __post_init__(self) -> None:
        self.buf = bytearray(self.sentinel)
        self.bits = bytearray(self.count)

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.src, self.tid, self.tag)

    def chunk_len(self, index: int) -> int:
        return self.stride if index + 1 < self.count else self.nbytes - self.stride * (self.count - 1)

    def chunk(self, index: int) -> bytes:
        return self.truth[index * self.stride: index * self.stride + self.chunk_len(index)]


@dataclass(frozen=True)
class Outcome:
    """What the reference receiver does with one datagram: ``kind`` is a counter of :data:`COUNTERS`."""

    kind: str
    src: int | None = None  # the rank the core charges a reject, stale or overflow to (the header's src, if a rank)
    sender: int | None = None  # for rejects: the rank that really sent it (its address; its MAC for shape)
    slot: SlotModel | None = None
    index: int = -1
    completes: bool = False


class Model:
    """Reference receiver: docs/protocol.md's validation, matching, pool and counters, in Python.

    Parameters
    ----------
    nranks, rank : int
        World size and the receiver's rank.
    keys : dict[int, bytes]
        Pair keys the receiver holds (peer -> 32-byte key).
    addresses : sequence of (host, port)
        Registered UDP address of every rank.
    auth : bool
        Whether the receiver authenticates datagrams.
    datagram_bytes : int
        The receiver's datagram size (it fixes the stride and the size of a pool entry).
    unexpected_bytes : int
        Size of the receiver's unexpected-datagram pool.
    """

    def __init__(self, nranks: int, rank: int, keys: dict[int, bytes], addresses: Sequence[tuple[str, int]], *,
                 auth: bool, datagram_bytes: int, unexpected_bytes: int) -> None:
        self.nranks = nranks
        self.rank = rank
        self.keys = dict(keys)
        self.addresses = [(str(h), int(p)) for h, p in addresses]
        self.auth = auth
        self.check_address = False
        self.stride = wire.stride_for(datagram_bytes)
        self.pool_entry = datagram_bytes
        self.pool_n = max(16, unexpected_bytes // datagram_bytes)
        self.quota = max(16, self.pool_n // max(1, nranks - 1))
        self.free = list(range(self.pool_n - 1, -1, -1))  # the core's free-entry stack (pop from the end)
        self.entries: dict[int, tuple[tuple[int, int, int], bytes]] = {}
        self.by_msg: dict[tuple[int, int, int], list[int]] = {}
        self.per_src = [0] * nranks
        self.slots: dict[tuple[int, int, int], SlotModel] = {}
        self.completed: dict[tuple[int, int], int] = {}
        self.counters: Counter[str] = Counter()
        self.rejected_src = [[0] * len(REASONS) for _ in range(nranks)]  # by the claimed rank, then by reason
        self.stale_src = [0] * nranks
        self.overflow_src = [0] * nranks
        self.rejected_sender = [[0] * len(REASONS) for _ in range(nranks + 1)]  # row nranks: no rank's address
        self.rank_of_addr = {a: r for r, a in enumerate(self.addresses)}
        self.datagrams = 0

    # -------------------------------------------------------------------------------------------- prediction
    def _slot_outcome(self, slot: SlotModel, d: bytes, kind: int, dtype: int, index: int, count: int, length: int,
                      stride: int) -> Outcome:
        """Step 7 for a datagram of ``slot``'s message."""
        if kind == KIND_FIN:
            if dtype != slot.dtype or count != slot.count or stride != slot.stride:
                return Outcome("shape", slot.src, sender=slot.src)
            return Outcome("fin", slot=slot)
        if dtype != slot.dtype or count != slot.count or stride != slot.stride or index >= count:
            return Outcome("shape", slot.src, sender=slot.src)
        if length != slot.chunk_len(index):
            return Outcome("shape", slot.src, sender=slot.src)
        if slot.bits[index]:
            return Outcome("duplicate", slot=slot, index=index)
        return Outcome("accepted", slot=slot, index=index, completes=slot.nrecv + 1 == slot.count)

    def predict(self, d: bytes, addr: tuple[str, int]) -> Outcome:
        """Classify datagram ``d`` arriving from ``addr`` without changing the model."""
        n = len(d)
        snd = self.rank_of_addr.get(addr, self.nranks)  # who really sent it (the core's rejects_by_sender)
        if n < HEADER_BYTES:
            return Outcome("short", sender=snd)
        version, kind, dtype, flags, src, tag, tid, index, count, length, stride = HDR.unpack_from(d)
        claim = src if src < self.nranks else None  # charged whatever check fails
        if (version != wire.PROTOCOL_VERSION or kind not in (KIND_DATA, KIND_FIN, KIND_CREDIT)
                or flags & ~wire.FLAG_MAC or tag == wire.RESERVED_TAG
                or (kind == KIND_FIN and (length != 0 or index != 0))
                or (kind == KIND_CREDIT and (length != 0 or index > count))):
            return Outcome("header", claim, sender=snd)
        if claim is None:
            return Outcome("rank", sender=snd)
        if self.check_address and addr != self.addresses[src]:
            return Outcome("rank", src, sender=snd)
        maclen = MAC_BYTES if flags & wire.FLAG_MAC else 0
        if HEADER_BYTES + length + maclen != n:
            return Outcome("size", src, sender=snd)
        if self.auth:
            key = self.keys.get(src)
            if maclen == 0 or key is None:
                return Outcome("mac", src, sender=snd)
            if not hmac.compare_digest(wire.mac(key, d[: n - MAC_BYTES]), d[n - MAC_BYTES:]):
                return Outcome("mac", src, sender=snd)
        if kind == KIND_CREDIT:  # for one of this rank's sends; this receiver sends nothing: dropped, counted
            return Outcome("credit")
        slot = self.slots.get((src, tid, tag))
        if slot is not None:
            return self._slot_outcome(slot, d, kind, dtype, index, count, length, stride)
        done = self.completed.get((src, tid))
        if done is not None and tag <= done:
            return Outcome("fin") if kind == KIND_FIN else Outcome("stale", src)
        if n > self.pool_entry or not self.free or self.per_src[src] >= self.quota:
            return Outcome("overflow", src)
        return Outcome("pooled", src)

    def drain_outcome(self, planned: SlotModel, d: bytes) -> Outcome:
        """What a datagram waiting in the pool will do when ``planned`` is posted (bitmap as of now)."""
        _v, kind, dtype, _f, _s, _t, _i, index, count, length, stride = HDR.unpack_from(d)
        return self._slot_outcome(planned, d, kind, dtype, index, count, length, stride)

    # -------------------------------------------------------------------------------------------- state changes
    def apply(self, out: Outcome, d: bytes) -> None:
        """Record the effect of a datagram classified as ``out`` (by :meth:`predict` on the current state)."""
        self.counters[out.kind] += 1
        if out.kind in REASONS:
            if out.src is not None:
                self.rejected_src[out.src][REASONS.index(out.kind)] += 1
            self.rejected_sender[out.sender][REASONS.index(out.kind)] += 1
        elif out.kind == "overflow":
            self.overflow_src[out.src] += 1
        elif out.kind == "stale":
            self.stale_src[out.src] += 1
        elif out.kind == "accepted":
            s = out.slot
            length = len(d) - HEADER_BYTES - (MAC_BYTES if d[3] & wire.FLAG_MAC else 0)
            s.buf[out.index * s.stride: out.index * s.stride + length] = d[HEADER_BYTES: HEADER_BYTES + length]
            s.bits[out.index] = 1
            s.nrecv += 1
        elif out.kind == "fin" and out.slot is not None:
            out.slot.fin = True
        elif out.kind == "pooled":
            src, tag, tid = field_value(d, "src"), field_value(d, "tag"), field_value(d, "tensor_id")
            e = self.free.pop()
            self.entries[e] = ((src, tid, tag), d)
            self.by_msg.setdefault((src, tid, tag), []).append(e)
            self.per_src[src] += 1

    def receive(self, d: bytes, addr: tuple[str, int]) -> Outcome:
        """Predict and apply one arriving datagram."""
        self.datagrams += 1
        out = self.predict(d, addr)
        self.apply(out, d)
        return out

    def _release(self, e: int) -> None:
        (key, _d) = self.entries.pop(e)
        self.per_src[key[0]] -= 1
        self.free.append(e)
        lst = self.by_msg[key]
        lst.remove(e)
        if not lst:
            del self.by_msg[key]

    def post(self, slot: SlotModel) -> None:
        """A receive is posted: it takes its pooled datagrams in the core's order (pool entry index)."""
        self.slots[slot.key] = slot
        slot.rejects0 = list(self.rejected_src[slot.src])
        for e in sorted(self.by_msg.get(slot.key, [])):
            d = self.entries[e][1]
            self.apply(self.drain_outcome(slot, d), d)
            self._release(e)

    def close(self, slot: SlotModel) -> None:
        """A receive completes: its tag becomes the completed one and older pooled datagrams are purged."""
        del self.slots[slot.key]
        flow = (slot.src, slot.tid)
        self.completed[flow] = max(self.completed.get(flow, -1), slot.tag)
        for e in sorted(e for (s, t, g), es in self.by_msg.items() if (s, t) == flow and g <= slot.tag for e in es):
            self._release(e)
            self.counters["stale"] += 1
            self.stale_src[slot.src] += 1

    def snapshot(self) -> dict[str, int]:
        out = {k: self.counters[k] for k in COUNTERS}
        out["datagrams"] = self.datagrams
        out["pool_in_use"] = len(self.entries)
        return out | _per_rank(self.rejected_src, self.stale_src, self.overflow_src, self.rejected_sender)


def _per_rank(claimed: Sequence[Sequence[int]], stale: Sequence[int], overflow: Sequence[int],
              sent_by: Sequence[Sequence[int]]) -> dict[str, int]:
    """The per-rank counters (by claimed rank, by real sender), named as in :meth:`Model.snapshot`."""
    out: dict[str, int] = {}
    for r, row in enumerate(claimed):
        out |= {f"claimed_{r}/{reason}": int(n) for reason, n in zip(REASONS, row, strict=True)}
        out[f"stale_from_{r}"] = int(stale[r])
        out[f"overflow_from_{r}"] = int(overflow[r])
    for r, row in enumerate(sent_by):
        out |= {f"sent_by_{r}/{reason}": int(n) for reason, n in zip(REASONS, row, strict=True)}
    return out


def read_count(ep: Endpoint) -> int:
    """Datagrams the endpoint has read from its socket."""
    return ep.stats()["datagrams"]


def core_snapshot(ep: Endpoint) -> dict[str, int]:
    """The live receiver's counters (its public :meth:`Endpoint.stats` and :meth:`Endpoint.counters`), named as in
    :meth:`Model.snapshot`."""
    st = ep.stats()
    out = dict(st["rejected"])
    out.update(stale=st["stale"], duplicate=st["duplicates"], accepted=st["accepted"], pooled=st["pooled"],
               overflow=st["overflow"], fin=st["fins"], credit=st["credits_received"], datagrams=st["datagrams"],
               pool_in_use=st["pool_in_use"])
    c = ep.counters()
    return out | _per_rank(c.claimed, c.stale, c.pool_drops, c.rejects)


# ---------------------------------------------------------------------------------------------- live target


def udp_drops(port: int) -> int:
    """Datagrams the kernel dropped at the UDP socket bound to ``port`` on this host (/proc/net/udp)."""
    total = 0
    try:
        with open("/proc/net/udp") as fh:
            next(fh)
            for line in fh:
                parts = line.split()
                if int(parts[1].split(":")[1], 16) == port:
                    total += int(parts[-1])
    except OSError:
        return 0
    return total


async def _wait(pred: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.0005)
    return True


def _send(sock: socket.socket, data: bytes, addr: tuple[str, int], gso: int | None = None) -> None:
    while True:
        try:
            if gso is None:
                sock.sendto(data, addr)
            else:
                sock.sendmsg([data], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", gso))], 0, addr)
            return
        except BlockingIOError:
            select.select([], [sock], [], 1.0)


@dataclass
class Target:
    """Three live endpoints on 127.0.0.1 (rank 0 is fuzzed) plus attacker sockets."""

    auth: bool
    datagram_bytes: int
    unexpected_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        worlds = local_worlds(3)
        self.eps: list[Endpoint] = []
        try:
            for w in worlds:
                # fin_grace: a valid FIN the fuzzer sends to an open receive must not end it before the round does
                self.eps.append(Endpoint.from_world(w, auth=self.auth, datagram_bytes=self.datagram_bytes,
                                                    unexpected_bytes=self.unexpected_bytes, fin_grace=3600.0,
                                                    check_address=False))
        except BaseException:
            for ep in self.eps:
                ep.close()
            for w in worlds[len(self.eps):]:
                w.close()
            raise
        self.rx = self.eps[0]
        self.keys = {r: worlds[0].keys[r] for r in (1, 2)}  # pair keys of (0, 1) and (0, 2)
        self.addr = self.rx.addresses[0]
        self.attackers = []
        for host in ("127.0.0.1", "127.0.0.1", "127.0.0.2"):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.bind((host, 0))
            except OSError:
                s.bind(("127.0.0.1", 0))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
            self.attackers.append(s)
        self.peer_socks = {1: self.eps[1].sock, 2: self.eps[2].sock}
        self.attacker_addrs = [s.getsockname() for s in self.attackers]
        self.model = Model(3, 0, self.keys, self.rx.addresses, auth=self.auth, datagram_bytes=self.datagram_bytes,
                           unexpected_bytes=self.unexpected_bytes)
        self.port = self.addr[1]
        self.drops0 = udp_drops(self.port)

    def sender(self, which: int | str) -> tuple[socket.socket, tuple[str, int]]:
        """A socket to send from: ``1``/``2`` for the peers' own sockets, ``"a0"``.. for attackers."""
        if isinstance(which, int):
            return self.peer_socks[which], self.rx.addresses[which]
        i = int(which[1:])
        return self.attackers[i], self.attacker_addrs[i]

    def close(self) -> None:
        for s in self.attackers:
            s.close()
        for ep in self.eps:
            ep.close()


# ---------------------------------------------------------------------------------------------- the fuzzer


@dataclass
class Planned:
    """The messages of one round: (src, tensor_id, dtype) each with its size and content."""

    tag: int
    slots: list[SlotModel]


DTYPES = [np.float32, np.int16, np.float64, np.uint8, np.int64, np.float16]


class Fuzzer:
    """Generates hostile datagrams for one :class:`Target`, sends them and checks the invariants."""

    def __init__(self, target: Target, rng: random.Random, batch: int, report: dict[str, Any],
                 log: Callable[[str], None]) -> None:
        self.t = target
        self.m = target.model
        self.rng = rng
        self.np_rng = np.random.default_rng(rng.getrandbits(64))
        self.batch_max = batch
        self.report = report
        self.log = log
        self.stride = target.rx.stride
        self.flags = wire.FLAG_MAC if target.auth else 0
        self.round = 0
        self.current: Planned | None = None
        self.next_plan = self._plan(TAG_STEP)
        self.replays: list[tuple[bytes, int]] = []  # datagrams of completed messages, with their source rank
        self.batch: list[tuple[bytes, int | str, int | None, str, str]] = []
        self.batch_bytes = 0
        self.batch_log: list[tuple[str, str, str, str]] = []
        self.classes: Counter[str] = report["classes"]
        self.variants: Counter[str] = report["variants"]
        self.failed = False
        self.max_tag = 0
        self.quota_left = 0

    # ------------------------------------------------------------------------------------------ planning
    def _plan(self, tag: int) -> Planned:
        """Sizes, dtypes and contents of a round's three receives: (1, tid 0), (1, tid 1), (2, tid 0)."""
        r = self.rng
        slots = []
        dts = r.sample(DTYPES, 3)
        for (src, tid), dt in zip(((1, 0), (1, 1), (2, 0)), dts, strict=True):
            item = np.dtype(dt).itemsize
            choice = r.random()
            if choice < 0.05:
                nbytes = 0
            elif choice < 0.15:
                nbytes = item * r.randint(1, 8)
            else:
                nchunks = r.randint(2, 24)
                nbytes = self.stride * (nchunks - 1) + item * r.randint(1, self.stride // item)
            count = wire.chunk_count(nbytes, self.stride)
            truth = self.np_rng.bytes(nbytes)
            sentinel = ((np.arange(nbytes, dtype=np.uint64) * 131 + 7 + tid) & 0xFF).astype(np.uint8).tobytes()
            slots.append(SlotModel(src, tag, tid, wire.dtype_code(dt), nbytes, count, self.stride, truth, sentinel))
        return Planned(tag, slots)

    # ------------------------------------------------------------------------------------------ datagram makers
    def data(self, s: SlotModel, index: int, *, payload: bytes | None = None, key_src: int | None = None,
             **fields: int) -> bytes:
        """A DATA datagram of ``s``'s message (valid unless ``fields``/``payload`` change it)."""
        length = s.chunk_len(index) if index < s.count else s.stride
        body = payload if payload is not None else s.chunk(index) if index < s.count else b"\0" * length
        h = dict(version=wire.PROTOCOL_VERSION, kind=KIND_DATA, dtype=s.dtype, flags=self.flags, src=s.src,
                 tag=s.tag, tensor_id=s.tid, index=index, count=s.count, length=len(body), stride=s.stride)
        h.update(fields)
        raw = HDR.pack(h["version"], h["kind"], h["dtype"], h["flags"], h["src"], h["tag"], h["tensor_id"],
                       h["index"], h["count"], h["length"], h["stride"]) + body
        return self._seal(raw, key_src if key_src is not None else s.src)

    def fin(self, s: SlotModel, **fields: int) -> bytes:
        """A FIN datagram of ``s``'s message (index 0, no payload; valid unless ``fields`` change it)."""
        h = dict(version=wire.PROTOCOL_VERSION, kind=KIND_FIN, dtype=s.dtype, flags=self.flags, src=s.src,
                 tag=s.tag, tensor_id=s.tid, index=0, count=s.count, length=0, stride=s.stride)
        h.update(fields)
        raw = HDR.pack(h["version"], h["kind"], h["dtype"], h["flags"], h["src"], h["tag"], h["tensor_id"],
                       h["index"], h["count"], h["length"], h["stride"])
        return self._seal(raw, s.src)

    def _seal(self, raw: bytes, key_src: int) -> bytes:
        if not self.t.auth:
            return raw
        key = self.t.keys.get(key_src)
        return raw + (wire.mac(key, raw) if key is not None else self.rng.randbytes(MAC_BYTES))

    def _reseal(self, d: bytes, key_src: int) -> bytes:
        """Re-sign a mutated datagram with the pair key of ``key_src`` (auth off: nothing to sign)."""
        if not self.t.auth or len(d) < HEADER_BYTES + MAC_BYTES or key_src not in self.t.keys:
            return d
        return resign(d, self.t.keys[key_src])

    def open_slot(self) -> SlotModel:
        """One of the receives posted this round."""
        return self.rng.choice(self.current.slots)

    def base(self) -> tuple[bytes, SlotModel]:
        """A valid datagram to mutate: a chunk or FIN of an open receive or of one planned for the next round."""
        r = self.rng.random()
        s = self.rng.choice(self.next_plan.slots) if r < 0.15 else self.open_slot()
        if self.rng.random() < 0.15:
            return self.fin(s), s
        return self.data(s, self.rng.randrange(s.count)), s

    def junk_tag(self) -> int:
        """A tag that is never posted: just above the open one (purged when the next round completes)."""
        return self.current.tag + self.rng.randint(1, TAG_STEP - 1)

    def tag_choice(self, s: SlotModel) -> int:
        r = self.rng.random()
        if r < 0.4:
            return s.tag
        if r < 0.6:
            return self.junk_tag()
        if r < 0.8 and s.tag >= TAG_STEP:
            return self.rng.randint(0, s.tag - 1)  # stale, or never completed for a new tensor
        return self.rng.choice([1 << 32, 1 << 63, (1 << 64) - 1])

    def peer_or_attacker(self, src: int, p_peer: float = 0.8) -> int | str:
        if src in (1, 2) and self.rng.random() < p_peer:
            return src
        return f"a{self.rng.randrange(len(self.t.attackers))}"

    # ------------------------------------------------------------------------------------------ classes
    def gen_random(self) -> None:
        r = self.rng
        n = r.randint(0, MAX_UDP) if r.random() < 0.5 else r.randint(0, 2047)
        d = r.randbytes(n)
        variant = "uniform"
        if n >= 4 and r.random() < 0.35:
            d = bytes([1, r.choice((1, 2)), r.randint(0, 13), r.randint(0, 1)]) + d[4:]
            variant = "plausible_prefix"
            if n >= 8 and r.random() < 0.5:
                d = d[:4] + struct.pack("<I", r.randint(0, 3)) + d[8:]
                variant = "plausible_src"
        self.add(d, self.peer_or_attacker(1, 0.5), "random", variant)

    def gen_mutated(self) -> None:
        r = self.rng
        d, s = self.base()
        v = r.random()
        if v < 0.5:
            ops = []
            for _ in range(r.randint(1, 8)):
                zone = r.random()
                if zone < 0.4:
                    pos = r.randrange(HEADER_BYTES)
                elif zone < 0.7 or not self.t.auth:
                    pos = r.randrange(len(d))
                else:
                    pos = len(d) - 1 - r.randrange(MAC_BYTES)
                ops.append(("flip", pos, 1 << r.randrange(8)))
            variant = "bit_flips"
        elif v < 0.8:
            ops = [("set", r.randrange(len(d)), r.randrange(256)) for _ in range(r.randint(1, 4))]
            variant = "byte_overwrites"
        else:
            other, _ = self.base()
            ops = [("splice", r.randrange(len(d) + 1), other)]
            variant = "splice"
        self.add(mutate(d, ops), self.peer_or_attacker(s.src), "mutated", variant)

    def _boundary(self, name: str, d: bytes, s: SlotModel) -> int:
        r = self.rng
        cur = field_value(d, name)
        width = 8 * struct.calcsize(FIELDS[name][1])
        top = (1 << width) - 1
        common = [0, 1, top, top - 1, 1 << (width - 1), (1 << (width - 1)) - 1, (cur + 1) & top, (cur - 1) & top]
        extra = {
            "version": [2], "kind": [KIND_DATA, KIND_FIN, 3], "dtype": [12, 13] + [c for c in range(1, 13)],
            "flags": [2, 3, 0x80], "src": [0, 2, 3], "tag": [s.tag + TAG_STEP, 1 << 32],
            "tensor_id": [0, 1, 2], "index": [s.count - 1, s.count, s.count + 1],
            "count": [s.count - 1, s.count + 1, 2], "length": [16, 15, self.stride, self.stride + 1, s.chunk_len(0)],
            "stride": [16, self.stride - 16, self.stride + 16, self.stride - 1],
        }[name]
        return r.choice(common + extra) & top

    def gen_header_fields(self) -> None:
        r = self.rng
        d, s = self.base()
        name = r.choice(list(FIELDS))
        value = self._boundary(name, d, s)
        resized = name == "length" and r.random() < 0.5 and HEADER_BYTES + value + MAC_BYTES <= MAX_UDP
        if resized:
            # a consistent length: the payload (and the datagram size) follow the field
            body_end = len(d) - (MAC_BYTES if d[3] & wire.FLAG_MAC else 0)
            payload = (d[HEADER_BYTES:body_end] + r.randbytes(value))[:value]
            d = set_field(d[:HEADER_BYTES], name, value) + payload + (b"\0" * MAC_BYTES if d[3] & 1 else b"")
        else:
            d = set_field(d, name, value)
        resigned = self.t.auth and r.random() < 0.5
        if resigned or (resized and self.t.auth and r.random() < 0.5):
            d = self._reseal(d, s.src)
            resigned = True
        variant = f"{name}/{'resigned' if resigned else 'stale_mac'}{'/resized' if resized else ''}"
        self.add(d, self.peer_or_attacker(s.src), "header_fields", variant)

    def gen_truncated(self) -> None:
        """Every prefix of one valid datagram: DATA (a full or the short last chunk) or FIN."""
        r = self.rng
        s = self.open_slot()
        v = r.random()
        if v < 0.2:
            d, variant = self.fin(s), "fin"
        elif v < 0.5:
            d, variant = self.data(s, s.count - 1), "last_chunk"
        else:
            d, variant = self.data(s, r.randrange(s.count)), "chunk"
        sender = self.peer_or_attacker(s.src)
        lengths = range(len(d))
        if len(d) > max(self.quota_left, 64):
            # the round has no room for every prefix of a jumbo datagram: a sorted sample that keeps the edges
            edges = {0, 1, HEADER_BYTES - 1, HEADER_BYTES, HEADER_BYTES + 1, len(d) - MAC_BYTES, len(d) - 1}
            lengths = sorted(edges | set(r.sample(range(len(d)), max(self.quota_left, 64) - len(edges))))
            variant += "/sampled"
        for n in lengths:
            self.add(d[:n], sender, "truncated", variant)

    def gen_oversized(self) -> None:
        r = self.rng
        s = self.open_slot()
        maclen = MAC_BYTES if self.t.auth else 0
        plen = r.randint(self.stride + 1, MAX_UDP - HEADER_BYTES - maclen)
        tag = self.tag_choice(s)
        v = r.random()
        payload = r.randbytes(plen)
        if v < 0.6:
            d = self.data(s, r.randrange(s.count), payload=payload, tag=tag)
            variant = "consistent_length"
            if self.t.auth and r.random() < 0.3:
                d = d[:-MAC_BYTES] + r.randbytes(MAC_BYTES)
                variant += "/bad_mac"
            elif r.random() < 0.2:
                d = self._reseal(set_field(d, "stride", min(plen, 0xFFFF)), s.src)
                variant += "/stride_matches"
        else:
            d = self.data(s, r.randrange(s.count), payload=payload, tag=tag, length=r.choice([self.stride, 0, 0xFFFF]))
            variant = "length_field_lies"
        self.add(d[:MAX_UDP], self.peer_or_attacker(s.src), "oversized", variant)

    def gen_spoofed(self) -> None:
        r = self.rng
        s = self.open_slot()
        index = r.randrange(s.count)
        v = r.random()
        other = 2 if s.src == 1 else 1
        if v < 0.25:
            d = self.data(s, index, key_src=other)
            variant, sender = "other_pair_key", self.peer_or_attacker(s.src)
        elif v < 0.45:
            src = r.choice([0, other, 3])
            d = self._reseal(set_field(self.data(s, index), "src", src), s.src)
            variant, sender = f"right_key_claims_src_{src}", self.peer_or_attacker(src)
        elif v < 0.55:
            d = self.data(s, index)
            if self.t.auth:
                d = resign(d, r.randbytes(32))
            variant, sender = "random_key", self.peer_or_attacker(s.src)
        elif v < 0.8:
            d = self.data(s, index)
            variant, sender = "valid_from_wrong_address", f"a{r.randrange(len(self.t.attackers))}"
        else:
            d = self.data(s, index, tag=self.junk_tag())
            variant, sender = "resigned_from_wrong_address", f"a{r.randrange(len(self.t.attackers))}"
        self.add(d, sender, "spoofed", variant)

    def gen_replay(self) -> None:
        d, src = self.rng.choice(self.replays)
        self.add(d, self.peer_or_attacker(src, 0.7), "replay", "fin" if d[1] == KIND_FIN else "data")

    def gen_fin(self) -> None:
        r = self.rng
        s = self.rng.choice(self.next_plan.slots) if r.random() < 0.1 else self.open_slot()
        v = r.random()
        if v < 0.1:
            d, variant = self.fin(s), "valid"
        elif v < 0.15:
            d = self._reseal(self.fin(s, index=r.choice([1, s.count, r.getrandbits(32) | 1])), s.src)
            variant = "nonzero_index"
        elif v < 0.3:
            d = self.fin(s)[:HEADER_BYTES]
            pl = r.randint(1, 64)
            d = set_field(d, "length", pl) + r.randbytes(pl)
            d = self._seal(d, s.src)
            variant = "with_payload"
        elif v < 0.4:
            d, variant = set_field(self.fin(s), "length", r.choice([1, 16, 0xFFFF])), "length_field_nonzero"
        elif v < 0.5:
            d = set_field(self.fin(s)[:HEADER_BYTES], "flags", 0)
            variant = "no_mac"
        elif v < 0.6:
            d = mutate(self.fin(s), [("flip", -1 - r.randrange(MAC_BYTES), 1 << r.randrange(8))])
            variant = "mac_flipped"
        elif v < 0.75:
            name = r.choice(["count", "stride", "dtype"])
            d = self._reseal(set_field(self.fin(s), name, self._boundary(name, self.fin(s), s)), s.src)
            variant = f"wrong_{name}"
        elif v < 0.85:
            d, variant = self.fin(s, tag=self.tag_choice(s)), "other_tag"
        else:
            d, variant = self.fin(s, tensor_id=r.choice([0, 1, 2, 0xFFFFFFFF])), "other_tensor"
        self.add(d, self.peer_or_attacker(s.src), "fin", variant)

    def gen_gso(self) -> None:
        """Datagrams in one GSO send: equal-length segments, the last one possibly shorter."""
        r = self.rng
        s = self.open_slot()
        full = [x for x in self.current.slots if x.count > 1]  # slots with a full-size chunk
        if r.random() < 0.15 or not full:
            seg = r.randint(1, 96)
            k = r.randint(2, 32)
            segs = [r.randbytes(seg) for _ in range(k - 1)] + [r.randbytes(r.randint(1, seg))]
            variant = "tiny_segments"
        else:
            s = r.choice(full)
            seg = HEADER_BYTES + self.stride + (MAC_BYTES if self.t.auth else 0)
            k = r.randint(2, min(32, max(2, 60000 // seg)))
            segs = []
            for _ in range(k - 1):
                d = self.data(s, r.randrange(max(1, s.count - 1)))
                v = r.random()
                if v < 0.35:
                    d = mutate(d, [("flip", r.randrange(len(d)), 1 << r.randrange(8))])
                elif v < 0.5:
                    d = r.randbytes(seg)
                elif v < 0.65:
                    d = self._reseal(set_field(d, r.choice(["index", "count", "dtype", "tag"]), r.getrandbits(32)),
                                     s.src)
                segs.append(d)
            last = r.random()
            if last < 0.4:
                segs.append(self.data(s, s.count - 1))
            elif last < 0.7:
                segs.append(self.fin(s))
            else:
                segs.append(r.randbytes(r.randint(1, seg)))
            variant = "chunks"
        if not self.report["gso_supported"]:
            variant += "/sent_one_by_one"
        self.add_gso(segs, seg, self.peer_or_attacker(s.src), variant)

    def gen_valid(self) -> None:
        r = self.rng
        v = r.random()
        if v < 0.7:
            s = self.open_slot()
            variant = "open_chunk"
        elif v < 0.9:
            s = r.choice(self.next_plan.slots)
            variant = "early_chunk"
        else:
            s = r.choice(self.current.slots)
            self.add(self.fin(s), s.src, "valid", "fin")
            return
        # never the last chunk: the receive must stay open until the round completes it
        self.add(self.data(s, r.randrange(max(1, s.count - 1))), self.peer_or_attacker(s.src, 0.9), "valid", variant)

    # ------------------------------------------------------------------------------------------ batching
    def admissible(self, out: Outcome, d: bytes) -> bool:
        """Whether sending ``d`` keeps the round checkable: no completion mid-batch, and with authentication on
        no accepted write of bytes other than the sent message (a key holder's right, not an attack)."""
        if out.kind == "accepted":
            if out.completes:
                return False
            return not self.t.auth or d[HEADER_BYTES: len(d) - MAC_BYTES] == out.slot.chunk(out.index)
        if out.kind == "pooled":
            src, tid, tag = field_value(d, "src"), field_value(d, "tensor_id"), field_value(d, "tag")
            for p in self.next_plan.slots:
                if p.key == (src, tid, tag):
                    o = self.m.drain_outcome(p, d)
                    if o.kind in ("accepted", "duplicate"):
                        if o.index + 1 >= p.count:
                            return False
                        return not self.t.auth or d[HEADER_BYTES: len(d) - MAC_BYTES] == p.chunk(o.index)
                    return True
            # a message of a later round: its geometry is not drawn yet, so it cannot be checked
            later = tag % TAG_STEP == 0 and self.current.tag < tag <= self.max_tag
            return not (later and (src, tid) in ((1, 0), (1, 1), (2, 0)))
        return True

    def add(self, d: bytes, sender: int | str, klass: str, variant: str) -> None:
        d = d[:MAX_UDP]
        addr = self.t.sender(sender)[1]
        out = self.m.predict(d, addr)
        if not self.admissible(out, d):
            self.report["skipped_valid"] += 1
            self.report["skipped_by_class"][klass] += 1
            return
        self.m.datagrams += 1
        self.m.apply(out, d)
        self.classes[klass] += 1
        self.variants[f"{klass}/{variant}"] += 1
        self.batch.append((d, sender, None, klass, out.kind))
        self.batch_bytes += len(d) + 1280
        if len(self.batch) >= self.batch_max or self.batch_bytes >= self.t.rx.rcvbuf // 4:
            self.flush()

    def add_gso(self, segs: list[bytes], seg: int, sender: int | str, variant: str) -> None:
        if any(len(d) != seg for d in segs[:-1]) or not 0 < len(segs[-1]) <= seg:
            raise AssertionError(f"GSO segments must be {seg} bytes but the last, which may be shorter: "
                                 f"{[len(d) for d in segs]}")
        addr = self.t.sender(sender)[1]
        kept = []
        for d in segs:
            out = self.m.predict(d, addr)
            if not self.admissible(out, d):
                self.report["skipped_valid"] += 1
                self.report["skipped_by_class"]["gso"] += 1
                d = b"\xff" * len(d)  # same length (the segment layout must hold), a header reject
                out = self.m.predict(d, addr)
            self.m.datagrams += 1
            self.m.apply(out, d)
            kept.append(d)
        self.classes["gso"] += len(kept)
        self.variants[f"gso/{variant}"] += len(kept)
        if self.report["gso_supported"]:
            self.batch.append((b"".join(kept), sender, seg, "gso", f"{len(kept)} segments"))
        else:
            for d in kept:
                self.batch.append((d, sender, None, "gso", "segment"))
        self.batch_bytes += sum(len(d) for d in kept) + 1280 * len(kept)
        if len(self.batch) >= self.batch_max or self.batch_bytes >= self.t.rx.rcvbuf // 4:
            self.flush()

    def flush(self) -> None:
        """Send the batch, wait until the receiver read all of it, compare counters and buffers."""
        if not self.batch:
            return
        rx = self.t.rx
        expect = self.m.snapshot()
        n0 = read_count(rx)
        nseg = 0
        for d, sender, seg, _klass, _kind in self.batch:
            sock, _ = self.t.sender(sender)
            _send(sock, d, self.t.addr, seg)
            nseg += 1 if seg is None else max(1, -(-len(d) // seg))
        target = n0 + nseg
        if expect["datagrams"] != target:
            raise AssertionError(f"fuzzer bug: the model counts {expect['datagrams'] - n0} datagrams in a batch "
                                 f"that carries {nseg}")
        arrived = rx.run(_wait(lambda: read_count(rx) >= target, 10.0))
        if not arrived:
            # the kernel dropped some: wait until the count settles, then report
            rx.run(asyncio.sleep(0.5))
            self.report["kernel_drops"] = udp_drops(self.t.port) - self.t.drops0
            self.violation("receiver did not read every datagram of a batch", {
                "sent": nseg, "read": read_count(rx) - n0, "kernel_drops": self.report["kernel_drops"]})
        else:
            self.check(expect)
        self.batch = []
        self.batch_bytes = 0

    # ------------------------------------------------------------------------------------------ checks
    def violation(self, what: str, detail: dict[str, Any]) -> None:
        self.failed = True
        v = self.report["violations"]
        if len(v) < 20:
            v.append({"what": what, "round": self.round, "target": self.report["current_target"], **detail})
        if "failure_batch" not in self.report and self.batch:
            self.report["failure_batch"] = [
                {"hex": d.hex(), "sender": str(sender), "gso_segment": seg, "class": klass, "expected": kind}
                for d, sender, seg, klass, kind in self.batch]
        self.log(f"VIOLATION: {what}: {detail}")

    def check(self, expect: dict[str, int]) -> None:
        got = core_snapshot(self.t.rx)
        if got != expect:
            diff = {k: {"model": expect.get(k), "core": got.get(k)} for k in expect if expect.get(k) != got.get(k)}
            self.violation("core counters differ from the reference model", {"diff": diff})
        self.check_buffers()

    def check_buffers(self) -> None:
        for s in self.current.slots:
            live = s.out.reshape(-1).view(np.uint8).tobytes()
            if live != bytes(s.buf):
                bad = [i for i in range(s.count) if live[i * s.stride:(i + 1) * s.stride]
                       != bytes(s.buf[i * s.stride:(i + 1) * s.stride])]
                self.violation("a posted buffer differs from the reference model",
                               {"src": s.src, "tensor_id": s.tid, "tag": s.tag, "chunks": bad[:20]})
                s.buf[:] = live  # report once
            if self.t.auth:
                for i in range(s.count):
                    chunk = bytes(s.buf[i * s.stride: i * s.stride + s.chunk_len(i)])
                    if chunk != (s.chunk(i) if s.bits[i] else s.sentinel[i * s.stride: i * s.stride + s.chunk_len(i)]):
                        self.violation("a buffer chunk is neither the sentinel nor the sent bytes",
                                       {"src": s.src, "tensor_id": s.tid, "chunk": i})
                        break

    # ------------------------------------------------------------------------------------------ rounds
    def post_round(self) -> None:
        self.round += 1
        self.current = self.next_plan
        self.next_plan = self._plan(self.current.tag + TAG_STEP)
        check = self.rng.random() < 0.5
        self.t.rx.check_address = check
        self.m.check_address = check
        rx = self.t.rx
        expect_before = self.m.snapshot()
        self.check_no_change(expect_before)
        for s in self.current.slots:
            dt = {wire.dtype_code(d): d for d in DTYPES}[s.dtype]
            s.out = np.frombuffer(bytearray(s.sentinel), dtype=np.uint8).view(dt).copy() if s.nbytes else \
                np.zeros(0, dt)

            async def _post(s: SlotModel = s) -> Any:
                return rx.irecv(s.src, s.out, tag=s.tag, tensor_id=s.tid, timeout=3600.0, fill="zero")

            s.future = rx.run(_post())
            self.m.post(s)
        self.check(self.m.snapshot())

    def check_no_change(self, expect: dict[str, int]) -> None:
        got = core_snapshot(self.t.rx)
        if got != expect:
            diff = {k: {"model": expect.get(k), "core": got.get(k)} for k in expect if expect.get(k) != got.get(k)}
            self.violation("core counters changed outside a batch", {"diff": diff})

    def complete_round(self) -> None:
        """Each receive gets its message from its peer's real ``Endpoint.send``; it must arrive intact."""
        self.flush()
        rx = self.t.rx
        before = core_snapshot(rx)
        missing = sum(s.count - s.nrecv for s in self.current.slots)
        n = 0
        for s in self.current.slots:
            dt = s.out.dtype
            msg = np.frombuffer(s.truth, dtype=np.uint8).view(dt) if s.nbytes else np.zeros(0, dt)
            res = self.t.eps[s.src].send_blocking(0, msg, tag=s.tag, tensor_id=s.tid)
            n += res.datagrams + (3 if self.t.eps[s.src].send_fin else 0)
            self.report["legit"]["messages"] += 1
            self.report["legit"]["datagrams"] += res.datagrams

        async def _all() -> list[RecvResult]:
            return await asyncio.wait_for(asyncio.gather(*(s.future for s in self.current.slots)), 30.0)

        try:
            results = rx.run(_all())
        except TimeoutError:
            self.violation("a valid message did not complete", {"round": self.round})
            raise
        rx.run(_wait(lambda: read_count(rx) >= before["datagrams"] + n, 10.0))
        purged = 0
        for s, res in zip(self.current.slots, results, strict=True):
            # buf holds every chunk delivered before; the missing ones now come from the sender
            for i in range(s.count):
                if not s.bits[i]:
                    s.buf[i * s.stride: i * s.stride + s.chunk_len(i)] = s.chunk(i)
                    s.bits[i] = 1
            live = s.out.reshape(-1).view(np.uint8).tobytes()
            if not res.complete or live != bytes(s.buf) or (self.t.auth and live != s.truth):
                self.violation("a valid message arrived wrong", {"src": s.src, "tensor_id": s.tid, "tag": s.tag,
                                                                 "complete": res.complete})
            self.check_reject_reasons(s, res)
            purged += sum(len(es) for (src, tid, tag), es in self.m.by_msg.items()
                          if (src, tid) == (s.src, s.tid) and tag <= s.tag)
            self.m.close(s)
            for i in self.rng.sample(range(s.count), min(3, s.count)):
                self.replays.append((self.data(s, i), s.src))
            self.replays.append((self.fin(s), s.src))
        self.replays = self.replays[-256:]
        got = core_snapshot(rx)
        ambiguous = {"duplicate", "stale", "stale_from_1", "stale_from_2"}
        d = {k: got[k] - before[k] for k in got}
        want = {k: 0 for k in got if k not in ambiguous}
        want.update(datagrams=n, accepted=missing, fin=3 * len(self.current.slots) if n else 0,
                    pool_in_use=-purged)
        checked = {k: d[k] for k in want}
        sent_chunks = n - 3 * len(self.current.slots)
        if checked != want or d["duplicate"] + d["stale"] != sent_chunks - missing + purged:
            self.violation("counters of a legitimate transfer are wrong",
                           {"delta": d, "want": want, "dup_plus_stale": sent_chunks - missing + purged})
        # the model counted the purge as stale; the live split between duplicate and stale depends on timing
        self.m.counters["accepted"] += missing
        self.m.counters["fin"] += 3 * len(self.current.slots)
        self.m.datagrams += n
        for k, mk in (("duplicate", "duplicate"), ("stale", "stale")):
            self.m.counters[mk] = got[k]
        for r in (1, 2):
            self.m.stale_src[r] = got[f"stale_from_{r}"]
        self.check_no_change(self.m.snapshot())

    def check_reject_reasons(self, s: SlotModel, res: RecvResult) -> None:
        """A receive's ``reject_reasons``: the rejects claiming its sender from its post to its completion (the
        legitimate transfer that completed it rejects nothing, which :meth:`complete_round` checks)."""
        want = {r: now - then for r, now, then in zip(REASONS, self.m.rejected_src[s.src], s.rejects0, strict=True)}
        if res.reject_reasons != want or res.rejected != sum(want.values()):
            self.violation("a receive's reject_reasons differ from the reference model",
                           {"src": s.src, "tensor_id": s.tid, "tag": s.tag, "model": want,
                            "receive": res.reject_reasons, "rejected": res.rejected})

    def run(self, datagrams: int) -> None:
        """Fuzz with about ``datagrams`` datagrams, in rounds."""
        gens = {k: getattr(self, f"gen_{k}") for k in CLASSES}
        start = sum(self.classes.values())
        self.max_tag = self.next_plan.tag + TAG_STEP * (datagrams // 1500 + 4)
        done = 0
        while done < datagrams and not self.failed:
            self.post_round()
            quota = min(datagrams - done, self.rng.randint(1500, 6000))
            r0 = sum(self.classes.values())
            while sum(self.classes.values()) - r0 < quota and not self.failed:
                total = max(1, sum(self.classes.values()))
                self.quota_left = quota - (total - r0)
                # the class furthest below its share goes next
                klass = max((c for c in CLASSES if c != "replay" or self.replays),
                            key=lambda c: CLASS_SHARE[c] * total - self.classes[c])
                gens[klass]()
            self.complete_round()
            done = sum(self.classes.values()) - start
        self.flush()

    def final_message(self) -> bool:
        """After the fuzzing: a fresh valid message still completes, bit-exact."""
        self.post_round()
        self.flush()
        self.complete_round()
        return not self.failed


# ---------------------------------------------------------------------------------------------- driver


def _gso_supported() -> bool:
    """Whether this kernel takes a UDP_SEGMENT send on loopback."""
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        b.bind(("127.0.0.1", 0))
        a.sendmsg([b"x" * 100], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", 40))], 0, b.getsockname())
        return True
    except OSError:
        return False
    finally:
        a.close()
        b.close()


def new_report(seed: int, datagrams: int) -> dict[str, Any]:
    """An empty report, as :class:`Fuzzer` fills it."""
    return {
        "seed": seed, "datagrams_requested": datagrams, "core": wire.CORE_FILE,
        "environment": {"python": platform.python_version(), "numpy": np.__version__, "kernel": platform.release(),
                        "cpus": os.cpu_count(), "machine": platform.machine()},
        "classes": Counter(), "variants": Counter(), "skipped_valid": 0, "skipped_by_class": Counter(),
        "legit": {"messages": 0, "datagrams": 0},
        "kernel_drops": 0, "violations": [], "gso_supported": _gso_supported(), "targets": [],
        "current_target": None,
    }


def run_fuzz(datagrams: int, seed: int, *, auth_off_share: float = 0.2, batch: int = 512,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the fuzzer against live endpoints and return its report (see the module docstring).

    Parameters
    ----------
    datagrams : int
        Fuzzed datagrams to send in all (GSO segments count one each); the legitimate messages come on top.
    seed : int
        Seed of every random choice: the same seed replays the same datagrams.
    auth_off_share : float
        Share of the datagrams aimed at a second receiver that runs with authentication off.
    batch : int
        Datagrams sent before waiting for the receiver and checking the invariants.
    log : callable or None
        Progress messages.
    """
    log = log or (lambda msg: None)
    rng = random.Random(seed)
    report = new_report(seed, datagrams)
    t0 = time.monotonic()
    ok_after = True
    shares = [(True, 1472, 1.0 - auth_off_share)] + ([(False, 8972, auth_off_share)] if auth_off_share > 0 else [])
    for auth, dbytes, share in shares:
        n = int(round(datagrams * share))
        if n <= 0:
            continue
        name = f"auth={'on' if auth else 'off'},datagram_bytes={dbytes}"
        report["current_target"] = name
        target = Target(auth, dbytes)
        c0 = sum(report["classes"].values())
        t1 = time.monotonic()
        try:
            fz = Fuzzer(target, rng, batch, report, log)
            log(f"{name}: {n} datagrams")
            fz.run(n)
            ok_after = fz.final_message() and ok_after
            st = target.rx.stats()
            report["targets"].append({
                "target": name, "datagrams": sum(report["classes"].values()) - c0,
                "elapsed_s": round(time.monotonic() - t1, 2), "rounds": fz.round,
                "receiver": {k: st[k] for k in ("datagrams", "accepted", "duplicates", "stale", "overflow", "pooled",
                                                "pool_in_use", "fins", "rejected", "gro", "auth", "rcvbuf")},
                "kernel_drops": udp_drops(target.port) - target.drops0,
            })
            report["kernel_drops"] += report["targets"][-1]["kernel_drops"]
        finally:
            target.close()
    elapsed = time.monotonic() - t0
    total = sum(report["classes"].values())
    rejected: Counter[str] = Counter()
    for t in report["targets"]:
        rejected.update(t["receiver"]["rejected"])
    report.update(
        datagrams=total, elapsed_s=round(elapsed, 2), datagrams_per_s=round(total / elapsed) if elapsed else 0,
        rejected_by_reason=dict(rejected), classes=dict(report["classes"]),
        skipped_by_class=dict(report["skipped_by_class"]),
        variants=dict(sorted(report["variants"].items())),
    )
    report.pop("current_target")
    report["invariants"] = {
        "process_survived": True,  # a crash of the core ends the process before this line (see --sanitize)
        "valid_message_completes_after": ok_after,
        "counters_match_model": not any("counters" in v["what"] for v in report["violations"]),
        "buffers_changed_only_by_valid_datagrams": not any("buffer" in v["what"] or "arrived wrong" in v["what"]
                                                           for v in report["violations"]),
        "every_reject_reason_seen": all(rejected[r] > 0 for r in REASONS),
        "no_kernel_drops": report["kernel_drops"] == 0,
    }
    report["ok"] = all(report["invariants"].values()) and not report["violations"]
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datagrams", type=int, default=1_000_000, help="fuzzed datagrams to send (default 1e6)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    ap.add_argument("--json-out", type=Path, default=None, help="write the JSON report here")
    ap.add_argument("--auth-off-share", type=float, default=0.2,
                    help="share of datagrams for a receiver with authentication off (default 0.2)")
    ap.add_argument("--batch", type=int, default=512, help="datagrams per checked batch (default 512)")
    ap.add_argument("--sanitize", action="store_true",
                    help="build the core with ASan+UBSan into --sanitize-dir and fuzz that build in a subprocess")
    ap.add_argument("--sanitize-dir", type=Path, default=REPO / "out" / "sanitize",
                    help="where the sanitized package copy goes (default out/sanitize)")
    ap.add_argument("--expect-core-dir", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(f"[fuzz] {msg}", file=sys.stderr, flush=True))
    if args.sanitize:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import sanitize_build

        child = ["--datagrams", str(args.datagrams), "--seed", str(seed), "--auth-off-share",
                 str(args.auth_off_share), "--batch", str(args.batch)] + (["--quiet"] if args.quiet else [])
        report = sanitize_build.run_sanitized_fuzz(child, args.sanitize_dir, log=log)
    else:
        if args.expect_core_dir is not None:
            if not Path(wire.CORE_FILE).resolve().is_relative_to(args.expect_core_dir.resolve()):
                print(f"fuzz_receive: loaded {wire.CORE_FILE}, not the build under {args.expect_core_dir}: "
                      "put that directory first on PYTHONPATH", file=sys.stderr)
                return 2
        report = run_fuzz(args.datagrams, seed, auth_off_share=args.auth_off_share, batch=args.batch, log=log)
        report["command"] = "python tools/fuzz_receive.py " + " ".join(
            a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--expect-core-dir"))
    text = json.dumps(report, indent=2, sort_keys=False, default=str)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
    summary = {k: report.get(k) for k in ("ok", "datagrams", "elapsed_s", "datagrams_per_s", "rejected_by_reason",
                                          "kernel_drops", "invariants")}
    print(json.dumps(summary, indent=2))
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
