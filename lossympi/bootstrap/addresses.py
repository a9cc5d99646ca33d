"""IPv4 addresses and ports: resolution, the address to advertise, port ranges, binding the UDP and TCP sockets."""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket

from .variables import ENV_HOST, ENV_PORT_RANGE

__all__ = ["bind_udp", "bind_udp_and_control"]

logger = logging.getLogger(__name__)

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
