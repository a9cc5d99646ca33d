"""Starting a training run: local processes, MPI, or an in-process simulation.

- ``local`` (default): this process starts the server and the workers as ``1 + n`` processes on loopback;
  they meet through lossympi's env:// rendezvous with a fresh random secret.
- ``mpi``: every process of ``mpiexec -n N+1 aggregathor train --launcher mpi ...`` is one rank; lossympi
  bootstraps (addresses and X25519 keys) over MPI, then the step traffic flows over lossympi.
- ``simulate``: one process computes every worker's gradient in turn and emulates the transport's losses
  with lossympi's fault injector (same chunking and fill as the wire), for fast research sweeps.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

from aggregathor.config import TrainConfig
from aggregathor.runtime import RunSummary

__all__ = ["launch", "run_rank"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(cfg: TrainConfig, *, progress: bool = True) -> RunSummary | None:
    """Run ``cfg`` with its launcher and return the server's summary (None on a worker rank under MPI)."""
    cfg.validate()
    if cfg.launcher == "simulate":
        from aggregathor.simulate import simulate

        return simulate(cfg, progress=progress)
    if cfg.launcher == "mpi":
        return run_rank(cfg, method="mpi", progress=progress)
    return _launch_local(cfg, progress=progress)


def _launch_local(cfg: TrainConfig, *, progress: bool) -> RunSummary:
    size = cfg.workers + 1
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary_path = Path(cfg.json_out) if cfg.json_out else run_dir / "summary.json"
    cfg_rank = TrainConfig.from_dict({**cfg.to_dict(), "json_out": str(summary_path), "launcher": "local"})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOSSYMPI_", "PMI", "OMPI_"))}
    env.update(LOSSYMPI_WORLD_SIZE=str(size), LOSSYMPI_RENDEZVOUS=f"127.0.0.1:{_free_port()}",
               LOSSYMPI_SECRET=secrets.token_hex(16), TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS="1",
               TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1")
    config_json = json.dumps(cfg_rank.to_dict())
    procs: list[subprocess.Popen] = []
    logs = run_dir / "logs"
    logs.mkdir(exist_ok=True)
    try:
        for rank in range(size):
            out = None if (rank == 0 and progress) else (logs / f"rank{rank}.log").open("w")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "aggregathor._rank", config_json, "" if progress else "--quiet"],
                env=env | {"LOSSYMPI_RANK": str(rank), "TF_NUM_INTRAOP_THREADS": "2" if rank == 0 else "1"},
                stdout=out, stderr=subprocess.STDOUT if out else None))
        rc = procs[0].wait()
        deadline = time.monotonic() + 30
        for p in procs[1:]:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
        if rc != 0:
            raise RuntimeError(f"the parameter server exited with status {rc}; see {logs}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    data = json.loads(summary_path.read_text())
    return RunSummary(**data)


def run_rank(cfg: TrainConfig, *, method: str = "env", progress: bool = True) -> RunSummary | None:
    """Run one rank: bootstrap lossympi, then the server's loop on rank 0 or a worker's elsewhere."""
    from aggregathor.runtime import configure_logging, run_server, run_worker
    from aggregathor.transport import LossympiTransport
    from lossympi.bootstrap import from_env, from_mpi
    from lossympi.comm import Comm
    from lossympi.endpoint import new_event_loop
    from lossympi.faults import FaultInjector, FaultSpec

    configure_logging()
    if cfg.transport == "mpi" and method != "mpi":
        raise SystemExit("--transport mpi needs ranks started by mpiexec: run "
                         "'mpiexec -n N+1 python -m aggregathor train --launcher mpi --transport mpi ...'")
    world = from_mpi() if method == "mpi" else from_env()
    if world.size != cfg.workers + 1:
        raise SystemExit(f"the world has {world.size} ranks but --workers {cfg.workers} needs {cfg.workers + 1}")
    from aggregathor import gars

    rule = gars.get(cfg.gar, cfg.workers, cfg.f, **cfg.gar_options)
    lost_row_fill = float("nan") if rule.nan_robust else 0.0
    if cfg.transport == "lossympi":
        comm = Comm.from_world(world, fill=cfg.fill)
        comm.control.max_bytes = max(comm.control.max_bytes, 64 << 20)
        if cfg.loss:
            comm.endpoint.faults = FaultInjector(FaultSpec(drop=cfg.loss), seed=cfg.seed * 7919 + world.rank)
        transport = LossympiTransport(comm, params_mode=cfg.params, fill=cfg.fill, lost_row_fill=lost_row_fill)
    else:  # the reliable baselines (aggregathor.transports): tcp, grpc, mpi
        from aggregathor.transports import build_transport

        transport = build_transport(cfg.transport, world, mpi=method == "mpi", lost_row_fill=lost_row_fill)
    loop = new_event_loop()
    try:
        if world.rank == 0:
            return loop.run_until_complete(run_server(cfg, transport, progress=progress))
        loop.run_until_complete(run_worker(cfg, transport))
        return None
    finally:
        transport.close()
        world.close()
        loop.close()


def summary_line(summary: RunSummary) -> str:
    return (f"accuracy {summary.accuracy:.4f} after {summary.steps} steps in {summary.wall_seconds:.1f} s "
            f"({summary.steps_per_second:.1f} steps/s); lost {100 * summary.lost_chunk_fraction:.2f}% of gradient "
            f"chunks, {summary.lost_gradients} whole gradients")


def main_rank(argv: list[str]) -> int:
    """Entry of one locally launched rank: ``python -m aggregathor._rank CONFIG_JSON [--quiet]``."""
    cfg = TrainConfig.from_dict(json.loads(argv[0]))
    run_rank(cfg, method="env", progress="--quiet" not in argv[1:])
    return 0
