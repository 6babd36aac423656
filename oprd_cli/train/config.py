"""``TrainConfig`` (the ``[train]`` section of ``oprd.toml`` and the ``oprd train`` flags) and ``TrainResult``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from oprd_cli.errors import OprdError

OBJECTIVES = ("oprd", "opd-top1", "opd-topk")
OPRD_FORMS = ("raw", "normalized")
REDUCTIONS = ("sample", "token")
TOPK_LOGITS = ("support", "full")


@dataclass
class TrainConfig:
    """Hyper-parameters of ``oprd train``. Defaults follow the paper's setup (METHOD.md).

    - ``objective``: ``oprd`` (Eq. 6 alone), ``opd-top1`` (sampled-token reverse KL as a policy
      gradient) or ``opd-topk`` (KL on the student's top-k support recorded at rollout time).
    - ``mu``: coefficient of ``L_OPRD`` added to an OPD objective (Eq. 7); ``None`` means 0 for OPD
      objectives and 1 for ``oprd``.
    - ``oprd_form``: ``normalized`` (default, the authors' release: both vectors L2-normalised, then
      the squared error averaged over the d features) or ``raw`` (MSE with the 1/d factor, Eq. 6 as
      typeset).
    - ``reduction``: ``token`` (default, the release: one mean over every supervised position/token
      of the optimizer batch, then over layers) or ``sample`` (Eq. 6 literally: per-sample means,
      averaged over the optimizer batch).
    - ``batch_size``: samples per optimizer step (paper: 16 = 8 prompts x 2 samples);
      ``micro_batch_tokens``: padded tokens per forward/backward (gradient accumulation).
    - ``total_steps``: planned length of the warm-up + cosine schedule (default ``max_steps``);
      ``max_steps``: the global step at which training stops.
    - ``epochs``: passes over each cache. ``None`` (auto): one pass per cache, except that a run that
      does not ``follow`` and has ``max_steps`` keeps making passes over its (newest) cache until it
      reaches ``max_steps``: asking for N steps trains N steps whenever there is a cache at all.
      Every pass has its own seeded sample order, so an interrupted and resumed run replays the
      same batches.
    - ``max_caches``: with ``follow``, stop after finishing (the first pass over) this many caches.
    - ``topk_logits``: ``support`` (logits at the support ids only, ``h @ W[S].T``) or ``full``
      (full-vocabulary logits, log-softmax, gather: how verl and the paper's baseline do it).
    - ``logits_chunk_tokens``: LM-head rows per chunk for top-1 log-probs / top-k support logits /
      entropy (checkpointed chunks; 0 = one chunk).
    - ``entropy``: log ``actor/entropy`` (costs an LM-head forward without grad when the objective does
      not compute full logits anyway); ``None`` = on for OPD objectives, off for ``oprd``.
    """

    objective: str = "oprd"
    mu: float | None = None
    oprd_form: str = "normalized"
    reduction: str = "token"
    lr: float = 1e-5
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    total_steps: int | None = None
    max_steps: int | None = None
    batch_size: int = 16
    micro_batch_tokens: int = 16384
    max_grad_norm: float = 1.0
    epochs: int | None = None
    shuffle: bool = True
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    topk_logits: str = "support"
    logits_chunk_tokens: int = 4096
    entropy: bool | None = None
    gradient_checkpointing: bool = False
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str | None = None
    seed: int = 0
    save_every: int | None = None
    keep_last: int | None = None
    follow: bool = False
    poll_seconds: float = 10.0
    timeout: float | None = None
    max_caches: int | None = None
    max_staleness: int | None = None
    prefetch: int = 2
    trust_remote_code: bool = False

    # ------------------------------------------------------------------ derived
    @property
    def oprd_coef(self) -> float:
        """Coefficient of the OPRD term: 1 for ``oprd``, ``mu`` (default 0) for OPD objectives."""
        if self.objective == "oprd":
            return 1.0 if self.mu is None else float(self.mu)
        return 0.0 if self.mu is None else float(self.mu)

    @property
    def uses_opd(self) -> bool:
        return self.objective != "oprd"

    @property
    def uses_oprd(self) -> bool:
        return self.oprd_coef > 0

    @property
    def log_entropy(self) -> bool:
        return self.uses_opd if self.entropy is None else bool(self.entropy)

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise OprdError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.oprd_form not in OPRD_FORMS:
            raise OprdError(f"--oprd-form must be one of {', '.join(OPRD_FORMS)}, got {self.oprd_form!r}")
        if self.reduction not in REDUCTIONS:
            raise OprdError(f"--reduction must be one of {', '.join(REDUCTIONS)}, got {self.reduction!r}")
        if self.topk_logits not in TOPK_LOGITS:
            raise OprdError(f"--topk-logits must be one of {', '.join(TOPK_LOGITS)}, got {self.topk_logits!r}")
        if not self.lr > 0:
            raise OprdError(f"--lr must be > 0, got {self.lr}")
        if self.mu is not None and not self.mu >= 0:
            raise OprdError(f"--mu must be >= 0, got {self.mu}")
        if self.objective == "oprd" and self.mu is not None and self.mu == 0:
            raise OprdError("--objective oprd with --mu 0 has no loss at all; use a positive --mu (default 1)")
        if not 0 <= self.warmup_ratio < 1:
            raise OprdError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise OprdError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("total_steps", "max_steps", "save_every", "keep_last", "epochs", "max_caches"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise OprdError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
        if self.batch_size < 1:
            raise OprdError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.micro_batch_tokens < 1:
            raise OprdError(f"--micro-batch-tokens must be at least 1, got {self.micro_batch_tokens}")
        if not self.max_grad_norm > 0:
            raise OprdError(f"--max-grad-norm must be > 0, got {self.max_grad_norm}")
        if not 0 <= self.clip_eps < 1:
            raise OprdError(f"--clip-eps must be in [0, 1), got {self.clip_eps}")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise OprdError(f"--max-staleness must be >= 0, got {self.max_staleness}")
        if not self.poll_seconds > 0:
            raise OprdError(f"--poll-seconds must be > 0, got {self.poll_seconds}")
        if self.timeout is not None and self.timeout < 0:
            raise OprdError(f"--timeout must be >= 0 seconds, got {self.timeout}")
        if self.prefetch < 1:
            raise OprdError(f"--prefetch must be at least 1, got {self.prefetch}")
        if self.logits_chunk_tokens < 0:
            raise OprdError(f"--logits-chunk-tokens must be >= 0, got {self.logits_chunk_tokens}")


@dataclass
class TrainResult:
    """What one ``oprd train`` invocation did."""

    start_step: int  # global step before this invocation
    step: int  # global step after it
    losses: list[float] = field(default_factory=list)  # one per optimizer step of this invocation
    last_metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None  # newest complete checkpoint (written by this invocation or before)
    checkpoints_dir: str | None = None
    metrics_path: str | None = None
    consumed_caches: list[str] = field(default_factory=list)  # caches finished in this invocation
    skipped_caches: list[str] = field(default_factory=list)
    stopped: str = ""  # max_steps | caches_done | timeout | max_caches
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        return self.step - self.start_step
