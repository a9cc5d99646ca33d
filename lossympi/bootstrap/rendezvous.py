"""The env:// bootstrap: :func:`from_env` (rank 0 serves the rendezvous, the other ranks join it)."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from ..keys import KeyPair
from .addresses import _check_unicast, _default_ip_towards, _resolve_ipv4, bind_udp_and_control
from .client import _join
from .env import _env_config, _EnvConfig
from .rejoin import RejoinService
from .server import _Server
from .world import World, _check_table, _world_from_table

__all__ = ["from_env"]

def from_env(
    host: str | None = None,
    port_range: tuple[int, int] | None = None,
    timeout: float = 60.0,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    rendezvous: str | None = None,
    secret: str | bytes | None = None,
    read_timeout: float = 10.0,
    environ: Mapping[str, str] | None = None,
    rejoin: bool = False,
) -> World:
    """Bootstrap through an authenticated TCP rendezvous on rank 0 (``torch.distributed`` ``env://`` style).

    Rank 0 listens on ``LOSSYMPI_RENDEZVOUS``; every other rank connects (retrying until ``timeout``),
    answers rank 0's fresh nonce with its ``{rank, host, UDP port, X25519 public key}`` authenticated by
    HMAC-SHA256 under the job secret, and receives the full table authenticated the same way over its own
    nonce. The message format is in ``docs/bootstrap.md``.

    Parameters
    ----------
    host : str, optional
        UDP address to bind and advertise. Default: ``LOSSYMPI_HOST``, else the local address that routes
        to the rendezvous host (``127.0.0.1`` if that is a loopback address).
    port_range : tuple[int, int], optional
        Inclusive UDP port range. Default: ``LOSSYMPI_PORT_RANGE="first-last"``, else an ephemeral port.
    timeout : float
        Seconds for the whole rendezvous (rank 0: until every rank has joined).
    rank, world_size, rendezvous, secret : optional
        Override ``LOSSYMPI_RANK``, ``LOSSYMPI_WORLD_SIZE``, ``LOSSYMPI_RENDEZVOUS`` (``"host:port"``) and
        ``LOSSYMPI_SECRET`` (a ``str`` is hashed like the variable; ``bytes`` are used as the key).
    read_timeout : float
        Rank 0: seconds a new connection has to send its hello. Others: seconds to wait for the challenge.
    environ : Mapping[str, str], optional
        Environment to read instead of ``os.environ``.
    rejoin : bool
        Rank 0: keep the rendezvous listening once the world has formed, as ``World.rendezvous`` (a
        :class:`RejoinService`), so that a restarted rank can rejoin. Other ranks need nothing special: a
        restarted rank calls :func:`from_env` as it did the first time.

    Returns
    -------
    World

    Raises
    ------
    RendezvousError
        Missing configuration (notably ``LOSSYMPI_SECRET``), or rank 0 refused this rank.
    RendezvousAuthError
        The ranks do not share the same secret (this rank's hello or rank 0's table does not verify).
    TimeoutError
        The rendezvous did not complete within ``timeout``.
    """
    cfg = _env_config(
        os.environ if environ is None else environ,
        rank=rank,
        world_size=world_size,
        rendezvous=rendezvous,
        secret=secret,
        host=host,
        port_range=port_range,
    )
    if timeout <= 0 or read_timeout <= 0:
        raise ValueError("timeout and read_timeout must be positive")
    return _rendezvous(cfg, timeout, read_timeout, rejoin)


def _rendezvous(cfg: _EnvConfig, timeout: float, read_timeout: float, rejoin: bool) -> World:
    """Bind this rank's sockets, run the rendezvous (serve it on rank 0, join it elsewhere), build the world."""
    deadline = time.monotonic() + timeout
    ip = _resolve_ipv4(cfg.host) if cfg.host is not None else _default_ip_towards(cfg.rdzv_host)
    _check_unicast(ip, "host")
    sock, control = bind_udp_and_control(ip, cfg.port_range)
    service: RejoinService | None = None
    try:
        keypair = KeyPair()
        own = (ip, int(sock.getsockname()[1]), keypair.public_bytes)
        info: dict[str, Any] = {"method": "env"}
        if cfg.rank == 0 and cfg.size == 1:
            table = [own]
        elif cfg.rank == 0:
            server = _Server(cfg, own, keypair, deadline, read_timeout)
            table = server.run(timeout, keep_listening=rejoin)
            info["rejected"] = dict(server.rejected)
            if rejoin:
                service = RejoinService(server)
        else:
            table = _join(cfg, own, deadline, timeout, read_timeout)
        addresses = [(t[0], t[1]) for t in table]
        publics = [t[2] for t in table]
        _check_table(addresses, publics)
        world = _world_from_table(cfg.rank, cfg.size, sock, keypair, addresses, publics, info, control,
                                  cfg.port_range)
        world.rendezvous = service
        return world
    except BaseException:
        sock.close()
        control.close()
        if service is not None:
            service.close()
        raise
