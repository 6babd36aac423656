"""The fault matrix (issue 17, point 1): SIGKILL at seeded moments, a full disk, a checkpoint that lost a file.

After each kill the same command is run again and must finish with what an uninterrupted run gives (train:
the same losses on CPU; rollout: the same content digest), and no reader may see an incomplete store or
checkpoint in between (eval: no partial report, a report only with its responses). The short form runs one seed
per stage; ``-m slow`` runs more. SIGKILL of
``teacher-cache`` (one worker and two shards) and of ``loop`` are in test_teacher_cache.py and test_loop.py.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import info_json, run_cli
from oprd_cli.stores import common
from oprd_cli.teacher import cache_rollouts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dir, aime24_path) -> Path:
    root = tmp_path_factory.mktemp("faults") / "run"
    run_cli("rollout", "--model", tiny_dir / "qwen2", "--prompts", aime24_path, "--run-dir", root, "--limit", 2,
            "--num-samples", 2, "--max-new-tokens", 8)
    cache_rollouts(str(tiny_dir / "qwen2-b"), root / "rollouts" / "r000001.zarr", root / "cache" / "r000001.zarr",
                   layers="all", positions="last_k", k=4, show_progress=False)
    return root


def _proc(*args) -> subprocess.Popen:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [e.get("PYTHONPATH")])])
    return subprocess.Popen([sys.executable, "-m", "oprd_cli", *map(str, args)], cwd=ROOT, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def _kill_when(proc: subprocess.Popen, ready, delay: float, timeout: float = 300) -> bool:
    """SIGKILL ``proc`` ``delay`` s after ``ready()``; False when it finished first."""
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            return False
        assert time.monotonic() - t0 < timeout
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return True


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


TRAIN_SEEDS = [pytest.param(0)] + [pytest.param(s, marks=pytest.mark.slow) for s in (1, 2, 3, 4)]


@pytest.mark.parametrize("seed", TRAIN_SEEDS)
def test_train_killed_at_a_seeded_moment_resumes_to_the_same_losses(run, tiny_dir, tmp_path, seed):
    cache = run / "cache" / "r000001.zarr"
    args = ["--cache", cache, "--model", tiny_dir / "qwen2", "--batch-size", 2, "--max-steps", 4, "--save-every", 1,
            "--lr", "3e-3", "--seed", 0]
    run_cli("train", *args, "--out", tmp_path / "ref")
    reference = _losses(tmp_path / "ref")
    assert len(reference) == 4
    out = tmp_path / "out"
    rng = random.Random(seed)
    after_steps, delay = rng.randint(0, 3), rng.uniform(0.0, 0.3)
    proc = _proc("train", *args, "--out", out)
    killed = _kill_when(proc, lambda: _lines(out / "metrics.jsonl") >= after_steps, delay)
    # between the kill and the restart, a reader sees only complete checkpoints
    for ck in sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").exists() else []:
        assert json.loads(run_cli("verify", ck, "--json").stdout)["ok"], ck
    resume = ["--resume"] if list((out / "checkpoints").glob("step-*")) else []
    run_cli("train", *args, "--out", out, *resume)
    assert _losses(out) == pytest.approx(reference, rel=1e-6, abs=1e-9), (killed, after_steps, delay)
    assert json.loads(run_cli("verify", out, "--json").stdout)["ok"]


ROLLOUT_SEEDS = [pytest.param(0)] + [pytest.param(s, marks=pytest.mark.slow) for s in (1, 2, 3)]


@pytest.mark.parametrize("seed", ROLLOUT_SEEDS)
def test_rollout_killed_at_a_seeded_moment_reruns_to_the_same_digest(run, tiny_dir, aime24_path, tmp_path, seed):
    args = ["rollout", "--model", tiny_dir / "qwen2", "--prompts", aime24_path, "--limit", 2, "--num-samples", 2,
            "--max-new-tokens", 8]
    reference = info_json(run / "rollouts" / "r000001.zarr")["content_digest"]
    out = tmp_path / "r.zarr"
    lock = tmp_path / ".r.zarr.lock"
    proc = _proc(*args, "--out", out)
    killed = _kill_when(proc, lock.exists, random.Random(seed).uniform(0.0, 2.0))
    if out.exists():  # what the killed writer left is never read as a rollout store
        assert not common.is_complete(str(out)) or not killed
        if not common.is_complete(str(out)):
            assert "incomplete" in run_cli("teacher-cache", "--teacher", tiny_dir / "qwen2-b", "--rollouts", out,
                                           "--out", tmp_path / "c.zarr", expect=2).stderr
    run_cli(*args, "--out", out, *(["--overwrite"] if common.is_complete(str(out)) else []))
    assert info_json(out)["content_digest"] == reference
    assert not lock.exists()


def test_full_disk_while_caching_leaves_a_resumable_store(run, tiny_dir, tmp_path, monkeypatch):
    from zarr.storage import LocalStore

    args = ["teacher-cache", "--teacher", tiny_dir / "qwen2-b", "--rollouts", run / "rollouts" / "r000001.zarr",
            "--layers", "all", "--positions", "last_k", "--k", 4, "--unit-tokens", 8]
    reference = tmp_path / "ref.zarr"
    run_cli(*args, "--out", reference)
    out = tmp_path / "c.zarr"
    real_set, calls = LocalStore.set, {"n": 0}

    async def full_after_some_writes(self, key, value):
        calls["n"] += 1
        if calls["n"] > 12 and "/c/" in key:
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value)

    monkeypatch.setattr(LocalStore, "set", full_after_some_writes)
    res = run_cli(*args, "--out", out, expect=2)
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and "No space left on device" in line and "resumable" in line, res.stderr
    assert "Traceback" not in res.stderr
    assert out.exists() and not common.is_complete(str(out))
    monkeypatch.setattr(LocalStore, "set", real_set)
    run_cli(*args, "--out", out)  # space again: the same command finishes the store
    assert info_json(out)["content_digest"] == info_json(reference)["content_digest"]


def _reports(folder: Path) -> dict[str, dict]:
    """What the eval reports of a folder say: step, Avg@n and the graded responses (no timings)."""
    out = {}
    for p in sorted(folder.glob("*.json")):
        rep = json.loads(p.read_text())  # written atomically: never a partial file
        responses = p.with_name(p.stem + ".responses.jsonl")
        assert responses.exists(), f"{p.name} without its responses"  # the report is written last
        out[p.name] = {"step": rep["step"], "avg_at_n": rep["avg_at_n"],
                       "responses": [json.loads(x)["response"] for x in responses.read_text().splitlines()]}
    return out


EVAL_SEEDS = [pytest.param(0)] + [pytest.param(s, marks=pytest.mark.slow) for s in (1, 2)]


@pytest.mark.parametrize("seed", EVAL_SEEDS)
def test_eval_all_checkpoints_killed_at_a_seeded_moment_reruns_to_the_same_reports(run, tiny_dir, aime24_path,
                                                                                    tmp_path, seed):
    import shutil

    mine = tmp_path / "run"
    shutil.copytree(run, mine)
    run_cli("train", "--run-dir", mine, "--model", tiny_dir / "qwen2", "--batch-size", 2, "--max-steps", 2,
            "--save-every", 1, "--lr", "3e-3")
    args = ["eval", "--data", aime24_path, "--bench", "aime24", "--run-dir", mine, "--all-checkpoints", "--limit", 1,
            "--num-samples", 2, "--max-new-tokens", 4, "--seed", 0]
    run_cli(*args, "--out", tmp_path / "ref")
    reference = _reports(tmp_path / "ref")
    assert [r["step"] for r in reference.values()] == [0, 1, 2]
    out = tmp_path / "eval"
    proc = _proc(*args, "--out", out)
    _kill_when(proc, lambda: len(list(out.glob("*.json"))) >= 1, random.Random(seed).uniform(0.0, 1.0))
    partial = _reports(out) if out.exists() else {}
    assert all(partial[k] == reference[k] for k in partial)  # what a reader sees in between is right
    run_cli(*args, "--out", out)
    assert _reports(out) == reference
