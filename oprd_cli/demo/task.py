"""The demo's synthetic task: multi-step addition and subtraction with a boxed answer.

A problem is a chain of small operations, e.g. ``7+5-3+8=?``; the reference solution
writes one step per line and ends with the answer in ``\\boxed{}``::

    7+5=12
    12-3=9
    9+8=17
    \\boxed{17}

Each step depends on the previous result, so a model that gets a single step right
with probability ``p`` solves an ``n``-step problem with probability about ``p**n``:
small per-step differences between a student and its teacher become large accuracy
differences, and every token of the chain carries a verifiable signal.

The vocabulary is tiny (digits, ``+ - = ? \\boxed{ }``, newlines and the few words
of the instruction), so a tiny model learns the task in a few hundred CPU steps.

Problems are drawn from a seeded generator without repetition and assigned to the
splits in a fixed order (held-out eval first, then validation, distillation prompts
and train), so the splits never share a problem, and the held-out eval set of a seed
does not change when the other splits grow. The held-out eval split is never used
to train or to tune anything (the student checkpoint is chosen on ``val``).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from oprd_cli.config import TemplateConfig
from oprd_cli.io import atomic_write_text
from oprd_cli.errors import OprdError

# How a demo record becomes a prompt: no chat template (shorter sequences), and a short
# instruction. The SFT data, the rollouts, the teacher cache and the eval must all use
# exactly this, which ``demo_template()`` hands out.
DEMO_INSTRUCTION = "Solve step by step."
SPLITS = ("eval", "val", "prompts", "train")

_EXPR = re.compile(r"^\s*(\d+(?:\s*[+\-]\s*\d+)+)\s*(?:=\s*\?)?\s*$")
_TOKEN = re.compile(r"\d+|[+\-]")


def demo_template() -> TemplateConfig:
    """The TemplateConfig every demo stage uses (prompt = ``problem + "\\n" + instruction``)."""
    return TemplateConfig(chat_template=False, system_prompt=None, instruction=DEMO_INSTRUCTION)


@dataclass(frozen=True)
class TaskConfig:
    """Difficulty knobs of the task.

    ``min_steps``..``max_steps`` operations per problem; operands in
    ``1..max_operand``; every running total stays in ``0..max_value`` (an operation
    that would leave that range is flipped to the other sign).
    """

    min_steps: int = 3
    max_steps: int = 4
    max_operand: int = 9
    max_value: int = 19

    def validate(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise OprdError(f"task steps must satisfy 1 <= min_steps <= max_steps, got {self.min_steps}..{self.max_steps}")
        if self.max_operand < 1:
            raise OprdError(f"max_operand must be at least 1, got {self.max_operand}")
        if self.max_value < 2 * self.max_operand:
            raise OprdError(
                f"max_value ({self.max_value}) must be at least 2*max_operand ({2 * self.max_operand}) so that "
                "every step has a valid operation"
            )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SplitSizes:
    eval: int = 200
    val: int = 128
    prompts: int = 512
    train: int = 20000

    def as_dict(self) -> dict[str, int]:
        return {"eval": self.eval, "val": self.val, "prompts": self.prompts, "train": self.train}


# ------------------------------------------------------------------- problems
def parse_problem(problem: str) -> tuple[list[int], list[str]]:
    """Operands and operators of a problem text such as ``7+5-3+8=?``."""
    m = _EXPR.match(problem)
    if not m:
        raise OprdError(f"not a demo problem: {problem!r} (expected e.g. '7+5-3+8=?')")
    toks = _TOKEN.findall(m.group(1))
    operands = [int(t) for t in toks[0::2]]
    ops = toks[1::2]
    return operands, ops


def format_problem(operands: list[int], ops: list[str]) -> str:
    expr = str(operands[0]) + "".join(f"{o}{b}" for o, b in zip(ops, operands[1:]))
    return f"{expr}=?"


def answer_of(problem: str) -> int:
    """The value of the problem's expression."""
    operands, ops = parse_problem(problem)
    total = operands[0]
    for o, b in zip(ops, operands[1:]):
        total = total + b if o == "+" else total - b
    return total


def solution_text(problem: str) -> str:
    """The reference response (what SFT trains on, without the EOS token).

    It starts with a newline because the prompt ends with the instruction, and ends
    with ``\\boxed{answer}``.
    """
    operands, ops = parse_problem(problem)
    lines = []
    total = operands[0]
    for o, b in zip(ops, operands[1:]):
        new = total + b if o == "+" else total - b
        lines.append(f"{total}{o}{b}={new}")
        total = new
    lines.append(f"\\boxed{{{total}}}")
    return "\n" + "\n".join(lines)


def random_problem(rng: random.Random, cfg: TaskConfig) -> str:
    steps = rng.randint(cfg.min_steps, cfg.max_steps)
    total = rng.randint(1, cfg.max_operand)
    operands, ops = [total], []
    for _ in range(steps):
        b = rng.randint(1, cfg.max_operand)
        o = rng.choice("+-")
        if o == "+" and total + b > cfg.max_value:
            o = "-"
        elif o == "-" and total - b < 0:
            o = "+"
        total = total + b if o == "+" else total - b
        operands.append(b)
        ops.append(o)
    return format_problem(operands, ops)


def generate_splits(seed: int, cfg: TaskConfig = TaskConfig(), sizes: SplitSizes = SplitSizes()) -> dict[str, list[dict]]:
    """Disjoint splits of unique problems, as records ``{"id", "problem", "answer"}``.

    Deterministic in (seed, cfg, sizes); problems are assigned in the order of
    ``SPLITS``, so the eval split of a seed does not depend on the other sizes.
    Raises OprdError when the task has fewer distinct problems than asked for.
    """
    cfg.validate()
    rng = random.Random(f"oprd-demo-task:{seed}")
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    want = sizes.as_dict()
    total_wanted = sum(want.values())
    misses = 0
    for split in SPLITS:
        recs: list[dict] = []
        while len(recs) < want[split]:
            p = random_problem(rng, cfg)
            if p in seen:
                misses += 1
                if misses > 50 * total_wanted + 10000:
                    raise OprdError(
                        f"the demo task ({cfg}) has too few distinct problems for {total_wanted} records; "
                        "raise max_steps/max_operand or ask for fewer"
                    )
                continue
            seen.add(p)
            recs.append({"id": f"{split}-{len(recs):05d}", "problem": p, "answer": str(answer_of(p))})
        out[split] = recs
    return out


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return path


def write_splits(splits: dict[str, list[dict]], out_dir: str | Path) -> dict[str, Path]:
    """``out_dir/<split>.jsonl`` for each split; returns the paths."""
    return {name: write_jsonl(recs, Path(out_dir) / f"{name}.jsonl") for name, recs in splits.items()}


_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (None when there is none)."""
    found = _BOXED.findall(text)
    return found[-1].strip() if found else None


def is_correct(response: str, answer: str | int) -> bool:
    """Exact match of the last boxed answer (integers, so no equivalence checking is needed)."""
    got = extract_boxed(response)
    return got is not None and got == str(answer).strip()


__all__ = ["DEMO_INSTRUCTION", "SPLITS", "TaskConfig", "SplitSizes", "demo_template", "parse_problem",
           "format_problem", "answer_of", "solution_text", "random_problem", "generate_splits", "write_jsonl",
           "write_splits", "extract_boxed", "is_correct"]
