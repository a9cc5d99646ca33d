#!/usr/bin/env bash
# GPU check (issue 14 requirement 5), meant to fit in five minutes on a machine with one NVIDIA GPU:
#   1. install: a virtual environment with `pip install -e ".[gpu]"` (TensorFlow with CUDA and what training
#      needs besides; building the editable package compiles the Cython core, lossympi._core). Skipped with
#      --no-install (the current python is used).
#   2. devices: nvidia-smi (when present) and TensorFlow's tf.config.list_physical_devices(); stops with one clear
#      line when TensorFlow sees no GPU, unless --allow-cpu.
#      Also the device of each training rule's output, called as the server calls it (TensorFlow's default
#      placement: GPU:0 when it sees one; nothing in aggregathor pins the rules to a device).
#   3. bench: `python -m aggregathor.bench gars --n 20 --d 1e7,2.5e7 --device auto --no-reference --json`.
#   4. train: a simulated run (`aggregathor train --launcher simulate`) of --steps steps per robust rule.
#   5. summary (tools/gpu_check_summary.py): the GPU targets (median, trimmed mean, Multi-Krum <= 2x the bench's
#      floor, one tf.reduce_mean pass: one memory pass) met or not at each d, the runs' accuracy and steps/s, the
#      phases' times; also written to OUT/gpu_check_summary.json.
# Usage: tools/gpu_check.sh [--no-install] [--allow-cpu] [--out DIR] [--n N] [--d D,...] [--rules R,...]
#                           [--steps S] [--train-rules R,...] [--workers W] [--f F] [--venv DIR]
# Output directory: --out, else $OUT, else ./gpu_check_out. Exit status: 0 when every phase ran (targets met or not),
# 1 when a phase failed, 2 for bad flags or no GPU.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
INSTALL=1
ALLOW_CPU=0
OUTDIR=${OUT:-$PWD/gpu_check_out}
N=20
D_LIST=1e7,2.5e7
RULES=median,trimmed-mean,multi-krum,bulyan
STEPS=100
TRAIN_RULES=median,trimmed-mean,multi-krum
WORKERS=10
F=2
VENV=${GPU_CHECK_VENV:-$ROOT/.venv-gpu}
PY=${PYTHON:-python3}

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_check: $*" >&2; exit 2; }
need_value() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"; }

while [ $# -gt 0 ]; do
    case $1 in
        --no-install) INSTALL=0 ;;
        --allow-cpu) ALLOW_CPU=1 ;;
        --out) need_value "$@"; OUTDIR=$2; shift ;;
        --n) need_value "$@"; N=$2; shift ;;
        --d) need_value "$@"; D_LIST=$2; shift ;;
        --rules) need_value "$@"; RULES=$2; shift ;;
        --steps) need_value "$@"; STEPS=$2; shift ;;
        --train-rules) need_value "$@"; TRAIN_RULES=$2; shift ;;
        --workers) need_value "$@"; WORKERS=$2; shift ;;
        --f) need_value "$@"; F=$2; shift ;;
        --venv) need_value "$@"; VENV=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown flag $1; use --no-install, --allow-cpu, --out DIR, --n, --d, --rules, --steps, --train-rules, --workers, --f, --venv (see --help)" ;;
    esac
    shift
done
for v in N STEPS WORKERS F; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "--$(echo "$v" | tr 'A-Z' 'a-z') must be a non-negative integer, got '${!v}'"
done

mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG=$OUTDIR/gpu_check.log
: >"$LOG"
PHASES=$OUTDIR/phases.tsv
: >"$PHASES"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
cd "$ROOT"

say() { echo "== $*" | tee -a "$LOG"; }
# phase NAME CMD...: run CMD (its output to the terminal and the log), record its status and seconds
FAILED=0
phase() {
    local name=$1 t0 rc
    shift
    say "$name"
    t0=$(date +%s%N)
    set +e
    "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    set -e
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( ($(date +%s%N) - t0) / 1000000 ))" >>"$PHASES"  # milliseconds
    if [ "$rc" -ne 0 ]; then
        echo "gpu_check: phase '$name' failed (exit status $rc); its output is in $LOG" | tee -a "$LOG"
        FAILED=1
    fi
    return 0
}

install() {
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -e ".[gpu]"  # TensorFlow with CUDA and the rest of what training needs
    "$VENV/bin/python" -c "import lossympi._core" || { echo "the Cython core (lossympi._core) was not built"; return 1; }
}

if [ "$INSTALL" = 1 ]; then
    phase install install
    [ "$FAILED" = 0 ] || exit 1
    PY=$VENV/bin/python
fi

devices() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv || true
    else
        echo "nvidia-smi: not on PATH"
    fi
    # one TensorFlow start for both: the devices, then where each training rule's aggregate is placed
    "$PY" - "$OUTDIR" "$TRAIN_RULES" "$WORKERS" "$F" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
import tensorflow as tf
from aggregathor import experiments, gars
out, rules, n, f = Path(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4])
devices = [{"name": d.name, "type": d.device_type} for d in tf.config.list_physical_devices()]
build = tf.sysconfig.get_build_info()
info = {"tensorflow": tf.__version__, "devices": devices, "cuda_build": bool(build.get("is_cuda_build")),
        "cuda_version": build.get("cuda_version"), "cudnn_version": build.get("cudnn_version")}
print("tf.config.list_physical_devices():", tf.config.list_physical_devices())
print(f"TensorFlow {tf.__version__}, CUDA build: {info['cuda_build']} (CUDA {info['cuda_version']})")
(out / "devices.json").write_text(json.dumps(info, indent=1))
d = experiments.flat_view(experiments.get("digits").build_model(0)).size
x = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
where = {rule: gars.get(rule, n, f)(x).device for rule in rules}  # as the server calls it: default placement
for rule, device in where.items():
    print(f"placement: {rule} on ({n}, {d}) -> {device}")
(out / "placement.json").write_text(json.dumps(where, indent=1))
EOF
}
phase devices devices
[ -s "$OUTDIR/devices.json" ] || { echo "gpu_check: TensorFlow did not start (see $LOG)"; exit 1; }
if ! grep -q '"type": "GPU"' "$OUTDIR/devices.json"; then
    if [ "$ALLOW_CPU" = 1 ]; then
        say "TensorFlow sees no GPU: --allow-cpu given, the rest runs on the CPU (not a GPU measurement)"
    else
        echo "gpu_check: TensorFlow sees no GPU (tf.config.list_physical_devices('GPU') is empty): install .[gpu] on a machine with an NVIDIA driver, or pass --allow-cpu to check the script on the CPU" | tee -a "$LOG" >&2
        exit 2
    fi
fi


phase bench bash -c '"$0" -m aggregathor.bench gars --n "$1" --d "$2" --rules "$3" --device auto --no-reference \
    --json >"$4"' "$PY" "$N" "$D_LIST" "$RULES" "$OUTDIR/gars.json"

train() {
    local rule rc=0
    for rule in ${TRAIN_RULES//,/ }; do
        rm -rf "$OUTDIR/train-$rule"
        "$PY" -m aggregathor train --launcher simulate --experiment digits --gar "$rule" --workers "$WORKERS" \
            --f "$F" --byzantine "$F" --attack reverse --loss 0 --steps "$STEPS" --eval-every "$STEPS" \
            --checkpoint-every 0 --run-dir "$OUTDIR/train-$rule" --json-out "$OUTDIR/train-$rule.json" --quiet \
            || rc=1
    done
    return $rc
}
phase train train

say summary
set +e
"$PY" "$ROOT/tools/gpu_check_summary.py" "$OUTDIR" --train-rules "$TRAIN_RULES" --failed "$FAILED" \
    2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
set -e
exit "$rc"
