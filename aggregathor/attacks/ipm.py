r"""Inner product manipulation (IPM): Xie, Koyejo and Gupta, "Fall of Empires: Breaking Byzantine-tolerant
SGD by Inner Product Manipulation", UAI 2019.

All :math:`f` Byzantine workers send

.. math:: B_j = -\varepsilon\,\mu, \qquad \mu = \tfrac1h \textstyle\sum_i H_i,

so :math:`\langle B_j, \mu\rangle = -\varepsilon\|\mu\|^2 < 0`. The goal is not to move the aggregate far
but to make its inner product with the true gradient negative, which stalls or reverses descent. A small
:math:`\varepsilon` (0.1, the default here and a common choice) keeps the Byzantine rows close to the honest
ones and fools distance-based rules such as Krum; a large one pulls averaging and coordinate-wise rules.

``ipm-opt`` line-searches :math:`\varepsilon` against a given rule (see :mod:`aggregathor.attacks._search`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from aggregathor.attacks._search import ScaleSearch
from aggregathor.attacks.base import Attack, check_scalar, register

__all__ = ["IPM", "IPMOpt", "ipm_rows"]

DEFAULT_EPSILON = 0.1


def ipm_rows(honest: np.ndarray, f: int, epsilon: float) -> np.ndarray:
    """``f`` copies of ``-epsilon * mu`` (the honest mean), float64."""
    mu = honest.mean(axis=0, dtype=np.float64)
    return np.broadcast_to(-epsilon * mu, (f, honest.shape[1])).copy()


@register
class IPM(Attack):
    r"""Inner product manipulation: :math:`B_j = -\varepsilon\mu`, :math:`\mu` the honest mean.

    Parameters
    ----------
    epsilon : float
        The scale, ``> 0`` (default 0.1).
    """

    name = "ipm"

    def __init__(self, epsilon: float = DEFAULT_EPSILON, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epsilon = check_scalar(self.name, "epsilon", epsilon)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "epsilon": self.epsilon}

    def forge(self, honest: np.ndarray, f: int, rng: np.random.Generator) -> np.ndarray:
        return ipm_rows(honest, f, self.epsilon)


@register
class IPMOpt(ScaleSearch):
    r"""IPM with :math:`\varepsilon` line-searched to maximise :math:`\|\mathrm{gar}(H \cup B(\varepsilon)) - \mu\|`.

    The grid is geometric, ``start=0.01`` to ``stop=100`` in ``num=25`` points, plus IPM's default
    :math:`\varepsilon = 0.1` (``include_default``); or ``grid`` explicitly. Note that the damage measured
    is the distance to the honest mean, not the inner product IPM targets (for the plain mean both grow
    with :math:`\varepsilon`: the aggregate is :math:`\frac{h - f\varepsilon}{n}\mu`). See
    :mod:`aggregathor.attacks._search`.

    Parameters
    ----------
    gar : callable or dict
        The rule attacked, built for ``n = h + f``, or its config dict.
    grid, start, stop, num, include_default
        The :math:`\varepsilon` values tried.
    """

    name = "ipm-opt"
    scale_name = "epsilon"
    default_start = 0.01
    default_stop = 100.0
    default_num = 25

    def default_scale(self, n: int, f: int) -> float | None:
        return DEFAULT_EPSILON

    def forge_at(self, honest: np.ndarray, f: int, scale: float) -> np.ndarray:
        return ipm_rows(honest, f, scale)
