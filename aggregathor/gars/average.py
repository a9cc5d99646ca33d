"""Average: the plain mean of the gradients (not Byzantine-resilient; the baseline)."""

from __future__ import annotations

import tensorflow as tf

from aggregathor.gars import _scaling
from aggregathor.gars.base import GAR, register


@register
class Average(GAR):
    r"""Coordinate-wise mean, :math:`\frac{1}{n}\sum_i G_i`.

    Any single Byzantine gradient moves it arbitrarily far (Blanchard et al., NeurIPS 2017, Lemma 1),
    so it tolerates ``f = 0`` only in theory; it is allowed with any ``f`` as the experiments' baseline.

    Finite at any finite magnitude: the values are summed at the exact scale :math:`2^{-\lceil \log_2 n
    \rceil}` (:func:`~aggregathor.gars._scaling.sum_scale`), so n values near float32's maximum do not
    overflow. Limit: values below about :math:`2^{-120}` (7.5e-37) in magnitude may be flushed to 0.
    """

    name = "average"

    def aggregate(self, x: tf.Tensor) -> tf.Tensor:
        scale = tf.constant(_scaling.sum_scale(self.n), x.dtype)
        return tf.reduce_mean(x * scale, axis=0) / scale
