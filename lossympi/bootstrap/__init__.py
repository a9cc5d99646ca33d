"""Bootstrap of a lossympi world: UDP addresses of every rank and the pair MAC keys.

Three ways to build a :class:`World` (see ``docs/bootstrap.md``):

- :func:`from_mpi`: under ``mpiexec``; ranks exchange ``(host, port, X25519 public key)`` with one
  ``allgather`` on an MPI communicator (``mpi4py`` is imported only here).
- :func:`from_env`: ``torch.distributed`` ``env://`` style. Rank 0 runs a small TCP rendezvous on
  ``LOSSYMPI_RENDEZVOUS``; every rank authenticates with the shared job secret ``LOSSYMPI_SECRET``. With
  ``rejoin=True`` rank 0 keeps it open (:class:`RejoinService`): a crashed rank restarted with the same
  environment runs a fresh, authenticated X25519 exchange with rank 0 and gets the current table.
- :func:`local_worlds`: every rank in this process, for tests and single-process runs.

In every case each rank draws an ephemeral X25519 key pair and the key of the pair ``(i, j)`` is derived
from the Diffie-Hellman secret of ``i`` and ``j`` (:func:`lossympi.keys.derive_pair_keys`), so no third rank
can compute it. :func:`init` picks the method from the environment (:func:`under_mpiexec` tells whether
``mpiexec`` started this process).

One module per job: :mod:`.world` (the :class:`World`, :func:`local_worlds`), :mod:`.addresses` (IPv4 and
port helpers, :func:`bind_udp`, :func:`bind_udp_and_control`), :mod:`.mpi` (:func:`from_mpi`), :mod:`.variables`
and :mod:`.env` (the ``LOSSYMPI_*`` variables and their parsing), :mod:`.framing` and :mod:`.messages` (the
rendezvous wire format), :mod:`.server` (rank 0's rendezvous), :mod:`.rejoin` (:class:`RejoinService`),
:mod:`.client` (the other ranks' side), :mod:`.rendezvous` (:func:`from_env`), :mod:`.launcher` (:func:`init`,
:func:`under_mpiexec`), :mod:`.errors`.

This package never imports TensorFlow, and imports ``mpi4py`` only in :func:`from_mpi`.
"""

from __future__ import annotations

from .addresses import bind_udp, bind_udp_and_control
from .errors import RendezvousAuthError, RendezvousError
from .launcher import MPI_LAUNCHER_ENV, init, under_mpiexec
from .messages import MAX_HELLO_BYTES, NONCE_BYTES, RENDEZVOUS_VERSION
from .mpi import from_mpi
from .rejoin import RejoinService
from .rendezvous import from_env
from .variables import ENV_HOST, ENV_PORT_RANGE, ENV_RANK, ENV_RENDEZVOUS, ENV_SECRET, ENV_WORLD_SIZE
from .world import World, local_worlds

__all__ = [
    "ENV_HOST",
    "ENV_PORT_RANGE",
    "ENV_RANK",
    "ENV_RENDEZVOUS",
    "ENV_SECRET",
    "ENV_WORLD_SIZE",
    "MAX_HELLO_BYTES",
    "MPI_LAUNCHER_ENV",
    "NONCE_BYTES",
    "RENDEZVOUS_VERSION",
    "RendezvousAuthError",
    "RendezvousError",
    "RejoinService",
    "World",
    "bind_udp",
    "bind_udp_and_control",
    "from_env",
    "from_mpi",
    "init",
    "local_worlds",
    "under_mpiexec",
]
