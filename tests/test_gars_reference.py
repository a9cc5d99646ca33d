"""The fast TensorFlow aggregation rules against the numpy references written from the papers.

Three parts:

1. Unit tests of the references themselves on tiny examples computed by hand (``test_ref_*``), so that
   the specification is checked before anything is compared with it.
2. The registry: every registered rule and wrapper has a reference, the (n, f) bounds are the papers'.
3. Hypothesis property tests: every registered rule (``aggregathor.gars.names()``) against its reference,
   then every wrapper (``aggregathor.gars.wrappers.names()``) composed with the rules, over n, f, d,
   float32/float64, ties (small integers, duplicated rows), close rows around a large shared gradient (the
   uncentred-Gram pitfall of the NOTES), outliers and, for the rules documented ``nan_robust``, up to f
   non-finite rows.

What "equal" means. The input is cast to the rule's dtype first; the reference runs in float64 on exactly
those values. Tolerances are error bounds of the computation, not fudge factors: a mean of k values is
allowed ``4 eps * sum(|values averaged|)`` (the worst-case bound of a float sum is ``(k-1) eps/2`` times that
sum), a selected row must be returned almost bit for bit, and so on. Where the papers leave a choice open,
the tests accept every admissible answer and nothing else:

- Krum/Multi-Krum/Bulyan scores that are equal up to the error bound of a float32 squared distance are a
  tie: any of the tied selections is accepted (the error bound is taken after centring on the
  coordinate-wise median, as the NOTES require of the fast path; an uncentred Gram fails it);
- "the values closest to the median" (MeaMed, Bulyan): every choice among values at the tie distance;
- where enumerating the admissible answers is impractical (the AggregaThor variant of Bulyan, whose
  tie-breaks chain through neighbour sets, rankings and the per-coordinate cut; NNM neighbour sets), an
  input with a near tie (inexact, within the rounding bound) is not compared, and hypothesis records it
  as an event.

Compile time dominates (XLA compiles per (rule, n, f, d, dtype, parameters), about 0.2-6 s each), so each
rule draws its configuration from a small pool (the bound's corners plus random shapes and parameters,
fixed per rule name) and each example pushes several matrices through the same compiled function.
"""

from __future__ import annotations

import functools
import itertools
import math
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

import aggregathor.gars as gars
import aggregathor.gars.reference as ref

# The rules and wrappers the project promises; each must be registered and have a reference.
EXPECTED_RULES = (
    "average",
    "average-nan",
    "median",
    "meamed",
    "trimmed-mean",
    "krum",
    "multi-krum",
    "bulyan",
    "geometric-median",
    "centered-clipping",
)
EXPECTED_WRAPPERS = ("nnm", "bucketing", "clipping", "arc")

# Registered names deliberately without a reference, with the reason. Empty: nothing is skipped silently.
NO_REFERENCE: dict[str, str] = {}

REGISTERED = gars.names()
RULES = [name for name in REGISTERED if name in ref.REFERENCES]
try:
    from aggregathor.gars import wrappers as gw

    REGISTERED_WRAPPERS = gw.names()
except ImportError:  # pragma: no cover - the wrappers module has not landed
    REGISTERED_WRAPPERS = []
WRAPPERS = [name for name in REGISTERED_WRAPPERS if name in ref.WRAPPERS]

SETTINGS = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
MATRICES_PER_EXAMPLE = 4
N_MAX = 25
D_MAX = 40


# ======================================================================== the references, by hand
def col(*values: float) -> np.ndarray:
    """A 1-D data set as an (n, 1) matrix."""
    return np.array(values, dtype=np.float64).reshape(-1, 1)


def test_ref_average_and_average_nan() -> None:
    x = np.array([[1.0, 2.0], [3.0, np.nan], [5.0, 4.0], [np.inf, 6.0]])
    assert np.isinf(ref.average(x)[0]) and np.isnan(ref.average(x)[1])
    np.testing.assert_array_equal(ref.average(x[:3, :1]), [3.0])
    np.testing.assert_array_equal(ref.average_nan(x), [3.0, 4.0])  # (1+3+5)/3, (2+4+6)/3
    assert np.isnan(ref.average_nan(np.array([[np.nan], [np.inf]]))[0])


def test_ref_median() -> None:
    np.testing.assert_array_equal(ref.median(col(3, 1, 2)), [2.0])
    np.testing.assert_array_equal(ref.median(col(10, 1, 3, 2)), [2.5])  # even: mean of the two middle ones
    np.testing.assert_array_equal(ref.median(col(np.nan, 1, 2, 3, np.inf)), [2.0])  # finite values only
    np.testing.assert_array_equal(ref.median(col(np.nan, 1, 2, -np.inf, 4, 5)), [3.0])
    assert np.isnan(ref.median(col(np.nan, np.inf))[0])


def test_ref_meamed() -> None:
    # median 3; distances 2, 1, 0, 7, 97; the n - f = 4 closest: 1, 2, 3, 10 -> 4
    np.testing.assert_array_equal(ref.meamed(col(1, 2, 3, 10, 100), 1), [4.0])
    # median 0; distances 1, 1, 1, 0, 0.5, 2, 3: the 4 closest are 0, 0.5 and two of the -1 -> -1.5 / 4.
    # (The leftmost window of 4 sorted values with the smallest *maximum* distance, [-1, -1, -1, 0], is not
    # a set of 4 nearest values: the paper's definition gives -0.375, not -0.75.)
    np.testing.assert_array_equal(ref.meamed(col(-1, -1, -1, 0, 0.5, 2, 3), 3), [-0.375])
    # tie at distance 1 between 1 and 3 around the median 2: the smaller value first -> (2 + 1) / 2
    np.testing.assert_array_equal(ref.meamed(col(1, 2, 3), 1), [1.5])
    # non-finite values: median of the finite ones (2), then the 3 closest finite values
    np.testing.assert_array_equal(ref.meamed(col(np.nan, 1, 2, 3, np.inf), 2), [2.0])


def test_ref_trimmed_mean() -> None:
    np.testing.assert_array_equal(ref.trimmed_mean(col(1, 2, 3, 10, 100), 1), [5.0])  # (2 + 3 + 10) / 3
    np.testing.assert_array_equal(ref.trimmed_mean(col(100, 1, 2, 3, 10), 2), [3.0])
    np.testing.assert_array_equal(ref.trimmed_mean(col(1, 2, 3, 10), 0), [4.0])
    # one NaN sorts last, one -inf first: both trimmed with f = 2 -> (1 + 2 + 3) / 3
    np.testing.assert_array_equal(ref.trimmed_mean(col(np.nan, 1, 2, 3, -np.inf, 1e9, -1e9), 2), [2.0])
    with pytest.raises(ValueError):
        ref.trimmed_mean(col(1, 2), 1)


def test_ref_krum_1d_by_hand() -> None:
    # x = 0, 1, 2, 4, 10; f = 1 so n - f - 2 = 2 neighbours, squared distances:
    #   0: {1, 4, 16, 100} -> 1 + 4 = 5      1: {1, 1, 9, 81} -> 2      2: {4, 1, 4, 64} -> 5
    #   4: {16, 9, 4, 36} -> 13              10: {100, 81, 64, 36} -> 100
    x = col(0, 1, 2, 4, 10)
    np.testing.assert_array_equal(ref.krum_scores(x, 1), [5, 2, 5, 13, 100])
    np.testing.assert_array_equal(ref.krum(x, 1), [1.0])
    # Multi-Krum: the MEAN of the m best; m = n - f - 2 = 2 by default: rows 1 and (tie 0/2 -> lowest) 0
    np.testing.assert_array_equal(ref.multi_krum(x, 1), [0.5])
    np.testing.assert_array_equal(ref.multi_krum(x, 1, m=3), [1.0])  # rows 1, 0, 2
    np.testing.assert_array_equal(ref.multi_krum(x, 1, m=1), ref.krum(x, 1))
    # the n - f - 1 = 3 neighbours of some peers would give 0: 21, 1: 11, 2: 9 -> row 2 instead
    np.testing.assert_array_equal(ref.krum_scores(x, 1, neighbours=3)[:3], [21, 11, 9])


def test_ref_krum_squares_the_distances() -> None:
    # x = -1.6, 0, 1.6, 4.1, 4.6; f = 1: two nearest neighbours
    #   0:   distances 1.6, 1.6 -> squared 5.12 (unsquared 3.2)
    #   4.1: distances 0.5, 2.5 -> squared 6.5  (unsquared 3.0: unsquared distances would pick 4.1)
    x = col(-1.6, 0, 1.6, 4.1, 4.6)
    np.testing.assert_allclose(ref.krum_scores(x, 1), [12.8, 5.12, 8.81, 6.5, 9.25], rtol=1e-12)
    np.testing.assert_array_equal(ref.krum(x, 1), [0.0])
    with pytest.raises(ValueError):
        ref.krum(col(0, 1, 2, 3), 1)  # n = 4 < 2f + 3


def test_ref_krum_nonfinite_rows_score_inf() -> None:
    x = col(0, 1, np.nan, 2, np.inf, 3, 4)  # n = 7, f = 2: 3 neighbours among the finite rows only
    s = ref.krum_scores(x, 2)
    assert np.isinf(s[2]) and np.isinf(s[4])
    # 0: {1, 4, 9}=14; 1: {1, 1, 4}=6; 2: {4, 1, 1}=6; 3: {1, 1, 4}=6; 4: {4, 1, 9}=14
    np.testing.assert_array_equal(s[[0, 1, 3, 5, 6]], [14, 6, 6, 6, 14])
    np.testing.assert_array_equal(ref.krum(x, 2), [1.0])
    np.testing.assert_array_equal(ref.multi_krum(x, 2), [2.0])  # m = 3: values 1, 2, 3


def test_ref_bulyan_1d_by_hand() -> None:
    # n = 7, f = 1: theta = 5 picks by iterated Krum with |R| - 3 neighbours, then beta = 3 per coordinate.
    # x = 0, 1, 2.5, 4, 7, 20, -30 (indices 0..6); squared distances, sums of the k smallest:
    #   |R|=7, k=4: 72.25, 48.25, 31, 36.25, 114.25, 1092.25, 4073.25         -> index 2 (2.5)
    #   |R|=6, k=3: 0: 66, 1: 46, 3: 34, 4: 94, 5: 786, 6: 3017                -> index 3 (4)
    #   |R|=5, k=2: 0: 50, 1: 37, 4: 85, 5: 530, 6: 1861                       -> index 1 (1)
    #   |R|=4, k=1: 0: 49, 4: 49, 5: 169, 6: 900  (tie: lowest index)         -> index 0 (0)
    #   |R|=3, k=0: all 0 (tie: lowest index)                                 -> index 4 (7)
    # selection 2.5, 4, 1, 0, 7: median 2.5, the 3 closest: 2.5, 1 and 4 -> 2.5
    x = col(0, 1, 2.5, 4, 7, 20, -30)
    assert ref.bulyan_selection(x, 1) == [2, 3, 1, 0, 4]
    np.testing.assert_array_equal(ref.bulyan(x, 1), [2.5])
    with pytest.raises(ValueError):
        ref.bulyan(col(*range(6)), 1)  # n = 6 < 4f + 3


def test_ref_bulyan_coordinate_phase_by_hand() -> None:
    # Second coordinate 1000 times smaller than the first: the selected set stays rows 0..4 (the tie at
    # |R| = 4 is between the two ends of one distance, so it stays a tie).
    x = np.array([[0, 0.0], [1, 0.0], [2.5, 0.0], [4, 0.0], [7, 0.0], [20, 0.0], [-30, 0.0]])
    x[:, 1] = [6e-3, 1e-3, 2.5e-3, 9e-3, 3e-3, 0.0, 0.0]
    sel = ref.bulyan_selection(x, 1)
    assert sorted(sel) == [0, 1, 2, 3, 4]
    # second coordinate of the selection: 6, 1, 2.5, 9, 3 (x1e-3); median 3; distances 3, 2, 0.5, 6, 0:
    # the 3 closest are 3, 2.5, 1 -> 6.5e-3 / 3
    np.testing.assert_allclose(ref.bulyan(x, 1), [2.5, 6.5e-3 / 3], rtol=1e-12)


def test_ref_bulyan_aggregathor_variant_by_hand() -> None:
    # The original AggregaThor kernel on the same x = 0, 1, 2.5, 4, 7, 20, -30 (n = 7, f = 1):
    # t = n - 2f - 2 = 3 rounds, b = t - 2f = 1, m = n - f - 2 = 4 nearest.
    # Scores (4 nearest): 72.25, 48.25, 31, 36.25, 114.25, 1092.25, 4073.25; distances beyond the 4 nearest
    # pruned to 0 (e.g. row 0 keeps rows 1, 2, 3, 4).
    #   round 0: mean of the 4 best (rows 2, 3, 1, 0) = 7.5 / 4; remove row 2, subtract the kept distances
    #            to it: 66, 46, -, 34, 94, 786, 3017
    #   round 1: mean of the 3 best (rows 3, 1, 0) = 5 / 3; remove row 3: 50, 37, -, -, 85, 530, 1861
    #   round 2: mean of the 2 best (rows 1, 0) = 0.5
    # upper median of (1.875, 5/3, 0.5) = 5/3; the b = 1 closest value: 5/3 (the paper's variant gives 2.5).
    x = col(0, 1, 2.5, 4, 7, 20, -30)
    trace: dict = {}
    np.testing.assert_allclose(ref.bulyan_aggregathor(x, 1, trace), [5 / 3], rtol=1e-12)
    assert trace["rounds"] == [[2, 3, 1, 0], [3, 1, 0], [1, 0]]
    np.testing.assert_allclose(trace["inter"][:, 0], [1.875, 5 / 3, 0.5], rtol=1e-12)
    np.testing.assert_allclose(ref.bulyan(x, 1, variant="multi-krum"), [5 / 3], rtol=1e-12)


def test_ref_bulyan_f0_is_the_average() -> None:
    x = np.arange(12.0).reshape(4, 3) ** 2
    np.testing.assert_allclose(ref.bulyan(x, 0), x.mean(axis=0), rtol=1e-12)


def test_ref_geometric_median_by_hand() -> None:
    # One smoothed-Weiszfeld step on 0, 1, 10 from the mean 11/3: weights 3/11, 3/8, 3/19 ->
    # (1/8 + 10/19) / (1/11 + 1/8 + 1/19) = 1089/449.
    x = col(0, 1, 10)
    mean = [11 / 3]
    np.testing.assert_allclose(ref.geometric_median(x, iterations=1, start=mean), [1089 / 449], rtol=1e-12)
    np.testing.assert_allclose(ref.geometric_median(x, iterations=0, start=mean), [11 / 3], rtol=1e-12)
    # the default start: the medoid is 1 (distance sums 11, 10, 19); with f = 1 the mean of the n - f = 2 rows
    # closest to it (1 and 0) is 0.5
    np.testing.assert_allclose(ref.geometric_median(x, 1, iterations=0), [0.5], rtol=1e-12)
    # many steps: the geometric median of collinear points is their median
    np.testing.assert_allclose(ref.geometric_median(x, iterations=200, start=mean), [1.0], atol=1e-5)
    # a non-finite row gets weight 0
    np.testing.assert_allclose(ref.geometric_median(col(0, 1, np.nan, 10), iterations=1, start=mean),
                               [1089 / 449])


def test_ref_geometric_median_minimises_the_sum_of_distances() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 3))
    z = ref.geometric_median(x, iterations=500, nu=1e-12)

    def cost(p: np.ndarray) -> float:
        return float(np.linalg.norm(x - p, axis=1).sum())

    for _ in range(50):
        assert cost(z) <= cost(z + rng.normal(scale=1e-3, size=3)) + 1e-12
    assert cost(z) <= min(cost(r) for r in x)


def test_ref_centered_clipping_by_hand() -> None:
    x = col(0, 1, 10)
    # from v0 = 0, tau = 2: clipped differences 0, 1, 2 -> v1 = 1
    np.testing.assert_allclose(ref.centered_clipping(x, tau=2.0, iterations=1, center="zero"), [1.0])
    # from v1 = 1: differences -1, 0, 9 -> -1, 0, 2 -> v2 = 1 + 1/3
    np.testing.assert_allclose(ref.centered_clipping(x, tau=2.0, iterations=2, center="zero"), [4 / 3])
    np.testing.assert_allclose(ref.centered_clipping(x, tau=2.0, iterations=1, center=[1.0]), [4 / 3])
    # the default centre is the coordinate-wise median (1 here): the same step as from v1
    np.testing.assert_allclose(ref.centered_clipping(x, tau=2.0), [4 / 3])
    # a huge tau: one step from any center is the average
    np.testing.assert_allclose(ref.centered_clipping(x, tau=1e9, iterations=1, center=[5.0]), [11 / 3])
    # a non-finite row contributes nothing: (0 + 1 + 2 + 0) / 4
    np.testing.assert_allclose(ref.centered_clipping(col(0, 1, 10, np.nan), tau=2.0, center="zero"), [0.75])


def test_ref_nnm_by_hand() -> None:
    # x = 0, 1, 3, 10; f = 1: each row -> mean of its 3 nearest rows, itself included
    #   0 -> {0, 1, 3}; 1 -> {1, 0, 3}; 3 -> {3, 1, 0}; 10 -> {10, 3, 1}
    np.testing.assert_allclose(ref.nnm(col(0, 1, 3, 10), 1), col(4 / 3, 4 / 3, 4 / 3, 14 / 3), rtol=1e-12)
    out = ref.nnm(col(0, 1, np.inf, 3), 1)
    np.testing.assert_allclose(out[[0, 1, 3]], col(4 / 3, 4 / 3, 4 / 3), rtol=1e-12)
    assert np.isnan(out[2, 0])


def test_ref_bucketing_by_hand() -> None:
    x = col(0, 10, 20, 30, 40)
    # permutation 1, 0, 2, 3, 4 and s = 2: buckets {10, 0}, {20, 30}, {40}
    np.testing.assert_array_equal(ref.bucketing(x, s=2, permutation=[1, 0, 2, 3, 4]), col(5, 25, 40))
    np.testing.assert_array_equal(ref.bucketing(x, s=5, permutation=[4, 3, 2, 1, 0]), col(20))
    a = ref.bucketing(x, s=2, seed=3)
    b = ref.bucketing(x, s=2, seed=3)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        ref.bucketing(x, s=2, permutation=[0, 0, 1, 2, 3])


def test_ref_clipping_and_arc_by_hand() -> None:
    np.testing.assert_allclose(ref.clipping(np.array([[3.0, 4.0], [0.3, 0.4]]), c=1.0), [[0.6, 0.8], [0.3, 0.4]])
    # ARC, n = 5, f = 1: k = floor(2 * 1/5 * 4) = 1; norms 1, 2, 3, 10, 0.5 -> C = the 2nd largest = 3
    np.testing.assert_array_equal(ref.arc(col(1, -2, 3, -10, 0.5), 1), col(1, -2, 3, -3, 0.5))
    # f = 0: k = 0, C = the largest norm: nothing changes
    np.testing.assert_array_equal(ref.arc(col(1, -2, 3, -10, 0.5), 0), col(1, -2, 3, -10, 0.5))
    # n = 7, f = 2: k = floor(4 * 5 / 7) = 2 -> C = the 3rd largest norm (5); +inf has the largest norm
    out = ref.arc(col(1, np.inf, 5, -7, 2, 3, 4), 2)
    np.testing.assert_array_equal(np.delete(out, 1, axis=0), col(1, 5, -5, 2, 3, 4))
    assert np.isnan(out[1, 0])


def test_ref_compose() -> None:
    x = col(0, 10, 20, 30, 40)
    out = ref.compose("average", x, 1, pre=[{"name": "bucketing", "s": 2, "permutation": [1, 0, 2, 3, 4]}])
    np.testing.assert_array_equal(out, [(5 + 25 + 40) / 3])


def test_ref_bulyan_iterates_krum_on_the_remaining_set() -> None:
    # x = 21, 2, 19, -10, -3, 18, -23; n = 7, f = 1. One-shot Krum scores (k = 4):
    #   950, 714, 778, 1146, 915, 707, 2875 -> a one-shot ranking would keep indices 5, 1, 2, 4, 0.
    # Iterated Krum: |R|=7 -> 5 (18, score 707); |R|=6, k=3 on {21, 2, 19, -10, -3, -23}:
    #   941, 458, 777, 362, 474, 1194 -> 3 (-10); |R|=5, k=2 on {21, 2, 19, -3, -23}: 365, 314, 293, 425,
    #   1025 -> 2 (19); |R|=4, k=1 on {21, 2, -3, -23}: 361, 25, 25, 400 -> 1 (2, lowest index);
    #   |R|=3, k=0 -> 0 (21).
    x = col(21, 2, 19, -10, -3, 18, -23)
    np.testing.assert_array_equal(ref.krum_scores(x, 1), [950, 714, 778, 1146, 915, 707, 2875])
    assert ref.bulyan_selection(x, 1) == [5, 3, 2, 1, 0]
    # selection 18, -10, 19, 2, 21: median 18, the 3 closest are 18, 19, 21
    np.testing.assert_allclose(ref.bulyan(x, 1), [58 / 3], rtol=1e-12)


def test_ref_trimmed_mean_with_b() -> None:
    # b = 2 > f = 1: (3 + 10 + 2) -> drop 1, 2 and 100, 50 -> (3 + 10 + 20) / 3
    np.testing.assert_array_equal(ref.trimmed_mean(col(1, 2, 3, 10, 20, 50, 100), 1, b=2), [11.0])


# ================================================================================== the registry
def test_every_registered_rule_has_a_reference() -> None:
    missing = [n for n in REGISTERED if n not in ref.REFERENCES and n not in NO_REFERENCE]
    assert not missing, f"registered rules without a reference in aggregathor.gars.reference: {missing}"
    missing = [n for n in REGISTERED_WRAPPERS if n not in ref.WRAPPERS and n not in NO_REFERENCE]
    assert not missing, f"registered wrappers without a reference in aggregathor.gars.reference: {missing}"


def test_every_rule_of_the_design_is_registered() -> None:
    missing = [n for n in EXPECTED_RULES if n not in REGISTERED]
    missing += [n for n in EXPECTED_WRAPPERS if n not in REGISTERED_WRAPPERS]
    assert not missing, f"rules/wrappers not registered (yet): {missing}; registered: {REGISTERED}"


# The (n, f) bounds of the papers. None: no bound to check beyond f < n.
PAPER_BOUNDS: dict[str, Callable[[int, int], bool] | None] = {
    "average": None,
    "average-nan": lambda n, f: n > f,
    "median": lambda n, f: n >= 2 * f + 1,  # Yin et al. 2018: alpha < 1/2
    "meamed": lambda n, f: n >= 2 * f + 1,  # Xie et al. 2018
    "trimmed-mean": lambda n, f: n >= 2 * f + 1,  # Yin et al. 2018, beta = f/n < 1/2
    "krum": lambda n, f: n >= 2 * f + 3,  # Blanchard et al. 2017: 2f + 2 < n
    "multi-krum": lambda n, f: n >= 2 * f + 3,
    "bulyan": lambda n, f: n >= 4 * f + 3,  # El Mhamdi et al. 2018
    "geometric-median": None,
    "centered-clipping": None,
    "draco": lambda n, f: n % (2 * f + 1) == 0,  # Chen et al. 2018: groups of r = 2f + 1
}


@pytest.mark.parametrize("name", RULES)
def test_bounds_match_the_papers(name: str) -> None:
    bound = PAPER_BOUNDS.get(name)
    if bound is None:
        pytest.skip(f"{name}: no hard (n, f) bound in the paper")
    wrong = []
    for n in range(1, N_MAX + 1):
        for f in range(0, n):
            try:
                gars.get(name, n, f)
                accepted = True
            except ValueError:
                accepted = False
            if accepted != bound(n, f):
                wrong.append((n, f, accepted))
    assert not wrong, f"{name}: (n, f, accepted) disagreeing with the paper's bound: {wrong[:10]}"


# ================================================================================ input generation
def _valid_nf(name: str) -> list[tuple[int, int]]:
    out = []
    for n in range(1, N_MAX + 1):
        for f in range(0, n):
            try:
                gars.get(name, n, f)
            except ValueError:
                continue
            out.append((n, f))
    return out


@functools.cache
def config_pool(name: str) -> list[tuple[int, int, int, str, tuple[tuple[str, Any], ...]]]:
    """A fixed pool of (n, f, d, dtype, params) for ``name``: the bound's corners and random configurations.

    Deterministic per rule name, so that compiled functions are reused across examples and runs (a new
    (n, f, d, dtype) or a new parameter value means a new XLA compilation, 0.2-6 s each).
    """
    valid = _valid_nf(name)
    assert valid, f"{name} accepts no (n, f) with n <= {N_MAX}"
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    smallest = min(valid)
    f_max_small = max((nf for nf in valid if nf[0] <= 12), key=lambda nf: (nf[1], -nf[0]), default=smallest)
    largest = max(valid, key=lambda nf: (nf[0], nf[1]))
    pool = [
        (*smallest, 1, "float32", ()),
        (*f_max_small, int(rng.integers(2, 9)), "float32", random_params(name, *f_max_small, 8, rng)),
        (*largest, D_MAX, "float32", ()),
    ]
    for dtype in ("float64", "float32"):
        n, f = valid[int(rng.integers(len(valid)))]
        d = int(rng.integers(1, D_MAX + 1))
        pool.append((n, f, d, dtype, random_params(name, n, f, d, rng)))
    return list(dict.fromkeys(pool))


def random_params(name: str, n: int, f: int, d: int, rng: np.random.Generator) -> tuple[tuple[str, Any], ...]:
    """Non-default parameters of ``name`` for (n, f, d), as a hashable tuple of items."""
    params: dict[str, Any] = {}
    if name == "trimmed-mean":
        params = {"b": int(rng.integers(f, (n - 1) // 2 + 1))}
    elif name == "multi-krum":
        params = {"m": int(rng.integers(1, n - f - 1))}
    elif name == "bulyan":
        params = {"variant": str(rng.choice(["krum", "multi-krum"]))}
    elif name == "geometric-median":
        params = {"iterations": int(rng.integers(0, 13)), "nu": float(rng.choice([1e-6, 1e-3, 0.1]))}
    elif name == "centered-clipping":
        center = str(rng.choice(["median", "zero", "array"]))
        params = {
            "tau": float(rng.choice([0.1, 1.0, 10.0, 1e3])),
            "iterations": int(rng.integers(1, 4)),
            "center": tuple(np.linspace(-1.0, 1.0, d)) if center == "array" else center,
        }
    return tuple(params.items())


KINDS = ("normal", "offset", "integers", "duplicates", "heavy")
OUTLIERS = ("far", "colluding", "just-outside", "opposite")
NONFINITE = ("nan-row", "inf-row", "-inf-row", "one-nan", "mixed")


def _honest(rng: np.random.Generator, kind: str, n: int, d: int) -> np.ndarray:
    if kind == "normal":
        return rng.normal(size=(n, d)) * 10.0 ** rng.uniform(-3, 3)
    if kind == "offset":  # close rows around a shared gradient: the Gram-shortcut pitfall of the NOTES
        return rng.normal(size=d) * 10.0 ** rng.uniform(0, 2.5) + 1e-3 * rng.normal(size=(n, d))
    if kind == "integers":  # many exact ties
        return rng.integers(-3, 4, size=(n, d)).astype(np.float64)
    if kind == "duplicates":
        base = rng.normal(size=(int(rng.integers(1, n + 1)), d))
        return base[rng.integers(0, len(base), size=n)]
    return rng.standard_cauchy(size=(n, d))


def draw_matrix(data: st.DataObject, n: int, f: int, d: int, dtype: str, nonfinite: bool) -> np.ndarray:
    """An (n, d) matrix of ``dtype``: honest rows of some kind, up to f outliers, up to f non-finite rows."""
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    x = _honest(rng, kind, n, d)
    n_out = data.draw(st.integers(0, f), label="outliers")
    if n_out:
        how = data.draw(st.sampled_from(OUTLIERS), label="outlier kind")
        rows = rng.choice(n, size=n_out, replace=False)
        lo, hi = x.min(axis=0), x.max(axis=0)
        width = np.maximum(hi - lo, 1e-3)
        if how == "far":
            x[rows] = 1e6 * rng.choice([-1.0, 1.0], size=(n_out, d))
        elif how == "colluding":
            x[rows] = hi + 10 * width
        elif how == "just-outside":
            x[rows] = hi + 0.05 * width
        else:
            x[rows] = -10 * x.mean(axis=0)
    if nonfinite:
        n_bad = data.draw(st.integers(0, f), label="non-finite rows")
        if n_bad:
            how = data.draw(st.sampled_from(NONFINITE), label="non-finite kind")
            rows = rng.choice(n, size=n_bad, replace=False)
            for r in rows:
                if how == "nan-row":
                    x[r] = np.nan
                elif how == "inf-row":
                    x[r] = np.inf
                elif how == "-inf-row":
                    x[r] = -np.inf
                elif how == "one-nan":
                    x[r, rng.integers(d)] = np.nan
                else:
                    x[r] = rng.choice([np.nan, np.inf, -np.inf, 1.0], size=d)
    note(f"kind={kind} outliers={n_out}")
    return x.astype(dtype)


# ================================================================================ admissible answers
def _event(what: str) -> None:
    """``hypothesis.event`` that also works outside a test (when a checker is called by hand)."""
    try:
        event(what)
    except Exception:  # noqa: BLE001 - InvalidArgument outside a test
        pass


def _eps(dtype: str) -> float:
    return float(np.finfo(np.dtype(dtype)).eps)


def _assert_close(name: str, out: np.ndarray, expect: np.ndarray, tol: np.ndarray | float) -> None:
    tol = np.broadcast_to(np.asarray(tol, dtype=np.float64), expect.shape)
    with np.errstate(invalid="ignore"):  # inf - inf where both are the same infinity
        same = (out == expect) | (np.isnan(out) & np.isnan(expect)) | (np.abs(out - expect) <= tol)
    if not np.all(same):
        bad = np.flatnonzero(~same)[:8]
        raise AssertionError(
            f"{name}: coordinates {bad.tolist()}: got {out[bad].tolist()}, reference {expect[bad].tolist()}, "
            f"tolerance {tol[bad].tolist()}"
        )


def _assert_within(name: str, out: np.ndarray, rows: np.ndarray, eps: float) -> None:
    """Each coordinate of ``out`` within the range of ``rows`` (up to the rounding of a mean of them)."""
    lo, hi = rows.min(axis=0), rows.max(axis=0)
    tol = 4 * len(rows) * eps * np.maximum(np.abs(lo), np.abs(hi))
    bad = np.flatnonzero(~((out >= lo - tol) & (out <= hi + tol)))
    assert not len(bad), f"{name}: coordinates {bad[:8].tolist()} outside the rows' range: {out[bad[:8]].tolist()}"


def _sorted_nan_last(col: np.ndarray) -> np.ndarray:
    return np.sort(np.where(np.isnan(col), np.inf, col))


def check_average(x: np.ndarray, f: int, out: np.ndarray, eps: float, **params: Any) -> None:
    _assert_close("average", out, ref.average(x, f), 4 * eps * np.abs(x).sum(axis=0))


def check_average_nan(x: np.ndarray, f: int, out: np.ndarray, eps: float, **params: Any) -> None:
    scale = np.where(np.isfinite(x), np.abs(x), 0.0).sum(axis=0)
    _assert_close("average-nan", out, ref.average_nan(x, f), 4 * eps * scale)


def check_median(x: np.ndarray, f: int, out: np.ndarray, eps: float, **params: Any) -> None:
    tol = np.empty(x.shape[1])
    for j in range(x.shape[1]):
        v = np.sort(x[np.isfinite(x[:, j]), j])
        k = len(v)
        tol[j] = 2 * eps * (abs(v[(k - 1) // 2]) + abs(v[k // 2])) if k else 0.0
    _assert_close("median", out, ref.median(x, f), tol)


def check_trimmed_mean(x: np.ndarray, f: int, out: np.ndarray, eps: float, b: int | None = None) -> None:
    n = x.shape[0]
    b = f if b is None else b
    tol = np.array([4 * eps * np.abs(_sorted_nan_last(x[:, j])[b : n - b]).sum() for j in range(x.shape[1])])
    _assert_close("trimmed-mean", out, ref.trimmed_mean(x, f, b=b), tol)


def window_means(col: np.ndarray, count: int, eps: float) -> tuple[list[float], float]:
    """Every admissible mean of ``count`` values of ``col`` closest to the median of its finite values.

    Values whose distance to the median equals the ``count``-th smallest distance, up to the rounding of
    that distance, are interchangeable; the tie band is split into the values below and above the median.
    Returns the admissible means and the tolerance of one of them.
    """
    fin = np.isfinite(col)
    med = ref.median(col[fin].reshape(-1, 1))[0]
    dist = np.where(fin, np.abs(col - med), np.inf)
    tie = np.where(fin, 4 * eps * (np.abs(col) + abs(med)), 0.0)
    order = np.argsort(dist, kind="stable")
    edge = order[count - 1]
    big, slack = dist[edge], tie[edge]
    must = dist + tie < big - slack
    band = ~must & (dist - tie <= big + slack)
    r = count - int(must.sum())
    low = sorted((i for i in np.flatnonzero(band) if col[i] < med), key=lambda i: dist[i])
    high = sorted((i for i in np.flatnonzero(band) if col[i] >= med), key=lambda i: dist[i])
    base = col[must].sum()
    means = [
        (base + col[low[:a]].sum() + col[high[: r - a]].sum()) / count
        for a in range(max(0, r - len(high)), min(r, len(low)) + 1)
    ]
    tol = 4 * eps * (np.abs(col[must]).sum() + np.abs(col[band]).sum()) + 2 * tie[band].sum() / count
    return means, tol


def _check_window(name: str, sel: np.ndarray, count: int, out: np.ndarray, eps: float) -> str | None:
    """None when every coordinate of ``out`` is an admissible window mean of ``sel``; else why not."""
    for j in range(sel.shape[1]):
        means, tol = window_means(sel[:, j], count, eps)
        gaps = [abs(out[j] - m) for m in means]
        if not gaps or not min(gaps) <= tol:
            return f"{name}: coordinate {j}: got {out[j]!r}, admissible {means} (tolerance {tol:.3g})"
    return None


def check_meamed(x: np.ndarray, f: int, out: np.ndarray, eps: float, **params: Any) -> None:
    why = _check_window("meamed", x, x.shape[0] - f, out, eps)
    assert why is None, why
    # and the reference's own tie-break is one of them
    assert _check_window("meamed", x, x.shape[0] - f, ref.meamed(x, f), eps) is None


class Scores:
    """Krum scores with their float error bounds, for any subset of the rows."""

    def __init__(self, x: np.ndarray, f: int, eps: float) -> None:
        self.x, self.f = x, f
        self.dist = ref.pairwise_sq_distances(x)
        center = ref.median(x)
        ok = np.all(np.isfinite(x), axis=1)
        r = np.where(ok, np.nansum((np.where(ok[:, None], x, 0.0) - center) ** 2, axis=1), np.inf)
        d = x.shape[1]
        # error bound of one squared distance computed in the rule's dtype, after centring on the median
        # (0 for a non-finite row: its distances are +inf exactly, on both sides)
        pair = r[:, None] + r[None, :]
        self.derr = np.where(np.isfinite(pair), 8 * (d + 4) * eps * np.where(np.isfinite(pair), pair, 0.0), 0.0)
        self.eps = eps

    def on(self, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Scores (n - f - 2 neighbours within ``rows``) of ``rows``, and their error bounds."""
        k = max(0, len(rows) - self.f - 2)
        s = np.full(len(rows), np.inf)
        err = np.zeros(len(rows))
        for a, i in enumerate(rows):
            if not np.isfinite(self.dist[i, i]):
                continue
            others = sorted((self.dist[i, j], self.derr[i, j]) for j in rows if j != i)
            s[a] = sum(v for v, _ in others[:k])
            err[a] = sum(e for _, e in others[: k + 1]) + 2 * k * self.eps * s[a]
        return s, err


def check_krum(x: np.ndarray, f: int, out: np.ndarray, eps: float, **params: Any) -> None:
    s, err = Scores(x, f, eps).on(list(range(x.shape[0])))
    best = np.min(s + err)
    admissible = [i for i in range(len(s)) if s[i] - err[i] <= best]
    for i in admissible:
        if np.all(np.abs(out - x[i]) <= 2 * eps * np.abs(x[i])):
            return
    raise AssertionError(
        f"krum: output is none of the admissible rows {admissible} (scores {s.tolist()}, min row "
        f"{int(np.argmin(s))}); got {out.tolist()[:6]}"
    )


def _selections(lo: np.ndarray, hi: np.ndarray, m: int, rows: np.ndarray, limit: int = 20000) -> list[list[int]] | None:
    """Every set of m indices that the scores ``[lo, hi]`` allow as "the m smallest"; None past ``limit``.

    A set T is admissible when no row outside T is surely better than a row in T (``hi_out < lo_in``).
    Identical rows are interchangeable, so they are grouped (only how many of each group is chosen matters).
    """
    n = len(lo)
    must = [i for i in range(n) if sum(1 for j in range(n) if j != i and lo[j] <= hi[i]) < m]
    never = [i for i in range(n) if sum(1 for j in range(n) if j != i and hi[j] < lo[i]) >= m]
    band = [i for i in range(n) if i not in must and i not in never]
    r = m - len(must)
    groups: dict[bytes, list[int]] = {}
    for i in band:
        groups.setdefault(rows[i].tobytes() + np.float64(lo[i]).tobytes(), []).append(i)
    members = list(groups.values())
    if math.prod(len(g) + 1 for g in members) > limit:
        return None
    out = []
    for counts in itertools.product(*(range(len(g) + 1) for g in members)):
        if sum(counts) != r:
            continue
        chosen = must + [i for g, c in zip(members, counts, strict=True) for i in g[:c]]
        rest = [i for i in range(n) if i not in chosen]
        if all(not hi[j] < lo[i] for i in chosen for j in rest):
            out.append(chosen)
    return out


def check_multi_krum(x: np.ndarray, f: int, out: np.ndarray, eps: float, m: int | None = None) -> None:
    n = x.shape[0]
    m = n - f - 2 if m is None else m
    s, err = Scores(x, f, eps).on(list(range(n)))
    sets = _selections(s - err, s + err, m, x)
    if sets is None:  # too many ties to enumerate: the weaker necessary condition only
        _event("multi-krum: too many ties, bounds only")
        _assert_within("multi-krum", out, x[np.isfinite(s)], eps)
        return
    for chosen in sets:
        sel = x[chosen]
        # a mean of m values is within (m - 1) eps/2 * sum|values| / m < eps * sum|values| of the exact one
        if np.all(np.abs(out - sel.mean(axis=0)) <= 4 * eps * np.abs(sel).sum(axis=0)):
            return
    raise AssertionError(
        f"multi-krum (m={m}): output matches none of the {len(sets)} admissible selections, e.g. "
        f"{sets[0]} (scores {s.tolist()}); got {out.tolist()[:6]}, expected {x[sets[0]].mean(axis=0).tolist()[:6]}"
    )


def bulyan_selections(x: np.ndarray, f: int, eps: float, limit: int = 2000) -> list[list[int]] | None:
    """Every selection set iterated Krum can produce up to score ties (as index lists); None past ``limit``.

    The future of the iteration depends only on the multiset of the selected rows, so states are merged
    by it.
    """
    n = x.shape[0]
    sc = Scores(x, f, eps)
    states: dict[bytes, list[int]] = {b"": []}
    for _ in range(n - 2 * f):
        nxt: dict[bytes, list[int]] = {}
        for chosen in states.values():
            rest = [i for i in range(n) if i not in chosen]
            s, err = sc.on(rest)
            best = np.min(s + err)
            for a, i in enumerate(rest):
                if s[a] - err[a] <= best:
                    new = chosen + [i]
                    key = b"".join(sorted(x[j].tobytes() for j in new))
                    nxt.setdefault(key, new)
        states = nxt
        if len(states) > limit:
            return None
    return list(states.values())


def check_bulyan(x: np.ndarray, f: int, out: np.ndarray, eps: float, variant: str = "krum") -> None:
    if variant == "multi-krum":
        check_bulyan_aggregathor(x, f, out, eps)
        return
    n = x.shape[0]
    beta = n - 4 * f
    sets = bulyan_selections(x, f, eps)
    if sets is None:
        _event("bulyan: too many ties, bounds only")
        _assert_within("bulyan", out, x[np.all(np.isfinite(x), axis=1)], eps)
        return
    whys = []
    for chosen in sets:
        why = _check_window("bulyan", x[chosen], beta, out, eps)
        if why is None:
            return
        whys.append(f"selection {sorted(chosen)}: {why}")
    raise AssertionError(f"bulyan: no admissible selection fits ({len(sets)} tried): {whys[:3]}")


def check_bulyan_aggregathor(x: np.ndarray, f: int, out: np.ndarray, eps: float) -> None:
    """The AggregaThor variant: compared with the reference when no decision is a near tie (else skipped:
    its tie-breaks chain through neighbour sets, rankings and the per-coordinate cut)."""
    trace: dict[str, Any] = {}
    expect = ref.bulyan_aggregathor(x, f, trace)
    near = 64 * (x.shape[1] + 4) * eps
    # Exact ties among small integers are exact in the rule's float32 Gram too and broken the same way
    # (lowest index, smaller value). Otherwise a tie (duplicated rows included: which duplicate is kept
    # among a row's neighbours changes the later scores) may go either way by one ulp of the Gram.
    fin = x[np.isfinite(x)]
    exact = bool(np.all(fin == np.round(fin)) and np.all(np.abs(fin) <= 64))
    if any((0 < gap or not exact) and gap <= near * scale for gap, scale in trace["gaps"]):
        _event("bulyan multi-krum variant: near tie, not compared")
        return
    used = sorted({i for r in trace["rounds"] for i in r})
    tol = 4 * eps * np.abs(x[used]).sum(axis=0)  # each round is a mean of some of these rows
    _assert_close("bulyan(variant=multi-krum)", out, expect, tol)


def check_geometric_median(x: np.ndarray, f: int, out: np.ndarray, eps: float, **params: Any) -> None:
    expect = ref.geometric_median(x, f, **params)
    # error bound: each Weiszfeld step is a weighted mean; its rounding error is eps times the weighted mean
    # of |x|; errors carried from earlier iterates are contracted by the step (sum them as a bound).
    ok = np.all(np.isfinite(x), axis=1)
    rows = x[ok]
    nu = params.get("nu", 1e-6)
    iterations = params.get("iterations", 3)
    scale = np.abs(rows).mean(axis=0)
    for t in range(iterations):
        z = ref.geometric_median(x, f, **{**params, "iterations": t})
        w = 1.0 / np.maximum(nu, np.linalg.norm(rows - z, axis=1))
        scale = scale + (w[:, None] * np.abs(rows)).sum(axis=0) / w.sum()
    _assert_close("geometric-median", out, expect, 64 * eps * scale.max())


def check_centered_clipping(x: np.ndarray, f: int, out: np.ndarray, eps: float, **params: Any) -> None:
    expect = ref.centered_clipping(x, f, **params)
    tau = params.get("tau", 10.0)
    iterations = params.get("iterations", 1)
    rows = x[np.all(np.isfinite(x), axis=1)]
    # error bound: v_L = v_0 + sum of the clipped steps, each a sum of n terms of norm <= min(tau, |x_i - v_l|)
    scale = 0.0
    for t in range(iterations + 1):
        v = ref.centered_clipping(x, f, **{**params, "iterations": t})
        scale += np.abs(v).max()
        if t < iterations:
            scale += np.minimum(tau, np.linalg.norm(rows - v, axis=1)).sum()
    _assert_close("centered-clipping", out, expect, 16 * eps * scale)


def check_draco(x: np.ndarray, f: int, out: np.ndarray, eps: float, **params: Any) -> None:
    r = 2 * f + 1
    groups = x.reshape(-1, r, x.shape[1])
    scale = np.where(np.isfinite(groups), np.abs(groups), 0.0).max(axis=1).sum(axis=0) / len(groups)
    _assert_close("draco", out, ref.draco(x, f), 4 * eps * scale)


CHECKERS: dict[str, Callable[..., None]] = {
    "average": check_average,
    "average-nan": check_average_nan,
    "median": check_median,
    "meamed": check_meamed,
    "trimmed-mean": check_trimmed_mean,
    "krum": check_krum,
    "multi-krum": check_multi_krum,
    "bulyan": check_bulyan,
    "geometric-median": check_geometric_median,
    "centered-clipping": check_centered_clipping,
    "draco": check_draco,
}


# ======================================================================================= the rules
_RULE_CACHE: dict[tuple[Any, ...], gars.GAR] = {}


def built(name: str, n: int, f: int, pre: tuple[Any, ...] = (), **params: Any) -> gars.GAR:
    """``gars.get(...)``, cached so that its compiled functions are reused across examples."""
    key = (name, n, f, repr(pre), tuple(sorted((k, repr(v)) for k, v in params.items())))
    rule = _RULE_CACHE.get(key)
    if rule is None:
        rule = _RULE_CACHE[key] = gars.get(name, n, f, pre=list(pre), **params)
    return rule


@pytest.mark.parametrize("name", RULES)
@SETTINGS
@given(data=st.data())
def test_rule_matches_reference(name: str, data: st.DataObject) -> None:
    n, f, d, dtype, items = data.draw(st.sampled_from(config_pool(name)), label="n, f, d, dtype, params")
    params = {k: np.array(v) if isinstance(v, tuple) else v for k, v in items}
    rule = built(name, n, f, **params)
    eps = _eps(dtype)
    for _ in range(MATRICES_PER_EXAMPLE):
        x = draw_matrix(data, n, f, d, dtype, nonfinite=type(rule).nan_robust)
        out = np.asarray(rule(x), dtype=np.float64)
        assert out.shape == (d,), f"{name}: output shape {out.shape}, expected ({d},)"
        assert str(np.asarray(rule(x)).dtype) == dtype, f"{name}: output dtype differs from input {dtype}"
        x64 = x.astype(np.float64)
        assert np.all(np.isfinite(out)), f"{name}: non-finite output {out.tolist()[:8]}"
        CHECKERS[name](x64, f, out, eps, **params)


def test_checkers_cover_the_references() -> None:
    assert set(CHECKERS) == set(ref.REFERENCES)


# ==================================================================================== the wrappers
def _wrapper_params(wrapper: str, rng: np.random.Generator) -> dict[str, Any]:
    if wrapper == "bucketing":
        return {"s": int(rng.integers(1, 4))}
    if wrapper == "clipping":
        return {"c": float(rng.choice([0.1, 1.0, 10.0]))}
    return {}


@functools.cache
def wrapper_pool(wrapper: str) -> list[tuple[str, int, int, int, str, tuple[tuple[str, Any], ...]]]:
    """A fixed pool of (rule, n, f, d, dtype, wrapper params) for ``wrapper``: every rule in turn, random shapes."""
    rng = np.random.default_rng(zlib.crc32(wrapper.encode()))
    start = EXPECTED_WRAPPERS.index(wrapper) if wrapper in EXPECTED_WRAPPERS else 0
    pool = []
    for k in range(4):
        inner = RULES[(3 * start + k) % len(RULES)]
        params = _wrapper_params(wrapper, rng)
        valid = []
        for n in range(1, N_MAX + 1):
            for f in range(n):
                try:
                    gars.get(inner, n, f, pre=[{"name": wrapper, **params}])
                except ValueError:
                    continue
                valid.append((n, f))
        if not valid:
            continue
        n, f = valid[int(rng.integers(len(valid)))]
        if wrapper == "bucketing":
            params["permutation"] = tuple(int(p) for p in rng.permutation(n))
        d = int(rng.integers(1, D_MAX + 1))
        pool.append((inner, n, f, d, str(rng.choice(["float32", "float64"])), tuple(params.items())))
    return pool


@pytest.mark.parametrize("wrapper", WRAPPERS)
@settings(SETTINGS, max_examples=6)
@given(data=st.data())
def test_wrapper_then_rule_matches_reference(wrapper: str, data: st.DataObject) -> None:
    """Two stages, each against its reference: the wrapper's rows (every admissible NNM neighbour set
    accepted), then the rule on exactly the rows the wrapper produced."""
    inner, n, f, d, dtype, items = data.draw(st.sampled_from(wrapper_pool(wrapper)), label="configuration")
    params = dict(items)
    rule = built(inner, n, f, pre=({"name": wrapper, **params},))
    stage = rule.wrappers[0]
    eps = _eps(dtype)
    for _ in range(MATRICES_PER_EXAMPLE):
        x = draw_matrix(data, n, f, d, dtype, nonfinite=type(rule).nan_robust)
        out = np.asarray(rule(x), dtype=np.float64)
        assert out.shape == (d,)
        assert np.all(np.isfinite(out)), f"{wrapper} -> {inner}: non-finite output {out.tolist()[:8]}"
        x64 = x.astype(np.float64)
        mixed = np.asarray(stage(x), dtype=np.float64)
        check_wrapper(wrapper, x64, f, mixed, eps, params)
        # the composition may fuse the wrapper into the rule's XLA cluster, which can round the rows the
        # rule sees differently by an ulp: twice the rounding unit for the rule's checks
        CHECKERS[inner](mixed, f, out, 2 * eps)


def check_wrapper(wrapper: str, x: np.ndarray, f: int, mixed: np.ndarray, eps: float, params: dict[str, Any]) -> None:
    """The rows a wrapper produced against its reference (NNM: against every admissible neighbour set)."""
    expect = ref.WRAPPERS[wrapper](x, f, **params)
    assert mixed.shape == expect.shape, f"{wrapper}: output shape {mixed.shape}, reference {expect.shape}"
    finite = np.where(np.isfinite(x), np.abs(x), 0.0)
    if wrapper == "bucketing":  # a mean of at most s rows
        tol = 4 * eps * params.get("s", 2) * ref.bucketing(finite, f, **params)
        _assert_close(wrapper, mixed.ravel(), expect.ravel(), tol.ravel())
        return
    if wrapper != "nnm":  # x_ij times a scale computed in float64: two roundings
        _assert_close(wrapper, mixed.ravel(), expect.ravel(), (4 * eps * finite).ravel())
        return
    n = x.shape[0]
    k = n - f
    sc = Scores(x, f, eps)
    for i in range(n):
        if not np.isfinite(sc.dist[i, i]):
            assert np.all(np.isnan(mixed[i])), f"nnm: non-finite row {i} should become NaN, got {mixed[i][:6]}"
            continue
        err = sc.derr[i].copy()
        err[i] = 0.0  # a row's distance to itself is exactly 0 on both sides
        sets = _selections(sc.dist[i] - err, sc.dist[i] + err, k, x)
        if sets is None:
            _event("nnm: too many tied neighbour sets, bounds only")
            _assert_within("nnm", mixed[i], x[np.all(np.isfinite(x), axis=1)], eps)
            continue
        for chosen in sets:
            if np.all(np.abs(mixed[i] - x[chosen].mean(axis=0)) <= 4 * eps * np.abs(x[chosen]).sum(axis=0)):
                break
        else:
            raise AssertionError(
                f"nnm: row {i} is the mean of none of the admissible neighbour sets, e.g. {sets[0]}: "
                f"got {mixed[i][:6].tolist()}, expected {x[sets[0]].mean(axis=0)[:6].tolist()}"
            )


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_wrapper_alone_matches_reference(wrapper: str) -> None:
    """The wrapper's output rows themselves, on tie-free data with up to f non-finite rows."""
    rng = np.random.default_rng(11)
    n, f, d = 9, 3, 7
    params: dict[str, Any] = {"bucketing": {"s": 2, "permutation": list(rng.permutation(n))}, "clipping": {"c": 1.0}}
    params = params.get(wrapper, {})
    stage = gars.get("average", n, f, pre=[{"name": wrapper, **params}]).wrappers[0]
    for trial in range(4):
        x = rng.normal(size=(n, d)) * 10.0 ** (trial - 1)
        x[rng.choice(n, size=trial % (f + 1), replace=False)] = [np.nan, np.inf, -np.inf][trial % 3]
        x = x.astype(np.float32)
        out = np.asarray(stage(x), dtype=np.float64)
        expect = ref.WRAPPERS[wrapper](x.astype(np.float64), f, **params)
        assert out.shape == expect.shape
        tol = 4 * n * _eps("float32") * np.nan_to_num(np.abs(x).astype(np.float64), posinf=0.0).max()
        _assert_close(wrapper, out.ravel(), expect.ravel(), tol)


@pytest.mark.skipif("bucketing" not in WRAPPERS, reason="bucketing not registered")
def test_seeded_bucketing_is_a_bucketing_and_reproducible() -> None:
    n, f, d = 5, 1, 3
    x = np.random.default_rng(2).normal(size=(n, d)).astype(np.float32)
    outputs = {
        tuple(np.round(ref.bucketing(x.astype(np.float64), s=2, permutation=p), 5).ravel())
        for p in itertools.permutations(range(n))
    }
    first = gw.Bucketing(n, f, s=2, seed=123)
    again = gw.Bucketing(n, f, s=2, seed=123)
    seen = set()
    for _ in range(10):
        a = np.asarray(first(x), dtype=np.float64)
        b = np.asarray(again(x), dtype=np.float64)
        np.testing.assert_array_equal(a, b)  # same seed, same sequence of permutations
        key = tuple(np.round(a, 5).ravel())
        assert key in outputs, f"not the bucket means of any permutation: {a}"
        seen.add(key)
    assert len(seen) > 1, "the seeded permutation never changes between calls"


@pytest.mark.skipif("centered-clipping" not in REGISTERED, reason="centered-clipping not registered")
def test_centered_clipping_previous_centre_is_the_papers_momentum() -> None:
    rng = np.random.default_rng(4)
    n, f, d = 7, 2, 5
    rule = gars.get("centered-clipping", n, f, tau=0.5, iterations=2, center="previous")
    previous = np.zeros(d)
    for _ in range(3):
        x = (1.0 + rng.normal(size=(n, d))).astype(np.float32)
        out = np.asarray(rule(x), dtype=np.float64)
        expect = ref.centered_clipping(x.astype(np.float64), f, tau=0.5, iterations=2, center=previous)
        np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5)
        previous = out
