"""Typed store metadata: what a rollout store and a teacher cache record about themselves, read from
their ``attrs["oprd"]`` once, and the one-line refusals when a cache does not fit.

:class:`RolloutMeta` and :class:`CacheMeta` are read-only snapshots; consumers ask them
(``check_teacher``, ``check_topk``, :meth:`CacheMeta.check_fits`) instead of digging through dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from oprd_cli.errors import OprdError


@dataclass(frozen=True)
class RolloutMeta:
    path: str
    content_digest: str
    tokenizer_digest: str
    tokenizer_name: str | None
    num_samples: int
    num_tokens: int
    record_topk: int
    sampling: dict[str, Any] = field(default_factory=dict)
    policy: dict[str, Any] | None = None

    @classmethod
    def from_attrs(cls, path: str, meta: dict[str, Any]) -> "RolloutMeta":
        tok = meta.get("tokenizer") or {}
        return cls(path=str(path), content_digest=str(meta["content_digest"]), tokenizer_digest=str(tok["digest"]),
                   tokenizer_name=tok.get("name"), num_samples=int(meta["num_samples"]),
                   num_tokens=int(meta["num_tokens"]), record_topk=int(meta.get("record_topk", 0)),
                   sampling=dict(meta.get("sampling") or {}), policy=meta.get("policy"))

    def check_teacher(self, teacher_name: str, tokenizer_digest: str) -> None:
        """A teacher must share the student's tokenizer."""
        if tokenizer_digest != self.tokenizer_digest:
            raise OprdError(
                f"teacher {teacher_name} has another tokenizer ({tokenizer_digest}) than rollout store {self.path} "
                f"(tokenizer {self.tokenizer_name or '?'}, {self.tokenizer_digest}); the teacher must share the "
                "student's tokenizer")

    def check_topk(self, topk: int) -> None:
        """``--logprobs topk`` scores the student's recorded top-k ids: they must be there, ``topk`` of them."""
        if not self.record_topk:
            raise OprdError(f"--logprobs topk needs the student's top-k ids, and rollout store {self.path} has "
                            f"none; re-run `oprd rollout --record-topk {topk}` (or use --logprobs sampled)")
        if self.record_topk < topk:
            raise OprdError(f"--topk {topk} is more than the {self.record_topk} student top-k ids recorded in "
                            f"{self.path}; use --topk {self.record_topk} or less")


@dataclass(frozen=True)
class CacheMeta:
    path: str
    tokenizer_digest: str
    layers: tuple[int, ...]
    hidden_size: int
    num_samples: int
    logprobs_mode: str
    logprobs_k: int
    positions: dict[str, Any]
    teacher_num_layers: int
    teacher_hidden_size: int
    rollout_digest: str | None
    rollout_path: str | None

    @classmethod
    def from_attrs(cls, path: str, meta: dict[str, Any]) -> "CacheMeta":
        teacher, rollout, lp = meta.get("teacher") or {}, meta.get("rollout") or {}, meta.get("logprobs") or {}
        return cls(path=str(path), tokenizer_digest=str(meta["tokenizer_digest"]),
                   layers=tuple(int(x) for x in meta["layers"]), hidden_size=int(meta["hidden_size"]),
                   num_samples=int(meta["num_samples"]), logprobs_mode=str(lp.get("mode", "none")),
                   logprobs_k=int(lp.get("k") or 0), positions=dict(meta.get("positions") or {}),
                   teacher_num_layers=int(teacher.get("num_layers") or 0),
                   teacher_hidden_size=int(teacher.get("hidden_size") or meta["hidden_size"]),
                   rollout_digest=rollout.get("content_digest"), rollout_path=rollout.get("path"))

    def check_fits(self, *, tokenizer_digest: str | None = None, student_layers: int | None = None,
                   student_width: int | None = None, need_hidden: bool = False, logprobs_for: str | None = None,
                   rollout: RolloutMeta | None = None, teacher_topk: int | None = None) -> None:
        """Refuse, in one line, a cache that does not fit: another tokenizer than the student's; another
        depth or width than the student (OPRD-Vanilla); no hidden states when they are needed; no
        teacher log-probs for ``logprobs_for`` (``"opd-top1"``, ``"opd-plus"``, ``"opd-topk"`` or ``"tropd"``,
        which needs the teacher's own top-``teacher_topk``); a rollout store that is not the one it was made from."""
        p = self.path
        if tokenizer_digest is not None and self.tokenizer_digest != tokenizer_digest:
            raise OprdError(f"cache {p} was made for another tokenizer ({self.tokenizer_digest}) than the "
                            f"student's ({tokenizer_digest}); use rollouts and a cache of this student")
        if student_layers is not None and student_width is not None:
            self._check_shape(student_layers, student_width)
        if need_hidden and not self.layers:
            raise OprdError(f"cache {p} holds no hidden states; re-run `oprd teacher-cache` with --layers")
        if logprobs_for == "tropd":
            self._check_teacher_topk(int(teacher_topk or 1))
        if logprobs_for in ("opd-top1", "opd-plus") and self.logprobs_mode not in ("sampled", "topk"):
            raise OprdError(f"--objective {logprobs_for} needs the teacher's log-probs, and cache {p} has none "
                            f"(--logprobs {self.logprobs_mode}); re-run `oprd teacher-cache` with --logprobs sampled|topk")
        if logprobs_for == "opd-topk" and self.logprobs_mode != "topk":
            raise OprdError(f"--objective opd-topk needs the teacher's log-probs on the student's top-k, and cache "
                            f"{p} has --logprobs {self.logprobs_mode}; re-run `oprd teacher-cache` with --logprobs topk")
        if rollout is not None:
            if rollout.content_digest != self.rollout_digest:
                raise OprdError(f"rollout store {rollout.path} is not the one cache {p} was made from "
                                f"(digest {rollout.content_digest} vs {self.rollout_digest})")
            if rollout.num_samples != self.num_samples:
                raise OprdError(f"cache {p} has {self.num_samples} samples but its rollout store {rollout.path} has "
                                f"{rollout.num_samples}")

    def _check_teacher_topk(self, k: int) -> None:
        if self.logprobs_mode != "topk":
            raise OprdError(f"--objective tropd needs the teacher's own top-k log-probs, and cache {self.path} has "
                            f"--logprobs {self.logprobs_mode}; re-run `oprd teacher-cache --objective tropd` "
                            f"(--logprobs topk --topk {k})")
        if self.logprobs_k < k:
            raise OprdError(f"--tropd-topk {k} is more than the teacher top-{self.logprobs_k} stored in cache "
                            f"{self.path}; use --tropd-topk {self.logprobs_k} or less, or re-cache with --topk {k}")

    def _check_shape(self, n_layers: int, width: int) -> None:
        t_layers, t_width = self.teacher_num_layers, self.teacher_hidden_size
        if t_layers != n_layers or t_width != width or self.hidden_size != width:
            what = []
            if t_layers != n_layers:
                what.append(f"depth: teacher {t_layers} layers vs student {n_layers}")
            if t_width != width or self.hidden_size != width:
                what.append(f"width: teacher hidden size {t_width} vs student {width}")
            raise OprdError(f"cache {self.path} does not fit the student ({'; '.join(what)}; cached layers "
                            f"{list(self.layers)}); OPRD-Vanilla needs a teacher of the same depth and width")
        bad = [i for i in self.layers if i < 0 or i > n_layers]
        if bad:
            raise OprdError(f"cache {self.path} holds hidden_states index {bad[0]}, but the student has "
                            f"{n_layers} layers")
