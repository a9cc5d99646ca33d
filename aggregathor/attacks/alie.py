r"""A Little Is Enough (ALIE): Baruch, Baruch and Goldberg, "A Little Is Enough: Circumventing Defenses For
Distributed Learning", NeurIPS 2019.

All :math:`f` Byzantine workers send the same vector, shifted from the honest mean by a few honest standard
deviations per coordinate:

.. math:: B_j = \mu - z\,\sigma, \qquad \mu = \tfrac1h \textstyle\sum_i H_i, \quad
          \sigma = \sqrt{\tfrac1h \textstyle\sum_i (H_i - \mu)^2} \quad\text{(per coordinate)}.

:math:`\sigma` is the population (``ddof=0``) standard deviation of the honest rows. The paper picks the
largest :math:`z` for which the Byzantine value still looks more "central" than enough honest ones to win a
majority: with :math:`n = h + f` workers, :math:`s = \lfloor n/2 + 1\rfloor - f` honest supporters are
needed, and

.. math:: z_{\max} = \Phi^{-1}\!\left(\frac{n - s}{n}\right)

(:math:`\Phi` the standard normal CDF). It needs :math:`s \ge 1`, a Byzantine minority
(:math:`f \le \lfloor n/2 \rfloor`); otherwise pass ``z`` explicitly. Write-ups differ on the sign of the
shift (:math:`\mu \pm z\sigma`); the rules attacked are symmetric, and this one uses :math:`-`. Each
Byzantine coordinate is exactly :math:`z\sigma_k` from the honest mean: within one honest standard
deviation for :math:`z \le 1` (:math:`z_{\max} < 1` unless :math:`s` is small), which is what makes ALIE
hard to filter.

``alie-opt`` line-searches :math:`z` against a given rule (see :mod:`aggregathor.attacks._search`).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import numpy as np

from aggregathor.attacks._search import ScaleSearch
from aggregathor.attacks.base import Attack, check_scalar, register

__all__ = ["ALIE", "ALIEOpt", "alie_rows", "alie_z"]


def alie_z(n: int, f: int) -> float:
    r"""The paper's :math:`z_{\max} = \Phi^{-1}((n - s)/n)` with :math:`s = \lfloor n/2 + 1\rfloor - f`."""
    if isinstance(n, bool) or isinstance(f, bool) or not isinstance(n, int | np.integer) \
            or not isinstance(f, int | np.integer) or f < 1 or n <= f:
        raise ValueError(f"alie: z_max needs ints 1 <= f < n, got n={n!r}, f={f!r}")
    s = math.floor(n / 2 + 1) - f
    if s < 1:
        raise ValueError(f"alie: z_max = Phi^-1((n - s)/n) needs s = floor(n/2 + 1) - f >= 1 (a Byzantine "
                         f"minority), got s={s} for n={n}, f={f}; pass z explicitly")
    return NormalDist().inv_cdf((n - s) / n)


def alie_rows(honest: np.ndarray, f: int, z: float) -> np.ndarray:
    """``f`` copies of ``mu - z * sigma`` (honest per-coordinate mean and population std), float64."""
    mu = honest.mean(axis=0, dtype=np.float64)
    sigma = honest.std(axis=0, dtype=np.float64)
    return np.broadcast_to(mu - z * sigma, (f, honest.shape[1])).copy()


@register
class ALIE(Attack):
    r"""A Little Is Enough: :math:`B_j = \mu - z\sigma` per coordinate, :math:`z = z_{\max}(n, f)` by default.

    See the module docstring for the formula; :math:`n = h + f`.

    Parameters
    ----------
    z : float or None
        The shift in honest standard deviations, ``>= 0``; None (default) uses the paper's :math:`z_{\max}`.
    """

    name = "alie"

    def __init__(self, z: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.z = None if z is None else check_scalar(self.name, "z", z, strict=False)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "z": self.z}

    def forge(self, honest: np.ndarray, f: int, rng: np.random.Generator) -> np.ndarray:
        z = alie_z(honest.shape[0] + f, f) if self.z is None else self.z
        return alie_rows(honest, f, z)


@register
class ALIEOpt(ScaleSearch):
    r"""ALIE with :math:`z` line-searched to maximise :math:`\|\mathrm{gar}(H \cup B(z)) - \mu\|`.

    The grid is geometric, ``start=0.1`` to ``stop=10`` in ``num=21`` points, plus the paper's
    :math:`z_{\max}(n, f)` when defined (``include_default``); or ``grid`` explicitly. See
    :mod:`aggregathor.attacks._search`.

    Parameters
    ----------
    gar : callable or dict
        The rule attacked, built for ``n = h + f`` (e.g. ``aggregathor.gars.get("median", n, f)``), or its
        config dict.
    grid, start, stop, num, include_default
        The :math:`z` values tried.
    """

    name = "alie-opt"
    scale_name = "z"
    default_start = 0.1
    default_stop = 10.0
    default_num = 21

    def default_scale(self, n: int, f: int) -> float | None:
        try:
            return alie_z(n, f)
        except ValueError:
            return None

    def forge_at(self, honest: np.ndarray, f: int, scale: float) -> np.ndarray:
        return alie_rows(honest, f, scale)
