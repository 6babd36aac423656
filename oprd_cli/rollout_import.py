"""Responses from outside generators (vLLM, SGLang, any engine) imported as a rollout store.

``oprd rollout --print-prompts PROMPTS.jsonl`` writes the prompts exactly as ``oprd rollout`` renders
them (chat template, system prompt, instruction; prompts too long for the student's context left out
by the same rule), one JSON line each::

    {"prompt_index": 0, "dataset_index": 17, "id": "...", "prompt_token_ids": [...]}

An engine samples ``--num-samples`` responses for each and writes one line per response::

    {"prompt_index": 0, "sample_index": 1, "token_ids": [...], "logprobs": [...], "finish_reason": "stop"}

``oprd rollout --import ENGINE.jsonl`` (same ``--prompts``, template and sampling flags) checks the
lines against the rendered prompts (every prompt/sample pair exactly once, token ids inside the
vocabulary, one log-prob per token, a known finish reason, and the prompt ids when a line repeats
them) and writes the rollout store through the ordinary writer. Any mismatch is one line naming the
line of the file. ``finish_reason`` ``stop``/``eos`` means the response ended on EOS (the EOS token
is part of ``token_ids`` as engines report it when asked to keep it; it is not added), ``length`` the
limit. ``logprobs`` are the sampled tokens' log-probabilities under the engine's sampling
distribution (vLLM: ``SamplingParams(logprobs=0)`` gives exactly the sampled token's).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from oprd_cli.errors import OprdError

FINISH = {"stop": "eos", "eos": "eos", "length": "length"}
FIELDS = ("prompt_index", "sample_index", "token_ids", "logprobs", "finish_reason")


def kept_prompts(records, tokenizer, template, ctx: int | None):
    """``(kept [(record, ids)], skipped [record])``: rendered prompts, those that fit ``ctx`` kept."""
    from oprd_cli.data import render_prompt

    kept, skipped = [], []
    for r in records:
        ids = render_prompt(r, tokenizer, template)
        if ctx is not None and len(ids) >= ctx:
            skipped.append(r)
        else:
            kept.append((r, ids))
    return kept, skipped


def write_prompts(path: str, records, tokenizer, template, ctx: int | None) -> int:
    """Write the rendered prompts (``--print-prompts``); returns how many."""
    from oprd_cli.io import atomic_write_text

    kept, _ = kept_prompts(records, tokenizer, template, ctx)
    lines = [json.dumps({"prompt_index": i, "dataset_index": r.index, "id": r.id, "prompt_token_ids": list(map(int, ids))})
             for i, (r, ids) in enumerate(kept)]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def print_prompts(path: str, model: str | None, run_dir, data, template, trust_remote_code: bool = False) -> int:
    """``oprd rollout --print-prompts``: the student's tokenizer and context (no weights loaded)."""
    from oprd_cli.console import err_console

    from transformers import AutoConfig

    from oprd_cli import models as M
    from oprd_cli.data import load_records
    from oprd_cli.rollout import resolve_student

    name, _ = resolve_student(model, str(run_dir) if run_dir else None)
    if data.prompts is None:
        raise OprdError("pass --prompts (a hub dataset id or a .jsonl/.json/.parquet file)")
    records = load_records(data.prompts, data.split, data.prompt_field, data.answer_field, data.id_field, data.limit)
    tok = M.load_tokenizer(name, trust_remote_code)
    cfg = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    ctx = getattr(getattr(cfg, "text_config", None) or cfg, "max_position_embeddings", None)
    n = write_prompts(path, records, tok, template, int(ctx) if ctx else None)
    err_console.print(f"wrote {n} rendered prompts to {path}")
    return n


def _fail(path: str, lineno: int, what: str):
    raise OprdError(f"{path} line {lineno}: {what}")


def read_engine_lines(path: str) -> list[tuple[int, dict]]:
    """The (line number, object) of every non-empty line, each with the required fields."""
    p = Path(path)
    if not p.is_file():
        raise OprdError(f"--import file {path} does not exist")
    out = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                _fail(path, n, f"not JSON ({e.msg})")
            if not isinstance(obj, dict):
                _fail(path, n, "not a JSON object")
            missing = [k for k in FIELDS if k not in obj]
            if missing:
                _fail(path, n, f"missing {', '.join(missing)} (each line needs {', '.join(FIELDS)})")
            out.append((n, obj))
    if not out:
        raise OprdError(f"--import file {path} has no responses")
    return out


class ImportBackend:
    """A generation backend whose samples come from an engine's JSONL (see the module doc)."""

    name = "import"

    def __init__(self, path: str, tokenizer, context_length: int | None, vocab_size: int,
                 eos_ids: list[int] | None = None):
        self.path, self.tokenizer, self.vocab_size = str(path), tokenizer, int(vocab_size)
        self.eos_ids = list(eos_ids or [])
        self.context_length = context_length
        self.lines = read_engine_lines(self.path)

    def _sample(self, n: int, obj: dict, prompt_ids: list[int]):
        from oprd_cli.rollout import GeneratedSample

        if "prompt_token_ids" in obj and list(obj["prompt_token_ids"]) != list(prompt_ids):
            _fail(self.path, n, f"prompt_token_ids differ from prompt {obj['prompt_index']} as oprd renders it "
                                "(other --prompts, template or tokenizer? see --print-prompts)")
        ids, lps = obj["token_ids"], obj["logprobs"]
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
            _fail(self.path, n, "token_ids must be a non-empty list of integers")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            _fail(self.path, n, f"token id {max(ids) if max(ids) >= self.vocab_size else min(ids)} is outside the "
                                f"student's vocabulary (0..{self.vocab_size - 1})")
        if not isinstance(lps, list) or len(lps) != len(ids):
            _fail(self.path, n, f"{len(lps) if isinstance(lps, list) else 'no'} logprobs for {len(ids)} token_ids")
        lps = [(-math.inf if v is None else v) for v in lps]
        if not all(isinstance(v, (int, float)) and v <= 1e-4 and not math.isnan(v) for v in lps):
            _fail(self.path, n, "logprobs must be numbers <= 0")
        reason = FINISH.get(str(obj["finish_reason"]))
        if reason is None:
            _fail(self.path, n, f"finish_reason {obj['finish_reason']!r} is not one of {', '.join(FINISH)}")
        arr = np.asarray(ids, dtype=np.int32)
        return GeneratedSample(response_ids=arr, logprobs=np.minimum(np.asarray(lps, dtype=np.float32), 0.0),
                               finish_reason=reason,
                               text=self.tokenizer.decode(arr.tolist(), skip_special_tokens=True))

    def generate(self, prompts: list[list[int]], sampling, on_sequences_done=None):
        k = sampling.num_samples
        if sampling.record_topk:
            raise OprdError("--record-topk needs the student's logits; imported responses do not have them")
        got: dict[tuple[int, int], object] = {}
        for n, obj in self.lines:
            key = (obj["prompt_index"], obj["sample_index"])
            if not all(isinstance(v, int) for v in key):
                _fail(self.path, n, "prompt_index and sample_index must be integers")
            if not (0 <= key[0] < len(prompts)) or not (0 <= key[1] < k):
                _fail(self.path, n, f"prompt_index {key[0]}, sample_index {key[1]} outside the {len(prompts)} "
                                    f"rendered prompts x {k} samples (--prompts, --limit, --num-samples)")
            if key in got:
                _fail(self.path, n, f"prompt_index {key[0]}, sample_index {key[1]} appears twice")
            got[key] = self._sample(n, obj, prompts[key[0]])
        if len(got) != len(prompts) * k:
            missing = next((p, j) for p in range(len(prompts)) for j in range(k) if (p, j) not in got)
            raise OprdError(f"{self.path} has {len(got)} responses, {len(prompts)} prompts x {k} samples need "
                            f"{len(prompts) * k} (first missing: prompt_index {missing[0]}, sample_index {missing[1]})")
        if on_sequences_done:
            on_sequences_done(len(got), sum(len(s.response_ids) for s in got.values()))
        return [[got[(p, j)] for j in range(k)] for p in range(len(prompts))]
