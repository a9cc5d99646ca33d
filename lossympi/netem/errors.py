"""Errors and warnings of :mod:`lossympi.netem`."""

from __future__ import annotations

__all__ = ["NetemError", "NetemUnavailableError", "NetemWarning"]

class NetemError(RuntimeError):
    """A cluster could not be built, changed or removed."""


class NetemUnavailableError(NetemError):
    """``strict=True`` and an impairment asked for has no backend on this machine (e.g. no ``sch_netem``)."""


class NetemWarning(UserWarning):
    """Some asked-for impairments are not emulated on this machine; the cluster runs without them."""
