"""End to end across processes: lossympi transfers after an MPI or an env:// bootstrap."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROG = ROOT / "tests" / "progs" / "transfer_to_root.py"
N = 300_000


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("LOSSYMPI_", "PMI", "OMPI_", "PMIX"))}


def _check(report_dir: Path, size: int) -> None:
    report = json.loads((report_dir / "root.json").read_text())
    assert sorted(report) == [str(r) for r in range(1, size)]
    for r, rep in report.items():
        assert rep["complete"] and rep["exact"], (r, rep)
        assert rep["delivered"] == 1.0 and rep["rejected"] == 0


def test_transfer_after_env_rendezvous(tmp_path: Path) -> None:
    size = 3
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = _clean_env() | {
        "LOSSYMPI_WORLD_SIZE": str(size),
        "LOSSYMPI_RENDEZVOUS": f"127.0.0.1:{port}",
        "LOSSYMPI_SECRET": secrets.token_hex(16),
    }
    procs = [
        subprocess.Popen([sys.executable, str(PROG), str(tmp_path), str(N)],
                         env=base | {"LOSSYMPI_RANK": str(r)}, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(size)
    ]
    for p in procs:
        _, err = p.communicate(timeout=90)
        assert p.returncode == 0, err
    _check(tmp_path, size)


def test_transfer_under_mpiexec(tmp_path: Path) -> None:
    pytest.importorskip("mpi4py", reason="mpi4py is not installed")
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        found = shutil.which("mpiexec")
        if found is None:
            pytest.skip(f"no mpiexec next to {sys.executable} nor on PATH")
        mpiexec = Path(found)
    env = _clean_env() | {"HYDRA_LAUNCHER": "fork"}
    size = 3
    out = subprocess.run([str(mpiexec), "-n", str(size), sys.executable, str(PROG), str(tmp_path), str(N)],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    _check(tmp_path, size)
