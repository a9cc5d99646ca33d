"""The trusted parameter server (rank 0): :class:`ParameterServer`.

Each synchronous step (:meth:`ParameterServer.step`):

1. the server announces the step number reliably (``announce``), then sends the parameters (``send_params``);
2. every worker loads them, computes the gradient of its own mini-batch (from its own shard; a Byzantine
   worker replaces it by an attack) and sends it (:mod:`aggregathor.worker`);
3. the server gathers the gradients until the step's deadline (``gather``), what is missing filled, aggregates
   them with the robust rule and applies the Keras optimizer (:meth:`ParameterServer.aggregate`).

Steps with missing gradients (:class:`RowSubsetRules`). A row has *arrived* when at least one of its chunks did
(``GatherReport.arrived()``: a row with lost chunks is arrived, its gaps filled); a row of which nothing came (a
dead link, a crashed worker, a gradient that missed the deadline entirely) is *missing*. When all ``n`` rows
arrived the step is ``"full"``. When only ``n' < n`` did, the ``n'`` rows are copied into a preallocated buffer and
aggregated by the rule rebuilt for ``(n', f)`` with the same options (cached by ``n'``), when its bound holds: the
step is ``"reduced"``, and the ``f`` Byzantine workers it tolerates are counted among the rows that arrived. When
that bound fails but at most ``f`` rows are missing, the rule for ``n`` runs on all the rows, the missing ones
filled (they count against ``f``, as before this rule existed): ``"full"``. Otherwise, and whenever the aggregate is
not finite, the model is left as it was: ``"skipped"`` (``update_skipped``). ``steps.jsonl`` has ``aggregation``
and ``aggregated_rows`` per step; the summary counts ``reduced_updates``, ``skipped_updates`` and, among these,
``skipped_too_few_rows``.

The server only ever reads numbers from the workers: fixed-size float32 vectors, checked by the transport
(size, dtype, step tag) before a byte is written. It runs no code that came over the network.

Crash faults (elastic transports, :attr:`~aggregathor.transport.Capability.ELASTIC`): the server never waits for a
worker outside the gather's deadline. A worker whose link died is *missing* (``transport.missing_workers()``): it
gets no step message and its gradient row is lost (filled like a row that missed the deadline). The number of
missing workers is logged per step (``steps.jsonl``, ``missing_workers``), in each evaluation row and, summed over
the steps, in the summary, with the transport's fault counters (refused connections, lost links, rejoins). A
restarted worker rejoins and takes part from the next step on. Checkpoints are atomic
(:class:`aggregathor.checkpoint.AtomicCheckpoints`): a server restarted on the same run directory resumes from the
newest intact one (``resumed_from`` in the summary); the summary itself is written atomically.

What the server writes to its run directory: ``config.json``, ``checkpoints/``, ``tensorboard/``, ``eval.jsonl``
(one row per evaluation), ``steps.jsonl`` (one row per step, :class:`aggregathor.steplog.StepRecord`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

from aggregathor import experiments, gars
from aggregathor.checkpoint import AtomicCheckpoints
from aggregathor.config import TrainConfig
from aggregathor.deadline import Deadline
from aggregathor.notices import Notices
from aggregathor.state import aggregate_state
from aggregathor.steplog import JsonLines, StepRecord
from aggregathor.summary import RunCounters, RunSummary
from aggregathor.transport.base import ProtocolEvents, ServerTransport

__all__ = ["Aggregation", "ParameterServer", "RowSubsetRules", "build_optimizer", "positional_rows",
           "run_server"]

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


class RowSubsetRules:
    """The run's rule rebuilt for the ``n' < n`` rows that arrived in a step, cached by ``n'``.

    A rebuilt rule has the same name and options (``pre=`` wrappers, Multi-Krum's ``m``, ...) as the run's and the
    same ``f``: :func:`aggregathor.gars.get` ``(name, n', f, **options)``. Its bound is checked once per ``n'``
    (``check()``); an ``n'`` out of the rule's reach is cached too, with the reason. A rule whose rows are
    positional (``positional_rows``: Draco's groups of consecutive workers) is never rebuilt: for it every
    ``n' < n`` is out of reach.

    Parameters
    ----------
    name : str
        The rule (``--gar``: a registered name or a reference to the user's code).
    n : int
        The number of workers (rows of a full step).
    f : int
        The number of Byzantine workers tolerated.
    options : dict
        The rule's options (``--gar-options``), ``pre`` included.
    positional : bool
        The rule's rows are positional (:func:`positional_rows` of the rule built for ``n``).

    Examples
    --------
    >>> rules = RowSubsetRules("median", 5, 1, {})
    >>> rules.rule(3)[0].n, rules.rule(2)[0] is None, "n >= 2f + 1" in rules.rule(2)[1]
    (3, True, True)
    """

    def __init__(self, name: str, n: int, f: int, options: dict[str, Any], *, positional: bool = False) -> None:
        self.name, self.n, self.f, self.options, self.positional = name, n, f, dict(options), positional
        self.cache: dict[int, tuple[gars.GAR | None, str]] = {}
        self._buffer: np.ndarray | None = None  # (n - 1, d): the rows that arrived, first n' rows used

    def rule(self, rows: int) -> tuple[gars.GAR | None, str]:
        """The rule for ``rows`` arrived rows and ``""``, or None and why its bound fails (``0 < rows < n``)."""
        if not 0 < rows < self.n:
            raise ValueError(f"a reduced step has 1 to {self.n - 1} rows, got {rows}")
        got = self.cache.get(rows)
        if got is None and self.positional:
            got = self.cache[rows] = (None, f"{self.name}'s rows are positional (row i is worker i + 1's): it is "
                                            "not rebuilt for the rows that arrived")
        if got is None:
            try:
                got = (gars.get(self.name, rows, self.f, **self.options), "")
            except ValueError as exc:
                got = (None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            self.cache[rows] = got
        return got

    def gather(self, rows: np.ndarray, arrived: np.ndarray) -> np.ndarray:
        """The ``(n', d)`` rows of ``rows`` (``(n, d)``, any strides) where ``arrived``, copied into the reused
        buffer (allocated at the first reduced step; a step with every row never copies)."""
        count = int(np.count_nonzero(arrived))
        shape = (self.n - 1, rows.shape[1])
        if self._buffer is None or self._buffer.shape != shape or self._buffer.dtype != rows.dtype:
            self._buffer = np.empty(shape, rows.dtype)
        out = self._buffer[:count]
        np.take(rows, np.flatnonzero(arrived), axis=0, out=out)
        return out


def positional_rows(rule: gars.GAR) -> bool:
    """Whether ``rule`` (or the rule behind its wrappers) needs row ``i`` to be worker ``i + 1``'s."""
    return bool(getattr(rule, "positional_rows", False) or getattr(getattr(rule, "inner", None), "positional_rows",
                                                                   False))


class Aggregation(NamedTuple):
    """What a step's aggregation did: ``kind`` is ``"full"``, ``"reduced"`` or ``"skipped"``; ``rows`` the rows the
    rule aggregated (0: the rule did not run); ``why`` the reason of a skip (``"bound"``: too few rows arrived for
    the rule's bound, ``"nonfinite"``: the aggregate was not finite), else ``""``."""

    kind: str
    rows: int
    why: str = ""


class _Outputs:
    """Where the server reports as it runs: TensorBoard, ``eval.jsonl``, ``steps.jsonl`` (unless off), a bar."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, start: int, progress: bool) -> None:
        self.tensorboard = tf.summary.create_file_writer(str(run_dir / "tensorboard"))
        self.evals = JsonLines(run_dir / "eval.jsonl")
        # one JSON row per step (tools/soak.py reads it): buffered, flushed about every second and at each eval
        self.steps = JsonLines(run_dir / "steps.jsonl", flush_every=1.0) if cfg.step_log else None
        self.bar: Any = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.steps, initial=start, desc=f"{cfg.gar} n={cfg.workers} f={cfg.f}", unit="step",
                            leave=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.evals.close()
        if self.steps is not None:
            self.steps.close()
        self.tensorboard.close()


class ParameterServer:
    """Rank 0's part of a run: holds the model and the optimizer, runs the steps over ``transport``.

    :meth:`run` drives the rest: :meth:`restore` (run directory, checkpoint), :meth:`warm_up` (compile, then the
    ready barrier), :meth:`step` for every step left, :meth:`finish` (last checkpoint, stop, summary).

    Parameters
    ----------
    cfg : TrainConfig
        The run (validated).
    transport : ServerTransport
        The server's side of the step exchanges.
    progress : bool
        Draw a progress bar.
    """

    def __init__(self, cfg: TrainConfig, transport: ServerTransport, *, progress: bool = True) -> None:
        self.cfg = cfg.validate()
        self.transport = transport
        self.progress = progress
        self.exp = experiments.get(cfg.experiment)
        self.model = self.exp.build_model(cfg.seed)
        self.optimizer = build_optimizer(cfg)
        self.view = experiments.flat_view(self.model)
        self.update = self.view.update_fn(self.optimizer)
        self.rule = gars.get(cfg.gar, cfg.workers, cfg.f, **cfg.gar_options)
        self.subsets = RowSubsetRules(cfg.gar, cfg.workers, cfg.f, cfg.gar_options,  # steps with missing rows
                                      positional=positional_rows(self.rule))
        # what travels: the parameters (gradient) then the model's state (aggregathor.state)
        self.theta = np.zeros(self.view.wire_size, np.float32)
        self.rows = np.zeros((cfg.workers + 1, self.view.wire_size), np.float32)  # row r: worker r's message
        self.run_dir = Path(cfg.run_dir)
        self.step_var = tf.Variable(0, dtype=tf.int64, name="step")
        self.ckpt = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, step=self.step_var)
        self.checkpoints: AtomicCheckpoints | None = None
        self.deadline = Deadline(cfg.deadline)
        self.counters = RunCounters()
        self.events = ProtocolEvents(cfg.workers)  # what the workers did at the protocol level
        self.notices = Notices(log)  # repeating conditions: logged once, then counted
        self.history: list[dict[str, Any]] = []  # the evaluation rows
        self.start = 0  # the step this server starts at (that of the checkpoint it restored)
        self.saved = -1  # the step of the newest checkpoint
        self.t0 = time.monotonic()  # the run's clock (reset when the steps start)
        self.outputs: _Outputs | None = None

    async def run(self) -> RunSummary:
        """Run every step left; returns the summary (also written to ``cfg.json_out``)."""
        self.restore()
        self.outputs = _Outputs(self.cfg, self.run_dir, self.start, self.progress)
        try:
            await self.warm_up()
            for k in range(self.start, self.cfg.steps):
                await self.step(k)
            return await self.finish()
        finally:
            self.outputs.close()

    def restore(self) -> int:
        """Create the run directory, record the config there and, with ``cfg.resume``, load the newest intact
        checkpoint. A directory that holds a run is refused without ``cfg.resume``, or when the stored settings
        differ (:func:`aggregathor.rundir.check_reuse`: ConfigError).

        Returns the step to start at (0 without a checkpoint).
        """
        from aggregathor.rundir import check_reuse

        check_reuse(self.cfg, self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1, default=str))
        self.checkpoints = checkpoints = AtomicCheckpoints(self.run_dir / "checkpoints", keep=3)
        restored = None
        if self.cfg.resume:
            restored = checkpoints.restore(lambda prefix: self.ckpt.read(prefix).assert_existing_objects_matched())
        self.start = int(self.step_var.numpy())
        if restored is not None:
            if self.start != restored:
                raise RuntimeError(f"checkpoint {checkpoints.path(restored)} holds step {self.start}, its name says "
                                   f"{restored}: the checkpoint directory is inconsistent")
            log.warning("resumed from %s at step %d", checkpoints.path(restored), restored)
        self.saved = self.start if restored is not None else -1
        return self.start

    async def warm_up(self) -> None:
        """Compile the rule and trace the update (without applying anything), then wait for the workers' ready
        barrier, so that step 0 carries no compilation (it took over 2 s); the run's clock starts here."""
        self.rule(self._gradients())
        self.update.get_concrete_function()  # creates the optimizer's slots too
        await self.transport.announce({"ready": True})  # every worker has traced its functions
        self.t0 = time.monotonic()

    async def step(self, k: int) -> StepRecord:
        """Run step ``k``: announce it, send the parameters, gather, aggregate, update; then log it, and evaluate
        and checkpoint when due. Returns the step's record (as written to ``steps.jsonl``)."""
        transport, start = self.transport, time.monotonic()
        await transport.announce({"step": k})
        missing = len(transport.missing_workers())  # workers with no live link: their gradients are lost
        params_at = time.monotonic()
        self.view.get_message(self.theta)
        sent = await transport.send_params(self.theta, timeout=self.cfg.deadline)
        deadline = self.deadline.next()
        gather_at = time.monotonic()
        report = await transport.gather(self.rows, gather_at + deadline)
        rec = StepRecord(k, start, params_at, gather_at, time.monotonic(), deadline, report.lost_chunks,
                         report.chunks, missing_workers=missing, params_chunks=sent.chunks,
                         params_lost_chunks=sent.lost_chunks)
        self.deadline.observe_gather(report, self.cfg.workers, self.cfg.f)
        self.counters.add_missing(missing)
        rec.lost_gradients = self.counters.add_gather(report)
        self.notices.note("gradients lost", k, f"{rec.lost_gradients} gradient(s) missed the deadline entirely",
                          rec.lost_gradients)
        self.notices.note("worker-steps without a live worker", k, f"{missing} worker(s) missing (no live link)",
                          missing)
        rec.events = self.events.observe(report, self.rows[1:])
        done = self.aggregate(k, report.arrived())
        rec.aggregation, rec.aggregated_rows, rec.update_skipped = done.kind, done.rows, done.kind == "skipped"
        if self.view.state_size:
            self.view.set_state(aggregate_state(self.rows[1:], report, self.view.size, self.view.get_state(),
                                               self.cfg.f))
        self.step_var.assign(k + 1)
        self._log_step(rec)
        self._when_due(k + 1, missing)
        return rec

    def aggregate(self, k: int, arrived: np.ndarray) -> Aggregation:
        """Aggregate step ``k``'s rows and update the model (see the module notes: full, reduced or skipped).

        Parameters
        ----------
        k : int
            The step (for the notices).
        arrived : ndarray of bool, shape (n,)
            The rows that arrived (:meth:`aggregathor.transport.base.GatherReport.arrived`).
        """
        n, f, count = self.cfg.workers, self.cfg.f, int(np.count_nonzero(arrived))
        rule, kind, why = self.rule, "full", ""
        if count < n:
            reduced, why = self.subsets.rule(count) if count else (None, "no gradient arrived")
            if reduced is not None:
                rule, kind = reduced, "reduced"
            elif n - count > f:
                return self._skip(k, "bound", f"{n - count} of {n} gradients missing and the rule for the {count} "
                                              f"that arrived is out of reach ({why}); the update is skipped")
        if kind == "reduced":
            rows = self.subsets.gather(self.rows[1:, :self.view.size], arrived)
            self.notices.note("updates on the rows that arrived (rule rebuilt for n' < n)", k,
                              f"{count} of {n} gradients arrived: aggregated by {self.cfg.gar} rebuilt for "
                              f"n'={count}, f={f}")
        else:
            rows = self._gradients()
        g = rule(rows)
        if not bool(tf.reduce_all(tf.math.is_finite(g))):
            return self._skip(k, "nonfinite", f"the aggregate is not finite (rule {self.cfg.gar}); the update is "
                                              "skipped", rows=len(rows))
        self.update(g)
        if kind == "reduced":
            self.counters.reduced_updates += 1
        return Aggregation(kind, len(rows))

    def _skip(self, k: int, why: str, text: str, rows: int = 0) -> Aggregation:
        """Count a skipped update (``why``: ``"bound"`` or ``"nonfinite"``), noted once per reason."""
        self.counters.skipped_updates += 1
        if why == "bound":
            self.counters.skipped_too_few_rows += 1
            self.notices.note("updates skipped (too few gradients for the rule's bound)", k, text)
        else:
            self.notices.note("updates skipped (non-finite aggregate)", k, text)
        return Aggregation("skipped", rows, why)

    def _gradients(self) -> np.ndarray:
        """The ``(n, d)`` gradient rows, without the state columns (contiguous: a copy when there is a state)."""
        rows = self.rows[1:]
        return np.ascontiguousarray(rows[:, :self.view.size]) if self.view.state_size else rows

    def _log_step(self, rec: StepRecord) -> None:
        assert self.outputs is not None
        if self.outputs.steps is not None:
            self.outputs.steps.write(rec.row(time.monotonic(), self.t0))
        if self.outputs.bar is not None:
            accuracy = self.history[-1].get("accuracy", "-") if self.history else "-"
            self.outputs.bar.update(1)
            self.outputs.bar.set_postfix(lost=f"{100 * self.counters.lost_chunk_fraction:.2f}%", acc=accuracy)

    def _when_due(self, done: int, missing: int) -> None:
        """After ``done`` steps: evaluate and checkpoint when their period says so (and evaluate at the end)."""
        if done % self.cfg.eval_every == 0 or done == self.cfg.steps:
            self.evaluate(done, missing=missing)
            assert self.outputs is not None
            if self.outputs.steps is not None:
                self.outputs.steps.flush()
        if self.cfg.checkpoint_every and done % self.cfg.checkpoint_every == 0:
            self._save(done)

    def _save(self, done: int) -> None:
        assert self.checkpoints is not None
        self.checkpoints.save(done, self.ckpt.write)
        self.saved = done

    def evaluate(self, step: int, *, missing: int = 0, record: bool = True) -> dict[str, Any]:
        """Evaluate the model after ``step`` steps (``missing``: the workers missing at that step).

        Returns the evaluation row (the keys of ``eval.jsonl``); it goes to TensorBoard, and with ``record`` also
        to ``eval.jsonl`` and the history.
        """
        metrics = {k: float(v) for k, v in self.exp.evaluate(self.model).items()}
        row: dict[str, Any] = {"wall": round(time.monotonic() - self.t0, 4), "step": step, "loss": metrics["loss"]}
        if "accuracy" in metrics:  # a classification task
            row["accuracy"] = metrics["accuracy"]
        extra = {k: v for k, v in metrics.items() if k not in ("loss", "accuracy")}  # the user's metrics
        if extra:
            row["metrics"] = extra
        row.update(lost_chunk_fraction=self.counters.lost_chunk_fraction,
                   lost_gradients=self.counters.lost_gradients, missing_workers=missing)
        assert self.outputs is not None
        with self.outputs.tensorboard.as_default(step=step):
            for name, value in metrics.items():
                tf.summary.scalar(f"test/{name}", value)
            tf.summary.scalar("transport/lost_chunk_fraction", row["lost_chunk_fraction"])
        if record:
            self.outputs.evals.write(row)
            self.history.append(row)
            totals = self.notices.totals()
            if totals is not None:
                log.warning("step %d: %s", step, totals)
        return row

    async def finish(self) -> RunSummary:
        """Save the last checkpoint, tell the workers to stop; returns the run's summary, also written (atomically)
        to ``cfg.json_out`` when set."""
        cfg = self.cfg
        if self.saved != cfg.steps:
            self._save(cfg.steps)
        await self.transport.announce({"stop": True})
        wall = time.monotonic() - self.t0
        final = self.history[-1] if self.history else self.evaluate(cfg.steps, record=False)
        assert self.checkpoints is not None
        summary = RunSummary.of_run(
            evaluation=final, counters=self.counters, faults=self.transport.fault_counters(), steps=cfg.steps,
            done=cfg.steps - self.start, wall=wall, config=cfg.to_dict(), history=self.history,
            **self.events.totals(), resumed_from=self.start,
            checkpoints_skipped=[[st, why] for st, why in self.checkpoints.skipped])
        if cfg.json_out:
            summary.write(cfg.json_out)
        return summary


async def run_server(cfg: TrainConfig, transport: ServerTransport, *, progress: bool = True) -> RunSummary:
    """The parameter server's run (:meth:`ParameterServer.run`); returns the summary."""
    return await ParameterServer(cfg, transport, progress=progress).run()
