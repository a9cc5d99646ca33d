"""The side of ranks > 0 of the env:// rendezvous: connect, answer the challenge, receive the table (with retries)."""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from .. import handshake
from .addresses import _resolve_ipv4
from .env import _EnvConfig
from .errors import RendezvousAuthError, RendezvousError
from .framing import _frame, _ProtocolError, _recv_frame
from .messages import (
    _HELLO_LABEL,
    _TABLE_FIELDS,
    _TABLE_LABEL,
    MAX_HELLO_BYTES,
    NONCE_BYTES,
    RENDEZVOUS_VERSION,
    _hex_bytes,
    _mac,
    _mac_ok,
    _peer_entry,
)
from .variables import ENV_RENDEZVOUS, ENV_SECRET

__all__: list[str] = []

logger = logging.getLogger(__name__)

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
