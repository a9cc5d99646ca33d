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
    batch seed, so the honest members send bitwise-equal gradients). Each group is decoded by majority, on the
    bits of each coordinate :math:`j` (a row held by :math:`f + 1` members is a majority in every coordinate):

    .. math:: \hat g_{g,j} = x_{i,j} \text{ for any } i \in g \text{ with }
              |\{k \in g : x_{k,j} \equiv x_{i,j}\}| \ge f + 1 \text{ and } x_{i,j} \text{ finite}.

    With at most :math:`f` Byzantine members that value is an honest one (:math:`f + 1` holders include an
    honest member, and two distinct values cannot both have :math:`f + 1` holders out of :math:`2f + 1`), and
    without loss it is *the* honest gradient's, bit for bit. Where no value has a majority (the transport lost
    chunks of some copies, NaN- or zero-filled by ``--fill``, or the members' parameters differed), the group
    falls back to the NaN-aware coordinate-wise median of its rows (:func:`~aggregathor.gars._sortnet.nan_median`).

    A group *decodes* coordinate :math:`j` when it has a majority there, or when all :math:`r` values are finite
    (their median then lies in the honest members' range). A group that lost a copy's value at :math:`j` and
    whose other copies disagree (a Byzantine member among them) cannot: Draco tolerates :math:`f` faults per
    group, erasures included, and the median of one honest and one Byzantine value (f = 1) would give the
    Byzantine value half the weight. The output averages, per coordinate, the groups that decode it,

    .. math:: \mathrm{draco}_j = \frac{1}{|D_j|} \sum_{g \in D_j} \hat g_{g,j},

    and only where no group decodes :math:`j` (:math:`D_j = \emptyset`), the groups' finite medians instead
    (NaN where there is none). Computed as :math:`(\sum_{g \in D_j} s\,\hat g_{g,j}) \cdot b_{|D_j|}` in group
    order (:func:`mean_factors`: ``s`` an exact power of two, so no sum of finite values overflows, even near
    float32's maximum; limit: values below about :math:`2^{-120}` in magnitude may be flushed to 0 by it).

    So with at most :math:`f` Byzantine rows in each group (any placement when the total is at most ``f``) and no
    loss, the output is bit for bit the mean of the groups' honest gradients. ``nan_robust``: with at most
    ``f`` non-finite rows every group keeps :math:`f + 1` finite values per coordinate and the output is finite.
    Needs n to be a multiple of :math:`2f + 1`.

    Cost: :math:`r(r-1)/2` elementwise bit comparisons and the median network per group, fused by XLA into one
    pass over the data; throughput is one useful gradient per group of :math:`2f + 1` workers.
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
        r, groups = group_size(self.f), self.groups
        decoded = [self.decode(x[g * r:(g + 1) * r]) for g in range(groups)]
        anyone = decoded[0][1]
        for _, sure in decoded[1:]:
            anyone = tf.logical_or(anyone, sure)
        scale = tf.constant(mean_factors(groups)[0], x.dtype)
        total, count = None, None
        for value, sure in decoded:  # where no group decodes a coordinate: every finite median instead
            use = tf.where(anyone, sure, tf.math.is_finite(value))
            term = tf.where(use, value * scale, tf.zeros([], x.dtype))  # exact: scale is a power of two
            total = term if total is None else total + term
            count = tf.cast(use, tf.int32) if count is None else count + tf.cast(use, tf.int32)
        # b_c = (1/c) / s for c groups used (NaN for none): one rounding in all, as a division by c
        back = [float("nan")] + [1.0 / c / mean_factors(groups)[0] for c in range(1, groups + 1)]
        return total * tf.gather(tf.constant(back, x.dtype), count)

    def decode(self, group: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """One group's ``(r, d)`` rows -> its ``(d,)`` decoded gradient (the finite majority value of each coordinate,
        else the NaN-aware median) and where it decodes (a majority, or ``r`` finite values)."""
        rows = tf.unstack(group, axis=0)
        r = len(rows)
        bits = [tf.bitcast(row, _BITS[group.dtype.size]) for row in rows]
        finite = [tf.math.is_finite(row) for row in rows]
        votes = [tf.ones_like(bits[0], tf.int32) for _ in rows]
        for i in range(r):
            for j in range(i + 1, r):
                same = tf.cast(tf.equal(bits[i], bits[j]), tf.int32)
                votes[i] += same
                votes[j] += same
        out, majority, complete = _sortnet.nan_median(rows), None, None
        for i in reversed(range(r)):  # any majority value will do: they are all the same bits
            holds = tf.logical_and(votes[i] >= self.f + 1, finite[i])
            out = tf.where(holds, rows[i], out)
            majority = holds if majority is None else tf.logical_or(majority, holds)
            complete = finite[i] if complete is None else tf.logical_and(complete, finite[i])
        return out, tf.logical_or(majority, complete)
