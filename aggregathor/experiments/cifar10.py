"""cifar10: CIFAR-10 from Keras's cache, with the original AggregaThor's CifarNet (``cnnet``) model."""

from __future__ import annotations

import keras

from aggregathor.experiments.base import register
from aggregathor.experiments.mnist import _KerasImages
from aggregathor.experiments.models import cifarnet

__all__ = ["CIFAR10"]


@register
class CIFAR10(_KerasImages):
    """CIFAR-10: 50,000 + 10,000 32x32x3 images of 10 classes, scaled to [0, 1].

    Model: CifarNet (:func:`~aggregathor.experiments.models.cifarnet`), 1,756,426 parameters; ``lrn=False``
    drops its (parameter-free) local response normalizations. Data options as for ``mnist``
    (``cache_dir``, ``download``, ``probe_timeout``); the cache holds Keras's
    ``datasets/cifar-10-batches-py-target/`` or the original ``cifar-10-python.tar.gz``.
    """

    name = "cifar10"
    defaults = {"lrn": True, **_KerasImages._data_defaults}
    input_shape = (32, 32, 3)
    num_classes = 10

    def _make_model(self) -> keras.Model:
        return cifarnet(self.input_shape, self.num_classes, lrn=bool(self.options["lrn"]))
