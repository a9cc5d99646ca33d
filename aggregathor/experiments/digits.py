"""digits: scikit-learn's bundled 8x8 handwritten digits (offline), a small MLP; the default experiment."""

from __future__ import annotations

import keras
import numpy as np

from aggregathor.experiments.base import Arrays, Experiment, register
from aggregathor.experiments.models import mlp, small_cnn

__all__ = ["Digits"]


@register
class Digits(Experiment):
    """The 1,797 8x8 digits of ``sklearn.datasets.load_digits`` (bundled: no download), pixels scaled to
    [0, 1], flat ``(64,)`` inputs. A fixed stratified 80/20 split (``random_state=0``): 1,437 training and
    360 test samples.

    Options: ``model`` is ``"mlp"`` (64-64-10, ReLU: 4,810 parameters; the default) or ``"cnn"`` (two 3x3
    convolutions of 16 and 32 filters, 2x2 max-pools, dense 64, 10). The MLP reaches about 95% test
    accuracy after 300 plain SGD steps of batch 32 at learning rate 0.1.
    """

    name = "digits"
    defaults = {"model": "mlp"}
    input_shape = (64,)
    num_classes = 10

    def _validate(self) -> None:
        if self.options["model"] not in ("mlp", "cnn"):
            raise ValueError(f"digits: model must be 'mlp' or 'cnn', got {self.options['model']!r}")

    def _load(self) -> tuple[Arrays, Arrays]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        x = (np.asarray(x, np.float32) / 16.0).astype(np.float32)
        xtr, xte, ytr, yte = train_test_split(x, y.astype(np.int32), test_size=0.2, stratify=y, random_state=0)
        return (xtr, ytr), (xte, yte)

    def _make_model(self) -> keras.Model:
        if self.options["model"] == "cnn":
            return small_cnn(self.input_shape, self.num_classes, filters=(16, 32), dense=64, image_shape=(8, 8, 1),
                             name="digits_cnn")
        return mlp(self.input_shape, (64,), self.num_classes, name="digits_mlp")
