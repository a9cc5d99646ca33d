"""Smoke test of ``python -m lossympi.bench p2p``: tiny transfers, JSON shape and types, the table."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lossympi.bench.common import command_line, parse_rates, table
from lossympi.bench.p2p import render

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["p2p", "--megabytes", "2", "--repeats", "1", "--rates", "4", "--variants", "nogsogro,noauth",
        "--json", "--quiet"]


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "lossympi.bench", *ARGS], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # exactly one JSON object on stdout


def _num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


@pytest.mark.timeout(120)
def test_json_keys_and_types(result: dict[str, Any]) -> None:
    r = result
    assert r["benchmark"] == "p2p"
    assert r["megabytes"] == 2 and r["repeats"] == 1 and r["datagram_bytes"] == 1472
    assert r["bytes"] == 2_000_000 and r["payload_bytes_per_datagram"] == 1424
    for key in ("gso", "gro", "auth"):
        assert isinstance(r[key], bool)
    assert r["auth"] is True
    assert _num(r["lossympi_gbps"]) and r["lossympi_gbps"] > 0
    assert _num(r["delivered_fraction"]) and 0 <= r["delivered_fraction"] <= 1
    assert _num(r["tcp_gbps"]) and r["tcp_gbps"] > 0
    assert _num(r["ratio_vs_tcp"])
    assert r["command"] == command_line(ARGS) and r["command"].startswith("python -m lossympi.bench p2p")
    assert r["argv"] == ARGS
    assert _num(r["host"]["nproc"]) and isinstance(r["host"]["kernel"], str)
    assert set(r["targets"]) == {"vs_iperf3", "vs_tcp", "loss"}

    names = [v["name"] for v in r["variants"]]
    assert names == ["main", "nogsogro", "noauth", "paced4G"]
    for v in r["variants"]:
        for key in ("gso", "gro", "auth"):
            assert isinstance(v[key], bool)
        assert _num(v["gbps"]) and v["gbps"] >= 0
        assert _num(v["delivered_fraction"]) and 0 <= v["delivered_fraction"] <= 1
        assert len(v["runs_gbps"]) == 1
        if v["complete_runs"]:
            assert v["verified"] is True  # the bytes that arrived are the bytes that were sent
    by_name = {v["name"]: v for v in r["variants"]}
    assert by_name["nogsogro"]["gso"] is False and by_name["nogsogro"]["gro"] is False
    assert by_name["noauth"]["auth"] is False
    assert by_name["paced4G"]["rate_gbps"] == 4.0


@pytest.mark.timeout(120)
def test_iperf3_part(result: dict[str, Any]) -> None:
    r = result
    if shutil.which("iperf3") is None:
        assert r["iperf3_udp_gbps"] is None and r["ratio_vs_iperf3"] is None
        assert "not found" in r["iperf3_note"]
        pytest.skip("iperf3 is not installed")
    if r["iperf3_udp_gbps"] is None:  # iperf3 present but failed: the reason must be said
        assert r["iperf3_note"]
        pytest.skip(f"iperf3 failed here: {r['iperf3_note']}")
    assert _num(r["iperf3_udp_gbps"]) and r["iperf3_udp_gbps"] > 0
    assert _num(r["iperf3_udp_unpaced_gbps"]) and _num(r["iperf3_udp_unpaced_lost_percent"])
    assert _num(r["ratio_vs_iperf3"])
    rates = [c["rate_gbps"] for c in r["iperf3"]["configs"]]
    assert rates == [None, 4.0]


def test_render(result: dict[str, Any]) -> None:
    text = render(result)
    assert "lossympi main" in text and "tcp sendall" in text and "ratio vs iperf3" in text
    assert "reproduce: python -m lossympi.bench p2p" in text


def test_helpers() -> None:
    assert parse_rates("2,4.5") == [2.0, 4.5]
    assert parse_rates("none") == []
    with pytest.raises(ValueError):
        parse_rates("fast")
    assert command_line(["p2p", "--rates", "a b"]) == "python -m lossympi.bench p2p --rates 'a b'"
    assert "x" in table(["a"], [["x"]])


def test_bad_variant_is_refused() -> None:
    proc = subprocess.run([sys.executable, "-m", "lossympi.bench", "p2p", "--variants", "warp", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "unknown variant" in proc.stderr
