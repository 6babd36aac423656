"""`oprd loop`: rounds of rollout -> teacher-cache -> train on tiny models, interrupted and resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import info_json, run_cli
from oprd_cli.loop import STOP_ENV, read_log
from oprd_cli.stores.rundir import RunDir


def _loop_args(run: Path, tiny_dir: Path, aime24_path: Path, rounds: int, *extra) -> list:
    return ["loop", "--run-dir", run, "--model", tiny_dir / "qwen2", "--teacher", tiny_dir / "qwen2-b",
            "--prompts", aime24_path, "--rounds", rounds, "--limit", 2, "--num-samples", 2,
            "--max-new-tokens", 4, "--batch-size", 4, "--positions", "all", *extra]


def _state(run: Path) -> dict:
    """What identifies the finished stores and checkpoints: content digests and marker mtimes."""
    rd = RunDir(run)
    out = {}
    for kind, rounds in (("rollout", rd.rollout_rounds()), ("cache", rd.cache_rounds())):
        for i, p in rounds:
            out[f"{kind}{i}"] = (info_json(p)["content_digest"], (p / "oprd_complete.json").stat().st_mtime_ns)
    for ck in rd.checkpoints():
        out[f"step{ck.step}"] = (ck.state.get("weights_digest"), (ck.path / "oprd_checkpoint.json").stat().st_mtime_ns)
    return out


def test_three_rounds_interrupted_and_resumed(tiny_dir, aime24_path, tmp_path, monkeypatch):
    run = tmp_path / "run"
    evals = ["--eval-data", aime24_path, "--eval-limit", 2, "--eval-num-samples", 1, "--eval-max-new-tokens", 4,
             "--eval-every", 2]
    # Ctrl-C right after round 2's teacher cache is complete
    monkeypatch.setenv(STOP_ENV, "2:cache")
    r = run_cli(*_loop_args(run, tiny_dir, aime24_path, 3, *evals), expect=130)
    assert "interrupted" in r.stderr
    rd = RunDir(run)
    assert [i for i, _ in rd.rollout_rounds()] == [1, 2]
    assert [i for i, _ in rd.cache_rounds()] == [1, 2]
    assert [c.step for c in rd.checkpoints()] == [1]
    assert [(e["round"], e["stage"]) for e in read_log(run)] == [
        (0, "eval"), (1, "rollout"), (1, "cache"), (1, "train"), (2, "rollout"), (2, "cache")]
    before = _state(run)

    # resumed: round 2 goes straight to training; nothing finished is redone
    monkeypatch.delenv(STOP_ENV)
    r = run_cli(*_loop_args(run, tiny_dir, aime24_path, 3, *evals, "--json"))
    out = json.loads(r.stdout)
    assert [(e["round"], e["stage"]) for e in out["stages_run"]] == [
        (2, "train"), (2, "eval"), (3, "rollout"), (3, "cache"), (3, "train"), (3, "eval")]
    after = _state(run)
    assert {k: after[k] for k in before} == before
    assert [i for i, _ in rd.rollout_rounds()] == [1, 2, 3]
    assert [i for i, _ in rd.cache_rounds()] == [1, 2, 3]
    assert [c.step for c in rd.checkpoints()] == [1, 2, 3]
    assert out["step"] == 3 and out["checkpoint"].endswith("step-000003")
    assert [e["step"] for e in out["evals"]] == [0, 2, 3]  # step 0 was kept, not re-evaluated
    assert out["evals"][0]["kept"] and not out["evals"][1]["kept"]
    assert sorted(p.name for p in (run / "eval").glob("*.json")) == [
        "aime24-step-000000.json", "aime24-step-000002.json", "aime24-step-000003.json"]

    # each round sampled with the checkpoint of the round before, and training consumed every round in order
    steps = [json.loads((p / "zarr.json").read_text())["attributes"]["oprd"]["policy"]["step"]
             for _, p in rd.rollout_rounds()]
    assert steps == [0, 1, 2]
    marker = rd.latest_checkpoint().state
    assert [c["round"] for c in marker["consumed_caches"]] == [1, 2, 3]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert marker["total_steps"] == 3  # the schedule covers all rounds: 3 x (2 prompts x 2 samples / 4)

    # a finished loop has nothing left to do
    r = run_cli(*_loop_args(run, tiny_dir, aime24_path, 3, "--json"))
    assert json.loads(r.stdout)["stages_run"] == []
    assert _state(run) == after


def test_killed_process_resumes(tiny_dir, aime24_path, tmp_path):
    """SIGKILL right after round 1 trained; a half-written round-2 rollout is then found and replaced."""
    run = tmp_path / "run"
    env = {**os.environ, STOP_ENV: "1:train:kill", "OMP_NUM_THREADS": "1"}  # one thread, as in-process tests
    args = [sys.executable, "-m", "oprd_cli", *map(str, _loop_args(run, tiny_dir, aime24_path, 2,
                                                                    "--objective", "opd-top1"))]
    p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    rd = RunDir(run)
    assert [c.step for c in rd.checkpoints()] == [1]
    before = _state(run)
    # what a crash in the middle of writing round 2's rollout leaves: a store without completion marker
    leftover = run / "rollouts" / "r000002.zarr"
    leftover.mkdir(parents=True)
    (leftover / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')

    r = run_cli(*_loop_args(run, tiny_dir, aime24_path, 2, "--json"))
    out = json.loads(r.stdout)
    assert [(e["round"], e["stage"]) for e in out["stages_run"]] == [(2, "rollout"), (2, "cache"), (2, "train")]
    assert {k: v for k, v in _state(run).items() if k in before} == before
    assert [c.step for c in rd.checkpoints()] == [1, 2]
    # the objective came from RUN/oprd.toml, written when the run started; the cache has what it needs
    cache = info_json(run / "cache" / "r000002.zarr")
    assert json.dumps(cache).count("sampled") >= 1
    assert rd.latest_checkpoint().state["objective"] == "opd-top1"


@pytest.mark.parametrize("drop, words", [("--teacher", "--teacher"), ("--prompts", "--prompts")])
def test_missing_inputs_are_one_line_errors(tiny_dir, aime24_path, tmp_path, drop, words):
    args = _loop_args(tmp_path / "run", tiny_dir, aime24_path, 1)
    i = args.index(drop)
    del args[i:i + 2]
    r = run_cli(*args, expect=2)
    assert words in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_rounds(tiny_dir, aime24_path, tmp_path):
    r = run_cli(*_loop_args(tmp_path / "run", tiny_dir, aime24_path, 0), expect=2)
    assert "--rounds" in r.stderr
    assert not (tmp_path / "run").exists()
