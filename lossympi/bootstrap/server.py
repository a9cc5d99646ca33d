"""Rank 0's side of the env:// rendezvous: a single-threaded, selector-based server (first rendezvous and rejoins)."""

from __future__ import annotations

import collections
import ipaddress
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import handshake
from ..keys import KeyPair, derive_pair_keys
from .env import _EnvConfig
from .errors import RendezvousError
from .framing import _LEN, _decode, _frame, _ProtocolError
from .messages import (
    _HELLO_FIELDS,
    _HELLO_LABEL,
    _TABLE_LABEL,
    MAX_HELLO_BYTES,
    NONCE_BYTES,
    RENDEZVOUS_VERSION,
    _hex_bytes,
    _int_field,
    _mac,
    _mac_ok,
    _peer_entry,
)
from .variables import ENV_HOST, ENV_SECRET

__all__: list[str] = []

logger = logging.getLogger(__name__)

_MAX_LOGGED_REJECTIONS = 32


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
