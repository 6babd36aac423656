"""``oprd loop``: rounds of rollout -> teacher-cache -> train (-> eval) in one process.

Each stage is the function the separate command runs (:func:`oprd_cli.rollout.run_rollout`,
:func:`oprd_cli.teacher.cache_rollouts`, :func:`oprd_cli.train.run_train` in run-directory mode,
:func:`oprd_cli.eval.evaluate_target`), so the run directory a loop leaves is the one the
separate commands would have left, and the two ways can be mixed.

What to do next is decided from the run directory alone, so an interrupted loop (Ctrl-C, a crash, a
killed process) resumes at the stage where it stopped::

    round r trained on (the latest checkpoint's marker lists cache r)   -> nothing to do
    complete cache r                                                     -> train
    complete rollout r                                                   -> teacher-cache (resumes its units)
    otherwise                                                            -> rollout (an incomplete store is replaced)

Round ``r`` samples with the newest complete checkpoint (the initial student before the first one),
with seed ``sampling.seed + r - 1``; with ``prompts_per_round`` it uses the next slice of the prompt
set (written to ``RUN/prompts/rNNNNNN.jsonl`` so that the round can be repeated exactly).
``RUN/loop.jsonl`` gets one line per finished stage (round, stage, seconds).
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from oprd_cli.config import DataConfig, SamplingConfig, TemplateConfig, write_initial_config
from oprd_cli.console import err_console
from oprd_cli.errors import OprdError
from oprd_cli.stores import common
from oprd_cli.stores.rundir import RunDir, round_name

STAGES = ("rollout", "cache", "train", "eval")
# Test hook: "ROUND:STAGE" (or "ROUND:STAGE:kill") interrupts the loop right after that stage
# finished: KeyboardInterrupt as Ctrl-C would, or SIGKILL of the process with ":kill".
STOP_ENV = "OPRD_LOOP_STOP_AFTER"
LOG_NAME = "loop.jsonl"


# ------------------------------------------------------------------------------ settings
def cache_defaults(objective: str, mu: float | None, topk: int = 16) -> dict[str, Any]:
    """Teacher-cache settings an objective needs (flags override them).

    OPRD needs hidden states of every layer; OPD top-1 the teacher's log-prob of each sampled token;
    OPD top-k the teacher's log-probs on the student's top-k (the rollout records the top-k ids).
    OPD alone stores only the last layer (the store always holds some hidden states).
    """
    uses_oprd = objective == "oprd" or (mu is not None and mu > 0)
    logprobs = {"oprd": "none", "opd-top1": "sampled", "opd-topk": "topk"}.get(objective, "none")
    return {"layers": "all" if uses_oprd else "last", "logprobs": logprobs, "topk": topk}


@dataclass
class EvalSettings:
    """Evaluation inside the loop: the problems, how to sample, and how often (in rounds)."""

    data: Any  # evaluate.EvalData
    sampling: SamplingConfig
    every: int = 1
    start: bool = True  # also evaluate the starting student (step 0)
    timeout: float | None = None


@dataclass
class LoopResult:
    run_dir: str
    rounds: int
    stages_run: list[dict[str, Any]] = field(default_factory=list)  # {"round", "stage", "seconds"}
    checkpoint: str | None = None
    step: int = 0
    evals: list[dict[str, Any]] = field(default_factory=list)  # {"step", "path", "avg_at_n", ...}
    seconds: float = 0.0


# ------------------------------------------------------------------------------ helpers
def _trained_rounds(run: RunDir) -> set[int]:
    latest = run.latest_checkpoint()
    if latest is None:
        return set()
    marker = latest.state
    out = set()
    for c in list(marker.get("consumed_caches") or []) + list(marker.get("skipped_caches") or []):
        if c.get("round") is not None:
            out.add(int(c["round"]))
    return out


def checkpoint_after_round(run: RunDir, index: int):
    """The first complete checkpoint whose marker lists round ``index`` as trained on (None if none)."""
    for ck in run.checkpoints():
        rounds = {c.get("round") for c in (ck.state.get("consumed_caches") or [])}
        if index in rounds:
            return ck
    return None


def _metrics_since(run: RunDir, step: int) -> list[dict[str, Any]]:
    path = run.metrics_path
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(m.get("step", 0)) > step:
            out.append(m)
    return out


def _maybe_stop(round_index: int, stage: str) -> None:
    spec = os.environ.get(STOP_ENV)
    if not spec:
        return
    parts = spec.split(":")
    if len(parts) >= 2 and parts[0] == str(round_index) and parts[1] == stage:
        if len(parts) > 2 and parts[2] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise KeyboardInterrupt


def _log(run: RunDir, entry: dict[str, Any]) -> None:
    with open(run.root / LOG_NAME, "a") as f:
        f.write(json.dumps(entry) + "\n")


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The stage log of a run directory (``RUN/loop.jsonl``), one dict per finished stage."""
    path = Path(run_dir) / LOG_NAME
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line of a killed process
            continue
    return out


def _round_prompts(run: RunDir, data: DataConfig, records, index: int, per_round: int) -> DataConfig:
    """Write round ``index``'s slice of the prompt set (kept when it exists) and point a DataConfig at it."""
    path = run.root / "prompts" / round_name(index).replace(".zarr", ".jsonl")
    if not path.exists():
        n = len(records)
        start = ((index - 1) * per_round) % n
        rows = [records[(start + i) % n] for i in range(min(per_round, n))]
        lines = []
        for r in rows:
            row: dict[str, Any] = {"id": r.id, "source_index": r.index}
            if r.messages is not None:
                row["prompt"] = [dict(m) for m in r.messages]
            else:
                row["problem"] = r.problem
            row["answer"] = r.answer
            lines.append(json.dumps(row, ensure_ascii=False))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)
    return DataConfig(prompts=str(path), split="train")


def steps_per_round(samples: int, batch_size: int, epochs: int) -> int:
    return epochs * math.ceil(samples / batch_size)


# ------------------------------------------------------------------------------ evaluation
def evaluate_step(run: RunDir, model: str, step: int, settings: EvalSettings, template: TemplateConfig, *,
                  device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
                  show_progress: bool = True, grader=None) -> dict[str, Any]:
    """Evaluate ``model`` (the run's checkpoint at ``step``, 0 = the initial student) with the eval code,
    writing ``RUN/eval/<bench>-step-NNNNNN.json``; an existing report with the same protocol is kept."""
    from oprd_cli import eval as E

    data, sampling = settings.data, settings.sampling
    target = E.EvalTarget(str(model), str(run.root), int(step))
    path = E.default_report_path(data.bench, str(model), str(run.root), int(step))
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if isinstance(old, dict) and E.same_protocol(old, target, data, sampling):
            return {**E.summary(old), "report_path": str(path), "kept": True}
    own = grader is None
    grader = grader or E.Grader(timeout=settings.timeout or E.DEFAULT_TIMEOUT_S, integer_answers=data.integer_answers)
    try:
        report = E.evaluate_target(target, data, sampling, template, grader=grader, device=device, dtype=dtype,
                                   trust_remote_code=trust_remote_code, show_progress=show_progress)
    finally:
        if own:
            grader.close()
    E.write_report(report, path)
    return {**E.summary(report), "report_path": str(path), "kept": False}


# ------------------------------------------------------------------------------ the loop
def run_loop(
    *,
    run_dir: str | Path,
    model: str | None,
    teacher: str | None,
    data: DataConfig,
    sampling: SamplingConfig,
    template: TemplateConfig,
    train: Any,  # TrainConfig
    rounds: int,
    cache_settings: dict[str, Any] | None = None,
    prompts_per_round: int | None = None,
    evaluation: EvalSettings | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    show_progress: bool = True,
    on_stage: Callable[[int, str, dict[str, Any]], None] | None = None,
) -> LoopResult:
    """Run ``rounds`` rounds in ``run_dir`` (resuming whatever an earlier invocation left).

    ``cache_settings`` are :class:`oprd_cli.teacher.TeacherCacheConfig` fields; what the objective needs
    (:func:`cache_defaults`) fills the ones not given, and ``sampling.record_topk`` is raised to the
    top-k OPD support when needed. ``train.total_steps`` (the lr schedule's length) defaults to
    ``rounds`` times the steps of one round. ``on_stage(round, stage, info)`` is called after each stage.
    """
    from oprd_cli.config import load_run_config
    from oprd_cli.data import load_records
    from oprd_cli.rollout import run_rollout
    from oprd_cli.teacher import TeacherCacheConfig, TeacherModel, cache_rollouts
    from oprd_cli.train import run_train

    t_start = time.monotonic()
    if rounds < 1:
        raise OprdError(f"--rounds must be at least 1, got {rounds}")
    if prompts_per_round is not None and prompts_per_round < 1:
        raise OprdError(f"--prompts-per-round must be at least 1, got {prompts_per_round}")
    if evaluation is not None and evaluation.every < 1:
        raise OprdError(f"--eval-every must be at least 1 (rounds), got {evaluation.every}")
    run = RunDir(Path(run_dir).expanduser())
    file_cfg = load_run_config(run.root) if run.root.is_dir() else {}
    models_cfg = file_cfg.get("models") or {}
    model = model or models_cfg.get("student")
    teacher = teacher or models_cfg.get("teacher")
    if not model and run.latest_checkpoint() is None:
        raise OprdError("pass --model (the initial student: a hub id or a save_pretrained folder)")
    if not teacher:
        raise OprdError("pass --teacher (a hub id or a save_pretrained folder; or [models] teacher in oprd.toml)")
    if data.prompts is None:
        raise OprdError("pass --prompts (a hub dataset id or a .jsonl/.json/.parquet file)")
    train.validate()

    # ---- what the objective needs in the stores
    given = dict(cache_settings or {})
    need = cache_defaults(train.loss.objective, train.loss.mu, int(given.get("topk") or 16))
    settings = {**need, **{k: v for k, v in given.items() if v is not None}}
    settings.setdefault("device", device)
    settings.setdefault("dtype", dtype)
    ccfg = TeacherCacheConfig(**settings)
    ccfg.validate()
    if train.loss.objective == "opd-topk":
        if ccfg.logprobs != "topk":
            raise OprdError("--objective opd-topk needs --logprobs topk in the teacher cache")
        if sampling.record_topk < ccfg.topk:
            sampling = replace(sampling, record_topk=ccfg.topk)
    if train.loss.objective == "opd-top1" and ccfg.logprobs == "none":
        raise OprdError("--objective opd-top1 needs the teacher's log-probs: --logprobs sampled (or topk)")
    settings = {f: getattr(ccfg, f) for f in TeacherCacheConfig.__dataclass_fields__}

    # ---- prompts and the schedule
    records = load_records(data.prompts, data.split, data.prompt_field, data.answer_field, data.id_field, data.limit)
    per_round = min(prompts_per_round, len(records)) if prompts_per_round else len(records)
    if train.optim.total_steps is None:
        train = train.replace(total_steps=rounds * steps_per_round(per_round * sampling.num_samples,
                                                                   train.batching.batch_size,
                                                                   train.batching.epochs or 1))
    run.root.mkdir(parents=True, exist_ok=True)
    write_initial_config(run.root, {
        "models": {"student": model, "teacher": teacher},
        "data": {k: v for k, v in asdict(data).items() if v is not None},
        "template": asdict(template),
        "rollout": {k: v for k, v in asdict(sampling).items()},
        "teacher_cache": {k: settings[k] for k in ("layers", "positions", "k", "logprobs", "topk")},
        "train": {"objective": train.loss.objective, "mu": train.loss.mu, "oprd_form": train.loss.oprd_form,
                  "lr": train.optim.lr, "batch_size": train.batching.batch_size,
                  "total_steps": train.optim.total_steps},
    })

    result = LoopResult(run_dir=str(run.root), rounds=rounds)
    tm: TeacherModel | None = None
    grader = None
    if evaluation is not None:
        from oprd_cli.eval import DEFAULT_TIMEOUT_S, Grader

        grader = Grader(timeout=evaluation.timeout or DEFAULT_TIMEOUT_S,
                        integer_answers=evaluation.data.integer_answers)

    def stage_done(r: int, stage: str, t0: float, **info: Any) -> None:
        entry = {"round": r, "stage": stage, "seconds": round(time.monotonic() - t0, 3), **info}
        _log(run, entry)
        result.stages_run.append(entry)
        if on_stage is not None:
            on_stage(r, stage, entry)
        _maybe_stop(r, stage)

    def header(r: int, stage: str, what: str = "") -> None:
        err_console.rule(f"[bold]round {r}/{rounds}[/] · {stage}" + (f" · {what}" if what else ""), style="cyan")

    def do_eval(r: int, mdl: str, step: int) -> None:
        header(r, "eval", f"step {step}")
        t0 = time.monotonic()
        s = evaluate_step(run, mdl, step, evaluation, template, device=device, dtype=dtype,
                          trust_remote_code=trust_remote_code, show_progress=show_progress, grader=grader)
        result.evals.append({"round": r, "step": step, "path": s["report_path"], "avg_at_n": s.get("avg_at_n"),
                             "n": s.get("n"), "kept": s["kept"]})
        err_console.print(f"step {step}: Avg@{s.get('n')} {100 * (s.get('avg_at_n') or 0):.1f}% on "
                          f"{evaluation.data.bench}" + (" (report kept)" if s["kept"] else ""))
        if not s["kept"]:
            stage_done(r, "eval", t0, step=step, avg_at_n=s.get("avg_at_n"))

    def eval_due(r: int) -> bool:
        return evaluation is not None and (r % evaluation.every == 0 or r == rounds)

    try:
        if evaluation is not None and evaluation.start and model:
            do_eval(0, str(model), 0)
        for r in range(1, rounds + 1):
            if r in _trained_rounds(run):
                if eval_due(r):  # trained, but the loop may have stopped before its evaluation
                    ck = checkpoint_after_round(run, r)
                    if ck is not None:
                        do_eval(r, str(ck.path), ck.step)
                continue
            rpath = run.rollouts_dir / round_name(r)
            cpath = run.cache_dir / round_name(r)
            newer = [i for i, _ in run.cache_rounds(complete_only=True) if i > r]
            if newer:
                raise OprdError(f"{run.root} has a complete cache of round {newer[0]} but round {r} is not trained "
                                "yet; the loop trains rounds in order (move the later rounds away, or continue "
                                f"with `oprd train --run-dir {run.root}`)")
            latest = run.latest_checkpoint()
            # -- rollout
            if not common.is_complete(str(rpath)):
                policy = str(latest.path) if latest is not None else str(model)
                header(r, "rollout", f"policy {'step ' + str(latest.step) if latest else Path(policy).name}")
                t0 = time.monotonic()
                rdata = _round_prompts(run, data, records, r, per_round) if prompts_per_round else data
                rs = run_rollout(model=policy, data=rdata, sampling=replace(sampling, seed=sampling.seed + r - 1),
                                 template=template, out=str(rpath), run_dir=str(run.root), device=device, dtype=dtype,
                                 trust_remote_code=trust_remote_code)
                err_console.print(f"rollout {rpath.name}: {rs.num_samples} samples, {rs.num_tokens:,} tokens, "
                                  f"{rs.num_truncated} truncated ({rs.seconds:.1f} s)")
                stage_done(r, "rollout", t0, samples=rs.num_samples, tokens=rs.num_tokens,
                           policy_step=latest.step if latest else 0)
            # -- teacher cache
            if not common.is_complete(str(cpath)):
                header(r, "teacher-cache", Path(str(teacher)).name)
                t0 = time.monotonic()
                if tm is None:
                    tm = TeacherModel(str(teacher), layers=ccfg.layers, need_logits=ccfg.need_logits,
                                      device=ccfg.device, dtype=ccfg.dtype, trust_remote_code=trust_remote_code)
                st: dict[str, Any] = {}
                cache_rollouts(tm, str(rpath), str(cpath), stats=st, show_progress=show_progress,
                               **{k: v for k, v in settings.items() if k != "trust_remote_code"})
                if not st.get("complete"):
                    raise OprdError(f"teacher cache {cpath} is not complete after the pass")
                err_console.print(f"cache {cpath.name}: {st['units_computed']} units computed "
                                  f"({st['total_seconds']:.1f} s)")
                stage_done(r, "cache", t0, units=st["units_computed"])
            # -- train
            loss = train.loss
            what = loss.objective + (f" + {loss.mu:g}*oprd" if loss.uses_opd and loss.mu else "")
            header(r, "train", what)
            t0 = time.monotonic()
            tdev = train.runtime.device
            tcfg = train.replace(follow=False, device=device if tdev == "auto" else tdev)
            tr = run_train(model=None if latest is not None else str(model), run_dir=str(run.root), config=tcfg,
                           show_progress=show_progress)
            if r not in _trained_rounds(run):
                raise OprdError(f"training did not consume cache {cpath.name} (stopped: {tr.stopped})")
            err_console.print(f"trained steps {tr.start_step + 1}..{tr.step} -> {Path(str(tr.checkpoint)).name} "
                              f"({tr.seconds:.1f} s)")
            peak = max((m.get("peak_mem_bytes") or 0 for m in _metrics_since(run, tr.start_step)), default=0)
            stage_done(r, "train", t0, steps=tr.steps, step=tr.step, train_seconds=round(tr.seconds, 3),
                       peak_mem_bytes=peak)
            # -- eval
            if eval_due(r):
                ck = run.latest_checkpoint()
                do_eval(r, str(ck.path), ck.step)
    finally:
        if grader is not None:
            grader.close()

    latest = run.latest_checkpoint()
    result.checkpoint = str(latest.path) if latest else None
    result.step = latest.step if latest else 0
    result.seconds = time.monotonic() - t_start
    if not result.stages_run:
        err_console.print(f"nothing to do: {run.root} has already trained {rounds} round(s)")
    return result


def print_result(r: LoopResult) -> None:
    err_console.print(f"[green]loop done[/]: {r.run_dir} at step {r.step}"
                      + (f", checkpoint {r.checkpoint}" if r.checkpoint else "") + f" ({r.seconds:.1f} s)")
    for e in r.evals:
        if e.get("avg_at_n") is not None:
            err_console.print(f"  eval step {e['step']}: Avg@{e['n']} {100 * e['avg_at_n']:.1f}%  ({e['path']})")


__all__ = ["STAGES", "STOP_ENV", "EvalSettings", "LoopResult", "cache_defaults", "evaluate_step", "print_result",
           "read_log", "run_loop", "steps_per_round"]
