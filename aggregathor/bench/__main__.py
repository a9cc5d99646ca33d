"""``python -m aggregathor.bench``: run one benchmark of aggregathor.

A subcommand is a module of :mod:`aggregathor.bench` that defines

- ``HELP``: one line for ``--help``;
- ``add_arguments(parser)``: its options (``--json`` and ``--quiet`` are added here for every one);
- ``check_arguments(args)``: optional; raises ``ValueError`` with a readable message for bad values (reported
  as a usage error, exit status 2, before anything runs);
- ``run(args) -> dict``: runs the benchmark and returns a JSON-serialisable result;
- ``render(result) -> str``: the readable table printed without ``--json``.

The exit status is 0, or 1 when the result lists ``failed`` measurements (the output is printed anyway), or
2 for bad flags.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
from collections.abc import Sequence
from types import ModuleType

# TensorFlow's C++ start-up chatter would bury the progress messages; an explicit setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from lossympi.bench._common import set_quiet  # noqa: E402

#: Subcommand name -> module implementing it (imported only when chosen).
SUBCOMMANDS: dict[str, str] = {
    "gars": "aggregathor.bench.gars",
}


def _load(name: str) -> ModuleType:
    return importlib.import_module(SUBCOMMANDS[name])


def command_line(argv: Sequence[str]) -> str:
    """The shell command that reproduces a run of ``python -m aggregathor.bench`` with ``argv``."""
    return " ".join(["python", "-m", "aggregathor.bench", *(shlex.quote(a) for a in argv)])


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="python -m aggregathor.bench",
        description="Benchmarks of aggregathor.",
    )
    sub = parser.add_subparsers(dest="bench", required=True, metavar="SUBCOMMAND")
    parsers: dict[str, argparse.ArgumentParser] = {}
    for name in SUBCOMMANDS:
        mod = _load(name)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        mod.add_arguments(p)
        p.add_argument("--json", action="store_true",
                       help="print one JSON object on stdout instead of a table")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
        parsers[name] = p
    return parser, parsers


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, parsers = build_parser()
    args = parser.parse_args(argv)
    set_quiet(args.quiet)
    mod = _load(args.bench)
    check = getattr(mod, "check_arguments", None)
    if check is not None:
        try:
            check(args)
        except ValueError as exc:
            parsers[args.bench].error(str(exc))  # exits with status 2
    result = mod.run(args)
    result["command"] = command_line(argv)
    result["argv"] = argv
    text = json.dumps(result, indent=2) if args.json else mod.render(result)
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into `head`
        return 1
    return 1 if result.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
