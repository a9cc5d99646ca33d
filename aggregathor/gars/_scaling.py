"""Scaling that keeps the rules' float32 arithmetic finite and exact at any finite input magnitude.

A Byzantine worker chooses its numbers, up to float32's largest finite value (3.4e38). Two things then go
wrong in float32 arithmetic that is exact on ordinary inputs:

1. **Tiny weights flush to zero.** A per-row factor such as a clip scale ``C / ||x_i||`` or a Weiszfeld
   weight, computed in float64, falls below float32's smallest normal number (1.18e-38) for a huge row and
   becomes 0 when cast (TensorFlow flushes subnormals to zero on CPU), although its product with the row
   is of ordinary size. :func:`split_factor` writes every factor as ``lo * hi`` with ``hi`` a power of two,
   both normal in float32 for factors in ``[2^-248, 2^250]``, and the rows are multiplied by ``lo`` then by
   ``hi`` (exact: one rounding in all, as with one factor). Always inside an XLA function: outside,
   Grappler's arithmetic optimizer reorders a chain of products to multiply the small factors first
   (``x * (lo * hi)``), which flushes the factor to 0 again (XLA does not reassociate them). :func:`scale_rows`,
   :func:`weighted_sum` and :func:`centred_combination` apply such factors.
2. **Sums of huge values overflow**, although their mean is finite: the mean of two rows of 3e38 is 3e38.
   The rules that sum k values and divide by k multiply the values by :func:`sum_scale` ``(k)``, a power of
   two ``2^-ceil(log2 k)`` (exact), so that no partial sum can exceed the largest value, and multiply the
   result back after the division. (These rules do not "rerun scaled only when the output is not finite",
   :func:`finite_or`, inside their XLA cluster: a conditional that captures the ``(n, d)`` input copies it,
   measured 2 to 8 times slower.)

The remaining limit, stated in each rule's docstring: a value below about ``2^-120`` (7.5e-37) in magnitude
may be flushed to 0 by the exact power-of-two scalings, an absolute error of that size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import tensorflow as tf

__all__ = [
    "centred_combination",
    "finite_or",
    "scale_rows",
    "scale_rows_fused",
    "split_factor",
    "sum_scale",
    "weighted_sum",
]


def sum_scale(k: int) -> float:
    """``2^-ceil(log2 k)``: values multiplied by it add up to at most the largest of ``k`` of them (exact)."""
    return 2.0 ** -math.ceil(math.log2(max(1, int(k))))


def split_factor(s: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Factors ``(lo, hi)`` of a float64 vector ``s >= 0`` with ``lo * hi = s`` and ``hi`` a power of two.

    ``hi = 2^ceil(log2(s) / 2)``: for ``2^-248 <= s <= 2^250`` both are normal float32 numbers, where ``s``
    itself may not be, and for ``s <= 1`` both are at most 1, so ``x * lo`` cannot overflow (with ``floor``,
    ``lo`` reaches 2 and a row near float32's maximum overflowed). ``s = 0`` gives ``(0, 1)``; a NaN gives
    NaN factors (so ``x * lo * hi`` is NaN).
    """
    s = tf.convert_to_tensor(s, tf.float64)
    pos = s > 0.0
    safe = tf.where(pos, s, tf.ones_like(s))
    hi = tf.math.pow(tf.constant(2.0, tf.float64), tf.math.ceil(tf.math.log(safe) / (2.0 * math.log(2.0))))
    hi = tf.where(pos, hi, tf.ones_like(s))
    hi = tf.where(tf.math.is_nan(s), s, hi)
    return s / hi, hi


def finite_or(out: tf.Tensor, rescaled: Callable[[], tf.Tensor]) -> tf.Tensor:
    """``out`` when all of it is finite, else ``rescaled()`` (the computation rerun at a safe scale).

    A ``tf.cond``. Inside an XLA cluster, a conditional whose branch captures the ``(n, d)`` input was
    measured 2 to 8 times slower than the unconditional computation (the input is copied into the
    branch); outside XLA, or on small tensors, it costs one pass over ``out``.
    """
    return tf.cond(tf.reduce_all(tf.math.is_finite(out)), lambda: out, rescaled)


@functools.cache
def _scale_rows_fn() -> Callable[..., tf.Tensor]:
    def fn(x: tf.Tensor, lo: tf.Tensor, hi: tf.Tensor) -> tf.Tensor:
        return x * lo[:, None] * hi[:, None]

    return tf.function(fn, jit_compile=True, autograph=False)


def scale_rows(x: tf.Tensor, s: tf.Tensor) -> tf.Tensor:
    """``x_i * s_i`` for every row, ``s`` a float64 ``(n,)`` vector, without flushing a tiny ``s_i`` to 0
    (one XLA pass)."""
    lo, hi = split_factor(s)
    return _scale_rows_fn()(x, tf.cast(lo, x.dtype), tf.cast(hi, x.dtype))


def scale_rows_fused(x: tf.Tensor, s: tf.Tensor) -> tf.Tensor:
    """:func:`scale_rows` written row by row, for use inside an XLA cluster: XLA folds ``stack`` then
    ``unstack`` away and fuses each scaled row into its users, where a broadcast product with n users would
    be written to memory first (2.5 times slower before a median at d = 1e7)."""
    lo, hi = split_factor(s)
    lo, hi = tf.cast(lo, x.dtype), tf.cast(hi, x.dtype)
    return tf.stack([x[i] * lo[i] * hi[i] for i in range(int(x.shape[0]))])


@functools.cache
def _weighted_sum_fn() -> Callable[..., tf.Tensor]:
    def fn(x: tf.Tensor, lo: tf.Tensor, hi: tf.Tensor) -> tf.Tensor:
        zero = tf.zeros([int(x.shape[1])], x.dtype)
        total = zero
        for i in range(int(x.shape[0])):
            # the select keeps a NaN/Inf row of weight 0 out (0 * NaN = NaN)
            total = total + tf.where(lo[i] != 0, x[i] * lo[i] * hi[i], zero)
        return total

    return tf.function(fn, jit_compile=True, autograph=False)


def weighted_sum(x: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
    """``sum_i w_i x_i`` over the rows with ``w_i != 0`` (one fused XLA pass), ``w`` float64 and ``>= 0``.

    Each weight is applied as two float32 factors (:func:`split_factor`): a weight below float32's smallest
    normal number still scales a huge row to its true contribution. For a convex combination (weights
    summing to 1) every partial sum is bounded by the largest row, so nothing overflows.
    """
    lo, hi = split_factor(w)
    return _weighted_sum_fn()(x, tf.cast(lo, x.dtype), tf.cast(hi, x.dtype))


@functools.cache
def _combination_fn() -> Callable[..., tf.Tensor]:
    def fn(x: tf.Tensor, c: tf.Tensor, lo: tf.Tensor, hi: tf.Tensor) -> tf.Tensor:
        half = tf.constant(0.5, x.dtype)
        hc = c * half
        total = c
        for i in range(int(x.shape[0])):
            step = (x[i] * half - hc) * lo[i] * hi[i]  # halved: x_i - c cannot overflow
            total = total + tf.where(lo[i] != 0, step, tf.zeros_like(c))
        return total

    return tf.function(fn, jit_compile=True, autograph=False)


def centred_combination(x: tf.Tensor, c: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
    """``c + sum_i w_i (x_i - c)`` over the rows with ``w_i != 0`` (one fused XLA pass), ``w`` float64 ``>= 0``.

    Computed as ``c + sum_i (x_i/2 - c/2) (2 w_i)``: the halved difference cannot overflow where
    ``x_i - c`` would (opposite signs near the largest value), and ``2 w_i`` is applied as two factors
    (:func:`split_factor`). With ``sum_i w_i <= 1`` every partial sum is a convex combination of ``c`` and
    rows, so nothing overflows.
    """
    lo, hi = split_factor(2.0 * tf.cast(w, tf.float64))
    return _combination_fn()(x, tf.cast(c, x.dtype), tf.cast(lo, x.dtype), tf.cast(hi, x.dtype))
