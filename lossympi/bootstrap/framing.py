"""Framing of the env:// rendezvous: ``u32 big-endian length | canonical JSON object``."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Mapping
from typing import Any

__all__: list[str] = []

_LEN = struct.Struct(">I")


class _ProtocolError(Exception):
    """A peer sent something that is not a valid rendezvous message."""


def _canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _frame(obj: Mapping[str, Any]) -> bytes:
    body = _canonical(obj)
    return _LEN.pack(len(body)) + body


def _decode(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _ProtocolError(f"not JSON ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise _ProtocolError("not a JSON object")
    return obj


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 16))
        if not chunk:
            raise EOFError("connection closed by peer")
        buf += chunk
    return bytes(buf)


def _recv_frame(sock: socket.socket, limit: int) -> dict[str, Any]:
    (length,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if not 0 < length <= limit:
        raise _ProtocolError(f"message length {length} not in 1..{limit}")
    return _decode(_recv_exact(sock, length))
