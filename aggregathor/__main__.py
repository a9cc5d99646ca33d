"""``python -m aggregathor`` / ``aggregathor``: command-line entry point."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aggregathor", description="Byzantine-resilient SGD on TensorFlow 2")
    sub = parser.add_subparsers(dest="cmd", required=True)
    inf = sub.add_parser("info", help="versions and the TensorFlow devices the aggregation rules can use")
    inf.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import aggregathor
    import lossympi

    report = {
        "aggregathor": aggregathor.__version__,
        "lossympi": lossympi.__version__,
        "tensorflow": aggregathor.tf.__version__,
        "devices": aggregathor.devices(),
        "default_device": aggregathor.default_device(),
    }
    print(json.dumps(report) if args.json else "\n".join(f"{k}: {v}" for k, v in report.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
