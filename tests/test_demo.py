"""`oprd demo`: the embedded task, its cached assets, and the quick run end to end (the CI smoke test)."""

from __future__ import annotations

import json

import pytest

from helpers import run_cli
from oprd_cli.demo.assets import DemoSpec, ModelDims, SftConfig, build_assets
from oprd_cli.demo.task import SplitSizes, TaskConfig, answer_of, generate_splits, is_correct, solution_text

METHODS = ("OPD top-1", "OPD top-16", "OPRD", "OPD top-1 + 1*OPRD")


def test_task_splits_are_disjoint_and_solutions_check_out():
    splits = generate_splits(3, TaskConfig(), SplitSizes(eval=50, val=20, prompts=40, train=200))
    problems = [r["problem"] for recs in splits.values() for r in recs]
    assert len(problems) == len(set(problems)) == 310
    # the held-out split of a seed does not depend on the sizes of the others
    again = generate_splits(3, TaskConfig(), SplitSizes(eval=50, val=1, prompts=1, train=1))
    assert again["eval"] == splits["eval"]
    for r in splits["eval"][:20]:
        text = solution_text(r["problem"])
        assert is_correct(text, r["answer"]) and str(answer_of(r["problem"])) == r["answer"]
        assert text.count("\n") == len([c for c in r["problem"] if c in "+-"]) + 1


def test_assets_are_built_once_and_reused(tmp_path):
    spec = DemoSpec(task=TaskConfig(min_steps=2, max_steps=2), sizes=SplitSizes(eval=8, val=8, prompts=8, train=200),
                    model=ModelDims(hidden_size=32, intermediate_size=64),
                    sft=SftConfig(steps=6, batch_size=8, warmup=2, eval_every=2, eval_start=2, student_min_acc=2.0),
                    tokenizer_texts=100, report_samples=1)
    a = build_assets(tmp_path, seed=1, spec=spec, threads=1, show_progress=False)
    assert not a.reused and (a.teacher / "config.json").exists() and (a.student / "config.json").exists()
    assert a.student_step == 3 and a.teacher_step == 6  # no checkpoint reached the bar: the fallback (half way)
    b = build_assets(tmp_path, seed=1, spec=spec, threads=1, show_progress=False)
    assert b.reused and b.dir == a.dir and b.accuracy == a.accuracy
    assert [p.name for p in tmp_path.iterdir()] == [a.dir.name]  # no temporary folders left behind
    c = build_assets(tmp_path, seed=2, spec=spec, threads=1, show_progress=False)
    assert c.dir != a.dir  # another seed, other assets


def test_quick_demo_writes_summary_and_plot(tmp_path):
    out = tmp_path / "out.json"
    r = run_cli("demo", "--quick", "--json", out, "--out", tmp_path / "work", "--threads", 1)
    s = json.loads(out.read_text())
    graded = s["eval"]["problems"] * s["eval"]["n"]  # every accuracy is a count of correct samples over this

    def is_count(acc):
        return 0 <= acc <= 1 and abs(acc * graded - round(acc * graded)) < 1e-6

    assert is_count(s["student_acc"]) and is_count(s["teacher_acc"])
    assert tuple(s["methods"]) == METHODS
    steps = s["budget"]["total_steps"]
    per_eval = s["budget"]["steps_per_round"] * s["budget"]["eval_every"]
    for name, m in s["methods"].items():
        assert is_count(m["acc"]) and m["acc"] == m["curve"][-1]["acc"]  # the reported accuracy is the last eval
        if s["teacher_acc"] > s["student_acc"]:
            assert m["gap_closed"] == pytest.approx((m["acc"] - s["student_acc"]) / (s["teacher_acc"] - s["student_acc"]))
        else:
            assert m["gap_closed"] is None
        assert 0 < m["train_time_s"] <= m["wall_time_s"] and m["peak_mem_bytes"] > 0
        assert m["steps"] == steps
        assert [c["step"] for c in m["curve"]] == list(range(0, steps + 1, per_eval))  # one eval per eval_every rounds
        assert m["curve"][0] == {"step": 0, "acc": s["student_acc"]}
    assert json.loads((tmp_path / "work" / "runs").glob("*/summary.json").__next__().read_text()) == s
    png = tmp_path / "out.png"
    assert s["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "gap closed" in r.stdout and "OPRD" in r.stdout
