"""tools/reproduce.py: the helpers, and a quick end-to-end run of the robustness part (and, as root, the lossy one)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "reproduce.py"


def _load():
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


R = _load()


def test_steady_rate_and_time_to_accuracy():
    hist = [{"step": 10, "wall": 5.0, "accuracy": 0.5}, {"step": 20, "wall": 7.0, "accuracy": 0.91},
            {"step": 30, "wall": 9.0, "accuracy": 0.95}]
    assert R.steady_rate(hist) == pytest.approx(5.0)  # 20 steps in 4 s, the warm-up before step 10 left out
    assert R.steady_rate(hist[:1]) is None
    assert R.time_to_accuracy(hist, 0.9) == 7.0
    assert R.time_to_accuracy(hist, 0.99) is None
    assert R.median([3.0, None, 1.0, 2.0]) == 2.0
    assert R.median([1.0, 2.0]) == 1.5
    assert R.median([None]) is None


def test_markdown_blocks_are_replaced_and_the_rest_is_kept(tmp_path):
    path = tmp_path / "results.md"
    R.update_markdown(path, {"robustness": "table one"})
    text = path.read_text()
    assert "table one" in text and "<!-- reproduce:lossy:begin -->" in text
    path.write_text(text.replace("# Reproducing", "# Reproducing\n\nA reading written by hand.\n"))
    R.update_markdown(path, {"robustness": "table two"})
    text = path.read_text()
    assert "table two" in text and "table one" not in text and "A reading written by hand." in text
    assert text.count("<!-- reproduce:robustness:begin -->") == 1
    table = R.md_table(["a", "b"], [["x", "1.5"], ["y", "–"]])
    assert table.splitlines()[1] == "|---|---:|"


def test_recorded_command_reproduces_the_config():
    import aggregathor.__main__ as cli
    from aggregathor.config import TrainConfig

    cfg = TrainConfig.from_dict(dict(gar="bulyan", workers=11, f=1, byzantine=1, attack="alie", steps=200, loss=0.0,
                                     eval_every=25, checkpoint_every=0, launcher="simulate", run_dir="out/x",
                                     gar_options={}, attack_options={"z": 1.5})).to_dict()
    argv = shlex.split(R.cli_command(cfg))
    assert argv[:2] == ["aggregathor", "train"]
    parser = argparse.ArgumentParser()
    cli._train_parser(parser.add_subparsers(dest="cmd"))
    again = cli._config(parser.parse_args(argv[1:])).to_dict()
    assert again == cfg


def _run(tmp_path: Path, parts: str, timeout: float, extra: tuple[str, ...] | list[str] = ()
         ) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path / "docs"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--parts", parts, "--out", str(out), "--scratch",
                           str(tmp_path / "runs"), *extra], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=os.environ | {"TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_quick_robustness_writes_markdown_figure_and_json(tmp_path):
    out, _ = _run(tmp_path, "robustness", timeout=240)
    md = (out / "results.md").read_text()
    block = md[md.index("<!-- reproduce:robustness:begin -->"):md.index("<!-- reproduce:robustness:end -->")]
    assert "| rule \\ attack | none | reverse |" in block
    assert "`multi-krum`" in block and "python tools/reproduce.py --quick --parts robustness" in block
    assert (out / "results" / "robustness.png").stat().st_size > 1000
    part = json.loads((out / "results" / "robustness.json").read_text())
    assert part["plan"]["quick"] is True and len(part["runs"]) == 6
    runs = sorted((out / "results" / "robustness").glob("*.json"))
    assert len(runs) == 6
    for path in runs:
        rec = json.loads(path.read_text())
        assert "error" not in rec, rec.get("error")
        assert rec["config"]["launcher"] == "simulate" and rec["config"]["workers"] == 7
        assert rec["command"].startswith("aggregathor train ") and "--seed 0" in rec["command"]
        assert rec["summary"]["history"] and 0.0 <= rec["summary"]["accuracy"] <= 1.0
        assert "foreign_cpu_fraction" in rec["contention"]
    acc = part["accuracy"]
    assert acc["average|reverse"] < 0.3 < acc["multi-krum|reverse"]  # even 12 steps tell them apart
    # --reuse rebuilds the report from the recorded runs without running them again
    before = {p.name: json.loads(p.read_text())["started"] for p in runs}
    _, proc = _run(tmp_path, "robustness", timeout=120, extra=["--reuse"])
    assert proc.stderr.count("recorded run reused") == 6
    assert {p.name: json.loads(p.read_text())["started"] for p in runs} == before


def _root_reason() -> str | None:
    from lossympi.netem import require_root_reason

    return require_root_reason()


@pytest.mark.skipif(_root_reason() is not None, reason=str(_root_reason()))
def test_quick_lossy_runs_every_transport_in_an_emulated_cluster(tmp_path):
    out, _ = _run(tmp_path, "lossy", timeout=280)
    md = (out / "results.md").read_text()
    for transport in ("lossympi", "tcp", "grpc"):
        rec = json.loads((out / "results" / "lossy" / f"{transport}-loss5.json").read_text())
        assert "error" not in rec, rec.get("error")
        assert rec["harness"]["netem"]["loss"] == 0.05 and rec["config"]["loss"] == 0.0
        assert rec["netem_cluster"]["hosts"][0]["applied"].get("loss")
        # every host delays what it receives (RTT 2 ms), with the emulator the kernel allows
        assert all(h["applied"].get("delay") in ("netem", "nfqueue") and h["link"]["delay"] == 0.001
                   for h in rec["netem_cluster"]["hosts"])
        assert rec["rerun"].endswith(f"{transport}-loss5.json")
        assert f"`{transport}`" in md
    assert (out / "results" / "lossy.png").exists()


def test_scalability_points_follow_each_rules_bound():
    """The seed's figure: every line where its bound allows it, and nowhere else (the full plan)."""
    pts = R.scale_points(R.Plan.make(False))
    real = {(r, f, t, n) for r, f, t, n, sim in pts if not sim}
    sim = {(r, f, n) for r, f, t, n, s in pts if s}
    assert ("multi-krum", 8, "lossympi", 18) not in real and ("multi-krum", 8, 63) in sim  # n >= 2f + 3 = 19
    assert ("multi-krum", 4, "lossympi", 12) in real and ("multi-krum", 4, "lossympi", 9) not in real
    assert ("bulyan", 2, "lossympi", 12) in real and ("bulyan", 1, "lossympi", 6) not in real  # n >= 4f + 3
    assert ("draco", 4, "lossympi", 9) in real and ("draco", 4, "lossympi", 12) not in real  # n multiple of 2f + 1
    assert {("average", 0, "tcp", 3), ("average", 0, "mpi", 18)} <= real
    assert all(t == "simulated" for r, f, t, n, s in pts if s)
    assert R.useful_gradients("draco", 9, 1) == 3 and R.useful_gradients("bulyan", 9, 1) == 9
    spec = R.scale_spec(R.Plan.make(False), ("average", 0, "mpi", 6, False), 0)
    assert spec.config["launcher"] == "mpi" and spec.harness["launcher"] == "mpiexec"


def test_lossy_links_with_delay_put_one_lossy_delayed_hop_on_every_path():
    """With a delay every host delays and drops what it receives (RTT = 2 x delay); without, the loss sits on
    the server's link only, in both directions; every host is set so that no impairment outlives its run."""
    with_delay = R.netem_links({"host": 0, "loss": 0.05, "direction": "both", "delay": 0.001}, 3)
    assert with_delay == {h: {"loss": 0.05, "delay": 0.001, "direction": "in"} for h in range(3)}
    plain = R.netem_links({"host": 0, "loss": 0.05, "direction": "both", "delay": 0.0}, 3)
    assert plain == {0: {"loss": 0.05, "direction": "both"}, 1: {}, 2: {}}
    assert R.Plan.make(False).lossy_delay == 0.001 and 0.10 in R.Plan.make(False).lossy_losses
