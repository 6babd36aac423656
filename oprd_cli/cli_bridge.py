"""``oprd bridge ...``: the OPRD-Bridge commands (a typer sub-app that ``cli.py`` mounts)."""

from __future__ import annotations

from typing import Optional

import typer

from oprd_cli.bridge.fit import DEFAULT_MAX_ROWS
from oprd_cli.cli_base import emit_json, guarded

bridge_app = typer.Typer(help="OPRD-Bridge: a teacher of another depth, width or tokenizer.", no_args_is_help=True)


@bridge_app.command("fit")
@guarded
def fit(
    student: str = typer.Option(..., "--student", help="The student (hub id or folder) whose rollouts these are."),
    teacher: str = typer.Option(..., "--teacher", help="The teacher (hub id or folder); another tokenizer is aligned by character offsets."),
    rollouts: Optional[str] = typer.Option(None, "--rollouts", help="A complete rollout store of the student."),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help="Use the latest complete rollout store of this run directory."),
    rank: int = typer.Option(8, "--rank", help="r: dimension of the shared subspace (paper: 8 across architectures, 4 across tokenizers)."),
    out: str = typer.Option(..., "--out", help="Bridge folder to write (bridge.json + bridge.safetensors)."),
    max_rows: int = typer.Option(DEFAULT_MAX_ROWS, "--max-rows", help="At most this many response positions (sampled with --seed) for the PCA and the fit."),
    epochs: int = typer.Option(20, "--epochs", help="Adam epochs of each student projector P_S."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate of the projectors."),
    seed: int = typer.Option(0, "--seed", help="Seed of the row sample and the projectors' initialisation."),
    max_batch_tokens: int = typer.Option(16384, "--max-batch-tokens", help="Padded tokens per forward."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="Model dtype: auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a bridge already in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the layer map, the variance each P_T captures and the fit's cosine per layer."),
):
    """Stage 1 (both models frozen): layer map, teacher PCA per mapped layer, student projectors."""
    from oprd_cli.bridge.command import run_bridge_fit

    summary = run_bridge_fit(student=student, teacher=teacher, rollouts=rollouts, run_dir=run_dir, rank=rank, out=out,
                             max_rows=max_rows, epochs=epochs, lr=lr, seed=seed, max_batch_tokens=max_batch_tokens,
                             device=device, dtype=dtype, overwrite=overwrite, show_progress=not as_json)
    if as_json:
        emit_json(summary)
