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
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from oprd_cli.errors import OprdError
from oprd_cli.io import atomic_write_text
from oprd_cli.urlpath import as_path

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
    path = as_path(run_dir) / "oprd.toml"  # a local folder or an fsspec URL
    if not path.exists():
        return {}
    try:
        cfg = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise OprdError(f"{path} is not valid TOML: {e}") from None
    unknown = sorted(k for k, v in cfg.items() if k not in KNOWN_SECTIONS or not isinstance(v, dict))
    if unknown:
        raise OprdError(f"{path}: unknown section or top-level key {', '.join(map(repr, unknown))}; sections: "
                        f"{', '.join(sorted(KNOWN_SECTIONS))}")
    return cfg


def write_initial_config(run_dir: str | Path, sections: dict[str, dict[str, Any]]) -> None:
    """Create ``oprd.toml`` recording how a run started; an existing file is never touched."""
    path = as_path(run_dir) / "oprd.toml"  # a local folder or an fsspec URL
    if path.exists():
        return
    lines = ["# written by oprd when this run started; edit freely, CLI flags override it", ""]
    for name, values in sections.items():
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            continue
        lines.append(f"[{name}]")
        for k, v in values.items():
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    atomic_write_text(str(path), "\n".join(lines))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


# toml section -> the dataclass it fills ("module:Class", imported only when needed: the train and teacher
# modules import torch, which `oprd --help` should not wait for)
SECTIONS = {
    "data": "oprd_cli.config:DataConfig",
    "template": "oprd_cli.config:TemplateConfig",
    "rollout": "oprd_cli.config:SamplingConfig",
    "teacher_cache": "oprd_cli.teacher:TeacherCacheConfig",
    "train": "oprd_cli.train.config:TrainConfig",
    "bench_loss": "oprd_cli.bench.loss:BenchLossConfig",  # no toml section: flags over the dataclass only
}


# every table oprd.toml may hold: the dataclass sections, the models and eval's sampling
KNOWN_SECTIONS = {*(k for k in SECTIONS if k != "bench_loss"), "models", "eval"}


def section_class(section: str) -> type:
    """The dataclass of an ``oprd.toml`` section (see :data:`SECTIONS`)."""
    import importlib

    module, name = SECTIONS[section].split(":")
    return getattr(importlib.import_module(module), name)


def field_types(cls: type) -> dict[str, Any]:
    """Flat field name -> type of a configuration dataclass; fields that are dataclasses themselves
    (sub-groups) contribute their own fields, so the toml keys and flags stay flat."""
    import typing

    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        t = hints.get(f.name, Any)
        if dataclasses.is_dataclass(t):
            out.update(field_types(t))
        else:
            out[f.name] = t
    return out


def field_default(cls: type, name: str) -> Any:
    """The default of (flat) field ``name`` of ``cls``."""
    obj = cls()
    if name in {f.name for f in fields(obj)}:  # type: ignore[arg-type]
        return getattr(obj, name)
    for f in fields(obj):  # type: ignore[arg-type]
        sub = getattr(obj, f.name)
        if dataclasses.is_dataclass(sub) and name in field_types(type(sub)):
            return field_default(type(sub), name)
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def format_default(value: Any) -> str:
    """How ``--help`` shows a default: on/off for booleans, none for None, the value otherwise."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    if value == "":
        return "''"
    if isinstance(value, float):  # 1e-05 -> 1e-5
        return re.sub(r"e([+-])0*(\d)", r"e\1\2", repr(value)).replace("e+", "e")
    return str(value)


def help_default(section: str, name: str) -> str:
    """How ``--help`` shows the default of field ``name`` of the dataclass of ``section``: the one source
    of the defaults the CLI shows (it fills its ``<section.name>`` placeholders with this)."""
    return format_default(field_default(section_class(section), name))


def _type_ok(value: Any, t: Any) -> bool:
    import types
    import typing

    if t is Any:
        return True
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(t))
    if t is type(None):
        return value is None
    if origin is not None:  # list[...], dict[...]
        return isinstance(value, origin)
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, t) if isinstance(t, type) else True


def _type_name(t: Any) -> str:
    return str(t).replace("typing.", "").replace("<class '", "").replace("'>", "")


def merge(cls: type[T], section: dict[str, Any] | None = None, *, defaults: dict[str, Any] | None = None,
          **flags: Any) -> T:
    """The one merge path of every command: ``defaults`` <- the ``oprd.toml`` section <- flags.

    ``defaults`` override the dataclass defaults where a command has its own (eval sampling, what a
    loop's objective needs in the cache); flags that are None were not given and do not override.
    An unknown toml key or a value of the wrong type is one line naming the key.
    """
    types_ = field_types(cls)
    section = section or {}
    unknown = set(section) - set(types_)
    if unknown:
        raise OprdError(
            f"unknown key(s) {', '.join(sorted(unknown))} in oprd.toml for {cls.__name__}; "
            f"known: {', '.join(sorted(types_))}"
        )
    for k, v in section.items():
        if not _type_ok(v, types_[k]):
            raise OprdError(f"oprd.toml key {k} = {v!r} for {cls.__name__} should be {_type_name(types_[k])}")
    values = {k: v for k, v in (defaults or {}).items() if k in types_}
    values.update(section)
    values.update({k: v for k, v in flags.items() if v is not None and k in types_})
    from_flat = getattr(cls, "from_flat", None)
    obj = from_flat(values) if from_flat is not None else cls(**values)
    validate = getattr(obj, "validate", None)
    if validate:
        validate()
    return obj


def resolve(run_dir: str | Path | None, **flags_by_section: dict[str, Any]) -> dict[str, Any]:
    """The configuration a command runs with: for each named ``oprd.toml`` section (see :data:`SECTIONS`),
    its dataclass from the defaults <- ``RUN/oprd.toml`` <- the flags given for it (:func:`merge`)."""
    cfg = load_run_config(run_dir)
    return {name: merge(section_class(name), cfg.get(name), **flags) for name, flags in flags_by_section.items()}


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
