"""One optimizer step of the student: micro-batches -> loss -> backward -> clip -> AdamW -> schedule.

This is the only implementation of the actor update; ``oprd train`` and ``oprd bench loss`` both call
:meth:`Trainer.train_step`.

Per micro-batch (:meth:`Trainer.micro_loss`):

- OPRD term (Eq. 6): the student's decoder runs WITHOUT the LM head and only as deep as the deepest
  cached layer (:func:`~oprd_cli.backbone.backbone_hidden`); its states are gathered at the
  cached positions and compared with the teacher's per layer (:func:`~oprd_cli.losses.oprd_loss`,
  called one layer at a time so the float32 copies stay ``[b, P, d]``). Hidden-state position: the
  state of response token ``y_t`` (prompt length ``Lp``) is the one at sequence index ``Lp + t``, the
  state that has read ``y_t`` (the release's ``hidden_states[l][:, -T:]``).
- OPD terms: log-prob position: the distribution over ``y_t`` comes from the final (post-norm) state
  at sequence index ``Lp - 1 + t``. Those states are gathered at the valid response tokens first
  (``[N, d]``, no padding), then the LM head runs on those rows only: full-vocabulary
  log-probs of the sampled tokens for top-1 (chunked, checkpointed), ``h @ W[S].T`` at the rollout's
  top-k ids for top-k (or, with ``topk_logits="full"``, the verl way: full logits, log-softmax,
  gather).

Gradient accumulation gives exactly the optimizer-batch loss: with ``reduction="sample"`` each
micro-batch contributes ``sum(per_sample) / B_step``; with ``"token"`` it contributes its token
(position) sum over the step's total tokens (positions).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from torch import Tensor

from oprd_cli.errors import OprdError
from oprd_cli.losses import bridge_loss, oprd_loss, opd_top1_loss, opd_topk_loss, topk_overlap
from oprd_cli.train import memory
from oprd_cli.train.config import TrainConfig
from oprd_cli.train.objectives import SAMPLED_OBJECTIVES, add_metrics, sampled_objective
from oprd_cli.train.schedule import warmup_cosine
from oprd_cli.backbone import (
    autocast_context,
    backbone_hidden,
    chunked_entropy,
    full_logprobs_at,
    support_logits,
    token_logprobs,
)


AUTO_CHECKPOINT_PARAM_FRACTION = 0.3  # auto: on when a micro-batch's activations exceed this share of the
AUTO_CHECKPOINT_MIN_BYTES = 256 << 20  # fp32 weights' bytes and this many bytes


def activation_bytes_per_token(config) -> int:
    """fp32 bytes a decoder block keeps for backward per token, summed over the blocks: about 16 d-wide
    and 3 MLP-wide vectors per token and block (norm inputs, q/k/v/o, residuals; gate, up, activation).
    Measured at the Qwen2-1.5B geometry (``oprd bench loss`` breakdown): 0.40 MiB per token at 2 blocks,
    this gives 0.39."""
    cfg = getattr(config, "text_config", None) or config
    d = int(cfg.hidden_size)
    mlp = int(getattr(cfg, "intermediate_size", None) or 4 * d)
    return int(cfg.num_hidden_layers) * (16 * d + 3 * mlp) * 4


def auto_checkpointing(model, tokens: int) -> bool:
    """``--gradient-checkpointing auto``: recompute each block in backward when the micro-batch's
    activations (``tokens`` x :func:`activation_bytes_per_token`) would exceed both 30% of the model's
    fp32 parameter bytes (the size of its gradients) and 256 MiB. At the Qwen2-1.5B geometry with two
    blocks that is above about 1,630 tokens per micro-batch; with all 28 blocks above about 370."""
    params = getattr(model, "_oprd_param_bytes", None)
    if params is None:
        params = 4 * sum(p.numel() for p in model.parameters())
        model._oprd_param_bytes = params
    act = tokens * activation_bytes_per_token(model.config)
    return act > AUTO_CHECKPOINT_PARAM_FRACTION * params and act > AUTO_CHECKPOINT_MIN_BYTES


def set_block_checkpointing(model, on: bool) -> None:
    """Switch the checkpointing that ``gradient_checkpointing_enable`` set up on or off (flags only)."""
    for m in model.modules():
        if hasattr(m, "gradient_checkpointing") and hasattr(m, "_gradient_checkpointing_func"):
            m.gradient_checkpointing = on


class NonFiniteLoss(OprdError):
    """The loss or the gradient norm of a step is NaN or infinite (the step is not applied)."""

    def __init__(self, step: int, what: str, value: float):
        self.step, self.what, self.value = step, what, value
        super().__init__(f"step {step}: {what} is {value}; training stopped before applying it")


@dataclass
class MicroBatch:
    """One forward/backward unit (all tensors on CPU until :meth:`to`).

    ``T`` is the longest response and ``P`` the most cached positions of the micro-batch; ``S`` is the
    longest ``prompt + response`` (the whole response: the last token's hidden state is supervised)."""

    rows: np.ndarray  # [b] sample rows (row i of the cache = row i of the rollout)
    input_ids: Tensor  # [b, S] int64, right-padded
    prompt_lens: Tensor  # [b] int64
    response_ids: Tensor  # [b, T] int64, 0 at padding
    response_mask: Tensor  # [b, T] bool
    behaviour_logprobs: Tensor | None = None  # [b, T] float32, pi_old(y_t) at rollout time
    support_ids: Tensor | None = None  # [b, T, K] int64, the rollout's student top-k ids
    teacher_hidden: Tensor | None = None  # [b, Lyr, P, d]
    hidden_mask: Tensor | None = None  # [b, P] bool
    hidden_positions: Tensor | None = None  # [b, P] int64 response position t, -1 at padding
    teacher_logprobs: Tensor | None = None  # [b, T] log q(y_t)
    support_logprobs: Tensor | None = None  # [b, T, K] log q at the support ids
    teacher_topk_ids: Tensor | None = None  # [b, T, K'] the teacher's own top-k ids
    teacher_topk_logprobs: Tensor | None = None  # [b, T, K'] the teacher's own top-k log-probs (tropd)
    prefix_lens: Tensor | None = None  # [b] int64 teacher-prefix tokens (guided rollouts)
    trust_seed: tuple | None = None  # (run seed, round): the TrOPD trust draw's seed

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum())

    @property
    def num_positions(self) -> int:
        return int(self.hidden_mask.sum()) if self.hidden_mask is not None else 0

    def to(self, device: torch.device) -> "MicroBatch":
        nb = device.type == "cuda"
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device, non_blocking=nb) if isinstance(v, Tensor) else v
        return MicroBatch(**kw)

    def pin_memory(self) -> "MicroBatch":
        kw = {f.name: (getattr(self, f.name).pin_memory() if isinstance(getattr(self, f.name), Tensor)
                       else getattr(self, f.name)) for f in fields(self)}
        return MicroBatch(**kw)


@dataclass
class StepTotals:
    """Denominators of the optimizer-batch loss (known before the first micro-batch runs)."""

    samples: int
    tokens: int
    positions: int

    @staticmethod
    def of(micro_batches: list[MicroBatch]) -> "StepTotals":
        return StepTotals(samples=sum(m.size for m in micro_batches),
                          tokens=sum(m.num_tokens for m in micro_batches),
                          positions=sum(m.num_positions for m in micro_batches))


@dataclass
class _Acc:
    """Weighted sums of detached per-step statistics. Values stay on the device (float64) and are
    read with one host sync per step (:meth:`values`)."""

    sums: dict[str, Tensor | float] = field(default_factory=dict)

    def add(self, key: str, value: Tensor | float) -> None:
        if isinstance(value, Tensor):
            value = value.detach().double()
        self.sums[key] = self.sums.get(key, 0.0) + value

    def values(self) -> dict[str, float]:
        if not self.sums:
            return {}
        dev = next((v.device for v in self.sums.values() if isinstance(v, Tensor)), torch.device("cpu"))
        flat = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=dev) for v in self.sums.values()])
        return dict(zip(self.sums, flat.tolist()))


def hidden_seq_index(prompt_lens: Tensor, positions: Tensor, seq_len: int) -> Tensor:
    """Sequence index of the hidden state of response position ``t``: ``Lp + t`` (the state that has
    read ``y_t``; the last prompt token's state is never supervised). ``prompt_lens`` ``[b]``,
    ``positions`` ``[b, P]`` (padding clamped to a valid index, the mask removes it) -> ``[b, P]``."""
    return (prompt_lens[:, None] + positions.clamp_min(0)).clamp(0, seq_len - 1)


def logprob_seq_index(prompt_lens: Tensor, t: Tensor) -> Tensor:
    """Sequence index whose output distribution predicts response token ``y_t``: ``Lp - 1 + t``.
    Not a hidden-state position (see :func:`hidden_seq_index`)."""
    return prompt_lens - 1 + t


def gather_positions(h: Tensor, seq_index: Tensor) -> Tensor:
    """``h`` ``[b, S, d]``, ``seq_index`` ``[b, P]`` (valid indices) -> ``[b, P, d]``."""
    return h.gather(1, seq_index[:, :, None].expand(-1, -1, h.shape[-1]))


def make_adamw(params: list[Tensor], lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
               device: torch.device) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has one (CPU and CUDA, floating parameters): one pass per
    parameter and no temporaries, where the foreach path (CUDA default) allocates copies of every
    moment and the for-loop path (CPU default) a ``sqrt`` temporary as large as the largest parameter
    (the embedding). Same update as the reference within float rounding."""
    fused = torch.device(device).type in ("cpu", "cuda") and all(
        p.is_floating_point() and not hasattr(p, "device_mesh") for p in params)  # DTensor (FSDP2): reference path
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             **({"fused": True} if fused and params else {}))


class Trainer:
    """The student, its AdamW optimizer and warm-up + cosine schedule, and the step function."""

    def __init__(self, model, config: TrainConfig, layers: list[int], device: torch.device,
                 total_steps: int | None, autocast_dtype: torch.dtype | None = None, bridge=None,
                 sharding=None):
        self.sharding = sharding  # train.distributed.Sharding under torchrun (model already FSDP-sharded)
        self.model = model
        self.bridge = bridge  # a Bridge: the representation term is the bridge loss at its student layers
        self.cfg = config
        self.layers = list(layers)
        self.device = device
        self.total_steps = total_steps
        self.autocast_dtype = autocast_dtype
        self.step = 0  # optimizer steps taken so far (global)
        opt = config.optim
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_adamw(params, opt.lr, (opt.adam_beta1, opt.adam_beta2), opt.adam_eps,
                                    opt.weight_decay, device)
        self.mem_phases: dict[str, int] | None = None  # set to {} to record the step's memory phases
        if sharding is not None:
            sharding.optimizer = self.optimizer
        self.scheduler, self.warmup = warmup_cosine(self.optimizer, total_steps, opt.warmup_ratio, opt.min_lr_ratio)
        self.checkpointing = config.runtime.checkpointing_mode  # on | off | auto (decided per micro-batch)
        self.checkpointed = 0  # micro-batches of the last step that ran with block checkpointing
        if self.checkpointing != "off" and sharding is None:  # sharded: enabled before fully_shard
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()

    def _checkpoint_blocks(self, mb: MicroBatch) -> bool:
        """Whether this micro-batch runs with block checkpointing; ``auto`` switches it here (sharded: it
        was decided once before ``fully_shard``, from the planned micro-batch size)."""
        if self.checkpointing == "auto" and self.sharding is None:
            set_block_checkpointing(self.model, auto_checkpointing(self.model, int(mb.input_ids.numel())))
        return self.checkpointing != "off" and bool(getattr(self.model, "is_activation_checkpointing", False))

    # ------------------------------------------------------------------ loss of one micro-batch
    def micro_loss(self, mb: MicroBatch, totals: StepTotals, on_policy: bool, acc: _Acc,
                   counts: tuple[int, int] | None = None) -> Tensor:
        """The micro-batch's share of the optimizer-batch loss (differentiable scalar); detached
        statistics go into ``acc`` with the same weights. ``counts``: the micro-batch's (tokens,
        positions), when already known on the host."""
        cfg = self.cfg.loss
        if cfg.uses_oprd and mb.teacher_hidden is None:
            raise OprdError("the OPRD term needs teacher hidden states, and this batch has none")
        with autocast_context(self.device, self.autocast_dtype):
            out = backbone_hidden(self.model, mb.input_ids, self.rep_layers if cfg.uses_oprd else [],
                                  need_final=cfg.uses_opd)
        self._probe("after_forward")
        n_tok, n_pos = counts if counts is not None else (mb.num_tokens, mb.num_positions)
        tok_w = n_tok / max(1, totals.tokens)  # this micro-batch's share of the step's tokens
        total = torch.zeros((), device=self.device, dtype=torch.float32)
        if cfg.uses_oprd:
            total = total + cfg.oprd_coef * self._oprd_term(out, mb, totals, n_pos / max(1, totals.positions), acc)
        if cfg.uses_opd:
            total = total + self._opd_term(out, mb, totals, on_policy, tok_w, acc)
        elif cfg.log_entropy:  # OPRD only, asked for explicitly: one LM-head pass without grad
            self._entropy(out, mb, tok_w, acc)
        self._probe("after_loss")
        return total

    def _probe(self, name: str) -> None:
        """With ``mem_phases`` set: the highest memory level seen at this point of the step."""
        if self.mem_phases is not None:
            self.mem_phases[name] = max(self.mem_phases.get(name, 0), memory.current_bytes(self.device))

    def _weights(self, counts: Tensor, step_total: int, samples: int) -> Tensor:
        """Per-sample weights of a micro-batch in the step's mean: ``1/B_step`` (``reduction="sample"``)
        or the sample's share of the step's tokens/positions (``"token"``)."""
        if self.cfg.loss.reduction == "sample":
            return torch.full((counts.shape[0],), 1.0 / max(1, samples), device=self.device)
        return counts / max(1, step_total)

    @property
    def rep_layers(self) -> list[int]:
        """Student layers of the representation term: the cached ones, or the bridge's."""
        return list(self.bridge.student_layers) if self.bridge is not None else self.layers

    def _layer_loss(self, j: int, s: Tensor, mb: MicroBatch, mask: Tensor):
        normalize = self.cfg.loss.oprd_form == "normalized"
        if self.bridge is None:
            return oprd_loss(s, mb.teacher_hidden[:, j:j + 1], mask, normalize=normalize, reduction="sample")
        return bridge_loss([s[:, 0]], [self.bridge.student_proj[j]], [mb.teacher_hidden[:, j]], mask,
                           normalize=normalize, reduction="sample")

    def _oprd_term(self, out, mb: MicroBatch, totals: StepTotals, pos_w: float, acc: _Acc) -> Tensor:
        """Eq. 6 over the cached layers (averaged), one layer at a time so the float32 copies stay
        ``[b, P, d]``; with a bridge, Eq. 14-15 (``teacher_hidden`` then holds ``z_T``)."""
        mask = mb.hidden_mask.bool()
        seq_index = hidden_seq_index(mb.prompt_lens, mb.hidden_positions.clamp_min(0), mb.input_ids.shape[1])
        w = self._weights(mask.sum(dim=-1).float(), totals.positions, totals.samples)
        layers = self.rep_layers
        n_layers = len(layers)
        per_sample = torch.zeros(mb.size, device=self.device, dtype=torch.float32)
        for j, layer in enumerate(layers):
            s = gather_positions(out.hidden[layer], seq_index)[:, None]  # [b, 1, P, d]
            o = self._layer_loss(j, s, mb, mask)
            per_sample = per_sample + o.per_sample / n_layers
            acc.add(f"rep/loss/layer_{layer:02d}", (o.per_sample.detach() * w).sum())
            acc.add(f"rep/cosine/layer_{layer:02d}", o.cosine * pos_w)
            acc.add("rep/cosine_similarity", o.cosine * (pos_w / n_layers))
        part = (per_sample * w).sum()
        acc.add("rep/loss", part)
        return part

    def _student_opd(self, h: Tensor, mb: MicroBatch, bi: Tensor, ti: Tensor, on_policy: bool):
        """The OPD loss output from the final states ``h`` ``[N, d]`` of the valid tokens ``(bi, ti)``."""
        cfg = self.cfg.loss
        if cfg.objective in SAMPLED_OBJECTIVES:  # OPD+ and TrOPD (train/objectives.py)
            return sampled_objective(self.model, h, mb, bi, ti, None if on_policy else mb.behaviour_logprobs, cfg)
        rmask = mb.response_mask.bool()
        b, T = rmask.shape
        if cfg.objective == "opd-top1":
            if mb.teacher_logprobs is None:
                raise OprdError("opd-top1 needs teacher log-probs of the sampled tokens")
            lp_flat = token_logprobs(self.model, h, mb.response_ids[bi, ti], cfg.logits_chunk_tokens)
            student_lp = torch.zeros((b, T), device=self.device, dtype=torch.float32).index_put((bi, ti),
                                                                                                  lp_flat.float())
            behaviour = None if on_policy else mb.behaviour_logprobs
            return opd_top1_loss(student_lp, mb.teacher_logprobs, rmask, behaviour_logprobs=behaviour,
                                 clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high, reduction="sample")
        if mb.support_ids is None or mb.support_logprobs is None:
            raise OprdError("opd-topk needs the rollout's top-k ids and the teacher's log-probs on them")
        ids = mb.support_ids[bi, ti]  # [N, K]
        if cfg.topk_logits == "full":  # verl / the paper's baseline: full logits, log-softmax, gather
            z = full_logprobs_at(self.model, h, ids, cfg.logits_chunk_tokens)
        else:
            z = support_logits(self.model, h, ids, cfg.logits_chunk_tokens).float()
        student_z = torch.zeros((b, T, ids.shape[-1]), device=self.device, dtype=torch.float32).index_put((bi, ti), z)
        return opd_topk_loss(student_z, mb.support_logprobs, rmask, reduction="sample")

    def _opd_term(self, out, mb: MicroBatch, totals: StepTotals, on_policy: bool, tok_w: float,
                  acc: _Acc) -> Tensor:
        """The OPD objective on the LM head's rows of the valid response tokens only."""
        bi, ti = mb.response_mask.bool().nonzero(as_tuple=True)  # valid response tokens, [N]
        h = out.final[bi, logprob_seq_index(mb.prompt_lens[bi], ti)]  # [N, d]: only the rows the loss needs
        with autocast_context(self.device, self.autocast_dtype):
            o = self._student_opd(h, mb, bi, ti, on_policy)
        part = (o.per_sample * self._weights(o.num_tokens, totals.tokens, totals.samples)).sum()
        acc.add("opd/loss", part)
        acc.add("opd/pg_loss", part)
        acc.add("opd/kl", o.kl * tok_w)
        acc.add("opd/clip_frac", o.clip_frac * tok_w)
        if self.cfg.loss.objective in SAMPLED_OBJECTIVES:
            add_metrics(o, acc, tok_w, mb.size / max(1, totals.samples))
        if mb.support_ids is not None and mb.teacher_topk_ids is not None \
                and mb.support_ids.shape[-1] == mb.teacher_topk_ids.shape[-1]:
            ov = topk_overlap(mb.support_ids[bi, ti], mb.teacher_topk_ids[bi, ti].to(mb.support_ids.dtype))
            acc.add("opd/topk_overlap", ov.mean() * tok_w if ov.numel() else 0.0)
        if self.cfg.loss.log_entropy:
            ent = chunked_entropy(self.model, h, self.cfg.loss.logits_chunk_tokens or 2048)
            acc.add("actor/entropy", ent.mean() * tok_w if ent.numel() else 0.0)
        return part

    def _entropy(self, out, mb: MicroBatch, tok_w: float, acc: _Acc) -> None:
        """``actor/entropy`` without grad (OPRD runs no LM head otherwise)."""
        bi, ti = mb.response_mask.bool().nonzero(as_tuple=True)
        with torch.no_grad():
            final = out.final
            if final is None:
                final = backbone_hidden(self.model, mb.input_ids, [], need_final=True).final
            ent = chunked_entropy(self.model, final[bi, logprob_seq_index(mb.prompt_lens[bi], ti)],
                                  self.cfg.loss.logits_chunk_tokens or 2048)
        acc.add("actor/entropy", ent.mean() * tok_w if ent.numel() else 0.0)

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, micro_batches: list[MicroBatch], on_policy: bool = False) -> dict:
        """Forward + backward over the micro-batches, gradient clipping, AdamW step, schedule step.

        Raises :class:`NonFiniteLoss` (without touching the weights) when the loss or the gradient
        norm is not finite. Returns the step's metrics (without run bookkeeping such as the cache).
        The loss and the statistics stay on the device until the step's end (one host sync)."""
        if not micro_batches:
            raise ValueError("train_step needs at least one micro-batch")
        dev = self.device
        step_no = self.step + 1
        totals = StepTotals.of(micro_batches) if self.sharding is None else \
            StepTotals(*self.sharding.global_totals(micro_batches))
        memory.reset_peak(dev)
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        acc = _Acc()
        lr = self.optimizer.param_groups[0]["lr"]
        self.checkpointed = 0
        for mb in micro_batches:
            counts = (mb.num_tokens, mb.num_positions)  # on the host, before the copy to the device
            self.checkpointed += self._checkpoint_blocks(mb)
            if self.sharding is None:
                loss = self.micro_loss(mb.to(dev), totals, on_policy, acc, counts)
            else:  # inside the FSDP root's forward; the loss stays out-of-place (FSDP2 and HF views)
                loss = self.sharding.run(lambda: self.micro_loss(mb.to(dev), totals, on_policy, acc, counts))
            acc.add("loss", loss)
            loss.backward()
            del loss
        stats = acc.values() if self.sharding is None else self.sharding.sum_stats(acc.values())
        loss_sum = stats.pop("loss")
        if not math.isfinite(loss_sum):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(step_no, "the loss", loss_sum)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        self._probe_window(params)
        grad_norm = _norm(torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.max_grad_norm)) if params else 0.0
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(step_no, "the gradient norm", grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        self.step = step_no
        metrics = {
            "step": step_no,
            "loss": loss_sum,
            "lr": lr,
            "grad_norm": grad_norm,
            "step_time_s": dt,
            "tokens_per_s": totals.tokens / max(dt, 1e-9),
            "peak_mem_bytes": self._step_peak(),
            "num_samples": totals.samples,
            "num_tokens": totals.tokens,
            "num_positions": totals.positions,
            "num_micro_batches": len(micro_batches),
        }
        metrics.update(stats)
        return metrics

    def _step_peak(self) -> int:
        """The step's peak (both windows when ``mem_phases`` split it)."""
        peak = memory.peak_bytes(self.device)
        if self.mem_phases is None:
            return peak
        self.mem_phases["opt_peak"] = peak
        return max(peak, self.mem_phases.get("fwd_bwd_peak", 0))

    def _probe_window(self, params: list[Tensor]) -> None:
        """With ``mem_phases`` set: close the forward/backward peak window (peak, level, gradient bytes
        and count) and open the optimizer's (clipping + AdamW)."""
        if self.mem_phases is None:
            return
        ph = self.mem_phases
        ph["fwd_bwd_peak"] = memory.peak_bytes(self.device)
        ph["after_backward"] = memory.current_bytes(self.device)
        ph["grad_bytes"] = sum(p.grad.numel() * p.grad.element_size() for p in params)
        ph["grad_params"] = sum(p.numel() for p in params)
        memory.reset_peak(self.device)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "step": self.step, "total_steps": self.total_steps, "warmup": self.warmup}

    def load_state_dict(self, state: dict, checkpoint=None) -> None:
        if self.sharding is not None or "optimizer" not in state:  # sharded run or sharded checkpoint (DCP)
            from oprd_cli.train.distributed import load_optimizer

            load_optimizer(checkpoint, state, self.model, self.optimizer)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])

    def params_finite(self) -> bool:
        local = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in self.model.parameters())
        return local if self.sharding is None else self.sharding.all_true(local)


def _norm(total_norm) -> float:
    """The gradient norm as a float (a sharded model's is a DTensor: its full value)."""
    full = getattr(total_norm, "full_tensor", None)
    return float(full() if callable(full) else total_norm)
