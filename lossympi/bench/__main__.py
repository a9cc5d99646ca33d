"""``python -m lossympi.bench`` (also ``python -m lossympi bench``): run one benchmark.

A subcommand is a module of :mod:`lossympi.bench` with ``HELP``, ``add_arguments``, ``run`` and ``render`` (see
:func:`lossympi.bench.common.run_cli`). To add one, write ``lossympi/bench/<name>.py`` and add it to
:data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import sys

from lossympi.bench.common import run_cli

#: Subcommand name -> module implementing it.
SUBCOMMANDS: dict[str, str] = {
    "p2p": "lossympi.bench.p2p",
    "gather": "lossympi.bench.gather",
    "mac": "lossympi.bench.mac",
}


def main(argv: list[str] | None = None) -> int:
    return run_cli("lossympi.bench", "Benchmarks of the lossympi transport.", SUBCOMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
