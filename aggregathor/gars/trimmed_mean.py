"""Trimmed mean: per coordinate, drop the b largest and b smallest values and average the rest."""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from aggregathor.gars import _scaling, _sortnet
from aggregathor.gars.base import GAR, register


@register
class TrimmedMean(GAR):
    r"""Coordinate-wise trimmed mean: with :math:`v_{(0)} \le \dots \le v_{(n-1)}` the sorted values of a
    coordinate,

    .. math:: \mathrm{trmean}_b = \frac{1}{n - 2b} \sum_{r=b}^{n-b-1} v_{(r)} .

    Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
    Rates", ICML 2018 (Definition 2, with :math:`\beta = b/n`). The trim count ``b`` defaults to ``f``; the
    paper needs :math:`\beta \ge \alpha`, i.e. ``b >= f``, and ``n >= 2b + 1`` leaves something to average.

    Non-finite values are ordered ``-inf < finite < +inf`` with NaN as ``+inf`` (``nan_robust``: at most
    ``f <= b`` of them per coordinate are all trimmed away).

    No sort op: a compare-exchange network either selects the middle ranks, or selects the ``b`` lowest and
    ``b`` highest with full compare-exchanges and adds up what is left in the middle, whichever needs fewer
    min/max (:func:`~aggregathor.gars._sortnet.rank_sum`), fused by XLA into one pass. The values are
    ranked and summed at the exact scale :math:`2^{-\lceil \log_2 (n - 2b) \rceil}`
    (:func:`~aggregathor.gars._scaling.sum_scale`; a power of two keeps the order): finite at any finite
    magnitude. Limit: values below about :math:`2^{-120}` (7.5e-37) in magnitude may be flushed to 0.
    """

    name = "trimmed-mean"
    nan_robust = True

    def __init__(self, n: int, f: int, b: int | None = None, **kwargs: Any) -> None:
        super().__init__(n, f, **kwargs)
        if b is None:
            b = self.f
        if isinstance(b, bool) or not isinstance(b, int | np.integer) or b < 0:
            raise ValueError(f"{self.name}: b must be a non-negative int, got {b!r}")
        self.b = int(b)

    def check(self) -> None:
        self._require(self.n >= 2 * self.f + 1, "n >= 2f + 1")
        self._require(self.b >= self.f, f"b >= f (trim at least the Byzantine count; b={self.b})")
        self._require(self.n >= 2 * self.b + 1, f"n >= 2b + 1 (b={self.b})")

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "b": self.b}

    def aggregate(self, x: tf.Tensor) -> tf.Tensor:
        n, b = self.n, self.b
        if not n >= 2 * b + 1:
            raise ValueError(f"{self.name} needs n >= 2b + 1; got n={n}, b={b}")
        inf = tf.constant(float("inf"), x.dtype)
        scale = tf.constant(_scaling.sum_scale(n - 2 * b), x.dtype)
        rows = [tf.where(tf.math.is_nan(r), inf, r * scale) for r in tf.unstack(x, axis=0)]
        return _sortnet.rank_sum(rows, b, n - b) / tf.cast(n - 2 * b, x.dtype) / scale
