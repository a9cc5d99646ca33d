"""How the parameter server and the workers exchange a step: two interfaces, one module per backend.

A synchronous step is three exchanges, all rooted at rank 0 (the parameter server):

1. a step message (the step number, or ``stop``), reliable;
2. the parameters, from the server to every worker (lossy with ``last`` fill, or reliable);
3. every worker's gradient into row ``rank`` of the server's ``(1 + n, d)`` buffer, until the deadline.

:mod:`aggregathor.transport.base` holds the interfaces (:class:`ServerTransport` for rank 0,
:class:`WorkerTransport` for a worker, optional abilities declared as :class:`Capability`) and what every backend
shares. The backends: :mod:`~aggregathor.transport.lossympi` (default), :mod:`~aggregathor.transport.tcp`,
:mod:`~aggregathor.transport.grpc` and :mod:`~aggregathor.transport.mpi` (thin adapters over
:mod:`lossympi.baselines`, the code the gather benchmark measures), and the in-process
:mod:`~aggregathor.transport.simulated` (built by ``--launcher simulate``).
:func:`build_transport` builds this rank's side of any backend that runs over a bootstrapped world.
"""

from aggregathor.transport.base import (
    HUGE_NORM_FACTOR,
    META_LIMIT,
    Capability,
    FaultCounters,
    GatherReport,
    ParamsReport,
    ProtocolEvents,
    ServerGone,
    ServerTransport,
    WorkerTransport,
    decode_meta,
    encode_meta,
    row_health,
)
from aggregathor.transport.factory import build_transport, lossympi_comm
from aggregathor.transport.lossympi import LossympiServer, LossympiWorker

__all__ = ["Capability", "FaultCounters", "GatherReport", "HUGE_NORM_FACTOR", "LossympiServer", "LossympiWorker",
           "META_LIMIT", "ParamsReport", "ProtocolEvents", "ServerGone", "ServerTransport", "WorkerTransport",
           "build_transport", "decode_meta", "encode_meta", "lossympi_comm", "row_health"]
