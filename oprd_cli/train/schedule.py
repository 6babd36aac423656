"""The learning-rate schedule: linear warm-up, then cosine decay (the paper's setup: 3% warm-up).

The one implementation of warm-up + cosine in oprd; the trainer's ``LambdaLR`` calls
:func:`lr_factor`.
"""

from __future__ import annotations

import math
from functools import partial

import torch


def cosine_decay(progress: float, min_ratio: float = 0.0) -> float:
    """``min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2`` for ``p = min(1, progress)``: 1 at 0,
    ``min_ratio`` at 1."""
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def lr_factor(step: int, warmup: int, total: int | None, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warm-up over ``warmup``
    steps (reaching 1 at step ``warmup - 1``), then cosine decay to ``min_ratio`` at step ``total``.
    With no planned total the lr is constant."""
    if total is None:
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    return cosine_decay((step - warmup) / max(1, total - warmup), min_ratio)


def warmup_steps(total: int | None, ratio: float) -> int:
    """Warm-up steps of a schedule of ``total`` steps (0 without a planned total)."""
    return 0 if total is None else int(round(ratio * total))


def warmup_cosine(optimizer: torch.optim.Optimizer, total: int | None, warmup_ratio: float,
                  min_ratio: float = 0.0) -> tuple[torch.optim.lr_scheduler.LambdaLR, int]:
    """The scheduler of ``optimizer`` and its number of warm-up steps."""
    warmup = warmup_steps(total, warmup_ratio)
    fn = partial(lr_factor, warmup=warmup, total=total, min_ratio=min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn), warmup
