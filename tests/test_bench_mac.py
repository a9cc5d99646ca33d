"""``python -m lossympi.bench mac`` and the core's MAC timing loop: JSON shape, argument errors, the table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lossympi import _core
from lossympi.bench.mac import render

ROOT = Path(__file__).resolve().parents[1]


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lossympi.bench", "mac", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_mac_bench_reports_every_implementation_the_cpu_has():
    proc = _bench("--seconds", "0.02", "--repeats", "2", "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    want = ["clmul", "portable", "blake2b"] if _core.HAVE_CLMUL else ["portable", "blake2b"]
    assert list(r["results"]) == want
    assert r["core_uses"] == ("clmul" if _core.HAVE_CLMUL else "portable")
    assert r["bytes"] == _core.DEFAULT_DATAGRAM_BYTES - _core.MAC_SIZE == 1456
    for impl in want:
        got = r["results"][impl]
        assert len(got["ns_per_datagram_all"]) == 2 and all(x > 0 for x in got["ns_per_datagram_all"])
        assert got["gbytes_per_s"] == pytest.approx(1456 / got["ns_per_datagram"], rel=0.01)
    assert r["command"].startswith("python -m lossympi.bench mac")
    assert "used by the core" in render(r)


@pytest.mark.parametrize("args, message", [
    (["--bytes", "5"], "--bytes must be 32..65507"),
    (["--repeats", "0"], "--repeats >= 1"),
])
def test_mac_bench_bad_arguments_are_usage_errors(args, message):
    proc = _bench(*args)
    assert proc.returncode == 2 and message in proc.stderr and proc.stdout == ""


def test_mac_seconds_validates_its_arguments():
    with pytest.raises(ValueError, match="impl must be one of"):
        _core.mac_seconds(1456, 10, "md5")
    with pytest.raises(ValueError, match="nbytes"):
        _core.mac_seconds(8, 10, "portable")
    with pytest.raises(ValueError, match="reps"):
        _core.mac_seconds(1456, 0, "blake2b")
