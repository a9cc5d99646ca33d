"""aggregathor: Byzantine-resilient distributed SGD on TensorFlow 2 over lossympi.

A trusted parameter server aggregates the workers' gradients with robust rules (median, Multi-Krum,
Bulyan, ...) so that up to f Byzantine workers cannot poison learning (Damaskinos et al., SysML 2019).
Importing this package imports TensorFlow; :mod:`lossympi` (the transport) does not. Without the ``[train]``
extra, importing it raises :class:`MissingTrainingDependencies`, whose one-line message says how to install it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from types import TracebackType

ExceptHook = Callable[[type[BaseException], BaseException, TracebackType | None], object]

#: The modules of the ``[train]`` extra that aggregathor imports (``import name`` -> what pip installs).
TRAIN_MODULES = {"tensorflow": "TensorFlow", "sklearn": "scikit-learn", "grpc": "grpcio",
                 "tensorboard": "TensorBoard", "matplotlib": "matplotlib", "tqdm": "tqdm"}


class MissingTrainingDependencies(ImportError):
    """aggregathor was installed without its ``[train]`` extra; the message says how to install it."""


def _one_line_hook(previous: ExceptHook) -> ExceptHook:
    """An excepthook that prints a :class:`MissingTrainingDependencies` as its one-line message."""

    def hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if isinstance(exc, MissingTrainingDependencies):
            print(f"error: {exc}", file=sys.stderr)
        else:
            previous(kind, exc, tb)

    return hook


_missing = [label for name, label in TRAIN_MODULES.items() if importlib.util.find_spec(name) is None]
if _missing:
    # Uncaught (`python -c "import aggregathor"`, the `aggregathor` command), it prints one line, not a traceback.
    sys.excepthook = _one_line_hook(sys.excepthook)
    raise MissingTrainingDependencies(
        f"aggregathor needs {', '.join(_missing)} (its [train] extra): pip install \"aggregathor-reborn[train]\"")

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from aggregathor.banners import import_tensorflow  # noqa: E402  (standard library only)

tf = import_tensorflow()  # without TensorFlow's start-up banners (aggregathor train --verbose shows them)

__version__ = "0.1.0"

from aggregathor.api import train  # noqa: E402
from aggregathor.config import ConfigError, TrainConfig  # noqa: E402
from aggregathor.experiments.keras_experiment import KerasExperiment  # noqa: E402
from aggregathor.summary import RunSummary  # noqa: E402

__all__ = ["__version__", "ConfigError", "KerasExperiment", "MissingTrainingDependencies", "RunSummary",
           "TRAIN_MODULES", "TrainConfig", "default_device", "devices", "train"]


def devices() -> dict[str, list[str]]:
    """Logical TensorFlow devices by type, e.g. ``{"CPU": ["/device:CPU:0"], "GPU": [...]}``."""
    out: dict[str, list[str]] = {}
    for d in tf.config.list_logical_devices():
        out.setdefault(d.device_type, []).append(d.name)
    return out


def default_device() -> str:
    """The device the aggregation rules run on: the first GPU when present, else the CPU."""
    found = devices()
    return (found.get("GPU") or found["CPU"])[0]
