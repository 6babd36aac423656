"""Unit tests for oprd_cli.losses: hand-computed values, masking, gradients, statistical checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from oprd_cli.losses import (
    OpdOutput,
    OprdOutput,
    entropy_from_logits,
    masked_mean,
    opd_full_loss,
    opd_top1_loss,
    opd_topk_loss,
    oprd_loss,
    topk_overlap,
    topk_overlap_from_logits,
)

# --------------------------------------------------------------------------------------------
# OPRD
# --------------------------------------------------------------------------------------------


def _hand_case():
    """B=2, Lyr=2, P=3, d=2. Sample 0 supervises positions 0,1; sample 1 only position 0.

    Per-position errors (1/d)||s - t||^2, written out:
      b0 l0: [1,0]-[0,0] -> 1/2 = 0.5 ; [0,2]-[0,0] -> 4/2 = 2    -> layer mean 1.25
      b0 l1: [3,0]-[0,0] -> 9/2 = 4.5 ; [0,0]-[0,1] -> 1/2 = 0.5  -> layer mean 2.5
      b1 l0: [2,2]-[0,0] -> 8/2 = 4
      b1 l1: [1,-1]-[1,1] -> 4/2 = 2
    per_sample = [(1.25+2.5)/2, (4+2)/2] = [1.875, 3.0]
    sample reduction: loss = 2.4375, per_layer = [(1.25+4)/2, (2.5+2)/2] = [2.625, 2.25]
    token reduction: layer sums 6.5 and 7 over 3 positions -> loss 13.5/6 = 2.25, per_layer [6.5/3, 7/3]
    """
    s = torch.tensor(
        [
            [[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]], [[3.0, 0.0], [0.0, 0.0], [5.0, 5.0]]],
            [[[2.0, 2.0], [7.0, 7.0], [7.0, 7.0]], [[1.0, -1.0], [8.0, 8.0], [8.0, 8.0]]],
        ]
    )
    t = torch.tensor(
        [
            [[[0.0, 0.0], [0.0, 0.0], [-3.0, 1.0]], [[0.0, 0.0], [0.0, 1.0], [2.0, 2.0]]],
            [[[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [3.0, 3.0], [3.0, 3.0]]],
        ]
    )
    mask = torch.tensor([[True, True, False], [True, False, False]])
    return s, t, mask


def test_oprd_hand_values_sample_reduction():
    s, t, mask = _hand_case()
    out = oprd_loss(s.clone().requires_grad_(True), t, mask, normalize=False, reduction="sample")
    assert isinstance(out, OprdOutput)
    torch.testing.assert_close(out.per_sample, torch.tensor([1.875, 3.0]))
    torch.testing.assert_close(out.loss, torch.tensor(2.4375))
    torch.testing.assert_close(out.per_layer, torch.tensor([2.625, 2.25]))
    torch.testing.assert_close(out.per_layer.mean(), out.loss)
    torch.testing.assert_close(out.num_positions, torch.tensor([2.0, 1.0]))
    assert out.per_layer.requires_grad is False and out.cosine.requires_grad is False


def test_oprd_hand_values_token_reduction():
    s, t, mask = _hand_case()
    out = oprd_loss(s, t, mask, normalize=False, reduction="token")
    torch.testing.assert_close(out.loss, torch.tensor(2.25))
    torch.testing.assert_close(out.per_sample, torch.tensor([1.875, 3.0]))  # per-sample Eq. 6 either way
    torch.testing.assert_close(out.per_layer, torch.tensor([6.5 / 3, 7.0 / 3]))
    # equivalently: per-sample values weighted by their number of positions
    torch.testing.assert_close(out.loss, (2 * 1.875 + 1 * 3.0) / torch.tensor(3.0))


def test_oprd_normalized_form_and_cosine_hand_values():
    # B=1, Lyr=1, P=4, d=2, last position is padding.
    s = torch.tensor([[[[1.0, 0.0], [3.0, 4.0], [2.0, 0.0], [5.0, 5.0]]]])
    t = torch.tensor([[[[0.0, 1.0], [6.0, 8.0], [1.0, 1.0], [-1.0, 7.0]]]])
    mask = torch.tensor([[1, 1, 1, 0]])
    r2 = math.sqrt(2.0) / 2
    # normalised: (1/2)||u - v||^2 = 1 - cos -> 1, 0, 1 - sqrt(2)/2
    out = oprd_loss(s, t, mask, normalize=True)
    torch.testing.assert_close(out.loss, torch.tensor((1.0 + 0.0 + (1 - r2)) / 3))
    # raw: (1+1)/2 = 1, (9+16)/2 = 12.5, (1+1)/2 = 1
    raw = oprd_loss(s, t, mask, normalize=False)
    torch.testing.assert_close(raw.loss, torch.tensor(14.5 / 3))
    # cosine is 0, 1, sqrt(2)/2 at the supervised positions, whichever form
    for o in (out, raw):
        torch.testing.assert_close(o.cosine, torch.tensor((0.0 + 1.0 + r2) / 3))
        torch.testing.assert_close(o.per_layer_cosine, torch.tensor([(0.0 + 1.0 + r2) / 3]))


def test_oprd_defaults_are_the_release_normalized_form_and_token_mean():
    """The release's OPRD: both vectors L2-normalised, squared error averaged over d, then over every
    supervised token of the batch, then over layers. Two samples of different lengths (2 and 1
    supervised tokens), d = 2, one layer; per-token errors by hand:
      s0 t0: [1,0] vs [0,1]   normalised [1,0]-[0,1] -> 2/2 = 1 ; raw (1+1)/2  = 1
      s0 t1: [2,0] vs [4,0]   normalised equal       -> 0       ; raw 4/2      = 2
      s1 t0: [0,3] vs [0,-1]  normalised [0,1]-[0,-1] -> 4/2 = 2; raw 16/2     = 8
    normalised: token-mean (1+0+2)/3 = 1, sample-mean ((1+0)/2 + 2)/2 = 1.25
    raw:        token-mean (1+2+8)/3 = 11/3, sample-mean ((1+2)/2 + 8)/2 = 4.75
    """
    s = torch.tensor([[[[1.0, 0.0], [2.0, 0.0]]], [[[0.0, 3.0], [5.0, 5.0]]]])
    t = torch.tensor([[[[0.0, 1.0], [4.0, 0.0]]], [[[0.0, -1.0], [1.0, 2.0]]]])
    mask = torch.tensor([[True, True], [True, False]])
    torch.testing.assert_close(oprd_loss(s, t, mask).loss, torch.tensor(1.0))  # the defaults
    torch.testing.assert_close(oprd_loss(s, t, mask, normalize=True, reduction="token").loss, torch.tensor(1.0))
    torch.testing.assert_close(oprd_loss(s, t, mask, normalize=True, reduction="sample").loss, torch.tensor(1.25))
    torch.testing.assert_close(oprd_loss(s, t, mask, normalize=False, reduction="token").loss,
                               torch.tensor(11.0 / 3))
    torch.testing.assert_close(oprd_loss(s, t, mask, normalize=False, reduction="sample").loss, torch.tensor(4.75))
    # the release computes it this way (F.normalize, mse over d, mean over the supervised tokens)
    m = mask[:, None, :]
    ref = F.mse_loss(F.normalize(s, dim=-1), F.normalize(t, dim=-1), reduction="none").mean(-1)[m].mean()
    torch.testing.assert_close(oprd_loss(s, t, mask).loss, ref)


def test_oprd_normalized_is_scale_free():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    a = oprd_loss(s, t, mask, normalize=True).loss
    b = oprd_loss(3.0 * s, 0.25 * t, mask, normalize=True).loss
    torch.testing.assert_close(a, b)
    assert not torch.allclose(oprd_loss(s, t, mask, normalize=False).loss,
                              oprd_loss(3.0 * s, t, mask, normalize=False).loss)


def test_oprd_layer_averaging_matches_per_layer_calls():
    torch.manual_seed(1)
    s, t = torch.randn(3, 4, 6, 5), torch.randn(3, 4, 6, 5)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    for normalize in (False, True):
        for reduction in ("sample", "token"):
            full = oprd_loss(s, t, mask, normalize=normalize, reduction=reduction)
            singles = [oprd_loss(s[:, i : i + 1], t[:, i : i + 1], mask, normalize=normalize, reduction=reduction)
                       for i in range(4)]
            torch.testing.assert_close(full.loss, torch.stack([o.loss for o in singles]).mean())
            torch.testing.assert_close(full.per_layer, torch.stack([o.loss for o in singles]))
            torch.testing.assert_close(full.per_sample, torch.stack([o.per_sample for o in singles]).mean(0))
            torch.testing.assert_close(full.per_layer_cosine, torch.stack([o.cosine for o in singles]))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("reduction", ["sample", "token"])
def test_oprd_padding_never_counts(normalize, reduction):
    torch.manual_seed(2)
    s, t = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    s1 = s.clone().requires_grad_(True)
    out1 = oprd_loss(s1, t, mask, normalize=normalize, reduction=reduction)
    out1.loss.backward()

    pad = ~mask[:, None, :, None].expand_as(s)
    s_alt, t_alt = s.clone(), t.clone()
    s_alt[pad] = 1e3
    t_alt[pad] = float("nan")
    t_alt[1, :, 4] = float("inf")
    s2 = s_alt.requires_grad_(True)
    out2 = oprd_loss(s2, t_alt, mask, normalize=normalize, reduction=reduction)
    out2.loss.backward()

    torch.testing.assert_close(out1.loss, out2.loss)
    torch.testing.assert_close(out1.per_sample, out2.per_sample)
    torch.testing.assert_close(out1.cosine, out2.cosine)
    torch.testing.assert_close(s1.grad, s2.grad)
    assert torch.all(s2.grad[pad] == 0)
    assert torch.isfinite(s2.grad).all()


@pytest.mark.parametrize("normalize", [False, True])
def test_oprd_all_masked_sample_is_zero_not_nan(normalize):
    torch.manual_seed(3)
    s = torch.randn(2, 2, 3, 4, requires_grad=True)
    t = torch.randn(2, 2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    out = oprd_loss(s, t, mask, normalize=normalize, reduction="sample")
    assert out.per_sample[1].item() == 0.0
    torch.testing.assert_close(out.loss, out.per_sample[0] / 2)  # the empty sample counts in B
    tok = oprd_loss(s, t, mask, normalize=normalize, reduction="token")
    torch.testing.assert_close(tok.loss, out.per_sample[0])  # token-mean: only the 2 supervised tokens count
    out.loss.backward()
    assert torch.isfinite(s.grad).all() and torch.all(s.grad[1] == 0)
    # the whole batch empty: zeros everywhere, no NaN
    s.grad = None
    for reduction in ("sample", "token"):
        empty = oprd_loss(s, t, torch.zeros(2, 3, dtype=torch.bool), normalize=normalize, reduction=reduction)
        for v in (empty.loss, empty.per_sample, empty.per_layer, empty.cosine, empty.per_layer_cosine):
            assert torch.isfinite(v).all() and torch.all(v == 0)
        empty.loss.backward()
        assert torch.all(s.grad == 0)


def test_oprd_gradient_reaches_only_student_and_matches_analytic():
    torch.manual_seed(4)
    B, n_layers, P, d = 2, 3, 4, 5
    s = torch.randn(B, n_layers, P, d, requires_grad=True)
    t = torch.randn(B, n_layers, P, d, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    n_pos = mask.sum(-1).float()  # [2] = [3, 1]
    m4 = mask[:, None, :, None].float()

    out = oprd_loss(s, t, mask, normalize=False, reduction="sample")
    out.loss.backward()
    assert t.grad is None
    # d/ds of mean_b mean_l (1/n_b) sum_p m (1/d)||s - t||^2 = m * 2/d (s - t) / (n_b * B * Lyr)
    expected = m4 * (2.0 / d) * (s - t).detach() / (n_pos[:, None, None, None] * B * n_layers)
    torch.testing.assert_close(s.grad, expected)

    s.grad = None
    oprd_loss(s, t, mask, normalize=False, reduction="token").loss.backward()
    assert t.grad is None
    expected_tok = m4 * (2.0 / d) * (s - t).detach() / (n_pos.sum() * n_layers)
    torch.testing.assert_close(s.grad, expected_tok)

    s.grad = None
    oprd_loss(s, t, mask, normalize=True).loss.backward()
    assert t.grad is None and s.grad is not None


def test_oprd_normalized_gradient_matches_reference():
    torch.manual_seed(5)
    s = torch.randn(2, 2, 3, 6, requires_grad=True)
    t = torch.randn(2, 2, 3, 6)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    oprd_loss(s, t, mask, normalize=True, reduction="sample").loss.backward()
    s_ref = s.detach().clone().requires_grad_(True)
    err = (F.normalize(s_ref, dim=-1) - F.normalize(t, dim=-1)).pow(2).mean(-1)  # [B, L, P]
    m = mask[:, None, :].float()
    ref = ((err * m).sum(-1) / m.sum(-1)).mean()
    ref.backward()
    torch.testing.assert_close(s.grad, s_ref.grad)


def test_oprd_bf16_inputs_computed_in_float32():
    torch.manual_seed(6)
    s = torch.randn(2, 2, 3, 8)
    t_bf16 = torch.randn(2, 2, 3, 8).to(torch.bfloat16)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    out = oprd_loss(s, t_bf16, mask)
    ref = oprd_loss(s, t_bf16.float(), mask)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss)
    # bf16 student: float32 loss, gradient in the student's dtype
    s_bf16 = s.to(torch.bfloat16).requires_grad_(True)
    out2 = oprd_loss(s_bf16, t_bf16, mask, normalize=True)
    assert out2.loss.dtype == torch.float32 and out2.cosine.dtype == torch.float32
    out2.loss.backward()
    assert s_bf16.grad.dtype == torch.bfloat16 and torch.isfinite(s_bf16.grad.float()).all()
    torch.testing.assert_close(out2.loss, oprd_loss(s_bf16.detach().float(), t_bf16.float(), mask, normalize=True).loss)


def test_oprd_rejects_bad_shapes_and_reduction():
    s = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError):
        oprd_loss(s, torch.zeros(1, 2, 3, 5), torch.ones(1, 3))
    with pytest.raises(ValueError):
        oprd_loss(s, s, torch.ones(1, 4))
    with pytest.raises(ValueError):
        oprd_loss(s, s, torch.ones(1, 3), reduction="mean")


# --------------------------------------------------------------------------------------------
# OPD top-1
# --------------------------------------------------------------------------------------------

V = 5


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    logp, logq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def test_top1_on_policy_value_and_reductions_hand():
    # on-policy the per-token loss value is log p - log q (the sampled-token KL estimate)
    logp = torch.tensor([[-1.0, -0.5, -7.0], [-2.0, -9.0, -9.0]], requires_grad=True)
    logq = torch.tensor([[-2.0, -2.5, 3.0], [-6.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    # per-token l: [1, 2, -], [4, -, -]
    out = opd_top1_loss(logp, logq, mask)
    assert isinstance(out, OpdOutput)
    torch.testing.assert_close(out.per_sample, torch.tensor([1.5, 4.0]))
    torch.testing.assert_close(out.loss, torch.tensor(2.75))
    torch.testing.assert_close(out.kl, torch.tensor(7.0 / 3))
    torch.testing.assert_close(out.pg_loss, out.loss)
    assert out.clip_frac.item() == 0.0
    tok = opd_top1_loss(logp, logq, mask, reduction="token")
    torch.testing.assert_close(tok.loss, torch.tensor(7.0 / 3))
    # gradient wrt log pi_theta(y_t) is -A_t = l_t (times the reduction weight); teacher gets none
    tok.loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[1.0, 2.0, 0.0], [4.0, 0.0, 0.0]]) / 3)
    # an all-masked sample: 0, no NaN
    out0 = opd_top1_loss(logp, logq, torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool))
    torch.testing.assert_close(out0.per_sample, torch.tensor([1.5, 0.0]))


def test_top1_estimate_and_gradient_converge_to_exact_kl():
    torch.manual_seed(7)
    z = torch.randn(V) * 1.5
    zq = torch.randn(V) * 1.5
    logq_all = torch.log_softmax(zq, -1)
    p = torch.softmax(z, -1)
    N = 200_000
    y = torch.multinomial(p, N, replacement=True)

    zs = z.clone().requires_grad_(True)
    logp_all = torch.log_softmax(zs, -1)
    out = opd_top1_loss(logp_all[y].view(1, N), logq_all[y].view(1, N), torch.ones(1, N), reduction="token")
    out.loss.backward()

    exact_z = z.clone().requires_grad_(True)
    exact_kl = _kl(exact_z, zq)
    exact_kl.backward()

    # per-sample terms (for the statistical tolerance only)
    l_i = (torch.log_softmax(z, -1) - logq_all)[y]
    torch.testing.assert_close(out.kl, l_i.mean())
    assert abs(out.kl.item() - exact_kl.item()) < 5 * l_i.std().item() / math.sqrt(N)
    g_i = l_i[:, None] * (F.one_hot(y, V).float() - p)  # grad of the surrogate per sample
    tol = 5 * g_i.std(0) / math.sqrt(N)
    assert torch.all((zs.grad - exact_z.grad).abs() < tol), (zs.grad, exact_z.grad, tol)
    assert exact_z.grad.abs().max() > 10 * tol.max()  # the check is not vacuous


def test_top1_off_policy_importance_ratio_is_unbiased_and_uses_current_logprob():
    torch.manual_seed(8)
    z = torch.randn(V)  # current student
    z_old = z + torch.randn(V) * 1.0  # behaviour policy that sampled the tokens
    zq = torch.randn(V) * 1.5
    logq_all = torch.log_softmax(zq, -1)
    logp_old_all = torch.log_softmax(z_old, -1)
    N = 400_000
    y = torch.multinomial(logp_old_all.exp(), N, replacement=True)

    zs = z.clone().requires_grad_(True)
    logp_all = torch.log_softmax(zs, -1)
    out = opd_top1_loss(
        logp_all[y].view(1, N), logq_all[y].view(1, N), torch.ones(1, N, dtype=torch.bool),
        behaviour_logprobs=logp_old_all[y].view(1, N), clip_eps=1e6, reduction="token",
    )
    out.loss.backward()
    assert out.clip_frac.item() == 0.0

    exact_z = z.clone().requires_grad_(True)
    _kl(exact_z, zq).backward()

    p = torch.softmax(z, -1)
    logp = torch.log_softmax(z, -1)
    rho = (logp - logp_old_all)[y].exp()
    basis = F.one_hot(y, V).float() - p
    g_i = (rho * (logp - logq_all)[y])[:, None] * basis
    tol = 5 * g_i.std(0) / math.sqrt(N)
    assert torch.all((zs.grad - exact_z.grad).abs() < tol), (zs.grad, exact_z.grad, tol)
    # the alternative advantage, -(log pi_old - log q), converges elsewhere: this test can tell them apart
    g_old = (rho * (logp_old_all - logq_all)[y])[:, None] * basis
    assert torch.any((g_old.mean(0) - exact_z.grad).abs() > 3 * tol)


def test_top1_ppo_clipping_hand_case():
    L = math.log
    # tokens: 0 ratio 2, A>0 -> clipped high; 1 ratio 2, A<0 -> not clipped;
    #         2 ratio 1, A=0 -> not clipped; 3 ratio 0.5, A<0 -> clipped low; 4 padding (garbage)
    logp = torch.tensor([[L(0.5), L(0.5), L(0.5), L(0.25), 3.0]], requires_grad=True)
    logp_old = torch.tensor([[L(0.25), L(0.25), L(0.5), L(0.5), -50.0]])
    logq = torch.tensor([[L(0.8), L(0.1), L(0.5), L(0.05), float("-inf")]])
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    A = [L(1.6), -L(5.0), 0.0, -L(5.0)]
    out = opd_top1_loss(logp, logq, mask, behaviour_logprobs=logp_old, clip_eps=0.2)
    # surrogate per token: -1.2*A0, -2*A1, 0, -0.8*A3
    expected = (-1.2 * A[0] - 2.0 * A[1] + 0.0 - 0.8 * A[3]) / 4
    torch.testing.assert_close(out.loss, torch.tensor(expected))
    torch.testing.assert_close(out.pg_loss, out.loss.detach())
    torch.testing.assert_close(out.clip_frac, torch.tensor(0.5))
    torch.testing.assert_close(out.kl, torch.tensor((L(0.5 / 0.8) + L(5.0) + 0.0 + L(5.0)) / 4))
    out.loss.backward()
    # d/dlogp of -rho*A is -rho*A on unclipped tokens, 0 on clipped ones and padding
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -2.0 * A[1] / 4, 0.0, 0.0, 0.0]]))

    # asymmetric clip: eps_high 0.5 still clips token 0 (ratio 2) at 1.5; eps_high 3 does not
    out_hi = opd_top1_loss(logp, logq, mask, behaviour_logprobs=logp_old, clip_eps=0.2, clip_eps_high=0.5)
    torch.testing.assert_close(out_hi.loss, torch.tensor((-1.5 * A[0] - 2.0 * A[1] - 0.8 * A[3]) / 4))
    torch.testing.assert_close(out_hi.clip_frac, torch.tensor(0.5))
    out_wide = opd_top1_loss(logp, logq, mask, behaviour_logprobs=logp_old, clip_eps=0.2, clip_eps_high=3.0)
    torch.testing.assert_close(out_wide.clip_frac, torch.tensor(0.25))
    torch.testing.assert_close(out_wide.loss, torch.tensor((-2.0 * A[0] - 2.0 * A[1] - 0.8 * A[3]) / 4))


def test_top1_on_policy_matches_behaviour_equal_to_current():
    torch.manual_seed(9)
    logp = (-torch.rand(3, 6) * 3).requires_grad_(True)
    logq = -torch.rand(3, 6) * 3
    mask = torch.rand(3, 6) > 0.3
    a = opd_top1_loss(logp, logq, mask)
    (ga,) = torch.autograd.grad(a.loss, logp)
    b = opd_top1_loss(logp, logq, mask, behaviour_logprobs=logp.detach().clone())
    (gb,) = torch.autograd.grad(b.loss, logp)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(ga, gb)
    assert b.clip_frac.item() == 0.0


def test_top1_teacher_gets_no_grad_and_bf16_ok():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    logq = torch.tensor([[-1.5, -0.5]], requires_grad=True)
    out = opd_top1_loss(logp, logq.to(torch.bfloat16), torch.ones(1, 2))
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert logq.grad is None and logp.grad is not None


# --------------------------------------------------------------------------------------------
# OPD top-k and full
# --------------------------------------------------------------------------------------------


def test_topk_renormalisation_hand_k2():
    L = math.log
    # student logits [0, log 3] -> p_S = [1/4, 3/4]
    # token 0: teacher [log .2, log .2] -> q_S = [1/2, 1/2]; KL = 1/4 log(1/2) + 3/4 log(3/2)
    # token 1: teacher [log .3, log .1] -> q_S = [3/4, 1/4]; KL = 1/4 log(1/3) + 3/4 log 3 = 1/2 log 3
    s = torch.tensor([[[0.0, L(3.0)], [0.0, L(3.0)]]], requires_grad=True)
    tq = torch.tensor([[[L(0.2), L(0.2)], [L(0.3), L(0.1)]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    kl0 = 0.25 * L(0.5) + 0.75 * L(1.5)
    kl1 = 0.5 * L(3.0)
    out = opd_topk_loss(s, tq, mask, reduction="token")
    torch.testing.assert_close(out.loss, torch.tensor((kl0 + kl1) / 2))
    torch.testing.assert_close(out.kl, out.loss.detach())
    torch.testing.assert_close(out.pg_loss, out.loss.detach())
    assert out.clip_frac.item() == 0.0
    # shifting a row of student logits or teacher log-probs by a constant changes nothing
    out2 = opd_topk_loss(s + 5.0, tq - 2.0, mask, reduction="token")
    torch.testing.assert_close(out2.loss, out.loss)


def test_topk_equals_full_kl_when_k_is_v():
    torch.manual_seed(10)
    B, T = 2, 4
    s = torch.randn(B, T, V, requires_grad=True)
    t = torch.randn(B, T, V) * 2
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    for reduction in ("sample", "token"):
        topk = opd_topk_loss(s, torch.log_softmax(t, -1), mask, reduction=reduction)
        full = opd_full_loss(s, t, mask, reduction=reduction)
        torch.testing.assert_close(topk.loss, full.loss)
        torch.testing.assert_close(topk.per_sample, full.per_sample)
        (g1,) = torch.autograd.grad(topk.loss, s)
        (g2,) = torch.autograd.grad(full.loss, s)
        torch.testing.assert_close(g1, g2)


def test_topk_support_subset_matches_manual_renormalised_kl():
    torch.manual_seed(11)
    z, zq = torch.randn(3, 8), torch.randn(3, 8)
    ids = torch.stack([torch.randperm(8)[:3] for _ in range(3)])  # [3 tokens, K=3]
    s_sup = z.gather(-1, ids).view(1, 3, 3)
    tq_sup = torch.log_softmax(zq, -1).gather(-1, ids).view(1, 3, 3)
    out = opd_topk_loss(s_sup, tq_sup, torch.ones(1, 3))
    pS = torch.softmax(s_sup, -1)
    qS = tq_sup.exp() / tq_sup.exp().sum(-1, keepdim=True)
    torch.testing.assert_close(out.loss, (pS * (pS.log() - qS.log())).sum(-1).mean())


def test_topk_neg_inf_teacher_entries_are_safe():
    s = torch.tensor([[[1.0, 0.5, -1.0], [0.0, 0.0, 0.0], [2.0, float("-inf"), 0.0], [0.3, 0.1, 0.2]]],
                     requires_grad=True)
    ninf = float("-inf")
    tq = torch.tensor([[[-1.0, ninf, -2.0], [ninf, ninf, ninf], [-0.5, ninf, -1.5], [ninf, -1.0, -1.0]]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)  # padded token 3 carries -inf too
    out = opd_topk_loss(s, tq, mask)
    assert torch.isfinite(out.loss) and torch.isfinite(out.per_sample).all() and torch.isfinite(out.kl)
    out.loss.backward()
    assert torch.isfinite(s.grad).all()
    # student mass on a -inf teacher entry is pushed away
    assert s.grad[0, 0, 1] > 0
    # token 2: student and teacher both give zero mass to entry 1; it contributes exactly nothing
    ref = opd_topk_loss(torch.tensor([[[2.0, 0.0]]]), torch.tensor([[[-0.5, -1.5]]]), torch.ones(1, 1))
    single = opd_topk_loss(s[:, 2:3].detach(), tq[:, 2:3], torch.ones(1, 1))
    torch.testing.assert_close(single.loss, ref.loss)
    assert s.grad[0, 3].abs().sum() == 0  # padding gets no gradient


def test_full_kl_matches_torch_kl_div_and_gradient():
    torch.manual_seed(12)
    B, T, Vb = 2, 3, 11
    s = torch.randn(B, T, Vb, requires_grad=True)
    t = torch.randn(B, T, Vb, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    out = opd_full_loss(s, t, mask)
    s_ref = s.detach().clone().requires_grad_(True)
    per_tok = F.kl_div(torch.log_softmax(t.detach(), -1), torch.log_softmax(s_ref, -1), reduction="none",
                       log_target=True).sum(-1)  # sum_v p (log p - log q)
    m = mask.float()
    ref_per_sample = (per_tok * m).sum(-1) / m.sum(-1)
    torch.testing.assert_close(out.per_sample, ref_per_sample)
    torch.testing.assert_close(out.loss, ref_per_sample.mean())
    torch.testing.assert_close(out.kl, (per_tok * m).sum() / m.sum())
    out.loss.backward()
    ref_per_sample.mean().backward()
    torch.testing.assert_close(s.grad, s_ref.grad)
    assert t.grad is None
    tok = opd_full_loss(s, t, mask, reduction="token")
    torch.testing.assert_close(tok.loss, (per_tok * m).sum() / m.sum())


def test_full_kl_safe_inputs():
    torch.manual_seed(13)
    s = torch.randn(1, 3, 6).to(torch.bfloat16).requires_grad_(True)
    t = torch.randn(1, 3, 6).to(torch.bfloat16)
    t[0, 0, 2] = float("-inf")  # a vocabulary entry the teacher can never emit
    t[0, 2] = float("nan")  # garbage on a padded token
    out = opd_full_loss(s, t, torch.tensor([[1, 1, 0]]))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(s.grad.float()).all() and s.grad[0, 2].abs().sum() == 0
    # an all -inf teacher row stays finite (uniform teacher)
    t2 = torch.full((1, 1, 4), float("-inf"))
    assert torch.isfinite(opd_full_loss(torch.zeros(1, 1, 4), t2, torch.ones(1, 1)).loss)


def test_opd_rejects_bad_shapes():
    with pytest.raises(ValueError):
        opd_top1_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError):
        opd_top1_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), reduction="sum")
    with pytest.raises(ValueError):
        opd_topk_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), torch.ones(2, 3))
    with pytest.raises(ValueError):
        opd_full_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.ones(3, 2))


# --------------------------------------------------------------------------------------------
# diagnostics
# --------------------------------------------------------------------------------------------


def test_entropy_from_logits():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, float("-inf"), 0.0, float("-inf")], [100.0, 0.0, 0.0, 0.0]],
                          requires_grad=True)
    h = entropy_from_logits(logits)
    torch.testing.assert_close(h[:2], torch.tensor([math.log(4.0), math.log(2.0)]))
    assert h[2].item() < 1e-30 + 1e-6 and not h.requires_grad
    # against the definition on random logits
    torch.manual_seed(14)
    z = torch.randn(3, 7)
    p = torch.softmax(z, -1)
    torch.testing.assert_close(entropy_from_logits(z), -(p * p.log()).sum(-1))


def test_topk_overlap():
    s = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    t = torch.tensor([[4, 3, 9, 10], [8, 7, 6, 5]])
    torch.testing.assert_close(topk_overlap(s, t), torch.tensor([0.5, 1.0]))
    z = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    zq = torch.tensor([[1.0, 4.0, 3.0, 5.0, 2.0]])  # top-2: {0, 1} vs {3, 1}
    torch.testing.assert_close(topk_overlap_from_logits(z, zq, k=2), torch.tensor([0.5]))


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    torch.testing.assert_close(masked_mean(x, m), torch.tensor(13.0 / 4))
    torch.testing.assert_close(masked_mean(x, m, dim=-1), torch.tensor([1.5, 5.0]))
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0


# --------------------------------------------------------------------------------------------
# token-mean over micro-batches
# --------------------------------------------------------------------------------------------


def _micro_batch_cases():
    """(name, fn(rows, T) -> (output, student leaf, token count)) for every loss with a token mean.

    ``rows`` selects samples of one fixed batch, ``T`` trims it to a shorter padded length (the
    micro-batch's own longest sample); values at padding are garbage (NaN) and must not matter."""
    from oprd_cli.losses import bridge_loss, opd_plus_loss, tropd_loss, trust_mask

    g = torch.Generator().manual_seed(5)
    B, T, K, Lyr, d = 4, 6, 5, 2, 3
    lengths = torch.tensor([6, 2, 4, 3])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    lq = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    beh = lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    logits = torch.randn(B, T, K, generator=g)
    t_logits = torch.randn(B, T, K, generator=g)
    lk = torch.log_softmax(torch.randn(B, T, K, generator=g, dtype=torch.float64), -1)
    tk = torch.log_softmax(torch.randn(B, T, K, generator=g, dtype=torch.float64), -1)
    hs = torch.randn(B, Lyr, T, d, generator=g)
    ht = torch.randn(B, Lyr, T, d, generator=g)
    w = torch.randn(Lyr, 2, d, generator=g)
    z = torch.randn(Lyr, B, T, 2, generator=g)
    trust = trust_mask(beh, lq, mask, seed=3)
    prefix = torch.arange(T)[None, :] < torch.tensor([2, 0, 1, 0])[:, None]
    nan = float("nan")

    def pad(x, rows, t, dim=1):  # select rows, trim to t along dim, NaN at padding
        x = x[rows].narrow(dim, 0, t).clone()
        m = mask[rows, :t]
        shape = [m.shape[0]] + [1] * (x.dim() - 1)
        shape[dim] = t
        return x.masked_fill(~m.reshape(shape), nan) if x.is_floating_point() else x

    def leaf(x):
        return x.clone().requires_grad_(True)

    def top1(rows, t):
        x = leaf(pad(lp, rows, t))
        o = opd_top1_loss(x, pad(lq, rows, t), mask[rows, :t], behaviour_logprobs=pad(beh, rows, t), reduction="token")
        return o, x, o.num_tokens.sum()

    def plus(rows, t):
        x = leaf(pad(lp, rows, t))
        o = opd_plus_loss(x, pad(lq, rows, t), mask[rows, :t], "fkl", behaviour_logprobs=pad(beh, rows, t))
        return o, x, o.num_tokens.sum()

    def topk(rows, t):
        x = leaf(pad(logits, rows, t))
        o = opd_topk_loss(x, torch.log_softmax(pad(t_logits, rows, t), -1), mask[rows, :t], reduction="token")
        return o, x, o.num_tokens.sum()

    def full(rows, t):
        x = leaf(pad(logits, rows, t))
        o = opd_full_loss(x, pad(t_logits, rows, t), mask[rows, :t], reduction="token")
        return o, x, o.num_tokens.sum()

    def tropd(rows, t):
        x, xk = leaf(pad(lp, rows, t)), leaf(pad(lk, rows, t))
        o = tropd_loss(x, xk, pad(lq, rows, t), pad(tk, rows, t), mask[rows, :t], trust[rows, :t].nan_to_num(),
                       prefix_mask=prefix[rows, :t], behaviour_logprobs=pad(beh, rows, t))
        return o, x, o.num_tokens.sum()

    def oprd(rows, t):
        x = leaf(pad(hs, rows, t, dim=2))
        o = oprd_loss(x, pad(ht, rows, t, dim=2), mask[rows, :t])
        return o, x, o.num_positions.sum()

    def bridge(rows, t):
        x = leaf(pad(hs, rows, t, dim=2).transpose(0, 1))
        zz = z[:, rows, :t].masked_fill(~mask[rows, :t][None, :, :, None], nan)
        o = bridge_loss(x, w, zz, mask[rows, :t])
        return o, x, o.num_positions.sum()

    return [("opd_top1", top1), ("opd_plus", plus), ("opd_topk", topk), ("opd_full", full), ("tropd", tropd),
            ("oprd", oprd), ("bridge", bridge)]


@pytest.mark.parametrize("name", ["opd_top1", "opd_plus", "opd_topk", "opd_full", "tropd", "oprd", "bridge"])
def test_token_mean_over_micro_batches_equals_one_batch(name):
    """Every loss's token mean over micro-batches, weighted by their supervised tokens
    (``num_tokens``/``num_positions``: what the trainer accumulates with), equals the loss of the whole
    batch in one call, value and gradient, whatever the micro-batches' padded lengths."""
    fn = dict(_micro_batch_cases())[name]
    whole, x_whole, n_whole = fn([0, 1, 2, 3], 6)
    whole.loss.backward()
    splits = [([1, 3], 3), ([0], 6), ([2], 4)]  # each trimmed to its own longest sample
    total, parts = 0.0, []
    for rows, t in splits:
        out, x, n = fn(rows, t)
        (out.loss * n / n_whole).backward()
        total = total + out.loss.detach() * n / n_whole
        parts.append((rows, t, x.grad))
    torch.testing.assert_close(total, whole.loss.detach(), rtol=1e-6, atol=1e-7, msg=name)
    grad = x_whole.grad
    for rows, t, g in parts:
        ref = grad[rows] if name != "bridge" else grad[:, rows]
        ref = ref.narrow(2 if name in ("oprd", "bridge") else 1, 0, t)
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7, msg=name)
