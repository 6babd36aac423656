"""The torchrun contract: ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (absent: one process).

Read by the stages that run one process per device: ``oprd train`` (FSDP2 over the ranks, see
:mod:`oprd_cli.train.distributed`) and ``oprd teacher-cache`` (rank ``I`` of ``N`` fills shard
``I/N`` of each store on ``cuda:LOCAL_RANK``, the same units ``--shard I/N`` gives) and ``oprd
rollout`` (rank ``r`` samples the seeded batches ``b % N == r``, see :mod:`oprd_cli.rollout_ranks`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from oprd_cli.errors import OprdError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits among torchrun's ranks (world_size 1: a plain run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env(environ: dict[str, str] | None = None) -> DistEnv:
    """The torchrun variables of this process."""
    env = os.environ if environ is None else environ
    try:
        return DistEnv(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
    except ValueError:
        raise OprdError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (start the command with torchrun)") from None


def rank_device(device: str, env: DistEnv) -> str:
    """``auto``/``cuda`` under torchrun on a GPU machine: this rank's ``cuda:LOCAL_RANK``."""
    if not env.enabled or device not in ("auto", "cuda"):
        return device
    import torch

    return f"cuda:{env.local_rank}" if torch.cuda.is_available() else device
