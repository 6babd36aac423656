"""``oprd rollout``: the student samples responses to a prompt set.

Generation sits behind a small backend interface (:class:`GenerationBackend`) so that
a vLLM backend can be added for GPUs; the transformers backend (:class:`HFBackend`)
runs ``model.generate`` with the KV cache. Sampling itself (temperature, top-k,
top-p) is done by our own logits processor, so that what is recorded is exactly
defined and a model's ``generation_config`` defaults never change it silently:

* ``logprobs``: log-probability of each sampled token under the distribution it was
  sampled from (after temperature, top-k and top-p, renormalised), i.e. the ``pi_old(y_t)``
  that importance ratios need; 0 (log 1) for greedy decoding, a point mass;
* ``topk_ids`` (``--record-topk K``): the K most likely ids of the policy's raw logits
  (the same ranking as the sampling distribution), the support of top-k OPD.

The same generation code serves ``oprd eval``.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from oprd_cli.config import DataConfig, SamplingConfig, TemplateConfig
from oprd_cli.console import err_console, progress, warn
from oprd_cli.data import Record, load_records
from oprd_cli.errors import OprdError

BACKENDS = ("hf", "vllm")
LOGPROBS_MEANING = ("log-probability of each sampled token under the distribution sampled from (after temperature, "
                    "top-k, top-p, renormalised); 0 for greedy")


@dataclass
class GeneratedSample:
    response_ids: np.ndarray  # int32 [T], EOS included when generation stopped on it
    logprobs: np.ndarray  # float32 [T]
    finish_reason: str  # "eos" | "length"
    topk_ids: np.ndarray | None = None  # int32 [T, K]
    text: str = ""


@dataclass
class GenerationResult:
    prompts: list[tuple[Record, list[int]]]  # kept prompts and their token ids
    samples: list[list[GeneratedSample]]  # per kept prompt, num_samples samples
    skipped: list[Record] = field(default_factory=list)  # prompts too long for the model's context
    seconds: float = 0.0

    @property
    def num_tokens(self) -> int:
        return sum(len(s.response_ids) for group in self.samples for s in group)


class GenerationBackend(Protocol):
    name: str
    context_length: int | None

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig,
                 on_sequences_done: Callable[[int, int], None] | None = None) -> list[list[GeneratedSample]]:
        """For each prompt (token ids), ``sampling.num_samples`` samples."""


def is_warped(sampling: SamplingConfig, vocab_size: int | None = None) -> bool:
    """Whether the distribution sampled from differs from the policy's raw (temperature 1) one."""
    top_k_cuts = bool(sampling.top_k) and (vocab_size is None or sampling.top_k < vocab_size)
    return sampling.temperature != 1.0 or top_k_cuts or sampling.top_p < 1.0


class _SampleAndRecord:
    """Logits processor that applies the sampling warp and records, for each sampled token, its
    log-probability under the distribution it was drawn from.

    At step s it receives the logits that produce token s; the token chosen at step s-1 is the last
    column of ``input_ids``, so its log-prob is gathered from the previous step's warped
    log-softmax (only one ``[B, V]`` tensor is kept). The warp is temperature, then top-k, then
    top-p on the temperature-scaled distribution, renormalised; generation then samples from
    ``softmax`` of what this processor returns and nothing else (see :func:`neutral_generation_config`).
    Greedy (temperature 0) samples from a point mass: the recorded log-prob is 0 (log 1).
    ``--record-topk`` ids are the top-K of the raw logits (the same ranking as the sampling
    distribution, whose warps never reorder tokens).
    """

    def __init__(self, temperature: float, top_k: int, top_p: float, record_topk: int):
        self.temperature, self.top_k, self.top_p, self.record_topk = temperature, top_k, top_p, record_topk
        self.prev: torch.Tensor | None = None
        self.logprobs: list[torch.Tensor] = []
        self.topk: list[torch.Tensor] = []

    def warp(self, scores: torch.Tensor) -> torch.Tensor:
        """The logits sampled from: ``[B, V]`` float32, -inf outside the kept set."""
        warped = scores.float()
        if self.temperature != 1.0:
            warped = warped / self.temperature
        if self.top_k and self.top_k < warped.shape[-1]:
            kth = warped.topk(self.top_k, dim=-1).values[..., -1:]
            warped = warped.masked_fill(warped < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, idx = warped.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            remove = probs.cumsum(dim=-1) - probs >= self.top_p  # keep the token that crosses top_p
            remove[..., 0] = False
            warped = warped.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
        return warped

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.collect(input_ids[:, -1])
        if self.record_topk:
            self.topk.append(scores.float().topk(self.record_topk, dim=-1).indices.to(torch.int32).cpu())
        if self.temperature == 0:
            self.prev = torch.zeros_like(scores[:, :1], dtype=torch.float32)  # log 1: a point mass
            return scores
        warped = self.warp(scores)
        self.prev = torch.log_softmax(warped, dim=-1)
        return warped

    def collect(self, chosen: torch.Tensor) -> None:
        if self.prev is not None:
            if self.prev.shape[-1] == 1:
                self.logprobs.append(self.prev[:, 0].cpu())
            else:
                self.logprobs.append(self.prev.gather(-1, chosen[:, None].to(self.prev.device))[:, 0].cpu())
            self.prev = None


def neutral_generation_config(eos_ids: list[int], pad_id: int, bos_id: int | None, do_sample: bool,
                              max_new_tokens: int):
    """A ``GenerationConfig`` that adds nothing to the sampling: no temperature, top-k, top-p,
    repetition penalty, minimum length or any other logits processor of transformers' own.

    transformers fills every unset (``None``) field from the model's ``generation_config`` and
    then from its library defaults (``top_k=50``): every field that can change logits is set
    explicitly here, and :meth:`HFBackend._generate_batch` also swaps the model's own
    generation config for an empty one during the call, so nothing of a checkpoint's
    ``generation_config.json`` (say ``top_k=20, temperature=0.6``) is merged in.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        eos_token_id=list(eos_ids), pad_token_id=pad_id, bos_token_id=bos_id,
        do_sample=do_sample, num_beams=1, max_new_tokens=max_new_tokens, min_length=0, min_new_tokens=0,
        use_cache=True, temperature=1.0, top_k=0, top_p=1.0, min_p=None, typical_p=1.0, epsilon_cutoff=0.0,
        eta_cutoff=0.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
        length_penalty=1.0, renormalize_logits=False, remove_invalid_values=False, num_return_sequences=1,
    )


class HFBackend:
    """transformers ``generate`` with the KV cache, batched by ``sampling.batch_size`` sequences."""

    name = "hf"

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        gc = getattr(model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None) if gc is not None else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = sorted({int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None})
        if tokenizer.eos_token_id is not None:
            self.eos_ids = sorted(set(self.eos_ids) | {int(tokenizer.eos_token_id)})
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.bos_id = tokenizer.bos_token_id
        from oprd_cli.models import context_length

        self.context_length = context_length(model)

    @torch.no_grad()
    def _generate_batch(self, seqs: list[list[int]], sampling: SamplingConfig, max_new: int):
        from transformers import GenerationConfig, LogitsProcessorList

        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):  # left padding
            input_ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            attn[i, width - len(s):] = 1
        proc = _SampleAndRecord(sampling.temperature, sampling.top_k, sampling.top_p, sampling.record_topk)
        config = neutral_generation_config(self.eos_ids, self.pad_id, self.bos_id, sampling.temperature > 0, max_new)
        own = getattr(self.model, "generation_config", None)
        self.model.generation_config = GenerationConfig()  # nothing of the checkpoint's defaults merges in
        try:
            out = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=attn.to(self.device),
                generation_config=config, logits_processor=LogitsProcessorList([proc]),
            )
        finally:
            self.model.generation_config = own
        new = out[:, width:]
        proc.collect(new[:, -1])
        logprobs = torch.stack(proc.logprobs, dim=1) if proc.logprobs else torch.zeros((len(seqs), 0))
        topk = torch.stack(proc.topk, dim=1) if proc.topk else None
        new = new.cpu()
        results = []
        eos = torch.tensor(self.eos_ids)
        for i in range(len(seqs)):
            row = new[i]
            hits = torch.isin(row, eos).nonzero()
            if len(hits):
                n, reason = int(hits[0]) + 1, "eos"
            else:
                n, reason = row.shape[0], "length"
            ids = row[:n].numpy().astype(np.int32)
            results.append(GeneratedSample(
                response_ids=ids,
                logprobs=logprobs[i, :n].numpy().astype(np.float32),
                finish_reason=reason,
                topk_ids=None if topk is None else topk[i, :n].numpy().astype(np.int32),
                text=self.tokenizer.decode(ids.tolist(), skip_special_tokens=True),
            ))
        return results

    shares_batches = True  # under torchrun each rank samples its share of the seeded batches

    def generate(self, prompts, sampling, on_sequences_done=None, share=None):
        """``share`` (:class:`oprd_cli.rollout_ranks.BatchShare`): sample only this rank's batches of
        the global order, each with its global seed, then gather the others' (the result is the one
        process's on rank 0; another rank keeps its own share, the rest None)."""
        n = sampling.num_samples
        # Longest prompts first, so padding stays low and memory peaks early.
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        jobs = [(p, j) for p in order for j in range(n)]
        got: list[GeneratedSample | None] = [None] * len(jobs)
        for b, start in enumerate(range(0, len(jobs), sampling.batch_size)):
            if share is not None and not share.mine(b):
                continue
            batch = jobs[start:start + sampling.batch_size]
            seqs = [prompts[p] for p, _ in batch]
            max_new = sampling.max_new_tokens
            if self.context_length:
                max_new = max(1, min(max_new, self.context_length - max(len(s) for s in seqs)))
            torch.manual_seed(sampling.seed * 1_000_003 + b)  # each batch seeded: reproducible
            results = self._generate_batch(seqs, sampling, max_new)
            got[start:start + len(batch)] = results
            if on_sequences_done:
                on_sequences_done(len(batch), sum(len(s.response_ids) for s in results))
        if share is not None:  # rank 0 (the writer) receives every rank's samples
            got = share.merge(got, on_sequences_done, everywhere=False)
        out: list[list[GeneratedSample | None]] = [[None] * n for _ in prompts]
        for (p, j), sample in zip(jobs, got):
            out[p][j] = sample
        return out  # type: ignore[return-value]


def make_backend(name: str, model, tokenizer) -> GenerationBackend:
    if name == "hf":
        return HFBackend(model, tokenizer)
    if name == "vllm":
        raise OprdError("the vllm backend is not available in this version of oprd yet; use --backend hf")
    raise OprdError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def generate_for_records(backend: GenerationBackend, tokenizer, records: list[Record], template: TemplateConfig,
                         sampling: SamplingConfig, description: str = "sampling") -> GenerationResult:
    """Render each record's prompt, skip those that do not fit the context, and sample."""
    from oprd_cli.rollout_import import kept_prompts

    ctx = backend.context_length
    kept, skipped = kept_prompts(records, tokenizer, template, ctx)  # one rule, shared with --print-prompts
    if not kept:
        raise OprdError(f"every prompt is longer than the model's context ({ctx} tokens); nothing to sample")
    if skipped:
        warn(f"skipped {len(skipped)} of {len(records)} prompts longer than the model's context ({ctx} tokens)")
    total = len(kept) * sampling.num_samples
    t0 = time.perf_counter()
    from rich.progress import TextColumn

    with progress(TextColumn("{task.fields[rate]}")) as bar:
        task = bar.add_task(description, total=total, rate="")
        tokens = [0]

        def done(n_seqs: int, n_tokens: int) -> None:
            tokens[0] += n_tokens
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.update(task, advance=n_seqs, rate=f"{tokens[0] / dt:,.0f} tok/s")

        samples = backend.generate([ids for _, ids in kept], sampling, on_sequences_done=done)
    return GenerationResult(prompts=kept, samples=samples, skipped=skipped, seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------- the command
@dataclass
class RolloutSummary:
    path: str
    num_prompts: int
    num_samples: int
    num_tokens: int
    num_truncated: int
    skipped_prompts: int
    content_digest: str
    seconds: float


def resolve_student(model: str | None, run_dir: str | Path | None) -> tuple[str, int]:
    """The policy to sample from, and its training step (0 for an initial model)."""
    from oprd_cli.config import load_run_config
    from oprd_cli.stores.rundir import RunDir
    from oprd_cli.urlpath import as_path

    if run_dir is not None:
        run = RunDir(Path(run_dir))
        latest = run.latest_checkpoint()
        if model is not None:
            return model, 0 if latest is None or as_path(model).resolve() != latest.path.resolve() else latest.step
        if latest is not None:
            return str(latest.path), latest.step
        student = (load_run_config(run_dir).get("models") or {}).get("student")
        if student:
            return str(student), 0
        raise OprdError(f"run {run_dir} has no checkpoint and its oprd.toml names no student; pass --model")
    if model is None:
        raise OprdError("pass --model (a hub id or a save_pretrained folder) or --run-dir")
    return model, 0


def rollout_lock(out: str | None, run_dir: str | None):
    """The writer lock of a rollout: beside the ``--out`` store, or on the run's ``rollouts/`` folder
    (two rollouts into one run would write the same round)."""
    from oprd_cli.io import is_local
    from oprd_cli.lock import WriterLock
    from oprd_cli.torchrun import dist_env

    if not dist_env().is_main:  # under torchrun, rank 0 holds the lock for all ranks
        return contextlib.nullcontext()
    if out is not None:
        if not is_local(str(out)):
            return contextlib.nullcontext()
        p = Path(os.path.abspath(os.path.expanduser(str(out))))
        return WriterLock(p.parent / f".{p.name}.lock", "oprd rollout", f"rollout store {out}")
    from oprd_cli.stores.rundir import RunDir

    run = RunDir(Path(run_dir))  # a local folder or an fsspec URL (the lock: a conditional PUT there)
    return WriterLock(run.rollouts_dir / ".oprd-rollout.lock", "oprd rollout",
                      f"the rollouts of run {run_dir}")


def run_rollout(*, out: str | None = None, run_dir: str | None = None, **kwargs) -> RolloutSummary:
    """Sample ``sampling.num_samples`` responses per prompt and write one rollout store (see
    :func:`_run_rollout`), holding the writer lock of its output."""
    from oprd_cli.paths import check_output

    if out is None and run_dir is None:
        raise OprdError("pass --out STORE.zarr or --run-dir RUN")
    check_output(out if out is not None else run_dir, "rollout store" if out is not None else "run directory",
                 kind="rollouts" if out is not None else None)
    with rollout_lock(out, run_dir):
        return _run_rollout(out=out, run_dir=run_dir, **kwargs)


def _run_rollout(
    *,
    model: str | None,
    data: DataConfig,
    sampling: SamplingConfig,
    template: TemplateConfig,
    out: str | None = None,
    run_dir: str | None = None,
    overwrite: bool = False,
    backend: str = "hf",
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    guidance=None,
    import_path: str | None = None,
) -> RolloutSummary:
    """Sample ``sampling.num_samples`` responses per prompt and write one rollout store. ``guidance``
    (:class:`oprd_cli.guidance.GuidanceConfig`): a teacher writes the first tokens of each response."""
    from oprd_cli import models as M
    from oprd_cli.config import write_initial_config
    from oprd_cli.stores import common
    from oprd_cli.stores.rollouts import RolloutWriter
    from oprd_cli.stores.rundir import RunDir

    if backend not in BACKENDS:
        raise OprdError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if out is None and run_dir is None:
        raise OprdError("pass --out STORE.zarr or --run-dir RUN")
    model_name, step = resolve_student(model, run_dir)
    if data.prompts is None:
        raise OprdError("pass --prompts (a hub dataset id or a .jsonl/.json/.parquet file)")
    if out is None:
        out_path = str(RunDir(Path(run_dir)).next_rollout_path())
    else:
        out_path = str(out)
        if common.exists(out_path) and common.is_complete(out_path) and not overwrite:
            raise OprdError(f"rollout store {out_path} already exists and is complete; pass --overwrite to replace it")

    records = load_records(data.prompts, data.split, data.prompt_field, data.answer_field, data.id_field, data.limit)
    from oprd_cli.rollout_ranks import RankedBackend, init_rollout_ranks
    from oprd_cli.torchrun import dist_env, rank_device

    dev = M.resolve_device(rank_device(device, dist_env()))
    env = init_rollout_ranks(dev)  # under torchrun: the ranks share the seeded batches, rank 0 writes
    tok = M.load_tokenizer(model_name, trust_remote_code)
    lm = M.load_model(model_name, dev, M.resolve_dtype(dtype, dev), trust_remote_code)
    if import_path is not None and guidance is not None:
        raise OprdError("--import reads responses made elsewhere; it cannot be combined with --teacher-prefix")
    if import_path is not None:  # responses from an outside engine (vLLM, SGLang, ...)
        from oprd_cli.rollout_import import ImportBackend

        gen, backend = ImportBackend(import_path, tok, M.context_length(lm), lm.config.get_text_config().vocab_size,
                                     eos_ids=HFBackend(lm, tok).eos_ids), "import"
    else:
        gen = make_backend(backend, lm, tok)
    if guidance is not None:
        from oprd_cli.guidance import GuidedBackend, load_teacher_backend

        gen = GuidedBackend(gen, load_teacher_backend(guidance, gen, M.tokenizer_digest(tok), dev, lm.dtype,
                                                      trust_remote_code), guidance)
    gen = RankedBackend(gen, env) if env.enabled else gen
    if run_dir is not None:
        write_initial_config(run_dir, {"models": {"student": model_name}, "data": {"prompts": data.prompts}})

    result = generate_for_records(gen, tok, records, template, sampling, description="rollout")
    meta = {
        "policy": {"model": model_name, "step": step, "weights_digest": M.weights_digest(lm),
                   "config_digest": M.config_digest(lm.config)},
        "tokenizer": {"name": model_name, "digest": M.tokenizer_digest(tok), "eos_token_ids": gen_eos(gen)},
        "sampling": {**{k: v for k, v in asdict(sampling).items() if k != "batch_size"},
                     "warped": is_warped(sampling, lm.config.get_text_config().vocab_size)},
        "template": asdict(template),
        "prompts": {"source": data.prompts, "split": data.split, "prompt_field": data.prompt_field,
                    "answer_field": data.answer_field, "limit": data.limit, "num_records": len(records)},
        "seed": sampling.seed,
        "record_topk": sampling.record_topk,
        "backend": backend,
        "device": str(dev),
        "dtype": str(next(lm.parameters()).dtype).replace("torch.", ""),
        "logprobs": LOGPROBS_MEANING,
        "skipped_prompts": len(result.skipped),
        "generation_seconds": round(result.seconds, 3),
        **({"guidance": guidance.meta()} if guidance is not None else {}),
    }
    if not env.is_main:  # rank 0 writes the store
        return RolloutSummary(path=out_path, num_prompts=len(result.prompts), num_samples=0, num_tokens=0,
                              num_truncated=0, skipped_prompts=len(result.skipped), content_digest="", seconds=0.0)
    writer = RolloutWriter(out_path, meta, record_topk=sampling.record_topk, overwrite=overwrite,
                           record_prefix=guidance is not None)
    for p, ((record, ids), group) in enumerate(zip(result.prompts, result.samples)):
        row = writer.add_prompt(ids, record.index, record.id, record.answer)
        for j, s in enumerate(group):
            writer.add_sample(row, j, s.response_ids, s.logprobs, s.finish_reason, s.text, s.topk_ids,
                              prefix_length=gen.prefix_lengths[p][j] if guidance is not None else 0)
    digest = writer.finish()
    n_trunc = sum(s.finish_reason == "length" for g in result.samples for s in g)
    return RolloutSummary(path=out_path, num_prompts=len(result.prompts),
                          num_samples=sum(len(g) for g in result.samples), num_tokens=result.num_tokens,
                          num_truncated=n_trunc, skipped_prompts=len(result.skipped), content_digest=digest,
                          seconds=result.seconds)


def gen_eos(gen) -> list[int]:
    return list(getattr(gen, "eos_ids", []))


def print_summary(s: RolloutSummary) -> None:
    err_console.print(
        f"[green]wrote[/] {s.path}: {s.num_samples} samples of {s.num_prompts} prompts, {s.num_tokens:,} response "
        f"tokens ({s.num_tokens / max(s.seconds, 1e-9):,.0f} tok/s), {s.num_truncated} truncated at the length limit"
        + (f", {s.skipped_prompts} prompts skipped (too long)" if s.skipped_prompts else "")
    )
    err_console.print(f"content digest {s.content_digest}")
