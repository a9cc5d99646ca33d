"""Draco: decode groups of 2f + 1 redundant gradients by majority vote, then average the groups."""

from __future__ import annotations

import math

import tensorflow as tf

from aggregathor.gars import _sortnet
from aggregathor.gars.base import GAR, register

__all__ = ["Draco", "group_size", "mean_factors"]

#: The integer type of each float type's bits, for bitwise comparisons.
_BITS = {2: tf.int16, 4: tf.int32, 8: tf.int64}


def group_size(f: int) -> int:
    """``r = 2f + 1``: the workers of one Draco group, who all compute the gradient of the same mini-batch."""
    return 2 * int(f) + 1


def mean_factors(groups: int) -> tuple[float, float]:
    """``(s, b)`` for the mean of ``groups`` rows as ``(sum_g s x_g) * b``: ``s = 2^-ceil(log2 G)`` makes every
    product exact and keeps every partial sum below the largest value; ``b = (1/G) / s`` undoes it (both exact
    powers of two apart from the rounding of 1/G, so one rounding in all, as a division)."""
    s = 2.0 ** -math.ceil(math.log2(groups))
    return s, 1.0 / groups / s


@register
class Draco(GAR):
    r"""Draco with the repetition code (Chen, Wang, Charles, Papailiopoulos, "DRACO: Byzantine-resilient
    Distributed Training via Redundant Gradients", ICML 2018, §3, repetition code and majority vote decoder).

    The n rows form :math:`G = n / r` groups of :math:`r = 2f + 1` consecutive rows (workers ``g r + 1 ..
    (g + 1) r`` are group ``g``; :func:`aggregathor.assignment.data_assignment` gives them one shard and one
    batch seed, so the honest members send bitwise-equal gradients). Each group is decoded by majority:

    .. math:: \hat g_g = x_i \text{ for any } i \in g \text{ with }
              |\{j \in g : x_j \equiv x_i\}| \ge f + 1 \text{ and } x_i \text{ finite},

    where :math:`\equiv` compares the bits of the whole row. With at most :math:`f` Byzantine members and
    :math:`f + 1` honest ones, that row is the honest gradient (two distinct values cannot both reach
    :math:`f + 1` votes out of :math:`2f + 1`). When no finite row has a majority (the transport lost chunks of
    some copies, which were then NaN- or zero-filled, or the members' parameters differed), the group falls
    back to the NaN-aware coordinate-wise median of its :math:`r` rows (:func:`~aggregathor.gars._sortnet.
    nan_median`), which lies in the range of the group's honest values while at most :math:`f` values of a
    coordinate are Byzantine or non-finite. The output is :math:`\frac1G \sum_g \hat g_g`, computed as
    :math:`(\sum_g s\,\hat g_g) \cdot b` in group order (:func:`mean_factors`: ``s`` an exact power of two, so no
    sum of finite values overflows, even near float32's maximum; limit: values below about :math:`2^{-120}` in
    magnitude may be flushed to 0 by that scaling, as in the other rules).

    So with at most :math:`f` Byzantine rows in each group (any placement when the total is at most ``f``) and no
    loss, the output is bit for bit the mean of the groups' honest gradients. ``nan_robust``: with at most
    ``f`` non-finite rows every group keeps :math:`f + 1` finite ones, so the output is finite. Needs n to be a
    multiple of :math:`2f + 1`.

    Cost: :math:`r(r-1)/2` bitwise row comparisons per group, i.e. :math:`f` passes over the data, plus the
    median network (one pass); throughput is one useful gradient per group of :math:`2f + 1` workers.
    """

    name = "draco"
    nan_robust = True
    positional_rows = True  # the groups are rows g r .. (g + 1) r - 1: never rebuilt for a subset of the rows

    @property
    def groups(self) -> int:
        """The number of groups, ``n / (2f + 1)``."""
        return self.n // group_size(self.f)

    def check(self) -> None:
        r = group_size(self.f)
        if self.n % r:
            lower, upper = (self.n // r) * r, (self.n // r + 1) * r
            fix = f"--workers {upper}" if lower == 0 else f"--workers {lower} or {upper}"
            raise ValueError(f"{self.name} needs n to be a multiple of 2f + 1 = {r} (groups of {r} workers share "
                             f"a mini-batch); got n={self.n}, f={self.f}: use {fix}, or another --f")

    def aggregate(self, x: tf.Tensor) -> tf.Tensor:
        r = group_size(self.f)
        scale, back = mean_factors(self.groups)
        total = None
        for g in range(self.groups):
            decoded = self.decode(x[g * r:(g + 1) * r]) * tf.constant(scale, x.dtype)  # exact: a power of two
            total = decoded if total is None else total + decoded
        return total * tf.constant(back, x.dtype)

    def decode(self, group: tf.Tensor) -> tf.Tensor:
        """One group's ``(r, d)`` rows -> its ``(d,)`` decoded gradient: the finite majority row, else the NaN-aware
        coordinate-wise median of the rows."""
        rows = tf.unstack(group, axis=0)
        r = len(rows)
        bits = [tf.bitcast(row, _BITS[group.dtype.size]) for row in rows]
        votes = [tf.constant(1, tf.int32) for _ in rows]
        for i in range(r):
            for j in range(i + 1, r):
                same = tf.cast(tf.reduce_all(tf.equal(bits[i], bits[j])), tf.int32)
                votes[i] += same
                votes[j] += same
        out = _sortnet.nan_median(rows)
        for i in reversed(range(r)):  # any majority row will do: they are all the same bits
            holds = tf.logical_and(votes[i] >= self.f + 1, tf.reduce_all(tf.math.is_finite(rows[i])))
            out = tf.where(holds, rows[i], out)
        return out
