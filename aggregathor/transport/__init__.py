"""How the parameter server and the workers exchange a step: one interface, several backends.

A synchronous step is three exchanges, all rooted at rank 0 (the parameter server):

1. a step message (the step number, or ``stop``), reliable;
2. the parameters, from the server to every worker (lossy with ``last`` fill, or reliable);
3. every worker's gradient into row ``rank`` of the server's ``(1 + n, d)`` buffer, until the deadline.

:mod:`aggregathor.transport.base` holds the interfaces (:class:`ServerTransport`, :class:`WorkerTransport`) and
what every backend shares; one module per backend implements them.
"""

from aggregathor.transport.base import (
    HUGE_NORM_FACTOR,
    META_LIMIT,
    Capability,
    FaultCounters,
    GatherReport,
    ProtocolEvents,
    ServerGone,
    ServerTransport,
    StepTransport,
    WorkerTransport,
    decode_meta,
    encode_meta,
    row_health,
)
from aggregathor.transport.lossympi import LossympiTransport

__all__ = ["Capability", "FaultCounters", "GatherReport", "HUGE_NORM_FACTOR", "LossympiTransport", "META_LIMIT",
           "ProtocolEvents", "ServerGone", "ServerTransport", "StepTransport", "WorkerTransport", "decode_meta",
           "encode_meta", "row_health"]
