"""Non-finite gradients: every Byzantine row is NaN (``nan``) or infinite (``inf``).

What a crashed, bit-flipped or malicious worker can send for free. A rule that averages any of these rows
returns a non-finite update; the rules marked ``nan_robust`` (see :mod:`aggregathor.gars.base`) must not.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from aggregathor.attacks.base import Attack, register


@register
class NaN(Attack):
    r"""Every Byzantine gradient is all NaN: :math:`B_j = (\mathrm{NaN}, \dots, \mathrm{NaN})`."""

    name = "nan"
    min_honest = 0

    def forge(self, honest: np.ndarray, f: int, rng: np.random.Generator) -> np.ndarray:
        return np.full((f, honest.shape[1]), np.nan, dtype=honest.dtype)


@register
class Inf(Attack):
    r"""Every Byzantine gradient is all infinite: :math:`B_j = \mathrm{sign} \cdot (\infty, \dots, \infty)`.

    Parameters
    ----------
    sign : {1, -1}
        The sign of the infinities (default ``+1``). All rows share it, so that the plain mean is ``±inf``
        rather than NaN.
    """

    name = "inf"
    min_honest = 0

    def __init__(self, sign: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(sign, bool) or sign not in (1, -1):
            raise ValueError(f"{self.name}: sign must be 1 or -1, got {sign!r}")
        self.sign = int(sign)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "sign": self.sign}

    def forge(self, honest: np.ndarray, f: int, rng: np.random.Generator) -> np.ndarray:
        return np.full((f, honest.shape[1]), self.sign * np.inf, dtype=honest.dtype)
