"""Run ``oprd ARGS`` and SIGKILL this process right after the loop logged stage ROUND:STAGE.

Usage: python tests/loop_kill_after.py ROUND:STAGE oprd-args...   (the fault is injected here, by the
test, by wrapping ``oprd_cli.loop.log_stage``; the product reads no test hook)
"""

from __future__ import annotations

import os
import signal
import sys

from oprd_cli import loop
from oprd_cli.cli import main

_log_stage = loop.log_stage


def _kill_after(run, entry):
    _log_stage(run, entry)
    if f"{entry['round']}:{entry['stage']}" == STOP:
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    STOP = sys.argv[1]
    loop.log_stage = _kill_after
    sys.argv = ["oprd", *sys.argv[2:]]
    main()
