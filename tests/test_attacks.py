"""Attacks in gradient space (aggregathor.attacks): each attack does what its paper says it does.

Small dimensions only; the rules attacked are the registered ones when present (the test naming a missing
rule is skipped with that name) and, for the line-search tests, small numpy rules defined here.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregathor import attacks, gars
from aggregathor.attacks import damage
from aggregathor.attacks.alie import alie_z

ALL = ["alie", "alie-opt", "gaussian", "inf", "ipm", "ipm-opt", "mimic", "nan", "reverse", "sign-flip"]
OPT = {"alie-opt": "alie", "ipm-opt": "ipm"}
H, F, D = 8, 3, 16  # honest workers, Byzantine workers, coordinates
N = H + F


def honest(seed: int = 0, h: int = H, d: int = D, dtype: type = np.float64) -> np.ndarray:
    """Honest gradients: a common mean (the true gradient) plus per-worker noise."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(1.0, 0.5, size=d)
    return (mean + rng.normal(0.0, 0.3, size=(h, d))).astype(dtype)


def np_median(x: np.ndarray) -> np.ndarray:
    return np.median(np.asarray(x), axis=0)


def np_krum(f: int):
    def rule(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        scores = np.sort(d2, axis=1)[:, 1 : len(x) - f - 1].sum(1)
        return x[int(np.argmin(scores))]

    return rule


def build(name: str, gar=None, **params) -> attacks.Attack:
    if name in OPT:
        params.setdefault("gar", gar if gar is not None else np_median)
    return attacks.get(name, **params)


def registered_rule(name: str, n: int, f: int) -> gars.GAR:
    if name not in gars.names():
        pytest.skip(f"aggregation rule {name!r} is not registered yet (registered: {', '.join(gars.names())})")
    return gars.get(name, n, f)


@pytest.fixture(scope="module")
def average() -> gars.GAR:
    return gars.get("average", N, F)


# ---------------------------------------------------------------------------------------------- registry
def test_registry_lists_every_attack():
    assert set(ALL) <= set(attacks.names())
    assert attacks.names() == sorted(attacks.names())


def test_unknown_name_and_parameter_errors():
    with pytest.raises(ValueError, match="unknown attack 'nope'.*alie"):
        attacks.get("nope")
    with pytest.raises(TypeError, match="unexpected arguments"):
        attacks.get("ipm", eps=1.0)
    for name, bad in [("gaussian", {"sigma": -1.0}), ("gaussian", {"sigma": math.inf}), ("reverse", {"k": 0}),
                      ("reverse", {"source": "other"}), ("ipm", {"epsilon": "x"}), ("alie", {"z": -0.5}),
                      ("inf", {"sign": 2}), ("mimic", {"target": -1}), ("alie-opt", {"num": 0}),
                      ("alie-opt", {"grid": []}), ("ipm-opt", {"start": 2.0, "stop": 1.0}),
                      ("ipm-opt", {"grid": [1.0, -1.0]})]:
        with pytest.raises(ValueError, match=name):
            build(name, **bad)
    with pytest.raises(TypeError, match="needs the rule"):
        attacks.get("alie-opt")
    with pytest.raises(TypeError, match="gar must be"):
        attacks.get("ipm-opt", gar=3)


@pytest.mark.parametrize("name", ALL)
def test_config_round_trip(name, average):
    a = build(name, gar=average)
    b = attacks.get(**a.get_config())
    assert type(b) is type(a) and b.get_config() == a.get_config()
    x = honest()
    np.testing.assert_array_equal(a(x, F, np.random.default_rng(3)), b(x, F, np.random.default_rng(3)))
    assert repr(a).startswith(type(a).__name__ + "(")


# ---------------------------------------------------------------------------------------------- interface
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shape_dtype_and_determinism(name, dtype):
    a = build(name)
    x = honest(dtype=dtype)
    out = a(x, F, np.random.default_rng(7))
    assert out.shape == (F, D) and out.dtype == dtype
    np.testing.assert_array_equal(out, a(x, F, np.random.default_rng(7)))  # NaN == NaN here
    np.testing.assert_array_equal(out, a(x, F, 7))  # an int seed is the same generator
    assert not np.shares_memory(out, x)
    empty = a(x, 0, np.random.default_rng(7))
    assert empty.shape == (0, D) and empty.dtype == dtype


@pytest.mark.parametrize("name", ALL)
def test_input_validation(name):
    a = build(name)
    with pytest.raises(ValueError, match=r"\(h, d\)"):
        a(np.zeros(D), F)
    with pytest.raises(ValueError, match=r"\(h, d\)"):
        a(np.zeros((2, 3, 4)), F)
    with pytest.raises(ValueError, match="d >= 1"):
        a(np.zeros((H, 0)), F)
    with pytest.raises(ValueError, match="real numbers"):
        a(np.full((H, D), "x"), F)
    for bad_f in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match="non-negative int"):
            a(honest(), bad_f)
    with pytest.raises(TypeError, match="rng"):
        a(honest(), F, rng="seed")


def test_honest_rows_needed():
    for name in ("nan", "inf", "gaussian"):  # forged without looking at the honest values
        assert attacks.get(name)(np.zeros((0, D), np.float32), F, 0).shape == (F, D)
    for name in ("alie", "ipm", "mimic", "reverse", "sign-flip", "alie-opt", "ipm-opt"):
        with pytest.raises(ValueError, match="at least 1 honest"):
            build(name)(np.zeros((0, D)), F)


def test_accepts_tensorflow_lists_and_ints():
    tf = pytest.importorskip("tensorflow")
    x = honest(dtype=np.float32)
    ipm = attacks.get("ipm", epsilon=0.5)
    np.testing.assert_array_equal(ipm(tf.constant(x), F), ipm(x, F))
    np.testing.assert_array_equal(ipm(list(x), F), ipm(x, F))
    out = ipm(np.arange(2 * D).reshape(2, D), 1)
    assert out.dtype == np.float64


# ---------------------------------------------------------------------------------------------- simple attacks
def test_nan_and_inf_are_non_finite(average):
    x = honest(dtype=np.float32)
    assert np.isnan(attacks.get("nan")(x, F)).all()
    assert np.isposinf(attacks.get("inf")(x, F)).all()
    assert np.isneginf(attacks.get("inf", sign=-1)(x, F)).all()
    for name in ("nan", "inf"):
        assert not np.isfinite(np.asarray(average(np.concatenate([x, attacks.get(name)(x, F)])))).any()
        assert damage(average, x, attacks.get(name)(x, F)) == math.inf


def test_gaussian_has_the_right_std():
    sigma = 7.5
    out = attacks.get("gaussian", sigma=sigma)(honest(), 4, np.random.default_rng(11))
    assert out.shape == (4, D)
    big = attacks.get("gaussian", sigma=sigma)(honest(d=5000), 4, np.random.default_rng(11))
    assert abs(big.std() / sigma - 1) < 0.03  # 20000 samples: the std estimate is within ~1%
    assert abs(big.mean()) < 0.03 * sigma
    assert attacks.get("gaussian").sigma == 200.0
    # independent of the honest values, independent across rows
    np.testing.assert_array_equal(big, attacks.get("gaussian", sigma=sigma)(honest(5, d=5000), 4, 11))
    assert abs(np.corrcoef(big[0], big[1])[0, 1]) < 0.1
    assert not np.array_equal(big, attacks.get("gaussian", sigma=sigma)(honest(d=5000), 4, 12))


@pytest.mark.parametrize(("name", "k"), [("sign-flip", 1.0), ("reverse", 100.0), ("reverse", 3.5)])
def test_negated_gradient_mean_source(name, k):
    x = honest()
    mu = x.mean(0)
    a = attacks.get(name) if name == "sign-flip" else attacks.get(name, k=k)
    out = a(x, F)
    for row in out:
        assert row @ mu < 0
        np.testing.assert_allclose(row @ mu, -k * (mu @ mu), rtol=1e-12)
        np.testing.assert_allclose(np.linalg.norm(row) / np.linalg.norm(mu), k, rtol=1e-12)
    np.testing.assert_allclose(out, np.tile(-k * mu, (F, 1)), rtol=1e-12)


@pytest.mark.parametrize(("name", "k"), [("sign-flip", 1.0), ("reverse", 10.0)])
def test_negated_gradient_own_source(name, k):
    x = honest(h=2)
    params = {"source": "own"} if name == "sign-flip" else {"source": "own", "k": k}
    out = attacks.get(name, **params)(x, 5)  # more attackers than honest rows: rows are reused in turn
    for j, row in enumerate(out):
        own = x[j % 2]
        np.testing.assert_allclose(row, -k * own, rtol=1e-12)
        assert row @ own < 0 and row @ x.mean(0) < 0
        np.testing.assert_allclose(np.linalg.norm(row) / np.linalg.norm(own), k, rtol=1e-12)
    # in a worker process: the worker's own gradient is the single honest row
    np.testing.assert_allclose(attacks.get(name, **params)(x[:1], 1), -k * x[:1])


# ---------------------------------------------------------------------------------------------- ALIE
@pytest.mark.parametrize(("n", "f", "expected"), [
    (50, 24, 1.7506860712521695),  # s = 2: Phi^-1(48/50)
    (20, 3, 0.2533471031357998),  # s = 8: Phi^-1(12/20)
    (11, 1, 0.11418529432127138),  # s = 5: Phi^-1(6/11)
    (10, 1, 0.0),  # s = 5: Phi^-1(1/2)
    (11, 3, 0.6045853465832371),  # s = 3: Phi^-1(8/11)
])
def test_alie_z_formula(n, f, expected):
    s = math.floor(n / 2 + 1) - f
    assert alie_z(n, f) == pytest.approx(NormalDist().inv_cdf((n - s) / n), abs=1e-12)
    assert alie_z(n, f) == pytest.approx(expected, abs=1e-9)


def test_alie_z_needs_a_byzantine_minority():
    with pytest.raises(ValueError, match=r"s = floor\(n/2 \+ 1\) - f >= 1"):
        alie_z(10, 6)
    x = honest(h=4)
    with pytest.raises(ValueError, match="pass z explicitly"):
        attacks.get("alie")(x, 6)
    assert np.isfinite(attacks.get("alie", z=1.0)(x, 6)).all()


@pytest.mark.parametrize("z", [None, 0.5, 2.0])
def test_alie_is_mu_minus_z_sigma_and_stealthy(z):
    x = honest(h=17)
    f = 3
    out = attacks.get("alie", z=z)(x, f)
    zz = alie_z(17 + f, f) if z is None else z
    mu, sigma = x.mean(0), x.std(0)
    np.testing.assert_allclose(out, np.tile(mu - zz * sigma, (f, 1)), rtol=1e-12, atol=1e-12)
    assert (out == out[0]).all()  # the f attackers agree
    # stealth: every coordinate within z honest standard deviations of the honest mean
    assert (np.abs(out - mu) <= zz * sigma * (1 + 1e-9) + 1e-12).all()
    if zz <= 1:  # ...and here inside the honest values' range, coordinate by coordinate
        assert ((out >= x.min(0)) & (out <= x.max(0))).all()


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 12), f=st.integers(1, 12), d=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_alie_and_ipm_formulas_property(h, f, d, seed):
    x = np.random.default_rng(seed).normal(size=(h, d))
    mu, sigma = x.mean(0), x.std(0)
    n, s = h + f, math.floor((h + f) / 2 + 1) - f
    if s >= 1:
        z = NormalDist().inv_cdf((n - s) / n)
        np.testing.assert_allclose(attacks.get("alie")(x, f), np.tile(mu - z * sigma, (f, 1)), atol=1e-12)
    else:
        with pytest.raises(ValueError):
            attacks.get("alie")(x, f)
    out = attacks.get("ipm", epsilon=0.3)(x, f)
    np.testing.assert_allclose(out @ mu, np.full(f, -0.3 * (mu @ mu)), atol=1e-12)


# ---------------------------------------------------------------------------------------------- IPM
@pytest.mark.parametrize("eps", [0.1, 1.0, 100.0])
def test_ipm_inner_product(eps):
    x = honest()
    mu = x.mean(0)
    a = attacks.get("ipm") if eps == 0.1 else attacks.get("ipm", epsilon=eps)
    out = a(x, F)
    np.testing.assert_allclose(out @ mu, np.full(F, -eps * (mu @ mu)), rtol=1e-12)
    np.testing.assert_allclose(out, np.tile(-eps * mu, (F, 1)), rtol=1e-12)


def test_ipm_reverses_the_average(average):
    x = honest()
    mu = x.mean(0)
    small = np.asarray(average(np.concatenate([x, attacks.get("ipm")(x, F)])))
    large = np.asarray(average(np.concatenate([x, attacks.get("ipm", epsilon=10.0)(x, F)])))
    assert small @ mu > 0 > large @ mu  # the aggregate turns against the gradient once f * eps > h


# ---------------------------------------------------------------------------------------------- mimic
def test_mimic_copies_an_honest_gradient():
    x = honest()
    out = attacks.get("mimic")(x, F)
    matches = [i for i in range(H) if (out[0] == x[i]).all()]
    assert len(matches) == 1 and (out == out[0]).all()
    for t in (0, 5):
        a = attacks.get("mimic", target=t)
        np.testing.assert_array_equal(a(x, F), np.tile(x[t], (F, 1)))
        assert a.last_target == t
    with pytest.raises(ValueError, match="not an honest row"):
        attacks.get("mimic", target=H)(x, F)


def test_mimic_picks_the_extreme_worker_along_the_top_principal_direction():
    rng = np.random.default_rng(4)
    x = 1.0 + 0.01 * rng.normal(size=(H, D))
    direction = rng.normal(size=D)
    spread = np.array([0.0, 1.0, -2.0, 0.5, -0.5, 3.0, -1.0, 0.2])  # worker 5 sticks out the most
    x += spread[:, None] * direction
    a = attacks.get("mimic")
    np.testing.assert_array_equal(a(x, F), np.tile(x[5], (F, 1)))
    assert a.last_target == 5
    x2 = 2 * x.mean(0) - x  # mirrored around the mean: same principal axis, opposite sign
    assert attacks.get("mimic")(x2, F).tolist() == np.tile(x2[5], (F, 1)).tolist()
    same = np.ones((H, D))  # no variance: the first worker
    m = attacks.get("mimic")
    m(same, F)
    assert m.last_target == 0


# ---------------------------------------------------------------------------------------------- optimal variants
def test_line_search_picks_the_argmax_of_its_grid():
    x = honest()
    rule = np_median
    for name, family, key in (("alie-opt", "alie", "z"), ("ipm-opt", "ipm", "epsilon")):
        a = attacks.get(name, gar=rule, start=0.05, stop=50.0, num=13)
        out = a(x, F)
        scales, damages = a.last_scales, a.last_damages
        assert scales is not None and damages is not None and len(scales) == len(damages)
        assert (np.diff(scales) > 0).all()
        expected = [damage(rule, x, attacks.get(family, **{key: s})(x, F)) for s in scales]
        np.testing.assert_allclose(damages, expected, rtol=1e-12)
        assert a.last_scale == scales[int(np.argmax(expected))]
        np.testing.assert_array_equal(out, attacks.get(family, **{key: a.last_scale})(x, F))
        np.testing.assert_allclose(np.geomspace(0.05, 50.0, 13), np.setdiff1d(scales, [a.default_scale(N, F)]))
        s2, d2 = a.search(x, F)
        np.testing.assert_array_equal(s2, scales)
        np.testing.assert_array_equal(d2, damages)


def test_line_search_explicit_grid_and_ties():
    x = honest()
    a = attacks.get("ipm-opt", gar=np_median, grid=[3.0, 0.5, 1.0, 1.0], include_default=False)
    a(x, F)
    np.testing.assert_array_equal(a.last_scales, [0.5, 1.0, 3.0])

    def const(m):  # a rule the attack cannot move: all scales tie
        return np.zeros(np.asarray(m).shape[1])

    b = attacks.get("alie-opt", gar=const, grid=[2.0, 1.0, 4.0], include_default=False)
    b(x, F)
    assert b.last_scale == 1.0  # ties go to the smallest (stealthiest) scale


@pytest.mark.parametrize("name", ["alie-opt", "ipm-opt"])
def test_optimal_variant_beats_the_default_scale(name, average):
    x = honest()
    family = attacks.get(OPT[name])
    rules = {"average": average, "np-median": np_median, "np-krum": np_krum(F)}
    for rule_name in ("median", "trimmed-mean", "meamed", "krum", "multi-krum", "bulyan", "geometric-median",
                      "centered-clipping"):
        if rule_name in gars.names():
            try:
                rules[rule_name] = gars.get(rule_name, N, F)
            except ValueError:  # the rule cannot tolerate F of N: nothing to attack
                pass
    gains = {}
    for rule_name, rule in rules.items():
        base = damage(rule, x, family(x, F))
        best = damage(rule, x, attacks.get(name, gar=rule)(x, F))
        assert best >= base * (1 - 1e-9) - 1e-12, rule_name
        gains[rule_name] = best - base
    assert gains["average"] > 0.1 * np.linalg.norm(x.mean(0))  # strictly more damage for some rule


def test_alie_opt_finds_an_interior_optimum_against_krum():
    """Against Krum, too large a shift gets the attackers filtered out: the best z is inside the grid."""
    x = honest()
    a = attacks.get("alie-opt", gar=np_krum(F))
    a(x, F)
    assert a.last_scales[0] < a.last_scale < a.last_scales[-1]
    assert a.last_damages.max() > a.last_damages[-1]
    assert a.last_damages.max() > damage(np_krum(F), x, attacks.get("alie")(x, F))


def test_optimal_variant_checks_the_rule(average):
    x = honest()
    with pytest.raises(ValueError, match=r"built for n=11 gradients.*h \+ f = 8 \+ 2 = 10"):
        attacks.get("alie-opt", gar=average)(x, 2)
    a = attacks.get("ipm-opt", gar={"name": "average", "n": N, "f": F})
    assert a.get_config()["gar"] == {"name": "average", "n": N, "f": F}
    assert a(x, F).shape == (F, D) and a.last_scale == a.last_scales.max()  # the mean only gets worse
    assert a(x, 0).shape == (0, D)


# ---------------------------------------------------------------------------------------------- average vs median
def test_average_is_wrecked_but_median_is_not(average):
    x = honest(dtype=np.float32)
    mu = x.mean(0, dtype=np.float64)
    byz = {"reverse": attacks.get("reverse", k=1e3)(x, F),
           "gaussian": attacks.get("gaussian", sigma=1e4)(x, F, np.random.default_rng(0))}
    for name, b in byz.items():
        assert damage(average, x, b) > 100 * np.linalg.norm(mu), name
    median = registered_rule("median", N, F)
    # with F < N/2 each coordinate of the median stays within the honest values of that coordinate
    bound = np.linalg.norm(np.maximum(x.max(0) - mu, mu - x.min(0)))
    for name, b in byz.items():
        dm = damage(median, x, b)
        assert dm <= bound * (1 + 1e-5), name
        assert dm < 0.01 * damage(average, x, b), name
