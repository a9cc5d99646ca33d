"""Draco (Chen et al., ICML 2018, repetition code): majority decoding per group of 2f + 1, the median fallback,
its bound, its float64 reference, and the workers' shared batch streams (data assignment, end to end)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aggregathor.attacks as attacks
import aggregathor.gars as gars
import aggregathor.gars.reference as ref
from aggregathor.assignment import data_assignment, redundancy
from aggregathor.config import ConfigError, TrainConfig
from aggregathor.gars.draco import mean_factors


@functools.cache
def draco(n: int, f: int) -> gars.GAR:
    return gars.get("draco", n, f)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.int32)


def honest_mean(h: np.ndarray) -> np.ndarray:
    """The mean of the groups' gradients in float32 as the rule defines it (:func:`mean_factors`): each times an
    exact power of two, summed in group order, times the rounded 1/G over that power of two."""
    scale, back = (np.float32(v) for v in mean_factors(len(h)))
    acc = h[0] * scale
    for row in h[1:]:
        acc = acc + row * scale
    return acc * back


def _reverse(h: np.ndarray, f: int, rng: np.random.Generator) -> np.ndarray:
    return np.tile(-h[0], (f, 1))


HAND = {
    "nan": lambda h, f, rng: np.full((f, h.shape[1]), np.nan, np.float32),
    "inf": lambda h, f, rng: np.full((f, h.shape[1]), np.inf, np.float32),
    "reverse": _reverse,
    "far": lambda h, f, rng: (1e30 * rng.choice([-1.0, 1.0], size=(f, h.shape[1]))).astype(np.float32),
    "near-copy": lambda h, f, rng: np.tile(np.nextafter(h[0], np.float32(np.inf)), (f, 1)),
    "partial-nan": lambda h, f, rng: np.where(rng.random((f, h.shape[1])) < 0.5, np.nan, h[0]).astype(np.float32),
}
GRADIENT_ATTACKS = [a for a in attacks.names()
                    if getattr(attacks.registry()[a], "space", "gradient") != "data" and not a.endswith("-opt")]


def byzantine_rows(name: str, h: np.ndarray, f: int, rng: np.random.Generator) -> np.ndarray:
    if name in HAND:
        return HAND[name](h, f, rng)
    return np.asarray(attacks.get(name)(h, f, rng=rng), np.float32)


def coded(h: np.ndarray, f: int, attack: str, rng: np.random.Generator) -> np.ndarray:
    """Each group's 2f + 1 copies of its gradient ``h[g]``, f of them replaced by the attack, at random places."""
    r = 2 * f + 1
    rows = []
    for g in range(len(h)):
        group = np.tile(h[g], (r, 1))
        group[rng.choice(r, size=f, replace=False)] = byzantine_rows(attack, group[: f + 1], f, rng)
        rows.append(group)
    return np.concatenate(rows).astype(np.float32)


# ========================================================================== majority decoding is exact
@pytest.mark.parametrize("attack", sorted(set(HAND) | set(GRADIENT_ATTACKS)))
@pytest.mark.parametrize(("f", "groups"), [(1, 3), (2, 2), (3, 1)])
def test_f_byzantine_per_group_leave_the_honest_mean_bitwise(attack: str, f: int, groups: int) -> None:
    rng = np.random.default_rng(f * 100 + groups)
    h = (rng.normal(size=(groups, 37)) * 10.0 ** rng.uniform(-3, 3, size=(groups, 1))).astype(np.float32)
    x = coded(h, f, attack, rng)
    out = np.asarray(draco(len(x), f)(x))
    np.testing.assert_array_equal(bits(out), bits(honest_mean(h)))
    assert all(i is not None for i in ref.draco_majority(x, f))


def test_majority_row_is_returned_bit_for_bit_where_the_median_would_round() -> None:
    """Signed zeros and subnormals: a coordinate-wise median of [h, h, NaN] takes (h + h) / 2 as h/2 + h/2, which
    flushes a subnormal to 0, and min/max may pick -0.0 for +0.0. The majority row is returned untouched."""
    tiny = np.float32(1.4e-45)  # the smallest subnormal
    h = np.array([tiny, 0.0, -tiny, 1.0], np.float32)
    for byz in (np.full(4, np.nan, np.float32), np.array([np.nan, -0.0, np.nan, np.nan], np.float32)):
        x = np.stack([h, byz, h])
        np.testing.assert_array_equal(bits(np.asarray(draco(3, 1)(x))), bits(h))
    median = np.asarray(gars.get("median", 3, 1)(np.stack([h, np.full(4, np.nan, np.float32), h])))
    assert not np.array_equal(bits(median), bits(h)), "the median alone would already be exact: weaker test"


# ============================================================================== the median fallback
@pytest.mark.parametrize("fill", ["nan", "zero"])
def test_copies_that_lost_different_chunks_decode_by_the_median(fill: str) -> None:
    """No two copies are equal (each lost another chunk), so no majority: the NaN-aware median of the group. With
    one lost copy per coordinate the two others agree, and the honest gradient comes back exactly."""
    rng = np.random.default_rng(3)
    h = rng.normal(size=(2, 30)).astype(np.float32)
    x = np.repeat(h, 3, axis=0)
    value = np.nan if fill == "nan" else 0.0
    for i in range(6):
        x[i, (i % 3) * 10:(i % 3) * 10 + 10] = value
    assert ref.draco_majority(x, 1) == [None, None]
    np.testing.assert_array_equal(bits(np.asarray(draco(6, 1)(x))), bits(honest_mean(h)))


def test_median_fallback_with_a_byzantine_member() -> None:
    """Group [h with a lost chunk (NaN), h, Byzantine]: no majority; each coordinate is the median of its finite
    values: h where the lost copy is intact (2 of 3 agree), (h + b) / 2 where it lost the chunk."""
    h = np.arange(1.0, 7.0, dtype=np.float32)
    lossy = h.copy()
    lossy[:2] = np.nan
    b = np.full(6, 100.0, np.float32)
    out = np.asarray(draco(3, 1)(np.stack([lossy, h, b])))
    np.testing.assert_array_equal(out, np.concatenate([(h[:2] + b[:2]) / 2, h[2:]]))
    np.testing.assert_array_equal(out, ref.draco(np.stack([lossy, h, b]), 1))


def test_a_group_that_lost_a_copy_and_disagrees_is_left_out() -> None:
    """Group 1 = [h1 with a lost chunk (NaN), h1, Byzantine]: where the chunk was lost, its two values disagree
    and it cannot decode (an erasure and a Byzantine member: two faults in a group of 3), so those coordinates
    are group 0's alone; elsewhere both groups decode and the output is their mean."""
    h = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], np.float32)
    lossy = h[1].copy()
    lossy[:2] = np.nan
    x = np.stack([h[0], h[0], h[0], lossy, h[1], np.full(4, -1e6, np.float32)])
    out = np.asarray(draco(6, 1)(x))
    np.testing.assert_array_equal(out, np.concatenate([h[0, :2], honest_mean(h)[2:]]))
    np.testing.assert_array_equal(out, ref.draco(x, 1))
    decoded, decodes = ref.draco_decode(x, 1)
    assert decodes.tolist() == [[True] * 4, [False, False, True, True]]


def test_finite_copies_that_differ_decode_by_their_median() -> None:
    """Group 0's three finite copies all differ (the members' parameters differed): no majority, but the median of
    2f + 1 finite values lies in the honest range, so the group counts in the mean with it."""
    g0 = np.array([[1.0, 10.0], [2.0, 30.0], [3.0, 20.0]], np.float32)
    h1 = np.array([7.0, 8.0], np.float32)
    x = np.concatenate([g0, np.stack([h1, h1, -h1])])
    np.testing.assert_array_equal(np.asarray(draco(6, 1)(x)), honest_mean(np.stack([[2.0, 20.0], h1])))


def test_no_finite_majority_falls_back() -> None:
    """f + 1 equal but non-finite rows are no majority: the median of the finite values decides."""
    h = np.array([1.0, 2.0], np.float32)
    bad = np.array([np.nan, 2.0], np.float32)
    x = np.stack([bad, bad, h])
    assert ref.draco_majority(x, 1) == [None]
    np.testing.assert_array_equal(np.asarray(draco(3, 1)(x)), [1.0, 2.0])


# ================================================================================== bound and errors
@pytest.mark.parametrize(("n", "f", "fix"), [(8, 1, "--workers 6 or 9"), (10, 2, "--workers 10 or 15"),
                                             (4, 2, "--workers 5"), (7, 3, "--workers 7")])
def test_check_needs_n_multiple_of_2f_plus_1(n: int, f: int, fix: str) -> None:
    if n % (2 * f + 1) == 0:
        draco(n, f)  # accepted
        return
    with pytest.raises(ValueError, match="multiple of 2f \\+ 1") as err:
        gars.get("draco", n, f)
    assert fix in str(err.value) and "\n" not in str(err.value)


def test_config_refuses_draco_with_a_bad_worker_count() -> None:
    with pytest.raises(ConfigError, match="--gar draco with --workers 8 --f 1: draco needs n to be a multiple"):
        TrainConfig(gar="draco", workers=8, f=1).validate()
    TrainConfig(gar="draco", workers=9, f=1).validate()


# ===================================================================================== the reference
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(f=st.integers(0, 2), groups=st.integers(1, 3), d=st.sampled_from([1, 9]), seed=st.integers(0, 2**32 - 1),
       byz=st.integers(0, 3), lost=st.integers(0, 3), fill=st.sampled_from(["nan", "zero"]))
def test_matches_the_float64_reference(f: int, groups: int, d: int, seed: int, byz: int, lost: int,
                                       fill: str) -> None:
    """Copies with lost chunks and Byzantine rows (possibly more than f, possibly colluding) in any mix: the fast
    rule picks the same majorities as the reference and agrees with it to float32 rounding."""
    rng = np.random.default_rng(seed)
    r = 2 * f + 1
    h = (rng.normal(size=(groups, d)) * 10.0 ** rng.uniform(-2, 2)).astype(np.float32)
    x = np.repeat(h, r, axis=0)
    n = len(x)
    for i in rng.choice(n, size=min(byz, n), replace=False):
        x[i] = rng.choice([rng.normal(size=d) * 10, np.full(d, np.nan), -x[i], x[(i + 1) % n]])
    for i in rng.choice(n, size=min(lost, n), replace=False):
        x[i, rng.integers(0, d, size=max(1, d // 3))] = np.nan if fill == "nan" else 0.0
    out = np.asarray(draco(n, f)(x), np.float64)
    expect = ref.draco(x, f)
    scale = np.where(np.isfinite(x), np.abs(x), 0.0).reshape(groups, r, d).max(axis=1).sum(axis=0) / groups
    both_nan = np.isnan(out) & np.isnan(expect)
    assert np.all(both_nan | (np.abs(out - expect) <= 4 * np.finfo(np.float32).eps * scale)), (out, expect)


def test_reference_by_hand() -> None:
    x = np.array([[1.0], [1.0], [9.0], [2.0], [4.0], [3.0]])  # group 0: majority 1; group 1: median 3
    assert ref.draco_majority(x, 1) == [0, None]
    np.testing.assert_array_equal(ref.draco(x, 1), [2.0])
    with pytest.raises(ValueError, match="multiple of 2f"):
        ref.draco(x[:5], 1)
    y = np.array([[np.nan], [1.0], [9.0], [2.0], [2.0], [2.0]])  # group 0 cannot decode: group 1 alone
    np.testing.assert_array_equal(ref.draco(y, 1), [2.0])
    np.testing.assert_array_equal(ref.draco(y[:3], 1), [5.0])  # no group decodes: the finite medians


# ================================================================================ the data assignment
def test_groups_share_shard_and_seed() -> None:
    cfg = TrainConfig(gar="draco", workers=9, f=1, seed=5)
    got = [data_assignment(cfg, r) for r in range(1, 10)]
    assert redundancy(cfg) == 3 and {a.shards for a in got} == {3}
    assert [a.shard for a in got] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [a.seed for a in got] == [5 * 1_000_003 + g for g in (1, 1, 1, 2, 2, 2, 3, 3, 3)]
    plain = TrainConfig(gar="median", workers=9, f=1, seed=5)  # every other rule: one shard and seed per worker
    assert [tuple(data_assignment(plain, r)) for r in (1, 9)] == [(9, 0, 5 * 1_000_003 + 1), (9, 8, 5 * 1_000_003 + 9)]
    with pytest.raises(ValueError, match="rank 10"):
        data_assignment(cfg, 10)


def test_simulated_run_takes_the_majority_path(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end (``--launcher simulate``, no loss, a reversing Byzantine worker): at every step the honest members
    of each group send bitwise-equal gradients (so every group decodes by majority, not by the median), the
    groups' gradients differ (each its own mini-batch), and the Byzantine row is outvoted."""
    from aggregathor import server
    from aggregathor.simulate import simulate

    seen: list[np.ndarray] = []
    gradients = server.ParameterServer._gradients

    def record(self: Any) -> np.ndarray:
        rows = gradients(self)
        seen.append(np.array(rows))
        return rows

    monkeypatch.setattr(server.ParameterServer, "_gradients", record)
    cfg = TrainConfig(gar="draco", workers=6, f=1, byzantine=1, attack="reverse", steps=4, loss=0.0, eval_every=4,
                      checkpoint_every=0, run_dir=str(tmp_path / "run"), launcher="simulate", step_log=False)
    summary = simulate(cfg.validate(), progress=False)
    assert summary.steps == 4 and len(seen) == 5  # the warm-up call, then one per step
    for x in seen[1:]:
        assert ref.draco_majority(x, 1) == [0, 3]
        assert np.array_equal(bits(x[0]), bits(x[1])) and np.array_equal(bits(x[1]), bits(x[2]))
        assert np.array_equal(bits(x[3]), bits(x[4])) and not np.array_equal(x[4], x[5])  # rank 6 is Byzantine
        assert not np.array_equal(x[0], x[3])
        np.testing.assert_array_equal(bits(np.asarray(draco(6, 1)(x))), bits(honest_mean(x[[0, 3]])))


def test_bucketing_works_after_a_draco_worker_turned_op_determinism_on():
    """Draco's workers turn TensorFlow's op determinism on for their whole process (in-process under
    ``--launcher simulate``); an unseeded bucketing built afterwards must still work (it failed with
    "from_non_deterministic_state cannot be called when determinism is enabled")."""
    import subprocess
    import sys

    code = ("import numpy as np, tensorflow as tf\n"
            "tf.config.experimental.enable_op_determinism()\n"
            "from aggregathor import gars\n"
            "out = gars.get('median', 6, 1, pre=['bucketing'])(np.ones((6, 10), np.float32))\n"
            "print(float(out.numpy().sum()))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "10.0"
