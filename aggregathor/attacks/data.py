"""Attacks in data space: the Byzantine worker computes an honest gradient, but on poisoned data.

Unlike the gradient-space attacks, these need no view of the honest gradients: the worker transforms its
own mini-batch with :meth:`DataAttack.poison` and then runs the normal gradient computation. The worker
loop (:meth:`aggregathor.worker.Worker.gradient`) recognises them by ``space == "data"``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from aggregathor.attacks.base import Attack, check_scalar, register

__all__ = ["DataAttack", "DataPoisoning", "LabelFlip"]


class DataAttack(Attack):
    """Base class of the data-space attacks."""

    space: ClassVar[str] = "data"

    def poison(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The poisoned copy of a mini-batch ``(x, y)``."""
        raise NotImplementedError

    def check_experiment(self, experiment: Any) -> None:
        """Raise ValueError (one line, with the fix) when this attack cannot poison ``experiment``'s data."""

    def forge(self, honest: np.ndarray, f: int, rng: np.random.Generator) -> np.ndarray:
        raise TypeError(f"{self.name} is a data-space attack: poison the batch with .poison(x, y, rng) and "
                        "compute the gradient on it")


@register
class LabelFlip(DataAttack):
    r"""Label flipping: every label :math:`y` becomes :math:`C - 1 - y` for ``classes`` :math:`= C`.

    A classic data-poisoning baseline (e.g. Biggio et al. 2012; used for Byzantine SGD by Allen-Zhu et al.
    2021 and Karimireddy et al. ICLR 2022).
    """

    name = "label-flip"

    def __init__(self, classes: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(classes, bool) or not isinstance(classes, int | np.integer) or classes < 2:
            raise ValueError(f"{self.name}: classes must be an int >= 2, got {classes!r}")
        self.classes = int(classes)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "classes": self.classes}

    def check_experiment(self, experiment: Any) -> None:
        if getattr(experiment, "task", "classification") != "classification":
            raise ValueError(f"{self.name} flips class labels, but experiment {experiment.name!r} is a "
                             f"{experiment.task} task: use a gradient attack (e.g. --attack reverse) or data-poison")

    def poison(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        y = np.asarray(y)
        if y.size and (y.min() < 0 or y.max() >= self.classes):
            raise ValueError(f"{self.name}: labels must lie in [0, {self.classes}), got [{y.min()}, {y.max()}]")
        return x, (self.classes - 1 - y).astype(y.dtype, copy=False)


@register
class DataPoisoning(DataAttack):
    r"""The original AggregaThor's data poisoning: pixels scaled by a huge negative factor, labels shuffled.

    :math:`x \mapsto -s\,x` (``scale`` :math:`= s`, default :math:`10^4`) and the labels of the batch
    randomly permuted (Damaskinos et al., SysML 2019, the "corrupted data" experiments).
    """

    name = "data-poison"

    def __init__(self, scale: float = 1e4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scale = check_scalar(self.name, "scale", scale)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "scale": self.scale}

    def poison(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        def scaled(a: Any) -> np.ndarray:
            a = np.asarray(a)
            return (a * -self.scale).astype(a.dtype, copy=False) if a.dtype.kind == "f" else a

        x = {k: scaled(v) for k, v in x.items()} if isinstance(x, dict) else scaled(x)  # dict inputs: each array
        return x, rng.permutation(np.asarray(y))
