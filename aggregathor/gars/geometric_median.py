"""Geometric median by smoothed Weiszfeld iterations (Pillutla, Kakade, Harchaoui, RFA, 2022)."""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from aggregathor.gars import _distances, _scaling
from aggregathor.gars.base import GAR, register


def _positive_int(owner: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


@register
class GeometricMedian(GAR):
    r"""Approximate geometric median :math:`\arg\min_z \sum_i \|z - G_i\|` by the smoothed Weiszfeld algorithm.

    From :math:`z^{(0)}` = the mean of the :math:`n - f` finite rows closest to the medoid of the finite rows
    :math:`F` (the row with the smallest sum of distances to the others: an honest row while :math:`f < n/2`;
    ties to the lowest index), ``iterations`` times:

    .. math:: \beta_i = \frac{1}{\max\{\nu, \|z^{(t)} - G_i\|\}} \ (i \in F), \qquad
              z^{(t+1)} = \frac{\sum_{i \in F} \beta_i G_i}{\sum_{i \in F} \beta_i}.

    Pillutla, Kakade, Harchaoui, "Robust Aggregation for Federated Learning", IEEE Transactions on Signal
    Processing 70, 2022 (RFA, Algorithm 2, equal weights :math:`\alpha_i = 1/n`); a fixed number of
    iterations (default 100: each costs an n-by-n product, not a pass over the data; 8 left the iterate far
    from the honest rows with f near n/2 colluding far away), no early stop; smoothing :math:`\nu` (default
    1e-6). Breakdown point 1/2: needs :math:`n \ge 2f + 1`.

    ``nan_robust``: a non-finite row gets weight 0 (its distance is :math:`+\infty`).

    How: every iterate is a convex combination :math:`z = \sum_j a_j G_j` of the rows, so
    :math:`\|z - G_i\|^2 = K_{ii} - 2 (K a)_i + a^\top K a` with :math:`K` the Gram matrix of the rows
    centred on a robust centre (:func:`~aggregathor.gars._distances.centred_gram`), computed once with exact
    float64 products (``precise=True``: the iterate may approach a row, where a float32 Gram would lose the
    distance). The iterations run on ``(n,)`` weight vectors; the data is read twice in all (the blocked
    Gram, then one fused weighted sum), whatever the number of iterations.

    Any finite magnitude: the Gram is float64 (a row of 3e38 squares to 9e76), and the final weights are
    applied as two float32 factors each (:func:`~aggregathor.gars._scaling.weighted_sum`): the weight of a
    row at distance 1e38 is below float32's smallest normal number, yet its contribution is not 0. Limits:
    a weight below :math:`2^{-248}` (a row farther than about 1e75 times the honest spread, impossible in
    float32) or a value below about 1e-38 in magnitude counts as 0.
    """

    name = "geometric-median"
    nan_robust = True
    jit_compile = False

    def __init__(self, n: int, f: int, iterations: int = 100, nu: float = 1e-6, **kwargs: Any) -> None:
        super().__init__(n, f, **kwargs)
        self.iterations = _positive_int(self.name, "iterations", iterations, 0)
        if not float(nu) > 0.0:
            raise ValueError(f"{self.name}: nu must be > 0, got {nu!r}")
        self.nu = float(nu)

    def check(self) -> None:
        self._require(self.n >= 2 * self.f + 1, "n >= 2f + 1")

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "iterations": self.iterations, "nu": self.nu}

    def weights(self, x: tf.Tensor) -> tf.Tensor:
        """The final ``(n,)`` float64 weights ``a`` (sum 1, 0 on non-finite rows): the result is ``a @ x``."""
        gram = _distances.centred_gram(x, ref_rows=2 * self.f + 1, precise=True)
        g = tf.linalg.diag_part(gram)
        ok = tf.math.is_finite(g)
        okf = tf.cast(ok, tf.float64)
        gram = tf.where(ok[:, None] & ok[None, :], gram, tf.zeros_like(gram))
        g = tf.where(ok, g, tf.zeros_like(g))
        # Start at the mean of the n - f finite rows closest to the medoid (the row with the smallest sum of
        # distances to the others; lowest index on ties): inside the honest cluster while f < n/2, where the
        # plain mean can be dragged arbitrarily far, and (unlike the medoid itself) not a data point, where
        # Weiszfeld iterations stall.
        sq0 = tf.maximum(g[:, None] + g[None, :] - 2.0 * gram, 0.0)
        inf = tf.constant(float("inf"), tf.float64)
        total = tf.where(ok, tf.reduce_sum(tf.sqrt(sq0) * okf[None, :], axis=1), inf)
        medoid = _distances.first_argmin(total)
        near = tf.where(ok, tf.sqrt(tf.gather(sq0, medoid)), inf)
        _, idx = tf.math.top_k(-near, k=self.n - self.f)
        a = tf.reduce_sum(tf.one_hot(idx, self.n, dtype=tf.float64), axis=0) * okf
        a = tf.where(tf.reduce_sum(a) > 0, a / tf.maximum(tf.reduce_sum(a), 1.0), okf)
        for _ in range(self.iterations):
            ka = tf.linalg.matvec(gram, a)
            sq = tf.maximum(g - 2.0 * ka + tf.reduce_sum(a * ka), 0.0)
            beta = okf / tf.maximum(tf.sqrt(sq), self.nu)
            a = beta / tf.reduce_sum(beta)
        return a

    def aggregate(self, x: tf.Tensor) -> tf.Tensor:
        self.check()
        a = self.weights(x)
        out = _scaling.weighted_sum(x, a)
        none = tf.logical_not(tf.reduce_all(tf.math.is_finite(a)))  # no finite row at all: 0/0 weights
        return tf.where(none, tf.constant(float("nan"), x.dtype), out)
