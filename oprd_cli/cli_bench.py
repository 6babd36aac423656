"""The ``oprd bench`` commands added for issue 16: ``rollout``, ``train``, ``sweep`` and ``all``.

Part of the CLI layer (``cli.py`` imports this module at its end to register them on ``bench_app``; it
stays under the module size limit that way). Each command parses its options and calls one function.
"""

from __future__ import annotations

from typing import Optional

import typer

from oprd_cli.cli import bench_app, guarded, show
from oprd_cli.console import err_console

_DEVICE = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N.")
_THREADS = typer.Option(None, "--threads", help="CPU threads for torch. (default: torch's choice)")
_JSON = typer.Option(False, "--json", help="Print one JSON object.")


def _say(as_json: bool):
    return (lambda msg: None) if as_json else (lambda msg: err_console.print(f"[dim]bench:[/] {msg}"))


@bench_app.command("rollout")
@guarded
def bench_rollout(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id or folder. (default: a generated random Qwen2-style model)"),
    prompts: Optional[str] = typer.Option(None, "--prompts", "-p", help="Prompt file. (default: generated questions)"),
    num_prompts: int = typer.Option(8, "--num-prompts", help="Prompts (one sample each)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="New tokens per sample."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per generate call."),
    repeats: int = typer.Option(1, "--repeats", help="Interleaved passes; the best of each is kept."),
    device: str = _DEVICE,
    threads: Optional[int] = _THREADS,
    as_json: bool = _JSON,
):
    """Tokens/s of `oprd rollout` against the fastest bare `model.generate` (eager and SDPA) on the same prompts."""
    from oprd_cli.bench.rollout import BenchRolloutConfig, print_bench_rollout, run_bench_rollout

    cfg = BenchRolloutConfig(model=model, prompts=prompts, num_prompts=num_prompts, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, repeats=repeats, device=device, threads=threads)
    show(run_bench_rollout(cfg, _say(as_json)), as_json, print_bench_rollout)


@bench_app.command("train")
@guarded
def bench_train(
    objective: str = typer.Option("oprd", "--objective", help="oprd | opd-top1 | opd-topk ..."),
    steps: int = typer.Option(6, "--steps", help="Optimizer steps (the first is not counted)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Samples per step."),
    tokens: int = typer.Option(12000, "--tokens", help="Generated rollout tokens."),
    hidden_size: int = typer.Option(512, "--hidden-size", help="Generated model: d."),
    num_layers: int = typer.Option(4, "--num-layers", help="Generated model: layers."),
    vocab_size: int = typer.Option(32000, "--vocab-size", help="Generated model: |V|."),
    device: str = _DEVICE,
    threads: Optional[int] = _THREADS,
    as_json: bool = _JSON,
):
    """A full `oprd train` step (cache reads, batching, metrics) against the loss step alone."""
    from oprd_cli.bench.train import BenchTrainConfig, print_bench_train, run_bench_train

    cfg = BenchTrainConfig(objective=objective, steps=steps, batch_size=batch_size, tokens=tokens,
                           hidden_size=hidden_size, num_layers=num_layers, vocab_size=vocab_size, device=device,
                           threads=threads)
    show(run_bench_train(cfg, _say(as_json)), as_json, print_bench_train)


@bench_app.command("sweep")
@guarded
def bench_sweep(
    seq_lens: str = typer.Option("512,1024,2048,4096", "--seq-lens", help="Response lengths T."),
    objectives: str = typer.Option("opd_top16,oprd", "--objectives", help="Objectives of `bench loss`."),
    num_layers: int = typer.Option(2, "--num-layers", help="Decoder blocks (Qwen2-1.5B geometry otherwise)."),
    hidden_size: int = typer.Option(1536, "--hidden-size", help="d."),
    vocab_size: int = typer.Option(151936, "--vocab-size", help="|V|."),
    intermediate_size: int = typer.Option(8960, "--intermediate-size", help="MLP width."),
    num_heads: int = typer.Option(12, "--num-heads", help="Attention heads."),
    num_kv_heads: int = typer.Option(2, "--num-kv-heads", help="Key/value heads."),
    attn: str = typer.Option("auto", "--attn", help="auto (the rule every command uses) | eager | sdpa."),
    repeats: int = typer.Option(1, "--repeats", help="Timed steps per point."),
    grad_checkpointing: Optional[bool] = typer.Option(None, "--grad-checkpointing/--no-grad-checkpointing", help="Recompute block activations (default: auto, the trainer's rule)."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write a PNG of step time and Δpeak against T."),
    device: str = _DEVICE,
    threads: Optional[int] = _THREADS,
    as_json: bool = _JSON,
):
    """Step time and Δpeak of the actor update against T (OPRD and top-16 by default)."""
    from oprd_cli.bench.loss import BenchLossConfig
    from oprd_cli.bench.sweep import parse_lengths, plot_sweep, print_sweep, run_sweep

    base = BenchLossConfig(objectives=objectives, num_layers=num_layers, hidden_size=hidden_size,
                           vocab_size=vocab_size, intermediate_size=intermediate_size, repeats=repeats,
                           num_heads=num_heads, num_kv_heads=num_kv_heads, attn=attn,
                           grad_checkpointing="auto" if grad_checkpointing is None else grad_checkpointing, device=device, threads=threads, warmup_step=False)
    r = run_sweep(base, parse_lengths(seq_lens), show_progress=not as_json)
    if plot:
        plot_sweep(r, plot)
        r["plot"] = plot
    show(r, as_json, print_sweep)


@bench_app.command("all")
@guarded
def bench_all(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model for the rollout bench. (default: generated)"),
    seq_len: int = typer.Option(1024, "--seq-len", help="bench loss: T."),
    num_layers: int = typer.Option(2, "--num-layers", help="bench loss: decoder blocks (Qwen2-1.5B geometry)."),
    hidden_size: int = typer.Option(1536, "--hidden-size", help="bench loss: d."),
    vocab_size: int = typer.Option(151936, "--vocab-size", help="bench loss: |V|."),
    small: bool = typer.Option(False, "--small", help="Tiny generated models everywhere (a smoke run, not a measurement)."),
    grad_checkpointing: Optional[bool] = typer.Option(None, "--grad-checkpointing/--no-grad-checkpointing", help="bench loss: recompute block activations (default: auto, the trainer's rule)."),
    device: str = _DEVICE,
    as_json: bool = _JSON,
):
    """Every stage against its bare engine, in one run: loss, rollout, train and cache ratios with the machine."""
    from oprd_cli.bench.all import print_bench_all, run_bench_all
    from oprd_cli.bench.loss import BenchLossConfig
    from oprd_cli.bench.rollout import BenchRolloutConfig
    from oprd_cli.bench.train import BenchTrainConfig

    loss = BenchLossConfig(seq_len=seq_len, last_k=seq_len, num_layers=num_layers, hidden_size=hidden_size,
                           vocab_size=vocab_size, device=device, grad_checkpointing="auto" if grad_checkpointing is None else grad_checkpointing,
                           objectives="opd_top1,opd_top16,oprd")
    rollout = BenchRolloutConfig(model=model, device=device)
    train = BenchTrainConfig(device=device)
    cache: dict = {"device": device}
    if small:
        loss = BenchLossConfig(seq_len=16, last_k=16, prompt_len=4, num_layers=2, hidden_size=32, num_heads=4,
                               num_kv_heads=2, intermediate_size=64, vocab_size=300, repeats=1, isolate=False,
                               device=device, grad_checkpointing="auto" if grad_checkpointing is None else grad_checkpointing,
                               objectives="opd_top1,opd_top16,oprd")
        rollout = BenchRolloutConfig(model=model, device=device, num_prompts=2, max_new_tokens=4, batch_size=2)
        train = BenchTrainConfig(device=device, steps=3, batch_size=2, tokens=3000, hidden_size=64, num_layers=2,
                                 vocab_size=500)
        cache = {"device": device, "tokens": 1500, "hidden_size": 64, "num_layers": 2, "vocab_size": 500}
    show(run_bench_all(loss, rollout, train, cache, _say(as_json)), as_json, print_bench_all)
