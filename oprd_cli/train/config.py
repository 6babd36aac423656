"""``TrainConfig`` (the ``[train]`` section of ``oprd.toml`` and the ``oprd train`` flags) and ``TrainResult``.

The settings are grouped by what they steer: ``loss`` (objective and its terms), ``optim`` (AdamW and
the schedule), ``batching`` (samples per step, micro-batches, order), ``checkpoint``, ``run`` (when to
stop, follow mode) and ``runtime`` (device, dtype, attention). ``oprd.toml`` keys and CLI flags stay
flat (``lr``, ``batch_size``, ...; every name is unique across the groups): :meth:`TrainConfig.from_flat`
and :meth:`TrainConfig.to_flat` are the one place where flat keys map to groups.
"""

from __future__ import annotations

import math
from dataclasses import Field, dataclass, field, fields
from typing import Any

from oprd_cli.errors import OprdError

OBJECTIVES = ("oprd", "opd-top1", "opd-topk", "opd-plus", "tropd")
ADVANTAGES = ("corrected", "stopgrad")
TRUST_MODES = ("hard", "soft")
OPRD_FORMS = ("raw", "normalized")
REDUCTIONS = ("sample", "token")
TOPK_LOGITS = ("support", "full")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise OprdError(f"{_flag(name)} must be one of {', '.join(allowed)}, got {value!r}")


def _at_least_1(obj: Any, *names: str) -> None:
    for name in names:
        v = getattr(obj, name)
        if v is not None and v < 1:
            raise OprdError(f"{_flag(name)} must be at least 1, got {v}")


@dataclass
class LossConfig:
    """- ``objective``: ``oprd`` (Eq. 6 alone), ``opd-top1`` (sampled-token reverse KL as a policy
      gradient) or ``opd-topk`` (KL on the student's top-k support recorded at rollout time).
    - ``mu``: coefficient of ``L_OPRD`` added to an OPD objective (Eq. 7); ``None`` means 0 for OPD
      objectives and 1 for ``oprd``.
    - ``oprd_form``: ``normalized`` (default, the authors' release: both vectors L2-normalised, then
      the squared error averaged over the d features) or ``raw`` (MSE with the 1/d factor, Eq. 6 as
      typeset).
    - ``reduction``: ``token`` (default, the release: one mean over every supervised position/token
      of the optimizer batch, then over layers) or ``sample`` (Eq. 6 literally: per-sample means,
      averaged over the optimizer batch).
    - ``clip_eps`` / ``clip_eps_high``: PPO clip range of the opd-top1 importance ratio.
    - ``topk_logits``: ``support`` (logits at the support ids only, ``h @ W[S].T``) or ``full``
      (full-vocabulary logits, log-softmax, gather: how verl and the paper's baseline do it).
    - ``logits_chunk_tokens``: LM-head rows per chunk for top-1 log-probs / top-k support logits /
      entropy (checkpointed chunks; 0 = one chunk).
    - ``entropy``: log ``actor/entropy`` (costs an LM-head forward without grad when the objective does
      not compute full logits anyway); ``None`` = on for OPD objectives, off for ``oprd``.
    - OPD+ (``opd-plus``): ``divergence`` (rkl|fkl|jsd|alpha|hellinger|chi2|tv), ``alpha`` (for
      ``alpha``; None = 0.5), ``advantage`` (``corrected``: ``-f(u) + u f'(u)``; ``stopgrad``: ``-f(u)``),
      ``log_ratio_clip`` (clamp of ``log u``, 0 = off).
    - TrOPD (``tropd``): ``trust`` (``hard``: the Bernoulli draw; ``soft``: its probability as a weight),
      ``tropd_topk`` (teacher top-k of the outlier FKL), ``outlier`` (fkl|mask|clip), ``tau`` (clip
      floor), ``logprob_floor`` (floor on ``log pi_S`` in the FKL), ``guidance_beta`` (teacher-prefix tokens).
    - ``bridge``: a bridge folder (``oprd bridge fit``): the representation term becomes the bridge
      loss (``P_S`` frozen), on a cache projected with it or projected on the fly.
    """

    objective: str = "oprd"
    mu: float | None = None
    oprd_form: str = "normalized"
    reduction: str = "token"
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    topk_logits: str = "support"
    logits_chunk_tokens: int = 256
    entropy: bool | None = None
    divergence: str = "rkl"
    alpha: float | None = None
    advantage: str = "corrected"
    log_ratio_clip: float = 6.0
    trust: str = "hard"
    tropd_topk: int = 64
    outlier: str = "fkl"
    tau: float = -6.0
    logprob_floor: float = -20.0
    guidance_beta: float = 0.001
    bridge: str | None = None  # OPRD-Bridge (Eq. 14-15): the representation term through this fitted bridge

    @property
    def oprd_coef(self) -> float:
        """Coefficient of the OPRD term: 1 for ``oprd``, ``mu`` (default 0) for OPD objectives."""
        if self.mu is not None:
            return float(self.mu)
        return 1.0 if self.objective == "oprd" else 0.0

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
        _one_of("objective", self.objective, OBJECTIVES)
        _one_of("oprd_form", self.oprd_form, OPRD_FORMS)
        _one_of("reduction", self.reduction, REDUCTIONS)
        _one_of("topk_logits", self.topk_logits, TOPK_LOGITS)
        if self.mu is not None and not self.mu >= 0:
            raise OprdError(f"--mu must be >= 0, got {self.mu}")
        if self.objective == "oprd" and self.mu is not None and self.mu == 0:
            raise OprdError("--objective oprd with --mu 0 has no loss at all; use a positive --mu (default 1)")
        if not 0 <= self.clip_eps < 1:
            raise OprdError(f"--clip-eps must be in [0, 1), got {self.clip_eps}")
        if self.logits_chunk_tokens < 0:
            raise OprdError(f"--logits-chunk-tokens must be >= 0, got {self.logits_chunk_tokens}")
        self._validate_methods()

    def _validate_methods(self) -> None:
        """The OPD+ and TrOPD settings (checked whatever the objective, so a typo never waits)."""
        from oprd_cli.losses.fdiv import DIVERGENCES
        from oprd_cli.losses.tropd import OUTLIER_MODES

        _one_of("divergence", self.divergence, DIVERGENCES)
        _one_of("advantage", self.advantage, ADVANTAGES)
        _one_of("trust", self.trust, TRUST_MODES)
        _one_of("outlier", self.outlier, OUTLIER_MODES)
        for name in ("alpha", "tau", "logprob_floor"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise OprdError(f"{_flag(name)} must be finite, got {v}")
        if not (math.isfinite(self.log_ratio_clip) and self.log_ratio_clip >= 0):
            raise OprdError(f"--log-ratio-clip must be >= 0 (0 = off), got {self.log_ratio_clip}")
        if not (math.isfinite(self.guidance_beta) and self.guidance_beta >= 0):
            raise OprdError(f"--guidance-beta must be >= 0, got {self.guidance_beta}")
        _at_least_1(self, "tropd_topk")


@dataclass
class OptimConfig:
    """AdamW and the warm-up + cosine schedule. ``total_steps``: planned length of the schedule
    (default ``max_steps``)."""

    lr: float = 1e-5
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    total_steps: int | None = None
    max_grad_norm: float = 1.0

    def validate(self) -> None:
        if not self.lr > 0:
            raise OprdError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise OprdError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise OprdError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        _at_least_1(self, "total_steps")
        if not self.max_grad_norm > 0:
            raise OprdError(f"--max-grad-norm must be > 0, got {self.max_grad_norm}")


@dataclass
class BatchingConfig:
    """- ``batch_size``: samples per optimizer step (paper: 16 = 8 prompts x 2 samples);
      ``micro_batch_tokens``: padded tokens per forward/backward (gradient accumulation).
    - ``epochs``: passes over each cache. ``None`` (auto): one pass per cache, except that a run that
      does not ``follow`` and has ``max_steps`` keeps making passes over its (newest) cache until it
      reaches ``max_steps``: asking for N steps trains N steps whenever there is a cache at all.
      Every pass has its own seeded sample order, so an interrupted and resumed run replays the
      same batches.
    - ``prefetch``: steps of teacher data read ahead by a background thread.
    """

    batch_size: int = 16
    micro_batch_tokens: int = 16384
    epochs: int | None = None
    shuffle: bool = True
    seed: int = 0
    prefetch: int = 2

    def validate(self) -> None:
        _at_least_1(self, "batch_size", "micro_batch_tokens", "epochs", "prefetch")


@dataclass
class CheckpointConfig:
    """``save_every``: also save every N steps; ``keep_last``: keep only the newest N checkpoints."""

    save_every: int | None = None
    keep_last: int | None = None

    def validate(self) -> None:
        _at_least_1(self, "save_every", "keep_last")


@dataclass
class RunConfig:
    """When an invocation stops: ``max_steps`` (the global step at which training stops); with
    ``follow``, waiting for new caches every ``poll_seconds`` until ``timeout`` seconds pass without
    one or ``max_caches`` caches are done; ``max_staleness`` skips caches from too old a policy."""

    max_steps: int | None = None
    follow: bool = False
    poll_seconds: float = 10.0
    timeout: float | None = None
    max_caches: int | None = None
    max_staleness: int | None = None
    report_to: str = "none"  # none | tensorboard | wandb, beside metrics.jsonl (oprd_cli.tracking)

    def validate(self) -> None:
        from oprd_cli.tracking import check_report_to

        check_report_to(self.report_to)
        _at_least_1(self, "max_steps", "max_caches")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise OprdError(f"--max-staleness must be >= 0, got {self.max_staleness}")
        if not self.poll_seconds > 0:
            raise OprdError(f"--poll-seconds must be > 0, got {self.poll_seconds}")
        if self.timeout is not None and self.timeout < 0:
            raise OprdError(f"--timeout must be >= 0 seconds, got {self.timeout}")


@dataclass
class RuntimeConfig:
    """Where and how the student runs: device, autocast dtype, attention, activation checkpointing."""

    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str | None = None
    # True/"on": every block recomputed in backward; False/"off": never; "auto": per micro-batch, on when
    # its activations would be large against the weights (:func:`oprd_cli.train.step.auto_checkpointing`)
    gradient_checkpointing: bool | str = "auto"
    trust_remote_code: bool = False

    def validate(self) -> None:
        if self.gradient_checkpointing not in (True, False, "auto", "on", "off"):
            raise OprdError(f"--gradient-checkpointing takes on, off or auto; got {self.gradient_checkpointing!r}")

    @property
    def checkpointing_mode(self) -> str:
        """``on``, ``off`` or ``auto`` (booleans from the flags and oprd.toml are on/off)."""
        g = self.gradient_checkpointing
        return "on" if g is True or g == "on" else "off" if g is False or g == "off" else "auto"


_GROUPS: dict[str, type] = {"loss": LossConfig, "optim": OptimConfig, "batching": BatchingConfig,
                            "checkpoint": CheckpointConfig, "run": RunConfig, "runtime": RuntimeConfig}


@dataclass
class TrainConfig:
    """Hyper-parameters of ``oprd train``, grouped. Defaults follow the paper's setup (METHOD.md);
    each group's docstring explains its fields."""

    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    # ------------------------------------------------------------------ flat keys <-> groups
    @staticmethod
    def flat_fields() -> list[Field]:
        """Every setting as the dataclass field of its group, in group order (the flat names of
        ``oprd.toml [train]`` and the flags)."""
        return [f for cls in _GROUPS.values() for f in fields(cls)]

    @classmethod
    def from_flat(cls, values: dict[str, Any] | None = None, **more: Any) -> "TrainConfig":
        """Build from flat keys (``{"lr": 1e-4, "objective": "opd-top1"}``); unknown keys are refused."""
        flat = {**(values or {}), **more}
        owner = {f.name: g for g, c in _GROUPS.items() for f in fields(c)}
        unknown = sorted(set(flat) - set(owner))
        if unknown:
            raise OprdError(f"unknown train setting(s) {', '.join(unknown)}; known: {', '.join(sorted(owner))}")
        kw = {g: c(**{k: v for k, v in flat.items() if owner[k] == g}) for g, c in _GROUPS.items()}
        return cls(**kw)

    def to_flat(self) -> dict[str, Any]:
        """The flat ``{name: value}`` view (what the checkpoint marker records as ``config``)."""
        return {f.name: getattr(getattr(self, g), f.name) for g, c in _GROUPS.items() for f in fields(c)}

    def replace(self, **flat: Any) -> "TrainConfig":
        """A copy with some flat settings changed."""
        return TrainConfig.from_flat({**self.to_flat(), **flat})

    def validate(self) -> None:
        for g in _GROUPS:
            getattr(self, g).validate()


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


__all__ = ["OBJECTIVES", "OPRD_FORMS", "BatchingConfig", "CheckpointConfig", "LossConfig", "OptimConfig",
           "RunConfig", "RuntimeConfig", "TrainConfig", "TrainResult"]
