"""Metrics over graded samples, and :func:`evaluate_responses`, which grades per-sample responses and
computes every metric into a report dict.

Metrics (fractions in [0, 1], per benchmark and per problem)
    ``avg_at_n``  mean accuracy over samples (per problem, then averaged over problems;
                  the plain sample mean when every problem has n samples);
    ``pass_at_k`` the unbiased estimator ``1 - C(n-c, k) / C(n, k)`` for k = 1, 2, 4, ..., n;
    ``best_at_n`` a problem counts when any of its samples is correct;
    ``maj_at_n``  the largest cluster of equivalent extracted answers is correct (answers are
                  clustered by the grader's equivalence among themselves, not via the gold);
    ``dist_4g``   unique 4-grams / all 4-grams over the responses (token ids when every
                  sample has them, whitespace words otherwise);
    ``mean_response_tokens`` and ``truncated_fraction`` (stopped by the length limit).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from oprd_cli.console import progress, warn
from oprd_cli.data import BENCHMARKS, Record
from oprd_cli.errors import OprdError
from oprd_cli.eval.extract import DEFAULT_EXTRACT, check_extract_mode, extract_answer, vote_key
from oprd_cli.eval.grade import DEFAULT_TIMEOUT_S, Grader
from oprd_cli.eval.report import REPORT_VERSION
from oprd_cli.eval.responses import id_str


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: ``1 - C(n-c, k) / C(n, k)``."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def k_values(n: int) -> list[int]:
    """1, 2, 4, ... below n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    if n >= 1:
        ks.append(n)
    return ks


def _ngram_rows(seq: Sequence[int], n: int):
    """The n-grams of one id sequence as rows of an opaque byte dtype (hashable by numpy)."""
    import numpy as np

    arr = np.asarray(seq, dtype=np.int64)
    if arr.size < n:
        return np.empty(0, dtype=np.dtype((np.void, 8 * n)))
    win = np.lib.stride_tricks.sliding_window_view(arr, n)
    return np.ascontiguousarray(win).view(np.dtype((np.void, 8 * n))).ravel()


def _as_ids(sequences: Iterable[Sequence], vocab: dict) -> list[list[int]]:
    out = []
    for seq in sequences:
        if len(seq) and isinstance(seq[0], (int,)) and not isinstance(seq[0], bool):
            out.append(list(seq))
        else:
            out.append([vocab.setdefault(w, len(vocab)) for w in seq])
    return out


def _count_unique(rows: list) -> tuple[int, int]:
    import numpy as np

    rows = [r for r in rows if r.size]
    if not rows:
        return 0, 0
    allrows = np.concatenate(rows)
    return int(np.unique(allrows).size), int(allrows.size)


def distinct_ngrams(sequences: Iterable[Sequence], n: int = 4) -> tuple[int, int]:
    """(unique n-grams, all n-grams) over sequences of tokens (ids or strings); n-grams never cross
    sequences."""
    ids = _as_ids(list(sequences), {})
    return _count_unique([_ngram_rows(s, n) for s in ids])


def dist_n(sequences: Iterable[Sequence], n: int = 4) -> float | None:
    """Unique n-grams over all n-grams (None when there are none)."""
    return _ratio(*distinct_ngrams(sequences, n))


def majority_vote(answers: Sequence[str | None], correct: Sequence[bool],
                  equivalent: Callable[[str, str], bool] | None = None) -> tuple[str | None, bool]:
    """(winning answer, whether it is correct): maj@n by clustering the sampled answers among themselves.

    Answers with the same :func:`vote_key` (exact value, else normalised text) are one cluster without
    a comparison; clusters are then merged when ``equivalent(answer, representative)`` holds (the grader's
    equivalence between two extracted answers; default: only the vote key), where a cluster's
    representative is its first-seen member. The gold answer plays no part in the clustering, so two
    answers that each grade correct but are not equivalent to each other are two clusters. The largest
    cluster wins (ties: the cluster seen first) and is scored by its representative's grade. Samples
    without an answer do not vote.
    """
    by_key: dict[str, int] = {}
    clusters: list[list[int]] = []  # sample indices; clusters[c][0] is the representative
    for i, a in enumerate(answers):
        if a is None:
            continue
        key = vote_key(a)
        c = by_key.get(key)
        if c is None and equivalent is not None:
            c = next((j for j, members in enumerate(clusters) if equivalent(a, answers[members[0]])), None)
        if c is None:
            c = len(clusters)
            clusters.append([])
        by_key.setdefault(key, c)
        clusters[c].append(i)
    if not clusters:
        return None, False
    best = max(clusters, key=lambda members: (len(members), -members[0]))
    return answers[best[0]], bool(correct[best[0]])


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _sample_index(s: Mapping, by_index: Mapping[int, Record], by_id: Mapping[str, Record]) -> int:
    if "index" in s and s["index"] is not None:
        idx = int(s["index"])
        if idx not in by_index:
            raise OprdError(f"response for problem index {idx}, but the dataset has no such row")
        return idx
    if "id" in s and s["id"] is not None:
        rid = id_str(s["id"])
        if rid not in by_id:
            raise OprdError(f"response for id {rid!r}, which is not in the dataset")
        return by_id[rid].index
    raise OprdError("a response names neither a problem index nor an id")


def _group_by_problem(records: Sequence[Record], responses: Sequence[Mapping[str, Any]]
                      ) -> tuple[list[Record], dict[int, list[Mapping]]]:
    """The problems that have responses (in dataset order) and their samples; problems without a
    reference answer among them are an error, problems without responses a warning."""
    if not records:
        raise OprdError("no problems to evaluate")
    if not responses:
        raise OprdError("no responses to grade (did sampling produce nothing, or is the responses file empty?)")
    by_index = {r.index: r for r in records}
    by_id = {r.id: r for r in records}
    missing_answer = {r.id for r in records if r.answer is None or not str(r.answer).strip()}
    grouped: dict[int, list[Mapping]] = {}
    for s in responses:
        if not isinstance(s.get("response"), str):
            raise OprdError(f"a response is not text: {str(s)[:120]}")
        grouped.setdefault(_sample_index(s, by_index, by_id), []).append(s)
    evaluated = [r for r in records if r.index in grouped]
    skipped = len(records) - len(evaluated)
    if skipped:
        warn(f"{skipped} of {len(records)} problems have no responses and are left out")
    bad = [r.id for r in evaluated if r.id in missing_answer]
    if bad:
        raise OprdError(f"problems without a reference answer: {', '.join(bad[:10])}"
                        f"{' ...' if len(bad) > 10 else ''}; fix the data or pass --answer-field")
    return evaluated, grouped


@dataclass
class _Scorer:
    """Grades samples one by one and keeps what the whole report needs (the word vocabulary for
    Dist-4g, how many lengths fell back to whitespace words)."""

    grader: Grader
    extract: str
    tokenizer: Any
    max_new_tokens: int | None
    use_ids: bool  # Dist-4g over token ids (every sample has them) rather than words
    vocab: dict[str, int] = field(default_factory=dict)
    word_counted: int = 0

    def length(self, s: Mapping, text: str) -> int:
        ntok = s.get("num_tokens")
        if ntok is None and s.get("token_ids") is not None:
            ntok = len(s["token_ids"])
        if ntok is None and self.tokenizer is not None:
            ntok = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if ntok is None:
            ntok = len(text.split())
            self.word_counted += 1
        return int(ntok)

    def truncated(self, s: Mapping) -> bool | None:
        finished = s.get("finished_by")
        if finished is not None:
            return finished == "length"
        if self.max_new_tokens is not None and s.get("num_tokens") is not None:
            return int(s["num_tokens"]) >= self.max_new_tokens
        return None

    def sample(self, rec: Record, j: int, s: Mapping, gold: str) -> dict[str, Any]:
        """One graded sample row (``_trunc`` and ``_rows`` are for the problem's metrics)."""
        text = s["response"]
        try:
            ans = extract_answer(text, self.extract)
        except Exception:  # noqa: BLE001
            ans = None
        g = self.grader.grade(ans, gold)
        ntok = self.length(s, text)
        trunc = self.truncated(s)
        seq = [int(t) for t in s["token_ids"]] if self.use_ids else \
            [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]
        return {"index": rec.index, "id": rec.id, "sample": j, "extracted": ans, "correct": g.correct,
                "grade": g.status, "num_tokens": ntok, "finished_by": s.get("finished_by"), "response": text,
                "_trunc": trunc, "_rows": _ngram_rows(seq, 4)}

    def problem(self, rec: Record, samples: Sequence[Mapping], advance: Callable[[], None]
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Grade one problem's samples: (its per-problem entry, its sample rows)."""
        gold = str(rec.answer).strip()
        rows = []
        for j, s in enumerate(samples):
            rows.append(self.sample(rec, j, s, gold))
            advance()
        answers = [r["extracted"] for r in rows]
        correct = [r["correct"] for r in rows]
        lengths = [r["num_tokens"] for r in rows]
        seqs = [r.pop("_rows") for r in rows]
        known = [t for t in (r.pop("_trunc") for r in rows) if t is not None]
        n, c = len(correct), sum(correct)
        maj_answer, maj_ok = majority_vote(answers, correct, self.grader.equivalent)
        entry = {
            "index": rec.index, "id": rec.id, "answer": gold, "n": n, "num_correct": c,
            "accuracy": c / n, "best": c > 0, "maj_answer": maj_answer, "maj_correct": maj_ok,
            "pass_at_k": {str(k): pass_at_k(n, c, k) for k in k_values(n)},
            "no_answer": sum(a is None for a in answers),
            "dist_4g": _ratio(*_count_unique(seqs)), "mean_response_tokens": _mean(lengths),
            "truncated_fraction": _mean([float(t) for t in known]) if known else None,
            "_seqs": seqs, "_truncs": known, "_lengths": lengths,
        }
        return entry, rows


def _grade_all(scorer: _Scorer, evaluated: Sequence[Record], grouped: Mapping[int, list[Mapping]],
               show_progress: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Grade every sample under a progress bar: (per-problem entries, sample rows)."""
    per_problem: list[dict[str, Any]] = []
    samples_out: list[dict[str, Any]] = []
    bar = progress(transient=True) if show_progress else None
    task = bar.add_task("grading", total=sum(len(grouped[r.index]) for r in evaluated)) if bar else None
    if bar:
        bar.start()
    advance = (lambda: bar.advance(task)) if bar else (lambda: None)
    try:
        for rec in evaluated:
            entry, rows = scorer.problem(rec, grouped[rec.index], advance)
            per_problem.append(entry)
            samples_out.extend(rows)
    finally:
        if bar:
            bar.stop()
    return per_problem, samples_out


def _length_unit(word_counted: int, num_samples: int) -> str:
    if not word_counted:
        return "tokens"
    return "words" if word_counted == num_samples else "tokens+words"


def _benchmark_metrics(per_problem: list[dict[str, Any]], num_samples: int, use_ids: bool,
                       word_counted: int) -> dict[str, Any]:
    """The benchmark-level metrics over the per-problem entries (whose private keys are removed here)."""
    n_min = min(p["n"] for p in per_problem)
    n_max = max(p["n"] for p in per_problem)
    if n_min != n_max:
        warn(f"problems have between {n_min} and {n_max} samples; pass@k uses k <= {n_min}")
    unique, all_grams = _count_unique([rows for p in per_problem for rows in p["_seqs"]])
    all_truncs = [t for p in per_problem for t in p["_truncs"]]
    all_lengths = [x for p in per_problem for x in p["_lengths"]]
    for p in per_problem:
        for key in ("_seqs", "_truncs", "_lengths"):
            del p[key]
    return {
        "num_problems": len(per_problem),
        "num_samples": num_samples,
        "n": n_min,
        "avg_at_n": _mean([p["accuracy"] for p in per_problem]),
        "pass_at_k": {str(k): _mean([pass_at_k(p["n"], p["num_correct"], k) for p in per_problem])
                      for k in k_values(n_min)},
        "best_at_n": _mean([float(p["best"]) for p in per_problem]),
        "maj_at_n": _mean([float(p["maj_correct"]) for p in per_problem]),
        "dist_4g": unique / all_grams if all_grams else None,
        "dist_4g_unit": "token_ids" if use_ids else "words",
        "mean_response_tokens": _mean(all_lengths),
        "length_unit": _length_unit(word_counted, num_samples),
        "truncated_fraction": _mean([float(t) for t in all_truncs]) if all_truncs else None,
        "no_answer_fraction": sum(p["no_answer"] for p in per_problem) / num_samples,
    }


def evaluate_responses(
    records: Sequence[Record],
    responses: Sequence[Mapping[str, Any]],
    bench_name: str,
    model_name: str,
    *,
    integer_answers: bool | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    max_new_tokens: int | None = None,
    tokenizer=None,
    run_dir: str | Path | None = None,
    step: int | None = None,
    data_source: str | None = None,
    sampling: Mapping[str, Any] | None = None,
    grader: Grader | None = None,
    show_progress: bool = True,
    extract: str = DEFAULT_EXTRACT,
) -> dict[str, Any]:
    """Grade per-sample responses and compute every metric.

    ``responses``: one dict per sample with ``index`` (the problem's ``Record.index``; or ``id``,
    its ``Record.id``), ``response`` (text), optional ``num_tokens``, ``finished_by``
    (``"eos"``/``"length"``/``"stop"``) and ``token_ids`` (used for Dist-4g when every sample has them).
    ``integer_answers`` defaults to the registry's value for ``bench_name`` (AIME: True).
    ``tokenizer`` (optional) counts tokens of samples without ``num_tokens``; without it those
    are counted in whitespace words. A sample without ``finished_by`` counts as truncated when
    ``num_tokens >= max_new_tokens``. Problems without responses are left out with a warning.
    ``extract``: how answers are found (:func:`extract_answer`; recorded as ``grading.extract``).

    Returns the report dict (schema in the module docs of :func:`write_report`); the per-sample
    rows are under ``"samples"`` (``write_report`` moves them to the responses jsonl).
    """
    check_extract_mode(extract)
    evaluated, grouped = _group_by_problem(records, responses)
    if integer_answers is None:
        integer_answers = BENCHMARKS[bench_name].integer_answers if bench_name in BENCHMARKS else False
    own_grader = grader is None
    if grader is None:
        grader = Grader(timeout=timeout, integer_answers=integer_answers)
    t0 = time.perf_counter()
    counts0 = (grader.timeouts, grader.errors, grader.math_verify_calls)
    scorer = _Scorer(grader, extract, tokenizer, max_new_tokens,
                     use_ids=all(s.get("token_ids") is not None for s in responses))
    try:
        per_problem, samples_out = _grade_all(scorer, evaluated, grouped, show_progress)
    finally:
        if own_grader:
            grader.close()
    seconds = time.perf_counter() - t0

    report: dict[str, Any] = {
        "oprd_report_version": REPORT_VERSION,
        "bench": bench_name,
        "model": model_name,
        "run_dir": str(run_dir) if run_dir is not None else None,
        "step": int(step) if step is not None else None,
        "data": data_source,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **_benchmark_metrics(per_problem, len(samples_out), scorer.use_ids, scorer.word_counted),
        "sampling": dict(sampling) if sampling else None,
        "grading": {
            "extract": extract,
            "integer_answers": bool(integer_answers),
            "timeout_s": grader.timeout,
            "timeouts": grader.timeouts - counts0[0],
            "errors": grader.errors - counts0[1],
            "math_verify_calls": grader.math_verify_calls - counts0[2],
            "seconds": round(seconds, 3),
        },
        "per_problem": per_problem,
        "samples": samples_out,
    }
    g = report["grading"]
    if g["timeouts"] or g["errors"]:
        warn(f"grading: {g['timeouts']} comparisons timed out and {g['errors']} raised; they count as wrong")
    return report
