"""Key material for lossympi: per-pair MAC keys.

Every pair of ranks ``(i, j)`` shares a 32-byte key used to authenticate the datagrams exchanged between
``i`` and ``j`` (see ``docs/protocol.md``). The key is derived from a secret that only ``i`` and ``j``
know, normally an ephemeral X25519 Diffie-Hellman shared secret computed during bootstrap (see
``docs/bootstrap.md``), so no third rank can compute it.

This module has no MPI or TensorFlow dependency. The X25519 primitives come from the ``cryptography``
package, imported when a :class:`KeyPair` is first used.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Mapping
from typing import Any

__all__ = [
    "KEY_BYTES",
    "PUBLIC_KEY_BYTES",
    "KeyPair",
    "derive_pair_keys",
    "hash_secret",
    "job_secret_from_env",
    "pair_key",
]

#: Size in bytes of a pair MAC key and of a job secret.
KEY_BYTES = 32
#: Size in bytes of a raw X25519 public key.
PUBLIC_KEY_BYTES = 32

_PAIR_PERSON = b"lossympi-pair"
_SECRET_PERSON = b"lossympi-secret"
_BLAKE2B_SALT_BYTES = hashlib.blake2b.SALT_SIZE  # 16
_BLAKE2B_PERSON_BYTES = hashlib.blake2b.PERSON_SIZE  # 16
assert len(_PAIR_PERSON) <= _BLAKE2B_PERSON_BYTES
assert len(_SECRET_PERSON) <= _BLAKE2B_PERSON_BYTES

#: Name of the environment variable holding the job secret.
SECRET_ENV = "LOSSYMPI_SECRET"


def _check_rank(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{name} must be in [0, 2**32), got {value}")
    return value


def pair_key(shared_secret: bytes, i: int, j: int) -> bytes:
    """Derive the 32-byte MAC key of the rank pair ``{i, j}`` from a secret they share.

    The key is ``BLAKE2b-256(shared_secret)`` personalised with ``b"lossympi-pair"`` and salted with
    ``struct.pack("<II", min(i, j), max(i, j))`` zero-padded to 16 bytes, so it is symmetric in ``i`` and
    ``j`` and different for every pair even if the same secret were reused.

    Parameters
    ----------
    shared_secret : bytes
        Secret known to ranks ``i`` and ``j`` only (e.g. an X25519 shared secret). Must be non-empty.
    i, j : int
        The two ranks, ``0 <= i, j < 2**32``, ``i != j``.

    Returns
    -------
    bytes
        The 32-byte pair key.

    Raises
    ------
    ValueError
        If ``i == j``, a rank is out of range, or ``shared_secret`` is empty.
    """
    _check_rank("i", i)
    _check_rank("j", j)
    if i == j:
        raise ValueError(f"a pair key needs two distinct ranks, got i == j == {i}")
    secret = bytes(shared_secret)
    if not secret:
        raise ValueError("shared_secret must not be empty")
    salt = struct.pack("<II", min(i, j), max(i, j)).ljust(_BLAKE2B_SALT_BYTES, b"\0")
    assert len(salt) == _BLAKE2B_SALT_BYTES
    return hashlib.blake2b(secret, digest_size=KEY_BYTES, person=_PAIR_PERSON, salt=salt).digest()


class KeyPair:
    """An ephemeral X25519 key pair (one per rank and per bootstrap).

    The private key never leaves the object; only :attr:`public_bytes` is sent to the other ranks.

    Examples
    --------
    >>> a, b = KeyPair(), KeyPair()
    >>> a.exchange(b.public_bytes) == b.exchange(a.public_bytes)
    True
    """

    __slots__ = ("_private", "_public_bytes")

    def __init__(self) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        self._private: Any = X25519PrivateKey.generate()
        self._public_bytes: bytes = self._private.public_key().public_bytes(
            encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw
        )

    @property
    def public_bytes(self) -> bytes:
        """bytes: The raw 32-byte X25519 public key."""
        return self._public_bytes

    def exchange(self, peer_public: bytes) -> bytes:
        """Compute the 32-byte X25519 shared secret with a peer.

        Parameters
        ----------
        peer_public : bytes
            The peer's raw 32-byte X25519 public key.

        Returns
        -------
        bytes
            The shared secret; the peer computes the same value from our public key.

        Raises
        ------
        ValueError
            If ``peer_public`` is not 32 bytes, or is a degenerate (low-order) point that would give an
            all-zero shared secret.
        """
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

        if not isinstance(peer_public, bytes | bytearray | memoryview):
            raise TypeError(f"peer public key must be bytes, got {type(peer_public).__name__}")
        raw = bytes(peer_public)
        if len(raw) != PUBLIC_KEY_BYTES:
            raise ValueError(
                f"X25519 public key must be exactly {PUBLIC_KEY_BYTES} bytes, got {len(raw)} bytes"
            )
        try:
            shared: bytes = self._private.exchange(X25519PublicKey.from_public_bytes(raw))
        except ValueError as exc:  # low-order point: cryptography refuses the all-zero result
            raise ValueError(f"invalid X25519 public key (degenerate point): {exc}") from exc
        if shared == bytes(len(shared)):  # belt and braces, in case the backend does not check
            raise ValueError("invalid X25519 public key (degenerate point gives an all-zero secret)")
        return shared

    def __repr__(self) -> str:
        return f"KeyPair(public={self._public_bytes.hex()[:16]}...)"


def derive_pair_keys(rank: int, keypair: KeyPair, publics: Mapping[int, bytes]) -> dict[int, bytes]:
    """Derive this rank's pair key with every other rank from their X25519 public keys.

    ``key[j] = pair_key(keypair.exchange(publics[j]), rank, j)``. Rank ``j`` computes the same key with
    its own key pair and ``publics[rank]``; a third rank, knowing only public keys, cannot.

    Parameters
    ----------
    rank : int
        This rank.
    keypair : KeyPair
        This rank's key pair.
    publics : Mapping[int, bytes]
        Public key of every rank (index = rank). The entry of ``rank`` itself, if present, must equal
        ``keypair.public_bytes`` (a mismatch means the table is not ours) and is otherwise ignored.

    Returns
    -------
    dict[int, bytes]
        ``{j: key}`` for every ``j != rank`` in ``publics``.

    Raises
    ------
    ValueError
        If a public key is malformed, our own entry does not match ``keypair``, or two ranks announce the
        same public key.
    """
    _check_rank("rank", rank)
    own = publics.get(rank)
    if own is not None and bytes(own) != keypair.public_bytes:
        raise ValueError(f"the public key announced for rank {rank} (this rank) is not this rank's key")
    seen: dict[bytes, int] = {}
    for j, pub in publics.items():
        other = seen.setdefault(bytes(pub), j)
        if other != j:
            raise ValueError(f"ranks {other} and {j} announce the same public key")
    keys: dict[int, bytes] = {}
    for j in sorted(publics):
        if j == rank:
            continue
        _check_rank("peer rank", j)
        try:
            shared = keypair.exchange(publics[j])
        except ValueError as exc:
            raise ValueError(f"bad public key for rank {j}: {exc}") from exc
        keys[j] = pair_key(shared, rank, j)
    return keys


def job_secret_from_env(environ: Mapping[str, str] | None = None) -> bytes | None:
    """Read the job secret from ``LOSSYMPI_SECRET``.

    Parameters
    ----------
    environ : Mapping[str, str], optional
        Environment to read (default: ``os.environ``).

    Returns
    -------
    bytes or None
        ``BLAKE2b-256`` of the variable's UTF-8 value (personalised with ``b"lossympi-secret"``), or
        ``None`` if the variable is unset or empty. Any string works; use a long random one, e.g.
        ``python -c "import secrets; print(secrets.token_urlsafe(32))"``.
    """
    env = os.environ if environ is None else environ
    value = env.get(SECRET_ENV)
    if not value:
        return None
    return hash_secret(value)


def hash_secret(value: str) -> bytes:
    """Hash a job secret string to the 32-byte key used by the rendezvous.

    Parameters
    ----------
    value : str
        The secret, as set in ``LOSSYMPI_SECRET``. Must be non-empty.

    Returns
    -------
    bytes
        ``BLAKE2b-256(value.encode("utf-8"))`` personalised with ``b"lossympi-secret"``.
    """
    if not isinstance(value, str):
        raise TypeError(f"the job secret must be a str, got {type(value).__name__}")
    if not value:
        raise ValueError("the job secret must not be empty")
    return hashlib.blake2b(
        value.encode("utf-8", "surrogateescape"), digest_size=KEY_BYTES, person=_SECRET_PERSON
    ).digest()
