"""The typer app. Each command parses its options and calls one function, nothing else.

User errors (:class:`~oprd_cli.errors.OprdError`) print one line and exit non-zero;
unexpected exceptions print one line too unless ``--debug`` asks for the traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from oprd_cli import __version__
from oprd_cli import cli_options as O
from oprd_cli.cli_base import DefaultsCommand, emit_json, fill_help_defaults, guarded, show  # noqa: F401
from oprd_cli.console import console
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


# options shared by rollout, loop and eval (one definition, one help text)
_CHAT_TEMPLATE = typer.Option(None, "--chat-template/--no-chat-template", help="Apply the tokenizer's chat template when it has one. (default: <template.chat_template>)")
_SYSTEM_PROMPT = typer.Option(None, help="System prompt to prepend. (default: <template.system_prompt>)")
_INSTRUCTION = typer.Option(None, help="Suffix appended to plain problems; '' for none. (default: <template.instruction>)")
_PROMPT_FIELD = typer.Option(None, help="Field holding the problem text or chat messages. (default: auto: problem/question/prompt)")
_ANSWER_FIELD = typer.Option(None, help="Field holding the reference answer (dots reach into records). (default: auto: answer or reward_model.ground_truth)")
_ID_FIELD = typer.Option(None, help="Field holding the problem id. (default: id, else the row number)")


# --------------------------------------------------------------------- rollout
@app.command(cls=DefaultsCommand)
@guarded
def rollout(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Student: hub id or save_pretrained folder. "
                                        "Default with --run-dir: the run's latest checkpoint, else the student in oprd.toml."),
    prompts: Optional[str] = typer.Option(None, "--prompts", "-p", help="Prompt set: hub dataset id or local "
                                          ".jsonl/.json/.parquet (plain problem/answer or verl layout)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", "-r", help="Run directory: writes rollouts/rNNNNNN.zarr, the next round."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Store path (local or fsspec URL) instead of a run directory."),
    split: Optional[str] = typer.Option(None, help="Dataset split for hub datasets. (default: <data.split>)"),
    prompt_field: Optional[str] = _PROMPT_FIELD,
    answer_field: Optional[str] = _ANSWER_FIELD,
    id_field: Optional[str] = _ID_FIELD,
    limit: Optional[int] = typer.Option(None, help="Use only the first N prompts."),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", "-n", help="Samples per prompt. (default: <rollout.num_samples>)"),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature; 0 = greedy. (default: <rollout.temperature>)"),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling mass in (0, 1]. (default: <rollout.top_p>)"),
    top_k: Optional[int] = typer.Option(None, help="Sample among the K most likely tokens; 0 = off. (default: <rollout.top_k>)"),
    max_new_tokens: Optional[int] = typer.Option(None, help="Response length limit in tokens. (default: <rollout.max_new_tokens>)"),
    seed: Optional[int] = typer.Option(None, help="Random seed; same seed, model, prompts and device give the same store. (default: <rollout.seed>)"),
    batch_size: Optional[int] = typer.Option(None, help="Sequences generated together. (default: <rollout.batch_size>)"),
    record_topk: Optional[int] = typer.Option(None, "--record-topk", help="Also store the student's top-K token ids per position (for top-k OPD). (default: <rollout.record_topk> = off)"),
    teacher_prefix: Optional[str] = O.TEACHER_PREFIX, prefix_max_tokens: Optional[int] = O.PREFIX_MAX_TOKENS, prefix_mode: Optional[str] = O.PREFIX_MODE,
    chat_template: Optional[bool] = _CHAT_TEMPLATE,
    system_prompt: Optional[str] = _SYSTEM_PROMPT,
    instruction: Optional[str] = _INSTRUCTION,
    backend: str = typer.Option("hf", help="Generation backend: hf (transformers generate)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", help="Model dtype: auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the hub."),
    overwrite: bool = typer.Option(False, help="Replace an existing complete store at --out."),
    import_file: Optional[str] = typer.Option(None, "--import", help="Build the store from an outside engine's responses (JSONL of prompt_index, sample_index, token_ids, logprobs, finish_reason) to the prompts --print-prompts renders; see docs/scale-out.md."),
    print_prompts: Optional[str] = typer.Option(None, "--print-prompts", help="Write the rendered prompt token ids (JSONL) to this file for an outside engine, and stop."),
):
    """Sample on-policy responses from the student and write one rollout store."""
    from oprd_cli.config import resolve
    from oprd_cli.guidance import guidance_from_flags
    from oprd_cli.rollout import print_summary, run_rollout

    c = resolve(run_dir, data=dict(prompts=prompts, split=split, prompt_field=prompt_field, answer_field=answer_field,
                                   id_field=id_field, limit=limit),
                rollout=dict(num_samples=num_samples, temperature=temperature, top_p=top_p, top_k=top_k,
                             max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, record_topk=record_topk),
                template=dict(chat_template=chat_template, system_prompt=system_prompt, instruction=instruction))
    if print_prompts is not None:  # the rendered prompts for an outside engine; nothing is sampled
        from oprd_cli.rollout_import import print_prompts as write_prompts
        return write_prompts(print_prompts, model, run_dir, c["data"], c["template"], trust_remote_code)
    summary = run_rollout(model=model, data=c["data"], sampling=c["rollout"], template=c["template"], out=out,
                          run_dir=str(run_dir) if run_dir else None, overwrite=overwrite, backend=backend,
                          device=device, dtype=dtype, trust_remote_code=trust_remote_code, import_path=import_file,
                          guidance=guidance_from_flags(teacher_prefix, prefix_max_tokens, prefix_mode))
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
    show(desc, as_json, print_description)


@app.command()
@guarded
def verify(
    path: str = typer.Argument(..., help="A rollout store, teacher cache, checkpoint folder or run directory."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a summary."),
):
    """Check every chunk's crc32c, the markers and the content digests; exit 1 naming what is wrong."""
    from oprd_cli.verify import run_verify
    raise typer.Exit(run_verify(path, as_json, show))

# --------------------------------------------------------------- teacher-cache
@app.command("teacher-cache", cls=DefaultsCommand)
@guarded
def teacher_cache(
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher model: hub id or local folder "
                                          "(default: the teacher of the models table in RUN/oprd.toml)"),
    rollouts: Optional[str] = typer.Option(None, "--rollouts", help="One complete rollout store to cache."),
    out: Optional[str] = typer.Option(None, "--out", help="Cache store to write (default: RUN/cache/rNNNNNN.zarr "
                                      "for a run-dir round, else NAME.cache.zarr beside the rollouts)."),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help="Cache every complete round of this run "
                                          "directory that has no complete cache yet, oldest first."),
    layers: Optional[str] = typer.Option(None, "--layers", help="last (HF hidden_states index L) | all (1..L) | even "
                                         "(blocks with an even 0-based index: HF 1,3,5,...) | odd (HF 2,4,6,...) | "
                                         "comma-separated hidden_states indices (0 = embeddings). (default: <teacher_cache.layers>)"),
    positions: Optional[str] = typer.Option(None, "--positions", help="all | last (the final response "
                                            "token) | first_k | last_k (the last min(k, T)): response tokens whose "
                                            "hidden states are stored; token y_t's state is the one at sequence index "
                                            "Lp + t, which has read y_t. (default: <teacher_cache.positions>)"),
    k: Optional[int] = typer.Option(None, "--k", help="Positions per sample for first_k/last_k. (default: <teacher_cache.k>)"),
    logprobs: Optional[str] = typer.Option(None, "--logprobs", help="none (OPRD only) | sampled (log q of each "
                                           "sampled token) | topk (also on the student's and the teacher's top-k). "
                                           "(default: <teacher_cache.logprobs>)"),
    topk: Optional[int] = typer.Option(None, "--topk", help="K for --logprobs topk. (default: <teacher_cache.topk>)"),
    store_dtype: Optional[str] = typer.Option(None, "--store-dtype", help="auto (the teacher's compute dtype: "
                                              "faithful) | float32 | bfloat16 | float16. (default: <teacher_cache.store_dtype>)"),
    compressor: Optional[str] = typer.Option(None, "--compressor", help="blosc-zstd | zstd | lz4 | blosc-lz4 | "
                                             "blosc-lz4hc | gzip | none. (default: <teacher_cache.compressor>)"),
    level: Optional[int] = typer.Option(None, "--level", help="Compression level. (default: per compressor: blosc-zstd 1, zstd 3, blosc-lz4 5)"),
    lossy_mantissa_bits: Optional[int] = typer.Option(None, "--lossy-mantissa-bits", help="Lossy: round hidden "
                                                      "states to this many mantissa bits (error is reported as "
                                                      "cosine similarity by `oprd info`). (default: off)"),
    max_batch_tokens: Optional[int] = typer.Option(None, "--max-batch-tokens", help="Padded tokens per teacher "
                                                   "forward; sequences are packed longest first. (default: <teacher_cache.max_batch_tokens>)"),
    unit_positions: Optional[int] = typer.Option(None, "--unit-positions", help="Advanced: hidden positions per "
                                                 "unit of work / shard. (default: about 64 MB of raw data)"),
    unit_tokens: Optional[int] = typer.Option(None, "--unit-tokens", help="Advanced: response tokens per unit "
                                              "of work. (default: 16384)"),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: this worker fills part I of N of each store, I from 0 to N-1. (default: 0/1)"),
    follow: bool = typer.Option(False, "--follow", help="Keep watching --run-dir and cache new rounds."),
    poll_seconds: float = typer.Option(10.0, "--poll-seconds", show_default=False, help="Seconds between --follow's looks for new rounds. (default: 10)"),
    max_rounds: Optional[int] = typer.Option(None, "--max-rounds", help="Stop after caching this many rounds. (default: no limit)"),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Stop following after this many seconds. (default: never)"),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N. (default: <teacher_cache.device>)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Teacher compute dtype: auto (bf16 on GPU, fp32 "
                                        "on CPU) | float32 | bfloat16 | float16. (default: <teacher_cache.dtype>)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow custom model code."),
    bridge: Optional[str] = typer.Option(None, "--bridge", help="Store only z_T = P_T (h_T - mu_T) of this fitted bridge's teacher layers (r numbers per layer and position); a teacher of another tokenizer reads the response text, aligned by character offsets. (default: <teacher_cache.bridge>)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing complete cache."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object describing the caches written."),
    objective: Optional[str] = O.CACHE_OBJECTIVE,
):
    """Run the teacher on rollouts and cache its hidden states (and log-probs) in a Zarr store."""
    from oprd_cli.teacher import run_teacher_cache

    summaries = run_teacher_cache(
        teacher, rollouts=rollouts, out=out, run_dir=run_dir, follow=follow, poll_seconds=poll_seconds,
        max_rounds=max_rounds, timeout=timeout, shard=shard, overwrite=overwrite, layers=layers,
        positions=positions, k=k, logprobs=logprobs, topk=topk, store_dtype=store_dtype, compressor=compressor,
        level=level, lossy_mantissa_bits=lossy_mantissa_bits, max_batch_tokens=max_batch_tokens,
        unit_positions=unit_positions, unit_tokens=unit_tokens, device=device, dtype=dtype,
        trust_remote_code=trust_remote_code or None, objective=objective, bridge=bridge,
    )
    if as_json:
        emit_json({"caches": summaries})


@bench_app.command("cache")
@guarded
def bench_cache(
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher: hub id or folder. (default: a generated Qwen2-style model)"),
    rollouts: Optional[str] = typer.Option(None, "--rollouts", help="Rollout store. (default: generated random tokens)"),
    device: str = typer.Option("auto", "--device", show_default=False, help="auto | cpu | cuda | cuda:N. (default: auto)"),
    dtype: str = typer.Option("auto", "--dtype", show_default=False, help="Teacher compute dtype: auto (bf16 on GPU, fp32 on CPU) | "
                              "float32 | bfloat16 | float16. (default: auto)"),
    store_dtype: str = typer.Option("bfloat16", "--store-dtype", show_default=False, help="Encoding of the timed cache pass. (default: bfloat16)"),
    layers: str = typer.Option("all", "--layers", show_default=False, help="Layers to cache. (default: all)"),
    positions: str = typer.Option("all", "--positions", show_default=False, help="Positions to cache. (default: all)"),
    k: int = typer.Option(2000, "--k", show_default=False, help="k for first_k/last_k. (default: 2000)"),
    compressor: str = typer.Option("blosc-zstd", "--compressor", show_default=False, help="Compressor of the timed cache pass. (default: blosc-zstd)"),
    level: Optional[int] = typer.Option(None, "--level", help="Compression level. (default: per compressor)"),
    tokens: int = typer.Option(12000, "--tokens", show_default=False, help="Generated rollout: total tokens (prompt + response). (default: 12000)"),
    hidden_size: int = typer.Option(512, "--hidden-size", show_default=False, help="Generated teacher: hidden size. (default: 512)"),
    num_layers: int = typer.Option(8, "--num-layers", show_default=False, help="Generated teacher: layers. (default: 8)"),
    vocab_size: int = typer.Option(32000, "--vocab-size", show_default=False, help="Generated teacher: vocabulary size. (default: 32000)"),
    max_batch_tokens: int = typer.Option(4096, "--max-batch-tokens", show_default=False, help="Padded tokens per forward. (default: 4096)"),
    repeats: int = typer.Option(1, "--repeats", show_default=False, help="Time each pass this many times and keep the fastest. (default: 1)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch; 1 leaves a core to the "
                                          "writer and avoids stalls on a busy machine. (default: torch's choice)"),
    bridge: Optional[str] = typer.Option(None, "--bridge", help="Also cache through this bridge (fitted for --teacher) and report its bytes per position next to the full cache's. (default: a rank --bridge-rank PCA of the full cache)"),
    bridge_rank: int = typer.Option(8, "--bridge-rank", show_default=False, help="Rank of the default bridge. (default: 8)"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Teacher-cache speed and size: truncated vs full forward, writer overhead, bytes per value."""
    from oprd_cli.bench.cache import print_report, run_bench

    report = run_bench(
        teacher=teacher, rollouts=rollouts, device=device, dtype=dtype, store_dtype=store_dtype, layers=layers,
        positions=positions, k=k, compressor=compressor, level=level, tokens=tokens, hidden_size=hidden_size,
        num_layers=num_layers, vocab_size=vocab_size, max_batch_tokens=max_batch_tokens, repeats=repeats,
        threads=threads, show_progress=not as_json, bridge=bridge, bridge_rank=bridge_rank,
    )
    show(report, as_json, print_report)


# ------------------------------------------------------------------------ eval
@app.command("eval", cls=DefaultsCommand)
@guarded
def eval_cmd(
    bench: Optional[str] = typer.Option(None, "--bench", "-b", help="Benchmark by name: aime24, aime25, amc23, math500 "
                                        "(loaded from the hub). With --data, only the name the report uses."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Problems with answers from a local .jsonl/.json/.parquet "
                                       "file (plain problem/answer or verl layout) or a hub dataset id."),
    responses: Optional[str] = typer.Option(None, "--responses", help="Grade responses generated elsewhere (jsonl, one "
                                            '{"id": ..., "response": "..."} per line) instead of sampling; no model is loaded.'),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model to evaluate: hub id or save_pretrained folder. "
                                        "With --responses, only the name the report uses."),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", "-r", help="Evaluate a run: its latest complete checkpoint, "
                                          "else its initial student; reports go to RUN/eval/."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="With --run-dir: this checkpoint (step-N or N)."),
    all_checkpoints: bool = typer.Option(False, "--all-checkpoints", show_default=False, help="With --run-dir: every "
                                         "complete checkpoint (and the initial student when there are several), then "
                                         "the table and plot of oprd report."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Report path (a folder with --all-checkpoints). "
                                      "(default: RUN/eval/BENCH-step-N.json, else eval/BENCH-MODEL.json)"),
    limit: Optional[int] = typer.Option(None, help="Evaluate only the first N problems."),
    split: Optional[str] = typer.Option(None, help="Dataset split. (default: the benchmark's, else train)"),
    prompt_field: Optional[str] = _PROMPT_FIELD,
    answer_field: Optional[str] = _ANSWER_FIELD,
    id_field: Optional[str] = _ID_FIELD,
    num_samples: Optional[int] = typer.Option(None, "--num-samples", "-n", help="Samples per problem, the n of Avg@n. (default: 16)"),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature; 0 = greedy. (default: 0.7)"),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling mass in (0, 1]. (default: 0.95)"),
    top_k: Optional[int] = typer.Option(None, help="Sample among the K most likely tokens; 0 = off. (default: 0)"),
    max_new_tokens: Optional[int] = typer.Option(None, help="Response length limit in tokens; longer responses count as "
                                                 "truncated. (default: 16384, capped by the model's context)"),
    seed: Optional[int] = typer.Option(None, help="Random seed; same seed, model and device give the same samples. (default: 0)"),
    batch_size: Optional[int] = typer.Option(None, help="Sequences generated together. (default: 16)"),
    chat_template: Optional[bool] = _CHAT_TEMPLATE,
    system_prompt: Optional[str] = _SYSTEM_PROMPT,
    instruction: Optional[str] = _INSTRUCTION,
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer (hub id or folder) for sampling, and for counting "
                                            "tokens of --responses lines without num_tokens. (default: the model's; "
                                            "with --responses a local --model folder's, else words)"),
    grade_timeout: Optional[float] = typer.Option(None, help="Seconds allowed per math-verify comparison; a timeout "
                                                  "counts as wrong. (default: 5)"),
    extract: str = typer.Option("boxed", "--extract", show_default=False, help="Answer extraction: boxed (the last "
                                "\\boxed{}, else an 'Answer: X' line, as the release) or lenient (also 'the answer "
                                "is X' and the last number or math of the final paragraph, as math-verify). (default: boxed)"),
    skip_existing: bool = typer.Option(False, "--skip-existing", show_default=False, help="Keep a checkpoint's existing "
                                       "report when it used the same benchmark, sampling and --extract."),
    per_problem: bool = typer.Option(False, "--per-problem", show_default=False, help="Also print one row per problem."),
    plot: Optional[str] = typer.Option(None, "--plot", help="With --all-checkpoints: the PNG path. "
                                       "(default: RUN/eval/avg_at_n_vs_step.png)"),
    backend: str = typer.Option("hf", help="Generation backend: hf (transformers generate)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", help="Model dtype: auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the hub."),
    as_json: bool = typer.Option(False, "--json", show_default=False, help="Print the report summary as JSON on stdout."),
    report_to: str = typer.Option("none", "--report-to", help="Also log the reports at their checkpoint's step to tensorboard (RUN/tensorboard) or wandb (offline without an API key). (default: none)"),
):
    """Sample n responses per problem, grade them and write a report (Avg@n, pass@k, Best@n, maj@n, Dist-4g, lengths)."""
    from oprd_cli.eval import run_eval
    from oprd_cli.tracking import check_report_to, report_eval

    check_report_to(report_to)  # before the work
    res = run_eval(
        bench=bench, data=data, responses=responses, model=model, run_dir=run_dir, checkpoint=checkpoint,
        all_checkpoints=all_checkpoints, out=out, limit=limit, split=split, prompt_field=prompt_field,
        answer_field=answer_field, id_field=id_field,
        sampling_flags=dict(num_samples=num_samples, temperature=temperature, top_p=top_p, top_k=top_k,
                            max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size),
        template_flags=dict(chat_template=chat_template, system_prompt=system_prompt, instruction=instruction),
        backend=backend, device=device, dtype=dtype, trust_remote_code=trust_remote_code, tokenizer=tokenizer,
        timeout=grade_timeout, extract=extract,
        skip_existing=skip_existing, per_problem=per_problem, plot=plot, json_output=as_json,
    )
    report_eval(report_to, run_dir, res.get("reports") or [])


# ---------------------------------------------------------------------- report
@app.command("report")
@guarded
def report_cmd(
    paths: list[str] = typer.Argument(..., help="Reports written by oprd eval, or folders of them (e.g. RUN/eval)."),
    metric: str = typer.Option("avg_at_n", "--metric", show_default=False, help="avg_at_n, best_at_n, maj_at_n, dist_4g, "
                               "mean_response_tokens, truncated_fraction or pass@K. (default: avg_at_n)"),
    plot: Optional[str] = typer.Option(None, "--plot", help="PNG of the metric against training step, written when "
                                       "reports carry steps. (default: RUN/eval/METRIC_vs_step.png)"),
    no_plot: bool = typer.Option(False, "--no-plot", show_default=False, help="Do not write the plot."),
    as_json: bool = typer.Option(False, "--json", show_default=False, help="Print the table as JSON on stdout."),
):
    """Side-by-side table of eval reports (rows: models or checkpoints, columns: benchmarks) and a plot against step."""
    from oprd_cli.eval.compare import run_report

    run_report(paths, metric=metric, plot=plot, no_plot=no_plot, json_output=as_json)


# ----------------------------------------------------------------------- train
@app.command(cls=DefaultsCommand)
@guarded
def train(
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", "-r", help="Run directory: continue from its latest checkpoint (or the initial student) and train on the newest complete cache not trained on yet; checkpoints go to RUN/checkpoints/step-N, metrics to RUN/metrics.jsonl."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Initial student (hub id or folder); required for the first training of a run (or [models] student in oprd.toml), afterwards the run's latest checkpoint."),
    cache: Optional[str] = typer.Option(None, "--cache", "-c", help="One teacher cache to train on (with --out)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Folder for checkpoints/ and metrics.jsonl with --cache (with --run-dir: the run itself)."),
    rollouts: Optional[str] = typer.Option(None, "--rollouts", help="The cache's rollout store, when it moved from the path the cache records."),
    objective: Optional[str] = typer.Option(None, "--objective", help="oprd | opd-top1 | opd-topk | opd-plus | tropd (default: <train.objective>)."),
    divergence: Optional[str] = O.DIVERGENCE, alpha: Optional[float] = O.ALPHA, advantage: Optional[str] = O.ADVANTAGE,
    log_ratio_clip: Optional[float] = O.LOG_RATIO_CLIP, trust: Optional[str] = O.TRUST, tropd_topk: Optional[int] = O.TROPD_TOPK,
    outlier: Optional[str] = O.OUTLIER, tau: Optional[float] = O.TAU, guidance_beta: Optional[float] = O.GUIDANCE_BETA,
    mu: Optional[float] = typer.Option(None, "--mu", help="Add mu * L_OPRD to an OPD objective, Eq. 7 (default: 0 for OPD, 1 for oprd)."),
    oprd_form: Optional[str] = typer.Option(None, "--oprd-form", help="normalized (both vectors L2-normalised, then MSE over d: the release) | raw (MSE with 1/d) (default: <train.oprd_form>)."),
    reduction: Optional[str] = typer.Option(None, "--reduction", help="token (mean over all supervised tokens of the batch, then layers: the release) | sample (Eq. 6 literally: per-sample means) (default: <train.reduction>)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop at this global optimizer step. Without --follow, when one pass over the cache has fewer steps, further passes over it (each freshly shuffled) fill up to N (default: one pass)."),
    total_steps: Optional[int] = typer.Option(None, "--total-steps", help="Planned length of the warm-up + cosine schedule; pass it to interrupt and resume one schedule (default: --max-steps, else the run's earlier plan)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Exactly N passes over each cache (default: 1, or as many as --max-steps needs when not following)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak AdamW learning rate (default: <train.lr>)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay (default: <train.weight_decay>)."),
    warmup_ratio: Optional[float] = typer.Option(None, "--warmup-ratio", help="Linear warm-up share of the schedule (default: <train.warmup_ratio>)."),
    min_lr_ratio: Optional[float] = typer.Option(None, "--min-lr-ratio", help="The cosine decay ends at this share of --lr (default: <train.min_lr_ratio>)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Samples per optimizer step (default: <train.batch_size> = 8 prompts x 2 samples)."),
    micro_batch_tokens: Optional[int] = typer.Option(None, "--micro-batch-tokens", help="Padded tokens per forward/backward; larger steps accumulate gradients (default: <train.micro_batch_tokens>)."),
    max_grad_norm: Optional[float] = typer.Option(None, "--max-grad-norm", help="Gradient clipping norm (default: <train.max_grad_norm>)."),
    clip_eps: Optional[float] = typer.Option(None, "--clip-eps", help="PPO clip range of the opd-top1 importance ratio (default: <train.clip_eps>)."),
    topk_logits: Optional[str] = typer.Option(None, "--topk-logits", help="opd-topk logits: support (h @ W[S].T only) | full (verl-style full vocabulary) (default: <train.topk_logits>)."),
    logits_chunk_tokens: Optional[int] = typer.Option(None, "--logits-chunk-tokens", help="LM-head rows per checkpointed chunk for OPD log-probs, support logits and entropy; 0 = one chunk (default: <train.logits_chunk_tokens>)."),
    prefetch: Optional[int] = typer.Option(None, "--prefetch", help="Steps of teacher data read ahead by a background thread (default: <train.prefetch>)."),
    entropy: Optional[bool] = typer.Option(None, "--entropy/--no-entropy", help="Log actor/entropy (default: on for OPD objectives; for oprd it costs an LM-head pass)."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute block activations in backward; unset: auto, on for a micro-batch whose activations would exceed 30% of the weights' fp32 bytes and 256 MiB (default: <train.gradient_checkpointing>)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (default: <train.device>)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Autocast dtype: auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 (default: <train.dtype>)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the batch order and RNG (default: <train.seed>)."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Also save a checkpoint every N steps (default: at the end, and after each cache with --follow)."),
    keep_last: Optional[int] = typer.Option(None, "--keep-last", help="Keep only the newest N checkpoints (default: all)."),
    follow: Optional[bool] = typer.Option(None, "--follow/--no-follow", help="Keep waiting for new caches in --run-dir, one pass each (default: <train.follow>)."),
    poll_seconds: Optional[float] = typer.Option(None, "--poll-seconds", help="How often --follow looks for caches (default: <train.poll_seconds>)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Stop following after waiting this many seconds without a new cache (default: never)."),
    max_caches: Optional[int] = typer.Option(None, "--max-caches", help="Stop following after training on N caches (default: never)."),
    max_staleness: Optional[int] = typer.Option(None, "--max-staleness", help="Skip caches whose rollout policy is more than N checkpoints older than the student (default: no limit)."),
    bridge: Optional[str] = typer.Option(None, "--bridge", help="OPRD-Bridge: the representation term through this fitted bridge (Eq. 14-15; P_S frozen), on a cache projected with it or projected on the fly."),
    report_to: Optional[str] = typer.Option(None, "--report-to", help="Also report metrics to tensorboard (RUN/tensorboard) or wandb (offline without an API key); rank 0 only (default: <train.report_to>)."),
    resume: bool = typer.Option(False, "--resume", help="With --cache/--out: continue from the latest checkpoint in --out (weights, optimizer, schedule, RNG, progress). --run-dir always continues."),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code", help="Allow model code from the hub."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object summarising the run."),
):
    """Update the student from cached teacher activations on its own rollouts."""
    from dataclasses import asdict

    from oprd_cli.config import resolve
    from oprd_cli.train import print_result, run_train

    cfg = resolve(run_dir, train=dict(objective=objective, mu=mu, oprd_form=oprd_form,
                reduction=reduction, max_steps=max_steps, total_steps=total_steps, lr=lr, weight_decay=weight_decay,
                warmup_ratio=warmup_ratio, min_lr_ratio=min_lr_ratio, batch_size=batch_size,
                micro_batch_tokens=micro_batch_tokens, logits_chunk_tokens=logits_chunk_tokens, prefetch=prefetch,
                max_grad_norm=max_grad_norm, epochs=epochs, clip_eps=clip_eps, topk_logits=topk_logits,
                entropy=entropy, gradient_checkpointing=gradient_checkpointing, device=device, dtype=dtype, seed=seed,
                save_every=save_every, keep_last=keep_last, follow=follow, poll_seconds=poll_seconds, timeout=timeout,
                max_caches=max_caches, max_staleness=max_staleness, trust_remote_code=trust_remote_code, divergence=divergence,
                alpha=alpha, advantage=advantage, log_ratio_clip=log_ratio_clip, trust=trust, tropd_topk=tropd_topk,
                outlier=outlier, tau=tau, guidance_beta=guidance_beta, bridge=bridge,
                report_to=report_to))["train"]
    result = run_train(model=model, cache=cache, run_dir=str(run_dir) if run_dir else None, out=out, rollouts=rollouts,
                       config=cfg, resume=resume)
    show({**asdict(result), "steps": result.steps} if as_json else result, as_json, print_result)


@bench_app.command("loss", cls=DefaultsCommand)
@guarded
def bench_loss(
    num_layers: Optional[int] = typer.Option(None, "--num-layers", help="Decoder blocks of the benchmark model (the Qwen2.5-1.5B shape has 28). (default: <bench_loss.num_layers>)"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Response tokens per sample (T). (default: <bench_loss.seq_len>)"),
    last_k: Optional[int] = typer.Option(None, "--last-k", help="OPRD supervises the last k response positions. (default: <bench_loss.last_k>)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Samples per step (B). (default: <bench_loss.batch_size>)"),
    prompt_len: Optional[int] = typer.Option(None, "--prompt-len", help="Prompt tokens per sample. (default: <bench_loss.prompt_len>)"),
    topk: Optional[int] = typer.Option(None, "--topk", help="k of the top-k OPD baselines. (default: <bench_loss.topk>)"),
    hidden_size: Optional[int] = typer.Option(None, "--hidden-size", help="d. (default: <bench_loss.hidden_size>)"),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="|V|. (default: <bench_loss.vocab_size>)"),
    num_heads: Optional[int] = typer.Option(None, "--num-heads", help="Attention heads. (default: <bench_loss.num_heads>)"),
    num_kv_heads: Optional[int] = typer.Option(None, "--num-kv-heads", help="Key/value heads. (default: <bench_loss.num_kv_heads>)"),
    intermediate_size: Optional[int] = typer.Option(None, "--intermediate-size", help="MLP width. (default: <bench_loss.intermediate_size>)"),
    tie_word_embeddings: Optional[bool] = typer.Option(None, "--tie-word-embeddings/--untied", help="Tie the LM head to the embeddings (R1-Distill-Qwen-1.5B: untied). (default: <bench_loss.tie_word_embeddings>)"),
    objectives: Optional[str] = typer.Option(None, "--objectives", help="Comma-separated subset to run. (default: <bench_loss.objectives>)"),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="Timed steps per objective (after one warm-up step); the median is reported. (default: <bench_loss.repeats>)"),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N. (default: <bench_loss.device>)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Autocast dtype: auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16. (default: <bench_loss.dtype>)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's choice; on a busy CPU 1 gives steadier times)."),
    isolate: Optional[bool] = typer.Option(None, "--isolate/--no-isolate", help="Run each objective in a fresh process (honest CPU memory figures); --no-isolate runs all in this one (faster start). (default: <bench_loss.isolate>)"),
    grad_checkpointing: Optional[bool] = typer.Option(None, "--grad-checkpointing/--no-grad-checkpointing", help="Recompute each block's activations in backward (oprd train --gradient-checkpointing); unset: auto, the trainer's rule. (default: <bench_loss.grad_checkpointing>)"),
    attn: Optional[str] = typer.Option(None, "--attn", help="Attention: auto (the rule every command uses) | eager | sdpa. (default: <bench_loss.attn>)"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
):
    """Actor-update step time and delta-peak memory: OPD top-1, OPD top-16 and OPRD side by side (paper Table 3).

    The real training step (forward, backward, clipping, AdamW) on a Qwen2 model of the given shape with
    random weights. On a CPU reduce the depth and sequence length (docs/training.md has the figures).
    """
    from oprd_cli.bench.loss import BenchLossConfig, print_bench, run_bench_loss
    from oprd_cli.config import merge

    cfg = merge(BenchLossConfig, None, num_layers=num_layers, seq_len=seq_len, last_k=last_k, batch_size=batch_size,
                prompt_len=prompt_len, topk=topk, hidden_size=hidden_size, vocab_size=vocab_size, num_heads=num_heads,
                num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                tie_word_embeddings=tie_word_embeddings, objectives=objectives, repeats=repeats, device=device,
                dtype=dtype, threads=threads, isolate=isolate, grad_checkpointing=grad_checkpointing, attn=attn)
    report = run_bench_loss(cfg)
    show(report, as_json, print_bench)


# ------------------------------------------------------------------------ loop
@app.command("loop", cls=DefaultsCommand)
@guarded
def loop_cmd(
    run_dir: Path = typer.Option(..., "--run-dir", "-r", help="Run directory (created if needed); an interrupted loop resumes from what is in it."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Initial student: hub id or save_pretrained folder. (default: models.student in RUN/oprd.toml)"),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher: hub id or save_pretrained folder. (default: models.teacher in RUN/oprd.toml)"),
    prompts: Optional[str] = typer.Option(None, "--prompts", "-p", help="Prompt set: hub dataset id or local .jsonl/.json/.parquet (plain or verl layout)."),
    rounds: int = typer.Option(..., "--rounds", help="Rounds of rollout -> teacher-cache -> train to reach (counting rounds already done)."),
    prompts_per_round: Optional[int] = typer.Option(None, "--prompts-per-round", help="Each round samples the next N prompts of the set (wrapping around). (default: every prompt, every round)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N prompts of the set."),
    split: Optional[str] = typer.Option(None, help="Dataset split for hub datasets. (default: <data.split>)"),
    prompt_field: Optional[str] = _PROMPT_FIELD,
    answer_field: Optional[str] = _ANSWER_FIELD,
    num_samples: Optional[int] = typer.Option(None, "--num-samples", "-n", help="Rollout samples per prompt. (default: <rollout.num_samples>)"),
    temperature: Optional[float] = typer.Option(None, help="Rollout sampling temperature. (default: <rollout.temperature>)"),
    max_new_tokens: Optional[int] = typer.Option(None, help="Rollout response length limit in tokens. (default: <rollout.max_new_tokens>)"),
    seed: Optional[int] = typer.Option(None, help="Seed; round r samples with seed + r - 1 and trains with seed. (default: <rollout.seed>)"),
    gen_batch_size: Optional[int] = typer.Option(None, "--gen-batch-size", help="Sequences generated together. (default: <rollout.batch_size>)"),
    chat_template: Optional[bool] = _CHAT_TEMPLATE,
    system_prompt: Optional[str] = _SYSTEM_PROMPT,
    instruction: Optional[str] = _INSTRUCTION,
    layers: Optional[str] = typer.Option(None, "--layers", help="Teacher layers to cache: last (HF L) | all (1..L) | even (even 0-based blocks: HF 1,3,5,...) | odd (HF 2,4,6,...) | list. (default: all when OPRD is in the loss, else last)"),
    positions: Optional[str] = typer.Option(None, "--positions", help="all | last | first_k | last_k. (default: <teacher_cache.positions>)"),
    k: Optional[int] = typer.Option(None, "--k", help="Positions per sample for first_k/last_k. (default: <teacher_cache.k>)"),
    logprobs: Optional[str] = typer.Option(None, "--logprobs", help="Teacher log-probs to cache: none | sampled | topk. (default: what --objective needs)"),
    topk: Optional[int] = typer.Option(None, "--topk", help="K of top-k OPD (rollouts record the student's top-K ids). (default: <teacher_cache.topk>)"),
    max_batch_tokens: Optional[int] = typer.Option(None, "--max-batch-tokens", help="Padded tokens per teacher forward. (default: <teacher_cache.max_batch_tokens>)"),
    objective: Optional[str] = typer.Option(None, "--objective", help="oprd | opd-top1 | opd-topk | opd-plus | tropd (their options from [train] in oprd.toml). (default: <train.objective>)"),
    prefix_schedule: str = O.PREFIX_SCHEDULE, prefix_max_tokens: Optional[int] = O.PREFIX_MAX_TOKENS, prefix_mode: Optional[str] = O.PREFIX_MODE,
    mu: Optional[float] = typer.Option(None, "--mu", help="Add mu * L_OPRD to an OPD objective (Eq. 7). (default: 0 for OPD, 1 for oprd)"),
    bridge: Optional[str] = typer.Option(None, "--bridge", help="OPRD-Bridge: caches store z_T of this fitted bridge and training goes through it. (default: none, OPRD-Vanilla)"),
    oprd_form: Optional[str] = typer.Option(None, "--oprd-form", help="normalized (L2-normalised vectors: the release) | raw (MSE with 1/d). (default: <train.oprd_form>)"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak AdamW learning rate. (default: <train.lr>)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Samples per optimizer step. (default: <train.batch_size>)"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over each round's cache. (default: 1)"),
    total_steps: Optional[int] = typer.Option(None, "--total-steps", help="Length of the warm-up + cosine schedule. (default: rounds x steps per round)"),
    warmup_ratio: Optional[float] = typer.Option(None, "--warmup-ratio", help="Linear warm-up share of the schedule. (default: <train.warmup_ratio>)"),
    micro_batch_tokens: Optional[int] = typer.Option(None, "--micro-batch-tokens", help="Padded tokens per forward/backward. (default: <train.micro_batch_tokens>)"),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Evaluate on these problems (.jsonl/.json/.parquet or hub id) every --eval-every rounds."),
    eval_bench: Optional[str] = typer.Option(None, "--eval-bench", help="Evaluate on a registered benchmark (aime24, ...); with --eval-data only its name."),
    eval_every: int = typer.Option(1, "--eval-every", help="Evaluate every M rounds (and after the last). (default: 1)"),
    eval_num_samples: Optional[int] = typer.Option(None, "--eval-num-samples", help="Eval samples per problem (Avg@n). (default: 16)"),
    eval_temperature: Optional[float] = typer.Option(None, "--eval-temperature", help="Eval temperature. (default: 0.7)"),
    eval_max_new_tokens: Optional[int] = typer.Option(None, "--eval-max-new-tokens", help="Eval length limit. (default: 16384, capped by the context)"),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit", help="Evaluate only the first N problems."),
    no_eval_start: bool = typer.Option(False, "--no-eval-start", help="Do not evaluate the starting student (step 0)."),
    report_to: Optional[str] = typer.Option(None, "--report-to", help="Also report training metrics to tensorboard (RUN/tensorboard) or wandb (offline without an API key). (default: <train.report_to>)"),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N (every stage)."),
    dtype: str = typer.Option("auto", help="Model dtype for sampling and the teacher: auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the hub."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object summarising the loop."),
):
    """Rounds of rollout -> teacher-cache -> train (-> eval) in one process; resumes where it stopped."""
    from dataclasses import asdict

    from oprd_cli.config import resolve
    from oprd_cli.loop import eval_settings, print_result, run_loop

    c = resolve(run_dir, data=dict(prompts=prompts, split=split, prompt_field=prompt_field, answer_field=answer_field,
                                   limit=limit),
                rollout=dict(num_samples=num_samples, temperature=temperature, max_new_tokens=max_new_tokens,
                             seed=seed, batch_size=gen_batch_size),
                template=dict(chat_template=chat_template, system_prompt=system_prompt, instruction=instruction),
                train=dict(objective=objective, mu=mu, oprd_form=oprd_form, lr=lr, batch_size=batch_size,
                           epochs=epochs, total_steps=total_steps, warmup_ratio=warmup_ratio,
                           micro_batch_tokens=micro_batch_tokens, seed=seed, bridge=bridge, report_to=report_to))
    cache = dict(layers=layers, positions=positions, k=k, logprobs=logprobs, topk=topk,
                 max_batch_tokens=max_batch_tokens)  # over [teacher_cache] in oprd.toml (loop.cache_config)
    evaluation = eval_settings(run_dir, bench=eval_bench, data=eval_data, limit=eval_limit, every=eval_every,
                               start=not no_eval_start, num_samples=eval_num_samples, temperature=eval_temperature,
                               max_new_tokens=eval_max_new_tokens, seed=seed)
    result = run_loop(run_dir=run_dir, model=model, teacher=teacher, data=c["data"], sampling=c["rollout"],
                      template=c["template"], train=c["train"], rounds=rounds, cache_settings=cache,
                      prompts_per_round=prompts_per_round, evaluation=evaluation, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                      show_progress=not as_json, guidance=dict(schedule=prefix_schedule, max_tokens=prefix_max_tokens, mode=prefix_mode))
    show(asdict(result) if as_json else result, as_json, print_result)


# ------------------------------------------------------------------------ demo
@app.command("demo")
@guarded
def demo_cmd(
    quick: bool = typer.Option(False, "--quick", help="The small configuration: every stage and row, a short budget (CI runs it)."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the JSON summary here (the PNG plot goes beside it as .png)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated seeds; each builds its own task sample, teacher and student start. (default: 0,1,2; --quick: 0,1)"),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated methods to run (default: all): opd-top1, opd-top16, opd-plus-jsd, tropd, oprd, opd-top16+oprd, tropd+oprd, oprd-bridge."),
    out: Optional[Path] = typer.Option(None, "--out", help="Work folder: cached assets and the runs. (default: $OPRD_DEMO_DIR, else ~/.cache/oprd/demo)"),
    plot: Optional[str] = typer.Option(None, "--plot", help="PNG of held-out accuracy against training step, mean and band over seeds. (default: beside --json, else in the work folder)"),
    workers: Optional[int] = typer.Option(None, "--workers", help="Runs side by side in worker processes. (default: the number of cores, at most 8)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads per worker. (default: 1)"),
    resume: bool = typer.Option(False, "--resume", help="Continue the runs an interrupted demo left instead of starting them again."),
):
    """The embedded demo: a teacher, a weaker student and every method distilled on a synthetic task, over several seeds (CPU, no network)."""
    from oprd_cli.demo.methods import select_methods
    from oprd_cli.demo.run import print_summary, run_demo

    summary = run_demo(out_dir=out, quick=quick, seeds=_int_list(seeds, "--seeds"), threads=threads, workers=workers,
                       json_path=json_path, plot_path=plot, resume=resume, methods=select_methods(methods))
    print_summary(summary)


def _int_list(text: Optional[str], flag: str) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise OprdError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not vals:
        raise OprdError(f"{flag} is empty")
    return vals


from oprd_cli.cli_bridge import bridge_app  # noqa: E402 (mounted after the main commands)

app.add_typer(bridge_app, name="bridge")
from oprd_cli import cli_bench  # noqa: E402,F401  (registers oprd bench rollout/train/sweep/all)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
