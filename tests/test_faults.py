"""Tests of the datagram-level fault injector (lossympi.faults)."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lossympi import faults
from lossympi.faults import FaultInjector, FaultSpec, GilbertElliott, SendPlan

# --------------------------------------------------------------------------------------------------------
# helpers


def transmissions(plan: SendPlan) -> np.ndarray:
    """Number of times each chunk is transmitted, both phases together."""
    return np.bincount(plan.order, minlength=plan.count) + np.bincount(plan.delayed, minlength=plan.count)


def drop_runs(dropped: np.ndarray) -> np.ndarray:
    """Lengths of the maximal runs of consecutive dropped chunks."""
    padded = np.concatenate(([False], dropped, [False])).astype(np.int8)
    edges = np.diff(padded)
    return np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)


def brute_clean_delivered(plan: SendPlan) -> np.ndarray:
    clean = np.zeros(plan.count, dtype=bool)
    for index, bad in zip(plan.order.tolist(), plan.corrupt.tolist(), strict=True):
        clean[index] |= not bad
    for index, bad in zip(plan.delayed.tolist(), plan.delayed_corrupt.tolist(), strict=True):
        clean[index] |= not bad
    return clean


def check_invariants(plan: SendPlan, spec: FaultSpec, count: int) -> None:
    """Every property a plan must have whatever the random draws were."""
    assert plan.count == count
    assert plan.order.dtype == np.uint32 and plan.delayed.dtype == np.uint32
    assert plan.corrupt.dtype == bool and plan.delayed_corrupt.dtype == bool and plan.dropped.dtype == bool
    assert plan.order.ndim == plan.delayed.ndim == plan.dropped.ndim == 1
    assert plan.dropped.shape == (count,)
    assert plan.corrupt.shape == plan.order.shape
    assert plan.delayed_corrupt.shape == plan.delayed.shape
    assert plan.delay == spec.delay
    assert np.all(plan.order < count) and np.all(plan.delayed < count)

    sent = transmissions(plan)
    # `dropped` is exactly "never transmitted"; every other chunk is transmitted at least once.
    np.testing.assert_array_equal(plan.dropped, sent == 0)
    assert np.all(sent[~plan.dropped] >= 1)
    # A chunk is sent once, or exactly twice when duplicated, and both copies belong to the same phase.
    assert np.all(sent <= 2)
    assert not np.intersect1d(plan.order, plan.delayed).size
    if spec.duplicate == 0.0:
        assert np.all(sent <= 1)
    if spec.duplicate == 1.0:
        assert np.all(sent[~plan.dropped] == 2)
    if spec.reorder == 0.0:
        assert np.all(np.diff(plan.order.astype(np.int64)) >= 0)
        assert np.all(np.diff(plan.delayed.astype(np.int64)) >= 0)
    if spec.delay_prob == 0.0:
        assert plan.delayed.size == 0
    if spec.delay_prob == 1.0:
        assert plan.order.size == 0
    if not spec.loses():
        assert not plan.dropped.any()
    if spec.burst is None and spec.drop == 1.0:
        assert plan.dropped.all()
    if spec.corrupt == 0.0:
        assert not plan.corrupt.any() and not plan.delayed_corrupt.any()
    if spec.corrupt == 1.0:
        assert plan.corrupt.all() and plan.delayed_corrupt.all()
    clean = plan.clean_delivered()
    assert clean.dtype == bool and clean.shape == (count,)
    np.testing.assert_array_equal(clean, brute_clean_delivered(plan))
    assert not np.any(clean & plan.dropped)


def plans_equal(a: SendPlan, b: SendPlan) -> bool:
    return (
        a.delay == b.delay
        and np.array_equal(a.order, b.order)
        and np.array_equal(a.corrupt, b.corrupt)
        and np.array_equal(a.delayed, b.delayed)
        and np.array_equal(a.delayed_corrupt, b.delayed_corrupt)
        and np.array_equal(a.dropped, b.dropped)
    )


FAULTY = FaultSpec(drop=0.2, duplicate=0.2, reorder=0.3, delay=0.01, delay_prob=0.2, corrupt=0.1)


# --------------------------------------------------------------------------------------------------------
# no-op and empty plans


@pytest.mark.parametrize(
    "spec",
    [
        None,
        FaultSpec(),
        FaultSpec(delay=0.5),  # a delay that applies to no chunk
        FaultSpec(burst=GilbertElliott(p=0.0, r=0.5)),  # never enters the bad state
        FaultSpec(burst=GilbertElliott(p=0.3, r=0.5, loss_good=0.0, loss_bad=0.0)),
    ],
)
@pytest.mark.parametrize("count", [0, 1, 7, 1000])
def test_noop_plan_is_identity(spec: FaultSpec | None, count: int) -> None:
    injector = FaultInjector(spec, seed=3)
    assert injector.spec_for(0).is_noop()
    for _ in range(3):
        plan = injector.plan(0, count)
        np.testing.assert_array_equal(plan.order, np.arange(count))
        assert plan.order.dtype == np.uint32
        assert not plan.corrupt.any() and plan.corrupt.shape == (count,)
        assert plan.delayed.size == 0 and plan.delayed_corrupt.size == 0
        assert not plan.dropped.any() and plan.dropped.shape == (count,)
        assert plan.clean_delivered().all()
        assert plan.count == count
        check_invariants(plan, injector.spec_for(0), count)


def test_is_noop() -> None:
    assert FaultSpec().is_noop()
    assert FaultSpec(delay=1.0).is_noop()
    assert FaultSpec(drop=0.5, burst=GilbertElliott(0.0, 0.1)).is_noop()  # burst replaces drop
    for spec in [
        FaultSpec(drop=0.01),
        FaultSpec(duplicate=0.01),
        FaultSpec(reorder=0.01),
        FaultSpec(delay_prob=0.01),
        FaultSpec(corrupt=0.01),
        FaultSpec(burst=GilbertElliott(0.01, 0.3)),
        FaultSpec(burst=GilbertElliott(0.0, 0.3, loss_good=0.1)),
    ]:
        assert not spec.is_noop(), spec
    assert FaultInjector().is_noop()
    assert not FaultInjector(per_peer={4: FaultSpec(drop=0.1)}).is_noop()


@pytest.mark.parametrize("spec", [FAULTY, FaultSpec(burst=GilbertElliott(0.1, 0.2), corrupt=0.5)])
def test_empty_message(spec: FaultSpec) -> None:
    plan = FaultInjector(spec).plan(1, 0)
    check_invariants(plan, spec, 0)
    assert plan.order.size == plan.delayed.size == plan.dropped.size == 0
    assert plan.clean_delivered().shape == (0,)


def test_plan_arrays_are_read_only() -> None:
    plan = FaultInjector(FAULTY).plan(0, 100)
    for array in (plan.order, plan.corrupt, plan.delayed, plan.delayed_corrupt, plan.dropped):
        assert not array.flags.writeable
    with pytest.raises(ValueError):
        plan.order[0] = 1


# --------------------------------------------------------------------------------------------------------
# determinism


def test_same_seed_same_plans() -> None:
    a = FaultInjector(FAULTY, seed=42)
    b = FaultInjector(FAULTY, seed=42)
    for count in [10, 1000, 1, 0, 5000]:
        assert plans_equal(a.plan(3, count), b.plan(3, count))


def test_different_seeds_and_peers_diverge() -> None:
    base = FaultInjector(FAULTY, seed=1).plan(0, 2000)
    assert not plans_equal(base, FaultInjector(FAULTY, seed=2).plan(0, 2000))
    assert not plans_equal(base, FaultInjector(FAULTY, seed=1).plan(1, 2000))
    # Successive messages to the same peer get fresh draws.
    injector = FaultInjector(FAULTY, seed=1)
    assert not plans_equal(injector.plan(0, 2000), injector.plan(0, 2000))


def test_peer_streams_are_independent_of_other_peers() -> None:
    alone = FaultInjector(FAULTY, seed=9)
    mixed = FaultInjector(FAULTY, seed=9)
    expected = [alone.plan(5, 500) for _ in range(4)]
    got = []
    for i in range(4):
        mixed.plan(6, 300 + i)  # interleaved traffic to another peer must not shift peer 5's stream
        got.append(mixed.plan(5, 500))
        mixed.plan(7, 10)
    assert all(plans_equal(e, g) for e, g in zip(expected, got, strict=True))


def test_stream_is_seeded_from_seed_sequence() -> None:
    spec = FaultSpec(drop=0.5)
    rng = np.random.default_rng(np.random.SeedSequence([11, 4]))
    expected = rng.random(1000) < 0.5
    np.testing.assert_array_equal(FaultInjector(spec, seed=11).plan(4, 1000).dropped, expected)


# --------------------------------------------------------------------------------------------------------
# loss models


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5])
def test_bernoulli_drop_fraction(p: float) -> None:
    count = 100_000
    plan = FaultInjector(FaultSpec(drop=p), seed=123).plan(0, count)
    dropped = int(plan.dropped.sum())
    sigma = math.sqrt(count * p * (1 - p))
    assert abs(dropped - count * p) <= 5 * sigma
    np.testing.assert_array_equal(plan.order, np.flatnonzero(~plan.dropped))


def test_drop_one_drops_everything() -> None:
    for spec in [FaultSpec(drop=1.0), FaultSpec(burst=GilbertElliott(0.2, 0.2, loss_good=1.0))]:
        plan = FaultInjector(spec, seed=5).plan(0, 1000)
        assert plan.dropped.all() and plan.order.size == 0 and plan.delayed.size == 0
        assert not plan.clean_delivered().any()


def test_gilbert_elliott_stationary_loss_formula() -> None:
    ge = GilbertElliott(p=0.01, r=0.3)
    assert ge.stationary_loss() == pytest.approx(0.01 / 0.31)
    ge = GilbertElliott(p=0.2, r=0.6, loss_good=0.05, loss_bad=0.7)
    assert ge.stationary_loss() == pytest.approx((0.6 * 0.05 + 0.2 * 0.7) / 0.8)
    assert GilbertElliott(p=0.0, r=0.0, loss_good=0.25).stationary_loss() == 0.25
    assert GilbertElliott(p=1.0, r=0.0).stationary_loss() == 1.0


@pytest.mark.parametrize(("p", "r"), [(0.01, 0.3), (0.05, 0.1), (0.2, 0.8), (0.002, 0.05)])
def test_gilbert_elliott_loss_matches_stationary(p: float, r: float) -> None:
    count = 100_000
    ge = GilbertElliott(p=p, r=r)
    injector = FaultInjector(FaultSpec(burst=ge), seed=77)
    losses = np.array([injector.plan(0, count).dropped.mean() for _ in range(4)])
    pi = ge.stationary_loss()
    # The state sequence is a Markov chain with second eigenvalue lam = 1 - p - r: the variance of the
    # mean of n correlated indicators is pi (1 - pi) / n * (1 + lam) / (1 - lam).
    lam = 1 - p - r
    sigma = math.sqrt(pi * (1 - pi) / (4 * count) * (1 + lam) / (1 - lam))
    assert abs(losses.mean() - pi) <= 5 * sigma


def test_gilbert_elliott_is_burstier_than_bernoulli() -> None:
    count = 100_000
    p, r = 0.01, 0.3
    ge = GilbertElliott(p=p, r=r)
    ge_runs = drop_runs(FaultInjector(FaultSpec(burst=ge), seed=1).plan(0, count).dropped)
    # Bad sojourns are Geometric(r): mean 1/r, variance (1 - r)/r^2.
    assert ge_runs.size > 100
    sigma = math.sqrt((1 - r) / r**2 / ge_runs.size)
    assert abs(ge_runs.mean() - 1 / r) <= 5 * sigma
    bern = FaultInjector(FaultSpec(drop=ge.stationary_loss()), seed=1).plan(0, count).dropped
    bern_runs = drop_runs(bern)
    assert bern_runs.mean() < 1.2 < 2.5 < ge_runs.mean()
    assert ge_runs.max() > bern_runs.max()


def test_gilbert_elliott_partial_losses() -> None:
    count = 100_000
    ge = GilbertElliott(p=0.1, r=0.4, loss_good=0.02, loss_bad=0.6)
    dropped = FaultInjector(FaultSpec(burst=ge), seed=8).plan(0, count).dropped
    pi = ge.stationary_loss()
    # Generous bound: binomial variance inflated by the chain's correlation factor (1 + lam) / (1 - lam).
    lam = 1 - ge.p - ge.r
    sigma = math.sqrt(pi * (1 - pi) / count * (1 + lam) / (1 - lam))
    assert abs(dropped.mean() - pi) <= 5 * sigma


def test_gilbert_elliott_sample_bad_edge_cases() -> None:
    rng = np.random.default_rng(0)
    assert GilbertElliott(0.5, 0.5).sample_bad(0, rng).shape == (0,)
    assert not GilbertElliott(0.0, 0.0).sample_bad(1000, rng).any()
    assert GilbertElliott(1.0, 0.0).sample_bad(1000, rng)[1:].all()
    alternating = GilbertElliott(1.0, 1.0).sample_bad(1001, rng)
    assert np.all(alternating[1:] != alternating[:-1])
    tiny = GilbertElliott(1e-9, 1e-9).sample_bad(10_000, rng)
    assert tiny.shape == (10_000,) and (tiny.all() or not tiny.any())


# --------------------------------------------------------------------------------------------------------
# duplication, reordering, delay, corruption


def test_duplicates_appear_exactly_twice() -> None:
    count = 20_000
    plan = FaultInjector(FaultSpec(duplicate=0.3, drop=0.1), seed=4).plan(0, count)
    check_invariants(plan, FaultSpec(duplicate=0.3, drop=0.1), count)
    sent = transmissions(plan)
    assert set(np.unique(sent).tolist()) == {0, 1, 2}
    twice = np.flatnonzero(sent == 2)
    kept = int((~plan.dropped).sum())
    assert abs(twice.size - 0.3 * kept) <= 5 * math.sqrt(kept * 0.3 * 0.7)
    # Without reordering the copy follows the original.
    positions = np.flatnonzero(np.isin(plan.order, twice))
    np.testing.assert_array_equal(plan.order[positions[0::2]], plan.order[positions[1::2]])

    every = FaultInjector(FaultSpec(duplicate=1.0), seed=4).plan(0, 100)
    np.testing.assert_array_equal(every.order, np.repeat(np.arange(100), 2))


def test_no_reorder_keeps_increasing_order() -> None:
    spec = FaultSpec(drop=0.3, delay=0.001, delay_prob=0.3, corrupt=0.2)
    plan = FaultInjector(spec, seed=2).plan(0, 10_000)
    assert np.all(np.diff(plan.order.astype(np.int64)) > 0)
    assert np.all(np.diff(plan.delayed.astype(np.int64)) > 0)
    check_invariants(plan, spec, 10_000)


def test_reorder_displaces_selected_chunks() -> None:
    count = 10_000
    everything = FaultInjector(FaultSpec(reorder=1.0), seed=2).plan(0, count)
    np.testing.assert_array_equal(np.sort(everything.order), np.arange(count))
    assert not np.any(everything.order == np.arange(count))  # a cyclic permutation has no fixed point

    some = FaultInjector(FaultSpec(reorder=0.1), seed=2).plan(0, count)
    np.testing.assert_array_equal(np.sort(some.order), np.arange(count))
    moved = int(np.sum(some.order != np.arange(count)))
    assert abs(moved - 0.1 * count) <= 5 * math.sqrt(count * 0.1 * 0.9)


def test_delay_moves_chunks_to_second_phase() -> None:
    count = 10_000
    spec = FaultSpec(delay=0.002, delay_prob=0.25)
    plan = FaultInjector(spec, seed=6).plan(0, count)
    check_invariants(plan, spec, count)
    assert plan.delay == 0.002
    assert abs(plan.delayed.size - 0.25 * count) <= 5 * math.sqrt(count * 0.25 * 0.75)
    np.testing.assert_array_equal(np.sort(np.concatenate([plan.order, plan.delayed])), np.arange(count))
    assert not plan.dropped.any()

    late = FaultInjector(FaultSpec(delay=0.5, delay_prob=1.0), seed=6).plan(0, 50)
    assert late.order.size == 0
    np.testing.assert_array_equal(late.delayed, np.arange(50))
    assert late.clean_delivered().all()


def test_corruption_and_clean_delivered() -> None:
    count = 20_000
    spec = FaultSpec(corrupt=0.2, duplicate=0.5, delay=0.001, delay_prob=0.3, drop=0.1)
    plan = FaultInjector(spec, seed=10).plan(0, count)
    check_invariants(plan, spec, count)
    flags = np.concatenate([plan.corrupt, plan.delayed_corrupt])
    assert abs(flags.mean() - 0.2) <= 5 * math.sqrt(0.2 * 0.8 / flags.size)
    clean = plan.clean_delivered()
    # A chunk sent once is clean iff its copy is; a duplicated one iff either copy is.
    sent = transmissions(plan)
    corrupted = np.bincount(plan.order[plan.corrupt], minlength=count) + np.bincount(
        plan.delayed[plan.delayed_corrupt], minlength=count
    )
    np.testing.assert_array_equal(clean, sent > corrupted)
    assert np.any((sent == 2) & (corrupted == 1) & clean)

    all_bad = FaultInjector(FaultSpec(corrupt=1.0), seed=10).plan(0, 100)
    assert all_bad.corrupt.all() and not all_bad.clean_delivered().any() and not all_bad.dropped.any()


def test_clean_delivered_on_handmade_plan() -> None:
    plan = SendPlan(
        order=np.array([3, 0, 0, 2], dtype=np.uint32),
        corrupt=np.array([True, True, False, True]),
        delayed=np.array([4, 4], dtype=np.uint32),
        delayed_corrupt=np.array([True, True]),
        delay=0.1,
        dropped=np.array([False, True, False, False, False, False]),
    )
    assert plan.count == 6
    np.testing.assert_array_equal(plan.clean_delivered(), [True, False, False, False, False, False])


def test_corrupt_payload_flips_one_bit() -> None:
    injector = FaultInjector(FAULTY, seed=1)
    payload = bytes(range(64))
    for _ in range(20):
        corrupted = injector.corrupt_payload(2, payload)
        assert len(corrupted) == len(payload)
        diff = np.unpackbits(np.frombuffer(corrupted, np.uint8) ^ np.frombuffer(payload, np.uint8))
        assert int(diff.sum()) == 1
    assert injector.corrupt_payload(2, b"") == b""
    first, second = FaultInjector(seed=1), FaultInjector(seed=1)
    assert first.corrupt_payload(2, payload) == second.corrupt_payload(2, payload)


# --------------------------------------------------------------------------------------------------------
# property test

probabilities = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0, allow_nan=False))
bursts = st.one_of(
    st.none(),
    st.builds(
        GilbertElliott, p=probabilities, r=probabilities, loss_good=probabilities, loss_bad=probabilities
    ),
)
specs = st.builds(
    FaultSpec,
    drop=probabilities,
    burst=bursts,
    duplicate=probabilities,
    reorder=probabilities,
    delay=st.floats(0.0, 1.0, allow_nan=False),
    delay_prob=probabilities,
    corrupt=probabilities,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=specs,
    counts=st.lists(st.integers(0, 3000), min_size=1, max_size=3),
    seed=st.integers(0, 2**32),
    peer=st.integers(0, 1000),
)
def test_plan_invariants_property(spec: FaultSpec, counts: list[int], seed: int, peer: int) -> None:
    injector = FaultInjector(per_peer={peer: spec}, seed=seed)
    replay = FaultInjector(per_peer={peer: spec}, seed=seed)
    for count in counts:
        plan = injector.plan(peer, count)
        check_invariants(plan, spec, count)
        assert plans_equal(plan, replay.plan(peer, count))
        other = injector.plan(peer + 1, count)  # default spec for the others: no faults
        np.testing.assert_array_equal(other.order, np.arange(count))


# --------------------------------------------------------------------------------------------------------
# per-peer specs


def test_per_peer_specs_apply_to_their_peer_only() -> None:
    count = 5000
    injector = FaultInjector(
        FaultSpec(drop=0.1), per_peer={2: FaultSpec(drop=1.0), 3: FaultSpec(duplicate=1.0)}, seed=0
    )
    assert injector.spec_for(2) == FaultSpec(drop=1.0)
    assert injector.spec_for(0) == injector.spec_for(99) == FaultSpec(drop=0.1)
    assert injector.plan(2, count).dropped.all()
    dup = injector.plan(3, count)  # a per-peer spec replaces the default: no drop for peer 3
    assert not dup.dropped.any() and np.all(transmissions(dup) == 2)
    for peer in (0, 1, 4):
        fraction = injector.plan(peer, count).dropped.mean()
        assert 0.05 < fraction < 0.15

    only = FaultInjector(per_peer={1: FaultSpec(drop=0.5)})
    np.testing.assert_array_equal(only.plan(0, 100).order, np.arange(100))
    assert only.plan(1, 1000).dropped.any()


# --------------------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("field", ["drop", "duplicate", "reorder", "delay_prob", "corrupt"])
@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan, math.inf])
def test_fault_spec_rejects_bad_probabilities(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"FaultSpec\.{field} must be"):
        FaultSpec(**{field: value})


@pytest.mark.parametrize("value", [-1e-3, math.inf, -math.inf, math.nan])
def test_fault_spec_rejects_bad_delay(value: float) -> None:
    with pytest.raises(ValueError, match=r"FaultSpec\.delay"):
        FaultSpec(delay=value)


def test_fault_spec_range_message_and_types() -> None:
    with pytest.raises(ValueError, match=r"FaultSpec\.drop must be a probability in \[0, 1\], got 2"):
        FaultSpec(drop=2)
    with pytest.raises(ValueError, match=r">= 0"):
        FaultSpec(delay=-1)
    with pytest.raises(TypeError, match=r"FaultSpec\.drop"):
        FaultSpec(drop="0.1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"FaultSpec\.burst"):
        FaultSpec(burst=(0.1, 0.2))  # type: ignore[arg-type]
    spec = FaultSpec(drop=np.float32(0.25), delay=1)
    assert type(spec.drop) is float and type(spec.delay) is float


@pytest.mark.parametrize("field", ["p", "r", "loss_good", "loss_bad"])
@pytest.mark.parametrize("value", [-0.5, 1.01, math.nan])
def test_gilbert_elliott_rejects_bad_values(field: str, value: float) -> None:
    kwargs = {"p": 0.1, "r": 0.1, field: value}
    with pytest.raises(ValueError, match=rf"GilbertElliott\.{field} must be"):
        GilbertElliott(**kwargs)


def test_injector_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="seed"):
        FaultInjector(seed=-1)
    with pytest.raises(ValueError, match="peer"):
        FaultInjector(per_peer={-2: FaultSpec()})
    with pytest.raises(TypeError, match="per_peer"):
        FaultInjector(per_peer={1: "drop=0.1"})  # type: ignore[dict-item]
    injector = FaultInjector(FAULTY)
    with pytest.raises(ValueError, match="count"):
        injector.plan(0, -1)
    with pytest.raises(ValueError, match="count"):
        injector.plan(0, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="peer"):
        injector.plan(-1, 10)


# --------------------------------------------------------------------------------------------------------
# from_string


def test_from_string_full_syntax() -> None:
    injector = FaultInjector.from_string(
        "drop=0.05,dup=0.01,reorder=0.1,delay=0.002:0.1,corrupt=0.001", seed=7
    )
    assert injector.seed == 7
    assert injector.spec_for(0) == FaultSpec(
        drop=0.05, duplicate=0.01, reorder=0.1, delay=0.002, delay_prob=0.1, corrupt=0.001
    )
    assert dict(injector.per_peer) == {}


def test_from_string_gilbert_elliott_and_peers() -> None:
    assert FaultInjector.from_string("ge=0.01:0.3").spec_for(5) == FaultSpec(burst=GilbertElliott(0.01, 0.3))
    four = FaultInjector.from_string("burst=0.1:0.2:0.01:0.9").spec_for(0)
    assert four.burst == GilbertElliott(0.1, 0.2, loss_good=0.01, loss_bad=0.9)

    injector = FaultInjector.from_string(" 2 : drop=0.1 ; 3:drop=0.5; duplicate=0.2 ,reorder=1 ")
    assert injector.spec_for(2) == FaultSpec(drop=0.1)
    assert injector.spec_for(3) == FaultSpec(drop=0.5)
    assert injector.spec_for(0) == injector.spec_for(4) == FaultSpec(duplicate=0.2, reorder=1.0)

    peers_only = FaultInjector.from_string("2:drop=0.1;3:ge=0.01:0.3")
    assert peers_only.spec_for(0).is_noop()
    assert peers_only.spec_for(3).burst == GilbertElliott(0.01, 0.3)

    for empty in ["", "   ", ";", " ; ; "]:
        assert FaultInjector.from_string(empty).is_noop()


@pytest.mark.parametrize(
    ("text", "token"),
    [
        ("drop=1.5", "drop=1.5"),
        ("drop=-0.1", "drop=-0.1"),
        ("drop=abc", "drop=abc"),
        ("drop", "drop"),
        ("drop=", "drop="),
        ("=0.1", "=0.1"),
        ("loss=0.1", "loss"),
        ("drop=0.1,drop=0.2", "drop"),
        ("delay=0.002", "delay=0.002"),
        ("delay=-1:0.5", "delay=-1:0.5"),
        ("delay=0.1:2", "delay=0.1:2"),
        ("ge=0.1", "ge=0.1"),
        ("ge=0.1:0.2:0.3", "ge=0.1:0.2:0.3"),
        ("ge=0.1:1.2", "ge=0.1:1.2"),
        ("ge=0.1:0.2,drop=0.1", "drop"),
        ("x:drop=0.1", "x"),
        ("-1:drop=0.1", "-1"),
        ("2:drop=0.1;2:drop=0.2", "2"),
        ("drop=0.1;dup=0.2", "drop=0.1;dup=0.2"),
        ("drop=0.1,,dup=0.2", "''"),
        ("2:", "''"),
        ("drop=nan", "drop=nan"),
        ("corrupt=inf", "corrupt=inf"),
    ],
)
def test_from_string_rejects_bad_input(text: str, token: str) -> None:
    with pytest.raises(ValueError) as info:
        FaultInjector.from_string(text)
    message = str(info.value)
    assert token in message
    assert "[PEER:]KEY=VALUE" in message  # the expected syntax is spelled out


def test_from_string_rejects_non_str() -> None:
    with pytest.raises(TypeError):
        FaultInjector.from_string(None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------
# module hygiene


def test_module_imports_only_numpy_and_stdlib() -> None:
    tree = ast.parse(Path(faults.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    import sys

    third_party = {name for name in imported if name not in sys.stdlib_module_names and name != "__future__"}
    assert third_party == {"numpy"}
