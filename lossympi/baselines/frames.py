"""What the TCP and gRPC baselines share: the frame header, data keys, the gather result, byte views.

A frame is a :data:`HEADER` (magic, kind, dtype code, reserved 0, round, payload bytes) followed by the raw
payload (the parameters or one gradient, little-endian). Nothing received is ever unpickled or executed: a
receiver checks the header (kind, dtype, round, size) before a byte of the payload reaches its buffer.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["HEADER", "KIND_GRAD", "KIND_PARAMS", "MAGIC", "BaselineError", "Gathered", "bytes_of", "header",
           "parse", "recv_exact", "subkey"]

#: Frame header: magic, kind, dtype code, reserved (0), round, payload bytes.
HEADER = struct.Struct("<4sBBHQQ")
MAGIC = b"AGT1"
KIND_PARAMS = 1
KIND_GRAD = 2
_DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<f8"), 3: np.dtype("<f2")}
_CODES = {dt: code for code, dt in _DTYPES.items()}


class BaselineError(RuntimeError):
    """A baseline failed: authentication, a malformed frame from the trusted side, a lost peer, a missing package."""


@dataclass
class Gathered:
    """What the root got in one gather.

    ``delivered[r - 1]`` is 1.0 when sender ``r``'s whole row arrived in time, else 0.0 (its row holds whatever
    was there: the caller fills it); ``complete`` the arrival times of the complete rows (seconds after the
    gather started); ``rejected`` the frames or calls refused during the gather (size, dtype, kind,
    authentication).
    """

    delivered: np.ndarray
    elapsed: float = 0.0
    complete: list[float] = field(default_factory=list)
    rejected: int = 0


def _code(dtype: Any) -> int:
    code = _CODES.get(np.dtype(dtype))
    if code is None:
        raise TypeError(f"dtype {np.dtype(dtype)} cannot travel (use float32, float64 or float16)")
    return code


def header(kind: int, dtype: Any, rnd: int, nbytes: int) -> bytes:
    """The header of a frame of ``nbytes`` payload bytes of ``dtype`` for round ``rnd``."""
    return HEADER.pack(MAGIC, kind, _code(dtype), 0, rnd, nbytes)


def parse(data: bytes | bytearray | memoryview) -> tuple[int, np.dtype | None, int, int]:
    """``(kind, dtype or None when unknown, round, payload bytes)`` of a header; BaselineError if not one."""
    if len(data) < HEADER.size:
        raise BaselineError(f"a frame of {len(data)} bytes is shorter than its {HEADER.size}-byte header")
    magic, kind, code, reserved, rnd, nbytes = HEADER.unpack_from(data)
    if magic != MAGIC or reserved != 0:
        raise BaselineError("not a baseline frame (bad magic)")
    return kind, _DTYPES.get(code), rnd, nbytes


def bytes_of(a: np.ndarray) -> memoryview:
    """A flat byte view of a C-contiguous array (no copy)."""
    if not a.flags.c_contiguous:
        raise ValueError("the baselines send and receive C-contiguous arrays only")
    return memoryview(a.reshape(-1).view(np.uint8))


def subkey(key: bytes, label: bytes) -> bytes:
    """A key of its own for each protocol, derived from the pair key (domain separation)."""
    return hmac.new(key, b"lossympi-baseline-subkey\0" + label, hashlib.sha256).digest()


async def recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from the non-blocking ``sock``; ConnectionError if the peer closes first."""
    got, n = 0, len(view)
    while got < n:
        k = await loop.sock_recv_into(sock, view[got:])
        if k == 0:
            raise ConnectionError(f"the peer closed the connection after {got} of {n} bytes")
        got += k
