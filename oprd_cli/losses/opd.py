"""Output-space on-policy distillation (OPD) losses: sampled-token (top-1), top-k and full vocabulary.

All three minimise the per-token reverse KL ``KL(p_t || q_t)`` between the student ``p_t`` and the
teacher ``q_t`` on student rollouts (METHOD.md, "Output-space OPD"). Pure functions of tensors; the
math runs in float32 whatever the input dtypes, teacher inputs are always stop-gradient, and values
at unsupervised (padded) tokens, even NaN/inf, reach neither the loss nor the gradient.

Reductions (every function): ``"sample"`` takes per sample the masked mean over its tokens, then the
mean over all ``B`` samples (a sample without supervised tokens contributes 0 and still counts);
``"token"`` takes one masked mean over every supervised token of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from oprd_cli.losses.common import check_mask, check_reduction, check_shapes, reduce_tokens, token_mean
from oprd_cli.losses.pg import pg_per_token

__all__ = ["OpdOutput", "opd_top1_loss", "opd_topk_loss", "opd_full_loss"]

DEFAULT_TEACHER_LOGPROB_FLOOR = -100.0


@dataclass
class OpdOutput:
    """Result of the OPD losses (all float32).

    - ``per_sample`` ``[B]``, differentiable: the per-sample loss under the chosen reduction's
      per-sample definition (masked mean over the sample's tokens).
    - ``loss`` scalar, differentiable.
    - ``kl`` scalar, detached: masked mean over all supervised tokens of the per-token reverse-KL
      value (top-1: the sampled-token estimate ``log p(y) - log q(y)``; top-k/full: exact).
    - ``pg_loss`` scalar, detached: top-1: the policy-gradient surrogate (equal to ``loss``); top-k and
      full: equal to ``loss``.
    - ``clip_frac`` scalar, detached: fraction of supervised tokens where PPO clipping was active
      (always 0 for top-k/full and for on-policy top-1).
    - ``num_tokens`` ``[B]``, detached: supervised tokens per sample (float).
    """

    per_sample: Tensor
    loss: Tensor
    kl: Tensor
    pg_loss: Tensor
    clip_frac: Tensor
    num_tokens: Tensor


def opd_top1_loss(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    behaviour_logprobs: Tensor | None = None,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    reduction: str = "sample",
) -> OpdOutput:
    """Sampled-token (top-1) OPD as a policy gradient with a per-token reverse-KL reward.

    Shapes (``B`` samples, ``T`` response tokens):
      - ``student_logprobs``: ``[B, T]`` ``log pi_theta(y_t)`` of the sampled tokens under the
        CURRENT student, with grad.
      - ``teacher_logprobs``: ``[B, T]`` ``log q(y_t)`` (from the cache; stop-gradient).
      - ``mask``: ``[B, T]`` bool or 0/1, true at supervised response tokens.
      - ``behaviour_logprobs``: ``[B, T]`` ``log pi_old(y_t)`` recorded at sampling time, or ``None``
        for exactly on-policy data (then the ratio is 1 and no clipping happens).

    Per token, with everything in float32:
      - reverse-KL estimate ``l_t = log pi_theta(y_t) - log q(y_t)`` and reward/advantage
        ``A_t = -sg(l_t)`` (stop-gradient);
      - ratio ``rho_t = exp(log pi_theta(y_t) - log pi_old(y_t))`` (log-ratio clamped to +-20 before
        ``exp``; on-policy ``rho_t = exp(logp - sg(logp))``, which is 1 with gradient
        ``grad log pi_theta``);
      - loss ``-min(rho_t A_t, clip(rho_t, 1 - clip_eps, 1 + clip_eps_high) A_t)``
        (``clip_eps_high`` defaults to ``clip_eps``). Unclipped, the loss value equals
        ``rho_t * l_t``, so on-policy ``loss`` reads as the sampled-token KL estimate.

    Which log-prob the advantage uses, and why: the CURRENT student's, ``log pi_theta(y_t)``
    (detached), not the behaviour ``log pi_old(y_t)``. The target is
    ``grad KL(pi_theta || q) = grad E_{y~pi_theta}[log pi_theta(y) - log q(y)]
    = E_{pi_theta}[(log pi_theta - log q) grad log pi_theta] + E_{pi_theta}[grad log pi_theta]``,
    and the second (pathwise) term is 0 by the score-function identity, which is why stopping the
    gradient through the reward loses nothing for reverse KL. With samples from ``pi_old``,
    importance weighting gives ``E_{y~pi_old}[(log pi_theta(y) - log q(y)) grad rho(y)]``: the
    gradient of ``-rho * A`` with ``A = -sg(log pi_theta - log q)``. That is unbiased for any
    ``pi_old`` (before clipping). Had ``A`` used ``log pi_old`` instead, the expected gradient would
    be ``grad_theta E_{pi_theta}[log pi_old - log q] = grad KL(pi_theta||q) - grad KL(pi_theta||pi_old)``:
    correct only while ``pi_theta = pi_old`` (the first update on a fresh rollout) and otherwise
    biased by a term that rewards moving away from the behaviour policy. Unlike a fixed
    environment reward, this "reward" depends on the policy being trained, so it must be
    recomputed from the current log-probs. Clipping then adds PPO's usual trust-region bias, only on
    tokens where ``rho_t`` leaves ``[1 - clip_eps, 1 + clip_eps_high]`` in the direction ``A_t`` favours.

    The advantage is per token (no reward-to-go): the gradient is that of ``sum_t KL(p_t || q_t)``
    with the prefixes' distribution held fixed, the usual OPD choice.

    Outputs: ``kl`` is the masked mean of ``log pi_theta(y_t) - log q(y_t)`` with the current
    student log-probs (with behaviour log-probs the tokens come from ``pi_old``, so it estimates
    ``E_{pi_old}[log pi_theta - log q]``, which equals the reverse KL on-policy); ``clip_frac`` is the
    fraction of supervised tokens where the clipped branch was selected and differs from the
    unclipped one (its gradient is then 0). A ``-inf`` teacher log-prob on a supervised token gives
    an infinite loss by definition of the KL; mask such tokens.
    """
    name = "opd_top1_loss"
    check_reduction(name, reduction)
    shape = check_shapes(name, "student_logprobs", student_logprobs, teacher_logprobs=teacher_logprobs,
                         behaviour_logprobs=behaviour_logprobs)
    check_mask(name, mask, shape)

    device = student_logprobs.device
    m = mask.to(device=device).bool()
    logp = student_logprobs.float().masked_fill(~m, 0.0)
    logq = teacher_logprobs.detach().to(device=device, dtype=torch.float32).masked_fill(~m, 0.0)

    l_tok = logp.detach() - logq  # sampled-token reverse-KL estimate, current student
    per_token, clipped = pg_per_token(logp, -l_tok, m, behaviour_logprobs, clip_eps, clip_eps_high)
    return _opd_output(per_token, m, reduction, l_tok, clipped)


def _opd_output(per_token: Tensor, m: Tensor, reduction: str, kl_tok: Tensor, clipped: Tensor) -> OpdOutput:
    """Reduce ``per_token`` ``[B, T]`` float32 and fill :class:`OpdOutput`: ``kl_tok`` ``[B, T]`` the
    per-token KL values, ``clipped`` ``[B, T]`` bool where PPO clipping was active."""
    per_sample, loss, n_tok = reduce_tokens(per_token, m, reduction)
    return OpdOutput(
        per_sample=per_sample,
        loss=loss,
        kl=token_mean(kl_tok, m),
        pg_loss=loss.detach(),
        clip_frac=token_mean(clipped.float(), m),
        num_tokens=n_tok.detach(),
    )


def _kl_from_logprobs(logp: Tensor, logq: Tensor) -> Tensor:
    """``sum_v p_v (log p_v - log q_v)`` along the last axis; ``logp`` may hold ``-inf`` (zero mass,
    contributes exactly 0 with a finite gradient), ``logq`` must be finite."""
    p = logp.exp()
    logp_safe = torch.where(p > 0, logp, torch.zeros_like(logp))
    return (p * (logp_safe - logq)).sum(dim=-1)


def opd_topk_loss(
    student_support_logits: Tensor,
    teacher_support_logprobs: Tensor,
    mask: Tensor,
    reduction: str = "sample",
    teacher_logprob_floor: float = DEFAULT_TEACHER_LOGPROB_FLOOR,
) -> OpdOutput:
    """Top-k OPD: exact reverse KL between student and teacher, both renormalised on the support.

    Shapes:
      - ``student_support_logits``: ``[B, T, K]`` the current student's logits at the support ids
        ``S_t`` (the student's top-k recorded at rollout time), with grad. Only differences within a
        row matter, so ``h @ W[S_t].T`` (no full-vocabulary logits) is enough. ``-inf`` entries mean
        zero mass and contribute 0.
      - ``teacher_support_logprobs``: ``[B, T, K]`` the teacher's full-vocabulary log-probs at the
        same ids (stop-gradient). ``-inf`` entries (e.g. an id outside the teacher's vocabulary) are
        allowed: they are floored at ``teacher_logprob_floor`` (default -100, i.e. "essentially
        impossible"), giving a large but finite penalty on student mass there and no NaN. The floor
        is applied as ``clamp_min`` before renormalisation, so ordinary values are untouched. A token
        whose K teacher entries are all ``-inf`` becomes a uniform ``q_S``; mask such tokens.
      - ``mask``: ``[B, T]`` bool or 0/1.

    Per token: ``log p_S = log_softmax(student_support_logits)``,
    ``log q_S = log_softmax(max(teacher_support_logprobs, floor))`` over the K entries, and the loss
    is ``KL(p_S || q_S) = sum_k p_S,k (log p_S,k - log q_S,k)``, exact and differentiable (no
    sampling). With K = V and the full-vocabulary logits this equals :func:`opd_full_loss`.
    ``kl`` is the masked token mean of the same values; ``pg_loss`` equals ``loss``; ``clip_frac``
    is 0.
    """
    check_reduction("opd_topk_loss", reduction)
    check_shapes("opd_topk_loss", "student_support_logits", student_support_logits, "[B, T, K]",
                 teacher_support_logprobs=teacher_support_logprobs)
    return _exact_kl_loss("opd_topk_loss", student_support_logits, teacher_support_logprobs, mask, reduction,
                          teacher_logprob_floor)


def opd_full_loss(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor,
    reduction: str = "sample", teacher_logprob_floor: float = DEFAULT_TEACHER_LOGPROB_FLOOR,
) -> OpdOutput:
    """Full-vocabulary OPD: exact ``KL(p_t || q_t) = sum_v p_t(v) log(p_t(v)/q_t(v))`` per token.

    Shapes: ``student_logits`` ``[B, T, V]`` (with grad), ``teacher_logits`` ``[B, T, V]``
    (stop-gradient; the same vocabulary, slice a padded vocabulary first), ``mask`` ``[B, T]``.
    ``p = softmax(student_logits)``, ``log q = max(log_softmax(teacher_logits), floor)``; the floor
    (default -100) only matters for ``-inf`` teacher logits. Memory: a few float32 ``[B, T, V]``
    temporaries; chunk over T for long responses. ``kl`` is the masked token mean of the per-token
    KL; ``pg_loss`` equals ``loss``; ``clip_frac`` is 0.
    """
    check_reduction("opd_full_loss", reduction)
    check_shapes("opd_full_loss", "student_logits", student_logits, "[B, T, V]", teacher_logits=teacher_logits)
    return _exact_kl_loss("opd_full_loss", student_logits, teacher_logits, mask, reduction, teacher_logprob_floor,
                          floor_after=True)


def _exact_kl_loss(
    name: str,
    student_logits: Tensor,
    teacher_scores: Tensor,
    mask: Tensor,
    reduction: str,
    floor: float,
    floor_after: bool = False,
) -> OpdOutput:
    """Shared body of top-k and full: ``[B, T, K|V]`` logits/log-probs -> per-token exact KL.

    ``floor_after=False`` (top-k): clamp the teacher's log-probs, then renormalise on the support.
    ``floor_after=True`` (full): log-softmax the teacher's logits, then clamp. Checks
    the mask (the caller has checked the reduction and the two score tensors)."""
    check_mask(name, mask, tuple(student_logits.shape[:2]))
    device = student_logits.device
    m = mask.to(device=device).bool()
    m3 = m[:, :, None]
    z = student_logits.float().masked_fill(~m3, 0.0)
    tq = teacher_scores.detach().to(device=device, dtype=torch.float32).masked_fill(~m3, 0.0)
    logp = torch.log_softmax(z, dim=-1)
    if floor_after:
        # clamping the logits first keeps an all -inf row finite (uniform) instead of NaN
        logq = torch.log_softmax(tq.clamp_min(-1e30), dim=-1).clamp_min(floor)
    else:
        logq = torch.log_softmax(tq.clamp_min(floor), dim=-1)
    per_token = _kl_from_logprobs(logp, logq).masked_fill(~m, 0.0)  # [B, T]
    return _opd_output(per_token, m, reduction, per_token, torch.zeros_like(m))
