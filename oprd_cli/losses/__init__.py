"""Loss functions: pure functions of tensors (no file I/O, no model calls).

- :func:`oprd_loss`: OPRD-Vanilla representation loss (METHOD.md Eq. 6), raw ``1/d`` MSE or
  L2-normalised form.
- :func:`opd_top1_loss`, :func:`opd_topk_loss`, :func:`opd_full_loss`: output-space OPD baselines
  (sampled-token policy gradient with optional PPO importance ratio, top-k renormalised KL, full KL).
- :func:`opd_plus_loss` (OPD+: any f-divergence with the corrected advantage :func:`advantage`) and
  :func:`tropd_loss` (TrOPD: :func:`trust_mask`, top-k FKL on outliers, teacher-prefix guidance).
- :func:`bridge_loss`: OPRD-Bridge (Eq. 14-15), the OPRD loss through frozen projections.
- Diagnostics: :func:`entropy_from_logits`, :func:`topk_overlap`, :func:`topk_overlap_from_logits`,
  :func:`masked_mean`.

Shared pieces have one home each: ``common`` (argument checks, working dtype, masked token
reductions), ``pg`` (the policy-gradient surrogate with importance ratio and PPO clip, used by
top-1 OPD, OPD+ and TrOPD), and ``oprd`` (position error, layer reduction and cosine, reused by the
bridge loss).
"""

from oprd_cli.losses.bridge import BridgeOutput, bridge_loss
from oprd_cli.losses.diagnostics import entropy_from_logits, masked_mean, topk_overlap, topk_overlap_from_logits
from oprd_cli.losses.fdiv import DIVERGENCES, OpdPlusOutput, advantage, f_value, opd_plus_loss
from oprd_cli.losses.opd import OpdOutput, opd_full_loss, opd_top1_loss, opd_topk_loss
from oprd_cli.losses.oprd import OprdOutput, oprd_loss
from oprd_cli.losses.tropd import OUTLIER_MODES, TropdOutput, topk_fkl, tropd_loss, trust_mask, trust_probability

__all__ = [
    "OprdOutput",
    "oprd_loss",
    "BridgeOutput",
    "bridge_loss",
    "OpdOutput",
    "opd_top1_loss",
    "opd_topk_loss",
    "opd_full_loss",
    "DIVERGENCES",
    "OpdPlusOutput",
    "advantage",
    "f_value",
    "opd_plus_loss",
    "OUTLIER_MODES",
    "TropdOutput",
    "topk_fkl",
    "tropd_loss",
    "trust_mask",
    "trust_probability",
    "entropy_from_logits",
    "masked_mean",
    "topk_overlap",
    "topk_overlap_from_logits",
]
