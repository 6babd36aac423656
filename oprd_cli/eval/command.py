"""Evaluation: answer extraction, grading, metrics and reports.

The pipeline is ``records`` (from :mod:`oprd_cli.data`) + per-sample responses
-> :func:`evaluate_responses` -> a report dict -> :func:`write_report` /
:func:`print_report`. Sampling from a model is a thin layer on top
(:func:`sample_responses`, wired by the CLI on :mod:`oprd_cli.rollout`); graded
responses generated elsewhere come in through :func:`load_responses_file`.

Grading
    The answer is the content of the last complete ``\\boxed{...}`` / ``\\fbox{...}``
    (nested braces allowed), else the last ``Answer: ...`` line (``extract="boxed"``, the
    default); ``extract="lenient"`` also takes "the answer is X" and the last number or math of
    the final paragraph. It is compared with the reference by a cheap exact check first (``025`` ==
    ``25``, ``142.0`` == ``142``, ``\\frac{1}{2}`` == ``0.5``; two plain numbers always compare
    exactly, so ``0.333333`` != ``1/3``) and by ``math-verify`` otherwise (rounding floats to
    more places than the answers state, so that ``3.141593`` != ``\\pi``), under a time limit per
    comparison. A comparison that times out or raises counts as wrong and is counted in
    ``grading.timeouts`` / ``grading.errors``; it never stops the run.

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

import json
import logging
import math
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any

from oprd_cli.console import console as default_console
from oprd_cli.console import progress, warn
from oprd_cli.data import BENCHMARKS, Record, get_benchmark, load_records
from oprd_cli.errors import OprdError
from oprd_cli.stores.rundir import STEP_RE

REPORT_VERSION = 1
DEFAULT_TIMEOUT_S = 5.0

# ============================================================================ extraction
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_LINE_RE = re.compile(
    r"^[ \t>#*_\-]*(?:final[ \t]+)?answer[ \t]*(?:is)?[ \t]*[*_]*[ \t]*[:：][ \t]*(?P<ans>.*?)[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)
_MINERVA_RE = re.compile(r"^the final answer is\s*(?P<ans>.+?)(?:\.\s*I hope it is correct\.?)?$", re.IGNORECASE)


def _balanced(text: str, start: int) -> str | None:
    """Content of the brace group opening at ``text[start] == '{'``, or None if it never closes."""
    depth = 0
    i = start
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":  # \{ and \} are literal braces
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
        i += 1
    return None


def _clean_answer(ans: str) -> str:
    ans = ans.strip()
    for _ in range(3):
        before = ans
        ans = ans.strip().rstrip(".").strip().strip("*_").strip()
        if ans.startswith("$$") and ans.endswith("$$") and len(ans) >= 4:
            ans = ans[2:-2]
        elif ans.startswith("$") and ans.endswith("$") and len(ans) >= 2:
            ans = ans[1:-1]
        if ans.startswith("\\(") and ans.endswith("\\)"):
            ans = ans[2:-2]
        if ans.startswith("\\[") and ans.endswith("\\]"):
            ans = ans[2:-2]
        if ans == before:
            break
    return ans.strip()


EXTRACT_MODES = ("boxed", "lenient")
DEFAULT_EXTRACT = "boxed"

# lenient extraction: a math environment, else a bare number / simple fraction / percentage
_MATH_ENV = (r"\$\$(?P<dd>.+?)\$\$|(?<!\\)\$(?P<di>[^$\n]+?)(?<!\\)\$|\\\((?P<pp>.+?)\\\)"
             r"|\\\[(?P<bb>.+?)\\\]")
# (a number followed by "=" or an operator is a step of a computation, not its result)
_BARE_NUM = (r"(?<![\w.])(?P<num>[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?(?:\s*\\?%)?|[-+]?\.\d+)"
             r"(?![\d.]*\s*[=+*/^\u00d7\u00f7])")
_ANSWER_IS_RE = re.compile(r"\banswers?\b[^\n]{0,50}?(?:\bis\b|\bare\b|=|:)[^\n]{0,30}?(?:" + _MATH_ENV + "|"
                           + _BARE_NUM + ")", re.IGNORECASE)
_STATEMENT_RE = re.compile(_MATH_ENV + "|" + _BARE_NUM, re.DOTALL)


def _env_or_number(m: re.Match) -> str:
    for name in ("dd", "di", "pp", "bb", "num"):
        if m.group(name) is not None:
            return m.group(name)
    return ""


def _extract_lenient(text: str) -> str | None:
    """"The answer is X" (the last such phrase; X a math environment or a number), else the last math
    environment or number of the final paragraph (math-verify's unanchored fallback, kept to the
    final statement)."""
    for m in reversed(list(_ANSWER_IS_RE.finditer(text))):
        ans = _clean_answer(_env_or_number(m))
        if ans:
            return ans
    paragraphs = [b for b in re.split(r"\n[ \t]*\n", text) if b.strip()]
    if not paragraphs:
        return None
    for m in reversed(list(_STATEMENT_RE.finditer(paragraphs[-1]))):
        ans = _clean_answer(_env_or_number(m))
        if ans:
            return ans
    return None


def check_extract_mode(mode: str) -> str:
    if mode not in EXTRACT_MODES:
        raise OprdError(f"--extract must be one of {', '.join(EXTRACT_MODES)}, got {mode!r}")
    return mode


def extract_answer(text: str | None, mode: str = DEFAULT_EXTRACT) -> str | None:
    """The final answer of a response; None when there is none.

    ``mode="boxed"`` (default, the release's evaluation): the last complete ``\\boxed{}``/``\\fbox{}``,
    else the last ``Answer: ...`` line (Minerva's "The final answer is ..." included). Empty boxes
    (``\\boxed{}``, e.g. the echoed instruction) and a box cut off by the length limit are skipped in
    favour of the previous complete one.
    ``mode="lenient"``: as boxed, then "the answer is X" (the last such phrase), then the last math
    environment or number of the final paragraph ("So there are 70 apples." -> ``70``), the
    forms math-verify's own extraction also takes.
    """
    check_extract_mode(mode)
    if not text:
        return None
    ans = _extract_boxed(text)
    if ans is None and mode == "lenient":
        ans = _extract_lenient(text)
    return ans


def _extract_boxed(text: str) -> str | None:
    for m in reversed(list(_BOX_RE.finditer(text))):
        pos = m.end()
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if pos < len(text) and text[pos] == "{":
            content = _balanced(text, pos)
            if content is None:
                continue
        elif m.end() < len(text) and text[m.end()] in " \t":  # "\boxed 5"
            content = re.match(r"[^\s$]*", text[pos:]).group(0)
        else:
            continue
        content = _clean_answer(content)
        if content:
            return content
    lines = list(_ANSWER_LINE_RE.finditer(text))
    for m in reversed(lines):
        ans = _clean_answer(m.group("ans"))
        mm = _MINERVA_RE.match(ans)
        if mm:
            ans = _clean_answer(mm.group("ans"))
        if ans:
            return ans
    return None


# ============================================================================ fast exact / numeric check
_WRAP_RE = re.compile(r"^\\(?:text|textbf|mathrm|mathbf|textit|mbox)\{(.*)\}$")
_SPACES_RE = re.compile(r"\\[,;:! ]|~|\s+")
_NUM_RE = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_FRAC_RE = re.compile(r"^([+-]?)\\frac(?:\{([+-]?\d+)\}|(\d))(?:\{(\d+)\}|(\d))$")
_SLASH_RE = re.compile(r"^([+-]?)(\d+)/(\d+)$")
_DEGREE_RE = re.compile(r"\^\{?\\circ\}?|\\degree(?![A-Za-z])|\u00b0|\^\{\u00b0\}|\^\u00b0")


def _canonical(ans: str) -> str:
    """Unicode forms LaTeX graders do not read: the minus sign, and the degree sign (``90°``) as ``^\\circ``."""
    return _DEGREE_RE.sub(lambda _m: "^\\circ", ans.replace("\u2212", "-"))


def normalize_answer(ans: str) -> str:
    """A cheap canonical string for exact comparison and vote grouping."""
    s = _canonical(ans.strip())
    s = s.replace("\\left", "").replace("\\right", "").replace("\\displaystyle", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _SPACES_RE.sub("", s)
    s = s.strip("$").rstrip(".")
    for _ in range(2):
        m = _WRAP_RE.match(s)
        if m and _balanced("{" + m.group(1) + "}", 0) == m.group(1):
            s = m.group(1)
    return s


def parse_number(ans: str) -> Fraction | None:
    """An exact value for plain numbers: ``025``, ``-3``, ``142.0``, ``1,000``, ``\\frac{1}{2}``, ``3/4``
    (a trailing degree sign is dropped: ``90^\\circ`` is 90, as math-verify reads it)."""
    s = normalize_answer(ans).removesuffix("^\\circ")
    if len(s) > 200:
        return None
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    try:
        if _NUM_RE.match(s):
            return Fraction(s)
        m = _FRAC_RE.match(s)
        if m:
            sign, num, den = m.group(1), m.group(2) or m.group(3), m.group(4) or m.group(5)
        else:
            m = _SLASH_RE.match(s)
            if m:
                sign, num, den = m.groups()
        if m:
            value = Fraction(int(num), int(den))
            return -value if sign == "-" else value
    except (ValueError, ZeroDivisionError):
        return None
    return None


def vote_key(ans: str) -> str:
    """The key majority voting groups answers by: the exact value of numbers, else the normalised text."""
    v = parse_number(ans)
    if v is not None:
        return f"num:{v}"
    return "str:" + normalize_answer(ans)


def quick_compare(pred: str, gold: str, integer_answers: bool = False) -> bool | None:
    """True/False when a cheap check decides, None when math-verify has to.

    Two plain numbers (integers, decimals, fractions) compare exactly: ``0.5`` = ``1/2``, but
    ``0.333333`` != ``1/3`` and ``.0000673`` != ``.0000672`` (math-verify would round them to 6 places).
    ``integer_answers`` is accepted for callers of the earlier signature; plain numbers decide either way.
    """
    p, g = normalize_answer(pred), normalize_answer(gold)
    if p and p == g:
        return True
    pv, gv = parse_number(pred), parse_number(gold)
    if pv is not None and gv is not None:
        return pv == gv
    return None


_DECIMALS_RE = re.compile(r"(?<![\d.])\d*\.(\d+)")


def float_rounding(*answers: str) -> int:
    """Decimal places math-verify rounds floats to when it compares these answers: three more than the
    longest decimal written in them, at least math-verify's default of 6. A decimal then equals a value
    only when it states it exactly (``0.0000672`` = ``6.72\\times 10^{-5}``), never because it rounds to
    it (``3.141593`` != ``\\pi``, ``0.333333`` != ``\\frac{1}{3}``; math-verify alone accepts both)."""
    places = [len(m.group(1)) for a in answers for m in _DECIMALS_RE.finditer(a)]
    return max([6] + [k + 3 for k in places])


# ============================================================================ math-verify with a time limit
class GradeTimeout(BaseException):
    """Raised by the alarm; a BaseException so math-verify's ``except Exception`` cannot swallow it."""


_mv = None  # math_verify, imported on first use (sympy is slow to import)


def _math_verify():
    global _mv
    if _mv is None:
        import math_verify
        import math_verify.grader
        import math_verify.parser

        # Our own timer covers parse + verify; math-verify's signal.alarm would cancel it, so
        # its timeouts are off, and its "timeout disabled" warning is not for our users.
        math_verify.parser.TIMEOUT_WARNING_SHOWN = True
        math_verify.grader.TIMEOUT_WARNING_SHOWN = True
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        logging.getLogger("latex2sympy2_extended").setLevel(logging.ERROR)
        _warm_up(math_verify)
        _mv = math_verify
    return _mv


# One comparison of each common kind. The first parse/verify of a kind in a process pays one-off
# lazy initialisation in sympy and the LaTeX parser (0.3-1 s, more on a loaded machine); done here,
# before any timed comparison and before a grading worker is forked, so it is never charged
# against a comparison's time limit.
_WARM_UP = ((r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2"), (r"x^2+1", r"1+x^2"), (r"(1,2)", r"(1, 2)"),
            (r"\{1,2\}", r"\{2,1\}"), (r"[0,1)", r"[0,1)"), (r"x=3", r"3"))


def _warm_up(mv) -> None:
    for pred, gold in _WARM_UP:
        try:
            mv.verify(mv.parse("\\boxed{" + gold + "}", parsing_timeout=None),
                      mv.parse("\\boxed{" + pred + "}", parsing_timeout=None), timeout_seconds=None)
        except Exception:  # noqa: BLE001, S112 - a warm-up failure only means a slower first comparison
            continue


def _parse(text: str):
    return _math_verify().parse(text, parsing_timeout=None)


def _verify(gold, pred, rounding: int = 6) -> bool:
    return _math_verify().verify(gold, pred, float_rounding=rounding, timeout_seconds=None)


_gold_cache: dict[str, Any] = {}


def math_verify_equal(pred: str, gold: str) -> bool:
    """math-verify's verdict on two extracted answers (no time limit; see :class:`Grader`)."""
    gold_parsed = _gold_cache.get(gold)
    if gold_parsed is None:
        gold_parsed = _parse("\\boxed{" + _canonical(gold.strip().strip("$")) + "}")
        if len(_gold_cache) > 10000:
            _gold_cache.clear()
        _gold_cache[gold] = gold_parsed
    pred_parsed = _parse("\\boxed{" + _canonical(pred) + "}")
    if not gold_parsed or not pred_parsed:
        return False
    return bool(_verify(gold_parsed, pred_parsed, float_rounding(pred, gold)))


def _raise_timeout(signum, frame):
    raise GradeTimeout()


def _with_alarm(fn, timeout: float):
    """Run ``fn()`` in the main thread with a SIGALRM deadline; raises GradeTimeout."""
    old = signal.signal(signal.SIGALRM, _raise_timeout)
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, max(timeout, 0.001))
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, old)


def _compare_inline(pred: str, gold: str, timeout: float) -> tuple[bool, str]:
    """(correct, status) with status "ok", "timeout" or "error"; main thread only."""
    try:
        return _with_alarm(lambda: math_verify_equal(pred, gold), timeout), "ok"
    except GradeTimeout:
        return False, "timeout"
    except Exception:  # noqa: BLE001 - a grader crash is a wrong answer, never a crashed run
        return False, "error"


def _worker_main(conn, timeout: float) -> None:  # pragma: no cover - runs in the child process
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _math_verify()  # a no-op when forked from a parent that loaded it; untimed under spawn
    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):
            return
        if item is None:
            return
        pred, gold = item
        try:
            conn.send(_compare_inline(pred, gold, timeout))
        except (BrokenPipeError, OSError):
            return


class _Worker:
    """One grading process. It enforces the limit itself (SIGALRM in its main thread); the parent
    kills it when it does not answer in time (a hang in C code that no signal interrupts)."""

    def __init__(self, timeout: float):
        import multiprocessing as mp

        methods = mp.get_all_start_methods()
        ctx = mp.get_context("fork" if "fork" in methods else "spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, timeout), daemon=True, name="oprd-grader")
        self.proc.start()
        child.close()

    def compare(self, pred: str, gold: str, deadline: float) -> tuple[bool, str]:
        try:
            self.conn.send((pred, gold))
            if self.conn.poll(deadline):
                return self.conn.recv()
            return False, "killed"
        except (EOFError, OSError):
            return False, "crashed"

    def close(self, kill: bool = False) -> None:
        try:
            if not kill:
                self.conn.send(None)
        except OSError:
            pass
        if not kill:
            self.proc.join(1.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5.0)
        self.conn.close()


@dataclass
class Grade:
    correct: bool
    status: str  # "ok", "no_answer", "timeout", "error"


class Grader:
    """Grades extracted answers against references with a time limit per comparison.

    mode: ``"inline"`` grades in this process with a SIGALRM timer (main thread only);
    ``"process"`` grades in a helper process that is killed and restarted when a comparison
    overruns (robust even against hangs in C code); ``"auto"`` (default) is inline in the main
    thread and a process elsewhere. Cheap checks (equal strings, plain numbers) never reach
    math-verify. Results are cached per (reference, answer).
    """

    def __init__(self, timeout: float = DEFAULT_TIMEOUT_S, mode: str = "auto", integer_answers: bool = False):
        if timeout is None or timeout <= 0:
            raise OprdError(f"grading timeout must be > 0 seconds, got {timeout}")
        if mode not in ("auto", "inline", "process"):
            raise ValueError(f"unknown grader mode {mode!r}")
        self.timeout = float(timeout)
        self.mode = mode
        self.integer_answers = integer_answers
        self.timeouts = 0
        self.errors = 0
        self.math_verify_calls = 0
        self._cache: dict[tuple[str, str, bool], Grade] = {}
        self._worker: _Worker | None = None

    # -- lifecycle
    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - nothing to do at interpreter exit
            pass

    # -- grading
    def _inline_ok(self) -> bool:
        if self.mode == "inline":
            return True
        if self.mode == "process":
            return False
        return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()

    def _slow(self, pred: str, gold: str) -> tuple[bool, str]:
        self.math_verify_calls += 1
        _math_verify()  # import and warm-up happen here, untimed, and are inherited by forked workers
        if self._inline_ok():
            return _compare_inline(pred, gold, self.timeout)
        if self._worker is None:
            self._worker = _Worker(self.timeout)
        correct, status = self._worker.compare(pred, gold, deadline=self.timeout + max(1.0, 0.5 * self.timeout))
        if status in ("killed", "crashed"):
            self._worker.close(kill=True)
            self._worker = None
            status = "timeout" if status == "killed" else "error"
        return correct, status

    def grade(self, pred: str | None, gold: str) -> Grade:
        """Whether the extracted answer ``pred`` (None: nothing extracted) equals ``gold``."""
        if pred is None or not pred.strip():
            return Grade(False, "no_answer")
        key = (pred, gold, self.integer_answers)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        try:
            quick = quick_compare(pred, gold, self.integer_answers)
        except Exception:  # noqa: BLE001
            quick = None
        if quick is not None:
            result = Grade(quick, "ok")
        else:
            correct, status = self._slow(pred, gold)
            result = Grade(correct, status)
        if result.status == "timeout":
            self.timeouts += 1
        elif result.status == "error":
            self.errors += 1
        self._cache[key] = result
        return result

    def is_correct(self, response: str, gold: str, extract: str = DEFAULT_EXTRACT) -> bool:
        """Extract the answer of a full response (``extract``: ``"boxed"`` or ``"lenient"``) and grade it."""
        return self.grade(extract_answer(response, extract), gold).correct

    def equivalent(self, a: str, b: str) -> bool:
        """Whether two extracted answers are equivalent (``b`` in the reference's place), for maj@n."""
        return self.grade(a, b).correct


# ============================================================================ metrics
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


# ============================================================================ evaluation
def _sample_index(s: Mapping, by_index: Mapping[int, Record], by_id: Mapping[str, Record]) -> int:
    if "index" in s and s["index"] is not None:
        idx = int(s["index"])
        if idx not in by_index:
            raise OprdError(f"response for problem index {idx}, but the dataset has no such row")
        return idx
    if "id" in s and s["id"] is not None:
        rid = _id_str(s["id"])
        if rid not in by_id:
            raise OprdError(f"response for id {rid!r}, which is not in the dataset")
        return by_id[rid].index
    raise OprdError("a response names neither a problem index nor an id")


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
    if not records:
        raise OprdError("no problems to evaluate")
    if not responses:
        raise OprdError("no responses to grade (did sampling produce nothing, or is the responses file empty?)")
    if integer_answers is None:
        integer_answers = BENCHMARKS[bench_name].integer_answers if bench_name in BENCHMARKS else False
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

    own_grader = grader is None
    if grader is None:
        grader = Grader(timeout=timeout, integer_answers=integer_answers)
    t0 = time.perf_counter()
    timeouts0, errors0, calls0 = grader.timeouts, grader.errors, grader.math_verify_calls

    use_ids = all(s.get("token_ids") is not None for s in responses)
    vocab: dict[str, int] = {}  # words -> ids for Dist-4g
    word_counted = 0  # samples whose length fell back to whitespace words
    samples_out: list[dict[str, Any]] = []
    per_problem: list[dict[str, Any]] = []
    total = sum(len(grouped[r.index]) for r in evaluated)
    try:
        bar = progress(transient=True) if show_progress else None
        task = bar.add_task("grading", total=total) if bar else None
        if bar:
            bar.start()
        try:
            for rec in evaluated:
                gold = str(rec.answer).strip()
                answers, correct, lengths, truncs, seqs = [], [], [], [], []
                for j, s in enumerate(grouped[rec.index]):
                    text = s["response"]
                    try:
                        ans = extract_answer(text, extract)
                    except Exception:  # noqa: BLE001
                        ans = None
                    g = grader.grade(ans, gold)
                    ntok = s.get("num_tokens")
                    if ntok is None and s.get("token_ids") is not None:
                        ntok = len(s["token_ids"])
                    if ntok is None and tokenizer is not None:
                        ntok = len(tokenizer(text, add_special_tokens=False)["input_ids"])
                    if ntok is None:
                        ntok = len(text.split())
                        word_counted += 1
                    finished = s.get("finished_by")
                    if finished is not None:
                        trunc = finished == "length"
                    elif max_new_tokens is not None and s.get("num_tokens") is not None:
                        trunc = int(s["num_tokens"]) >= max_new_tokens
                    else:
                        trunc = None
                    answers.append(ans)
                    correct.append(g.correct)
                    lengths.append(int(ntok))
                    truncs.append(trunc)
                    seq = [int(t) for t in s["token_ids"]] if use_ids else \
                        [vocab.setdefault(w, len(vocab)) for w in text.split()]
                    seqs.append(_ngram_rows(seq, 4))
                    samples_out.append({
                        "index": rec.index, "id": rec.id, "sample": j, "extracted": ans, "correct": g.correct,
                        "grade": g.status, "num_tokens": int(ntok), "finished_by": finished, "response": text,
                    })
                    if bar:
                        bar.advance(task)
                n, c = len(correct), sum(correct)
                maj_answer, maj_ok = majority_vote(answers, correct, grader.equivalent)
                known = [t for t in truncs if t is not None]
                per_problem.append({
                    "index": rec.index, "id": rec.id, "answer": gold, "n": n, "num_correct": c,
                    "accuracy": c / n, "best": c > 0, "maj_answer": maj_answer, "maj_correct": maj_ok,
                    "pass_at_k": {str(k): pass_at_k(n, c, k) for k in k_values(n)},
                    "no_answer": sum(a is None for a in answers),
                    "dist_4g": _ratio(*_count_unique(seqs)), "mean_response_tokens": _mean(lengths),
                    "truncated_fraction": _mean([float(t) for t in known]) if known else None,
                    "_seqs": seqs, "_truncs": known, "_lengths": lengths,
                })
        finally:
            if bar:
                bar.stop()
    finally:
        if own_grader:
            grader.close()
    seconds = time.perf_counter() - t0

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

    report: dict[str, Any] = {
        "oprd_report_version": REPORT_VERSION,
        "bench": bench_name,
        "model": model_name,
        "run_dir": str(run_dir) if run_dir is not None else None,
        "step": int(step) if step is not None else None,
        "data": data_source,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "num_problems": len(per_problem),
        "num_samples": len(samples_out),
        "n": n_min,
        "avg_at_n": _mean([p["accuracy"] for p in per_problem]),
        "pass_at_k": {str(k): _mean([pass_at_k(p["n"], p["num_correct"], k) for p in per_problem])
                      for k in k_values(n_min)},
        "best_at_n": _mean([float(p["best"]) for p in per_problem]),
        "maj_at_n": _mean([float(p["maj_correct"]) for p in per_problem]),
        "dist_4g": unique / all_grams if all_grams else None,
        "dist_4g_unit": "token_ids" if use_ids else "words",
        "mean_response_tokens": _mean(all_lengths),
        "length_unit": "tokens" if not word_counted else ("words" if word_counted == len(samples_out)
                                                           else "tokens+words"),
        "truncated_fraction": _mean([float(t) for t in all_truncs]) if all_truncs else None,
        "no_answer_fraction": sum(p["no_answer"] for p in per_problem) / len(samples_out),
        "sampling": dict(sampling) if sampling else None,
        "grading": {
            "extract": extract,
            "integer_answers": bool(integer_answers),
            "timeout_s": grader.timeout,
            "timeouts": grader.timeouts - timeouts0,
            "errors": grader.errors - errors0,
            "math_verify_calls": grader.math_verify_calls - calls0,
            "seconds": round(seconds, 3),
        },
        "per_problem": per_problem,
        "samples": samples_out,
    }
    g = report["grading"]
    if g["timeouts"] or g["errors"]:
        warn(f"grading: {g['timeouts']} comparisons timed out and {g['errors']} raised; they count as wrong")
    return report


# ============================================================================ inputs
def _id_str(v: Any) -> str:
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
    text = p.read_text(encoding="utf-8")
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
    ids = [_id_str(r["id"]) for _, r in rows]
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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def default_report_path(bench: str, model: str, run_dir: str | Path | None = None, step: int | None = None,
                        out_dir: str | Path | None = None) -> Path:
    """``RUN/eval/<bench>-step-NNNNNN.json`` for a run's checkpoint, else ``eval/<bench>-<model>.json``."""
    if run_dir is not None and step is not None:
        return Path(out_dir or Path(run_dir) / "eval") / f"{_slug(bench)}-step-{int(step):06d}.json"
    name = Path(str(model)).name if os.path.exists(os.path.expanduser(str(model))) else str(model)
    return Path(out_dir or "eval") / f"{_slug(bench)}-{_slug(name)}.json"


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


# ============================================================================ outputs
def responses_path_for(report_path: str | Path) -> Path:
    p = Path(report_path)
    stem = p.name.removesuffix(".json")
    return p.with_name(stem + ".responses.jsonl")


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_report(report: Mapping[str, Any], out_path: str | Path) -> tuple[Path, Path | None]:
    """Write the JSON report (without the per-sample rows) and the per-sample rows to
    ``<stem>.responses.jsonl`` next to it; both atomically, the report last. Existing files are
    replaced. Returns (report path, responses path or None when there are no rows).

    Report schema (v1): ``oprd_report_version``, ``bench``, ``model``, ``run_dir``, ``step``,
    ``data``, ``created``, ``num_problems``, ``num_samples``, ``n``, ``avg_at_n``,
    ``pass_at_k`` ({"1": .., "2": .., ..., str(n): ..}), ``best_at_n``, ``maj_at_n``, ``dist_4g``,
    ``dist_4g_unit``, ``mean_response_tokens``, ``length_unit``, ``truncated_fraction``,
    ``no_answer_fraction``, ``sampling``, ``grading`` {extract, integer_answers, timeout_s, timeouts,
    errors, math_verify_calls, seconds}, ``responses_file``, ``per_problem`` [{index, id, answer, n,
    num_correct, accuracy, best, maj_answer, maj_correct, pass_at_k, no_answer, dist_4g,
    mean_response_tokens, truncated_fraction}].
    """
    out = Path(os.path.expanduser(str(out_path)))
    if out.is_dir():
        raise OprdError(f"{out_path} is a folder; pass a file name like {Path(out_path) / 'report.json'}")
    body = {k: v for k, v in report.items() if k != "samples"}
    samples = report.get("samples")
    rpath = None
    if samples:
        rpath = responses_path_for(out)
        _atomic_write_text(rpath, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
        body["responses_file"] = rpath.name
    _atomic_write_text(out, json.dumps(body, indent=2, ensure_ascii=False) + "\n")
    return out, rpath


def summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report without per-sample rows and per-problem entries (for ``--json`` on stdout)."""
    return {k: v for k, v in report.items() if k not in ("samples", "per_problem")}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def print_report(report: Mapping[str, Any], console=None, per_problem: bool = False) -> None:
    """A rich summary table (percentages), optionally with one row per problem."""
    from rich.table import Table

    con = console or default_console
    n = report.get("n")
    title = f"{report.get('bench')} - {report.get('model')}"
    if report.get("step") is not None:
        title += f" (step {report['step']})"
    t = Table(title=title, title_justify="left")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("problems", str(report.get("num_problems")))
    t.add_row("samples", f"{report.get('num_samples')} ({n} per problem)")
    t.add_row(f"Avg@{n}", _pct(report.get("avg_at_n")))
    for k, v in (report.get("pass_at_k") or {}).items():
        t.add_row(f"Pass@{k}", _pct(v))
    t.add_row(f"Best@{n}", _pct(report.get("best_at_n")))
    t.add_row(f"maj@{n}", _pct(report.get("maj_at_n")))
    t.add_row("Dist-4g", _pct(report.get("dist_4g")))
    mrt = report.get("mean_response_tokens")
    unit = report.get("length_unit", "tokens")
    t.add_row(f"mean length ({unit})", "-" if mrt is None else f"{mrt:.0f}")
    t.add_row("truncated", _pct(report.get("truncated_fraction")))
    t.add_row("no answer", _pct(report.get("no_answer_fraction")))
    g = report.get("grading") or {}
    if g.get("extract"):
        t.add_row("answer extraction", str(g["extract"]))
    if g.get("timeouts") or g.get("errors"):
        t.add_row("grader timeouts / errors", f"{g.get('timeouts', 0)} / {g.get('errors', 0)}")
    con.print(t)
    if per_problem and report.get("per_problem"):
        pt = Table(title="per problem", title_justify="left")
        for col, just in (("id", "left"), ("answer", "left"), ("correct", "right"), ("acc", "right"),
                          ("maj", "left"), ("tokens", "right")):
            pt.add_column(col, justify=just)
        for p in report["per_problem"]:
            mrt = p.get("mean_response_tokens")
            pt.add_row(str(p["id"]), str(p["answer"]), f"{p['num_correct']}/{p['n']}", _pct(p["accuracy"]),
                       f"{p.get('maj_answer')} {'ok' if p.get('maj_correct') else 'x'}",
                       "-" if mrt is None else f"{mrt:.0f}")
        con.print(pt)


# ============================================================================ the eval command
# The release's evaluation script (Avg@16 at temperature 0.7, top-p 0.95); oprd.toml's [eval] section and
# flags override.
EVAL_SAMPLING_DEFAULTS: dict[str, Any] = {"num_samples": 16, "temperature": 0.7, "top_p": 0.95, "top_k": 0,
                                          "max_new_tokens": 16384, "seed": 0, "batch_size": 16}
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")


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
        if self.tokenizer_fallback and p.is_dir() and not any((p / f).exists() for f in _TOKENIZER_FILES):
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


def _free() -> None:
    """Return a dropped model's memory (call after the last reference is gone)."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001, S110
        pass


def evaluate_target(target: EvalTarget, data: EvalData, sampling, template, *, grader: Grader,
                    backend: str = "hf", device: str = "auto", dtype: str = "auto",
                    trust_remote_code: bool = False, tokenizer: str | None = None,
                    show_progress: bool = True, extract: str = DEFAULT_EXTRACT) -> dict[str, Any]:
    """Load one model, sample with the rollout generation code, grade, and return the report.
    ``tokenizer`` overrides where the tokenizer comes from (default: the model's folder, or the run's
    student for checkpoints saved without one); ``extract`` is the answer extraction mode."""
    from oprd_cli import models as M
    from oprd_cli.rollout import make_backend

    dev = M.resolve_device(device)
    dt = M.resolve_dtype(dtype, dev)
    tok_name = tokenizer or target.tokenizer
    if tokenizer is None and tok_name != target.model:
        warn(f"{target.model} has no tokenizer files; using the run's student tokenizer {tok_name}")
    tok = M.load_tokenizer(tok_name, trust_remote_code)
    lm = M.load_model(target.model, dev, dt, trust_remote_code)
    try:
        gen = make_backend(backend, lm, tok)
        what = f"step {target.step}" if target.step is not None else Path(target.model).name
        responses, result = sample_responses(gen, tok, data.records, sampling, template,
                                             description=f"eval {data.bench} {what}")
        dtype_name = str(next(lm.parameters()).dtype).replace("torch.", "")
    finally:
        gen = lm = None
        _free()
    info = {k: getattr(sampling, k) for k in ("num_samples", "temperature", "top_p", "top_k", "max_new_tokens",
                                              "seed", "batch_size")}
    info.update({"backend": backend, "device": str(dev), "dtype": dtype_name, "tokenizer": tok_name,
                 "template": {k: getattr(template, k) for k in ("chat_template", "system_prompt", "instruction")}})
    report = evaluate_responses(
        data.records, responses, data.bench, target.model, integer_answers=data.integer_answers,
        max_new_tokens=sampling.max_new_tokens, tokenizer=tok, run_dir=target.run_dir, step=target.step,
        data_source=data.source, sampling=info, grader=grader, show_progress=show_progress, extract=extract,
    )
    report["generation"] = {
        "seconds": round(result.seconds, 3), "tokens": result.num_tokens,
        "tokens_per_s": round(result.num_tokens / max(result.seconds, 1e-9), 1),
        "skipped_problems": [r.id for r in result.skipped],
    }
    return report


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


_same_protocol = same_protocol  # the name callers used before it was public


def evaluate_model(
    model: str,
    *,
    data: str | None = None,
    bench: str | None = None,
    limit: int | None = None,
    out: str | Path | None = None,
    run_dir: str | Path | None = None,
    step: int | None = None,
    num_samples: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    max_new_tokens: int | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    template=None,
    device: str = "auto",
    dtype: str = "auto",
    timeout: float = DEFAULT_TIMEOUT_S,
    show_progress: bool = True,
    extract: str = DEFAULT_EXTRACT,
) -> dict[str, Any]:
    """Evaluate one model from Python and return the full report dict (``per_problem`` and the per-sample
    rows under ``"samples"`` included); nothing is printed except progress.

    ``data``: a local jsonl/json/parquet file (plain or verl) or a hub id; ``bench``: a registry name
    (alone: loaded from the hub; with ``data``: names the file's benchmark and its answer type). Sampling
    arguments left None take the eval defaults (n=16, T=0.7, top-p 0.95, 16,384 new tokens, seed 0);
    ``template`` is a :class:`oprd_cli.config.TemplateConfig` (default: chat template + the boxed
    instruction); ``extract`` is ``"boxed"`` (default) or ``"lenient"`` (:func:`extract_answer`). ``run_dir``/``step`` label the report as a run's checkpoint. With ``out`` the report
    and ``<stem>.responses.jsonl`` are written there, as ``oprd eval --out`` does (``report_path`` is set).
    """
    from oprd_cli.config import TemplateConfig

    check_extract_mode(extract)
    if num_samples is not None:
        validate_num_samples(num_samples)
    ed = load_eval_data(bench, data, limit)
    sampling = eval_sampling(None, num_samples=num_samples, temperature=temperature, top_p=top_p,
                             max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
    target = EvalTarget(str(model), str(run_dir) if run_dir is not None else None,
                        int(step) if step is not None else None)
    with Grader(timeout=timeout, integer_answers=ed.integer_answers) as grader:
        report = evaluate_target(target, ed, sampling, template or TemplateConfig(), grader=grader, device=device,
                                 dtype=dtype, show_progress=show_progress, extract=extract)
    if out is not None:
        path, _ = write_report(report, out)
        report["report_path"] = str(path)
    return report


def _report_path(out: str | None, target: EvalTarget | None, bench: str, model: str, many: bool) -> Path:
    run_dir = target.run_dir if target else None
    step = target.step if target else None
    if out is None:
        return default_report_path(bench, model, run_dir, step)
    o = Path(os.path.expanduser(str(out)))
    if many or o.is_dir() or str(out).endswith(("/", os.sep)):
        return default_report_path(bench, model, run_dir, step, out_dir=o)
    return o


def _counting_tokenizer(name: str | None, target: EvalTarget | None, trust_remote_code: bool):
    """For --responses lines without num_tokens: --tokenizer, else the tokenizer in a local --model /
    checkpoint folder (never a hub download), else None (lengths in whitespace words)."""
    from oprd_cli import models as M

    if name is None and target is not None:
        local = Path(os.path.expanduser(target.tokenizer))
        if local.is_dir() and any((local / f).exists() for f in _TOKENIZER_FILES):
            name = str(local)
    return M.load_tokenizer(name, trust_remote_code) if name else None


def _responses_label(path: str | Path) -> str:
    name = Path(str(path)).name
    for suffix in (".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".responses") or "responses"


def _headline(report: Mapping[str, Any]) -> str:
    n = report.get("n")
    mrt = report.get("mean_response_tokens")
    return (f"Avg@{n} {_pct(report.get('avg_at_n'))}  Best@{n} {_pct(report.get('best_at_n'))}  "
            f"maj@{n} {_pct(report.get('maj_at_n'))}  Dist-4g {_pct(report.get('dist_4g'))}  "
            f"mean length {'-' if mrt is None else f'{mrt:.0f}'}  truncated {_pct(report.get('truncated_fraction'))}")


def run_eval(
    *,
    bench: str | None = None,
    data: str | None = None,
    responses: str | None = None,
    model: str | None = None,
    run_dir: str | None = None,
    checkpoint: str | None = None,
    all_checkpoints: bool = False,
    out: str | None = None,
    limit: int | None = None,
    split: str | None = None,
    prompt_field: str | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
    sampling_flags: Mapping[str, Any] | None = None,
    template_flags: Mapping[str, Any] | None = None,
    backend: str = "hf",
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    tokenizer: str | None = None,
    timeout: float | None = None,
    extract: str = DEFAULT_EXTRACT,
    skip_existing: bool = False,
    per_problem: bool = False,
    plot: str | None = None,
    json_output: bool = False,
    console=None,
) -> dict[str, Any]:
    """``oprd eval``: resolve the models, load the problems, sample (or read ``responses``), grade, write
    one report per model and print it (``json_output``: the summary JSON on stdout). With several models
    (``--all-checkpoints``) the reports are tabulated and plotted against step as ``oprd report`` does.
    Returns ``{"reports": [summary + report_path, ...], "table": ..., "plot": ...}``.
    """
    from oprd_cli.config import TemplateConfig, load_run_config, merge
    from oprd_cli.console import err_console

    con = console or default_console
    sampling_flags = dict(sampling_flags or {})
    template_flags = dict(template_flags or {})
    timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout
    if timeout <= 0:
        raise OprdError(f"--grade-timeout must be > 0 seconds, got {timeout}")
    check_extract_mode(extract)
    if data is None and bench is None:
        raise OprdError(f"pass --bench NAME ({', '.join(BENCHMARKS)}) or --data FILE")
    if data is None:
        get_benchmark(bench)  # an unknown name fails before anything is loaded

    if responses is not None:
        if all_checkpoints:
            raise OprdError("--responses grades one set of responses; it cannot be combined with --all-checkpoints")
        if run_dir is not None and checkpoint is None and model is None:
            raise OprdError("with --responses and --run-dir, name the checkpoint that wrote them: --checkpoint step-N")
        if sampling_flags.get("num_samples") is not None:
            validate_num_samples(sampling_flags["num_samples"])
        ignored = sorted(k for k, v in {**sampling_flags, **template_flags}.items() if v is not None)
        if ignored:
            warn(f"--responses: no sampling happens, so {', '.join('--' + k.replace('_', '-') for k in ignored)} "
                 "are ignored")
        targets = resolve_targets(model, run_dir, checkpoint, False, need_model=False)
        sampling = template = None
    else:
        targets = resolve_targets(model, run_dir, checkpoint, all_checkpoints)
        cfg = load_run_config(targets[0].run_dir if run_dir is not None else None)
        sampling = eval_sampling(cfg, **sampling_flags)
        template = merge(TemplateConfig, cfg.get("template"), **template_flags)
    many = len(targets) > 1
    if out is not None and many and Path(os.path.expanduser(str(out))).suffix.lower() == ".json":
        raise OprdError(f"--all-checkpoints writes one report per checkpoint; --out must be a folder, got {out}")

    ed = load_eval_data(bench, data, limit, prompt_field, answer_field, id_field, split)
    show = not json_output
    results: list[dict[str, Any]] = []
    paths: list[Path] = []
    with Grader(timeout=timeout, integer_answers=ed.integer_answers) as grader:
        if responses is not None:
            samples = load_responses_file(responses, ed.records)
            target = targets[0] if targets else None
            name = target.model if target else _responses_label(responses)
            tok = _counting_tokenizer(tokenizer, target, trust_remote_code) \
                if any(s.get("num_tokens") is None and s.get("token_ids") is None for s in samples) else None
            report = evaluate_responses(
                ed.records, samples, ed.bench, name, integer_answers=ed.integer_answers,
                max_new_tokens=sampling_flags.get("max_new_tokens"), tokenizer=tok,
                run_dir=target.run_dir if target else None, step=target.step if target else None,
                data_source=ed.source, sampling=None, grader=grader, show_progress=show, extract=extract,
            )
            report["graded_from"] = str(responses)
            path, rpath = write_report(report, _report_path(out, target, ed.bench, name, False))
            results.append((report, path, rpath))
        else:
            for i, target in enumerate(targets):
                path = _report_path(out, target, ed.bench, target.model, many)
                if skip_existing and path.is_file():
                    try:
                        old = json.loads(path.read_text(encoding="utf-8"))
                    except (OSError, json.JSONDecodeError):
                        old = None
                    if isinstance(old, dict) and same_protocol(old, target, ed, sampling, extract):
                        err_console.print(f"[{i + 1}/{len(targets)}] {target.label}: kept {path} (--skip-existing)",
                                          markup=False)
                        results.append((old, path, None))
                        continue
                if many:
                    err_console.print(f"[{i + 1}/{len(targets)}] {target.label}: {target.model}", markup=False)
                report = evaluate_target(target, ed, sampling, template, grader=grader, backend=backend,
                                         device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                         tokenizer=tokenizer, show_progress=show, extract=extract)
                path, rpath = write_report(report, path)
                if many:
                    err_console.print(f"  {_headline(report)}  -> {path}", markup=False)
                results.append((report, path, rpath))

    summaries = []
    for report, path, rpath in results:
        s = summary(report)
        s["report_path"] = str(path)
        s["responses_path"] = str(rpath) if rpath else None
        summaries.append(s)
    outcome: dict[str, Any] = {"reports": summaries, "table": None, "plot": None}
    paths = [p for _, p, _ in results]

    if not many:
        report, path, rpath = results[0]
        if json_output:
            con.out(json.dumps(summaries[0], indent=2, ensure_ascii=False, default=str), highlight=False)
        else:
            print_report(report, console=con, per_problem=per_problem)
            g = report.get("generation")
            if g:
                err_console.print(f"generated {g['tokens']:,} tokens in {g['seconds']:.1f}s "
                                  f"({g['tokens_per_s']:,.0f} tok/s)", markup=False)
            err_console.print(f"wrote {path}" + (f" and {rpath}" if rpath else ""), markup=False)
        return outcome

    from io import StringIO

    from rich.console import Console

    from oprd_cli.eval.compare import run_report

    quiet = Console(file=StringIO()) if json_output else con
    res = run_report(paths, plot=plot, console=quiet)
    outcome["table"], outcome["plot"] = res["table"], res["plot"]
    if json_output:
        con.out(json.dumps(outcome, indent=2, ensure_ascii=False, default=str), highlight=False)
    return outcome


__all__ = [
    "DEFAULT_EXTRACT",
    "DEFAULT_TIMEOUT_S",
    "EVAL_SAMPLING_DEFAULTS",
    "EXTRACT_MODES",
    "REPORT_VERSION",
    "EvalData",
    "EvalTarget",
    "Grade",
    "Grader",
    "check_extract_mode",
    "checkpoint_info",
    "default_report_path",
    "dist_n",
    "distinct_ngrams",
    "evaluate_responses",
    "evaluate_model",
    "evaluate_target",
    "eval_sampling",
    "extract_answer",
    "float_rounding",
    "k_values",
    "load_eval_data",
    "load_responses_file",
    "majority_vote",
    "math_verify_equal",
    "normalize_answer",
    "parse_number",
    "parse_checkpoint_name",
    "pass_at_k",
    "print_report",
    "quick_compare",
    "resolve_targets",
    "responses_path_for",
    "run_eval",
    "same_protocol",
    "sample_responses",
    "summary",
    "validate_num_samples",
    "vote_key",
    "write_report",
]
