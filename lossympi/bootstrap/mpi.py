"""Bootstrap under ``mpiexec``: :func:`from_mpi`, one ``allgather`` of ``(host, port, X25519 public key)``.

``mpi4py`` is imported only when :func:`from_mpi` runs.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from typing import Any

from ..keys import KeyPair
from .addresses import _check_unicast, _default_ip_towards, _resolve_ipv4, bind_udp_and_control
from .env import _parse_port_range
from .errors import RendezvousError
from .variables import ENV_HOST, ENV_PORT_RANGE
from .world import World, _check_table, _world_from_table

__all__ = ["from_mpi"]

logger = logging.getLogger(__name__)

def _mpi_default_ip(rank: int, names: list[str]) -> str:
    """Address to advertise under MPI, given every rank's processor name."""
    if len(set(names)) == 1:
        return "127.0.0.1"
    own = names[rank]
    target = names[0] if names[0] != own else next(n for n in names if n != own)
    ip = _default_ip_towards(target)
    if ipaddress.IPv4Address(ip).is_loopback:
        logger.warning(
            "rank %d: the ranks run on several hosts but the address routing to %s is %s (loopback); "
            "the other hosts will not reach this rank. Set %s.",
            rank,
            target,
            ip,
            ENV_HOST,
        )
    return ip


def from_mpi(comm: Any = None, host: str | None = None, port_range: tuple[int, int] | None = None) -> World:
    """Bootstrap over MPI: one ``allgather`` of ``(host, port, X25519 public key)``.

    Collective over ``comm``: every rank must call it. If one rank fails locally (cannot bind, bad
    host...), every rank raises, instead of the others hanging.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        Communicator (default ``MPI.COMM_WORLD``); gives the rank and size.
    host : str, optional
        Address to bind and advertise. Default: ``LOSSYMPI_HOST`` if set, else ``127.0.0.1`` when all ranks
        share one processor name (``MPI.Get_processor_name``), else the local address that routes to rank
        0's host (to another host for the ranks on rank 0's host).
    port_range : tuple[int, int], optional
        Inclusive UDP port range to bind in. Default: ``LOSSYMPI_PORT_RANGE`` (``first-last``) if set, else an
        ephemeral port. Rank 0's TCP control listener takes the same port number.

    Returns
    -------
    World
    """
    from mpi4py import MPI  # lazy: mpi4py is optional

    if comm is None:
        comm = MPI.COMM_WORLD
    rank, size = int(comm.Get_rank()), int(comm.Get_size())
    names = [str(n) for n in comm.allgather(MPI.Get_processor_name())]  # collective on every rank

    sock: socket.socket | None = None
    control: socket.socket | None = None
    keypair: KeyPair | None = None
    entry: tuple[bool, Any]
    try:
        chosen = host if host is not None else os.environ.get(ENV_HOST) or None
        if port_range is None and os.environ.get(ENV_PORT_RANGE):
            port_range = _parse_port_range(os.environ[ENV_PORT_RANGE])
        ip = _resolve_ipv4(chosen) if chosen is not None else _mpi_default_ip(rank, names)
        _check_unicast(ip, "host")
        sock, control = bind_udp_and_control(ip, port_range)
        keypair = KeyPair()
        entry = (True, (ip, int(sock.getsockname()[1]), keypair.public_bytes))
    except Exception as exc:  # report to every rank instead of deadlocking them
        entry = (False, f"{type(exc).__name__}: {exc}")
    entries = comm.allgather(entry)
    try:
        failed = [(r, msg) for r, (ok, msg) in enumerate(entries) if not ok]
        if failed:
            detail = "; ".join(f"rank {r}: {msg}" for r, msg in failed)
            raise RendezvousError(f"MPI bootstrap failed on {len(failed)} rank(s): {detail}")
        assert sock is not None and keypair is not None
        addresses = [(str(e[1][0]), int(e[1][1])) for e in entries]
        publics = [bytes(e[1][2]) for e in entries]
        _check_table(addresses, publics)
        return _world_from_table(rank, size, sock, keypair, addresses, publics, {"method": "mpi"}, control,
                                 port_range)
    except BaseException:
        for s in (sock, control):
            if s is not None:
                s.close()
        raise
