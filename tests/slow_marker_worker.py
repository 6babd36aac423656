"""Run ``oprd`` with a pause before every store's completion marker.

Usage: ``python tests/slow_marker_worker.py SECONDS oprd-args...``. The store's arrays are then on
disk for SECONDS without its marker: a follower that read an incomplete store would be caught (the
fault is injected here, by patching; the product reads no test hook).
"""

import sys
import time

from oprd_cli.stores import common


def main() -> None:
    pause = float(sys.argv[1])
    original = common.mark_complete

    def slow_mark_complete(*args, **kwargs):
        time.sleep(pause)
        original(*args, **kwargs)

    common.mark_complete = slow_mark_complete
    sys.argv = ["oprd", *sys.argv[2:]]
    from oprd_cli.cli import main as oprd_main

    oprd_main()


if __name__ == "__main__":
    main()
