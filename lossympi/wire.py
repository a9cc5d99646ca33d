"""The lossympi datagram format (docs/protocol.md), in Python.

The Cython core builds and parses datagrams itself; this module mirrors the format for tests, tools and
anyone writing a peer in another language. Keep both in step with docs/protocol.md.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np

from lossympi._core import HEADER_SIZE, MAC_SIZE, PROTOCOL_VERSION, REJECT_REASONS, chunk_count, stride_for

__all__ = [
    "DTYPE_CODES",
    "HEADER",
    "HEADER_SIZE",
    "KIND_DATA",
    "MAC_SIZE",
    "PROTOCOL_VERSION",
    "REJECT_REASONS",
    "FLAG_MAC",
    "Header",
    "chunk_count",
    "dtype_code",
    "pack_datagram",
    "stride_for",
    "DEFAULT_DATAGRAM_BYTES",
]

KIND_DATA = 1
FLAG_MAC = 1
DEFAULT_DATAGRAM_BYTES = 1472  # 1500-byte MTU - 20 (IPv4) - 8 (UDP)
HEADER = struct.Struct("<BBBBIQIIIHH")
assert HEADER.size == HEADER_SIZE

DTYPE_CODES: dict[str, int] = {
    "int8": 1, "uint8": 2, "int16": 3, "uint16": 4, "int32": 5, "uint32": 6, "int64": 7, "uint64": 8,
    "float16": 9, "float32": 10, "float64": 11, "bfloat16": 12,
}


def dtype_code(dtype: np.dtype | type | str) -> int:
    """Wire code of a numpy dtype; ValueError names the supported ones."""
    dt = np.dtype(dtype)
    code = DTYPE_CODES.get(dt.name)
    if code is None or dt.byteorder == ">":
        raise ValueError(
            f"dtype {dt} cannot be sent: lossympi sends native little-endian "
            f"{', '.join(DTYPE_CODES)}")
    return code


@dataclass(frozen=True)
class Header:
    """The 32-byte datagram header."""

    src: int
    tag: int
    tensor_id: int
    index: int
    count: int
    length: int
    stride: int
    dtype: int = DTYPE_CODES["float32"]
    flags: int = FLAG_MAC
    kind: int = KIND_DATA
    version: int = PROTOCOL_VERSION

    def pack(self) -> bytes:
        return HEADER.pack(self.version, self.kind, self.dtype, self.flags, self.src, self.tag,
                           self.tensor_id, self.index, self.count, self.length, self.stride)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Header:
        if len(data) < HEADER_SIZE:
            raise ValueError(f"a header needs {HEADER_SIZE} bytes, got {len(data)}")
        (version, kind, dtype, flags, src, tag, tid, index, count, length, stride) = HEADER.unpack_from(data)
        return cls(src=src, tag=tag, tensor_id=tid, index=index, count=count, length=length,
                   stride=stride, dtype=dtype, flags=flags, kind=kind, version=version)


def mac(key: bytes, data: bytes) -> bytes:
    """The datagram MAC: keyed BLAKE2b with a 16-byte digest."""
    return hashlib.blake2b(data, key=key, digest_size=MAC_SIZE).digest()


def pack_datagram(header: Header, payload: bytes, key: bytes | None) -> bytes:
    """Header + payload (+ MAC when ``key`` is given): one datagram as the core would send it."""
    body = header.pack() + payload
    return body + mac(key, body) if key is not None else body
