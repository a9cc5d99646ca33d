"""The lossympi datagram format (docs/protocol.md), in Python.

The Cython core builds and parses datagrams itself; this module exposes the format for tests, tools and anyone
writing a peer in another language. Every constant it shares with the core (header layout, kinds, flags, sizes,
dtype codes, reject reasons) is imported from the core, which is their one source.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lossympi import _core
from lossympi._core import (
    DEFAULT_DATAGRAM_BYTES,
    DTYPE_CODES,
    FLAG_MAC,
    HAVE_CLMUL,
    HEADER_FIELDS,
    HEADER_FORMAT,
    HEADER_SIZE,
    KIND_CREDIT,
    KIND_DATA,
    KIND_FIN,
    MAC_IMPLS,
    MAC_LABEL,
    MAC_SIZE,
    MAX_DATAGRAM_BYTES,
    PROTOCOL_VERSION,
    REJECT_REASONS,
    RESERVED_TAG,
    chunk_count,
    mac_seconds,
    stride_for,
)

__all__ = [
    "CORE_FILE",
    "DEFAULT_DATAGRAM_BYTES",
    "DTYPE_CODES",
    "FIELDS",
    "FLAG_MAC",
    "HAVE_CLMUL",
    "MAC_IMPLS",
    "mac_seconds",
    "MAC_LABEL",
    "HEADER",
    "HEADER_FIELDS",
    "HEADER_SIZE",
    "KIND_CREDIT",
    "KIND_DATA",
    "KIND_FIN",
    "MAC_SIZE",
    "MAX_DATAGRAM_BYTES",
    "PROTOCOL_VERSION",
    "REJECT_REASONS",
    "RESERVED_TAG",
    "Header",
    "chunk_count",
    "dtype_code",
    "mac",
    "mac_keys",
    "pack_datagram",
    "stride_for",
]

#: The 32-byte header as a :class:`struct.Struct` (fields in :data:`HEADER_FIELDS` order).
HEADER = struct.Struct(HEADER_FORMAT)
#: Header field name -> ``(byte offset, struct format)``, e.g. ``FIELDS["index"] == (20, "<I")``.
FIELDS: dict[str, tuple[int, str]] = {name: (off, "<" + code) for name, off, code in HEADER_FIELDS}
#: The compiled core this process loaded (the file that builds and parses datagrams).
CORE_FILE: str = str(_core.__file__)


def _check_layout() -> None:
    """The core's field offsets are the packed offsets of its struct format, and the header is HEADER_SIZE bytes."""
    off = 0
    for name, at, code in HEADER_FIELDS:
        if at != off:
            raise ImportError(f"lossympi core: header field {name} at byte {at}, packed at {off}: rebuild the core")
        off += struct.calcsize("<" + code)
    if off != HEADER_SIZE or HEADER.size != HEADER_SIZE:
        raise ImportError(f"lossympi core: header of {off} bytes, not {HEADER_SIZE}: rebuild the core")


_check_layout()


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
    """The 32-byte datagram header (a FIN has ``kind=KIND_FIN``, ``index=0`` and ``length=0``)."""

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

    @classmethod
    def fin(cls, src: int, tag: int, tensor_id: int, count: int, stride: int, dtype: int = DTYPE_CODES["float32"],
            flags: int = FLAG_MAC) -> Header:
        """The header of the FIN of message ``(src, tag, tensor_id)`` of ``count`` chunks, as the core sends it."""
        return cls(src=src, tag=tag, tensor_id=tensor_id, index=0, count=count, length=0, stride=stride,
                   dtype=dtype, flags=flags, kind=KIND_FIN)

    @classmethod
    def credit(cls, src: int, tag: int, tensor_id: int, grant: int, count: int, stride: int,
               dtype: int = DTYPE_CODES["float32"], flags: int = FLAG_MAC) -> Header:
        """The header of a CREDIT from receiver ``src`` for message ``(tag, tensor_id)`` of ``count`` chunks: its
        sender may send chunk indices below ``grant`` (``index`` carries the grant)."""
        return cls(src=src, tag=tag, tensor_id=tensor_id, index=grant, count=count, length=0, stride=stride,
                   dtype=dtype, flags=flags, kind=KIND_CREDIT)


def mac_keys(key: bytes) -> tuple[bytes, bytes]:
    """The MAC's two AES-128 keys ``(K1, K2)`` from a 32-byte pair key: ``BLAKE2b-256(key, MAC_LABEL)``, halved."""
    k12 = hashlib.blake2b(MAC_LABEL, key=key, digest_size=32).digest()
    return k12[:16], k12[16:]


def _aes_block(key: bytes, block: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return enc.update(block) + enc.finalize()


def mac(key: bytes, data: bytes) -> bytes:
    """The datagram MAC (docs/protocol.md, "Authentication and keys"): ``AES-128(K2, GHASH_H(data))`` with
    ``H = AES-128(K1, 0^128)``.

    GHASH_H(data) is GCM's hash of ``data`` as additional data with an empty plaintext (NIST SP 800-38D), so this
    reference takes it from a GCM library rather than from the core: a GCM tag under ``K1`` and nonce ``N`` is
    ``GHASH_H(data) XOR AES-128(K1, N || 0x00000001)``.
    """
    k1, k2 = mac_keys(key)
    nonce = bytes(12)
    gcm_tag = AESGCM(k1).encrypt(nonce, b"", data)
    ghash = bytes(a ^ b for a, b in zip(gcm_tag, _aes_block(k1, nonce + b"\0\0\0\1"), strict=True))
    return _aes_block(k2, ghash)


def pack_datagram(header: Header, payload: bytes, key: bytes | None) -> bytes:
    """Header + payload (+ MAC when ``key`` is given): one datagram as the core would send it."""
    body = header.pack() + payload
    return body + mac(key, body) if key is not None else body
