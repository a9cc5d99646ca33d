"""Benchmarks of the lossympi transport (``python -m lossympi.bench SUBCOMMAND``).

Subcommands (each a module of this package, registered in :data:`lossympi.bench.__main__.SUBCOMMANDS`):

- ``p2p``: one sender and one receiver process on loopback; lossympi goodput (with and without GSO/GRO
  and authentication) against iperf3 UDP at the same datagram size and against a raw TCP ``sendall``.

Every subcommand prints a readable table, or with ``--json`` exactly one JSON object on stdout (progress
goes to stderr). The JSON carries the ``command`` that reproduces it and the host it ran on.
"""

from __future__ import annotations

__all__: list[str] = []
