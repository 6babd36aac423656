"""The policy-gradient surrogate of the sampled-token losses: importance ratio and PPO clipping.

One home for the per-token surrogate that top-1 OPD (:func:`~oprd_cli.losses.opd_top1_loss`), OPD+
(:func:`~oprd_cli.losses.opd_plus_loss`) and TrOPD's trust/clip terms
(:func:`~oprd_cli.losses.tropd_loss`) differentiate; each of them only chooses the advantage.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["MAX_LOG_RATIO", "pg_per_token"]

MAX_LOG_RATIO = 20.0  # exp(+-20) bounds the importance ratio before PPO clipping (as verl does)


def pg_per_token(
    logp: Tensor,
    adv: Tensor,
    m: Tensor,
    behaviour_logprobs: Tensor | None,
    clip_eps: float,
    clip_eps_high: float | None,
) -> tuple[Tensor, Tensor]:
    """Policy-gradient surrogate per token (``-rho_t A_t``, PPO-clipped with behaviour log-probs).

    ``logp`` ``[B, T]`` current student log-probs of the sampled tokens (with grad, 0 at
    unsupervised tokens), ``adv`` ``[B, T]`` detached advantages, ``m`` ``[B, T]`` bool.
    On-policy (``behaviour_logprobs=None``): ``-exp(logp - sg(logp)) * adv`` (value ``-adv``,
    gradient ``-adv * grad logp``). Otherwise ``max(-rho adv, -clip(rho, 1-eps, 1+eps_high) adv)``
    with ``rho = exp(clamp(logp - logp_old, +-20))`` and ``eps_high`` defaulting to ``clip_eps``.
    Returns (per-token surrogate in ``logp``'s dtype, 0 at unsupervised tokens; bool ``[B, T]``
    "PPO's clipped branch was selected and differs from the unclipped one", its gradient then 0).
    """
    if behaviour_logprobs is None:
        ratio = torch.exp(logp - logp.detach())
        per_token = -ratio * adv
        clipped = torch.zeros_like(m)
    else:
        eps_low = float(clip_eps)
        eps_high = float(clip_eps if clip_eps_high is None else clip_eps_high)
        logp_old = behaviour_logprobs.detach().to(device=logp.device, dtype=logp.dtype).masked_fill(~m, 0.0)
        ratio = torch.exp((logp - logp_old).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
        surr1 = -ratio * adv
        surr2 = -ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
        per_token = torch.maximum(surr1, surr2)
        clipped = (surr2 > surr1) & m
    return per_token.masked_fill(~m, 0.0), clipped
