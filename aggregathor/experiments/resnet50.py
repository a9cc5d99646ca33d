"""resnet50: Keras's ResNet-50 (random initialization) on synthetic images, for scale tests."""

from __future__ import annotations

import keras
import numpy as np

from aggregathor.experiments.base import Arrays, Experiment, register

__all__ = ["ResNet50"]


@register
class ResNet50(Experiment):
    """``keras.applications.ResNet50(weights=None, classes=10)`` on synthetic data of the right shape.

    For scale and throughput tests, not for accuracy: the images are standard normal noise and the labels
    uniform at random (deterministic given ``data_seed``). On 32x32x3 inputs and 10 classes the model has
    23,555,082 trainable parameters (23,608,202 with batch normalization's moving statistics). Building it
    takes a few seconds on a CPU.

    Options: ``image_size`` (32 by default; 224 is ImageNet's; at least 32), ``classes`` (10), ``samples``
    (training images, 1024), ``test_samples`` (256), ``data_seed`` (0).
    """

    name = "resnet50"
    defaults = {"image_size": 32, "classes": 10, "samples": 1024, "test_samples": 256, "data_seed": 0}
    eval_batch_size = 64
    data_options = ("image_size", "classes", "samples", "test_samples", "data_seed")

    def _validate(self) -> None:
        o = self.options
        if int(o["image_size"]) < 32:
            raise ValueError(f"resnet50: image_size must be at least 32, got {o['image_size']!r}")
        for key in ("classes", "samples", "test_samples"):
            if int(o[key]) < 1:
                raise ValueError(f"resnet50: {key} must be positive, got {o[key]!r}")
        self.input_shape = (int(o["image_size"]), int(o["image_size"]), 3)
        self.num_classes = int(o["classes"])

    def _load(self) -> tuple[Arrays, Arrays]:
        o = self.options
        rng = np.random.default_rng([int(o["data_seed"]), 50])

        def draw(n: int) -> Arrays:
            x = rng.standard_normal((n, *self.input_shape), dtype=np.float32)
            return x, rng.integers(0, self.num_classes, n).astype(np.int32)

        return draw(int(o["samples"])), draw(int(o["test_samples"]))

    def _make_model(self) -> keras.Model:
        return keras.applications.ResNet50(weights=None, input_shape=self.input_shape, classes=self.num_classes,
                                           classifier_activation=None)
