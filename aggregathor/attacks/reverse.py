r"""Negated gradients: ``reverse`` sends :math:`-k g`, ``sign-flip`` the special case :math:`k = 1`.

Both take ``source``, the gradient :math:`g` they negate:

- ``"mean"`` (default): the honest mean :math:`\bar H = \frac1h \sum_i H_i`; every Byzantine row is the
  same, :math:`B_j = -k \bar H`. This is the omniscient version, the one that pulls the plain mean hardest
  and the one the tests measure.
- ``"own"``: each Byzantine worker negates its *own* honestly computed gradient. In simulation the
  attacker's own gradient is modelled by honest row :math:`j \bmod h` (a sample from the same
  distribution): :math:`B_j = -k H_{j \bmod h}`. In a worker process, pass the worker's own gradient as
  the single honest row with ``f = 1``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from aggregathor.attacks.base import Attack, check_scalar, register

SOURCES = ("mean", "own")


def _source(who: str, source: Any) -> str:
    if source not in SOURCES:
        raise ValueError(f"{who}: source must be one of {SOURCES}, got {source!r}")
    return str(source)


def _negated(honest: np.ndarray, f: int, k: float, source: str) -> np.ndarray:
    if source == "mean":
        g = honest.mean(axis=0, dtype=np.float64)
        return np.broadcast_to(-k * g, (f, honest.shape[1])).copy()
    rows = np.arange(f) % honest.shape[0]
    return -k * honest[rows].astype(np.float64)


@register
class Reverse(Attack):
    r"""Reversed, amplified gradient: :math:`B_j = -k\, g` with :math:`k > 0`.

    The Byzantine rows point against the descent direction and are :math:`k` times longer, so
    :math:`\langle B_j, g\rangle = -k\|g\|^2` and :math:`\|B_j\| / \|g\| = k`. With ``source="mean"``
    (:math:`g = \bar H`) the plain mean of all :math:`n = h + f` rows becomes
    :math:`\frac{h - f k}{n} \bar H`: reversed as soon as :math:`f k > h`. A reversed-gradient worker is one
    of the baseline attacks of the Byzantine SGD literature (e.g. the reverse-gradient attack of Rajput et
    al., "DETOX", NeurIPS 2019); ``k = 100`` (the default) is a common choice. See the module docstring for
    ``source``.

    Parameters
    ----------
    k : float
        Amplification, ``> 0`` (default 100).
    source : {"mean", "own"}
        The gradient negated (default ``"mean"``).
    """

    name = "reverse"

    def __init__(self, k: float = 100.0, source: str = "mean", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.k = check_scalar(self.name, "k", k)
        self.source = _source(self.name, source)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "k": self.k, "source": self.source}

    def forge(self, honest: np.ndarray, f: int, rng: np.random.Generator) -> np.ndarray:
        return _negated(honest, f, self.k, self.source)


@register
class SignFlip(Attack):
    r"""Sign flipping: :math:`B_j = -g`, the reversed gradient at its own scale (:math:`\|B_j\| = \|g\|`).

    The sign-flipping attack of e.g. Li et al., "RSA: Byzantine-Robust Stochastic Aggregation Methods for
    Distributed Learning from Heterogeneous Datasets", AAAI 2019, and Allen-Zhu et al., "Byzantine-Resilient
    Non-Convex Stochastic Gradient Descent", ICLR 2021. See the module docstring for ``source``
    (default ``"mean"``: :math:`g = \bar H`; ``"own"``: the attacker's own honest gradient).
    """

    name = "sign-flip"

    def __init__(self, source: str = "mean", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.source = _source(self.name, source)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "source": self.source}

    def forge(self, honest: np.ndarray, f: int, rng: np.random.Generator) -> np.ndarray:
        return _negated(honest, f, 1.0, self.source)
