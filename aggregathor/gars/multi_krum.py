"""Multi-Krum: the mean of the m gradients with the smallest Krum scores (Blanchard et al. 2017)."""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from aggregathor.gars import _distances
from aggregathor.gars.base import GAR, register


@register
class MultiKrum(_distances.KrumDistances, GAR):
    r"""Multi-Krum: the **mean** (not the sum) of the :math:`m` gradients with the smallest Krum scores.

    .. math:: s(i) = \sum_{i \to j} \|G_i - G_j\|^2, \qquad
              \mathrm{MultiKrum}_m(G_1, \dots, G_n) = \frac1m \sum_{i \in S_m} G_i,

    with :math:`i \to j` over the :math:`n - f - 2` gradients closest to :math:`G_i` (squared distances) and
    :math:`S_m` the :math:`m` indices of smallest score, the scores computed once on all :math:`n` rows.
    Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017, §5 ("Multi-Krum"); the AggregaThor default
    :math:`m = n - f - 2` (Damaskinos, El Mhamdi, Guerraoui, Guirguis, Rouault, "AggregaThor: Byzantine Machine
    Learning via Robust Gradient Aggregation", SysML 2019, §3). Needs :math:`n \ge 2f + 3` and
    :math:`1 \le m \le n - f - 2`; ``m = 1`` is Krum.

    Ties in the score go to the lowest indices. ``nan_robust`` as :class:`~aggregathor.gars.krum.Krum`: a
    non-finite row has score :math:`+\infty`; with at most ``f`` of them, ``m <= n - f - 2`` finite rows are
    always chosen first.

    Cost, in three phases (:meth:`distances`, :meth:`select`, :meth:`combine`; ``python -m aggregathor.bench
    gars`` times each): the squared distances (on the CPU one blocked pass of the compiled kernel of
    :mod:`~aggregathor.gars._distances`), the scores and a top-k on the ``(n, n)`` matrix, then one fused XLA
    pass that reads only the ``m`` selected rows (scalar-index gathers that XLA fuses as dynamic slices: no
    copy, no stack, no matmul through which an unselected NaN row could leak).

    Numeric limits: those of :class:`~aggregathor.gars.krum.Krum` for the selection (on the CPU, exact to a
    few float32 roundings at any finite magnitude; on a GPU or for float64 rows, the centred Gram cannot tell
    apart rows closer than about ``1e-7`` of their distance from the robust centre). The mean is computed in
    the rows' dtype and stays finite at any finite magnitude: a sum of the ``m`` selected rows that overflows is
    redone at an exact power-of-two scale (:func:`~aggregathor.gars._distances.mean_of_rows`).
    """

    name = "multi-krum"
    nan_robust = True
    jit_compile = False

    def __init__(self, n: int, f: int, m: int | None = None, **kwargs: Any) -> None:
        super().__init__(n, f, **kwargs)
        if m is not None and (isinstance(m, bool) or not isinstance(m, int | np.integer)):
            raise ValueError(f"{self.name}: m must be an int, got {m!r}")
        self._m = None if m is None else int(m)

    @property
    def m(self) -> int:
        """The number of gradients averaged (``n - f - 2`` by default)."""
        return self.n - self.f - 2 if self._m is None else self._m

    def check(self) -> None:
        self._require(self.n >= 2 * self.f + 3, "n >= 2f + 3")
        if not 1 <= self.m <= self.n - self.f - 2:
            raise ValueError(f"{self.name} needs 1 <= m <= n - f - 2; got m={self.m}, n={self.n}, f={self.f}")

    def get_config(self) -> dict[str, Any]:
        cfg = super().get_config()
        if self._m is not None:
            cfg["m"] = self._m
        return cfg

    def select(self, dist: tf.Tensor) -> tf.Tensor:
        """Phase 2: the ``m`` indices of smallest score, best first (ties: the lower index first), int32."""
        scores = _distances.krum_scores(dist, self.n - self.f - 2)
        # top_k is stable: among equal scores the lower index comes first
        return tf.math.top_k(-scores, k=self.m, sorted=True).indices

    def combine(self, x: tf.Tensor, chosen: tf.Tensor) -> tf.Tensor:
        """Phase 3: the mean of the selected rows, added in the order of ``chosen``."""
        return _distances.mean_of_rows(x, chosen)

    def aggregate(self, x: tf.Tensor) -> tf.Tensor:
        self.check()
        return self.combine(x, self.select(self.distances(x)))
