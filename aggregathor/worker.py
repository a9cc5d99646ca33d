"""A worker (ranks 1..n): receive the parameters, compute a gradient on its own shard, send it.

An honest worker sends the gradient of its next mini-batch. A Byzantine one (the last ``cfg.byzantine`` ranks,
:meth:`aggregathor.config.TrainConfig.is_byzantine`) runs ``cfg.attack``: a data-space attack (``space ==
"data"``) poisons the batch and sends its real gradient; a gradient-space attack replaces the gradient. With a
transport that declares :attr:`~aggregathor.transport.Capability.HONEST_GRADIENTS` (the simulated one) the attack
sees the step's honest gradients; otherwise it estimates them (:func:`byzantine_gradient`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from aggregathor import attacks, experiments
from aggregathor.assignment import data_assignment, deterministic_ops
from aggregathor.config import TrainConfig
from aggregathor.deadline import Deadline
from aggregathor.transport.base import Capability, WorkerTransport

__all__ = ["Worker", "byzantine_gradient", "run_worker"]


def byzantine_gradient(cfg: TrainConfig, attack: Any, grad_fn: Callable[..., Any], batches: Iterator[Any],
                       rng: np.random.Generator) -> np.ndarray:
    """The attack's gradient when there is no side channel to the honest ones (multi-process runs).

    The attacker estimates what the honest workers send: it computes ``n - f`` messages (``grad_fn(x, y)``: a
    gradient and the model's state after it, as :meth:`Worker.message`) on its own shard (the same
    distribution as the honest workers' under IID partitioning) and hands them to the attack, which returns the
    ``cfg.byzantine`` colluding gradients; this rank sends its own row. The colluders coordinate without talking:
    they share the attack's random stream (same seed) and its rules, and differ only by the shards their estimates
    come from. With ``--launcher simulate`` they get the real honest gradients of the step instead
    (:meth:`aggregathor.transport.simulated.SimWorker.honest_gradients`).
    """
    honest = [grad_fn(*next(batches)) for _ in range(max(2, cfg.workers - cfg.byzantine))]
    return attack(np.stack(honest), cfg.byzantine, rng=rng)[0]


class Worker:
    """One worker's model, data and attack (honest when ``attack`` is None); :meth:`run` is its loop."""

    def __init__(self, cfg: TrainConfig, transport: WorkerTransport) -> None:
        self.cfg = cfg
        self.transport = transport
        rank = transport.rank
        exp = experiments.get(cfg.experiment)
        self.model = exp.build_model(cfg.seed)
        self.view = experiments.flat_view(self.model)
        deterministic_ops(cfg)  # Draco: the members of a group must compute bitwise-equal gradients
        data = data_assignment(cfg, rank)  # the shard and batch seed (shared by a Draco group)
        shard = exp.partition(data.shards, scheme=cfg.partition, alpha=cfg.alpha, seed=cfg.seed)[data.shard]
        self.batches = exp.batches(shard, cfg.batch_size, seed=data.seed)
        self.grad_fn = experiments.gradient_fn(self.model, exp.loss)
        self.attack = attacks.get(cfg.attack, **cfg.attack_options) if cfg.is_byzantine(rank) else None
        self.rng = np.random.default_rng([cfg.seed, 0xB42])  # shared by the colluding workers: same draws
        # what travels: the parameters (gradient) then the model's state (see aggregathor.state)
        self.theta = np.zeros(self.view.wire_size, np.float32)
        self.view.get_message(self.theta)
        self.grad = np.zeros(self.view.wire_size, np.float32)
        self.param_deadline = Deadline(cfg.deadline)

    def warm_up(self) -> None:
        """Trace the gradient and the parameter assignment before the first step, so that it is not late."""
        x, y = next(self.batches)
        self.grad_fn(x, y)
        self.view.set_message(self.theta)

    async def run(self) -> int:
        """Take part in every step until the server says stop; returns the number of steps taken part in."""
        self.warm_up()
        steps = 0
        while True:
            meta = await self.transport.next_message()
            if meta.get("stop"):
                return steps
            if meta.get("ready") or "skip" in meta:  # the warm-up barrier, or a step this worker is too late for
                continue
            t0 = time.monotonic()
            delivered = await self.transport.recv_params(self.theta, timeout=self.param_deadline.next())
            if delivered == 1.0:
                self.param_deadline.observe(time.monotonic() - t0)
            self.view.set_message(self.theta)
            self.grad[...] = await self.gradient()
            await self.transport.send_grad(self.grad, time.monotonic() + self.cfg.deadline)
            steps += 1

    def message(self, x: Any, y: Any) -> np.ndarray:
        """The ``(d + s,)`` message of a batch: its gradient, then the model's state after the forward pass (which,
        in training mode, moved it towards the batch's statistics; see :mod:`aggregathor.state`)."""
        g = self.grad_fn(x, y)[0].numpy()
        return np.concatenate([g, self.view.get_state()]) if self.view.state_size else g

    async def gradient(self) -> Any:
        """This step's message: honest, poisoned data, or the attack's (see the module notes)."""
        attack = self.attack
        if attack is None or getattr(attack, "space", "gradient") == "data":
            x, y = next(self.batches)
            if attack is not None:
                x, y = attack.poison(x, y, self.rng)
            return self.message(x, y)
        if Capability.HONEST_GRADIENTS in self.transport.capabilities:
            return attack(await self.transport.honest_gradients(), self.cfg.byzantine, rng=self.rng)[0]
        return byzantine_gradient(self.cfg, attack, self.message, self.batches, self.rng)


async def run_worker(cfg: TrainConfig, transport: WorkerTransport) -> int:
    """A worker's loop (honest, or Byzantine when its rank is among the last ``cfg.byzantine``); returns the number
    of steps it took part in."""
    return await Worker(cfg, transport).run()
