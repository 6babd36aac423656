"""What every loss shares: argument checks, the working dtype and the masked token reductions.

Each loss module writes only its own arithmetic; the checks and reductions live here once:

- :func:`check_reduction`, :func:`check_shapes`: argument checks (``ValueError`` naming the loss);
- :func:`work_dtype`: float32 for half/bf16/float32 inputs, float64 for float64 (the unit tests);
- :func:`reduce_tokens`: a ``[B, T]`` per-token loss (0 at unsupervised tokens) to per-sample
  values and the ``"sample"`` or ``"token"`` mean;
- :func:`token_mean`: the detached masked token mean used for logged scalars.
"""

from __future__ import annotations

import torch
from torch import Tensor

REDUCTIONS = ("sample", "token")


def check_reduction(name: str, reduction: str) -> None:
    """``ValueError`` unless ``reduction`` is ``"sample"`` or ``"token"``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_shapes(name: str, ref_name: str, ref: Tensor, dims: str = "[B, T]", **tensors: Tensor | None) -> tuple[int, ...]:
    """``ValueError`` unless ``ref`` has ``len(dims)`` axes and every given tensor (``None`` skipped)
    has exactly ``ref``'s shape. ``dims`` is how the message writes the axes, e.g. ``"[B, T, K]"``.
    Returns ``ref``'s shape."""
    if ref.dim() != dims.count(",") + 1:
        raise ValueError(f"{name}: {ref_name} must be {dims}, got {tuple(ref.shape)}")
    shape = tuple(ref.shape)
    for key, t in tensors.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name}: {key} shape {tuple(t.shape)} != {shape}")
    return shape


def check_mask(name: str, mask: Tensor, shape: tuple[int, ...]) -> None:
    """``ValueError`` unless ``mask`` has exactly ``shape``."""
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name}: mask must have shape {tuple(shape)}, got {tuple(mask.shape)}")


def work_dtype(t: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 inputs."""
    return torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32


def reduce_tokens(per_token: Tensor, m: Tensor, reduction: str) -> tuple[Tensor, Tensor, Tensor]:
    """``per_token`` ``[B, T]`` (already 0 at unsupervised tokens), ``m`` ``[B, T]`` bool ->
    (per_sample ``[B]``, loss scalar, num_tokens ``[B]``), in ``per_token``'s dtype.

    ``per_sample`` is each sample's masked token mean (0 without supervised tokens). ``"sample"``:
    ``loss`` is the mean of ``per_sample`` over all ``B`` samples; ``"token"``: one mean over every
    supervised token of the batch."""
    n_tok = m.sum(dim=-1).to(per_token.dtype)  # [B]
    tok_sum = per_token.sum(dim=-1)  # [B]
    per_sample = tok_sum / n_tok.clamp_min(1.0)
    if reduction == "sample":
        loss = per_sample.mean() if per_sample.numel() > 0 else per_sample.sum()
    else:
        loss = tok_sum.sum() / n_tok.sum().clamp_min(1.0)
    return per_sample, loss, n_tok


def token_mean(x: Tensor, m: Tensor) -> Tensor:
    """Detached mean of ``x`` over the entries where ``m`` (bool, same shape) is true; 0 when none."""
    return x.detach().masked_fill(~m, 0.0).sum() / m.sum().clamp_min(1).to(x.dtype)
