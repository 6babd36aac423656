"""`oprd demo`: the embedded task, its cached assets, and the quick run end to end (the CI smoke test)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from helpers import run_cli

from oprd_cli.demo.assets import DemoSpec, ModelDims, SftConfig, build_assets
from oprd_cli.demo.jobs import with_teacher_head
from oprd_cli.demo.methods import METHODS, Budget, select_methods
from oprd_cli.demo.report import gap_closed, mean_std, method_row
from oprd_cli.demo.task import (
    SplitSizes,
    TaskConfig,
    answer_of,
    generate_splits,
    is_correct,
    solution_text,
)

NAMES = ["teacher", "student", "opd-top1", "opd-top16", "opd-plus-jsd", "tropd", "oprd", "opd-top16+oprd", "tropd+oprd",
         "oprd-bridge"]
JSON_KEYS = ("name", "lr", "accuracy_mean", "accuracy_std", "gap_closed_mean", "gap_closed_std", "train_seconds")


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


def test_quick_demo_reports_every_method_over_seeds(tmp_path):
    out = tmp_path / "out.json"
    r = run_cli("demo", "--quick", "--json", out, "--out", tmp_path / "work")
    s = json.loads(out.read_text())
    assert [m["name"] for m in s["methods"]] == NAMES
    assert s["seeds"] == [0, 1] and s["tune_seeds"] == [0]
    graded = s["eval"]["problems"] * s["eval"]["n"]  # every accuracy is a count of correct samples over this
    rows = {m["name"]: m for m in s["methods"]}
    refs = {p["seed"]: {k: next(q["accuracy"] for q in rows[k]["per_seed"] if q["seed"] == p["seed"])
                        for k in ("teacher", "student")} for p in rows["teacher"]["per_seed"]}
    grid = s["budget"]["lr_grid"]
    for m in s["methods"]:
        assert set(JSON_KEYS) <= set(m)
        accs = [p["accuracy"] for p in m["per_seed"]]
        assert [p["seed"] for p in m["per_seed"]] == s["seeds"]
        assert all(abs(a * graded - round(a * graded)) < 0.02 for a in accs)  # counts (rounded to 4 places)
        assert m["accuracy_mean"] == pytest.approx(statistics.mean(accs), abs=1e-4)
        assert m["accuracy_std"] == pytest.approx(statistics.stdev(accs), abs=1e-4)
        for p in m["per_seed"]:
            t, st = refs[p["seed"]]["teacher"], refs[p["seed"]]["student"]
            want = None if t <= st else (p["accuracy"] - st) / (t - st)
            assert p["gap_closed"] == (None if want is None else pytest.approx(want, rel=0.01, abs=2e-3))
        if m["name"] in ("teacher", "student"):
            assert m["lr"] is None
            continue
        # the rate is the grid's best on val (ties to the smaller), and the held-out curve ends at the reported mean
        val = {float(k): v for k, v in m["val_by_lr"].items()}
        assert sorted(val) == sorted(grid) and m["lr"] == min(lr for lr, v in val.items() if v == max(val.values()))
        assert [c["step"] for c in m["curve"]] == s["budget"]["curve_steps"]
        assert m["curve"][-1]["mean"] == pytest.approx(m["accuracy_mean"], abs=1e-4)
        assert m["curve"][0]["mean"] == pytest.approx(rows["student"]["accuracy_mean"], abs=1e-4)
        assert m["train_seconds"] > 0
    assert len(s["lm_head_cap"]["per_seed"]) == 2
    # the held-out split never enters the choice: runs at rates that were not chosen hold only val reports
    work = Path(s["work_dir"])
    for m in s["methods"][2:]:
        for lr_dir in (work / "s0" / m["name"]).iterdir():
            reports = {p.name.split("-step-")[0] for p in (lr_dir / "demo-eval").glob("*.json")}
            assert reports == ({"val", "eval"} | ({"eval-teacher-head"} if m["name"] == "oprd" else set())
                               if lr_dir.name == "lr" + format(m["lr"], "g").replace(".", "p").replace("-", "m")
                               else {"val"}), (m["name"], lr_dir.name, reports)
    assert json.loads((work / "summary.json").read_text()) == s
    png = tmp_path / "out.png"
    assert s["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "gap closed" in r.stdout and "OPRD-Bridge" in r.stdout and "teacher's LM head" in r.stdout


def test_mean_std_and_gap():
    assert mean_std([0.5, 0.7, None]) == (pytest.approx(0.6), pytest.approx(statistics.stdev([0.5, 0.7])))
    assert mean_std([0.3]) == (0.3, 0.0) and mean_std([None]) == (None, None)
    assert gap_closed(0.7, 0.4, 1.0) == pytest.approx(0.5) and gap_closed(0.7, 0.5, 0.5) is None
    row = method_row("x", "X", 1e-3, {0: 0.7, 1: 0.9}, {0: {"teacher": 1.0, "student": 0.4},
                                                        1: {"teacher": 1.0, "student": 0.5}}, [2.0, 4.0])
    assert row["gap_closed_mean"] == pytest.approx((0.5 + 0.8) / 2) and row["train_seconds"] == 3.0
    assert Budget(rounds=4, prompts_per_round=64, eval_every=2).curve_steps() == [0, 16, 32]
    assert Budget(rounds=3, prompts_per_round=64, eval_every=2).curve_steps() == [0, 16, 24]


def test_demo_refuses_bad_flags_in_one_line(tmp_path):
    for args, needle in ((("--seeds", "0,x"), "--seeds takes comma-separated integers"),
                         (("--seeds", "1,1"), "--seeds has repeats"),
                         (("--methods", "oprd,nope"), "unknown method(s) nope")):
        r = run_cli("demo", "--quick", "--out", tmp_path, *args, expect=2)
        assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert select_methods("oprd-bridge,oprd") == tuple(m for m in METHODS if m.name in ("oprd", "oprd-bridge"))


def test_teacher_head_readout_is_the_student_body_through_the_teachers_head(tmp_path, tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM

    student, teacher = tiny_dir / "qwen2", tiny_dir / "qwen2-b"
    out = with_teacher_head(str(student), str(teacher), tmp_path / "swapped")
    s, t, w = (AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in (student, teacher, out))
    ids = torch.tensor([[3, 5, 7, 11]])
    with torch.no_grad():
        h = s(ids, output_hidden_states=True).hidden_states[-1]
        assert torch.allclose(w(ids).logits, h @ t.get_output_embeddings().weight.T, atol=1e-5)
        assert not torch.allclose(w(ids).logits, s(ids).logits)
