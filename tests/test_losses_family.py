"""Unit tests for OPD+ (oprd_cli.losses.fdiv) and TrOPD (oprd_cli.losses.tropd).

Fast, no models: a 5-token vocabulary, exact enumeration in float64 and Monte Carlo with fixed
seeds. The numbered checks of notes/opd-plus-tropd.md sections 2.7 and 3.10 are marked
``[2.7.n]`` / ``[3.10.n]``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from oprd_cli.losses import (
    DIVERGENCES,
    OUTLIER_MODES,
    OpdPlusOutput,
    TropdOutput,
    advantage,
    f_value,
    opd_plus_loss,
    opd_top1_loss,
    topk_fkl,
    tropd_loss,
    trust_mask,
    trust_probability,
)
from oprd_cli.losses.tropd import guidance_prefix_max

V = 5
D64 = torch.float64

# Generators f(u), written here independently of the implementation (the notes' table).
F_OF_U = {
    "rkl": lambda u: -torch.log(u),
    "fkl": lambda u: u * torch.log(u),
    "jsd": lambda u: 0.5 * (u * torch.log(u) - (1 + u) * torch.log((1 + u) / 2)),
    "hellinger": lambda u: (torch.sqrt(u) - 1) ** 2,
    "chi2": lambda u: (u - 1) ** 2,
    "tv": lambda u: 0.5 * (u - 1).abs(),
}


def _f_alpha(a: float):
    if a == 0.0:
        return lambda u: -torch.log(u) + u - 1
    if a == 1.0:
        return lambda u: u * torch.log(u) - u + 1
    return lambda u: (u**a - a * (u - 1) - 1) / (a * (a - 1))


# (divergence, params) cases covering every divergence, alpha at several values (limits included)
CASES = [(d, {}) for d in F_OF_U] + [("alpha", {"alpha": a}) for a in (0.5, -0.5, 2.0, 0.0, 1.0)]
CASE_IDS = [d if not p else f"alpha={p['alpha']}" for d, p in CASES]


def _f(divergence: str, params: dict):
    return _f_alpha(params.get("alpha", 0.5)) if divergence == "alpha" else F_OF_U[divergence]


def _state(seed: int):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(V, generator=g, dtype=D64) * 1.2
    zq = torch.randn(V, generator=g, dtype=D64) * 1.2
    return z, torch.log_softmax(zq, -1)


def _exact_grad_df(z: torch.Tensor, logq: torch.Tensor, f) -> torch.Tensor:
    """Autograd of D_f(q || p) = sum_a p(a) f(q(a)/p(a)) with respect to the student logits."""
    zz = z.clone().requires_grad_(True)
    p = torch.softmax(zz, -1)
    d = (p * f(logq.exp() / p)).sum()
    (g,) = torch.autograd.grad(d, zz)
    return g


def _expected_estimator_grad(z, logq, divergence, corrected, params, logp_old=None):
    """sum_a P(a) * grad_z opd_plus_loss(single sampled token a), P = p (on-policy) or p_old."""
    sampler = torch.softmax(z, -1) if logp_old is None else logp_old.exp()
    total = torch.zeros(V, dtype=D64)
    for a in range(V):
        zz = z.clone().requires_grad_(True)
        lp = torch.log_softmax(zz, -1)[a].view(1, 1)
        beh = None if logp_old is None else logp_old[a].view(1, 1)
        out = opd_plus_loss(lp, logq[a].view(1, 1), torch.ones(1, 1, dtype=torch.bool), divergence,
                            corrected=corrected, log_ratio_clip=None, behaviour_logprobs=beh, clip_eps=1e9,
                            **params)
        (g,) = torch.autograd.grad(out.loss, zz)
        total += sampler[a] * g
    return total


# --------------------------------------------------------------------------------------------
# OPD+: closed forms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence,params", CASES, ids=CASE_IDS)
def test_closed_form_advantage_is_minus_f_plus_u_fprime_by_autograd(divergence, params):
    f = _f(divergence, params)
    r = torch.linspace(-5.0, 5.0, 41, dtype=D64)
    r = r[r != 0]  # tv is not differentiable at u = 1
    u = r.exp().requires_grad_(True)
    fu = f(u)
    (fprime,) = torch.autograd.grad(fu.sum(), u)
    expected = -fu.detach() + u.detach() * fprime
    torch.testing.assert_close(advantage(r, divergence, **params), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(advantage(r, divergence, corrected=False, **params), -fu.detach(),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f_value(r, divergence, **params), fu.detach(), rtol=1e-10, atol=1e-10)
    # every f is normalised: f(1) = 0
    assert f_value(torch.zeros(1, dtype=D64), divergence, **params).item() == pytest.approx(0.0, abs=1e-15)


def test_closed_forms_table_values():
    r = torch.tensor([math.log(2.0)], dtype=D64)  # u = 2
    table = {"rkl": math.log(2) - 1, "fkl": 2.0, "jsd": 0.5 * math.log(1.5), "hellinger": math.sqrt(2) - 1,
             "chi2": 3.0, "tv": 0.5}
    for d, v in table.items():
        assert advantage(r, d).item() == pytest.approx(v, abs=1e-12), d
    assert advantage(r, "alpha", alpha=2.0).item() == pytest.approx((4 - 1) / 2)
    assert advantage(r, "alpha").item() == pytest.approx((math.sqrt(2) - 1) / 0.5)  # default alpha 0.5
    assert advantage(-r, "tv").item() == -0.5 and advantage(torch.zeros(1), "tv").item() == 0.0


def test_rkl_corrected_minus_stopgrad_is_exactly_minus_one():
    """[2.7.3] the OPD+ reverse-KL advantage is the vanilla one shifted by the constant -1."""
    r = torch.linspace(-8, 8, 33)
    torch.testing.assert_close(advantage(r, "rkl") - advantage(r, "rkl", corrected=False), torch.full_like(r, -1.0))


# --------------------------------------------------------------------------------------------
# OPD+: unbiasedness on a 5-token vocabulary
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence,params", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_opd_plus_expected_gradient_equals_exact_gradient_of_df(divergence, params, seed):
    """[2.7.1] enumerated E_{a~p}[grad of the OPD+ loss] == grad_z D_f(q || p) to 1e-8 (float64)."""
    z, logq = _state(seed)
    exact = _exact_grad_df(z, logq, _f(divergence, params))
    est = _expected_estimator_grad(z, logq, divergence, True, params)
    assert exact.abs().max() > 1e-3  # not a trivial state
    torch.testing.assert_close(est, exact, rtol=0, atol=1e-8)


@pytest.mark.parametrize("divergence,params", CASES, ids=CASE_IDS)
def test_stopgrad_expected_gradient_matches_only_reverse_kl(divergence, params):
    """[2.7.1] the vanilla (stop-gradient) estimator is unbiased for reverse KL only."""
    z, logq = _state(0)
    exact = _exact_grad_df(z, logq, _f(divergence, params))
    est = _expected_estimator_grad(z, logq, divergence, False, params)
    if divergence == "rkl":
        torch.testing.assert_close(est, exact, rtol=0, atol=1e-8)
    else:
        assert (est - exact).abs().max() > 1e-3, (divergence, params, est, exact)


def test_opd_plus_monte_carlo_mean_gradient_within_error():
    """[2.7.1 MC] N=1e5 on-policy samples in one batch: the loss gradient is the sample mean."""
    z, logq = _state(3)
    p = torch.softmax(z, -1)
    N = 100_000
    y = torch.multinomial(p.float(), N, replacement=True, generator=torch.Generator().manual_seed(0))
    for divergence in ("fkl", "jsd"):
        zz = z.clone().requires_grad_(True)
        lp = torch.log_softmax(zz, -1)[y].view(1, N)
        out = opd_plus_loss(lp, logq[y].view(1, N), torch.ones(1, N), divergence, log_ratio_clip=None)
        (g,) = torch.autograd.grad(out.loss, zz)
        exact = _exact_grad_df(z, logq, F_OF_U[divergence])
        adv = advantage((logq - torch.log_softmax(z, -1))[y], divergence)
        g_i = -adv[:, None] * (F.one_hot(y, V).to(D64) - p)  # per-sample gradient
        tol = 4 * g_i.std(0) / math.sqrt(N)
        torch.testing.assert_close(g, g_i.mean(0))
        assert torch.all((g - exact).abs() < tol), (divergence, g, exact, tol)
        assert exact.abs().max() > 10 * tol.max()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_surrogate_equivalence_remove_stopgrad_form(divergence):
    """[2.7.2] loss = -[sg(-f(u)) log p + (-f(u_theta))] gives the same per-sample gradient
    -w_f(u) (e_a - p) as the detached OPD+ advantage."""
    z, logq = _state(4)
    p = torch.softmax(z, -1)
    for a in range(V):
        zz = z.clone().requires_grad_(True)
        lp = torch.log_softmax(zz, -1)[a]
        r_theta = logq[a] - lp
        surrogate_b = -((-f_value(r_theta.detach(), divergence)) * lp + (-f_value(r_theta, divergence)))
        (gb,) = torch.autograd.grad(surrogate_b, zz)
        zz2 = z.clone().requires_grad_(True)
        out = opd_plus_loss(torch.log_softmax(zz2, -1)[a].view(1, 1), logq[a].view(1, 1), torch.ones(1, 1),
                            divergence, log_ratio_clip=None)
        (ga,) = torch.autograd.grad(out.loss, zz2)
        w = advantage((logq[a] - torch.log_softmax(z, -1)[a]).view(1), divergence)
        hand = -w * (F.one_hot(torch.tensor(a), V).to(D64) - p)
        torch.testing.assert_close(ga, hand, rtol=0, atol=1e-12)
        torch.testing.assert_close(gb, hand, rtol=0, atol=1e-12)


def test_adding_a_constant_to_the_advantage_leaves_the_expected_gradient_unchanged():
    """[2.7.3] RKL and RKL+ differ by -1 per token, and their enumerated expected gradients agree."""
    z, logq = _state(5)
    a = _expected_estimator_grad(z, logq, "rkl", True, {})
    b = _expected_estimator_grad(z, logq, "rkl", False, {})
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_stopgrad_fkl_is_gradient_of_h_and_moves_away_from_teacher():
    """[2.7.4] vanilla FKL descends H = -1/2 sum q log^2(q/p): it increases KL(q||p); FKL+ decreases it."""
    z, logq = _state(6)
    zz = z.clone().requires_grad_(True)
    logp = torch.log_softmax(zz, -1)
    h = -0.5 * (logq.exp() * (logq - logp) ** 2).sum()
    (gh,) = torch.autograd.grad(h, zz)
    torch.testing.assert_close(_expected_estimator_grad(z, logq, "fkl", False, {}), gh, rtol=0, atol=1e-10)

    def fkl(zv):
        return (logq.exp() * (logq - torch.log_softmax(zv, -1))).sum().item()

    z0 = logq + 0.05 * torch.randn(V, dtype=D64, generator=torch.Generator().manual_seed(1))
    for corrected, should_grow in ((False, True), (True, False)):
        zc = z0.clone()
        start = fkl(zc)
        for _ in range(20):
            zc = zc - 0.1 * _expected_estimator_grad(zc, logq, "fkl", corrected, {})
        assert (fkl(zc) > start) == should_grow, (corrected, start, fkl(zc))


def test_no_whitening_rkl_plus_advantages_exactly_one_lower():
    """[2.7.6] constant inputs: RKL+ advantages are exactly those of RKL minus 1 (no batch normaliser)."""
    logp = torch.full((2, 4), -1.5, requires_grad=True)
    logq = torch.full((2, 4), -0.5)
    mask = torch.ones(2, 4, dtype=torch.bool)
    plus = opd_plus_loss(logp, logq, mask, "rkl")
    van = opd_plus_loss(logp, logq, mask, "rkl", corrected=False)
    torch.testing.assert_close(van.advantages, torch.full((2, 4), 1.0))
    torch.testing.assert_close(plus.advantages, torch.full((2, 4), 0.0))
    torch.testing.assert_close(plus.adv_mean, van.adv_mean - 1)


# --------------------------------------------------------------------------------------------
# OPD+: the loss function (clip, masks, reductions, importance ratio)
# --------------------------------------------------------------------------------------------


def test_opd_plus_log_ratio_clip_and_clip_frac_hand():
    # raw r = logq - logp: [8, -7, 1 | masked]; clip 6 -> [6, -6, 1]; FKL+ advantage u = exp(r)
    logp = torch.tensor([[-9.0, -1.0, -2.0, float("nan")]], requires_grad=True)
    logq = torch.tensor([[-1.0, -8.0, -1.0, float("inf")]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    out = opd_plus_loss(logp, logq, mask, "fkl")
    assert isinstance(out, OpdPlusOutput)
    adv = torch.tensor([math.exp(6), math.exp(-6), math.e, 0.0])
    torch.testing.assert_close(out.advantages, adv.view(1, 4))
    torch.testing.assert_close(out.clip_frac, torch.tensor(2 / 3))
    torch.testing.assert_close(out.per_token, -adv.view(1, 4))
    torch.testing.assert_close(out.loss, -adv.sum() / 3)
    torch.testing.assert_close(out.kl, torch.tensor((-8.0 + 7.0 - 1.0) / 3))
    r = torch.tensor([6.0, -6.0, 1.0])
    torch.testing.assert_close(out.divergence_est, (r.exp() * r).mean())
    assert out.ppo_clip_frac.item() == 0.0
    out.loss.backward()  # the advantage is detached: d loss / d logp = -A / N, also on clipped tokens
    torch.testing.assert_close(logp.grad, -adv.view(1, 4) / 3)
    # a wider clip leaves the 8 and -7 alone; None disables clipping
    assert opd_plus_loss(logp, logq, mask, "fkl", log_ratio_clip=10.0).clip_frac.item() == 0.0
    unclipped = opd_plus_loss(logp, logq, mask, "fkl", log_ratio_clip=None)
    torch.testing.assert_close(unclipped.advantages[0, :3], torch.tensor([8.0, -7.0, 1.0]).exp())
    m = out.metrics()
    assert set(m) == {"opd_plus/loss", "opd_plus/adv_mean", "opd_plus/divergence", "opd_plus/kl",
                      "opd_plus/clip_frac", "opd_plus/ppo_clip_frac"}
    assert m["opd_plus/clip_frac"] == pytest.approx(2 / 3)


def test_opd_plus_reductions_and_masks_hand():
    # chi2+ advantage u^2 - 1; r = [0, ln2 | ln2, pad]
    L2 = math.log(2)
    logp = torch.tensor([[-1.0, -1.0], [-2.0, 5.0]], requires_grad=True)
    logq = torch.tensor([[-1.0, -1.0 + L2], [-2.0 + L2, float("-inf")]])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    tok = opd_plus_loss(logp, logq, mask, "chi2")
    torch.testing.assert_close(tok.per_sample, torch.tensor([-1.5, -3.0]))
    torch.testing.assert_close(tok.loss, torch.tensor(-6.0 / 3))
    torch.testing.assert_close(tok.num_tokens, torch.tensor([2.0, 1.0]))
    smp = opd_plus_loss(logp, logq, mask, "chi2", reduction="sample")
    torch.testing.assert_close(smp.loss, torch.tensor(-2.25))
    # garbage at the padded token reaches neither loss nor gradient
    tok.loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[1, 1].item() == 0.0


def test_opd_plus_rkl_stopgrad_is_exactly_top1_opd_on_and_off_policy():
    """The importance ratio, PPO clipping and clip fraction are those of opd_top1_loss."""
    g = torch.Generator().manual_seed(2)
    logp0 = -torch.rand(3, 7, generator=g) * 3
    logq = -torch.rand(3, 7, generator=g) * 3
    beh = logp0 + 0.6 * torch.randn(3, 7, generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.25
    for behaviour in (None, beh):
        for reduction in ("sample", "token"):
            a_in = logp0.clone().requires_grad_(True)
            b_in = logp0.clone().requires_grad_(True)
            a = opd_plus_loss(a_in, logq, mask, "rkl", corrected=False, log_ratio_clip=None,
                              behaviour_logprobs=behaviour, clip_eps=0.2, clip_eps_high=0.3, reduction=reduction)
            b = opd_top1_loss(b_in, logq, mask, behaviour_logprobs=behaviour, clip_eps=0.2, clip_eps_high=0.3,
                              reduction=reduction)
            torch.testing.assert_close(a.loss, b.loss)
            torch.testing.assert_close(a.per_sample, b.per_sample)
            torch.testing.assert_close(a.ppo_clip_frac, b.clip_frac)
            torch.testing.assert_close(a.kl, b.kl)
            a.loss.backward()
            b.loss.backward()
            torch.testing.assert_close(a_in.grad, b_in.grad)
    # The off-policy case does exercise clipping: PPO's clipped branch is active exactly where the ratio
    # leaves [1 - 0.2, 1 + 0.3] in the direction the advantage favours.
    ratio, adv = torch.exp(logp0 - beh), logq - logp0
    ref = ((adv > 0) & (ratio > 1.3)) | ((adv < 0) & (ratio < 0.8))
    assert ref[mask].any()
    assert b.clip_frac.item() == pytest.approx(ref[mask].float().mean().item(), abs=1e-7)


@pytest.mark.parametrize("divergence", ["fkl", "jsd", "chi2"])
def test_opd_plus_off_policy_importance_ratio_is_unbiased(divergence):
    """Samples from pi_old, advantage from the CURRENT student (as top-1 OPD): the enumerated
    expected gradient is grad D_f(q || pi_theta) exactly (no PPO clipping)."""
    z, logq = _state(7)
    logp_old = torch.log_softmax(z + torch.randn(V, dtype=D64, generator=torch.Generator().manual_seed(3)), -1)
    est = _expected_estimator_grad(z, logq, divergence, True, {}, logp_old=logp_old)
    exact = _exact_grad_df(z, logq, F_OF_U[divergence])
    torch.testing.assert_close(est, exact, rtol=0, atol=1e-8)


def test_opd_plus_dtypes_and_teacher_no_grad():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    logq = torch.tensor([[-1.5, -0.5]], requires_grad=True)
    out = opd_plus_loss(logp.to(torch.bfloat16), logq.to(torch.bfloat16), torch.ones(1, 2), "jsd")
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert logq.grad is None and logp.grad is not None
    assert opd_plus_loss(logp.double(), logq.double(), torch.ones(1, 2)).loss.dtype == torch.float64


def test_opd_plus_rejects_bad_arguments():
    x = torch.zeros(1, 2)
    m = torch.ones(1, 2)
    with pytest.raises(ValueError, match="divergence must be one of"):
        opd_plus_loss(x, x, m, "kl")
    with pytest.raises(ValueError, match="unknown divergence parameter"):
        opd_plus_loss(x, x, m, "alpha", beta=0.3)
    with pytest.raises(ValueError, match="shape"):
        opd_plus_loss(x, torch.zeros(1, 3), m)
    with pytest.raises(ValueError, match="reduction"):
        opd_plus_loss(x, x, m, reduction="mean")
    with pytest.raises(ValueError, match="log_ratio_clip"):
        opd_plus_loss(x, x, m, log_ratio_clip=0.0)
    with pytest.raises(ValueError, match="divergence must be one of"):
        advantage(x, "kl")
    # alpha is accepted (and unused) by every divergence, so a CLI can always pass it
    torch.testing.assert_close(advantage(x, "fkl", alpha=3.0), advantage(x, "fkl"))


# --------------------------------------------------------------------------------------------
# TrOPD: trust mask
# --------------------------------------------------------------------------------------------


def _student_teacher(seed: int, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    ps = torch.softmax(torch.randn(V, generator=g, dtype=dtype) * 1.3, -1)
    pt = torch.softmax(torch.randn(V, generator=g, dtype=dtype) * 1.3, -1)
    return ps, pt


def test_trust_probability_hand_and_soft_mask():
    L = math.log
    ls = torch.tensor([[L(0.5), L(0.2), L(0.4), 0.0]])
    lt = torch.tensor([[L(0.25), L(0.6), float("-inf"), float("nan")]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    expected = torch.tensor([[0.5, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(trust_probability(ls, lt, mask), expected)
    torch.testing.assert_close(trust_mask(ls, lt, mask, soft=True), expected)
    hard = trust_mask(ls, lt, mask, seed=3)
    assert hard[0, 1].item() == 1.0 and hard[0, 2].item() == 0.0 and hard[0, 3].item() == 0.0


def test_trust_mask_statistics_monte_carlo():
    """[3.10.1] x ~ pi_S, M ~ Bern(min(pi_T/pi_S, 1)): P(M=0) = TV, P(x, M=1) = min(pi_S, pi_T)(x)."""
    ps, pt = _student_teacher(0)
    B, T = 4, 50_000
    x = torch.multinomial(ps.float(), B * T, replacement=True, generator=torch.Generator().manual_seed(1)).view(B, T)
    m = trust_mask(ps.log()[x], pt.log()[x], torch.ones(B, T), seed=11)
    N = B * T
    tv = 0.5 * (ps - pt).abs().sum().item()
    p0 = 1.0 - m.mean().item()
    assert abs(p0 - tv) < 4 * math.sqrt(tv * (1 - tv) / N), (p0, tv)
    joint = torch.stack([(m * (x == v)).sum() for v in range(V)]) / N
    overlap = torch.minimum(ps, pt)
    assert torch.all((joint - overlap).abs() < 4 * torch.sqrt(overlap * (1 - overlap) / N))
    # the soft weights have exactly the same expectation: E_x[P_trust(x)] = sum_x min(ps, pt)
    soft_exact = (ps * trust_probability(ps.log().view(1, V), pt.log().view(1, V), torch.ones(1, V))).sum()
    torch.testing.assert_close(soft_exact, overlap.sum())


def test_trust_mask_reproducible_and_independent_of_micro_batching():
    g = torch.Generator().manual_seed(5)
    B, T = 6, 9
    ls = -torch.rand(B, T, generator=g) * 2
    lt = ls - torch.rand(B, T, generator=g) * 2  # P_trust in (e^-2, 1]
    lengths = torch.tensor([9, 4, 7, 6, 9, 2])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    ids = torch.tensor([10, 11, 12, 13, 14, 15])
    full = trust_mask(ls, lt, mask, seed=(7, 3), sample_ids=ids)
    torch.testing.assert_close(full, trust_mask(ls, lt, mask, seed=(7, 3), sample_ids=ids))
    assert not torch.equal(full, trust_mask(ls, lt, mask, seed=(7, 4), sample_ids=ids))
    assert 0 < full[mask].mean().item() < 1
    # two micro-batches in another order, each padded only to its own longest sample
    for rows in ([4, 0, 2], [5, 3, 1]):
        t_mb = int(lengths[rows].max())
        part = trust_mask(ls[rows, :t_mb], lt[rows, :t_mb], mask[rows, :t_mb], seed=(7, 3), sample_ids=ids[rows])
        torch.testing.assert_close(part, full[rows, :t_mb])
    # padding that is wider than the batch's does not change the draws either
    wide = trust_mask(F.pad(ls, (0, 5)), F.pad(lt, (0, 5)), F.pad(mask, (0, 5)), seed=(7, 3), sample_ids=ids)
    torch.testing.assert_close(wide[:, :T], full)


def test_trust_mask_rejects_bad_seed_and_ids():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3)
    with pytest.raises(ValueError, match="seed"):
        trust_mask(x, x, m, seed=-1)
    with pytest.raises(ValueError, match="sample_ids"):
        trust_mask(x, x, m, sample_ids=[1])
    with pytest.raises(ValueError, match="shape"):
        trust_probability(x, torch.zeros(2, 4), m)


# --------------------------------------------------------------------------------------------
# TrOPD: expected gradients on a 5-token vocabulary
# --------------------------------------------------------------------------------------------


def _rollout_state(ps, pt, N, seed, k=V):
    """N student samples at one state: inputs for tropd_loss with the student logits z (leaf)."""
    z = ps.log().clone().requires_grad_(True)
    x = torch.multinomial(ps.float(), N, replacement=True, generator=torch.Generator().manual_seed(seed))
    logp_all = torch.log_softmax(z, -1)
    top = torch.topk(pt, k).indices
    lp = logp_all[x].view(1, N)
    lp_k = logp_all[top].view(1, 1, k).expand(1, N, k)
    lt = pt.log()[x].view(1, N)
    lt_k = pt.log()[top].view(1, 1, k).expand(1, N, k)
    return z, x, lp, lp_k, lt, lt_k, top


def test_trust_region_expected_gradient_mc_and_soft_exact():
    """[3.10.2] E[M r (e_x - p)] = sum_x min(p, q)(x) log(q/p)(x) (e_x - p); soft has the same mean."""
    ps, pt = _student_teacher(1)
    eye = torch.eye(V, dtype=D64)
    target = sum(torch.minimum(ps, pt)[v] * (pt[v] / ps[v]).log() * (eye[v] - ps) for v in range(V))
    N = 200_000
    z, x, lp, lp_k, lt, lt_k, _ = _rollout_state(ps, pt, N, seed=2)
    ones = torch.ones(1, N, dtype=torch.bool)
    m = trust_mask(lp.detach(), lt, ones, seed=0)
    out = tropd_loss(lp, lp_k, lt, lt_k, ones, m, outlier="mask")
    (g,) = torch.autograd.grad(out.loss, z)
    r = (pt.log() - ps.log())[x]
    g_i = (m[0] * r)[:, None] * (eye[x] - ps)  # per-sample descent direction
    torch.testing.assert_close(-g, g_i.mean(0))
    tol = 4 * g_i.std(0) / math.sqrt(N)
    assert torch.all((-g - target).abs() < tol), (-g, target, tol)
    assert target.abs().max() > 10 * tol.max()
    # soft weights, enumerated exactly: sum_x p(x) P_trust(x) r(x) (e_x - p) == target
    soft = sum(ps[v] * min(1.0, (pt[v] / ps[v]).item()) * (pt[v] / ps[v]).log() * (eye[v] - ps) for v in range(V))
    torch.testing.assert_close(soft, target, rtol=0, atol=1e-12)


def test_outlier_expected_gradient_is_tv_times_topk_fkl_gradient():
    """[3.10.3] E[(1 - M) grad FKL_k] = TV * grad FKL_k (FKL_k does not depend on the sampled token)."""
    ps, pt = _student_teacher(2)
    N = 200_000
    z, x, lp, lp_k, lt, lt_k, top = _rollout_state(ps, pt, N, seed=3, k=3)
    ones = torch.ones(1, N, dtype=torch.bool)
    m = trust_mask(lp.detach(), lt, ones, seed=1)
    out = tropd_loss(lp.detach(), lp_k, lt, lt_k, ones, m, outlier="fkl")  # only the FKL term has grad
    (g,) = torch.autograd.grad(out.loss, z)
    z2 = ps.log().clone().requires_grad_(True)
    (g_fkl,) = torch.autograd.grad(topk_fkl(torch.log_softmax(z2, -1)[top], pt.log()[top]), z2)
    tv = 0.5 * (ps - pt).abs().sum()
    torch.testing.assert_close(g, out.outlier_frac * g_fkl)
    assert abs(out.outlier_frac.item() - tv.item()) < 4 * math.sqrt(tv * (1 - tv) / N)


def test_topk_fkl_gradient_formula_and_bias():
    """[3.10.4] grad_z = p m_k - q 1_topk; k = V gives p - q (0 at p = q); k < V is biased and
    gradient descent converges to the teacher truncated to its top-k and renormalised."""
    ps, pt = _student_teacher(3)
    for k in (2, 3, V):
        top = torch.topk(pt, k).indices
        z = ps.log().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(topk_fkl(torch.log_softmax(z, -1)[top], pt.log()[top]), z)
        ind = torch.zeros(V, dtype=D64).index_fill(0, top, 1.0)
        torch.testing.assert_close(g, ps * pt[top].sum() - pt * ind, rtol=0, atol=1e-12)
    # k = V at p = q: zero gradient
    z = pt.log().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(topk_fkl(torch.log_softmax(z, -1), pt.log()), z)
    assert g.abs().max().item() < 1e-12
    # k < V at p = q: non-zero, and descent ends at the truncated, renormalised teacher
    top = torch.topk(pt, 3).indices
    z = pt.log().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(topk_fkl(torch.log_softmax(z, -1)[top], pt.log()[top], None), z)
    assert g.abs().max().item() > 1e-2
    zc = pt.log().clone()
    for _ in range(3000):
        zc.requires_grad_(True)
        (g,) = torch.autograd.grad(topk_fkl(torch.log_softmax(zc, -1)[top], pt.log()[top], None), zc)
        zc = (zc - 2.0 * g).detach()
    trunc = torch.zeros(V, dtype=D64).index_copy(0, top, pt[top] / pt[top].sum())
    assert (torch.softmax(zc, -1) - trunc).abs().max().item() < 1e-3


def test_topk_fkl_hand_value_floor_and_teacher_neg_inf():
    L = math.log
    lq = torch.tensor([L(0.5), L(0.25), float("-inf")])
    lp = torch.tensor([L(0.25), L(0.5), -3.0], requires_grad=True)
    # 0.5 (ln .5 - ln .25) + 0.25 (ln .25 - ln .5) + 0 = 0.25 ln 2
    v = topk_fkl(lp, lq)
    torch.testing.assert_close(v, torch.tensor(0.25 * L(2)))
    v.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([-0.5, -0.25, 0.0]))  # d/dlog p_v = -q_v
    # the student puts (almost) no mass on a teacher top-k token: bounded by the floor, no gradient there
    lp2 = torch.tensor([float("-inf"), -50.0, L(0.5)], requires_grad=True)
    lq2 = torch.tensor([L(0.5), L(0.25), L(0.25)])
    v2 = topk_fkl(lp2, lq2, logprob_floor=-20.0)
    expected = 0.5 * (L(0.5) + 20) + 0.25 * (L(0.25) + 20) + 0.25 * (L(0.25) - L(0.5))
    torch.testing.assert_close(v2, torch.tensor(expected))
    v2.backward()
    torch.testing.assert_close(lp2.grad, torch.tensor([0.0, 0.0, -0.25]))
    assert math.isinf(topk_fkl(lp2.detach(), lq2, logprob_floor=None).item())  # the unfloored formula diverges


def test_guidance_term_value_gradient_and_expectation():
    """[3.10.5] prefix tokens: beta * (-log p(x)), directly differentiated: grad_z = -beta (e_x - p),
    and E_{x~q}[grad] = beta (p - q) = beta grad_z KL(q || p)."""
    ps, pt = _student_teacher(4)
    beta = 0.001
    eye = torch.eye(V, dtype=D64)
    expected_grad = torch.zeros(V, dtype=D64)
    for x in range(V):
        z = ps.log().clone().requires_grad_(True)
        lp = torch.log_softmax(z, -1)[x].view(1, 1)
        one = torch.ones(1, 1, dtype=torch.bool)
        lt_k = pt.log()[:2].view(1, 1, 2)
        for lt in (pt.log()[x], torch.tensor(-30.0, dtype=D64)):  # the teacher's value plays no part
            out = tropd_loss(lp, lp.detach().expand(1, 1, 2), lt.view(1, 1), lt_k, one, torch.zeros(1, 1),
                             prefix_mask=one, guidance_beta=beta)
            torch.testing.assert_close(out.loss, -beta * lp.detach()[0, 0])
            (g,) = torch.autograd.grad(out.loss, z, retain_graph=True)
            torch.testing.assert_close(g, -beta * (eye[x] - ps), rtol=0, atol=1e-15)
            assert out.trust_loss.item() == 0 and out.outlier_loss.item() == 0 and out.outlier_frac.item() == 0
        expected_grad += pt[x] * g
    z = ps.log().clone().requires_grad_(True)
    kl = (pt * (pt.log() - torch.log_softmax(z, -1))).sum()
    (gkl,) = torch.autograd.grad(kl, z)
    torch.testing.assert_close(expected_grad, beta * (ps - pt), rtol=0, atol=1e-15)
    torch.testing.assert_close(expected_grad, beta * gkl, rtol=0, atol=1e-15)


def test_degenerate_teacher_equals_student_and_teacher_much_smaller():
    """[3.10.6] pi_T = pi_S: every token trusted, r = 0, zero gradient; pi_T(x) << pi_S(x): outlier
    with probability 1 - pi_T/pi_S, and the expected trust advantage min(p,q) log(q/p) is small."""
    ps, _ = _student_teacher(5)
    N = 1000
    z, x, lp, lp_k, lt, lt_k, _ = _rollout_state(ps, ps, N, seed=4)
    ones = torch.ones(1, N, dtype=torch.bool)
    m = trust_mask(lp.detach(), lt, ones, seed=2)
    assert m.min().item() == 1.0
    out = tropd_loss(lp, lp_k, lt, lt_k, ones, m)
    (g,) = torch.autograd.grad(out.loss, z)
    assert g.abs().max().item() < 1e-12 and out.outlier_frac.item() == 0.0
    # teacher gives the sampled token 1/50 of the student's probability
    n = 100_000
    ls = torch.full((1, n), math.log(0.5))
    lt = ls + math.log(0.02)
    m = trust_mask(ls, lt, torch.ones(1, n), seed=4)
    assert abs((1 - m.mean().item()) - 0.98) < 4 * math.sqrt(0.98 * 0.02 / n)
    for ratio in (1e-2, 1e-4, 1e-8):
        assert abs(min(0.5, 0.5 * ratio) * math.log(ratio)) < 0.5 * ratio * 19  # -> 0 as ratio -> 0


def test_prefix_schedule_and_routing_by_source_tag():
    """[3.10.7] l_max(0) = L, l_max(K) = 0, non-increasing; prefix tokens get only the guidance term,
    continuation tokens only the trust/outlier terms."""
    L, K = 8096, 200
    seq = [guidance_prefix_max(k, K, L) for k in range(K + 3)]
    assert seq[0] == L and seq[K] == 0 and seq[-1] == 0 and seq[K // 2] == L // 2
    assert all(a >= b for a, b in zip(seq, seq[1:]))
    with pytest.raises(ValueError):
        guidance_prefix_max(0, 0, L)

    lp = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], requires_grad=True)
    lt = torch.tensor([[-4.0, -9.0, -0.2, -5.0]])
    lp_k = torch.log_softmax(torch.tensor([[[0.0, 1.0], [0.5, 0.0], [0.0, 0.0], [2.0, 0.0]]]), -1).requires_grad_(True)
    lt_k = torch.log(torch.tensor([[[0.6, 0.3], [0.5, 0.4], [0.7, 0.2], [0.9, 0.05]]]))
    mask = torch.ones(1, 4, dtype=torch.bool)
    prefix = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    trust = torch.tensor([[0.0, 1.0, 1.0, 0.0]])  # trust values at prefix positions are ignored
    out = tropd_loss(lp, lp_k, lt, lt_k, mask, trust, prefix_mask=prefix, guidance_beta=0.5)
    fkl3 = topk_fkl(lp_k[0, 3], lt_k[0, 3]).detach()
    torch.testing.assert_close(out.per_token.detach(), torch.tensor([[0.5, 1.0, -0.3, fkl3.item()]]))
    out.loss.backward()
    # d/dlog p: prefix -beta/N; trust token 2: -r/N = -0.3/4; outlier token 3: only through lp_k
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.5 / 4, -0.5 / 4, -0.3 / 4, 0.0]]))
    assert lp_k.grad[0, :3].abs().max().item() == 0.0 and lp_k.grad[0, 3].abs().max().item() > 0


def test_tropd_ablation_switches_reproduce_their_formulas():
    """[3.10.8] Clip: max(r, tau); Mask Outlier: 1[r > tau] r; Full FKL: FKL on all tokens, no RKL;
    TrOPD mask: outliers get nothing."""
    lp0 = torch.tensor([[-1.0, -0.5, -2.0, -0.3, -1.0]])
    lt = torch.tensor([[-1.5, -9.5, -1.0, -4.3, -1.0]])  # r = [-0.5, -9, 1, -4, 0]
    r = lt - lp0
    N, tau = 5, -3.0
    mask = torch.ones(1, N, dtype=torch.bool)
    lp_k = torch.log(torch.tensor([0.2, 0.1])).expand(1, N, 2)
    lt_k = torch.log(torch.tensor([0.5, 0.3])).expand(1, N, 2)
    zeros, ones = torch.zeros(1, N), torch.ones(1, N)

    def grad_of(trust, outlier, lpk=lp_k):
        lp = lp0.clone().requires_grad_(True)
        out = tropd_loss(lp, lpk, lt, lt_k, mask, trust, outlier=outlier, tau=tau)
        (g,) = torch.autograd.grad(out.loss, lp, allow_unused=True)
        return out, (torch.zeros_like(lp) if g is None else g)

    out, g = grad_of(zeros, "clip")  # Clip Outlier: advantage max(r, tau) on every token
    torch.testing.assert_close(-g * N, r.clamp_min(tau))
    torch.testing.assert_close(out.per_token, -r.clamp_min(tau))
    out, g = grad_of((r > tau).float(), "mask")  # Mask Outlier: 1[r > tau] r
    torch.testing.assert_close(-g * N, (r > tau).float() * r)
    lpk = lp_k.clone().requires_grad_(True)
    out, g = grad_of(zeros, "fkl", lpk)  # Full FKL: top-k FKL on every token, RKL off
    assert g.abs().max().item() == 0.0
    torch.testing.assert_close(out.loss, topk_fkl(lp_k[0, 0], lt_k[0, 0]))
    out, g = grad_of(ones, "fkl")  # vanilla OPD: every token trusted
    torch.testing.assert_close(-g * N, r)
    # TrOPD with the Mask / Clip / FKL outlier objectives on a fixed draw
    trust = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0]])
    _, g = grad_of(trust, "mask")
    torch.testing.assert_close(-g * N, trust * r)
    _, g = grad_of(trust, "clip")
    torch.testing.assert_close(-g * N, trust * r + (1 - trust) * r.clamp_min(tau))
    out, _ = grad_of(trust, "fkl")
    torch.testing.assert_close(out.outlier_loss, 2 * topk_fkl(lp_k[0, 0], lt_k[0, 0]) / N)
    assert set(OUTLIER_MODES) == {"fkl", "mask", "clip"}


def test_tropd_metrics_hand_example():
    L = math.log
    # sample 0: prefix 2 tokens, 2 continuation; sample 1: no prefix, 2 continuation + 1 pad
    lp = torch.tensor([[L(0.5), L(0.25), L(0.5), L(0.2)], [L(0.4), L(0.1), 0.0, 0.0]], requires_grad=True)
    lt = torch.tensor([[L(0.2), L(0.2), L(0.25), L(0.4)], [L(0.1), L(0.3), 0.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    prefix = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    lt_k = torch.log(torch.tensor([0.5, 0.25])).expand(2, 4, 2)
    lp_k = torch.log(torch.tensor([0.25, 0.5])).expand(2, 4, 2)  # FKL = 0.25 ln 2 per outlier token
    trust = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])  # continuation: 0,1 | 0,1
    beta = 0.01
    out = tropd_loss(lp, lp_k, lt, lt_k, mask, trust, prefix_mask=prefix, guidance_beta=beta)
    assert isinstance(out, TropdOutput)
    n = 6
    trust_sum = -L(2.0) - L(3.0)  # -r on the trusted tokens (0,3): r = ln 2; (1,1): r = ln 3
    out_sum = 2 * 0.25 * L(2)
    guid_sum = beta * (-L(0.5) - L(0.25))
    m = out.metrics()
    assert set(m) == {"tropd/loss", "tropd/outlier_frac", "tropd/trust_loss", "tropd/outlier_loss",
                      "tropd/guidance_loss", "tropd/guidance_tokens", "tropd/prefix_len", "tropd/kl",
                      "tropd/clip_frac"}
    assert m["tropd/outlier_frac"] == pytest.approx(0.5)
    assert m["tropd/trust_loss"] == pytest.approx(trust_sum / n)
    assert m["tropd/outlier_loss"] == pytest.approx(out_sum / n)
    assert m["tropd/guidance_loss"] == pytest.approx(guid_sum / n)
    assert m["tropd/loss"] == pytest.approx((trust_sum + out_sum + guid_sum) / n)
    assert m["tropd/guidance_tokens"] == 2.0 and m["tropd/prefix_len"] == 1.0
    kl = -(L(0.5) + L(2) + L(0.25) + L(3)) / 4  # -r over the four continuation tokens
    assert m["tropd/kl"] == pytest.approx(kl) and m["tropd/clip_frac"] == 0.0
    torch.testing.assert_close(out.num_tokens, torch.tensor([4.0, 2.0]))
    smp = tropd_loss(lp, lp_k, lt, lt_k, mask, trust, prefix_mask=prefix, guidance_beta=beta, reduction="sample")
    torch.testing.assert_close(smp.loss, out.per_sample.mean())
    out.loss.backward()
    assert torch.isfinite(lp.grad).all() and lp.grad[1, 2:].abs().max().item() == 0.0


def test_tropd_importance_ratio_matches_top1_opd():
    """Trust term with stale rollouts: the ratio and PPO clipping of top-1 OPD; soft weights scale it."""
    g = torch.Generator().manual_seed(9)
    B, T, K = 3, 6, 4
    lp0 = -torch.rand(B, T, generator=g) * 3
    lt = -torch.rand(B, T, generator=g) * 3
    beh = lp0 + 0.5 * torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    lk = torch.zeros(B, T, K)
    a_in, b_in = lp0.clone().requires_grad_(True), lp0.clone().requires_grad_(True)
    a = tropd_loss(a_in, lk, lt, lk, mask, torch.ones(B, T), outlier="mask", behaviour_logprobs=beh)
    b = opd_top1_loss(b_in, lt, mask, behaviour_logprobs=beh, reduction="token")
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.clip_frac, b.clip_frac)
    ratio, adv = torch.exp(lp0 - beh), lt - lp0  # clipped where the ratio leaves [0.8, 1.2] as adv favours
    ref = ((adv > 0) & (ratio > 1.2)) | ((adv < 0) & (ratio < 0.8))
    assert ref[mask].any()
    assert b.clip_frac.item() == pytest.approx(ref[mask].float().mean().item(), abs=1e-7)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(a_in.grad, b_in.grad)
    half = tropd_loss(lp0, lk, lt, lk, mask, torch.full((B, T), 0.5), outlier="mask", behaviour_logprobs=beh)
    torch.testing.assert_close(half.loss, 0.5 * b.loss.detach())
    # behaviour equal to the current log-probs is the on-policy case
    on = tropd_loss(lp0, lk, lt, lk, mask, torch.ones(B, T), outlier="mask")
    same = tropd_loss(lp0, lk, lt, lk, mask, torch.ones(B, T), outlier="mask", behaviour_logprobs=lp0.clone())
    torch.testing.assert_close(on.loss, same.loss)


def test_tropd_rejects_bad_arguments():
    x = torch.zeros(1, 2)
    k = torch.zeros(1, 2, 3)
    m = torch.ones(1, 2)
    with pytest.raises(ValueError, match="outlier"):
        tropd_loss(x, k, x, k, m, m, outlier="keep")
    with pytest.raises(ValueError, match="trust weights"):
        tropd_loss(x, k, x, k, m, torch.full((1, 2), 1.5))
    with pytest.raises(ValueError, match="student_topk_logprobs"):
        tropd_loss(x, torch.zeros(1, 3, 3), x, k, m, m)
    with pytest.raises(ValueError, match="teacher_topk_logprobs"):
        tropd_loss(x, k, x, torch.zeros(1, 2, 4), m, m)
    with pytest.raises(ValueError, match="prefix_mask"):
        tropd_loss(x, k, x, k, m, m, prefix_mask=torch.ones(2, 2))
    with pytest.raises(ValueError, match="guidance_beta"):
        tropd_loss(x, k, x, k, m, m, guidance_beta=-1.0)
