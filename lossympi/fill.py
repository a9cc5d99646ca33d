"""Fill policies for the chunks of a message that missed its deadline.

A policy is a name or a callable ``fill(out, element_mask) -> None`` that writes ``out[~element_mask]``
in place. The names, and the distribution of ``random`` (the policy of AggregaThor's LossyMPI):

- ``random``: i.i.d. normal draws with the mean and standard deviation of the elements that did
  arrive in this message (mean 0, std 1 when none did); integer dtypes are rounded and clipped.
- ``zero``: 0.
- ``nan``: the dtype's quiet NaN (float dtypes only).
- ``last``: the value delivered at the same position in the previous message of the same
  ``(peer, tensor_id)``; 0 before the first one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

FillName = Literal["random", "zero", "nan", "last"]
FillFn = Callable[[np.ndarray, np.ndarray], None]
FillPolicy = FillName | FillFn
FILL_NAMES: tuple[str, ...] = ("random", "zero", "nan", "last")

__all__ = ["FILL_NAMES", "FillPolicy", "check_policy", "apply_fill"]


def check_policy(policy: FillPolicy, dtype: np.dtype) -> None:
    """Raise ValueError if ``policy`` cannot fill an array of ``dtype``."""
    if callable(policy):
        return
    if policy not in FILL_NAMES:
        raise ValueError(f"unknown fill policy {policy!r}: use one of {', '.join(FILL_NAMES)} or a callable")
    if policy == "nan" and not np.issubdtype(dtype, np.floating):
        raise ValueError(f"fill='nan' needs a float dtype, not {dtype}: use 'zero', 'last' or 'random'")


def apply_fill(
    policy: FillPolicy,
    out: np.ndarray,
    element_mask: np.ndarray,
    *,
    last: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
) -> None:
    """Fill ``out[~element_mask]`` in place according to ``policy``.

    Parameters
    ----------
    policy : str or callable
        One of :data:`FILL_NAMES` or ``fill(out, element_mask)``.
    out : ndarray
        The received array (any shape); only missing elements are written.
    element_mask : ndarray of bool
        Same shape as ``out``; True where the element arrived.
    last : ndarray, optional
        Previous message of the same peer and tensor id (policy ``last``).
    rng : numpy.random.Generator, optional
        Source of the ``random`` draws.
    """
    missing = ~element_mask
    k = int(np.count_nonzero(missing))
    if k == 0:
        return
    if callable(policy):
        policy(out, element_mask)
        return
    check_policy(policy, out.dtype)
    if policy == "zero":
        out[missing] = 0
    elif policy == "nan":
        out[missing] = np.nan
    elif policy == "last":
        out[missing] = 0 if last is None else last[missing]
    else:
        rng = rng if rng is not None else np.random.default_rng()
        arrived = out[element_mask]
        if arrived.size:
            with np.errstate(invalid="ignore"):  # signalling NaNs in the payload are not an error
                vals = arrived.astype(np.float64, copy=False)
            finite = vals[np.isfinite(vals)] if np.issubdtype(out.dtype, np.floating) else vals
            mean = float(finite.mean()) if finite.size else 0.0
            std = float(finite.std()) if finite.size else 1.0
        else:
            mean, std = 0.0, 1.0
        draws = rng.normal(mean, std, size=k)
        if np.issubdtype(out.dtype, np.integer):
            info = np.iinfo(out.dtype)
            # float64(2**63 - 1) rounds up to 2**63, which does not fit int64: clip to the largest float
            # below the maximum, or the cast wraps to the opposite end of the range.
            hi = np.float64(info.max)
            if int(hi) > info.max:
                hi = np.nextafter(hi, -np.inf)
            draws = np.clip(np.rint(draws), float(info.min), hi)
        out[missing] = draws.astype(out.dtype)
