"""One locally launched rank (started by :func:`aggregathor.launch.launch`)."""

import sys

from aggregathor.launch import main_rank

if __name__ == "__main__":
    sys.exit(main_rank(sys.argv[1:]))
