"""Krum: the gradient closest to its n - f - 2 nearest neighbours (Blanchard et al., NeurIPS 2017)."""

from __future__ import annotations

import tensorflow as tf

from aggregathor.gars import _distances
from aggregathor.gars.base import GAR, register


@register
class Krum(GAR):
    r"""Krum: the gradient with the smallest score, the sum of its squared distances to its closest peers.

    .. math:: s(i) = \sum_{i \to j} \|G_i - G_j\|^2, \qquad \mathrm{Krum}(G_1, \dots, G_n) = G_{i_*},
              \quad i_* = \operatorname*{arg\,min}_i s(i),

    where :math:`i \to j` ranges over the :math:`n - f - 2` gradients :math:`G_j \ne G_i` closest to
    :math:`G_i` (**squared** Euclidean distances). Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine
    Learning with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017, §4. Needs
    :math:`n \ge 2f + 3` (the paper's :math:`2f + 2 < n`).

    Ties in the score go to the lowest index. ``nan_robust``: a row holding a NaN or an infinity is at
    distance :math:`+\infty` from every row, so its score is :math:`+\infty` and, while at most ``f`` rows are
    non-finite, it is never selected (every finite row then has :math:`n - f - 1 \ge n - f - 2` finite
    distances).

    Cost: the centred, blocked Gram of :mod:`~aggregathor.gars._distances` (one read of the data plus the
    ``(n, n)`` product), the scores on the ``(n, n)`` matrix, then one row copy.
    """

    name = "krum"
    nan_robust = True
    jit_compile = False  # the Gram runs in TF's matmul, the elementwise blocks in nested XLA functions

    def check(self) -> None:
        self._require(self.n >= 2 * self.f + 3, "n >= 2f + 3")

    def aggregate(self, x: tf.Tensor) -> tf.Tensor:
        self.check()
        dist = _distances.pairwise_sq_distances(x, ref_rows=2 * self.f + 1)
        scores = _distances.krum_scores(dist, self.n - self.f - 2)
        return _distances.take_row(x, _distances.first_argmin(scores))
