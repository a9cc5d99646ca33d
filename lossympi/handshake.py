"""The keyed challenge-response proof of every authenticated handshake in the project.

A handshake proves that a peer holds a shared key without sending it: one side sends a fresh random nonce
(:func:`new_nonce`), the other answers with :func:`prove` over that nonce and what it claims (its rank, its
address...), and the first checks the answer with :func:`verify`. Mutual handshakes use both sides' nonces.

The proof is ``HMAC-SHA256(key, label || nonce_1 || ... || nonce_k || body)``:

- ``label`` is a constant that names the protocol, the message and its version (``b"lossympi-control-hello-v1"``),
  so a proof made for one message is never valid for another (domain separation);
- the nonces make it fresh: a recorded proof does not answer a new challenge;
- ``body`` is the authenticated claim.

The concatenation is unambiguous as long as, for one label, the nonces have fixed sizes and the body is
self-delimiting (a fixed-size field, or canonical JSON last). Users: :mod:`lossympi.control` (the control
channel's hello), :mod:`lossympi.bootstrap` (the env:// rendezvous hello and table), and the TCP/gRPC
baselines of aggregathor.

Example
-------
>>> from lossympi import handshake
>>> nonce = handshake.new_nonce()                       # the challenger sends this
>>> proof = handshake.prove(b"k" * 32, b"demo-hello-v1", (nonce,), b"rank=1")   # the peer answers
>>> handshake.verify(b"k" * 32, b"demo-hello-v1", (nonce,), b"rank=1", proof)
True
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence

__all__ = ["MAC_BYTES", "NONCE_BYTES", "new_nonce", "prove", "verify"]

#: Size of a proof (HMAC-SHA256).
MAC_BYTES = 32
#: Default size of a nonce (256 bits).
NONCE_BYTES = 32
#: Smallest nonce :func:`new_nonce` draws (128 bits: a repeat is out of reach).
MIN_NONCE_BYTES = 16

_NO_KEY = b"\0"


def new_nonce(size: int = NONCE_BYTES) -> bytes:
    """Draw a fresh challenge nonce from the operating system's CSPRNG.

    Parameters
    ----------
    size : int
        Bytes to draw, at least :data:`MIN_NONCE_BYTES`.

    Returns
    -------
    bytes
        ``size`` random bytes.
    """
    if not isinstance(size, int) or size < MIN_NONCE_BYTES:
        raise ValueError(f"nonce size {size!r} is too small: use at least {MIN_NONCE_BYTES} bytes")
    return secrets.token_bytes(size)


def _message(label: bytes, nonces: Sequence[bytes], body: bytes) -> bytes:
    if not isinstance(label, bytes) or not label:
        raise ValueError("handshake label must be non-empty bytes naming the protocol and message")
    if isinstance(nonces, (bytes, bytearray, memoryview, str)):
        raise TypeError("handshake nonces must be a sequence of byte strings, e.g. (nonce,), not one byte string")
    return b"".join((label, *(bytes(n) for n in nonces), bytes(body)))


def prove(key: bytes, label: bytes, nonces: Sequence[bytes], body: bytes = b"") -> bytes:
    """The proof that the caller holds ``key``, bound to ``label``, ``nonces`` and ``body``.

    Parameters
    ----------
    key : bytes
        The shared key (pair key or job secret), non-empty.
    label : bytes
        Constant naming the protocol, message and version (domain separation).
    nonces : sequence of bytes
        The challenge nonce(s), in the order both sides agree on (``(server, client)`` for mutual handshakes);
        empty for a proof without a challenge.
    body : bytes
        The authenticated claim (e.g. a packed rank).

    Returns
    -------
    bytes
        :data:`MAC_BYTES` bytes: ``HMAC-SHA256(key, label || nonces... || body)``.
    """
    if not isinstance(key, (bytes, bytearray)) or not key:
        raise ValueError("handshake key must be non-empty bytes (a pair key or the job secret)")
    return hmac.new(bytes(key), _message(label, nonces, body), hashlib.sha256).digest()


def verify(key: bytes | None, label: bytes, nonces: Sequence[bytes], body: bytes, proof: bytes | str) -> bool:
    """Whether ``proof`` is :func:`prove` of the same arguments, compared in constant time.

    Parameters
    ----------
    key : bytes or None
        The expected key; ``None`` (an unknown peer) computes a proof under a dummy key and returns False, so an
        unknown claim takes as long to refuse as a wrong proof.
    label, nonces, body
        As for :func:`prove`.
    proof : bytes or str
        The peer's proof: raw bytes, or its lowercase hexadecimal form (as JSON messages carry it). Anything
        else (wrong type, non-ASCII text, wrong length) is refused.

    Returns
    -------
    bool
        True only when the proof is valid and ``key`` is not None.
    """
    expect = hmac.new(bytes(key) if key else _NO_KEY, _message(label, nonces, body), hashlib.sha256).digest()
    if isinstance(proof, str):
        if not proof.isascii():
            return False
        ok = hmac.compare_digest(expect.hex(), proof)
    elif isinstance(proof, (bytes, bytearray, memoryview)):
        ok = hmac.compare_digest(expect, bytes(proof))
    else:
        return False
    return ok and bool(key)
