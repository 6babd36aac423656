"""`--report-to tensorboard` for train and eval: the event files are read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_cli
from oprd_cli.teacher import cache_rollouts

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_train_and_eval_report_to_tensorboard(tiny_dir, aime24_path, tmp_path):
    run = tmp_path / "run"
    run_cli("rollout", "--model", tiny_dir / "qwen2", "--prompts", aime24_path, "--run-dir", run, "--limit", 2,
            "--num-samples", 2, "--max-new-tokens", 6)
    cache_rollouts(str(tiny_dir / "qwen2-b"), run / "rollouts" / "r000001.zarr", run / "cache" / "r000001.zarr",
                   layers="all", show_progress=False)
    run_cli("train", "--run-dir", run, "--model", tiny_dir / "qwen2", "--max-steps", 2, "--batch-size", 2,
            "--report-to", "tensorboard")
    got = scalars(run / "tensorboard")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in got["train/loss"]] == [1, 2]
    assert [v for _, v in got["train/loss"]] == pytest.approx([m["loss"] for m in lines], rel=1e-6)
    assert "train/rep/cosine_similarity" in got and "train/lr" in got
    # eval: the report's metrics at the checkpoint's step
    resp = tmp_path / "resp.jsonl"
    rows = [json.loads(x) for x in aime24_path.read_text().splitlines()][:2]
    resp.write_text("".join(json.dumps({"id": r["id"], "response": f"\\boxed{{{r['answer']}}}", "num_tokens": 3,
                                        "finished_by": "eos"}) + "\n" for r in rows for _ in range(2)))
    run_cli("eval", "--data", aime24_path, "--limit", 2, "--responses", resp, "--out", tmp_path / "e" / "r.json",
            "--report-to", "tensorboard")
    ev = scalars(tmp_path / "e" / "tensorboard")
    assert ev["eval/aime24/avg_at_n"] == [(0, 1.0)] and ev["eval/aime24/pass_at_1"] == [(0, 1.0)]


def test_report_to_refuses_unknown_values(tiny_dir, tmp_path):
    res = run_cli("train", "--model", tiny_dir / "qwen2", "--cache", tmp_path / "none.zarr", "--out", tmp_path / "o",
                  "--report-to", "mlflow", expect=2)
    assert res.stderr.strip().splitlines()[-1].startswith("error:") and "--report-to" in res.stderr



def test_train_and_eval_report_to_wandb_offline_without_a_key(tiny_dir, aime24_path, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from wandb_offline import history, no_wandb_account

    no_wandb_account(monkeypatch, tmp_path)  # no key, no mode: the tracker must choose offline itself
    run = tmp_path / "run"
    run_cli("rollout", "--model", tiny_dir / "qwen2", "--prompts", aime24_path, "--run-dir", run, "--limit", 2,
            "--num-samples", 2, "--max-new-tokens", 6)
    cache_rollouts(str(tiny_dir / "qwen2-b"), run / "rollouts" / "r000001.zarr", run / "cache" / "r000001.zarr",
                   layers="all", show_progress=False)
    run_cli("train", "--run-dir", run, "--model", tiny_dir / "qwen2", "--max-steps", 2, "--batch-size", 2,
            "--report-to", "wandb")
    # a second invocation (a round of `oprd loop`) continues the same wandb run
    run_cli("train", "--run-dir", run, "--max-steps", 3, "--batch-size", 2, "--report-to", "wandb")
    got, config, ids = history(run)  # offline, in RUN/wandb/
    assert len(ids) == 2 and ids[0] == ids[1] == (run / "wandb" / "oprd-train.id").read_text().strip()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["_step"] for h in got] == [m["step"] for m in lines] == [1, 2, 3]
    assert [h["train/loss"] for h in got] == pytest.approx([m["loss"] for m in lines], rel=1e-6)
    assert [h["train/lr"] for h in got] == pytest.approx([m["lr"] for m in lines], rel=1e-6)
    assert "train/rep/cosine_similarity" in got[0]
    assert config["report_to"] == "wandb" and config["batch_size"] == 2  # the run config
    # an id file that is not a wandb id: one line, before any step
    (run / "wandb" / "oprd-train.id").write_text("my run/1\n")
    before = sorted(p.name for p in run.glob("checkpoints/step-*"))
    res = run_cli("train", "--run-dir", run, "--max-steps", 4, "--batch-size", 2, "--report-to", "wandb", expect=2)
    assert res.stderr.strip().splitlines()[-1].startswith("error:") and "oprd-train.id" in res.stderr
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    assert sorted(p.name for p in run.glob("checkpoints/step-*")) == before
    # eval: the report's metrics at the checkpoint's step
    resp = tmp_path / "resp.jsonl"
    rows = [json.loads(x) for x in aime24_path.read_text().splitlines()][:2]
    resp.write_text("".join(json.dumps({"id": r["id"], "response": f"\\boxed{{{r['answer']}}}", "num_tokens": 3,
                                        "finished_by": "eos"}) + "\n" for r in rows for _ in range(2)))
    run_cli("eval", "--data", aime24_path, "--limit", 2, "--responses", resp, "--out", tmp_path / "e" / "r.json",
            "--report-to", "wandb")
    got, _, _ = history(tmp_path / "e")
    assert [(h["checkpoint_step"], h["eval/aime24/pass_at_1"], h["eval/aime24/avg_at_n"]) for h in got] == [(0, 1, 1)]
