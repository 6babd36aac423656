"""The typer app. Each command parses its options and calls one function, nothing else.

User errors (:class:`~oprd_cli.errors.OprdError`) print one line and exit non-zero;
unexpected exceptions print one line too unless ``--debug`` asks for the traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Optional

import click
import typer

from oprd_cli import __version__
from oprd_cli.console import console, err_console
from oprd_cli.errors import OprdError

app = typer.Typer(
    name="oprd",
    help="On-policy representation distillation: rollout -> teacher-cache -> train -> eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
bench_app = typer.Typer(help="Benchmarks that measure speed and memory on this machine.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _debug() -> bool:
    if os.environ.get("OPRD_DEBUG"):
        return True
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx else None
    return bool(root and (root.obj or {}).get("debug"))


def guarded(fn):
    """Turn OprdError into one line + exit code; hide other tracebacks unless --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.ClickException):
            raise
        except OprdError as e:
            if _debug():
                raise
            err_console.print(f"[red]error:[/] {e}", markup=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[red]interrupted[/]")
            raise typer.Exit(130) from None
        except Exception as e:  # a bug: say so briefly
            if _debug():
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            err_console.print(f"[red]error:[/] {type(e).__name__}: {msg} (run with --debug for the traceback)")
            raise typer.Exit(1) from None

    return wrapper


def _version(value: bool):
    if value:
        console.print(f"oprd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors (also OPRD_DEBUG=1)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    ctx.obj = {"debug": debug}


def emit_json(obj) -> None:
    """One JSON object on stdout (machine-readable; nothing else goes to stdout with --json)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------- rollout
@app.command()
@guarded
def rollout(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Student: hub id or save_pretrained folder. "
                                        "Default with --run-dir: the run's latest checkpoint, else the student in oprd.toml."),
    prompts: Optional[str] = typer.Option(None, "--prompts", "-p", help="Prompt set: hub dataset id or local "
                                          ".jsonl/.json/.parquet (plain problem/answer or verl layout)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", "-r", help="Run directory: writes rollouts/rNNNNNN.zarr, the next round."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Store path (local or fsspec URL) instead of a run directory."),
    split: Optional[str] = typer.Option(None, help="Dataset split for hub datasets. (default: train)"),
    prompt_field: Optional[str] = typer.Option(None, help="Field holding the problem text or chat messages. (default: auto: problem/question/prompt)"),
    answer_field: Optional[str] = typer.Option(None, help="Field holding the reference answer (dots reach into records). (default: auto: answer or reward_model.ground_truth)"),
    id_field: Optional[str] = typer.Option(None, help="Field holding the problem id. (default: id, else the row number)"),
    limit: Optional[int] = typer.Option(None, help="Use only the first N prompts."),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", "-n", help="Samples per prompt. (default: 2)"),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature; 0 = greedy. (default: 1.0)"),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling mass in (0, 1]. (default: 1.0)"),
    top_k: Optional[int] = typer.Option(None, help="Sample among the K most likely tokens; 0 = off. (default: 0)"),
    max_new_tokens: Optional[int] = typer.Option(None, help="Response length limit in tokens. (default: 1024)"),
    seed: Optional[int] = typer.Option(None, help="Random seed; same seed, model, prompts and device give the same store. (default: 0)"),
    batch_size: Optional[int] = typer.Option(None, help="Sequences generated together. (default: 16)"),
    record_topk: Optional[int] = typer.Option(None, "--record-topk", help="Also store the student's top-K token ids per position (for top-k OPD). (default: 0 = off)"),
    chat_template: Optional[bool] = typer.Option(None, "--chat-template/--no-chat-template", help="Apply the tokenizer's chat template when it has one. (default: on)"),
    system_prompt: Optional[str] = typer.Option(None, help="System prompt to prepend. (default: none)"),
    instruction: Optional[str] = typer.Option(None, help="Suffix appended to plain problems; '' for none. (default: the \\boxed{} convention)"),
    backend: str = typer.Option("hf", help="Generation backend: hf (transformers generate)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", help="Model dtype: auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the hub."),
    overwrite: bool = typer.Option(False, help="Replace an existing complete store at --out."),
):
    """Sample on-policy responses from the student and write one rollout store."""
    from oprd_cli.config import DataConfig, SamplingConfig, TemplateConfig, load_run_config, merge
    from oprd_cli.rollout import print_summary, run_rollout

    cfg = load_run_config(run_dir)
    data = merge(DataConfig, cfg.get("data"), prompts=prompts, split=split, prompt_field=prompt_field,
                 answer_field=answer_field, id_field=id_field, limit=limit)
    sampling = merge(SamplingConfig, cfg.get("rollout"), num_samples=num_samples, temperature=temperature,
                     top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size,
                     record_topk=record_topk)
    template = merge(TemplateConfig, cfg.get("template"), chat_template=chat_template, system_prompt=system_prompt,
                     instruction=instruction)
    summary = run_rollout(model=model, data=data, sampling=sampling, template=template, out=out,
                          run_dir=str(run_dir) if run_dir else None, overwrite=overwrite, backend=backend,
                          device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    print_summary(summary)


# ------------------------------------------------------------------------ info
@app.command()
@guarded
def info(
    path: str = typer.Argument(..., help="A rollout store, teacher cache, checkpoint folder or run directory."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a summary."),
    verify: bool = typer.Option(False, "--verify", help="Recompute the content digest from the stored arrays."),
):
    """Describe a store: kind, format version, completeness, counts and content digest."""
    from oprd_cli.describe import describe, print_description

    desc = describe(path, verify=verify)
    if as_json:
        emit_json(desc)
    else:
        print_description(desc)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
