"""How this process was launched (``mpiexec``, env:// or alone) and :func:`init`, which picks the method."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .mpi import from_mpi
from .rendezvous import from_env
from .variables import ENV_RANK, ENV_RENDEZVOUS, ENV_SECRET, ENV_WORLD_SIZE
from .world import World, local_worlds

__all__ = ["MPI_LAUNCHER_ENV", "init", "under_mpiexec"]

#: Environment variables whose presence means "launched by mpiexec" (MPICH/Hydra, Intel MPI, Open MPI).
MPI_LAUNCHER_ENV = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_RANK")


def under_mpiexec(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process was started by ``mpiexec`` (one of :data:`MPI_LAUNCHER_ENV` is set and non-empty).

    Parameters
    ----------
    environ : Mapping[str, str], optional
        Environment to read instead of ``os.environ``.

    Returns
    -------
    bool
    """
    env = os.environ if environ is None else environ
    return any(env.get(name) for name in MPI_LAUNCHER_ENV)


def init(method: str = "auto", **kw: Any) -> World:
    """Bootstrap this rank with the given method.

    Parameters
    ----------
    method : {"auto", "env", "mpi", "local"}
        ``"env"``: :func:`from_env`; ``"mpi"``: :func:`from_mpi`; ``"local"``: a world of one rank
        (``local_worlds(1, **kw)[0]``). ``"auto"``: ``"env"`` if ``LOSSYMPI_RENDEZVOUS`` is set, else
        ``"mpi"`` if the process was started by ``mpiexec`` (``PMI_RANK``, ``PMI_SIZE``,
        ``OMPI_COMM_WORLD_SIZE``, ``MPI_LOCALNRANKS`` or ``PMIX_RANK`` set), else an error.
    **kw
        Passed to the chosen function.

    Returns
    -------
    World

    Raises
    ------
    RuntimeError
        ``"auto"`` found no launcher.
    ValueError
        Unknown method.
    """
    if method == "auto":
        if os.environ.get(ENV_RENDEZVOUS):
            method = "env"
        elif under_mpiexec():
            method = "mpi"
        else:
            raise RuntimeError(
                "lossympi cannot tell how this process was launched. Either run it under MPI, e.g. "
                "'mpiexec -n 4 python train.py', or set on every process "
                f"{ENV_RANK}, {ENV_WORLD_SIZE}, {ENV_RENDEZVOUS}=<rank 0 host>:<tcp port> and "
                f"{ENV_SECRET}=<shared random string> (env:// rendezvous), or call init('local') for a "
                "single process."
            )
    if method == "env":
        return from_env(**kw)
    if method == "mpi":
        return from_mpi(**kw)
    if method == "local":
        return local_worlds(1, **kw)[0]
    raise ValueError(f"unknown bootstrap method {method!r}; expected 'auto', 'env', 'mpi' or 'local'")
