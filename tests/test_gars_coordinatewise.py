"""Coordinate-wise rules and the compare-exchange networks behind them (aggregathor.gars._sortnet).

Each fast result is checked against a straightforward numpy computation written here (np.sort, np.median, an
explicit "nearest to the median" loop), on small d. Most checks run the rules' ``aggregate`` eagerly (the same
TensorFlow ops, no XLA compile per shape, so hypothesis can try many shapes quickly); a few run the compiled
``tf.function(jit_compile=True)`` path and compare it with the eager one.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregathor import gars
from aggregathor.gars import _sortnet as sn

RULES = ("average-nan", "median", "meamed", "trimmed-mean")
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------- numpy oracles
def np_finite_median(x: np.ndarray) -> np.ndarray:
    out = np.full(x.shape[1], np.nan)
    for j in range(x.shape[1]):
        v = x[np.isfinite(x[:, j]), j]
        if v.size:
            out[j] = np.median(v)
    return out


def np_average_nan(x: np.ndarray) -> np.ndarray:
    out = np.full(x.shape[1], np.nan)
    for j in range(x.shape[1]):
        v = x[np.isfinite(x[:, j]), j]
        if v.size:
            out[j] = v.mean()
    return out


def np_trimmed_mean(x: np.ndarray, b: int) -> np.ndarray:
    n = x.shape[0]
    s = np.sort(np.where(np.isnan(x), np.inf, x), axis=0)  # -inf < finite < +inf, NaN as +inf
    return s[b : n - b].mean(axis=0)


def np_mean_closest(x: np.ndarray, k: int, eps: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Per coordinate, the mean of the k values nearest the finite median (non-finite ones at distance +inf).

    Returns the smallest and largest such mean over the ways of breaking ties, distances within ``eps``
    counting as tied (the float32 median and distances round differently from these float64 ones).
    """
    lo, hi = np.empty(x.shape[1]), np.empty(x.shape[1])
    med = np_finite_median(x)
    for j in range(x.shape[1]):
        col = x[:, j]
        dist = np.where(np.isfinite(col), np.abs(col - med[j]), np.inf)
        edge = np.sort(dist)[k - 1]
        sure = col[dist < edge - eps]
        tied = np.sort(col[np.abs(dist - edge) <= eps]) if np.isfinite(edge) else np.sort(col[dist == edge])
        need = k - sure.size
        lo[j] = (sure.sum() + tied[:need].sum()) / k
        hi[j] = (sure.sum() + tied[tied.size - need :].sum()) / k
    return lo, hi


def _eps(x: np.ndarray) -> float:
    """Distances closer than this count as tied (a few ulps of the largest input)."""
    scale = float(np.max(np.abs(np.where(np.isfinite(x), x, 0.0)), initial=0))
    return (1e-6 if x.dtype == np.float32 else 1e-13) * scale


def within(got: np.ndarray, bounds: tuple[np.ndarray, np.ndarray], x: np.ndarray) -> bool:
    tol = 1e-5 if x.dtype == np.float32 else 1e-12
    atol = tol * np.max(np.abs(np.where(np.isfinite(x), x, 0.0)), initial=1e-30)
    return bool(np.all(got >= bounds[0] - atol) and np.all(got <= bounds[1] + atol))


# ---------------------------------------------------------------------------------------------- data
def make(seed: int, n: int, d: int, dtype: type, *, ties: bool = False, inf: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * 10.0 ** rng.integers(-3, 4)
    if ties:
        x = np.round(x * 2 / np.abs(x).max(initial=1.0)) if x.size else x
    if inf and x.size:
        mask = rng.random((n, d)) < 0.15
        x[mask] = rng.choice([np.inf, -np.inf], size=int(mask.sum()))
    return x.astype(dtype)


def spoil(x: np.ndarray, seed: int, at_most: int) -> np.ndarray:
    """Up to ``at_most`` non-finite values (NaN, +inf, -inf) per coordinate, at random rows."""
    rng = np.random.default_rng(seed)
    x = x.copy()
    n, d = x.shape
    for j in range(d):
        m = int(rng.integers(0, at_most + 1))
        rows = rng.choice(n, size=m, replace=False)
        x[rows, j] = rng.choice([np.nan, np.inf, -np.inf], size=m)
    return x


def close(got: np.ndarray, want: np.ndarray, x: np.ndarray) -> bool:
    """Equal up to rounding: a sum of float32 values may differ by a few ulps of the largest input."""
    tol = 1e-5 if x.dtype == np.float32 else 1e-12
    scale = np.max(np.abs(np.where(np.isfinite(x), x, 0.0)), initial=1e-30)
    return bool(np.allclose(got, want, rtol=tol, atol=tol * scale, equal_nan=True))


shapes = st.tuples(
    st.integers(1, 25), st.integers(1, 50), st.sampled_from([np.float32, np.float64]), st.integers(0, 2**32 - 1)
)


# ---------------------------------------------------------------------------------------------- networks
def _zero_one_check(n: int, p: sn.Plan, ranks: list[int]) -> bool:
    """0-1 principle, exhaustively: the network is right on every 0/1 input iff it is right on every input."""
    bits = np.arange(1 << n, dtype=np.uint32)
    regs = [((bits >> i) & 1).astype(bool) for i in range(n)]
    zeros = n - sum(r.astype(np.int32) for r in regs)
    for a, b, lo, hi in p.comparators:
        u, v = regs[a], regs[b]
        if lo:
            regs[a] = u & v
        if hi:
            regs[b] = u | v
    return all(np.array_equal(regs[p.outputs[r]], zeros <= r) for r in ranks)


@pytest.mark.parametrize("n", range(1, 15))
def test_networks_zero_one_principle(n: int) -> None:
    assert _zero_one_check(n, sn.plan(n), list(range(n)))
    for ranks in (sn.median_ranks(n), sn.nan_median_ranks(n), (0, n - 1)):
        assert _zero_one_check(n, sn.plan(n, ranks), list(ranks))
        assert _zero_one_check(n, sn.plan(n, ranks, full=True), list(ranks))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 20, 21, 33, 50])
def test_networks_numpy(n: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.integers(-3, 4, size=(n, 300)).astype(float)  # many ties
    full = sn.plan(n)
    regs = list(x)
    for a, b, _, _ in full.comparators:
        regs[a], regs[b] = np.minimum(regs[a], regs[b]), np.maximum(regs[a], regs[b])
    np.testing.assert_array_equal(np.stack([regs[full.outputs[r]] for r in range(n)]), np.sort(x, axis=0))
    # a full=True plan permutes each coordinate: the rest is the complement multiset
    ranks = sorted({0, n // 3, n - 1})
    p = sn.plan(n, tuple(ranks), full=True)
    regs = list(x)
    for a, b, _, _ in p.comparators:
        regs[a], regs[b] = np.minimum(regs[a], regs[b]), np.maximum(regs[a], regs[b])
    want = np.sort(x, axis=0)
    for r in ranks:
        np.testing.assert_array_equal(regs[p.outputs[r]], want[r])
    rest = np.sort(np.array([regs[i] for i in p.rest]).reshape(-1, 300), axis=0)
    np.testing.assert_array_equal(rest, np.delete(want, ranks, axis=0))


def test_comparator_counts() -> None:
    # The documented counts; NOTES.md counted 84 for the median of 20.
    assert sn.network_stats(20) == {"sort": 97, "median": 72, "nan_median": 72}
    assert sn.network_stats(5) == {"sort": 9, "median": 8, "nan_median": 8}
    assert [sn.network_stats(n)["sort"] for n in (10, 16, 25)] == [31, 63, 138]
    assert sn.plan(20, (9, 10)).ops == sum(a + b for _, _, a, b in sn.plan(20, (9, 10)).comparators)
    assert len(sn.sorting_network(20)) == 97
    with pytest.raises(ValueError, match="ranks"):
        sn.plan(4, (4,))


@FAST
@given(shapes, st.booleans(), st.booleans())
def test_sorted_rows_is_np_sort(shape, ties: bool, inf: bool) -> None:
    n, d, dtype, seed = shape
    x = make(seed, n, d, dtype, ties=ties, inf=inf)
    got = np.stack([r.numpy() for r in sn.sorted_rows(tf.constant(x))])
    np.testing.assert_array_equal(got, np.sort(x, axis=0))
    assert got.dtype == dtype


@FAST
@given(shapes, st.data())
def test_select_partition_rank_sum(shape, data) -> None:
    n, d, dtype, seed = shape
    x = make(seed, n, d, dtype, ties=data.draw(st.booleans()), inf=data.draw(st.booleans()))
    want = np.sort(x, axis=0)
    ranks = data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n))
    sel = sn.select_ranks(tf.constant(x), ranks)
    assert set(sel) == ranks
    for r in ranks:
        np.testing.assert_array_equal(sel[r].numpy(), want[r])
    sel, rest = sn.partition_ranks([tf.constant(row) for row in x], ranks)  # a list of rows works too
    assert len(rest) == n - len(ranks)
    for r in ranks:
        np.testing.assert_array_equal(sel[r].numpy(), want[r])
    if rest:
        got = np.sort(np.stack([t.numpy() for t in rest]), axis=0)
        np.testing.assert_array_equal(got, np.delete(want, sorted(ranks), axis=0))
    lo = data.draw(st.integers(0, n - 1))
    hi = data.draw(st.integers(lo + 1, n))
    finite = np.sort(np.where(np.isfinite(x), x, 0.0), axis=0)
    got = sn.rank_sum(tf.constant(np.where(np.isfinite(x), x, 0.0)), lo, hi).numpy()
    assert close(got, finite[lo:hi].astype(np.float64).sum(axis=0), x)


@FAST
@given(shapes)
def test_median_even_odd(shape) -> None:
    n, d, dtype, seed = shape
    x = make(seed, n, d, dtype, ties=seed % 2 == 0)
    got = sn.median(tf.constant(x)).numpy()
    assert close(got, np.median(x.astype(np.float64), axis=0), x)
    assert got.dtype == dtype


def test_median_even_is_mean_of_middle_two_without_overflow() -> None:
    x = np.array([[1.0, -3e38], [2.0, 3e38], [10.0, 3e38], [-5.0, -3e38]], np.float32)
    np.testing.assert_array_equal(sn.median(x).numpy(), [1.5, 0.0])
    np.testing.assert_array_equal(sn.nan_median(x).numpy(), [1.5, 0.0])


@FAST
@given(shapes, st.data())
def test_nan_median_any_number_of_nonfinite(shape, data) -> None:
    n, d, dtype, seed = shape
    m = data.draw(st.integers(0, n))
    x = spoil(make(seed, n, d, dtype, ties=seed % 3 == 0), seed, m)
    got = sn.nan_median(tf.constant(x)).numpy()
    want = np_finite_median(x.astype(np.float64))
    assert close(got, want, x)
    assert np.array_equal(np.isnan(got), np.all(~np.isfinite(x), axis=0))


def test_balance_nonfinite_alternates() -> None:
    x = np.array([[np.nan], [1.0], [np.inf], [-np.inf], [2.0], [np.nan]], np.float32)
    bal = sn.balance_nonfinite(tf.constant(x))
    np.testing.assert_array_equal([r.numpy()[0] for r in bal.rows], [np.inf, 1.0, -np.inf, np.inf, 2.0, -np.inf])
    assert not bool(bal.odd.numpy()[0])  # four non-finite values
    np.testing.assert_array_equal(sn.finite_or(x[:, 0], 7.0).numpy(), [7.0, 1.0, 7.0, 7.0, 2.0, 7.0])


@FAST
@given(shapes, st.data())
def test_mean_around_median_any_k(shape, data) -> None:
    n, d, dtype, seed = shape
    k = data.draw(st.integers(1, n))
    x = make(seed, n, d, dtype, ties=data.draw(st.booleans()))
    x = spoil(x, seed, n - k)  # at most n - k non-finite: the k nearest are finite
    got = sn.mean_around_median(tf.constant(x), k).numpy()
    assert np.all(np.isfinite(got))
    assert within(got, np_mean_closest(x.astype(np.float64), k, eps=_eps(x)), x)
    if dtype == np.float64 and not data.draw(st.booleans()):
        return
    # exact ties only (values on a grid): the smaller value wins
    g = np.round(x * 4) / 4
    got = sn.mean_around_median(tf.constant(g), k).numpy()
    want = np_mean_closest(g.astype(np.float64), k)
    assert close(got, want[0], g)


def test_meamed_tie_at_the_window_edge() -> None:
    # The 4 values nearest 0 are 0, 0.5, -1, -1 (mean -0.375). The leftmost window with the smallest *maximum*
    # distance, [-1, -1, -1, 0], would give -0.75.
    x = np.array([[-1.0], [-1.0], [-1.0], [0.0], [0.5], [2.0], [3.0]])
    assert gars.get("meamed", 7, 3).aggregate(tf.constant(x)).numpy()[0] == pytest.approx(-0.375)
    # equal distances on both sides: the smaller value wins
    x = np.array([[-1.0], [0.0], [1.0]])
    assert gars.get("meamed", 3, 1).aggregate(tf.constant(x)).numpy()[0] == pytest.approx(-0.5)


# ---------------------------------------------------------------------------------------------- rules
nf_shapes = st.integers(1, 25).flatmap(
    lambda n: st.tuples(
        st.just(n),
        st.integers(0, (n - 1) // 2),
        st.integers(1, 50),
        st.sampled_from([np.float32, np.float64]),
        st.integers(0, 2**32 - 1),
    )
)


@FAST
@given(nf_shapes, st.booleans(), st.booleans())
def test_rules_match_numpy(shape, ties: bool, spoiled: bool) -> None:
    n, f, d, dtype, seed = shape
    x = make(seed, n, d, dtype, ties=ties)
    if spoiled:  # nan_robust: at most f non-finite values per coordinate
        x = spoil(x, seed, f)
    x64 = x.astype(np.float64)
    want = {
        "average-nan": np_average_nan(x64),
        "median": np_finite_median(x64),
        "meamed": np_mean_closest(x64, n - f, eps=_eps(x)),
        "trimmed-mean": np_trimmed_mean(x64, f),
    }
    for name in RULES:
        rule = gars.get(name, n, f)
        assert rule.nan_robust
        got = rule.aggregate(tf.constant(x)).numpy()
        assert got.dtype == dtype and got.shape == (d,)
        assert np.all(np.isfinite(got)), name
        ok = within(got, want[name], x) if name == "meamed" else close(got, want[name], x)
        assert ok, name


@FAST
@given(nf_shapes, st.data())
def test_trimmed_mean_b(shape, data) -> None:
    n, f, d, dtype, seed = shape
    b = data.draw(st.integers(f, (n - 1) // 2))
    x = spoil(make(seed, n, d, dtype, ties=seed % 2 == 0), seed, f)
    rule = gars.get("trimmed-mean", n, f, b=b)
    assert close(rule.aggregate(tf.constant(x)).numpy(), np_trimmed_mean(x.astype(np.float64), b), x)


def test_compiled_matches_eager_and_takes_lists() -> None:
    n, f, d = 9, 3, 37
    x = spoil(make(1, n, d, np.float32, ties=True), 2, f)
    for name in RULES:
        rule = gars.get(name, n, f)
        eager = rule.aggregate(tf.constant(x)).numpy()
        np.testing.assert_allclose(rule(x).numpy(), eager, rtol=1e-6, atol=1e-6)
        rows = [tf.constant(r) for r in x]  # a list of n tensors: the same compiled function
        np.testing.assert_allclose(rule(rows).numpy(), eager, rtol=1e-6, atol=1e-6)
        assert len(rule._fns) == 1


def test_one_fusion_no_sort() -> None:
    """XLA fuses the whole network, NaN handling included, into one loop over d; no sort op anywhere."""
    rule = gars.get("median", 20, 4)
    fn = rule.function(64, tf.float32)
    hlo = fn.experimental_get_compiler_ir(tf.zeros([20, 64]))(stage="optimized_hlo")
    entry = hlo[hlo.index("ENTRY") :]
    assert entry.count(" fusion(") == 1
    assert " sort(" not in hlo and "gather(" not in hlo


def test_all_nonfinite_coordinate() -> None:
    x = np.array([[np.nan, 1.0], [np.inf, 2.0], [-np.inf, 3.0]])
    assert np.isnan(gars.get("median", 3, 1).aggregate(tf.constant(x)).numpy()[0])
    assert np.isnan(gars.get("average-nan", 3, 1).aggregate(tf.constant(x)).numpy()[0])
    for name in ("meamed", "trimmed-mean"):  # more than f non-finite: not finite
        assert not np.isfinite(gars.get(name, 3, 1).aggregate(tf.constant(x)).numpy()[0])


# ---------------------------------------------------------------------------------------------- bounds, config
@pytest.mark.parametrize(
    ("name", "n", "f", "kwargs", "bound"),
    [
        ("average-nan", 2, 2, {}, "n > f"),
        ("median", 4, 2, {}, "n >= 2f + 1"),
        ("meamed", 6, 3, {}, "n >= 2f + 1"),
        ("trimmed-mean", 2, 1, {}, "n >= 2f + 1"),
        ("trimmed-mean", 9, 3, {"b": 2}, "b >= f"),
        ("trimmed-mean", 9, 3, {"b": 5}, "n >= 2b + 1"),
    ],
)
def test_bounds(name: str, n: int, f: int, kwargs: dict, bound: str) -> None:
    with pytest.raises(ValueError, match=bound.replace("+", r"\+")) as err:
        gars.get(name, n, f, **kwargs)
    assert name in str(err.value)


def test_bounds_met() -> None:
    for name, (n, f) in itertools.product(RULES, [(1, 0), (3, 1), (21, 10)]):
        gars.get(name, n, f)
    gars.get("average-nan", 5, 4)
    with pytest.raises(ValueError, match="b must be"):
        gars.get("trimmed-mean", 9, 1, b=-1)
    with pytest.raises(TypeError):
        gars.get("median", 9, 1, b=2)


@pytest.mark.parametrize(
    ("name", "kwargs"), [("average-nan", {}), ("median", {}), ("meamed", {}), ("trimmed-mean", {"b": 3})]
)
def test_get_config_round_trip(name: str, kwargs: dict) -> None:
    rule = gars.get(name, 11, 2, **kwargs)
    cfg = rule.get_config()
    assert cfg["name"] == name
    again = gars.get(**cfg)
    assert type(again) is type(rule) and again.get_config() == cfg
    assert name in gars.names()
    if name == "trimmed-mean":
        assert cfg["b"] == 3 and gars.get(name, 11, 2).get_config()["b"] == 2
