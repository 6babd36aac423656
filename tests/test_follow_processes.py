"""Follow mode across processes: rollout rounds, a `teacher-cache --follow` worker and a `train --follow`
trainer over one run directory, three kinds of processes. Every store's marker comes 1.5 s after its
data (tests/slow_marker_worker.py), so a follower that read a half-written store would fail or train
on a cache whose rollout digest does not match."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import info_json

ROOT = Path(__file__).resolve().parents[1]
SLOW = [str(Path(__file__).with_name("slow_marker_worker.py")), "1.5"]


def _proc(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, *SLOW, *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _ok(p: subprocess.Popen, timeout: float = 300) -> str:
    _, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:]
    return err


@pytest.mark.slow
def test_rollout_rounds_teacher_follower_and_trainer_follower(tiny_dir, aime24_path, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    teacher = _proc("teacher-cache", "--run-dir", run, "--teacher", tiny_dir / "qwen2-b", "--follow",
                    "--poll-seconds", 0.2, "--max-rounds", 2, "--layers", "all", "--timeout", 240)
    trainer = _proc("train", "--run-dir", run, "--model", tiny_dir / "qwen2", "--follow", "--poll-seconds", 0.2,
                    "--max-caches", 2, "--batch-size", 4, "--timeout", 240)
    for r in (1, 2):
        _ok(_proc("rollout", "--run-dir", run, "--model", tiny_dir / "qwen2", "--prompts", aime24_path,
                  "--limit", 2, "--num-samples", 2, "--max-new-tokens", 6, "--seed", r))
        if r == 1:  # the next round once the first is cached (as a loop would)
            deadline = time.monotonic() + 240
            while not (run / "cache" / "r000001.zarr" / "oprd_complete.json").exists():
                assert time.monotonic() < deadline and teacher.poll() is None
                time.sleep(0.2)
    _ok(teacher)
    _ok(trainer)
    caches = {}
    for r in (1, 2):
        ro, ca = info_json(run / "rollouts" / f"r00000{r}.zarr"), info_json(run / "cache" / f"r00000{r}.zarr")
        assert ro["complete"] and ca["complete"]
        assert ca["rollout"]["content_digest"] == ro["content_digest"]  # cached from the complete store
        caches[f"r00000{r}.zarr"] = ca["content_digest"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {m["cache_name"] for m in lines} == set(caches)  # the trainer consumed every round
    assert all(m["cache"] in caches[m["cache_name"]] for m in lines)  # store id: the digest's head
    assert len(lines) == 2 and sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001",
                                                                                          "step-000002"]
