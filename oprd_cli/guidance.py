"""Teacher-prefix guidance (TrOPD's off-policy guidance): the teacher writes the first tokens of a
response, the student continues from prompt + prefix.

Per sample, the prefix length is ``L`` (``fixed``) or uniform in ``[0, L]`` (``uniform``, drawn from a
generator seeded by (rollout seed, prompt, sample), so a store is reproducible), capped at the
response budget. The teacher samples with the same sampling flags (same warp, same recorded
behaviour log-probs: the teacher's warped distribution) for the longest prefix of its batch, and
each sample keeps its first ``L_i`` tokens (a prefix of an autoregressive sample is a sample of that
prefix). A prefix that ends with EOS finishes the response (``eos``, no continuation). The student
then samples ``max_new_tokens - L_i`` more tokens from prompt + prefix, with its own log-probs. The
rollout store records ``sample/prefix_length``; ``token/logprobs`` holds each token's behaviour
log-prob under the model that sampled it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from oprd_cli.config import SamplingConfig
from oprd_cli.errors import OprdError

PREFIX_MODES = ("fixed", "uniform")


@dataclass(frozen=True)
class GuidanceConfig:
    """``teacher``: the model writing prefixes; ``max_tokens``: ``L``; ``mode``: fixed | uniform."""

    teacher: str
    max_tokens: int
    mode: str = "fixed"

    def validate(self) -> None:
        if self.mode not in PREFIX_MODES:
            raise OprdError(f"--prefix-mode must be one of {', '.join(PREFIX_MODES)}, got {self.mode!r}")
        if self.max_tokens < 0:
            raise OprdError(f"--prefix-max-tokens must be >= 0, got {self.max_tokens}")

    def meta(self) -> dict:
        return {"teacher": self.teacher, "max_tokens": int(self.max_tokens), "mode": self.mode}


def guidance_from_flags(teacher: str | None, max_tokens: int | None, mode: str | None) -> GuidanceConfig | None:
    """The rollout's guidance from its flags (None without ``--teacher-prefix``); one line when incomplete."""
    if teacher is None:
        if max_tokens is not None or mode is not None:
            raise OprdError("--prefix-max-tokens and --prefix-mode need --teacher-prefix MODEL")
        return None
    if max_tokens is None:
        raise OprdError("--teacher-prefix needs --prefix-max-tokens L (teacher tokens per response at most)")
    g = GuidanceConfig(teacher=str(teacher), max_tokens=int(max_tokens), mode=mode or "fixed")
    g.validate()
    return g


def prefix_lengths(g: GuidanceConfig, budget: int, seed: int, prompt_rows: int, num_samples: int) -> np.ndarray:
    """``[prompt_rows, num_samples]`` teacher-prefix lengths, at most ``budget``."""
    cap = min(int(g.max_tokens), int(budget))
    if g.mode == "fixed":
        return np.full((prompt_rows, num_samples), cap, dtype=np.int64)
    out = np.empty((prompt_rows, num_samples), dtype=np.int64)
    for p in range(prompt_rows):
        for j in range(num_samples):
            out[p, j] = np.random.default_rng([int(seed), p, j, 0x9E1D]).integers(0, cap + 1)
    return out


def load_teacher_backend(g: GuidanceConfig, student_backend, student_tokenizer_digest: str, device, dtype,
                         trust_remote_code: bool):
    """The prefix teacher as a generation backend; it must share the student's tokenizer (one line else)."""
    from oprd_cli import models as M
    from oprd_cli.rollout import HFBackend

    tok = M.load_tokenizer(g.teacher, trust_remote_code)
    digest = M.tokenizer_digest(tok)
    if digest != student_tokenizer_digest:
        raise OprdError(f"--teacher-prefix {g.teacher} has another tokenizer ({digest}) than the student "
                        f"({student_tokenizer_digest}); the prefix teacher must share the student's tokenizer")
    backend = HFBackend(M.load_model(g.teacher, device, dtype, trust_remote_code), student_backend.tokenizer)
    backend.eos_ids, backend.pad_id = list(student_backend.eos_ids), student_backend.pad_id  # one stop rule
    return backend


def _sample_batches(backend, seqs: list[list[int]], budgets: list[int], sampling: SamplingConfig, salt: int,
                    done, share=None, everywhere: bool = True) -> list:
    """Generate for each sequence up to its own budget (batched; each batch runs to its largest
    budget and every sample keeps its first ``budget`` tokens), seeded per batch. ``share``
    (:class:`oprd_cli.rollout_ranks.BatchShare`): this rank's batches only, the others' gathered (on
    every rank, or on rank 0 alone with ``everywhere`` False)."""
    from oprd_cli.rollout import GeneratedSample

    out: list = [None] * len(seqs)
    todo = sorted((i for i in range(len(seqs)) if budgets[i] > 0), key=lambda i: (-len(seqs[i]), i))
    for i in range(len(seqs)):
        if budgets[i] <= 0:
            out[i] = GeneratedSample(np.zeros(0, np.int32), np.zeros(0, np.float32), "length",
                                     None if not sampling.record_topk else np.zeros((0, sampling.record_topk), np.int32))
    if done is not None and len(todo) < len(seqs):
        done(len(seqs) - len(todo), 0)
    for b, start in enumerate(range(0, len(todo), sampling.batch_size)):
        if share is not None and not share.mine(b):
            continue
        batch = todo[start:start + sampling.batch_size]
        max_new = max(budgets[i] for i in batch)
        if backend.context_length:
            max_new = max(1, min(max_new, backend.context_length - max(len(seqs[i]) for i in batch)))
        torch.manual_seed(sampling.seed * 1_000_003 + salt * 7_919 + b)
        for i, s in zip(batch, backend._generate_batch([seqs[i] for i in batch], sampling, max_new)):
            out[i] = _cut(s, budgets[i])
        if done is not None:
            done(len(batch), sum(len(out[i].response_ids) for i in batch))
    return out if share is None else share.merge(out, done, everywhere)


def _cut(s, n: int):
    """The first ``n`` tokens of a generated sample (itself when shorter)."""
    if len(s.response_ids) <= n:
        return s
    return replace(s, response_ids=s.response_ids[:n], logprobs=s.logprobs[:n], finish_reason="length",
                   topk_ids=None if s.topk_ids is None else s.topk_ids[:n])


def _join(pre, cont, tokenizer):
    """Teacher prefix + student continuation as one sample (``cont`` None: the prefix ended with EOS)."""
    from oprd_cli.rollout import GeneratedSample

    if cont is None:
        return pre
    ids = np.concatenate([pre.response_ids, cont.response_ids]).astype(np.int32)
    topk = None if pre.topk_ids is None else np.concatenate([pre.topk_ids, cont.topk_ids]).astype(np.int32)
    return GeneratedSample(response_ids=ids, logprobs=np.concatenate([pre.logprobs, cont.logprobs]).astype(np.float32),
                           finish_reason=cont.finish_reason, topk_ids=topk,
                           text=tokenizer.decode(ids.tolist(), skip_special_tokens=True))


def guided_generate(student, teacher, prompts: list[list[int]], sampling: SamplingConfig, g: GuidanceConfig,
                    on_sequences_done=None, share=None) -> tuple[list[list], list[list[int]]]:
    """Per prompt, ``sampling.num_samples`` samples of teacher prefix + student continuation, and the
    prefix lengths actually written (shorter than planned when the teacher stopped on EOS).
    ``--record-topk`` ids are the sampling model's top-k at each position. ``share``: this rank's
    batches of each pass (see :func:`_sample_batches`): the prefixes are gathered on every rank, the
    samples on rank 0 alone (another rank's result holds its own continuations only)."""
    n = sampling.num_samples
    plan = prefix_lengths(g, sampling.max_new_tokens, sampling.seed, len(prompts), n)
    jobs = [(p, j) for p in range(len(prompts)) for j in range(n)]
    teacher_done = None if on_sequences_done is None else (lambda _n, tokens: on_sequences_done(0, tokens))
    pres = _sample_batches(teacher, [prompts[p] for p, _ in jobs], [int(plan[p, j]) for p, j in jobs], sampling, 1,
                           teacher_done, share)
    conts_in, budgets = [], []
    for (p, _), pre in zip(jobs, pres):
        ended = pre.finish_reason == "eos"
        conts_in.append(list(prompts[p]) + pre.response_ids.tolist())
        budgets.append(0 if ended else sampling.max_new_tokens - len(pre.response_ids))
    conts = _sample_batches(student, conts_in, budgets, sampling, 2, on_sequences_done, share, everywhere=False)
    out = [[None] * n for _ in prompts]
    lens = [[0] * n for _ in prompts]
    for (p, j), pre, cont, budget in zip(jobs, pres, conts, budgets):
        out[p][j] = _join(pre, cont if budget > 0 else None, student.tokenizer)
        lens[p][j] = len(pre.response_ids)
    return out, lens


class GuidedBackend:
    """A generation backend whose samples start with a teacher prefix (:func:`guided_generate`);
    ``prefix_lengths[p][j]`` of the last :meth:`generate` call, per prompt and sample."""

    def __init__(self, student, teacher, g: GuidanceConfig):
        self.student, self.teacher, self.g = student, teacher, g
        self.name, self.context_length, self.tokenizer = student.name, student.context_length, student.tokenizer
        self.eos_ids = student.eos_ids
        self.prefix_lengths: list[list[int]] = []

    shares_batches = True  # under torchrun each rank samples its share of both passes' batches

    def generate(self, prompts, sampling, on_sequences_done=None, share=None):
        out, self.prefix_lengths = guided_generate(self.student, self.teacher, prompts, sampling, self.g,
                                                   on_sequences_done, share)
        return out
