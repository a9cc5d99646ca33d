"""Benchmarks of aggregathor (``python -m aggregathor.bench SUBCOMMAND``).

Subcommands (each a module of this package, registered in :data:`aggregathor.bench.__main__.SUBCOMMANDS`):

- ``gars``: time of every aggregation rule of :mod:`aggregathor.gars` on ``(n, d)`` float32 gradients, against
  the floor ``tf.reduce_mean(x, axis=0)`` on the same tensor and against the numpy reference of
  :mod:`aggregathor.gars.reference` on the same data.

Every subcommand prints a readable table, or with ``--json`` exactly one JSON object on stdout (progress
goes to stderr). The JSON carries the ``command`` that reproduces it, the host it ran on and ``contention``
(the share of the CPUs other processes used during the run).
"""

from __future__ import annotations

__all__: list[str] = []
