"""OPRD-Vanilla: on-policy representation distillation loss (METHOD.md, Eq. 6).

    L_OPRD = E_x [ 1/|Llayer| * sum_l 1/(sum_t m_t) * sum_t m_t * (1/d) * || h^(l)_{s,t} - sg(h^(l)_{T,t}) ||^2 ]

The defaults follow the authors' release: both vectors L2-normalised before the squared error
(``normalize=True``), per-token errors averaged over every supervised token of the batch, then over
layers (``reduction="token"``). The raw form and the per-sample mean (Eq. 6 read literally) are
options. A pure function of tensors. The caller selects layers and positions (``Llayer`` and
``m_t``) and passes the stacked hidden states; this module only does the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from oprd_cli.losses.common import check_reduction

__all__ = ["OprdOutput", "oprd_loss"]

_NORM_EPS = 1e-12  # as F.normalize: v / max(||v||, eps)


@dataclass
class OprdOutput:
    """Result of :func:`oprd_loss` (all float32).

    - ``per_sample`` ``[B]``, differentiable: Eq. 6 for each sample (mean over layers of the masked
      mean over positions of the per-position error). 0 for a sample without supervised positions.
    - ``loss`` scalar, differentiable: ``per_sample.mean()`` (reduction ``"sample"``) or the mean over
      every supervised position of the batch (reduction ``"token"``).
    - ``per_layer`` ``[Lyr]``, detached: the loss of each layer under the same reduction, so that
      ``per_layer.mean() == loss``.
    - ``cosine`` scalar, detached: cosine similarity of student and teacher hidden states, averaged
      over all supervised positions of the batch per layer, then over layers (``rep/cosine_similarity``).
      0 when the batch has no supervised position.
    - ``per_layer_cosine`` ``[Lyr]``, detached.
    - ``num_positions`` ``[B]``, detached: supervised positions per sample (float), e.g. to weight
      micro-batches when accumulating a token-level mean.
    """

    per_sample: Tensor
    loss: Tensor
    per_layer: Tensor
    cosine: Tensor
    per_layer_cosine: Tensor
    num_positions: Tensor


def l2_normalize(x: Tensor) -> Tensor:
    """``x / max(||x||, eps)`` along the last axis, as ``F.normalize``; written through the squared
    norm so that the backward pass is finite at ``x = 0`` (masked positions)."""
    sq = x.square().sum(dim=-1, keepdim=True)
    return x * torch.rsqrt(sq.clamp_min(_NORM_EPS * _NORM_EPS))


def position_error(a: Tensor, b: Tensor, normalize: bool) -> Tensor:
    """``(1/d) ||a - b||^2`` over the last axis, of the L2-normalised vectors when ``normalize``.

    ``a, b`` ``[..., d]`` float32, already 0 at unsupervised positions (so garbage there reaches
    neither values nor gradients; a zero vector normalises to zero) -> ``[...]``."""
    if normalize:
        a, b = l2_normalize(a), l2_normalize(b)
    return (a - b).square().mean(dim=-1)


def reduce_layers(layer_sum: Tensor, n_pos: Tensor, reduction: str) -> tuple[Tensor, Tensor, Tensor]:
    """The representation losses' reduction of ``layer_sum`` ``[B, Lyr]`` (per sample and layer, the
    sum of the position errors) with ``n_pos`` ``[B]`` supervised positions per sample ->
    (per_sample ``[B]``, loss, per_layer ``[Lyr]`` detached), as :class:`OprdOutput` defines them."""
    B, n_layers = layer_sum.shape
    per_sample_layer = layer_sum / n_pos.clamp_min(1.0)[:, None]  # [B, Lyr]
    per_sample = per_sample_layer.mean(dim=-1)  # [B]
    if reduction == "sample":
        loss = per_sample.mean() if B > 0 else per_sample.sum()
        per_layer = per_sample_layer.detach().mean(dim=0) if B > 0 else per_sample_layer.detach().sum(dim=0)
    else:
        total = n_pos.sum().clamp_min(1.0)
        loss = layer_sum.sum() / (total * n_layers) if n_layers > 0 else layer_sum.sum()
        per_layer = layer_sum.detach().sum(dim=0) / total
    return per_sample, loss, per_layer


@torch.no_grad()
def masked_cosine(a: Tensor, b: Tensor, m: Tensor) -> Tensor:
    """Mean over the supervised positions of ``cos(a, b)``: ``a, b`` ``[B, P, d]`` float32, ``m``
    ``[B, P]`` bool -> scalar (0 without supervised positions; norms clamped at 1e-12)."""
    m3 = m[:, :, None]
    a = a.masked_fill(~m3, 0.0)
    b = b.masked_fill(~m3, 0.0)
    dot = (a * b).sum(dim=-1)
    na = a.square().sum(dim=-1).sqrt().clamp_min(_NORM_EPS)
    nb = b.square().sum(dim=-1).sqrt().clamp_min(_NORM_EPS)
    cos = (dot / (na * nb)).masked_fill(~m, 0.0)  # [B, P]
    return cos.sum() / m.sum().clamp_min(1).float()


def oprd_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    mask: Tensor,
    normalize: bool = True,
    reduction: str = "token",
) -> OprdOutput:
    """OPRD loss between student and (stop-gradient) teacher hidden states, Eq. 6.

    Shapes:
      - ``student_hidden``: ``[B, Lyr, P, d]``, the student's hidden states at the supervised layers
        and the candidate positions, with grad; any float dtype.
      - ``teacher_hidden``: ``[B, Lyr, P, d]``, the teacher's states at the same layers and positions;
        any float dtype (bf16/fp16 from a cache is fine). Always treated as a constant
        (stop-gradient): it never receives a gradient, even with ``requires_grad=True``.
      - ``mask``: ``[B, P]`` bool or 0/1, true at supervised positions (``m_t``; padding false).

    The math runs in float32 whatever the input dtypes; the gradient reaches ``student_hidden`` in
    its own dtype. Values at unsupervised positions (padding, even NaN/inf) change neither the loss
    nor the gradient, and the student's gradient there is exactly 0.

    Per position the error is ``e = (1/d) * ||a - b||^2`` with
      - ``normalize=True`` (default): ``a = h_s/||h_s||``, ``b = h_t/||h_t||`` (the paper's
        "normalized MSE" as the authors' release computes it; ``e = (2 - 2 cos)/d``);
      - ``normalize=False``: ``a, b`` the raw hidden states (Eq. 6 as typeset).
      The ``1/d`` factor is kept in both forms (mean over the hidden axis, as ``F.mse_loss`` computes it).

    ``reduction``:
      - ``"token"`` (default, the release): see below.
      - ``"sample"``: Eq. 6 literally: per sample the masked mean over its positions, averaged over
        layers; ``loss`` is the mean over all ``B`` samples (a sample without supervised positions
        contributes 0 but still counts in ``B``).
      - ``"token"``: one masked mean over every supervised position of the batch (averaged over
        layers), i.e. samples weighted by their number of supervised positions.

    Returns an :class:`OprdOutput`.
    """
    check_reduction("oprd_loss", reduction)
    if student_hidden.dim() != 4:
        raise ValueError(f"oprd_loss: student_hidden must be [B, Lyr, P, d], got shape {tuple(student_hidden.shape)}")
    if teacher_hidden.shape != student_hidden.shape:
        raise ValueError(
            f"oprd_loss: teacher_hidden shape {tuple(teacher_hidden.shape)} != student_hidden shape "
            f"{tuple(student_hidden.shape)}"
        )
    B, n_layers, P, d = student_hidden.shape
    if tuple(mask.shape) != (B, P):
        raise ValueError(f"oprd_loss: mask must be [B, P] = {(B, P)}, got {tuple(mask.shape)}")

    device = student_hidden.device
    m = mask.to(device=device).bool()  # [B, P]
    m4 = m[:, None, :, None]  # [B, 1, P, 1]
    s = student_hidden.float()
    t = teacher_hidden.detach().to(device=device, dtype=torch.float32)

    # Mask the inputs first so garbage at padded positions cannot reach the norms' backward.
    err = position_error(s.masked_fill(~m4, 0.0), t.masked_fill(~m4, 0.0), normalize)  # [B, Lyr, P], 0 at padding
    n_pos = m.sum(dim=-1).float()  # [B]
    per_sample, loss, per_layer = reduce_layers(err.sum(dim=-1), n_pos, reduction)

    per_layer_cosine = torch.zeros(n_layers, dtype=torch.float32, device=device)
    for j in range(n_layers):  # one layer at a time bounds the temporaries
        per_layer_cosine[j] = masked_cosine(s[:, j].detach(), t[:, j], m)
    cosine = per_layer_cosine.mean() if n_layers > 0 else per_layer_cosine.sum()
    return OprdOutput(
        per_sample=per_sample,
        loss=loss,
        per_layer=per_layer,
        cosine=cosine,
        per_layer_cosine=per_layer_cosine,
        num_positions=n_pos.detach(),
    )
