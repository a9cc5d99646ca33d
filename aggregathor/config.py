"""The training configuration: one validated dataclass, from flags or a TOML file.

Impossible settings (an ``f`` too large for the rule, more Byzantine workers than workers, an unknown rule,
attack or experiment) raise :class:`ConfigError` before any process starts.

The checks build the rule and import TensorFlow, so they run once per config object: :meth:`TrainConfig.validate`
remembers that it passed, and setting any field afterwards makes the next call check again. The rule's check is
also remembered per process for its settings (rule, workers, f, options), so copies of a config (the launcher's
per-rank config) do not build it again.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "TrainConfig", "TRANSPORTS", "LAUNCHERS"]

TRANSPORTS = ("lossympi", "tcp", "mpi", "grpc")
LAUNCHERS = ("local", "mpi", "simulate")
OPTIMIZERS = ("sgd", "momentum", "adam")
SCHEDULES = ("constant", "cosine", "step")
PARAM_MODES = ("lossy", "reliable")


class ConfigError(ValueError):
    """A training setting that cannot work; the message names it and how to fix it."""


@dataclass
class TrainConfig:
    """Everything one training run needs. Field names are the long flags (``--byzantine`` ...)."""

    experiment: str = "digits"
    gar: str = "multi-krum"
    workers: int = 8
    f: int = 1
    byzantine: int = 1
    attack: str = "reverse"
    steps: int = 300
    batch_size: int = 32
    optimizer: str = "momentum"
    lr: float = 0.1
    momentum: float = 0.9
    schedule: str = "constant"
    transport: str = "lossympi"
    loss: float = 0.01
    fill: str = "zero"
    params: str = "lossy"
    deadline: float = 2.0
    seed: int = 0
    partition: str = "iid"
    alpha: float = 0.5
    eval_every: int = 50
    checkpoint_every: int = 100
    run_dir: str | None = None  # None: a fresh runs/<UTC time>-<experiment>-<gar> (aggregathor.rundir)
    resume: bool = False  # continue the run in run_dir (its stored settings must match; steps may be raised)
    launcher: str = "local"
    json_out: str | None = None
    step_log: bool = True
    gar_options: dict[str, Any] = field(default_factory=dict)
    attack_options: dict[str, Any] = field(default_factory=dict)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name in _FIELDS:  # a changed setting: check again, derive again
            self.__dict__.pop("_nan_robust", None)
            self.__dict__.pop("lost_row_fill", None)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Load ``path`` (a flat TOML table of the fields, or a ``[train]`` table), then apply overrides."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        data = data.get("train", data)
        return cls.from_dict({**data, **{k: v for k, v in overrides.items() if v is not None}})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        cfg = cls(**{k.replace("-", "_"): v for k, v in data.items()})
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ validation
    def is_byzantine(self, rank: int) -> bool:
        """True when worker ``rank`` (1..n) is Byzantine: the last ``byzantine`` ranks are."""
        return rank > self.workers - self.byzantine

    @cached_property
    def lost_row_fill(self) -> float:
        """The value of a gradient row that missed the deadline entirely: NaN when the rule is NaN-robust (it then
        knows the row is lost), else 0.0. Every backend fills lost rows with it."""
        self.validate()
        return float("nan") if self.__dict__["_nan_robust"] else 0.0

    def validate(self) -> TrainConfig:
        """Check every setting; raise ConfigError naming the first impossible one.

        Runs the checks once: a config that passed returns at once until one of its fields is set again.
        """
        if "_nan_robust" in self.__dict__:
            return self
        self._check()
        return self

    def _check(self) -> None:
        from aggregathor import attacks, experiments

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(isinstance(self.workers, int) and self.workers >= 1, f"--workers must be >= 1, got {self.workers}")
        need(isinstance(self.f, int) and self.f >= 0, f"--f must be >= 0, got {self.f}")
        need(isinstance(self.byzantine, int) and 0 <= self.byzantine <= self.workers,
             f"--byzantine {self.byzantine} must be between 0 and the number of workers ({self.workers})")
        need(self.byzantine <= self.f or self.gar == "average",
             f"--byzantine {self.byzantine} exceeds the declared bound --f {self.f}: the rule would not be "
             "guaranteed to tolerate them; raise --f (if the rule allows it) or lower --byzantine")
        need(self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        need(self.optimizer in OPTIMIZERS, f"unknown --optimizer {self.optimizer!r}; use one of {OPTIMIZERS}")
        need(self.schedule in SCHEDULES, f"unknown --schedule {self.schedule!r}; use one of {SCHEDULES}")
        need(self.transport in TRANSPORTS, f"unknown --transport {self.transport!r}; use one of {TRANSPORTS}")
        need(self.launcher in LAUNCHERS, f"unknown --launcher {self.launcher!r}; use one of {LAUNCHERS}")
        need(self.params in PARAM_MODES, f"unknown --params {self.params!r}; use one of {PARAM_MODES}")
        need(self.transport != "mpi" or self.launcher == "mpi",
             "--transport mpi needs the MPI launcher: mpiexec -n N+1 aggregathor train --launcher mpi --transport mpi")
        need(0.0 <= self.loss < 1.0, f"--loss must be a probability in [0, 1), got {self.loss}")
        need(self.loss == 0 or self.transport == "lossympi",
             f"--loss {self.loss} emulates datagram loss on lossympi; with --transport {self.transport} emulate "
             "loss on the network instead (tools/netem)")
        need(self.deadline > 0, f"--deadline must be > 0 seconds, got {self.deadline}")
        need(isinstance(self.step_log, bool), f"--step-log must be true or false, got {self.step_log!r}")
        need(isinstance(self.resume, bool), f"--resume must be true or false, got {self.resume!r}")
        need(self.run_dir is None or (isinstance(self.run_dir, str) and self.run_dir != ""),
             f"--run-dir must be a directory path, got {self.run_dir!r}")
        need(self.partition in ("iid", "dirichlet"), f"--partition must be iid or dirichlet, got {self.partition!r}")
        need(isinstance(self.experiment, str), "--experiment must be a name or a module:attr reference, got "
             f"{type(self.experiment).__name__} (aggregathor.train() takes the object itself)")
        try:  # a name, an entry point or a module:attr reference to user code (resolved here, on this rank)
            experiment = experiments.get(self.experiment)
        except ValueError as exc:
            raise ConfigError(f"--experiment: {exc}" if not str(exc).startswith("--") else str(exc)) from exc
        if self.byzantine:
            try:
                attack = attacks.get(self.attack, **self.attack_options)
                if getattr(attack, "space", "gradient") == "data":
                    attack.check_experiment(experiment)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"--attack: {exc}" if not str(exc).startswith("--") else str(exc)) from exc
        try:  # the ranks of a local run get the config as JSON
            options = json.dumps(self.gar_options, sort_keys=True)
        except TypeError as exc:
            raise ConfigError(f"--gar-option values must be JSON values (numbers, strings, lists): {exc}") from exc
        need(isinstance(self.gar, str), f"--gar must be a rule's name, got {self.gar!r}")
        try:
            robust = _rule_nan_robust(self.gar, self.workers, self.f, options)
        except ValueError as exc:  # unknown rule or violated bound: the rule's message names it
            where = f"--gar {self.gar} with --workers {self.workers} --f {self.f}"
            raise ConfigError(str(exc) if str(exc).startswith("--gar") else f"{where}: {exc}") from exc
        self.__dict__["_nan_robust"] = robust  # the mark of a validated config


@lru_cache(maxsize=64)
def _rule_nan_robust(gar: str, workers: int, f: int, options: str) -> bool:
    """Build the rule once per process and settings (``options``: its keyword arguments as sorted JSON); whether
    it tolerates NaN rows. Raises the rule's ValueError for impossible settings (not remembered)."""
    from aggregathor import gars

    return bool(gars.get(gar, workers, f, **json.loads(options)).nan_robust)


_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))
