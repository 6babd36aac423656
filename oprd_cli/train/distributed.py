"""Training under ``torchrun`` with FSDP2 (``torch.distributed.fsdp.fully_shard``).

``torchrun --nproc-per-node N oprd train ...`` starts N processes with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` set (the torchrun contract, read by :func:`dist_env`). Then:

- :func:`init_distributed` joins the process group (gloo on CPU, NCCL on CUDA) and picks the rank's
  device (``cuda:LOCAL_RANK``);
- :func:`apply_fsdp` shards the student: ``fully_shard`` per decoder block, then on a thin root
  (:class:`ShardedRoot`) that holds the model and owns what is left (embeddings, final norm, LM
  head). The trainer runs its whole micro-batch loss inside the root's forward, so the truncated
  decoder forward and the LM head on gathered rows see unsharded parameters;
- each optimizer batch is split by rank (:func:`local_rows`); the loss denominators (samples,
  tokens, positions) are all-reduced first, so every rank's loss is its share of the GLOBAL
  token-mean and the reduced gradient is the SUM of the ranks' gradients (FSDP's gradient divide
  factor is set to 1). The losses therefore equal one process with the same global batch;
- checkpoints: every rank writes its shard of the model and optimizer with DCP
  (``checkpoint/dcp/``, for resume, at any world size), and rank 0 writes the consolidated
  ``save_pretrained`` folder (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``),
  the trainer state and the marker, then renames the folder into place;
- metrics, progress and messages come from rank 0 only.
"""

from __future__ import annotations

import os
import shutil
import time
import types
from pathlib import Path
from typing import Any, Callable

import torch

from oprd_cli.errors import OprdError
from oprd_cli.torchrun import DistEnv, dist_env

DCP_DIR = "dcp"  # the sharded model + optimizer state inside a checkpoint folder


def init_distributed(device: torch.device) -> tuple[DistEnv, torch.device]:
    """Join torchrun's process group when there is one; returns the env and the rank's device."""
    env = dist_env()
    if not env.enabled:
        return env, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return env, device


class ShardedRoot(torch.nn.Module):
    """The FSDP root: holds the HF model; ``forward(fn)`` runs ``fn()`` with the root's parameters
    (embeddings, final norm, LM head) unsharded and FSDP's backward bookkeeping set up."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[[], Any]) -> Any:  # noqa: D401 - a closure runner
        return fn()


def apply_fsdp(model: torch.nn.Module, *, reshard_after_forward: bool = True) -> ShardedRoot:
    """Shard ``model`` with FSDP2: ``fully_shard`` on every decoder block, then on the root
    (:class:`ShardedRoot`, which keeps the rest). Gradients are summed over ranks (divide factor 1):
    each rank's loss is already its share of the global mean."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from oprd_cli.backbone import decoder_of

    _, _, blocks = decoder_of(model)
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward)
    root = ShardedRoot(model)
    fully_shard(root, reshard_after_forward=reshard_after_forward)
    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return root


def local_rows(rows, env: DistEnv):
    """This rank's share of an optimizer batch's rows (strided, so shares differ by at most one)."""
    return rows[env.rank::env.world_size] if env.enabled else rows


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


class Sharding:
    """The trainer's view of a sharded run: the FSDP root, totals, digests, checkpoints."""

    def __init__(self, env: DistEnv, root: ShardedRoot, device: torch.device):
        self.env, self.root, self.device = env, root, device

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    @property
    def model(self) -> torch.nn.Module:
        return self.root.model

    def run(self, fn: Callable[[], Any]) -> Any:
        """Run a micro-batch's loss inside the FSDP root's forward."""
        return self.root(fn)

    def global_totals(self, micro_batches) -> tuple[int, int, int]:
        """(samples, tokens, positions) of the whole optimizer batch over all ranks; a rank's
        placeholder micro-batch (:func:`placeholder`) counts nothing."""
        real = [m for m in micro_batches if bool(m.response_mask.any())]
        s, t, p = all_reduce_sum([sum(m.size for m in real), sum(m.num_tokens for m in real),
                                  sum(m.num_positions for m in real)], self.device)
        return int(s), int(t), int(p)

    def sum_stats(self, stats: dict[str, float]) -> dict[str, float]:
        """Sum the step's weighted statistics over ranks (each is a share of a global mean)."""
        keys = sorted(set().union(*torch_gather_keys(stats)))
        vals = all_reduce_sum([float(stats.get(k, 0.0)) for k in keys], self.device)
        return dict(zip(keys, vals))

    def all_true(self, flag: bool) -> bool:
        return all_reduce_sum([0.0 if flag else 1.0], self.device)[0] == 0.0

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The consolidated weights on rank 0 (an empty dict elsewhere); a collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def weights_digest(self) -> str:
        """:func:`oprd_cli.models.weights_digest` of the whole model, equal on every rank."""
        from oprd_cli.models import weights_digest

        sd = self.full_state_dict()
        digest = weights_digest(types.SimpleNamespace(state_dict=lambda: sd)) if self.is_main else None
        return broadcast(digest)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, checkpoints_dir: Path, step: int, tokenizer, trainer_state: dict,
                        marker: dict[str, Any]) -> Path:
        """Every rank writes its DCP shard into rank 0's temporary folder; rank 0 adds the
        consolidated ``save_pretrained`` files, the trainer state and the marker (last) and renames."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from oprd_cli.stores.rundir import checkpoint_name
        from oprd_cli.train.checkpoint import save_checkpoint

        checkpoints_dir = Path(checkpoints_dir)
        tmp = None
        if self.is_main:
            checkpoints_dir.mkdir(parents=True, exist_ok=True)
            tmp = checkpoints_dir / f".{checkpoint_name(step)}.tmp-{os.getpid()}-{time.monotonic_ns()}"
            tmp.mkdir(parents=True)
        tmp = Path(broadcast(str(tmp)))
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / DCP_DIR))
        full = self.full_state_dict()
        path = None
        if self.is_main:
            state = {k: v for k, v in trainer_state.items() if k != "optimizer"}
            model = _Consolidated(self.model, full)
            try:
                path = save_checkpoint(checkpoints_dir, step, model, tokenizer, state,
                                       {**marker, "sharded": {"world_size": self.env.world_size, "dcp": DCP_DIR}},
                                       tmp=tmp)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        return Path(broadcast(str(path) if path is not None else None) or checkpoints_dir / checkpoint_name(step))

    optimizer: torch.optim.Optimizer  # set by the trainer


def load_optimizer(checkpoint: Path | None, trainer_state: dict, model, optimizer) -> None:
    """The model and optimizer shards of a checkpoint (DCP, any world size), or the full optimizer
    state of a one-process checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_optimizer_state_dict,
        set_state_dict,
    )

    folder = Path(checkpoint or ".") / DCP_DIR
    if checkpoint is not None and folder.is_dir():
        _init_optimizer_state(optimizer)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        sd = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, checkpoint_id=str(folder))
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        return
    full = trainer_state.get("optimizer")
    if full is None:
        raise OprdError(f"checkpoint {checkpoint} has neither an optimizer state nor a {DCP_DIR}/ folder; "
                        "it cannot be resumed")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    by_name = {"state": {names[i]: s for i, s in full["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in full["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name,
                             options=StateDictOptions(full_state_dict=True))


def torch_gather_keys(stats: dict[str, float]) -> list[set[str]]:
    """Every rank's statistic names (a rank may lack one, e.g. a placeholder micro-batch's)."""
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, sorted(stats))
    return [set(k) for k in out]


def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's state tensors (zero step) so DCP has somewhere to load into."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and p not in optimizer.state:
                p.grad = torch.zeros_like(p)
    saved = [dict(g) for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    optimizer.step()
    for g, s in zip(optimizer.param_groups, saved):
        g["lr"] = s["lr"]
    optimizer.zero_grad(set_to_none=True)


class _Consolidated:
    """What :func:`save_checkpoint` needs of a model: ``save_pretrained`` with the full state dict."""

    def __init__(self, model, state_dict: dict[str, torch.Tensor]):
        self.model, self.sd = model, state_dict

    def save_pretrained(self, path, safe_serialization: bool = True) -> None:
        self.model.save_pretrained(path, state_dict=self.sd, safe_serialization=safe_serialization)


def placeholder(mb):
    """A micro-batch for a rank without rows in this step: it runs forward and backward (FSDP's
    collectives need every rank) but every mask is empty, so it adds nothing to loss or gradients."""
    from dataclasses import replace

    kw = {"response_mask": torch.zeros_like(mb.response_mask)}
    if mb.hidden_mask is not None:
        kw["hidden_mask"] = torch.zeros_like(mb.hidden_mask)
    return replace(mb, **kw)


def quiet_other_ranks(env: DistEnv) -> None:
    """Messages and progress from rank 0 only."""
    if env.enabled and not env.is_main:
        from oprd_cli.console import err_console

        err_console.quiet = True
