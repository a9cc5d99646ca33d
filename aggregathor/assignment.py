"""Which data each worker computes its gradients on: its shard of the training set and its batch seed.

One function for every launcher (the worker processes and ``--launcher simulate`` both build their
:class:`~aggregathor.worker.Worker` from it). Normally each of the n workers has its own shard and its own
seed. Under Draco (``--gar draco``, :class:`aggregathor.gars.draco.Draco`) the n workers form n / (2f + 1)
groups of 2f + 1 consecutive ranks, and every member of a group gets the same shard and the same seed, so
the honest members compute the gradient of the same mini-batch at every step; with deterministic ops
(:func:`deterministic_ops`) their gradients are bitwise equal, which the server's majority vote relies on.

Byzantine workers are the last ``cfg.byzantine`` ranks (:meth:`aggregathor.config.TrainConfig.is_byzantine`),
so they fall in the last group(s). Draco's guarantee needs at most f of them in each group; the configuration
allows at most ``--f`` Byzantine workers in total, which is enough wherever they are placed.
"""

from __future__ import annotations

from typing import NamedTuple

from aggregathor.config import TrainConfig

__all__ = ["DataAssignment", "data_assignment", "deterministic_ops", "redundancy"]

#: the rules whose workers compute redundant gradients (groups of 2f + 1 sharing a mini-batch)
REDUNDANT_RULES = frozenset({"draco"})


class DataAssignment(NamedTuple):
    """A worker's data: ``exp.partition(shards, ...)[shard]``, batches drawn with ``seed``."""

    shards: int
    shard: int
    seed: int


def redundancy(cfg: TrainConfig) -> int:
    """How many workers compute each gradient: ``2f + 1`` under Draco, else 1."""
    return 2 * cfg.f + 1 if cfg.gar in REDUNDANT_RULES else 1


def data_assignment(cfg: TrainConfig, rank: int) -> DataAssignment:
    """The shard count, shard index and batch seed of worker ``rank`` (1..n).

    With redundancy ``r`` (:func:`redundancy`), worker ``rank`` is in group ``g = (rank - 1) // r`` of
    ``n / r``; the training set is cut into ``n / r`` shards and the group takes shard ``g`` with seed
    ``seed * 1_000_003 + g + 1``. With ``r = 1`` that is each worker's own shard ``rank - 1`` and seed
    ``seed * 1_000_003 + rank``.
    """
    if not 1 <= rank <= cfg.workers:
        raise ValueError(f"worker rank {rank} is not in 1..{cfg.workers}")
    r = redundancy(cfg)
    if cfg.workers % r:
        raise ValueError(f"--gar {cfg.gar} needs --workers to be a multiple of 2f + 1 = {r}, got {cfg.workers}")
    group = (rank - 1) // r
    return DataAssignment(cfg.workers // r, group, cfg.seed * 1_000_003 + group + 1)


def deterministic_ops(cfg: TrainConfig) -> bool:
    """Make TensorFlow's ops deterministic in this process when the rule compares redundant gradients bitwise
    (``tf.config.experimental.enable_op_determinism``); returns whether it did."""
    if redundancy(cfg) == 1:
        return False
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    return True
