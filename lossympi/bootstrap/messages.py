"""Messages of the env:// rendezvous: version, sizes, the authenticating MAC and the checks of every field.

The hello is authenticated over rank 0's nonce and the table over both nonces, with
:func:`lossympi.handshake.prove` under the job secret (format: ``docs/bootstrap.md``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from .. import handshake
from ..keys import PUBLIC_KEY_BYTES
from .addresses import _check_unicast
from .framing import _canonical, _ProtocolError

__all__ = ["MAX_HELLO_BYTES", "NONCE_BYTES", "RENDEZVOUS_VERSION"]

#: Version of the rendezvous protocol (field ``v`` of every message).
RENDEZVOUS_VERSION = 1
#: Largest rendezvous message rank 0 accepts from a client (length prefix excluded).
MAX_HELLO_BYTES = 64 * 1024
#: Size of the server and client nonces.
NONCE_BYTES = 32
_HELLO_LABEL = b"lossympi-rendezvous-hello-v1\0"
_TABLE_LABEL = b"lossympi-rendezvous-table-v1\0"
_HELLO_FIELDS = frozenset({"type", "v", "rank", "world_size", "host", "port", "public_key", "nonce", "mac"})
_TABLE_FIELDS = frozenset({"type", "v", "world_size", "peers", "mac"})
_PEER_FIELDS = frozenset({"host", "port", "public_key"})


def _unsigned(body: Mapping[str, Any]) -> bytes:
    return _canonical({k: v for k, v in body.items() if k != "mac"})


def _mac(secret: bytes, label: bytes, nonces: tuple[bytes, ...], body: Mapping[str, Any]) -> str:
    return handshake.prove(secret, label, nonces, _unsigned(body)).hex()


def _mac_ok(secret: bytes, label: bytes, nonces: tuple[bytes, ...], msg: Mapping[str, Any]) -> bool:
    mac = msg.get("mac")
    if not isinstance(mac, str) or len(mac) != 2 * handshake.MAC_BYTES:
        return False
    return handshake.verify(secret, label, nonces, _unsigned(msg), mac)


def _hex_bytes(value: Any, n: int, what: str) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * n:
        raise _ProtocolError(f"{what} must be {n} bytes of hex")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise _ProtocolError(f"{what} is not hex") from None
    if len(raw) != n:
        raise _ProtocolError(f"{what} must be {n} bytes of hex")
    return raw


def _int_field(msg: Mapping[str, Any], name: str) -> int:
    value = msg.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _ProtocolError(f"field {name!r} must be an integer")
    return value


def _ip_field(value: Any, what: str) -> str:
    if not isinstance(value, str) or len(value) > 15:
        raise _ProtocolError(f"{what} must be a dotted IPv4 address")
    try:
        ip = str(ipaddress.IPv4Address(value))
        _check_unicast(ip, what)
    except ValueError as exc:
        raise _ProtocolError(str(exc)) from None
    return ip


def _peer_entry(obj: Any, what: str) -> tuple[str, int, bytes]:
    if not isinstance(obj, dict) or set(obj) != _PEER_FIELDS:
        raise _ProtocolError(f"{what}: expected fields {sorted(_PEER_FIELDS)}")
    ip = _ip_field(obj["host"], f"{what} host")
    port = _int_field(obj, "port")
    if not 1 <= port <= 65535:
        raise _ProtocolError(f"{what}: port {port} not in 1..65535")
    return ip, port, _hex_bytes(obj["public_key"], PUBLIC_KEY_BYTES, f"{what} public_key")
