"""Turn network device offload features on or off (``ethtool -K`` without the ``ethtool`` program).

Used by :class:`lossympi.netem.Cluster` on every host's ``eth0`` (so that its loss applies per packet), and as a
command inside a namespace::

    python -m lossympi._ethtool eth0 tx-tcp-segmentation=off tx-udp-segmentation=off ...

prints a JSON object ``{feature: active}`` after the change (features the device does not know are left out).
It talks to the kernel with the ``SIOCETHTOOL`` ioctl (``ETHTOOL_GSSET_INFO`` / ``ETHTOOL_GSTRINGS`` for the
feature names, ``ETHTOOL_SFEATURES`` / ``ETHTOOL_GFEATURES`` to set and read them); it needs ``CAP_NET_ADMIN``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import json
import os
import socket
import struct
import sys
import threading
from collections.abc import Mapping

__all__ = ["feature_names", "get_features", "netns_socket", "set_features"]

CLONE_NEWNET = 0x40000000

SIOCETHTOOL = 0x8946
ETHTOOL_GSTRINGS = 0x1B
ETHTOOL_GSSET_INFO = 0x37
ETHTOOL_GFEATURES = 0x3A
ETHTOOL_SFEATURES = 0x3B
ETH_SS_FEATURES = 4
_STRING_LEN = 32
_IFREQ_SIZE = 40


def _ioctl(sock: socket.socket, dev: str, buf: ctypes.Array) -> None:
    ifr = bytearray(struct.pack("16sP", dev.encode(), ctypes.addressof(buf)).ljust(_IFREQ_SIZE, b"\0"))
    fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifr)


def feature_names(sock: socket.socket, dev: str) -> list[str]:
    """Names of the device features, in bit order (``ethtool -k`` names)."""
    buf = ctypes.create_string_buffer(struct.pack("IIQI", ETHTOOL_GSSET_INFO, 0, 1 << ETH_SS_FEATURES, 0))
    _ioctl(sock, dev, buf)
    (count,) = struct.unpack_from("I", buf.raw, 16)
    buf = ctypes.create_string_buffer(struct.pack("III", ETHTOOL_GSTRINGS, ETH_SS_FEATURES, count)
                                      + bytes(_STRING_LEN * count))
    _ioctl(sock, dev, buf)
    raw = buf.raw[12:12 + _STRING_LEN * count]
    return [raw[i * _STRING_LEN:(i + 1) * _STRING_LEN].split(b"\0")[0].decode() for i in range(count)]


def get_features(sock: socket.socket, dev: str, names: list[str] | None = None) -> dict[str, bool]:
    """``{feature: active}`` for every feature of ``dev``."""
    names = feature_names(sock, dev) if names is None else names
    blocks = (len(names) + 31) // 32
    buf = ctypes.create_string_buffer(struct.pack("II", ETHTOOL_GFEATURES, blocks) + bytes(16 * blocks))
    _ioctl(sock, dev, buf)
    out = {}
    for i, name in enumerate(names):
        _avail, _req, active, _never = struct.unpack_from("IIII", buf.raw, 8 + 16 * (i // 32))
        out[name] = bool(active >> (i % 32) & 1)
    return out


def netns_socket(netns: str) -> socket.socket:
    """A UDP socket that lives in the named network namespace (``/run/netns/<netns>``, as ``ip netns`` makes).

    A short-lived thread enters the namespace (``setns`` changes only the calling thread) and opens the socket;
    a socket stays in the namespace it was created in, so the caller's device ioctls on it name that
    namespace's devices. Needs ``CAP_SYS_ADMIN``.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    box: dict[str, object] = {}

    def enter() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into network namespace {netns!r}: {os.strerror(err)}")
            finally:
                os.close(fd)
            box["sock"] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    t = threading.Thread(target=enter, name=f"setns-{netns}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["sock"]  # type: ignore[return-value]


def set_features(dev: str, wanted: Mapping[str, bool], netns: str | None = None) -> dict[str, bool]:
    """Request ``wanted`` features on ``dev`` (unknown names are skipped); returns their active state after.

    ``netns``: the device's network namespace (default: this process's).
    """
    with (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) if netns is None else netns_socket(netns)) as sock:
        names = feature_names(sock, dev)
        blocks = [[0, 0] for _ in range((len(names) + 31) // 32)]
        for name, on in wanted.items():
            if name not in names:
                continue
            i = names.index(name)
            blocks[i // 32][0] |= 1 << (i % 32)
            if on:
                blocks[i // 32][1] |= 1 << (i % 32)
        buf = ctypes.create_string_buffer(struct.pack("II", ETHTOOL_SFEATURES, len(blocks))
                                          + b"".join(struct.pack("II", v, r) for v, r in blocks))
        _ioctl(sock, dev, buf)
        now = get_features(sock, dev, names)
    return {name: now[name] for name in wanted if name in now}


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m lossympi._ethtool DEV FEATURE=on|off ...", file=sys.stderr)
        return 2
    wanted = {}
    for arg in argv[1:]:
        name, _, value = arg.partition("=")
        if value not in ("on", "off"):
            print(f"bad argument {arg!r}: expected FEATURE=on or FEATURE=off", file=sys.stderr)
            return 2
        wanted[name] = value == "on"
    print(json.dumps(set_features(argv[0], wanted)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
