"""The transport backends behind aggregathor.transport's server-side and worker-side interfaces.

In-process checks of the reliable baselines (tcp, grpc: every rank on one event loop, over 127.0.0.1, through
the adapters of aggregathor.transport over lossympi.baselines): parameters reach every worker bit-exact,
gradients land in their rows, late and malformed gradients are lost (their row is the lost fill) without
corrupting anything else or desynchronising the stream, rogue connections and calls are refused. The factory
builds every backend with its settings at construction and each side declares its capabilities. Then one short
real training run per transport (the three are started together, to share the start-up time).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import run, wait_until

from aggregathor.config import TrainConfig
from aggregathor.transport import Capability, LossympiServer, LossympiWorker, build_transport
from aggregathor.transport.base import ParamsReport
from aggregathor.transport.factory import CONTROL_MAX_BYTES
from aggregathor.transport.grpc import GrpcServer, GrpcWorker
from aggregathor.transport.tcp import TCPServer, TCPWorker
from lossympi.baselines import HEADER, KIND_GRAD, MAGIC, BaselineError
from lossympi.baselines.frames import bytes_of
from lossympi.baselines.grpc import MIN_CHUNK, SERVICE
from lossympi.bootstrap import local_worlds
from lossympi.faults import FaultInjector, rank_seed

ROOT = Path(__file__).resolve().parent.parent
SIZE = 4  # the server and 3 workers
D = 4099  # not a multiple of anything in particular


def _random_bits(seed: int, d: int = D) -> np.ndarray:
    """float32 of uniformly random bits: NaNs with payloads, infinities, -0.0, subnormals included."""
    return np.random.default_rng(seed).integers(0, 2**32, d, dtype=np.uint32).view(np.float32)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a.view(np.uint32), b.view(np.uint32)))


class Ranks:
    """The server and the workers of one in-process world, driven one exchange at a time."""

    def __init__(self, server: Any, workers: list[Any]) -> None:
        self.server, self.workers = server, workers
        self.ts = [server, *workers]
        self.rows = np.zeros((SIZE, D), np.float32)
        self.thetas = [np.zeros(D, np.float32) for _ in self.workers]
        self.round = -1  # the round of the current step (one per parameter exchange)

    async def control(self, step: int) -> None:
        metas = await asyncio.gather(self.server.announce({"step": step}), *(t.next_message() for t in self.workers))
        assert metas[0] is None and all(m == {"step": step} for m in metas[1:])

    async def params(self, seed: int, workers: tuple[int, ...] = (1, 2, 3)) -> np.ndarray:
        theta = _random_bits(seed)
        got = await asyncio.gather(self.server.send_params(theta, 5.0),
                                   *(self.ts[r].recv_params(self.thetas[r - 1], 5.0) for r in workers))
        assert got == [ParamsReport()] + [1.0] * len(workers)  # a reliable stream: no parameter datagrams
        for r in workers:
            assert _same_bits(self.thetas[r - 1], theta), f"rank {r} got other parameters"
        self.round += 1
        return theta

    async def step(self, step: int, senders: tuple[int, ...] = (1, 2, 3), deadline: float = 20.0,
                   extra: Any = None) -> tuple[Any, dict[int, np.ndarray]]:
        """One round where ``senders`` send their gradient in time (and ``extra()`` runs during the gather)."""
        await self.control(step)
        await self.params(1000 + step)
        grads = {r: _random_bits(100 * step + r) for r in senders}
        self.rows.fill(7.0)
        gather = asyncio.ensure_future(self.server.gather(self.rows, time.monotonic() + deadline))
        if extra is not None:
            await extra()
        await asyncio.gather(*(self.ts[r].send_grad(g, time.monotonic() + deadline) for r, g in grads.items()))
        report = await gather
        for r, g in grads.items():
            assert _same_bits(self.rows[r], g), f"row {r} differs from what rank {r} sent"
        return report, grads

    async def stop(self) -> None:
        await asyncio.gather(self.server.announce({"stop": True}), *(t.next_message() for t in self.workers))


def _with_ranks(server_cls: type, worker_cls: type, body: Any) -> None:
    async def main() -> None:
        worlds = local_worlds(SIZE)
        server = server_cls(worlds[0], lost_row_fill=float("nan"), control_timeout=30.0)
        workers = [worker_cls(w, control_timeout=30.0) for w in worlds[1:]]
        try:
            assert server.capabilities == frozenset() and all(w.capabilities == frozenset() for w in workers)
            assert server.missing_workers() == [] and server.fault_counters().rejoins == 0
            await asyncio.wait_for(body(Ranks(server, workers)), 60)
        finally:
            for t in (server, *workers):
                t.close()
            for w in worlds:
                w.close()

    run(main())


# ----------------------------------------------------------------------------------------------------------
# tcp
# ----------------------------------------------------------------------------------------------------------


def test_tcp_exchanges_are_exact_and_survive_late_malformed_and_rogue_traffic():
    async def body(ranks: Ranks) -> None:
        server, ts = ranks.server.root, [ranks.server, *ranks.workers]
        # ranks 0-2 start; a rogue that claims rank 3 without its key is refused; then the real rank 3 joins
        first = [asyncio.ensure_future(server.connect())] + [asyncio.ensure_future(t.sender.connect())
                                                              for t in ts[1:3]]
        await wait_until(lambda: server.data_port is not None, 20, "the data listener")
        reader, writer = await asyncio.open_connection("127.0.0.1", server.data_port)
        await reader.readexactly(16)  # the server's nonce
        writer.write(b"\x03\0\0\0" + os.urandom(16 + 32))
        assert await reader.read() == b""  # closed without an acknowledgement
        writer.close()
        assert server.rejected_connections == 1
        await asyncio.gather(*first, ts[3].sender.connect())
        assert sorted(server.peers) == [1, 2, 3]

        report, _ = await ranks.step(0)
        assert report.delivered.tolist() == [1.0, 1.0, 1.0] and report.rejected == 0
        assert report.lost_chunks == 0 and len(report.complete_elapsed) == 3

        # round 1: rank 3 misses the deadline; its late frame is read and discarded next round
        report, _ = await ranks.step(1, senders=(1, 2), deadline=0.3)
        assert report.delivered.tolist() == [1.0, 1.0, 0.0] and report.lost_chunks == 1
        assert np.isnan(ranks.rows[3]).all()
        await ts[3].send_grad(_random_bits(999), time.monotonic() + 1)
        report, _ = await ranks.step(2)
        assert report.delivered.tolist() == [1.0, 1.0, 1.0]

        # round 3: rank 2 sends a gradient one element short: refused, its row lost, the others intact
        async def short_frame() -> None:
            head = HEADER.pack(MAGIC, KIND_GRAD, 1, 0, ranks.round, (D - 1) * 4)
            await asyncio.get_running_loop().sock_sendall(ts[2].sender.sock, head + bytes((D - 1) * 4))

        report, _ = await ranks.step(3, senders=(1, 3), deadline=0.5, extra=short_frame)
        assert report.delivered.tolist() == [1.0, 0.0, 1.0] and report.rejected == 1
        assert np.isnan(ranks.rows[2]).all()
        assert server.peers[2].alive and server.rejected == 1
        report, _ = await ranks.step(4)  # still in sync
        assert report.delivered.tolist() == [1.0, 1.0, 1.0] and report.rejected == 0

        # round 5: garbage instead of a header: rank 2's connection is given up, the others go on
        async def garbage() -> None:
            await asyncio.get_running_loop().sock_sendall(ts[2].sender.sock, b"GET / HTTP/1.1\r\n\r\n" + bytes(64))

        report, _ = await ranks.step(5, senders=(1, 3), deadline=20.0, extra=garbage)
        assert report.delivered.tolist() == [1.0, 0.0, 1.0]
        assert not server.peers[2].alive and np.isnan(ranks.rows[2]).all()
        t0 = time.monotonic()
        await ranks.control(6)
        await ranks.params(1006, workers=(1, 3))
        gather = asyncio.ensure_future(ranks.server.gather(ranks.rows, time.monotonic() + 20))
        await asyncio.gather(*(ts[r].send_grad(_random_bits(r), 0) for r in (1, 3)))
        report = await gather
        assert report.delivered.tolist() == [1.0, 0.0, 1.0]
        assert time.monotonic() - t0 < 10  # a dead connection is not waited for
        await ranks.stop()

    _with_ranks(TCPServer, TCPWorker, body)


# ----------------------------------------------------------------------------------------------------------
# grpc
# ----------------------------------------------------------------------------------------------------------


def _grpc_rogue(grpc: Any, ranks: Ranks) -> tuple[Any, list[Any]]:
    """A client of rank 0's gRPC server that holds no key, and the status codes (or replies) of its calls."""
    channel = grpc.insecure_channel(f"127.0.0.1:{ranks.server.root.port}", options=[("grpc.enable_http_proxy", 0)])
    push = channel.stream_unary(f"/{SERVICE}/Push")
    params = channel.unary_stream(f"/{SERVICE}/Params")
    codes: list[Any] = []

    def call(request: Any) -> None:
        """A Push (an iterator of messages) or a Params request (bytes)."""
        try:
            codes.append(push(request, timeout=10) if not isinstance(request, bytes) else
                         list(params(request, timeout=10)))
        except grpc.RpcError as exc:
            codes.append(exc.code())

    return channel, [call, codes]


def test_grpc_exchanges_are_exact_and_refuse_rogue_malformed_late_and_tampered_streams():
    grpc = pytest.importorskip("grpc", reason="grpcio is not installed")

    async def body(ranks: Ranks) -> None:
        ts, root = [ranks.server, *ranks.workers], ranks.server.root
        root.chunk_bytes = MIN_CHUNK  # D floats: parameters and gradients in 5 chunks
        for t in ts[1:]:
            t.sender.chunk_bytes = MIN_CHUNK
        await asyncio.gather(root.connect(), *(t.sender.connect() for t in ts[1:]))
        report, _ = await ranks.step(0)
        assert report.delivered.tolist() == [1.0, 1.0, 1.0] and report.rejected == 0
        channel, (call, codes) = _grpc_rogue(grpc, ranks)

        async def rogue() -> None:
            good = list(ts[2].sender.push_messages(_random_bits(5), ranks.round))  # rank 2's key: the rogue has it
            assert len(good) == 6
            tampered = bytearray(good[3])
            tampered[-1] ^= 1
            for request in (
                iter([good[0][:-32] + os.urandom(32), *good[1:]]),  # a forged MAC on the opening
                ts[1].sender.params_request(ranks.round)[:-32] + os.urandom(32),  # a forged Params request
                iter(good[:-1]),  # one chunk short
                iter([good[0], good[2], good[1], *good[3:]]),  # chunks out of order
                iter([*good[:3], bytes(tampered), *good[4:]]),  # one bit of a chunk flipped
                iter([b"GET / HTTP/1.1\r\n\r\n" + bytes(64)]),  # not an opening
                ts[2].sender.push_messages(_random_bits(5, D - 1), ranks.round),  # authentic, one element short
            ):
                await asyncio.to_thread(call, request)

        report, _ = await ranks.step(1, extra=rogue)  # then the real rank 2 pushes: its row is whole
        unauth, invalid = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT
        assert codes == [unauth, unauth, invalid, invalid, invalid, invalid, invalid]
        assert report.delivered.tolist() == [1.0, 1.0, 1.0] and report.rejected == 7

        # round 2: rank 3 misses the deadline; its late push changes nothing
        report, _ = await ranks.step(2, senders=(1, 2), deadline=0.3)
        assert report.delivered.tolist() == [1.0, 1.0, 0.0] and report.lost_chunks == 1
        assert np.isnan(ranks.rows[3]).all()
        await ts[3].send_grad(_random_bits(999), time.monotonic() + 1)
        assert np.isnan(ranks.rows[3]).all()

        # round 3: rank 2's only push has a bad chunk: the whole gradient is refused, its row is the lost fill
        async def bad_chunk() -> None:
            msgs = list(ts[2].sender.push_messages(_random_bits(6), ranks.round))
            await asyncio.to_thread(call, iter([*msgs[:4], msgs[4][:-1] + bytes([msgs[4][-1] ^ 1]), *msgs[5:]]))

        report, _ = await ranks.step(3, senders=(1, 3), deadline=0.5, extra=bad_chunk)
        assert report.delivered.tolist() == [1.0, 0.0, 1.0] and report.rejected == 1 and codes[-1] == invalid
        assert np.isnan(ranks.rows[2]).all()

        # round 4: a replay of rank 3's stream of round 3 arrives during the gather of round 4: late, not landed
        async def replay() -> None:
            await asyncio.to_thread(call, ts[3].sender.push_messages(_random_bits(31), ranks.round - 1))

        report, _ = await ranks.step(4, extra=replay)
        assert codes[-1] == b"late" and report.delivered.tolist() == [1.0, 1.0, 1.0] and report.rejected == 0
        await _grpc_deadline_mid_stream(ranks, call, codes)
        report, _ = await ranks.step(6)
        assert report.delivered.tolist() == [1.0, 1.0, 1.0] and report.rejected == 0
        channel.close()
        await ranks.stop()

    _with_ranks(GrpcServer, GrpcWorker, body)


async def _grpc_deadline_mid_stream(ranks: Ranks, call: Any, codes: list[Any]) -> None:
    """Round 5: rank 3's push stalls after 2 of its 5 chunks landed; the deadline passes; the rest of the stream
    arrives after the gather returned and never lands in the row."""
    gate = threading.Event()
    grad = _random_bits(55)
    half = 2 * MIN_CHUNK // 4

    def stalled() -> Any:
        for i, msg in enumerate(ranks.ts[3].sender.push_messages(grad, ranks.round)):
            if i == 3:
                gate.wait(20)
            yield msg

    pending: list[Any] = []

    async def stall() -> None:
        pending.append(asyncio.ensure_future(asyncio.to_thread(call, stalled())))
        await wait_until(lambda: _same_bits(ranks.rows[3][:half], grad[:half]), 10, "two chunks of rank 3")

    report, _ = await ranks.step(5, senders=(1, 2), deadline=1.0, extra=stall)
    assert report.delivered.tolist() == [1.0, 1.0, 0.0] and np.isnan(ranks.rows[3]).all()
    gate.set()
    await pending[0]
    assert codes[-1] == b"late" and np.isnan(ranks.rows[3]).all()


def test_grpc_workers_check_every_chunk_of_the_parameters():
    pytest.importorskip("grpc", reason="grpcio is not installed")

    async def body(ranks: Ranks) -> None:
        ts, root = [ranks.server, *ranks.workers], ranks.server.root
        root.chunk_bytes = MIN_CHUNK
        await asyncio.gather(root.connect(), *(t.sender.connect() for t in ts[1:]))
        theta = _random_bits(77)
        await root.publish(theta, 0)
        sender = ts[1].sender
        good = list(root._serve_params(sender.params_request(0), None))  # what rank 1's Params call receives
        assert len(good) == 6
        got = np.zeros(D, np.float32)
        sender._read_params(iter(good), bytes_of(got), got.dtype, 0)
        assert _same_bits(got, theta)
        tampered = [*good[:2], good[2][:-1] + bytes([good[2][-1] ^ 1]), *good[3:]]
        for msgs, what in ((tampered, "chunk 1 of"), (good[:-1], "chunk 4 of"), ([good[0], *good[2:]], "chunk 0 of"),
                           (list(root._serve_params(ts[2].sender.params_request(0), None)), "authentication")):
            with pytest.raises(BaselineError, match=what):
                sender._read_params(iter(msgs), bytes_of(np.zeros(D, np.float32)), got.dtype, 0)

    _with_ranks(GrpcServer, GrpcWorker, body)


# ----------------------------------------------------------------------------------------------------------
# the factory
# ----------------------------------------------------------------------------------------------------------


def _config(**kw: Any) -> TrainConfig:
    return TrainConfig(**{"workers": 1, "f": 0, "byzantine": 0, "gar": "average", **kw})


def test_factory_builds_lossympi_with_its_settings_at_construction():
    worlds = local_worlds(2)
    built: list[Any] = []
    try:
        for loss in (0.05, 0.0):
            cfg = _config(loss=loss, seed=3, gar="median")
            server, worker = (build_transport(cfg, w, mpi=False) for w in worlds)
            built += [server, worker]
            assert isinstance(server, LossympiServer) and isinstance(worker, LossympiWorker)
            assert math.isnan(server.lost_row_fill)  # the median is NaN-robust: a lost row is NaN
            assert server.fill == cfg.fill and server.ready_timeout == cfg.deadline
            # no rendezvous kept open (a local world): elastic, but no rejoin
            assert server.capabilities == {Capability.ELASTIC, Capability.PROTOCOL_COUNTERS}
            assert Capability.HONEST_GRADIENTS not in worker.capabilities
            for t in (server, worker):
                assert t.comm.control.max_bytes == CONTROL_MAX_BYTES
                faults = t.comm.endpoint.faults
                if loss:
                    assert isinstance(faults, FaultInjector) and faults.default.drop == loss
                    assert faults.seed == rank_seed(cfg.seed, t.rank)
                else:
                    assert faults is None
            assert build_transport(_config(gar="average"), worlds[0], mpi=False).lost_row_fill == 0.0
    finally:
        for t in built:
            t.close()
        for w in worlds:
            w.close()


def test_factory_refuses_mpi_without_mpiexec_and_unknown_transports():
    worlds = local_worlds(2)
    try:
        with pytest.raises(BaselineError, match="mpiexec"):
            build_transport(_config(transport="mpi", launcher="mpi"), worlds[0], mpi=False)
        with pytest.raises(ValueError, match="unknown transport"):
            build_transport(_config(transport="carrier-pigeon"), worlds[0], mpi=False)
    finally:
        for w in worlds:
            w.close()


# ----------------------------------------------------------------------------------------------------------
# real training runs: the three transports are started together and checked one by one
# ----------------------------------------------------------------------------------------------------------

TRAIN = ["train", "--workers", "3", "--f", "0", "--byzantine", "0", "--gar", "average", "--steps", "30",
         "--eval-every", "30", "--loss", "0", "--quiet"]


def _mpiexec() -> Path | None:
    found = Path(sys.executable).parent / "mpiexec"
    if found.exists():
        return found
    which = shutil.which("mpiexec")
    return Path(which) if which else None


def _have_mpi4py() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def training_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOSSYMPI_", "PMI", "OMPI_", "PMIX"))}
    env |= {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "HYDRA_LAUNCHER": "fork"}
    runs: dict[str, tuple[subprocess.Popen, Path, Path]] = {}

    def start(name: str, argv: list[str]) -> None:
        out = base / f"{name}.json"
        log = (base / f"{name}.log").open("w")
        cmd = [*argv, sys.executable, "-m", "aggregathor", *TRAIN, "--transport", name,
               "--run-dir", str(base / name), "--json-out", str(out)]
        if argv:
            cmd.insert(cmd.index("--transport"), "--launcher")
            cmd.insert(cmd.index("--transport"), "mpi")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)
        log.close()
        runs[name] = (proc, out, base / f"{name}.log")

    try:
        start("tcp", [])
        start("grpc", [])
        mpiexec = _mpiexec()
        if mpiexec is not None and _have_mpi4py():
            start("mpi", [str(mpiexec), "-n", "4"])
        yield runs
    finally:
        for proc, _, _ in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _finished(runs: dict, name: str) -> dict:
    proc, out, log = runs[name]
    try:
        proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the {name} run did not finish in time:\n{log.read_text()[-4000:]}")
    assert proc.returncode == 0, f"the {name} run failed:\n{log.read_text()[-4000:]}"
    summary = json.loads(out.read_text())
    assert summary["steps"] == 30
    assert summary["config"]["transport"] == name
    assert summary["accuracy"] > 0.5, summary
    assert summary["steps_per_second"] > 0
    print(f"{name}: {summary['steps_per_second']:.1f} steps/s, accuracy {summary['accuracy']:.3f}, "
          f"{summary['lost_gradients']} lost gradients")
    return summary


@pytest.mark.parametrize("name", ["tcp", "grpc"])
def test_training_run(training_runs, name):
    summary = _finished(training_runs, name)
    assert summary["rejected_datagrams"] == 0


def test_training_run_under_mpiexec(training_runs):
    if "mpi" not in training_runs:
        pytest.skip("mpiexec or mpi4py is missing: the mpi transport runs only under mpiexec")
    summary = _finished(training_runs, "mpi")
    assert summary["lost_gradients"] == 0  # blocking collectives: every step waits for every gradient

