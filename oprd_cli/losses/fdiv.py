"""OPD+ (arXiv 2606.01039): sampled-token OPD for any f-divergence with the corrected advantage.

Per state the objective is ``D_f(q || p) = sum_a p(a) f(q(a) / p(a))`` (``p`` the student, ``q`` the
teacher, ``f`` convex with ``f(1) = 0``; ``f(u) = -log u`` is the reverse KL ``KL(p || q)``). At a
student-sampled token ``y`` only two numbers are needed: ``r = log q(y) - log p(y)`` and
``u = exp(r)`` (METHOD.md "OPD+", notes/opd-plus-tropd.md section 2).

Since ``grad u = -u grad log p(y)``,
``grad D_f = E_{y~p}[(f(u) - u f'(u)) grad log p(y)]``. The standard (stop-gradient) OPD advantage
``A = -f(u)`` drops ``-u f'(u)``; that is the constant ``+1`` for reverse KL (harmless, a baseline)
and a bias for every other ``f``. The OPD+ advantage ``A+ = -f(u) + u f'(u)`` is the exact
single-sample estimator of ``-grad D_f`` at each visited state. Closed forms (``r = log u``):

=========== ======================================= =============================
divergence  f(u)                                    A+ = -f(u) + u f'(u)
=========== ======================================= =============================
rkl         -log u                                  r - 1
fkl         u log u                                 u
jsd         1/2 [u log u - (1+u) log((1+u)/2)]      1/2 log((1+u)/2)
alpha       (u^a - a(u-1) - 1) / (a(a-1))           (u^a - 1) / a   (a=0: r, a=1: u - 1)
hellinger   (sqrt(u) - 1)^2                         sqrt(u) - 1
chi2        (u - 1)^2                               u^2 - 1
tv          1/2 |u - 1|                             1/2 sign(u - 1)
=========== ======================================= =============================

Pure functions of tensors. Math runs in float32 (float64 inputs stay float64, which the unit tests
use), teacher and behaviour inputs are stop-gradient, values at unsupervised tokens (even NaN/inf)
reach neither the loss nor the gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from oprd_cli.losses.common import check_reduction, check_shapes, reduce_tokens, token_mean, work_dtype
from oprd_cli.losses.pg import pg_per_token

__all__ = [
    "DIVERGENCES",
    "DEFAULT_ALPHA",
    "DEFAULT_LOG_RATIO_CLIP",
    "OpdPlusOutput",
    "f_value",
    "advantage",
    "opd_plus_loss",
]

DIVERGENCES = ("rkl", "fkl", "jsd", "alpha", "hellinger", "chi2", "tv")
DEFAULT_ALPHA = 0.5  # [UNSPECIFIED] by the paper; alpha = 0.5 is 2x the squared Hellinger
DEFAULT_LOG_RATIO_CLIP = 6.0  # third-party default (OPD+ reimplementation), not the paper's
_PARAMS = ("alpha",)  # the only divergence parameter; accepted (and ignored) by the other f's


def _params(divergence: str, params: dict) -> float:
    """Validate ``divergence`` and ``params``; return alpha (used only by ``alpha``)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
    unknown = sorted(set(params) - set(_PARAMS))
    if unknown:
        raise ValueError(f"unknown divergence parameter(s) {', '.join(unknown)}; known: {', '.join(_PARAMS)}")
    alpha = params.get("alpha")
    alpha = DEFAULT_ALPHA if alpha is None else float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    return alpha


def f_value(log_ratio: Tensor, divergence: str, **params) -> Tensor:
    """The generator ``f(u)`` at ``u = exp(log_ratio)``, elementwise (same shape as ``log_ratio``).

    ``mean_{y~p} f(u(y))`` is the one-sample estimate of ``D_f(q || p)``; with ``divergence="rkl"``
    it is ``-r``, the usual sampled-token reverse-KL estimate. Written in ``r`` where that is more
    stable (``log(1+u) = softplus(r)``, ``u^a - 1 = expm1(a r)``). ``alpha`` in {0, 1} uses the limits
    ``-log u + u - 1`` and ``u log u - u + 1``. Differentiable in ``log_ratio``.
    """
    alpha = _params(divergence, params)
    r = log_ratio
    if divergence == "rkl":
        return -r
    if divergence == "fkl":
        return torch.exp(r) * r
    if divergence == "jsd":
        u = torch.exp(r)
        return 0.5 * (u * r - (1.0 + u) * (torch.nn.functional.softplus(r) - math.log(2.0)))
    if divergence == "alpha":
        if alpha == 0.0:
            return -r + torch.expm1(r)
        if alpha == 1.0:
            return torch.exp(r) * r - torch.expm1(r)
        return (torch.expm1(alpha * r) - alpha * torch.expm1(r)) / (alpha * (alpha - 1.0))
    if divergence == "hellinger":
        return torch.expm1(0.5 * r) ** 2
    if divergence == "chi2":
        return torch.expm1(r) ** 2
    # tv
    return 0.5 * torch.expm1(r).abs()


def advantage(log_ratio: Tensor, divergence: str, corrected: bool = True, **params) -> Tensor:
    """Per-token advantage from per-token ``log_ratio = log pi_T(y) - log pi_S(y)`` (same shape out).

    ``corrected=True`` (OPD+): ``A+ = -f(u) + u f'(u)`` in closed form (module table);
    ``corrected=False`` (standard stop-gradient OPD): ``A = -f(u)``. No clipping here (the loss
    clips ``log_ratio`` first), no whitening. Params: ``alpha`` (divergence ``alpha`` only, default
    :data:`DEFAULT_ALPHA`; passing it with another divergence is allowed and has no effect).
    The caller detaches: the result is differentiable in ``log_ratio``.
    """
    alpha = _params(divergence, params)
    r = log_ratio
    if not corrected:
        return -f_value(r, divergence, **params)
    if divergence == "rkl":
        return r - 1.0
    if divergence == "fkl":
        return torch.exp(r)
    if divergence == "jsd":
        return 0.5 * (torch.nn.functional.softplus(r) - math.log(2.0))
    if divergence == "alpha":
        if alpha == 0.0:
            return r
        return torch.expm1(alpha * r) / alpha
    if divergence == "hellinger":
        return torch.expm1(0.5 * r)
    if divergence == "chi2":
        return torch.expm1(2.0 * r)
    # tv: -1/2|u-1| + u/2 sign(u-1) = 1/2 sign(u-1) (0 at u = 1)
    return 0.5 * torch.sign(r)


@dataclass
class OpdPlusOutput:
    """Result of :func:`opd_plus_loss` (float32, or float64 for float64 inputs).

    - ``per_token`` ``[B, T]``, differentiable: the surrogate per token, 0 at unsupervised tokens.
    - ``per_sample`` ``[B]``, differentiable: masked mean of ``per_token`` over the sample's tokens.
    - ``loss`` scalar, differentiable: token mean (``reduction="token"``, default) or sample mean.
    - ``advantages`` ``[B, T]``, detached: the advantage each token used (0 at unsupervised tokens).
    - ``adv_mean`` scalar, detached: masked token mean of ``advantages``.
    - ``divergence_est`` scalar, detached: masked token mean of ``f(u)`` with the clipped ``u``
      (on-policy: the sampled-token estimate of ``D_f(q || p)``).
    - ``kl`` scalar, detached: masked token mean of ``log pi_S(y) - log pi_T(y)`` (unclipped; the
      same number as :class:`~oprd_cli.losses.OpdOutput`'s ``kl``).
    - ``clip_frac`` scalar, detached: fraction of supervised tokens whose log-ratio was clipped.
    - ``ppo_clip_frac`` scalar, detached: fraction where PPO's clipped branch was active (0
      on-policy), the quantity :class:`~oprd_cli.losses.OpdOutput` calls ``clip_frac``.
    - ``num_tokens`` ``[B]``, detached: supervised tokens per sample (float).
    """

    per_token: Tensor
    per_sample: Tensor
    loss: Tensor
    advantages: Tensor
    adv_mean: Tensor
    divergence_est: Tensor
    kl: Tensor
    clip_frac: Tensor
    ppo_clip_frac: Tensor
    num_tokens: Tensor

    def metrics(self, prefix: str = "opd_plus") -> dict[str, float]:
        """Scalar metrics of this (micro-)batch as floats, keys ``{prefix}/<name>``."""
        return {
            f"{prefix}/loss": float(self.loss.detach()),
            f"{prefix}/adv_mean": float(self.adv_mean),
            f"{prefix}/divergence": float(self.divergence_est),
            f"{prefix}/kl": float(self.kl),
            f"{prefix}/clip_frac": float(self.clip_frac),
            f"{prefix}/ppo_clip_frac": float(self.ppo_clip_frac),
        }


def opd_plus_loss(
    student_logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor,
    divergence: str = "rkl", corrected: bool = True, log_ratio_clip: float | None = DEFAULT_LOG_RATIO_CLIP,
    behaviour_logprobs: Tensor | None = None, clip_eps: float = 0.2, clip_eps_high: float | None = None,
    reduction: str = "token", **params,
) -> OpdPlusOutput:
    """OPD+ (``corrected=True``) or standard stop-gradient f-divergence OPD (``corrected=False``).

    Shapes (``B`` samples, ``T`` response tokens):
      - ``student_logprobs``: ``[B, T]`` ``log pi_S(y_t)`` of the sampled tokens under the CURRENT
        student, with grad.
      - ``teacher_logprobs``: ``[B, T]`` ``log pi_T(y_t)`` (cache; detached here).
      - ``mask``: ``[B, T]`` bool or 0/1, true at supervised response tokens.
      - ``behaviour_logprobs``: ``[B, T]`` ``log pi_old(y_t)`` recorded at sampling time, or
        ``None`` for on-policy data (ratio 1, no PPO clipping).

    Per token: ``r_t = clamp(log pi_T(y_t) - sg(log pi_S(y_t)), -c, c)`` (``c = log_ratio_clip``,
    ``None`` disables), ``A_t = sg(advantage(r_t, divergence, corrected, **params))``, and the
    surrogate of :func:`~oprd_cli.losses.opd_top1_loss` (``-rho_t A_t``, PPO-clipped with behaviour
    log-probs). Like top-1 OPD, ``r_t`` uses the CURRENT student's log-prob, not the behaviour one:
    with samples from ``pi_old``, ``E_{pi_old}[-A+(u_theta) grad rho] = E_{pi_theta}[(f - u f')
    grad log pi_theta] = grad D_f(q || pi_theta)``, unbiased for any ``pi_old`` before PPO clipping
    (the notes' pseudo-code uses ``pi_old``; that is biased once ``pi_theta != pi_old``). Per-token
    credit (no reward-to-go), no advantage whitening; ``reduction="token"`` (default) is one mean
    over all supervised tokens, ``"sample"`` a mean of per-sample token means.

    Everything but ``student_logprobs`` (through ``rho``) is detached: the gradient is exactly
    ``-A_t grad rho_t`` per token, ``-A_t grad log pi_S(y_t)`` on-policy.
    ``params``: ``alpha`` for ``divergence="alpha"``.
    """
    name = "opd_plus_loss"
    check_reduction(name, reduction)
    _params(divergence, params)
    if log_ratio_clip is not None and not (float(log_ratio_clip) > 0):
        raise ValueError(f"{name}: log_ratio_clip must be > 0 or None, got {log_ratio_clip}")
    check_shapes(name, "student_logprobs", student_logprobs, teacher_logprobs=teacher_logprobs,
                 behaviour_logprobs=behaviour_logprobs, mask=mask)
    device = student_logprobs.device
    dt = work_dtype(student_logprobs)
    m = mask.to(device=device).bool()
    logp = student_logprobs.to(dt).masked_fill(~m, 0.0)
    logq = teacher_logprobs.detach().to(device=device, dtype=dt).masked_fill(~m, 0.0)

    raw = logq - logp.detach()
    if log_ratio_clip is None:
        r = raw
        clipped_lr = torch.zeros_like(m)
    else:
        c = float(log_ratio_clip)
        r = raw.clamp(-c, c)
        clipped_lr = (raw.abs() > c) & m
    adv = advantage(r, divergence, corrected, **params).detach().masked_fill(~m, 0.0)
    per_token, ppo_clipped = pg_per_token(logp, adv, m, behaviour_logprobs, clip_eps, clip_eps_high)
    per_sample, loss, n_tok = reduce_tokens(per_token, m, reduction)
    return OpdPlusOutput(
        per_token=per_token,
        per_sample=per_sample,
        loss=loss,
        advantages=adv,
        adv_mean=token_mean(adv, m),
        divergence_est=token_mean(f_value(r, divergence, **params), m),
        kl=token_mean(-raw, m),
        clip_frac=token_mean(clipped_lr.to(dt), m),
        ppo_clip_frac=token_mean(ppo_clipped.to(dt), m),
        num_tokens=n_tok.detach(),
    )
