"""The training loops: the trusted parameter server (rank 0) and the workers (ranks 1..n).

Each synchronous step:

1. the server broadcasts the step number reliably (``control``), then the parameters (``params``);
2. every worker loads them, computes the gradient of its own mini-batch (from its own shard; a Byzantine
   worker replaces it by an attack) and sends it (``grads``);
3. the server gathers the gradients until the step's deadline, fills what is missing, aggregates them with
   the robust rule and applies the Keras optimizer.

The server only ever reads numbers from the workers: fixed-size float32 vectors, checked by the transport
(size, dtype, step tag) before a byte is written. It runs no code that came over the network.

Crash faults (lossympi transport, elastic control channel; see :mod:`aggregathor.launch`): the server never waits
for a worker outside the gather's deadline. A worker whose control link died (EOF, reset, timeout, bad frame) is
*missing*: it gets no step message and its gradient row is lost (filled like a row that missed the deadline).
The number of missing workers is logged per step (``steps.jsonl``, ``missing_workers``), in each evaluation row
and, summed over the steps, in the summary, with the refused control/rendezvous connections and the rejoins. A
restarted worker rejoins and takes part from the next step on. Checkpoints are atomic
(:class:`aggregathor.checkpoint.AtomicCheckpoints`): a server restarted on the same run directory resumes from the
newest intact one (``resumed_from`` in the summary); the summary itself is written atomically.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from aggregathor import attacks, experiments, gars
from aggregathor.checkpoint import AtomicCheckpoints, atomic_write_text
from aggregathor.config import TrainConfig
from aggregathor.transport import GatherReport, ProtocolEvents, StepTransport

__all__ = ["Deadline", "RunSummary", "build_optimizer", "run_server", "run_worker", "worker_role"]

log = logging.getLogger(__name__)


def build_optimizer(cfg: TrainConfig) -> Any:
    """The Keras optimizer of ``cfg`` (SGD, SGD with momentum or Adam) with its learning-rate schedule."""
    import keras

    lr: Any = cfg.lr
    if cfg.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(cfg.lr, decay_steps=cfg.steps)
    elif cfg.schedule == "step":
        lr = keras.optimizers.schedules.PiecewiseConstantDecay(
            [cfg.steps // 2, (3 * cfg.steps) // 4], [cfg.lr, cfg.lr / 10, cfg.lr / 100])
    if cfg.optimizer == "adam":
        return keras.optimizers.Adam(lr)
    return keras.optimizers.SGD(lr, momentum=cfg.momentum if cfg.optimizer == "momentum" else 0.0)


def worker_role(cfg: TrainConfig, rank: int) -> bool:
    """True when worker ``rank`` (1..n) is Byzantine: the last ``cfg.byzantine`` ranks are."""
    return rank > cfg.workers - cfg.byzantine


class Deadline:
    """Adaptive gather deadline.

    A step waits at most ``cap`` seconds. Once a step has completed, it waits ``factor`` times the median
    (over the last ``window`` steps) of the time by which the complete gradients had arrived, the ``f`` slowest
    left out, plus ``slack``: a step with a lost datagram then costs a little more than a lossless one, not the
    cap. Leaving the ``f`` slowest out is what keeps Byzantine workers from stretching the deadline: timed on the
    last arrival, one worker that always answers just before the deadline would raise it by ``factor`` every
    ``window / 2`` steps, up to the cap (replayed: from 0.03 s to the 2 s cap in about 55 steps).
    """

    def __init__(self, cap: float, factor: float = 2.0, slack: float = 0.01, window: int = 20) -> None:
        self.cap = cap
        self.factor = factor
        self.slack = slack
        self.history: deque[float] = deque(maxlen=window)

    def next(self) -> float:
        if not self.history:
            return self.cap
        return min(self.cap, self.factor * float(np.median(self.history)) + self.slack)

    def observe(self, seconds: float) -> None:
        """Record how long a complete exchange took."""
        self.history.append(float(seconds))

    def observe_gather(self, report: GatherReport, workers: int, f: int = 0) -> None:
        """Record when the complete gradients had arrived, the ``f`` slowest left out, when at least half of the
        ``workers`` gradients (and more than ``f``) were complete."""
        times = sorted(report.complete_elapsed)
        if times and len(times) >= max(1, workers // 2, f + 1):
            self.observe(times[len(times) - 1 - f])


@dataclass
class RunSummary:
    """The JSON summary of a run (``--json-out``).

    The protocol counters (see :class:`aggregathor.transport.ProtocolEvents`) are keyed by worker rank:
    ``rejected_by_rank`` maps the rank that really sent refused datagrams (``"unknown"``: no rank's address)
    to counts by reason; ``incomplete_rows``, ``nonfinite_rows`` and ``huge_rows`` count steps.
    """

    accuracy: float
    loss: float
    steps: int
    wall_seconds: float
    steps_per_second: float
    lost_chunk_fraction: float
    lost_gradients: int
    rejected_datagrams: int
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    rejected_by_rank: dict[str, dict[str, int]] = field(default_factory=dict)
    incomplete_rows: dict[str, int] = field(default_factory=dict)
    nonfinite_rows: dict[str, int] = field(default_factory=dict)
    huge_rows: dict[str, int] = field(default_factory=dict)
    stale_by_rank: dict[str, int] = field(default_factory=dict)
    pool_drops_by_rank: dict[str, int] = field(default_factory=dict)
    duplicates_by_rank: dict[str, int] = field(default_factory=dict)
    # crash faults (see the module notes)
    resumed_from: int = 0  # the step this server started at: that of the checkpoint it restored, else 0
    checkpoints_skipped: list[list[Any]] = field(default_factory=list)  # [step, why] of unusable checkpoints
    missing_workers: int = 0  # worker-steps without a live worker (summed over the steps of this server)
    max_missing_workers: int = 0
    skipped_updates: int = 0  # steps whose aggregate was not finite: the model was left as it was
    rejoins: int = 0  # workers that reconnected after their link died
    control_rejects: dict[str, int] = field(default_factory=dict)  # refused control connections by reason
    control_link_failures: dict[str, int] = field(default_factory=dict)  # lost worker links by reason
    rendezvous_rejects: dict[str, int] = field(default_factory=dict)  # refused rendezvous connections by reason


class _Flat:
    """Apply a flat aggregated gradient to a model's variables with one traced function."""

    def __init__(self, model: Any, optimizer: Any) -> None:
        self.vars = list(model.trainable_variables)
        self.sizes = [int(np.prod(v.shape)) for v in self.vars]
        self.shapes = [v.shape for v in self.vars]
        self.optimizer = optimizer

        @tf.function
        def apply(g: tf.Tensor) -> None:
            parts = tf.split(g, self.sizes)
            self.optimizer.apply_gradients(
                [(tf.reshape(p, s), v) for p, s, v in zip(parts, self.shapes, self.vars, strict=True)])

        self.apply = apply

    def get(self) -> np.ndarray:
        return np.concatenate([v.numpy().reshape(-1) for v in self.vars]).astype(np.float32, copy=False)


async def run_server(cfg: TrainConfig, transport: StepTransport, *, progress: bool = True) -> RunSummary:
    """The parameter server's loop; returns the run summary (also written to ``cfg.json_out``)."""
    exp = experiments.get(cfg.experiment)
    model = exp.build_model(cfg.seed)
    optimizer = build_optimizer(cfg)
    flat = _Flat(model, optimizer)
    theta = flat.get()
    d = theta.size
    n = cfg.workers
    rule = gars.get(cfg.gar, n, cfg.f, **cfg.gar_options)
    rows = np.zeros((n + 1, d), np.float32)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=str))
    step_var = tf.Variable(0, dtype=tf.int64, name="step")
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step_var)
    checkpoints = AtomicCheckpoints(run_dir / "checkpoints", keep=3)
    restored = checkpoints.restore(lambda prefix: ckpt.read(prefix).assert_existing_objects_matched())
    if restored is not None:
        if int(step_var.numpy()) != restored:
            raise RuntimeError(f"checkpoint {checkpoints.path(restored)} holds step {int(step_var.numpy())}, "
                               f"its name says {restored}: the checkpoint directory is inconsistent")
        log.warning("resumed from %s at step %d", checkpoints.path(restored), restored)
    start = int(step_var.numpy())
    saved = start if restored is not None else -1
    writer = tf.summary.create_file_writer(str(run_dir / "tensorboard"))
    for name in ("eval.jsonl", "steps.jsonl"):
        _end_torn_line(run_dir / name)  # a server killed mid-write left half a row: this run starts a new one
    evals = (run_dir / "eval.jsonl").open("a")
    # one JSON row per step (tools/soak.py reads it): buffered, flushed about every second and at each eval
    step_log = (run_dir / "steps.jsonl").open("a", buffering=1 << 16) if cfg.step_log else None
    flushed = time.monotonic()
    deadline = Deadline(cfg.deadline)
    lost_chunks = chunks = lost_grads = rejected = 0
    events = ProtocolEvents(n)  # what the workers did at the protocol level (rejects, non-finite rows...)
    history: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=f"{cfg.gar} n={n} f={cfg.f}", unit="step", leave=True)
    # Compile the rule and trace the update before the first step (they took step 0 over 2 s): the rule is pure,
    # and tracing creates the optimizer's slots without applying anything.
    rule(rows[1:])
    flat.apply.get_concrete_function(tf.TensorSpec([d], tf.float32))
    await transport.control({"ready": True})  # every worker has traced its functions: steps start together
    t0 = time.monotonic()
    last_eval: dict[str, Any] = {}
    missing_workers = getattr(transport, "missing_workers", lambda: [])  # elastic transports (crash faults)
    missing_total = missing_max = 0
    skipped_updates = 0
    try:
        for step in range(start, cfg.steps):
            t_step = time.monotonic()
            await transport.control({"step": step})
            missing = len(missing_workers())  # workers with no live control link: their gradients are lost
            missing_total += missing
            missing_max = max(missing_max, missing)
            t_params = time.monotonic()
            theta[...] = flat.get()
            await transport.params(theta, timeout=cfg.deadline)
            step_deadline = deadline.next()
            t_gather = time.monotonic()
            report = await transport.grads(None, rows, t_gather + step_deadline)
            t_gathered = time.monotonic()
            assert report is not None
            deadline.observe_gather(report, n, cfg.f)
            lost_chunks += report.lost_chunks
            chunks += report.chunks
            rejected += report.rejected
            lost_grads += int(np.sum(report.delivered == 0))
            step_events = events.observe(report, rows[1:])
            g = rule(rows[1:])
            skipped = not bool(tf.reduce_all(tf.math.is_finite(g)))
            if skipped:  # e.g. more than f rows lost (NaN-filled) or non-finite: the model is not touched
                skipped_updates += 1
                log.warning("step %d: the aggregate is not finite (rule %s); update skipped", step, cfg.gar)
            else:
                flat.apply(g)
            step_var.assign(step + 1)
            if step_log is not None:  # the step's duration: control, params, gather, rule, update (no eval)
                now = time.monotonic()
                step_log.write(json.dumps({
                    "step": step, "wall": round(now - t0, 4), "seconds": round(now - t_step, 5),
                    "deadline": round(step_deadline, 5), "gather_seconds": round(t_gathered - t_gather, 5),
                    "control_seconds": round(t_params - t_step, 5), "params_seconds": round(t_gather - t_params, 5),
                    "lost_chunks": int(report.lost_chunks), "chunks": int(report.chunks),  # numpy ints
                    "lost_gradients": int(np.sum(report.delivered == 0)), "missing_workers": missing,
                    **({"update_skipped": True} if skipped else {}), **step_events}) + "\n")
                if now - flushed >= 1.0:
                    step_log.flush()
                    flushed = now
            if bar is not None:
                bar.update(1)
                bar.set_postfix(lost=f"{100 * lost_chunks / max(1, chunks):.2f}%", acc=last_eval.get("accuracy", "-"))
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                last_eval = _evaluate(exp, model, step + 1, t0, lost_chunks, chunks, lost_grads, writer, evals,
                                      missing=missing)
                history.append(last_eval)
                if step_log is not None:
                    step_log.flush()
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                checkpoints.save(step + 1, ckpt.write)
                saved = step + 1
        if saved != cfg.steps:
            checkpoints.save(cfg.steps, ckpt.write)
        await transport.control({"stop": True})
    finally:
        if bar is not None:
            bar.close()
        evals.close()
        if step_log is not None:
            step_log.close()
    wall = time.monotonic() - t0
    final = history[-1] if history else _evaluate(exp, model, cfg.steps, t0, lost_chunks, chunks, lost_grads,
                                                   writer, None)
    done = cfg.steps - start
    summary = RunSummary(
        accuracy=float(final["accuracy"]), loss=float(final["loss"]), steps=cfg.steps, wall_seconds=wall,
        steps_per_second=done / wall if wall > 0 else 0.0,
        lost_chunk_fraction=lost_chunks / chunks if chunks else 0.0, lost_gradients=lost_grads,
        rejected_datagrams=rejected, config=cfg.to_dict(), history=history, **events.totals(),
        resumed_from=start, checkpoints_skipped=[[st, why] for st, why in checkpoints.skipped],
        missing_workers=missing_total, max_missing_workers=missing_max,
        skipped_updates=skipped_updates)
    counters = getattr(transport, "fault_counters", None)
    if counters is not None:
        faults = counters()
        summary.rejoins = int(faults.get("rejoins", 0))
        summary.control_rejects = faults.get("control_rejects", {})
        summary.control_link_failures = faults.get("control_link_failures", {})
        summary.rendezvous_rejects = faults.get("rendezvous_rejects", {})
    if cfg.json_out:  # atomically: a reader never sees half a summary
        atomic_write_text(cfg.json_out, json.dumps(summary.__dict__, indent=1, default=str))
    return summary


def _end_torn_line(path: Path) -> None:
    """End an append-only JSON-lines log with a newline when a crash left its last row half written."""
    try:
        with path.open("rb+") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
    except FileNotFoundError:
        pass


def _evaluate(exp: Any, model: Any, step: int, t0: float, lost: int, chunks: int, lost_grads: int, writer: Any,
              evals: Any, *, missing: int = 0) -> dict[str, Any]:
    metrics = exp.evaluate(model)
    row = {"wall": round(time.monotonic() - t0, 4), "step": step, "loss": float(metrics["loss"]),
           "accuracy": float(metrics["accuracy"]), "lost_chunk_fraction": lost / chunks if chunks else 0.0,
           "lost_gradients": lost_grads, "missing_workers": missing}
    with writer.as_default(step=step):
        tf.summary.scalar("test/accuracy", row["accuracy"])
        tf.summary.scalar("test/loss", row["loss"])
        tf.summary.scalar("transport/lost_chunk_fraction", row["lost_chunk_fraction"])
    if evals is not None:
        evals.write(json.dumps(row) + "\n")
        evals.flush()
    return row


async def run_worker(cfg: TrainConfig, transport: StepTransport) -> int:
    """A worker's loop (honest, or Byzantine when its rank is among the last ``cfg.byzantine``).

    Returns the number of steps it took part in.
    """
    rank = transport.rank
    exp = experiments.get(cfg.experiment)
    model = exp.build_model(cfg.seed)
    d = experiments.flat_size(model)
    shard = exp.partition(cfg.workers, scheme=cfg.partition, alpha=cfg.alpha, seed=cfg.seed)[rank - 1]
    batches = exp.batches(shard, cfg.batch_size, seed=cfg.seed * 1_000_003 + rank)
    grad_fn = experiments.gradient_fn(model, exp.loss)
    byzantine = worker_role(cfg, rank)
    attack = attacks.get(cfg.attack, **cfg.attack_options) if byzantine else None
    rng = np.random.default_rng([cfg.seed, 0xB42])  # shared by the colluding workers: same draws
    theta = experiments.get_flat(model)
    grad = np.zeros(d, np.float32)
    x, y = next(batches)
    grad_fn(x, y)  # trace before the first step, so that it is not late
    experiments.set_flat(model, theta)
    param_deadline = Deadline(cfg.deadline)
    steps = 0
    while True:
        meta = await transport.control(None)
        if meta.get("stop"):
            return steps
        if meta.get("ready"):
            continue
        t0 = time.monotonic()
        delivered = await transport.params(theta, timeout=param_deadline.next())
        if delivered == 1.0:
            param_deadline.observe(time.monotonic() - t0)
        experiments.set_flat(model, theta)
        if attack is None or getattr(attack, "space", "gradient") == "data":
            x, y = next(batches)
            if attack is not None:
                x, y = attack.poison(x, y, rng)
            g, _ = grad_fn(x, y)
            grad[...] = g.numpy()
        elif hasattr(transport, "honest_gradients"):  # a side channel to the honest gradients (simulate)
            grad[...] = attack(await transport.honest_gradients(), cfg.byzantine, rng=rng)[0]
        else:
            grad[...] = _byzantine_gradient(cfg, attack, grad_fn, batches, rng)
        await transport.grads(grad, None, time.monotonic() + cfg.deadline)
        steps += 1


def _byzantine_gradient(cfg: TrainConfig, attack: Any, grad_fn: Any, batches: Any, rng: np.random.Generator) -> Any:
    """The attack's gradient when there is no side channel to the honest ones (multi-process runs). The attacker
    estimates what the honest workers send: it computes ``n - f`` gradients on its own shard (the same
    distribution as the honest workers' under IID partitioning) and hands them to the attack, which returns the
    ``cfg.byzantine`` colluding gradients; this rank sends its own row. The colluders coordinate without talking:
    they share the attack's random stream (same seed) and its rules, and differ only by the shards their estimates
    come from. With ``--launcher simulate`` they get the real honest gradients of the
    step instead (:meth:`aggregathor.simulate.SimTransport.honest_gradients`).
    """
    honest = []
    for _ in range(max(2, cfg.workers - cfg.byzantine)):
        x, y = next(batches)
        g, _ = grad_fn(x, y)
        honest.append(g.numpy())
    byz = attack(np.stack(honest), cfg.byzantine, rng=rng)
    return byz[0]


def configure_logging() -> None:
    logging.basicConfig(level=os.environ.get("AGGREGATHOR_LOG", "WARNING"),
                        format="%(asctime)s %(name)s rank=%(process)d %(levelname)s %(message)s")
