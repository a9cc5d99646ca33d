"""The summary of ``tools/gpu_check.sh``: the GPU targets met or not, from the files the check wrote.

``python tools/gpu_check_summary.py OUT [--train-rules R,...] [--failed 0|1]`` reads ``OUT/devices.json``,
``OUT/placement.json``, ``OUT/gars.json`` (``python -m aggregathor.bench gars --json``), ``OUT/train-<rule>.json``
(the runs' summaries) and ``OUT/phases.tsv``; prints a short summary and writes it to
``OUT/gpu_check_summary.json``.

The GPU targets (issue 14, requirement 5): median, trimmed mean and Multi-Krum at most :data:`GPU_TARGET` times the
bench's floor (``tf.reduce_mean(x, axis=0)``, one read of the ``(n, d)`` data: one memory pass), at every ``(n, d)``
the bench measured. A run on the CPU (``--allow-cpu``) is reported, and said not to be a GPU measurement.

Exit status: 0 when every phase ran and every file is there (targets met or not), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

GPU_TARGET = 2.0
TARGET_RULES = ("median", "trimmed-mean", "multi-krum")


def _load(path: Path, problems: list[str]) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{path.name}: {type(exc).__name__}: {exc}")
        return None


def targets(bench: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per measured (rule, n, d) of :data:`TARGET_RULES`: its ratio to the floor and whether it is met."""
    out = []
    for r in bench.get("records", []):
        if r.get("rule") not in TARGET_RULES:
            continue
        ratio = r.get("ratio_vs_floor")
        out.append({"rule": r["rule"], "n": r["n"], "d": r["d"], "device": r.get("device"), "ratio_vs_floor": ratio,
                    "seconds": r.get("seconds"), "floor_seconds": r.get("floor_seconds"),
                    "want_at_most": GPU_TARGET, "met": None if ratio is None else ratio <= GPU_TARGET,
                    "error": r.get("error")})
    return out


def training(out: Path, rules: list[str], placement: dict[str, str], problems: list[str]) -> list[dict[str, Any]]:
    """The simulated runs: accuracy, steps/s, updates skipped, and where each rule's aggregate was placed."""
    runs = []
    for rule in rules:
        s = _load(out / f"train-{rule}.json", problems)
        if s is None:
            continue
        runs.append({"rule": rule, "steps": s.get("steps"), "accuracy": s.get("accuracy"), "loss": s.get("loss"),
                     "steps_per_second": s.get("steps_per_second"), "skipped_updates": s.get("skipped_updates"),
                     "aggregate_device": placement.get(rule)})
    return runs


def phases(path: Path) -> dict[str, dict[str, float]]:
    """``phases.tsv`` (name, exit status, milliseconds) -> {name: {"status", "seconds"}}."""
    got: dict[str, dict[str, float]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, status, ms = line.split("\t")
            got[name] = {"status": int(status), "seconds": round(int(ms) / 1000, 1)}
    return got


def _size(d: int) -> str:
    """10000000 -> "1e7", 25000000 -> "2.5e7"."""
    return f"{d:.6g}".replace("e+0", "e").replace("e+", "e")


def _ratio(t: dict[str, Any]) -> str:
    if t["ratio_vs_floor"] is None:
        return f"{t['rule']} failed ({(t['error'] or 'no time')[:80]})"
    return f"{t['rule']} {t['ratio_vs_floor']:.2f}x {'met' if t['met'] else 'NOT met'}"


def render(summary: dict[str, Any]) -> str:
    """The short summary printed at the end of the check."""
    lines = [f"gpu_check summary: device {summary['device']} ({summary['device_description']}), "
             f"GPUs seen by TensorFlow: {summary['gpus']}"]
    if not summary["gpus"]:
        lines.append("  no GPU: this run checks the script on the CPU; it is not a GPU measurement")
    lines.append(f"  target: median, trimmed mean, Multi-Krum <= {GPU_TARGET:g}x the floor (one tf.reduce_mean pass)")
    for (n, d), group in sorted(_by_point(summary["targets"]).items()):
        floor = next((t["floor_seconds"] for t in group if t["floor_seconds"]), None)
        floor_text = f"floor {1e3 * floor:.2f} ms" if floor else "floor not measured"
        lines.append(f"  n={n} d={_size(d)} ({floor_text}): " + " | ".join(_ratio(t) for t in group))
    for r in summary["training"]:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        sps = "-" if r["steps_per_second"] is None else f"{r['steps_per_second']:.1f}"
        lines.append(f"  train {r['rule']}: {r['steps']} steps, accuracy {acc}, {sps} steps/s, "
                     f"skipped updates {r['skipped_updates']}, aggregate on {r['aggregate_device']}")
    lines.append("  phases: " + ", ".join(f"{k} {v['seconds']:g} s" + ("" if not v["status"] else " FAILED")
                                          for k, v in summary["phases"].items()))
    for p in summary["problems"]:
        lines.append(f"  problem: {p}")
    lines.append(f"  verdict: {summary['verdict']}")
    return "\n".join(lines)


def _by_point(items: list[dict[str, Any]]) -> dict[tuple[int, int], list[dict[str, Any]]]:
    out: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for t in items:
        out.setdefault((t["n"], t["d"]), []).append(t)
    return out


def summarize(out: Path, train_rules: list[str], failed: bool) -> dict[str, Any]:
    """Everything the check measured, with its verdict."""
    problems: list[str] = []
    devices = _load(out / "devices.json", problems) or {}
    placement = _load(out / "placement.json", problems) or {}
    bench = _load(out / "gars.json", problems) or {}
    gpus = [d["name"] for d in devices.get("devices", []) if d.get("type") == "GPU"]
    tgt = targets(bench)
    missing = [r for r in TARGET_RULES if r not in {t["rule"] for t in tgt}]
    if bench and missing:
        problems.append(f"the bench has no record of {', '.join(missing)}")
    runs = training(out, train_rules, placement, problems)
    steps = phases(out / "phases.tsv")
    problems += [f"phase {k} failed (exit status {v['status']:g})" for k, v in steps.items() if v["status"]]
    ok = not failed and not problems
    unmet = [t for t in tgt if not t["met"]]
    if not ok:
        verdict = "INCOMPLETE: see the problems above"
    elif not gpus:
        verdict = "ran on the CPU (--allow-cpu): the GPU targets are not judged"
    elif unmet:
        verdict = f"{len(unmet)} of {len(tgt)} GPU targets NOT met: " + ", ".join(
            f"{t['rule']} at d={_size(t['d'])}" for t in unmet)
    else:
        verdict = f"all {len(tgt)} GPU targets met"
    return {"check": "tools/gpu_check.sh", "ok": ok, "verdict": verdict, "gpus": gpus,
            "device": bench.get("device"), "device_description": bench.get("device_description"),
            "tensorflow": devices.get("tensorflow"), "cuda_build": devices.get("cuda_build"),
            "gpu_target_ratio_vs_floor": GPU_TARGET, "targets": tgt, "training": runs, "placement": placement,
            "phases": steps, "problems": problems, "bench_command": bench.get("command"),
            "bench_loadavg": [bench.get("loadavg_before"), bench.get("loadavg_after")]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="summary of tools/gpu_check.sh")
    p.add_argument("out", type=Path, help="the check's output directory")
    p.add_argument("--train-rules", default=",".join(TARGET_RULES), help="the rules of the simulated runs")
    p.add_argument("--failed", type=int, default=0, help="1 when a phase of the check failed")
    args = p.parse_args(argv)
    summary = summarize(args.out, [r for r in args.train_rules.split(",") if r], bool(args.failed))
    (args.out / "gpu_check_summary.json").write_text(json.dumps(summary, indent=1))
    print(render(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
