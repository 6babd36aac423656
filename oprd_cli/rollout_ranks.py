"""``oprd rollout`` under torchrun: N processes (one per GPU) sample one round together.

Rank ``r`` of ``N`` samples prompts ``r, r+N, ...`` (on ``cuda:LOCAL_RANK``); the samples are
gathered (``all_gather_object``) and rank 0 writes the one store through the ordinary writer, its
completion marker last; the other ranks write nothing. A prompt's samples come from one rank with
the ordinary per-batch seeding, so the store is reproducible for a given world size (it differs
from a one-process store, whose batches group other prompts).
"""

from __future__ import annotations

from oprd_cli.torchrun import DistEnv, dist_env


def init_rollout_ranks(device) -> DistEnv:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA) when there is one."""
    env = dist_env()
    if env.enabled:
        import torch.distributed as dist

        from oprd_cli.console import err_console

        if device.type == "cuda":
            import torch

            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        if not env.is_main:
            err_console.quiet = True  # messages and progress from rank 0
        else:
            err_console.print(f"sampling over {env.world_size} ranks")
    return env


class RankedBackend:
    """A generation backend whose prompts are split over torchrun's ranks and gathered on every rank."""

    def __init__(self, inner, env: DistEnv):
        self.inner, self.env = inner, env
        self.name = inner.name
        self.context_length = inner.context_length
        self.eos_ids = list(getattr(inner, "eos_ids", []))

    def generate(self, prompts, sampling, on_sequences_done=None):
        import torch.distributed as dist

        mine = list(range(self.env.rank, len(prompts), self.env.world_size))
        local = self.inner.generate([prompts[i] for i in mine], sampling, on_sequences_done) if mine else []
        parts: list = [None] * self.env.world_size
        dist.all_gather_object(parts, (mine, local))
        out: list = [None] * len(prompts)
        for idx, groups in parts:
            for i, g in zip(idx, groups):
                out[i] = g
        return out
