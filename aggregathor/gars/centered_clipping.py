"""Centered clipping (Karimireddy, He, Jaggi, ICML 2021)."""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from aggregathor.gars import _distances, _scaling
from aggregathor.gars.base import GAR, register

_CENTERS = ("median", "zero", "previous")


@register
class CenteredClipping(GAR):
    r"""Centered clipping: from a centre :math:`v_0`, ``iterations`` (:math:`L`) times

    .. math:: v_{l+1} = v_l + \frac1n \sum_{i=1}^n (G_i - v_l) \min\Big\{1, \frac{\tau}{\|G_i - v_l\|}\Big\},

    and return :math:`v_L`. Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization",
    ICML 2021, §4, eq. (CC). Parameters: ``tau`` (:math:`\tau`, default 10), ``iterations`` (:math:`L`,
    default 1, as in the paper's experiments and its code), ``center``:

    - ``"median"`` (default): the coordinate-wise median of the finite values of the rows. The paper starts
      from the previous aggregate (its server momentum) and proves robustness for a start close to the honest
      mean; a GAR here is a pure function of its input, and the median is such a start with breakdown
      point 1/2 (at most ``f < n/2`` Byzantine rows cannot move it outside the honest values' range).
    - ``"previous"``: the paper's stateful version: the previous output of this rule (zeros on the first
      call, as in the authors' code), kept in a ``tf.Variable`` per ``(d, dtype)``.
    - ``"zero"``: :math:`v_0 = 0`.
    - a ``(d,)`` array: a fixed centre.

    ``nan_robust``: a non-finite row's clipping factor is :math:`\tau / \infty = 0`, it contributes nothing
    (as if it were :math:`v_l`); a row equal to :math:`v_l` contributes 0. Needs :math:`n \ge 2f + 1`.

    How: every iterate is :math:`v_l = v_0 + \sum_j b_j (G_j - v_0)`, so the distances
    :math:`\|G_i - v_l\|^2 = K_{ii} - 2 (K b)_i + b^\top K b` come from the Gram matrix :math:`K` of the rows
    centred on :math:`v_0` (blocked, exact float64 products); for :math:`L = 1` only its diagonal (no
    product). The iterations update the ``(n,)`` vector :math:`b`; the data is read three times whatever
    :math:`L` (the median start, the Gram, the fused combination :math:`v_0 + \sum_j b_j (G_j - v_0)`).

    Any finite magnitude: the combination is computed as :math:`v_0 + \sum_j (G_j/2 - v_0/2)(2 b_j)` with
    each :math:`2 b_j` applied as two float32 factors (:func:`~aggregathor.gars._scaling.centred_combination`):
    :math:`\tau / \|G_j - v_0\|` for a row of norm 1e38 is below float32's smallest normal number, yet the
    row still moves the result by :math:`\tau / n`. For :math:`L = 1` a distance whose float32 difference
    :math:`G_j - v_0` overflows (opposite signs near the maximum) is recomputed on the halved rows (a second
    pass, only then); for :math:`L > 1` the Gram is float64. Limit: values below about 1e-38 in magnitude
    count as 0.
    """

    name = "centered-clipping"
    nan_robust = True
    jit_compile = False

    def __init__(
        self, n: int, f: int, tau: float = 10.0, iterations: int = 1, center: Any = "median", **kwargs: Any
    ) -> None:
        super().__init__(n, f, **kwargs)
        if not float(tau) > 0.0:
            raise ValueError(f"{self.name}: tau must be > 0, got {tau!r}")
        self.tau = float(tau)
        if isinstance(iterations, bool) or not isinstance(iterations, int | np.integer) or iterations < 1:
            raise ValueError(f"{self.name}: iterations must be an int >= 1, got {iterations!r}")
        self.iterations = int(iterations)
        if isinstance(center, str):
            if center not in _CENTERS:
                raise ValueError(f"{self.name}: center must be one of {_CENTERS} or a (d,) array, got {center!r}")
            self.center: str | np.ndarray = center
        else:
            arr = np.asarray(center, dtype=np.float64)
            if arr.ndim != 1:
                raise ValueError(f"{self.name}: a center array must be 1-D, got shape {arr.shape}")
            self.center = arr
        self._state: dict[tuple[int, str], tf.Variable] = {}

    def check(self) -> None:
        self._require(self.n >= 2 * self.f + 1, "n >= 2f + 1")

    def get_config(self) -> dict[str, Any]:
        center = self.center if isinstance(self.center, str) else self.center.tolist()
        return {**super().get_config(), "tau": self.tau, "iterations": self.iterations, "center": center}

    def state(self, d: int, dtype: tf.DType = tf.float32) -> tf.Variable:
        """The previous aggregate for ``center="previous"`` (a ``(d,)`` variable, zeros before the first call)."""
        key = (int(d), tf.as_dtype(dtype).name)
        var = self._state.get(key)
        if var is None:
            with tf.init_scope():
                var = tf.Variable(tf.zeros([int(d)], dtype), trainable=False, name="cc_previous")
            self._state[key] = var
        return var

    def _start(self, x: tf.Tensor) -> tf.Tensor:
        d = int(x.shape[1])
        if isinstance(self.center, np.ndarray):
            if self.center.shape != (d,):
                raise ValueError(f"{self.name}: center has shape {self.center.shape}, gradients have d={d}")
            return tf.constant(self.center, dtype=x.dtype)
        if self.center == "median":
            return _distances.coordinate_median(x)
        if self.center == "zero":
            return tf.zeros([d], x.dtype)
        return self.state(d, x.dtype).read_value()

    def weights(self, x: tf.Tensor, c: tf.Tensor) -> tf.Tensor:
        """The float64 ``(n,)`` vector ``b`` with ``v_L = c + sum_j b_j (x_j - c)``."""
        n = self.n
        tau = tf.constant(self.tau, tf.float64)
        if self.iterations == 1:
            g = _distances.centred_gram(x, centre=c, precise=True, diag_only=True)
            # x_i - c overflows float32 for finite values of opposite signs near the maximum: +inf there
            # (a NaN row gives NaN). Recompute on the halved data (exact), only when it happens.
            g = tf.cond(tf.reduce_any(tf.math.is_inf(g)), lambda: self._halved_sq_norms(x, c, g), lambda: g)
            ok = tf.math.is_finite(g)
            zero = tf.zeros_like(g)
            s = tf.where(ok, tf.minimum(tau / tf.sqrt(tf.where(ok, g, zero)), 1.0), zero)
            return s / n
        gram = _distances.centred_gram(x, centre=c, precise=True)
        g = tf.linalg.diag_part(gram)
        ok = tf.math.is_finite(g)
        gram = tf.where(ok[:, None] & ok[None, :], gram, tf.zeros_like(gram))
        g = tf.where(ok, g, tf.zeros_like(g))
        b = tf.zeros([n], tf.float64)
        for _ in range(self.iterations):
            kb = tf.linalg.matvec(gram, b)
            norm = tf.sqrt(tf.maximum(g - 2.0 * kb + tf.reduce_sum(b * kb), 0.0))
            s = tf.where(ok, tf.minimum(tau / norm, 1.0), tf.zeros_like(norm))  # norm 0: tau/0 = inf -> 1
            # v + (1/n) sum_i s_i (x_i - v) with v = c + Y^T b, x_i = c + y_i
            b = b * (1.0 - tf.reduce_sum(s) / n) + s / n
        return b

    @staticmethod
    def _halved_sq_norms(x: tf.Tensor, c: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
        """``g`` with its ``+inf`` entries recomputed as ``4 ||x_i/2 - c/2||^2`` (float64)."""
        half = tf.constant(0.5, x.dtype)
        g2 = 4.0 * _distances.centred_gram(x * half, centre=c * half, precise=True, diag_only=True)
        return tf.where(tf.math.is_inf(g), g2, g)

    def aggregate(self, x: tf.Tensor) -> tf.Tensor:
        self.check()
        c = self._start(x)
        out = _scaling.centred_combination(x, c, self.weights(x, c))
        if isinstance(self.center, str) and self.center == "previous":
            out = tf.identity(out)
            with tf.control_dependencies([self.state(int(x.shape[1]), x.dtype).assign(out)]):
                out = tf.identity(out)
        return out
