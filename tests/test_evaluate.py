"""Grading, metrics and reports (oprd_cli.eval); fast, no model, no network."""

from __future__ import annotations

import itertools
import json
import math
import signal
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from oprd_cli import eval as ev
from oprd_cli.eval import grade as gr
from oprd_cli.eval import compare as rp
from oprd_cli.data import load_records
from oprd_cli.errors import OprdError


@pytest.fixture(scope="module")
def aime_records(aime24_path):
    return load_records(str(aime24_path), require_answer=True)


def _prose(answer: str, i: int = 0) -> str:
    return (f"Let us think step by step about case {i}. We first try \\boxed{{{int(answer) + 1}}} but that fails, "
            f"so after more work the final answer is \\boxed{{{answer}}}. Done.")


def _other_answer(records, i):
    for j in range(1, len(records)):
        other = records[(i + j) % len(records)].answer
        if int(other) != int(records[i].answer):
            return other
    raise AssertionError


# --------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("text,expected", [
    (r"so \boxed{\frac{1}{2}} and done", r"\frac{1}{2}"),
    (r"first \boxed{1}, then \boxed{ 025 }.", "025"),  # the last box counts
    (r"\fbox{7}", "7"),
    (r"\boxed{\frac{\sqrt{2}}{\sqrt{3}}}", r"\frac{\sqrt{2}}{\sqrt{3}}"),  # nested braces
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces do not count
    (r"\boxed{\boxed{9}}", "9"),
    (r"we get \boxed{3} and then \boxed{4", "3"),  # a box cut off by the length limit is skipped
    (r"\boxed 5$ done", "5"),
    ("work...\n**Answer:** $42$.", "42"),
    ("Final Answer: The final answer is $7$. I hope it is correct.", "7"),
    (r"put your final answer within \boxed{}", None),  # the echoed instruction is no answer
    ("no answer here at all", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert ev.extract_answer(text) == expected


def test_parse_number():
    assert ev.parse_number("025") == 25
    assert ev.parse_number("142.0") == 142
    assert ev.parse_number(r"-\dfrac12") == ev.parse_number("-0.5")
    assert ev.parse_number("1,000") == 1000
    assert ev.parse_number("3/4") == ev.parse_number(r"\frac{3}{4}")
    assert ev.parse_number(r"\frac123") is None  # \frac{1}{2}3, not 12/3
    assert ev.parse_number("x") is None


# --------------------------------------------------------------------------- grading
@pytest.mark.parametrize("response,gold,expected", [
    (r"The answer is \boxed{0.5}.", r"\frac{1}{2}", True),
    (r"The answer is \boxed{\frac{1}{2}}.", "0.5", True),
    (r"\boxed{025}", "25", True),
    (r"\boxed{25}", "025", True),
    (r"\boxed{142.0}", "142", True),
    (r"Some prose. Therefore, the number of minutes is $\boxed{204}$ minutes, as claimed.", "204", True),
    (r"\boxed{7} no wait, \boxed{8}", "8", True),
    (r"\boxed{8} no wait, \boxed{7}", "8", False),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\sqrt{2}/2", True),
    (r"\fbox{13}", "13", True),
    ("Hence:\nAnswer: 13", "13", True),
    (r"\boxed{x = 5}", "5", True),
    (r"\boxed{12}", "13", False),
    (r"\boxed{204.5}", "204", False),
    ("I do not know.", "13", False),
])
def test_grader_forms(response, gold, expected):
    with ev.Grader(timeout=5) as g:
        assert g.is_correct(response, gold) is expected


def test_aime24_reference_answers_score_100_and_others_0(aime_records):
    recs = aime_records
    assert len(recs) == 30
    good = [{"index": r.index, "response": _prose(r.answer, j)} for r in recs for j in range(16)]
    bad = [{"index": r.index, "response": _prose(_other_answer(recs, i), j)} for i, r in enumerate(recs)
           for j in range(16)]
    t0 = time.perf_counter()
    rep = ev.evaluate_responses(recs, good, "aime24", "oracle", show_progress=False)
    elapsed = time.perf_counter() - t0
    assert rep["avg_at_n"] == 1.0 and rep["best_at_n"] == 1.0 and rep["maj_at_n"] == 1.0
    assert rep["pass_at_k"] == {"1": 1.0, "2": 1.0, "4": 1.0, "8": 1.0, "16": 1.0}
    assert rep["num_problems"] == 30 and rep["num_samples"] == 480 and rep["n"] == 16
    assert rep["grading"]["integer_answers"] is True
    assert elapsed < 10, f"grading 30x16 took {elapsed:.1f}s"
    rep = ev.evaluate_responses(recs, bad, "aime24", "wrong", show_progress=False)
    assert rep["avg_at_n"] == 0.0 and rep["best_at_n"] == 0.0 and rep["maj_at_n"] == 0.0
    assert all(v == 0.0 for v in rep["pass_at_k"].values())
    assert rep["grading"]["timeouts"] == 0 and rep["grading"]["errors"] == 0


# issue 11 point 10 (a): decimals that parse exactly compare exactly; a rounded decimal is no exact answer
@pytest.mark.parametrize("pred,gold", [
    (".0000673", ".0000672"),
    ("0.0000673", "0.0000672"),
    ("0.333333", r"\frac{1}{3}"),
    ("0.333333", "1/3"),
    ("3.141593", r"\pi"),
    ("0.7071068", r"\frac{\sqrt{2}}{2}"),
    ("2.718282", "e"),
    ("0.1428571", r"\dfrac{1}{7}"),
    ("1.414214", r"\sqrt{2}"),
])
def test_rounded_decimals_are_not_exact_answers(pred, gold):
    with ev.Grader(timeout=5) as g:
        assert g.grade(pred, gold).correct is False
        assert g.grade(gold, pred).correct is False  # nor the other way round
        assert g.is_correct(f"so the result is \\boxed{{{pred}}}", gold) is False


@pytest.mark.parametrize("pred,gold", [
    ("0.5", "1/2"), ("0.5", r"\frac{1}{2}"), (r"\frac{1}{2}", "0.5"), (".5", r"\dfrac12"), ("-0.75", "-3/4"),
    (r"50\%", "50"), ("50", r"50\%"), ("0.5", r"50\%"), ("1,000", "1000"), ("1000.0", "1,000"), ("0.1", r"\frac{1}{10}"),
    ("123.1", r"\frac{1231}{10}"), ("2.5", r"\frac{\sqrt{25}}{2}"), (r"\sqrt{2.25}", "1.5"), (r"\$1.50", "1.5"),
    ("0.0000672", r"6.72\times 10^{-5}"), (r"(0.5, 1)", r"(\frac12, 1)"), (r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2"),
])
def test_exact_equivalent_forms_stay_accepted(pred, gold):
    with ev.Grader(timeout=5) as g:
        assert g.grade(pred, gold).correct is True


# issue 11 point 10 (b): the Unicode degree sign
@pytest.mark.parametrize("pred,gold,expected", [
    ("90°", r"90^\circ", True),
    (r"90^\circ", "90°", True),
    ("90°", r"90^{\circ}", True),
    ("90 °", "90", True),
    ("90^°", r"90^\circ", True),
    (r"90\degree", r"90^\circ", True),
    ("45°", r"90^\circ", False),
    (r"x = 30°", r"30^\circ", True),
])
def test_degree_sign_is_normalised(pred, gold, expected):
    with ev.Grader(timeout=5) as g:
        assert g.grade(pred, gold).correct is expected
        assert g.is_correct(f"The angle is $\\boxed{{{pred}}}$.", gold) is expected
    if expected and "=" not in pred:
        assert ev.vote_key(pred) == ev.vote_key(gold)  # one maj@n cluster without asking math-verify


# issue 11 point 10 (c): extraction is a documented choice
LENIENT_ONLY = [
    ("The answer is 70.", "70"),
    ("Adding them up, the answer is therefore $\\frac{1}{2}$.", r"\frac{1}{2}"),
    ("We have 3 cases, and the answer is -2/3.", "-2/3"),
    ("So the final answer is 1,000.", "1,000"),
    ("The answer is \\(\\sqrt{3}\\).", r"\sqrt{3}"),
    ("The answer is 50%.", "50%"),
    ("First 3 + 4 = 7 apples.\nThen we double it.\nSo there are 14 apples.\n\n", "14"),
    ("Putting it together:\nThus $x = 5$.", "x = 5"),
    ("We found 3 roots.\n\nHence\n\\[\nx = 5\n\\]\n", "x = 5"),
    ("The answers are 12 and 13 respectively, so the smaller one.", "12"),
    ("Let me check the answer: 3 + 4 = 7.", "7"),
]


@pytest.mark.parametrize("text,expected", LENIENT_ONLY)
def test_lenient_extraction_takes_unboxed_answers(text, expected):
    assert ev.extract_answer(text) is None  # the default follows the release: boxed forms only
    assert ev.extract_answer(text, "boxed") is None
    assert ev.extract_answer(text, "lenient") == expected


@pytest.mark.parametrize("text,expected", LENIENT_ONLY)
def test_lenient_extraction_agrees_with_math_verify(text, expected):
    import math_verify

    found = math_verify.parse(text, parsing_timeout=None)
    assert found, text
    with ev.Grader(timeout=5) as g:  # math-verify's own extraction finds an equivalent answer
        assert g.grade(ev.extract_answer(text, "lenient"), str(found[-1])).correct


@pytest.mark.parametrize("text,expected", [
    (r"the answer is 6, see \boxed{5}", "5"),  # the release's forms come first
    ("work...\n**Answer:** $42$.", "42"),
    ("no digits here at all", None),
    ("", None),
    (r"put your final answer within \boxed{}", None),
])
def test_lenient_extraction_keeps_the_boxed_forms(text, expected):
    assert ev.extract_answer(text, "lenient") == expected
    with pytest.raises(OprdError, match="--extract"):
        ev.extract_answer(text, "loose")


def test_extraction_mode_is_recorded_and_changes_the_score(aime_records):
    recs = aime_records[:2]
    samples = [{"index": r.index, "response": f"Counting carefully, the answer is {r.answer}."} for r in recs]
    rep = ev.evaluate_responses(recs, samples, "aime24", "m", show_progress=False)
    assert rep["grading"]["extract"] == "boxed" and rep["avg_at_n"] == 0.0 and rep["no_answer_fraction"] == 1.0
    rep = ev.evaluate_responses(recs, samples, "aime24", "m", show_progress=False, extract="lenient")
    assert rep["grading"]["extract"] == "lenient" and rep["avg_at_n"] == 1.0
    buf = Console(record=True, width=120)
    ev.print_report(rep, console=buf)
    assert "lenient" in buf.export_text()
    with pytest.raises(OprdError, match="--extract"):
        ev.evaluate_responses(recs, samples, "aime24", "m", show_progress=False, extract="any")


def test_same_protocol_compares_the_extraction_mode(aime_records, tmp_path):
    data = ev.EvalData(list(aime_records[:2]), "aime24", True, "local")
    sampling = ev.eval_sampling(None)
    target = ev.EvalTarget("m")
    samples = [{"index": r.index, "response": f"\\boxed{{{r.answer}}}"} for r in data.records]
    old = ev.evaluate_responses(data.records, samples, "aime24", "m", data_source="local", show_progress=False,
                                sampling={k: getattr(sampling, k) for k in ("num_samples", "temperature", "top_p",
                                                                            "top_k", "max_new_tokens", "seed")})
    assert ev.same_protocol(old, target, data, sampling)
    assert ev.same_protocol(old, target, data, sampling, "boxed")
    assert not ev.same_protocol(old, target, data, sampling, "lenient")
    unrecorded = {**old, "grading": {k: v for k, v in old["grading"].items() if k != "extract"}}
    assert not ev.same_protocol(unrecorded, target, data, sampling)  # graded before the current rules


def test_existing_report_keeps_only_a_readable_report_of_the_same_protocol(aime_records, tmp_path):
    data = ev.EvalData(list(aime_records[:2]), "aime24", True, "local")
    sampling = ev.eval_sampling(None)
    target = ev.EvalTarget("m")
    samples = [{"index": r.index, "response": f"\\boxed{{{r.answer}}}"} for r in data.records]
    rep = ev.evaluate_responses(data.records, samples, "aime24", "m", data_source="local", show_progress=False,
                                sampling={k: getattr(sampling, k) for k in ("num_samples", "temperature", "top_p",
                                                                            "top_k", "max_new_tokens", "seed")})
    path = ev.write_report(rep, tmp_path / "r.json")[0]
    kept = ev.existing_report(path, target, data, sampling)
    assert kept is not None and kept["avg_at_n"] == 1.0 and kept["responses_file"] == "r.responses.jsonl"
    assert ev.existing_report(path, target, data, sampling, "lenient") is None
    assert ev.existing_report(path, ev.EvalTarget("other"), data, sampling) is None
    assert ev.existing_report(tmp_path / "missing.json", target, data, sampling) is None
    path.write_text('{"bench": "aime24", ')  # torn
    assert ev.existing_report(path, target, data, sampling) is None
    path.write_text("[1, 2]")
    assert ev.existing_report(path, target, data, sampling) is None


def test_eval_defaults_follow_the_release():
    # issue 11 point 6: the release's evaluation script samples at temperature 0.7, top-p 0.95
    assert ev.EVAL_SAMPLING_DEFAULTS["temperature"] == 0.7 and ev.EVAL_SAMPLING_DEFAULTS["top_p"] == 0.95
    s = ev.eval_sampling(None)
    assert (s.temperature, s.top_p, s.top_k, s.num_samples) == (0.7, 0.95, 0, 16)
    s = ev.eval_sampling({"eval": {"top_p": 0.8}}, temperature=0.6)  # oprd.toml and flags still override
    assert (s.temperature, s.top_p) == (0.6, 0.8)


# --------------------------------------------------------------------------- metrics
def test_pass_at_k_hand_values():
    assert ev.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert ev.pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert ev.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert ev.pass_at_k(16, 4, 4) == pytest.approx(1 - 495 / 1820)  # 1 - C(12,4)/C(16,4)
    assert ev.pass_at_k(16, 0, 16) == 0.0
    assert ev.pass_at_k(16, 16, 1) == 1.0
    assert ev.pass_at_k(16, 13, 4) == 1.0  # n - c < k
    assert ev.pass_at_k(16, 3, 1) == pytest.approx(3 / 16)  # pass@1 is the accuracy
    with pytest.raises(ValueError):
        ev.pass_at_k(4, 1, 5)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
            assert ev.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
            assert ev.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_k_values():
    assert ev.k_values(16) == [1, 2, 4, 8, 16]
    assert ev.k_values(6) == [1, 2, 4, 6]
    assert ev.k_values(1) == [1]


def test_majority_vote():
    assert ev.majority_vote(["1", "2", "2", "3"], [False, True, True, False]) == ("2", True)
    assert ev.majority_vote(["5", "5", "2", None], [False, False, True, False]) == ("5", False)
    # numerically equal wrong answers vote together
    assert ev.majority_vote(["025", "25", "7", "7.0", "7"], [False, False, True, True, True])[1] is True
    assert ev.majority_vote(["025", "25", "25", "7", "7"], [False, False, False, True, True])[1] is False
    assert ev.majority_vote([None, None], [False, False]) == (None, False)
    # a tie goes to the group that appeared first
    assert ev.majority_vote(["1", "2"], [True, False]) == ("1", True)


def test_maj_at_n_clusters_answers_among_themselves(aime_records):
    # issue 11 point 7: x = 3 and y = 3 each grade correct against the gold 3, but they are not
    # equivalent to each other, so they are two clusters of one, and the two 5s win maj@4
    recs = [type(aime_records[0])(index=0, id="q", problem="?", messages=None, answer="3")]
    texts = [r"\boxed{x = 3}", r"\boxed{y = 3}", r"\boxed{5}", r"\boxed{5}"]
    rep = ev.evaluate_responses(recs, [{"index": 0, "response": t} for t in texts], "custom", "m", show_progress=False)
    p = rep["per_problem"][0]
    assert p["num_correct"] == 2 and rep["avg_at_n"] == 0.5
    assert p["maj_answer"] == "5" and p["maj_correct"] is False and rep["maj_at_n"] == 0.0
    with ev.Grader(timeout=5) as g:
        assert g.grade("x = 3", "3").correct and g.grade("y = 3", "3").correct and not g.equivalent("x = 3", "y = 3")
        assert ev.majority_vote(["x = 3", "y = 3", "5", "5"], [True, True, False, False], g.equivalent) == ("5", False)
        # three textually different but equivalent answers are one cluster, found without the gold
        answers = [r"\sqrt{2}/2", "5", r"\frac{1}{\sqrt{2}}", "5", r"\frac{\sqrt2}{2}"]
        assert ev.majority_vote(answers, [True, False, True, False, True], g.equivalent) == (r"\sqrt{2}/2", True)
        assert ev.majority_vote(answers, [True, False, True, False, True]) == ("5", False)  # vote keys alone
        assert ev.majority_vote([r"\sqrt{2}/2", r"\frac{1}{\sqrt{2}}", "1", "1"], [True, True, False, False],
                                g.equivalent) == (r"\sqrt{2}/2", True)  # 2-2 tie: the cluster seen first
    # the default equivalence is the vote key alone: "correct" answers are never merged via the gold
    assert ev.majority_vote(["x = 3", "y = 3", "5", "5"], [True, True, False, False]) == ("5", False)


def test_majority_vote_is_equivalence_aware(aime_records):
    # three equivalent but textually different correct answers beat two identical wrong ones
    recs = [type(aime_records[0])(index=0, id="q", problem="?", messages=None, answer=r"\frac{\sqrt{2}}{2}")]
    texts = [r"\boxed{\sqrt{2}/2}", r"\boxed{\frac{1}{\sqrt{2}}}", r"\boxed{\frac{\sqrt2}{2}}", r"\boxed{1}", r"\boxed{1}"]
    rep = ev.evaluate_responses(recs, [{"index": 0, "response": t} for t in texts], "custom", "m", show_progress=False)
    assert rep["per_problem"][0]["num_correct"] == 3
    assert rep["maj_at_n"] == 1.0
    assert rep["avg_at_n"] == pytest.approx(0.6)
    assert rep["pass_at_k"]["1"] == pytest.approx(0.6)
    assert rep["pass_at_k"]["5"] == 1.0
    assert rep["length_unit"] == "words"  # no num_tokens and no tokenizer
    def fake_tok(text, add_special_tokens=False):
        return {"input_ids": list(text)}

    rep = ev.evaluate_responses(recs, [{"index": 0, "response": t} for t in texts], "custom", "m",
                                tokenizer=fake_tok, show_progress=False)
    assert rep["length_unit"] == "tokens"
    assert rep["mean_response_tokens"] == pytest.approx(sum(map(len, texts)) / 5)


def test_dist_4g_hand_example():
    assert ev.distinct_ngrams([["a", "b", "c", "d", "e"]]) == (2, 2)
    # (a b c d) repeats across responses: 3 four-grams, 2 unique
    assert ev.dist_n([["a", "b", "c", "d", "e"], ["a", "b", "c", "d"]]) == pytest.approx(2 / 3)
    assert ev.dist_n([[1, 1, 1, 1, 1, 1]]) == pytest.approx(1 / 3)
    assert ev.dist_n([["a", "b", "c"]]) is None  # no 4-grams
    # n-grams do not cross responses
    assert ev.distinct_ngrams([["a", "b"], ["c", "d"]]) == (0, 0)


def test_evaluate_report_fields_lengths_and_dist(aime_records):
    recs = aime_records[:2]
    samples = [
        {"index": 0, "response": r"a b c d e \boxed{204}", "num_tokens": 10, "finished_by": "eos"},
        {"index": 0, "response": r"a b c d \boxed{5}", "num_tokens": 30, "finished_by": "length"},
        {"index": 1, "response": r"x y \boxed{25}", "num_tokens": 20, "finished_by": "eos"},
        {"index": 1, "response": "cut off mid", "num_tokens": 40, "finished_by": "length"},
    ]
    rep = ev.evaluate_responses(recs, samples, "aime24", "m", show_progress=False)
    assert rep["avg_at_n"] == pytest.approx(0.5)
    assert rep["best_at_n"] == 1.0
    assert rep["pass_at_k"] == {"1": pytest.approx(0.5), "2": 1.0}
    assert rep["mean_response_tokens"] == pytest.approx(25.0) and rep["length_unit"] == "tokens"
    assert rep["truncated_fraction"] == pytest.approx(0.5)
    assert rep["no_answer_fraction"] == pytest.approx(0.25)
    words = [s["response"].split() for s in samples]
    assert rep["dist_4g"] == pytest.approx(ev.dist_n(words)) and rep["dist_4g_unit"] == "words"
    p0 = rep["per_problem"][0]
    assert p0["n"] == 2 and p0["num_correct"] == 1 and p0["truncated_fraction"] == 0.5
    assert p0["dist_4g"] == pytest.approx(ev.dist_n(words[:2]))
    # token ids, when every sample has them, drive Dist-4g; finished_by is inferred from max_new_tokens
    with_ids = [dict(s, token_ids=[1, 1, 1, 1, 1, 1], finished_by=None) for s in samples]
    rep = ev.evaluate_responses(recs, with_ids, "aime24", "m", max_new_tokens=30, show_progress=False)
    assert rep["dist_4g"] == pytest.approx(1 / 12) and rep["dist_4g_unit"] == "token_ids"
    assert rep["truncated_fraction"] == pytest.approx(0.5)


def test_evaluate_verl_file_with_responses_file(shared_data, tmp_path):
    recs = load_records(str(shared_data / "aime24_verl.parquet"), require_answer=True)
    assert [r.id for r in recs] == [str(i) for i in range(30)] and recs[0].messages
    lines = []
    for r in recs:
        for j in range(4):  # problem i: min(i % 5, 4) of its 4 samples correct
            ok = j < (r.index % 5)
            ans = r.answer if ok else str(int(r.answer) + 1)
            lines.append({"id": r.id, "response": f"Reasoning {j}. \\boxed{{{ans}}}", "num_tokens": 100 + j,
                          "finished_by": "length" if j == 3 else "eos"})
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    samples = ev.load_responses_file(path, recs)
    assert len(samples) == 120 and {s["index"] for s in samples} == set(range(30))
    rep = ev.evaluate_responses(recs, samples, "aime24", "some/model", data_source=str(path), show_progress=False)
    correct_per = [min(i % 5, 4) for i in range(30)]
    assert rep["avg_at_n"] == pytest.approx(sum(c / 4 for c in correct_per) / 30)
    assert rep["best_at_n"] == pytest.approx(sum(c > 0 for c in correct_per) / 30)
    assert rep["pass_at_k"]["2"] == pytest.approx(sum(ev.pass_at_k(4, c, 2) for c in correct_per) / 30)
    # wrong samples all give the same answer; a 2-2 tie goes to the correct ones, which come first
    assert rep["maj_at_n"] == pytest.approx(sum(c >= 2 for c in correct_per) / 30)
    assert rep["truncated_fraction"] == pytest.approx(0.25)
    assert rep["mean_response_tokens"] == pytest.approx(101.5)
    for key in ("bench", "model", "num_problems", "num_samples", "avg_at_n", "pass_at_k", "best_at_n", "maj_at_n",
                "dist_4g", "mean_response_tokens", "truncated_fraction", "per_problem", "run_dir", "step"):
        assert key in rep
    assert rep["per_problem"][7]["id"] == "7" and rep["per_problem"][7]["num_correct"] == 2

    out, rpath = ev.write_report(rep, tmp_path / "eval" / "aime24-model.json")
    saved = json.loads(out.read_text())
    assert "samples" not in saved and saved["responses_file"] == "aime24-model.responses.jsonl"
    assert rpath == tmp_path / "eval" / "aime24-model.responses.jsonl"
    rows = [json.loads(x) for x in rpath.read_text().splitlines()]
    assert len(rows) == 120 and {"id", "index", "response", "extracted", "correct", "grade"} <= set(rows[0])
    assert saved["avg_at_n"] == rep["avg_at_n"]
    ev.write_report(rep, out)  # overwriting a report is fine
    buf = Console(record=True, width=120)
    ev.print_report(saved, console=buf, per_problem=True)
    text = buf.export_text()
    assert "Avg@4" in text and "Pass@2" in text and "maj@4" in text


def test_responses_file_errors(aime_records, tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps({"id": 3, "response": "x"}) + "\n" + json.dumps({"id": "999", "response": "y"}) + "\n"
                 + json.dumps({"id": "abc", "response": "z"}) + "\n")
    with pytest.raises(OprdError, match=r"2 ids are not in the dataset: '999', 'abc'"):
        ev.load_responses_file(p, aime_records)
    # ids are the id field; --limit makes later ids unknown
    p.write_text(json.dumps({"id": 12, "response": "x"}) + "\n")
    with pytest.raises(OprdError, match="'12'"):
        ev.load_responses_file(p, aime_records[:5])
    p.write_text('{"id": 1, "response": "ok"}\nnot json\n')
    with pytest.raises(OprdError, match="line 2"):
        ev.load_responses_file(p, aime_records)
    p.write_text('{"response": "no id"}\n')
    with pytest.raises(OprdError, match='no "id"'):
        ev.load_responses_file(p, aime_records)
    p.write_text('{"id": 1, "text": "wrong field"}\n')
    with pytest.raises(OprdError, match='"response"'):
        ev.load_responses_file(p, aime_records)
    p.write_text("")
    with pytest.raises(OprdError, match="empty"):
        ev.load_responses_file(p, aime_records)
    with pytest.raises(OprdError, match="does not exist"):
        ev.load_responses_file(tmp_path / "missing.jsonl", aime_records)
    # several lines per id, ints and strings alike
    p.write_text("".join(json.dumps({"id": i, "response": "r"}) + "\n" for i in (0, "0", 1, 1.0)))
    assert [s["index"] for s in ev.load_responses_file(p, aime_records)] == [0, 0, 1, 1]


def test_bad_inputs(aime_records, tmp_path):
    with pytest.raises(OprdError, match="aime24"):
        ev.load_eval_data(bench="aime2099")
    with pytest.raises(OprdError, match="--bench"):
        ev.load_eval_data()
    with pytest.raises(OprdError, match="num-samples"):
        ev.validate_num_samples(0)
    assert ev.validate_num_samples(16) == 16
    no_answer = tmp_path / "q.jsonl"
    no_answer.write_text(json.dumps({"problem": "1+1?", "hint": "two"}) + "\n")
    with pytest.raises(OprdError, match="fields: problem, hint"):
        ev.load_eval_data(data=str(no_answer))
    with pytest.raises(OprdError, match="no responses"):
        ev.evaluate_responses(aime_records, [], "aime24", "m", show_progress=False)
    with pytest.raises(OprdError, match="99"):
        ev.evaluate_responses(aime_records, [{"index": 99, "response": "x"}], "aime24", "m", show_progress=False)


def test_load_eval_data_local(aime24_path, shared_data):
    d = ev.load_eval_data(bench="aime24", data=str(aime24_path), limit=5)
    assert d.bench == "aime24" and d.integer_answers and len(d.records) == 5
    d = ev.load_eval_data(data=str(shared_data / "aime24_verl.parquet"))
    assert d.bench == "aime24_verl" and not d.integer_answers and len(d.records) == 30
    with pytest.raises(OprdError, match="limit"):
        ev.load_eval_data(data=str(aime24_path), limit=0)


# --------------------------------------------------------------------------- time limits and crashes
def _sleeping_verify(*args, **kwargs):
    time.sleep(30)
    return True


def test_grader_hang_times_out_and_counts_wrong(aime_records, monkeypatch):
    monkeypatch.setattr(gr, "_verify", _sleeping_verify)
    recs = [type(aime_records[0])(index=0, id="q", problem="?", messages=None, answer=r"\sqrt{2}")]
    samples = [{"index": 0, "response": r"\boxed{\sqrt{2}}"},  # exact: never reaches math-verify
               {"index": 0, "response": r"\boxed{2^{1/2}}"},  # needs math-verify: hangs
               {"index": 0, "response": r"\boxed{2^{1/2}}"}]  # same pair: cached, no second wait
    t0 = time.perf_counter()
    rep = ev.evaluate_responses(recs, samples, "custom", "m", timeout=0.3, show_progress=False)
    assert time.perf_counter() - t0 < 5
    assert rep["per_problem"][0]["num_correct"] == 1
    assert rep["grading"]["timeouts"] == 1
    grades = [s["grade"] for s in rep["samples"]]
    assert grades == ["ok", "timeout", "timeout"]
    # the alarm is cleaned up: nothing fires later
    time.sleep(0.4)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_grader_crash_counts_wrong(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("grader bug")

    monkeypatch.setattr(gr, "_verify", boom)
    g = ev.Grader(timeout=1)
    assert g.grade(r"2^{1/2}", r"\sqrt{2}") == ev.Grade(False, "error")
    assert g.errors == 1
    assert g.grade("7", "7") == ev.Grade(True, "ok")


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="needs POSIX signals")
def test_process_grader_kills_a_hang_no_signal_can_stop(monkeypatch):
    real = ev.math_verify_equal

    def stubborn(pred, gold):
        if pred == "HANG":  # a hang in C code: SIGALRM cannot interrupt it
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(60)
        return real(pred, gold)

    monkeypatch.setattr(gr, "math_verify_equal", stubborn)
    with ev.Grader(timeout=0.5, mode="process") as g:
        t0 = time.perf_counter()
        assert g.grade("HANG", r"\sqrt{2}") == ev.Grade(False, "timeout")
        assert time.perf_counter() - t0 < 5
        assert g.grade(r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2") == ev.Grade(True, "ok")  # a fresh worker
        assert g.timeouts == 1


def test_grader_off_the_main_thread():
    out = {}

    def work():
        with ev.Grader(timeout=5) as g:
            out["ok"] = g.grade(r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2")
            out["worker"] = g._worker is not None

    t = threading.Thread(target=work)
    t.start()
    t.join(30)
    assert out == {"ok": ev.Grade(True, "ok"), "worker": True}


# --------------------------------------------------------------------------- reports
def _fake_report(bench, model, avg, run_dir=None, step=None, n=16):
    return {"oprd_report_version": 1, "bench": bench, "model": model, "run_dir": run_dir, "step": step, "n": n,
            "num_problems": 30, "num_samples": 30 * n, "avg_at_n": avg, "pass_at_k": {"1": avg, "16": min(1, 2 * avg)},
            "best_at_n": min(1.0, 2 * avg), "maj_at_n": avg, "dist_4g": 0.5, "mean_response_tokens": 1000.0,
            "truncated_fraction": 0.0, "per_problem": []}


def test_report_table_of_two_models(tmp_path):
    paths = []
    for model, scores in (("student", (0.329, 0.219)), ("oprd", (0.498, 0.346))):
        for bench, avg in zip(("aime24", "aime25"), scores):
            rep = _fake_report(bench, model, avg)
            paths.append(ev.write_report(rep, tmp_path / f"{bench}-{model}.json")[0])
    table = rp.tabulate_reports(rp.load_reports(paths))
    assert table.rows == ["student", "oprd"] and table.columns == ["aime24", "aime25"]
    assert table.value("oprd", "aime25") == pytest.approx(0.346)
    assert table.row_mean("student") == pytest.approx((0.329 + 0.219) / 2)
    buf = Console(record=True, width=120)
    res = rp.run_report([tmp_path], console=buf)  # a folder stands for its reports
    text = buf.export_text()
    assert "49.8" in text and "21.9" in text and "mean" in text
    assert res["plot"] is None  # no steps, no plot
    assert rp.tabulate_reports(rp.load_reports(paths), "pass@16").value("student", "aime24") == pytest.approx(0.658)
    with pytest.raises(OprdError, match="unknown metric"):
        rp.check_metric("accuracy")
    with pytest.raises(OprdError, match="not an oprd eval report"):
        bad = tmp_path / "x.json"
        bad.write_text("{}")
        rp.load_report(bad)


def test_report_warns_when_extraction_modes_differ(tmp_path, capsys):
    paths = []
    for model, mode in (("a", "boxed"), ("b", "lenient")):
        rep = _fake_report("aime24", model, 0.5)
        rep["grading"] = {"extract": mode}
        paths.append(ev.write_report(rep, tmp_path / f"{model}.json")[0])
    capsys.readouterr()
    rp.tabulate_reports(rp.load_reports(paths[:1]))
    assert "extract" not in capsys.readouterr().err
    table = rp.tabulate_reports(rp.load_reports(paths))
    err = capsys.readouterr().err
    assert "boxed, lenient" in err and "not comparable" in err
    assert table.value("b", "aime24") == 0.5  # still tabulated


def test_report_plot_for_one_runs_checkpoints(tmp_path):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    paths = []
    for step, avg in ((50, 0.35), (100, 0.41), (150, 0.45)):
        for bench in ("aime24", "aime25"):
            rep = _fake_report(bench, str(run / "checkpoints" / f"step-{step:06d}"), avg, run_dir=str(run), step=step)
            paths.append(ev.write_report(rep, ev.default_report_path(bench, "x", run_dir=run, step=step))[0])
    base = ev.write_report(_fake_report("aime24", "deepseek/base", 0.329), tmp_path / "base.json")[0]
    assert paths[0] == run / "eval" / "aime24-step-000050.json"
    buf = Console(record=True, width=120)
    res = rp.run_report([*paths, base], console=buf)
    png = Path(res["plot"])
    assert png == run / "eval" / "avg_at_n_vs_step.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    rows = [r["label"] for r in res["table"]["rows"]]
    assert rows == ["run step 50", "run step 100", "run step 150", "deepseek/base"]
    out = rp.plot_against_step(rp.load_reports(paths), tmp_path / "custom.png", metric="pass@16")
    assert out.exists()


def test_failed_plot_keeps_the_old_png_and_leaves_no_temp_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    run = tmp_path / "run"
    paths = [ev.write_report(_fake_report("aime24", f"m{s}", 0.1 * s, run_dir=str(run), step=s), tmp_path / f"{s}.json")[0]
             for s in (1, 2)]
    png = tmp_path / "plots" / "p.png"
    png.parent.mkdir()
    png.write_bytes(b"old picture")

    def torn_savefig(self, fname, **kw):
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", torn_savefig)
    with pytest.raises(OSError, match="disk full"):
        rp.plot_against_step(rp.load_reports(paths), png)
    assert png.read_bytes() == b"old picture"
    assert sorted(p.name for p in png.parent.iterdir()) == ["p.png"]


def test_write_report_failure_keeps_the_old_report(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    first = _fake_report("aime24", "m", 0.5)
    ev.write_report(first, out)
    before = out.read_bytes()
    import oprd_cli.io as io_mod

    real_replace = io_mod.os.replace

    def failing_replace(src, dst):
        if str(dst) == str(out):
            raise OSError("no space left")
        return real_replace(src, dst)

    monkeypatch.setattr(io_mod.os, "replace", failing_replace)
    with pytest.raises(OSError, match="no space"):
        ev.write_report(_fake_report("aime24", "m", 0.9), out)
    assert out.read_bytes() == before
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_checkpoint_info_and_default_paths(tmp_path):
    ck = tmp_path / "myrun" / "checkpoints" / "step-000200"
    ck.mkdir(parents=True)
    assert ev.checkpoint_info(ck) == (str((tmp_path / "myrun").resolve()), 200)
    assert ev.checkpoint_info("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B") == (None, None)
    assert ev.default_report_path("aime24", "deepseek-ai/DeepSeek-R1") == Path("eval/aime24-deepseek-ai_DeepSeek-R1.json")
    assert ev.responses_path_for("a/b.json") == Path("a/b.responses.jsonl")
