"""Run ``oprd train ARGS`` but stall SECONDS once the run directory's writer lock is held.

Usage: python tests/train_stall_worker.py SECONDS train-args...   (the stall is injected here, by the
test, by wrapping ``oprd_cli.train.run._train``; the product reads no test hook)
"""

from __future__ import annotations

import sys
import time

from oprd_cli.cli import main
from oprd_cli.train import run as train_run

_train = train_run._train


def _stalled(run, show_progress):
    print("lock held", flush=True)
    time.sleep(SECONDS)
    return _train(run, show_progress)


if __name__ == "__main__":
    train_run._train = _stalled
    SECONDS = float(sys.argv[1])
    sys.argv = ["oprd", "train", *sys.argv[2:]]
    main()
