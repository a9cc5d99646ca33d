"""The ``LOSSYMPI_*`` environment variables that configure a bootstrap (names only; parsing is in :mod:`.env`)."""

from __future__ import annotations

__all__ = ["ENV_HOST", "ENV_PORT_RANGE", "ENV_RANK", "ENV_RENDEZVOUS", "ENV_SECRET", "ENV_WORLD_SIZE"]

ENV_RANK = "LOSSYMPI_RANK"
ENV_WORLD_SIZE = "LOSSYMPI_WORLD_SIZE"
ENV_RENDEZVOUS = "LOSSYMPI_RENDEZVOUS"
ENV_SECRET = "LOSSYMPI_SECRET"
ENV_HOST = "LOSSYMPI_HOST"
ENV_PORT_RANGE = "LOSSYMPI_PORT_RANGE"
