"""Distance-based rules (Krum, Multi-Krum, Bulyan, geometric median, centered clipping), the centred blocked
Gram they share (``aggregathor.gars._distances``) and the pre-aggregation wrappers.

The references here are straightforward numpy written inline from the papers (float64, differences rather
than the Gram shortcut); the official references of ``aggregathor.gars.reference`` are tested elsewhere.
Inputs are continuous random draws (no score ties) unless a test is about ties. Small d keeps XLA compile
time, which dominates, low: shapes are drawn from a few fixed ones so that compiled functions are reused.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aggregathor.gars as gars
from aggregathor.gars import _distances, _scaling, wrappers

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_RULES: dict[str, gars.GAR] = {}


def rule_for(name: str, n: int, f: int, **kwargs: object) -> gars.GAR:
    """``gars.get``, cached: a rule's traced functions are reused across hypothesis examples."""
    key = repr((name, n, f, sorted(kwargs.items())))
    if key not in _RULES:
        _RULES[key] = gars.get(name, n, f, **kwargs)
    return _RULES[key]


# ================================================================================= inline numpy references
def np_dist(x: np.ndarray) -> np.ndarray:
    a = np.asarray(x, np.float64)
    ok = np.all(np.isfinite(a), axis=1)
    diff = a[:, None, :] - a[None, :, :]
    with np.errstate(invalid="ignore"):
        dist = np.sum(diff * diff, axis=2)
    dist[~(ok[:, None] & ok[None, :])] = np.inf
    dist[np.arange(len(a)), np.arange(len(a))] = np.where(ok, 0.0, np.inf)
    return dist


def np_scores(dist: np.ndarray, f: int, rows: list[int]) -> np.ndarray:
    k = max(0, len(rows) - f - 2)
    out = []
    for i in rows:
        if not np.isfinite(dist[i, i]):
            out.append(np.inf)
            continue
        out.append(sum(sorted(dist[i, j] for j in rows if j != i)[:k]))
    return np.array(out)


def np_krum(x: np.ndarray, f: int) -> np.ndarray:
    s = np_scores(np_dist(x), f, list(range(len(x))))
    return x[int(np.argmin(s))]


def np_multi_krum(x: np.ndarray, f: int, m: int) -> np.ndarray:
    s = np_scores(np_dist(x), f, list(range(len(x))))
    chosen = np.argsort(s, kind="stable")[:m]
    return np.asarray(x, np.float64)[chosen].mean(axis=0)


def np_bulyan_selection(x: np.ndarray, f: int) -> list[int]:
    dist = np_dist(x)
    rest, chosen = list(range(len(x))), []
    for _ in range(len(x) - 2 * f):
        s = np_scores(dist, f, rest)
        chosen.append(rest.pop(int(np.argmin(s))))
    return chosen


def np_closest_mean(col: np.ndarray, centre: float, count: int) -> float:
    vals = sorted(col, key=lambda v: (abs(v - centre), v))[:count]
    return float(np.mean(vals))


def np_bulyan(x: np.ndarray, f: int) -> np.ndarray:
    sel = np.asarray(x, np.float64)[np_bulyan_selection(x, f)]
    beta = len(x) - 4 * f
    return np.array([np_closest_mean(sel[:, j], float(np.median(sel[:, j])), beta) for j in range(sel.shape[1])])


def np_bulyan_aggregathor(x: np.ndarray, f: int) -> np.ndarray:
    """A line-by-line port of LPD-EPFL/AggregaThor native/op_bulyan/cpu.cpp (stable sorts for the ties)."""
    a = np.asarray(x, np.float64)
    n = len(a)
    t, m = n - 2 * f - 2, n - f - 2
    b = t - 2 * f
    dist = np_dist(a)
    np.fill_diagonal(dist, np.inf)
    scores = np.zeros(n)
    pruned = np.zeros((n, n))
    for i in range(n):
        near = np.argsort(dist[i], kind="stable")[:m]
        scores[i] = dist[i, near].sum()
        pruned[i, near] = dist[i, near]
    removed = np.zeros(n, bool)
    inter = []
    for k in range(t):
        key = np.where(removed, np.finfo(np.float64).max, np.where(np.isfinite(scores), scores, np.inf))
        order = np.argsort(key, kind="stable")
        inter.append(a[order[: m - k]].mean(axis=0))
        best = order[0]
        removed[best] = True
        for i in range(n):
            if i != best and np.isfinite(scores[i]):
                scores[i] -= pruned[i, best]
    inter = np.array(inter)
    out = []
    for j in range(a.shape[1]):
        col = np.sort(inter[:, j])
        out.append(np_closest_mean(col, col[t // 2], b))
    return np.array(out)


def np_geometric_median(x: np.ndarray, iterations: int, nu: float, f: int) -> np.ndarray:
    a = np.asarray(x, np.float64)
    rows = a[np.all(np.isfinite(a), axis=1)]
    dist = np.linalg.norm(rows[:, None, :] - rows[None, :, :], axis=2)
    medoid = int(np.argmin(dist.sum(axis=1)))  # the start: mean of the n - f rows closest to the medoid
    z = rows[np.argsort(dist[medoid], kind="stable")[: len(a) - f]].mean(axis=0)
    for _ in range(iterations):
        w = 1.0 / np.maximum(nu, np.linalg.norm(rows - z, axis=1))
        z = (w[:, None] * rows).sum(axis=0) / w.sum()
    return z


def np_centered_clipping(x: np.ndarray, tau: float, iterations: int, v0: np.ndarray) -> np.ndarray:
    a = np.asarray(x, np.float64)
    v = np.array(v0, np.float64)
    for _ in range(iterations):
        step = np.zeros_like(v)
        for row in a:
            if not np.all(np.isfinite(row)):
                continue
            norm = np.linalg.norm(row - v)
            if norm > 0:
                step += (row - v) * min(1.0, tau / norm)
        v = v + step / len(a)
    return v


def np_nnm(x: np.ndarray, f: int) -> np.ndarray:
    a = np.asarray(x, np.float64)
    dist = np_dist(a)
    out = np.full_like(a, np.nan)
    for i in range(len(a)):
        if np.isfinite(dist[i, i]):
            near = sorted(range(len(a)), key=lambda j, i=i: (dist[i, j], j))[: len(a) - f]
            out[i] = a[near].mean(axis=0)
    return out


def np_clip(x: np.ndarray, c: float) -> np.ndarray:
    a = np.asarray(x, np.float64)
    out = []
    for row in a:
        norm = np.linalg.norm(row) if np.all(np.isfinite(row)) else np.inf
        out.append(np.full_like(row, np.nan) if not np.isfinite(norm) else row * min(1.0, c / norm if norm else 1.0))
    return np.array(out)


def np_arc(x: np.ndarray, f: int) -> np.ndarray:
    a = np.asarray(x, np.float64)
    n = len(a)
    k = (2 * f * (n - f)) // n
    norms = [np.linalg.norm(r) if np.all(np.isfinite(r)) else np.inf for r in a]
    return np_clip(a, sorted(norms, reverse=True)[min(k, n - 1)])


# ======================================================================================= distances
def _distances_of(x: np.ndarray, **kwargs: object) -> np.ndarray:
    return _distances.pairwise_sq_distances(tf.constant(x), **kwargs).numpy()


@SETTINGS
@given(
    case=st.sampled_from(
        [(2, 1, None, "float32"), (5, 37, 7, "float32"), (9, 300, 64, "float32"), (5, 37, None, "float64")]
    ),
    scale=st.floats(-3, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_distances_match_float64(case: tuple[int, int, int | None, str], scale: float, seed: int) -> None:
    n, d, block, dtype = case
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, d)) * 10.0**scale).astype(dtype)
    got = _distances_of(x, block=block)
    want = np_dist(x)
    eps = float(np.finfo(np.dtype(dtype)).eps)
    centre = np.median(x.astype(np.float64), axis=0)
    r = np.sum((x - centre) ** 2, axis=1)
    tol = 4 * (d + 2) * eps * (r[:, None] + r[None, :])
    assert got.dtype == np.float64 and got.shape == (n, n)
    assert np.all(np.abs(got - want) <= tol), np.max(np.abs(got - want) - tol)
    assert np.all(np.diag(got) == 0) and np.all(got >= 0)


@pytest.mark.parametrize("block", [None, 100])
def test_distances_close_rows_large_norm(block: int | None) -> None:
    """The NOTES case: honest rows = shared gradient + small noise; the plain float32 Gram fails, centring works."""
    rng = np.random.default_rng(7)
    n, d = 12, 3000
    g = rng.normal(size=d) * 50.0
    x = (g + 1e-4 * 50.0 * rng.normal(size=(n, d))).astype(np.float32)
    want = np_dist(x)
    off = ~np.eye(n, dtype=bool)
    naive = np.sum(x * x, axis=1)
    naive = naive[:, None] + naive[None, :] - 2.0 * (x @ x.T)
    assert np.max(np.abs(naive - want)[off] / want[off]) > 0.5  # the pitfall is real at this scale
    got = _distances_of(x, block=block)
    assert np.max(np.abs(got - want)[off] / want[off]) < 1e-5
    got = _distances_of(x, block=block, precise=True)
    assert np.max(np.abs(got - want)[off] / want[off]) < 1e-12


def test_distances_nonfinite_rows_are_infinitely_far() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 50)).astype(np.float32)
    x[1, 7] = np.nan
    x[4] = np.inf
    x[5, 0] = -np.inf
    got = _distances_of(x, block=16)
    bad = np.array([False, True, False, False, True, True])
    assert np.all(np.isinf(got[bad])) and np.all(np.isinf(got[:, bad]))
    good = np.flatnonzero(~bad)
    sub = got[np.ix_(good, good)]
    np.testing.assert_allclose(sub, np_dist(x[good]), rtol=1e-5)
    assert np.all(np.diag(sub) == 0)


def test_distances_huge_rows_do_not_poison_the_honest_ones() -> None:
    rng = np.random.default_rng(4)
    x = (1.0 + 1e-3 * rng.normal(size=(9, 400))).astype(np.float32)
    x[:4] = 1e15  # f = 4 Byzantine rows of enormous norm: the median centre stays within the honest values
    got = _distances_of(x)
    want = np_dist(x)
    np.testing.assert_allclose(got[4:, 4:], want[4:, 4:], rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_identical_rows_are_exact_duplicates(dtype: str) -> None:
    """Clones (Byzantine or not) get distance exactly 0 and bitwise-equal distances to the others, so their
    Krum scores tie exactly and the lowest index wins, whatever the matmul's rounding."""
    rng = np.random.default_rng(12)
    base = rng.normal(size=(4, 300)) * 3 + 10
    x = base[[0, 1, 2, 1, 3, 1, 2, 0, 3, 2, 1]].astype(dtype)
    dist = _distances_of(x, ref_rows=5, block=64)
    for i in range(len(x)):
        for j in range(len(x)):
            if np.array_equal(x[i], x[j]):
                assert dist[i, j] == 0.0
                np.testing.assert_array_equal(np.delete(dist[i], [i, j]), np.delete(dist[j], [i, j]))
    scores = _distances.krum_scores(tf.constant(dist), len(x) - 2 - 2).numpy()
    assert scores[1] == scores[3] == scores[5] == scores[10]


def test_centred_gram_explicit_centre_and_diag() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(5, 33)).astype(np.float32)
    c = rng.normal(size=33).astype(np.float32)
    gram = _distances.centred_gram(tf.constant(x), centre=tf.constant(c), block=8).numpy()
    y = x.astype(np.float64) - c
    np.testing.assert_allclose(gram, y @ y.T, rtol=1e-5, atol=1e-5)
    diag = _distances.centred_gram(tf.constant(x), centre=tf.constant(c), diag_only=True, block=8).numpy()
    np.testing.assert_allclose(diag, np.sum(y * y, axis=1), rtol=1e-6)
    # squared norms that overflow float32 are still finite (recomputed on scaled values)
    big = x.copy()
    big[2] = 1e25
    diag = _distances.centred_gram(tf.constant(big), centre=tf.constant(c), diag_only=True, block=8).numpy()
    yb = big.astype(np.float64) - c
    np.testing.assert_allclose(diag, np.sum(yb * yb, axis=1), rtol=1e-6)


def test_helpers_first_argmin_and_weighted_sums() -> None:
    v = tf.constant([3.0, 1.0, 1.0, np.inf], tf.float64)
    assert int(_distances.first_argmin(v)) == 1
    assert int(_distances.first_argmin(v, tf.constant([True, False, True, True]))) == 2
    assert int(_distances.first_argmin(tf.constant([np.inf, np.inf], tf.float64))) == 0
    x = np.array([[1.0, 2.0], [np.nan, np.inf], [3.0, 5.0]], np.float32)
    np.testing.assert_allclose(_scaling.weighted_sum(tf.constant(x), tf.constant([0.5, 0.0, 0.25], tf.float64)),
                               [1.25, 2.25])
    np.testing.assert_allclose(_distances.mean_of_rows(tf.constant(x), tf.constant([2, 0])), [2.0, 3.5])


# ======================================================================================= the rules
SHAPES = [(7, 1, 5), (11, 2, 23), (20, 4, 16)]  # (n, f, d): n >= 4f + 3 for all, so every rule applies


def _draw(seed: int, n: int, d: int, outliers: str, f: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=d) + 0.1 * rng.normal(size=(n, d))
    rows = rng.choice(n, size=f, replace=False)
    if outliers == "far":
        x[rows] = 1e6
    elif outliers == "close":
        x[rows] = x.mean(axis=0) + 0.3
    elif outliers == "nan":
        x[rows] = np.nan
    elif outliers == "inf":
        x[rows, 0] = np.inf
    return x.astype(np.float32)


OUTLIERS = ["none", "far", "close", "nan", "inf"]


@SETTINGS
@given(shape=st.sampled_from(SHAPES), outliers=st.sampled_from(OUTLIERS), seed=st.integers(0, 2**32 - 1))
def test_krum_and_multi_krum_match_numpy(shape: tuple[int, int, int], outliers: str, seed: int) -> None:
    n, f, d = shape
    x = _draw(seed, n, d, outliers, f)
    out = rule_for("krum", n, f)(x).numpy()
    np.testing.assert_array_equal(out, np_krum(x, f))
    for m in (1, n - f - 2):
        out = rule_for("multi-krum", n, f, m=m)(x).numpy()
        np.testing.assert_allclose(out, np_multi_krum(x, f, m), rtol=1e-5, atol=1e-6)
        assert np.all(np.isfinite(out))


@SETTINGS
@given(shape=st.sampled_from(SHAPES), outliers=st.sampled_from(OUTLIERS), seed=st.integers(0, 2**32 - 1))
def test_bulyan_matches_numpy(shape: tuple[int, int, int], outliers: str, seed: int) -> None:
    n, f, d = shape
    x = _draw(seed, n, d, outliers, f)
    rule = rule_for("bulyan", n, f)
    sel = rule.selection(_distances.pairwise_sq_distances(tf.constant(x))).numpy().tolist()
    assert sel == np_bulyan_selection(x, f)
    np.testing.assert_allclose(rule(x).numpy(), np_bulyan(x, f), rtol=1e-5, atol=1e-6)
    out = rule_for("bulyan", n, f, variant="multi-krum")(x).numpy()
    np.testing.assert_allclose(out, np_bulyan_aggregathor(x, f), rtol=1e-5, atol=1e-6)


def test_bulyan_iterates_on_the_remaining_set() -> None:
    # n = 7, f = 1; one-shot Krum would rank 5 first, then (without recomputing) pick other rows.
    x = np.array([21, 2, 19, -10, -3, 18, -23], np.float32).reshape(-1, 1)
    rule = gars.get("bulyan", 7, 1)
    assert rule.selection(_distances.pairwise_sq_distances(tf.constant(x))).numpy().tolist() == [5, 3, 2, 1, 0]
    np.testing.assert_allclose(rule(x).numpy(), [58 / 3], rtol=1e-6)


def test_bulyan_ties_in_the_window_go_to_the_smaller_value() -> None:
    # theta = n = 7 (f = 0), beta = 7 would be the mean; use f = 1, n = 7: beta = 1 around the median
    x = np.array([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0], [6.0]], np.float32)
    out = gars.get("bulyan", 7, 1)(x).numpy()
    np.testing.assert_allclose(out, np_bulyan(x, 1))


@SETTINGS
@given(
    shape=st.sampled_from(SHAPES),
    outliers=st.sampled_from(OUTLIERS),
    seed=st.integers(0, 2**32 - 1),
    iterations=st.sampled_from([0, 3, 8]),
    nu=st.sampled_from([1e-6, 0.1]),
)
def test_geometric_median_matches_numpy(
    shape: tuple[int, int, int], outliers: str, seed: int, iterations: int, nu: float
) -> None:
    n, f, d = shape
    x = _draw(seed, n, d, outliers, f)
    out = rule_for("geometric-median", n, f, iterations=iterations, nu=nu)(x).numpy()
    np.testing.assert_allclose(out, np_geometric_median(x, iterations, nu, f), rtol=1e-5, atol=1e-5)


def test_geometric_median_converges_onto_a_duplicated_row() -> None:
    # a row held by a majority is the geometric median; Weiszfeld approaches it, where a float32 Gram
    # could not resolve the small distances any more (the rule uses exact float64 products)
    rng = np.random.default_rng(11)
    x = np.repeat(rng.normal(size=(1, 12)), 9, axis=0)
    x = np.concatenate([x, rng.normal(size=(4, 12)) * 3]).astype(np.float32)
    out = gars.get("geometric-median", 13, 4, iterations=8)(x).numpy()
    np.testing.assert_allclose(out, np_geometric_median(x, 8, 1e-6, 4), rtol=1e-5, atol=1e-6)


@SETTINGS
@given(
    shape=st.sampled_from(SHAPES),
    outliers=st.sampled_from(OUTLIERS),
    seed=st.integers(0, 2**32 - 1),
    tau=st.sampled_from([0.05, 1.0, 100.0]),
    iterations=st.sampled_from([1, 3]),
    center=st.sampled_from(["median", "zero"]),
)
def test_centered_clipping_matches_numpy(
    shape: tuple[int, int, int], outliers: str, seed: int, tau: float, iterations: int, center: str
) -> None:
    n, f, d = shape
    x = _draw(seed, n, d, outliers, f)
    rule = rule_for("centered-clipping", n, f, tau=tau, iterations=iterations, center=center)
    a = x.astype(np.float64)
    if center == "median":
        v0 = np.array([np.median(a[np.isfinite(a[:, j]), j]) for j in range(d)])
    else:
        v0 = np.zeros(d)
    out = rule(x).numpy()
    np.testing.assert_allclose(out, np_centered_clipping(x, tau, iterations, v0), rtol=1e-5, atol=1e-5)


def test_centered_clipping_previous_centre_is_stateful() -> None:
    rng = np.random.default_rng(2)
    x1, x2 = rng.normal(size=(2, 7, 10)).astype(np.float32)
    rule = gars.get("centered-clipping", 7, 1, tau=0.5, center="previous")
    v1 = rule(x1).numpy()
    np.testing.assert_allclose(v1, np_centered_clipping(x1, 0.5, 1, np.zeros(10)), rtol=1e-5, atol=1e-6)
    v2 = rule(x2).numpy()
    np.testing.assert_allclose(v2, np_centered_clipping(x2, 0.5, 1, v1), rtol=1e-5, atol=1e-6)
    fixed = gars.get("centered-clipping", 7, 1, tau=0.5, center=v1.tolist())
    np.testing.assert_allclose(fixed(x2).numpy(), v2, rtol=1e-6)


@pytest.mark.parametrize("name", ["krum", "multi-krum", "bulyan", "geometric-median", "centered-clipping"])
@pytest.mark.parametrize("kind", ["far", "nan", "inf", "-inf-one"])
def test_byzantine_rows_are_never_selected(name: str, kind: str) -> None:
    n, f, d = 11, 2, 40
    rng = np.random.default_rng(13)
    x = (rng.normal(size=d) + 0.01 * rng.normal(size=(n, d))).astype(np.float32)
    bad = [0, 6]  # low indices: a lowest-index tie-break would pick them
    for r in bad:
        if kind == "far":
            x[r] = 1e7
        elif kind == "nan":
            x[r] = np.nan
        elif kind == "inf":
            x[r] = np.inf
        else:
            x[r, 3] = -np.inf
    rule = rule_for(name, n, f)
    assert type(rule).nan_robust
    out = rule(x).numpy()
    honest = np.delete(x, bad, axis=0)
    assert np.all(np.isfinite(out))
    if name == "krum":
        assert any(np.array_equal(out, h) for h in honest)
    if name in ("krum", "multi-krum", "bulyan"):  # selections: within the honest values
        assert np.all(out >= honest.min(axis=0)) and np.all(out <= honest.max(axis=0))
    elif name == "geometric-median":  # started inside the honest cluster: the far rows barely pull
        assert np.linalg.norm(out - honest.mean(axis=0)) < 1e-5 * 1e7 * math.sqrt(d)
    else:  # centered clipping: each row moves the median centre by at most tau / n
        assert np.linalg.norm(out - np.median(honest, axis=0)) <= (n - len(bad)) * 0.02 + len(bad) * 10.0 / n


@pytest.mark.parametrize(
    ("name", "n", "f", "bound"),
    [
        ("krum", 6, 2, "n >= 2f + 3"),
        ("multi-krum", 8, 3, "n >= 2f + 3"),
        ("bulyan", 10, 2, "n >= 4f + 3"),
        ("geometric-median", 4, 2, "n >= 2f + 1"),
        ("centered-clipping", 4, 2, "n >= 2f + 1"),
    ],
)
def test_bounds_are_named(name: str, n: int, f: int, bound: str) -> None:
    with pytest.raises(ValueError, match=bound.replace("+", r"\+")):
        gars.get(name, n, f)
    gars.get(name, n + 1, f)  # the bound is tight


def test_parameter_validation() -> None:
    with pytest.raises(ValueError, match="1 <= m <= n - f - 2"):
        gars.get("multi-krum", 10, 2, m=7)
    with pytest.raises(ValueError, match="1 <= m"):
        gars.get("multi-krum", 10, 2, m=0)
    with pytest.raises(ValueError, match="variant"):
        gars.get("bulyan", 11, 2, variant="nope")
    with pytest.raises(ValueError, match="nu"):
        gars.get("geometric-median", 5, 1, nu=0.0)
    with pytest.raises(ValueError, match="tau"):
        gars.get("centered-clipping", 5, 1, tau=-1.0)
    with pytest.raises(ValueError, match="center"):
        gars.get("centered-clipping", 5, 1, center="mean")
    with pytest.raises(TypeError):
        gars.get("krum", 5, 1, m=2)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("krum", {}),
        ("multi-krum", {"m": 3}),
        ("bulyan", {"variant": "multi-krum"}),
        ("geometric-median", {"iterations": 2, "nu": 1e-3}),
        ("centered-clipping", {"tau": 0.5, "iterations": 2, "center": "zero"}),
    ],
)
def test_get_config_round_trips(name: str, kwargs: dict) -> None:
    rule = gars.get(name, 11, 2, **kwargs)
    cfg = rule.get_config()
    again = gars.get(**cfg)
    assert again.get_config() == cfg and type(again) is type(rule)
    x = np.random.default_rng(1).normal(size=(11, 9)).astype(np.float32)
    np.testing.assert_array_equal(rule(x).numpy(), again(x).numpy())


def test_float64_inputs_keep_their_dtype() -> None:
    x = np.random.default_rng(8).normal(size=(7, 6))
    for name in ("krum", "multi-krum", "bulyan", "geometric-median", "centered-clipping"):
        out = gars.get(name, 7, 1)(x)
        assert out.dtype == tf.float64 and out.shape == (6,)


# ======================================================================================= wrappers
def _wrapped_rows(rule: gars.GAR, x: np.ndarray) -> np.ndarray:
    """The rows the inner rule of a composed rule receives."""
    t = tf.constant(x)
    for w in rule.wrappers:
        t = w(t)
    return t.numpy()


@pytest.mark.parametrize("outliers", ["none", "nan", "far"])
def test_nnm_matches_numpy(outliers: str) -> None:
    n, f, d = 11, 2, 23
    x = _draw(5, n, d, outliers, f)
    rule = gars.get("average", n, f, pre=["nnm"])
    got = _wrapped_rows(rule, x)
    np.testing.assert_allclose(got, np_nnm(x, f), rtol=1e-5, atol=1e-6)
    if outliers == "nan":
        assert np.isnan(rule(x).numpy()).all()  # average is not nan_robust: the NaN rows come through
        out = gars.get("median", n, f, pre=["nnm"])(x).numpy()
        assert np.all(np.isfinite(out))


def test_bucketing_shapes_and_means() -> None:
    n, f, d = 11, 1, 5
    x = np.random.default_rng(3).normal(size=(n, d)).astype(np.float32)
    perm = list(np.random.default_rng(4).permutation(n))
    rule = gars.get("average", n, f, pre=[{"name": "bucketing", "s": 3, "permutation": perm}])
    assert rule.inner.n == math.ceil(n / 3) and rule.inner.f == f
    got = _wrapped_rows(rule, x)
    want = [x[perm[k : k + 3]].astype(np.float64).mean(axis=0) for k in range(0, n, 3)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # random buckets: a permutation of the rows per call, reproducible from the seed
    a = gars.get("average", n, f, pre=[{"name": "bucketing", "s": 2, "seed": 5}])
    b = gars.get("average", n, f, pre=[{"name": "bucketing", "s": 2, "seed": 5}])
    ra, rb = _wrapped_rows(a, x), _wrapped_rows(b, x)
    np.testing.assert_array_equal(ra, rb)
    assert ra.shape == (6, d)
    np.testing.assert_allclose(ra[:5].sum(axis=0) * 2 + ra[5], x.sum(axis=0), rtol=1e-5, atol=1e-5)
    # the rule's bound holds for the buckets: 20 rows in buckets of 2 give Krum 10 rows, f = 4: 10 < 11
    with pytest.raises(ValueError, match="n >= 2f \\+ 3"):
        gars.get("krum", 20, 4, pre=[{"name": "bucketing", "s": 2}])
    gars.get("krum", 20, 3, pre=[{"name": "bucketing", "s": 2}])


@pytest.mark.parametrize("outliers", ["none", "nan", "far"])
def test_clipping_and_arc_match_numpy(outliers: str) -> None:
    n, f, d = 11, 2, 23
    x = _draw(9, n, d, outliers, f)
    got = _wrapped_rows(gars.get("median", n, f, pre=[{"name": "clipping", "c": 2.0}]), x)
    np.testing.assert_allclose(got, np_clip(x, 2.0), rtol=1e-6)
    got = _wrapped_rows(gars.get("median", n, f, pre=["arc"]), x)
    np.testing.assert_allclose(got, np_arc(x, f), rtol=1e-6)
    # the last wrapper only scales rows: its scaling runs inside the XLA-compiled rule (no (n, d) write)
    for pre, rows in ((["arc"], np_arc(x, f)), ([{"name": "clipping", "c": 2.0}], np_clip(x, 2.0))):
        rule = gars.get("median", n, f, pre=pre)
        assert rule._fused
        np.testing.assert_allclose(rule(x).numpy(), np.nanmedian(rows, axis=0), rtol=1e-5, atol=1e-6)
    arc0 = _wrapped_rows(gars.get("median", n, 0, pre=["arc"]), x)  # k = 0: identity on finite rows
    fin = np.all(np.isfinite(x), axis=1)
    np.testing.assert_array_equal(arc0[fin], x[fin])


def test_wrappers_compose_and_round_trip() -> None:
    n, f, d = 14, 2, 17
    x = _draw(21, n, d, "far", f)
    pre = [{"name": "clipping", "c": 50.0}, "nnm", {"name": "bucketing", "s": 2, "seed": 9}, "arc"]
    rule = gars.get("multi-krum", n, f, pre=pre, m=3)
    assert (rule.inner.n, rule.inner.f, rule.inner.m) == (7, 2, 3)
    assert type(rule).nan_robust and not type(rule).jit_compile
    cfg = rule.get_config()
    assert cfg["pre"][1] == {"name": "nnm"} and cfg["m"] == 3 and cfg["n"] == n
    again = gars.get(**cfg)
    assert again.get_config() == cfg
    out = rule(x).numpy()
    assert out.shape == (d,) and np.all(np.isfinite(out))
    np.testing.assert_array_equal(out, again(x).numpy())  # same seed, same buckets
    # an all-XLA chain is one XLA cluster
    assert type(gars.get("median", n, f, pre=[{"name": "bucketing", "s": 2}])).jit_compile
    assert not type(gars.get("median", n, f, pre=["clipping", "arc"])).jit_compile  # norms: TF reduction
    with pytest.raises(ValueError, match="unknown pre-aggregation wrapper"):
        gars.get("median", n, f, pre=["nope"])
    assert set(wrappers.names()) == {"nnm", "bucketing", "clipping", "arc"}


# ======================================================================= the compiled kernel (issue 14)
needs_kernel = pytest.mark.skipif(not _distances.kernel_available(), reason="the compiled kernel runs on CPU hosts")


def _far_tight_cluster(seed: int, d: int = 40) -> np.ndarray:
    """n = 11: rows 0..2 around 0 (with rows 3, 4 they make the robust centre, near 0), rows 3..10 a tight
    cluster (spread 1e-3) at 1e3. Every Krum score and every round of Bulyan is decided inside the cluster,
    by distances about 1e-12 of the rows' squared distance from the centre: a float32 Gram centred near 0
    returns 0 for all of them."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(11, d))
    x[3:] = 1e3 + 1e-3 * rng.normal(size=(8, d))
    return x.astype(np.float32)


@needs_kernel
@pytest.mark.parametrize("seed", range(4))
def test_far_tight_cluster_selections_match_float64(seed: int) -> None:
    n, f = 11, 2
    x = _far_tight_cluster(seed)
    want = np_dist(x)
    got = _distances_of(x, ref_rows=2 * f + 1)  # the rules' centre (on the Gram path): near 0, far from the cluster
    cluster = np.ix_(range(3, n), range(3, n))
    np.testing.assert_allclose(got[cluster], want[cluster], rtol=1e-5)  # the in-cluster distances, not 0
    scores = np_scores(want, f, list(range(n)))
    krum = rule_for("krum", n, f)
    assert int(krum.select(krum.distances(tf.constant(x)))) == int(np.argmin(scores))
    mk = rule_for("multi-krum", n, f)
    chosen = mk.select(mk.distances(tf.constant(x))).numpy().tolist()
    assert chosen == np.argsort(scores, kind="stable")[: n - f - 2].tolist()
    bulyan = rule_for("bulyan", n, f)
    selected, far = bulyan.select(bulyan.distances(tf.constant(x)))
    assert selected.numpy().tolist() == np_bulyan_selection(x, f) and not bool(far)
    np.testing.assert_allclose(bulyan(x).numpy(), np_bulyan(x, f), rtol=1e-6)


@needs_kernel
def test_kernel_distances_at_any_finite_magnitude() -> None:
    rng = np.random.default_rng(21)
    cases = {
        "near the float32 maximum": rng.uniform(-3e38, 3e38, size=(7, 300)),
        "one huge row beside ordinary ones (mixed block: float64 path)": np.concatenate(
            [rng.normal(size=(6, 300)), np.full((1, 300), 3e38)]),
        "opposite huge rows (differences beyond float32)": np.array([[3e38] * 5, [-3e38] * 5, [1.0] * 5]),
        "tiny rows (scaled up: their squares are below float32's range)": 1e-30 * rng.normal(size=(5, 64)),
        "subnormal values": 1e-40 * rng.integers(1, 50, size=(5, 33)),
        "the H2 case": np.array([[1.0, 1.0], [1.0, 2.0], [3e37, 3e37]]),
    }
    for what, rows in cases.items():
        x = rows.astype(np.float32)
        got = _distances_of(x, block=64)
        want = np_dist(x)
        assert np.all(np.isfinite(got)), what
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=what)
        assert np.all(np.diag(got) == 0), what


@needs_kernel
def test_kernel_takes_the_float64_path_only_for_blocks_that_need_it() -> None:
    rng = np.random.default_rng(22)
    x = rng.normal(size=(9, 4096)).astype(np.float32)
    x[8, 2048:] = 3e38  # the second half of one row is huge: of 4 blocks of 1024, 2 span more than 2^95
    got = _distances.kernel_distances(x, block=1024, threads=1)
    stats = _distances.LAST_KERNEL_STATS
    assert (stats["blocks_float32"], stats["blocks_float64"]) == (2, 2)
    np.testing.assert_allclose(got, np_dist(x), rtol=1e-6)
    # the honest distances were not lost beside the huge row
    np.testing.assert_allclose(got[:8, :8], np_dist(x[:8]), rtol=1e-6)
    precise = _distances.kernel_distances(x, block=1024, threads=1, precise=True)
    assert _distances.LAST_KERNEL_STATS["blocks_float64"] == 4
    np.testing.assert_allclose(precise, np_dist(x), rtol=1e-12)


@needs_kernel
def test_kernel_threads_and_blocks_agree_and_clones_stay_exact() -> None:
    rng = np.random.default_rng(23)
    base = rng.normal(size=(5, 5000))
    x = base[[0, 1, 2, 1, 3, 4, 1, 0, 2, 3, 4, 1, 0]].astype(np.float32)  # n = 13: a partial tile of rows
    x[4, 17] = np.nan
    one = _distances.kernel_distances(x, block=512, threads=1)
    two = _distances.kernel_distances(x, block=512, threads=2)
    wide = _distances.kernel_distances(x, block=16384, threads=3)
    for got in (one, two, wide):
        assert np.all(np.isinf(got[4])) and np.all(np.isinf(got[:, 4]))
        for i in range(len(x)):
            for j in range(len(x)):
                if i != 4 and j != 4 and np.array_equal(x[i], x[j]):
                    assert got[i, j] == 0.0
                    np.testing.assert_array_equal(np.delete(got[i], [i, j]), np.delete(got[j], [i, j]))
        if got is two:  # the split does not depend on the threads: the same bits
            np.testing.assert_array_equal(got, one)
        np.testing.assert_allclose(got, one, rtol=1e-6)


@needs_kernel
def test_huge_rows_keep_the_selection_rules_finite() -> None:
    """Multi-Krum's mean and Bulyan's coordinate phase at float32's maximum: sums and distances to the median
    that would overflow rerun (or run) on rows scaled by a power of two."""
    n, f = 11, 2
    rng = np.random.default_rng(24)
    x = (rng.uniform(0.5, 1.0, size=(n, 30)) * 3e38 * rng.choice([-1, 1], size=(n, 30))).astype(np.float32)
    mk = rule_for("multi-krum", n, f)
    np.testing.assert_allclose(mk(x).numpy(), np_multi_krum(x, f, n - f - 2), rtol=1e-5)
    bulyan = rule_for("bulyan", n, f)
    _, far = bulyan.select(bulyan.distances(tf.constant(x)))
    assert bool(far)  # differences of these values overflow float32: the scaled coordinate phase runs
    np.testing.assert_allclose(bulyan(x).numpy(), np_bulyan(x, f), rtol=1e-5)
    agg = rule_for("bulyan", n, f, variant="multi-krum")
    np.testing.assert_allclose(agg(x).numpy(), np_bulyan_aggregathor(x, f), rtol=1e-5)
    same = np.full((n, 8), 3e38, np.float32)  # no difference overflows, the sums do: caught on the output
    assert not bool(bulyan.select(bulyan.distances(tf.constant(same)))[1])
    np.testing.assert_allclose(bulyan(same).numpy(), 3e38, rtol=1e-6)
    np.testing.assert_allclose(mk(same).numpy(), 3e38, rtol=1e-6)


@needs_kernel
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_kernel_threads_work_in_a_forked_child() -> None:
    """The thread pool made before a fork has no threads in the child: the child makes its own (no hang)."""
    x = np.random.default_rng(25).normal(size=(6, 40000)).astype(np.float32)
    want = _distances.kernel_distances(x, threads=2)  # the parent's pool exists now
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        code = 1
        try:
            code = 0 if np.array_equal(_distances.kernel_distances(x, threads=2), want) else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the kernel hung in a forked child")
