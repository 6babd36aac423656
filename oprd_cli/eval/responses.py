"""Where responses come from: sampled with the rollout generation code (:func:`sample_responses`) or
read from a file generated elsewhere (:func:`load_responses_file`)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from oprd_cli.data import Record
from oprd_cli.errors import OprdError


def id_str(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v).strip()


def load_responses_file(path: str | Path, records: Sequence[Record]) -> list[dict[str, Any]]:
    """Read responses generated elsewhere: jsonl (or a json list) of ``{"id": ..., "response": "..."}``
    (optional ``num_tokens``, ``finished_by``, ``token_ids``). ``id`` is the dataset's id field, or the
    row number when the dataset has none (row numbers are accepted when no id matches). Several lines
    may share an id. Returns sample dicts for :func:`evaluate_responses` (with ``index`` set).
    """
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise OprdError(f"responses file {path} does not exist")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise OprdError(f"responses file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    rows: list[tuple[int, Any]] = []
    stripped = text.lstrip()
    if p.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise OprdError(f"{path} is not valid JSON: {e}") from None
        rows = [(i + 1, r) for i, r in enumerate(data)]
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise OprdError(f"{path} line {lineno} is not valid JSON ({e.msg}); expected "
                                '{"id": ..., "response": "..."} per line') from None
    if not rows:
        raise OprdError(f"responses file {path} is empty")
    for lineno, r in rows:
        if not isinstance(r, dict):
            raise OprdError(f"{path} line {lineno}: expected an object like {{\"id\": ..., \"response\": \"...\"}}")
        if "id" not in r or r["id"] is None:
            raise OprdError(f"{path} line {lineno} has no \"id\" (the dataset id or row number); fields: "
                            f"{', '.join(r) or 'none'}")
        if not isinstance(r.get("response"), str):
            raise OprdError(f"{path} line {lineno} has no text \"response\"; fields: {', '.join(r)}")
        fb = r.get("finished_by")
        if fb is not None and fb not in ("eos", "length", "stop"):
            raise OprdError(f"{path} line {lineno}: finished_by must be \"eos\", \"stop\" or \"length\", got {fb!r}")

    by_id = {r.id: r for r in records}
    by_row = {str(r.index): r for r in records}
    ids = [id_str(r["id"]) for _, r in rows]
    table = by_id
    unknown = sorted({i for i in ids if i not in by_id}, key=lambda x: (len(x), x))
    if unknown and all(i in by_row for i in ids):
        table, unknown = by_row, []
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        example = ", ".join(repr(r.id) for r in records[:3])
        raise OprdError(f"{path}: {len(unknown)} {'id is' if len(unknown) == 1 else 'ids are'} not in the dataset: {shown} "
                        f"(dataset ids look like {example}; with --limit, only the first {len(records)} rows count)")
    out = []
    for (_, r), rid in zip(rows, ids):
        s = {"index": table[rid].index, "response": r["response"]}
        for key in ("num_tokens", "finished_by", "token_ids"):
            if r.get(key) is not None:
                s[key] = r[key]
        out.append(s)
    return out


def sample_responses(backend, tokenizer, records: Sequence[Record], sampling, template,
                     description: str = "sampling") -> tuple[list[dict[str, Any]], Any]:
    """Sample ``sampling.num_samples`` responses per record with the rollout generation code
    (:func:`oprd_cli.rollout.generate_for_records`: same prompt rendering, same sampler).

    Returns (one dict per sample for :func:`evaluate_responses`, the ``GenerationResult``).
    ``num_tokens`` counts every generated token, the final EOS included (as the rollout store
    does); ``token_ids`` (for Dist-4g) leave the final EOS out.
    """
    from oprd_cli.rollout import generate_for_records

    result = generate_for_records(backend, tokenizer, list(records), template, sampling, description=description)
    eos = {int(e) for e in getattr(backend, "eos_ids", [])}
    out: list[dict[str, Any]] = []
    for (rec, _ids), group in zip(result.prompts, result.samples):
        for s in group:
            ids = [int(t) for t in s.response_ids]
            body = ids[:-1] if s.finish_reason == "eos" and ids and ids[-1] in eos else ids
            out.append({"index": rec.index, "response": s.text, "num_tokens": len(ids),
                        "finished_by": s.finish_reason, "token_ids": body})
    return out, result


def responses_label(path: str | Path) -> str:
    """The model name a report of a ``--responses`` file gets when no model is named: the file's stem."""
    name = Path(str(path)).name
    for suffix in (".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".responses") or "responses"
