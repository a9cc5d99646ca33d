"""Experiments: a model plus a data set, chosen by name, one module per experiment, with a registry.

``aggregathor.experiments.get("digits")`` builds an :class:`~aggregathor.experiments.base.Experiment`;
``names()`` lists them. ``digits`` (the default) needs no download; ``mnist``, ``fashion-mnist`` and
``cifar10`` read Keras's cache (``~/.keras/datasets``) and raise :class:`DatasetUnavailable` with the fix when
it is empty and offline; ``resnet50`` and ``synthetic`` generate their data.

The parameter server ships parameters and gradients as one flat float32 vector: :func:`flat_size`,
:func:`get_flat`, :func:`set_flat` and :func:`gradient_fn` map a model to and from that vector.
"""

from __future__ import annotations

from typing import Any

from aggregathor.experiments.base import (
    REGISTRY,
    DatasetUnavailable,
    Experiment,
    batch_indices,
    partition_labels,
    register,
    registry,
)
from aggregathor.experiments.flat import FlatView, flat_size, flat_view, get_flat, gradient_fn, set_flat

__all__ = [
    "DEFAULT",
    "DatasetUnavailable",
    "Experiment",
    "FlatView",
    "batch_indices",
    "flat_size",
    "flat_view",
    "get",
    "get_flat",
    "gradient_fn",
    "names",
    "partition_labels",
    "register",
    "registry",
    "set_flat",
]

DEFAULT = "digits"
def names() -> list[str]:
    """Names of the built-in experiments and of those installed packages register as entry points (group
    ``aggregathor.experiments``), sorted."""
    return REGISTRY.names()


def get(name: str = DEFAULT, **options: Any) -> Experiment:
    """Build the experiment ``name`` with its ``options`` (see each experiment's docstring).

    ``name`` is a built-in name, an entry-point name, or a reference to your own code,
    ``path/to/file.py:attr`` or ``package.module:attr``, whose ``attr`` is an experiment (a
    :class:`~aggregathor.experiments.keras_experiment.KerasExperiment`), an ``Experiment`` subclass or a
    factory of either (called with ``options``). A reference imports that file or module: name only code
    you trust. Raises a one-line ValueError naming the known experiments for an unknown name, or naming the
    reference and what it found; TypeError for an unknown option of a built-in experiment.
    ``get(**exp.get_config())`` rebuilds a built-in ``exp``.
    """
    exp = REGISTRY.build(name, (), options, base=Experiment, what="--experiment",
                         expected="a KerasExperiment, an Experiment subclass or a factory of either")
    if ":" in name and getattr(exp, "reference", "") is None:
        exp.reference = name  # how other processes rebuild it (KerasExperiment.reference)
    return exp
