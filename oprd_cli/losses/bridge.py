"""OPRD-Bridge: representation loss through frozen projections (METHOD.md, Eq. 14-15).

    L_bridge = 1/|Llayer| * sum_l  mean_{supervised t}  (1/r) * || n(P_S^(l) h^(l)_{s,t}) - n(sg(z^(l)_{T,t})) ||^2

with ``z_T = P_T (h_T - mu_T)`` (computed by :func:`oprd_cli.bridge.project_teacher`, usually read
from a cache) and ``n(v) = v / ||v||`` in the default (release) form. A pure function of tensors,
reduced like :func:`oprd_cli.losses.oprd_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from oprd_cli.losses.common import check_reduction
from oprd_cli.losses.oprd import OprdOutput, masked_cosine, position_error, reduce_layers

__all__ = ["BridgeOutput", "bridge_loss"]


@dataclass
class BridgeOutput(OprdOutput):
    """Result of :func:`bridge_loss` (all float32): the fields of :class:`OprdOutput`, measured in
    the projected space.

    - ``per_sample`` ``[B]``, differentiable: per sample, the mean over layers of its masked mean
      over positions (0 for a sample without supervised positions).
    - ``loss`` scalar, differentiable: ``per_sample.mean()`` (``"sample"``) or one mean over every
      supervised position of the batch, averaged over layers (``"token"``).
    - ``per_layer`` ``[Lyr]``, detached, under the same reduction: ``per_layer.mean() == loss``.
    - ``cosine`` scalar and ``per_layer_cosine`` ``[Lyr]``, detached: cosine of ``P_S h_s`` and
      ``z_T`` in the projected space, averaged over the supervised positions (per layer, then layers).
    - ``num_positions`` ``[B]``, detached: supervised positions per sample.
    """


def _as_layers(x: Tensor | Sequence[Tensor]) -> list[Tensor]:
    if isinstance(x, Tensor):
        return list(x.unbind(0))
    return list(x)


def bridge_loss(
    student_hidden: Tensor | Sequence[Tensor],
    student_proj: Tensor | Sequence[Tensor],
    teacher_z: Tensor | Sequence[Tensor],
    mask: Tensor,
    normalize: bool = True,
    reduction: str = "token",
) -> BridgeOutput:
    """OPRD loss in the bridge's shared subspace, Eq. 14-15.

    Shapes (layer-first; a tensor is unbound along dim 0, a list is taken as it is):
      - ``student_hidden``: ``[Lyr, B, T, d_S]`` or ``Lyr`` tensors ``[B, T, d_S]``: the student's
        states at the supervised layers and positions, with grad, any float dtype.
      - ``student_proj``: ``[Lyr, r, d_S]`` or ``Lyr`` tensors ``[r, d_S]``: the frozen ``P_S``
        (``Bridge.student_proj``). Always detached: ``P_S`` never receives a gradient, even with
        ``requires_grad=True``; the gradient flows through it to ``student_hidden``.
      - ``teacher_z``: ``[Lyr, B, T, r]`` or ``Lyr`` tensors ``[B, T, r]``: ``P_T (h_T - mu_T)`` at
        the paired teacher positions, any float dtype; a constant (stop-gradient).
      - ``mask``: ``[B, T]`` bool or 0/1, true at supervised positions (padding, and positions
        without a cross-tokenizer partner, false).

    Per position the error is ``(1/r) * ||a - b||^2`` with ``a = P_S h_s``, ``b = z_T``, both
    L2-normalised when ``normalize`` (the default, as the release; then the error is
    ``(2 - 2 cos)/r``). The math runs in float32; values at unsupervised positions (even NaN/inf)
    change neither the loss nor the gradient. ``reduction`` as in ``oprd_loss``: ``"token"``
    (default, the release: mean over every supervised position of the batch, then layers) or
    ``"sample"`` (Eq. 6 literally: per sample first).
    """
    check_reduction("bridge_loss", reduction)
    hs = _as_layers(student_hidden)
    ws = _as_layers(student_proj)
    zs = _as_layers(teacher_z)
    n_layers = len(hs)
    if n_layers == 0 or len(ws) != n_layers or len(zs) != n_layers:
        raise ValueError(f"bridge_loss: need the same non-zero number of layers in student_hidden ({n_layers}), "
                         f"student_proj ({len(ws)}) and teacher_z ({len(zs)})")
    if hs[0].dim() != 3:
        raise ValueError(f"bridge_loss: student states must be [B, T, d_S] per layer, got {tuple(hs[0].shape)}")
    B, T, _ = hs[0].shape
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"bridge_loss: mask must be [B, T] = {(B, T)}, got {tuple(mask.shape)}")
    device = hs[0].device
    m = mask.to(device=device).bool()
    m3 = m[:, :, None]
    n_pos = m.sum(dim=-1).float()  # [B]

    layer_sums, layer_cos = [], []
    for h, w, z in zip(hs, ws, zs):
        r, d_s = w.shape
        if tuple(h.shape) != (B, T, d_s):
            raise ValueError(f"bridge_loss: student states {tuple(h.shape)} do not fit P_S {tuple(w.shape)} "
                             f"and mask {(B, T)}")
        if tuple(z.shape) != (B, T, r):
            raise ValueError(f"bridge_loss: teacher_z must be [B, T, r] = {(B, T, r)}, got {tuple(z.shape)}")
        # Mask the inputs first so garbage at unsupervised positions reaches neither values nor grads.
        a = h.float().masked_fill(~m3, 0.0) @ w.detach().to(device=device, dtype=torch.float32).T  # [B, T, r]
        b = z.detach().to(device=device, dtype=torch.float32).masked_fill(~m3, 0.0)
        layer_sums.append(position_error(a, b, normalize).masked_fill(~m, 0.0).sum(dim=-1))  # [B]
        layer_cos.append(masked_cosine(a.detach(), b, m))

    per_sample, loss, per_layer = reduce_layers(torch.stack(layer_sums, dim=1), n_pos, reduction)
    per_layer_cosine = torch.stack(layer_cos)
    return BridgeOutput(
        per_sample=per_sample,
        loss=loss,
        per_layer=per_layer,
        cosine=per_layer_cosine.mean(),
        per_layer_cosine=per_layer_cosine,
        num_positions=n_pos.detach(),
    )
