"""Tests of lossympi.handshake: the one keyed challenge-response proof."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from lossympi import handshake

KEY = b"k" * 32
LABEL = b"test-hello-v1"


def test_proof_is_hmac_sha256_of_label_nonces_body() -> None:
    """The wire bytes: HMAC-SHA256(key, label || nonce_1 || nonce_2 || body)."""
    a, b = handshake.new_nonce(), handshake.new_nonce(16)
    assert (len(a), len(b)) == (handshake.NONCE_BYTES, 16) and a != handshake.new_nonce()
    want = hmac.new(KEY, LABEL + a + b + b"body", hashlib.sha256).digest()
    assert handshake.prove(KEY, LABEL, (a, b), b"body") == want
    assert len(want) == handshake.MAC_BYTES


def test_verify_accepts_only_the_same_arguments() -> None:
    n = handshake.new_nonce()
    proof = handshake.prove(KEY, LABEL, (n,), b"rank=1")
    assert handshake.verify(KEY, LABEL, (n,), b"rank=1", proof)
    assert handshake.verify(KEY, LABEL, (n,), b"rank=1", proof.hex())
    assert not handshake.verify(KEY, LABEL, (n,), b"rank=1", proof.hex().upper())
    assert not handshake.verify(b"x" * 32, LABEL, (n,), b"rank=1", proof)
    assert not handshake.verify(KEY, b"other-hello-v1", (n,), b"rank=1", proof)
    assert not handshake.verify(KEY, LABEL, (handshake.new_nonce(),), b"rank=1", proof)
    assert not handshake.verify(KEY, LABEL, (n,), b"rank=2", proof)
    assert not handshake.verify(KEY, LABEL, (n,), b"rank=1", proof[:-1])
    assert not handshake.verify(KEY, LABEL, (n,), b"rank=1", "\u00e9" * 64)
    assert not handshake.verify(KEY, LABEL, (n,), b"rank=1", None)  # type: ignore[arg-type]
    # an unknown peer (no key) is refused even with the proof a zero-byte key would give
    dummy = hmac.new(b"\0", LABEL + n + b"rank=1", hashlib.sha256).digest()
    assert not handshake.verify(None, LABEL, (n,), b"rank=1", dummy)


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        handshake.new_nonce(8)
    with pytest.raises(TypeError, match="sequence of byte strings"):
        handshake.prove(KEY, LABEL, handshake.new_nonce())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="label"):
        handshake.prove(KEY, b"", ())
    with pytest.raises(ValueError, match="key"):
        handshake.prove(b"", LABEL, ())
