"""Behaviour pinned end to end: a tiny fixed rollout -> teacher-cache -> train -> eval.

The store content digests, the first losses and the eval result are written down here. A refactor
must leave them unchanged; a change of meaning (a new convention, a format change) must update them in
the same commit and say why. The values come from this test itself on the project's CI machine kind
(2-core x86-64 CPU, torch CPU build, one torch thread).
"""

from __future__ import annotations

import hashlib
import json

import pytest

from helpers import info_json, run_cli

PINNED = {
    "rollout_digest": "sha256:17d0114f8d08d5407c9516409fede45c3780d0e6b6135c7f64e49d45002161f3",
    "cache_digest": "sha256:1622aac0950c6b0553cdd6be8f944f7a3c7ecd5b4ae7bbcb3dc569345ce8f7ba",
    "losses": {"oprd": [0.030219, 0.029974], "opd-topk": [0.040722, 0.050397]},
    "eval": {"avg_at_n": 0.0, "dist_4g": 1.0, "mean_response_tokens": 8.0, "responses": "245da20ec75d9af4"},
}

ROLLOUT = ["--limit", "2", "--num-samples", "2", "--max-new-tokens", "8", "--record-topk", "4", "--seed", "0"]


@pytest.fixture(scope="module")
def pinned_run(tmp_path_factory, tiny_dir, aime24_path):
    root = tmp_path_factory.mktemp("pinned")
    run = root / "run"
    run_cli("rollout", "--model", tiny_dir / "qwen2", "--prompts", aime24_path, "--run-dir", run, *ROLLOUT)
    run_cli("teacher-cache", "--teacher", tiny_dir / "qwen2-b", "--run-dir", run, "--layers", "all",
            "--positions", "last_k", "--k", "6", "--logprobs", "topk", "--topk", "4")
    losses = {}
    for objective, extra in (("oprd", []), ("opd-topk", ["--mu", "1"])):
        out = root / objective
        run_cli("train", "--cache", run / "cache" / "r000001.zarr", "--out", out, "--model", tiny_dir / "qwen2",
                "--objective", objective, *extra, "--lr", "3e-3", "--batch-size", "2", "--max-steps", "2",
                "--seed", "0", "--save-every", "2")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[objective] = [round(r["loss"], 6) for r in rows]
    report = root / "eval.json"
    run_cli("eval", "--data", aime24_path, "--limit", "2", "--num-samples", "2", "--max-new-tokens", "8",
            "--model", root / "oprd" / "checkpoints" / "step-000002", "--seed", "0", "--out", report)
    rep = json.loads(report.read_text())
    rows = [json.loads(line) for line in (root / "eval.responses.jsonl").read_text().splitlines()]
    responses = hashlib.sha256("\n".join(r["response"] for r in rows).encode()).hexdigest()[:16]
    return {
        "rollout_digest": info_json(run / "rollouts" / "r000001.zarr")["content_digest"],
        "cache_digest": info_json(run / "cache" / "r000001.zarr")["content_digest"],
        "losses": losses,
        "eval": {"responses": responses, "avg_at_n": rep["avg_at_n"], "dist_4g": rep["dist_4g"],
                 "mean_response_tokens": rep["mean_response_tokens"]},
    }


def test_pinned_behaviour(pinned_run):
    print(json.dumps(pinned_run, indent=1, sort_keys=True))
    got = pinned_run
    assert got["rollout_digest"] == PINNED["rollout_digest"]
    assert got["cache_digest"] == PINNED["cache_digest"]
    for objective, losses in PINNED["losses"].items():
        assert got["losses"][objective] == pytest.approx(losses, rel=1e-4, abs=1e-6), objective
    assert got["eval"] == PINNED["eval"]
