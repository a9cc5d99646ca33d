#!/usr/bin/env python3
"""Reproduce the AggregaThor paper's headline claims on this machine (issue #6, item 7).

  python tools/reproduce.py                                  # every part, full size (~25 min on 2 cores)
  python tools/reproduce.py --parts robustness,overhead      # some parts
  python tools/reproduce.py --quick                          # a tiny smoke version (~2 min), into out/
  python tools/reproduce.py --rerun docs/results/lossy/tcp-loss5.json   # rerun one recorded run

Parts (each writes a block of ``OUT/results.md``, figures and JSON under ``OUT/results/``):

- ``robustness``: 1 Byzantine worker out of n, simulate launcher (in-process, the fast research path): final
  test accuracy of average, median, Multi-Krum and Bulyan under each attack, on digits, fixed steps and seed.
- ``overhead``: steady-state steps/s of Multi-Krum and Bulyan against average, no attack, on the real
  multi-process runtime (one process per rank on loopback, lossympi, loss 0); medians over repeats.
- ``lossy``: 5% packet loss on the parameter server's link of an emulated cluster (``lossympi.netem``, network
  namespaces, nftables drops): accuracy against wall time with lossympi, TCP and gRPC, against the same
  transports without loss. Needs root.
- ``scalability``: the seed's figure: useful samples/s against the number of workers (3 to 18 real processes,
  36 and 63 simulated), average over TCP and over MPI, Multi-Krum f = 1, 4, 8, Bulyan f = 1, 2, 4 and Draco
  f = 1, 4, each where its bound allows.

Every run is recorded as JSON (``OUT/results/<part>/<name>.json``) with its full ``TrainConfig``, the command that
reproduces it, the harness (launcher, process entry, emulated network), the run summary with its evaluation history,
and the share of the CPUs other processes used meanwhile (``contention``). Before each timed (multi-process) run the
tool waits, up to ``--quiet-wait`` seconds, for other processes to use less than ``--quiet-threshold`` of the CPUs
(``pre_run`` in the record): on a shared 2-CPU machine, other jobs change steps/s by a factor of two.
``OUT/results.md`` is rewritten only between its ``<!-- reproduce:PART:begin/end -->`` markers: text outside them
(the reading of the results) is kept.

The ``overhead`` and ``scalability`` parts use a 1.75M-parameter model (the paper's CifarNet size): the synthetic
experiment with ``params=1750000``. ``TrainConfig`` has no field for experiment options, so this tool registers that
configuration under its own name (:data:`BIG`) and starts the ranks through ``tools/reproduce.py --rank`` (which
registers it, then runs ``aggregathor.launch.main_rank`` exactly like ``python -m aggregathor._rank``). When
``TrainConfig`` gains an ``experiment_options`` field the tool uses it instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import os
import random
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PARTS = ("robustness", "overhead", "lossy", "scalability")
BIG = "synthetic-1.75m"
BIG_PARAMS = 1_750_000
RULES_ROBUST = ("average", "median", "multi-krum", "bulyan")
ATTACKS = ("none", "reverse", "gaussian", "alie", "ipm", "label-flip", "data-poison", "nan")
#: The lines of the seed's scalability figure: (rule, f, transport). Average is plain TensorFlow over TCP and MPI;
#: the robust rules and Draco run over lossympi; each point is run only where the rule's bound allows (n, f).
SCALE_LINES: tuple[tuple[str, int, str], ...] = (
    ("average", 0, "tcp"), ("average", 0, "mpi"),
    ("multi-krum", 1, "lossympi"), ("multi-krum", 4, "lossympi"), ("multi-krum", 8, "lossympi"),
    ("bulyan", 1, "lossympi"), ("bulyan", 2, "lossympi"), ("bulyan", 4, "lossympi"),
    ("draco", 1, "lossympi"), ("draco", 4, "lossympi"))
RUN_TIMEOUT = 900.0  # seconds one multi-process run may take before it is killed and recorded as failed


# ----------------------------------------------------------------------------------------------------------------
# plans


@dataclasses.dataclass
class Plan:
    """The sizes of every part (full or quick)."""

    quick: bool
    seed: int = 0
    # robustness (simulate)
    rob_workers: int = 11
    rob_steps: int = 200
    rob_eval_every: int = 25
    rob_rules: tuple[str, ...] = RULES_ROBUST
    rob_attacks: tuple[str, ...] = ATTACKS
    # overhead (local processes, loopback)
    ovh_workers: int = 8
    ovh_f: int = 1
    ovh_rules: tuple[str, ...] = ("average", "multi-krum", "bulyan")
    ovh_experiments: tuple[tuple[str, int, int], ...] = ((BIG, 40, 10), ("digits", 200, 50))  # (exp, steps, eval)
    ovh_repeats: int = 3
    # lossy (netem cluster)
    lossy_workers: int = 8
    lossy_f: int = 1
    lossy_rule: str = "multi-krum"
    lossy_steps: int = 300
    lossy_eval_every: int = 15
    lossy_transports: tuple[str, ...] = ("lossympi", "tcp", "grpc")
    lossy_losses: tuple[float, ...] = (0.0, 0.05, 0.10)
    lossy_direction: str = "both"  # where the loss sits when there is no delay (the server's link)
    lossy_delay: float = 0.001  # one-way delay (s) at every host's ingress: RTT 2 ms, the paper's regime
    lossy_target: float = 0.90
    lossy_injected: bool = True  # also lossympi with the same loss injected on a clean network (a diagnostic)
    # scalability (the seed's figure: real processes on loopback, then simulated up to 64 workers)
    scale_workers: tuple[int, ...] = (3, 6, 9, 12, 18)
    scale_sim_workers: tuple[int, ...] = (36, 63)  # multiples of 3 and 9: Draco's groups (f = 1, 4) fit
    scale_lines: tuple[tuple[str, int, str], ...] = SCALE_LINES
    scale_experiment: tuple[str, int, int] = (BIG, 30, 10)
    scale_sim_steps: tuple[int, int] = (15, 5)  # (steps, eval_every) of the simulated points
    scale_repeats: int = 1

    @classmethod
    def make(cls, quick: bool, seed: int = 0) -> Plan:
        if not quick:
            return cls(quick=False, seed=seed)
        return cls(quick=True, seed=seed, rob_workers=7, rob_steps=12, rob_eval_every=6,
                   rob_rules=("average", "multi-krum", "bulyan"), rob_attacks=("none", "reverse"),
                   ovh_workers=3, ovh_f=0, ovh_rules=("average", "multi-krum"), ovh_experiments=(("digits", 30, 10),),
                   ovh_repeats=1, lossy_workers=2, lossy_f=0, lossy_rule="average", lossy_steps=30, lossy_eval_every=10,
                   lossy_losses=(0.05,), lossy_target=0.5, lossy_injected=False, scale_workers=(3,),
                   scale_sim_workers=(6,), scale_lines=(("average", 0, "tcp"), ("draco", 1, "lossympi")),
                   scale_experiment=("digits", 12, 4), scale_sim_steps=(12, 4))


# ----------------------------------------------------------------------------------------------------------------
# the 1.75M-parameter experiment


def experiment_options_supported() -> bool:
    from aggregathor.config import TrainConfig

    return "experiment_options" in {f.name for f in dataclasses.fields(TrainConfig)}


def register_big() -> None:
    """Register :data:`BIG`: ``synthetic`` with ``params=1750000`` (an MLP 32 -> 40,697 -> 10, plus padding)."""
    from aggregathor import experiments
    from aggregathor.experiments.synthetic import Synthetic

    if BIG in experiments.registry():
        return

    class SyntheticBig(Synthetic):
        __doc__ = f"``synthetic`` with ``params={BIG_PARAMS}`` (registered by tools/reproduce.py)."
        name = BIG
        defaults = {**Synthetic.defaults, "params": BIG_PARAMS}

    experiments.register(SyntheticBig)


def experiment_fields(name: str) -> dict[str, Any]:
    """The TrainConfig fields that select experiment ``name`` (:data:`BIG` or a registered experiment)."""
    if name == BIG and experiment_options_supported():
        return {"experiment": "synthetic", "experiment_options": {"params": BIG_PARAMS}}
    if name == BIG:
        register_big()
    return {"experiment": name}


def needs_shim(cfg: dict[str, Any]) -> bool:
    return cfg.get("experiment") == BIG


# ----------------------------------------------------------------------------------------------------------------
# running one configuration


@dataclasses.dataclass
class RunSpec:
    """One training run: its config and how it is started."""

    part: str
    name: str
    config: dict[str, Any]
    harness: dict[str, Any]  # launcher: simulate | local | ranks; netem: None | {hosts, loss, direction, host}
    labels: dict[str, Any] = dataclasses.field(default_factory=dict)

    def key(self) -> str:
        """Identifies the run: the full validated config (less its paths) and the harness."""
        from aggregathor.config import TrainConfig

        if needs_shim(self.config):
            register_big()
        full = TrainConfig.from_dict({**self.config, "run_dir": "-", "json_out": None}).to_dict()
        cfg = {k: v for k, v in full.items() if k not in ("run_dir", "json_out")}
        return json.dumps([cfg, self.harness], sort_keys=True, default=str)


def cli_command(cfg: dict[str, Any]) -> str | None:
    """``aggregathor train ...`` reproducing ``cfg`` (non-default settings given), or None if the CLI cannot."""
    from aggregathor.config import TrainConfig

    if needs_shim(cfg):
        return None
    defaults = TrainConfig().to_dict()
    argv = ["aggregathor", "train"]
    for key, value in cfg.items():
        if key == "json_out":
            continue
        if key in ("gar_options", "attack_options"):
            for k, v in (value or {}).items():
                argv += [f"--{key[:-8].replace('_', '-')}-option", f"{k}={json.dumps(v)}"]
            continue
        if key not in defaults:
            return None  # a field the CLI has no flag for
        if key == "run_dir" and Path(value).is_relative_to(ROOT):
            value = str(Path(value).relative_to(ROOT))  # the command runs from the checkout's root
        if value != defaults[key] or key in ("seed", "steps", "experiment", "gar", "workers", "f", "byzantine"):
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return shlex.join([*argv, "--quiet"])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_env(size: int) -> dict[str, str]:
    """The environment of the ranks, as ``aggregathor.launch._launch_local`` sets it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOSSYMPI_", "PMI", "OMPI_"))}
    env.update(LOSSYMPI_WORLD_SIZE=str(size), LOSSYMPI_SECRET=secrets.token_hex(16), TF_CPP_MIN_LOG_LEVEL="2",
               OMP_NUM_THREADS="1", TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def start_ranks(cfg: dict[str, Any], *, cluster: Any = None, timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
    """Start the ``workers + 1`` ranks of ``cfg`` (on loopback, or rank i on host i of a netem ``cluster``) the way
    ``aggregathor.launch`` does, wait for the server, and return its summary (the ``json_out`` file)."""
    size = int(cfg["workers"]) + 1
    run_dir = Path(cfg["run_dir"])
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    summary_path = Path(cfg["json_out"])
    env = _rank_env(size)
    if cluster is None:
        env["LOSSYMPI_RENDEZVOUS"] = f"127.0.0.1:{_free_port()}"
    else:
        env["LOSSYMPI_RENDEZVOUS"] = f"{cluster.ips[0]}:{random.randint(20000, 59999)}"
    entry = ([sys.executable, str(Path(__file__).resolve()), "--rank"] if needs_shim(cfg)
             else [sys.executable, "-m", "aggregathor._rank"])
    argv = [*entry, json.dumps(cfg), "--quiet"]
    procs: list[subprocess.Popen[Any]] = []
    files = []
    try:
        for rank in range(size):
            out = (logs / f"rank{rank}.log").open("w")
            files.append(out)
            renv = env | {"LOSSYMPI_RANK": str(rank), "TF_NUM_INTRAOP_THREADS": "2" if rank == 0 else "1"}
            if cluster is None:
                procs.append(subprocess.Popen(argv, env=renv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT))
            else:
                renv["LOSSYMPI_HOST"] = cluster.ips[rank]
                procs.append(cluster.popen(rank, argv, env=renv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT))
        try:
            rc = procs[0].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the parameter server did not finish within {timeout:.0f} s; see {logs}") from None
        end = time.monotonic() + 30
        for p in procs[1:]:
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
        if rc != 0:
            tail = (logs / "rank0.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the parameter server exited with status {rc}; see {logs}:\n{tail}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=10)
        for f in files:
            f.close()
    return json.loads(summary_path.read_text())


def start_mpiexec(cfg: dict[str, Any], *, timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
    """Start the ``workers + 1`` ranks of ``cfg`` under ``mpiexec`` on this machine (``--launcher mpi``; each rank
    enters through ``tools/reproduce.py --rank``), wait for them, and return the server's summary."""
    from lossympi.bench.gather import mpiexec_path  # the mpich wheel's, next to Python, else the one on PATH

    run_dir = Path(cfg["run_dir"])
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    argv = [mpiexec_path(), "-n", str(int(cfg["workers"]) + 1), "-env", "TF_NUM_INTRAOP_THREADS", "1",
            sys.executable, str(Path(__file__).resolve()), "--rank", json.dumps(cfg), "--quiet"]
    with (run_dir / "logs" / "mpiexec.log").open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            raise RuntimeError(f"mpiexec did not finish within {timeout:.0f} s; see {run_dir / 'logs'}") from None
    if rc != 0:
        tail = (run_dir / "logs" / "mpiexec.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"mpiexec exited with status {rc}; see {run_dir / 'logs'}:\n{tail}")
    return json.loads(Path(cfg["json_out"]).read_text())


def netem_links(netem: dict[str, Any], hosts: int) -> dict[int, dict[str, Any]]:
    """The LinkSpec fields of every host of a lossy run (every host is set, so nothing stays from a previous run).

    Without delay the loss sits on ``netem["host"]``'s link in ``netem["direction"]``. With a delay, every host
    delays what it receives (the delay line sits at a host's ingress, so the RTT is twice the delay), and the
    loss is on every host's ingress too: in a star (workers talk to the server only) each packet then crosses
    exactly one lossy hop, as with the loss on both directions of the server's link."""
    delay = float(netem.get("delay") or 0.0)
    if delay == 0:
        return {h: ({"loss": netem["loss"], "direction": netem["direction"]} if h == netem["host"] else {})
                for h in range(hosts)}
    return {h: {"loss": netem["loss"], "delay": delay, "direction": "in"} for h in range(hosts)}


class NetemCluster:
    """A lazily built ``lossympi.netem.Cluster``, rebuilt when a run needs more hosts."""

    def __init__(self) -> None:
        self.cluster: Any = None

    def get(self, hosts: int) -> Any:
        from lossympi.netem import Cluster

        if self.cluster is None or self.cluster.n_hosts < hosts:
            self.close()
            self.cluster = Cluster(hosts).up()
        return self.cluster

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.down()
            self.cluster = None


_NETEM = NetemCluster()


def machine_busy(probe: float = 2.0) -> float:
    """Share of all CPUs busy (user + nice + system + irq + softirq) over ``probe`` seconds, from ``/proc/stat``."""
    def sample() -> tuple[float, float]:
        f = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        busy = f[0] + f[1] + f[2] + f[5] + f[6]
        return busy, busy + f[3] + f[4] + (f[7] if len(f) > 7 else 0.0)

    b0, t0 = sample()
    time.sleep(probe)
    b1, t1 = sample()
    return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


def wait_for_quiet(max_wait: float, threshold: float) -> dict[str, Any]:
    """Before a timed run: wait (at most ``max_wait`` s) until other processes use less than ``threshold`` of the
    CPUs over a 2 s probe (nothing of ours runs meanwhile). Returns what was waited and seen."""
    t0 = time.monotonic()
    seen = []
    while True:
        try:
            busy = machine_busy()
        except (OSError, ValueError, IndexError):
            return {"waited_s": 0.0, "busy": None}
        seen.append(round(busy, 3))
        if busy < threshold or time.monotonic() - t0 >= max_wait:
            return {"waited_s": round(time.monotonic() - t0, 1), "busy_last": seen[-1], "busy_first": seen[0],
                    "quiet": busy < threshold, "threshold": threshold}


def execute(spec: RunSpec, scratch: Path, quiet_wait: float = 0.0, quiet_threshold: float = 0.15) -> dict[str, Any]:
    """Run ``spec`` (in a fresh run directory under ``scratch``) and return its record (see the module notes).

    A timed run (any launcher but ``simulate``) first waits up to ``quiet_wait`` seconds for the machine to be
    quiet (see :func:`wait_for_quiet`)."""
    from aggregathor.config import TrainConfig
    from lossympi.bench.common import CpuMeter

    run_dir = scratch / spec.part / spec.name
    shutil.rmtree(run_dir, ignore_errors=True)  # a run left there would be refused (not resumed)
    run_dir.mkdir(parents=True)
    cfg = {**spec.config, "run_dir": str(run_dir)}
    launcher = spec.harness["launcher"]
    if launcher != "simulate":
        cfg["json_out"] = str(run_dir / "summary.json")
    cfg = TrainConfig.from_dict(cfg).to_dict()  # validated, every field present
    record: dict[str, Any] = {"part": spec.part, "name": spec.name, "labels": spec.labels, "config": cfg,
                              "harness": spec.harness, "started": _now()}
    netem = spec.harness.get("netem")
    if launcher != "simulate" and quiet_wait > 0:
        record["pre_run"] = wait_for_quiet(quiet_wait, quiet_threshold)
    meter = CpuMeter()
    t0 = time.monotonic()
    try:
        if launcher == "simulate":
            from aggregathor.launch import launch

            summary = dataclasses.asdict(launch(TrainConfig.from_dict(cfg), progress=False))
        elif launcher == "local" and not needs_shim(cfg):
            from aggregathor.launch import launch

            summary = dataclasses.asdict(launch(TrainConfig.from_dict(cfg), progress=False))
        elif netem:
            from lossympi.netem import LinkSpec

            cluster = _NETEM.get(netem["hosts"])
            for host, link in netem_links(netem, cluster.n_hosts).items():
                cluster.set_link(host, LinkSpec(**link))
            record["netem_cluster"] = cluster.describe()
            summary = start_ranks(cfg, cluster=cluster)
        elif launcher == "mpiexec":
            summary = start_mpiexec(cfg)
        else:
            summary = start_ranks(cfg)
        summary.pop("config", None)  # the same as record["config"]
        record["summary"] = summary
    except Exception as exc:  # one failed run must not stop the others; it is recorded and reported
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["wall_total_seconds"] = round(time.monotonic() - t0, 2)
    record["contention"] = meter.stop()
    if "summary" in record:
        record["derived"] = derived(record["summary"], cfg)
    return record


def derived(summary: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """Numbers read off a summary: steady-state throughput (after the first evaluation, which holds the warm-up:
    tracing, the rule's compilation), and the first time each accuracy level was reached."""
    hist = summary.get("history") or []
    out: dict[str, Any] = {"steady_steps_per_second": steady_rate(hist)}
    if out["steady_steps_per_second"] is not None:
        out["steady_gradients_per_second"] = out["steady_steps_per_second"] * int(cfg["workers"])
    out["time_to_accuracy"] = {f"{t:.2f}": time_to_accuracy(hist, t) for t in (0.8, 0.85, 0.9, 0.95)}
    return out


def steady_rate(history: Sequence[dict[str, Any]]) -> float | None:
    """Steps per second between the first and the last evaluation (None with fewer than two)."""
    if len(history) < 2:
        return None
    a, b = history[0], history[-1]
    dt = float(b["wall"]) - float(a["wall"])
    return (int(b["step"]) - int(a["step"])) / dt if dt > 0 else None


def time_to_accuracy(history: Sequence[dict[str, Any]], target: float) -> float | None:
    """Wall time (s, from the first step) of the first evaluation at or above ``target``; None if never."""
    for row in history:
        if float(row["accuracy"]) >= target:
            return float(row["wall"])
    return None


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------------------------------------------
# the session: runs, records, cache


class Session:
    def __init__(self, plan: Plan, out: Path, scratch: Path, argv: Sequence[str], quiet_wait: float = 0.0,
                 quiet_threshold: float = 0.15, reuse: bool = False) -> None:
        self.plan = plan
        self.reuse = reuse
        self.part_runs: list[tuple[dict[str, Any], str]] = []  # the runs of the current part, and how they came
        self._recorded: dict[str, dict[str, Any]] | None = None
        self.quiet_wait = quiet_wait
        self.quiet_threshold = quiet_threshold
        self.out = out
        self.results = out / "results"
        self.scratch = scratch
        self.command = shlex.join(["python", "tools/reproduce.py", *argv])
        self.cache: dict[str, dict[str, Any]] = {}
        self.host = host_description()

    def run(self, spec: RunSpec, progress: str = "") -> dict[str, Any]:
        key = spec.key()
        if key in self.cache:  # the same configuration already ran in this session (e.g. overhead's n=8)
            rec = self.cache[key]
            log(f"[{spec.part}{progress}] {spec.name}: reusing {rec['part']}/{rec['name']}")
            self.part_runs.append((rec, "shared"))
            return rec
        old = self.recorded().get(key) if self.reuse else None
        if old is not None:  # --reuse: a recorded run of the same configuration stands
            log(f"[{spec.part}{progress}] {spec.name}: recorded run reused ({old['json']}, {old.get('started')})")
            self.cache[key] = old
            self.part_runs.append((old, "reused"))
            return old
        path = self.results / spec.part / f"{spec.name}.json"
        rec = execute(spec, self.scratch, self.quiet_wait, self.quiet_threshold)
        self.part_runs.append((rec, "ran"))
        rec["json"] = str(path.relative_to(self.out))
        rec["command"] = cli_command(rec["config"]) if spec.harness["launcher"] != "ranks" else None
        rec["rerun"] = shlex.join(["python", "tools/reproduce.py", "--rerun", str(path.relative_to(ROOT))
                                   if path.is_relative_to(ROOT) else str(path)])
        rec["session_command"] = self.command
        rec["host"] = self.host
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec, indent=1, default=str) + "\n")
        self.cache[key] = rec
        if "error" in rec:
            log(f"[{spec.part}{progress}] {spec.name}: FAILED after {rec['wall_total_seconds']:.0f} s: "
                f"{rec['error'][:300]}")
        else:
            s, d = rec["summary"], rec["derived"]
            rate = d["steady_steps_per_second"]
            waited = rec.get("pre_run", {}).get("waited_s")
            log(f"[{spec.part}{progress}] {spec.name}: accuracy {s['accuracy']:.3f}, "
                f"{rate if rate is None else round(rate, 2)} steps/s steady, {rec['wall_total_seconds']:.0f} s in all, "
                f"foreign CPU {_pct(rec['contention'].get('foreign_cpu_fraction'))}"
                + ("" if waited is None else f" (waited {waited:.0f} s for a quiet machine first)"))
        return rec


    def recorded(self) -> dict[str, dict[str, Any]]:
        """The successful runs recorded under ``results/`` (any part), by :meth:`RunSpec.key`."""
        if self._recorded is None:
            self._recorded = {}
            for path in sorted(self.results.glob("*/*.json")):
                try:
                    old = json.loads(path.read_text())
                    if "error" in old or "summary" not in old:
                        continue
                    key = RunSpec(old["part"], old["name"], old["config"], old["harness"]).key()
                except (ValueError, KeyError, TypeError):
                    continue  # not a run record, or a config this checkout no longer accepts
                self._recorded.setdefault(key, old)
        return self._recorded

    def provenance(self) -> str:
        """How the current part's runs came about, for the block's header."""
        runs = [r for r, _ in self.part_runs]
        if not runs:
            return "no runs"
        how = [h for _, h in self.part_runs]
        started = sorted(r.get("started", "") for r in runs)
        cost = sum(r.get("wall_total_seconds", 0.0) for r, h in self.part_runs if h != "shared")
        out = f"{len(runs)} runs recorded {started[0]} to {started[-1]}, {cost / 60:.1f} min of running"
        if how.count("reused"):
            out += f"; {how.count('reused')} of them reused from earlier sessions (`--reuse`)"
        return out + f"; median foreign CPU {_median_pct(runs)}"


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def _pct(x: float | None, digits: int = 0) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def host_description() -> dict[str, Any]:
    from lossympi.bench.common import host_info

    info = host_info()
    with contextlib.suppress(OSError, ValueError):
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()
        info["memory_gib"] = round(int(mem[1]) / 2**20, 1)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["git"] = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                                     text=True, timeout=10).stdout.strip() or None
    with contextlib.suppress(ImportError):
        import tensorflow as tf

        info["tensorflow"] = tf.__version__
    return info


# ----------------------------------------------------------------------------------------------------------------
# part (a): robustness


def part_robustness(s: Session) -> dict[str, Any]:
    p = s.plan
    specs = []
    for rule in p.rob_rules:
        for attack in p.rob_attacks:
            cfg = {"experiment": "digits", "gar": rule, "workers": p.rob_workers, "f": 1,
                   "byzantine": 0 if attack == "none" else 1, "attack": "reverse" if attack == "none" else attack,
                   "steps": p.rob_steps, "eval_every": p.rob_eval_every, "checkpoint_every": 0, "loss": 0.0,
                   "seed": p.seed, "launcher": "simulate"}
            specs.append(RunSpec("robustness", f"{rule}-{attack}", cfg, {"launcher": "simulate"},
                                 {"rule": rule, "attack": attack}))
    recs = [s.run(spec, f" {i + 1}/{len(specs)}") for i, spec in enumerate(specs)]
    acc = {(r["labels"]["rule"], r["labels"]["attack"]): _acc(r) for r in recs}
    lines = [
        f"Setup: `digits` (MLP 64-64-10, 4,810 parameters), **n = {p.rob_workers} workers, f = 1, 1 Byzantine** "
        f"(none in the `none` column), {p.rob_steps} steps of batch 32, SGD with momentum 0.9 at lr 0.1, seed "
        f"{p.seed}, launcher `simulate` (every rank in one process, no transport loss: `--loss 0`). Cells: final test "
        "accuracy on the 360 held-out digits. The Byzantine worker runs the attack with its default parameters "
        f"({attack_params(p.rob_attacks)}).", "",
        md_table(["rule \\ attack", *p.rob_attacks],
                 [[f"`{rule}`", *[_fmt_acc(acc[(rule, a)]) for a in p.rob_attacks]] for rule in p.rob_rules]), "",
        "![final accuracy by rule and attack](results/robustness.png)", "",
        f"Raw runs: `results/robustness/<rule>-<attack>.json` ({len(recs)} runs; each holds its "
        "`aggregathor train` command).",
    ]
    plot_robustness(s.results / "robustness.png", p.rob_rules, p.rob_attacks, acc, p.rob_workers)
    return {"markdown": "\n".join(lines),
            "data": {"accuracy": {f"{r}|{a}": v for (r, a), v in acc.items()}, "runs": [r["json"] for r in recs]}}


def attack_params(attacks: Iterable[str]) -> str:
    from aggregathor import attacks as registry

    out = []
    for a in attacks:
        if a == "none":
            continue
        conf = {k: v for k, v in registry.get(a).get_config().items() if k != "name"}
        out.append(f"`{a}` " + (", ".join(f"{k}={v}" for k, v in conf.items()) or "–"))
    return "; ".join(out)


def _acc(rec: dict[str, Any]) -> float | None:
    return None if "error" in rec else float(rec["summary"]["accuracy"])


def _fmt_acc(x: float | None) -> str:
    if x is None:
        return "error"
    return f"**{x:.3f}**" if x < 0.5 else f"{x:.3f}"


def _median_pct(recs: Sequence[dict[str, Any]]) -> str:
    vals = sorted(r["contention"]["foreign_cpu_fraction"] for r in recs
                  if r["contention"].get("foreign_cpu_fraction") is not None)
    return _pct(vals[len(vals) // 2]) if vals else "–"


# ----------------------------------------------------------------------------------------------------------------
# part (b): overhead


def part_overhead(s: Session) -> dict[str, Any]:
    p = s.plan
    recs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    total = len(p.ovh_experiments) * len(p.ovh_rules) * p.ovh_repeats
    i = 0
    for exp, steps, every in p.ovh_experiments:
        for rep in range(p.ovh_repeats):
            order = list(p.ovh_rules[rep % len(p.ovh_rules):]) + list(p.ovh_rules[:rep % len(p.ovh_rules)])
            for rule in order:  # rotated per repeat: no rule always runs first (or last) under drifting load
                i += 1
                spec = throughput_spec("overhead", exp, rule, p.ovh_workers, p.ovh_f, steps, every, p.seed, rep)
                recs.setdefault((exp, rule), []).append(s.run(spec, f" {i}/{total}"))
    micro: dict[str, dict[str, float]] = {}
    for exp, _, _ in p.ovh_experiments:
        try:
            micro[exp] = rule_microbench(exp, p.ovh_workers, p.ovh_f, p.ovh_rules)
        except Exception as exc:  # a diagnostic only: the table goes on without it
            log(f"[overhead] aggregation timing of {exp} failed: {type(exc).__name__}: {exc}")
            micro[exp] = {}
    targets = {"multi-krum": (0.19, 0.10), "bulyan": (0.43, 0.20)}
    rows, data = [], {}
    low = LOW_CONTENTION
    for exp, _, _ in p.ovh_experiments:
        base = median([rate(r) for r in recs[(exp, "average")]])
        qbase = median([rate(r) for r in quiet_runs(recs[(exp, "average")], low)])
        for rule in p.ovh_rules:
            rates = [rate(r) for r in recs[(exp, rule)]]
            med = median(rates)
            ovh = None if (med is None or base is None) else 1 - med / base
            quiet = quiet_runs(recs[(exp, rule)], low)
            qmed = median([rate(r) for r in quiet])
            qovh = None if (qmed is None or qbase is None) else 1 - qmed / qbase
            extra = (micro[exp].get(rule) or 0.0) - (micro[exp].get("average") or 0.0)
            est = None if base is None or rule == "average" else extra / 1e3 / (1 / base + extra / 1e3)
            paper, target = targets.get(rule, (None, None))
            verdict = "" if ovh is None or target is None else ("✅" if ovh <= target else "❌")
            ok = [x for x in rates if x is not None]
            spread = f"{_f(min(ok))}–{_f(max(ok))}" if ok else "–"
            rows.append([f"`{exp}`", f"`{rule}`", _f(med), spread,
                         "–" if rule == "average" else f"{_pct(ovh, 1)} {verdict}",
                         "–" if paper is None else f"{_pct(paper)} / ≤ {_pct(target)}",
                         f"{_f(qmed)} ({len(quiet)})" + ("" if rule == "average" or qovh is None else
                                                         f" → {_pct(qovh, 1)}"),
                         _f(micro[exp].get(rule), 2), "–" if est is None else _pct(est, 1),
                         lost_note(recs[(exp, rule)]), _median_pct(recs[(exp, rule)])])
            data[f"{exp}|{rule}"] = {"rates": rates, "median": med, "overhead": ovh, "low_contention_median": qmed,
                                     "low_contention_runs": len(quiet), "low_contention_overhead": qovh,
                                     "overhead_estimated_from_aggregation_time": est,
                                     "foreign_cpu": [r["contention"].get("foreign_cpu_fraction") for r in
                                                     recs[(exp, rule)]],
                                     "aggregation_ms": micro[exp].get(rule),
                                     "runs": [r["json"] for r in recs[(exp, rule)]]}
    sizes = ", ".join(f"`{e}` {experiment_size(e):,} parameters ({steps} steps, throughput measured after the first "
                      f"{every})" for e, steps, every in p.ovh_experiments)
    lines = [
        f"Setup: the real multi-process runtime on one machine: **{p.ovh_workers + 1} processes** (parameter server + "
        f"{p.ovh_workers} workers) on loopback, transport lossympi with `--loss 0`, `--f {p.ovh_f}`, no Byzantine "
        f"worker, seed {p.seed}, batch 32. {sizes}. Each cell is the median over {p.ovh_repeats} launches (the rule "
        "order rotated between repeats) of the steady-state steps/s: steps between the first and the last evaluation "
        "divided by the wall time between them, so start-up, tracing and the rule's first compilation are left out. "
        "Overhead = 1 − steps/s(rule) / steps/s(average). `aggregation ms` is the rule alone on an "
        f"({p.ovh_workers}, d) float32 matrix in this process (median of 7 calls after warm-up); `overhead est.` "
        "adds the rule's extra aggregation time to average's median step time (1 / steps/s): what the rule would "
        "cost if nothing else changed, an estimate that other processes' load disturbs far less than the "
        "end-to-end medians. `lost chunks / "
        "gradients`: medians per run; with `--loss 0` a datagram is lost only when its receiver falls behind (a "
        "full socket buffer under CPU contention) or arrives after the step's adaptive deadline.", "",
        md_table(["experiment", "rule", "steps/s (median)", "range", "overhead vs average", "paper / target",
                  f"runs at < {_pct(low)} foreign CPU: steps/s (runs) → overhead", "aggregation ms",
                  "overhead est. from aggregation ms",
                  "lost chunks / gradients", "foreign CPU (median)"], rows), "",
        "![steps/s by rule, and each run's steps/s against the CPU share other processes took meanwhile]"
        "(results/overhead.png)", "",
        "Raw runs: `results/overhead/*.json`. " + starter_note(e for e, _, _ in p.ovh_experiments),
    ]
    plot_bars(s.results / "overhead.png", p.ovh_experiments, p.ovh_rules, recs,
              f"steady-state steps/s, n={p.ovh_workers}, no attack, loopback")
    return {"markdown": "\n".join(lines), "data": data}


def starter_note(exps: Iterable[str]) -> str:
    exps = list(exps)
    notes = []
    if any(e != BIG for e in exps):
        notes.append("`aggregathor.launch.launch` (launcher `local`) started the ranks of the digits runs")
    if BIG in exps:
        notes.append(f"this tool's copy of it (`start_ranks`: same environment and thread settings, entry "
                     f"`tools/reproduce.py --rank`, which registers `{BIG}` first) those of `{BIG}`")
    return "; ".join(notes) + "."


def throughput_spec(part: str, exp: str, rule: str, workers: int, f: int, steps: int, every: int, seed: int,
                    rep: int) -> RunSpec:
    cfg = {**experiment_fields(exp), "gar": rule, "workers": workers, "f": f, "byzantine": 0, "steps": steps,
           "eval_every": every, "checkpoint_every": 0, "loss": 0.0, "transport": "lossympi", "seed": seed,
           "launcher": "local"}
    launcher = "ranks" if needs_shim(cfg) else "local"
    harness = {"launcher": launcher, "repeat": rep}
    return RunSpec(part, f"{exp}-{rule}-n{workers}-r{rep}", cfg, harness,
                   {"experiment": exp, "rule": rule, "workers": workers, "repeat": rep})


def lost_note(recs: Sequence[dict[str, Any]]) -> str:
    """Median fraction of gradient chunks lost and median whole gradients lost per run (with --loss 0 a datagram
    is lost only when a receiver falls behind: a full socket buffer, or the step's deadline passed)."""
    ok = [r["summary"] for r in recs if "error" not in r]
    if not ok:
        return "–"
    return (f"{_pct(median(s['lost_chunk_fraction'] for s in ok), 2)} / "
            f"{median(s['lost_gradients'] for s in ok):g}")


LOW_CONTENTION = 0.15  # a run during which other processes used less than this share of the CPUs


def quiet_runs(recs: Sequence[dict[str, Any]], threshold: float) -> list[dict[str, Any]]:
    return [r for r in recs if "error" not in r and r["contention"].get("foreign_cpu_fraction") is not None
            and r["contention"]["foreign_cpu_fraction"] < threshold]


def rate(rec: dict[str, Any]) -> float | None:
    return None if "error" in rec else rec["derived"]["steady_steps_per_second"]


def median(values: Iterable[float | None]) -> float | None:
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    m = len(v) // 2
    return v[m] if len(v) % 2 else (v[m - 1] + v[m]) / 2


def _f(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def experiment_size(name: str) -> int:
    from aggregathor import experiments

    fields = experiment_fields(name)
    exp = experiments.get(fields["experiment"], **fields.get("experiment_options", {}))
    return int(experiments.flat_size(exp.build_model(0)))


def rule_microbench(exp: str, n: int, f: int, rules: Sequence[str]) -> dict[str, float]:
    """Milliseconds of one aggregation of an (n, d) matrix by each rule, in this process (median of 7)."""
    import numpy as np

    from aggregathor import gars

    d = experiment_size(exp)
    rows = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
    out = {}
    for rule in rules:
        g = gars.get(rule, n, f)
        for _ in range(2):
            np.asarray(g(rows))
        times = []
        for _ in range(7):
            t = time.perf_counter()
            np.asarray(g(rows))
            times.append(1e3 * (time.perf_counter() - t))
        out[rule] = float(median(times))
    return out


# ----------------------------------------------------------------------------------------------------------------
# part (c): lossy links


def part_lossy(s: Session) -> dict[str, Any]:
    from lossympi.netem import require_root_reason

    p = s.plan
    why = require_root_reason()
    if why:
        log(f"[lossy] skipped: {why}")
        return {"markdown": f"Not run: {why}", "data": {"skipped": why}}
    # (label, transport, network loss, lossympi's injected loss)
    variants = [(t, t, loss, 0.0) for loss in p.lossy_losses for t in p.lossy_transports]
    worst = max(p.lossy_losses)
    if p.lossy_injected and worst > 0 and "lossympi" in p.lossy_transports:
        # diagnostic: the same datagram loss on lossympi's data path only (its fault injector drops a fraction of
        # the datagrams every rank sends), over a clean network: the TCP control channel loses nothing
        variants.append((INJECTED, "lossympi", 0.0, worst))
    specs = []
    for label, transport, loss, injected in variants:
        cfg = {"experiment": "digits", "gar": p.lossy_rule, "workers": p.lossy_workers, "f": p.lossy_f,
               "byzantine": 0, "steps": p.lossy_steps, "eval_every": p.lossy_eval_every, "checkpoint_every": 0,
               "loss": injected, "transport": transport, "seed": p.seed, "launcher": "local"}
        netem = {"hosts": p.lossy_workers + 1, "host": 0, "loss": loss, "direction": p.lossy_direction,
                 "delay": p.lossy_delay}
        name = f"{transport}-loss{round(100 * loss)}" + (f"-injected{round(100 * injected)}" if injected else "")
        specs.append(RunSpec("lossy", name, cfg, {"launcher": "ranks", "netem": netem},
                             {"transport": label, "loss": max(loss, injected), "network_loss": loss,
                              "injected_loss": injected}))
    try:
        recs = [s.run(spec, f" {i + 1}/{len(specs)}") for i, spec in enumerate(specs)]
    finally:
        _NETEM.close()
    by = {(r["labels"]["transport"], r["labels"]["loss"]): r for r in recs}
    rows, data = [], {}
    labels = [*p.lossy_transports, *([INJECTED] if any(v[0] == INJECTED for v in variants) else [])]
    for label in labels:
        for loss in p.lossy_losses:
            r = by.get((label, loss))
            if r is None:
                continue
            clean = by.get((label if label != INJECTED else "lossympi", 0.0))
            where = "injected" if r["labels"]["injected_loss"] else "network"
            if "error" in r:
                rows.append([f"`{label}`", f"{_pct(loss)} {where}", "error", *["–"] * 6])
                data[f"{label}|{loss}"] = {"error": r["error"], "json": r["json"]}
                continue
            sm = r["summary"]
            tta = time_to_accuracy(sm["history"], p.lossy_target)
            delta = (None if loss == 0 or clean is None or "error" in clean
                     else sm["accuracy"] - clean["summary"]["accuracy"])
            rows.append([f"`{label}`", f"{_pct(loss)}" + (f" {where}" if loss else ""), f"{sm['accuracy']:.3f}",
                         "–" if delta is None else f"{100 * delta:+.1f} pt", _f(tta, 1), f"{sm['wall_seconds']:.1f}",
                         _f(sm["steps_per_second"], 1),  # the whole run: what a user waits for
                         f"{_pct(sm['lost_chunk_fraction'], 2)} / {sm['lost_gradients']}",
                         _pct(r["contention"].get("foreign_cpu_fraction"))])
            data[f"{label}|{loss}"] = {"accuracy": sm["accuracy"], "delta_vs_no_loss": delta,
                                       "time_to_target": tta, "wall_seconds": sm["wall_seconds"],
                                       "steps_per_second": sm["steps_per_second"],
                                       "lost_chunk_fraction": sm["lost_chunk_fraction"],
                                       "lost_gradients": sm["lost_gradients"], "json": r["json"]}
    cluster = next((r.get("netem_cluster") for r in recs if r.get("netem_cluster")), None)
    backend = (cluster or {}).get("hosts", [{}])[0].get("applied", {}).get("loss", "nftables")
    lines = [
        f"Setup: an emulated cluster of **{p.lossy_workers + 1} hosts** (`lossympi.netem`: one network namespace per "
        f"rank on one bridge, veth links, no rate limit), rank i on host i, each rank started as `python -m "
        f"aggregathor._rank CONFIG --quiet` with the env:// rendezvous on the server's address. "
        + lossy_network_text(p, backend) + " lossympi runs with "
        "`--loss 0` (no injected loss: only the network's). Training: `digits`, "
        f"`--gar {p.lossy_rule} --f {p.lossy_f}`, no Byzantine worker, {p.lossy_steps} steps, evaluation every "
        f"{p.lossy_eval_every} steps, seed {p.seed}, the default 2 s deadline cap and `--fill zero`. "
        f"`time to {p.lossy_target:.2f}`: wall time from the first step to the first evaluation at or above "
        f"{p.lossy_target:.2f} accuracy. `lost`: lost gradient chunks / whole gradients that missed the deadline "
        "(for TCP and gRPC a gradient is one chunk: it arrives whole or misses the deadline)."
        + (f" Diagnostic row `{INJECTED}`: the network is clean and lossympi's own fault injector (`--loss "
           f"{worst}`) drops {_pct(worst)} of the datagrams every rank sends, i.e. the same loss on the data path "
           "only, with a loss-free control channel." if INJECTED in labels else ""), "",
        md_table(["transport", "loss", "final accuracy", "vs no loss", f"time to {p.lossy_target:.2f} (s)",
                  "training wall (s)", "steps/s (whole run)", "lost chunks / gradients", "foreign CPU"], rows), "",
        "![accuracy against wall time](results/lossy.png)", "",
        "Raw runs: `results/lossy/<transport>-loss<percent>.json` (with the cluster's description); rerun one with "
        "`python tools/reproduce.py --rerun docs/results/lossy/<file>.json` (root).",
    ]
    plot_lossy(s.results / "lossy.png", labels, p.lossy_losses, by, p.lossy_target)
    return {"markdown": "\n".join(lines), "data": data}


INJECTED = "lossympi (injected)"


def lossy_network_text(p: Plan, backend: str) -> str:
    losses = ", ".join(_pct(x) for x in p.lossy_losses if x)
    if not p.lossy_delay:
        return (f"Packet loss **{losses}** on the parameter server's link, direction `{p.lossy_direction}` (backend: "
                f"{backend}): every datagram or TCP segment of the step traffic crosses that link exactly once "
                "(gradients in, parameters out), so each is dropped with probability exactly the loss, "
                "independently; the control channel and TCP/gRPC's retransmissions cross it too.")
    return (f"Every host delays what it receives by **{1000 * p.lossy_delay:g} ms** (RTT "
            f"{2000 * p.lossy_delay:g} ms; `lossympi.netem`'s delay line where the kernel has no `sch_netem`) and "
            f"drops it with probability **{losses}** (backend: {backend}), independently per packet: the workers "
            "talk to the server only, so every datagram or TCP segment of the step traffic (gradients in, "
            "parameters out), of the control channel and of TCP/gRPC's retransmissions crosses exactly one lossy, "
            "delayed hop, as with the loss on both directions of the server's link.")


# ----------------------------------------------------------------------------------------------------------------
# part (d): scalability


#: One point of the scalability figure: (rule, f, transport, workers, simulated).
ScalePoint = tuple[str, int, str, int, bool]


def rule_allows(rule: str, n: int, f: int) -> bool:
    """Whether ``rule`` can tolerate ``f`` of ``n`` (its own ``check()``); an unknown rule is an error."""
    from aggregathor import gars

    if rule not in gars.names():
        raise ValueError(f"scalability: unknown rule {rule!r}; known: {', '.join(gars.names())}")
    try:
        gars.get(rule, n, f)
    except ValueError:
        return False
    return True


def scale_points(p: Plan) -> list[ScalePoint]:
    """Every (line, n) the plan runs: each line wherever its rule's bound allows; under ``simulate`` the
    transport is the in-process one, so average is one line there."""
    pts: list[ScalePoint] = []
    for sim, ns in ((False, p.scale_workers), (True, p.scale_sim_workers)):
        for n in ns:
            lines = dict.fromkeys((r, f, "simulated" if sim else t) for r, f, t in p.scale_lines)
            pts += [(r, f, t, n, sim) for r, f, t in lines if rule_allows(r, n, f)]
    return pts


def scale_spec(p: Plan, pt: ScalePoint, rep: int) -> RunSpec:
    rule, f, transport, n, sim = pt
    exp, steps, every = p.scale_experiment
    if sim:
        steps, every = p.scale_sim_steps
    launcher = "simulate" if sim else ("mpi" if transport == "mpi" else "local")
    cfg = {**experiment_fields(exp), "gar": rule, "workers": n, "f": f, "byzantine": 0, "steps": steps,
           "eval_every": every, "checkpoint_every": 0, "loss": 0.0, "seed": p.seed, "launcher": launcher,
           "transport": "lossympi" if sim else transport}
    harness = {"launcher": "simulate" if sim else ("mpiexec" if launcher == "mpi"
                                                    else "ranks" if needs_shim(cfg) else "local"), "repeat": rep}
    tag = "sim" if sim else transport
    return RunSpec("scalability", f"{exp}-{rule}-f{f}-{tag}-n{n}-r{rep}", cfg, harness,
                   {"experiment": exp, "rule": rule, "f": f, "transport": transport, "workers": n,
                    "simulated": sim, "repeat": rep})


def useful_gradients(rule: str, n: int, f: int) -> float:
    """Distinct gradients one step uses: n, or one per group of 2f + 1 for Draco (its copies are redundant)."""
    return n / (2 * f + 1) if rule == "draco" else float(n)


def scale_label(rule: str, f: int, transport: str) -> str:
    return f"{rule} ({transport})" if rule == "average" else f"{rule} f={f}"


def part_scalability(s: Session) -> dict[str, Any]:
    p = s.plan
    exp, steps, every = p.scale_experiment
    batch = default_batch_size()
    pts = scale_points(p)
    recs: dict[ScalePoint, list[dict[str, Any]]] = {}
    for i, pt in enumerate(pts * p.scale_repeats, 1):
        spec = scale_spec(p, pt, (i - 1) // len(pts))
        recs.setdefault(pt, []).append(s.run(spec, f" {i}/{len(pts) * p.scale_repeats}"))
    rows, data = [], {}
    for pt in pts:
        rule, f, transport, n, sim = pt
        med = median([rate(r) for r in recs[pt]])
        samples = None if med is None else med * useful_gradients(rule, n, f) * batch
        rows.append([str(n) + (" (sim)" if sim else ""), f"`{scale_label(rule, f, transport)}`", _f(med),
                     _f(samples, 0), lost_note(recs[pt]), _median_pct(recs[pt])])
        data[f"{n}|{rule}|{f}|{transport}|{'sim' if sim else 'real'}"] = {
            "steps_per_second": med, "useful_samples_per_second": samples,
            "runs": [r["json"] for r in recs[pt]]}
    lines = [
        f"Setup: `{exp}` ({experiment_size(exp):,} parameters), `--loss 0`, no Byzantine worker, batch {batch}, "
        f"{steps} steps ({p.scale_sim_steps[0]} simulated), steady-state rate after the first {every} "
        f"({p.scale_sim_steps[1]}); {p.scale_repeats} launch(es) per point (median). "
        "Real points: n + 1 processes on loopback, all sharing this machine's CPUs (average over TCP and over MPI "
        "under `mpiexec`; the robust rules and Draco over lossympi). Points marked (sim): `--launcher simulate`, "
        "every worker in one process, one after the other, so their rate is not comparable with the real points' "
        "in absolute terms, only between rules. Useful samples/s = steps/s × distinct gradients × batch: n "
        "gradients per step, or n / (2f + 1) for Draco, whose 2f + 1 copies of a group compute one gradient. "
        "Each line is run only where its rule's bound allows (Multi-Krum n ≥ 2f + 3, Bulyan n ≥ 4f + 3, Draco "
        "n a multiple of 2f + 1).", "",
        md_table(["workers n", "line", "steps/s", "useful samples/s", "lost chunks / gradients", "foreign CPU"], rows),
        "", "![throughput against workers](results/scalability.png)", "",
        "Raw runs: `results/scalability/*.json`.",
    ]
    plot_scalability(s.results / "scalability.png", pts, recs, exp, batch)
    return {"markdown": "\n".join(lines), "data": data}


def default_batch_size() -> int:
    from aggregathor.config import TrainConfig

    return int(TrainConfig().batch_size)


# ----------------------------------------------------------------------------------------------------------------
# markdown and figures


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def right(i: int) -> bool:
        return i > 0 and any(re.match(r"^[\s*+\-–]*\d", str(r[i])) for r in rows)

    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if right(i) else "---" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


TITLES = {"robustness": "(a) Robustness: one Byzantine worker", "overhead": "(b) Overhead of the robust rules",
          "lossy": "(c) Lossy, delayed links", "scalability": "(d) Scalability"}


def update_markdown(path: Path, blocks: dict[str, str]) -> None:
    """Replace the ``<!-- reproduce:PART:begin -->`` ... ``end`` block of each part in ``path`` (created with
    every part's heading and empty blocks when missing); the text outside the blocks is kept."""
    text = path.read_text() if path.exists() else skeleton()
    for part, body in blocks.items():
        begin, end = f"<!-- reproduce:{part}:begin -->", f"<!-- reproduce:{part}:end -->"
        block = f"{begin}\n{body.rstrip()}\n{end}"
        if begin in text and end in text:
            a, b = text.index(begin), text.index(end) + len(end)
            text = text[:a] + block + text[b:]
        else:
            text = text.rstrip() + f"\n\n## {TITLES.get(part, part)}\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n")


def skeleton() -> str:
    parts = "\n\n".join(f"## {TITLES[p]}\n\n<!-- reproduce:{p}:begin -->\n(not run yet)\n<!-- reproduce:{p}:end -->"
                        for p in PARTS)
    return (f"# Reproducing AggregaThor's claims\n\nGenerated by `python tools/reproduce.py` (the blocks between "
            f"`reproduce:` markers are rewritten by each run; the rest is kept).\n\n{parts}\n")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_robustness(path: Path, rules: Sequence[str], attacks: Sequence[str], acc: dict, n: int) -> None:
    import numpy as np

    plt = _plt()
    grid = np.array([[np.nan if acc[(r, a)] is None else acc[(r, a)] for a in attacks] for r in rules])
    fig, ax = plt.subplots(figsize=(1.1 * len(attacks) + 2, 0.55 * len(rules) + 1.6))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right")
    ax.set_yticks(range(len(rules)), rules)
    for i in range(len(rules)):
        for j in range(len(attacks)):
            v = grid[i, j]
            ax.text(j, i, "err" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=9)
    ax.set_title(f"final test accuracy, digits, n={n}, 1 Byzantine")
    fig.colorbar(im, ax=ax, fraction=0.03)
    _save(fig, path)


def plot_bars(path: Path, exps: Sequence[tuple[str, int, int]], rules: Sequence[str], recs: dict, title: str) -> None:
    plt = _plt()
    colors = ["#888", "#2a7", "#27c", "#c72"]
    fig, axes = plt.subplots(2, len(exps), figsize=(4.2 * len(exps), 6.4), squeeze=False)
    for ax, (exp, _, _) in zip(axes[1], exps, strict=True):
        xmax = 10.0
        for c, rule in zip(colors, rules, strict=False):
            pts = [(r["contention"].get("foreign_cpu_fraction"), rate(r)) for r in recs[(exp, rule)]]
            pts = [(100 * x, y) for x, y in pts if x is not None and y is not None]
            ax.scatter([x for x, _ in pts], [y for _, y in pts], color=c, label=rule, s=22)
            xmax = max([xmax, *(1.1 * x for x, _ in pts)])
        ax.set_xlabel("CPU used by other processes during the run (%)")
        ax.set_ylabel("steps/s")
        ax.set_xlim(0, xmax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax, (exp, _, _) in zip(axes[0], exps, strict=True):
        meds, lo, hi = [], [], []
        for rule in rules:
            v = [x for x in (rate(r) for r in recs[(exp, rule)]) if x is not None] or [0.0]
            m = median(v) or 0.0
            meds.append(m)
            lo.append(m - min(v))
            hi.append(max(v) - m)
        ax.bar(range(len(rules)), meds, yerr=[lo, hi], capsize=4, color=colors[:len(rules)])
        ax.set_xticks(range(len(rules)), rules)
        ax.set_ylabel("steps/s")
        ax.set_title(exp)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def plot_lossy(path: Path, transports: Sequence[str], losses: Sequence[float], by: dict, target: float) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    colors = {"lossympi": "#2a7", "tcp": "#27c", "grpc": "#c72", "mpi": "#888", INJECTED: "#7a2"}
    for t in transports:
        for loss in losses:
            r = by.get((t, loss))
            if r is None or "error" in r:
                continue
            h = r["summary"]["history"]
            ax.plot([x["wall"] for x in h], [x["accuracy"] for x in h], marker="o", ms=2.5, color=colors.get(t),
                    ls=":" if t == INJECTED else "-" if loss else "--", label=f"{t}, loss {_pct(loss)}")
    ax.axhline(target, color="k", lw=0.6, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("training wall time (s, log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_scalability(path: Path, pts: Sequence[ScalePoint], recs: dict, exp: str, batch: int) -> None:
    """Useful samples/s against workers, one line per (rule, f, transport); simulated points dashed, on their
    own panel (their absolute rate is one process's)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    lines = list(dict.fromkeys((r, f) for r, f, _, _, _ in pts))  # one colour per (rule, f) on both panels
    colour = {line: plt.cm.tab10(i % 10) for i, line in enumerate(lines)}
    for sim, ax in ((False, axes[0]), (True, axes[1])):
        for rule, f, transport in dict.fromkeys((r, f, t) for r, f, t, _, s in pts if s == sim):
            xs = [n for r, ff, t, n, s in pts if (r, ff, t, s) == (rule, f, transport, sim)]
            ys = [(median([rate(x) for x in recs[(rule, f, transport, n, sim)]]) or 0)
                  * useful_gradients(rule, n, f) * batch for n in xs]
            ax.plot(xs, ys, marker="o", linestyle="--" if sim else "-", label=scale_label(rule, f, transport),
                    color=colour[(rule, f)], markerfacecolor="white" if transport == "mpi" else None)
        ax.set_xlabel("workers n")
        ax.set_ylabel("useful samples/s")
        ax.set_title("simulated (one process)" if sim else "real processes, one 2-CPU machine", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{exp}: throughput against workers", fontsize=10)
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# entry points


PART_FUNCS: dict[str, Callable[[Session], dict[str, Any]]] = {
    "robustness": part_robustness, "overhead": part_overhead, "lossy": part_lossy, "scalability": part_scalability}


def machine_line(host: dict[str, Any]) -> str:
    return (f"Machine: {host.get('nproc')} CPUs ({host.get('cpu_model')}), {host.get('memory_gib')} GiB, Linux "
            f"{host.get('kernel')}, Python {host.get('python')}, TensorFlow {host.get('tensorflow')}, "
            f"{'root' if host.get('root') else 'not root'}; checkout `{host.get('git')}`.")


def quiet_tensorflow() -> None:
    """Keep this process's log readable: TensorFlow's retracing notices (every simulated run builds fresh models)
    and the server's per-step "aggregate is not finite" warnings (averaging under the nan attack) are dropped."""
    import logging

    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("aggregathor.server").setLevel(logging.ERROR)


def run_parts(plan: Plan, parts: Sequence[str], out: Path, scratch: Path, argv: Sequence[str],
              quiet_wait: float = 0.0, quiet_threshold: float = 0.15, reuse: bool = False) -> dict[str, Any]:
    quiet_tensorflow()
    s = Session(plan, out, scratch, argv, quiet_wait, quiet_threshold, reuse)
    s.results.mkdir(parents=True, exist_ok=True)
    blocks, summary = {}, {}
    for part in parts:
        t0 = time.monotonic()
        s.part_runs = []
        log(f"part {part}{' (quick)' if plan.quick else ''} ...")
        try:
            res = PART_FUNCS[part](s)
        except Exception as exc:  # the other parts still run; the recorded runs stay (--reuse picks them up)
            import traceback

            log(f"part {part} FAILED: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            res = {"markdown": f"The part failed: `{type(exc).__name__}: {exc}`", "data": {"error": str(exc)}}
        took = time.monotonic() - t0
        head = (f"Command: `{s.command}` ({'quick' if plan.quick else 'full'} size; {s.provenance()}; written "
                f"{_now()}). {machine_line(s.host)}")
        blocks[part] = head + "\n\n" + res["markdown"]
        summary[part] = {"command": s.command, "minutes": round(took / 60, 2), "finished": _now(), "host": s.host,
                         "provenance": s.provenance(),
                         "plan": dataclasses.asdict(plan), **res["data"]}
        (s.results / f"{part}.json").write_text(json.dumps(summary[part], indent=1, default=str) + "\n")
        update_markdown(out / "results.md", {part: blocks[part]})
        log(f"part {part} done in {took / 60:.1f} min")
    return summary


def rerun(path: Path, scratch: Path) -> int:
    rec = json.loads(path.read_text())
    cfg = {k: v for k, v in rec["config"].items() if k not in ("run_dir", "json_out")}
    if needs_shim(cfg):
        register_big()
    spec = RunSpec(rec["part"], rec["name"], cfg, rec["harness"], rec.get("labels", {}))
    try:
        new = execute(spec, scratch / "rerun")
    finally:
        _NETEM.close()
    keep = ("summary", "derived", "contention", "wall_total_seconds", "error")
    print(json.dumps({k: new[k] for k in keep if k in new}, indent=1, default=str))
    return 1 if "error" in new else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--rank"]:  # one rank of a run this tool started (see start_ranks)
        if needs_shim(json.loads(argv[1])):
            register_big()
        from aggregathor.config import TrainConfig
        from aggregathor.launch import main_rank, run_rank

        if json.loads(argv[1]).get("launcher") == "mpi":  # started by start_mpiexec: the world is MPI's
            run_rank(TrainConfig.from_dict(json.loads(argv[1])), method="mpi", progress=False)
            return 0
        return main_rank(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    ap.add_argument("--quick", action="store_true", help="tiny smoke version (default --out out/reproduce-quick)")
    ap.add_argument("--out", type=Path, help="folder of results.md and results/ (default: docs)")
    ap.add_argument("--scratch", type=Path, default=None,
                    help="run directories (checkpoints, logs); default out/reproduce-runs in the checkout")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet-wait", type=float, default=None, metavar="SECONDS",
                    help="before each timed run, wait up to this long for other processes to use < "
                         "--quiet-threshold of the CPUs (default 30 s, 0 with --quick)")
    ap.add_argument("--quiet-threshold", type=float, default=0.15)
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the recorded runs under OUT/results whose configuration matches (rebuild the tables "
                         "and figures, run only what is missing or failed)")
    ap.add_argument("--rerun", type=Path, metavar="RUN_JSON", help="rerun one recorded run and print its summary")
    args = ap.parse_args(argv)
    scratch = (args.scratch or ROOT / "out" / "reproduce-runs").resolve()
    if args.rerun:
        return rerun(args.rerun, scratch)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"unknown part(s) {', '.join(bad)}; known: {', '.join(PARTS)}")
    out = (args.out or (ROOT / "out" / "reproduce-quick" if args.quick else ROOT / "docs")).resolve()
    t0 = time.monotonic()
    wait = args.quiet_wait if args.quiet_wait is not None else (0.0 if args.quick else 30.0)
    run_parts(Plan.make(args.quick, args.seed), parts, out, scratch, argv, wait, args.quiet_threshold, args.reuse)
    log(f"all done in {(time.monotonic() - t0) / 60:.1f} min: {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
