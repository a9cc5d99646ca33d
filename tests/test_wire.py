"""The datagram format (lossympi.wire, docs/protocol.md) and the core's arithmetic and MAC."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lossympi import _core, wire
from lossympi.wire import Header

U8 = st.integers(0, 0xFF)
U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFFFFFF)
U64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)

headers = st.builds(
    Header, src=U32, tag=U64, tensor_id=U32, index=U32, count=U32, length=U16, stride=U16,
    dtype=U8, flags=U8, kind=U8, version=U8,
)


# ---------------------------------------------------------------------------------------------- header


def test_constants_match_the_spec():
    assert wire.HEADER_SIZE == 32 == wire.HEADER.size
    assert wire.MAC_SIZE == 16
    assert wire.PROTOCOL_VERSION == 2
    assert wire.KIND_DATA == 1 and wire.KIND_FIN == 2 and wire.FLAG_MAC == 1
    assert wire.DEFAULT_DATAGRAM_BYTES == 1500 - 20 - 8 and wire.MAX_DATAGRAM_BYTES == 65535 - 20 - 8
    assert wire.RESERVED_TAG == 2**64 - 1
    assert [(n, off) for n, off, _ in wire.HEADER_FIELDS] == [
        ("version", 0), ("kind", 1), ("dtype", 2), ("flags", 3), ("src", 4), ("tag", 8), ("tensor_id", 16),
        ("index", 20), ("count", 24), ("length", 28), ("stride", 30)]
    assert wire.FIELDS["index"] == (20, "<I") and wire.FIELDS["tag"] == (8, "<Q")


SHARED = ("HEADER_SIZE", "MAC_SIZE", "PROTOCOL_VERSION", "KIND_DATA", "KIND_FIN", "KIND_CREDIT", "FLAG_MAC",
          "MAC_LABEL", "MAC_IMPLS", "HAVE_CLMUL", "DEFAULT_DATAGRAM_BYTES",
          "MAX_DATAGRAM_BYTES", "RESERVED_TAG", "HEADER_FIELDS", "HEADER_FORMAT", "DTYPE_CODES", "REJECT_REASONS")


@pytest.mark.parametrize("name", SHARED)
def test_wire_takes_shared_constants_from_the_core(name):
    """One source: each constant wire shares with the core is the core's own object, not a copy typed twice."""
    assert getattr(wire, name) is getattr(_core, name)


def test_wire_defines_no_constant_of_its_own():
    """Every upper-case int/str/tuple/dict constant in wire.py is the core's, or derived from the core's."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(wire))
    literals = [t.id for node in tree.body if isinstance(node, ast.Assign | ast.AnnAssign)
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(t, ast.Name) and t.id.isupper() and isinstance(node.value, ast.Constant | ast.Dict)]
    assert literals == [], f"hand-written constants in lossympi/wire.py: {literals}"


def test_header_layout_matches_the_core_offsets():
    """A header packed by wire puts each field where the core reads it: the field is found at its offset."""
    h = Header(src=0xA1A2A3A4, tag=0xB1B2B3B4B5B6B7B8, tensor_id=0xC1C2C3C4, index=0xD1D2D3D4, count=0xE1E2E3E4,
               length=0xF1F2, stride=0xF3F4, dtype=0x55, flags=0x66, kind=0x77, version=0x88)
    raw = h.pack()
    for name, off, code in wire.HEADER_FIELDS:
        assert struct.unpack_from("<" + code, raw, off)[0] == getattr(h, name), name


@given(headers)
def test_header_round_trip(h: Header):
    raw = h.pack()
    assert len(raw) == 32
    assert Header.unpack(raw) == h
    assert Header.unpack(memoryview(raw + b"payload")) == h


def test_header_field_offsets_little_endian():
    h = Header(src=0x04030201, tag=0x0C0B0A0908070605, tensor_id=0x100F0E0D, index=0x14131211,
               count=0x18171615, length=0x1A19, stride=0x1C1B, dtype=0x1D, flags=0x1E, kind=0x1F,
               version=0x20)
    raw = h.pack()
    assert raw[0] == 0x20 and raw[1] == 0x1F and raw[2] == 0x1D and raw[3] == 0x1E
    assert raw[4:32] == bytes(range(1, 29))


def test_header_defaults_and_short_unpack():
    h = Header(src=1, tag=2, tensor_id=3, index=4, count=5, length=6, stride=16)
    want = (wire.PROTOCOL_VERSION, wire.KIND_DATA, wire.FLAG_MAC, wire.DTYPE_CODES["float32"])
    assert (h.version, h.kind, h.flags, h.dtype) == want
    with pytest.raises(ValueError, match="32 bytes"):
        Header.unpack(h.pack()[:31])


def test_pack_datagram_layout():
    key = bytes(range(32))
    h = Header(src=1, tag=9, tensor_id=0, index=0, count=1, length=5, stride=1424)
    d = wire.pack_datagram(h, b"hello", key)
    assert len(d) == 32 + 5 + 16
    assert d[:32] == h.pack() and d[32:37] == b"hello"
    assert d[37:] == wire.mac(key, d[:37])
    assert wire.pack_datagram(h, b"hello", None) == h.pack() + b"hello"


# ---------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("db,stride", [(1472, 1424), (8972, 8912), (65507, 65456), (64, 16), (79, 16), (80, 32)])
def test_stride_for(db, stride):
    assert wire.stride_for(db) == stride
    assert stride % 16 == 0
    assert stride + 48 <= db


@given(st.integers(64, 65507))
def test_stride_formula(db):
    assert wire.stride_for(db) == (db - 48) // 16 * 16


@pytest.mark.parametrize("db", [0, 63, 65508, 1 << 20, -1])
def test_stride_for_out_of_range(db):
    with pytest.raises(ValueError, match="datagram_bytes"):
        wire.stride_for(db)


@given(st.integers(0, 1 << 40), st.sampled_from([16, 1424, 8912, 65456]))
def test_chunk_count(nbytes, stride):
    c = wire.chunk_count(nbytes, stride)
    assert c == max(1, -(-nbytes // stride))
    if nbytes:
        assert (c - 1) * stride < nbytes <= c * stride


def test_chunk_count_edges():
    assert wire.chunk_count(0, 1424) == 1
    assert wire.chunk_count(1, 1424) == 1
    assert wire.chunk_count(1424, 1424) == 1
    assert wire.chunk_count(1425, 1424) == 2


# ---------------------------------------------------------------------------------------------- MAC


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.binary(min_size=0, max_size=3000), st.integers(1, 64))
def test_core_blake2b_matches_hashlib(key, data, outlen):
    want = hashlib.blake2b(data, key=key, digest_size=outlen).digest()
    assert _core.blake2b_mac(key, data, outlen) == want


def _ghash_bitwise(h: int, data: bytes) -> int:
    """GHASH_H(data) straight from NIST SP 800-38D (Algorithm 1 over the padded blocks and the length block),
    on Python integers: the specification, independent of both the core and the GCM library."""
    def mul(x: int, y: int) -> int:
        z, v = 0, y
        for i in range(128):
            if (x >> (127 - i)) & 1:
                z ^= v
            v = (v >> 1) ^ (0xE1 << 120) if v & 1 else v >> 1
        return z
    padded = data + bytes(-len(data) % 16) + (8 * len(data)).to_bytes(8, "big") + bytes(8)
    y = 0
    for k in range(0, len(padded), 16):
        y = mul(y ^ int.from_bytes(padded[k:k + 16], "big"), h)
    return y


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 31, 32, 33, 127, 128, 129, 255, 256, 257, 1424 + 32])
def test_mac_reference_is_ghash_then_aes(n):
    """wire.mac (GCM library) equals AES-128(K2, GHASH_H(data)) computed from the specification's bit loop."""
    key = hashlib.sha256(b"pair").digest()
    data = bytes((i * 7 + 3) & 0xFF for i in range(n))
    k1, k2 = wire.mac_keys(key)
    h = int.from_bytes(wire._aes_block(k1, bytes(16)), "big")
    assert wire.mac(key, data) == wire._aes_block(k2, _ghash_bitwise(h, data).to_bytes(16, "big"))


FAST = [False, True] if _core.HAVE_CLMUL else [False]


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.binary(max_size=64), st.binary(max_size=3000), st.sampled_from(FAST))
def test_core_mac_matches_reference(key, header, payload, fast):
    """The core's MAC of header || payload, portable and PCLMULQDQ + AES-NI code alike, equals wire.mac, for
    every split of the message between its two parts (the 8-block aggregation, the block across the parts,
    the zero-padded tail)."""
    assert _core.datagram_mac(key, header, payload, fast) == wire.mac(key, header + payload)


@pytest.mark.parametrize("n", [0, 1, 16, 127, 128, 129, 143, 144, 1424 + 32, 8972])
@pytest.mark.parametrize("fast", FAST)
def test_core_mac_block_boundaries(n, fast):
    key = hashlib.sha256(b"k").digest()
    data = bytes((i * 7 + 3) & 0xFF for i in range(n))
    assert _core.datagram_mac(key, data[:32], data[32:], fast) == wire.mac(key, data)
    assert _core.datagram_mac(key, data, b"", fast) == wire.mac(key, data)


def test_core_mac_depends_on_every_byte_and_the_key():
    key = bytes(range(32))
    data = bytes(1456)
    tags = {_core.datagram_mac(key, data, b"")}
    for i in range(0, len(data), 97):
        flipped = bytearray(data)
        flipped[i] ^= 0x01
        tags.add(_core.datagram_mac(key, bytes(flipped), b""))
    tags.add(_core.datagram_mac(bytes(31) + b"\x01", data, b""))
    tags.add(_core.datagram_mac(key, data + b"\0", b""))  # a zero byte more: the length block differs
    assert len(tags) == 2 + len(range(0, len(data), 97)) + 1


def test_core_mac_rejects_bad_key():
    with pytest.raises(ValueError, match="32 bytes"):
        _core.datagram_mac(b"k" * 31, b"", b"")


def test_core_blake2b_rejects_bad_key():
    with pytest.raises(ValueError):
        _core.blake2b_mac(b"", b"x")
    with pytest.raises(ValueError):
        _core.blake2b_mac(b"k" * 65, b"x")


# ---------------------------------------------------------------------------------------------- dtypes


def test_dtype_codes_table():
    assert wire.DTYPE_CODES == {
        "int8": 1, "uint8": 2, "int16": 3, "uint16": 4, "int32": 5, "uint32": 6, "int64": 7, "uint64": 8,
        "float16": 9, "float32": 10, "float64": 11, "bfloat16": 12,
    }
    for name, code in wire.DTYPE_CODES.items():
        if name != "bfloat16":
            assert wire.dtype_code(np.dtype(name)) == code
            assert wire.dtype_code(name) == code
            assert wire.dtype_code(np.dtype(name).newbyteorder("<")) == code


def test_dtype_code_bfloat16_when_available():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    assert wire.dtype_code(ml_dtypes.bfloat16) == 12


@pytest.mark.parametrize(
    "dtype", [np.complex64, np.complex128, object, ">f4", ">i4", ">f8", bool, "U3", "S4", "M8[s]", "V8"]
)
def test_dtype_code_unsupported(dtype):
    with pytest.raises(ValueError, match="cannot be sent") as info:
        wire.dtype_code(dtype)
    assert "float32" in str(info.value)  # names what is supported


def test_header_struct_is_the_documented_layout():
    # version kind dtype flags | src | tag | tensor_id | index | count | length | stride
    assert wire.HEADER.format == "<BBBBIQIIIHH"
    assert struct.calcsize(wire.HEADER.format) == 32
