"""Student training from cached teacher activations (``oprd train``).

Public API (what the CLI, the demo and ``oprd loop`` call):

- :class:`TrainConfig` (grouped settings; ``TrainConfig.from_flat`` / ``to_flat`` for the flat
  ``oprd.toml`` keys and flags), :class:`TrainResult`
- :func:`run_train` (``--cache C --out DIR`` or ``--run-dir R`` [``--follow``]), :func:`print_result`
- :class:`Trainer` / :class:`MicroBatch`: the actor-update step itself (``oprd bench loss`` uses it)

Modules, in the order of a run: ``config`` (settings), ``run`` (the command's lifecycle: setup,
train, save), ``selection`` (which cache next, fit checks, staleness), ``batches`` (plans,
micro-batches, prefetch), ``step`` (loss terms and the optimizer step), ``schedule`` (warm-up +
cosine), ``forward`` (student backbone / LM-head helpers), ``checkpoint`` (save/load and the save
policy), ``report`` (metrics.jsonl, progress line, summary), ``memory`` (peak-memory probes).
"""

from oprd_cli.train.config import OBJECTIVES, OPRD_FORMS, TrainConfig, TrainResult
from oprd_cli.train.report import print_result
from oprd_cli.train.run import run_train
from oprd_cli.train.step import MicroBatch, NonFiniteLoss, Trainer

__all__ = [
    "OBJECTIVES",
    "OPRD_FORMS",
    "TrainConfig",
    "TrainResult",
    "run_train",
    "print_result",
    "Trainer",
    "MicroBatch",
    "NonFiniteLoss",
]
