"""Errors of the bootstrap."""

from __future__ import annotations

__all__ = ["RendezvousAuthError", "RendezvousError"]

class RendezvousError(RuntimeError):
    """The ``env://`` rendezvous failed or was refused (bad configuration, rank clash, ...)."""


class RendezvousAuthError(RendezvousError):
    """A rendezvous message did not authenticate: the ranks do not share the same ``LOSSYMPI_SECRET``."""
