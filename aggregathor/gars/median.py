"""Median: the coordinate-wise median of the finite values, by a pruned compare-exchange network."""

from __future__ import annotations

import tensorflow as tf

from aggregathor.gars import _sortnet
from aggregathor.gars.base import GAR, register


@register
class Median(GAR):
    r"""Coordinate-wise median: :math:`\mathrm{med}_j = \mathrm{median}\{G_{ij} : i = 1..n\}` per coordinate
    :math:`j`, the middle value for an odd count and the mean of the two middle values for an even count.

    Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
    Rates", ICML 2018 (Definition 1); Xie, Koyejo, Gupta, "Generalized Byzantine-tolerant SGD", 2018
    (Definition 4). Needs ``n >= 2f + 1`` so that the honest values surround the median.

    NaN-aware (``nan_robust``): the median of the *finite* values of each coordinate (NaN where none is).
    Computed without a sort op: non-finite values become +inf and -inf alternately
    (:func:`~aggregathor.gars._sortnet.balance_nonfinite`), which keeps the finite median at the two middle
    ranks whatever the number of non-finite values; a compare-exchange network pruned to those ranks (72 for
    n = 20) then runs fused into one pass by XLA, see :mod:`aggregathor.gars._sortnet`.
    """

    name = "median"
    nan_robust = True

    def check(self) -> None:
        self._require(self.n >= 2 * self.f + 1, "n >= 2f + 1")

    def aggregate(self, x: tf.Tensor) -> tf.Tensor:
        return _sortnet.nan_median(x)
