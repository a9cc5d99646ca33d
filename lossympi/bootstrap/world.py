"""The :class:`World` a bootstrap returns, built from a table of addresses and public keys; :func:`local_worlds`."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..keys import PUBLIC_KEY_BYTES, KeyPair, derive_pair_keys
from .addresses import _check_unicast, _resolve_ipv4, bind_udp_and_control

if TYPE_CHECKING:
    from .rejoin import RejoinService

__all__ = ["World", "local_worlds"]

@dataclass(eq=False)
class World:
    """What a rank needs to talk to the others: addresses, pair keys and its own UDP socket.

    Attributes
    ----------
    rank : int
        This rank, ``0 <= rank < size``.
    size : int
        Number of ranks.
    addresses : list[tuple[str, int]]
        UDP ``(IPv4 address, port)`` of every rank; index = rank.
    keys : dict[int, bytes]
        32-byte MAC key shared with every other rank (``keys[j]`` for ``j != rank``). Hidden from ``repr``.
    sock : socket.socket
        This rank's bound, non-blocking ``AF_INET`` UDP socket; ``sock.getsockname() == addresses[rank]``.
    control : socket.socket or None
        A listening TCP socket bound to the same ``(address, port)`` as ``sock``: the reliable control
        channel of :class:`lossympi.control.TCPControl` (rank ``r``'s control address is
        ``addresses[r]`` over TCP).
    info : dict
        How the world was built (``"method"``; for rank 0 of :func:`from_env`, ``"rejected"``: counts of
        refused rendezvous connections by reason). Informative only.
    rendezvous : RejoinService or None
        Rank 0 of :func:`from_env` with ``rejoin=True``: the rendezvous, still listening for restarted ranks.
    port_range : tuple[int, int] or None
        The inclusive UDP port range this rank's sockets were bound in (``LOSSYMPI_PORT_RANGE``), if one was
        set; the control channel binds its UDP copy socket in it too (:mod:`lossympi.control_copies`).
    """

    rank: int
    size: int
    addresses: list[tuple[str, int]]
    keys: dict[int, bytes] = field(repr=False)
    sock: socket.socket
    info: dict[str, Any] = field(default_factory=dict, repr=False)
    control: socket.socket | None = field(default=None, repr=False)
    rendezvous: RejoinService | None = field(default=None, repr=False)
    port_range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is not in [0, size={self.size})")
        if len(self.addresses) != self.size:
            raise ValueError(f"{len(self.addresses)} addresses for a world of size {self.size}")

    @property
    def address(self) -> tuple[str, int]:
        """tuple[str, int]: This rank's UDP address."""
        return self.addresses[self.rank]

    def close(self) -> None:
        """Close the UDP socket, the control listener and the rejoin service. Idempotent."""
        self.sock.close()
        if self.control is not None:
            self.control.close()
        if self.rendezvous is not None:
            self.rendezvous.close()

    def __enter__(self) -> World:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _world_from_table(
    rank: int,
    size: int,
    sock: socket.socket,
    keypair: KeyPair,
    addresses: list[tuple[str, int]],
    publics: list[bytes],
    info: dict[str, Any],
    control: socket.socket | None = None,
    port_range: tuple[int, int] | None = None,
) -> World:
    keys = derive_pair_keys(rank, keypair, dict(enumerate(publics)))
    return World(rank=rank, size=size, addresses=addresses, keys=keys, sock=sock, info=info, control=control,
                 port_range=port_range)


def _check_table(addresses: list[tuple[str, int]], publics: list[bytes]) -> None:
    """Reject a table with malformed or duplicated entries."""
    seen: dict[tuple[str, int], int] = {}
    for r, ((ip, port), pub) in enumerate(zip(addresses, publics, strict=True)):
        _check_unicast(str(ipaddress.IPv4Address(ip)), f"address of rank {r}")
        if not 1 <= port <= 65535:
            raise ValueError(f"rank {r} announces UDP port {port}, not in 1..65535")
        if len(pub) != PUBLIC_KEY_BYTES:
            raise ValueError(f"rank {r} announces a {len(pub)}-byte public key, expected {PUBLIC_KEY_BYTES}")
        other = seen.setdefault((ip, port), r)
        if other != r:
            raise ValueError(f"ranks {other} and {r} announce the same UDP address {ip}:{port}")


def local_worlds(size: int, host: str = "127.0.0.1") -> list[World]:
    """Build every rank of a world inside this process (tests, single-process runs).

    Parameters
    ----------
    size : int
        Number of ranks, at least 1.
    host : str
        Address every socket binds to.

    Returns
    -------
    list[World]
        One :class:`World` per rank, index = rank, each with its own socket and key pair.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    _check_unicast(_resolve_ipv4(host), "host")
    socks: list[socket.socket] = []
    controls: list[socket.socket] = []
    try:
        for _ in range(size):
            udp, tcp = bind_udp_and_control(host)
            socks.append(udp)
            controls.append(tcp)
        keypairs = [KeyPair() for _ in range(size)]
        addresses = [(str(s.getsockname()[0]), int(s.getsockname()[1])) for s in socks]
        publics = [kp.public_bytes for kp in keypairs]
        return [
            _world_from_table(r, size, socks[r], keypairs[r], list(addresses), publics, {"method": "local"},
                              controls[r])
            for r in range(size)
        ]
    except BaseException:
        for s in socks + controls:
            s.close()
        raise
