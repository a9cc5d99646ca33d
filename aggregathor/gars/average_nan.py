"""Average-NaN: the mean of the finite values of each coordinate (erasure-tolerant, not Byzantine-resilient)."""

from __future__ import annotations

import tensorflow as tf

from aggregathor.gars import _scaling
from aggregathor.gars.base import GAR, register


@register
class AverageNaN(GAR):
    r"""Coordinate-wise mean of the finite values, :math:`\frac{1}{|F_j|}\sum_{i \in F_j} G_{ij}` with
    :math:`F_j = \{i : G_{ij} \text{ finite}\}`; NaN where :math:`F_j` is empty.

    NaN and +-inf are ignored: this is the original AggregaThor's ``average-nan`` (Damaskinos et al., SysML
    2019), which survives the NaN fill of datagrams a lossy transport dropped, but not a Byzantine worker
    sending finite values (Blanchard et al., NeurIPS 2017, Lemma 1). ``nan_robust``: with at most ``f``
    non-finite values per coordinate and ``n > f``, at least one finite value remains.

    One fused pass: per row a select and a count, no reduction op. The values are summed at the exact scale
    :math:`2^{-\lceil \log_2 n \rceil}` (:func:`~aggregathor.gars._scaling.sum_scale`): finite at any
    finite magnitude. Limit: values below about :math:`2^{-120}` (7.5e-37) in magnitude may be flushed to 0.
    """

    name = "average-nan"
    nan_robust = True

    def check(self) -> None:
        self._require(self.n > self.f, "n > f")

    def aggregate(self, x: tf.Tensor) -> tf.Tensor:
        zero = tf.zeros([], x.dtype)
        s = tf.constant(_scaling.sum_scale(self.n), x.dtype)
        total = None
        count = None
        for row in tf.unstack(x, axis=0):
            fin = tf.math.is_finite(row)
            v, c = tf.where(fin, row * s, zero), tf.cast(fin, x.dtype)
            total = v if total is None else total + v
            count = c if count is None else count + c
        return total / count / s  # 0 / 0 = NaN where no value is finite
