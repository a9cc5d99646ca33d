"""Average: the plain mean of the gradients (not Byzantine-resilient; the baseline)."""

from __future__ import annotations

import tensorflow as tf

from aggregathor.gars.base import GAR, register


@register
class Average(GAR):
    r"""Coordinate-wise mean, :math:`\frac{1}{n}\sum_i G_i`.

    Any single Byzantine gradient moves it arbitrarily far (Blanchard et al., NeurIPS 2017, Lemma 1),
    so it tolerates ``f = 0`` only in theory; it is allowed with any ``f`` as the experiments' baseline.
    """

    name = "average"

    def aggregate(self, x: tf.Tensor) -> tf.Tensor:
        return tf.reduce_mean(x, axis=0)
