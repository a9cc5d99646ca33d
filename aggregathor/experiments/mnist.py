"""mnist and fashion-mnist: 28x28 grey images from Keras's cache; the original's 784-100-10 MLP or a small CNN."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from aggregathor.experiments import _keras_data
from aggregathor.experiments.base import Arrays, Experiment, register
from aggregathor.experiments.models import mlp, small_cnn

__all__ = ["FashionMNIST", "MNIST"]


class _KerasImages(Experiment):
    """A Keras data set of images, scaled to [0, 1] float32; labels int32.

    Data options (see :mod:`aggregathor.experiments._keras_data`): ``cache_dir`` (the Keras cache folder,
    default ``$KERAS_HOME`` or ``~/.keras``; the files are under its ``datasets/``), ``download`` (None:
    download when missing unless ``AGGREGATHOR_OFFLINE`` is set; False: never), ``probe_timeout`` (seconds to
    wait for the server before giving up). A set neither cached nor downloadable raises
    :class:`~aggregathor.experiments.base.DatasetUnavailable` naming the missing file and how to get it.
    """

    _data_defaults: dict[str, Any] = {"cache_dir": None, "download": None, "probe_timeout": 3.0}
    data_options = ("cache_dir",)

    def _data_key(self) -> tuple[Any, ...]:
        return (self.name, str(_keras_data.cache_root(self.options["cache_dir"])))

    def _load(self) -> tuple[Arrays, Arrays]:
        (xtr, ytr), (xte, yte) = _keras_data.load(self.name, self.options["cache_dir"], self.options["download"],
                                                  self.options["probe_timeout"])

        def scale(x: np.ndarray) -> np.ndarray:
            x = x.astype(np.float32) / np.float32(255.0)
            return x.reshape(*x.shape[:3], -1)  # NHWC, a channel axis for grey images

        return (scale(xtr), ytr.reshape(-1)), (scale(xte), yte.reshape(-1))


class _MNISTLike(_KerasImages):
    """Options: ``model`` is ``"mlp"`` (the original AggregaThor's fully connected 784-100-10, ReLU: 79,510
    parameters; the default) or ``"cnn"`` (3x3 convolutions of 32 and 64 filters with 2x2 max-pools, dense
    128, 10: 421,642 parameters); plus the data options of :class:`_KerasImages`.
    """

    defaults = {"model": "mlp", **_KerasImages._data_defaults}
    input_shape = (28, 28, 1)
    num_classes = 10

    def _validate(self) -> None:
        if self.options["model"] not in ("mlp", "cnn"):
            raise ValueError(f"{self.name}: model must be 'mlp' or 'cnn', got {self.options['model']!r}")

    def _make_model(self) -> keras.Model:
        if self.options["model"] == "cnn":
            return small_cnn(self.input_shape, self.num_classes, name=f"{self.name}_cnn".replace("-", "_"))
        return mlp(self.input_shape, (100,), self.num_classes, name=f"{self.name}_mlp".replace("-", "_"))


@register
class MNIST(_MNISTLike):
    __doc__ = "MNIST: 60,000 + 10,000 handwritten digits (``mnist.npz`` in the Keras cache).\n\n" + (
        _MNISTLike.__doc__ or "")
    name = "mnist"


@register
class FashionMNIST(_MNISTLike):
    __doc__ = ("Fashion-MNIST: 60,000 + 10,000 clothing images (``fashion-mnist/*.gz`` in the Keras cache).\n\n"
               + (_MNISTLike.__doc__ or ""))
    name = "fashion-mnist"
