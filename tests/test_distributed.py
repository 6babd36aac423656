"""`oprd train` under torchrun with FSDP2 (gloo on CPU, 2 ranks, OMP_NUM_THREADS=1), against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import run_cli
from oprd_cli.teacher import cache_rollouts
from oprd_cli.train.distributed import DistEnv, dist_env, local_rows

ROOT = Path(__file__).resolve().parents[1]
# 6 samples, batch 5: step 2 has one row, so rank 1 runs a placeholder micro-batch that adds nothing
COMMON = ["--batch-size", 5, "--lr", 3e-3, "--objective", "opd-top1", "--mu", 1, "--total-steps", 5]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_dir, aime24_path) -> Path:
    root = tmp_path_factory.mktemp("dist") / "run"
    run_cli("rollout", "--model", tiny_dir / "qwen2", "--prompts", aime24_path, "--run-dir", root, "--limit", 3,
            "--num-samples", 2, "--max-new-tokens", 10)
    return Path(cache_rollouts(str(tiny_dir / "qwen2-b"), root / "rollouts" / "r000001.zarr",
                               root / "cache" / "r000001.zarr", layers="all", logprobs="sampled",
                               show_progress=False))


def torchrun(*args, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m oprd_cli ARGS`` (gloo on CPU)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "oprd_cli", *map(str, args)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_fsdp2_over_two_ranks_gives_the_losses_of_one_process(cache, tiny_dir, tmp_path):
    args = ["train", "--model", tiny_dir / "qwen2", "--cache", cache, "--max-steps", 3, *COMMON]
    run_cli(*args, "--out", tmp_path / "one")
    res = torchrun(*args, "--out", tmp_path / "two")
    assert "training sharded over 2 ranks (FSDP2, gloo)" in res.stderr
    assert res.stderr.count("trained steps 1..3") == 1  # messages from rank 0 only
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(two) == 3  # one metrics line per step: rank 0 writes them
    assert two == pytest.approx(one, abs=1e-4, rel=1e-4)
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["num_samples"] for m in m2] == [m["num_samples"] for m in m1] == [5, 1, 5]  # global counts
    assert [m["num_tokens"] for m in m2] == [m["num_tokens"] for m in m1]
    assert [m["grad_norm"] for m in m2] == pytest.approx([m["grad_norm"] for m in m1], rel=1e-4)
    # the consolidated checkpoint is a save_pretrained folder transformers loads as it is
    ck = tmp_path / "two" / "checkpoints" / "step-000003"
    assert (ck / "dcp" / ".metadata").exists()
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "checkpoints" / "step-000003")
    b = AutoModelForCausalLM.from_pretrained(ck)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x, y, atol=1e-3), name
    assert json.loads((ck / "oprd_checkpoint.json").read_text())["sharded"]["world_size"] == 2


@pytest.mark.slow
def test_only_rank_0_reports_to_wandb(cache, tiny_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from wandb_offline import history, no_wandb_account

    no_wandb_account(monkeypatch, tmp_path)  # offline: no key, no mode
    torchrun("train", "--model", tiny_dir / "qwen2", "--cache", cache, "--max-steps", 2, *COMMON,
             "--out", tmp_path / "two", "--report-to", "wandb")
    got, _, ids = history(tmp_path / "two")  # one offline run (rank 0's), with the global losses
    assert len(ids) == 1
    assert [h["_step"] for h in got] == [1, 2]
    assert [h["train/loss"] for h in got] == pytest.approx(losses(tmp_path / "two"), rel=1e-6)


@pytest.mark.slow
def test_sharded_resume_continues_one_schedule_across_world_sizes(cache, tiny_dir, tmp_path):
    """DCP shards resume under torchrun and in one process; a one-process checkpoint resumes sharded."""
    args = ["train", "--model", tiny_dir / "qwen2", "--cache", cache, *COMMON]
    run_cli(*args, "--out", tmp_path / "whole", "--max-steps", 5)
    part = tmp_path / "part"
    torchrun(*args, "--out", part, "--max-steps", 2)
    run_cli(*args, "--out", part, "--max-steps", 3, "--resume")  # sharded -> one process
    torchrun(*args, "--out", part, "--max-steps", 5, "--resume")  # one process -> sharded
    assert losses(part) == pytest.approx(losses(tmp_path / "whole"), abs=1e-4, rel=1e-4)


def test_rank_split_and_torchrun_env():
    assert dist_env({}) == DistEnv(0, 1, 0)
    assert dist_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == DistEnv(1, 2, 1)
    rows = list(range(5))
    shares = [local_rows(rows, DistEnv(r, 2, r)) for r in range(2)]
    assert shares == [[0, 2, 4], [1, 3]]
    assert local_rows(rows, DistEnv()) == rows


@pytest.mark.slow
def test_teacher_cache_under_torchrun_takes_rank_shards_and_gives_the_one_worker_store(cache, tiny_dir, tmp_path):
    from helpers import info_json

    rollouts = cache.parent.parent / "rollouts" / "r000001.zarr"
    out = tmp_path / "c.zarr"
    args = ["teacher-cache", "--teacher", tiny_dir / "qwen2-b", "--rollouts", rollouts, "--layers", "all",
            "--logprobs", "sampled", "--unit-tokens", 16]
    torchrun(*args, "--out", out)
    run_cli(*args, "--out", tmp_path / "one.zarr")
    info = info_json(out)
    assert info["complete"] and info["content_digest"] == info_json(tmp_path / "one.zarr")["content_digest"]
    workers = {json.loads(f.read_text())["worker"] for f in (out / "units").glob("u*.json")}
    assert workers == {"0/2", "1/2"}


@pytest.mark.slow
def test_rollout_under_torchrun_gives_the_one_process_store(tiny_dir, aime24_path, tmp_path):
    """The ranks sample their shares of the seeded batches; rank 0 writes the one-process store."""
    from helpers import info_json
    from oprd_cli.stores.rollouts import open_rollouts

    # 5 prompts x 2 samples in batches of 3: 4 batches, 2 per rank
    args = ["rollout", "--model", tiny_dir / "qwen2", "--prompts", aime24_path, "--num-samples", 2,
            "--max-new-tokens", 6, "--temperature", 1.0, "--batch-size", 3, "--limit", 5]
    res = torchrun(*args, "--out", tmp_path / "two.zarr")
    assert "sampling over 2 ranks" in res.stderr and res.stderr.count("wrote ") == 1  # rank 0 writes
    run_cli(*args, "--out", tmp_path / "one.zarr")
    two, one = info_json(tmp_path / "two.zarr"), info_json(tmp_path / "one.zarr")
    assert two["complete"] and two["content_digest"] == one["content_digest"]
    assert two["num_samples"] == 10 and two["policy"]["weights_digest"] == one["policy"]["weights_digest"]
    assert open_rollouts(str(tmp_path / "two.zarr")).recompute_digest() == one["content_digest"]
    # teacher-prefix guidance: both passes (teacher prefixes, student continuations) shared the same way
    guided = [*args, "--teacher-prefix", tiny_dir / "qwen2-b", "--prefix-max-tokens", 3,
              "--prefix-mode", "uniform"]
    torchrun(*guided, "--out", tmp_path / "g2.zarr")
    run_cli(*guided, "--out", tmp_path / "g1.zarr")
    assert info_json(tmp_path / "g2.zarr")["content_digest"] == info_json(tmp_path / "g1.zarr")["content_digest"]
