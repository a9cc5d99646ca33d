"""Small messages leave from the calling thread (``Endpoint(inline_bytes=...)``): no hand-off to the sending
thread, same datagrams; paced, credit-bound or fault-injected messages still go through the thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import endpoints, run

from lossympi.faults import FaultInjector, FaultSpec


def _threads_used(ep) -> set[str]:
    """Record the threads the endpoint's core sends from."""
    used: set[str] = set()
    send = ep.core.send

    def spy(*args):
        used.add(threading.current_thread().name)
        return send(*args)

    ep.core = _CoreSpy(ep.core, spy)
    return used


class _CoreSpy:
    def __init__(self, core, send) -> None:
        self._core = core
        self.send = send

    def __getattr__(self, name):
        return getattr(self._core, name)


@pytest.mark.parametrize("inline_bytes, nbytes, inline", [
    (64 << 10, 20_000, True),       # a small message: from the event loop's thread
    (64 << 10, 1 << 20, False),     # a large one: from the sending thread
    (0, 20_000, False),             # inline sends off
])
def test_small_messages_leave_from_the_calling_thread(inline_bytes, nbytes, inline):
    async def main():
        with endpoints(2, inline_bytes=inline_bytes) as (a, b):
            used = _threads_used(a)
            x = np.arange(nbytes // 4, dtype=np.float32)
            out = np.zeros_like(x)
            sent = await a.send(1, x)
            got = await b.recv(0, out, timeout=5.0)
            assert got.complete and np.array_equal(out, x)
            assert sent.chunks == got.chunk_mask.size
            assert a.inline_sends == int(inline)
            assert used == ({threading.main_thread().name} if inline else {"lossympi-send-0_0"})

    run(main())


def test_paced_credit_bound_or_faulty_messages_use_the_sending_thread():
    with endpoints(2) as (a, _):
        count = 14
        assert a._inline(20_000, count, 0.0, 0, 0)
        assert not a._inline(20_000, count, 1e9, 16_000, 0)  # paced beyond its burst: it may sleep
        assert a._inline(20_000, count, 1e9, 64_000, 0)
        wire = 20_000 + count * (32 + 16)  # payload + each datagram's header and MAC: what the core paces
        assert a._inline(20_000, count, 1e9, wire, 0) and not a._inline(20_000, count, 1e9, wire - 1, 0)
        assert not a._inline(20_000, count, 0.0, 0, count - 1)  # it would wait for the receiver's credit
        assert a._inline(20_000, count, 0.0, 0, count)

    async def faulty():
        with endpoints(2, faults=FaultInjector(FaultSpec(drop=0.0), seed=0)) as (a, b):
            x = np.ones(1000, np.float32)
            await a.send(1, x)
            await b.recv(0, np.zeros_like(x), timeout=5.0)
            assert a.inline_sends == 0

    run(faulty())


def test_inline_bytes_must_not_be_negative():
    with pytest.raises(ValueError, match="inline_bytes must be >= 0"):
        with endpoints(1, inline_bytes=-1):
            pass
