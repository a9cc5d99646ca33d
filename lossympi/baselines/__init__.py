"""The reliable baselines of the head-to-head: raw TCP, gRPC and MPI, one set of data paths.

The same code moves the bytes in ``python -m lossympi.bench gather`` and in aggregathor's training with
``--transport tcp|grpc|mpi`` (its backends are thin adapters), so the benchmark measures what trains. Each
baseline has a root end (rank 0: sends parameters, gathers one row per sender into preallocated rows with a
deadline) and a sender end:

- :mod:`lossympi.baselines.tcp` (:class:`TCPRoot`, :class:`TCPSender`): a star of authenticated TCP data
  connections, length-prefixed frames;
- :mod:`lossympi.baselines.grpc` (:class:`GrpcRoot`, :class:`GrpcSender`): a client-streamed push and a
  server-streamed pull of raw 1 MiB chunks, each stream opened under HMAC-SHA256 and each chunk tagged
  (Poly1305); needs ``grpcio``;
- :mod:`lossympi.baselines.mpi` (:class:`MPIRoot`, :class:`MPISender`): blocking ``mpi4py`` collectives, no
  deadline; needs ``mpi4py`` and ``mpiexec``.

TCP and gRPC form rank 0's star of :class:`lossympi.control.TCPControl` links (``.control``) from a bootstrapped
:class:`lossympi.bootstrap.World`, and derive their data keys from its pair keys. Only bytes move: nothing
received is unpickled or executed, and the size, dtype and round of every frame are checked before a byte
reaches a row. grpcio and mpi4py are imported only when their baseline is built.
"""

from lossympi.baselines.frames import HEADER, KIND_GRAD, KIND_PARAMS, MAGIC, BaselineError, Gathered
from lossympi.baselines.grpc import GrpcRoot, GrpcSender
from lossympi.baselines.mpi import MPIRoot, MPISender
from lossympi.baselines.tcp import TCPRoot, TCPSender

__all__ = ["HEADER", "KIND_GRAD", "KIND_PARAMS", "MAGIC", "BaselineError", "Gathered", "GrpcRoot", "GrpcSender",
           "MPIRoot", "MPISender", "TCPRoot", "TCPSender"]
