"""``oprd rollout`` under torchrun: N processes (one per GPU) sample one round together.

The unit of work is the seeded batch: the backend orders every (prompt, sample) job longest prompt
first, cuts the order into batches of ``sampling.batch_size`` and seeds batch ``b`` with
``seed * 1_000_003 + b`` whatever process samples it. Rank ``r`` of ``N`` samples the batches
``b % N == r`` (round robin: the longest batches come first, so every rank gets some) on
``cuda:LOCAL_RANK``; the ranks' samples are gathered on rank 0 (``gather_object``), which writes the
one store through the ordinary writer, its completion marker last; the other ranks write nothing.
A batch's samples depend only on its jobs and its seed, so the store is the one a single process
writes (same ``content_digest``) at any world size. Teacher-prefix guidance shares both of its
passes the same way (the teacher's prefixes are gathered on every rank before the student's pass).

Why rank 0 alone writes (unlike the teacher cache, whose ranks write their own units): the store
is ragged and ordered by (prompt, sample), while the units are batches of jobs sorted by length
across prompts. A rank's samples are scattered over the flat token arrays, their offsets are known
only once every rank has finished, and one 2**18-token chunk holds samples of every rank, so
chunk-safe writes by several ranks would need another layout (or a writer per chunk, fed by the
same exchange of samples). What is gathered is token ids and log-probs (8 bytes a token, plus 4 K
with ``--record-topk K``), small next to sampling them; the last gather goes to rank 0 alone, so the
other ranks never hold the whole round.

Backends without batches (``--import``) keep the older split: rank ``r`` takes prompts ``r, r+N,
...``, gathered on every rank; imported samples do not depend on the split.
"""

from __future__ import annotations

from typing import Callable

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


def gather(obj, dst: int | None = None) -> list | None:
    """Every rank's ``obj`` in rank order, on every rank (``dst`` None) or on rank ``dst`` only (None
    elsewhere); torch.distributed, the group :func:`init_rollout_ranks` joined."""
    import torch.distributed as dist

    world = dist.get_world_size()
    if dst is None:
        parts: list = [None] * world
        dist.all_gather_object(parts, obj)
        return parts
    parts = [None] * world if dist.get_rank() == dst else None
    dist.gather_object(obj, parts, dst=dst)
    return parts


class BatchShare:
    """This process's share of the seeded batches, and how the ranks' samples come back together.

    ``gather(obj, dst)`` returns every rank's ``obj`` in rank order, on every rank (``dst`` None) or on
    rank ``dst`` alone (:func:`gather` under torchrun; a test passes its own)."""

    def __init__(self, rank: int, world_size: int, gather: Callable[[object, int | None], list | None] = gather):
        self.rank, self.world_size, self.gather = rank, world_size, gather

    def mine(self, batch: int) -> bool:
        """Whether this rank samples batch ``batch`` (of the global order)."""
        return batch % self.world_size == self.rank

    def merge(self, got: list, on_sequences_done: Callable[[int, int], None] | None = None,
              everywhere: bool = True) -> list:
        """``got``: one entry per job, ``None`` where another rank sampled it; returns every entry,
        filled from the ranks' parts, and reports the filled ones to ``on_sequences_done``.
        ``everywhere`` False: only rank 0 (the writer) receives the others' samples; the other ranks
        get ``got`` back as it is (their memory holds their own share only)."""
        parts = self.gather([(i, s) for i, s in enumerate(got) if s is not None], None if everywhere else 0)
        out = list(got)
        if parts is None:
            return out
        filled = tokens = 0
        for part in parts:
            for i, s in part:
                if out[i] is None:
                    out[i] = s
                    filled, tokens = filled + 1, tokens + len(s.response_ids)
        missing = sum(s is None for s in out)
        if missing:
            raise RuntimeError(f"{missing} samples were sampled by no rank")  # a bug, not a user error
        if on_sequences_done and filled:
            on_sequences_done(filled, tokens)
        return out


class RankedBackend:
    """A generation backend whose work is split over torchrun's ranks and gathered on rank 0."""

    def __init__(self, inner, env: DistEnv):
        self.inner, self.env = inner, env
        self.name = inner.name
        self.context_length = inner.context_length
        self.eos_ids = list(getattr(inner, "eos_ids", []))

    @property
    def prefix_lengths(self) -> list[list[int]]:
        """Teacher-prefix lengths of the last call (a guided inner backend; the same on every rank)."""
        return self.inner.prefix_lengths

    def generate(self, prompts, sampling, on_sequences_done=None):
        """Every prompt's samples on rank 0; on the other ranks, those they sampled (the rest None)."""
        if getattr(self.inner, "shares_batches", False):
            share = BatchShare(self.env.rank, self.env.world_size)
            return self.inner.generate(prompts, sampling, on_sequences_done, share=share)
        mine = list(range(self.env.rank, len(prompts), self.env.world_size))
        local = self.inner.generate([prompts[i] for i in mine], sampling, on_sequences_done) if mine else []
        out: list = [None] * len(prompts)
        for idx, groups in gather((mine, local)):
            for i, g in zip(idx, groups):
                out[i] = g
        return out
