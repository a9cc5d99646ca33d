"""With f Byzantine inputs, the robust rules stay within their guaranteed, *deterministic* bounds.

The honest rows H (h = n - f of them) are drawn around a common gradient; the f Byzantine rows B are forged by
hand (far away at 1e6, colluding identical points, points just outside the honest cluster, NaN, +-inf) and
by the registered attacks (ALIE, IPM, ...; the ``-opt`` ones line-searched against the rule under test). They
are placed first (to win any tie-break towards low indices) or shuffled among the honest rows.

Notation: :math:`\\bar h` the honest mean, :math:`\\Delta = \\max_{i,j \\in H} \\|h_i - h_j\\|` the honest
diameter, :math:`[\\min_H, \\max_H]` the honest range of a coordinate, :math:`w = \\max_H - \\min_H` its width.

The bounds checked, one per rule, each derived from the paper's argument for any input (not in expectation):

- median, trimmed-mean (``b >= f``): every coordinate within :math:`[\\min_H, \\max_H]` (at most f of the
  ``n >= 2f + 1`` values are Byzantine, so the median and every kept order statistic lie between honest ones).
- meamed: every coordinate within :math:`[\\min_H - w, \\max_H + w]`. Not within the honest range: the
  median is, but a Byzantine value as far from it as the farthest honest one may be among the n - f
  nearest (``test_meamed_can_leave_the_honest_range`` is a counterexample).
- krum, multi-krum (``m <= n - f``): :math:`\\|F - \\bar h\\| \\le (\\sqrt{n - f - 2} + 1)\\,\\Delta`.
  An honest row's score is at most :math:`(n - f - 2)\\Delta^2` (its ``n - f - 2`` nearest neighbours are no
  farther than its ``n - f - 1`` honest peers), so every selected row has a score at most that; a selected
  Byzantine row has at least ``n - 2f - 1 >= 1`` honest rows among its neighbours (Blanchard et al.,
  NeurIPS 2017, proof of Proposition 1), one of them within :math:`\\sqrt{n - f - 2}\\,\\Delta`.
- bulyan: every coordinate within :math:`[\\min_H - \\rho - w'/\\beta, \\max_H + \\rho + w'/\\beta]` with
  :math:`\\rho = \\sqrt{n - f - 2}\\,\\Delta`, :math:`w' = w + 2\\rho`, :math:`\\beta = n - 4f`. Each iterated Krum
  step with :math:`|R| \\ge 2f + 2` remaining rows selects a row within :math:`\\rho` of an honest one (the Krum
  argument with :math:`|R| - f - 2 \\ge f` neighbours); only the last step (:math:`|R| = 2f + 1`, ``f - 1``
  neighbours) may pick an arbitrary row. With at most one such row among the :math:`\\theta \\ge 3` selected,
  the coordinate median and the :math:`\\beta` values closest to it stay within :math:`w'` of
  :math:`[\\min_H - \\rho, \\max_H + \\rho]`, and at most one of the :math:`\\beta` averaged values is outside.
  (El Mhamdi et al., ICML 2018, state their guarantee in expectation, :math:`O(\\sigma/\\sqrt d)` per coordinate.)
- geometric-median: :math:`\\|z - \\bar h\\| \\le C_\\alpha \\max_H \\|h - \\bar h\\|` with :math:`\\alpha = f/n`,
  :math:`C_\\alpha = (1 - \\alpha)/\\sqrt{1 - 2\\alpha}` (Minsker, Bernoulli 2015, Lemma 2.1; the robustness
  argument of Pillutla et al., IEEE TSP 2022). This holds for the exact geometric median; it is checked
  with enough Weiszfeld iterations to converge, and, separately, with the rule's defaults.
- centered-clipping: from :math:`v_0`, with every honest row within :math:`\\tau` of every iterate,
  :math:`\\|v_{l+1} - \\bar h\\| \\le \\frac fn (\\|v_l - \\bar h\\| + \\tau)` (Karimireddy et al., ICML 2021: honest
  rows are not clipped, each Byzantine row moves the iterate by at most :math:`\\tau/n`).
- average, average-nan: broken by one Byzantine row (Blanchard et al., Lemma 1); tests document it.

Rules documented ``nan_robust`` must also stay within their bound (and finite) with NaN or +-inf rows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import aggregathor.attacks as attacks
import aggregathor.gars as gars
import aggregathor.gars.reference as ref

REGISTERED = gars.names()
N = 11
D = 6
DTYPE = np.float32
EPS = float(np.finfo(DTYPE).eps)


# ===================================================================================== inputs
def honest_rows(seed: int, h: int, d: int = D) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=d) + 0.1 * rng.normal(size=(h, d))).astype(np.float64)


def _unit(rng: np.random.Generator, d: int) -> np.ndarray:
    u = rng.normal(size=d)
    return u / np.linalg.norm(u)


def diameter(h: np.ndarray) -> float:
    return max(float(np.linalg.norm(a - b)) for a in h for b in h)


HAND_ATTACKS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "far": lambda h, f, rng: 1e6 * rng.choice([-1.0, 1.0], size=(f, h.shape[1])),
    "far-colluding": lambda h, f, rng: np.tile(h.mean(0) + 1e6 * _unit(rng, h.shape[1]), (f, 1)),
    "colluding-near": lambda h, f, rng: np.tile(h.mean(0) + 2 * diameter(h) * _unit(rng, h.shape[1]), (f, 1)),
    "just-outside": lambda h, f, rng: np.tile(h.max(0) + 0.01 * (h.max(0) - h.min(0)), (f, 1)),
    "just-outside-low": lambda h, f, rng: np.tile(h.min(0) - 0.01 * (h.max(0) - h.min(0)), (f, 1)),
    "just-outside-ball": lambda h, f, rng: (
        h.mean(0)
        + 1.01 * max(np.linalg.norm(h - h.mean(0), axis=1)) * np.array([_unit(rng, h.shape[1]) for _ in range(f)])
    ),
    "opposite": lambda h, f, rng: np.tile(-10 * h.mean(0), (f, 1)),
}
NONFINITE_ATTACKS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "nan": lambda h, f, rng: np.full((f, h.shape[1]), np.nan),
    "+inf": lambda h, f, rng: np.full((f, h.shape[1]), np.inf),
    "-inf": lambda h, f, rng: np.full((f, h.shape[1]), -np.inf),
    "mixed": lambda h, f, rng: rng.choice([np.nan, np.inf, -np.inf, 1e6], size=(f, h.shape[1])),
}
# gradient-space attacks (the data-space ones, ``space == "data"``, poison a batch instead); nan/inf are above
REGISTERED_ATTACKS = [
    a for a in attacks.names() if a not in ("nan", "inf") and getattr(attacks.registry()[a], "space", "") != "data"
]


def assemble(h: np.ndarray, b: np.ndarray, placement: str, rng: np.random.Generator) -> np.ndarray:
    if placement == "first":
        x = np.concatenate([b, h])
    else:
        x = np.concatenate([h, b])
        x = x[rng.permutation(len(x))]
    return x.astype(DTYPE)


# ===================================================================================== bounds
def _slack(*arrays: Any) -> float:
    """Rounding allowance of a float32 computation on these values (the bounds are exact in float64)."""
    return 64 * EPS * max(float(np.max(np.abs(a))) for a in arrays)


def bound_hull(h: np.ndarray, out: np.ndarray, n: int, f: int, params: dict[str, Any]) -> str | None:
    lo, hi = h.min(0), h.max(0)
    s = _slack(h)
    if np.all((out >= lo - s) & (out <= hi + s)):
        return None
    return f"outside the honest range: out={out}, range=[{lo}, {hi}]"


def bound_meamed(h: np.ndarray, out: np.ndarray, n: int, f: int, params: dict[str, Any]) -> str | None:
    lo, hi = h.min(0), h.max(0)
    w = hi - lo
    s = _slack(h)
    if np.all((out >= lo - w - s) & (out <= hi + w + s)):
        return None
    return f"outside the honest range widened by its width: out={out}, range=[{lo}, {hi}]"


def krum_radius(h: np.ndarray, n: int, f: int) -> float:
    return (math.sqrt(n - f - 2) + 1) * diameter(h)


def bound_krum(h: np.ndarray, out: np.ndarray, n: int, f: int, params: dict[str, Any]) -> str | None:
    dev = float(np.linalg.norm(out - h.mean(0)))
    r = krum_radius(h, n, f)
    return None if dev <= r + _slack(h) else f"|F - mean(H)| = {dev:.4g} > (sqrt(n-f-2)+1) * diameter = {r:.4g}"


def bound_bulyan(h: np.ndarray, out: np.ndarray, n: int, f: int, params: dict[str, Any]) -> str | None:
    rho = math.sqrt(max(n - f - 2, 0)) * diameter(h)
    lo, hi = h.min(0) - rho, h.max(0) + rho
    beta = n - 4 * f
    w = hi - lo
    s = _slack(h)
    if np.all((out >= lo - w / beta - s) & (out <= hi + w / beta + s)):
        return None
    return f"outside [min_H - rho - w'/beta, max_H + rho + w'/beta]: out={out}, lo={lo - w / beta}, hi={hi + w / beta}"


def gm_radius(h: np.ndarray, n: int, f: int) -> float:
    alpha = f / n
    return (1 - alpha) / math.sqrt(1 - 2 * alpha) * float(max(np.linalg.norm(h - h.mean(0), axis=1)))


def bound_geometric_median(h: np.ndarray, out: np.ndarray, n: int, f: int, params: dict[str, Any]) -> str | None:
    dev = float(np.linalg.norm(out - h.mean(0)))
    r = gm_radius(h, n, f)
    return None if dev <= r + _slack(h) else f"|z - mean(H)| = {dev:.4g} > C_alpha * max|h - mean(H)| = {r:.4g}"


def bound_centered_clipping(h: np.ndarray, out: np.ndarray, n: int, f: int, params: dict[str, Any]) -> str | None:
    tau = params.get("tau", 10.0)
    iterations = params.get("iterations", 1)
    center = params.get("center", "median")
    mean = h.mean(0)
    spread = float(max(np.linalg.norm(h - mean, axis=1)))
    if isinstance(center, str) and center == "median":
        # the coordinate-wise median lies in the honest range of every coordinate, and so does the mean
        e = float(np.linalg.norm(h.max(0) - h.min(0)))
    else:
        e = float(np.linalg.norm((np.zeros_like(mean) if center == "zero" else np.asarray(center)) - mean))
    for _ in range(iterations):
        assert spread + e <= tau, "test setup: tau must exceed the honest rows' distance to every iterate"
        e = f / n * (e + tau)
    dev = float(np.linalg.norm(out - mean))
    return None if dev <= e + _slack(h, tau) else f"|v_L - mean(H)| = {dev:.4g} > {e:.4g}"


# (rule, parameters, bound): the rules a bound is stated for, with the parameters it is checked under
CONFIGS: list[tuple[str, dict[str, Any], Callable[..., str | None]]] = [
    ("median", {}, bound_hull),
    ("trimmed-mean", {}, bound_hull),
    ("meamed", {}, bound_meamed),
    ("krum", {}, bound_krum),
    ("multi-krum", {}, bound_krum),
    ("bulyan", {}, bound_bulyan),
    ("bulyan", {"variant": "multi-krum"}, bound_bulyan),
    ("geometric-median", {"iterations": 100, "nu": 1e-6}, bound_geometric_median),
    ("centered-clipping", {}, bound_centered_clipping),
    ("centered-clipping", {"tau": 10.0, "iterations": 3, "center": "zero"}, bound_centered_clipping),
    ("draco", {}, bound_hull),  # N = 11: one group of 11 (f = 5); distinct honest rows: the median fallback
]
BOUNDED = {name for name, _, _ in CONFIGS}
ROBUST = [(name, params, bound) for name, params, bound in CONFIGS if name in REGISTERED]
IDS = [name + "".join(f"-{k}={v}" for k, v in params.items()) for name, params, _ in ROBUST]


@functools.cache
def max_f(name: str, n: int = N) -> int:
    """The largest f the rule accepts for n rows."""
    best = -1
    for f in range(n):
        try:
            gars.get(name, n, f)
        except ValueError:
            continue
        best = f
    assert best >= 1, f"{name} accepts no f >= 1 for n={n}"
    return best


@functools.cache
def built(name: str, n: int, f: int, params: tuple[tuple[str, Any], ...] = ()) -> gars.GAR:
    return gars.get(name, n, f, **dict(params))


def _run(
    name: str, params: dict[str, Any], bound: Callable[..., str | None], attack: str, placement: str, seed: int
) -> None:
    f = max_f(name)
    rule = built(name, N, f, tuple(params.items()))
    rng = np.random.default_rng(seed)
    h = honest_rows(seed, N - f)
    if attack in HAND_ATTACKS:
        b = HAND_ATTACKS[attack](h, f, rng)
    elif attack in NONFINITE_ATTACKS:
        b = NONFINITE_ATTACKS[attack](h, f, rng)
    else:
        kw = {"gar": rule} if attack.endswith("-opt") else {}
        b = attacks.get(attack, **kw)(h.astype(DTYPE), f, rng)
    x = assemble(h, b, placement, rng)
    out = np.asarray(rule(x), dtype=np.float64)
    assert np.all(np.isfinite(out)), f"{name}{params} returned a non-finite aggregate under {attack}: {out}"
    why = bound(h.astype(DTYPE).astype(np.float64), out, N, f, params)
    assert why is None, f"{name}{params} (n={N}, f={f}) under {attack} ({placement}): {why}"


# ============================================================================ the robust rules
@pytest.mark.parametrize("placement", ["first", "shuffled"])
@pytest.mark.parametrize("attack", list(HAND_ATTACKS))
@pytest.mark.parametrize(("name", "params", "bound"), ROBUST, ids=IDS)
def test_robust_rule_within_bound(name: str, params: dict[str, Any], bound: Any, attack: str, placement: str) -> None:
    for seed in range(3):
        _run(name, params, bound, attack, placement, seed)


@pytest.mark.parametrize("attack", REGISTERED_ATTACKS)
@pytest.mark.parametrize(("name", "params", "bound"), ROBUST, ids=IDS)
def test_robust_rule_within_bound_registered_attacks(
    name: str, params: dict[str, Any], bound: Any, attack: str
) -> None:
    _run(name, params, bound, attack, "shuffled", 7)


@pytest.mark.parametrize("attack", list(NONFINITE_ATTACKS))
@pytest.mark.parametrize(("name", "params", "bound"), ROBUST, ids=IDS)
def test_nan_robust_rule_survives_nonfinite_rows(name: str, params: dict[str, Any], bound: Any, attack: str) -> None:
    if not gars.registry()[name].nan_robust:
        pytest.skip(f"{name} is not documented nan_robust")
    for placement in ("first", "shuffled"):
        _run(name, params, bound, attack, placement, 3)


def test_every_registered_rule_is_classified() -> None:
    """Each registered rule has a robustness bound here, or is documented as broken by one input."""
    broken = {"average", "average-nan"}
    unknown = [n for n in REGISTERED if n not in BOUNDED and n not in broken]
    assert not unknown, f"rules without a robustness bound in this file: {unknown}"


# ================================================================= documented failures and limits
def test_average_is_broken_by_one_byzantine_input() -> None:
    h = honest_rows(0, N - 1)
    x = np.concatenate([h, np.full((1, D), 1e6)]).astype(DTYPE)
    out = np.asarray(gars.get("average", N, 1)(x), dtype=np.float64)
    # one row out of 11 at 1e6 drags every coordinate to about 1e6 / 11
    assert np.linalg.norm(out - h.mean(0)) > 1e4 * diameter(h)
    np.testing.assert_allclose(out, (h.sum(0) + 1e6) / N, rtol=1e-5)
    # and a single NaN poisons it
    x[3, 0] = np.nan
    assert np.isnan(np.asarray(gars.get("average", N, 1)(x))[0])


def test_average_nan_survives_erasures_but_not_byzantine_values() -> None:
    h = honest_rows(1, N - 2)
    x = np.concatenate([h, np.full((1, D), np.nan), np.full((1, D), np.inf)]).astype(DTYPE)
    rule = gars.get("average-nan", N, 2)
    np.testing.assert_allclose(np.asarray(rule(x)), h.mean(0), rtol=1e-5)
    x[-1] = 1e6
    assert np.linalg.norm(np.asarray(rule(x), dtype=np.float64) - h.mean(0)) > 1e4 * diameter(h)


def test_meamed_can_leave_the_honest_range() -> None:
    """Honest 0, 0.1, 10 and two Byzantine -9.9 (n = 5, f = 2): the median is 0, the 3 values nearest to it
    are 0, 0.1 and -9.9 (distance 9.9 < 10), so MeaMed is (0 + 0.1 - 9.9) / 3 = -3.2667 < 0 = min of the honest.
    Hence the weaker bound [min_H - w, max_H + w] above, which is what Xie et al.'s argument gives."""
    x = np.array([[-9.9], [-9.9], [0.0], [0.1], [10.0]])
    expect = (0.0 + 0.1 - 9.9) / 3
    np.testing.assert_allclose(ref.meamed(x, 2), [expect], rtol=1e-12)
    if "meamed" in REGISTERED:
        np.testing.assert_allclose(np.asarray(gars.get("meamed", 5, 2)(x.astype(DTYPE))), [expect], rtol=1e-6)
    assert bound_meamed(x[2:], np.array([expect]), 5, 2, {}) is None
    assert bound_hull(x[2:], np.array([expect]), 5, 2, {}) is not None


@pytest.mark.skipif("geometric-median" not in REGISTERED, reason="geometric-median not registered")
@pytest.mark.parametrize("f", [1, 2, 5])
def test_geometric_median_defaults_against_a_far_attacker(f: int) -> None:
    """The rule's defaults (smoothed Weiszfeld from the mean, 100 iterations) against f colluding rows at 1e6.

    Weiszfeld from the mean only contracts a far start geometrically: with f = 5 of 11 the iterate is still
    about 4e5 away from the honest rows after 8 steps, nowhere near the geometric median the bound is about.
    """
    h = honest_rows(5, N - f)
    x = np.concatenate([np.full((f, D), 1e6), h]).astype(DTYPE)
    out = np.asarray(gars.get("geometric-median", N, f)(x), dtype=np.float64)
    why = bound_geometric_median(h.astype(DTYPE).astype(np.float64), out, N, f, {})
    assert why is None, f"geometric-median with its default parameters (n={N}, f={f}): {why}"
