"""Helper for tests/test_bootstrap.py: ``mpiexec -n N python tests/mpi_bootstrap_prog.py [OUTDIR]``.

Every rank bootstraps with :func:`lossympi.bootstrap.from_mpi` and reports, as one JSON object, its address
table and the SHA-256 of each of its pair keys (never the keys themselves). With ``OUTDIR`` the report goes
to ``OUTDIR/rank<r>.json`` (the launcher may interleave the ranks' stdout); otherwise it is printed.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lossympi.bootstrap import from_mpi  # noqa: E402


def main() -> None:
    world = from_mpi()
    try:
        report = {
            "rank": world.rank,
            "size": world.size,
            "addresses": [list(a) for a in world.addresses],
            "sockname": list(world.sock.getsockname()),
            "keys": {str(j): hashlib.sha256(k).hexdigest() for j, k in world.keys.items()},
        }
        if len(sys.argv) > 1:
            out = Path(sys.argv[1]) / f"rank{world.rank}.json"
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(report))
            tmp.rename(out)
        else:
            print(json.dumps(report), flush=True)
    finally:
        world.close()


if __name__ == "__main__":
    main()
