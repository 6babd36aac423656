"""Prompt and benchmark datasets, and prompt templates.

Records come from ``datasets`` (a hub id, or a local jsonl/json/parquet file) in
either of two layouts:

* plain: ``problem`` (or ``question``/``prompt`` as a string) and ``answer``;
* verl: ``prompt`` as a list of chat messages and ``reward_model.ground_truth``.

``render_prompt`` turns a record into the token ids the model sees: the chat
template when the tokenizer has one (switchable), an optional system prompt, and
for plain records an instruction suffix (default: the math ``\\boxed{}``
convention). verl prompts already carry their instruction and are used as given.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oprd_cli.config import DEFAULT_INSTRUCTION, TemplateConfig
from oprd_cli.errors import OprdError

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
PROBLEM_FIELDS = ("problem", "question", "prompt", "input")
ANSWER_FIELDS = ("answer", "final_answer", "ground_truth", "solution_answer", "target")


@dataclass(frozen=True)
class Record:
    """One prompt. Exactly one of ``problem`` (plain text) or ``messages`` (chat) is set."""

    index: int  # row number in the (limited) dataset
    id: str  # the dataset's id field, or the row number as a string
    problem: str | None
    messages: tuple[dict, ...] | None
    answer: str | None

    @property
    def text(self) -> str:
        """The user-visible problem text (last user message for chat records)."""
        if self.problem is not None:
            return self.problem
        users = [m["content"] for m in self.messages or () if m.get("role") == "user"]
        return users[-1] if users else ""


@dataclass(frozen=True)
class Benchmark:
    name: str
    hub_id: str
    split: str
    problem_field: str
    answer_field: str
    id_field: str | None
    config: str | None = None
    integer_answers: bool = False
    description: str = ""


BENCHMARKS: dict[str, Benchmark] = {
    "aime24": Benchmark("aime24", "HuggingFaceH4/aime_2024", "train", "problem", "answer", "id",
                        integer_answers=True, description="AIME 2024, 30 problems"),
    "aime25": Benchmark("aime25", "math-ai/aime25", "test", "problem", "answer", "id",
                        integer_answers=True, description="AIME 2025, 30 problems"),
    "amc23": Benchmark("amc23", "AI-MO/aimo-validation-amc", "train", "problem", "answer", "id",
                       description="AIMO validation AMC (AMC 2022-23), 83 problems"),
    "math500": Benchmark("math500", "HuggingFaceH4/MATH-500", "test", "problem", "answer", "unique_id",
                         description="MATH-500"),
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise OprdError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)} (or pass --data FILE)")
    return BENCHMARKS[name]


def _check_json_text(path: Path, source: str) -> None:
    """A local .json/.jsonl file is UTF-8 and (for .jsonl) one JSON object per line: name the first bad line."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise OprdError(f"{source} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if path.suffix.lower() != ".jsonl":
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError as e:
            raise OprdError(f"{source} line {lineno} is not valid JSON ({e.msg}; a truncated line?)") from None
        if not isinstance(row, dict):
            raise OprdError(f"{source} line {lineno} is a JSON {type(row).__name__}, expected an object per line")


def _load_dataset(source: str, split: str, config: str | None = None):
    import datasets

    datasets.disable_progress_bars()
    path = Path(os.path.expanduser(source))
    if path.exists():
        if path.is_dir():
            raise OprdError(f"{source} is a folder; pass a .jsonl, .json or .parquet file (or a hub dataset id)")
        builder = LOCAL_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise OprdError(f"{source}: unknown file type {path.suffix!r}; use .jsonl, .json, .parquet or .csv")
        if builder == "json":
            _check_json_text(path, source)
        try:
            logging.getLogger("datasets").setLevel(logging.CRITICAL)  # its own error lines would repeat ours
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as e:
            raise OprdError(f"could not read {source} as {builder}: {str(e).splitlines()[0] if str(e) else e}") from None
    if source.startswith((".", "/", "~")) or source.endswith(tuple(LOCAL_BUILDERS)):
        raise OprdError(f"dataset file {source} does not exist")
    try:
        return datasets.load_dataset(source, config, split=split)
    except ValueError as e:  # unknown split and the like
        raise OprdError(f"could not load split {split!r} of dataset {source!r}: {str(e).splitlines()[0]}") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OprdError(
            f"could not load dataset {source!r} from the hub (no network, a typo, or a gated dataset?): {first}; "
            "a local .jsonl/.json/.parquet file works too"
        ) from None


def _dig(row: dict, field: str) -> Any:
    """``a.b`` reaches into nested records (e.g. ``reward_model.ground_truth``)."""
    cur: Any = row
    for part in field.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(field)
        cur = cur[part]
    return cur


def _is_chat(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) and "content" in m for m in value)


def load_records(
    source: str,
    split: str = "train",
    prompt_field: str | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
    limit: int | None = None,
    config: str | None = None,
    require_answer: bool = False,
) -> list[Record]:
    """Read prompts (plain or verl layout) from a hub id or a local file.

    Raises OprdError naming the fields that exist when a field is missing, and when
    the set is empty.
    """
    ds = _load_dataset(source, split, config)
    columns = list(ds.column_names)
    if len(ds) == 0:
        raise OprdError(f"dataset {source} is empty")
    first = ds[0]

    if prompt_field is None:
        candidates = [f for f in PROBLEM_FIELDS if f in columns]
        if not candidates:
            raise OprdError(
                f"{source} has no prompt field (looked for {', '.join(PROBLEM_FIELDS)}); fields: "
                f"{', '.join(columns)}; pass --prompt-field"
            )
        prompt_field = candidates[0]
    else:
        try:
            _dig(first, prompt_field)
        except KeyError:
            raise OprdError(f"{source} has no field {prompt_field!r}; fields: {', '.join(columns)}") from None

    if answer_field is None:
        if "reward_model" in columns and isinstance(first.get("reward_model"), dict) and \
                "ground_truth" in first["reward_model"]:
            answer_field = "reward_model.ground_truth"
        else:
            answer_field = next((f for f in ANSWER_FIELDS if f in columns), None)
        if answer_field is None and require_answer:
            raise OprdError(
                f"{source} has no answer field (looked for answer, reward_model.ground_truth, ...); fields: "
                f"{', '.join(columns)}; pass --answer-field"
            )
    else:
        try:
            _dig(first, answer_field)
        except KeyError:
            raise OprdError(f"{source} has no field {answer_field!r}; fields: {', '.join(columns)}") from None

    if id_field is None:
        id_field = "id" if "id" in columns else None
    elif id_field not in columns:
        raise OprdError(f"{source} has no field {id_field!r}; fields: {', '.join(columns)}")

    n = len(ds) if limit is None else min(limit, len(ds))
    records: list[Record] = []
    for i in range(n):
        row = ds[i]
        value = _dig(row, prompt_field)
        problem, messages = None, None
        if _is_chat(value):
            messages = tuple({"role": m.get("role", "user"), "content": m["content"]} for m in value)
        elif isinstance(value, str) and value.strip():
            problem = value
        elif isinstance(value, str):
            raise OprdError(f"{source} row {i}: field {prompt_field!r} is empty")
        else:
            raise OprdError(
                f"{source} row {i}: field {prompt_field!r} is neither text nor a list of chat messages"
            )
        answer = None
        if answer_field is not None:
            a = _dig(row, answer_field)
            answer = None if a is None else str(a)
        rid = str(row[id_field]) if id_field is not None else str(i)
        records.append(Record(index=i, id=rid, problem=problem, messages=messages, answer=answer))
    if not records:
        raise OprdError(f"no prompts in {source}")
    return records


def prompt_messages(record: Record, template: TemplateConfig) -> list[dict]:
    """Chat messages for a record: optional system prompt, the user turn with the instruction."""
    if record.messages is not None:
        msgs = [dict(m) for m in record.messages]
        if template.system_prompt and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": template.system_prompt})
        return msgs
    content = record.problem or ""
    if template.instruction:
        content = f"{content}\n{template.instruction}" if content else template.instruction
    msgs = [{"role": "user", "content": content}]
    if template.system_prompt:
        msgs.insert(0, {"role": "system", "content": template.system_prompt})
    return msgs


def render_prompt(record: Record, tokenizer, template: TemplateConfig) -> list[int]:
    """Token ids of the prompt exactly as the model sees it."""
    msgs = prompt_messages(record, template)
    if template.chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "\n\n".join(m["content"] for m in msgs)
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return list(ids)


__all__ = ["Record", "Benchmark", "BENCHMARKS", "DEFAULT_INSTRUCTION", "get_benchmark", "load_records",
           "prompt_messages", "render_prompt"]
