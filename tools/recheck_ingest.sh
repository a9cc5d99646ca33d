#!/bin/bash
# Issue 13 req. 2 (a root that ingests at line rate), before/after in one run, ABBA order: the gather at 0 % loss,
# n = 8 and 16, d = 1.75M, lossympi vs raw TCP (the bench alternates them per configuration), from a worktree of
# OLD (default 6e7edce: fixed 3 Gbit/s ingest, no GRO at the root) and one of NEW (default HEAD: credits, GRO).
#   usage: tools/recheck_ingest.sh [OLD_COMMIT [NEW_COMMIT]]    (root: the gather runs on an emulated cluster)
# Writes gather_{old,new}{1,2}.json (+ .err, and loadavg before/after each) into ${OUT:-/tmp/recheck_ingest}.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
OLD_COMMIT=${1:-6e7edce}
NEW_COMMIT=${2:-$(git -C "$HERE" rev-parse --short HEAD)}
OUT=${OUT:-/tmp/recheck_ingest}
PY=${PYTHON:-$HERE/.venv/bin/python}
mkdir -p "$OUT"
tree() {  # a worktree of commit $1 with its own build, at /tmp/recheck-ingest-$1
    local dir=/tmp/recheck-ingest-$1
    if [ ! -d "$dir" ]; then
        git -C "$HERE" worktree add -q "$dir" "$1"
        (cd "$dir" && "$PY" setup.py -q build_ext --inplace >/dev/null)
    fi
    echo "$dir"
}
OLD=$(tree "$OLD_COMMIT")
NEW=$(tree "$NEW_COMMIT")
G=(gather --n 8,16 --d 1750000 --loss 0 --transports lossympi,tcp --repeats 5)
run() {
    local t=$1 out=$2
    cat /proc/loadavg >"$OUT/$out.loadavg"
    (cd "$t" && PYTHONPATH=$t "$PY" -m lossympi.bench "${G[@]}" --json >"$OUT/$out" 2>"$OUT/$out.err")
    cat /proc/loadavg >>"$OUT/$out.loadavg"
}
run "$OLD" gather_old1.json
run "$NEW" gather_new1.json
run "$NEW" gather_new2.json
run "$OLD" gather_old2.json
echo "results in $OUT (old $OLD_COMMIT, new $NEW_COMMIT)"
