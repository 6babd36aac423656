"""Run ``oprd`` with a pause between each teacher-cache unit's data and its done marker.

Usage: ``python tests/cache_pause_worker.py SECONDS oprd-args...``. A test starts this wrapper instead
of ``python -m oprd_cli`` and kills it inside the pause, leaving a unit on disk without its marker
(the fault is injected here, by patching the writer; the product reads no test hook).
"""

import sys
import time

from oprd_cli.stores.cache.writer import CacheWriter


def main() -> None:
    pause = float(sys.argv[1])
    original = CacheWriter._write_marker

    def slow_marker(self, unit_index, marker):
        time.sleep(pause)
        original(self, unit_index, marker)

    CacheWriter._write_marker = slow_marker
    sys.argv = ["oprd", *sys.argv[2:]]
    from oprd_cli.cli import main as oprd_main

    oprd_main()


if __name__ == "__main__":
    main()
