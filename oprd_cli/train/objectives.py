"""OPD+ and TrOPD in the actor step: their inputs gathered from a micro-batch, the loss call, their metrics.

Both are sampled-token objectives on the LM head's rows of the valid response tokens (``h`` ``[N, d]``
at ``(bi, ti)``, see :mod:`oprd_cli.train.step`):

- OPD+ (``opd-plus``) needs what top-1 OPD needs: the student's log-prob of each sampled token
  (chunked full-vocabulary log-softmax, :func:`~oprd_cli.backbone.token_logprobs`), the teacher's
  from the cache, and the behaviour log-probs for the PPO importance ratio of stale rollouts.
- TrOPD (``tropd``) also needs the student's full-vocabulary log-probs at the teacher's own top-k ids
  (sliced to ``tropd_topk``): one chunked, checkpointed LM-head pass gives the sampled token and the
  top-k together (:func:`~oprd_cli.backbone.logprobs_at`, ``logits[ids] - logsumexp(logits)``).
  The trust draw is made once per rollout sample from the rollout-time log-probs
  (:func:`~oprd_cli.losses.trust_mask` with ``seed = (run seed, round)`` and the sample's row in the
  store), so it does not depend on the batching, the step or the pass. The first ``prefix_len``
  tokens of a guided sample were written by the teacher: they get the guidance term only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from oprd_cli.backbone import logprobs_at, token_logprobs
from oprd_cli.errors import OprdError
from oprd_cli.losses import opd_plus_loss, tropd_loss, trust_mask

SAMPLED_OBJECTIVES = ("opd-plus", "tropd")


def prefix_masks(response_mask: Tensor, prefix_lens: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(prefix, continuation)`` bool ``[b, T]``: response tokens ``t < prefix_len`` (teacher-written)
    and the rest."""
    m = response_mask.bool()
    if prefix_lens is None:
        return torch.zeros_like(m), m
    t = torch.arange(m.shape[1], device=m.device)[None, :]
    g = (t < prefix_lens.to(m.device)[:, None]) & m
    return g, m & ~g


def trust_weights(mb, soft: bool) -> Tensor:
    """The trust draw (``soft``: its probability) of every continuation token of ``mb``, ``[b, T]``."""
    _, cont = prefix_masks(mb.response_mask, mb.prefix_lens)
    seed = mb.trust_seed if mb.trust_seed is not None else (0, 0)
    return trust_mask(mb.behaviour_logprobs, mb.teacher_logprobs, cont, seed=seed,
                      sample_ids=[int(r) for r in mb.rows], soft=soft)


def _scatter(values: Tensor, bi: Tensor, ti: Tensor, shape: tuple[int, ...], device) -> Tensor:
    return torch.zeros(shape, device=device, dtype=torch.float32).index_put((bi, ti), values.float())


def sampled_objective(model, h: Tensor, mb, bi: Tensor, ti: Tensor, behaviour: Tensor | None, cfg):
    """The OPD+ or TrOPD output (``reduction="sample"``, as the step weights it) of micro-batch ``mb``.
    ``cfg``: the :class:`~oprd_cli.train.config.LossConfig`; ``behaviour``: None on-policy."""
    if mb.teacher_logprobs is None:
        raise OprdError(f"{cfg.objective} needs teacher log-probs of the sampled tokens")
    rmask = mb.response_mask.bool()
    b, T = rmask.shape
    dev = h.device
    chunk = cfg.logits_chunk_tokens
    if cfg.objective == "opd-plus":
        lp = _scatter(token_logprobs(model, h, mb.response_ids[bi, ti], chunk), bi, ti, (b, T), dev)
        params = {"alpha": cfg.alpha} if cfg.alpha is not None else {}
        return opd_plus_loss(lp, mb.teacher_logprobs, rmask, divergence=cfg.divergence,
                             corrected=cfg.advantage == "corrected", log_ratio_clip=cfg.log_ratio_clip or None,
                             behaviour_logprobs=behaviour, clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
                             reduction="sample", **params)
    if mb.teacher_topk_ids is None or mb.teacher_topk_logprobs is None:
        raise OprdError("tropd needs the teacher's own top-k ids and log-probs (teacher-cache --logprobs topk)")
    ids = torch.cat([mb.response_ids[bi, ti][:, None], mb.teacher_topk_ids[bi, ti].long()], dim=-1)  # [N, 1+K]
    got = logprobs_at(model, h, ids, chunk).float()
    lp = _scatter(got[:, 0], bi, ti, (b, T), dev)
    lp_k = torch.zeros((b, T, ids.shape[-1] - 1), device=dev, dtype=torch.float32).index_put((bi, ti), got[:, 1:])
    prefix, _ = prefix_masks(rmask, mb.prefix_lens)
    trust = trust_weights(mb, soft=cfg.trust == "soft").to(dev)
    return tropd_loss(lp, lp_k, mb.teacher_logprobs, mb.teacher_topk_logprobs, rmask, trust, outlier=cfg.outlier,
                      tau=cfg.tau, logprob_floor=cfg.logprob_floor, prefix_mask=prefix,
                      guidance_beta=cfg.guidance_beta, behaviour_logprobs=behaviour, clip_eps=cfg.clip_eps,
                      clip_eps_high=cfg.clip_eps_high, reduction="sample")


_COUNTS = ("tropd/guidance_tokens",)  # summed over the step's micro-batches
_PER_SAMPLE = ("tropd/prefix_len",)  # means over samples


def add_metrics(o, acc, tok_w: float, sample_w: float) -> None:
    """``opd_plus/*`` or ``tropd/*`` of one micro-batch into the step's accumulator: token means
    weighted by the micro-batch's share of the step's tokens, ``tropd/prefix_len`` by its share of
    the samples, ``tropd/guidance_tokens`` summed. ``*/loss`` is left out (``opd/loss`` is the
    step's exact value)."""
    for key, value in o.metrics().items():
        if key.endswith("/loss") and key.count("/") == 1:
            continue
        acc.add(key, value if key in _COUNTS else value * (sample_w if key in _PER_SAMPLE else tok_w))
