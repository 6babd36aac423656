"""Diagnostics the papers track, as pure tensor functions (no file I/O, no model calls).

``entropy_from_logits`` and ``topk_overlap`` return detached float32 tensors for logging.
``masked_mean`` is a plain masked reduction that follows its input's autograd (the losses use it
too); call ``.detach()``/``.item()`` on its result when logging.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["entropy_from_logits", "masked_mean", "topk_overlap", "topk_overlap_from_logits"]


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean of ``x`` over the entries where ``mask`` is true.

    Shapes: ``x`` ``[...]``; ``mask`` ``[...]`` broadcastable to ``x`` (bool or 0/1; any non-zero
    counts as true). ``dim=None`` reduces everything to a scalar, otherwise only ``dim``.
    Returns float32 (or float64 for float64 input). An empty selection gives 0, never NaN, and values
    at masked-out entries (even NaN/inf) never reach the result or its gradient.
    """
    m = torch.broadcast_to(mask.to(device=x.device).bool(), x.shape)
    xf = x if x.dtype == torch.float64 else x.float()
    xf = xf.masked_fill(~m, 0.0)
    if dim is None:
        return xf.sum() / m.sum().clamp_min(1).to(xf.dtype)
    return xf.sum(dim=dim) / m.sum(dim=dim).clamp_min(1).to(xf.dtype)


@torch.no_grad()
def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy ``-sum_v p_v log p_v`` of ``softmax(logits)`` along the last axis, in nats.

    Shapes: ``logits`` ``[..., V]`` (any float dtype; ``-inf`` entries are allowed, they have zero
    probability and contribute 0) -> ``[...]`` float32, detached. A row of only ``-inf`` gives NaN
    (there is no distribution); mask such rows before logging.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
    return -plogp.sum(dim=-1)


@torch.no_grad()
def topk_overlap(student_ids: Tensor, teacher_ids: Tensor) -> Tensor:
    """Overlap ``|S ∩ T| / k`` of two top-k id sets, e.g. the paper's top-16 overlap.

    Shapes: ``student_ids`` ``[..., k]``, ``teacher_ids`` ``[..., k]`` (integer ids, unique within a
    row, as ``torch.topk`` returns them) -> ``[...]`` float32 in ``[0, 1]``, detached.
    """
    if student_ids.shape != teacher_ids.shape:
        raise ValueError(f"topk_overlap: shapes differ, {tuple(student_ids.shape)} vs {tuple(teacher_ids.shape)}")
    k = student_ids.shape[-1]
    hit = (student_ids.unsqueeze(-1) == teacher_ids.unsqueeze(-2)).any(dim=-1)  # [..., k]
    return hit.sum(dim=-1).float() / max(k, 1)


@torch.no_grad()
def topk_overlap_from_logits(student_logits: Tensor, teacher_logits: Tensor, k: int = 16) -> Tensor:
    """``topk_overlap`` of the top-k ids of two ``[..., V]`` logit tensors -> ``[...]`` float32."""
    k = min(k, student_logits.shape[-1], teacher_logits.shape[-1])
    return topk_overlap(student_logits.topk(k, dim=-1).indices, teacher_logits.topk(k, dim=-1).indices)
