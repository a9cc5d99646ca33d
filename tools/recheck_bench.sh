#!/bin/bash
# Speed before/after a change, in one run, ABBA order: the p2p benchmark and one gather configuration, from a
# worktree of OLD (default b3ab4d3, before the seams refactor) and from this checkout.
#   usage: tools/recheck_bench.sh [OLD_COMMIT]    (root: the gather runs on an emulated cluster)
# Writes p2p_{old,new}{1,2}.json and gather_{old,new}{1,2}.json into ${OUT:-/tmp/recheck}.
set -euo pipefail
NEW=$(cd "$(dirname "$0")/.." && pwd)
OLD_COMMIT=${1:-b3ab4d3}
OLD=${OLD_TREE:-/tmp/recheck-old}
OUT=${OUT:-/tmp/recheck}
PY=${PYTHON:-$NEW/.venv/bin/python}
mkdir -p "$OUT"
if [ ! -d "$OLD" ]; then
    git -C "$NEW" worktree add -q "$OLD" "$OLD_COMMIT"
    (cd "$OLD" && "$PY" setup.py -q build_ext --inplace >/dev/null)
fi
run() { local tree=$1 out=$2; shift 2; (cd "$tree" && PYTHONPATH=$tree "$PY" -m lossympi.bench "$@" --json >"$OUT/$out" 2>"$OUT/$out.err"); }
run "$OLD" p2p_old1.json p2p
run "$NEW" p2p_new1.json p2p
run "$NEW" p2p_new2.json p2p
run "$OLD" p2p_old2.json p2p
G=(gather --n 8 --d 1750000 --loss 0.05)
run "$OLD" gather_old1.json "${G[@]}"
run "$NEW" gather_new1.json "${G[@]}"
run "$NEW" gather_new2.json "${G[@]}"
run "$OLD" gather_old2.json "${G[@]}"
echo "results in $OUT"
