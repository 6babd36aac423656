"""`oprd loop`: rounds of rollout -> teacher-cache -> train on tiny models, interrupted and resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import info_json, run_cli
from oprd_cli import loop
from oprd_cli.loop import RoundState, next_stage, read_log
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


def _interrupt_after(monkeypatch, round_index: int, stage: str) -> None:
    """Ctrl-C (KeyboardInterrupt) right after the loop logged stage ``stage`` of round ``round_index``."""
    log_stage = loop.log_stage

    def stop(run, entry):
        log_stage(run, entry)
        if (entry["round"], entry["stage"]) == (round_index, stage):
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "log_stage", stop)


def test_three_rounds_interrupted_and_resumed(tiny_dir, aime24_path, tmp_path, monkeypatch):
    run = tmp_path / "run"
    evals = ["--eval-data", aime24_path, "--eval-limit", 2, "--eval-num-samples", 1, "--eval-max-new-tokens", 4,
             "--eval-every", 2]
    # Ctrl-C right after round 2's teacher cache is complete
    _interrupt_after(monkeypatch, 2, "cache")
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
    monkeypatch.undo()
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
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread, as in-process tests
    wrapper = Path(__file__).with_name("loop_kill_after.py")  # SIGKILLs itself after round 1's train stage
    args = [sys.executable, str(wrapper), "1:train", *map(str, _loop_args(run, tiny_dir, aime24_path, 2,
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


def _rs(**kw) -> RoundState:
    base = dict(index=2, trained=False, cache_complete=False, rollout_complete=False, newer_cache=None)
    return RoundState(**{**base, **kw})


@pytest.mark.parametrize("state, stage", [
    (_rs(), "rollout"),                                            # nothing, or an incomplete store: sample
    (_rs(rollout_complete=True), "cache"),                         # complete rollout: teacher pass
    (_rs(rollout_complete=True, cache_complete=True), "train"),    # complete cache: train
    (_rs(cache_complete=True), "train"),                           # the cache decides, not the rollout
    (_rs(trained=True, rollout_complete=True, cache_complete=True), "done"),
    (_rs(trained=True), "done"),                                   # trained even when stores were moved away
    (_rs(rollout_complete=True, newer_cache=3), "blocked"),        # rounds are trained in order
    (_rs(trained=True, newer_cache=3), "done"),
])
def test_next_stage_from_run_state(state, stage):
    assert next_stage(state) == stage


def test_round_state_reads_the_run_directory(tmp_path):
    """Incomplete stores count as absent; a complete later cache blocks an untrained earlier round."""
    from oprd_cli.loop import round_state
    from oprd_cli.stores.rundir import round_name

    run = RunDir(tmp_path / "run")
    for folder, index, complete in (("rollouts", 1, True), ("cache", 1, False), ("cache", 3, True)):
        p = run.root / folder / round_name(index)
        p.mkdir(parents=True)
        (p / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
        if complete:
            (p / "oprd_complete.json").write_text("{}")
    s1 = round_state(run, 1)
    assert (s1.trained, s1.rollout_complete, s1.cache_complete, s1.newer_cache) == (False, True, False, 3)
    assert next_stage(s1) == "blocked"
    s3 = round_state(run, 3)
    assert (s3.cache_complete, s3.newer_cache) == (True, None) and next_stage(s3) == "train"


def test_later_complete_cache_blocks_the_loop(tiny_dir, aime24_path, tmp_path):
    """A complete cache of a later round than the next untrained one is one clear line, nothing written."""
    from oprd_cli.stores.rundir import round_name

    run = tmp_path / "run"
    p = run / "cache" / round_name(2)
    p.mkdir(parents=True)
    (p / "oprd_complete.json").write_text("{}")
    r = run_cli(*_loop_args(run, tiny_dir, aime24_path, 2), expect=2)
    assert "round 2" in r.stderr and "in order" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (run / "rollouts").exists()
