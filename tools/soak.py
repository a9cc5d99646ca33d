#!/usr/bin/env python3
"""Soak test (issue #7, item 5): a long multi-process training run at 5 % loss, watched for leaks and late steps.

  python tools/soak.py                       # 30 minutes, 16 workers, digits, Multi-Krum f=1, 5 % loss
  python tools/soak.py --minutes 3 --interval 5 --json-out out/soak-trial.json --png out/soak-trial.png

The job is ``workers + 1`` real rank processes started like ``tools/reproduce.py`` starts them
(:func:`reproduce.start_ranks`: ``python -m aggregathor._rank CONFIG``). The loss is

- as root: 5 % packet loss on the parameter server's link of an emulated cluster (``lossympi.netem.Cluster``, one
  network namespace per rank, loss in both directions, so every datagram and TCP segment of the step traffic is
  dropped with probability 5 % once), lossympi itself with ``--loss 0``;
- otherwise: lossympi's injected fault loss (``--loss 0.05``: each rank drops 5 % of the datagrams it sends; the
  TCP control channel loses nothing).

The training has a step count, not a duration: a short calibration run (``--calibration-steps``, same settings)
measures the steps/s, and the soak run gets ``minutes * 60 * rate`` steps, so it stops cleanly (final checkpoint,
``stop`` broadcast) after about ``--minutes``. The report says how long it really ran.

Every ``--interval`` seconds the tool samples each rank process: RSS (``VmRSS`` of ``/proc/<pid>/status``), open
file descriptors (``/proc/<pid>/fd``), sockets among them, threads. Afterwards it reads the server's
``<run_dir>/steps.jsonl`` (one row per step) and checks

- ``steps``: two bounds, both required. (1) *Bounded*: every step (after the first ``--skip-steps``) took at most
  what the server allows it, the wait for the workers' ready messages (capped at ``--deadline``,
  ``control_seconds`` in ``steps.jsonl``) plus its gather deadline, plus ``--slack`` for sending the parameters
  and running the rule and the update. (2) *Steady*: after the warm-up (the same as for memory), every step took
  at most its gather deadline plus ``--slack``: nobody was waited for. Steps of the warm-up over that second
  bound are reported (``warmup_over_deadline_plus_slack``), with each phase's percentiles and the late steps'
  phases;
- ``memory``: after the warm-up, per process, the median RSS of the last window exceeds that of the first window by
  at most ``--max-rss-growth`` (10 %);
- ``fds`` / ``sockets`` / ``threads``: after the warm-up, per process, the last window's median is not above the
  first window's, and no sample exceeds the first window's median by more than the tolerance (``--fd-slack`` for
  descriptors, which checkpoints and evaluations open briefly; 0 for sockets and threads);
- ``processes``: every rank was seen until the end of the training and the run finished.

It writes a JSON report (``--json-out``: verdicts, series summaries, the full series of the server and of one
worker, the command, the machine) and a PNG (``--png``), and exits with status 1 when a check fails (2 when the run
could not be made).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import shlex
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import reproduce  # noqa: E402  (tools/reproduce.py: start_ranks, NetemCluster, host_description)

ROOT = reproduce.ROOT


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} soak: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# sampling the rank processes


def _read_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    out = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])  # the command may hold spaces and parentheses


def find_ranks(root_pid: int, size: int) -> dict[int, int]:
    """Rank -> pid of the rank processes descending from ``root_pid``: Python processes whose environment has
    ``LOSSYMPI_RANK`` (a launcher in between, such as ``ip netns exec``, has the same environment but is not
    Python; if one forks, the deepest process of a rank wins)."""
    python = os.path.realpath(sys.executable)
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                parents[int(entry.name)] = _parent(int(entry.name))

    def depth(pid: int) -> int | None:
        d = 0
        while pid in parents and d < 64:
            pid = parents[pid]
            d += 1
            if pid == root_pid:
                return d
        return None

    found: dict[int, tuple[int, int]] = {}
    for pid in parents:
        dep = depth(pid)
        if dep is None:
            continue
        try:
            if os.path.realpath(f"/proc/{pid}/exe") != python:
                continue
            rank = int(_read_environ(pid).get("LOSSYMPI_RANK", "-1"))
        except (OSError, ValueError):
            continue
        if 0 <= rank < size and (rank not in found or dep > found[rank][1]):
            found[rank] = (pid, dep)
    return {rank: pid for rank, (pid, _) in found.items()}


def sample_process(pid: int) -> dict[str, int] | None:
    """RSS (KiB), open descriptors, sockets among them, threads of ``pid``; None once it has exited."""
    try:
        rss = threads = None
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
        fds = sockets = 0
        for name in os.listdir(f"/proc/{pid}/fd"):
            fds += 1
            with contextlib.suppress(OSError):  # a descriptor closed between listdir and readlink
                if os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    sockets += 1
    except (FileNotFoundError, ProcessLookupError):
        return None
    if rss is None or threads is None:  # a zombie has no VmRSS
        return None
    return {"rss_kib": rss, "fds": fds, "sockets": sockets, "threads": threads}


def training_origin(steps_path: Path) -> float | None:
    """Epoch time of the server's training start, from the last flushed row of ``steps.jsonl``: the row's ``wall``
    is seconds since the start and the file's mtime is when it was flushed (an upper bound, so callers keep the
    smallest estimate)."""
    try:
        st = steps_path.stat()
        if st.st_size == 0:
            return None
        with steps_path.open("rb") as f:
            f.seek(max(0, st.st_size - 4096))
            lines = f.read().splitlines()
        for line in reversed(lines):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                return st.st_mtime - float(json.loads(line)["wall"])
    except OSError:
        return None
    return None


class Runner:
    """Runs one job through :func:`reproduce.start_ranks` in a thread and samples its ranks until it ends."""

    def __init__(self, cfg: dict[str, Any], cluster: Any, timeout: float) -> None:
        self.cfg = cfg
        self.cluster = cluster
        self.timeout = timeout
        self.summary: dict[str, Any] | None = None
        self.error: str | None = None
        self.samples: list[dict[str, Any]] = []  # {"t": epoch, "rank": r, "pid": p, ...}
        self.pids: dict[int, int] = {}
        self.origin: float | None = None

    def _job(self) -> None:
        try:
            self.summary = reproduce.start_ranks(self.cfg, cluster=self.cluster, timeout=self.timeout)
        except Exception as exc:  # reported, and the soak fails
            self.error = f"{type(exc).__name__}: {exc}"

    def run(self, interval: float | None) -> None:
        size = int(self.cfg["workers"]) + 1
        steps_path = Path(self.cfg["run_dir"]) / "steps.jsonl"
        thread = threading.Thread(target=self._job, name="soak-job", daemon=True)
        thread.start()
        next_sample = time.monotonic()
        while thread.is_alive():
            thread.join(timeout=max(0.0, next_sample - time.monotonic()) if interval else 1.0)
            if not interval or not thread.is_alive():
                continue
            next_sample += interval
            if len(self.pids) < size:
                self.pids.update(find_ranks(os.getpid(), size))
            now = time.time()
            origin = training_origin(steps_path)
            if origin is not None:
                self.origin = origin if self.origin is None else min(self.origin, origin)
            for rank, pid in sorted(self.pids.items()):
                s = sample_process(pid)
                if s is not None:
                    self.samples.append({"t": now, "rank": rank, "pid": pid, **s})
        final = training_origin(steps_path)  # no sample saw a flush (a very short run): the closing flush
        if self.origin is None:
            self.origin = final


# ----------------------------------------------------------------------------------------------------------------
# analysis


def read_steps(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


def steady_rate(rows: list[dict[str, Any]], skip: int) -> float:
    """Steps per second over ``rows[skip:]`` (the first steps include tracing and the first gather at the cap)."""
    if len(rows) < skip + 2:
        raise RuntimeError(f"the calibration run logged {len(rows)} steps, too few to measure a rate; raise "
                           "--calibration-steps")
    span = rows[-1]["wall"] - rows[skip]["wall"]
    return (len(rows) - 1 - skip) / span if span > 0 else float("inf")


def _pcts(values: list[float]) -> dict[str, float]:
    vs = sorted(values)

    def q(p: float) -> float:
        return round(vs[min(len(vs) - 1, int(p * len(vs)))], 4)

    return {"median": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": round(vs[-1], 4), "min": round(vs[0], 4)}


PHASES = ("control_seconds", "params_seconds", "gather_seconds")  # parts of a step the server logs


def check_steps(rows: list[dict[str, Any]], slack: float, skip: int, f: int, ready_cap: float,
                warmup_s: float) -> dict[str, Any]:
    """The step-duration verdicts over ``rows[skip:]`` (see the module notes: every step within what the server
    allows it, ``ready_cap`` + its gather deadline + ``slack``; after ``warmup_s`` seconds, within its gather
    deadline + ``slack``), and summaries of where the time went and what was lost."""
    checked = rows[skip:] or rows
    unbounded = [r for r in checked if r["seconds"] > ready_cap + r["deadline"] + slack]
    late = [r for r in checked if r["seconds"] > r["deadline"] + slack]
    over = [r for r in late if r["wall"] >= warmup_s]
    warm = [r for r in late if r["wall"] < warmup_s]
    worst = max(checked, key=lambda r: r["seconds"] - r["deadline"])
    steady = [r for r in checked if r["wall"] >= warmup_s] or checked
    worst_steady = max(steady, key=lambda r: r["seconds"] - r["deadline"])
    keys = ("step", "wall", "seconds", "deadline", *[k for k in PHASES if k in worst])
    chunks = sum(r["chunks"] for r in rows)
    out: dict[str, Any] = {
        "ok": not over and not unbounded, "bounded_ok": not unbounded, "steady_ok": not over,
        "slack_s": slack, "ready_cap_s": ready_cap, "warmup_s": warmup_s,
        "steps": len(rows), "checked_from_step": checked[0]["step"],
        "not_checked": [{k: r.get(k) for k in keys} for r in rows[:skip]],
        "over_bound": len(unbounded),
        "over_deadline_plus_slack": len(over),
        "warmup_over_deadline_plus_slack": [{k: r.get(k) for k in keys} for r in warm[:20]],
        "worst_after_warmup": {k: worst_steady[k] for k in keys}
        | {"excess_s": round(worst_steady["seconds"] - worst_steady["deadline"], 4)},
        "worst": {k: worst[k] for k in keys} | {"excess_s": round(worst["seconds"] - worst["deadline"], 4)},
        "first_late": [{k: r.get(k) for k in keys} for r in over[:10]],
        "seconds": _pcts([r["seconds"] for r in checked]),
        "deadline": _pcts([r["deadline"] for r in checked]),
        "gather_overshoot_s": _pcts([r["gather_seconds"] - r["deadline"] for r in checked]),
        "outside_gather_s": _pcts([r["seconds"] - r["gather_seconds"] for r in checked]),
    }
    for k in PHASES:
        if all(k in r for r in checked):
            out[k] = _pcts([r[k] for r in checked])
    out |= {
        "lost_chunk_fraction": sum(r["lost_chunks"] for r in rows) / chunks if chunks else 0.0,
        "lost_gradients": sum(r["lost_gradients"] for r in rows),
        "steps_losing_more_than_f_gradients": sum(r["lost_gradients"] > f for r in rows),
        "steps_at_full_deadline": sum(r["gather_seconds"] >= r["deadline"] for r in rows),
    }
    return out


def step_problems(st: dict[str, Any]) -> list[str]:
    """The step verdicts' failures, in words."""
    out = []
    if not st["bounded_ok"]:
        out.append(f"{st['over_bound']} step(s) over the ready-wait cap ({st['ready_cap_s']} s) + gather deadline + "
                   f"{st['slack_s']} s")
    if not st["steady_ok"]:
        w = st["worst_after_warmup"]
        out.append(f"{st['over_deadline_plus_slack']} step(s) after the warm-up over gather deadline + "
                   f"{st['slack_s']} s; worst: step {w['step']} took {w['seconds']} s, deadline {w['deadline']} s")
    return out


def reanalyze(path: Path) -> int:
    """Recompute the step verdicts of a soak report from its run's ``steps.jsonl`` (the process samples are kept)."""
    report = json.loads(path.read_text())
    old = report["steps"]
    steps = Path(report["config"]["run_dir"]) / "steps.jsonl"
    if not steps.exists():
        log(f"cannot reanalyze {path}: its run's step log {steps} is gone (the run directory is not kept with the "
            "report); rerun the soak instead")
        return 2
    rows = read_steps(steps)
    warmup = report["watch"]["warmup_s"]
    report["steps"] = check_steps(rows, old["slack_s"], old["checked_from_step"], report["config"]["f"],
                                  report["config"]["deadline"], warmup)
    if "updates_skipped_not_finite" in old:  # counted from the server's log, not from steps.jsonl
        report["steps"]["updates_skipped_not_finite"] = old["updates_skipped_not_finite"]
    report["verdicts"]["steps"] = report["steps"]["ok"]
    report["ok"] = all(report["verdicts"].values())
    report["problems"] = [p for p in report.get("problems", []) if "step(s)" not in p] + step_problems(report["steps"])
    report["reanalyzed"] = {"command": shlex.join(["python", "tools/soak.py", "--reanalyze", str(path)]),
                            "at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
    _write(path, report)
    log(f"steps: {'ok' if report['steps']['ok'] else 'FAILED'}; overall: {'ok' if report['ok'] else 'FAILED'}")
    return 0 if report["ok"] else 1


def check_processes(samples: list[dict[str, Any]], size: int, origin: float, end: float, warmup: float,
                    window: float, max_growth: float, fd_slack: int) -> dict[str, Any]:
    """Per rank: series summaries and the memory / fd / socket / thread verdicts over [warmup, end] (seconds since
    the training start)."""
    per: dict[str, Any] = {}
    verdict = {"memory": True, "fds": True, "sockets": True, "threads": True, "processes": True}
    problems: list[str] = []
    for rank in range(size):
        ss = [s for s in samples if s["rank"] == rank]
        train = [s for s in ss if 0 <= s["t"] - origin <= end]
        post = [s for s in train if s["t"] - origin >= warmup]
        seen_until = max((s["t"] - origin for s in ss), default=None)
        entry: dict[str, Any] = {"pid": ss[0]["pid"] if ss else None, "samples": len(ss),
                                 "samples_after_warmup": len(post), "seen_until_s": seen_until}
        if seen_until is None or seen_until < end - max(2 * window / 3, 15.0):
            verdict["processes"] = False
            problems.append(f"rank {rank}: last seen at {seen_until} s of a {end:.0f} s training")
        first = [s for s in post if s["t"] - origin <= warmup + window]
        last = [s for s in post if s["t"] - origin >= end - window]
        if len(first) < 2 or len(last) < 2:
            entry["note"] = "too few samples after the warm-up to judge (run longer or sample more often)"
            verdict["processes"] = False
            problems.append(f"rank {rank}: too few samples after the warm-up")
            per[str(rank)] = entry
            continue
        for key in ("rss_kib", "fds", "sockets", "threads"):
            m_first = statistics.median(s[key] for s in first)
            m_last = statistics.median(s[key] for s in last)
            top = max(s[key] for s in post)
            entry[key] = {"startup_max": max((s[key] for s in ss if s["t"] - origin < warmup), default=None),
                          "first_window_median": m_first, "last_window_median": m_last,
                          "min_after_warmup": min(s[key] for s in post), "max_after_warmup": top}
            if key == "rss_kib":
                growth = m_last / m_first - 1 if m_first else 0.0
                entry[key]["growth"] = round(growth, 4)
                if growth > max_growth:
                    verdict["memory"] = False
                    problems.append(f"rank {rank}: RSS grew {100 * growth:.1f}% after the warm-up "
                                    f"({m_first / 1024:.0f} -> {m_last / 1024:.0f} MiB)")
            else:
                tol = fd_slack if key == "fds" else 0
                if m_last > m_first or top > m_first + tol:
                    verdict[key] = False
                    problems.append(f"rank {rank}: {key} {m_first:g} at the start of the watch, {m_last:g} at the "
                                    f"end, up to {top} (tolerance {tol})")
        per[str(rank)] = entry
    growths = [e["rss_kib"]["growth"] for e in per.values() if "rss_kib" in e]
    return {"verdicts": verdict, "problems": problems, "per_rank": per,
            "max_rss_growth": max(growths) if growths else None}


def series(samples: list[dict[str, Any]], rank: int, origin: float) -> dict[str, list[float]]:
    ss = [s for s in samples if s["rank"] == rank]
    return {"t_s": [round(s["t"] - origin, 2) for s in ss], "rss_mib": [round(s["rss_kib"] / 1024, 2) for s in ss],
            "fds": [s["fds"] for s in ss], "sockets": [s["sockets"] for s in ss],
            "threads": [s["threads"] for s in ss]}


def rate_series(rows: list[dict[str, Any]], width: float) -> dict[str, list[float]]:
    if not rows:
        return {"t_s": [], "steps_per_s": []}
    n_bins = int(rows[-1]["wall"] // width) + 1
    counts = [0] * n_bins
    for r in rows:
        counts[int(r["wall"] // width)] += 1
    end = rows[-1]["wall"]
    spans = [min(width, end - i * width) for i in range(n_bins)]  # the last bin stops at the last step
    return {"t_s": [round(i * width + spans[i] / 2, 2) for i in range(n_bins) if spans[i] > 0],
            "steps_per_s": [round(c / spans[i], 3) for i, c in enumerate(counts) if spans[i] > 0]}


def plot(path: Path, ps: dict[str, list[float]], worker: dict[str, list[float]], worker_rank: int,
         rates: dict[str, list[float]], warmup: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    minutes = lambda ts: [t / 60 for t in ts]  # noqa: E731
    ax = axes[0]
    ax.plot(minutes(ps["t_s"]), ps["rss_mib"], label="parameter server (rank 0)")
    ax.plot(minutes(worker["t_s"]), worker["rss_mib"], label=f"worker (rank {worker_rank})")
    ax.set_ylabel("RSS (MiB)")
    ax.legend(loc="lower right")
    ax.set_title(title, fontsize=10)
    axes[1].plot(minutes(rates["t_s"]), rates["steps_per_s"], color="tab:green")
    axes[1].set_ylabel("steps/s")
    ax = axes[2]
    ax.plot(minutes(ps["t_s"]), ps["fds"], label="server fds")
    ax.plot(minutes(ps["t_s"]), ps["sockets"], "--", label="server sockets")
    ax.plot(minutes(worker["t_s"]), worker["fds"], label=f"rank {worker_rank} fds")
    ax.plot(minutes(worker["t_s"]), worker["sockets"], "--", label=f"rank {worker_rank} sockets")
    ax.set_ylabel("open descriptors")
    ax.set_xlabel("minutes since the training start")
    ax.legend(loc="lower right", fontsize=8)
    for a in axes:
        a.axvline(warmup / 60, color="grey", lw=0.8, ls=":")
        a.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# entry


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="duration of the soak run")
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--f", type=int, default=1)
    ap.add_argument("--byzantine", type=int, default=0, help="Byzantine workers (each computes n-f gradients a step)")
    ap.add_argument("--gar", default="multi-krum")
    ap.add_argument("--experiment", default="digits")
    ap.add_argument("--loss", type=float, default=0.05, help="packet loss on the server's link (or injected)")
    ap.add_argument("--loss-mode", choices=("auto", "netem", "injected"), default="auto",
                    help="netem: emulated cluster (root); injected: lossympi's fault injector; auto: netem if root")
    ap.add_argument("--deadline", type=float, default=2.0, help="the gather deadline cap (TrainConfig.deadline)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--checkpoint-every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="step count of the soak run (skips the calibration)")
    ap.add_argument("--calibration-steps", type=int, default=80)
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between process samples")
    ap.add_argument("--warmup-minutes", type=float, default=None,
                    help="excluded from the leak checks (default: 5, or a third of the run when shorter than 15 min)")
    ap.add_argument("--window-minutes", type=float, default=None,
                    help="first/last windows compared (default: a fifth of the time after the warm-up)")
    ap.add_argument("--slack", type=float, default=0.5, help="seconds a step may exceed its gather deadline")
    ap.add_argument("--reanalyze", default=None, metavar="REPORT_JSON",
                    help="only recompute the step verdicts of an earlier report from its run's steps.jsonl")
    ap.add_argument("--skip-steps", type=int, default=1,
                    help="first steps left out of the step check (the server traces its update function in step 0)")
    ap.add_argument("--max-rss-growth", type=float, default=0.10)
    ap.add_argument("--fd-slack", type=int, default=8, help="descriptors a process may hold briefly above its level")
    ap.add_argument("--run-dir", default=str(ROOT / "out" / "soak"), help="scratch run directory (emptied first)")
    ap.add_argument("--json-out", default=str(ROOT / "docs" / "reliability" / "soak.json"))
    ap.add_argument("--png", default=str(ROOT / "docs" / "reliability" / "soak.png"))
    args = ap.parse_args(argv)
    if args.minutes <= 0 or args.interval <= 0 or args.slack < 0 or args.calibration_steps < 15:
        ap.error("--minutes and --interval must be > 0, --slack >= 0, --calibration-steps >= 15")
    if args.loss_mode == "auto":
        from lossympi.netem import require_root_reason

        args.netem_unavailable = require_root_reason()
        args.loss_mode = "injected" if args.netem_unavailable else "netem"
    return args


def train_config(args: argparse.Namespace, run_dir: Path, steps: int) -> dict[str, Any]:
    from aggregathor.config import TrainConfig

    cfg = {"experiment": args.experiment, "gar": args.gar, "workers": args.workers, "f": args.f,
           "byzantine": args.byzantine, "steps": steps, "eval_every": min(args.eval_every, steps),
           "checkpoint_every": args.checkpoint_every, "deadline": args.deadline, "seed": args.seed,
           "loss": args.loss if args.loss_mode == "injected" else 0.0, "transport": "lossympi",
           "launcher": "local", "run_dir": str(run_dir), "json_out": str(run_dir / "summary.json"), "step_log": True}
    return TrainConfig.from_dict(cfg).to_dict()  # validated, every field present


def run_job(args: argparse.Namespace, cfg: dict[str, Any], cluster: Any, interval: float | None,
            timeout: float) -> Runner:
    run_dir = Path(cfg["run_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)  # the server refuses a directory that holds a run
    run_dir.mkdir(parents=True)
    runner = Runner(cfg, cluster, timeout)
    runner.run(interval)
    return runner


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.reanalyze:
        return reanalyze(Path(args.reanalyze))
    reproduce.quiet_tensorflow()
    started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    base = Path(args.run_dir)
    command = shlex.join(["python", *(sys.argv if argv is None else [sys.argv[0], *argv])])
    netem = reproduce.NetemCluster()
    cluster = None
    report: dict[str, Any] = {"command": command, "started": started, "loss_mode": args.loss_mode}
    try:
        if args.loss_mode == "netem":
            from lossympi.netem import LinkSpec

            cluster = netem.get(args.workers + 1)
            cluster.set_link(0, LinkSpec(loss=args.loss, direction="both"))
            report["netem_cluster"] = cluster.describe()
            report["loss"] = (f"{100 * args.loss:g}% packet loss on the parameter server's link of an emulated "
                              "cluster (lossympi.netem, direction both), lossympi --loss 0")
        else:
            report["loss"] = (f"lossympi's injected fault loss --loss {args.loss} (each rank drops that share of the "
                              "datagrams it sends; the TCP control channel is loss-free)"
                              + (f"; netem unavailable: {args.netem_unavailable}"
                                 if getattr(args, "netem_unavailable", None) else ""))
        log(report["loss"])
        steps = args.steps
        if steps is None:
            cal_cfg = train_config(args, base / "calibration", args.calibration_steps)
            log(f"calibration: {args.calibration_steps} steps with {args.workers} workers")
            cal = run_job(args, cal_cfg, cluster, None, timeout=900)
            if cal.error:
                raise RuntimeError(f"the calibration run failed: {cal.error}")
            rows = read_steps(base / "calibration" / "steps.jsonl")
            rate = steady_rate(rows, skip=10)
            steps = max(args.calibration_steps, round(rate * args.minutes * 60))
            report["calibration"] = {"steps": len(rows), "steps_per_second": round(rate, 3), "soak_steps": steps}
            log(f"calibration: {rate:.2f} steps/s -> {steps} steps for {args.minutes:g} min")
        cfg = train_config(args, base / "run", steps)
        report["config"] = cfg
        log(f"soak: {steps} steps, sampling every {args.interval:g} s")
        from lossympi.bench.common import CpuMeter

        meter = CpuMeter()
        t0 = time.monotonic()
        job = run_job(args, cfg, cluster, args.interval, timeout=args.minutes * 60 * 2 + 600)
        report["wall_total_seconds"] = round(time.monotonic() - t0, 1)
        report["contention"] = meter.stop()  # CPU share of the machine other processes used meanwhile
    except Exception as exc:
        log(f"could not run the soak: {type(exc).__name__}: {exc}")
        report["error"] = f"{type(exc).__name__}: {exc}"
        _write(Path(args.json_out), report)
        return 2
    finally:
        netem.close()
    with contextlib.suppress(ImportError, OSError):
        report["machine"] = reproduce.host_description()
    report["finished"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    if job.summary is not None:
        report["summary"] = {k: v for k, v in job.summary.items() if k != "config"}
    if job.error:
        report["error"] = job.error
    rows = read_steps(Path(cfg["run_dir"]) / "steps.jsonl") if (Path(cfg["run_dir"]) / "steps.jsonl").exists() else []
    size = args.workers + 1
    if not rows or job.origin is None:
        report["verdicts"] = {"processes": False}
        report["error"] = report.get("error") or "the server logged no step"
        _write(Path(args.json_out), report)
        log(report["error"])
        return 1
    end = rows[-1]["wall"]
    warmup = 60 * (args.warmup_minutes if args.warmup_minutes is not None
                   else (5.0 if args.minutes >= 15 else args.minutes / 3))
    window = 60 * args.window_minutes if args.window_minutes is not None else max((end - warmup) / 5, 3 * args.interval)
    report["training_minutes"] = round(end / 60, 2)
    report["watch"] = {"interval_s": args.interval, "warmup_s": round(warmup, 1), "window_s": round(window, 1),
                       "training_s": round(end, 1)}
    report["steps"] = check_steps(rows, args.slack, args.skip_steps, args.f, args.deadline, warmup)
    with contextlib.suppress(OSError):
        log_text = (Path(cfg["run_dir"]) / "logs" / "rank0.log").read_text(errors="replace")
        report["steps"]["updates_skipped_not_finite"] = log_text.count("the aggregate is not finite")
    procs = check_processes(job.samples, size, job.origin, end, warmup, window, args.max_rss_growth, args.fd_slack)
    verdicts = {"steps": report["steps"]["ok"], **procs["verdicts"]}
    verdicts["processes"] = verdicts["processes"] and job.error is None and job.summary is not None
    report["verdicts"] = verdicts
    report["ok"] = all(verdicts.values())
    report["problems"] = procs["problems"] + ([f"the run: {job.error}"] if job.error else [])
    report["problems"] += step_problems(report["steps"])
    report["max_rss_growth"] = procs["max_rss_growth"]
    report["per_rank"] = procs["per_rank"]
    ps = series(job.samples, 0, job.origin)
    wrank = 1
    worker = series(job.samples, wrank, job.origin)
    rates = rate_series(rows, max(args.interval, 5.0))
    report["series"] = {"rank0": ps, f"rank{wrank}": worker, "steps_per_s": rates}
    try:
        title = (f"soak: {args.workers} workers, {args.experiment}, {args.gar} f={args.f}, {100 * args.loss:g}% "
                 f"loss ({args.loss_mode}), {end / 60:.1f} min")
        plot(Path(args.png), ps, worker, wrank, rates, warmup, title)
        report["png"] = str(Path(args.png).resolve().relative_to(ROOT) if Path(args.png).resolve().is_relative_to(ROOT)
                            else args.png)
    except ImportError as exc:
        report["png"] = f"not drawn: {exc}"
    _write(Path(args.json_out), report)
    st = report["steps"]
    log(f"{st['steps']} steps in {end / 60:.1f} min; step seconds median {st['seconds']['median']} max "
        f"{st['seconds']['max']}; worst excess over the deadline {st['worst']['excess_s']} s (slack {args.slack}); "
        f"max RSS growth {100 * (procs['max_rss_growth'] or 0):.1f}%; verdicts {verdicts}")
    for p in report["problems"]:
        log(f"FAIL {p}")
    log(f"report: {args.json_out}")
    return 0 if report["ok"] else 1


def _write(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
