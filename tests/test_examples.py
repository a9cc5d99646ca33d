"""The examples run as documented: under mpiexec, and without MPI through the LOSSYMPI_* variables."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALLREDUCE = ROOT / "examples" / "lossy_allreduce.py"
ROUND = re.compile(r"^round (\d+): delivered ([\d.]+)  max error (\S+)  mean error (\S+)  time ([\d.]+) ms$")


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("LOSSYMPI_", "PMI", "OMPI_", "PMIX"))}


def _rounds(stdout: str) -> list[tuple[int, float, float, float, float]]:
    lines = stdout.strip().splitlines()
    parsed = [ROUND.match(line) for line in lines]
    assert all(parsed), stdout
    return [(int(m[1]), float(m[2]), float(m[3]), float(m[4]), float(m[5])) for m in parsed if m]


def test_lossy_allreduce_under_mpiexec() -> None:
    pytest.importorskip("mpi4py", reason="mpi4py is not installed")
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        found = shutil.which("mpiexec")
        if found is None:
            pytest.skip(f"no mpiexec next to {sys.executable} nor on PATH")
        mpiexec = Path(found)
    out = subprocess.run(
        [str(mpiexec), "-n", "4", sys.executable, str(ALLREDUCE), "--elements", "100000", "--rounds", "3"],
        env=_clean_env() | {"HYDRA_LAUNCHER": "fork"}, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rounds = _rounds(out.stdout)  # only rank 0 prints
    assert [r[0] for r in rounds] == [0, 1, 2]
    for _, delivered, max_err, mean_err, ms in rounds:
        assert delivered == 1.0 and max_err < 1e-5 and mean_err < 1e-6 and ms < 500  # no loss: exact, early


def test_lossy_allreduce_with_env_rendezvous_and_loss() -> None:
    size = 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _clean_env() | {
        "LOSSYMPI_WORLD_SIZE": str(size),
        "LOSSYMPI_RENDEZVOUS": f"127.0.0.1:{port}",
        "LOSSYMPI_SECRET": secrets.token_hex(16),
    }
    args = [sys.executable, str(ALLREDUCE), "--elements", "200000", "--rounds", "2", "--loss", "0.2",
            "--timeout", "0.3"]
    procs = [subprocess.Popen(args, env=env | {"LOSSYMPI_RANK": str(r)}, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(size)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    assert outs[1][0] == ""
    rounds = _rounds(outs[0][0])
    assert [r[0] for r in rounds] == [0, 1]
    for _, delivered, max_err, _, ms in rounds:
        assert 0.6 < delivered < 0.95 and max_err > 1e-3  # lossy, estimated
        assert ms < 1500  # a lossy round ends by its deadline (with FINs, soon after the senders are done)
