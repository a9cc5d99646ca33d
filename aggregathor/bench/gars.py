"""Speed of the aggregation rules: each rule against the floor ``tf.reduce_mean`` and its numpy reference.

``python -m aggregathor.bench gars`` (issue 5, item 5). For every ``(n, d)`` of ``--n`` × ``--d``:

1. **Data**, float32, generated once per ``(n, d)`` in place into one 64-byte-aligned numpy buffer that
   TensorFlow then aliases through DLPack (on the CPU no copy at all; on a GPU one copy to the device): a
   shared gradient ``g ~ N(0, 1)^d``; the ``n - f`` honest rows are ``g + noise · N(0, 1)^d`` (``--noise``,
   default 0.1), the last ``f`` rows are far away, ``g + 100 + 10 · N(0, 1)^d``.
2. **Rule**: ``aggregathor.gars.get(name, n, f).function(d, tf.float32)``, the compiled ``tf.function`` a
   caller gets, on that ``(n, d)`` tensor. ``--warmup`` calls (the first one compiles; its time is reported
   as ``compile_seconds``), then ``--repeats`` timed calls; ``seconds`` is their median.
3. **Floor**: ``tf.function(jit_compile=True)`` of ``tf.reduce_mean(x, axis=0)`` on the same tensor: one
   read of the data, the least any rule must do. Its timed calls alternate with the rule's (rule, floor,
   rule, floor, ...) so that both see the same machine; ``floor_seconds`` is their median and
   ``ratio_vs_floor = seconds / floor_seconds``.
4. **Reference**: ``aggregathor.gars.reference.REFERENCES[name](x, f, **params)`` (float64 numpy, loops
   over coordinates; the rule's own parameters) on the same float32 array, ``--reference-repeats`` times
   (default 1), median in ``reference_seconds``; ``speedup_vs_reference = reference_seconds / seconds``.
   The references can take minutes at ``d = 1e7``, so when ``d > --reference-probe-d`` the reference first
   runs once on the first ``--reference-probe-d`` columns (``reference_probe_seconds``). The full run is
   skipped when ``d > --reference-max-d`` or when the linear extrapolation of the probe exceeds
   ``--reference-budget`` seconds: ``reference_seconds`` and ``speedup_vs_reference`` are then ``null`` and
   ``reference_skipped`` says why. The probe is a measured lower bound of the full reference (which does
   the probe's work and more), so ``speedup_vs_reference_at_least = reference_probe_seconds / seconds``
   is reported instead; no extrapolated time is ever reported as a measurement. When the full reference
   ran, ``reference_max_abs_diff`` is the largest difference between the two outputs (a sanity check).

5. **Phases** of the distance-based rules (Krum, Multi-Krum, Bulyan: their ``distances``, ``select`` and
   ``combine`` methods), each compiled on its own and timed separately on the same data after the rule's
   timed calls, in ``phases`` (medians; ``sum`` is their total, which also pays two more call overheads than
   the fused rule); where the compiled distance kernel ran, ``phases.kernel`` has its own split of the
   distances phase, measured in C: ``scan_seconds`` (reading each block from memory) and ``pairs_seconds``.

Timed calls are synchronous: on the CPU eager calls return when done; on a GPU each call is followed by
``tf.test.experimental.sync_devices()``.

Output: one JSON object whose ``records`` key holds one record per (rule, n, d), in run order, with
``rule, n, f, d, dtype, device, seconds, floor_seconds, reference_seconds, ratio_vs_floor,
speedup_vs_reference``, ``phases`` (item 5, or null) and the details above; plus ``skipped`` (with
``--rules all``, the rules whose bound the ``(n, f)`` does not allow, with the reason), ``command``, ``host``,
``contention`` (the share of the CPUs other processes used during the whole run; each record also has its own,
over its timed calls),
and ``targets``: issue 5's targets, evaluated on the records at n = 20, d = 1e7 when the run has them.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from lossympi.bench.common import CpuMeter, fmt, host_info, log, table

__all__ = ["HELP", "TARGET_POINT", "TARGET_RATIO_VS_FLOOR", "TARGET_SPEEDUP", "add_arguments", "check_arguments",
           "make_data", "render", "run"]

HELP = "time of every aggregation rule vs the floor tf.reduce_mean(x, axis=0) and vs its numpy reference"

DEFAULT_N = "10,20,40"
DEFAULT_D = "100000,1000000,10000000"
#: (n, d) at which issue 5 sets the targets.
TARGET_POINT = (20, 10**7)
#: rule -> largest acceptable ``seconds / floor_seconds`` at :data:`TARGET_POINT` (2-core CPU).
TARGET_RATIO_VS_FLOOR: dict[str, float] = {"median": 1.5, "trimmed-mean": 1.5, "multi-krum": 3.0, "bulyan": 4.0}
#: every rule: smallest acceptable ``reference_seconds / seconds``.
TARGET_SPEEDUP = 10.0
BYZANTINE_SHIFT = 100.0
BYZANTINE_SCALE = 10.0
_ALIGN = 64
_MIN_CONTENTION_WINDOW_S = 0.5


# ----------------------------------------------------------------------------------------------- flags
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", default=DEFAULT_N, metavar="N,...", help="numbers of gradients (rows), comma list")
    p.add_argument("--d", default=DEFAULT_D, metavar="D,...",
                   help="gradient sizes (columns), comma list; 1e7 notation accepted")
    p.add_argument("--f", type=int, default=None,
                   help="Byzantine rows tolerated (and generated); default (n - 3) // 4 for each n, which every "
                        "rule's bound allows")
    p.add_argument("--rules", default="all", metavar="NAME,...",
                   help="rules to time, comma list of aggregathor.gars.names(), or 'all'")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per rule (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (the first compiles)")
    p.add_argument("--device", default="auto",
                   help="TensorFlow device: 'auto' (GPU:0 if TensorFlow sees a GPU, else CPU:0), 'cpu', 'gpu', "
                        "or e.g. 'GPU:1'")
    p.add_argument("--reference-repeats", type=int, default=1,
                   help="runs of the numpy reference on the full data (median reported)")
    p.add_argument("--reference-max-d", type=_size, default=10**7, metavar="D",
                   help="never run the reference on the full data above this d (the probe still runs)")
    p.add_argument("--reference-budget", type=float, default=120.0, metavar="SECONDS",
                   help="skip the full reference when the probe extrapolates (linearly in d) past this")
    p.add_argument("--reference-probe-d", type=_size, default=100_000, metavar="D",
                   help="columns of the probe run of the reference, when d is larger")
    p.add_argument("--no-reference", action="store_true", help="do not run the numpy references at all")
    p.add_argument("--noise", type=float, default=0.1, help="std of the honest rows around the shared gradient")
    p.add_argument("--seed", type=int, default=0, help="seed of the data")


def _size(text: str) -> int:
    """``"10000000"`` or ``"1e7"`` -> 10000000 (a positive integer)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer such as 1000000 or 1e6, got {text!r}") from None
    if not math.isfinite(value) or value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a positive integer such as 1000000 or 1e6, got {text!r}")
    return int(value)


def _sizes(text: str, flag: str) -> list[int]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"{flag} needs a comma-separated list of positive integers, got {text!r}")
    out = []
    for item in items:
        try:
            out.append(_size(item))
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"{flag}: {exc}") from None
    return list(dict.fromkeys(out))


def default_f(n: int) -> int:
    """``(n - 3) // 4`` (at least 0): the largest f with n >= 4f + 3, so every rule's bound holds."""
    return max(0, (n - 3) // 4)


def check_arguments(args: argparse.Namespace) -> None:
    """Parse the lists into ``args.n_list``, ``args.d_list``, ``args.rule_list``; ValueError on bad values."""
    args.n_list = _sizes(args.n, "--n")
    args.d_list = _sizes(args.d, "--d")
    for name, low in (("repeats", 1), ("warmup", 1), ("reference_repeats", 1)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if not args.reference_budget > 0:
        raise ValueError(f"--reference-budget must be > 0 seconds, got {args.reference_budget}")
    if not (math.isfinite(args.noise) and args.noise >= 0):
        raise ValueError(f"--noise must be a finite number >= 0, got {args.noise}")
    if args.f is not None:
        for n in args.n_list:
            if not 0 <= args.f < n:
                raise ValueError(f"--f must satisfy 0 <= f < n, got f={args.f} with n={n}")

    import aggregathor.gars as gars  # imports TensorFlow: after the cheap checks

    known = gars.names()
    wanted = [t.strip() for t in args.rules.split(",") if t.strip()]
    if not wanted:
        raise ValueError(f"--rules needs rule names or 'all'; known: {', '.join(known)}")
    if wanted == ["all"]:
        wanted = known
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise ValueError(f"--rules: unknown rule(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    args.rule_list = list(dict.fromkeys(wanted))
    # with --rules all, a rule whose bound (n, f) does not allow is skipped at that n (and listed in the JSON);
    # a rule asked for by name must run everywhere
    args.skipped = {}
    for n in args.n_list:
        f = default_f(n) if args.f is None else args.f
        for name in args.rule_list:
            try:
                gars.get(name, n, f)
            except ValueError as exc:
                if args.rules.strip() != "all":
                    raise ValueError(f"rule {name!r} cannot run at n={n}, f={f}: {exc}") from None
                args.skipped[f"{name} n={n} f={f}"] = " ".join(str(exc).split())
    args.device_name = resolve_device(args.device)


def resolve_device(text: str) -> str:
    """``auto``/``cpu``/``gpu``/``GPU:1``/``/device:CPU:0`` -> ``"CPU:0"`` or ``"GPU:k"``; ValueError if absent."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    spec = text.strip()
    if spec.lower() == "auto":
        return "GPU:0" if gpus else "CPU:0"
    spec = spec.split("device:")[-1].lstrip("/")
    kind, _, index = spec.partition(":")
    kind = kind.upper()
    if kind not in ("CPU", "GPU") or (index and not index.isdigit()):
        raise ValueError(f"--device must be 'auto', 'cpu', 'gpu' or KIND:INDEX such as 'GPU:1', got {text!r}")
    k = int(index or 0)
    available = tf.config.list_logical_devices(kind)
    if k >= len(available):
        seen = ", ".join(d.name for d in tf.config.list_logical_devices()) or "none"
        raise ValueError(f"--device {text!r}: TensorFlow sees no {kind}:{k} (devices: {seen})")
    return f"{kind}:{k}"


# ------------------------------------------------------------------------------------------------ data
def _aligned_empty(shape: tuple[int, int], dtype: Any = np.float32) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary (TensorFlow's alignment)."""
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dt.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    off = (-raw.ctypes.data) % _ALIGN
    return raw[off:off + nbytes].view(dt).reshape(shape)


def make_data(n: int, d: int, f: int, *, noise: float = 0.1, seed: int = 0) -> np.ndarray:
    """The ``(n, d)`` float32 benchmark matrix, written row by row in place (one d-float temporary).

    Rows ``0 .. n-f-1``: ``g + noise · N(0, 1)``; rows ``n-f .. n-1``: ``g + 100 + 10 · N(0, 1)``, with ``g`` a
    shared ``N(0, 1)`` gradient. 64-byte aligned, so that TensorFlow can alias it without a copy.
    """
    rng = np.random.default_rng([seed, n, d])
    g = rng.standard_normal(d, dtype=np.float32)
    x = _aligned_empty((n, d), np.float32)
    for i in range(n):
        row = x[i]
        rng.standard_normal(dtype=np.float32, out=row)
        if i < n - f:
            row *= np.float32(noise)
        else:
            row *= np.float32(BYZANTINE_SCALE)
            row += np.float32(BYZANTINE_SHIFT)
        row += g
    return x


def _to_tensor(x: np.ndarray, device: str) -> Any:
    """A TensorFlow tensor on ``device`` with the data of ``x``: aliased on the CPU, one copy to a GPU."""
    import tensorflow as tf

    try:
        host = tf.experimental.dlpack.from_dlpack(x.__dlpack__())
    except Exception:  # pragma: no cover - older TF without DLPack import: one copy
        host = tf.convert_to_tensor(x)
    if device.startswith("CPU"):
        return host
    with tf.device(device):
        return tf.identity(host)


# ------------------------------------------------------------------------------------------------ timing
def _floor(x: Any) -> Any:
    import tensorflow as tf

    return tf.reduce_mean(x, axis=0)


def _timer(device: str) -> Callable[[Callable[[Any], Any], Any], tuple[float, Any]]:
    import tensorflow as tf

    sync = tf.test.experimental.sync_devices if device.startswith("GPU") else (lambda: None)

    def timed(fn: Callable[[Any], Any], x: Any) -> tuple[float, Any]:
        t0 = time.perf_counter()
        y = fn(x)
        sync()
        return time.perf_counter() - t0, y

    return timed


def _reference_params(rule: Any, ref: Callable[..., Any]) -> dict[str, Any]:
    """The rule's own parameters (``get_config`` minus name/n/f) that the reference accepts."""
    cfg = {k: v for k, v in rule.get_config().items() if k not in ("name", "n", "f")}
    accepted = inspect.signature(ref).parameters
    return {k: v for k, v in cfg.items() if k in accepted}


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else float(f"{value:.{digits}g}")


def _bench_rule(name: str, rule: Any, x: Any, x_host: np.ndarray, floor_fn: Any, args: argparse.Namespace,
                device: str) -> dict[str, Any]:
    import tensorflow as tf

    n, d = x_host.shape
    timed = _timer(device)
    fn = rule.function(d, tf.float32)
    with tf.device(device):
        compile_s, out = timed(fn, x)
        for _ in range(args.warmup - 1):
            del out
            _, out = timed(fn, x)
        out_host = np.asarray(out.numpy(), dtype=np.float64) if not args.no_reference else None
        out_device = getattr(out, "device", None)
        del out
        meter = CpuMeter()
        window = time.perf_counter()
        times, floors = [], []
        for _ in range(args.repeats):
            dt, y = timed(fn, x)
            times.append(dt)
            del y
            dt, y = timed(floor_fn, x)
            floors.append(dt)
            del y
        contention = meter.stop()
        window = time.perf_counter() - window
    seconds, floor_s = _median(times), _median(floors)
    rec: dict[str, Any] = {
        "rule": name, "n": n, "f": rule.f, "d": d, "dtype": "float32", "device": device, "error": None,
        "seconds": _round(seconds), "floor_seconds": _round(floor_s), "reference_seconds": None,
        "ratio_vs_floor": _round(seconds / floor_s, 4), "speedup_vs_reference": None,
        "params": {k: v for k, v in rule.get_config().items() if k not in ("name", "n", "f")},
        "jit_compile": bool(rule.jit_compile), "output_device": out_device,
        "compile_seconds": _round(compile_s, 4),
        "times": [_round(t) for t in times], "floor_times": [_round(t) for t in floors],
        "reference_times": [], "reference_skipped": None, "reference_probe_d": None,
        "reference_probe_seconds": None, "speedup_vs_reference_at_least": None, "reference_max_abs_diff": None,
        # /proc/stat counts in 10 ms ticks: over a shorter window than this the share is noise.
        "contention": contention.get("foreign_cpu_fraction") if window >= _MIN_CONTENTION_WINDOW_S else None,
    }
    log(f"  {name:18s} {seconds * 1e3:10.2f} ms  floor {floor_s * 1e3:8.2f} ms  x{seconds / floor_s:.2f}"
        f"  (compile {compile_s:.2f} s)")
    rec["phases"] = _phase_timings(rule, x, args, device)
    _compare_with_reference(rec, rule, seconds, x_host, out_host, args)
    return rec


PHASES = ("distances", "selection", "combination")


def _phase_timings(rule: Any, x: Any, args: argparse.Namespace, device: str) -> dict[str, Any] | None:
    """The phases of a distance-based rule (``distances``, ``select``, ``combine`` methods), each compiled as a
    ``tf.function`` of its own and timed separately on the same data, ``--repeats`` rounds, medians in seconds.

    Also, where the compiled distance kernel ran, its own split of the ``distances`` phase (measured in C per
    block, summed and divided by its threads): ``scan_seconds`` (reading each block from memory, range checks,
    copies) and ``pairs_seconds`` (the pair loops), with the blocks that took the float32 and float64 paths.
    None for the other rules.
    """
    import tensorflow as tf

    from aggregathor.gars import _distances

    if not all(callable(getattr(rule, a, None)) for a in ("distances", "select", "combine")):
        return None
    n, d = (int(v) for v in x.shape)
    timed = _timer(device)
    dist_fn = tf.function(rule.distances, input_signature=[tf.TensorSpec([n, d], tf.float32)], autograph=False)
    sel_fn = tf.function(rule.select, autograph=False)
    comb_fn = tf.function(rule.combine, autograph=False)
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    kernel: list[dict[str, Any]] = []
    with tf.device(device):
        sel = sel_fn(dist_fn(x))
        comb_fn(x, sel)  # compile
        for _ in range(args.repeats):
            _distances.LAST_KERNEL_STATS.clear()
            dt, dist = timed(dist_fn, x)
            times["distances"].append(dt)
            if _distances.LAST_KERNEL_STATS:
                kernel.append(dict(_distances.LAST_KERNEL_STATS))
            dt, sel = timed(sel_fn, dist)
            times["selection"].append(dt)
            dt, out = timed(lambda s: comb_fn(x, s), sel)
            times["combination"].append(dt)
            del out
    out_rec: dict[str, Any] = {p: _round(_median(times[p])) for p in PHASES}
    out_rec["sum"] = _round(sum(_median(times[p]) for p in PHASES))
    out_rec["times"] = {p: [_round(t) for t in times[p]] for p in PHASES}
    out_rec["kernel"] = None
    if kernel:
        out_rec["kernel"] = {k: kernel[-1][k] for k in ("threads", "parts", "block")}
        for k in ("blocks_float32", "blocks_float64"):
            out_rec["kernel"][k] = kernel[-1][k]
        for k in ("scan_seconds", "pairs_seconds"):
            out_rec["kernel"][k] = _round(_median([s[k] for s in kernel]))
    log(f"  {'':18s} phases: " + ", ".join(f"{p} {out_rec[p] * 1e3:.2f} ms" for p in PHASES)
        + ("" if not kernel else f" (kernel: scan {out_rec['kernel']['scan_seconds'] * 1e3:.2f} ms, pairs "
                                 f"{out_rec['kernel']['pairs_seconds'] * 1e3:.2f} ms per thread)"))
    return out_rec


def _compare_with_reference(rec: dict[str, Any], rule: Any, seconds: float, x_host: np.ndarray,
                            out_host: np.ndarray | None, args: argparse.Namespace) -> None:
    """Time the rule's numpy reference on the same input (or a probe of its first columns) into ``rec``.

    ``rec`` is :func:`_bench_rule`'s record, ``seconds`` the rule's median time, ``out_host`` its output on ``x_host``
    (None with ``--no-reference``). Fills the ``reference_*`` and ``speedup_*`` fields, or says in
    ``reference_skipped`` why the reference did not run.
    """
    from aggregathor.gars.reference import REFERENCES

    d = x_host.shape[1]
    ref = REFERENCES.get(rec["rule"])
    if args.no_reference:
        rec["reference_skipped"] = "--no-reference"
        return
    if ref is None:
        rec["reference_skipped"] = "no numpy reference for this rule in aggregathor.gars.reference"
        return
    params = _reference_params(rule, ref)
    if d > args.reference_probe_d:
        k = args.reference_probe_d
        t0 = time.perf_counter()
        ref(x_host[:, :k], rule.f, **params)
        probe = time.perf_counter() - t0
        rec["reference_probe_d"], rec["reference_probe_seconds"] = k, _round(probe)
        rec["speedup_vs_reference_at_least"] = _round(probe / seconds, 4)
        estimate = probe * d / k
        if d > args.reference_max_d:
            rec["reference_skipped"] = f"d={d} > --reference-max-d={args.reference_max_d}"
        elif estimate > args.reference_budget:
            rec["reference_skipped"] = (f"the probe took {probe:.2f} s on the first {k} columns, so the full run "
                                        f"would take about {estimate:.0f} s > --reference-budget "
                                        f"{args.reference_budget:g} s")
        if rec["reference_skipped"]:
            log(f"  {'':18s} reference skipped: {rec['reference_skipped']}; probe {probe:.2f} s "
                f"(speedup at least x{probe / seconds:.1f})")
            return
        log(f"  {'':18s} reference probe {probe:.2f} s on {k} columns; full run ~{estimate:.0f} s")
    ref_times = []
    result = None
    for _ in range(args.reference_repeats):
        del result
        t0 = time.perf_counter()
        result = ref(x_host, rule.f, **params)
        ref_times.append(time.perf_counter() - t0)
    ref_s = _median(ref_times)
    rec["reference_seconds"] = _round(ref_s)
    rec["reference_times"] = [_round(t) for t in ref_times]
    rec["speedup_vs_reference"] = _round(ref_s / seconds, 4)
    rec["speedup_vs_reference_at_least"] = None
    assert out_host is not None
    rec["reference_max_abs_diff"] = _round(float(np.max(np.abs(out_host - np.asarray(result)))), 4)
    log(f"  {'':18s} reference {ref_s:.2f} s: speedup x{ref_s / seconds:.1f}, "
        f"max |diff| {rec['reference_max_abs_diff']:.2g}")


def _failed(name: str, n: int, f: int, d: int, device: str, exc: BaseException) -> dict[str, Any]:
    """The record of a rule that raised: every number ``null``, ``error`` says what happened."""
    text = " ".join(str(exc).split())
    return {"rule": name, "n": n, "f": f, "d": d, "dtype": "float32", "device": device, "seconds": None,
            "floor_seconds": None, "reference_seconds": None, "ratio_vs_floor": None, "speedup_vs_reference": None,
            "speedup_vs_reference_at_least": None, "reference_skipped": "the rule failed",
            "reference_probe_d": None, "reference_probe_seconds": None, "contention": None,
            "error": f"{type(exc).__name__}: {text[:500]}"}


def _targets(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 5's targets, on the records at :data:`TARGET_POINT`."""
    out: list[dict[str, Any]] = []
    for r in records:
        if (r["n"], r["d"]) != TARGET_POINT:
            continue
        want = TARGET_RATIO_VS_FLOOR.get(r["rule"])
        if want is not None:
            ratio = r["ratio_vs_floor"]
            out.append({"rule": r["rule"], "metric": "ratio_vs_floor", "want_at_most": want, "got": ratio,
                        "met": None if ratio is None else ratio <= want})
        got = r["speedup_vs_reference"]
        bound = "measured"
        if got is None and r["speedup_vs_reference_at_least"] is not None:
            got, bound = r["speedup_vs_reference_at_least"], "at least"
        met: bool | None
        if got is None:
            met = None
        elif bound == "measured" or got >= TARGET_SPEEDUP:
            met = got >= TARGET_SPEEDUP
        else:
            met = None  # a lower bound under the target decides nothing
        out.append({"rule": r["rule"], "metric": "speedup_vs_reference", "want_at_least": TARGET_SPEEDUP,
                    "got": got, "bound": bound if got is not None else None, "met": met})
    return out


def _device_description(device: str) -> str | None:
    import tensorflow as tf

    if device.startswith("GPU"):
        try:
            gpu = tf.config.list_physical_devices("GPU")[int(device.split(":")[1])]
            return tf.config.experimental.get_device_details(gpu).get("device_name")
        except (IndexError, ValueError, RuntimeError):
            return None
    return host_info().get("cpu_model")


def _memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (AttributeError, ValueError, OSError):
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not hasattr(args, "rule_list"):
        check_arguments(args)
    import tensorflow as tf

    import aggregathor.gars as gars

    device = args.device_name
    started = time.time()
    load_before = list(os.getloadavg())
    meter = CpuMeter()
    records: list[dict[str, Any]] = []
    full_device = None
    for n in args.n_list:
        f = default_f(n) if args.f is None else args.f
        names = [name for name in args.rule_list if f"{name} n={n} f={f}" not in args.skipped]
        rules = {name: gars.get(name, n, f) for name in names}
        for d in args.d_list:
            log(f"n={n} f={f} d={d} on {device}: generating {n * d * 4 / 1e9:.2f} GB of float32")
            x_host = make_data(n, d, f, noise=args.noise, seed=args.seed)
            x = _to_tensor(x_host, device)
            full_device = x.device
            spec = tf.TensorSpec([n, d], tf.float32)
            floor_fn = tf.function(_floor, input_signature=[spec], jit_compile=True, autograph=False)
            with tf.device(device):
                floor_fn(x)  # compile
            for name in names:
                try:
                    records.append(_bench_rule(name, rules[name], x, x_host, floor_fn, args, device))
                except Exception as exc:  # one broken rule must not lose the others' numbers
                    records.append(_failed(name, n, f, d, device, exc))
                    log(f"  {name:18s} FAILED: {records[-1]['error'][:300]}")
                gc.collect()
            del x, x_host, floor_fn
            gc.collect()
    contention = meter.stop()
    host = {k: v for k, v in host_info().items() if k not in ("iperf3", "rmem_max", "wmem_max")}
    host.update({"memory_gb": _memory_gb(), "tensorflow": tf.__version__, "numpy": np.__version__,
                 "python_implementation": platform.python_implementation()})
    return {
        "benchmark": "gars",
        "records": records,
        "device": device,
        "device_full": full_device,
        "device_description": _device_description(device),
        "dtype": "float32",
        "n": args.n_list,
        "d": args.d_list,
        "f": args.f if args.f is not None else "(n - 3) // 4",
        "rules": args.rule_list,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "floor": "tf.function(jit_compile=True) of tf.reduce_mean(x, axis=0), timed alternately with the rule",
        "data": {"honest": f"g + {args.noise:g} * N(0, 1), rows 0 .. n-f-1",
                 "byzantine": f"g + {BYZANTINE_SHIFT:g} + {BYZANTINE_SCALE:g} * N(0, 1), rows n-f .. n-1",
                 "g": "N(0, 1), shared", "seed": args.seed},
        "reference": {"repeats": args.reference_repeats, "max_d": args.reference_max_d,
                      "budget_seconds": args.reference_budget, "probe_d": args.reference_probe_d,
                      "enabled": not args.no_reference},
        "failed": [r["rule"] + f" n={r['n']} d={r['d']}" for r in records if r.get("error")],
        "skipped": getattr(args, "skipped", {}),
        "targets": _targets(records),
        "target_point": {"n": TARGET_POINT[0], "d": TARGET_POINT[1]},
        "host": host,
        "contention": contention,
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "elapsed_s": round(time.time() - started, 2),
    }


# ---------------------------------------------------------------------------------------------- table
def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.2f}"


def _phase_note(r: dict[str, Any]) -> str:
    p = r["phases"]
    text = (f"{r['rule']} n={r['n']} d={r['d']}: phases " + ", ".join(f"{k} {_ms(p[k])} ms" for k in PHASES)
            + f" (sum {_ms(p['sum'])} ms)")
    k = p.get("kernel")
    if k:
        text += (f"; kernel per thread ({k['threads']} threads, blocks of {k['block']} columns, "
                 f"{k['blocks_float32']} float32 / {k['blocks_float64']} float64): scan {_ms(k['scan_seconds'])} ms, "
                 f"pairs {_ms(k['pairs_seconds'])} ms")
    return text


def render(result: dict[str, Any]) -> str:
    rows = []
    notes = []
    for r in result["records"]:
        if r["speedup_vs_reference"] is not None:
            speedup = f"{r['speedup_vs_reference']:.1f}x"
        elif r["speedup_vs_reference_at_least"] is not None:
            speedup = f">={r['speedup_vs_reference_at_least']:.1f}x"
        else:
            speedup = "-"
        if r["reference_skipped"] and not r.get("error"):
            notes.append(f"{r['rule']} n={r['n']} d={r['d']}: reference skipped ({r['reference_skipped']})"
                         + (f"; probe {r['reference_probe_seconds']:.3g} s on {r['reference_probe_d']} columns"
                            if r["reference_probe_seconds"] is not None else ""))
        if r.get("error"):
            notes.append(f"{r['rule']} n={r['n']} d={r['d']}: FAILED ({r['error']})")
        if r.get("phases"):
            notes.append(_phase_note(r))
        contention = r["contention"]
        ratio = "-" if r["ratio_vs_floor"] is None else f"{r['ratio_vs_floor']:.2f}x"
        rows.append([r["rule"], r["n"], r["f"], f"{r['d']:.0e}".replace("e+0", "e"), _ms(r["seconds"]),
                     _ms(r["floor_seconds"]), ratio,
                     fmt(r["reference_seconds"], 3), speedup,
                     "-" if contention is None else f"{contention * 100:.0f}%"])
    notes += [f"{what}: not run, its bound does not hold ({why})" for what, why in result.get("skipped", {}).items()]
    lines = [table(["rule", "n", "f", "d", "ms", "floor ms", "vs floor", "reference s", "speedup",
                    "contention"], rows)]
    if notes:
        lines += ["", *notes]
    if result.get("targets"):
        lines.append("")
        lines.append(f"targets at n={result['target_point']['n']}, d={result['target_point']['d']:.0e}:")
        for t in result["targets"]:
            want = (f"<= {t['want_at_most']}x" if "want_at_most" in t else f">= {t['want_at_least']}x")
            got = "-" if t["got"] is None else f"{'>=' if t.get('bound') == 'at least' else ''}{t['got']:.2f}x"
            met = {True: "met", False: "MISSED", None: "undecided"}[t["met"]]
            lines.append(f"  {t['rule']:18s} {t['metric']:22s} want {want:9s} got {got:10s} {met}")
    c = result["contention"]
    foreign = c.get("foreign_cpu_fraction")
    lines.append("")
    lines.append(f"device {result['device']} ({result.get('device_description') or '?'}), "
                 f"{result['host']['nproc']} CPUs, TensorFlow {result['host']['tensorflow']}; "
                 f"other processes used {'?' if foreign is None else f'{foreign * 100:.1f} %'} of the CPUs; "
                 f"{result['elapsed_s']:.0f} s")
    return "\n".join(lines)
