"""Krum: the gradient closest to its n - f - 2 nearest neighbours (Blanchard et al., NeurIPS 2017)."""

from __future__ import annotations

import tensorflow as tf

from aggregathor.gars import _distances
from aggregathor.gars.base import GAR, register


@register
class Krum(_distances.KrumDistances, GAR):
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

    Cost, in three phases (:meth:`distances`, :meth:`select`, :meth:`combine`; ``python -m aggregathor.bench
    gars`` times each): the squared distances of :mod:`~aggregathor.gars._distances` (on the CPU, one blocked
    pass of the compiled kernel over the data), the scores on the ``(n, n)`` matrix, then one row copy.

    Numeric limits: on the CPU (float32 rows, the compiled kernel) each distance is a sum of squared differences,
    exact to a few float32 roundings relative to itself at any finite magnitude up to float32's maximum and
    however tight or far a cluster is; scores that differ by less than about ``1e-6`` relatively may be
    ordered differently from an exact computation. Elsewhere (a GPU, float64 rows) the centred Gram of
    :func:`~aggregathor.gars._distances.centred_gram`: its rounding is relative to the rows' distance from the
    robust centre, so rows closer to each other than about ``1e-7`` of that distance (a tight cluster far from
    the honest rows) are not told apart, and float32 rows beyond about ``1e19`` are handled by a rescaled norm
    only on the diagonal.
    """

    name = "krum"
    nan_robust = True
    jit_compile = False  # the Gram runs in TF's matmul, the elementwise blocks in nested XLA functions

    def check(self) -> None:
        self._require(self.n >= 2 * self.f + 3, "n >= 2f + 3")

    def select(self, dist: tf.Tensor) -> tf.Tensor:
        """Phase 2: the index of the smallest score (ties: the lowest index), an int32 scalar."""
        return _distances.first_argmin(_distances.krum_scores(dist, self.n - self.f - 2))

    def combine(self, x: tf.Tensor, chosen: tf.Tensor) -> tf.Tensor:
        """Phase 3: the selected row."""
        return _distances.take_row(x, chosen)

    def aggregate(self, x: tf.Tensor) -> tf.Tensor:
        self.check()
        return self.combine(x, self.select(self.distances(x)))
