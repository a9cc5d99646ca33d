r"""Mimic: Karimireddy, He and Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via Bucketing",
ICLR 2022.

All :math:`f` Byzantine workers send a copy of one honest worker's gradient, :math:`B_j = H_{i^\star}`.
Nothing they send is out of distribution, yet the robust rule now over-weights worker :math:`i^\star` and
under-weights the others: with heterogeneous (non-iid) data this biases training towards one worker's data.

Target choice, the paper's simple version computed on the current step only:

- ``target=i`` copies honest row ``i`` every step (the paper's plain mimic attack, a fixed worker);
- ``target=None`` (default) picks the worker that sticks out most along the direction of largest honest
  variance: :math:`z` is the top right-singular vector of the centred honest matrix
  :math:`H - \mathbf{1}\mu^\top` (the top principal direction), and
  :math:`i^\star = \arg\max_i |\langle H_i - \mu, z\rangle|`.

The paper's variant estimates :math:`z` by power iteration over a warm-up window of steps and then keeps
:math:`i^\star` fixed; this stateless version recomputes the exact :math:`z` at every call, and takes the
absolute value so that the (arbitrary) sign of the singular vector does not matter. Ties, and honest rows all
equal (no variance), pick the lowest index. The attack is deterministic and ignores ``rng``. The chosen
index is kept in ``last_target``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from aggregathor.attacks.base import Attack, register

__all__ = ["Mimic", "mimic_target"]


def mimic_target(honest: np.ndarray) -> int:
    """The honest row farthest from the mean along the top principal direction (lowest index on ties)."""
    centred = honest.astype(np.float64) - honest.mean(axis=0, dtype=np.float64)
    if not np.any(centred):
        return 0
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    proj = np.abs(centred @ vt[0])
    return int(np.argmax(proj >= proj.max() * (1 - 1e-12)))


@register
class Mimic(Attack):
    r"""Every Byzantine gradient is a copy of honest row :math:`i^\star` (see the module docstring).

    Parameters
    ----------
    target : int or None
        A fixed honest row to copy, or None (default) to pick the most extreme row along the top principal
        direction of the honest gradients at each call.
    """

    name = "mimic"

    def __init__(self, target: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if target is not None and (isinstance(target, bool) or not isinstance(target, int | np.integer)
                                   or target < 0):
            raise ValueError(f"{self.name}: target must be None or a non-negative int, got {target!r}")
        self.target = None if target is None else int(target)
        self.last_target: int | None = None

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "target": self.target}

    def forge(self, honest: np.ndarray, f: int, rng: np.random.Generator) -> np.ndarray:
        if self.target is not None and self.target >= honest.shape[0]:
            raise ValueError(f"{self.name}: target {self.target} is not an honest row (h={honest.shape[0]})")
        i = mimic_target(honest) if self.target is None else self.target
        self.last_target = i
        return np.repeat(honest[i : i + 1], f, axis=0)
