"""``oprd eval``: evaluate one model (:func:`evaluate_target`, :func:`evaluate_model`) or every model
``--run-dir`` names, or grade a responses file (:func:`run_eval`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from oprd_cli.console import console as default_console
from oprd_cli.console import warn
from oprd_cli.data import BENCHMARKS, get_benchmark
from oprd_cli.errors import OprdError
from oprd_cli.eval.extract import DEFAULT_EXTRACT, check_extract_mode
from oprd_cli.eval.grade import DEFAULT_TIMEOUT_S, Grader
from oprd_cli.eval.metrics import evaluate_responses
from oprd_cli.eval.report import default_report_path, headline, print_report, summary, write_report
from oprd_cli.eval.responses import load_responses_file, responses_label, sample_responses
from oprd_cli.eval.targets import (
    TOKENIZER_FILES,
    EvalData,
    EvalTarget,
    eval_sampling,
    existing_report,
    load_eval_data,
    resolve_targets,
    validate_num_samples,
)


def _free() -> None:
    """Return a dropped model's memory (call after the last reference is gone)."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001, S110
        pass


def evaluate_target(target: EvalTarget, data: EvalData, sampling, template, *, grader: Grader,
                    backend: str = "hf", device: str = "auto", dtype: str = "auto",
                    trust_remote_code: bool = False, tokenizer: str | None = None,
                    show_progress: bool = True, extract: str = DEFAULT_EXTRACT) -> dict[str, Any]:
    """Load one model, sample with the rollout generation code, grade, and return the report.
    ``tokenizer`` overrides where the tokenizer comes from (default: the model's folder, or the run's
    student for checkpoints saved without one); ``extract`` is the answer extraction mode."""
    from oprd_cli import models as M
    from oprd_cli.rollout import make_backend

    dev = M.resolve_device(device)
    dt = M.resolve_dtype(dtype, dev)
    tok_name = tokenizer or target.tokenizer
    if tokenizer is None and tok_name != target.model:
        warn(f"{target.model} has no tokenizer files; using the run's student tokenizer {tok_name}")
    tok = M.load_tokenizer(tok_name, trust_remote_code)
    lm = M.load_model(target.model, dev, dt, trust_remote_code)
    try:
        gen = make_backend(backend, lm, tok)
        what = f"step {target.step}" if target.step is not None else Path(target.model).name
        responses, result = sample_responses(gen, tok, data.records, sampling, template,
                                             description=f"eval {data.bench} {what}")
        dtype_name = str(next(lm.parameters()).dtype).replace("torch.", "")
    finally:
        gen = lm = None
        _free()
    info = {k: getattr(sampling, k) for k in ("num_samples", "temperature", "top_p", "top_k", "max_new_tokens",
                                              "seed", "batch_size")}
    info.update({"backend": backend, "device": str(dev), "dtype": dtype_name, "tokenizer": tok_name,
                 "template": {k: getattr(template, k) for k in ("chat_template", "system_prompt", "instruction")}})
    report = evaluate_responses(
        data.records, responses, data.bench, target.model, integer_answers=data.integer_answers,
        max_new_tokens=sampling.max_new_tokens, tokenizer=tok, run_dir=target.run_dir, step=target.step,
        data_source=data.source, sampling=info, grader=grader, show_progress=show_progress, extract=extract,
    )
    report["generation"] = {
        "seconds": round(result.seconds, 3), "tokens": result.num_tokens,
        "tokens_per_s": round(result.num_tokens / max(result.seconds, 1e-9), 1),
        "skipped_problems": [r.id for r in result.skipped],
    }
    return report


def evaluate_model(
    model: str,
    *,
    data: str | None = None,
    bench: str | None = None,
    limit: int | None = None,
    out: str | Path | None = None,
    run_dir: str | Path | None = None,
    step: int | None = None,
    num_samples: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    max_new_tokens: int | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    template=None,
    device: str = "auto",
    dtype: str = "auto",
    timeout: float = DEFAULT_TIMEOUT_S,
    show_progress: bool = True,
    extract: str = DEFAULT_EXTRACT,
) -> dict[str, Any]:
    """Evaluate one model from Python and return the full report dict (``per_problem`` and the per-sample
    rows under ``"samples"`` included); nothing is printed except progress.

    ``data``: a local jsonl/json/parquet file (plain or verl) or a hub id; ``bench``: a registry name
    (alone: loaded from the hub; with ``data``: names the file's benchmark and its answer type). Sampling
    arguments left None take the eval defaults (n=16, T=0.7, top-p 0.95, 16,384 new tokens, seed 0);
    ``template`` is a :class:`oprd_cli.config.TemplateConfig` (default: chat template + the boxed
    instruction); ``extract`` is ``"boxed"`` (default) or ``"lenient"`` (:func:`extract_answer`). ``run_dir``/``step`` label the report as a run's checkpoint. With ``out`` the report
    and ``<stem>.responses.jsonl`` are written there, as ``oprd eval --out`` does (``report_path`` is set).
    """
    from oprd_cli.config import TemplateConfig

    check_extract_mode(extract)
    if num_samples is not None:
        validate_num_samples(num_samples)
    ed = load_eval_data(bench, data, limit)
    sampling = eval_sampling(None, num_samples=num_samples, temperature=temperature, top_p=top_p,
                             max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
    target = EvalTarget(str(model), str(run_dir) if run_dir is not None else None,
                        int(step) if step is not None else None)
    with Grader(timeout=timeout, integer_answers=ed.integer_answers) as grader:
        report = evaluate_target(target, ed, sampling, template or TemplateConfig(), grader=grader, device=device,
                                 dtype=dtype, show_progress=show_progress, extract=extract)
    if out is not None:
        path, _ = write_report(report, out)
        report["report_path"] = str(path)
    return report


def _report_path(out: str | None, target: EvalTarget | None, bench: str, model: str, many: bool) -> Path:
    run_dir = target.run_dir if target else None
    step = target.step if target else None
    if out is None:
        return default_report_path(bench, model, run_dir, step)
    o = Path(os.path.expanduser(str(out)))
    if many or o.is_dir() or str(out).endswith(("/", os.sep)):
        return default_report_path(bench, model, run_dir, step, out_dir=o)
    return o


def _counting_tokenizer(name: str | None, target: EvalTarget | None, trust_remote_code: bool):
    """For --responses lines without num_tokens: --tokenizer, else the tokenizer in a local --model /
    checkpoint folder (never a hub download), else None (lengths in whitespace words)."""
    from oprd_cli import models as M

    if name is None and target is not None:
        local = Path(os.path.expanduser(target.tokenizer))
        if local.is_dir() and any((local / f).exists() for f in TOKENIZER_FILES):
            name = str(local)
    return M.load_tokenizer(name, trust_remote_code) if name else None


def _check_common(bench: str | None, data: str | None, timeout: float | None, extract: str) -> float:
    """Flag checks that need nothing loaded; returns the grading time limit."""
    timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout
    if timeout <= 0:
        raise OprdError(f"--grade-timeout must be > 0 seconds, got {timeout}")
    check_extract_mode(extract)
    if data is None and bench is None:
        raise OprdError(f"pass --bench NAME ({', '.join(BENCHMARKS)}) or --data FILE")
    if data is None:
        get_benchmark(bench)  # an unknown name fails before anything is loaded
    return timeout


def _responses_target(model: str | None, run_dir: str | None, checkpoint: str | None, all_checkpoints: bool,
                      sampling_flags: Mapping[str, Any], template_flags: Mapping[str, Any]) -> EvalTarget | None:
    """The model that wrote a ``--responses`` file (None: unnamed); sampling flags only warn."""
    if all_checkpoints:
        raise OprdError("--responses grades one set of responses; it cannot be combined with --all-checkpoints")
    if run_dir is not None and checkpoint is None and model is None:
        raise OprdError("with --responses and --run-dir, name the checkpoint that wrote them: --checkpoint step-N")
    if sampling_flags.get("num_samples") is not None:
        validate_num_samples(sampling_flags["num_samples"])
    ignored = sorted(k for k, v in {**sampling_flags, **template_flags}.items() if v is not None)
    if ignored:
        warn(f"--responses: no sampling happens, so {', '.join('--' + k.replace('_', '-') for k in ignored)} "
             "are ignored")
    targets = resolve_targets(model, run_dir, checkpoint, False, need_model=False)
    return targets[0] if targets else None


def _sampling_targets(model: str | None, run_dir: str | None, checkpoint: str | None, all_checkpoints: bool,
                      sampling_flags: Mapping[str, Any], template_flags: Mapping[str, Any]):
    """(targets, sampling config, template config) for sampling: flags > the run's oprd.toml > defaults."""
    from oprd_cli.config import TemplateConfig, load_run_config, merge

    targets = resolve_targets(model, run_dir, checkpoint, all_checkpoints)
    cfg = load_run_config(targets[0].run_dir if run_dir is not None else None)
    return targets, eval_sampling(cfg, **sampling_flags), merge(TemplateConfig, cfg.get("template"), **template_flags)


def _grade_responses_file(responses: str, target: EvalTarget | None, ed: EvalData, grader: Grader, out: str | None,
                          *, tokenizer: str | None, trust_remote_code: bool, max_new_tokens: int | None,
                          show: bool, extract: str) -> tuple[dict[str, Any], Path, Path | None]:
    """``--responses``: grade a file generated elsewhere and write its report."""
    samples = load_responses_file(responses, ed.records)
    name = target.model if target else responses_label(responses)
    tok = _counting_tokenizer(tokenizer, target, trust_remote_code) \
        if any(s.get("num_tokens") is None and s.get("token_ids") is None for s in samples) else None
    report = evaluate_responses(
        ed.records, samples, ed.bench, name, integer_answers=ed.integer_answers,
        max_new_tokens=max_new_tokens, tokenizer=tok,
        run_dir=target.run_dir if target else None, step=target.step if target else None,
        data_source=ed.source, sampling=None, grader=grader, show_progress=show, extract=extract,
    )
    report["graded_from"] = str(responses)
    path, rpath = write_report(report, _report_path(out, target, ed.bench, name, False))
    return report, path, rpath


def _evaluate_targets(targets: list[EvalTarget], ed: EvalData, sampling, template, grader: Grader, out: str | None,
                      *, skip_existing: bool, show: bool, extract: str, load: Mapping[str, Any]
                      ) -> list[tuple[dict[str, Any], Path, Path | None]]:
    """Sample, grade and write one report per target (``--skip-existing`` keeps matching reports);
    ``load``: the model-loading keywords of :func:`evaluate_target`."""
    from oprd_cli.console import err_console

    many = len(targets) > 1
    results = []
    for i, target in enumerate(targets):
        path = _report_path(out, target, ed.bench, target.model, many)
        old = existing_report(path, target, ed, sampling, extract) if skip_existing else None
        if old is not None:
            err_console.print(f"[{i + 1}/{len(targets)}] {target.label}: kept {path} (--skip-existing)", markup=False)
            results.append((old, path, None))
            continue
        if many:
            err_console.print(f"[{i + 1}/{len(targets)}] {target.label}: {target.model}", markup=False)
        report = evaluate_target(target, ed, sampling, template, grader=grader, show_progress=show, extract=extract,
                                 **load)
        path, rpath = write_report(report, path)
        if many:
            err_console.print(f"  {headline(report)}  -> {path}", markup=False)
        results.append((report, path, rpath))
    return results


def _summaries(results: list[tuple[dict[str, Any], Path, Path | None]]) -> list[dict[str, Any]]:
    out = []
    for report, path, rpath in results:
        s = summary(report)
        s["report_path"] = str(path)
        s["responses_path"] = str(rpath) if rpath else None
        out.append(s)
    return out


def _print_one(report: Mapping[str, Any], path: Path, rpath: Path | None, summary_json: Mapping[str, Any],
               *, json_output: bool, per_problem: bool, con) -> None:
    """One model's result: the summary JSON on stdout, or the table, the generation speed and the paths."""
    from oprd_cli.console import err_console

    if json_output:
        con.out(json.dumps(summary_json, indent=2, ensure_ascii=False, default=str), highlight=False)
        return
    print_report(report, console=con, per_problem=per_problem)
    g = report.get("generation")
    if g:
        err_console.print(f"generated {g['tokens']:,} tokens in {g['seconds']:.1f}s "
                          f"({g['tokens_per_s']:,.0f} tok/s)", markup=False)
    err_console.print(f"wrote {path}" + (f" and {rpath}" if rpath else ""), markup=False)


def _compare_many(outcome: dict[str, Any], paths: list[Path], *, plot: str | None, json_output: bool, con) -> None:
    """Several models: tabulate and plot their reports as ``oprd report`` does."""
    from io import StringIO

    from rich.console import Console

    from oprd_cli.eval.compare import run_report

    quiet = Console(file=StringIO()) if json_output else con
    res = run_report(paths, plot=plot, console=quiet)
    outcome["table"], outcome["plot"] = res["table"], res["plot"]
    if json_output:
        con.out(json.dumps(outcome, indent=2, ensure_ascii=False, default=str), highlight=False)


def run_eval(
    *,
    bench: str | None = None,
    data: str | None = None,
    responses: str | None = None,
    model: str | None = None,
    run_dir: str | None = None,
    checkpoint: str | None = None,
    all_checkpoints: bool = False,
    out: str | None = None,
    limit: int | None = None,
    split: str | None = None,
    prompt_field: str | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
    sampling_flags: Mapping[str, Any] | None = None,
    template_flags: Mapping[str, Any] | None = None,
    backend: str = "hf",
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    tokenizer: str | None = None,
    timeout: float | None = None,
    extract: str = DEFAULT_EXTRACT,
    skip_existing: bool = False,
    per_problem: bool = False,
    plot: str | None = None,
    json_output: bool = False,
    console=None,
) -> dict[str, Any]:
    """``oprd eval``: resolve the models, load the problems, sample (or read ``responses``), grade, write
    one report per model and print it (``json_output``: the summary JSON on stdout). With several models
    (``--all-checkpoints``) the reports are tabulated and plotted against step as ``oprd report`` does.
    Returns ``{"reports": [summary + report_path, ...], "table": ..., "plot": ...}``.
    """
    con = console or default_console
    sampling_flags = dict(sampling_flags or {})
    template_flags = dict(template_flags or {})
    timeout = _check_common(bench, data, timeout, extract)
    if responses is not None:
        target = _responses_target(model, run_dir, checkpoint, all_checkpoints, sampling_flags, template_flags)
        targets = [target] if target else []
    else:
        targets, sampling, template = _sampling_targets(model, run_dir, checkpoint, all_checkpoints,
                                                        sampling_flags, template_flags)
    many = len(targets) > 1
    if out is not None and many and Path(os.path.expanduser(str(out))).suffix.lower() == ".json":
        raise OprdError(f"--all-checkpoints writes one report per checkpoint; --out must be a folder, got {out}")

    ed = load_eval_data(bench, data, limit, prompt_field, answer_field, id_field, split)
    show = not json_output
    with Grader(timeout=timeout, integer_answers=ed.integer_answers) as grader:
        if responses is not None:
            results = [_grade_responses_file(
                responses, target, ed, grader, out, tokenizer=tokenizer, trust_remote_code=trust_remote_code,
                max_new_tokens=sampling_flags.get("max_new_tokens"), show=show, extract=extract)]
        else:
            load = {"backend": backend, "device": device, "dtype": dtype, "trust_remote_code": trust_remote_code,
                    "tokenizer": tokenizer}
            results = _evaluate_targets(targets, ed, sampling, template, grader, out, skip_existing=skip_existing,
                                        show=show, extract=extract, load=load)

    summaries = _summaries(results)
    outcome: dict[str, Any] = {"reports": summaries, "table": None, "plot": None}
    if many:
        _compare_many(outcome, [p for _, p, _ in results], plot=plot, json_output=json_output, con=con)
    else:
        _print_one(*results[0], summaries[0], json_output=json_output, per_problem=per_problem, con=con)
    return outcome
