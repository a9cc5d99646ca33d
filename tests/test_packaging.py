"""The base install (``pip install .``) is lossympi alone: no TensorFlow, and it works.

A fresh, clean virtual environment (no system site-packages) gets ``pip install <this checkout>``, which compiles
the Cython core; then TensorFlow and the rest of the ``[train]`` extra must be absent, ``python -m lossympi
selftest`` and ``examples/lossy_allreduce.py`` (two ranks, env rendezvous, no MPI) must work, and ``import
aggregathor`` and the ``aggregathor`` command must fail with one line that says how to install the extra.
Downloads go through a pip cache under /tmp, so a rerun is fast; the test is skipped only when the package index
cannot be reached.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PIP_CACHE = Path("/tmp/aggregathor-reborn-pip-cache")
INSTALL_HINT = 'pip install "aggregathor-reborn[train]"'
#: Distributions of the [train] and [mpi] extras, none of which the base install may bring.
NOT_IN_BASE = ("tensorflow", "tensorflow-cpu", "keras", "scikit-learn", "grpcio", "tensorboard", "matplotlib",
               "tqdm", "mpi4py", "mpich")

pytestmark = pytest.mark.timeout(600)


def _env() -> dict[str, str]:
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("LOSSYMPI_")}


def _copy_checkout(dest: Path) -> None:
    """The checkout's files (tracked, and untracked ones git does not ignore): no build outputs, no venv."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _index_reachable(python: Path, scratch: Path) -> bool:
    probe = subprocess.run([str(python), "-m", "pip", "download", "--no-deps", "--cache-dir", str(PIP_CACHE),
                            "--dest", str(scratch), "cryptography"], env=_env(), capture_output=True, timeout=180)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The ``bin/`` of a clean venv with the base install of this checkout."""
    tmp = tmp_path_factory.mktemp("base-install")
    src, venv = tmp / "src", tmp / "venv"
    _copy_checkout(src)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "--cache-dir", str(PIP_CACHE), str(src)],
                          env=_env(), cwd=tmp, capture_output=True, text=True, timeout=480)
    if done.returncode != 0:
        if not _index_reachable(python, tmp / "probe"):
            pytest.skip("the package index is unreachable: cannot build the base install")
        pytest.fail(f"pip install . failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    yield venv / "bin"


def _run(bin_dir: Path, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    exe = args[0] if "/" in args[0] else str(bin_dir / args[0])
    return subprocess.run([exe, *args[1:]], env=kwargs.pop("env", None) or _env(), cwd=bin_dir.parent,
                          capture_output=True, text=True, timeout=120, **kwargs)  # type: ignore[call-overload]


def test_base_install_has_no_training_dependencies(base_venv: Path) -> None:
    code = ("import importlib.metadata as m, importlib.util as u; "
            "print(u.find_spec('tensorflow') is None); "
            "print(' '.join(sorted(d.metadata['Name'].lower() for d in m.distributions())))")
    done = _run(base_venv, "python", "-c", code)
    assert done.returncode == 0, done.stderr
    tf_absent, names = done.stdout.splitlines()
    assert tf_absent == "True", "TensorFlow is importable in the base install"
    installed = set(names.split())
    assert {"aggregathor-reborn", "numpy", "uvloop", "cryptography"} <= installed, installed
    assert not installed & set(NOT_IN_BASE), f"the base install brought {sorted(installed & set(NOT_IN_BASE))}"


def test_lossympi_selftest_in_base_install(base_venv: Path) -> None:
    done = _run(base_venv, "python", "-m", "lossympi", "selftest", "--elements", "200000")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "selftest: OK" in done.stderr


def test_example_runs_without_mpi_in_base_install(base_venv: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _env() | {"LOSSYMPI_WORLD_SIZE": "2", "LOSSYMPI_RENDEZVOUS": f"127.0.0.1:{port}",
                    "LOSSYMPI_SECRET": secrets.token_hex(16)}
    cmd = [str(base_venv / "python"), str(ROOT / "examples" / "lossy_allreduce.py"), "--elements", "100000",
           "--rounds", "2", "--loss", "0.05"]
    procs = [subprocess.Popen(cmd, env=env | {"LOSSYMPI_RANK": str(r)}, cwd=base_venv.parent,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    rounds = outs[0][0].splitlines()
    assert len(rounds) == 2 and all(line.startswith(f"round {i}: delivered") for i, line in enumerate(rounds))


@pytest.mark.parametrize("command", [("python", "-c", "import aggregathor"), ("aggregathor", "train")])
def test_aggregathor_without_train_extra_says_how_to_install(base_venv: Path, command: tuple[str, ...]) -> None:
    done = _run(base_venv, *command)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and INSTALL_HINT in lines[0] and "TensorFlow" in lines[0], done.stderr
