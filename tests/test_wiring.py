"""The CLI settings that change the transport reach it: each is measured in a real multi-process run.

Every run is the real command line (``python -m aggregathor train``, local launcher: 1 server + 3 worker
processes on loopback, digits, 40 steps, plain averaging, no Byzantine worker) and the assertions read what the
run measured (``--json-out`` summary, ``<run-dir>/steps.jsonl``), not the configuration it echoes, so each test
fails when its setting is ignored:

- ``--loss``: 5% emulated datagram loss measures 3-7% lost gradient chunks; ``--loss 0`` measures none.
- ``--fill``: with a rule that is not NaN-robust (averaging), a NaN-filled lost chunk makes the aggregate NaN, so
  the server skips exactly the steps that lost a chunk; zero-filled ones never skip.
- ``--deadline``: the first step's gather deadline is the cap (no arrival observed yet), and no step exceeds it.
- ``--transport tcp``: one chunk per gradient (a frame, not 14 datagrams), nothing lost.

A gradient that missed the deadline entirely (a worker descheduled on a busy machine) is a lost gradient, not
datagram loss: the loss fractions are measured over the steps without one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 3
STEPS = 40
#: The digits MLP has 4,810 float32 parameters: 14 lossympi datagrams of 1,424 payload bytes per gradient.
CHUNKS_PER_GRADIENT = 14
BASE = ["--workers", str(WORKERS), "--f", "0", "--byzantine", "0", "--gar", "average", "--experiment", "digits",
        "--steps", str(STEPS), "--eval-every", str(STEPS), "--checkpoint-every", "0", "--seed", "1", "--quiet"]
RUNS: dict[str, list[str]] = {
    "loss5": ["--loss", "0.05", "--fill", "zero", "--deadline", "0.7"],
    "loss0": ["--loss", "0", "--deadline", "1.3"],
    "fill-nan": ["--loss", "0.05", "--fill", "nan"],
    "tcp": ["--transport", "tcp", "--loss", "0"],
    "params-reliable": ["--loss", "0.05", "--params", "reliable"],
}

pytestmark = pytest.mark.timeout(900)


class Run:
    """One finished run: its summary and its step log."""

    def __init__(self, run_dir: Path) -> None:
        self.summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text())
        self.steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]

    def datagram_loss(self) -> float:
        """Lost chunks over chunks, on the steps where every gradient arrived at least in part."""
        whole = [s for s in self.steps if s["lost_gradients"] == 0 and s["missing_workers"] == 0]
        assert len(whole) >= 0.75 * STEPS, f"only {len(whole)} of {STEPS} steps had every gradient"
        return sum(s["lost_chunks"] for s in whole) / sum(s["chunks"] for s in whole)


@cache
def _train(name: str, scratch: Path) -> Run:
    run_dir = scratch / name
    cmd = [sys.executable, "-m", "aggregathor", "train", *BASE, *RUNS[name], "--run-dir", str(run_dir),
           "--json-out", str(run_dir / "summary.json")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text()[-1500:] for p in sorted((run_dir / "logs").glob("rank*.log")))
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}\n{logs}"
    run = Run(run_dir)
    assert run.summary["steps"] == STEPS and len(run.steps) == STEPS, run.summary
    return run


@pytest.fixture(scope="module")
def train(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``train(name)``: the run ``RUNS[name]``, started once per module."""
    scratch = tmp_path_factory.mktemp("wiring")
    return lambda name: _train(name, scratch)


def test_loss_is_measured_as_lost_chunks(train: Any) -> None:
    lossy, lossless = train("loss5"), train("loss0")
    assert 0.03 <= lossy.datagram_loss() <= 0.07, lossy.datagram_loss()
    assert lossless.datagram_loss() == 0.0
    for run in (lossy, lossless):
        if run.summary["lost_gradients"] == 0:  # the summary counts the same chunks
            assert run.summary["lost_chunk_fraction"] == pytest.approx(run.datagram_loss())
        # lossympi: every gradient travels as its datagrams
        assert all(s["chunks"] == WORKERS * CHUNKS_PER_GRADIENT for s in run.steps), run.steps[0]


def test_fill_nan_reaches_the_rows_and_zero_does_not(train: Any) -> None:
    nan, zero = train("fill-nan"), train("loss5")
    assert nan.datagram_loss() > 0.03 and zero.datagram_loss() > 0.03  # both lost chunks to fill
    # NaN in a lost chunk makes the average NaN: exactly the steps that lost a chunk are skipped.
    skipped = [s["step"] for s in nan.steps if s.get("update_skipped")]
    assert skipped == [s["step"] for s in nan.steps if s["lost_chunks"]] and skipped, nan.steps[:3]
    assert nan.summary["skipped_updates"] == len(skipped)
    assert zero.summary["skipped_updates"] == 0 and not any(s.get("update_skipped") for s in zero.steps)
    for run in (nan, zero):  # the fill is not blamed on the sender: only what arrived is judged
        assert sum(run.summary["nonfinite_rows"].values()) == 0, run.summary["nonfinite_rows"]


@pytest.mark.parametrize(("name", "cap"), [("loss5", 0.7), ("loss0", 1.3)])
def test_deadline_caps_the_gather(train: Any, name: str, cap: float) -> None:
    run = train(name)
    assert run.steps[0]["deadline"] == cap  # nothing observed yet: the step waits up to the cap
    assert max(s["deadline"] for s in run.steps) <= cap


def test_transport_tcp_sends_one_frame_per_gradient(train: Any) -> None:
    run = train("tcp")
    assert run.summary["config"]["transport"] == "tcp"
    assert all(s["chunks"] == WORKERS for s in run.steps), run.steps[:3]
    assert run.datagram_loss() == 0.0 and run.summary["rejected_datagrams"] == 0


def test_control_copies_reach_the_server_and_are_counted(train: Any) -> None:
    """lossympi sends each worker's per-step ready frame also as UDP copies (lossympi.control_copies): the
    server's summary counts them (every one authentic); the TCP baseline has no copies."""
    run, tcp = train("loss0"), train("tcp")
    copies = run.summary["control_copies"]
    assert copies.get("first", 0) + copies.get("duplicate", 0) >= WORKERS * len(run.steps), copies
    assert set(copies) <= {"first", "duplicate"}, copies  # nothing refused
    assert tcp.summary["control_copies"] == {}


def test_params_reliable_sends_no_parameter_datagrams_and_lossy_loses_them(train: Any) -> None:
    """``--params lossy`` (default): the parameters travel as datagrams to every worker, and ``--loss`` drops
    3-7% of them; ``--params reliable``: none travel as datagrams (the control stream carries them), while the
    gradients still lose theirs."""
    lossy, reliable = train("loss5"), train("params-reliable")
    assert all(s["params_chunks"] == WORKERS * CHUNKS_PER_GRADIENT for s in lossy.steps), lossy.steps[0]
    lost = sum(s["params_lost_chunks"] for s in lossy.steps) / sum(s["params_chunks"] for s in lossy.steps)
    assert 0.03 <= lost <= 0.07, lost
    assert all(s["params_chunks"] == 0 and s["params_lost_chunks"] == 0 for s in reliable.steps), reliable.steps[0]
    assert 0.03 <= reliable.datagram_loss() <= 0.07
