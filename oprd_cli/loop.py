"""``oprd loop``: rounds of rollout -> teacher-cache -> train (-> eval) in one process.

Each stage is the function the separate command runs (:func:`oprd_cli.rollout.run_rollout`,
:func:`oprd_cli.teacher.cache_rollouts`, :func:`oprd_cli.train.run_train` in run-directory mode,
:func:`oprd_cli.evaluate.evaluate_target`), so the run directory a loop leaves is the one the
separate commands would have left, and the two ways can be mixed.

What to do next is decided from the run directory alone, so an interrupted loop (Ctrl-C, a crash, a
killed process) resumes at the stage where it stopped (:func:`next_stage`, a pure function of the
:class:`RoundState` that :func:`round_state` reads from the run directory)::

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
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal

from oprd_cli.config import DataConfig, SamplingConfig, TemplateConfig, write_initial_config
from oprd_cli.console import err_console
from oprd_cli.errors import OprdError
from oprd_cli.io import atomic_write_text
from oprd_cli.stores import common
from oprd_cli.stores.rundir import RunDir, round_name
from oprd_cli.urlpath import UrlPath, append_text, as_path, local_file

LOG_NAME = "loop.jsonl"


# ------------------------------------------------------------------------------ settings
def cache_defaults(objective: str, mu: float | None, topk: int | None = None) -> dict[str, Any]:
    """Teacher-cache settings an objective needs (flags override them).

    OPRD needs hidden states of every layer; OPD top-1 and OPD+ the teacher's log-prob of each sampled
    token; OPD top-k the teacher's log-probs on the student's top-k (the rollout records the top-k ids);
    TrOPD the teacher's own top-k (``topk`` default 64; the cache's topk mode also scores the student's
    top-k, so its rollouts record them too). OPD alone stores only the last layer (the store always
    holds some hidden states).
    """
    from oprd_cli.train.config import OBJECTIVES

    if objective not in OBJECTIVES:
        raise OprdError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    uses_oprd = objective == "oprd" or (mu is not None and mu > 0)
    logprobs = {"opd-top1": "sampled", "opd-plus": "sampled", "opd-topk": "topk", "tropd": "topk"}.get(objective, "none")
    topk = topk or (64 if objective == "tropd" else 16)
    return {"layers": "all" if uses_oprd else "last", "logprobs": logprobs, "topk": topk}


@dataclass
class EvalSettings:
    """Evaluation inside the loop: the problems, how to sample, and how often (in rounds)."""

    data: Any  # evaluate.EvalData
    sampling: SamplingConfig
    every: int = 1
    start: bool = True  # also evaluate the starting student (step 0)
    timeout: float | None = None


def eval_settings(run_dir: str | Path | None, *, bench: str | None, data: str | None, limit: int | None,
                  every: int, start: bool, **sampling_flags: Any) -> EvalSettings | None:
    """The loop's evaluation from its flags (None without ``--eval-data``/``--eval-bench``); sampling as
    ``oprd eval`` resolves it (flags <- ``[eval]`` in oprd.toml <- the eval defaults)."""
    if data is None and bench is None:
        return None
    from oprd_cli.config import load_run_config
    from oprd_cli.eval import eval_sampling, load_eval_data

    return EvalSettings(data=load_eval_data(bench, data, limit),
                        sampling=eval_sampling(load_run_config(run_dir), **sampling_flags), every=every, start=start)


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


def log_stage(run: RunDir, entry: dict[str, Any]) -> None:
    """Append one finished stage to ``RUN/loop.jsonl``."""
    append_text(run.root / LOG_NAME, json.dumps(entry) + "\n")  # on object storage: rewritten, one PUT


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The stage log of a run directory (``RUN/loop.jsonl``), one dict per finished stage."""
    path = as_path(run_dir) / LOG_NAME
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line of a killed process
            continue
    return out


def _round_prompts(run: RunDir, records, index: int, per_round: int) -> DataConfig:
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
        atomic_write_text(str(path), "\n".join(lines) + "\n")
    return DataConfig(prompts=local_file(path), split="train")  # on object storage: read from a local copy


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
    old = E.existing_report(path, target, data, sampling)
    if old is not None:
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


# ------------------------------------------------------------------------------ what to do next
Stage = Literal["done", "train", "cache", "rollout", "blocked"]


@dataclass(frozen=True)
class RoundState:
    """What the run directory says about round ``index`` (read by :func:`round_state`)."""

    index: int
    trained: bool  # the latest checkpoint's marker lists the round's cache as consumed or skipped
    cache_complete: bool
    rollout_complete: bool
    newer_cache: int | None = None  # a later round with a complete cache, if any


def next_stage(state: RoundState) -> Stage:
    """What round ``state.index`` needs next: ``done`` (trained), ``train`` (complete cache), ``cache``
    (complete rollout), else ``rollout`` (an incomplete store is replaced). ``blocked`` when a later
    round already has a complete cache: the loop trains rounds in order."""
    if state.trained:
        return "done"
    if state.newer_cache is not None:
        return "blocked"
    if state.cache_complete:
        return "train"
    if state.rollout_complete:
        return "cache"
    return "rollout"


def round_state(run: RunDir, index: int) -> RoundState:
    newer = [i for i, _ in run.cache_rounds(complete_only=True) if i > index]
    return RoundState(index=index, trained=index in _trained_rounds(run),
                      cache_complete=common.is_complete(str(run.cache_dir / round_name(index))),
                      rollout_complete=common.is_complete(str(run.rollouts_dir / round_name(index))),
                      newer_cache=newer[0] if newer else None)


# ------------------------------------------------------------------------------ settings resolved once
def _check_counts(rounds: int, prompts_per_round: int | None, evaluation: EvalSettings | None) -> None:
    if rounds < 1:
        raise OprdError(f"--rounds must be at least 1, got {rounds}")
    if prompts_per_round is not None and prompts_per_round < 1:
        raise OprdError(f"--prompts-per-round must be at least 1, got {prompts_per_round}")
    if evaluation is not None and evaluation.every < 1:
        raise OprdError(f"--eval-every must be at least 1 (rounds), got {evaluation.every}")


def _models(run: RunDir, file_cfg: dict[str, Any], model: str | None, teacher: str | None) -> tuple[Any, Any]:
    models_cfg = file_cfg.get("models") or {}
    model = model or models_cfg.get("student")
    teacher = teacher or models_cfg.get("teacher")
    if not model and run.latest_checkpoint() is None:
        raise OprdError("pass --model (the initial student: a hub id or a save_pretrained folder)")
    if not teacher:
        raise OprdError("pass --teacher (a hub id or a save_pretrained folder; or [models] teacher in oprd.toml)")
    return model, teacher


def cache_config(train: Any, section: dict[str, Any] | None, flags: dict[str, Any], device: str, dtype: str,
                 sampling: SamplingConfig):
    """The loop's teacher-cache settings: what the objective needs (:func:`cache_defaults`, and the loop's
    device/dtype) <- ``[teacher_cache]`` <- flags; raises ``sampling.record_topk`` to the top-k support."""
    from oprd_cli.config import merge
    from oprd_cli.teacher import TeacherCacheConfig

    loss = train.loss
    topk = flags.get("topk") or (section or {}).get("topk") or (loss.tropd_topk if loss.objective == "tropd" else 16)
    need = {**cache_defaults(loss.objective, loss.mu, int(topk)), "device": device, "dtype": dtype,
            "bridge": loss.bridge}
    ccfg = merge(TeacherCacheConfig, section, defaults=need, **flags)
    if loss.objective in ("opd-topk", "tropd"):
        if ccfg.logprobs != "topk":
            raise OprdError(f"--objective {loss.objective} needs --logprobs topk in the teacher cache")
        if loss.objective == "tropd" and ccfg.topk < loss.tropd_topk:
            raise OprdError(f"--objective tropd with --tropd-topk {loss.tropd_topk} needs a cache --topk of at least "
                            f"that, got {ccfg.topk}")
        if sampling.record_topk < ccfg.topk:
            sampling = replace(sampling, record_topk=ccfg.topk)
    if loss.objective in ("opd-top1", "opd-plus") and ccfg.logprobs == "none":
        raise OprdError(f"--objective {loss.objective} needs the teacher's log-probs: --logprobs sampled (or topk)")
    return ccfg, sampling


PREFIX_SCHEDULES = ("none", "cosine")


def prefix_plan(guidance: dict[str, Any] | None, sampling: SamplingConfig) -> tuple[str, int | None, str]:
    """The loop's teacher-prefix guidance ``(schedule, L, mode)``: ``cosine`` anneals ``L`` (default
    ``--max-new-tokens``) to 0 over the rounds; ``none`` uses a fixed ``L`` when one is given, else no
    guidance (``L`` None)."""
    g = dict(guidance or {})
    schedule, max_tokens, mode = g.get("schedule") or "none", g.get("max_tokens"), g.get("mode") or "fixed"
    if schedule not in PREFIX_SCHEDULES:
        raise OprdError(f"--prefix-schedule must be one of {', '.join(PREFIX_SCHEDULES)}, got {schedule!r}")
    if schedule == "cosine" and max_tokens is None:
        max_tokens = sampling.max_new_tokens
    from oprd_cli.guidance import GuidanceConfig

    GuidanceConfig("", int(max_tokens or 0), mode).validate()
    return schedule, max_tokens, mode


def round_prefix_max(plan: tuple[str, int | None, str], r: int, rounds: int) -> int:
    """The maximum teacher-prefix length of round ``r`` (1-based): ``L (1 + cos(pi (r-1) / R)) / 2``
    with the cosine schedule, ``L`` without one, 0 without guidance."""
    from oprd_cli.losses.tropd import guidance_prefix_max

    schedule, max_tokens, _ = plan
    if max_tokens is None:
        return 0
    return guidance_prefix_max(r - 1, rounds, int(max_tokens)) if schedule == "cosine" else int(max_tokens)


def _write_run_config(run: RunDir, model, teacher, data: DataConfig, template: TemplateConfig,
                      sampling: SamplingConfig, ccfg, train) -> None:
    run.root.mkdir(parents=True, exist_ok=True)
    write_initial_config(run.root, {
        "models": {"student": model, "teacher": teacher},
        "data": {k: v for k, v in asdict(data).items() if v is not None},
        "template": asdict(template),
        "rollout": {k: v for k, v in asdict(sampling).items()},
        "teacher_cache": {k: getattr(ccfg, k) for k in ("layers", "positions", "k", "logprobs", "topk")},
        "train": {"objective": train.loss.objective, "mu": train.loss.mu, "oprd_form": train.loss.oprd_form, "lr": train.optim.lr,
                  "batch_size": train.batching.batch_size, "total_steps": train.optim.total_steps},
    })


# ------------------------------------------------------------------------------ the driver
@dataclass
class _Loop:
    """The resolved settings of one ``oprd loop`` and the stage functions it calls."""

    run: RunDir
    rounds: int
    model: Any
    teacher: Any
    data: DataConfig
    records: list
    per_round: int | None  # prompts per round when the set is sliced
    sampling: SamplingConfig
    template: TemplateConfig
    train: Any
    ccfg: Any
    evaluation: EvalSettings | None
    device: str
    dtype: str
    trust_remote_code: bool
    show_progress: bool
    on_stage: Callable[[int, str, dict[str, Any]], None] | None
    result: LoopResult
    prefix: tuple = ("none", None, "fixed")  # (schedule, L, mode): teacher-prefix guidance (prefix_plan)
    teacher_model: Any = None
    grader: Any = None

    def header(self, r: int, stage: str, what: str = "") -> None:
        err_console.rule(f"[bold]round {r}/{self.rounds}[/] · {stage}" + (f" · {what}" if what else ""),
                         style="cyan")

    def stage_done(self, r: int, stage: str, t0: float, **info: Any) -> None:
        entry = {"round": r, "stage": stage, "seconds": round(time.monotonic() - t0, 3), **info}
        log_stage(self.run, entry)
        self.result.stages_run.append(entry)
        if self.on_stage is not None:
            self.on_stage(r, stage, entry)

    def eval_due(self, r: int) -> bool:
        return self.evaluation is not None and (r % self.evaluation.every == 0 or r == self.rounds)

    def evaluate(self, r: int, mdl: str, step: int) -> None:
        self.header(r, "eval", f"step {step}")
        t0 = time.monotonic()
        s = evaluate_step(self.run, mdl, step, self.evaluation, self.template, device=self.device, dtype=self.dtype,
                          trust_remote_code=self.trust_remote_code, show_progress=self.show_progress,
                          grader=self.grader)
        self.result.evals.append({"round": r, "step": step, "path": s["report_path"], "avg_at_n": s.get("avg_at_n"),
                                  "n": s.get("n"), "kept": s["kept"]})
        err_console.print(f"step {step}: Avg@{s.get('n')} {100 * (s.get('avg_at_n') or 0):.1f}% on "
                          f"{self.evaluation.data.bench}" + (" (report kept)" if s["kept"] else ""))
        if not s["kept"]:
            self.stage_done(r, "eval", t0, step=step, avg_at_n=s.get("avg_at_n"))

    def rollout(self, r: int) -> None:
        from oprd_cli.rollout import run_rollout

        latest = self.run.latest_checkpoint()
        rpath = self.run.rollouts_dir / round_name(r)
        policy = str(latest.path) if latest is not None else str(self.model)
        self.header(r, "rollout", f"policy {'step ' + str(latest.step) if latest else Path(policy).name}")
        t0 = time.monotonic()
        rdata = _round_prompts(self.run, self.records, r, self.per_round) if self.per_round else self.data
        prefix_max = round_prefix_max(self.prefix, r, self.rounds)
        from oprd_cli.guidance import GuidanceConfig

        guidance = GuidanceConfig(str(self.teacher), prefix_max, self.prefix[2]) if prefix_max > 0 else None
        rs = run_rollout(model=policy, data=rdata, sampling=replace(self.sampling, seed=self.sampling.seed + r - 1),
                         template=self.template, out=str(rpath), run_dir=str(self.run.root), device=self.device,
                         dtype=self.dtype, trust_remote_code=self.trust_remote_code, guidance=guidance)
        err_console.print(f"rollout {rpath.name}: {rs.num_samples} samples, {rs.num_tokens:,} tokens, "
                          f"{rs.num_truncated} truncated ({rs.seconds:.1f} s)")
        self.stage_done(r, "rollout", t0, samples=rs.num_samples, tokens=rs.num_tokens,
                        policy_step=latest.step if latest else 0, prefix_max=prefix_max)

    def cache(self, r: int) -> None:
        from oprd_cli.teacher import TeacherModel, cache_rollouts

        rpath, cpath = self.run.rollouts_dir / round_name(r), self.run.cache_dir / round_name(r)
        self.header(r, "teacher-cache", Path(str(self.teacher)).name)
        t0 = time.monotonic()
        c = self.ccfg
        if self.teacher_model is None:
            self.teacher_model = TeacherModel(str(self.teacher), layers=c.layers, need_logits=c.need_logits,
                                              device=c.device, dtype=c.dtype, trust_remote_code=self.trust_remote_code)
        st: dict[str, Any] = {}
        settings = {f: getattr(c, f) for f in c.__dataclass_fields__ if f != "trust_remote_code"}
        cache_rollouts(self.teacher_model, str(rpath), str(cpath), stats=st, show_progress=self.show_progress,
                       **settings)
        if not st.get("complete"):
            raise OprdError(f"teacher cache {cpath} is not complete after the pass")
        err_console.print(f"cache {cpath.name}: {st['units_computed']} units computed ({st['total_seconds']:.1f} s)")
        self.stage_done(r, "cache", t0, units=st["units_computed"])

    def train_round(self, r: int) -> None:
        from oprd_cli.train import run_train

        train, latest = self.train, self.run.latest_checkpoint()
        what = train.loss.objective + (f" + {train.loss.mu:g}*oprd" if train.loss.objective != "oprd" and train.loss.mu else "")
        self.header(r, "train", what)
        t0 = time.monotonic()
        tcfg = train.replace(follow=False, device=self.device if train.runtime.device == "auto" else train.runtime.device)
        tr = run_train(model=None if latest is not None else str(self.model), run_dir=str(self.run.root),
                       config=tcfg, show_progress=self.show_progress)
        if r not in _trained_rounds(self.run):
            raise OprdError(f"training did not consume cache {round_name(r)} (stopped: {tr.stopped})")
        err_console.print(f"trained steps {tr.start_step + 1}..{tr.step} -> {Path(str(tr.checkpoint)).name} "
                          f"({tr.seconds:.1f} s)")
        peak = max((m.get("peak_mem_bytes") or 0 for m in _metrics_since(self.run, tr.start_step)), default=0)
        self.stage_done(r, "train", t0, steps=tr.steps, step=tr.step, train_seconds=round(tr.seconds, 3),
                        peak_mem_bytes=peak)

    def round(self, r: int) -> None:
        """Run round ``r`` from wherever the run directory says it stands, then its evaluation when due."""
        state = round_state(self.run, r)
        if state.trained:
            if self.eval_due(r):  # trained, but the loop may have stopped before its evaluation
                ck = checkpoint_after_round(self.run, r)
                if ck is not None:
                    self.evaluate(r, str(ck.path), ck.step)
            return
        stage = next_stage(state)
        if stage == "blocked":
            root = self.run.root
            raise OprdError(f"{root} has a complete cache of round {state.newer_cache} but round {r} is not trained "
                            "yet; the loop trains rounds in order (move the later rounds away, or continue "
                            f"with `oprd train --run-dir {root}`)")
        run_stage = {"rollout": self.rollout, "cache": self.cache, "train": self.train_round}
        for name in ("rollout", "cache", "train")[("rollout", "cache", "train").index(stage):]:
            run_stage[name](r)
        if self.eval_due(r):
            ck = self.run.latest_checkpoint()
            self.evaluate(r, str(ck.path), ck.step)

    def run_all(self) -> None:
        if self.evaluation is not None:
            from oprd_cli.eval import DEFAULT_TIMEOUT_S, Grader

            self.grader = Grader(timeout=self.evaluation.timeout or DEFAULT_TIMEOUT_S,
                                 integer_answers=self.evaluation.data.integer_answers)
        try:
            if self.evaluation is not None and self.evaluation.start and self.model:
                self.evaluate(0, str(self.model), 0)
            for r in range(1, self.rounds + 1):
                self.round(r)
        finally:
            if self.grader is not None:
                self.grader.close()


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
    guidance: dict[str, Any] | None = None,
) -> LoopResult:
    """Run ``rounds`` rounds in ``run_dir`` (resuming whatever an earlier invocation left).

    ``cache_settings`` are :class:`oprd_cli.teacher.TeacherCacheConfig` fields given as flags; they win
    over ``[teacher_cache]`` in ``RUN/oprd.toml``, which wins over what the objective needs
    (:func:`cache_config`). ``train.optim.total_steps`` (the lr schedule's length) defaults to ``rounds``
    times the steps of one round. ``on_stage(round, stage, info)`` is called after each stage.
    ``guidance``: ``{"schedule", "max_tokens", "mode"}`` of teacher-prefix rollouts (:func:`prefix_plan`).
    """
    from oprd_cli.config import load_run_config
    from oprd_cli.data import load_records

    t_start = time.monotonic()
    _check_counts(rounds, prompts_per_round, evaluation)
    run = RunDir(Path(run_dir).expanduser())
    if isinstance(run.root, UrlPath) and evaluation is not None:
        raise OprdError(f"{run.root}: evaluation inside the loop writes local reports; on object storage run the "
                        "loop without --eval-bench/--eval-data and evaluate checkpoints with `oprd eval`")
    file_cfg = load_run_config(run.root) if run.root.is_dir() else {}
    model, teacher = _models(run, file_cfg, model, teacher)
    if data.prompts is None:
        raise OprdError("pass --prompts (a hub dataset id or a .jsonl/.json/.parquet file)")
    train.validate()
    flags = {k: v for k, v in (cache_settings or {}).items() if v is not None}
    ccfg, sampling = cache_config(train, file_cfg.get("teacher_cache"), flags, device, dtype, sampling)
    prefix = prefix_plan(guidance, sampling)
    records = load_records(data.prompts, data.split, data.prompt_field, data.answer_field, data.id_field, data.limit)
    per_round = min(prompts_per_round, len(records)) if prompts_per_round else len(records)
    if train.optim.total_steps is None:
        train = train.replace(total_steps=rounds * steps_per_round(per_round * sampling.num_samples,
                                                                  train.batching.batch_size, train.batching.epochs or 1))
    _write_run_config(run, model, teacher, data, template, sampling, ccfg, train)
    result = LoopResult(run_dir=str(run.root), rounds=rounds)
    _Loop(run=run, rounds=rounds, model=model, teacher=teacher, data=data, records=records,
          per_round=per_round if prompts_per_round else None, sampling=sampling, template=template, train=train,
          ccfg=ccfg, evaluation=evaluation, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
          show_progress=show_progress, on_stage=on_stage, result=result, prefix=prefix).run_all()
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


__all__ = ["EvalSettings", "LoopResult", "eval_settings", "RoundState", "Stage", "cache_config", "cache_defaults", "evaluate_step",
           "next_stage", "print_result", "read_log", "round_state", "run_loop", "steps_per_round"]
