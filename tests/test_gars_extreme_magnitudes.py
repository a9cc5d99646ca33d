"""Every rule and wrapper at any finite magnitude (issue 14, requirement 6): a Byzantine worker chooses its
numbers, up to float32's maximum (3.4e38).

The float32 arithmetic of the fast rules must neither overflow (a sum of huge values whose mean is finite,
a squared norm, a difference ``x_i - c`` of opposite signs) nor flush a tiny factor to zero (a clip scale
``C / ||x_i||``, centered clipping's ``tau / ||x_i - v||``, a Weiszfeld weight ``1 / ||z - x_i||``: below
1.18e-38 they become 0 in float32, and a huge row would be zeroed instead of clipped).

Two parts:

1. The issue's own examples, by hand (``test_issue_*``).
2. Hypothesis property tests: matrices whose rows reach magnitudes up to 3e38 (huge Byzantine rows, rows at
   exactly +-3e38, every row huge around a far centre, every row at its own magnitude), through every
   registered rule and every wrapper (followed by a rule), against the float64 references of
   :mod:`aggregathor.gars.reference` with the error bounds of ``tests/test_gars_reference.py`` (which
   this file imports: the same checkers, the same admissible answers on ties). The output must be finite
   (no input is non-finite here). Clipping and ARC rows are checked relative to the clipped row itself (a
   tolerance relative to the huge input row would accept the zero row this file is about).

Values are drawn at or above 1e-6 in magnitude: values below about 1e-37 may be flushed to zero by the exact
power-of-two scalings (a limit documented in the rules' docstrings, an absolute error of that size).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st
from test_gars_reference import (
    CHECKERS,
    SETTINGS,
    _assert_close,
    _eps,
    built,
    check_wrapper,
    config_pool,
    wrapper_pool,
)

import aggregathor.gars as gars
import aggregathor.gars.reference as ref
from aggregathor.gars import wrappers as gw

#: float32's largest finite value is 3.4028235e38; the inputs stay at or below this.
BIG = 3e38
RULES = [name for name in gars.names() if name in CHECKERS]
WRAPPERS = [name for name in gw.names() if name in ref.WRAPPERS]
KINDS = ("huge-rows", "at-max", "far-centre", "own-magnitude")


def _f32(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _run(name: str, x: Any, f: int, pre: tuple[Any, ...] = (), **params: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(fast output, float64 reference)`` of ``name`` behind ``pre`` on the float32 matrix ``x``."""
    x = _f32(x)
    out = np.asarray(built(name, x.shape[0], f, pre=pre, **params)(x), dtype=np.float64)
    return out, ref.compose(name, x.astype(np.float64), f, list(pre), **params)


# ===================================================================================== by hand
def test_issue_static_clipping_of_a_huge_row_has_norm_c() -> None:
    # norm 5.2e38: c / norm = 1.9e-39 is below float32's smallest normal number; it used to flush to 0
    x = [[3e38, 3e38, -3e38], [1.0, 0.0, 0.0]]
    stage = built("average", 2, 0, pre=({"name": "clipping", "c": 1.0},)).wrappers[0]
    out = np.asarray(stage(_f32(x)), dtype=np.float64)
    np.testing.assert_allclose(out, ref.clipping(np.array(x), c=1.0), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out[0]), 1.0, rtol=1e-6)


def test_clipping_by_a_factor_near_one_does_not_overflow() -> None:
    # c / ||x|| = 0.9 for a row at 3e38: written as two factors, the first must not exceed 1 (3e38 * 1.8 = inf)
    x = [[3e38], [1.0]]
    stage = built("average", 2, 0, pre=({"name": "clipping", "c": 2.7e38},)).wrappers[0]
    out = np.asarray(stage(_f32(x)), dtype=np.float64)
    np.testing.assert_allclose(out, ref.clipping(_f32(x).astype(np.float64), c=2.7e38), rtol=1e-6)


def test_issue_centered_clipping_from_zero() -> None:
    # tau / ||3e37|| = 1.7e-38 flushed to 0 gave (1 + 1 + 0) / 3 = 0.333; the paper gives (1 + 1 + tau) / 3
    out, expect = _run("centered-clipping", [[1.0], [1.0], [3e37]], 1, tau=0.5, center="zero")
    np.testing.assert_allclose(expect, [0.5], rtol=1e-12)  # each row clipped to tau = 0.5 around 0
    np.testing.assert_allclose(out, expect, rtol=1e-6)
    # opposite signs near the maximum: x_i - v overflows float32 (v = the median, 3e38); each of the two
    # rows at -3e38 still pulls by tau / n: 3e38 - 2 * 1e38 / 5 = 2.6e38
    out, expect = _run("centered-clipping", [[3e38], [3e38], [3e38], [-3e38], [-3e38]], 2, tau=1e38)
    np.testing.assert_allclose(expect, [2.6e38], rtol=1e-6)
    np.testing.assert_allclose(out, expect, rtol=1e-6)


def test_issue_geometric_median_with_a_huge_row() -> None:
    # the Weiszfeld weight of (3e37, 3e37) is ~2e-38: flushed to 0 it gave (1/3, 1/3); the paper (0.5, 0.5)
    out, expect = _run("geometric-median", [[0, 0], [1, 0], [0, 1], [3e37, 3e37]], 1)
    np.testing.assert_allclose(expect, [0.5, 0.5], atol=1e-6)
    np.testing.assert_allclose(out, expect, atol=1e-6)


def test_issue_nnm_keeps_a_finite_huge_row_finite() -> None:
    # squared norm 1.8e75 overflows float32: the row used to become NaN
    out, expect = _run("average", [[1, 1], [1, 2], [3e37, 3e37]], 0, pre=("nnm",))
    assert np.all(np.isfinite(out)), out
    np.testing.assert_allclose(out, expect, rtol=1e-6)


@pytest.mark.parametrize(
    ("name", "pre"),
    [("average", ()), ("average-nan", ()), ("trimmed-mean", ()), ("meamed", ()), ("median", ()),
     ("average", ({"name": "bucketing", "s": 2, "permutation": (0, 1, 2, 3, 4)},))],
)
def test_issue_means_of_huge_values_do_not_overflow(name: str, pre: tuple[Any, ...]) -> None:
    # the mean of values near 3e38 is finite; their float32 sum is not
    out, expect = _run(name, [[3e38, -3e38], [3e38, -3e38], [3e38, -3e38], [-1.0, 2.0], [1.0, 3e38]], 1, pre)
    np.testing.assert_allclose(out, expect, rtol=1e-6)


# ================================================================================== properties
def draw_extreme(data: st.DataObject, kind: str, n: int, f: int, d: int, dtype: str, any_count: bool) -> np.ndarray:
    """An (n, d) finite matrix of ``dtype`` with entries up to 3e38 in magnitude, of one of :data:`KINDS`.

    ``huge-rows``: up to ``f`` rows (``n`` when ``any_count``) of norm 1e19 to 3e38 among ordinary rows;
    ``at-max``: those rows at exactly +-3e38; ``far-centre``: a tight cluster far from 0 (1e30 to 1e38, relative
    spread 1e-4 to 0.1) with such rows of the other sign; ``own-magnitude``: every row at its own magnitude
    between 1e-3 and 3e38.
    """
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    x = rng.normal(size=(n, d)) * 10.0 ** rng.uniform(-3, 3)
    count = data.draw(st.integers(0, n if any_count else f), label="huge rows")
    rows = rng.choice(n, size=count, replace=False)
    if kind == "huge-rows":
        for r in rows:
            x[r] = rng.normal(size=d) * 10.0 ** rng.uniform(19, np.log10(BIG))
    elif kind == "at-max":
        x[rows] = BIG * rng.choice([-1.0, 1.0], size=(count, d))
    elif kind == "far-centre":
        base = 10.0 ** rng.uniform(30, np.log10(BIG) - 0.5) * rng.choice([-1.0, 1.0], size=d)
        x = base * (1.0 + 10.0 ** rng.uniform(-4, -1) * rng.normal(size=(n, d)))
        x[rows] = -np.sign(base) * BIG * rng.uniform(0.5, 1.0, size=(count, d))
    else:
        x = rng.normal(size=(n, d)) * 10.0 ** rng.uniform(-3, np.log10(BIG), size=(n, 1))
    x = np.clip(x, -BIG, BIG)
    x = np.where(np.abs(x) < 1e-6, 0.0, x)  # flush-to-zero territory is not what this file checks
    note(f"kind={kind} huge rows={count} max |x|={np.abs(x).max():.3g}")
    return x.astype(dtype)


#: Deterministic (derandomized) so that an expected failure fails every time; few examples: XLA compiles
#: per configuration and the geometric median's checker reruns the reference per iteration.
EXTREME = settings(SETTINGS, max_examples=3, derandomize=True)
MATRICES = 2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", RULES)
@EXTREME
@given(data=st.data())
def test_rule_at_any_magnitude_matches_reference(name: str, kind: str, data: st.DataObject) -> None:
    n, f, d, dtype, items = data.draw(st.sampled_from(config_pool(name)), label="n, f, d, dtype, params")
    params = {k: np.array(v) if isinstance(v, tuple) else v for k, v in items}
    rule = built(name, n, f, **params)
    eps = _eps(dtype)
    for _ in range(MATRICES):
        x = draw_extreme(data, kind, n, f, d, dtype, any_count=name in ("average", "average-nan"))
        out = np.asarray(rule(x), dtype=np.float64)
        assert np.all(np.isfinite(out)), f"{name}: non-finite output {out.tolist()[:8]} on finite rows"
        CHECKERS[name](x.astype(np.float64), f, out, eps, **params)


def check_scaled_rows(
    wrapper: str, x: np.ndarray, f: int, mixed: np.ndarray, eps: float, params: dict[str, Any]
) -> None:
    """Clipping/ARC: each output row within a few roundings of the float64 clipped row, relative to the clipped
    row itself (the norm is a float32 sum of d squares: ``d eps`` relative)."""
    expect = ref.WRAPPERS[wrapper](x, f, **params)
    tol = (2 * x.shape[1] + 8) * eps * np.abs(expect)
    _assert_close(wrapper, mixed.ravel(), expect.ravel(), tol.ravel())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wrapper", WRAPPERS)
@EXTREME
@given(data=st.data())
def test_wrapper_then_rule_at_any_magnitude(wrapper: str, kind: str, data: st.DataObject) -> None:
    """The wrapper's rows against its reference, then the rule on exactly the rows the wrapper produced."""
    inner, n, f, d, dtype, items = data.draw(st.sampled_from(wrapper_pool(wrapper)), label="configuration")
    params = dict(items)
    rule = built(inner, n, f, pre=({"name": wrapper, **params},))
    stage = rule.wrappers[0]
    eps = _eps(dtype)
    for _ in range(MATRICES):
        x = draw_extreme(data, kind, n, f, d, dtype, any_count=False)
        out = np.asarray(rule(x), dtype=np.float64)
        mixed = np.asarray(stage(x), dtype=np.float64)
        assert np.all(np.isfinite(mixed)), f"{wrapper}: non-finite rows from finite ones: {mixed.tolist()[:4]}"
        assert np.all(np.isfinite(out)), f"{wrapper} -> {inner}: non-finite output {out.tolist()[:8]}"
        if wrapper in ("clipping", "arc"):
            check_scaled_rows(wrapper, x.astype(np.float64), f, mixed, eps, params)
        else:
            check_wrapper(wrapper, x.astype(np.float64), f, mixed, eps, params)
        CHECKERS[inner](mixed, f, out, 2 * eps)
