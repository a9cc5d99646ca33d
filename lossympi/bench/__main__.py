"""``python -m lossympi.bench`` (also ``python -m lossympi bench``): run one benchmark.

A subcommand is a module of :mod:`lossympi.bench` that defines

- ``HELP``: one line for ``--help``;
- ``add_arguments(parser)``: its options (``--json`` and ``--quiet`` are added here for every one);
- ``run(args) -> dict``: runs the benchmark and returns a JSON-serialisable result;
- ``render(result) -> str``: the readable table printed without ``--json``.

To add one (e.g. ``gather``), write ``lossympi/bench/gather.py`` and add it to :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from types import ModuleType

from lossympi.bench._common import command_line, set_quiet

#: Subcommand name -> module implementing it (imported only when chosen).
SUBCOMMANDS: dict[str, str] = {
    "p2p": "lossympi.bench.p2p",
    "gather": "lossympi.bench.gather",
}


def _load(name: str) -> ModuleType:
    return importlib.import_module(SUBCOMMANDS[name])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lossympi.bench",
        description="Benchmarks of the lossympi transport.",
    )
    sub = parser.add_subparsers(dest="bench", required=True, metavar="SUBCOMMAND")
    for name in SUBCOMMANDS:
        mod = _load(name)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        mod.add_arguments(p)
        p.add_argument("--json", action="store_true",
                       help="print one JSON object on stdout instead of a table")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    set_quiet(args.quiet)
    mod = _load(args.bench)
    result = mod.run(args)
    result["command"] = command_line(argv)
    result["argv"] = argv
    text = json.dumps(result, indent=2) if args.json else mod.render(result)
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into `head`
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
