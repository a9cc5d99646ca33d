"""Byzantine behaviour at the protocol level, against a running training job (issue #7, item 3).

Real runs: a parameter server and five workers as processes on loopback (env:// rendezvous, lossympi UDP),
Multi-Krum with ``f = 1``. One worker is a rogue (``tests/progs/rogue_worker.py``) that joins like any other,
holding its own legitimate pair key, and misbehaves at the datagram level: malformed gradients (wrong length,
stride or dtype), replays of old datagrams (its own and the server's), datagrams claiming another rank or
coming from another port, a flood at ten times its honest rate, and well-formed gradients holding NaN, Inf or a
huge norm.

In every case the server finishes every step, the honest workers' rows arrive as in the honest run, the
accuracy stays within a few points of it, and the server's counters charge the offender, under the right
reason. One honest run, shared by every case, is the baseline.

The last tests are fast regressions of the counters on in-process endpoints.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import wait_until, worlds_and_endpoints

from aggregathor.config import TrainConfig
from aggregathor.transport import GatherReport, ProtocolEvents, row_health
from lossympi import wire

ROOT = Path(__file__).resolve().parent.parent
ROGUE_PROG = ROOT / "tests" / "progs" / "rogue_worker.py"
WORKERS = 5
ROGUE = 5  # the rogue's rank (the last)
VICTIM = 2
HONEST = [str(r) for r in range(1, WORKERS) if r != ROGUE]
STEPS = 80
BASE = dict(experiment="digits", gar="multi-krum", workers=WORKERS, f=1, byzantine=0, steps=STEPS, eval_every=STEPS,
            checkpoint_every=0, loss=0.0, deadline=1.0, seed=1, fill="zero")
MODES = ("wrong-length", "wrong-dtype", "replay", "spoof-rank", "flood", "nonfinite")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_job(run_dir: Path, mode: str | None = None, **overrides: Any) -> dict[str, Any]:
    """One training job as processes; rank ``ROGUE`` runs the rogue program when ``mode`` is given.

    Returns the server's summary, with the per-step rows (``steps``) and the rogue's report (``rogue``).
    """
    run_dir.mkdir(parents=True)
    summary_path = run_dir / "summary.json"
    cfg = TrainConfig.from_dict(BASE | overrides | {"run_dir": str(run_dir), "json_out": str(summary_path)})
    config = json.dumps(cfg.to_dict())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOSSYMPI_", "PMI", "OMPI_", "PMIX"))}
    env |= dict(LOSSYMPI_WORLD_SIZE=str(WORKERS + 1), LOSSYMPI_RENDEZVOUS=f"127.0.0.1:{_free_port()}",
                LOSSYMPI_SECRET=secrets.token_hex(16), TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS="1",
                TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1")
    report = run_dir / "rogue.json"
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        for rank in range(WORKERS + 1):
            cmd = [sys.executable, "-m", "aggregathor._rank", config, "--quiet"]
            if mode is not None and rank == ROGUE:
                cmd = [sys.executable, str(ROGUE_PROG), config, "--mode", mode, "--victim", str(VICTIM),
                       "--report", str(report)]
            logs.append(run_dir / f"rank{rank}.log")
            with logs[-1].open("w") as out:
                procs.append(subprocess.Popen(cmd, env=env | {"LOSSYMPI_RANK": str(rank)}, cwd=ROOT,
                                              stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        procs[0].wait(timeout=240)
        for p in procs[1:]:
            p.wait(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
    assert not failed, f"ranks exited with an error {failed}:\n" + "\n".join(
        f"--- rank {r}\n{logs[r].read_text()[-3000:]}" for r, _ in failed)
    summary = json.loads(summary_path.read_text())
    summary["steps_log"] = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    if mode is not None:
        summary["rogue"] = json.loads(report.read_text())
    return summary


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_job(tmp_path_factory.mktemp("baseline") / "run")


def check_unharmed(run: dict[str, Any], baseline: dict[str, Any]) -> None:
    """What every attacked run must keep: all steps, honest rows as complete as in the honest run, accuracy,
    and no refused datagram charged to an honest rank."""
    steps = run["config"]["steps"]
    assert run["steps"] == steps and [r["step"] for r in run["steps_log"]] == list(range(steps))
    slack = max(4, steps // 10)  # a contended 2-core machine may delay an honest worker past a deadline
    base_worst = max(baseline["incomplete_rows"][r] for r in HONEST)
    for r in HONEST:
        assert run["incomplete_rows"][r] <= base_worst + slack, (r, run["incomplete_rows"], baseline["incomplete_rows"])
        assert run["nonfinite_rows"][r] == 0 and run["huge_rows"][r] == 0, r
        assert run["pool_drops_by_rank"][r] == 0, r
    assert not set(HONEST) & set(run["rejected_by_rank"]), run["rejected_by_rank"]
    assert run["accuracy"] >= baseline["accuracy"] - 0.06, (run["accuracy"], baseline["accuracy"])


def test_honest_baseline(baseline):
    assert baseline["accuracy"] > 0.8, baseline["accuracy"]
    assert baseline["rejected_datagrams"] == 0 and baseline["rejected_by_rank"] == {}
    assert sum(baseline["nonfinite_rows"].values()) == sum(baseline["huge_rows"].values()) == 0
    assert sum(baseline["pool_drops_by_rank"].values()) == 0


def within(got: int, want: int, low: float = 0.95) -> bool:
    """``got`` is ``want`` up to the rogue's last step, whose datagrams may reach the server after its last count."""
    return low * want <= got <= want


@pytest.mark.parametrize("mode", MODES)
def test_rogue_worker(mode, baseline, tmp_path):
    # the flood needs more steps: at ten times its honest rate the junk fills the rogue's share of the pool
    # (a fifth of 64 MiB here) after about 65 steps
    steps = 110 if mode == "flood" else STEPS
    run = run_job(tmp_path / "run", mode, steps=steps, eval_every=steps)
    check_unharmed(run, baseline)
    rogue = run["rogue"]
    sent, want = rogue["sent"], rogue["expected"]
    assert rogue["steps"] == steps
    me = str(ROGUE)
    mine = run["rejected_by_rank"].get(me, {})
    others = set(run["rejected_by_rank"]) - {me, "unknown"}
    assert not others, run["rejected_by_rank"]  # nobody else is charged
    if mode in ("wrong-length", "wrong-dtype"):
        # every step's gradient is malformed: its row never arrives whole, every refusal is a shape refusal
        assert run["incomplete_rows"][me] == steps
        assert set(run["rejected_by_rank"]) == {me} and set(mine) == {"shape"}, run["rejected_by_rank"]
        assert within(mine["shape"], want["shape"]), (mine, want)
        if mode == "wrong-length":
            assert sent["wrong_stride"] > 0
    elif mode == "replay":
        # its own old datagrams are stale (the tag is under the MAC); the server's, sent back, fail the MAC
        assert run["stale_by_rank"][me] >= 0.95 * want["stale"], (run["stale_by_rank"], want)
        assert set(mine) == {"mac"} and within(mine["mac"], want["mac"]), (mine, want)
        assert sent["replay_params_to_workers"] > 0  # refused by the workers (their own counters)
        assert "unknown" not in run["rejected_by_rank"]
    elif mode == "spoof-rank":
        # claims of the victim's (or the server's) rank fail the MAC, charged to the rogue or to "unknown",
        # never to the victim, whose row arrives as in the honest run and never holds the forged values
        assert set(mine) == {"mac"} and within(mine["mac"], want["mac"]), (mine, want)
        unknown = run["rejected_by_rank"].get("unknown", {})
        assert within(unknown.get("mac", 0), want["mac_unknown"]), (unknown, want)
        assert run["huge_rows"][str(VICTIM)] == 0  # the forged rows are -1000 times a gradient
        # its own rank from another port carries its key: authentic, only copies of its own row (duplicates
        # while its receive is open, stale after)
        assert run["duplicates_by_rank"][me] + run["stale_by_rank"][me] > 0
    elif mode == "flood":
        assert sent["junk"] > 0 and sent["gradient_copies"] >= 10 * steps
        assert run["pool_drops_by_rank"][me] > 0, run["pool_drops_by_rank"]
        assert run["duplicates_by_rank"][me] + run["stale_by_rank"][me] > 5 * steps
        assert run["steps_per_second"] > 0.25 * baseline["steps_per_second"], (run["steps_per_second"],
                                                                              baseline["steps_per_second"])
        assert run["rejected_by_rank"] == {}
    else:  # nonfinite: well-formed rows of NaN, one NaN, +-Inf, or a huge norm
        assert run["rejected_by_rank"] == {}
        missed = run["incomplete_rows"][me]
        for counter, key in (("nonfinite_rows", "nonfinite_steps"), ("huge_rows", "huge_steps")):
            assert want[key] - missed <= run[counter][me] <= want[key], (counter, run[counter], want, missed)
            flagged = [r for r in run["steps_log"] if ROGUE in r.get(counter.split("_")[0], [])]
            assert len(flagged) == run[counter][me]  # the per-step log names the rank too


# ------------------------------------------------------------------------------------------ fast regressions


def _datagrams(key: bytes, *, src: int, tag: int, payload: bytes, stride: int, tid: int = 0,
               dtype: int = wire.DTYPE_CODES["float32"]) -> list[bytes]:
    count = wire.chunk_count(len(payload), stride)
    return [wire.pack_datagram(wire.Header(src=src, tag=tag, tensor_id=tid, index=i, count=count,
                                           length=len(payload[i * stride:(i + 1) * stride]), stride=stride,
                                           dtype=dtype), payload[i * stride:(i + 1) * stride], key)
            for i in range(count)]


def test_a_rank_claiming_another_is_charged_not_its_victim(raw_sock):
    """Rank 2 sends datagrams that claim rank 1, signed with its own key, from its own socket and from another
    port. ``rejected_from`` (the header's claim) names rank 1; ``rejects_by_sender`` names who really sent them."""
    with worlds_and_endpoints(3) as (worlds, (rx, _, spoofer)):
        key = worlds[2].keys[0]
        dgs = _datagrams(key, src=1, tag=0, payload=np.ones(1000, np.float32).tobytes(), stride=rx.stride)
        n0 = rx.core.datagrams
        for d in dgs:
            spoofer.sock.sendto(d, rx.addresses[0])
            raw_sock.sendto(d, rx.addresses[0])

        async def read() -> None:
            rx._attach()
            await wait_until(lambda: rx.core.datagrams >= n0 + 2 * len(dgs), what="datagrams")

        rx.run(read())
        assert rx.core.rejected_from(1) == 2 * len(dgs)  # what the headers claim
        assert rx.rejects_by_sender() == {"2": {"mac": len(dgs)}, "unknown": {"mac": len(dgs)}}
        assert rx.stats()["rejected_by_sender"] == rx.rejects_by_sender()


def test_pooled_datagrams_refused_at_post_count_in_that_receive():
    """Datagrams of the right sender and tag that wait in the pool and then fail the shape check when the receive
    is posted are refusals of that receive (they were once missed: the counters were read after the post)."""
    with worlds_and_endpoints(2) as (worlds, (rx, tx)):
        key = worlds[1].keys[0]
        bad = _datagrams(key, src=1, tag=3, payload=np.ones(700, np.float64).tobytes(), stride=rx.stride,
                         dtype=wire.DTYPE_CODES["float64"])
        for d in bad:
            tx.sock.sendto(d, rx.addresses[0])

        async def go():
            rx._attach()
            await wait_until(lambda: rx.stats()["pool_in_use"] == len(bad), what="pooled")
            fut = rx.irecv(1, np.zeros(700, np.float32), tag=3, timeout=0.2)
            await tx.send(0, np.ones(700, np.float32), tag=3)
            return await fut

        res = rx.run(go())
        assert res.complete and res.rejected == len(bad)
        assert rx.rejects_by_sender() == {"1": {"shape": len(bad)}}


def test_pool_overflow_is_charged_to_its_sender():
    """A peer that sends more early datagrams than its share of the pool loses its own, counted against it; the
    other peer's early datagrams still find room."""
    with worlds_and_endpoints(3, unexpected_bytes=64 * 1472) as (_, (rx, a, b)):
        payload = np.ones(16 * (rx.stride // 4), np.float32)  # 16 chunks; each peer's share is 32 datagrams

        async def go() -> int:
            rx._attach()
            sent = 0
            for tag in range(10, 13):  # three messages (and their FINs) for tags nobody posted
                sent += (await a.send(0, payload, tag=tag)).datagrams + 3
            sent += (await b.send(0, payload[:100], tag=10)).datagrams + 3
            await wait_until(lambda: rx.core.pooled + rx.core.overflow >= sent, what="datagrams")
            return sent

        sent = rx.run(go())
        assert rx.core.pooled == 32 + 4 and rx.core.overflow == sent - 36
        assert rx.core.overflow_from(1) == rx.core.overflow and rx.core.overflow_from(2) == 0


def test_row_health_judges_only_what_arrived():
    rows = np.ones((5, 100), np.float32)
    rows[0, 3] = np.inf
    rows[1, :50] = np.nan  # filled by the "nan" fill: not sent by the worker
    rows[2] = np.nan  # a lost row
    rows[3, 7] = np.nan  # sent
    rows[4] *= 3e38  # huge but finite: float32 squares would overflow
    report = GatherReport(np.array([1.0, 0.5, 0.0, 1.0, 1.0]))
    report.masks[2] = np.arange(100) >= 50
    nonfinite, norms = row_health(rows, report)
    assert nonfinite.tolist() == [True, False, False, True, False]
    assert np.isnan(norms[[0, 2, 3]]).all()
    assert norms[1] == pytest.approx(np.sqrt(50)) and norms[4] == pytest.approx(3e38 * 10, rel=1e-6)

    events = ProtocolEvents(5)
    rows = np.ones((5, 100), np.float32)
    rows[4] *= 1e3
    step = events.observe(GatherReport(np.array([1.0, 1.0, 1.0, 0.0, 1.0]), rejected_by_sender={"5": {"mac": 2}},
                                       stale=np.array([0, 0, 0, 0, 4])), rows)
    assert step == {"incomplete": [4], "huge": [5], "stale": {"5": 4}, "rejected": {"5": {"mac": 2}}}
    totals = events.totals()
    assert totals["huge_rows"] == {"1": 0, "2": 0, "3": 0, "4": 0, "5": 1}
    assert totals["rejected_by_rank"] == {"5": {"mac": 2}} and totals["rejected_by_reason"] == {"mac": 2}
