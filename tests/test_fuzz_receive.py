"""Fuzzing the receive path (issue #7, item 2): the CI-sized runs of ``tools/fuzz_receive.py``.

The long runs (1,000,000 datagrams, plain and sanitized) are recorded in docs/reliability/fuzz*.json. Here: 100,000
fuzzed datagrams against live endpoints, checked datagram by datagram against the fuzzer's reference
receiver; proofs that this oracle fails when it should (a wrong model, a stray write into a posted buffer); a short
run against the core built with AddressSanitizer and UndefinedBehaviorSanitizer (when gcc and its runtimes are
here); and a hypothesis property on :class:`test_hostile_datagrams.Harness`: a mutation of a valid datagram made
without the key is either rejected, or it is that valid datagram and delivers exactly its bytes.
"""

from __future__ import annotations

import random
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import bits
from hypothesis import given, settings
from hypothesis import strategies as st
from test_hostile_datagrams import REASONS, Harness, legit

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.append(str(TOOLS))
import fuzz_receive as fz  # noqa: E402
import sanitize_build  # noqa: E402

SEED = 20261127


def _check_report(r: dict, datagrams: int) -> None:
    assert r["violations"] == [], r["violations"][:3]
    assert r["ok"] and all(r["invariants"].values()), r["invariants"]
    assert r["datagrams"] >= datagrams
    assert set(r["classes"]) == set(fz.CLASSES) and min(r["classes"].values()) > 0, r["classes"]
    assert all(r["rejected_by_reason"][reason] > 0 for reason in fz.REASONS), r["rejected_by_reason"]
    assert r["kernel_drops"] == 0


def test_fuzz_live_endpoint():
    r = fz.run_fuzz(100_000, SEED)
    _check_report(r, 100_000)
    on, off = r["targets"]
    assert on["receiver"]["auth"] and not off["receiver"]["auth"]
    for t in (on, off):
        rx = t["receiver"]
        # every path of the receiver did real work, not only rejections
        for k in ("accepted", "duplicates", "stale", "pooled", "overflow", "fins"):
            assert rx[k] > 0, (t["target"], k)
        assert rx["datagrams"] >= t["datagrams"]
    assert r["legit"]["messages"] > 20
    # the header checks alone (authentication off) also met a header with every field a boundary value
    assert {v.split("/")[1] for v in r["variants"] if v.startswith("header_fields/")} == set(fz.FIELDS)


def test_oracle_catches_a_wrong_model(monkeypatch):
    """A reference receiver that forgets one rule (a FIN with a payload is a header error) must disagree with the
    live core: the fuzzer reports it and keeps the batch that showed it."""
    predict = fz.Model.predict

    def forgetful(self, d, addr):
        out = predict(self, d, addr)
        if out.kind == "header" and len(d) >= 32 and d[0] == 1 and d[1] == fz.KIND_FIN:
            return fz.Outcome("size", out.src, sender=out.sender)
        return out

    monkeypatch.setattr(fz.Model, "predict", forgetful)
    r = fz.run_fuzz(3000, SEED, auth_off_share=0)
    assert not r["ok"] and not r["invariants"]["counters_match_model"]
    assert r["violations"][0]["what"] == "core counters differ from the reference model"
    assert r["failure_batch"] and all(set(d) >= {"hex", "class", "expected"} for d in r["failure_batch"])


def test_oracle_catches_uncharged_header_drops(monkeypatch):
    """docs/protocol.md charges a ``header`` drop to the rank its header claims: a reference receiver that charges
    nobody (the behaviour before issue 12) disagrees with the live core."""
    predict = fz.Model.predict

    def uncharged(self, d, addr):
        out = predict(self, d, addr)
        return fz.Outcome("header", None, sender=out.sender) if out.kind == "header" else out

    monkeypatch.setattr(fz.Model, "predict", uncharged)
    r = fz.run_fuzz(3000, SEED, auth_off_share=0)
    assert not r["ok"] and not r["invariants"]["counters_match_model"]
    diff = r["violations"][0]["diff"]
    assert any(k.startswith("claimed_") and k.endswith("/header") for k in diff), diff


def test_oracle_catches_a_stray_write():
    """A byte of a posted buffer changed by anything but an accepted datagram is a violation."""
    report = fz.new_report(SEED, 0)
    report["current_target"] = "test"
    target = fz.Target(True, 1472)
    try:
        f = fz.Fuzzer(target, random.Random(SEED), 64, report, lambda msg: None)
        f.post_round()
        assert not f.failed
        s = max(f.current.slots, key=lambda s: s.nbytes)
        s.out.reshape(-1).view(np.uint8)[s.nbytes // 2] ^= 0x40
        f.check_buffers()
        assert f.failed and report["violations"][0]["what"] == "a posted buffer differs from the reference model"
        assert report["violations"][0]["chunks"] == [(s.nbytes // 2) // s.stride]
    finally:
        target.close()


def test_fuzz_sanitized_core():
    """~20,000 datagrams against the core built with ASan and UBSan (in out/sanitize, never the installed one)."""
    ok, why = sanitize_build.available()
    if not ok:
        pytest.skip(f"no sanitized build possible here: {why}")
    out = TOOLS.parent / "out" / "sanitize"
    r = sanitize_build.run_sanitized_fuzz(["--datagrams", "20000", "--seed", str(SEED), "--quiet"], out,
                                          log=lambda msg: None, timeout=240)
    san = r["sanitizer"]
    assert san["live_checks"]["active"], san["live_checks"]
    assert san["reports"] == [], san["stderr_tail"]
    assert san["exit_code"] == 0, san["stderr_tail"]
    assert Path(r["core"]).resolve() == Path(san["build"]["module"]).resolve()
    assert Path(r["core"]).resolve().is_relative_to(out.resolve())
    _check_report(r, 20_000)
    installed = list((TOOLS.parent / "lossympi").glob("_core*.so"))
    assert installed and all(b"__asan_init" not in p.read_bytes() for p in installed)


# ------------------------------------------------------------------------------------------ hypothesis


def _field_op(name: str):
    width = struct.calcsize(fz.FIELDS[name][1])
    return st.tuples(st.just("field"), st.just(name), st.integers(0, (1 << (8 * width)) - 1))


mutations = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(1, 255)),
        st.tuples(st.just("set"), st.integers(0, 1 << 16), st.integers(0, 255)),
        st.sampled_from(sorted(fz.FIELDS)).flatmap(_field_op),
        st.tuples(st.just("truncate"), st.integers(0, 1600)),
        st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
        st.just(("truncate", 1 << 16)),  # keeps everything: the identical case must come up too
    ),
    min_size=1, max_size=5,
)


@pytest.fixture
def harness(raw_sock):
    h = Harness(raw_sock)
    yield h
    h.close()


def test_a_mutation_is_rejected_or_is_the_valid_datagram(harness: Harness):
    h = harness
    h.exchange(np.ones(10, np.float32), tag=0)
    h.post(3 * (h.stride // 4) + 5, tag=1)  # 4 chunks, the last one short
    x = legit(h)
    xb = bits(x)
    chunk = [xb[i * h.stride:(i + 1) * h.stride].tobytes() for i in range(h.count)]
    valid = [h.signed(index=i, payload=chunk[i]) for i in range(h.count)]
    expected = bits(h.sentinel).copy()
    outcomes: list[str] = []

    @settings(max_examples=400, deadline=None, database=None)
    @given(st.integers(0, h.count - 2), mutations)  # never the last chunk: the receive stays open
    def prop(index: int, ops: list[tuple]):
        d = fz.mutate(valid[index], ops)
        before = h.counters()
        h.inject([d])
        after = h.counters()
        delta = {k: after[k] - before[k] for k in after}
        if d in valid:
            j = valid.index(d)
            outcomes.append("identical")
            assert delta["accepted"] + delta["duplicates"] == 1 and sum(delta[r] for r in REASONS) == 0
            expected[j * h.stride:j * h.stride + len(chunk[j])] = np.frombuffer(chunk[j], np.uint8)
        else:
            outcomes.append("rejected")
            assert sum(delta[r] for r in REASONS) == 1, (ops, delta)
            assert delta["accepted"] == delta["duplicates"] == delta["pooled"] == delta["stale"] == 0
        assert np.array_equal(bits(h.out), expected), "a buffer byte changed without a valid datagram"
        assert not h.fut.done()

    prop()
    assert outcomes.count("rejected") >= 300 and "identical" in outcomes
    h.tx.send_blocking(0, x, tag=1)
    r = h.rx.run(h.fut)
    assert r.complete and np.array_equal(bits(h.out), xb)
