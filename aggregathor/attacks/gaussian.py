"""Gaussian noise: each Byzantine gradient is drawn from an isotropic centred normal distribution."""

from __future__ import annotations

from typing import Any

import numpy as np

from aggregathor.attacks.base import Attack, check_scalar, register


@register
class Gaussian(Attack):
    r"""Random Byzantine gradients :math:`B_j \sim \mathcal{N}(0, \sigma^2 I_d)`, independent across rows.

    The "Gaussian Byzantine workers" of Blanchard et al., "Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent", NeurIPS 2017 (Krum), whose experiments use a standard deviation of 200, the
    default here. The noise ignores the honest gradients (only their ``d`` and dtype are used), so ``h = 0``
    is allowed. Deterministic given ``rng``: the rows are ``sigma * rng.standard_normal((f, d))``.

    Parameters
    ----------
    sigma : float
        Standard deviation of every coordinate, ``> 0`` (default 200).
    """

    name = "gaussian"
    min_honest = 0

    def __init__(self, sigma: float = 200.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sigma = check_scalar(self.name, "sigma", sigma)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "sigma": self.sigma}

    def forge(self, honest: np.ndarray, f: int, rng: np.random.Generator) -> np.ndarray:
        return self.sigma * rng.standard_normal((f, honest.shape[1]))
