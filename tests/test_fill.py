"""Fill policies (lossympi.fill) on plain arrays; the end-to-end versions are in test_endpoint.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lossympi.fill import FILL_NAMES, apply_fill, check_policy

FLOATS = (np.float16, np.float32, np.float64)
INTS = (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64)


def masked(shape=(1000,), p=0.4, seed=0):
    rng = np.random.default_rng(seed)
    mask = rng.random(shape) >= p
    return mask


def test_names_and_check_policy():
    assert FILL_NAMES == ("random", "zero", "nan", "last")
    for name in FILL_NAMES:
        check_policy(name, np.dtype(np.float32))
    check_policy(lambda out, mask: None, np.dtype(np.int8))
    for dt in INTS:
        check_policy("zero", np.dtype(dt))
        with pytest.raises(ValueError, match="float dtype"):
            check_policy("nan", np.dtype(dt))
    for bad in ("Zero", "mean", "", None, 3):
        with pytest.raises(ValueError, match="unknown fill policy"):
            check_policy(bad, np.dtype(np.float32))


@pytest.mark.parametrize("dtype", FLOATS + INTS)
def test_zero(dtype):
    mask = masked((20, 50))
    x = np.full(mask.shape, 3, dtype)
    apply_fill("zero", x, mask)
    assert np.all(x[mask] == 3) and np.all(x[~mask] == 0)


@pytest.mark.parametrize("dtype,pattern", [(np.float16, 0x7E00), (np.float32, 0x7FC00000),
                                           (np.float64, 0x7FF8000000000000)])
def test_nan_bytes(dtype, pattern):
    mask = masked()
    x = np.full(mask.shape, 1.5, dtype)
    apply_fill("nan", x, mask)
    uint = {2: np.uint16, 4: np.uint32, 8: np.uint64}[np.dtype(dtype).itemsize]
    assert np.all(x[~mask].view(uint) == pattern)
    assert np.all(x[mask] == 1.5)


@pytest.mark.parametrize("dtype", INTS)
def test_nan_refuses_integers(dtype):
    x = np.zeros(4, dtype)
    with pytest.raises(ValueError, match="float dtype"):
        apply_fill("nan", x, np.array([True, False, True, False]))


def test_last():
    mask = masked((10, 10))
    prev = np.arange(100, dtype=np.float32).reshape(10, 10)
    x = np.full((10, 10), -1, np.float32)
    apply_fill("last", x, mask, last=prev)
    assert np.array_equal(x, np.where(mask, -1, prev))
    y = np.full((10, 10), -1, np.float32)
    apply_fill("last", y, mask)  # no previous message: 0
    assert np.array_equal(y, np.where(mask, -1, 0))


def test_callable_only_when_something_is_missing():
    calls = []

    def fill(out, mask):
        calls.append((out, mask))
        out[~mask] = 42

    x = np.zeros((4, 5), np.int32)
    full = np.ones((4, 5), bool)
    apply_fill(fill, x, full)
    assert calls == []
    mask = full.copy()
    mask[1, 2] = False
    apply_fill(fill, x, mask)
    assert len(calls) == 1 and calls[0][0] is x and calls[0][1] is mask
    assert x[1, 2] == 42 and x.sum() == 42


def test_random_moments_float():
    rng = np.random.default_rng(1)
    x = (5 + 2 * rng.standard_normal(1_000_000)).astype(np.float32)
    mask = rng.random(x.size) >= 0.3
    orig = x.copy()
    apply_fill("random", x, mask, rng=np.random.default_rng(2))
    assert np.array_equal(x[mask], orig[mask])
    filled = x[~mask].astype(np.float64)
    assert abs(filled.mean() - 5) < 0.02 and abs(filled.std() - 2) < 0.02


def test_random_ignores_non_finite_arrivals():
    x = np.array([np.nan, np.inf, -np.inf, 4.0, 6.0, 0.0, 0.0], np.float64)
    mask = np.array([True, True, True, True, True, False, False])
    apply_fill("random", x, mask, rng=np.random.default_rng(0))
    assert np.all(np.isfinite(x[~mask]))
    # mean 5, std 1 from {4, 6}
    big = np.concatenate([x[:5], np.zeros(200_000)])
    bmask = np.concatenate([mask[:5], np.zeros(200_000, bool)])
    apply_fill("random", big, bmask, rng=np.random.default_rng(0))
    assert abs(big[~bmask].mean() - 5) < 0.02 and abs(big[~bmask].std() - 1) < 0.02


def test_random_when_nothing_arrived_is_standard_normal():
    x = np.zeros(200_000, np.float64)
    apply_fill("random", x, np.zeros(x.size, bool), rng=np.random.default_rng(0))
    assert abs(x.mean()) < 0.02 and abs(x.std() - 1) < 0.02


def test_random_signalling_nan_payload_does_not_warn():
    x = np.array([0x7F800001, 0x3F800000, 0], np.uint32).view(np.float32)  # sNaN, 1.0, missing
    with np.errstate(all="raise"):
        apply_fill("random", x, np.array([True, True, False]), rng=np.random.default_rng(0))
    assert np.isfinite(x[2])


@pytest.mark.parametrize("dtype", INTS)
def test_random_integers_rounded_and_clipped(dtype):
    info = np.iinfo(dtype)
    # arrivals at both ends of the range: the draws spread far outside it and must be clipped
    x = np.zeros(10_000, dtype)
    mask = np.zeros(x.size, bool)
    x[:100], x[100:200] = info.min, info.max
    mask[:200] = True
    apply_fill("random", x, mask, rng=np.random.default_rng(3))
    assert x.dtype == dtype
    filled = x[~mask]
    # some draws were clipped to each end, and none wrapped around (float64 has 53 bits of mantissa)
    assert filled.min() == info.min and filled.max() >= info.max - 4096
    assert np.count_nonzero(filled == info.min) > 1000 and np.count_nonzero(filled >= info.max - 4096) > 1000
    # moderate values: rounded draws of the arrivals' moments
    y = np.full(10_000, 50, dtype)
    y[::2] = 60
    ymask = np.zeros(y.size, bool)
    ymask[:5000] = True
    apply_fill("random", y, ymask, rng=np.random.default_rng(4))
    assert abs(y[~ymask].astype(np.float64).mean() - 55) < 0.5


@pytest.mark.parametrize("dtype", FLOATS)
def test_random_float_dtypes(dtype):
    x = np.full(50_000, 1, dtype)
    x[::2] = 3
    mask = np.zeros(x.size, bool)
    mask[:20_000] = True
    apply_fill("random", x, mask, rng=np.random.default_rng(5))
    f = x[~mask].astype(np.float64)
    assert np.all(np.isfinite(f)) and abs(f.mean() - 2) < 0.05 and abs(f.std() - 1) < 0.05


def test_random_is_reproducible_with_a_seeded_rng():
    mask = masked((300,))
    a = np.ones(300, np.float32)
    b = np.ones(300, np.float32)
    a[::3] = 4
    b[::3] = 4
    apply_fill("random", a, mask, rng=np.random.default_rng(9))
    apply_fill("random", b, mask, rng=np.random.default_rng(9))
    assert np.array_equal(a, b)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(FILL_NAMES), st.sampled_from(FLOATS + INTS), st.integers(0, 300), st.integers(0, 2**32 - 1))
def test_only_missing_elements_change(policy, dtype, n, seed):
    if policy == "nan" and not np.issubdtype(dtype, np.floating):
        return
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 100, n).astype(dtype)
    mask = rng.random(n) < 0.5
    orig = x.copy()
    last = rng.integers(0, 100, n).astype(dtype)
    apply_fill(policy, x, mask, last=last, rng=rng)
    assert np.array_equal(x[mask], orig[mask])
    if policy == "zero":
        assert not x[~mask].any()
    elif policy == "last":
        assert np.array_equal(x[~mask], last[~mask])
    elif policy == "nan":
        assert np.isnan(x[~mask]).all()
