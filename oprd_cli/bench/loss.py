"""``oprd bench loss``: the paper's Table 3 (actor-update cost) on this machine.

For one model geometry (default: the Qwen2.5-1.5B / R1-Distill-Qwen-1.5B shape, d = 1536,
|V| = 151936, untied LM head; a real ``Qwen2Config`` with random weights, depth reducible with
``--num-layers`` so that it runs on a CPU), one sequence length, last-k and batch size, it runs the
real actor update (:meth:`oprd_cli.train.Trainer.train_step`: forward, backward, gradient clipping,
AdamW) for each objective and reports its step time and Δpeak memory:

- ``opd_top1``: sampled-token reverse KL as a clipped policy gradient (full-vocabulary log-probs of
  the sampled tokens, chunked).
- ``opd_top16``: top-k OPD the way verl and the paper's baseline compute it: full-vocabulary logits,
  log-softmax, gather at the student's top-k ids (``--topk-logits full``).
- ``opd_top16_support``: our top-k OPD, logits at the support ids only (``h @ W[S].T``).
- ``oprd``: OPRD over all layers at the last-k positions; the LM head never runs.

OPD objectives log ``actor/entropy`` as ``oprd train`` does by default (an LM-head pass without
gradient; verl's actor update computes it too); ``oprd`` does not.

Measurement. Every objective runs in a fresh subprocess (no allocator state or cached buffers
shared between objectives; ``--no-isolate`` runs them all in this process, which is faster to start
and what the tests use): one warm-up step (allocates the AdamW state), then ``--repeats`` timed
steps on the same synthetic batch; the median is reported. Δpeak is the step's peak minus its
starting level (weights, optimizer state and batch are in the starting level):

- CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus ``memory_allocated``;
- CPU: the process's resident-set high-water mark ``VmHWM`` (reset right before the step through
  ``/proc/self/clear_refs``) minus ``VmRSS`` before the step. The worker runs with glibc's mmap
  threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so every tensor buffer is its own mapping
  that returns to the OS when freed: RSS then follows live tensor memory instead of the allocator's
  cache, and a step cannot hide its peak in memory freed by the step before.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from oprd_cli.console import console, err_console, progress
from oprd_cli.errors import OprdError

OBJECTIVES = {
    "opd_top1": {"objective": "opd-top1"},
    "opd_top16": {"objective": "opd-topk", "topk_logits": "full"},
    "opd_top16_support": {"objective": "opd-topk", "topk_logits": "support"},
    "oprd": {"objective": "oprd"},
}
TARGET_SPEEDUP = 2.0  # issue 4: OPRD at least 2x faster than top-16 ...
TARGET_DELTA_PEAK_RATIO = 0.30  # ... and at most 30% of its delta-peak
PAPER = {"speedup_vs_top16": 1.44, "delta_peak_ratio_vs_top16": 20.5 / 45.0}


@dataclass
class BenchLossConfig:
    num_layers: int = 2
    seq_len: int = 1024
    last_k: int = 1024
    batch_size: int = 1
    prompt_len: int = 64
    topk: int = 16
    hidden_size: int = 1536
    vocab_size: int = 151936
    num_heads: int = 12
    num_kv_heads: int = 2
    intermediate_size: int = 8960
    tie_word_embeddings: bool = False
    objectives: str = "opd_top1,opd_top16,opd_top16_support,oprd"
    repeats: int = 2
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    seed: int = 0
    isolate: bool = True  # one fresh subprocess per objective (False: all in this process, faster)
    grad_checkpointing: bool | str = "auto"  # recompute each block's activations in backward (auto: the trainer's rule)
    attn: str = "auto"  # auto (models.choose_attn_implementation) | eager | sdpa
    warmup_step: bool = True  # False: allocate the AdamW state by one optimizer step on zero gradients

    def objective_list(self) -> list[str]:
        names = [n.strip() for n in self.objectives.split(",") if n.strip()]
        bad = [n for n in names if n not in OBJECTIVES]
        if bad or not names:
            raise OprdError(f"--objectives takes a comma-separated subset of {', '.join(OBJECTIVES)}; got "
                            f"{self.objectives!r}")
        return list(dict.fromkeys(names))

    def validate(self) -> None:
        for name in ("num_layers", "seq_len", "last_k", "batch_size", "prompt_len", "topk", "hidden_size",
                     "vocab_size", "num_heads", "num_kv_heads", "intermediate_size", "repeats"):
            if getattr(self, name) < 1:
                raise OprdError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.attn not in ("auto", "eager", "sdpa"):
            raise OprdError(f"--attn takes auto, eager or sdpa; got {self.attn!r}")
        if self.threads is not None and self.threads < 1:
            raise OprdError(f"--threads must be at least 1, got {self.threads}")
        if self.hidden_size % self.num_heads:
            raise OprdError(f"--hidden-size {self.hidden_size} is not a multiple of --num-heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise OprdError(f"--num-heads {self.num_heads} is not a multiple of --num-kv-heads {self.num_kv_heads}")
        if self.topk > self.vocab_size:
            raise OprdError(f"--topk {self.topk} is more than the vocabulary ({self.vocab_size})")
        self.objective_list()


# ----------------------------------------------------------------------------- the worker (subprocess)
def _build_model(cfg: BenchLossConfig, device, attn: str):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from oprd_cli.models import quiet_transformers

    quiet_transformers()
    config = Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                         max_position_embeddings=max(4096, cfg.prompt_len + cfg.seq_len),
                         tie_word_embeddings=cfg.tie_word_embeddings, use_cache=False)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    return model.to(device)


def _batch(cfg: BenchLossConfig, objective: str, layers: list[int]):
    """A synthetic micro-batch with everything the objective reads (what a cache + rollout hold)."""
    import numpy as np
    import torch

    from oprd_cli.train import MicroBatch

    g = torch.Generator().manual_seed(cfg.seed + 1)
    B, T, Lp, d, V, K = cfg.batch_size, cfg.seq_len, cfg.prompt_len, cfg.hidden_size, cfg.vocab_size, cfg.topk
    response = torch.randint(0, V, (B, T), generator=g)
    prompt = torch.randint(0, V, (B, Lp), generator=g)
    mb = MicroBatch(rows=np.arange(B), input_ids=torch.cat([prompt, response], dim=1),
                    prompt_lens=torch.full((B,), Lp, dtype=torch.long), response_ids=response,
                    response_mask=torch.ones((B, T), dtype=torch.bool),
                    behaviour_logprobs=-torch.rand((B, T), generator=g) * 3)
    if objective == "oprd":
        P = min(cfg.last_k, T)
        mb.teacher_hidden = torch.randn((B, len(layers), P, d), generator=g)
        mb.hidden_mask = torch.ones((B, P), dtype=torch.bool)
        mb.hidden_positions = torch.arange(T - P, T).expand(B, P).clone()
    elif objective == "opd-top1":
        mb.teacher_logprobs = -torch.rand((B, T), generator=g) * 3
    else:
        mb.support_ids = torch.randint(0, V, (B, T, K), generator=g)
        mb.support_logprobs = torch.log_softmax(torch.randn((B, T, K), generator=g), dim=-1)
    return mb


def _malloc_returns_freed_memory() -> None:
    """glibc: serve every allocation of 64 KiB or more by its own mmap and trim the heap on free, so that
    RSS follows live memory (the same as ``MALLOC_MMAP_THRESHOLD_=65536`` in the environment)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: RSS may then include the allocator's cache
        pass


def run_worker(cfg: BenchLossConfig, name: str) -> dict[str, Any]:
    """One objective in this process: warm-up step, then ``repeats`` measured steps."""
    import torch

    _malloc_returns_freed_memory()

    from oprd_cli import models as M
    from oprd_cli.train import TrainConfig, Trainer
    from oprd_cli.train import memory

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = M.resolve_device(cfg.device)
    autocast = None
    if device.type == "cuda" and cfg.dtype in ("auto", "bfloat16", "bf16"):
        autocast = torch.bfloat16
    attn = M.choose_attn_implementation(device, autocast, training=True) if cfg.attn == "auto" else cfg.attn
    model = _build_model(cfg, device, attn)
    spec = OBJECTIVES[name]
    layers = list(range(1, cfg.num_layers + 1))  # all layers, the paper's default
    tcfg = TrainConfig.from_flat(objective=spec["objective"], topk_logits=spec.get("topk_logits", "support"),
                       batch_size=cfg.batch_size, micro_batch_tokens=cfg.batch_size * (cfg.prompt_len + cfg.seq_len),
                       device=str(device), seed=cfg.seed, gradient_checkpointing=cfg.grad_checkpointing)
    tcfg.validate()
    trainer = Trainer(model, tcfg, layers if tcfg.loss.uses_oprd else [], device, total_steps=cfg.repeats + 1,
                      autocast_dtype=autocast)
    mb = _batch(cfg, spec["objective"], layers).to(device)
    times, deltas, bases, breakdowns = [], [], [], []
    first = None
    if not cfg.warmup_step:
        _init_optimizer_state(trainer)
    for i in range(0 if cfg.warmup_step else 1, cfg.repeats + 1):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        trainer.mem_phases = {} if i > 0 else None
        base = memory.current_bytes(device)
        m = trainer.train_step([mb], on_policy=False)
        if i == 0:
            first = {"step_time_s": m["step_time_s"], "delta_peak_bytes": m["peak_mem_bytes"] - base}
            continue
        times.append(m["step_time_s"])
        deltas.append(m["peak_mem_bytes"] - base)
        bases.append(base)
        breakdowns.append(breakdown(trainer.mem_phases, base))
    params = sum(p.numel() for p in model.parameters())
    mid = sorted(range(len(deltas)), key=deltas.__getitem__)[(len(deltas) - 1) // 2]  # the median step's
    grad_bytes = breakdowns[mid]["gradients"]
    return {
        "breakdown": breakdowns[mid], "grad_bytes": grad_bytes,
        "trained_parameters": trainer.mem_phases.get("grad_params", 0),
        "delta_peak_over_grads": deltas[mid] / grad_bytes if grad_bytes else None,
        "grad_checkpointing": trainer.checkpointed > 0, "grad_checkpointing_mode": tcfg.runtime.checkpointing_mode,
        "objective": spec["objective"], "topk_logits": spec.get("topk_logits"), "entropy": tcfg.loss.log_entropy,
        "step_time_s": statistics.median(times), "delta_peak_bytes": int(deltas[mid]),
        "step_times_s": times, "delta_peaks_bytes": deltas, "start_level_bytes": int(statistics.median(bases)),
        "warmup_step": first, "parameters": params, "threads": torch.get_num_threads(),
        "device": str(device), "autocast": str(autocast) if autocast else None, "attn_implementation": attn,
    }


def _init_optimizer_state(trainer) -> None:
    """Allocate the AdamW moments without a forward/backward (a step on zero gradients: the weights only
    decay), so that the first measured step starts with the optimizer state in place."""
    import torch

    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def breakdown(phases: dict[str, int], base: int) -> dict[str, Any]:
    """Split a step's Δpeak (bytes above the step's starting level ``base``) by what was alive at the
    peak, from the trainer's memory phases (:attr:`Trainer.mem_phases`). The parts add up to Δpeak:

    - peak during forward/backward: ``gradients`` (bytes of every gradient the step made),
      ``activations`` (level after the decoder forward: what it saved for backward),
      ``lm_head`` (what the loss head added on top: logits chunks, gathered rows, losses), and
      ``backward_other`` (the rest at the peak: backward temporaries minus what was already freed;
      may be negative);
    - peak during clipping + AdamW: ``gradients``, ``optimizer`` (temporaries above the level after
      backward; the AdamW moments were allocated before the measured step) and ``backward_other``
      (what backward left besides the gradients).
    """
    grads = int(phases.get("grad_bytes", 0))
    fb, opt = phases["fwd_bwd_peak"] - base, phases["opt_peak"] - base
    parts = {"gradients": grads, "optimizer": 0, "activations": 0, "lm_head": 0, "backward_other": 0}
    if fb >= opt:
        fwd = phases.get("after_forward", base) - base
        parts["activations"] = fwd
        parts["lm_head"] = phases.get("after_loss", base) - base - fwd
        parts["backward_other"] = fb - grads - parts["activations"] - parts["lm_head"]
        peak_phase = "forward/backward"
    else:
        after_bwd = phases["after_backward"] - base
        parts["optimizer"] = opt - after_bwd
        parts["backward_other"] = after_bwd - grads
        peak_phase = "optimizer"
    return {**parts, "delta_peak": max(fb, opt), "peak_phase": peak_phase}


def _worker_main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    cfg = BenchLossConfig(**spec["config"])
    out = run_worker(cfg, spec["objective"])
    Path(argv[1]).write_text(json.dumps(out))
    return 0


# ----------------------------------------------------------------------------- the command
def _run_one(cfg: BenchLossConfig, name: str, tmp: Path) -> dict[str, Any]:
    spec_path, out_path = tmp / f"{name}.json", tmp / f"{name}.out.json"
    spec_path.write_text(json.dumps({"config": asdict(cfg), "objective": name}))
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # see the module docstring: RSS follows live tensors
    env["MALLOC_TRIM_THRESHOLD_"] = "0"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.run([sys.executable, "-m", "oprd_cli.bench.loss", "--worker", str(spec_path), str(out_path)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out_path.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        if proc.returncode < 0 or proc.returncode == 137:
            tail = [f"killed by signal {-proc.returncode if proc.returncode < 0 else 9} (out of memory? try a "
                    "smaller --num-layers / --seq-len)"]
        raise OprdError(f"bench loss: the {name} worker failed: {tail[0]}")
    return json.loads(out_path.read_text())


def _ratio(a: float | None, b: float | None) -> float | None:
    return (a / b) if a is not None and b not in (None, 0) else None


def run_bench_loss(cfg: BenchLossConfig, show_progress: bool = True) -> dict[str, Any]:
    """Run every objective in its own subprocess; returns the report (what ``--json`` prints)."""
    cfg.validate()
    names = cfg.objective_list()
    results: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="oprd-bench-loss-") as tmp:
        bar = progress() if show_progress else None
        if bar is not None:
            bar.__enter__()
            task = bar.add_task("bench loss", total=len(names))
        try:
            for name in names:
                if bar is not None:
                    bar.update(task, description=f"bench loss: {name}")
                if cfg.isolate:
                    results[name] = _run_one(cfg, name, Path(tmp))
                else:
                    results[name] = run_worker(cfg, name)
                    gc.collect()
                if bar is not None:
                    bar.advance(task)
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)
    top16 = results.get("opd_top16")
    for name, r in results.items():
        r["speedup_vs_top16"] = _ratio(top16["step_time_s"], r["step_time_s"]) if top16 else None
        r["delta_peak_ratio_vs_top16"] = _ratio(r["delta_peak_bytes"], top16["delta_peak_bytes"]) if top16 else None
    oprd = results.get("oprd")
    speedup = oprd["speedup_vs_top16"] if oprd else None
    ratio = oprd["delta_peak_ratio_vs_top16"] if oprd else None
    from oprd_cli.models import machine_info, resolve_device

    device = next(iter(results.values()))["device"] if results else cfg.device
    report: dict[str, Any] = {
        "benchmark": "loss",
        "config": asdict(cfg),
        "geometry": {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
                     "seq_len": cfg.seq_len, "prompt_len": cfg.prompt_len, "last_k": min(cfg.last_k, cfg.seq_len),
                     "batch_size": cfg.batch_size, "topk": cfg.topk, "tie_word_embeddings": cfg.tie_word_embeddings},
        "device": device,
        "memory_measure": ("CUDA allocator: max_memory_allocated - memory_allocated at step start"
                           if device.startswith("cuda") else
                           "process RSS: VmHWM (reset before the step) - VmRSS at step start, glibc mmap "
                           "threshold 64 KiB")
                          + ("; a fresh process per objective" if cfg.isolate else "; all objectives in one process"),
        "machine": machine_info(resolve_device(device)),
        "objectives": names,
        **results,
        "speedup_vs_top16": speedup,
        "delta_peak_ratio_vs_top16": ratio,
        "targets": {"speedup_vs_top16_min": TARGET_SPEEDUP, "delta_peak_ratio_vs_top16_max": TARGET_DELTA_PEAK_RATIO,
                    "speedup_met": None if speedup is None else speedup >= TARGET_SPEEDUP,
                    "delta_peak_met": None if ratio is None else ratio <= TARGET_DELTA_PEAK_RATIO},
        "paper": PAPER,
        "seconds": time.perf_counter() - t0,
    }
    return report


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:,.0f} MiB"


def _x(x: float | None, fmt: str = "{:.2f}x") -> str:
    return "-" if x is None else fmt.format(x)


def print_bench(r: dict[str, Any]) -> None:
    from rich.table import Table

    g = r["geometry"]
    title = (f"actor update, {g['num_layers']} layers, d={g['hidden_size']}, |V|={g['vocab_size']}, "
             f"B={g['batch_size']}, T={g['seq_len']}, last-k={g['last_k']}, k={g['topk']} on {r['device']}")
    t = Table(title=title)
    for col in ("objective", "step time", "Δpeak", "speedup vs top-16", "Δpeak / top-16"):
        t.add_column(col, justify="left" if col == "objective" else "right")
    for name in r["objectives"]:
        o = r[name]
        t.add_row(name, f"{o['step_time_s']:.3f} s", _mb(o["delta_peak_bytes"]), _x(o["speedup_vs_top16"]),
                  _x(o["delta_peak_ratio_vs_top16"], "{:.0%}"))
    console.print(t)
    m = r["machine"]
    console.print(f"machine: {m['cpu']}, {m['cpu_cores']} cores" + (f", {m['gpu']}" if m.get("gpu") else ", no GPU")
                  + f"; Δpeak: {r['memory_measure']}")
    tg = r["targets"]
    if tg["speedup_met"] is not None:
        console.print(f"OPRD vs top-16: {r['speedup_vs_top16']:.2f}x faster (target >= {TARGET_SPEEDUP:g}x: "
                      f"{'met' if tg['speedup_met'] else 'NOT met'}), Δpeak {r['delta_peak_ratio_vs_top16']:.0%} of "
                      f"top-16's (target <= {TARGET_DELTA_PEAK_RATIO:.0%}: "
                      f"{'met' if tg['delta_peak_met'] else 'NOT met'}); paper: 1.44x, 46%")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2:]))
    err_console.print("usage: oprd bench loss (this module's __main__ is the benchmark's worker)")
    sys.exit(2)
