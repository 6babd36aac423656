"""TrOPD (arXiv 2606.01249): trust-region on-policy distillation with teacher-prefix guidance.

Per student-sampled token ``y`` (METHOD.md "TrOPD", notes/opd-plus-tropd.md section 3):

- trust draw ``M ~ Bernoulli(min(pi_T(y)/pi_S(y), 1))`` from rollout-time (detached) log-probs, the
  speculative-decoding acceptance probability (:func:`trust_mask`; ``soft=True`` uses the
  probability itself as a weight: same expectation, lower variance, not in the paper);
- trust tokens (``M = 1``): policy gradient on the K1 reward ``r = log pi_T(y) - log pi_S(y)``;
- outlier tokens (``M = 0``): the directly differentiated forward KL on the teacher's top-k,
  ``sum_{v in TopK(pi_T)} pi_T(v) (log pi_T(v) - max(log pi_S(v), floor))`` with full-softmax values
  at the teacher's top-k ids (no renormalisation); ablations ``mask`` (nothing) and ``clip``
  (policy gradient with the advantage ``max(r, tau)``);
- teacher-prefix (guidance) tokens: ``beta * (-log pi_S(y))``, directly differentiated (SFT-like).

Pure functions of tensors; float32 math (float64 inputs stay float64); values at unsupervised
tokens (even NaN/inf) reach neither the loss nor the gradient.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from oprd_cli.losses.common import check_reduction, check_shapes, reduce_tokens, token_mean, work_dtype
from oprd_cli.losses.pg import pg_per_token

__all__ = [
    "OUTLIER_MODES",
    "DEFAULT_TROPD_TOPK",
    "DEFAULT_GUIDANCE_BETA",
    "DEFAULT_TAU",
    "DEFAULT_STUDENT_LOGPROB_FLOOR",
    "TropdOutput",
    "trust_probability",
    "trust_mask",
    "topk_fkl",
    "tropd_loss",
    "guidance_prefix_max",
]

OUTLIER_MODES = ("fkl", "mask", "clip")
DEFAULT_TROPD_TOPK = 64  # the paper's k
DEFAULT_GUIDANCE_BETA = 0.001  # the paper's beta
DEFAULT_TAU = -6.0  # [UNSPECIFIED] by the paper; the same scale as OPD+'s log-ratio clip
DEFAULT_STUDENT_LOGPROB_FLOOR = -20.0  # [UNSPECIFIED]; exp(-20) ~ 2e-9


def trust_probability(student_old_logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor) -> Tensor:
    """``P_trust = min(pi_T(y)/pi_S(y), 1) = exp(min(l_T - l_S, 0))`` per token, ``[B, T]``, detached.

    ``student_old_logprobs`` ``[B, T]``: the student's rollout-time log-probs of the sampled tokens;
    ``teacher_logprobs`` ``[B, T]``; ``mask`` ``[B, T]``. 0 at unsupervised tokens. A ``-inf`` teacher
    log-prob gives 0 (always an outlier).
    """
    check_shapes("trust_probability", "student_old_logprobs", student_old_logprobs,
                 teacher_logprobs=teacher_logprobs, mask=mask)
    dt = work_dtype(student_old_logprobs)
    m = mask.to(device=student_old_logprobs.device).bool()
    ls = student_old_logprobs.detach().to(dt).masked_fill(~m, 0.0)
    lt = teacher_logprobs.detach().to(device=ls.device, dtype=dt).masked_fill(~m, 0.0)
    return torch.exp((lt - ls).clamp_max(0.0)).masked_fill(~m, 0.0)


def _seed_words(seed: int | Sequence[int]) -> list[int]:
    words = [seed] if isinstance(seed, (int, np.integer)) else list(seed)
    if not words or any(not isinstance(w, (int, np.integer)) or int(w) < 0 for w in words):
        raise ValueError(f"trust_mask: seed must be a non-negative int or a sequence of them, got {seed!r}")
    return [int(w) for w in words]


def trust_mask(
    student_old_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    *,
    seed: int | Sequence[int] = 0,
    sample_ids: Tensor | Sequence[int] | None = None,
    soft: bool = False,
) -> Tensor:
    """The trust mask ``M`` ``[B, T]`` (float 0/1, detached; 0 at unsupervised tokens).

    ``M[b, t] = 1`` with probability :func:`trust_probability` (``min(pi_T/pi_S, 1)`` from the
    rollout-time log-probs). ``soft=True`` returns that probability instead of a draw.

    Reproducible and independent of batching: the uniform number of token ``t`` of sample ``b`` is
    the ``t``-th draw of a numpy PCG64 stream seeded by ``SeedSequence([*seed, sample_ids[b]])``.
    So the same (``seed``, sample id, position) always gives the same draw, whatever the micro-batch
    split, the order of samples in it or its padded length ``T``. ``sample_ids`` ``[B]``: a stable
    non-negative identity of each sample (e.g. its index in the rollout store); ``None`` means
    ``0..B-1`` (then the draw depends on the batch composition). ``seed``: a non-negative int or a
    tuple of them; include whatever must change the draw, e.g. ``(run_seed, round)``.
    """
    p = trust_probability(student_old_logprobs, teacher_logprobs, mask)
    if soft:
        return p
    b, t = p.shape
    words = _seed_words(seed)
    if sample_ids is None:
        ids = list(range(b))
    else:
        ids = sample_ids.tolist() if isinstance(sample_ids, Tensor) else list(sample_ids)
        if len(ids) != b:
            raise ValueError(f"trust_mask: sample_ids has {len(ids)} entries for {b} samples")
        if any(int(i) < 0 for i in ids):
            raise ValueError("trust_mask: sample_ids must be non-negative")
    draws = np.empty((b, t), dtype=np.float64)
    for row, sid in enumerate(ids):
        draws[row] = np.random.default_rng(np.random.SeedSequence([*words, int(sid)])).random(t)
    u = torch.from_numpy(draws).to(device=p.device, dtype=p.dtype)
    return (u < p).to(p.dtype)


def topk_fkl(
    student_topk_logprobs: Tensor,
    teacher_topk_logprobs: Tensor,
    logprob_floor: float | None = DEFAULT_STUDENT_LOGPROB_FLOOR,
) -> Tensor:
    """``sum_k pi_T(v_k) (log pi_T(v_k) - max(log pi_S(v_k), floor))`` over the last axis.

    ``student_topk_logprobs`` ``[..., K]``: the student's full-vocabulary log-softmax gathered at the
    teacher's top-k ids (with grad); ``teacher_topk_logprobs`` ``[..., K]`` (detached here). No
    renormalisation. Teacher entries of ``-inf`` (zero mass) contribute exactly 0. Below the floor the
    student's log-prob is replaced by the floor (constant: no gradient there), which bounds the
    value by ``sum_k pi_T (log pi_T - floor)``; ``None`` disables it (a student ``-inf`` then gives
    ``inf``). Gradient with respect to the student logits ``z`` (no floor active):
    ``pi_S * m_k - pi_T * 1_topk`` with ``m_k = sum_k pi_T(v_k)``.
    """
    dt = work_dtype(student_topk_logprobs)
    lq = teacher_topk_logprobs.detach().to(device=student_topk_logprobs.device, dtype=dt)
    lp = student_topk_logprobs.to(dt)
    if logprob_floor is not None:
        lp = lp.clamp_min(float(logprob_floor))
    q = lq.exp()
    live = q > 0
    lq_safe = torch.where(live, lq, torch.zeros_like(lq))
    lp_safe = torch.where(live, lp, torch.zeros_like(lp))
    return (q * (lq_safe - lp_safe)).sum(dim=-1)


@dataclass
class TropdOutput:
    """Result of :func:`tropd_loss` (float32, or float64 for float64 inputs).

    Differentiable: ``per_token`` ``[B, T]`` (trust + outlier + guidance term of each token, 0 at
    unsupervised tokens), ``per_sample`` ``[B]`` (masked mean over the sample's tokens), ``loss``.
    Detached scalars:
    - ``trust_loss``, ``outlier_loss``, ``guidance_loss``: each term's sum over the batch divided by
      the number of supervised tokens (prefix + continuation), so with ``reduction="token"`` they
      add up to ``loss``;
    - ``outlier_frac``: mean of ``1 - M`` (soft: ``1 - P_trust``) over continuation tokens;
    - ``guidance_tokens``: number of supervised teacher-prefix tokens in the batch (float);
    - ``prefix_len``: mean over samples of each sample's teacher-prefix length (tokens);
    - ``kl``: mean of ``log pi_S(y) - log pi_T(y)`` over continuation tokens (sampled-token RKL);
    - ``clip_frac``: fraction of continuation tokens where PPO clipping was active (0 on-policy);
    - ``num_tokens`` ``[B]``: supervised tokens per sample.
    """

    per_token: Tensor
    per_sample: Tensor
    loss: Tensor
    trust_loss: Tensor
    outlier_loss: Tensor
    guidance_loss: Tensor
    outlier_frac: Tensor
    guidance_tokens: Tensor
    prefix_len: Tensor
    kl: Tensor
    clip_frac: Tensor
    num_tokens: Tensor

    def metrics(self) -> dict[str, float]:
        """``tropd/*`` metrics of this (micro-)batch as floats."""
        return {
            "tropd/loss": float(self.loss.detach()),
            "tropd/outlier_frac": float(self.outlier_frac),
            "tropd/trust_loss": float(self.trust_loss),
            "tropd/outlier_loss": float(self.outlier_loss),
            "tropd/guidance_loss": float(self.guidance_loss),
            "tropd/guidance_tokens": float(self.guidance_tokens),
            "tropd/prefix_len": float(self.prefix_len),
            "tropd/kl": float(self.kl),
            "tropd/clip_frac": float(self.clip_frac),
        }


def tropd_loss(
    student_logprobs: Tensor,
    student_topk_logprobs: Tensor,
    teacher_logprobs: Tensor,
    teacher_topk_logprobs: Tensor,
    mask: Tensor,
    trust: Tensor,
    *,
    outlier: str = "fkl",
    tau: float = DEFAULT_TAU,
    logprob_floor: float | None = DEFAULT_STUDENT_LOGPROB_FLOOR,
    prefix_mask: Tensor | None = None,
    guidance_beta: float = DEFAULT_GUIDANCE_BETA,
    behaviour_logprobs: Tensor | None = None,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    reduction: str = "token",
) -> TropdOutput:
    """TrOPD loss (paper Eq. 10, negated), per token, aggregated over all supervised tokens.

    Shapes (``B`` samples, ``T`` response tokens, ``K`` teacher top-k):
      - ``student_logprobs`` ``[B, T]``: ``log pi_S(y_t)`` under the CURRENT student, with grad.
      - ``student_topk_logprobs`` ``[B, T, K]``: the current student's full-vocabulary
        ``log_softmax`` gathered at the teacher's top-k ids, with grad (only read where the
        outlier term is ``fkl``).
      - ``teacher_logprobs`` ``[B, T]``: ``log pi_T(y_t)``; ``teacher_topk_logprobs`` ``[B, T, K]``:
        the teacher's own top-k log-probs (cache ``--logprobs topk``).
      - ``mask`` ``[B, T]``: supervised response tokens (prefix and continuation).
      - ``trust`` ``[B, T]``: :func:`trust_mask` (0/1, or weights in [0, 1] with ``soft=True``);
        read only on continuation tokens.
      - ``prefix_mask`` ``[B, T]`` or ``None``: tokens written by the teacher (guidance prefix).
      - ``behaviour_logprobs`` ``[B, T]`` or ``None``: rollout-time student log-probs for the
        importance ratio of the policy-gradient terms (as :func:`~oprd_cli.losses.opd_top1_loss`).

    Per token, with ``g`` = prefix token, ``s`` = continuation (student) token, ``w = trust``,
    ``r = log pi_T(y) - sg(log pi_S(y))`` (current student, as top-1 OPD):
      - trust term (``s``): the top-1 OPD surrogate with advantage ``w * r`` (on-policy
        ``-w * sg(r) * log pi_S(y)`` in gradient; ``rho``/PPO clipping with behaviour log-probs);
      - outlier term (``s``): ``fkl``: ``(1 - w) * topk_fkl(student_topk, teacher_topk, floor)``;
        ``mask``: 0; ``clip``: the same surrogate with advantage ``(1 - w) * max(r, tau)``;
      - guidance term (``g``): ``guidance_beta * (-log pi_S(y))``.
    Detached: ``w`` (the trust draw or weight), ``r`` and every advantage, all teacher inputs, the
    behaviour log-probs. Differentiated: ``log pi_S(y)`` through ``rho`` in the trust/clip terms
    (score-function), ``log pi_S`` at the top-k ids in the FKL term (directly, no ratio) and
    ``log pi_S(y)`` in the guidance term (directly, never as a detached reward).
    ``reduction="token"`` (default): one mean over all supervised tokens; ``"sample"``: mean of
    per-sample token means.

    Composed ablations: vanilla OPD = ``trust`` all ones; Full FKL (top-k FKL on every token, no
    RKL) = ``trust`` all zeros with ``outlier="fkl"``; Clip Outlier ``max(r, tau)`` on every token =
    zeros with ``outlier="clip"``; Mask Outlier ``1[r > tau] r`` = ``trust = (r > tau)`` with
    ``outlier="mask"``.
    """
    name = "tropd_loss"
    check_reduction(name, reduction)
    _check_tropd_args(name, student_logprobs, student_topk_logprobs, teacher_logprobs, teacher_topk_logprobs,
                      mask, trust, prefix_mask, behaviour_logprobs, outlier, tau, guidance_beta)
    device = student_logprobs.device
    dt = work_dtype(student_logprobs)
    m = mask.to(device=device).bool()
    g = (prefix_mask.to(device=device).bool() & m) if prefix_mask is not None else torch.zeros_like(m)
    s = m & ~g
    logp = student_logprobs.to(dt).masked_fill(~m, 0.0)
    logq = teacher_logprobs.detach().to(device=device, dtype=dt).masked_fill(~m, 0.0)
    w = trust.detach().to(device=device, dtype=dt).masked_fill(~s, 0.0)
    if bool(((w < 0) | (w > 1) | torch.isnan(w)).any()):
        raise ValueError(f"{name}: trust weights must lie in [0, 1] on continuation tokens")
    r = (logq - logp.detach()).masked_fill(~s, 0.0)

    pg = functools.partial(pg_per_token, logp, m=s, behaviour_logprobs=behaviour_logprobs, clip_eps=clip_eps,
                           clip_eps_high=clip_eps_high)
    trust_tok, clipped = pg((w * r).masked_fill(~s, 0.0))
    if outlier == "fkl":
        out_tok = _outlier_fkl(student_topk_logprobs, teacher_topk_logprobs, w, s, logprob_floor)
    elif outlier == "clip":
        out_tok, clipped_out = pg(((1.0 - w) * r.clamp_min(float(tau))).masked_fill(~s, 0.0))
        clipped = clipped | clipped_out
    else:  # mask: outliers get nothing
        out_tok = torch.zeros_like(trust_tok)
    guid_tok = (float(guidance_beta) * -logp).masked_fill(~g, 0.0)
    return _tropd_output(trust_tok, out_tok, guid_tok, m, g, s, w, r, clipped, reduction)


def _check_tropd_args(name: str, student_logprobs: Tensor, student_topk_logprobs: Tensor, teacher_logprobs: Tensor,
                      teacher_topk_logprobs: Tensor, mask: Tensor, trust: Tensor, prefix_mask: Tensor | None,
                      behaviour_logprobs: Tensor | None, outlier: str, tau: float, guidance_beta: float) -> None:
    """``ValueError`` naming ``name`` for an unknown outlier mode, a non-finite ``tau``, a negative
    ``guidance_beta`` or a tensor whose shape does not fit ``student_logprobs`` ``[B, T]``."""
    if outlier not in OUTLIER_MODES:
        raise ValueError(f"{name}: outlier must be one of {', '.join(OUTLIER_MODES)}, got {outlier!r}")
    if not math.isfinite(float(tau)):
        raise ValueError(f"{name}: tau must be finite, got {tau}")
    if not (math.isfinite(float(guidance_beta)) and float(guidance_beta) >= 0):
        raise ValueError(f"{name}: guidance_beta must be >= 0, got {guidance_beta}")
    shape = check_shapes(name, "student_logprobs", student_logprobs, teacher_logprobs=teacher_logprobs, mask=mask,
                         trust=trust, prefix_mask=prefix_mask, behaviour_logprobs=behaviour_logprobs)
    if student_topk_logprobs.dim() != 3 or tuple(student_topk_logprobs.shape[:2]) != shape:
        raise ValueError(f"{name}: student_topk_logprobs must be [B, T, K] with [B, T] = {shape}, "
                         f"got {tuple(student_topk_logprobs.shape)}")
    if tuple(teacher_topk_logprobs.shape) != tuple(student_topk_logprobs.shape):
        raise ValueError(f"{name}: teacher_topk_logprobs shape {tuple(teacher_topk_logprobs.shape)} != "
                         f"{tuple(student_topk_logprobs.shape)}")


def _outlier_fkl(student_topk_logprobs: Tensor, teacher_topk_logprobs: Tensor, w: Tensor, s: Tensor,
                 logprob_floor: float | None) -> Tensor:
    """The outlier term ``(1 - w) * topk_fkl`` ``[B, T]`` on continuation tokens ``s`` (0 elsewhere,
    and exactly 0 on fully trusted tokens, even where the FKL is infinite)."""
    s3 = s[:, :, None]
    dt, device = w.dtype, w.device
    lp_k = student_topk_logprobs.to(device=device, dtype=dt).masked_fill(~s3, 0.0)
    lq_k = teacher_topk_logprobs.detach().to(device=device, dtype=dt).masked_fill(~s3, 0.0)
    fkl = topk_fkl(lp_k, lq_k, logprob_floor)
    out_w = (1.0 - w).masked_fill(~s, 0.0)
    return torch.where(out_w > 0, out_w * fkl, torch.zeros_like(fkl))


def _tropd_output(trust_tok: Tensor, out_tok: Tensor, guid_tok: Tensor, m: Tensor, g: Tensor, s: Tensor,
                  w: Tensor, r: Tensor, clipped: Tensor, reduction: str) -> TropdOutput:
    """Sum the three terms per token, reduce, and compute the detached per-term metrics."""
    dt = w.dtype
    per_token = trust_tok + out_tok + guid_tok
    per_sample, loss, n_tok = reduce_tokens(per_token, m, reduction)
    n_all = m.sum().clamp_min(1).to(dt)
    g_len = g.sum(dim=-1).to(dt)
    return TropdOutput(
        per_token=per_token,
        per_sample=per_sample,
        loss=loss,
        trust_loss=trust_tok.detach().sum() / n_all,
        outlier_loss=out_tok.detach().sum() / n_all,
        guidance_loss=guid_tok.detach().sum() / n_all,
        outlier_frac=token_mean(1.0 - w, s),
        guidance_tokens=g_len.sum().detach(),
        prefix_len=(g_len.mean() if g_len.numel() else g_len.sum()).detach(),
        kl=token_mean(-r, s),
        clip_frac=token_mean(clipped.to(dt), s),
        num_tokens=n_tok.detach(),
    )


def guidance_prefix_max(step: int, total_steps: int, max_len: int) -> int:
    """Cosine-annealed maximum teacher-prefix length ``round(L (1 + cos(pi k / K)) / 2)``.

    ``max_len`` (``L``) at ``step`` 0, 0 at ``step >= total_steps`` (``K``), non-increasing between.
    The schedule's form is the notes' proposal (the paper says "cosine to 0" only).
    """
    if total_steps <= 0 or max_len < 0 or step < 0:
        raise ValueError(f"guidance_prefix_max: need step >= 0, total_steps > 0, max_len >= 0; "
                         f"got {step}, {total_steps}, {max_len}")
    if step >= total_steps:
        return 0
    return int(round(max_len * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))))
