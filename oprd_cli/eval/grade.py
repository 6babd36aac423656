"""Grading: is an extracted answer equal to the reference? A cheap exact check, then math-verify under
a time limit (a signal alarm in the main thread, else a worker process that can be killed).

Grading
    The answer is the content of the last complete ``\\boxed{...}`` / ``\\fbox{...}``
    (nested braces allowed), else the last ``Answer: ...`` line (``extract="boxed"``, the
    default); ``extract="lenient"`` also takes "the answer is X" and the last number or math of
    the final paragraph. It is compared with the reference by a cheap exact check first (``025`` ==
    ``25``, ``142.0`` == ``142``, ``\\frac{1}{2}`` == ``0.5``; two plain numbers always compare
    exactly, so ``0.333333`` != ``1/3``) and by ``math-verify`` otherwise (rounding floats to
    more places than the answers state, so that ``3.141593`` != ``\\pi``), under a time limit per
    comparison. A comparison that times out or raises counts as wrong and is counted in
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from dataclasses import dataclass
from typing import Any

from oprd_cli.errors import OprdError
from oprd_cli.eval.extract import DEFAULT_EXTRACT, canonical, extract_answer, normalize_answer, parse_number

DEFAULT_TIMEOUT_S = 5.0


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
        gold_parsed = _parse("\\boxed{" + canonical(gold.strip().strip("$")) + "}")
        if len(_gold_cache) > 10000:
            _gold_cache.clear()
        _gold_cache[gold] = gold_parsed
    pred_parsed = _parse("\\boxed{" + canonical(pred) + "}")
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
