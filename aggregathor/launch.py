"""Starting a training run: local processes, MPI, or an in-process simulation.

- ``local`` (default): this process starts the server and the workers as ``1 + n`` processes on loopback;
  they meet through lossympi's env:// rendezvous with a fresh random secret (:class:`LocalJob`).
- ``mpi``: every process of ``mpiexec -n N+1 aggregathor train --launcher mpi ...`` is one rank; lossympi
  bootstraps (addresses and X25519 keys) over MPI, then the step traffic flows over lossympi.
- ``simulate``: one process computes every worker's gradient in turn and emulates the transport's losses
  with lossympi's fault injector (same chunking and fill as the wire), for fast research sweeps.

Crash faults (lossympi transport): a worker that dies is missing, its gradient lost, and training goes on; the
same worker restarted with the same command and environment (:meth:`LocalJob.start`) rejoins through the
rendezvous that rank 0 keeps open (:class:`lossympi.bootstrap.RejoinService`) and takes part from the next step.
When the server dies, the workers exit with status :data:`EXIT_SERVER_GONE`; running the same job again with
``--run-dir DIR --resume`` resumes from the last checkpoint (:mod:`aggregathor.checkpoint`), losing only the steps
since.

The run directory is decided once per job, before any rank starts, by :func:`aggregathor.rundir.prepare` (a fresh
one by default; an existing run only with ``--resume``): in this process for ``local`` and ``simulate``, on rank 0
for ``mpi`` (which sends it to the other ranks).

Ranks do not print TensorFlow's start-up banners (:mod:`aggregathor.banners`) unless ``verbose``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from aggregathor import rundir
from aggregathor.config import ConfigError, TrainConfig
from aggregathor.summary import RunSummary
from aggregathor.transport import Capability, ServerGone, ServerTransport, WorkerTransport, build_transport

__all__ = ["EXIT_SERVER_GONE", "LocalJob", "configure_logging", "launch", "run_rank"]

#: Exit status of a worker whose server closed the control channel (it exited or crashed).
EXIT_SERVER_GONE = 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def configure_logging() -> None:
    """Log at ``$AGGREGATHOR_LOG`` (default WARNING), each line naming the process."""
    logging.basicConfig(level=os.environ.get("AGGREGATHOR_LOG", "WARNING"),
                        format="%(asctime)s %(name)s rank=%(process)d %(levelname)s %(message)s")


def launch(cfg: TrainConfig, *, progress: bool = True, verbose: bool = False) -> RunSummary | None:
    """Run ``cfg`` with its launcher and return the server's summary (None on a worker rank under MPI).

    The run directory is decided first (:func:`aggregathor.rundir.prepare`; printed as ``run directory: DIR``);
    the summary's ``config["run_dir"]`` names it. ``cfg`` itself is not changed. ``verbose``: the local ranks
    print TensorFlow's start-up banners. Raises ConfigError for a run directory that cannot be used.
    """
    cfg.validate()
    if cfg.launcher == "mpi":
        return run_rank(_decide_under_mpi(cfg), method="mpi", progress=progress)
    cfg = _decide(cfg)
    if cfg.launcher == "simulate":
        from aggregathor.simulate import simulate

        return simulate(cfg, progress=progress)
    return _launch_local(cfg, progress=progress, verbose=verbose)


def _decide(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its run directory decided and created (this process decides), announced on stdout."""
    path = rundir.prepare(cfg)
    print(f"run directory: {path}", flush=True)
    return dataclasses.replace(cfg, run_dir=str(path)).validate()


def _decide_under_mpi(cfg: TrainConfig) -> TrainConfig:
    """Rank 0 decides the run directory and sends it to every rank (the others create nothing); a refusal stops
    every rank: rank 0 raises the ConfigError, the others exit with status 2."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    answer: tuple[str, str] | None = None
    if comm.Get_rank() == 0:
        try:
            answer = ("ok", str(_decide(cfg).run_dir))
        except ConfigError as exc:
            answer = ("error", str(exc))
    kind, text = comm.bcast(answer, root=0)
    if kind == "error":
        if comm.Get_rank() == 0:
            raise ConfigError(text)
        raise SystemExit(2)
    return dataclasses.replace(cfg, run_dir=text).validate()


class LocalJob:
    """The ``1 + n`` processes of a local run on loopback, each ``python -m aggregathor._rank CONFIG``.

    Every rank gets the same ``env://`` settings (a fresh random ``LOSSYMPI_SECRET`` and rendezvous port) and its
    own ``LOSSYMPI_RANK``; :meth:`start` (re)starts one rank with exactly that command and environment, which is
    how a crashed worker is restarted: it rejoins the running server through the rendezvous. Rank ``r`` writes
    to ``<run_dir>/logs/rank<r>.log`` (appended to on a restart), except rank 0 with ``progress``.

    Parameters
    ----------
    cfg : TrainConfig
        The run; its ``run_dir`` is decided already (:func:`aggregathor.rundir.prepare`). A server restarted on a
        run directory with checkpoints continues only with ``cfg.resume`` (a restarted job is an explicit resume).
    progress : bool
        Rank 0 draws its progress bar on this process's terminal.
    verbose : bool
        The ranks print TensorFlow's start-up banners (``AGGREGATHOR_VERBOSE=1``).
    """

    def __init__(self, cfg: TrainConfig, *, progress: bool = False, verbose: bool = False) -> None:
        if cfg.run_dir is None:
            raise ValueError("LocalJob needs a decided run directory: cfg.run_dir is None (see aggregathor.rundir)")
        self.size = cfg.workers + 1
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.summary_path = Path(cfg.json_out) if cfg.json_out else self.run_dir / "summary.json"
        cfg_rank = TrainConfig.from_dict({**cfg.to_dict(), "json_out": str(self.summary_path), "launcher": "local"})
        self.config_json = json.dumps(cfg_rank.to_dict())
        self.progress = progress
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LOSSYMPI_", "PMI", "OMPI_"))}
        env.update(LOSSYMPI_WORLD_SIZE=str(self.size), LOSSYMPI_RENDEZVOUS=f"127.0.0.1:{_free_port()}",
                   LOSSYMPI_SECRET=secrets.token_hex(16), TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS="1",
                   TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1")
        if verbose:
            env["AGGREGATHOR_VERBOSE"] = "1"
        else:
            env.pop("AGGREGATHOR_VERBOSE", None)
        self.env = env
        self.logs = self.run_dir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.procs: dict[int, subprocess.Popen] = {}
        self._started: set[int] = set()

    def command(self) -> list[str]:
        """The command line of every rank."""
        return [sys.executable, "-m", "aggregathor._rank", self.config_json, "" if self.progress else "--quiet"]

    def rank_env(self, rank: int) -> dict[str, str]:
        """The environment of ``rank``."""
        return self.env | {"LOSSYMPI_RANK": str(rank), "TF_NUM_INTRAOP_THREADS": "2" if rank == 0 else "1"}

    def start(self, rank: int) -> subprocess.Popen:
        """Start (or restart) ``rank``; a rank still running is refused (kill it first)."""
        old = self.procs.get(rank)
        if old is not None and old.poll() is None:
            raise RuntimeError(f"rank {rank} is still running (pid {old.pid}); kill it before restarting it")
        out = None
        if not (rank == 0 and self.progress):
            out = (self.logs / f"rank{rank}.log").open("a" if rank in self._started else "w")
        try:
            proc = subprocess.Popen(self.command(), env=self.rank_env(rank), stdout=out,
                                    stderr=subprocess.STDOUT if out else None, stdin=subprocess.DEVNULL)
        finally:
            if out is not None:
                out.close()  # the child holds its own descriptor
        self._started.add(rank)
        self.procs[rank] = proc
        return proc

    def start_all(self) -> None:
        for rank in range(self.size):
            self.start(rank)

    def wait(self, grace: float = 30.0) -> RunSummary:
        """Wait for the server, give the workers ``grace`` seconds to stop, return the server's summary."""
        rc = self.procs[0].wait()
        deadline = time.monotonic() + grace
        for rank in range(1, self.size):
            p = self.procs.get(rank)
            if p is None:
                continue
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if rc != 0:
            raise RuntimeError(f"the parameter server exited with status {rc}; see {self.logs}")
        return RunSummary(**json.loads(self.summary_path.read_text()))

    def close(self) -> None:
        """Kill whatever still runs."""
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def _launch_local(cfg: TrainConfig, *, progress: bool, verbose: bool) -> RunSummary:
    job = LocalJob(cfg, progress=progress, verbose=verbose)
    try:
        job.start_all()
        return job.wait()
    finally:
        job.close()


def run_rank(cfg: TrainConfig, *, method: str = "env", progress: bool = True,
             build: Callable[..., ServerTransport | WorkerTransport] = build_transport) -> RunSummary | None:
    """Run one rank: bootstrap lossympi, then the server's loop on rank 0 or a worker's elsewhere.

    ``build(cfg, world, mpi=...)`` makes this rank's side of the transport (default
    :func:`aggregathor.transport.build_transport`; a test may pass one that builds a misbehaving worker).
    """
    from aggregathor.server import run_server
    from aggregathor.worker import run_worker
    from lossympi.bootstrap import from_env, from_mpi
    from lossympi.endpoint import new_event_loop

    configure_logging()
    # rank 0 keeps the rendezvous open, so that a restarted worker can rejoin (lossympi transport)
    world = from_mpi() if method == "mpi" else from_env(rejoin=cfg.transport == "lossympi")
    if world.size != cfg.workers + 1:
        raise SystemExit(f"the world has {world.size} ranks but --workers {cfg.workers} needs {cfg.workers + 1}")
    transport = build(cfg, world, mpi=method == "mpi")
    loop = new_event_loop()
    try:
        if world.rank == 0:
            if Capability.REJOIN in transport.capabilities:
                transport.enable_rejoin(loop)  # type: ignore[union-attr]
            return loop.run_until_complete(run_server(cfg, transport, progress=progress))  # type: ignore[arg-type]
        try:
            loop.run_until_complete(run_worker(cfg, transport))  # type: ignore[arg-type]
        except ServerGone as exc:
            print(f"aggregathor worker {world.rank}: {exc}. This worker stops (exit status {EXIT_SERVER_GONE}); "
                  "restart the whole job with --resume to continue from the last checkpoint.",
                  file=sys.stderr, flush=True)
            raise SystemExit(EXIT_SERVER_GONE) from None
        return None
    finally:
        transport.close()
        world.close()
        loop.close()


def main_rank(argv: list[str]) -> int:
    """Entry of one locally launched rank: ``python -m aggregathor._rank CONFIG_JSON [--quiet]``."""
    cfg = TrainConfig.from_dict(json.loads(argv[0]))
    run_rank(cfg, method="env", progress="--quiet" not in argv[1:])
    return 0
