"""Shared helpers for the lossympi transport tests: real UDP sockets on 127.0.0.1, in one process."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any

import numpy as np
import pytest

from lossympi.bootstrap import World, local_worlds
from lossympi.control import TCPControl
from lossympi.endpoint import Endpoint

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    uvloop = None


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine on a fresh uvloop event loop (asyncio's when uvloop is missing)."""
    if uvloop is not None:
        return uvloop.run(coro)
    return asyncio.run(coro)


@contextlib.contextmanager
def endpoints(
    n: int = 2, per_rank: Mapping[int, Mapping[str, Any]] | None = None, **kwargs: Any
) -> Iterator[list[Endpoint]]:
    """``n`` endpoints on 127.0.0.1; ``per_rank[r]`` overrides ``kwargs`` for rank ``r``."""
    with worlds_and_endpoints(n, per_rank, **kwargs) as (_, eps):
        yield eps


@contextlib.contextmanager
def worlds_and_endpoints(
    n: int = 2, per_rank: Mapping[int, Mapping[str, Any]] | None = None, **kwargs: Any
) -> Iterator[tuple[list[World], list[Endpoint]]]:
    """Like :func:`endpoints`, also yielding the worlds (which hold the pair keys)."""
    worlds = local_worlds(n)
    eps: list[Endpoint] = []
    try:
        for w in worlds:
            kw = dict(kwargs)
            kw.update((per_rank or {}).get(w.rank, {}))
            eps.append(Endpoint.from_world(w, **kw))
        yield worlds, eps
    finally:
        for ep in eps:
            ep.close()
        for w in worlds[len(eps):]:
            w.close()


async def wait_until(pred: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Yield to the event loop until ``pred()`` holds; fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.0005)


@contextlib.contextmanager
def elastic_controls(n: int, **kwargs: Any) -> Iterator[tuple[list[World], list[TCPControl], list[TCPControl]]]:
    """``n`` elastic control channels on 127.0.0.1 (rank 0 first), and a list for more (closed at the end too)."""
    worlds = local_worlds(n)
    ctls = [TCPControl(w.rank, w.size, w.addresses, w.keys, w.control, **kwargs) for w in worlds]
    for c in ctls:
        c.make_elastic()
    extra: list[TCPControl] = []
    try:
        yield worlds, ctls, extra
    finally:
        for c in ctls + extra:
            c.close()
        for w in worlds:
            w.close()


def bits(a: np.ndarray) -> np.ndarray:
    """The raw bytes of an array, for bit-exact comparisons (NaN-safe)."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def assert_bit_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(bits(a), bits(b))


@pytest.fixture
def raw_sock() -> Iterator[socket.socket]:
    """An attacker's plain UDP socket on 127.0.0.1."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    yield s
    s.close()
