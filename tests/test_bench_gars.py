"""Smoke test of ``python -m aggregathor.bench gars``: JSON schema, positive numbers, the reference skip path,
clear errors for bad flags. Tiny sizes: the whole module runs in well under a minute on 2 CPUs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregathor.bench.__main__ import main
from aggregathor.bench.gars import TARGET_POINT, _targets, make_data, render

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["gars", "--n", "10", "--d", "1000", "--rules", "average,median", "--repeats", "2", "--json"]
RECORD_KEYS = {"rule", "n", "f", "d", "device", "seconds", "floor_seconds", "reference_seconds", "ratio_vs_floor",
               "speedup_vs_reference"}


def _num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "aggregathor.bench", *ARGS, "--quiet"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # exactly one JSON object on stdout


def test_schema_and_positive_numbers(result: dict[str, Any]) -> None:
    assert result["benchmark"] == "gars"
    assert result["command"].startswith("python -m aggregathor.bench gars ")
    assert "--rules average,median" in result["command"]
    assert result["host"]["nproc"] >= 1 and result["host"]["tensorflow"]
    assert set(result["contention"]) >= {"foreign_cpu_fraction", "own_cpu_seconds"}
    assert result["device"] in ("CPU:0", "GPU:0") and result["device_full"].endswith(result["device"])
    assert result["failed"] == [] and result["targets"] == []  # the targets are set at n=20, d=1e7 only
    records = result["records"]
    assert [r["rule"] for r in records] == ["average", "median"]
    for r in records:
        assert set(r) >= RECORD_KEYS
        assert (r["n"], r["f"], r["d"], r["dtype"]) == (10, 1, 1000, "float32")
        assert r["device"] == result["device"] and r["error"] is None
        for key in ("seconds", "floor_seconds", "reference_seconds", "ratio_vs_floor", "speedup_vs_reference"):
            assert _num(r[key]) and r[key] > 0, (key, r[key])
        assert len(r["times"]) == len(r["floor_times"]) == 2 and all(t > 0 for t in r["times"])
        assert r["ratio_vs_floor"] == pytest.approx(r["seconds"] / r["floor_seconds"], rel=1e-3)
        assert r["speedup_vs_reference"] == pytest.approx(r["reference_seconds"] / r["seconds"], rel=1e-3)
        assert r["reference_skipped"] is None and r["speedup_vs_reference_at_least"] is None
        assert r["reference_max_abs_diff"] < 1e-4  # the rule and its reference agree on this data


def test_table(result: dict[str, Any]) -> None:
    text = render(result)
    header = text.splitlines()[0].split()
    assert header[:5] == ["rule", "n", "f", "d", "ms"]
    assert "median" in text and "average" in text and "CPU" in text


def test_reference_skipped_gives_null_and_a_lower_bound(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["gars", "--n", "10", "--d", "3000", "--rules", "median", "--repeats", "1", "--json", "--quiet",
               "--reference-probe-d", "1000", "--reference-max-d", "2000"])
    assert rc == 0
    (r,) = json.loads(capsys.readouterr().out)["records"]
    assert r["reference_seconds"] is None and r["speedup_vs_reference"] is None
    assert "--reference-max-d" in r["reference_skipped"]
    assert r["reference_probe_d"] == 1000 and r["reference_probe_seconds"] > 0
    assert r["speedup_vs_reference_at_least"] == pytest.approx(r["reference_probe_seconds"] / r["seconds"],
                                                               rel=1e-3)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--n", "0"], "--n"),
        (["--n", "ten"], "--n"),
        (["--d", "1.5"], "--d"),
        (["--rules", "median,nope"], "unknown rule(s) 'nope'; known:"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--n", "10", "--f", "10"], "0 <= f < n"),
        (["--n", "10", "--f", "2", "--rules", "bulyan"], "n >= 4f + 3"),
        (["--device", "tpu"], "--device"),
        (["--device", "GPU:7"], "no GPU:7"),
        (["--reference-budget", "0"], "--reference-budget"),
        (["--reference-max-d", "-3"], "--reference-max-d"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_flags_are_clear_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["gars", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err, err
    assert "Traceback" not in err


def test_make_data() -> None:
    n, d, f = 10, 5000, 2
    x = make_data(n, d, f, noise=0.1, seed=3)
    assert x.shape == (n, d) and x.dtype == np.float32 and x.flags.c_contiguous
    assert x.ctypes.data % 64 == 0  # TensorFlow aliases it without a copy
    np.testing.assert_array_equal(x, make_data(n, d, f, noise=0.1, seed=3))
    honest, byz = x[: n - f], x[n - f:]
    center = np.median(honest, axis=0)
    assert np.linalg.norm(honest - center, axis=1).max() < 0.2 * np.sqrt(d)
    assert np.linalg.norm(byz - center, axis=1).min() > 50 * np.sqrt(d)


def test_targets_only_at_the_target_point() -> None:
    n, d = TARGET_POINT
    base = {"n": n, "d": d, "speedup_vs_reference": None, "speedup_vs_reference_at_least": None}
    records = [
        {**base, "rule": "median", "ratio_vs_floor": 1.2, "speedup_vs_reference": 50.0},
        {**base, "rule": "bulyan", "ratio_vs_floor": 5.0, "speedup_vs_reference_at_least": 3.0},
        {**base, "rule": "krum", "ratio_vs_floor": 9.0, "speedup_vs_reference_at_least": 30.0},
        {**base, "rule": "median", "n": 10, "ratio_vs_floor": 9.0},
    ]
    got = {(t["rule"], t["metric"]): t for t in _targets(records)}
    assert got[("median", "ratio_vs_floor")]["met"] is True
    assert got[("median", "speedup_vs_reference")]["met"] is True
    assert got[("bulyan", "ratio_vs_floor")]["met"] is False
    assert got[("bulyan", "speedup_vs_reference")]["met"] is None  # a lower bound of 3x decides nothing
    assert got[("krum", "speedup_vs_reference")] == {"rule": "krum", "metric": "speedup_vs_reference",
                                                     "want_at_least": 10.0, "got": 30.0, "bound": "at least",
                                                     "met": True}
    assert ("krum", "ratio_vs_floor") not in got  # no floor target for Krum
    assert len(got) == 5


def test_phases_of_the_distance_rules(capsys: pytest.CaptureFixture[str]) -> None:
    """Krum, Multi-Krum and Bulyan report their three phases, each timed on its own (the others: null)."""
    from aggregathor.gars import _distances

    rc = main(["gars", "--n", "11", "--d", "3000", "--rules", "median,multi-krum,bulyan", "--repeats", "2",
               "--json", "--quiet", "--no-reference"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    median, mk, bulyan = result["records"]
    assert median["phases"] is None
    for r in (mk, bulyan):
        p = r["phases"]
        for key in ("distances", "selection", "combination"):
            assert _num(p[key]) and p[key] > 0 and len(p["times"][key]) == 2
        assert p["sum"] == pytest.approx(p["distances"] + p["selection"] + p["combination"], rel=1e-3)
        if _distances.kernel_available():  # the kernel's own split of the distances phase, measured in C
            k = p["kernel"]
            assert k["threads"] >= 1 and k["blocks_float32"] >= 1 and k["blocks_float64"] == 0
            assert 0 <= k["scan_seconds"] and 0 < k["pairs_seconds"] <= p["distances"]
    assert "phases distances" in render(result)


def test_rules_all_skips_a_rule_whose_bound_does_not_hold(capsys: pytest.CaptureFixture[str]) -> None:
    import aggregathor.gars as gars

    names = gars.names()
    blocked = []
    for name in names:
        try:
            gars.get(name, 10, 1)
        except ValueError:
            blocked.append(name)
    if not blocked:
        pytest.skip("every registered rule runs at n = 10, f = 1")
    rc = main(["gars", "--n", "10", "--f", "1", "--d", "200", "--repeats", "1", "--json", "--quiet",
               "--no-reference"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(r["rule"] for r in result["records"]) == sorted(set(names) - set(blocked))
    assert sorted(k.split()[0] for k in result["skipped"]) == sorted(blocked)
    assert "not run, its bound does not hold" in render(result)
