#!/bin/bash
# ABBA: old (b3ab4d3, before this session) and new (main), same machine, same run
set -x
OLD=/tmp/wt-old; NEW=/work/main; PY=/work/main/.venv/bin/python
run() { local tree=$1 out=$2; shift 2; (cd $tree && PYTHONPATH=$tree $PY -m lossympi.bench "$@" --json > $out 2> $out.err); }
run $OLD /tmp/p2p_old1.json p2p
run $NEW /tmp/p2p_new1.json p2p
run $NEW /tmp/p2p_new2.json p2p
run $OLD /tmp/p2p_old2.json p2p
run $OLD /tmp/gather_old1.json gather --n 8 --d 1750000 --loss 0.05
run $NEW /tmp/gather_new1.json gather --n 8 --d 1750000 --loss 0.05
run $NEW /tmp/gather_new2.json gather --n 8 --d 1750000 --loss 0.05
run $OLD /tmp/gather_old2.json gather --n 8 --d 1750000 --loss 0.05
echo BENCH-DONE
