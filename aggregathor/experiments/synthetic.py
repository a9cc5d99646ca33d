"""synthetic: a configurable classification task (a random linear teacher) for benchmarks."""

from __future__ import annotations

import keras
import numpy as np

from aggregathor.experiments.base import Arrays, Experiment, register
from aggregathor.experiments.models import ParameterPadding

__all__ = ["Synthetic"]


@register
class Synthetic(Experiment):
    """Gaussian inputs labelled by a random linear teacher, with a linear or one-hidden-layer MLP model.

    Data: ``x ~ N(0, I_dims)``, ``y = argmax(x W + noise * e)`` with a random ``(dims, classes)`` teacher
    ``W`` and standard normal ``e``, deterministic given ``data_seed``; ``samples`` training and
    ``test_samples`` test pairs. A linear model can fit it (up to the label noise).

    Model: ``"linear"`` (``dims * classes + classes`` parameters) or ``"mlp"`` (``dims -> hidden (ReLU) ->
    classes``). ``params=N`` sizes the MLP to exactly ``N`` parameters for transport benchmarks: the hidden
    width is ``(N - classes) // (dims + 1 + classes)`` and the remainder (fewer than ``dims + classes + 1``
    values) is a :class:`~aggregathor.experiments.models.ParameterPadding` of parameters whose gradient is
    zero. ``model`` defaults to ``"mlp"`` when ``params`` is given and ``"linear"`` otherwise.
    """

    name = "synthetic"
    defaults = {"dims": 32, "classes": 10, "samples": 4096, "test_samples": 1024, "noise": 0.5, "model": None,
                "hidden": 64, "params": None, "data_seed": 0}
    data_options = ("dims", "classes", "samples", "test_samples", "noise", "data_seed")

    def _validate(self) -> None:
        o = self.options
        for key in ("dims", "samples", "test_samples", "hidden"):
            if int(o[key]) < 1:
                raise ValueError(f"synthetic: {key} must be positive, got {o[key]!r}")
        if int(o["classes"]) < 2:
            raise ValueError(f"synthetic: classes must be at least 2, got {o['classes']!r}")
        if float(o["noise"]) < 0:
            raise ValueError(f"synthetic: noise must be non-negative, got {o['noise']!r}")
        model = o["model"] or ("mlp" if o["params"] is not None else "linear")
        if model not in ("linear", "mlp"):
            raise ValueError(f"synthetic: model must be 'linear' or 'mlp', got {model!r}")
        self.input_shape = (int(o["dims"]),)
        self.num_classes = int(o["classes"])
        self._model_kind = model
        self._hidden, self._padding = int(o["hidden"]), 0
        if o["params"] is not None:
            if model != "mlp":
                raise ValueError("synthetic: params= sizes the 'mlp' model; drop model='linear'")
            d, c, n = int(o["dims"]), int(o["classes"]), int(o["params"])
            per_unit = d + 1 + c
            if n < per_unit + c:
                raise ValueError(f"synthetic: params must be at least {per_unit + c} for dims={d}, classes={c} "
                                 f"(one hidden unit), got {n}")
            self._hidden = (n - c) // per_unit
            self._padding = n - c - self._hidden * per_unit

    @property
    def hidden_units(self) -> int:
        """The MLP's hidden width (derived from ``params`` when given)."""
        return self._hidden

    def _load(self) -> tuple[Arrays, Arrays]:
        o = self.options
        d, c = int(o["dims"]), int(o["classes"])
        rng = np.random.default_rng([int(o["data_seed"]), 7])
        teacher = rng.standard_normal((d, c)).astype(np.float32) / np.float32(np.sqrt(d))

        def draw(n: int) -> Arrays:
            x = rng.standard_normal((n, d), dtype=np.float32)
            scores = x @ teacher + np.float32(o["noise"]) * rng.standard_normal((n, c), dtype=np.float32)
            return x, np.argmax(scores, axis=1).astype(np.int32)

        return draw(int(o["samples"])), draw(int(o["test_samples"]))

    def _make_model(self) -> keras.Model:
        layers: list[keras.layers.Layer] = [keras.Input(self.input_shape)]
        if self._model_kind == "mlp":
            layers.append(keras.layers.Dense(self._hidden, activation="relu"))
        layers.append(keras.layers.Dense(self.num_classes))
        if self._padding:
            layers.append(ParameterPadding(self._padding))
        return keras.Sequential(layers, name=f"synthetic_{self._model_kind}")
