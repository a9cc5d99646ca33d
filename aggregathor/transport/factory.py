"""One factory for every backend that runs over a bootstrapped world: lossympi, tcp, grpc and mpi.

The simulated backend is not built here: it has no world (every rank is in one process) and is built by
:func:`aggregathor.simulate.simulate` (``--launcher simulate``).
"""

from __future__ import annotations

from typing import Any

from aggregathor.transport.base import ServerTransport, WorkerTransport

__all__ = ["CONTROL_MAX_BYTES", "build_transport", "lossympi_comm"]

#: The largest control-channel payload of the lossympi backend (the parameters, with ``--params reliable``).
CONTROL_MAX_BYTES = 64 << 20


def lossympi_comm(cfg: Any, world: Any) -> Any:
    """The :class:`lossympi.comm.Comm` of this rank for ``cfg``: its fill, its emulated datagram loss
    (``--loss``, seeded per rank with :func:`lossympi.faults.rank_seed`) and its control payload limit, all set
    at construction."""
    from lossympi.comm import Comm
    from lossympi.faults import FaultInjector, FaultSpec, rank_seed

    faults = FaultInjector(FaultSpec(drop=cfg.loss), seed=rank_seed(cfg.seed, world.rank)) if cfg.loss else None
    return Comm.from_world(world, fill=cfg.fill, faults=faults, control_max_bytes=CONTROL_MAX_BYTES)


def build_transport(cfg: Any, world: Any, *, mpi: bool) -> ServerTransport | WorkerTransport:
    """This rank's side of the step exchanges of ``cfg.transport``: the server side on rank 0, else a worker's.

    Parameters
    ----------
    cfg : aggregathor.config.TrainConfig
        The run (``transport``, ``params``, ``fill``, ``loss``, ``seed``, ``deadline`` and the rule, whose
        NaN-robustness sets the value of a lost gradient: ``cfg.lost_row_fill``).
    world : lossympi.bootstrap.World
        This rank's bootstrapped world; for lossympi its rendezvous (kept open on rank 0) lets restarted
        workers rejoin (:meth:`~aggregathor.transport.lossympi.LossympiServer.enable_rejoin`).
    mpi : bool
        Whether the ranks were started by ``mpiexec`` (``--launcher mpi``); ``--transport mpi`` needs it.

    Returns
    -------
    ServerTransport or WorkerTransport
    """
    server = world.rank == 0
    name = cfg.transport
    if name == "lossympi":
        from aggregathor.transport.lossympi import LossympiServer, LossympiWorker

        comm = lossympi_comm(cfg, world)
        if server:
            return LossympiServer(comm, cfg.params, cfg.fill, cfg.lost_row_fill, ready_timeout=cfg.deadline,
                                  rejoin=world.rendezvous)
        return LossympiWorker(comm, cfg.params)
    if name == "tcp":
        from aggregathor.transport.tcp import TCPServer, TCPWorker

        return TCPServer(world, lost_row_fill=cfg.lost_row_fill) if server else TCPWorker(world)
    if name == "grpc":
        from aggregathor.transport.grpc import GrpcServer, GrpcWorker

        return GrpcServer(world, lost_row_fill=cfg.lost_row_fill) if server else GrpcWorker(world)
    if name == "mpi":
        return _mpi_transport(world, mpi)
    raise ValueError(f"unknown transport {name!r}; use lossympi, tcp, grpc or mpi (the simulated backend is "
                     "--launcher simulate)")


def _mpi_transport(world: Any, mpi: bool) -> ServerTransport | WorkerTransport:
    from aggregathor.transport.mpi import MPIServer, MPIWorker
    from lossympi.baselines import BaselineError

    if not mpi:
        raise BaselineError("--transport mpi needs ranks started by mpiexec: run "
                            "'mpiexec -n N+1 python -m aggregathor train --launcher mpi --transport mpi ...'")
    t = MPIServer() if world.rank == 0 else MPIWorker()
    group = t.root if isinstance(t, MPIServer) else t.sender
    if (group.rank, group.size) != (world.rank, world.size):
        raise BaselineError(f"MPI says rank {group.rank} of {group.size}, the world rank {world.rank} of "
                            f"{world.size}")
    return t
