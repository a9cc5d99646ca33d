"""Average a vector over every rank with lossympi's lossy, deadline-bound Allreduce.

lossympi is used alone here: MPI (or the env:// rendezvous) only tells the ranks where the others are and
how to authenticate them; the vectors travel as authenticated UDP datagrams. Run it with MPI::

    mpiexec -n 4 python examples/lossy_allreduce.py --loss 0.05

or without MPI (``pip install .`` alone, no ``[mpi]`` extra), one process per rank, configured by the
``LOSSYMPI_*`` variables::

    export LOSSYMPI_WORLD_SIZE=2 LOSSYMPI_RENDEZVOUS=127.0.0.1:29500 LOSSYMPI_SECRET=change-me
    LOSSYMPI_RANK=0 python examples/lossy_allreduce.py & LOSSYMPI_RANK=1 python examples/lossy_allreduce.py

Rank 0 prints, for every round, the fraction of the result that reached it, the error against the exact
mean and the time the Allreduce took. With ``--loss P`` every rank drops a fraction P of the datagrams it
sends: what is lost is estimated from what arrived, so the mean is approximate but always on time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import lossympi.bootstrap
from lossympi.comm import Comm
from lossympi.faults import FaultInjector, FaultSpec


def vector(rank: int, rnd: int, n: int) -> np.ndarray:
    """The vector of ``rank`` in round ``rnd``: seeded, so rank 0 can rebuild everyone's to check the mean."""
    return np.random.default_rng([rank, rnd]).standard_normal(n, dtype=np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=1_000_000, help="length of each rank's vector")
    parser.add_argument("--rounds", type=int, default=5, help="number of Allreduce rounds")
    parser.add_argument("--loss", type=float, default=0.0, help="fraction of its datagrams each rank drops")
    parser.add_argument("--timeout", type=float, default=0.5, help="deadline of one Allreduce, in seconds")
    args = parser.parse_args()

    # Addresses and pair keys of every rank: from MPI under mpiexec, else from the LOSSYMPI_* variables.
    world = lossympi.bootstrap.init()
    # Simulated packet loss on what this rank sends (seeded, so runs are reproducible).
    faults = FaultInjector(FaultSpec(drop=args.loss), seed=world.rank) if args.loss else None
    with world, Comm.from_world(world, faults=faults) as comm:
        out = np.empty(args.elements, np.float32)  # allocated once, reused by every round
        for rnd in range(args.rounds):
            x = vector(comm.rank, rnd, args.elements)
            comm.Barrier()  # reliable: start together, so the deadline times the transfer, not a late rank
            t0 = time.perf_counter()
            res = comm.Allreduce(x, out, op="mean", timeout=args.timeout)
            elapsed = time.perf_counter() - t0
            if comm.rank == 0:
                exact = sum(vector(r, rnd, args.elements).astype(np.float64) for r in range(comm.size)) / comm.size
                err = np.abs(out - exact)
                print(f"round {rnd}: delivered {res.delivered:.3f}  max error {err.max():.2e}  "
                      f"mean error {err.mean():.2e}  time {elapsed * 1e3:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
