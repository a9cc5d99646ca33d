"""lossympi: lossy, deadline-bounded, authenticated UDP collectives for numpy arrays.

A message is sent as UDP datagrams; the receiver waits until a deadline, fills the chunks that never came
(random values by default, as in AggregaThor's LossyMPI; also zero, NaN, the last value, or a callable)
and reports exactly what was lost. This package never imports TensorFlow or aggregathor (a contract that
``lint-imports`` checks), and ``pip install .`` installs it alone; MPI bootstrap needs the ``[mpi]`` extra.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
