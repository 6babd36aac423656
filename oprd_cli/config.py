"""Typed configuration: dataclasses filled from ``RUN/oprd.toml`` and CLI flags.

Precedence is flag > oprd.toml > dataclass default. A flag that the user did not
pass arrives as ``None`` and does not override the file. Example ``oprd.toml``::

    [models]
    student = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    teacher = "hbx/JustRL-DeepSeek-1.5B"

    [data]
    prompts = "data/dapo_math_17k.parquet"

    [rollout]
    num_samples = 2
    max_new_tokens = 16384

    [teacher_cache]
    layers = "all"
    positions = "last_k"
    k = 2000

    [train]
    objective = "oprd"
    lr = 1e-5
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from oprd_cli.errors import OprdError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

T = TypeVar("T")


def load_run_config(run_dir: str | Path | None) -> dict[str, Any]:
    """The parsed ``oprd.toml`` of a run directory ({} when there is none)."""
    if run_dir is None:
        return {}
    path = Path(run_dir) / "oprd.toml"
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise OprdError(f"{path} is not valid TOML: {e}") from None


def write_initial_config(run_dir: str | Path, sections: dict[str, dict[str, Any]]) -> None:
    """Create ``oprd.toml`` recording how a run started; an existing file is never touched."""
    path = Path(run_dir) / "oprd.toml"
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# written by oprd when this run started; edit freely, CLI flags override it", ""]
    for name, values in sections.items():
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            continue
        lines.append(f"[{name}]")
        for k, v in values.items():
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    path.write_text("\n".join(lines))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def merge(cls: type[T], section: dict[str, Any] | None = None, **flags: Any) -> T:
    """Build dataclass ``cls``: flags that are not None win over the toml section."""
    flat = getattr(cls, "flat_fields", None)  # a grouped config (TrainConfig) with flat keys
    names = {f.name for f in (flat() if flat else fields(cls))}  # type: ignore[arg-type]
    section = section or {}
    unknown = set(section) - names
    if unknown:
        raise OprdError(
            f"unknown key(s) {', '.join(sorted(unknown))} in oprd.toml for {cls.__name__}; "
            f"known: {', '.join(sorted(names))}"
        )
    values = {k: v for k, v in section.items()}
    values.update({k: v for k, v in flags.items() if v is not None and k in names})
    obj = cls.from_flat(values) if flat else cls(**values)  # type: ignore[attr-defined]
    validate = getattr(obj, "validate", None)
    if validate:
        validate()
    return obj


def asdict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


# ------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    prompts: str | None = None
    split: str = "train"
    prompt_field: str | None = None
    answer_field: str | None = None
    id_field: str | None = None
    limit: int | None = None

    def validate(self) -> None:
        if self.limit is not None and self.limit <= 0:
            raise OprdError(f"--limit must be a positive number of prompts, got {self.limit}")


@dataclass
class TemplateConfig:
    """How a dataset record becomes a prompt string."""

    chat_template: bool = True
    system_prompt: str | None = None
    instruction: str = DEFAULT_INSTRUCTION


@dataclass
class SamplingConfig:
    num_samples: int = 2
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 1024
    seed: int = 0
    batch_size: int = 16
    record_topk: int = 0

    def validate(self) -> None:
        if self.num_samples < 1:
            raise OprdError(f"--num-samples must be at least 1, got {self.num_samples}")
        if self.temperature < 0:
            raise OprdError(f"--temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise OprdError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise OprdError(f"--top-k must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise OprdError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise OprdError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.record_topk < 0:
            raise OprdError(f"--record-topk must be >= 0, got {self.record_topk}")


@dataclass
class ModelConfig:
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
