"""The Python API: ``aggregathor.train(experiment, **settings) -> RunSummary``.

Train any Keras model Byzantine-resiliently from Python, with the settings of ``aggregathor train`` (the fields of
:class:`~aggregathor.config.TrainConfig`)::

    import aggregathor

    experiment = aggregathor.KerasExperiment(build_model, train=(x_train, y_train), test=(x_test, y_test))

    if __name__ == "__main__":
        summary = aggregathor.train(experiment, workers=5, f=1, byzantine=1, attack="reverse", gar="multi-krum")
        print(summary.accuracy)

With ``launcher="simulate"`` every rank runs in this process, and ``experiment`` may be any object. The ``local``
(default) and ``mpi`` launchers start other processes, which rebuild the experiment themselves: it must then be
importable, i.e. bound at the top level of a module or of a file (the script that calls ``train`` counts; keep
that call under ``if __name__ == "__main__":``, since the other processes import the file), or be given as a
``path/to/file.py:attr`` or ``package.module:attr`` reference (see docs/api.md).
"""

from __future__ import annotations

import itertools
import types
from typing import Any

from aggregathor import _registry, experiments
from aggregathor._registry import reference_of
from aggregathor.config import ConfigError, TrainConfig
from aggregathor.summary import RunSummary

__all__ = ["train"]

#: Experiments handed to :func:`train` as objects that no module binds, for in-process (simulated) runs only:
#: ``aggregathor.api:in_process.<key>`` resolves to them in this process.
in_process = types.SimpleNamespace()
_keys = itertools.count()


def _reference(experiment: Any, launcher: str) -> str:
    """The ``--experiment`` string of ``experiment``: a name or reference as given, else one that finds it."""
    if isinstance(experiment, str):
        return experiment
    ref = getattr(experiment, "reference", None) or reference_of(experiment)
    if ref is not None:
        return ref
    if launcher != "simulate":
        raise ConfigError(f"aggregathor.train: the {launcher} launcher starts other processes, which cannot find this "
                          f"{type(experiment).__name__}: bind it at the top level of a module or file (and call "
                          "train() under `if __name__ == \"__main__\":`), pass a 'path/file.py:attr' reference, or "
                          "use launcher=\"simulate\"")
    key = f"experiment{next(_keys)}"
    setattr(in_process, key, experiment)
    return f"aggregathor.api:in_process.{key}"


def train(experiment: Any = experiments.DEFAULT, *, progress: bool = False, **settings: Any) -> RunSummary | None:
    """Train ``experiment`` with ``settings`` and return the parameter server's :class:`RunSummary`.

    Parameters
    ----------
    experiment : str or Experiment
        A built-in name (``"digits"``), a ``module:attr`` reference, or the experiment itself (a
        :class:`~aggregathor.experiments.keras_experiment.KerasExperiment`, an ``Experiment``, a subclass or a
        zero-argument factory of either); see the module notes for the launchers that start processes.
    progress : bool
        Draw the server's progress bar.
    **settings
        Any field of :class:`~aggregathor.config.TrainConfig` (``workers``, ``f``, ``byzantine``, ``attack``,
        ``gar``, ``steps``, ``lr``, ``transport``, ``loss``, ``launcher``, ``run_dir``, ``resume`` ...). An unknown
        one raises :class:`~aggregathor.config.ConfigError` naming it.

    Returns
    -------
    RunSummary or None
        The final evaluation (``accuracy``, ``loss``, ``metrics``), the history and the transport's counters; None
        on the worker ranks of an MPI run (as mpi4py's root-only results), where only rank 0 holds it.
    """
    from aggregathor.launch import launch

    if _registry.importing:
        raise ConfigError(f"aggregathor.train() was called while importing {_registry.importing[-1]} to find an "
                          "experiment (every rank imports it): put the train() call under "
                          "`if __name__ == \"__main__\":`")
    launcher = settings.get("launcher", TrainConfig.launcher)
    cfg = TrainConfig.from_dict({**settings, "experiment": _reference(experiment, launcher)})
    return launch(cfg, progress=progress)
