"""Bootstrap of a lossympi world: UDP addresses of every rank and the pair MAC keys.

Three ways to build a :class:`World` (see ``docs/bootstrap.md``):

- :func:`from_mpi`: under ``mpiexec``; ranks exchange ``(host, port, X25519 public key)`` with one
  ``allgather`` on an MPI communicator (``mpi4py`` is imported only here).
- :func:`from_env`: ``torch.distributed`` ``env://`` style. Rank 0 runs a small TCP rendezvous on
  ``LOSSYMPI_RENDEZVOUS``; every rank authenticates with the shared job secret ``LOSSYMPI_SECRET``. With
  ``rejoin=True`` rank 0 keeps it open (:class:`RejoinService`): a crashed rank restarted with the same
  environment runs a fresh, authenticated X25519 exchange with rank 0 and gets the current table.
- :func:`local_worlds`: every rank in this process, for tests and single-process runs.

In every case each rank draws an ephemeral X25519 key pair and the key of the pair ``(i, j)`` is derived
from the Diffie-Hellman secret of ``i`` and ``j`` (:func:`lossympi.keys.derive_pair_keys`), so no third rank
can compute it. :func:`init` picks the method from the environment.

This module never imports TensorFlow, and imports ``mpi4py`` only in :func:`from_mpi`.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import json
import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import handshake
from .keys import PUBLIC_KEY_BYTES, KeyPair, derive_pair_keys, hash_secret, job_secret_from_env

__all__ = [
    "MAX_HELLO_BYTES",
    "RendezvousAuthError",
    "RendezvousError",
    "RejoinService",
    "World",
    "bind_udp",
    "from_env",
    "from_mpi",
    "init",
    "local_worlds",
]

logger = logging.getLogger(__name__)

#: Version of the rendezvous protocol (field ``v`` of every message).
RENDEZVOUS_VERSION = 1
#: Largest rendezvous message rank 0 accepts from a client (length prefix excluded).
MAX_HELLO_BYTES = 64 * 1024
#: Size of the server and client nonces.
NONCE_BYTES = 32

ENV_RANK = "LOSSYMPI_RANK"
ENV_WORLD_SIZE = "LOSSYMPI_WORLD_SIZE"
ENV_RENDEZVOUS = "LOSSYMPI_RENDEZVOUS"
ENV_SECRET = "LOSSYMPI_SECRET"
ENV_HOST = "LOSSYMPI_HOST"
ENV_PORT_RANGE = "LOSSYMPI_PORT_RANGE"
#: Environment variables whose presence means "launched by mpiexec" (MPICH/Hydra, Intel MPI, Open MPI).
MPI_LAUNCHER_ENV = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_RANK")

_LEN = struct.Struct(">I")
_HELLO_LABEL = b"lossympi-rendezvous-hello-v1\0"
_TABLE_LABEL = b"lossympi-rendezvous-table-v1\0"
_HELLO_FIELDS = frozenset({"type", "v", "rank", "world_size", "host", "port", "public_key", "nonce", "mac"})
_TABLE_FIELDS = frozenset({"type", "v", "world_size", "peers", "mac"})
_PEER_FIELDS = frozenset({"host", "port", "public_key"})
_MAX_LOGGED_REJECTIONS = 32


class RendezvousError(RuntimeError):
    """The ``env://`` rendezvous failed or was refused (bad configuration, rank clash, ...)."""


class RendezvousAuthError(RendezvousError):
    """A rendezvous message did not authenticate: the ranks do not share the same ``LOSSYMPI_SECRET``."""


# ----------------------------------------------------------------------------------------------------------
# World
# ----------------------------------------------------------------------------------------------------------


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
    """

    rank: int
    size: int
    addresses: list[tuple[str, int]]
    keys: dict[int, bytes] = field(repr=False)
    sock: socket.socket
    info: dict[str, Any] = field(default_factory=dict, repr=False)
    control: socket.socket | None = field(default=None, repr=False)
    rendezvous: RejoinService | None = field(default=None, repr=False)

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


# ----------------------------------------------------------------------------------------------------------
# Addresses and sockets
# ----------------------------------------------------------------------------------------------------------


def _resolve_ipv4(host: str) -> str:
    """Return ``host`` as a dotted IPv4 address, resolving a host name if needed."""
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve host {host!r} to an IPv4 address: {exc}") from exc
    if not infos:
        raise OSError(f"host {host!r} has no IPv4 address")
    return str(infos[0][4][0])


def _check_unicast(ip: str, what: str) -> str:
    addr = ipaddress.IPv4Address(ip)
    if addr.is_unspecified or addr.is_multicast or ip == "255.255.255.255":
        raise ValueError(
            f"{what} {ip} is not a usable unicast address: every rank must advertise an address the "
            f"others can send to (set {ENV_HOST} or pass host=...)"
        )
    return ip


def _route_ip(target_ip: str) -> str:
    """Local IPv4 address the kernel would use to reach ``target_ip`` (no packet is sent)."""
    if ipaddress.IPv4Address(target_ip).is_loopback:
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((target_ip, 9))
        return str(probe.getsockname()[0])


def _default_ip_towards(target_host: str) -> str:
    """The address to advertise so that the host ``target_host`` can reach us."""
    try:
        return _route_ip(_resolve_ipv4(target_host))
    except OSError as exc:
        fallback = _resolve_ipv4(socket.gethostname())
        logger.warning(
            "cannot find the local address that routes to %s (%s); advertising %s. Set %s to override.",
            target_host,
            exc,
            fallback,
            ENV_HOST,
        )
        return fallback


def _check_port_range(port_range: tuple[int, int]) -> tuple[int, int]:
    try:
        lo, hi = (int(p) for p in port_range)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"port_range must be a pair of ints (first, last), got {port_range!r}") from exc
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"port_range must satisfy 1 <= first <= last <= 65535, got {lo}-{hi}")
    return lo, hi


def _parse_port_range(text: str) -> tuple[int, int]:
    """Parse ``"a-b"`` (or a single ``"a"``) from ``LOSSYMPI_PORT_RANGE``."""
    parts = text.strip().split("-")
    try:
        if len(parts) == 1:
            lo = hi = int(parts[0])
        elif len(parts) == 2:
            lo, hi = int(parts[0]), int(parts[1])
        else:
            raise ValueError(text)
    except ValueError as exc:
        raise ValueError(
            f"{ENV_PORT_RANGE} must look like 'first-last', e.g. '29500-29599'; got {text!r}"
        ) from exc
    return _check_port_range((lo, hi))


def bind_udp(host: str = "127.0.0.1", port_range: tuple[int, int] | None = None) -> socket.socket:
    """Bind a non-blocking ``AF_INET`` UDP socket.

    Parameters
    ----------
    host : str
        IPv4 address or host name to bind to.
    port_range : tuple[int, int], optional
        Inclusive ``(first, last)`` range of ports to try in order. Default: an ephemeral port chosen by
        the kernel.

    Returns
    -------
    socket.socket
        The bound, non-blocking socket.

    Raises
    ------
    OSError
        If the address cannot be bound, or (with ``port_range``) no port of the range is free.
    """
    ip = _resolve_ipv4(host)
    if port_range is None:
        candidates: range | list[int] = [0]
        lo = hi = 0
    else:
        lo, hi = _check_port_range(port_range)
        candidates = range(lo, hi + 1)
    last: OSError | None = None
    for port in candidates:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((ip, port))
        except OSError as exc:
            sock.close()
            if port_range is not None and exc.errno in (errno.EADDRINUSE, errno.EACCES):
                last = exc
                continue
            raise OSError(
                exc.errno, f"cannot bind a UDP socket to {ip}:{port}: {exc.strerror or exc}"
            ) from exc
        sock.setblocking(False)
        return sock
    raise OSError(
        errno.EADDRINUSE,
        f"no free UDP port on {ip} in the range {lo}-{hi} ({hi - lo + 1} ports tried; last error: {last}); "
        f"widen {ENV_PORT_RANGE} / port_range",
    )


def bind_udp_and_control(
    host: str = "127.0.0.1", port_range: tuple[int, int] | None = None, attempts: int = 64
) -> tuple[socket.socket, socket.socket]:
    """Bind a UDP socket (as :func:`bind_udp`) and a listening TCP socket on the same address and port.

    The TCP socket carries the reliable control channel, so a rank's one ``(address, port)`` names both.
    When the TCP port is taken, another port is tried (``attempts`` times for ephemeral ports, or the
    rest of ``port_range``).
    """
    ranges: list[tuple[int, int] | None]
    if port_range is None:
        ranges = [None] * attempts
    else:
        lo, hi = _check_port_range(port_range)
        ranges = [(p, p) for p in range(lo, hi + 1)]
    last: OSError | None = None
    for pr in ranges:
        try:
            udp = bind_udp(host, pr)
        except OSError as exc:
            if pr is not None and exc.errno in (errno.EADDRINUSE, errno.EACCES):
                last = exc
                continue
            raise
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tcp.bind(udp.getsockname())
            tcp.listen(1024)
            tcp.setblocking(False)
        except OSError as exc:
            tcp.close()
            udp.close()
            last = exc
            continue
        return udp, tcp
    raise OSError(errno.EADDRINUSE, f"no port on {host} is free for both UDP and TCP (last error: {last})")


def _world_from_table(
    rank: int,
    size: int,
    sock: socket.socket,
    keypair: KeyPair,
    addresses: list[tuple[str, int]],
    publics: list[bytes],
    info: dict[str, Any],
    control: socket.socket | None = None,
) -> World:
    keys = derive_pair_keys(rank, keypair, dict(enumerate(publics)))
    return World(rank=rank, size=size, addresses=addresses, keys=keys, sock=sock, info=info, control=control)


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


# ----------------------------------------------------------------------------------------------------------
# MPI
# ----------------------------------------------------------------------------------------------------------


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
        Inclusive UDP port range to bind in (default: ephemeral port).

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
        return _world_from_table(rank, size, sock, keypair, addresses, publics, {"method": "mpi"}, control)
    except BaseException:
        for s in (sock, control):
            if s is not None:
                s.close()
        raise


# ----------------------------------------------------------------------------------------------------------
# env:// rendezvous: framing and messages
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# env:// rendezvous: configuration
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _EnvConfig:
    rank: int
    size: int
    rdzv_host: str
    rdzv_port: int
    secret: bytes
    host: str | None
    port_range: tuple[int, int] | None


_LAUNCH_HELP = (
    f"from_env() needs {ENV_RANK}, {ENV_WORLD_SIZE}, {ENV_RENDEZVOUS}=host:port (rank 0's reachable "
    f"address and a free TCP port) and {ENV_SECRET} (the same long random string on every rank)"
)


def _env_int(env: Mapping[str, str], name: str) -> int:
    raw = env.get(name)
    if raw is None or not raw.strip():
        raise RendezvousError(f"{name} is not set; {_LAUNCH_HELP}")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def _parse_rendezvous(text: str) -> tuple[str, int]:
    host, sep, port_text = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host:
        raise ValueError(f"{ENV_RENDEZVOUS} must look like 'host:port', got {text!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{ENV_RENDEZVOUS} port must be an integer, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{ENV_RENDEZVOUS} port must be in 1..65535, got {port}")
    return host, port


def _env_config(
    env: Mapping[str, str],
    *,
    rank: int | None = None,
    world_size: int | None = None,
    rendezvous: str | None = None,
    secret: str | bytes | None = None,
    host: str | None = None,
    port_range: tuple[int, int] | None = None,
) -> _EnvConfig:
    """Merge explicit arguments over the ``LOSSYMPI_*`` environment variables and validate them."""
    if secret is None:
        key = job_secret_from_env(env)
        if key is None:
            raise RendezvousError(
                f"{ENV_SECRET} is not set: the env:// rendezvous authenticates every rank with this shared "
                f"job secret and refuses to run without it. Set the same long random string on every rank, "
                f"e.g. export {ENV_SECRET}=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
    elif isinstance(secret, str):
        key = hash_secret(secret)
    else:
        key = bytes(secret)
        if len(key) < 16:
            raise ValueError("a bytes secret must be at least 16 bytes long")
    rank = _env_int(env, ENV_RANK) if rank is None else int(rank)
    size = _env_int(env, ENV_WORLD_SIZE) if world_size is None else int(world_size)
    if size < 1:
        raise ValueError(f"world size must be >= 1, got {size}")
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in [0, world size {size})")
    if rendezvous is None:
        rendezvous = env.get(ENV_RENDEZVOUS) or None
        if rendezvous is None:
            raise RendezvousError(f"{ENV_RENDEZVOUS} is not set; {_LAUNCH_HELP}")
    rdzv_host, rdzv_port = _parse_rendezvous(rendezvous)
    if host is None:
        host = env.get(ENV_HOST) or None
    if port_range is None:
        text = env.get(ENV_PORT_RANGE)
        port_range = _parse_port_range(text) if text else None
    else:
        port_range = _check_port_range(port_range)
    return _EnvConfig(rank, size, rdzv_host, rdzv_port, key, host, port_range)


# ----------------------------------------------------------------------------------------------------------
# env:// rendezvous: rank 0 (server)
# ----------------------------------------------------------------------------------------------------------


class _Conn:
    __slots__ = ("sock", "peer", "nonce", "buf", "deadline", "rank", "client_nonce")

    def __init__(self, sock: socket.socket, peer: Any, deadline: float) -> None:
        self.sock = sock
        self.peer = peer
        self.nonce = handshake.new_nonce(NONCE_BYTES)
        self.buf = bytearray()
        self.deadline = deadline
        self.rank: int | None = None
        self.client_nonce = b""


class _Reject(Exception):
    """Refuse a client: ``reason`` is the counter key, ``reply`` (if any) is sent back as an error."""

    def __init__(self, reason: str, detail: str, reply: str | None = None, code: str = "refused") -> None:
        super().__init__(detail)
        self.reason = reason
        self.reply = reply
        self.code = code


class _Server:
    """Single-threaded, selector-based rendezvous server run by rank 0.

    One slow, silent or malicious client never blocks the others: every socket is non-blocking, a
    connection that has not sent a complete hello within ``read_timeout`` is closed, the number of
    connections waiting for their hello is bounded, and any bad input closes only that connection.
    """

    def __init__(
        self,
        cfg: _EnvConfig,
        own: tuple[str, int, bytes],
        keypair: KeyPair,
        deadline: float,
        read_timeout: float,
    ) -> None:
        self.cfg = cfg
        self.keypair = keypair
        self.deadline = deadline
        self.read_timeout = read_timeout
        self.entries: dict[int, tuple[str, int, bytes]] = {0: own}
        self.registered: dict[int, _Conn] = {}
        self.pending: dict[socket.socket, _Conn] = {}
        self.rejected: collections.Counter[str] = collections.Counter()
        self.max_pending = max(64, 4 * cfg.size)
        self.admit: Callable[[int, tuple[str, int], bytes], bool] | None = None  # set by RejoinService
        self.rejoins = 0
        self.closed = False
        self.sel = selectors.DefaultSelector()
        try:
            self.listener = self._listen()
        except BaseException:
            self.sel.close()
            raise

    def _listen(self) -> socket.socket:
        cfg = self.cfg
        # A loopback rendezvous given as a literal address means "single host": do not listen on the network.
        try:
            literal = ipaddress.IPv4Address(cfg.rdzv_host)
        except ValueError:
            literal = None
        bind_ip = str(literal) if literal is not None and literal.is_loopback else "0.0.0.0"
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lst.bind((bind_ip, cfg.rdzv_port))
            lst.listen(min(max(128, cfg.size), 4096))
            lst.setblocking(False)
        except OSError as exc:
            lst.close()
            raise RendezvousError(
                f"rank 0 cannot listen on the rendezvous TCP port {bind_ip}:{cfg.rdzv_port}: {exc}"
            ) from exc
        self.sel.register(lst, selectors.EVENT_READ, None)
        return lst

    # -- bookkeeping --------------------------------------------------------------------------------------

    def _drop(self, conn: _Conn) -> None:
        self.pending.pop(conn.sock, None)
        if conn.rank is not None and self.registered.get(conn.rank) is conn:
            del self.registered[conn.rank]
            self.entries.pop(conn.rank, None)
        self._unregister(conn)

    def _unregister(self, conn: _Conn) -> None:
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def _reject(
        self, conn: _Conn, reason: str, detail: str, reply: str | None = None, code: str = "refused"
    ) -> None:
        self.rejected[reason] += 1
        total = sum(self.rejected.values())
        log = logger.warning if total <= _MAX_LOGGED_REJECTIONS else logger.debug
        log("rendezvous: refused connection from %s (%s): %s", conn.peer, reason, detail)
        if reply is not None:
            try:  # best effort, never blocks: the socket is non-blocking and the reply is small
                conn.sock.send(
                    _frame({"type": "error", "v": RENDEZVOUS_VERSION, "code": code, "reason": reply})
                )
            except OSError:
                pass
        self._drop(conn)

    @staticmethod
    def _alive(sock: socket.socket) -> bool:
        try:
            data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return bool(data)  # b"" = closed by the peer; unexpected data is handled by the event loop

    # -- events -------------------------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: leave the others alone and retry later
                logger.warning("rendezvous: accept failed: %s", exc)
                return
            sock.setblocking(False)
            if len(self.pending) >= self.max_pending:
                oldest = next(iter(self.pending.values()))
                self._reject(oldest, "overflow", "too many connections without a hello; closing the oldest")
            conn = _Conn(sock, peer, time.monotonic() + self.read_timeout)
            challenge = _frame({"type": "challenge", "v": RENDEZVOUS_VERSION, "nonce": conn.nonce.hex()})
            try:
                sent = sock.send(challenge)
            except OSError as exc:
                self.rejected["reset"] += 1
                logger.debug("rendezvous: %s went away before the challenge: %s", peer, exc)
                sock.close()
                continue
            if sent != len(challenge):
                self.rejected["reset"] += 1
                sock.close()
                continue
            self.pending[sock] = conn
            self.sel.register(sock, selectors.EVENT_READ, conn)

    def _readable(self, conn: _Conn) -> None:
        if conn.rank is not None:  # registered, waiting for the table: it must stay silent
            try:
                data = conn.sock.recv(1)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data:
                self._reject(conn, "protocol", f"rank {conn.rank} sent data after its hello")
            else:
                logger.info(
                    "rendezvous: rank %d disconnected before completion; waiting for it again", conn.rank
                )
                self._drop(conn)
            return
        try:
            chunk = conn.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError as exc:
            self._reject(conn, "reset", f"connection error: {exc}")
            return
        if not chunk:
            self._reject(conn, "eof", "connection closed before a complete hello")
            return
        conn.buf += chunk
        if len(conn.buf) < _LEN.size:
            return
        (length,) = _LEN.unpack_from(conn.buf)
        if not 0 < length <= MAX_HELLO_BYTES:
            self._reject(conn, "size", f"hello length {length} not in 1..{MAX_HELLO_BYTES}")
            return
        if len(conn.buf) < _LEN.size + length:
            return
        if len(conn.buf) > _LEN.size + length:
            self._reject(conn, "protocol", "data after the hello")
            return
        try:
            self._hello(conn, bytes(conn.buf[_LEN.size :]))
        except _Reject as rej:
            self._reject(conn, rej.reason, str(rej), rej.reply, rej.code)
        except _ProtocolError as exc:
            self._reject(conn, "garbage", str(exc), "malformed hello", "protocol")
        except Exception as exc:  # never let one connection abort the rendezvous
            logger.exception("rendezvous: unexpected error on a hello from %s", conn.peer)
            self._reject(conn, "garbage", f"{type(exc).__name__}: {exc}")

    def _hello(self, conn: _Conn, body: bytes) -> None:
        msg = _decode(body)
        if set(msg) != _HELLO_FIELDS or msg.get("type") != "hello":
            raise _ProtocolError("not a hello message")
        if not _mac_ok(self.cfg.secret, _HELLO_LABEL, (conn.nonce,), msg):
            raise _Reject(
                "auth",
                "hello MAC does not verify (wrong secret or replayed hello)",
                f"authentication failed: the hello does not verify under rank 0's job secret. Every rank "
                f"must have the same {ENV_SECRET}.",
                code="auth",
            )
        # Authenticated from here on: the sender knows the job secret.
        if _int_field(msg, "v") != RENDEZVOUS_VERSION:
            raise _Reject(
                "version", f"version {msg['v']}", f"rank 0 speaks rendezvous version {RENDEZVOUS_VERSION}"
            )
        size = self.cfg.size
        if _int_field(msg, "world_size") != size:
            raise _Reject(
                "world_size",
                f"world size {msg['world_size']} != {size}",
                f"world size mismatch: this rank says {msg['world_size']}, rank 0 says {size}",
            )
        rank = _int_field(msg, "rank")
        if not 1 <= rank < size:
            raise _Reject("rank", f"rank {rank} out of range", f"rank {rank} is not in 1..{size - 1}")
        ip, port, pub = _peer_entry(
            {"host": msg["host"], "port": msg["port"], "public_key": msg["public_key"]}, f"rank {rank}"
        )
        client_nonce = _hex_bytes(msg["nonce"], NONCE_BYTES, "nonce")
        try:
            self.keypair.exchange(pub)  # rejects degenerate X25519 points
        except ValueError as exc:
            raise _Reject("key", str(exc), f"rank {rank}: invalid public key") from None
        old = self.registered.get(rank)
        if old is not None:
            if self._alive(old.sock):
                raise _Reject(
                    "rank_taken", f"rank {rank} already registered", f"rank {rank} is already taken"
                )
            self._drop(old)  # the earlier connection of that rank died: let it register again
        for r, (oip, oport, opub) in self.entries.items():
            if (oip, oport) == (ip, port) and r != rank:  # a restarted rank may get its old port again
                raise _Reject(
                    "address_taken", f"{ip}:{port} is rank {r}'s", f"address {ip}:{port} is rank {r}'s"
                )
            if opub == pub:
                raise _Reject("key_taken", f"public key of rank {r}", f"public key already used by rank {r}")
        own_ip = self.entries[0][0]
        if ipaddress.IPv4Address(own_ip).is_loopback and not ipaddress.IPv4Address(ip).is_loopback:
            logger.warning(
                "rendezvous: rank %d advertises %s but rank 0 advertises loopback %s and will be unreachable "
                "from other hosts; set %s on rank 0",
                rank,
                ip,
                own_ip,
                ENV_HOST,
            )
        conn.rank = rank
        conn.client_nonce = client_nonce
        conn.buf = bytearray()
        if self.admit is not None:  # the world has formed: a restarted rank rejoins
            self._rejoin(conn, rank, (ip, port, pub))
            return
        del self.pending[conn.sock]
        self.registered[rank] = conn
        self.entries[rank] = (ip, port, pub)
        logger.debug(
            "rendezvous: rank %d registered from %s (%d/%d)", rank, conn.peer, len(self.entries), size
        )

    # -- main loop ----------------------------------------------------------------------------------------

    def run(self, timeout: float, keep_listening: bool = False) -> list[tuple[str, int, bytes]]:
        """Serve until every rank has joined, send them the table; close the connections, and unless
        ``keep_listening`` (for :class:`RejoinService`) the listener too."""
        size = self.cfg.size
        ok = False
        try:
            while len(self.entries) < size:
                now = time.monotonic()
                if now >= self.deadline:
                    missing = [r for r in range(size) if r not in self.entries]
                    raise TimeoutError(
                        f"rendezvous timed out after {timeout:g}s: {len(self.entries)}/{size} ranks joined, "
                        f"missing ranks {missing[:20]}{'...' if len(missing) > 20 else ''}; refused "
                        f"connections: {dict(self.rejected) or 'none'}"
                    )
                for conn in [c for c in self.pending.values() if c.deadline <= now]:
                    self._reject(conn, "read_timeout", f"no complete hello within {self.read_timeout:g}s")
                wake = min([self.deadline, *(c.deadline for c in self.pending.values())])
                for key, _ in self.sel.select(max(0.0, min(wake - now, 1.0))):
                    conn = key.data
                    if conn is None:
                        self._accept()
                    elif conn.sock.fileno() != -1:  # not closed earlier in this batch
                        self._readable(conn)
            table = [self.entries[r] for r in range(size)]
            self._send_tables(table)
            ok = True
            return table
        finally:
            if ok and keep_listening:  # pending connections stay: serve_rejoins() times them out and counts them
                for conn in self.registered.values():
                    self._unregister(conn)
                self.registered.clear()
            else:
                self.close()

    def close(self) -> None:
        """Close every connection, the selector and the listener. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for conn in [*self.pending.values(), *self.registered.values()]:
            conn.sock.close()
        self.pending.clear()
        self.registered.clear()
        self.sel.close()
        self.listener.close()

    def serve_rejoins(self, stop: threading.Event) -> None:
        """After :meth:`run`: answer rejoining ranks (see :class:`RejoinService`) until ``stop`` is set.

        The same guards as during the first rendezvous apply to every connection: non-blocking sockets, a
        ``read_timeout`` for the hello, a bound on pending connections and on the hello's size, counted refusals.
        """
        while not stop.is_set():
            now = time.monotonic()
            for conn in [c for c in self.pending.values() if c.deadline <= now]:
                self._reject(conn, "read_timeout", f"no complete hello within {self.read_timeout:g}s")
            wake = min([now + 0.2, *(c.deadline for c in self.pending.values())])
            for key, _ in self.sel.select(max(0.0, wake - now)):
                conn = key.data
                if conn is None:
                    self._accept()
                elif conn.sock.fileno() != -1:
                    self._readable(conn)

    def _rejoin(self, conn: _Conn, rank: int, entry: tuple[str, int, bytes]) -> None:
        """An authenticated hello after the world formed: ask ``admit`` (rank 0's runtime), then answer."""
        assert self.admit is not None
        ip, port, pub = entry
        key = derive_pair_keys(0, self.keypair, {rank: pub})[rank]
        try:
            admitted = self.admit(rank, (ip, port), key)
        except Exception as exc:
            logger.exception("rendezvous: admitting rank %d failed", rank)
            raise _Reject("admit", f"admit failed: {exc}", f"rank 0 could not admit rank {rank}") from None
        if not admitted:
            raise _Reject("rank_taken", f"rank {rank} is alive",
                          f"rank {rank} is alive: a running rank cannot be taken over")
        self.entries[rank] = entry
        self.rejoins += 1
        logger.warning("rendezvous: rank %d rejoined from %s (UDP %s:%d)", rank, conn.peer, ip, port)
        self.pending.pop(conn.sock, None)
        try:
            self._send_tables([self.entries[r] for r in range(self.cfg.size)], {rank: conn})
        finally:
            self._unregister(conn)

    def _send_tables(self, table: list[tuple[str, int, bytes]], to: dict[int, _Conn] | None = None) -> None:
        """Send the table to every registered connection (or to those of ``to``)."""
        body = {
            "type": "table",
            "v": RENDEZVOUS_VERSION,
            "world_size": self.cfg.size,
            "peers": [{"host": ip, "port": port, "public_key": pub.hex()} for ip, port, pub in table],
        }
        for rank, conn in sorted((self.registered if to is None else to).items()):
            msg = dict(body)
            msg["mac"] = _mac(self.cfg.secret, _TABLE_LABEL, (conn.nonce, conn.client_nonce), body)
            try:
                conn.sock.settimeout(self.read_timeout)
                conn.sock.sendall(_frame(msg))
            except OSError as exc:
                logger.warning("rendezvous: could not send the table to rank %d: %s", rank, exc)



class RejoinService:
    """Rank 0's ``env://`` rendezvous kept open after the world formed, so that a restarted rank can rejoin.

    A rank restarted with the same environment (``LOSSYMPI_RANK``, ``LOSSYMPI_WORLD_SIZE``,
    ``LOSSYMPI_RENDEZVOUS``, ``LOSSYMPI_SECRET``) calls :func:`from_env` as the first time: it answers a fresh
    challenge with a hello authenticated by the job secret, carrying a new X25519 public key and its new UDP
    address. Rank 0 derives the new pair key (:func:`lossympi.keys.derive_pair_keys`, as at the first
    rendezvous) and calls ``admit(rank, (ip, port), key)`` on the service's thread. When ``admit`` returns True
    (the rank's previous process is gone, and the caller installed the new key and address), the rank receives
    the current table, authenticated over both nonces like the first one; when it returns False the rank is
    refused (``rank_taken``: a live rank cannot be taken over). A hello that does not verify under the job
    secret is refused before ``admit`` is asked, so nobody without the secret can take over a rank.

    Every connection gets the guards of the first rendezvous (hello within ``read_timeout``, bounded size and
    number of pending connections); refusals are counted by reason in :attr:`rejected`, which also holds those
    of the first rendezvous.
    """

    def __init__(self, server: _Server) -> None:
        self._server = server
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def rejected(self) -> dict[str, int]:
        """Refused connections by reason (first rendezvous and rejoins)."""
        return dict(self._server.rejected)

    @property
    def rejoins(self) -> int:
        """Ranks admitted after the world formed."""
        return self._server.rejoins

    @property
    def address(self) -> tuple[str, int]:
        """The rendezvous's listening TCP address."""
        host, port = self._server.listener.getsockname()[:2]
        return str(host), int(port)

    def start(self, admit: Callable[[int, tuple[str, int], bytes], bool]) -> None:
        """Serve rejoins on a daemon thread; ``admit(rank, (ip, port), pair_key) -> bool`` runs on that thread."""
        if self._thread is not None or self._closed:
            raise RuntimeError("the rejoin service is already started or closed")
        self._server.admit = admit
        self._thread = threading.Thread(target=self._run, name="lossympi-rejoin", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._server.serve_rejoins(self._stop)
        except Exception:  # never silently: a dead service means no rejoin
            if not self._stop.is_set():
                logger.exception("rendezvous: the rejoin service stopped")

    def close(self) -> None:
        """Stop serving and close the listener. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._server.close()


# ----------------------------------------------------------------------------------------------------------
# env:// rendezvous: ranks > 0 (clients)
# ----------------------------------------------------------------------------------------------------------


class _Retry(Exception):
    """A transient failure: connect again."""


def _join_once(
    cfg: _EnvConfig, rdzv_ip: str, own: tuple[str, int, bytes], deadline: float, read_timeout: float
) -> list[tuple[str, int, bytes]]:
    remaining = deadline - time.monotonic()
    try:
        sock = socket.create_connection(
            (rdzv_ip, cfg.rdzv_port), timeout=max(0.01, min(remaining, read_timeout))
        )
    except OSError as exc:
        raise _Retry(f"connect to {rdzv_ip}:{cfg.rdzv_port}: {exc}") from None
    with sock:
        try:
            challenge = _recv_frame(sock, MAX_HELLO_BYTES)
            if set(challenge) != {"type", "v", "nonce"} or challenge.get("type") != "challenge":
                raise _ProtocolError("expected a challenge")
            if challenge.get("v") != RENDEZVOUS_VERSION:
                raise RendezvousError(
                    f"rank 0 speaks rendezvous version {challenge.get('v')!r}, this rank {RENDEZVOUS_VERSION}"
                )
            server_nonce = _hex_bytes(challenge["nonce"], NONCE_BYTES, "challenge nonce")
        except (OSError, EOFError, _ProtocolError) as exc:
            raise _Retry(f"reading the challenge: {exc}") from None
        client_nonce = handshake.new_nonce(NONCE_BYTES)
        ip, port, pub = own
        hello: dict[str, Any] = {
            "type": "hello",
            "v": RENDEZVOUS_VERSION,
            "rank": cfg.rank,
            "world_size": cfg.size,
            "host": ip,
            "port": port,
            "public_key": pub.hex(),
            "nonce": client_nonce.hex(),
        }
        hello["mac"] = _mac(cfg.secret, _HELLO_LABEL, (server_nonce,), hello)
        try:
            sock.sendall(_frame(hello))
            # Rank 0 answers once every rank has joined: wait up to the overall deadline.
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            reply = _recv_frame(sock, MAX_HELLO_BYTES + 256 * cfg.size)
        except TimeoutError:
            raise TimeoutError(
                f"rank {cfg.rank}: joined the rendezvous at {cfg.rdzv_host}:{cfg.rdzv_port} but the other "
                f"ranks did not all join in time"
            ) from None
        except (OSError, EOFError, _ProtocolError) as exc:
            raise _Retry(f"waiting for the table: {exc}") from None
    kind = reply.get("type")
    if kind == "error":
        reason = str(reply.get("reason", "?"))[:1000]
        cls = RendezvousAuthError if reply.get("code") == "auth" else RendezvousError
        raise cls(f"rank {cfg.rank}: rank 0 refused this rank: {reason}")
    if kind != "table" or set(reply) != _TABLE_FIELDS:
        raise _Retry("rank 0 sent neither a table nor an error")
    if not _mac_ok(cfg.secret, _TABLE_LABEL, (server_nonce, client_nonce), reply):
        raise RendezvousAuthError(
            f"rank {cfg.rank}: the table from rank 0 does not verify under this rank's job secret: "
            f"{ENV_SECRET} differs between ranks, or the connection was tampered with"
        )
    try:
        if reply.get("v") != RENDEZVOUS_VERSION or reply.get("world_size") != cfg.size:
            raise _ProtocolError("version or world size mismatch")
        peers = reply["peers"]
        if not isinstance(peers, list) or len(peers) != cfg.size:
            raise _ProtocolError(f"expected {cfg.size} peers")
        table = [_peer_entry(p, f"rank {r}") for r, p in enumerate(peers)]
    except _ProtocolError as exc:
        raise RendezvousError(f"rank {cfg.rank}: invalid table from rank 0: {exc}") from None
    if table[cfg.rank] != own:
        raise RendezvousError(f"rank {cfg.rank}: the table from rank 0 does not hold this rank's own entry")
    return table


def _join(
    cfg: _EnvConfig, own: tuple[str, int, bytes], deadline: float, timeout: float, read_timeout: float
) -> list[tuple[str, int, bytes]]:
    rdzv_ip = _resolve_ipv4(cfg.rdzv_host)
    delay = 0.02
    last: str = "no attempt"
    attempts = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"rank {cfg.rank}: could not join the rendezvous at {cfg.rdzv_host}:{cfg.rdzv_port} within "
                f"{timeout:g}s after {attempts} attempt(s); last error: {last}. Is rank 0 running, and is "
                f"{ENV_RENDEZVOUS} rank 0's address?"
            )
        attempts += 1
        try:
            return _join_once(cfg, rdzv_ip, own, deadline, read_timeout)
        except _Retry as exc:
            last = str(exc)
            logger.debug("rank %d: rendezvous attempt %d failed: %s", cfg.rank, attempts, last)
        time.sleep(max(0.0, min(delay, deadline - time.monotonic())))
        delay = min(delay * 2, 1.0)


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
    deadline = time.monotonic() + timeout
    if cfg.host is not None:
        ip = _resolve_ipv4(cfg.host)
    else:
        ip = _default_ip_towards(cfg.rdzv_host)
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
        world = _world_from_table(cfg.rank, cfg.size, sock, keypair, addresses, publics, info, control)
        world.rendezvous = service
        return world
    except BaseException:
        sock.close()
        control.close()
        if service is not None:
            service.close()
        raise


# ----------------------------------------------------------------------------------------------------------
# init
# ----------------------------------------------------------------------------------------------------------


def _under_mpiexec(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return any(env.get(name) for name in MPI_LAUNCHER_ENV)


def init(method: str = "auto", **kw: Any) -> World:
    """Bootstrap this rank with the given method.

    Parameters
    ----------
    method : {"auto", "env", "mpi", "local"}
        ``"env"``: :func:`from_env`; ``"mpi"``: :func:`from_mpi`; ``"local"``: a world of one rank
        (``local_worlds(1, **kw)[0]``). ``"auto"``: ``"env"`` if ``LOSSYMPI_RENDEZVOUS`` is set, else
        ``"mpi"`` if the process was started by ``mpiexec`` (``PMI_RANK``, ``PMI_SIZE``,
        ``OMPI_COMM_WORLD_SIZE``, ``MPI_LOCALNRANKS`` or ``PMIX_RANK`` set), else an error.
    **kw
        Passed to the chosen function.

    Returns
    -------
    World

    Raises
    ------
    RuntimeError
        ``"auto"`` found no launcher.
    ValueError
        Unknown method.
    """
    if method == "auto":
        if os.environ.get(ENV_RENDEZVOUS):
            method = "env"
        elif _under_mpiexec():
            method = "mpi"
        else:
            raise RuntimeError(
                "lossympi cannot tell how this process was launched. Either run it under MPI, e.g. "
                "'mpiexec -n 4 python train.py', or set on every process "
                f"{ENV_RANK}, {ENV_WORLD_SIZE}, {ENV_RENDEZVOUS}=<rank 0 host>:<tcp port> and "
                f"{ENV_SECRET}=<shared random string> (env:// rendezvous), or call init('local') for a "
                "single process."
            )
    if method == "env":
        return from_env(**kw)
    if method == "mpi":
        return from_mpi(**kw)
    if method == "local":
        return local_worlds(1, **kw)[0]
    raise ValueError(f"unknown bootstrap method {method!r}; expected 'auto', 'env', 'mpi' or 'local'")
