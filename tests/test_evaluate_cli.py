"""`oprd eval` and `oprd report`, driven through the real commands (tiny models, no network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from helpers import run_cli

REQUIRED = ("bench", "model", "num_problems", "num_samples", "avg_at_n", "pass_at_k", "best_at_n", "maj_at_n",
            "dist_4g", "mean_response_tokens", "truncated_fraction", "per_problem", "run_dir", "step")
TINY_EVAL = ["--limit", "2", "--num-samples", "2", "--max-new-tokens", "16"]


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _write_responses(path: Path, rows: list[dict], per_problem: int, wrong: bool = False) -> Path:
    lines = []
    for i, r in enumerate(rows):
        ans = r["answer"]
        if wrong:  # another problem's (different) answer
            ans = next(o["answer"] for o in rows[i + 1:] + rows[:i] if int(o["answer"]) != int(r["answer"]))
        for j in range(per_problem):
            lines.append({"id": r["id"], "response": f"Case {j}: we try \\boxed{{1}} first; the final answer is "
                                                     f"\\boxed{{{ans}}}.", "num_tokens": 20 + j,
                          "finished_by": "eos"})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _one_line_error(r, *words):
    err = r.stderr.strip()
    assert r.exit_code == 2, r.stdout + r.stderr
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error:") and "Traceback" not in r.stdout + r.stderr
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"
    return err


# ------------------------------------------------------------------ graded responses, no model
def test_gold_responses_score_100_and_wrong_ones_0(aime24_path, tmp_path):
    rows = _rows(aime24_path)
    gold = _write_responses(tmp_path / "gold.jsonl", rows, 4)
    out = tmp_path / "r.json"
    r = run_cli("eval", "--data", aime24_path, "--responses", gold, "--out", out)
    assert "Avg@4" in r.stdout and "100.0" in r.stdout
    rep = json.loads(out.read_text())
    for key in REQUIRED:
        assert key in rep
    assert rep["avg_at_n"] == 1.0 and rep["best_at_n"] == 1.0 and rep["maj_at_n"] == 1.0
    assert rep["pass_at_k"] == {"1": 1.0, "2": 1.0, "4": 1.0}
    assert rep["num_problems"] == 30 and rep["num_samples"] == 120 and rep["n"] == 4
    assert rep["model"] == "gold" and rep["run_dir"] is None and rep["step"] is None
    assert rep["mean_response_tokens"] == pytest.approx(21.5) and rep["length_unit"] == "tokens"
    assert rep["truncated_fraction"] == 0.0 and rep["graded_from"] == str(gold)
    assert len(rep["per_problem"]) == 30 and rep["per_problem"][0]["num_correct"] == 4
    assert "samples" not in rep
    graded = _rows(tmp_path / rep["responses_file"])
    assert len(graded) == 120 and all(g["correct"] for g in graded)
    assert {"id", "index", "sample", "extracted", "correct", "grade", "num_tokens", "response"} <= set(graded[0])

    wrong = _write_responses(tmp_path / "wrong.jsonl", rows, 4, wrong=True)
    r = run_cli("eval", "--data", aime24_path, "--responses", wrong, "--out", tmp_path / "w.json", "--json")
    summary = json.loads(r.stdout)  # --json: stdout is one JSON object and nothing else
    assert summary["avg_at_n"] == 0.0 and summary["best_at_n"] == 0.0 and summary["maj_at_n"] == 0.0
    assert set(summary["pass_at_k"].values()) == {0.0}
    assert summary["report_path"] == str(tmp_path / "w.json") and "per_problem" not in summary


def test_extract_modes_through_the_cli(aime24_path, tmp_path):
    rows = _rows(aime24_path)[:3]
    plain = tmp_path / "unboxed.jsonl"
    plain.write_text("".join(json.dumps({"id": r["id"], "response": f"Adding the {j + 2} cases, the answer is "
                                                                   f"{r['answer']}."}) + "\n"
                             for r in rows for j in range(2)))
    r = run_cli("eval", "--data", aime24_path, "--limit", "3", "--responses", plain, "--json", "--out", tmp_path / "b.json")
    s = json.loads(r.stdout)
    assert s["grading"]["extract"] == "boxed" and s["avg_at_n"] == 0.0 and s["no_answer_fraction"] == 1.0
    r = run_cli("eval", "--data", aime24_path, "--limit", "3", "--responses", plain, "--extract", "lenient",
                "--out", tmp_path / "l.json")
    assert "lenient" in r.stdout
    rep = json.loads((tmp_path / "l.json").read_text())
    assert rep["grading"]["extract"] == "lenient" and rep["avg_at_n"] == 1.0 and rep["maj_at_n"] == 1.0
    r = run_cli("eval", "--data", aime24_path, "--responses", plain, "--extract", "loose", expect=2)
    _one_line_error(r, "--extract", "boxed", "lenient")
    assert not (tmp_path / "eval").exists()


def test_verl_file_with_responses_and_limit(shared_data, tmp_path):
    verl = shared_data / "aime24_verl.parquet"
    rows = [{"id": str(i), "answer": a["answer"]} for i, a in enumerate(_rows(shared_data / "aime24.jsonl"))]
    gold = _write_responses(tmp_path / "gold.jsonl", rows[:5], 2)
    r = run_cli("eval", "--data", verl, "--responses", gold, "--limit", "5", "--model", "someone/else", "--json",
                "--out", tmp_path / "v.json")
    summary = json.loads(r.stdout)
    assert summary["bench"] == "aime24_verl" and summary["model"] == "someone/else"
    assert summary["num_problems"] == 5 and summary["avg_at_n"] == 1.0


def test_responses_lengths_with_a_tokenizer_and_run_labels(tiny_qwen, aime24_path, tmp_path, run):
    rows = _rows(aime24_path)[:3]
    plain = tmp_path / "plain.jsonl"  # no num_tokens: lengths need a tokenizer
    plain.write_text("".join(json.dumps({"id": r["id"], "response": f"so x = \\boxed{{{r['answer']}}}"}) + "\n"
                             for r in rows))
    texts = [f"so x = \\boxed{{{r['answer']}}}" for r in rows]
    r = run_cli("eval", "--data", aime24_path, "--limit", "3", "--responses", plain, "--json", "--out", tmp_path / "a.json")
    s = json.loads(r.stdout)
    assert s["length_unit"] == "words" and s["mean_response_tokens"] == pytest.approx(4.0)
    r = run_cli("eval", "--data", aime24_path, "--limit", "3", "--responses", plain, "--model", tiny_qwen, "--json",
                "--out", tmp_path / "b.json")
    s = json.loads(r.stdout)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_qwen))
    want = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts) / 3
    assert want != pytest.approx(4.0)  # tokens, not words
    assert s["length_unit"] == "tokens" and s["mean_response_tokens"] == pytest.approx(want) and s["avg_at_n"] == 1.0
    # responses written by a run's checkpoint elsewhere (e.g. vLLM) keep the run and the step
    r = run_cli("eval", "--data", aime24_path, "--limit", "3", "--responses", plain, "--run-dir", run,
                "--checkpoint", "step-000004", "--json", "--out", tmp_path / "c.json")
    s = json.loads(r.stdout)
    assert s["step"] == 4 and s["run_dir"] == str(run.resolve()) and s["length_unit"] == "tokens"
    r = run_cli("eval", "--data", aime24_path, "--responses", plain, "--run-dir", run, expect=2)
    _one_line_error(r, "--checkpoint")


# ------------------------------------------------------------------ sampling from a model
def test_tiny_model_end_to_end(tiny_qwen, aime24_path, tmp_path):
    out = tmp_path / "tiny.json"
    r = run_cli("eval", "--data", aime24_path, "--model", tiny_qwen, *TINY_EVAL, "--out", out)
    assert "Avg@2" in r.stdout and f"wrote {out}" in r.stderr
    rep = json.loads(out.read_text())
    for key in REQUIRED:
        assert key in rep, key
    assert rep["num_problems"] == 2 and rep["num_samples"] == 4 and rep["n"] == 2
    assert rep["model"] == str(tiny_qwen) and rep["bench"] == "aime24"
    assert rep["length_unit"] == "tokens" and rep["dist_4g_unit"] == "token_ids"
    assert rep["sampling"]["temperature"] == 0.7 and rep["sampling"]["top_p"] == 0.95  # the release's protocol
    assert rep["grading"]["extract"] == "boxed"
    assert rep["sampling"]["num_samples"] == 2 and rep["sampling"]["max_new_tokens"] == 16
    samples = _rows(out.with_name("tiny.responses.jsonl"))
    assert len(samples) == 4
    lengths = [s["num_tokens"] for s in samples]
    assert all(1 <= n <= 16 for n in lengths)
    assert rep["mean_response_tokens"] == pytest.approx(sum(lengths) / 4)
    # lengths are generated tokens (a sample cut by the limit has exactly 16), not words of the text
    for s in samples:
        assert s["finished_by"] in ("eos", "length")
        if s["finished_by"] == "length":
            assert s["num_tokens"] == 16
    assert rep["truncated_fraction"] == pytest.approx(sum(s["finished_by"] == "length" for s in samples) / 4)
    assert rep["generation"]["tokens"] == sum(lengths)

    # the written responses are valid --responses input and grade the same
    again = tmp_path / "regraded.json"
    run_cli("eval", "--data", aime24_path, "--limit", "2", "--responses", out.with_name("tiny.responses.jsonl"),
            "--out", again)
    re = json.loads(again.read_text())
    assert re["avg_at_n"] == rep["avg_at_n"] and re["mean_response_tokens"] == rep["mean_response_tokens"]
    assert re["truncated_fraction"] == rep["truncated_fraction"]

    # same seed, same samples
    run_cli("eval", "--data", aime24_path, "--model", tiny_qwen, *TINY_EVAL, "--out", tmp_path / "same.json")
    assert [s["response"] for s in _rows(tmp_path / "same.responses.jsonl")] == [s["response"] for s in samples]


def test_verl_parquet_with_llama(tiny_llama, shared_data, tmp_path):
    r = run_cli("eval", "--data", shared_data / "aime24_verl.parquet", "--model", tiny_llama, "--limit", "2",
                "--num-samples", "1", "--max-new-tokens", "8", "--out", tmp_path / "v.json", "--json")
    s = json.loads(r.stdout)
    assert s["bench"] == "aime24_verl" and s["num_problems"] == 2 and s["num_samples"] == 2
    rep = json.loads((tmp_path / "v.json").read_text())
    assert [p["id"] for p in rep["per_problem"]] == ["0", "1"]
    assert [p["answer"] for p in rep["per_problem"]] == ["204", "025"]  # verl keeps the leading zero


def test_python_api_on_a_json_file(tiny_qwen, aime24_path, tmp_path):
    """evaluate_model (used by oprd demo / oprd loop) on a .json list file: the full report dict."""
    from oprd_cli.eval import evaluate_model

    data = tmp_path / "aime.json"
    data.write_text(json.dumps([{"problem": r["problem"], "answer": r["answer"]} for r in _rows(aime24_path)[:3]]))
    rep = evaluate_model(str(tiny_qwen), data=str(data), bench="aime24", limit=2, num_samples=2, max_new_tokens=8,
                         out=tmp_path / "api.json", show_progress=False)
    assert rep["bench"] == "aime24" and rep["num_problems"] == 2 and rep["n"] == 2 and len(rep["samples"]) == 4
    assert rep["data"] == str(data.resolve()) and rep["sampling"]["temperature"] == 0.7
    assert rep["grading"]["integer_answers"] and [p["id"] for p in rep["per_problem"]] == ["0", "1"]
    written = json.loads((tmp_path / "api.json").read_text())
    assert rep["report_path"] == str(tmp_path / "api.json") and written["avg_at_n"] == rep["avg_at_n"]
    assert len(_rows(tmp_path / "api.responses.jsonl")) == 4


# ------------------------------------------------------------------ run directories
@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dir) -> Path:
    """RUN with oprd.toml naming the student, complete checkpoints step-000002 (model + tokenizer) and
    step-000004 (model only: the run's student tokenizer is used), and an incomplete step-000006."""
    root = tmp_path_factory.mktemp("evalrun") / "run"
    student = tiny_dir / "qwen2"
    (root / "checkpoints").mkdir(parents=True)
    (root / "oprd.toml").write_text(f'[models]\nstudent = "{student}"\n')
    for step, src, with_tok in ((2, "qwen2-b", True), (4, "qwen2", False), (6, "qwen2", True)):
        ck = root / "checkpoints" / f"step-{step:06d}"
        AutoModelForCausalLM.from_pretrained(tiny_dir / src).save_pretrained(ck)
        if with_tok:
            for f in (tiny_dir / src).glob("tokenizer*"):
                shutil.copy(f, ck / f.name)
        if step != 6:
            (ck / "oprd_checkpoint.json").write_text(json.dumps({"step": step}))
    return root


def test_run_dir_checkpoint_and_latest(run, aime24_path):
    run_cli("eval", "--data", aime24_path, "--bench", "aime24", "--run-dir", run, "--checkpoint", "step-2", *TINY_EVAL)
    rep = json.loads((run / "eval" / "aime24-step-000002.json").read_text())
    assert rep["run_dir"] == str(run.resolve()) and rep["step"] == 2
    assert rep["model"] == str(run.resolve() / "checkpoints" / "step-000002")
    # no --checkpoint: the latest complete one (step-000006 has no marker yet)
    r = run_cli("eval", "--data", aime24_path, "--bench", "aime24", "--run-dir", run, *TINY_EVAL, "--json")
    s = json.loads(r.stdout)
    assert s["step"] == 4 and s["report_path"] == str(run.resolve() / "eval" / "aime24-step-000004.json")
    assert Path(s["sampling"]["tokenizer"]).name == "qwen2"  # step-000004 has no tokenizer: the run's student's
    # a checkpoint folder passed as --model keeps its run and step
    r = run_cli("eval", "--data", aime24_path, "--model", run / "checkpoints" / "step-000002", *TINY_EVAL,
                "--out", run.parent / "direct.json", "--json")
    s = json.loads(r.stdout)
    assert s["step"] == 2 and s["run_dir"] == str(run.resolve())


def test_all_checkpoints_reports_table_and_plot(run, aime24_path):
    r = run_cli("eval", "--data", aime24_path, "--bench", "aime24", "--run-dir", run, "--all-checkpoints",
                *TINY_EVAL)
    ev = run / "eval"
    for step in (0, 2, 4):  # the initial student (from oprd.toml) and both complete checkpoints
        rep = json.loads((ev / f"aime24-step-{step:06d}.json").read_text())
        assert rep["step"] == step and rep["run_dir"] == str(run.resolve())
    assert json.loads((ev / "aime24-step-000000.json").read_text())["model"].endswith("qwen2")
    assert not (ev / "aime24-step-000006.json").exists()
    png = ev / "avg_at_n_vs_step.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "run step 0" in r.stdout and "run step 4" in r.stdout and f"plot: {png}" in r.stdout

    # --skip-existing keeps reports made with the same protocol
    r = run_cli("eval", "--data", aime24_path, "--bench", "aime24", "--run-dir", run, "--all-checkpoints",
                *TINY_EVAL, "--skip-existing", "--json")
    out = json.loads(r.stdout)
    assert [s["step"] for s in out["reports"]] == [0, 2, 4] and r.stderr.count("kept") == 3
    assert [row["step"] for row in out["table"]["rows"]] == [0, 2, 4]
    # ... but not reports whose answers were extracted another way
    r = run_cli("eval", "--data", aime24_path, "--bench", "aime24", "--run-dir", run, "--all-checkpoints",
                *TINY_EVAL, "--skip-existing", "--extract", "lenient", "--json")
    out = json.loads(r.stdout)
    assert "kept" not in r.stderr and [s["grading"]["extract"] for s in out["reports"]] == ["lenient"] * 3

    # oprd report over the folder: the table and the plot
    png.unlink()
    r = run_cli("report", ev)
    assert "avg_at_n" in r.stdout and "run step 2" in r.stdout and png.exists()
    custom = run.parent / "curve.png"
    r = run_cli("report", *sorted(ev.glob("aime24-step-*.json")), "--metric", "pass@2", "--plot", custom, "--json")
    table = json.loads(r.stdout)
    assert table["table"]["metric"] == "pass@2" and table["plot"] == str(custom) and custom.exists()
    assert [row["label"] for row in table["table"]["rows"]] == ["run step 0", "run step 2", "run step 4"]
    r = run_cli("report", ev, "--metric", "accuracy", expect=2)
    _one_line_error(r, "unknown metric", "avg_at_n")


def test_missing_checkpoint_lists_the_existing_ones(run, aime24_path):
    r = run_cli("eval", "--data", aime24_path, "--run-dir", run, "--checkpoint", "step-9", expect=2)
    _one_line_error(r, "step-9", "step-000002", "step-000004")
    r = run_cli("eval", "--data", aime24_path, "--run-dir", run, "--checkpoint", "step-000006", expect=2)
    _one_line_error(r, "not complete", "step-000002")
    r = run_cli("eval", "--data", aime24_path, "--run-dir", run, "--checkpoint", "latest", expect=2)
    _one_line_error(r, "step-000050")


# ------------------------------------------------------------------ bad input
def test_benchmark_without_network_points_to_data(tiny_qwen, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    r = run_cli("eval", "--bench", "aime24", "--model", tiny_qwen, "--limit", "1", expect=2)
    _one_line_error(r, "aime24", "--data")


def test_bad_inputs_are_one_line(tiny_qwen, aime24_path, tmp_path, run):
    r = run_cli("eval", "--bench", "aime2099", "--model", tiny_qwen, expect=2)
    _one_line_error(r, "aime2099", "aime24", "aime25", "math500")
    no_answer = tmp_path / "q.jsonl"
    no_answer.write_text(json.dumps({"question": "1+1?", "hint": "two"}) + "\n")
    r = run_cli("eval", "--data", no_answer, "--model", tiny_qwen, expect=2)
    _one_line_error(r, "answer", "question, hint")
    no_problem = tmp_path / "a.jsonl"
    no_problem.write_text(json.dumps({"text": "1+1?", "answer": "2"}) + "\n")
    r = run_cli("eval", "--data", no_problem, "--model", tiny_qwen, expect=2)
    _one_line_error(r, "prompt field", "text, answer")
    unknown = tmp_path / "u.jsonl"
    unknown.write_text(json.dumps({"id": 3, "response": "x"}) + "\n" + json.dumps({"id": "nope", "response": "y"}))
    r = run_cli("eval", "--data", aime24_path, "--responses", unknown, expect=2)
    _one_line_error(r, "'nope'", "not in the dataset")
    r = run_cli("eval", "--data", aime24_path, "--model", tiny_qwen, "--num-samples", "0", expect=2)
    _one_line_error(r, "--num-samples")
    r = run_cli("eval", "--data", aime24_path, expect=2)
    _one_line_error(r, "--model", "--run-dir")
    r = run_cli("eval", "--data", aime24_path, "--model", tiny_qwen, "--run-dir", run, expect=2)
    _one_line_error(r, "--model", "--run-dir", "not both")
    r = run_cli("eval", "--data", aime24_path, "--model", tiny_qwen, "--checkpoint", "step-2", expect=2)
    _one_line_error(r, "--checkpoint", "--run-dir")
    r = run_cli("eval", "--data", aime24_path, "--run-dir", tmp_path / "norun", expect=2)
    _one_line_error(r, "does not exist")
    r = run_cli("eval", "--model", tiny_qwen, expect=2)
    _one_line_error(r, "--bench", "--data")
    r = run_cli("eval", "--data", aime24_path, "--model", tmp_path / "missing", "--limit", "1", expect=2)
    _one_line_error(r, "does not exist")
    r = run_cli("eval", "--data", aime24_path, "--run-dir", run, "--all-checkpoints", "--out", tmp_path / "x.json",
                expect=2)
    _one_line_error(r, "folder")
    r = run_cli("report", tmp_path / "nothing.json", expect=2)
    _one_line_error(r, "does not exist")


def test_help_documents_defaults(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one help line per option
    out = run_cli("eval", "--help").stdout
    for words in ("--num-samples", "default: 16", "default: 0.7", "default: 0.95", "--responses", "--all-checkpoints",
                  "--checkpoint", "--extract", "default: boxed", "lenient"):
        assert words in out
    out = run_cli("report", "--help").stdout
    assert "--metric" in out and "--plot" in out
    top = run_cli("--help").stdout
    assert "eval" in top and "report" in top
