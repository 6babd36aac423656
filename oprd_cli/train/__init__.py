"""Student training from cached teacher activations (``oprd train``).

Public API (what the CLI, the demo and ``oprd loop`` call):

- :class:`TrainConfig`, :class:`TrainResult`
- :func:`run_train` (``--cache C --out DIR`` or ``--run-dir R`` [``--follow``]) and
  :func:`train_on_cache` (one cache)
- :class:`Trainer` / :class:`MicroBatch`: the actor-update step itself (``oprd bench loss`` uses it)

Modules: ``config`` (settings), ``forward`` (student backbone / LM-head helpers), ``step`` (loss and
optimizer step), ``batches`` (plans, micro-batches, prefetch), ``checkpoint`` (save/load),
``loop`` (the command), ``memory`` (peak-memory probes).
"""

from oprd_cli.train.config import OBJECTIVES, OPRD_FORMS, TrainConfig, TrainResult
from oprd_cli.train.loop import print_result, run_train, train_on_cache
from oprd_cli.train.step import MicroBatch, NonFiniteLoss, Trainer

__all__ = [
    "OBJECTIVES",
    "OPRD_FORMS",
    "TrainConfig",
    "TrainResult",
    "run_train",
    "train_on_cache",
    "print_result",
    "Trainer",
    "MicroBatch",
    "NonFiniteLoss",
]
