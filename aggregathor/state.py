"""The model's state at the server: a coordinate-wise median of what the workers report.

A model's *state* is its floating-point non-trainable variables (BatchNormalization's moving mean and variance,
...): they are not learned by gradients, so the server cannot update them with the rule. Each worker starts a step
from the server's state (it travels after the parameters), runs its forward pass in training mode, which moves the
state towards its batch's statistics (``state' = m * state + (1 - m) * batch``), and sends the result after its
gradient. The server then takes, coordinate by coordinate, the median of the values that arrived:

.. math:: s_j \\leftarrow \\operatorname{median}_{i \\,:\\, x_{ij} \\text{ arrived}} x_{ij}
   \\quad \\text{when at least } 2f + 1 \\text{ values of coordinate } j \\text{ arrived}

Why a median, and not the state recomputed by the server on its own data: the server holds no training data in
general, and a median needs none. It is what a Byzantine worker cannot move far: among ``2f + 1`` or more values of a
coordinate, at most ``f`` from Byzantine workers, the median lies between two honest values (Yin et al., ICML 2018,
coordinate-wise median). With fewer (gradients lost or late), the Byzantine values could be half of them, so the
coordinate keeps the server's value for that step. Infinite values count as extremes, NaN as missing.

Cost: ``s`` more float32 values per gradient and per parameter message (BatchNormalization: two per channel,
e.g. 0.2 % of ResNet-50's parameters), one median over an ``(n, s)`` array per step, and, for models with a
state, one copy of the ``(n, d)`` gradient rows into a contiguous array for the rule.
"""

from __future__ import annotations

import numpy as np

from aggregathor.transport.base import GatherReport

__all__ = ["aggregate_state"]


def aggregate_state(rows: np.ndarray, report: GatherReport, d: int, current: np.ndarray, f: int) -> np.ndarray:
    """The new ``(s,)`` state: the coordinate-wise median of the workers' reported states that arrived.

    Parameters
    ----------
    rows : ndarray, shape (n, d + s)
        The workers' messages (worker ``r`` in row ``r - 1``): gradient, then state.
    report : GatherReport
        What arrived: rows with ``delivered == 0`` are left out, partial rows keep only the elements of
        ``report.masks`` (when the transport gives them).
    d : int
        Gradient values per row (the state starts at column ``d``).
    current : ndarray, shape (s,)
        The server's state, kept where fewer than ``2f + 1`` values arrived.
    f : int
        The number of Byzantine workers tolerated.

    Examples
    --------
    >>> rows = np.array([[0., 1.], [0., 2.], [0., 1e30]], np.float32)
    >>> aggregate_state(rows, GatherReport(np.ones(3)), 1, np.zeros(1, np.float32), f=1)
    array([2.], dtype=float32)
    """
    values = rows[:, d:].astype(np.float64)  # a NaN counts as missing, +-inf as an extreme value
    for i, got in enumerate(np.asarray(report.delivered, dtype=np.float64)):
        if got <= 0.0:
            values[i] = np.nan
        elif got < 1.0 and (i + 1) in report.masks:
            values[i, ~report.masks[i + 1][d:]] = np.nan
    arrived = ~np.isnan(values)
    out = np.asarray(current, dtype=np.float32).copy()
    some = arrived.sum(axis=0) >= 2 * f + 1
    if some.any():
        with np.errstate(all="ignore"):
            out[some] = np.nanmedian(values[:, some], axis=0).astype(np.float32)
    return out
