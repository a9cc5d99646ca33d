"""``python -m aggregathor`` / ``aggregathor``: train, plot, info."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from typing import Any

from aggregathor.config import TrainConfig

#: What each TrainConfig field means, for ``aggregathor train --help`` (the default is appended).
FLAG_HELP = {
    "experiment": "model + data set: digits, mnist, fashion-mnist, cifar10, resnet50, synthetic",
    "gar": "aggregation rule (aggregathor.gars): average, median, multi-krum, bulyan, krum, trimmed-mean, ...",
    "workers": "number of workers n (ranks 1..n; rank 0 is the parameter server)",
    "f": "declared bound on Byzantine workers, given to the rule",
    "byzantine": "how many workers really attack (the last ranks)",
    "attack": "what the Byzantine workers do (aggregathor.attacks): reverse, alie, ipm, nan, label-flip, ...",
    "steps": "training steps",
    "batch_size": "mini-batch per worker and step",
    "optimizer": "sgd, momentum or adam",
    "lr": "learning rate",
    "momentum": "momentum of --optimizer momentum",
    "schedule": "learning-rate schedule: constant, cosine or step",
    "transport": "lossympi (UDP, lossy), tcp, grpc or mpi (reliable baselines)",
    "loss": "emulated datagram loss: lossympi's fault injector drops this fraction of every rank's datagrams",
    "fill": "value of lost gradient chunks: zero, random, nan or last",
    "params": "parameters to the workers: lossy (datagrams, 'last' fill) or reliable (TCP control channel)",
    "deadline": "seconds a step waits at most for the gradients (adaptive below this cap)",
    "seed": "seed of the model, the data partition, the batches and the attacks",
    "partition": "data partition across workers: iid or dirichlet",
    "alpha": "concentration of --partition dirichlet (smaller: less IID)",
    "eval_every": "evaluate on the test set every this many steps",
    "checkpoint_every": "checkpoint every this many steps (0: only at the end); --resume continues from the last",
    "run_dir": "directory of the run (config.json, checkpoints, TensorBoard, eval.jsonl, steps.jsonl); it must not "
               "hold a run yet, unless --resume (default: a fresh runs/<UTC time>-<experiment>-<gar>)",
    "resume": "continue the run in --run-dir from its last checkpoint; refused when a setting differs from the "
              "stored run's (--steps may be raised; --launcher, --eval-every, --checkpoint-every, --step-log, "
              "--json-out may change)",
    "launcher": "local (processes on loopback), mpi (under mpiexec) or simulate (one process)",
    "json_out": "write the run's JSON summary here",
    "step_log": "write one JSON line per step to RUN_DIR/steps.jsonl",
}


def _train_parser(sub: Any) -> None:
    tr = sub.add_parser("train", help="train with a trusted parameter server and n workers, f of them Byzantine")
    defaults = TrainConfig()
    tr.add_argument("--config", help="TOML file of settings (flags given here override it)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("gar_options", "attack_options"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name == "resume":
            tr.add_argument(flag, action="store_true", default=None, help=FLAG_HELP[f.name])
            continue
        if isinstance(default, bool):  # --step-log / --no-step-log (type=bool would read "false" as True)
            tr.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                            help=f"{FLAG_HELP.get(f.name, '')} (default: {default})")
            continue
        kind = type(default) if default is not None else str
        shown = "" if default is None else f" (default: {default})"  # a None default is described in the text
        tr.add_argument(flag, type=kind, default=None, help=FLAG_HELP.get(f.name, "") + shown)
    tr.add_argument("--gar-option", action="append", default=[], metavar="KEY=VALUE",
                    help="extra argument of the rule, e.g. m=5 (JSON values)")
    tr.add_argument("--attack-option", action="append", default=[], metavar="KEY=VALUE",
                    help="extra argument of the attack, e.g. z=1.5 (JSON values)")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.add_argument("--verbose", action="store_true",
                    help="show TensorFlow's start-up banners (of this process and of every rank)")
    tr.add_argument("--compare", action="store_true",
                    help="also train 'average' under the same attack (its own fresh directory, or RUN_DIR-average) "
                         "and print both in a table")


def _options(items: list[str], flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _config(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if args.gar_option:
        given["gar_options"] = _options(args.gar_option, "--gar-option")
    if args.attack_option:
        given["attack_options"] = _options(args.attack_option, "--attack-option")
    if args.config:
        return TrainConfig.from_toml(args.config, **given)
    return TrainConfig.from_dict(given)


def _train(args: argparse.Namespace) -> int:
    from aggregathor import banners, report
    from aggregathor.config import ConfigError
    from aggregathor.launch import launch

    if args.verbose:
        banners.replay()
    try:
        cfg = _config(args)
        if args.compare and cfg.resume:
            raise ConfigError("--compare trains two fresh runs; it cannot --resume (resume each run on its own)")
        summary = launch(cfg, progress=not args.quiet, verbose=args.verbose)
        if summary is None:  # a worker rank under mpiexec: the server reports
            return 0
        runs = [summary]
        if args.compare and cfg.gar != "average":
            base = dataclasses.replace(cfg, gar="average", gar_options={},
                                       run_dir=cfg.run_dir and cfg.run_dir.rstrip("/") + "-average",
                                       json_out=(cfg.json_out + ".average.json") if cfg.json_out else None)
            runs.append(launch(base, progress=not args.quiet, verbose=args.verbose))  # type: ignore[arg-type]
    except ConfigError as exc:
        print(f"aggregathor train: {exc}", file=sys.stderr)
        return 2
    for run in runs:
        print("\n".join(report.final_lines(run)))
    if len(runs) > 1:
        print(f"with {cfg.byzantine} Byzantine worker(s) running '{cfg.attack}':")
        print("\n".join(report.compare_table(runs)))
        print("compare the curves: aggregathor plot " + " ".join(shlex.quote(str(r.config["run_dir"])) for r in runs))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aggregathor", description="Byzantine-resilient SGD on TensorFlow 2")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _train_parser(sub)
    pl = sub.add_parser("plot", help="PNGs comparing runs: accuracy against time and against step")
    pl.add_argument("runs", nargs="+", help="run directories (each with eval.jsonl)")
    pl.add_argument("--out", default="plots", help="output folder")
    inf = sub.add_parser("info", help="versions and the TensorFlow devices the aggregation rules can use")
    inf.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.cmd == "train":
        return _train(args)
    if args.cmd == "plot":
        from aggregathor.plot import plot_runs

        for path in plot_runs(args.runs, args.out):
            print(path)
        return 0
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
