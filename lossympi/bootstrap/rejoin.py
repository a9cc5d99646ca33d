"""Rank 0's rendezvous kept open after the world formed: :class:`RejoinService`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .server import _Server

__all__ = ["RejoinService"]

logger = logging.getLogger(__name__)

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
