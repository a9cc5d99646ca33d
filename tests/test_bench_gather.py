"""Smoke tests of ``python -m lossympi.bench gather``.

- Its worker processes on loopback (no emulated cluster): every transport's root and senders start, gather and
  check every row (tcp, grpc and mpi through :mod:`lossympi.baselines`, the code aggregathor trains with).
- The whole benchmark on a tiny emulated cluster: JSON schema, sane loss. Needs root with ``ip`` and ``nft``
  (network namespaces, nftables loss); skipped otherwise, with the reason given by
  :func:`lossympi.netem.require_root_reason`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lossympi.bench.common import command_line
from lossympi.bench.gather import TRANSPORTS, Group, render
from lossympi.netem import require_root_reason

ROOT = Path(__file__).resolve().parents[1]
LOSS = 0.05
ARGS = ["gather", "--n", "2", "--d", "20000", "--loss", str(LOSS), "--repeats", "1",
        "--transports", ",".join(TRANSPORTS), "--json", "--quiet"]

_REASON = require_root_reason()
needs_cluster = pytest.mark.skipif(_REASON is not None, reason=f"needs an emulated cluster: {_REASON}")


class Loopback:
    """What :class:`~lossympi.bench.gather.Group` uses of a cluster, with every host on 127.0.0.1."""

    def __init__(self, size: int) -> None:
        self.ips = ["127.0.0.1"] * size
        self.hosts: list[str] = []  # no namespaces to sweep

    def popen(self, i: int, argv: list[str], **kw: Any) -> subprocess.Popen:
        return subprocess.Popen(argv, **kw)

    def command(self, i: int, argv: list[str]) -> list[str]:
        return list(argv)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_workers_gather_exactly_on_loopback(transport: str, tmp_path: Path) -> None:
    if transport == "mpi" and (shutil.which("mpiexec") is None and not (Path(sys.executable).parent / "mpiexec")
                               .exists()):
        pytest.skip("mpiexec is not installed")
    args = argparse.Namespace(ingest_gbps=1.0, root_nice=0, mpi_provider="tcp",
                              mpi_env="FI_TCP_IFACE=lo,FI_SOCKETS_IFACE=lo")
    group = Group(Loopback(3), transport, 2, 30011, args, tmp_path)
    try:
        hello = group.start()
        assert hello["transport"] == transport
        for seq in range(3):
            res = group.gather(seq, 60.0, 5.0)
            assert res["capped"] is False and res["verified"] is True and res["match_fraction"] == 1.0, res
            assert res["delivered"] == 1.0 and res["seconds"] > 0
    finally:
        group.close()


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "lossympi.bench", *ARGS], cwd=ROOT, capture_output=True,
                          text=True, timeout=55)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # exactly one JSON object on stdout


def _num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


@needs_cluster
@pytest.mark.timeout(60)
def test_json_schema(result: dict[str, Any]) -> None:
    r = result
    assert r["benchmark"] == "gather"
    assert r["command"] == command_line(ARGS) and r["argv"] == ARGS
    assert r["errors"] == []
    assert _num(r["host"]["nproc"]) and isinstance(r["host"]["kernel"], str)
    assert _num(r["settings"]["ingest_bps"]) and r["settings"]["per_packet_loss"] is True
    assert r["cluster"]["root_link_applied"].get("loss") in ("nft", "netem", "iptables")
    assert set(r["transport_info"]) == set(TRANSPORTS)
    assert len(r["records"]) == 1
    rec = r["records"][0]
    assert (rec["n"], rec["d"], rec["loss"]) == (2, 20000, LOSS)
    assert rec["total_bytes"] == 2 * 20000 * 4
    for t in TRANSPORTS:
        assert _num(rec[f"{t}_s"]) and rec[f"{t}_s"] >= 0, t
        assert rec["capped"][t] is False, t
        assert rec["transports"][t]["repeats_done"] >= 1
        assert rec["transports"][t]["verified"] is True, t  # every sampled value is where it belongs
    for key in ("speedup_vs_grpc", "speedup_vs_mpi", "ratio_vs_tcp", "lossympi_data_s", "deadline_s"):
        assert _num(rec[key]), key
    # lossympi returns at its deadline when a datagram is lost, never later than a moment after it
    assert rec["lossympi_data_s"] <= rec["lossympi_s"] <= rec["deadline_s"] + 0.5
    assert set(rec["targets"]) >= {"speedup_vs_grpc", "speedup_vs_mpi", "delivered_fraction"}
    text = render(r)
    assert "lossympi s" in text and "reproduce:" in text


@needs_cluster
@pytest.mark.timeout(60)
def test_lossympi_delivered_fraction_is_sane(result: dict[str, Any]) -> None:
    rec = result["records"][0]
    frac = rec["delivered_fraction"]
    # 2 x 57 datagrams, each lost with probability 0.05: the delivered fraction is about 0.95 (a 5-sigma band
    # of the binomial is ~0.85..1); below that, lossympi or the emulation lost more than the link drops.
    assert _num(frac) and 0.8 <= frac <= 1.0
    lm = rec["transports"]["lossympi"]
    assert abs(lm["match_fraction"] - frac) < 0.02  # the values that arrived are the values sent
