"""MeaMed: per coordinate, the mean of the n - f values closest to the median."""

from __future__ import annotations

import tensorflow as tf

from aggregathor.gars import _scaling, _sortnet
from aggregathor.gars.base import GAR, register


@register
class MeaMed(GAR):
    r"""Mean around the median: per coordinate :math:`j`, with :math:`m_j` the median of the finite values,

    .. math:: \mathrm{meamed}_j = \frac{1}{n-f} \sum_{i \in N_j} G_{ij}, \qquad
              N_j = \operatorname*{arg\,min}_{|N| = n-f} \sum_{i \in N} |G_{ij} - m_j|,

    the :math:`n - f` values nearest to the median. Xie, Koyejo, Gupta, "Generalized Byzantine-tolerant SGD",
    arXiv:1802.10116, 2018 (Definition 5). Needs ``n >= 2f + 1``.

    Ties in distance go to the smaller value (the leftmost such window of ``n - f`` consecutive sorted
    values). Non-finite values are at distance ``+inf`` (``nan_robust``: with at most ``f`` of them per
    coordinate, they are never among the ``n - f`` nearest); with more, the coordinate is non-finite.

    No sort op, no gather: one pruned compare-exchange network selects the ``f`` lowest and ``f`` highest
    ranks and the median ranks while keeping the middle block as an unordered multiset, and the window is
    decided by ``f`` exact comparisons ``|v_{a+n-f} - m| < |v_a - m|`` and summed by ``f`` selects
    (:func:`~aggregathor.gars._sortnet.mean_around_median`). All of it runs at the exact scale
    :math:`2^{-\lceil \log_2 (n - f) \rceil}` (:func:`~aggregathor.gars._scaling.sum_scale`; a power of two
    keeps the order and the distances' comparisons): neither the sum nor a distance ``|v - m|`` overflows
    at any finite magnitude. Limit: values below about :math:`2^{-120}` (7.5e-37) in magnitude may be
    flushed to 0.
    """

    name = "meamed"
    nan_robust = True

    def check(self) -> None:
        self._require(self.n >= 2 * self.f + 1, "n >= 2f + 1")

    def aggregate(self, x: tf.Tensor) -> tf.Tensor:
        self.check()  # the window logic relies on the bound
        scale = tf.constant(_scaling.sum_scale(self.n - self.f), x.dtype)
        rows = [r * scale for r in tf.unstack(x, axis=0)]  # per row: fused into the network
        return _sortnet.mean_around_median(rows, self.n - self.f) / scale
