"""What ``oprd eval`` evaluates and on what: the problems (:func:`load_eval_data`), the models of a run
(:func:`resolve_targets`), the sampling settings (:func:`eval_sampling`), and whether an existing
report already answers the same question (:func:`same_protocol`)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oprd_cli.data import BENCHMARKS, Record, get_benchmark, load_records
from oprd_cli.errors import OprdError
from oprd_cli.eval.extract import DEFAULT_EXTRACT
from oprd_cli.stores.rundir import STEP_RE


@contextmanager
def _quiet_hub(message: str):
    """A spinner while a hub dataset loads, with huggingface_hub's per-retry warnings muted: without a
    network it retries for ~20 s and then fails, and the user should see one error line, not ten."""
    from oprd_cli.console import err_console

    from huggingface_hub.utils import logging as hub_logging

    level = hub_logging.get_verbosity()  # also configures hub logging, which would reset a level set before
    hub_logging.set_verbosity_error()
    try:
        with err_console.status(message):
            yield
    finally:
        hub_logging.set_verbosity(level)


@dataclass(frozen=True)
class EvalData:
    records: list[Record]
    bench: str  # the benchmark's registry name, or the data file's stem
    integer_answers: bool
    source: str  # hub id or file path


def load_eval_data(
    bench: str | None = None,
    data: str | None = None,
    limit: int | None = None,
    prompt_field: str | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
    split: str | None = None,
) -> EvalData:
    """Problems with reference answers: a registered benchmark (``--bench``), or a local/hub dataset
    (``--data``, plain or verl; ``--bench`` then only names it)."""
    if limit is not None and limit < 1:
        raise OprdError(f"--limit must be at least 1, got {limit}")
    if data is None and bench is None:
        raise OprdError(f"pass --bench NAME ({', '.join(BENCHMARKS)}) or --data FILE")
    known = BENCHMARKS.get(bench) if bench else None
    if data is None:
        b = get_benchmark(bench)  # unknown names fail here, listing the known ones
        try:
            with _quiet_hub(f"loading benchmark {b.name} ({b.hub_id}, split {split or b.split}) from the hub"):
                records = load_records(b.hub_id, split or b.split, prompt_field or b.problem_field,
                                       answer_field or b.answer_field, id_field or b.id_field, limit,
                                       config=b.config, require_answer=True)
        except OprdError as e:
            if "from the hub" not in str(e):
                raise
            reason = str(e).split("?): ", 1)[-1].split("; a local", 1)[0]
            raise OprdError(
                f"could not load benchmark {b.name} ({b.hub_id}) from the hub (no network?): {reason}; "
                f"evaluate a local copy instead: oprd eval --data FILE --bench {b.name} ... "
                "(FILE: .jsonl/.json/.parquet, plain problem/answer or verl layout)"
            ) from None
        return EvalData(records, b.name, b.integer_answers, b.hub_id)
    records = load_records(data, split or "train", prompt_field, answer_field, id_field, limit, require_answer=True)
    name = bench or Path(str(data)).name.split(".")[0]
    local = Path(os.path.expanduser(str(data)))
    source = str(local.resolve()) if local.exists() else str(data)  # one spelling per file, for --skip-existing
    return EvalData(records, name, known.integer_answers if known else False, source)


def validate_num_samples(num_samples: int) -> int:
    if num_samples is None or int(num_samples) < 1:
        raise OprdError(f"--num-samples must be at least 1, got {num_samples}")
    return int(num_samples)


def checkpoint_info(model: str | Path) -> tuple[str | None, int | None]:
    """(run_dir, step) when ``model`` is ``RUN/checkpoints/step-N``; (None, None) otherwise."""
    p = Path(os.path.expanduser(str(model)))
    m = STEP_RE.match(p.name)
    if m and p.parent.name == "checkpoints" and p.exists():
        return str(p.resolve().parent.parent), int(m.group(1))
    return None, None


# ============================================================================ the eval command
# The release's evaluation script (Avg@16 at temperature 0.7, top-p 0.95); oprd.toml's [eval] section and
# flags override.
EVAL_SAMPLING_DEFAULTS: dict[str, Any] = {"num_samples": 16, "temperature": 0.7, "top_p": 0.95, "top_k": 0,
                                          "max_new_tokens": 16384, "seed": 0, "batch_size": 16}
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class EvalTarget:
    """One model to evaluate: what is loaded, and where it sits in a run (``step`` 0 = initial student)."""

    model: str
    run_dir: str | None = None
    step: int | None = None
    tokenizer_fallback: str | None = None  # the run's student, for checkpoints saved without a tokenizer

    @property
    def tokenizer(self) -> str:
        p = Path(os.path.expanduser(self.model))
        if self.tokenizer_fallback and p.is_dir() and not any((p / f).exists() for f in TOKENIZER_FILES):
            return self.tokenizer_fallback
        return self.model

    @property
    def label(self) -> str:
        if self.step is not None and self.run_dir is not None:
            return f"{Path(self.run_dir).name} step {self.step}"
        return self.model


def parse_checkpoint_name(name: str) -> int:
    """``step-50``, ``step-000050`` or ``50`` -> 50."""
    m = re.fullmatch(r"(?:step-)?(\d+)", Path(str(name).strip().rstrip("/")).name)
    if not m:
        raise OprdError(f"--checkpoint {name!r} is not a checkpoint name like step-000050 (or a step number)")
    return int(m.group(1))


def resolve_targets(model: str | None = None, run_dir: str | Path | None = None, checkpoint: str | None = None,
                    all_checkpoints: bool = False, need_model: bool = True) -> list[EvalTarget]:
    """The models ``oprd eval`` evaluates.

    ``--model M``: M (a checkpoint folder ``RUN/checkpoints/step-N`` keeps its run and step).
    ``--run-dir R``: its latest complete checkpoint, else its initial student (``[models] student`` in
    ``R/oprd.toml``, step 0); ``--checkpoint step-N`` that one; ``--all-checkpoints`` every complete
    checkpoint in step order, preceded by the initial student when there are several checkpoints.
    """
    from oprd_cli.config import load_run_config
    from oprd_cli.stores.rundir import RunDir, checkpoint_name

    if checkpoint is not None and all_checkpoints:
        raise OprdError("pass either --checkpoint or --all-checkpoints, not both")
    if (checkpoint is not None or all_checkpoints) and run_dir is None:
        flag = "--checkpoint" if checkpoint is not None else "--all-checkpoints"
        raise OprdError(f"{flag} needs --run-dir RUN (or pass a checkpoint folder as --model)")
    if model is not None and run_dir is not None:
        raise OprdError("pass either --model (one model) or --run-dir (a run's checkpoints), not both")
    if run_dir is None:
        if model is None:
            if need_model:
                raise OprdError("pass --model (a hub id or a save_pretrained folder) or --run-dir RUN")
            return []
        rd, step = checkpoint_info(model)
        return [EvalTarget(str(model), rd, step)]

    root = Path(os.path.expanduser(str(run_dir)))
    if not root.is_dir():
        raise OprdError(f"run directory {run_dir} does not exist")
    run = RunDir(root.resolve())
    cks = run.checkpoints()
    student = (load_run_config(root).get("models") or {}).get("student")
    rd = str(root.resolve())
    fallback = str(student) if student else None
    if checkpoint is not None:
        step = parse_checkpoint_name(checkpoint)
        found = next((c for c in cks if c.step == step), None)
        if found is None:
            have = ", ".join(c.path.name for c in cks) or "none"
            pending = (run.checkpoints_dir / checkpoint_name(step)).is_dir()
            why = " is not complete yet (no oprd_checkpoint.json)" if pending else f" has no checkpoint {checkpoint}"
            raise OprdError(f"{run_dir}{'/checkpoints/' + checkpoint_name(step) if pending else ''}{why}; "
                            f"complete checkpoints: {have}")
        return [EvalTarget(str(found.path), rd, found.step, fallback)]
    if all_checkpoints:
        targets = [EvalTarget(str(c.path), rd, c.step, fallback) for c in cks]
        if len(cks) != 1 and student and not any(c.step == 0 for c in cks):
            targets.insert(0, EvalTarget(str(student), rd, 0))
        if not targets:
            raise OprdError(f"run {run_dir} has no complete checkpoint and its oprd.toml names no student")
        return targets
    if cks:
        return [EvalTarget(str(cks[-1].path), rd, cks[-1].step, fallback)]
    if student:
        return [EvalTarget(str(student), rd, 0)]
    raise OprdError(f"run {run_dir} has no complete checkpoint (checkpoints/step-N with oprd_checkpoint.json) "
                    "and its oprd.toml names no student; pass --model")


def eval_sampling(run_config: Mapping[str, Any] | None = None, **flags: Any):
    """The sampling config for eval: flags > ``[eval]`` in oprd.toml > :data:`EVAL_SAMPLING_DEFAULTS`."""
    from dataclasses import fields

    from oprd_cli.config import SamplingConfig, merge

    names = {f.name for f in fields(SamplingConfig)} - {"record_topk"}
    section = dict(EVAL_SAMPLING_DEFAULTS)
    section.update({k: v for k, v in ((run_config or {}).get("eval") or {}).items() if k in names})
    return merge(SamplingConfig, section, **flags)


def same_protocol(old: Mapping[str, Any], target: EvalTarget, data: EvalData, sampling,
                  extract: str = DEFAULT_EXTRACT) -> bool:
    """Whether an existing report answers the same question (same benchmark and data, model, step,
    sampling and answer extraction; for --skip-existing and for callers that reuse reports). A report
    that does not record its extraction mode predates the current grading rules and never matches."""
    s = old.get("sampling") or {}
    keys = ("num_samples", "temperature", "top_p", "top_k", "max_new_tokens", "seed")
    return ((old.get("grading") or {}).get("extract") == extract
            and old.get("bench") == data.bench and old.get("data") == data.source and old.get("model") == target.model
            and old.get("step") == target.step and all(s.get(k) == getattr(sampling, k) for k in keys)
            and old.get("num_problems", 0) + len((old.get("generation") or {}).get("skipped_problems") or [])
            == len(data.records))


def existing_report(path: str | Path, target: EvalTarget, data: EvalData, sampling,
                    extract: str = DEFAULT_EXTRACT) -> dict[str, Any] | None:
    """The report at ``path`` when it exists, parses and answers the same question
    (:func:`same_protocol`); None otherwise (for ``--skip-existing``)."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        old = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return old if isinstance(old, dict) and same_protocol(old, target, data, sampling, extract) else None
