"""The examples run as documented.

- ``examples/lossy_allreduce.py`` under ``mpiexec``, and without MPI through the ``LOSSYMPI_*`` variables.
- ``examples/custom_model.py`` (a user's Keras model with BatchNormalization on raw, badly scaled features) from
  the real command line with ``--experiment examples/custom_model.py:experiment``: 4 honest workers and 1
  Byzantine ``reverse`` worker aggregated by Multi-Krum, under the local launcher and under ``mpiexec``, reach at
  the server within 2 points of the same model trained by plain Keras in one process; and ``python
  examples/custom_model.py`` trains it through ``aggregathor.train`` with the simulate launcher. The server only
  gets BatchNormalization's moving statistics from the workers: without them it evaluates the raw features with
  the initial statistics (accuracy 0.37: every tumour called malignant).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALLREDUCE = ROOT / "examples" / "lossy_allreduce.py"
CUSTOM_MODEL = "examples/custom_model.py"
ROUND = re.compile(r"^round (\d+): delivered ([\d.]+)  max error (\S+)  mean error (\S+)  time ([\d.]+) ms$")


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("LOSSYMPI_", "PMI", "OMPI_", "PMIX"))}


def _rounds(stdout: str) -> list[tuple[int, float, float, float, float]]:
    lines = stdout.strip().splitlines()
    parsed = [ROUND.match(line) for line in lines]
    assert all(parsed), stdout
    return [(int(m[1]), float(m[2]), float(m[3]), float(m[4]), float(m[5])) for m in parsed if m]


def _mpiexec() -> Path:
    """The mpiexec of this environment (the mpich wheel's, next to Python), else the one on PATH; else skip."""
    pytest.importorskip("mpi4py", reason="mpi4py is not installed")
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        found = shutil.which("mpiexec")
        if found is None:
            pytest.skip(f"no mpiexec next to {sys.executable} nor on PATH")
        mpiexec = Path(found)
    return mpiexec


def test_lossy_allreduce_under_mpiexec() -> None:
    mpiexec = _mpiexec()
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


# ---------------------------------------------------------------------------------------------- custom_model.py
#: 4 honest workers + 1 Byzantine, as the example's docstring runs it (Multi-Krum needs n >= 2f + 3).
CUSTOM_ARGS = ["--experiment", f"{CUSTOM_MODEL}:experiment", "--workers", "5", "--f", "1", "--byzantine", "1",
               "--attack", "reverse", "--gar", "multi-krum", "--steps", "300", "--eval-every", "50",
               "--checkpoint-every", "0", "--seed", "0", "--quiet"]
#: The CLI defaults the runs train with (momentum SGD, lr 0.1, 32 samples per worker): 4 honest workers' mean.
REF_LR, REF_MOMENTUM, REF_BATCH, REF_STEPS = 0.1, 0.9, 4 * 32, 300
LAST_EVALS = 3  # accuracy of a run: the mean of its last evaluations (steps 200, 250, 300): 143 test samples


def _custom_experiment() -> Any:
    from aggregathor import experiments

    return experiments.get(f"{ROOT / CUSTOM_MODEL}:experiment")


@cache
def _one_process_reference() -> float:
    """Mean test accuracy of the example's model trained by plain Keras on one process (seeds 0-2).

    The same optimizer, learning rate and steps as the runs, with one batch of the 4 honest workers' samples.
    """
    import keras

    exp = _custom_experiment()
    (x, y), (x_test, y_test) = exp.train_data(), exp.test_data()
    accuracies = []
    for seed in range(3):
        model = exp.build_model(seed)
        model.compile(keras.optimizers.SGD(REF_LR, momentum=REF_MOMENTUM),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        keras.utils.set_random_seed(seed)
        model.fit(x, y, batch_size=REF_BATCH, epochs=-(-REF_STEPS * REF_BATCH // len(y)), verbose=0)
        accuracies.append(float(model.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"]))
    return sum(accuracies) / len(accuracies)


def _run_accuracy(summary: dict[str, Any]) -> float:
    history = summary["history"]
    assert summary["steps"] == REF_STEPS and [h["step"] for h in history][-LAST_EVALS:] == [200, 250, 300], summary
    return sum(h["accuracy"] for h in history[-LAST_EVALS:]) / LAST_EVALS


def _check_custom_run(cmd: list[str], run_dir: Path, env: dict[str, str]) -> None:
    json_out = run_dir / "summary.json"
    cmd = [*cmd, *CUSTOM_ARGS, "--run-dir", str(run_dir), "--json-out", str(json_out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text()[-1500:] for p in sorted((run_dir / "logs").glob("rank*.log")))
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}\n{logs}"
    summary = json.loads(json_out.read_text())
    accuracy, reference = _run_accuracy(summary), _one_process_reference()
    print(f"{cmd[0]}: accuracy {accuracy:.3f} (last {LAST_EVALS} evaluations), one process {reference:.3f}")
    assert reference > 0.9, reference  # the model learns (the majority class alone is 0.63)
    assert accuracy >= reference - 0.02, (accuracy, reference, summary["history"])


@pytest.mark.timeout(900)
def test_custom_model_local_launcher_matches_one_process(tmp_path: Path) -> None:
    _check_custom_run([sys.executable, "-m", "aggregathor", "train", "--launcher", "local"], tmp_path / "run",
                      _clean_env())


@pytest.mark.timeout(900)
def test_custom_model_under_mpiexec_matches_one_process(tmp_path: Path) -> None:
    mpiexec = _mpiexec()
    cli = Path(sys.executable).parent / "aggregathor"
    cmd = [str(cli)] if cli.exists() else [sys.executable, "-m", "aggregathor"]
    _check_custom_run([str(mpiexec), "-n", "6", *cmd, "train", "--launcher", "mpi"], tmp_path / "run",
                      _clean_env() | {"HYDRA_LAUNCHER": "fork"})


@pytest.mark.timeout(600)
def test_custom_model_script_trains_through_the_python_api(tmp_path: Path) -> None:
    """``python examples/custom_model.py``: ``aggregathor.train(..., launcher="simulate")`` (its run directory
    goes under the working directory, here a scratch one)."""
    done = subprocess.run([sys.executable, str(ROOT / CUSTOM_MODEL)], cwd=tmp_path, env=_clean_env(),
                          capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    last = done.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"accuracy (0\.\d+)", last)
    assert m, done.stdout[-2000:]
    print(f"python {CUSTOM_MODEL}: accuracy {m[1]} (final), one process {_one_process_reference():.3f}")
    assert float(m[1]) >= _one_process_reference() - 0.02, (last, _one_process_reference())
