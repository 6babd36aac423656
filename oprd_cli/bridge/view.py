"""How the teacher reads a student rollout through a bridge: its input ids per sample and, per student
response position, the teacher sequence index whose hidden state is paired with it (or -1).

Same tokenizer: the teacher reads the student's ids and position ``t`` pairs with sequence index
``Lp + t`` (METHOD.md). Different tokenizers: the teacher reads the *text* of the prompt (re-rendered
from the rollout's recorded prompt source under the teacher's tokenizer and chat template) and of the
response (re-encoded by the teacher's fast tokenizer); student position ``t`` pairs with teacher
response position ``j`` whose token ends at the same character offset
(:func:`~oprd_cli.bridge.align.align_response_positions`), i.e. sequence index ``Lp_T + j``; positions
without a partner get -1 and are masked, never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from oprd_cli.bridge.align import align_response_positions, encode_with_offsets, offsets_for_ids
from oprd_cli.errors import OprdError

__all__ = ["TeacherView", "teacher_view"]


@dataclass
class TeacherView:
    """Per sample: ``ids[i]`` (int64, what the teacher reads) and ``index[i]`` (int64 ``[T_i]``: the
    teacher sequence index paired with student response position ``t``, -1 when unpaired)."""

    cross_tokenizer: bool
    ids: list[np.ndarray]
    index: list[np.ndarray]

    def aligned_fraction(self, starts=None, counts=None) -> float:
        """Fraction of student response positions (or of the stored ones, ``[start, start + count)``
        per sample) that have a teacher partner."""
        paired = total = 0
        for i, idx in enumerate(self.index):
            a = 0 if starts is None else int(starts[i])
            n = len(idx) if counts is None else int(counts[i])
            part = idx[a:a + n]
            paired += int((part >= 0).sum())
            total += len(part)
        return paired / total if total else 1.0


def _teacher_prompts(store, teacher_tok) -> list[np.ndarray]:
    """The rollout's prompts rendered under the teacher's tokenizer and template (one per prompt row)."""
    from oprd_cli.config import TemplateConfig
    from oprd_cli.data import load_records, render_prompt

    src = store.meta.get("prompts") or {}
    if not src.get("source"):
        raise OprdError(f"rollout store {store.path} does not record its prompt source; the teacher of another "
                        "tokenizer cannot re-render its prompts")
    try:
        records = load_records(src["source"], src.get("split") or "train", src.get("prompt_field"),
                               src.get("answer_field"), None, src.get("limit"))
    except OprdError as e:
        raise OprdError(f"cannot re-read the prompts of {store.path} for the teacher's template: {e}") from None
    by_index = {r.index: r for r in records}
    template = TemplateConfig(**(store.meta.get("template") or {}))
    out = []
    for di in store._load("prompt/dataset_index"):
        rec = by_index.get(int(di))
        if rec is None:
            raise OprdError(f"prompt row {int(di)} of {store.path} is not in {src['source']} any more")
        out.append(np.asarray(render_prompt(rec, teacher_tok, template), dtype=np.int64))
    return out


def teacher_view(store, arrays, student_tok, teacher_tok, student_digest: str, teacher_digest: str) -> TeacherView:
    """The :class:`TeacherView` of a rollout store (``arrays``: its :func:`load_arrays`)."""
    n = len(arrays)
    if student_digest == teacher_digest:
        ids = [np.concatenate([arrays.prompt_ids[i], arrays.response_ids[i]]) for i in range(n)]
        index = [len(arrays.prompt_ids[i]) + np.arange(len(arrays.response_ids[i]), dtype=np.int64) for i in range(n)]
        return TeacherView(False, ids, index)
    prompts = _teacher_prompts(store, teacher_tok)
    texts = store.texts()
    prompt_row = store._load("sample/prompt_row")
    ids, index = [], []
    for i in range(n):
        resp = arrays.response_ids[i]
        t_ids, t_off = encode_with_offsets(teacher_tok, texts[i])
        s_off = offsets_for_ids(student_tok, resp, texts[i])
        lp = prompts[int(prompt_row[i])]
        if s_off is None:  # the sampled ids do not spell the stored text: mask the sample
            pairs = np.full(len(resp), -1, dtype=np.int64)
        else:
            pairs = align_response_positions(s_off, t_off, n_student_positions=len(resp)).numpy()
        ids.append(np.concatenate([lp, np.asarray(t_ids, dtype=np.int64)]))
        index.append(np.where(pairs >= 0, pairs + len(lp), -1).astype(np.int64))
    return TeacherView(True, ids, index)
