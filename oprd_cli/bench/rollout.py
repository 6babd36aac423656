"""``oprd bench rollout``: ``oprd rollout`` against the fastest bare ``model.generate``.

On the same prompts and settings (the rollout's own rendered prompt ids, read back from the store it
wrote; the same batches, longest prompts first, left padding, the same seeds, temperature 1, no top-k
or top-p, the same EOS ids and ``max_new_tokens``), one run times:

- ``oprd``: the real rollout stage (:func:`oprd_cli.rollout.run_rollout`): generation through our
  backend (the sampling processor that records behaviour log-probs and top-k ids, the attention kernel
  that :func:`oprd_cli.models.choose_attn_implementation` picks), tokens per second of its generation
  loop; the command's wall time (loading, digests, writing the store) is reported beside it;
- ``bare_eager`` / ``bare_sdpa``: plain ``model.generate`` with each attention kernel, nothing else.

``ratio`` = oprd tokens/s / the fastest bare tokens/s (target at least 0.9). Passes are interleaved
``repeats`` times and the best of each is kept. Without ``--model`` a random Qwen2-style model is
generated (the ``bench cache`` teacher); real figures need a real model (docs/performance.md).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from oprd_cli.errors import OprdError

TARGET_RATIO = 0.9
PROMPTS = ["What is {a} + {b}? Explain each step.", "A train covers {a} km in {b} hours. What is its speed?",
           "Find the remainder of {a}^{b} divided by 7.", "List the divisors of {a}{b}."]


@dataclass
class BenchRolloutConfig:
    model: str | None = None
    prompts: str | None = None  # a prompt file (default: generated arithmetic questions)
    num_prompts: int = 8
    max_new_tokens: int = 64
    batch_size: int = 8
    repeats: int = 1
    device: str = "auto"
    threads: int | None = None
    seed: int = 0

    def validate(self) -> None:
        for name in ("num_prompts", "max_new_tokens", "batch_size", "repeats"):
            if getattr(self, name) < 1:
                raise OprdError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise OprdError(f"--threads must be at least 1, got {self.threads}")


def _prompt_file(root: Path, n: int) -> str:
    path = root / "prompts.jsonl"
    rows = [{"problem": PROMPTS[i % len(PROMPTS)].format(a=17 + 13 * i, b=3 + i), "answer": "0"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _sampling(cfg: BenchRolloutConfig):
    from oprd_cli.config import SamplingConfig

    return SamplingConfig(num_samples=1, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed)


def _run_oprd(cfg: BenchRolloutConfig, model: str, prompts: str, out: Path) -> dict[str, Any]:
    """The whole ``oprd rollout`` command (loading, generation, digests, the store)."""
    from oprd_cli.config import DataConfig, TemplateConfig
    from oprd_cli.rollout import run_rollout

    t = time.perf_counter()
    s = run_rollout(model=model, data=DataConfig(prompts=prompts, limit=cfg.num_prompts), sampling=_sampling(cfg),
                    template=TemplateConfig(), out=str(out), overwrite=True, device=cfg.device)
    return {"tokens": s.num_tokens, "seconds": s.seconds, "tok_s": s.num_tokens / max(s.seconds, 1e-9),
            "command_seconds": time.perf_counter() - t}


def _run_oprd_generation(backend, tok, records, cfg: BenchRolloutConfig) -> dict[str, Any]:
    """The rollout's generation loop alone (:func:`oprd_cli.rollout.generate_for_records`, the code
    ``oprd rollout`` runs), with wall and process CPU time."""
    from oprd_cli.config import TemplateConfig
    from oprd_cli.rollout import generate_for_records

    t, cpu = time.perf_counter(), time.process_time()
    res = generate_for_records(backend, tok, records, TemplateConfig(), _sampling(cfg), description="oprd rollout")
    dt, cpu = time.perf_counter() - t, time.process_time() - cpu
    tokens = sum(len(s.response_ids) for g in res.samples for s in g)
    return {"tokens": tokens, "seconds": dt, "tok_s": tokens / max(dt, 1e-9), "cpu_seconds": cpu,
            "tok_per_cpu_s": tokens / max(cpu, 1e-9)}


@torch.no_grad()
def _run_bare(model, prompts: list[list[int]], eos: list[int], pad: int, cfg: BenchRolloutConfig) -> dict[str, Any]:
    """Plain ``generate`` over the same batches (longest first, left padding) with the same seeds."""
    dev = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    tokens, t, cpu = 0, time.perf_counter(), time.process_time()
    for b, start in enumerate(range(0, len(order), cfg.batch_size)):
        seqs = [prompts[i] for i in order[start:start + cfg.batch_size]]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        torch.manual_seed(cfg.seed * 1_000_003 + b)
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=cfg.max_new_tokens, eos_token_id=eos,
                             pad_token_id=pad)[:, width:].cpu()
        for row in out:  # tokens up to and including the first EOS, as the rollout counts them
            hits = torch.isin(row, torch.tensor(eos)).nonzero()
            tokens += int(hits[0]) + 1 if len(hits) else row.shape[0]
    dt, cpu = time.perf_counter() - t, time.process_time() - cpu
    return {"tokens": tokens, "seconds": dt, "tok_s": tokens / max(dt, 1e-9), "cpu_seconds": cpu,
            "tok_per_cpu_s": tokens / max(cpu, 1e-9)}


def run_bench_rollout(cfg: BenchRolloutConfig, say=lambda msg: None) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from oprd_cli import models as M
    from oprd_cli.data import load_records
    from oprd_cli.rollout import HFBackend
    from oprd_cli.stores.rollouts import load_arrays, open_rollouts

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = M.resolve_device(cfg.device)
    dtype = M.resolve_dtype("auto", dev)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="oprd-bench-rollout-") as tmp:
        root = Path(tmp)
        model = cfg.model
        if model is None:
            from oprd_cli.bench.cache import generate_teacher

            say("generating a random Qwen2-style model (d=512, 8 layers, vocab 32000)")
            model = str(generate_teacher(root / "model", 512, 8, 32000))
        prompts = cfg.prompts or _prompt_file(root, cfg.num_prompts)
        runs: dict[str, list[dict[str, Any]]] = {"oprd": [], "bare_eager": [], "bare_sdpa": []}
        say("oprd rollout (the whole command, once)")
        command = _run_oprd(cfg, model, prompts, root / "r.zarr")
        ids = [p.tolist() for p in load_arrays(open_rollouts(str(root / "r.zarr"))).prompt_ids]  # as rendered
        tok = M.load_tokenizer(model)
        records = load_records(prompts, "train", None, None, None, cfg.num_prompts)
        ours = HFBackend(M.load_model(model, dev, dtype), tok)  # loaded as oprd rollout loads it
        attn_used = ours.model.config._attn_implementation
        bare = {attn: AutoModelForCausalLM.from_pretrained(model, dtype=dtype, attn_implementation=attn).to(dev).eval()
                for attn in ("eager", "sdpa")}
        for rep in range(cfg.repeats):
            say(f"pass {rep + 1}/{cfg.repeats}: oprd rollout generation, bare generate (eager, sdpa)")
            runs["oprd"].append(_run_oprd_generation(ours, tok, records, cfg))
            for attn, m in bare.items():
                runs[f"bare_{attn}"].append(_run_bare(m, ids, ours.eos_ids, ours.pad_id, cfg))
    best = {k: max(v, key=lambda r: r["tok_s"]) for k, v in runs.items()}
    fastest = max(("bare_eager", "bare_sdpa"), key=lambda k: best[k]["tok_s"])
    ratio = best["oprd"]["tok_s"] / max(best[fastest]["tok_s"], 1e-9)
    cpu_best = max(best["bare_eager"]["tok_per_cpu_s"], best["bare_sdpa"]["tok_per_cpu_s"])
    return {"benchmark": "rollout", "config": asdict(cfg), "model": cfg.model or "generated",
            "attn_implementation": attn_used, "device": str(dev),
            "machine": M.machine_info(dev), "load_average": _load_average(), **best, "passes": runs,
            "fastest_bare": fastest, "ratio": ratio, "command": command,
            "ratio_cpu_time": best["oprd"]["tok_per_cpu_s"] / max(cpu_best, 1e-9),
            "target": {"ratio_min": TARGET_RATIO, "met": ratio >= TARGET_RATIO},
            "seconds": time.perf_counter() - t0}


def _load_average() -> list[float] | None:
    try:
        import os

        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def print_bench_rollout(r: dict[str, Any]) -> None:
    from oprd_cli.console import console

    for k in ("oprd", "bare_eager", "bare_sdpa"):
        console.print(f"{k:>10}: {r[k]['tok_s']:7.1f} tok/s ({r[k]['tokens']} tokens in {r[k]['seconds']:.1f} s; "
                      f"{r[k]['tok_per_cpu_s']:.1f} tokens per CPU-second)")
    console.print(f"oprd rollout / fastest bare ({r['fastest_bare']}): {r['ratio']:.2f} (target >= {TARGET_RATIO}: "
                  f"{'met' if r['target']['met'] else 'NOT met'}); by CPU time {r['ratio_cpu_time']:.2f}; attention rule: {r['attn_implementation']}; "
                  f"load average {r['load_average']}")
