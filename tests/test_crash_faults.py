"""Issue 7 item 4 (crash faults) and item 3 (hostile connections on the control channel and the rendezvous).

- The elastic control channel: a dead link marks its rank missing and never blocks rank 0; a restarted rank
  reconnects under its new key; a live rank cannot be taken over; garbage, half-open and silent connections are
  counted and block nothing (in-process, real TCP sockets).
- The rejoin rendezvous: a restarted rank's fresh X25519 exchange is authenticated by the job secret and admitted
  only when its old process is gone (in-process threads, real sockets).
- Atomic checkpoints: a saver SIGKILLed at 20 random moments never leaves an unusable newest checkpoint; a
  corrupt newest checkpoint falls back to the previous one (numpy payload, and TensorFlow's).
- Real training runs (processes of :class:`aggregathor.launch.LocalJob`, digits): workers SIGKILLed mid-run are
  counted missing and the run completes; a restarted worker rejoins and its gradients arrive again; hostile
  connections against the running server's control port and rendezvous are counted; a SIGKILLed server restarted
  on the same run directory with ``resume`` (``--resume``) continues from its last checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import elastic_controls as elastic
from conftest import run, wait_until

from lossympi.bootstrap import RendezvousAuthError, RendezvousError, World, from_env
from lossympi.control import ControlClosed, ControlError, TCPControl

ROOT = Path(__file__).resolve().parent.parent
WAIT = 10.0


# ====================================================================================== elastic control channel


def test_elastic_control_dead_link_rejoin_and_takeover():
    async def main():
        with elastic(3, timeout=WAIT, handshake_timeout=1.0) as (worlds, ctls, extra):
            c0, c1, c2 = ctls
            listens = [asyncio.ensure_future(c.listen()) for c in (c1, c2)]
            assert await asyncio.wait_for(c0.announce(b"a"), WAIT) == [1, 2]
            assert await asyncio.wait_for(asyncio.gather(*listens), WAIT) == [b"a", b"a"]
            with pytest.raises(ControlError, match="not available on an elastic"):
                await c0.barrier()

            # rank 2 dies: rank 0 notices the EOF, rank 2 is missing, announcing does not wait for it
            c2.close()
            await wait_until(lambda: c0.missing() == [2], WAIT, "rank 2 missing")
            assert c0.link_failures == {"eof": 1}
            t0 = time.monotonic()
            assert await asyncio.wait_for(c0.announce(b"b"), WAIT) == [1]
            assert time.monotonic() - t0 < 0.5
            assert await asyncio.wait_for(c1.listen(), WAIT) == b"b"

            # its old key no longer opens the door once rank 0 holds a new one (as after a rendezvous rejoin)
            new_key = os.urandom(32)
            c0.keys[2] = new_key
            stale = TCPControl(2, 3, worlds[2].addresses, {0: worlds[2].keys[0]}, timeout=WAIT)
            stale.make_elastic()
            extra.append(stale)
            with pytest.raises(ControlError, match="refused rank 2"):
                await asyncio.wait_for(stale.listen(), WAIT)
            assert c0.rejects["auth"] == 1

            # the restarted rank 2, with the new key, reconnects and gets the next announcement
            reborn = TCPControl(2, 3, worlds[2].addresses, {0: new_key}, timeout=WAIT)
            reborn.make_elastic()
            extra.append(reborn)
            got = asyncio.ensure_future(reborn.listen())
            await wait_until(lambda: c0.missing() == [], WAIT, "rank 2 back")
            assert c0.rejoins == 1
            assert await asyncio.wait_for(c0.announce(b"c"), WAIT) == [1, 2]
            assert await asyncio.wait_for(got, WAIT) == b"c"
            assert await asyncio.wait_for(c1.listen(), WAIT) == b"c"

            # a second process for the live rank 2, even with the right key, is refused and counted
            thief = TCPControl(2, 3, worlds[2].addresses, {0: new_key}, timeout=WAIT)
            thief.make_elastic()
            extra.append(thief)
            with pytest.raises(ControlError, match="another live process holds rank 2"):
                await asyncio.wait_for(thief.listen(), WAIT)
            assert c0.rejects["rank_taken"] == 1
            assert c0.missing() == []

            # a worker that sends anything after its hello is cut off (bad frame)
            reborn.links[0].writer.write(b"\x00" * 40)
            await wait_until(lambda: c0.missing() == [2], WAIT, "rank 2 cut off")
            assert c0.link_failures["bad_frame"] == 1

            # rank 0 exits: the worker learns it from EOF, with its own exception type
            c0.close()
            with pytest.raises(ControlClosed, match="connection lost"):
                await asyncio.wait_for(c1.listen(), WAIT)

    run(main())


def test_elastic_control_hostile_connections_block_nothing():
    async def main():
        with elastic(2, timeout=WAIT, handshake_timeout=0.5) as (worlds, ctls, _):
            c0, c1 = ctls
            addr = worlds[0].address
            first = asyncio.ensure_future(c1.listen())
            assert await asyncio.wait_for(c0.announce(b"0"), WAIT) == [1]
            assert await asyncio.wait_for(first, WAIT) == b"0"
            # garbage (fails the MAC), a partial hello that stalls (half-open), a silent connection
            garbage = await asyncio.open_connection(*addr)
            garbage[1].write(os.urandom(36))
            partial = await asyncio.open_connection(*addr)
            partial[1].write(struct.pack("<I", 1) + b"\x01" * 7)
            silent = await asyncio.open_connection(*addr)
            t0 = time.monotonic()
            for i in range(5):  # the steps go on while they are connected
                got = asyncio.ensure_future(c1.listen())
                assert await asyncio.wait_for(c0.announce(b"%d" % i), WAIT) == [1]
                assert await asyncio.wait_for(got, WAIT) == b"%d" % i
            assert time.monotonic() - t0 < 0.4
            await wait_until(lambda: c0.rejects["timeout"] == 2 and c0.rejects["auth"] == 1, WAIT,
                             "the hostile connections counted")
            assert c0.missing() == [] and not c0.link_failures
            for _, w in (garbage, partial, silent):
                w.close()

    run(main())


def test_wait_ready_is_a_bounded_barrier():
    async def main():
        with elastic(3, timeout=WAIT) as (_, ctls, _extra):
            c0, c1, c2 = ctls
            got = [asyncio.ensure_future(c.listen()) for c in (c1, c2)]
            assert await asyncio.wait_for(c0.wait_ready(WAIT), WAIT) == []  # both ask for the first message
            await c0.announce(b"1")
            assert [await g for g in got] == [b"1", b"1"]

            async def late_listen(delay: float) -> bytes:
                await asyncio.sleep(delay)
                return await c1.listen()

            # rank 1 is a little late: rank 0 waits for it, and no longer
            got = [asyncio.ensure_future(late_listen(0.2)), asyncio.ensure_future(c2.listen())]
            t0 = time.monotonic()
            assert await asyncio.wait_for(c0.wait_ready(2.0), WAIT) == []
            assert 0.15 < time.monotonic() - t0 < 1.0
            await c0.announce(b"2")
            assert [await g for g in got] == [b"2", b"2"]
            # rank 1 hangs: rank 0 waits for it once (the bound), then not again until it catches up
            got2 = asyncio.ensure_future(c2.listen())
            t0 = time.monotonic()
            assert await asyncio.wait_for(c0.wait_ready(0.3), WAIT) == [1]
            assert 0.25 < time.monotonic() - t0 < 1.0
            await c0.announce(b"3")
            assert await got2 == b"3"
            got2 = asyncio.ensure_future(c2.listen())
            t0 = time.monotonic()
            assert await asyncio.wait_for(c0.wait_ready(5.0), WAIT) == [1]  # not waited for, still behind
            assert time.monotonic() - t0 < 0.2
            await c0.announce(b"4")
            assert await got2 == b"4"
            assert [await c1.listen(), await c1.listen()] == [b"3", b"4"]  # it catches up
            got = [asyncio.ensure_future(c.listen()) for c in (c1, c2)]
            assert await asyncio.wait_for(c0.wait_ready(WAIT), WAIT) == []
            assert c0.missing() == [] and not c0.link_failures
            await c0.announce(b"5")
            assert [await g for g in got] == [b"5", b"5"]

    run(main())


def test_elastic_control_drops_a_link_that_stops_reading():
    async def main():
        with elastic(3, timeout=WAIT, send_timeout=0.5, max_bytes=4 << 20) as (_, ctls, _extra):
            c0, c1, c2 = ctls
            ones = [asyncio.ensure_future(c.listen()) for c in (c1, c2)]
            await asyncio.wait_for(c0.announce(b"x"), WAIT)
            await asyncio.wait_for(asyncio.gather(*ones), WAIT)
            c1.links[0].writer.transport.pause_reading()  # rank 1 hangs: its socket buffers fill up
            blob = os.urandom(2 << 20)
            for _ in range(40):
                reached = await asyncio.wait_for(c0.announce(blob), WAIT)
                assert await asyncio.wait_for(c2.listen(), WAIT) == blob  # rank 2 is served all along
                if reached == [2]:
                    break
            assert c0.missing() == [1] and c0.link_failures == {"timeout": 1}

    run(main())


# ====================================================================================== rejoin rendezvous


def _env_kw(rank: int, size: int, port: int, secret: str = "job-secret", **kw: Any) -> dict[str, Any]:
    return {"rank": rank, "world_size": size, "rendezvous": f"127.0.0.1:{port}", "secret": secret,
            "timeout": 15.0, "environ": {}} | kw


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _in_threads(*kws: dict[str, Any]) -> list[World]:
    out: list[Any] = [None] * len(kws)

    def one(i: int) -> None:
        try:
            out[i] = from_env(**kws[i])
        except BaseException as exc:  # reported below
            out[i] = exc

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(kws))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    for o in out:
        if isinstance(o, BaseException):
            raise o
    return out


def test_rejoin_rendezvous_admits_only_authenticated_dead_ranks():
    port = _free_tcp_port()
    worlds = _in_threads(*(_env_kw(r, 3, port, rejoin=r == 0, read_timeout=0.5) for r in range(3)))
    service = worlds[0].rendezvous
    assert service is not None and worlds[1].rendezvous is None
    alive = {1: True, 2: True}
    admitted: list[tuple[int, tuple[str, int], bytes]] = []

    def admit(rank: int, address: tuple[str, int], key: bytes) -> bool:
        if alive[rank]:
            return False
        admitted.append((rank, address, key))
        return True

    service.start(admit)
    hostile: list[socket.socket] = []
    try:
        # hostile connections: garbage, a huge length prefix, a partial hello that stalls, a silent one
        for data in (b"\xff" * 8 + os.urandom(50), struct.pack(">I", 1 << 30), struct.pack(">I", 500) + b"{\"ty"):
            s = socket.create_connection(service.address, timeout=5)
            s.sendall(data)
            hostile.append(s)
        hostile.append(socket.create_connection(service.address, timeout=5))

        # a live rank cannot be taken over, even by someone with the secret
        with pytest.raises(RendezvousError, match="rank 2 is alive"):
            from_env(**_env_kw(2, 3, port, timeout=5.0))
        # without the job secret nobody gets in, and the runtime is not even asked
        alive[2] = False
        with pytest.raises(RendezvousAuthError):
            from_env(**_env_kw(2, 3, port, secret="guess", timeout=5.0))
        assert admitted == []
        # rank 2's process died: a restarted rank 2 rejoins with a fresh key pair, while the hostile ones hang on
        t0 = time.monotonic()
        (reborn,) = _in_threads(_env_kw(2, 3, port, timeout=5.0))
        assert time.monotonic() - t0 < 2
        try:
            assert [a[0] for a in admitted] == [2]
            _, address, key = admitted[0]
            assert reborn.keys[0] == key != worlds[2].keys[0]  # rank 0 got the new pair key
            assert reborn.address == address
            assert reborn.addresses[1] == worlds[1].addresses[1]  # the table holds the other ranks as they were
            assert service.rejoins == 1
        finally:
            reborn.close()
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            r = service.rejected
            if r.get("read_timeout", 0) >= 2 and r.get("size", 0) >= 2:
                break
            time.sleep(0.05)
        r = service.rejected
        assert r.get("size", 0) >= 2 and r.get("read_timeout", 0) >= 2, r  # garbage/huge; partial/silent
        assert r.get("rank_taken") == 1 and r.get("auth") == 1, r
    finally:
        for s in hostile:
            s.close()
        for w in worlds:
            w.close()
    assert not any(t.name == "lossympi-rejoin" for t in threading.enumerate())


# ====================================================================================== atomic checkpoints

_SAVER = r"""
import importlib.util, json, sys
import numpy as np
spec = importlib.util.spec_from_file_location("ckpt", sys.argv[1])  # without the package's TensorFlow import
ckpt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ckpt)
store = ckpt.AtomicCheckpoints(sys.argv[2], keep=3)

def read(prefix):
    return json.load(open(prefix + ".json"))["step"]

step = store.restore(read) or 0
while True:
    step += 1
    def write(prefix, step=step):
        np.save(prefix + ".npy", np.full(1 << 18, step, np.float32))  # 1 MiB
        json.dump({"step": step}, open(prefix + ".json", "w"))
    store.save(step, write)
    print("saved", step, flush=True)  # the test kills at a random moment after the first save
"""


def test_checkpoints_survive_sigkill_at_random_moments(tmp_path):
    from aggregathor.checkpoint import AtomicCheckpoints

    directory = tmp_path / "ckpts"
    rng = random.Random(7)

    def read(prefix: str) -> int:
        step = json.loads(Path(prefix + ".json").read_text())["step"]
        values = np.load(prefix + ".npy")
        assert values.shape == (1 << 18,) and bool(np.all(values == step)), "a torn payload was restored"
        return int(step)

    last = 0
    for kill in range(20):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(ROOT / "aggregathor" / "checkpoint.py"),
                                 str(directory)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline().startswith("saved"), proc.stderr
            time.sleep(rng.uniform(0.0, 0.15))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        store = AtomicCheckpoints(directory, keep=3)
        step = store.restore(read)
        assert step is not None and step >= last, (kill, step, last)
        assert store.skipped == [], store.skipped  # the newest committed checkpoint is always intact
        # what earlier killed saves left was removed by the next saver: at most this kill's leftovers remain
        assert len(list(directory.glob(".tmp-*"))) <= 2 and len(list(directory.glob(".trash-*"))) <= 1
        latest = (directory / "LATEST").read_text().strip()  # informative: it may lag the commits
        assert latest.startswith("step-") and int(latest[5:]) <= step, (latest, step)
        last = step
    assert last >= 20  # every saver committed at least one checkpoint before its kill
    store.clean()
    assert sorted(p.name for p in directory.iterdir()) == ["LATEST", *(store.path(s).name for s in store.steps())]


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    import tensorflow as tf

    from aggregathor.checkpoint import AtomicCheckpoints, atomic_write_text

    v = tf.Variable(np.zeros(1000, np.float32))
    step = tf.Variable(0, dtype=tf.int64)
    ck = tf.train.Checkpoint(v=v, step=step)
    store = AtomicCheckpoints(tmp_path / "c", keep=2)
    for s in (10, 20, 30):
        v.assign(np.full(1000, s, np.float32))
        step.assign(s)
        store.save(s, ck.write)
    assert store.steps() == [20, 30]  # keep=2
    data = next(store.path(30).glob("ckpt.data-*"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    v.assign(np.zeros(1000, np.float32))
    with caplog.at_level("WARNING", logger="aggregathor.checkpoint"):
        got = store.restore(lambda p: ck.read(p).assert_existing_objects_matched())
    assert got == 20 and int(step.numpy()) == 20 and float(v.numpy()[0]) == 20.0
    assert store.skipped and store.skipped[0][0] == 30 and "SHA-256" in store.skipped[0][1]
    assert "falling back" in caplog.text
    # a checkpoint without its manifest (never committed by this protocol) is skipped too
    (store.path(20) / "MANIFEST.json").unlink()
    assert store.restore(lambda p: ck.read(p)) is None

    out = tmp_path / "summary.json"
    atomic_write_text(out, "first")
    atomic_write_text(out, "second")
    assert out.read_text() == "second" and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ====================================================================================== real training runs


def _cfg(tmp_path: Path, **kw: Any):
    from aggregathor.config import TrainConfig

    base = dict(experiment="digits", gar="average-nan", workers=3, f=2, byzantine=0, steps=200, eval_every=50,
                checkpoint_every=20, loss=0.0, deadline=0.5, batch_size=32, seed=1, run_dir=str(tmp_path / "run"))
    return TrainConfig.from_dict(base | kw)


def _steps(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of steps.jsonl written so far (a partly written last line is left out)."""
    path = run_dir / "steps.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


def _wait_for(pred: Any, job: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        server = job.procs[0]
        assert server.poll() is None or server.returncode == 0, f"the server died ({server.returncode}) {what}"
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; logs in {job.logs}")


def _tcp(pid: int) -> list[tuple[str, int, int]]:
    """``(state, local port, remote port)`` of the TCP sockets of ``pid`` (its socket inodes in /proc/net/tcp)."""
    inodes = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
        table = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:  # the process is gone
        return []
    for fd in fds:
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    out = []
    for line in table:
        fields = line.split()
        if fields[9] in inodes:
            out.append((fields[3], int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)))
    return out


def _connected_to(pid: int, port: int) -> bool:
    return any(state in ("01", "02") and remote == port for state, _, remote in _tcp(pid))  # ESTABLISHED, SYN_SENT


def _hostile(port: int) -> list[socket.socket]:
    """Garbage, a huge length prefix, a partial frame that stalls, a silent connection."""
    out = []
    for data in (os.urandom(64), struct.pack(">I", 1 << 31) + b"x" * 10, b"\x00\x00\x00\x30" + b"{" * 5, b""):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if data:
            s.sendall(data)
        out.append(s)
    return out


@contextlib.contextmanager
def _stopped(pid: int):
    """The process is SIGSTOPped inside the block (a server that is slow for a while), SIGCONTed after."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _poll(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.02)


def test_workers_killed_mid_run_are_missing_and_a_restarted_one_rejoins(tmp_path):
    from aggregathor.launch import LocalJob

    cfg = _cfg(tmp_path, steps=400, eval_every=100, checkpoint_every=0)
    run_dir = Path(cfg.run_dir)
    job = LocalJob(cfg)
    hostile: list[socket.socket] = []
    try:
        job.start_all()
        server = job.procs[0].pid
        _wait_for(lambda: len(_steps(run_dir)) >= 10, job, 120, "the first steps")
        # hostile connections against the running server's control port and its rendezvous
        rdzv = int(job.env["LOSSYMPI_RENDEZVOUS"].rsplit(":", 1)[1])
        (control,) = {local for state, local, _ in _tcp(server) if state == "0A"} - {rdzv}  # listening
        hostile = _hostile(control) + _hostile(rdzv)
        # two workers (f = 2) die, one after the other
        for rank in (2, 1):
            job.procs[rank].send_signal(signal.SIGKILL)
            job.procs[rank].wait()
            time.sleep(0.3)
        # worker 1 is restarted with the same command and environment. The server is stopped while the new
        # process imports TensorFlow, and again while it builds its model, so that the run cannot end first.
        with _stopped(server):
            proc = job.start(1)
            _poll(lambda: _connected_to(proc.pid, rdzv) or proc.poll() is not None, 120,
                  "the restarted worker at the rendezvous")
        _poll(lambda: not _connected_to(proc.pid, rdzv), 30, "the rejoin rendezvous")
        with _stopped(server):
            _poll(lambda: _connected_to(proc.pid, control) or proc.poll() is not None, 120,
                  "the restarted worker on the control channel")
        summary = job.wait()
    finally:
        for s in hostile:
            s.close()
        job.close()
    rows = _steps(run_dir)
    assert [r["step"] for r in rows] == list(range(cfg.steps))  # the run went to the end, no step twice
    missing = [r["missing_workers"] for r in rows]
    phases = [m for i, m in enumerate(missing) if i == 0 or m != missing[i - 1]]
    assert phases == [0, 1, 2, 1], phases  # worker 2 dies, worker 1 dies, worker 1 is back
    back = [r for r in rows if r["step"] > missing.index(2) and r["missing_workers"] == 1]
    assert len(back) > 50
    # worker 1's gradients arrive again (on a busy machine one may miss the adaptive deadline now and then)
    assert sum(r["lost_gradients"] == 1 for r in back) >= 0.8 * len(back), [r["lost_gradients"] for r in back]
    assert all(r["lost_gradients"] >= 2 for r in rows if r["missing_workers"] == 2)
    assert summary.steps == cfg.steps and summary.rejoins == 1
    assert summary.missing_workers == sum(missing) and summary.max_missing_workers == 2
    failures = summary.control_link_failures  # a killed process's socket ends with FIN, or RST if it held data
    assert sum(failures.values()) == 2 and set(failures) <= {"eof", "reset"}, failures
    assert sum(summary.control_rejects.values()) >= 3, summary.control_rejects  # 4 opened, counted once closed
    assert sum(summary.rendezvous_rejects.values()) >= 2, summary.rendezvous_rejects
    assert summary.accuracy > 0.8, summary.accuracy  # the honest workers' training went on
    assert job.procs[1].returncode == 0 and job.procs[3].returncode == 0
    assert "Traceback" not in (job.logs / "rank1.log").read_text()


def test_server_killed_mid_run_resumes_from_its_last_checkpoint(tmp_path):
    from aggregathor.checkpoint import AtomicCheckpoints
    from aggregathor.config import TrainConfig
    from aggregathor.launch import EXIT_SERVER_GONE, LocalJob

    cfg = _cfg(tmp_path, workers=2, f=1, steps=300, eval_every=100, checkpoint_every=20)
    run_dir = Path(cfg.run_dir)
    first = LocalJob(cfg)
    try:
        first.start_all()
        store = AtomicCheckpoints(run_dir / "checkpoints")
        _wait_for(lambda: store.latest_valid() is not None and store.latest_valid() >= 40, first, 120,
                  "a checkpoint at step 40")
        time.sleep(random.uniform(0.0, 0.3))
        first.procs[0].send_signal(signal.SIGKILL)
        first.procs[0].wait()
        for rank in (1, 2):  # the workers stop on their own, with a clear message
            assert first.procs[rank].wait(timeout=60) == EXIT_SERVER_GONE
            text = (first.logs / f"rank{rank}.log").read_text()
            assert "the parameter server closed the control channel" in text and "Traceback" not in text
    finally:
        first.close()
    last = AtomicCheckpoints(run_dir / "checkpoints").latest_valid()
    assert last is not None and last % 20 == 0 and last < cfg.steps
    killed_after = len(_steps(run_dir))
    # the same job again, on the same run directory: a restarted job is an explicit resume
    second = LocalJob(TrainConfig.from_dict(cfg.to_dict() | {"resume": True}))
    try:
        second.start_all()
        summary = second.wait()
    finally:
        second.close()
    assert summary.resumed_from == last and summary.steps == cfg.steps
    rows = _steps(run_dir)[killed_after:]
    assert [r["step"] for r in rows] == list(range(last, cfg.steps))  # only the steps since the checkpoint redone
    assert AtomicCheckpoints(run_dir / "checkpoints").latest_valid() == cfg.steps
    assert summary.accuracy > 0.8
